"""DETR mask losses (panoptic / instance segmentation): sigmoid focal and dice on matched masks.

The official `SetCriterion.loss_masks` (models/detr.py) with `sigmoid_focal_loss` and `dice_loss`
(models/segmentation.py), for padded targets: target masks are [B, M, H, W] with a validity mask [B, M],
and the matching is the `hungarian_match` format (matched query per target slot, -1 where none).
As official, the mask losses are computed for the main decoder layer only (aux layers have no masks).
"""

import jax
import jax.numpy as jnp

from detr_jax.criterion.set_losses import matched_predictions


def _focal_per_mask(logits, targets, alpha, gamma):
    """Official focal loss of each mask, mean over its pixels. logits, targets [..., P] -> [...]."""
    prob = jax.nn.sigmoid(logits)
    # torch's binary_cross_entropy_with_logits, in its overflow-free form.
    ce = jnp.maximum(logits, 0.0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    p_t = prob * targets + (1.0 - prob) * (1.0 - targets)
    loss = ce * (1.0 - p_t) ** gamma
    if alpha >= 0:  # official: a negative alpha switches the class balancing off
        loss = (alpha * targets + (1.0 - alpha) * (1.0 - targets)) * loss
    return loss.mean(-1)


def _dice_per_mask(logits, targets, pixels_per_sample=1.0):
    """Official dice loss of each mask, with +1 smoothing. logits, targets [..., P] -> [...]. With sampled pixels,
    `pixels_per_sample` scales the sums to the whole image's."""
    prob = jax.nn.sigmoid(logits)
    numerator = 2.0 * pixels_per_sample * (prob * targets).sum(-1)
    denominator = pixels_per_sample * (prob.sum(-1) + targets.sum(-1))
    return 1.0 - (numerator + 1.0) / (denominator + 1.0)


def sigmoid_focal_loss(logits, targets, num_boxes, alpha=0.25, gamma=2):
    """RetinaNet focal loss (https://arxiv.org/abs/1708.02002), reduced as the official DETR does.

    Args:
      logits: [K, P] float, P pixel logits of each of K masks.
      targets: [K, P] float in {0, 1} (bool is accepted).
      num_boxes: scalar normaliser.
      alpha: weight of the positive pixels (1 - alpha for the negatives); < 0 disables it.
      gamma: exponent of the modulating factor (1 - p_t).
    Returns:
      scalar: per-mask mean over pixels, summed over masks, / num_boxes (`loss.mean(1).sum() / num_boxes`).
    """
    targets = jnp.asarray(targets, jnp.float32)
    return _focal_per_mask(logits, targets, alpha, gamma).sum() / num_boxes


def dice_loss(logits, targets, num_boxes):
    """Dice loss (1 - soft F1 of the sigmoid mask, +1 smoothing), summed over masks / num_boxes, as official.

    Args:
      logits: [K, ...] float mask logits; everything after the first axis is flattened, as official.
      targets: [K, ...] float in {0, 1} (bool is accepted), the same number of elements per mask.
      num_boxes: scalar normaliser.
    Returns:
      scalar.
    """
    logits = logits.reshape(logits.shape[0], -1)
    targets = jnp.asarray(targets, jnp.float32).reshape(logits.shape)
    return _dice_per_mask(logits, targets).sum() / num_boxes


def upsample_bilinear(x, height, width):
    """Resize the last two axes of x [..., h, w] to [..., height, width], bilinearly.

    The same as torch's `F.interpolate(x, size, mode="bilinear", align_corners=False)` used by the
    official code: half-pixel centres, edge samples clamped. `antialias=False` because torch does not
    antialias (it only matters when shrinking; the masks are enlarged).
    """
    shape = x.shape[:-2] + (height, width)
    return jax.image.resize(x, shape, method="bilinear", antialias=False)


def bilinear_at_pixels(x, points, height, width):
    """The values of `upsample_bilinear(x, height, width)` at some pixels, without making the [height, width] map.

    Args:
      x: [B, M, h, w] low-resolution maps.
      points: int [B, P] flat pixel indices (y * width + x) into the [height, width] upsampled map, per image.
    Returns:
      [B, M, P] float32, torch's `interpolate(..., mode="bilinear", align_corners=False)` at those pixels.
    """
    h, w = x.shape[-2:]

    def taps(index, size, out_size):  # source taps and weights along one axis, torch's align_corners=False rule
        src = jnp.maximum((index.astype(jnp.float32) + 0.5) * (size / out_size) - 0.5, 0.0)
        low = jnp.minimum(jnp.floor(src).astype(jnp.int32), size - 1)
        return low, jnp.minimum(low + 1, size - 1), src - low

    y0, y1, wy = taps(points // width, h, height)  # [B, P] each
    x0, x1, wx = taps(points % width, w, width)
    flat = x.astype(jnp.float32).reshape(x.shape[:2] + (h * w,))  # [B, M, h * w]

    def at(y, x_):
        return jnp.take_along_axis(flat, (y * w + x_)[:, None, :], axis=2)  # [B, M, P]

    wy, wx = wy[:, None, :], wx[:, None, :]
    return ((1 - wy) * ((1 - wx) * at(y0, x0) + wx * at(y0, x1))
            + wy * ((1 - wx) * at(y1, x0) + wx * at(y1, x1)))


def mask_losses(pred_masks, target_masks, target_valid, indices, num_boxes, *, points=None, image_size=None,
                alpha=0.25, gamma=2):
    """Focal and dice losses between each matched query's mask and its target mask (official `loss_masks`).

    Args:
      pred_masks: [B, N, h, w] float mask logits of the main decoder layer, at stride 4 of the padded
        batch (the official model's `pred_masks`).
      target_masks: bool [B, M, H, W] instance masks, zero-padded bottom/right to the largest target
        in the batch, as the official `nested_tensor_from_tensor_list` does. With `points`: bool [B, M, P],
        the masks at those pixels only.
      target_valid: bool [B, M], True on real objects (the targets' "mask").
      indices: int [B, M] matched query per target slot, -1 where unmatched (`hungarian_match(...)[-1]`,
        the main layer).
      num_boxes: scalar normaliser, the same as the box losses' (real targets in the batch; clamped to >= 1
        as official).
      points: None (every pixel: the official losses), or int [B, P] flat pixel indices (y * W + x) into the
        padded [H, W] = `image_size`, drawn uniformly (config.panoptic.mask_loss_points): the official losses
        estimated on those pixels. The focal loss (a mean over pixels) is an unbiased estimate; the dice sums
        are scaled by H * W / P, so its +1 smoothing keeps its meaning. Memory then scales with P, not H * W.
      image_size: (H, W), the padded image size; needed with `points`.
      alpha, gamma: focal loss parameters (official 0.25 and 2).
    Returns:
      dict "loss_mask" (sigmoid focal) and "loss_dice", scalars. Padded or unmatched target slots
      contribute nothing, and no gradient reaches the masks of unmatched queries.
    """
    matched = jnp.asarray(target_valid, bool) & (indices >= 0)  # [B, M]
    # Gather the matched query's low-resolution mask per target slot before upsampling: the official
    # code upsamples only matched masks too, and [B, M, h, w] is far smaller than [B, N, H, W].
    # Unmatched slots read query 0 and are dropped below.
    src = matched_predictions(pred_masks, indices)  # [B, M, h, w]
    batch_size, num_slots = matched.shape
    # float32 for the upsampling and the pixel sums, whatever the model's compute dtype.
    if points is None:
        height, width = target_masks.shape[-2:]
        src = upsample_bilinear(src.astype(jnp.float32), height, width)  # [B, M, H, W]
        src = src.reshape(batch_size, num_slots, height * width)
        tgt = jnp.asarray(target_masks, jnp.float32).reshape(batch_size, num_slots, height * width)
        pixels_per_sample = 1.0
    else:
        if image_size is None:
            raise ValueError("mask_losses with points needs image_size, the padded (H, W)")
        height, width = image_size
        src = bilinear_at_pixels(src, points, height, width)  # [B, M, P]
        tgt = jnp.asarray(target_masks, jnp.float32)
        pixels_per_sample = height * width / points.shape[-1]

    num_boxes = jnp.maximum(jnp.asarray(num_boxes, jnp.float32), 1.0)
    # `where`, not a multiplication, so that nothing (not even a nan) flows back from dropped slots.
    focal = jnp.where(matched, _focal_per_mask(src, tgt, alpha, gamma), 0.0)  # [B, M]
    dice = jnp.where(matched, _dice_per_mask(src, tgt, pixels_per_sample), 0.0)  # [B, M]
    return {"loss_mask": focal.sum() / num_boxes, "loss_dice": dice.sum() / num_boxes}
