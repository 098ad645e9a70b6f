"""DETR's set losses, given the matching: class (weighted CE), box (L1) and GIoU losses per decoder layer.

Same semantics and metric names as the official `SetCriterion` (models/detr.py), for padded targets: every
target array is [B, M] with a `mask` saying which slots are real. `Criterion` (criterion.py) matches and sums.
"""

import jax
import jax.numpy as jnp

from detr_jax.ops import box_ops

BBOX_LOSS_TYPES = ("l1", "smooth_l1")  # config.loss.bbox_loss_type


def _label_losses(pred_logits, indices, targets, *, num_classes, eos_coef, shares=None):
    """Weighted cross-entropy over all queries, plus class error of the matched ones.

    Args:
      pred_logits: [B, N, num_classes + 1].
      indices: int32 [B, M] matched query per target slot, -1 where unmatched.
      targets: dict "labels" [B, M], "mask" [B, M].
      shares: None, or this micro-batch's part of a global batch (`Criterion.normalisers`): "ce_weight" and
        "num_matched" of the whole batch and "share" (this micro-batch's fraction of its images); both values are
        then this micro-batch's shares, which add up over the micro-batches to the global batch's.
    Returns:
      (loss_ce, class_error) scalars.
    """
    batch_size, num_queries, _ = pred_logits.shape
    matched = targets["mask"] & (indices >= 0)  # [B, M]
    # Unmatched slots scatter to the out-of-range query N and are dropped: a plain -1
    # would wrap around to the last query.
    query = jnp.where(matched, indices, num_queries)
    image = jnp.broadcast_to(jnp.arange(batch_size)[:, None], query.shape)
    target_classes = jnp.full((batch_size, num_queries), num_classes, jnp.int32)
    target_classes = target_classes.at[image, query].set(
        targets["labels"].astype(jnp.int32), mode="drop")  # [B, N]

    # Official: F.cross_entropy with class weights (1, ..., 1, eos_coef) is the weighted
    # mean sum(w * nll) / sum(w), so no-object queries count eos_coef times as much.
    loss_ce = weighted_cross_entropy(pred_logits, target_classes, num_classes=num_classes, eos_coef=eos_coef,
                                     normaliser=None if shares is None else shares["ce_weight"])

    # Top-1 accuracy of matched queries; official `accuracy` gives 0 with no targets,
    # hence class_error 100.
    matched_logits = jnp.take_along_axis(
        pred_logits, jnp.maximum(indices, 0)[..., None], axis=1)  # [B, M, C+1]
    correct = (matched_logits.argmax(-1) == targets["labels"]) & matched
    num_matched = matched.sum() if shares is None else shares["num_matched"]
    accuracy = jnp.where(num_matched > 0, 100.0 * correct.sum() / jnp.maximum(num_matched, 1), 0.0)
    if shares is not None:
        return loss_ce, 100.0 * shares["share"] - accuracy
    return loss_ce, 100.0 - accuracy


def _cardinality_error(pred_logits, tgt_mask):
    """Mean over images of |#queries not predicting no-object - #targets|. Logging only."""
    num_predicted = (pred_logits.argmax(-1) != pred_logits.shape[-1] - 1).sum(-1)  # [B]
    num_targets = tgt_mask.sum(-1)  # [B]
    return jnp.abs(num_predicted - num_targets).astype(jnp.float32).mean()


def _box_losses(pred_boxes, indices, targets, *, num_boxes, bbox_loss_type):
    """L1 (or Smooth-L1) on cxcywh and 1 - GIoU, summed over matched pairs / num_boxes.

    Args:
      pred_boxes: [B, N, 4] cxcywh, normalised.
      indices: int32 [B, M] matched query per target slot, -1 where unmatched.
      targets: dict "boxes" [B, M, 4] cxcywh normalised, "mask" [B, M].
      num_boxes: scalar normaliser.
    Returns:
      (loss_bbox, loss_giou) scalars.
    """
    matched = targets["mask"] & (indices >= 0)  # [B, M]
    src_boxes = jnp.take_along_axis(pred_boxes, jnp.maximum(indices, 0)[..., None], axis=1)
    tgt_boxes = targets["boxes"]  # [B, M, 4]

    return paired_box_losses(src_boxes, tgt_boxes, matched, num_boxes, bbox_loss_type)


def weighted_cross_entropy(pred_logits, target_classes, *, num_classes, eos_coef, valid=None, normaliser=None):
    """The official class-weighted CE: sum(w * nll) / sum(w), no-object (index num_classes) weighted eos_coef.

    pred_logits [..., C + 1], target_classes int [...]; `valid` bool [...] drops entries (weight 0).
    `normaliser`: sum(w) of the whole global batch when this is one of its micro-batches (else this sum(w)).
    """
    log_prob = jax.nn.log_softmax(pred_logits, axis=-1)
    nll = -jnp.take_along_axis(log_prob, target_classes[..., None], axis=-1)[..., 0]
    weight = jnp.where(target_classes == num_classes, eos_coef, 1.0)
    if valid is not None:
        weight = weight * valid
    total = weight.sum() if normaliser is None else normaliser
    return (weight * nll).sum() / jnp.maximum(total, 1e-6)


def paired_box_losses(src_boxes, tgt_boxes, valid, normaliser, bbox_loss_type):
    """L1 (or Smooth-L1) and 1 - GIoU of paired boxes [..., 4] cxcywh, summed where `valid` [...], / normaliser."""
    diff = jnp.abs(src_boxes - tgt_boxes)
    if bbox_loss_type == "smooth_l1":  # torch's F.smooth_l1_loss with beta=1
        bbox = jnp.where(diff < 1.0, 0.5 * diff ** 2, diff - 0.5)
    else:
        bbox = diff
    loss_bbox = jnp.where(valid[..., None], bbox, 0.0).sum() / normaliser
    giou = box_ops.elementwise_generalized_box_iou(
        box_ops.box_cxcywh_to_xyxy(src_boxes), box_ops.box_cxcywh_to_xyxy(tgt_boxes))
    loss_giou = jnp.where(valid, 1.0 - giou, 0.0).sum() / normaliser
    return loss_bbox, loss_giou


def set_losses(outputs, targets, indices, *, num_classes, eos_coef, ce_loss_coef, bbox_loss_coef, giou_loss_coef,
               bbox_loss_type="l1", num_boxes=None, shares=None):
    """DETR's set losses for the last decoder layer and every auxiliary one, given the matching.

    Args:
      outputs: dict "pred_logits" [B, N, num_classes + 1] (no-object last), "pred_boxes" [B, N, 4] cxcywh
        normalised, optional "aux_outputs": list of L - 1 dicts with the same two keys, first decoder layer first.
      targets: dict "labels" int32 [B, M] in [0, num_classes) on real objects (the data layer rejects labels out
        of range, naming the annotation), "boxes" float32 [B, M, 4] cxcywh normalised, "mask" bool [B, M] (True
        on real objects).
      indices: int32 [L, B, M] matched query per target slot, -1 where unmatched (`matcher.hungarian_match`),
        layers in the same order (aux first, main last).
      num_classes: number of object classes; index num_classes is no-object.
      eos_coef: class weight of no-object in the cross-entropy.
      ce_loss_coef, bbox_loss_coef, giou_loss_coef: loss weights in "loss".
      bbox_loss_type: "l1" (official) or "smooth_l1".
      num_boxes: box-loss normaliser. Default: real targets in this batch (min 1). Under data parallelism the
        global count, as the official all_reduce(num_boxes) / world_size with DDP's gradient averaging gives.
      shares: None, or (gradient accumulation) the global batch's normalisers ("ce_weight", "num_matched",
        "share": see `_label_losses`) when this is one micro-batch of it: every returned value is then this
        micro-batch's share, and the micro-batches' shares add up to the global batch's values.
    Returns:
      dict of scalars: "loss" (weighted total over all layers), "loss_ce", "loss_bbox", "loss_giou",
      "cardinality_error", "class_error" for the last layer, and "loss_ce_i", "loss_bbox_i", "loss_giou_i",
      "cardinality_error_i" for aux layer i (as official, class_error is logged for the last layer only).
    """
    layers = list(outputs.get("aux_outputs") or []) + [outputs]
    pred_logits = jnp.stack([layer["pred_logits"] for layer in layers])  # [L, B, N, C+1]
    pred_boxes = jnp.stack([layer["pred_boxes"] for layer in layers])  # [L, B, N, 4]
    targets = dict(targets, mask=jnp.asarray(targets["mask"], bool))
    indices = jnp.asarray(indices, jnp.int32)  # [L, B, M]
    if num_boxes is None:
        num_boxes = targets["mask"].sum()
    num_boxes = jnp.maximum(jnp.asarray(num_boxes, jnp.float32), 1.0)

    losses = {}
    total = 0.0
    for layer in range(len(layers)):
        suffix = "" if layer == len(layers) - 1 else f"_{layer}"
        loss_ce, class_error = _label_losses(pred_logits[layer], indices[layer], targets,
                                             num_classes=num_classes, eos_coef=eos_coef, shares=shares)
        loss_bbox, loss_giou = _box_losses(pred_boxes[layer], indices[layer], targets,
                                           num_boxes=num_boxes, bbox_loss_type=bbox_loss_type)
        losses["loss_ce" + suffix] = loss_ce
        losses["loss_bbox" + suffix] = loss_bbox
        losses["loss_giou" + suffix] = loss_giou
        cardinality = _cardinality_error(pred_logits[layer], targets["mask"])  # a mean over images
        losses["cardinality_error" + suffix] = cardinality if shares is None else cardinality * shares["share"]
        if not suffix:
            losses["class_error"] = class_error
        total = total + (ce_loss_coef * loss_ce + bbox_loss_coef * loss_bbox
                         + giou_loss_coef * loss_giou)
    losses["loss"] = total
    return losses
