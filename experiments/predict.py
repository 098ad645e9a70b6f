"""Detect objects in images: `python experiments/predict.py --checkpoint CKPT IMAGE_OR_FOLDER...`.

CKPT is an official DETR .pth (e.g. detr-r50-e632da11.pth, COCO class names) or a detr_jax training work
directory. Writes <out>/detections.json (xyxy pixel boxes, label names, scores above --threshold) and one
PNG per image with the labelled boxes (<stem>_detections.png, captioned; when none passes the threshold, the
top 3 are drawn and the caption says so); --attention also writes the best query's cross-attention map. Boxes
that are not finite (a diverged model) are neither drawn nor written, and counted in the image's line.

A panoptic checkpoint (e.g. detr-r50-panoptic-00ce5173.pth) also writes, per image, <stem>_panoptic.png (the
coloured, labelled segments) and, in COCO panoptic format, the id map panoptic/<stem>.png (id = R + 256 G +
256^2 B) and its segments in <out>/panoptic.json ("annotations", "categories").
"""

import json
import logging
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from detr_jax.cli import parse_flags, quiet_logs  # noqa: E402 (no jax import)
from detr_jax.ops.files import atomic_write  # noqa: E402 (no jax import)
from detr_jax.ops.xla_flags import set_process_defaults  # noqa: E402 (no jax import)

set_process_defaults()  # before jax is imported: XLA flags (the user's XLA_FLAGS win) and glibc malloc options

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Official .pth or a training work directory.", required=True)
_OUT = flags.DEFINE_string("out", "predictions", "Output folder.")
_THRESHOLD = flags.DEFINE_float("threshold", 0.7, "Keep detections scoring at least this.")
_DILATION = flags.DEFINE_bool("dilation", False, "The official checkpoint is a DC5 model.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", 8, "Attention heads of an official checkpoint (not in its weights).")
_SIZE = flags.DEFINE_integer("size", None, "Shorter side the image is resized to (default 800, or the config's).")
_RAW_WEIGHTS = flags.DEFINE_bool("raw_weights", False, "A work directory of a run with a parameter EMA (config.ema): "
                                  "the trained parameters instead of their EMA.")
_ATTENTION = flags.DEFINE_bool("attention", False, "Also write the best query's cross-attention picture.")
_PANOPTIC_THRESHOLD = flags.DEFINE_float("panoptic_threshold", 0.85, "Panoptic checkpoints: the class probability "
                                         "a query needs to become a segment (official 0.85).")
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
        kwargs = dict(threshold=_THRESHOLD.value, panoptic_threshold=_PANOPTIC_THRESHOLD.value)
        if not os.path.isdir(_CHECKPOINT.value):
            kwargs.update(dilation=_DILATION.value, num_heads=_NUM_HEADS.value)
        else:
            kwargs.update(raw_weights=_RAW_WEIGHTS.value)
        if _SIZE.value:
            kwargs["size"] = _SIZE.value
        predictor = Predictor.from_checkpoint(_CHECKPOINT.value, **kwargs)
    except (FileNotFoundError, ValueError, ImportError) as e:
        sys.exit(f"error: {e}")
    os.makedirs(_OUT.value, exist_ok=True)
    if predictor.has_masks:
        os.makedirs(os.path.join(_OUT.value, "panoptic"), exist_ok=True)
    results, stems, annotations = {}, set(), []
    for path in images:
        try:
            detections = predictor(path)
        except (FileNotFoundError, ValueError) as e:
            logging.error("%s", e)
            results[path] = {"error": str(e)}
            continue
        listed = [dict(box_xyxy=[round(float(v), 2) for v in box], label=name, score=round(float(score), 4))
                  for box, name, score in zip(detections["boxes"], detections["label_names"], detections["scores"])]
        results[path] = sorted(listed, key=lambda d: -d["score"])  # the best first (a stable sort: ties keep order)
        stem = base = os.path.splitext(os.path.basename(path))[0]
        for n in range(2, len(images) + 2):  # a/cat.jpg and b/cat.jpg: cat_detections.png, cat_2_detections.png
            if stem not in stems:
                break
            stem = f"{base}_{n}"
        stems.add(stem)
        predictor.draw(path, detections, panoptic=False).save(os.path.join(_OUT.value, f"{stem}_detections.png"))
        if _ATTENTION.value:
            predictor.attention_picture(path).save(os.path.join(_OUT.value, f"{stem}_attention.png"))
        summary = f"{len(results[path])} detections"
        if not results[path] and detections.get("top"):
            top = len(detections["top"]["scores"])
            summary += f" (none >= {_THRESHOLD.value:.2f}: the top {top} drawn, not listed)"
        if detections.get("non_finite"):
            summary += f", {detections['non_finite']} non-finite boxes skipped (not drawn nor written)"
        if predictor.has_masks:
            panoptic = detections["panoptic"]
            predictor.draw(path, detections).save(os.path.join(_OUT.value, f"{stem}_panoptic.png"))
            with open(os.path.join(_OUT.value, "panoptic", f"{stem}.png"), "wb") as f:
                f.write(panoptic["png_string"])
            annotations.append(dict(image_id=stem, file_name=f"{stem}.png", image=path, segments_info=[
                dict(seg, iscrowd=0) for seg in panoptic["segments_info"]]))
            summary += f", {len(panoptic['segments_info'])} panoptic segments"
        print(f"{path}: {summary}")
    atomic_write(os.path.join(_OUT.value, "detections.json"), json.dumps(results, indent=1))
    print(f"wrote {_OUT.value}/detections.json")
    if predictor.has_masks:
        categories = [dict(id=label, name=name, isthing=int(thing)) for label, (name, thing)
                      in enumerate(zip(predictor.class_names, predictor.is_thing)) if name != "N/A"]
        atomic_write(os.path.join(_OUT.value, "panoptic.json"),
                     json.dumps(dict(annotations=annotations, categories=categories), indent=1))
        print(f"wrote {_OUT.value}/panoptic.json and panoptic/")
    if any(isinstance(r, dict) for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
