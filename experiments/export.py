"""Export a detector for deployment: `python experiments/export.py --checkpoint CKPT [--size HxW] --out DIR`.

CKPT is an official DETR .pth (e.g. detr-r50-e632da11.pth) or a detr_jax training work directory. Writes
DIR/model.onnx (--format onnx, the default; needs `pip install -e .[export]`) or DIR/model.stablehlo
(--format stablehlo, a serialized `jax.export`), and DIR/manifest.json: input/output names and shapes, the
ImageNet mean/std, the eval resize, the padding rule and the class names.

The model takes `images` float32 [B, H, W, 3] (normalised, zero-padded bottom/right to HxW) and `pixel_mask`
bool [B, H, W] (True on real pixels) and returns `pred_logits` [B, N, C + 1] and `pred_boxes` [B, N, 4] (cxcywh,
normalised by each unpadded image). --batch_size 0 (the default for ONNX) gives a symbolic batch dimension "B";
H and W are fixed (export one file per padding size); without --size, the square that holds every image of the
eval resize (a work directory's config.data.max_size, 1333 for an official .pth, rounded up to 32). By default the
exported model is the Predictor's (padding-invariant: each image's detections as `experiments/predict.py` gives
them, whatever the padding); --nopadding_invariant exports the official DETR's behaviour on a padded batch, where
the padding of a non-square image changes its outputs a little. --verify runs the ONNX file in onnxruntime beside the
JAX model on a random padded batch and prints the largest differences. Panoptic checkpoints are refused.
"""

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from detr_jax.cli import parse_flags, quiet_logs  # noqa: E402 (no jax import)
from detr_jax.ops.xla_flags import set_process_defaults  # noqa: E402 (no jax import)

set_process_defaults()  # before jax is imported: XLA flags (the user's XLA_FLAGS win) and glibc malloc options

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Official .pth or a training work directory.", required=True)
_FORMAT = flags.DEFINE_enum("format", "onnx", ["onnx", "stablehlo"], "onnx (jax2onnx) or stablehlo (jax.export).")
_OUT = flags.DEFINE_string("out", "export", "Output folder.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 0, "Images per call; 0: any (a symbolic batch dimension, ONNX "
                                   "only).", lower_bound=0)
_SIZE = flags.DEFINE_string("size", None, "HxW of the padded input, e.g. 800x1216: every resized image must fit "
                            "(the official resize gives shorter side 800, longer at most 1333). Default: the square "
                            "of the eval resize's max_size, rounded up to 32.")
_PADDING_INVARIANT = flags.DEFINE_bool(
    "padding_invariant", True, "Export the padding-invariant model (the Predictor's: each image's detections as "
    "predict.py gives them); --nopadding_invariant: the official one (equal to the official DETR on a padded batch).")
_RAW_WEIGHTS = flags.DEFINE_bool("raw_weights", False, "A work directory of a run with a parameter EMA (config.ema): "
                                  "the trained parameters instead of their EMA.")
_DILATION = flags.DEFINE_bool("dilation", False, "The official checkpoint is a DC5 model.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", 8, "Attention heads of an official checkpoint (not in its weights).")
_VERIFY = flags.DEFINE_bool("verify", True, "Compare onnxruntime with the JAX model on a random padded batch.")


def parse_size(text: str):
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size must be HxW (e.g. 800x1216), got {text!r}") from None
    if h < 32 or w < 32:
        raise ValueError(f"--size {text}: H and W must be at least 32 (the backbone's stride)")
    return h, w


def verify(path, model, variables, batch_size, image_hw, padding_invariant):
    """Largest |onnxruntime - JAX| of logits and boxes on a random batch of two (or batch_size) padded images."""
    import jax
    import numpy as np
    import onnxruntime as ort

    from detr_jax.export import inference_function

    b, (h, w) = batch_size or 2, image_hw
    rng = np.random.default_rng(0)
    images = rng.standard_normal((b, h, w, 3)).astype(np.float32)
    pixel_mask = np.zeros((b, h, w), bool)
    for i in range(b):
        pixel_mask[i, :h - rng.integers(0, h // 4 + 1), :w - rng.integers(0, w // 4 + 1)] = True
    images *= pixel_mask[..., None]
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    logits, boxes = session.run(["pred_logits", "pred_boxes"], {"images": images, "pixel_mask": pixel_mask})
    ref_logits, ref_boxes = jax.jit(inference_function(model, variables, padding_invariant))(images, pixel_mask)
    return float(np.abs(logits - ref_logits).max()), float(np.abs(boxes - ref_boxes).max())


def main(argv):
    del argv
    quiet_logs()
    try:  # before jax is imported: a bad flag is refused at once
        image_hw = parse_size(_SIZE.value) if _SIZE.value is not None else None
    except ValueError as e:
        sys.exit(f"error: {e}")
    from detr_jax.export import export_model, load_for_export

    batch_size = _BATCH_SIZE.value or None
    try:
        model, variables, info = load_for_export(_CHECKPOINT.value, dilation=_DILATION.value,
                                                 num_heads=_NUM_HEADS.value, raw_weights=_RAW_WEIGHTS.value)
        if image_hw is None:
            side = -(-int(info["max_size"]) // 32) * 32
            image_hw = (side, side)
            print(f"--size not given: {side}x{side}, which holds every image of the eval resize (shorter side "
                  f"{info['size']}, longer at most {info['max_size']})")
        meta = export_model(model, variables, info, _OUT.value, _FORMAT.value, batch_size, image_hw,
                            _PADDING_INVARIANT.value)
    except (FileNotFoundError, ValueError, ImportError) as e:  # a panoptic checkpoint: a ValueError saying why
        sys.exit(f"error: {e}")
    path = os.path.join(_OUT.value, meta["file"])
    print("exported the padding-invariant model: each image's detections are predict.py's" if _PADDING_INVARIANT.value
          else "exported the official model: on a padded batch its outputs are the official DETR's, and the padding "
          "of a non-square image changes them a little (predict.py's are padding-invariant)")
    print(f"wrote {path} and manifest.json: "
          f"{json.dumps({io['name']: io['shape'] for io in meta['inputs'] + meta['outputs']})}")
    if _VERIFY.value and _FORMAT.value == "onnx":
        dl, db = verify(path, model, variables, batch_size, image_hw, _PADDING_INVARIANT.value)
        print(f"onnxruntime vs JAX on a random padded batch: max |diff| logits {dl:.2e}, boxes {db:.2e}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
