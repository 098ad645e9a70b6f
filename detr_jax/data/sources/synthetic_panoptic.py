"""A built-in synthetic panoptic set (stuff bands, thing shapes on top), made on the fly, and a writer of any
panoptic source to a COCO panoptic folder. Examples as in `panoptic_sources`."""

import json
import math
import os
from typing import Dict, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from detr_jax.data.panoptic_transforms import masks_to_boxes
from detr_jax.data.sources.arguments import Arg, Arguments
from detr_jax.data.sources.synthetic import SeededExamples, _draw_shape
from detr_jax.ops.panoptic_ids import id2rgb

THING_CLASSES = ("ellipse", "rectangle", "triangle")  # drawn by synthetic._draw_shape
STUFF_CLASSES = ("sky", "grass", "sand")
# Fixed, well separated colours per class (jittered per image): colour and shape tell the classes apart.
_CLASS_COLOURS = {"ellipse": (220, 40, 40), "rectangle": (40, 40, 170), "triangle": (240, 220, 40),
                  "sky": (120, 180, 240), "grass": (60, 150, 60), "sand": (190, 160, 120)}


class SyntheticPanoptic(SeededExamples):
    """Deterministic synthetic panoptic examples: `ds[index]` is the same for the same (seed, split, index).

    The image is 2-3 stuff bands (horizontal, slightly slanted boundaries, distinct stuff classes, each a class
    colour with a little noise texture) under 1-6 solid thing shapes; later things occlude earlier ones, but
    each thing keeps at least (1 - max_occlusion) of its pixels. Every pixel belongs to exactly one segment.
    Labels: things 0..2 (THING_CLASSES), stuff 3..5 (STUFF_CLASSES); `is_thing` says which.

    Arguments: `ARGUMENTS` (positional in that order, or keywords). The default thing sizes are 19-58 px on
    128 px images; aspect ratios are log-uniform in [2/3, 3/2].

    Examples as `CocoPanopticFolder`'s, with "segment_ids" 1..K (stuff first, then things in drawing order),
    "image_id" index + 1, "iscrowd" all False.
    """
    STREAM_TAG = 0x9A  # not SyntheticDetection's: the two sets draw unrelated streams

    ARGUMENTS = Arguments(
        split=Arg(str, "train", '"train" or "val" (other random streams)'),
        num_examples=Arg(int, 1000, "length of the split"),
        image_size=Arg(tuple, (128, 128), "(h, w) of every image, or a sequence of (h, w) pairs drawn from per image"),
        min_things=Arg(int, 1, "fewest things per image (uniform in [min_things, max_things])"),
        max_things=Arg(int, 6, "most things per image (fewer when no place is found)"),
        min_thing_size=Arg(float, 0.15, "smallest thing sqrt(w * h), a fraction of the shorter side (log-uniform)"),
        max_thing_size=Arg(float, 0.45, "largest thing sqrt(w * h), a fraction of the shorter side (log-uniform)"),
        max_occlusion=Arg(float, 0.5, "the largest fraction of an earlier thing's pixels later things may cover"),
        noise=Arg(float, 8.0, "amplitude of the uniform noise on stuff pixels (0: flat colours)"),
        seed=Arg(int, 0, "dataset seed"),
    )
    __signature__ = ARGUMENTS.signature

    def __init__(self, *args, **kwargs):
        a = self.ARGUMENTS.bind(type(self).__name__, args, kwargs)
        self._check_split(a.split)
        if not 0 <= a.min_things <= a.max_things:
            raise ValueError(f"need 0 <= min_things <= max_things, got {a.min_things}, {a.max_things}")
        if not 0 < a.min_thing_size <= a.max_thing_size <= 1:
            raise ValueError(f"need 0 < min_thing_size <= max_thing_size <= 1 (fractions of the shorter side), "
                             f"got {a.min_thing_size}, {a.max_thing_size}")
        self.image_sizes = self._parse_image_sizes(a.image_size, min_side=16)
        self.split, self.num_examples, self.seed = a.split, int(a.num_examples), int(a.seed)
        self.min_things, self.max_things = int(a.min_things), int(a.max_things)
        self.min_thing_size, self.max_thing_size = float(a.min_thing_size), float(a.max_thing_size)
        self.max_occlusion, self.noise = float(a.max_occlusion), float(a.noise)
        self.class_names = THING_CLASSES + STUFF_CLASSES
        self.is_thing = (True,) * len(THING_CLASSES) + (False,) * len(STUFF_CLASSES)
        self.num_classes = len(self.class_names)
        self.category_ids = tuple(range(1, self.num_classes + 1))  # when written with write_coco_panoptic_folder

    def __getitem__(self, index: int) -> Dict:
        index = int(index)
        rng = self._rng(index)
        h, w = self.image_sizes[int(rng.integers(len(self.image_sizes)))]  # the same draw as image_size()
        # seg_map: the index (into `labels`) of the segment each pixel belongs to.
        seg_map, labels = self._stuff_bands(rng, h, w)
        labels += self._things(rng, seg_map, len(labels))
        colours = np.stack([_jittered_colour(rng, self.class_names[c]) for c in labels])  # [S, 3]
        pixels = colours[seg_map].astype(np.float32)  # [H, W, 3]
        stuff_pixels = ~np.asarray(self.is_thing)[np.asarray(labels)][seg_map]
        noise = rng.uniform(-self.noise, self.noise, (h, w, 3)).astype(np.float32)
        pixels += noise * stuff_pixels[..., None]
        masks = seg_map[None] == np.arange(len(labels))[:, None, None]
        present = masks.any(axis=(1, 2))  # a band may be wholly covered by things
        masks = masks[present]
        return {
            "image": np.clip(np.rint(pixels), 0, 255).astype(np.uint8),
            "boxes": masks_to_boxes(masks),
            "labels": np.asarray(labels, np.int32)[present],
            "image_id": index + 1,
            "orig_size": (h, w),
            "iscrowd": np.zeros(len(masks), bool),
            "masks": masks,
            "segment_ids": np.arange(1, len(masks) + 1, dtype=np.int32),
        }

    def _stuff_bands(self, rng: np.random.Generator, h: int, w: int):
        """2-3 bands of distinct stuff classes, top to bottom, split at lines y = c + slope * (x - w / 2)."""
        num_bands = int(rng.integers(2, 4))
        classes = rng.permutation(len(STUFF_CLASSES))[:num_bands] + len(THING_CLASSES)
        # Cut heights spread over the image so no band is thin: band i's cut in the i-th slot of [0.2 h, 0.8 h].
        slots = np.linspace(0.2, 0.8, num_bands)
        cuts = [h * rng.uniform(slots[i], slots[i + 1] - 0.05) for i in range(num_bands - 1)]
        xs, ys = np.arange(w)[None, :] - w / 2, np.arange(h)[:, None]
        seg_map = np.zeros((h, w), np.int64)
        for cut in cuts:
            seg_map += ys >= cut + rng.uniform(-0.15, 0.15) * xs
        return seg_map, [int(c) for c in classes]

    def _things(self, rng: np.random.Generator, seg_map: np.ndarray, first: int):
        """Draw things into seg_map (in place) as segments first, first + 1, ...; returns their labels."""
        h, w = seg_map.shape
        short = min(h, w)
        full_area, labels = [], []
        for _ in range(int(rng.integers(self.min_things, self.max_things + 1))):
            label = int(rng.integers(len(THING_CLASSES)))
            visible = np.bincount(seg_map.ravel(), minlength=first + len(labels))[first:]  # pixels per thing
            for _attempt in range(20):
                shape = self._random_shape(rng, label, h, w, short)
                covered = np.bincount(seg_map[shape], minlength=first + len(labels))[first:]
                if not labels or np.all(visible - covered >= (1 - self.max_occlusion) * np.asarray(full_area)):
                    break
            else:
                continue  # no place that leaves the earlier things visible: fewer things
            seg_map[shape] = first + len(labels)
            full_area.append(int(shape.sum()))
            labels.append(label)
        return labels

    def _random_shape(self, rng: np.random.Generator, label: int, h: int, w: int, short: int) -> np.ndarray:
        """bool [h, w] of a thing of class `label` in a random box."""
        size = short * math.exp(rng.uniform(math.log(self.min_thing_size), math.log(self.max_thing_size)))
        aspect = math.exp(rng.uniform(math.log(2 / 3), math.log(3 / 2)))  # width / height
        bw = int(np.clip(round(size * math.sqrt(aspect)), 4, w))
        bh = int(np.clip(round(size / math.sqrt(aspect)), 4, h))
        x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
        canvas = Image.new("L", (w, h), 0)
        _draw_shape(ImageDraw.Draw(canvas), THING_CLASSES[label], np.array([x0, y0, x0 + bw, y0 + bh]), 1, rng)
        return np.asarray(canvas, bool)


def _jittered_colour(rng: np.random.Generator, name: str) -> np.ndarray:
    return np.clip(np.asarray(_CLASS_COLOURS[name]) + rng.integers(-15, 16, 3), 0, 255)


def write_coco_panoptic_folder(source, out_dir: str, indices: Optional[Sequence[int]] = None,
                               category_ids: Optional[Sequence[int]] = None, split_name: Optional[str] = None):
    """Write examples of a panoptic source as a COCO panoptic folder, the layout `CocoPanopticFolder` reads.

    Args:
      source: examples with "image", "labels", "image_id", "iscrowd", "masks", "segment_ids"; `class_names`,
        `is_thing` (e.g. SyntheticPanoptic).
      out_dir: receives `annotations/panoptic_<split>.json`, images `<split>/<image_id>.png` (lossless) and
        segment PNGs `panoptic_<split>/<image_id>.png`.
      indices: which examples (default: all).
      category_ids: the id of each label (default 1..K).
      split_name: the stem (default `source.split`, else "train").

    Returns:
      (ann_file, image_dir, panoptic_dir). Read back with label_space="contiguous" (and the default
      category ids), the examples equal the source's.
    """
    split_name = split_name or getattr(source, "split", "train")
    category_ids = list(category_ids) if category_ids is not None else list(range(1, len(source.class_names) + 1))
    if len(category_ids) != len(source.class_names):
        raise ValueError(f"category_ids has {len(category_ids)} ids for {len(source.class_names)} classes")
    image_dir = os.path.join(out_dir, split_name)
    panoptic_dir = os.path.join(out_dir, f"panoptic_{split_name}")
    ann_dir = os.path.join(out_dir, "annotations")
    for d in (image_dir, panoptic_dir, ann_dir):
        os.makedirs(d, exist_ok=True)
    images, annotations = [], []
    for index in (range(len(source)) if indices is None else indices):
        ex = source[index]
        h, w = ex["image"].shape[:2]
        file_name = f"{int(ex['image_id']):012d}.png"
        Image.fromarray(ex["image"]).save(os.path.join(image_dir, file_name))
        id_map = np.zeros((h, w), np.int64)
        segments = []
        for mask, seg_id, label, crowd, box in zip(ex["masks"], ex["segment_ids"].tolist(), ex["labels"].tolist(),
                                                   ex["iscrowd"].tolist(), masks_to_boxes(ex["masks"]).tolist()):
            id_map[mask] = seg_id
            x0, y0, x1, y1 = box
            segments.append({"id": int(seg_id), "category_id": int(category_ids[label]), "iscrowd": int(crowd),
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(mask.sum())})
        Image.fromarray(id2rgb(id_map)).save(os.path.join(panoptic_dir, file_name))
        images.append({"id": int(ex["image_id"]), "file_name": file_name, "height": int(h), "width": int(w)})
        annotations.append({"image_id": int(ex["image_id"]), "file_name": file_name, "segments_info": segments})
    categories = [{"id": int(c), "name": n, "isthing": int(t)}
                  for c, n, t in zip(category_ids, source.class_names, source.is_thing)]
    ann_file = os.path.join(ann_dir, f"panoptic_{split_name}.json")
    with open(ann_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return ann_file, image_dir, panoptic_dir
