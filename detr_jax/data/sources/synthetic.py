"""A synthetic detection dataset: solid shapes on gradient or noise backgrounds, generated from (seed, index).

It exists so that training, evaluation and the data pipeline can run end to end with no download: a small
DETR learns it on a CPU. Shapes are drawn with PIL so each shape touches all four sides of its box (the boxes
are tight). Later objects are drawn over earlier ones; a new object may hide at most `max_occlusion` of any
earlier box, so every labelled object stays visible.
"""

import json
import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from detr_jax.data.sources.arguments import Arg, Arguments

CLASS_NAMES = ("rectangle", "ellipse", "triangle", "cross", "diamond")

_SPLIT_STREAMS = {"train": 0, "val": 1}
_MIN_OBJECT_PIXELS = 4


class SeededExamples:
    """Examples made on the fly, example i of a split from its own generator of (seed, split, i, STREAM_TAG), so any
    example can be drawn alone, in any order, by any worker. Subclasses set `num_examples`, `seed`, `split` and
    `image_sizes`, and draw example i's size first (`image_size` repeats that draw without the rest)."""
    STREAM_TAG = 0x5D  # another set's own tag gives it streams unrelated to this one's

    @staticmethod
    def _check_split(split: str) -> None:
        if split not in _SPLIT_STREAMS:
            raise ValueError(f"split must be one of {sorted(_SPLIT_STREAMS)}, got {split!r}")

    @staticmethod
    def _parse_image_sizes(image_size, min_side: int):
        """(h, w) or a list of (h, w) -> [(h, w), ...]; one ValueError for anything else or a side < min_side."""
        sizes = np.asarray(image_size, np.int64)
        out = [tuple(int(v) for v in s) for s in (sizes[None] if sizes.ndim == 1 else sizes)]
        if any(len(s) != 2 or min(s) < min_side for s in out):
            raise ValueError(f"image_size must be (h, w) or a list of (h, w) with sides >= {min_side}, "
                             f"got {image_size!r}")
        return out

    def __len__(self) -> int:
        return self.num_examples

    def _rng(self, index: int) -> np.random.Generator:
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for a synthetic {self.split} split of {self.num_examples}")
        # The trailing tag word: SeedSequence zero-pads short entropy, so [seed, 0, 0] would equal default_rng(seed).
        return np.random.default_rng([self.seed, _SPLIT_STREAMS[self.split], index, self.STREAM_TAG])

    def image_size(self, index: int) -> Tuple[int, int]:
        """(h, w) of example `index` without drawing it."""
        return self.image_sizes[int(self._rng(index).integers(len(self.image_sizes)))]


class SyntheticDetection(SeededExamples):
    """Deterministic synthetic detection examples: `ds[index]` is the same for the same (seed, split, index).

    Arguments: `ARGUMENTS` (positional in that order, or keywords). Aspect ratios are log-uniform in [1/2, 2].

    Each example is a dict:
      "image": uint8 [H, W, 3]; "boxes": float32 [K, 4] xyxy in absolute pixels (integer valued, tight);
      "labels": int32 [K] in 0..len(CLASS_NAMES)-1; "image_id": int (index + 1); "orig_size": (H, W);
      "iscrowd": bool [K] (all False).
    """

    ARGUMENTS = Arguments(
        split=Arg(str, "train", '"train" or "val"; val uses other random streams, so its images differ from train\'s'),
        num_examples=Arg(int, 1000, "length of the split"),
        image_size=Arg(tuple, (128, 128), "(h, w) of every image, or a sequence of (h, w) pairs drawn from per image"),
        min_objects=Arg(int, 1, "fewest objects per image (uniform in [min_objects, max_objects])"),
        max_objects=Arg(int, 8, "most objects per image (fewer when no free place is under max_occlusion)"),
        min_object_size=Arg(float, 0.15, "smallest object sqrt(w * h), a fraction of the shorter side (log-uniform)"),
        max_object_size=Arg(float, 0.6, "largest object sqrt(w * h), a fraction of the shorter side (log-uniform)"),
        max_occlusion=Arg(float, 0.5, "the largest fraction of an earlier object's box a later object may cover"),
        seed=Arg(int, 0, "dataset seed"),
    )
    __signature__ = ARGUMENTS.signature

    def __init__(self, *args, **kwargs):
        a = self.ARGUMENTS.bind(type(self).__name__, args, kwargs)
        self._check_split(a.split)
        if not 1 <= a.min_objects <= a.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {a.min_objects}, {a.max_objects}")
        if not 0 < a.min_object_size <= a.max_object_size <= 1:
            raise ValueError(f"need 0 < min_object_size <= max_object_size <= 1 (fractions of the shorter side), "
                             f"got {a.min_object_size}, {a.max_object_size}")
        self.image_sizes = self._parse_image_sizes(a.image_size, min_side=8)
        self.split = a.split
        self.num_examples = int(a.num_examples)
        self.min_objects, self.max_objects = int(a.min_objects), int(a.max_objects)
        self.min_object_size, self.max_object_size = float(a.min_object_size), float(a.max_object_size)
        self.max_occlusion = float(a.max_occlusion)
        self.seed = int(a.seed)
        self.class_names = CLASS_NAMES
        self.num_classes = len(CLASS_NAMES)
        # COCO category id of each label when written out with `write_coco_folder` (1-based, like COCO).
        self.category_ids = tuple(range(1, self.num_classes + 1))
        self.stats: Dict[str, int] = {}

    def __getitem__(self, index: int) -> Dict:
        index = int(index)
        rng = self._rng(index)
        h, w = self.image_sizes[int(rng.integers(len(self.image_sizes)))]  # the same draw as image_size()
        image, background_colours = _background(rng, h, w)
        boxes, labels = self._draw_objects(rng, image, background_colours)
        return {
            "image": np.asarray(image),
            "boxes": boxes,
            "labels": labels,
            "image_id": index + 1,
            "orig_size": (h, w),
            "iscrowd": np.zeros(len(labels), bool),
        }

    def _draw_objects(self, rng: np.random.Generator, image: Image.Image, background_colours: np.ndarray):
        w, h = image.size
        short = min(h, w)
        draw = ImageDraw.Draw(image)
        boxes, labels = [], []
        for _ in range(int(rng.integers(self.min_objects, self.max_objects + 1))):
            label = int(rng.integers(self.num_classes))
            colour = _contrasting_colour(rng, background_colours)
            for _attempt in range(20):
                box = self._random_box(rng, h, w, short)
                if not boxes or _max_occlusion(box, np.asarray(boxes)) <= self.max_occlusion:
                    break
            else:
                continue  # no free place: fewer objects in this image
            _draw_shape(draw, CLASS_NAMES[label], box, colour, rng)
            boxes.append(box)
            labels.append(label)
        return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int32)

    def _random_box(self, rng: np.random.Generator, h: int, w: int, short: int) -> np.ndarray:
        size = short * np.exp(rng.uniform(np.log(self.min_object_size), np.log(self.max_object_size)))
        aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))  # width / height
        bw = int(np.clip(round(size * np.sqrt(aspect)), _MIN_OBJECT_PIXELS, w))
        bh = int(np.clip(round(size / np.sqrt(aspect)), _MIN_OBJECT_PIXELS, h))
        x0 = int(rng.integers(0, w - bw + 1))
        y0 = int(rng.integers(0, h - bh + 1))
        return np.array([x0, y0, x0 + bw, y0 + bh], np.float64)


def _background(rng: np.random.Generator, h: int, w: int):
    """A random solid colour plus either a linear gradient to a second colour or uniform noise."""
    base = rng.integers(0, 256, 3).astype(np.float32)
    if rng.random() < 0.5:
        other = rng.integers(0, 256, 3).astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        ys, xs = np.linspace(0, 1, h, dtype=np.float32), np.linspace(0, 1, w, dtype=np.float32)
        t = np.cos(angle) * xs[None, :] + np.sin(angle) * ys[:, None]
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        pixels = base + t[..., None] * (other - base)
        colours = np.stack([base, other])
    else:
        amplitude = rng.uniform(10, 40)
        noise = rng.integers(-128, 128, (h, w, 3), dtype=np.int16).astype(np.float32) * np.float32(amplitude / 128)
        pixels = base + noise
        colours = base[None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), colours


def _contrasting_colour(rng: np.random.Generator, background_colours: np.ndarray) -> Tuple[int, int, int]:
    """A colour at least ~100 (L2 in RGB) from every background colour, so objects stand out."""
    best, best_distance = None, -1.0
    for _ in range(20):
        colour = rng.integers(0, 256, 3)
        distance = float(np.min(np.linalg.norm(background_colours - colour, axis=1)))
        if distance > best_distance:
            best, best_distance = colour, distance
        if distance >= 100:
            break
    return tuple(int(c) for c in best)


def _max_occlusion(box: np.ndarray, earlier: np.ndarray) -> float:
    """Largest fraction of any earlier box [N, 4] (xyxy) covered by `box` [4]."""
    iw = np.clip(np.minimum(box[2], earlier[:, 2]) - np.maximum(box[0], earlier[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], earlier[:, 3]) - np.maximum(box[1], earlier[:, 1]), 0, None)
    areas = (earlier[:, 2] - earlier[:, 0]) * (earlier[:, 3] - earlier[:, 1])
    return float(np.max(iw * ih / areas))


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, box: np.ndarray, colour, rng: np.random.Generator):
    """Fill `name` inside box xyxy (x1, y1 exclusive) so that it touches all four sides of the box."""
    x0, y0, x1, y1 = (int(v) for v in box)
    r, b = x1 - 1, y1 - 1  # PIL's coordinates are inclusive
    cx, cy = (x0 + r) / 2, (y0 + b) / 2
    if name == "rectangle":
        draw.rectangle([x0, y0, r, b], fill=colour)
    elif name == "ellipse":
        draw.ellipse([x0, y0, r, b], fill=colour)
    elif name == "triangle":
        if rng.random() < 0.5:  # apex up or down
            draw.polygon([(cx, y0), (r, b), (x0, b)], fill=colour)
        else:
            draw.polygon([(x0, y0), (r, y0), (cx, b)], fill=colour)
    elif name == "cross":
        tw, th = max(1, (x1 - x0) // 3), max(1, (y1 - y0) // 3)
        left, top = x0 + (x1 - x0 - tw) // 2, y0 + (y1 - y0 - th) // 2
        draw.rectangle([x0, top, r, top + th - 1], fill=colour)
        draw.rectangle([left, y0, left + tw - 1, b], fill=colour)
    elif name == "diamond":
        draw.polygon([(cx, y0), (r, cy), (cx, b), (x0, cy)], fill=colour)
    else:
        raise ValueError(f"unknown shape {name!r}; known: {CLASS_NAMES}")


def write_coco_folder(source, out_dir: str, indices: Optional[Sequence[int]] = None, image_format: str = "png",
                      category_ids: Optional[Sequence[int]] = None, split_name: Optional[str] = None):
    """Write examples of `source` as a COCO-format folder, the layout `CocoFolder` reads.

    Args:
      source: a dataset whose examples have "image" uint8 [H, W, 3], "boxes" xyxy absolute, "labels",
        "image_id", "iscrowd" (e.g. SyntheticDetection), and `class_names`.
      out_dir: folder to create; receives `annotations/instances_<split>.json` and `<split>/<image_id>.<ext>`.
      indices: which examples (default: all).
      image_format: "png" (lossless: reading back gives the same pixels) or "jpg".
      category_ids: COCO category id of each label (default 1..K); give sparse ids to test id mapping.
      split_name: folder/file stem (default `source.split`, else "train").

    Returns:
      (annotation_file, image_dir) paths. Boxes are written as COCO [x, y, w, h] in absolute pixels.
    """
    split_name = split_name or getattr(source, "split", "train")
    ext = {"png": "png", "jpg": "jpg", "jpeg": "jpg"}.get(image_format.lower())
    if ext is None:
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    class_names = list(source.class_names)
    category_ids = list(category_ids) if category_ids is not None else list(range(1, len(class_names) + 1))
    if len(category_ids) != len(class_names):
        raise ValueError(f"category_ids has {len(category_ids)} ids for {len(class_names)} classes")
    image_dir = os.path.join(out_dir, split_name)
    ann_dir = os.path.join(out_dir, "annotations")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    images, annotations = [], []
    for index in (range(len(source)) if indices is None else indices):
        ex = source[index]
        h, w = ex["image"].shape[:2]
        file_name = f"{int(ex['image_id']):012d}.{ext}"
        Image.fromarray(ex["image"]).save(os.path.join(image_dir, file_name), quality=95)
        images.append({"id": int(ex["image_id"]), "file_name": file_name, "height": int(h), "width": int(w)})
        for box, label, crowd in zip(ex["boxes"].tolist(), ex["labels"].tolist(), ex["iscrowd"].tolist()):
            x0, y0, x1, y1 = box
            annotations.append({
                "id": len(annotations) + 1, "image_id": int(ex["image_id"]), "category_id": int(category_ids[label]),
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": int(crowd),
                "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
            })
    categories = [{"id": int(c), "name": n, "supercategory": "shape"} for c, n in zip(category_ids, class_names)]
    ann_file = os.path.join(ann_dir, f"instances_{split_name}.json")
    with open(ann_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return ann_file, image_dir
