"""Inference for people: load once, call on images; attention maps; `jax.export` of the inference function.

    predictor = Predictor.from_checkpoint("detr-r50-e632da11.pth")      # or a training work directory
    detections = predictor("street.jpg")                                # or a uint8 [H, W, 3] array
    # {"boxes": [K, 4] xyxy pixels, "scores": [K], "labels": [K], "label_names": [...]}
"""

import json
import os
from typing import Dict, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from detr_jax.data.transforms import make_eval_transforms
from detr_jax.evaluate import draw_detections, postprocess

STRIDE = 32  # pad to a multiple of the backbone stride: few compiled shapes, exact mask downsampling


def read_image(path: str) -> np.ndarray:
    """uint8 [H, W, 3] RGB of an image file; a clear error naming the file if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"image not found: {path}") from e
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def load_workdir_checkpoint(workdir: str, step: Optional[int] = None):
    """(config, model, variables) from a training work directory (its config.json and orbax checkpoints)."""
    import orbax.checkpoint as ocp

    from detr_jax.train import build_model

    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{workdir} is not a detr_jax work directory: no config.json in it")
    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    manager.close()
    model = build_model(config)
    return config, model, {"params": state["params"], "frozen": state["frozen"]}


class Predictor:
    """A DETR ready to run on single images: eval transform, padding, jit per padded shape, post-processing.

    Args:
      model, variables: a `DETR` and its {"params", "frozen"}.
      class_names: name of each label (no-object excluded).
      size, max_size: the eval resize (shorter side, longer-side cap), official 800 / 1333.
      threshold: detections scoring below it are dropped.
    """

    def __init__(self, model, variables, class_names: Sequence[str], size: int = 800, max_size: int = 1333,
                 threshold: float = 0.7):
        self.model = model.clone(padding_invariant=True, aux_loss=False)
        self.variables = variables
        self.class_names = list(class_names)
        self.transforms = make_eval_transforms(size, max_size)
        self.threshold = threshold

        def forward(variables, images, pixel_mask, orig_size):
            out = self.model.apply(variables, images, pixel_mask=pixel_mask, return_attention=True)
            scores, labels, boxes = postprocess(out["pred_logits"], out["pred_boxes"], orig_size)
            return scores, labels, boxes, out["cross_attention"], out["feature_mask"]

        self._forward = jax.jit(forward)

    @classmethod
    def from_checkpoint(cls, path: str, **kwargs) -> "Predictor":
        """From an official DETR .pth (COCO 91-id class names) or a detr_jax training work directory.

        For a .pth, `dilation` and `num_heads` (official defaults False, 8) may be given; other kwargs go to
        the constructor.
        """
        if os.path.isdir(path):
            config, model, variables = load_workdir_checkpoint(path)
            d = config.data
            names_file = os.path.join(path, "class_names.json")
            if os.path.isfile(names_file):  # written at the start of training: the data need not be here
                with open(names_file) as f:
                    names = json.load(f)["class_names"]
            else:  # a work directory of an older version: ask the data
                from detr_jax.data import build_source

                source = build_source(d.source, **dict(d.source_kwargs, **d.get("val_kwargs", {})))
                names = getattr(source, "class_names", [])
            names = list(names) or [str(i) for i in range(model.num_classes)]
            kwargs.setdefault("size", d.eval_size)
            kwargs.setdefault("max_size", d.max_size)
            return cls(model, variables, names, **kwargs)
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint not found: {path} (an official .pth or a training work directory)")
        from detr_jax.convert import load_official_checkpoint
        from detr_jax.data.coco_categories import OFFICIAL91_CLASS_NAMES

        arch = {k: kwargs.pop(k) for k in ("dilation", "num_heads") if k in kwargs}  # not in the weights
        model, variables = load_official_checkpoint(path, **arch)
        names = OFFICIAL91_CLASS_NAMES if model.num_classes == len(OFFICIAL91_CLASS_NAMES) \
            else [str(i) for i in range(model.num_classes)]
        return cls(model, variables, names, **kwargs)

    def _prepare(self, image: np.ndarray):
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
        x, _ = self.transforms(image.astype(np.uint8), None, np.random.default_rng(0))
        h, w = x.shape[:2]
        ph, pw = -(-h // STRIDE) * STRIDE, -(-w // STRIDE) * STRIDE
        images = np.zeros((1, ph, pw, 3), np.float32)
        images[0, :h, :w] = x
        pixel_mask = np.zeros((1, ph, pw), bool)
        pixel_mask[0, :h, :w] = True
        return images, pixel_mask, np.array([image.shape[:2]], np.int32)

    def run(self, image: Union[str, np.ndarray]) -> Dict:
        """All queries: scores [N], labels [N], boxes [N, 4] xyxy pixels of the original image, attention [N, h, w]
        over the padded feature map, feature_mask bool [h, w] (True on real cells), and the image."""
        if isinstance(image, (str, os.PathLike)):
            image = read_image(str(image))
        images, pixel_mask, orig_size = self._prepare(image)
        scores, labels, boxes, attention, feature_mask = jax.device_get(
            self._forward(self.variables, images, pixel_mask, orig_size))
        return dict(scores=scores[0], labels=labels[0], boxes=boxes[0], attention=attention[0],
                    feature_mask=feature_mask[0], image=image)

    def __call__(self, image: Union[str, np.ndarray]) -> Dict:
        """Detections above the threshold: boxes [K, 4] xyxy pixels, scores [K], labels [K], label_names."""
        out = self.run(image)
        keep = out["scores"] >= self.threshold
        labels = out["labels"][keep]
        return dict(boxes=out["boxes"][keep], scores=out["scores"][keep], labels=labels,
                    label_names=[self.class_names[int(l)] for l in labels])

    def draw(self, image: Union[str, np.ndarray], detections: Optional[Dict] = None):
        """A PIL image with the labelled boxes of `detections` (computed if not given)."""
        if isinstance(image, (str, os.PathLike)):
            image = read_image(str(image))
        detections = detections if detections is not None else self(image)
        return draw_detections(image, detections["boxes"], detections["labels"], detections["scores"],
                               self.class_names, threshold=0.0)

    def attention_picture(self, image: Union[str, np.ndarray], query: Optional[int] = None):
        """The last decoder layer's cross-attention of one query (default: the best-scoring) over the image.

        Returns a PIL image: the picture with the attention as a red overlay and the query's box, as in the
        official notebook's visualisation.
        """
        from PIL import Image, ImageDraw

        out = self.run(image)
        query = int(np.argmax(out["scores"])) if query is None else int(query)
        img = np.asarray(out["image"], np.uint8)
        h, w = img.shape[:2]
        real = out["feature_mask"]
        attn = out["attention"][query][:real.any(1).sum(), :real.any(0).sum()]  # [fh, fw], real cells only
        attn = attn / max(float(attn.max()), 1e-12)
        heat = np.asarray(Image.fromarray((attn * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)) / 255.0
        overlay = img.astype(np.float32) * (0.35 + 0.65 * heat[..., None])
        overlay[..., 0] = np.maximum(overlay[..., 0], 255 * heat)
        pil = Image.fromarray(np.clip(overlay, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(pil)
        x0, y0, x1, y1 = (float(v) for v in out["boxes"][query])
        label = self.class_names[int(out["labels"][query])]
        draw.rectangle([x0, y0, x1, y1], outline=(255, 255, 0), width=2)
        draw.text((x0 + 2, y0 + 1), f"query {query}: {label} {out['scores'][query]:.2f}", fill=(255, 255, 0))
        return pil


def export_inference(model, variables, batch_size: int, image_hw: Sequence[int]):
    """`jax.export` the jitted inference function for one static input shape, weights included.

    The exported function takes images float32 [batch_size, H, W, 3] (normalised, zero-padded) and pixel_mask
    bool [batch_size, H, W], and returns (pred_logits [B, N, C + 1], pred_boxes [B, N, 4] cxcywh normalised).
    H and W are the padding bucket (multiples of 32); export one function per bucket.
    Returns a `jax.export.Exported`; `.serialize()` gives bytes, `jax.export.deserialize(b).call(...)` runs them.
    """
    model = model.clone(aux_loss=False)

    def infer(images, pixel_mask):
        out = model.apply(variables, images, pixel_mask=pixel_mask)
        return out["pred_logits"], out["pred_boxes"]

    h, w = image_hw
    args = (jax.ShapeDtypeStruct((batch_size, h, w, 3), jnp.float32), jax.ShapeDtypeStruct((batch_size, h, w), jnp.bool_))
    return jax.export.export(jax.jit(infer))(*args)
