"""DETR's augmentation for panoptic targets: the transforms of `transforms.py` with "masks" carried along.

The official `datasets/transforms.py` moves masks with the boxes: hflip flips them, resize resamples them with
`interpolate(masks[:, None].float(), size, mode="nearest")[:, 0] > 0.5`, crop slices them. Here each mask-aware
function calls its `transforms.py` counterpart for the image, boxes, labels, iscrowd and area, and only adds
what the masks need; the random transforms subclass the detection ones, so their draws (and `output_size`,
which bucketing simulates) are the same numbers.

Panoptic targets add, per object (in the order of "boxes" / "labels"):
  "masks": bool [K, H, W], at the current image size.
  "segment_ids": int32 [K], the COCO panoptic segment id of each object (passes through, filtered with it).

`boxes_from_masks` (default True) keeps boxes and masks consistent where the official code lets them drift:
  * crop: each box becomes the extent of its visible (cropped) mask, and objects whose mask is empty in the crop
    are dropped. Official: the box is clipped to the crop, which for a non-rectangular shape can be much larger
    than what is left of the mask, and an object is kept when its clipped box has area, even with an empty mask.
  * resize: objects whose mask vanishes when downscaled (thinner than the sampling step) are dropped.
With boxes_from_masks=False every step is the official one.

Box convention: xyxy in absolute pixels with an exclusive max, i.e. the extent of mask columns x0..x1-1 is
[x0, x1) (`masks_to_boxes`); hflip's W - x then maps a mask's box to exactly the flipped mask's box. (The
official `util.box_ops.masks_to_boxes` gives the inclusive max, one pixel less wide and high.)
"""

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from detr_jax.data import transforms
from detr_jax.ops.interpolate import resize_nearest

# Per-object panoptic fields that transforms.py does not know; filtered with its PER_OBJECT_KEYS.
MASK_KEYS = ("masks", "segment_ids")


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """bool [K, H, W] -> float32 [K, 4] xyxy absolute, the tight extent (x1, y1 exclusive); empty masks -> 0."""
    masks = np.asarray(masks, bool)
    cols, rows = masks.any(axis=1), masks.any(axis=2)  # [K, W], [K, H]
    boxes = np.zeros((len(masks), 4), np.float32)
    nonempty = cols.any(axis=1)
    w, h = masks.shape[2], masks.shape[1]
    # argmax finds the first True; on the reversed axis, the last.
    boxes[:, 0] = cols.argmax(axis=1)
    boxes[:, 2] = w - cols[:, ::-1].argmax(axis=1)
    boxes[:, 1] = rows.argmax(axis=1)
    boxes[:, 3] = h - rows[:, ::-1].argmax(axis=1)
    boxes[~nonempty] = 0
    return boxes


def resize_masks(masks: np.ndarray, size_hw: Tuple[int, int]) -> np.ndarray:
    """bool [K, h, w] -> bool [K, H, W], the official `interpolate(mode="nearest")` (source index
    floor(d * in / out))."""
    masks = np.asarray(masks, bool)
    if masks.shape[1:] == tuple(size_hw):
        return masks
    return np.ascontiguousarray(resize_nearest(masks, tuple(size_hw)))


def _select(target: Dict, keep: np.ndarray) -> Dict:
    """The target with only the objects where `keep` (bool [K] or indices) holds."""
    target = dict(target)
    for key in transforms.PER_OBJECT_KEYS + MASK_KEYS:
        if key in target:
            target[key] = np.asarray(target[key])[keep]
    return target


def hflip(image: np.ndarray, target: Optional[Dict]):
    """`transforms.hflip`, with masks [K, H, W] mirrored too."""
    image, target = transforms.hflip(image, target)
    if target is not None and "masks" in target:
        target["masks"] = np.ascontiguousarray(np.asarray(target["masks"], bool)[:, :, ::-1])
    return image, target


def resize(image: np.ndarray, target: Optional[Dict], size_hw: Tuple[int, int], boxes_from_masks: bool = True):
    """`transforms.resize` (bilinear image, scaled boxes), masks resized with torch's nearest rule.

    With boxes_from_masks, objects whose resized mask is empty are dropped.
    """
    image, target = transforms.resize(image, target, size_hw)
    if target is None or "masks" not in target:
        return image, target
    target["masks"] = resize_masks(target["masks"], size_hw)
    if boxes_from_masks:
        target = _select(target, target["masks"].any(axis=(1, 2)))
    return image, target


def crop(image: np.ndarray, target: Optional[Dict], region: Tuple[int, int, int, int], boxes_from_masks: bool = True):
    """`transforms.crop` of region (top, left, height, width), with masks [K, H, W] cropped and filtered alike.

    With boxes_from_masks, each box is first replaced by the extent of the part of its mask inside the region,
    so `transforms.crop` keeps exactly the objects with visible pixels and leaves boxes equal to mask extents.
    """
    if target is None or "masks" not in target:
        return transforms.crop(image, target, region)
    top, left, h, w = region
    masks = np.asarray(target["masks"], bool)[:, top:top + h, left:left + w]
    target = dict(target)
    if boxes_from_masks:
        target["boxes"] = masks_to_boxes(masks) + np.array([left, top, left, top], np.float32)
    # Which objects `transforms.crop` keeps: crop their indices in place of the labels.
    labels = np.asarray(target["labels"])
    target["labels"] = np.arange(len(labels))
    image, target = transforms.crop(image, target, region)
    kept = target["labels"]
    target["labels"] = labels[kept]
    target["masks"] = np.ascontiguousarray(masks[kept])
    if "segment_ids" in target:
        target["segment_ids"] = np.asarray(target["segment_ids"])[kept]
    return image, target


class RandomHorizontalFlip(transforms.RandomHorizontalFlip):
    """transforms.RandomHorizontalFlip (same draw), masks flipped too."""

    def __call__(self, image, target, rng: np.random.Generator):
        if rng.random() < self.p:
            return hflip(image, target)
        return image, target


class RandomResize(transforms.RandomResize):
    """transforms.RandomResize (same draw), masks resized with torch's nearest rule."""

    def __init__(self, sizes: Sequence[int], max_size: Optional[int] = None, boxes_from_masks: bool = True):
        super().__init__(sizes, max_size)
        self.boxes_from_masks = boxes_from_masks

    def __call__(self, image, target, rng: np.random.Generator):
        return resize(image, target, self.output_size(image.shape[:2], rng), self.boxes_from_masks)

    def __repr__(self):
        return f"RandomResize(sizes={self.sizes}, max_size={self.max_size}, boxes_from_masks={self.boxes_from_masks})"


class RandomSizeCrop(transforms.RandomSizeCrop):
    """transforms.RandomSizeCrop (same draws), masks cropped and filtered with their objects."""

    def __init__(self, min_size: int, max_size: int, boxes_from_masks: bool = True):
        super().__init__(min_size, max_size)
        self.boxes_from_masks = boxes_from_masks

    def __call__(self, image, target, rng: np.random.Generator):
        return crop(image, target, self.region(image.shape[:2], rng), self.boxes_from_masks)

    def __repr__(self):
        return f"RandomSizeCrop({self.min_size}, {self.max_size}, boxes_from_masks={self.boxes_from_masks})"


class SampleMaskPoints:
    """Draw the pixels the mask losses will be computed on (config.panoptic.mask_loss_points), as fractions of
    the padded image: target["mask_points"] float32 [P, 2] (y, x) in [0, 1). `batching.collate` turns them into
    pixels of the batch's padded shape and reads the masks there, so the batch carries P values per object
    instead of whole masks. The last transform: the earlier random draws, and so the images, stay the same."""

    def __init__(self, num_points: int):
        if num_points < 1:
            raise ValueError(f"SampleMaskPoints needs num_points >= 1, got {num_points}")
        self.num_points = int(num_points)

    def __call__(self, image, target, rng: np.random.Generator):
        if target is not None:
            target = dict(target, mask_points=rng.random((self.num_points, 2), dtype=np.float32))
        return image, target

    def output_size(self, size_hw, rng: np.random.Generator):
        return size_hw  # draws nothing before the others: the predicted sizes do not depend on it

    def __repr__(self):
        return f"SampleMaskPoints({self.num_points})"


def make_panoptic_train_transforms(scales: Sequence[int] = transforms.COCO_TRAIN_SCALES,
                                   max_size: int = transforms.COCO_MAX_SIZE,
                                   crop_resize_scales: Sequence[int] = (400, 500, 600),
                                   crop_size: Tuple[int, int] = (384, 600), normalize_pixels: bool = True,
                                   boxes_from_masks: bool = True, mask_points: int = 0) -> transforms.Compose:
    """`transforms.make_train_transforms` (the official recipe, same random draws) carrying "masks" along.

    Output: the image and boxes as there (boxes cxcywh normalised by the unpadded (w, h)), masks bool [K, h, w]
    at the output image size, unpadded; with `mask_points` > 0 also "mask_points" (`SampleMaskPoints`).
    """
    return transforms.Compose([
        RandomHorizontalFlip(),
        transforms.RandomSelect(
            RandomResize(list(scales), max_size=max_size, boxes_from_masks=boxes_from_masks),
            transforms.Compose([
                RandomResize(list(crop_resize_scales), boxes_from_masks=boxes_from_masks),
                RandomSizeCrop(*crop_size, boxes_from_masks=boxes_from_masks),
                RandomResize(list(scales), max_size=max_size, boxes_from_masks=boxes_from_masks),
            ])),
        transforms.Normalize(pixels=normalize_pixels),
    ] + ([SampleMaskPoints(mask_points)] if mask_points else []))


def make_panoptic_eval_transforms(size: int = 800, max_size: int = transforms.COCO_MAX_SIZE,
                                  normalize_pixels: bool = True, boxes_from_masks: bool = True) -> transforms.Compose:
    """`transforms.make_eval_transforms` carrying "masks" along (resized to the output size, nearest)."""
    return transforms.Compose([RandomResize([size], max_size=max_size, boxes_from_masks=boxes_from_masks),
                               transforms.Normalize(pixels=normalize_pixels)])
