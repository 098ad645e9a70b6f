"""Export a DETR detector for deployment: an ONNX file (jax2onnx) or a `jax.export` StableHLO artifact.

    export("detr-r50-e632da11.pth", "deploy", "onnx", batch_size=None, image_hw=(800, 1216))  # or a work dir
    # deploy/model.onnx (any batch size: a symbolic dimension "B") and deploy/manifest.json

The ONNX model takes `images` float32 [B, H, W, 3] (ImageNet-normalised, zero-padded bottom/right) and
`pixel_mask` bool [B, H, W] (True on real pixels), and returns `pred_logits` [B, N, C + 1] (no-object last) and
`pred_boxes` [B, N, 4] (cxcywh, normalised by each unpadded image): the contract of `DETR.__call__`.

Which model is exported: the official one (`padding_invariant=False`) by default, the one whose outputs equal the
official DETR's on any padded batch (the official tiny fixture: logits within 1e-6). The padding-invariant model
(`Predictor`'s) gives each image the result it has alone, but on a padded batch it differs from the official
outputs (0.1 in logits on the fixture), so it is an option (`padding_invariant=True`), not the default.

Conversion needs the `export` extra (`pip install -e .[export]`: jax2onnx, onnxruntime). jax2onnx is pinned at
0.13.0, the newest release that accepts orbax-checkpoint 0.12 (0.13.1 and later downgrade it to 0.11). Its
`nn.max_pool` plugin drops explicit padding, so the model is traced with `formulations(max_pool="explicit_pad")`
(the same numbers; see `layers.max_pool`).
"""

import contextlib
import json
import logging
import os
from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from detr_jax.data.sources.coco_categories import OFFICIAL91_CLASS_NAMES
from detr_jax.data.sources.coco_panoptic_categories import OFFICIAL250_CLASS_NAMES
from detr_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD, make_eval_transforms
from detr_jax.inference import export_inference
from detr_jax.models.layers import formulations
from detr_jax.ops.files import atomic_write
from detr_jax.weights.official import load_official_checkpoint
from detr_jax.weights.workdir import load_workdir_checkpoint

INPUT_NAMES = ("images", "pixel_mask")
OUTPUT_NAMES = ("pred_logits", "pred_boxes")
DYNAMIC_BATCH = "B"  # the symbolic batch dimension of an ONNX file exported with batch_size=None
PADDING_RULE = ("resize the image so that its shorter side is `size` and its longer side at most `max_size` "
                "(the official eval transform), scale pixels to [0, 1], subtract `mean` and divide by `std` per "
                "channel (RGB), place it at the top-left of an H x W zero array (padding bottom/right) and set "
                "pixel_mask True on the image's pixels, False on the padding; pred_boxes are cxcywh normalised "
                "by the unpadded (resized) image, so multiply by its original width/height for pixels")


class PanopticExportError(ValueError):
    """The checkpoint is a panoptic `DETRsegm`, which export refuses."""


def load_for_export(path: str, dilation: bool = False, num_heads: int = 8, raw_weights: bool = False):
    """The detector of a detr_jax work directory or an official .pth: (model, variables, info).

    info: "class_names" (one per label, no-object excluded), "size" and "max_size" (the eval resize).
    `dilation` and `num_heads` are for an official .pth (not in its weights). A panoptic checkpoint (a `DETRsegm`)
    raises `PanopticExportError`. A work directory's run with a parameter EMA (config.ema) exports the EMA, unless
    `raw_weights`.
    """
    if os.path.isdir(path):
        config, model, variables = load_workdir_checkpoint(path, raw_weights=raw_weights)
        size, max_size = config.data.eval_size, config.data.max_size
        names_file = os.path.join(path, "class_names.json")
        if os.path.isfile(names_file):
            with open(names_file) as f:
                names = json.load(f)["class_names"]
        else:  # an older work directory: the Predictor asks the data
            from detr_jax.inference import Predictor
            names = Predictor.from_checkpoint(path).class_names
    elif not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path} (an official .pth or a training work directory)")
    else:
        model, variables = load_official_checkpoint(path, dilation=dilation, num_heads=num_heads)
        size, max_size = 800, 1333
        official = {len(n): n for n in (OFFICIAL91_CLASS_NAMES, OFFICIAL250_CLASS_NAMES)}
        names = official.get(model.detector.num_classes)
    if hasattr(model, "detr"):
        raise PanopticExportError(
            f"{path} is a panoptic checkpoint (DETR with a mask head): export supports detectors only, since the "
            "mask head runs on each unpadded image at its own size (see Predictor); export its detector from a "
            "box-only checkpoint instead")
    num_classes = model.detector.num_classes
    names = list(names or [str(i) for i in range(num_classes)])
    return model, variables, dict(class_names=names, size=int(size), max_size=int(max_size))


def inference_function(model, variables, padding_invariant: bool = False):
    """(images, pixel_mask) -> (pred_logits, pred_boxes) of the detector, without auxiliary outputs, weights
    closed over; traced with the max-pool formulation jax2onnx converts (same numbers).

    Always in float32: a model trained with bfloat16 compute (`half_precision`; its parameters are float32) is
    exported computing in float32, since onnxruntime's CPU kernels refuse bfloat16 (e.g. Einsum).
    """
    model = model.with_detector(padding_invariant=padding_invariant, aux_loss=False, dtype=jnp.float32)

    def infer(images, pixel_mask):
        with formulations(max_pool="explicit_pad"):
            out = model.apply(variables, images, pixel_mask=pixel_mask)
        return out["pred_logits"], out["pred_boxes"]

    return infer


def to_onnx_model(model, variables, batch_size: Optional[int], image_hw: Sequence[int],
                  padding_invariant: bool = False):
    """The ONNX ModelProto of the detector for images of `image_hw` (H, W); `batch_size=None`: a symbolic batch
    dimension "B" (any batch size at run time)."""
    from jax2onnx import to_onnx

    h, w = (int(v) for v in image_hw)
    b = jax.export.symbolic_shape(DYNAMIC_BATCH)[0] if batch_size is None else int(batch_size)
    inputs = [jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32), jax.ShapeDtypeStruct((b, h, w), jnp.bool_)]
    with _quiet_converter_logs():
        return to_onnx(inference_function(model, variables, padding_invariant), inputs, model_name="detr",
                       input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES))


@contextlib.contextmanager
def _quiet_converter_logs():
    """jax2onnx imports all its plugins (dm_pix's fail on this jax, unused here) and onnx_ir warns once per shape
    constant it serialises without a value type (harmless): both at WARNING, hundreds of lines. ERROR only."""
    loggers = [logging.getLogger(name) for name in ("jax2onnx.plugins.plugin_system", "onnx_ir.serde")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def manifest(model, info: Dict, batch_size: Optional[int], image_hw: Sequence[int], padding_invariant: bool,
             fmt: str, file_name: str) -> Dict:
    """The JSON-able description written beside an exported model."""
    detector = model.detector
    b = DYNAMIC_BATCH if batch_size is None else int(batch_size)
    h, w = (int(v) for v in image_hw)
    n, c = detector.num_queries, detector.num_classes + 1
    return dict(
        format=fmt, file=file_name,
        inputs=[dict(name="images", shape=[b, h, w, 3], dtype="float32"),
                dict(name="pixel_mask", shape=[b, h, w], dtype="bool")],
        outputs=[dict(name="pred_logits", shape=[b, n, c], dtype="float32",
                      meaning="class logits, the last one no-object; softmax over the last axis"),
                 dict(name="pred_boxes", shape=[b, n, 4], dtype="float32",
                      meaning="cx, cy, w, h normalised by the unpadded image")],
        mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), pixel_scale=1 / 255,
        size=info["size"], max_size=info["max_size"], padding=PADDING_RULE,
        padding_invariant=bool(padding_invariant), compute_dtype="float32" if fmt == "onnx" else
        jnp.dtype(detector.dtype).name, num_queries=n, num_classes=detector.num_classes,
        class_names=list(info["class_names"]))


def export(checkpoint: str, out_dir: str, fmt: str = "onnx", batch_size: Optional[int] = None,
           image_hw: Sequence[int] = (800, 1216), padding_invariant: bool = False, dilation: bool = False,
           num_heads: int = 8) -> Dict:
    """Write `out_dir`/model.onnx (fmt "onnx") or model.stablehlo (fmt "stablehlo", `jax.export` serialized; a
    fixed batch size) and `out_dir`/manifest.json for a checkpoint (see `load_for_export`); returns the manifest."""
    model, variables, info = load_for_export(checkpoint, dilation=dilation, num_heads=num_heads)
    return export_model(model, variables, info, out_dir, fmt, batch_size, image_hw, padding_invariant)


def export_model(model, variables, info: Dict, out_dir: str, fmt: str = "onnx", batch_size: Optional[int] = None,
                 image_hw: Sequence[int] = (800, 1216), padding_invariant: bool = False) -> Dict:
    """`export` of a loaded detector (`load_for_export`'s model, variables, info)."""
    if fmt not in ("onnx", "stablehlo"):
        raise ValueError(f"format must be 'onnx' or 'stablehlo', got {fmt!r}")
    if fmt == "stablehlo" and batch_size is None:
        raise ValueError("--format stablehlo needs a fixed --batch_size (jax.export of one shape)")
    os.makedirs(out_dir, exist_ok=True)
    if fmt == "onnx":
        file_name = "model.onnx"
        proto = to_onnx_model(model, variables, batch_size, image_hw, padding_invariant)
        with open(os.path.join(out_dir, file_name), "wb") as f:
            f.write(proto.SerializeToString())
    else:
        file_name = "model.stablehlo"
        exported = export_inference(model.with_detector(padding_invariant=padding_invariant), variables,
                                    batch_size, image_hw)
        with open(os.path.join(out_dir, file_name), "wb") as f:
            f.write(exported.serialize())
    meta = manifest(model, info, batch_size, image_hw, padding_invariant, fmt, file_name)
    atomic_write(os.path.join(out_dir, "manifest.json"), json.dumps(meta, indent=1))
    return meta


def preprocess(image: np.ndarray, size: int, max_size: int, image_hw: Sequence[int]):
    """One uint8 RGB image [h, w, 3] -> (images [1, H, W, 3], pixel_mask [1, H, W]) as the manifest's padding
    rule says (the official eval transform, zero padding bottom/right to `image_hw`)."""
    x, _ = make_eval_transforms(size, max_size)(np.asarray(image, np.uint8), None, np.random.default_rng(0))
    h, w = x.shape[:2]
    if h > image_hw[0] or w > image_hw[1]:
        raise ValueError(f"the resized image is {h} x {w}, larger than the exported {image_hw[0]} x {image_hw[1]}")
    images = np.zeros((1, image_hw[0], image_hw[1], 3), np.float32)
    images[0, :h, :w] = x
    pixel_mask = np.zeros((1, image_hw[0], image_hw[1]), bool)
    pixel_mask[0, :h, :w] = True
    return images, pixel_mask
