"""Detect objects in images: `python experiments/predict.py --checkpoint CKPT IMAGE_OR_FOLDER...`.

CKPT is an official DETR .pth (e.g. detr-r50-e632da11.pth, COCO class names) or a detr_jax training work
directory. Writes <out>/detections.json (xyxy pixel boxes, label names, scores above --threshold) and one
PNG per image with the labelled boxes; --attention also writes the best query's cross-attention map.
"""

import json
import logging
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from detr_jax.cli import parse_flags, quiet_logs  # noqa: E402 (no jax import)
from detr_jax.xla_flags import set_process_defaults  # noqa: E402 (no jax import)

set_process_defaults()  # before jax is imported: XLA flags (the user's XLA_FLAGS win) and glibc malloc options

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Official .pth or a training work directory.", required=True)
_OUT = flags.DEFINE_string("out", "predictions", "Output folder.")
_THRESHOLD = flags.DEFINE_float("threshold", 0.7, "Keep detections scoring at least this.")
_DILATION = flags.DEFINE_bool("dilation", False, "The official checkpoint is a DC5 model.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", 8, "Attention heads of an official checkpoint (not in its weights).")
_SIZE = flags.DEFINE_integer("size", None, "Shorter side the image is resized to (default 800, or the config's).")
_ATTENTION = flags.DEFINE_bool("attention", False, "Also write the best query's cross-attention picture.")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(paths):
    """Files as given, folders expanded to their image files (sorted); a clear error for nothing to do."""
    images = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise FileNotFoundError(f"folder {path} has no images ({', '.join(IMAGE_EXTENSIONS)})")
            images += found
        elif os.path.isfile(path):
            images.append(path)
        else:
            raise FileNotFoundError(f"no such image or folder: {path}")
    if not images:
        raise ValueError("give at least one image file or folder after the flags")
    return images


def main(argv):
    from detr_jax.inference import Predictor

    quiet_logs()  # our lines at INFO; orbax's and jax's chatter only when it is a warning
    try:
        images = list_images(argv[1:])
        kwargs = dict(threshold=_THRESHOLD.value)
        if not os.path.isdir(_CHECKPOINT.value):
            kwargs.update(dilation=_DILATION.value, num_heads=_NUM_HEADS.value)
        if _SIZE.value:
            kwargs["size"] = _SIZE.value
        predictor = Predictor.from_checkpoint(_CHECKPOINT.value, **kwargs)
    except (FileNotFoundError, ValueError, ImportError) as e:
        sys.exit(f"error: {e}")
    os.makedirs(_OUT.value, exist_ok=True)
    results, stems = {}, set()
    for path in images:
        try:
            detections = predictor(path)
        except (FileNotFoundError, ValueError) as e:
            logging.error("%s", e)
            results[path] = {"error": str(e)}
            continue
        results[path] = [dict(box_xyxy=[round(float(v), 2) for v in box], label=name, score=round(float(score), 4))
                         for box, name, score in zip(detections["boxes"], detections["label_names"], detections["scores"])]
        stem = base = os.path.splitext(os.path.basename(path))[0]
        for n in range(2, len(images) + 2):  # a/cat.jpg and b/cat.jpg: cat_detections.png, cat_2_detections.png
            if stem not in stems:
                break
            stem = f"{base}_{n}"
        stems.add(stem)
        predictor.draw(path, detections).save(os.path.join(_OUT.value, f"{stem}_detections.png"))
        if _ATTENTION.value:
            predictor.attention_picture(path).save(os.path.join(_OUT.value, f"{stem}_attention.png"))
        print(f"{path}: {len(results[path])} detections")
    with open(os.path.join(_OUT.value, "detections.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {_OUT.value}/detections.json")
    if any(isinstance(r, dict) for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
