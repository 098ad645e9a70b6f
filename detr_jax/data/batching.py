"""Batching: pad transformed examples to a few static shapes ("buckets") so jit compiles few programs.

Images are padded bottom/right with zeros (zero in normalised space, as the official NestedTensor does) to
the smallest bucket that holds every image of the batch; `pixel_mask` is True on real pixels. Targets are
padded to a fixed `max_objects` with a `mask`. The batch format, consumed by the model and the loss:

  "images":     uint8 [B, H, W, 3]    raw pixels, zero padding; the train and eval steps normalise them on
                                      the device (`transforms.normalize_images`). float32 normalised (ImageNet
                                      mean/std) when the transforms normalise on the host (`Normalize()`)
  "pixel_mask": bool    [B, H, W]     True on real pixels
  "labels":     int32   [B, M]        0 where mask is False
  "boxes":      float32 [B, M, 4]     cxcywh normalised by the unpadded size (h, w); padding rows hold the
                                      whole-image box (0.5, 0.5, 1, 1) so box maths on them stays finite
  "mask":       bool    [B, M]        True on real objects
  "image_id":   int32   [B]           -1 marks a padding example (short last batch with drop_remainder=False;
                                      its pixel_mask and mask are all False and its sizes 0): drop its outputs
  "orig_size":  int32   [B, 2]        (h, w) of the original image
  "size":       int32   [B, 2]        (h, w) after transforms, before padding
  "target_masks": bool  [B, M, H, W]  panoptic sources only (examples with "masks"): each object's mask at the
                                      padded image size, zero padding, as the official `nested_tensor_from_tensor_list`
                 bool  [B, M, P]     instead, when the transforms drew "mask_points" (config.panoptic.mask_loss_points):
                                      each object's mask at P pixels of the padded image
  "mask_points": int32 [B, P]        those pixels, flat indices y * W + x into the padded [H, W]

Buckets are multiples of `stride` (32, the backbone's total stride, so the padded image maps to exactly
H/32 x W/32 feature cells) and are fitted to the sizes a transform pipeline produces
(`simulate_output_sizes`, `fit_buckets`, `recipe_buckets`). Within one batch all images share the bucket that
fits the largest height and width in the (global) batch.
"""

import logging
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

logger = logging.getLogger(__name__)

Shape = Tuple[int, int]

# An approximation of the COCO train2017 image-size mix, (h, w) -> share. Most images have a 640 longer side;
# about a quarter are portrait.
COCO_IMAGE_SIZES: Dict[Shape, float] = {
    (480, 640): 0.30, (427, 640): 0.17, (640, 480): 0.09, (640, 427): 0.06, (425, 640): 0.05,
    (424, 640): 0.04, (426, 640): 0.04, (428, 640): 0.03, (360, 640): 0.03, (612, 612): 0.03,
    (640, 640): 0.02, (512, 640): 0.02, (640, 425): 0.02, (640, 426): 0.02, (375, 500): 0.02,
    (333, 500): 0.02, (500, 375): 0.02, (640, 512): 0.01, (400, 640): 0.01,
}

PADDING_BOX = (0.5, 0.5, 1.0, 1.0)


def round_up(value: int, stride: int) -> int:
    """The smallest multiple of `stride` >= value."""
    return int(math.ceil(value / stride) * stride)


def choose_bucket(height: int, width: int, buckets: Optional[Sequence[Shape]], stride: int = 32) -> Shape:
    """The smallest-area bucket (h, w) with h >= height and w >= width.

    With buckets=None, or when none fits, returns (height, width) rounded up to `stride` (a new jit shape).
    """
    best = None
    for bh, bw in buckets or ():
        if bh >= height and bw >= width and (best is None or bh * bw < best[0] * best[1]):
            best = (int(bh), int(bw))
    return best if best is not None else (round_up(height, stride), round_up(width, stride))


def simulate_output_sizes(transforms, image_sizes: Dict[Shape, float] = None, num_samples: int = 8192,
                          seed: int = 0) -> np.ndarray:
    """Sizes (h, w) the pipeline outputs for originals drawn from `image_sizes` ((h, w) -> weight).

    Uses each transform's `output_size`, so no pixels are touched. Returns int64 [num_samples, 2], in draw
    order (consecutive rows form plausible random batches).
    """
    image_sizes = COCO_IMAGE_SIZES if image_sizes is None else image_sizes
    rng = np.random.default_rng(seed)
    shapes = list(image_sizes)
    weights = np.asarray([image_sizes[s] for s in shapes], np.float64)
    picks = rng.choice(len(shapes), size=num_samples, p=weights / weights.sum())
    return np.asarray([transforms.output_size(shapes[i], rng) for i in picks], np.int64).reshape(-1, 2)


def batch_max_sizes(sizes: np.ndarray, batch_size: int) -> np.ndarray:
    """Per-batch (max h, max w) of consecutive groups of `batch_size` rows of sizes [N, 2] -> [N // B, 2]."""
    n = len(sizes) // batch_size * batch_size
    return sizes[:n].reshape(-1, batch_size, 2).max(axis=1)


def size_grouped_order(sizes: np.ndarray, batch_size: int, pool_batches: int,
                       rng: np.random.Generator) -> np.ndarray:
    """Reorder so that each batch holds images of similar shape: int64 [N] positions into sizes [N, 2] (h, w).

    Consecutive pools of `pool_batches * batch_size` positions are sorted by (orientation, longer side) and cut
    into batches; the batches of a pool are then shuffled (with `rng`) so training sees no size ordering. Items
    stay within their pool, so the epoch's shuffle is kept at the pool scale. Trailing positions that do not
    fill a batch stay last, in order. Like detectron2's aspect-ratio grouping; it mainly cuts the padding of
    batches that mix portrait and landscape images.
    """
    sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
    n_full = len(sizes) // batch_size * batch_size
    pool = max(1, int(pool_batches)) * batch_size
    order = []
    for start in range(0, n_full, pool):
        chunk = np.arange(start, min(start + pool, n_full))
        h, w = sizes[chunk, 0], sizes[chunk, 1]
        chunk = chunk[np.lexsort((np.maximum(h, w), h > w))]  # last key sorts first: orientation, then long side
        batches = chunk.reshape(-1, batch_size)
        order.append(batches[rng.permutation(len(batches))].reshape(-1))
    order.append(np.arange(n_full, len(sizes)))
    return np.concatenate(order).astype(np.int64)


def fit_buckets(shapes: np.ndarray, max_buckets: int = 12, stride: int = 32,
                cover: Optional[Shape] = None) -> List[Shape]:
    """Greedily choose at most `max_buckets` bucket shapes (multiples of stride) minimising total padded area.

    Args:
      shapes: int [N, 2] (h, w) that must fit (per image, or per batch from `batch_max_sizes`).
      cover: (h, w) that the largest bucket must also hold, e.g. (max_size, max_size) for a pipeline whose
        outputs are capped at max_size, so that sizes rarer than the simulation saw still fit.
    Returns:
      buckets sorted by area; the first bucket picked is the elementwise maximum of shapes and cover, so every
      shape fits one.
    """
    shapes = np.asarray(shapes, np.int64).reshape(-1, 2)
    if cover is not None:
        shapes = np.concatenate([shapes, np.maximum(shapes.max(axis=0), np.asarray(cover, np.int64))[None]])
    rounded = (np.ceil(shapes / stride) * stride).astype(np.int64)
    values = np.unique(rounded)
    cand = np.stack(np.meshgrid(values, values, indexing="ij"), -1).reshape(-1, 2)  # [C, 2] (h, w)
    cand = cand[(cand[:, 0] >= rounded[:, 0].min()) & (cand[:, 1] >= rounded[:, 1].min())]
    cand_area = cand[:, 0] * cand[:, 1]
    fits = (cand[:, None, 0] >= rounded[None, :, 0]) & (cand[:, None, 1] >= rounded[None, :, 1])  # [C, N]
    cost_if_used = np.where(fits, cand_area[:, None], np.iinfo(np.int64).max)  # bucket area per shape, [C, N]
    chosen = [int(np.argmax((cand[:, 0] == rounded[:, 0].max()) & (cand[:, 1] == rounded[:, 1].max())))]
    current = cost_if_used[chosen[0]].copy()  # [N] area of the best chosen bucket for each shape
    while len(chosen) < max_buckets:
        totals = np.minimum(cost_if_used, current[None]).sum(axis=1)
        best = int(np.argmin(totals))
        if totals[best] >= current.sum():
            break
        chosen.append(best)
        current = np.minimum(current, cost_if_used[best])
    return sorted(((int(cand[i, 0]), int(cand[i, 1])) for i in chosen), key=lambda s: (s[0] * s[1], s))


def padded_fraction(sizes: np.ndarray, buckets: Optional[Sequence[Shape]], batch_size: int = 1,
                    stride: int = 32) -> float:
    """Fraction of padded pixels when consecutive groups of `batch_size` sizes [N, 2] are batched together.

    buckets=None measures the official dynamic padding (to the batch's max h and max w, no rounding).
    """
    sizes = np.asarray(sizes, np.int64)
    n = len(sizes) // batch_size * batch_size
    real = float(np.prod(sizes[:n], axis=1).sum())
    total = 0.0
    for bh, bw in batch_max_sizes(sizes, batch_size):
        if buckets is None:
            total += batch_size * float(bh * bw)
        else:
            h, w = choose_bucket(int(bh), int(bw), buckets, stride)
            total += batch_size * float(h * w)
    return 1.0 - real / total


def recipe_buckets(transforms, image_sizes: Dict[Shape, float] = None, batch_size: int = 1,
                   max_buckets: int = 12, stride: int = 32, max_side: Optional[int] = None,
                   group_by_size: int = 0, num_samples: int = 8192, seed: int = 0) -> List[Shape]:
    """Buckets for a transform pipeline: `fit_buckets` on simulated per-batch max sizes.

    Args:
      transforms: a pipeline from `transforms.py` (its `output_size` is simulated).
      image_sizes: original (h, w) -> weight; default COCO_IMAGE_SIZES.
      batch_size: the GLOBAL batch size: one jit step sees all processes' examples, so they share one shape.
      max_side: the pipeline's max_size; the largest bucket then holds (max_side, max_side), so no output size
        falls outside the buckets however rare.
      group_by_size: the Loader's group_by_size (pool size in global batches; 0: batches mix sizes freely).
    Example: `recipe_buckets(make_train_transforms(), batch_size=2, max_side=1333)` for the COCO recipe.
    """
    sizes = simulate_output_sizes(transforms, image_sizes, max(num_samples, batch_size), seed)
    if group_by_size:
        sizes = sizes[size_grouped_order(sizes, batch_size, group_by_size, np.random.default_rng([seed, 1]))]
    cover = None if max_side is None else (max_side, max_side)
    return fit_buckets(batch_max_sizes(sizes, batch_size), max_buckets, stride, cover)


class BatchStats:
    """Counters of what batching had to change; logged as they happen, readable any time via `as_dict()`."""

    def __init__(self):
        self.objects_dropped = 0
        self.images_with_dropped_objects = 0
        self.unbucketed_batches = 0

    def as_dict(self) -> Dict[str, int]:
        """{"objects_dropped", "images_with_dropped_objects", "unbucketed_batches"}."""
        return dict(objects_dropped=self.objects_dropped, images_with_dropped_objects=self.images_with_dropped_objects,
                    unbucketed_batches=self.unbucketed_batches)


def collate(examples: Sequence[Tuple[np.ndarray, Dict]], max_objects: int,
            buckets: Optional[Sequence[Shape]] = None, batch_size: Optional[int] = None,
            min_size: Optional[Shape] = None, stride: int = 32,
            stats: Optional[BatchStats] = None) -> Dict[str, np.ndarray]:
    """Stack transformed examples into one padded batch (format in the module docstring).

    Args:
      examples: (image [h, w, 3], uint8 or float32 normalised, target) pairs; target has "boxes" float32 [K, 4] cxcywh
        normalised, "labels" int [K], "image_id", "orig_size" (h, w), "size" (h, w) (as `Normalize` leaves it).
      max_objects: M; objects beyond it are dropped (the first M are kept), counted in `stats` and logged.
      buckets: static (H, W) shapes; the batch takes the smallest one holding every image and `min_size`.
        None, or a batch that fits none, pads to the maximum rounded up to `stride` (logged: a new jit shape).
      batch_size: pad the batch to this many examples with padding examples (image_id -1, all masks False,
        sizes 0). Default len(examples).
      min_size: (h, w) the padded shape must also hold; the loader passes the maximum over the global batch so
        that every process picks the same bucket.
      stats: counters to update.
    """
    stats = stats if stats is not None else BatchStats()
    batch_size = batch_size or len(examples)
    if len(examples) > batch_size or (not examples and min_size is None):
        raise ValueError(f"collate got {len(examples)} examples for batch_size {batch_size} (min_size {min_size})")
    max_h = max([image.shape[0] for image, _ in examples] + ([min_size[0]] if min_size else []))
    max_w = max([image.shape[1] for image, _ in examples] + ([min_size[1]] if min_size else []))
    height, width = choose_bucket(max_h, max_w, buckets, stride)
    if buckets and (height, width) not in {tuple(b) for b in buckets}:
        stats.unbucketed_batches += 1
        logger.warning("a batch with max size %dx%d fits no bucket in %s; padding to %dx%d, a new jit shape "
                       "(%d such batches so far)", max_h, max_w, list(buckets), height, width, stats.unbucketed_batches)

    batch = {
        "images": np.zeros((batch_size, height, width, 3), examples[0][0].dtype if examples else np.uint8),
        "pixel_mask": np.zeros((batch_size, height, width), bool),
        "labels": np.zeros((batch_size, max_objects), np.int32),
        "boxes": np.tile(np.asarray(PADDING_BOX, np.float32), (batch_size, max_objects, 1)),
        "mask": np.zeros((batch_size, max_objects), bool),
        "image_id": np.full((batch_size,), -1, np.int32),
        "orig_size": np.zeros((batch_size, 2), np.int32),
        "size": np.zeros((batch_size, 2), np.int32),
    }
    with_masks = any("masks" in target for _, target in examples)
    num_points = max((len(target["mask_points"]) for _, target in examples if "mask_points" in target), default=0)
    if num_points:
        batch["target_masks"] = np.zeros((batch_size, max_objects, num_points), bool)
        batch["mask_points"] = np.zeros((batch_size, num_points), np.int32)
    elif with_masks:
        batch["target_masks"] = np.zeros((batch_size, max_objects, height, width), bool)
    for i, (image, target) in enumerate(examples):
        h, w = image.shape[:2]
        batch["images"][i, :h, :w] = image
        batch["pixel_mask"][i, :h, :w] = True
        boxes = np.asarray(target["boxes"], np.float32).reshape(-1, 4)
        labels = np.asarray(target["labels"], np.int32).reshape(-1)
        k = len(labels)
        if k > max_objects:
            stats.objects_dropped += k - max_objects
            stats.images_with_dropped_objects += 1
            if stats.images_with_dropped_objects <= 20 or stats.images_with_dropped_objects % 1000 == 0:
                logger.warning("image_id %s has %d objects > max_objects=%d: dropped %d (total dropped so far: "
                               "%d objects in %d images)", target.get("image_id"), k, max_objects, k - max_objects,
                               stats.objects_dropped, stats.images_with_dropped_objects)
            k = max_objects
        batch["labels"][i, :k] = labels[:k]
        batch["boxes"][i, :k] = boxes[:k]
        if num_points:
            batch["mask_points"][i], batch["target_masks"][i, :k] = _masks_at_points(
                np.asarray(target["masks"], bool).reshape(-1, h, w)[:k], target["mask_points"], height, width)
        elif with_masks:
            batch["target_masks"][i, :k, :h, :w] = np.asarray(target["masks"], bool)[:k]
        batch["mask"][i, :k] = True
        batch["image_id"][i] = int(target["image_id"])
        batch["orig_size"][i] = target["orig_size"]
        batch["size"][i] = target.get("size", (h, w))
    return batch


def _masks_at_points(masks: np.ndarray, fractions: np.ndarray, height: int, width: int):
    """Pixels of the padded [height, width] image at `fractions` float [P, 2] (y, x) in [0, 1), as flat indices
    int32 [P], and masks bool [K, h, w] (unpadded, top-left) read there: bool [K, P], False on padding pixels."""
    ys = np.minimum((fractions[:, 0] * height).astype(np.int64), height - 1)
    xs = np.minimum((fractions[:, 1] * width).astype(np.int64), width - 1)
    h, w = masks.shape[1:]
    inside = (ys < h) & (xs < w)
    values = masks[:, np.minimum(ys, h - 1), np.minimum(xs, w - 1)] & inside
    return (ys * width + xs).astype(np.int32), values
