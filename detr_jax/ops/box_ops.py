"""Box conversions, IoU and generalised IoU, in pure jnp.

Formats: `cxcywh` is (centre x, centre y, width, height); `xyxy` is (x0, y0, x1, y1)
with x0 <= x1, y0 <= y1. Every function works for normalised ([0, 1]) and absolute
(pixel) coordinates alike, as long as both arguments use the same one.

Unlike the official util/box_ops.py there are no asserts on the data: inside jit they
cannot run, and padded targets (all-zero boxes) are normal here. Degenerate boxes
(zero area, zero union, zero enclosing box) give finite values *and* finite gradients.
"""

import jax.numpy as jnp


def box_cxcywh_to_xyxy(boxes):
    """[..., 4] cxcywh -> [..., 4] xyxy (same normalised / absolute units)."""
    cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def box_xyxy_to_cxcywh(boxes):
    """[..., 4] xyxy -> [..., 4] cxcywh (same normalised / absolute units)."""
    x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def box_area(boxes):
    """[..., 4] xyxy -> [...] area (not clamped, as in torchvision: inverted boxes are negative)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _safe_divide(numerator, denominator):
    """numerator / denominator where denominator > 0, else 0.

    The inner where (the "double-where trick") keeps the unused branch finite, so the
    gradient of the discarded division is 0 * finite instead of 0 * inf = nan. Exact (no
    eps) wherever the denominator is positive, so values match the official code bit for bit.
    """
    positive = denominator > 0
    return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)


def _iou_and_union(boxes1, boxes2):
    """Broadcasting core: [..., 4] xyxy x [..., 4] xyxy -> iou [...], union [...]."""
    top_left = jnp.maximum(boxes1[..., :2], boxes2[..., :2])
    bottom_right = jnp.minimum(boxes1[..., 2:], boxes2[..., 2:])
    wh = jnp.maximum(bottom_right - top_left, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(boxes1) + box_area(boxes2) - inter
    return _safe_divide(inter, union), union


def _generalized_iou(boxes1, boxes2):
    """Broadcasting core: [..., 4] xyxy x [..., 4] xyxy -> giou [...] in [-1, 1]."""
    iou, union = _iou_and_union(boxes1, boxes2)
    top_left = jnp.minimum(boxes1[..., :2], boxes2[..., :2])
    bottom_right = jnp.maximum(boxes1[..., 2:], boxes2[..., 2:])
    wh = jnp.maximum(bottom_right - top_left, 0.0)
    enclosing_area = wh[..., 0] * wh[..., 1]
    return iou - _safe_divide(enclosing_area - union, enclosing_area)


def box_iou(boxes1, boxes2):
    """Pairwise IoU of xyxy boxes.

    Args:
      boxes1: [..., N, 4] xyxy.
      boxes2: [..., M, 4] xyxy, same units as boxes1.
    Returns:
      (iou [..., N, M], union [..., N, M]). IoU is 0 where the union is not positive.
    """
    return _iou_and_union(boxes1[..., :, None, :], boxes2[..., None, :, :])


def generalized_box_iou(boxes1, boxes2):
    """Pairwise generalised IoU (https://giou.stanford.edu/) of xyxy boxes.

    Args:
      boxes1: [..., N, 4] xyxy.
      boxes2: [..., M, 4] xyxy, same units as boxes1.
    Returns:
      [..., N, M] GIoU in [-1, 1]; the enclosing-box term is 0 where that box has no area.
    """
    return _generalized_iou(boxes1[..., :, None, :], boxes2[..., None, :, :])


def elementwise_generalized_box_iou(boxes1, boxes2):
    """Generalised IoU of matched pairs, i.e. the diagonal of `generalized_box_iou`.

    Args:
      boxes1: [..., 4] xyxy.
      boxes2: [..., 4] xyxy, same shape and units as boxes1.
    Returns:
      [...] GIoU of boxes1[i] with boxes2[i].
    """
    return _generalized_iou(boxes1, boxes2)


def elementwise_box_iou(boxes1, boxes2):
    """IoU of matched pairs: [..., 4] xyxy x [..., 4] xyxy (same shape and units) -> [...] in [0, 1]."""
    return _iou_and_union(boxes1, boxes2)[0]
