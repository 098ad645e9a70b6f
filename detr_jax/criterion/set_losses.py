"""DETR's set losses, given the matching: class (weighted CE), box (L1) and GIoU losses per decoder layer.

Same semantics and metric names as the official `SetCriterion` (models/detr.py), for padded targets: every
target array is [B, M] with a `mask` saying which slots are real. `Criterion` (criterion.py) matches and sums.
"""

import jax
import jax.numpy as jnp

from detr_jax.ops import box_ops

BBOX_LOSS_TYPES = ("l1", "smooth_l1")  # config.loss.bbox_loss_type
CLASS_TARGETS = ("hard", "iou")  # config.loss.class_target (`class_quality`)


def matched_predictions(pred, indices):
    """Each target slot's matched query's row of `pred` [B, N, ...] -> [B, M, ...] (`indices` int32 [B, M], -1
    where unmatched: those slots get query 0's row, which callers mask out)."""
    index = jnp.maximum(indices, 0).reshape(indices.shape + (1,) * (pred.ndim - 2))
    return jnp.take_along_axis(pred, index, axis=1)


def class_quality(pred_boxes, indices, targets, *, alpha):
    """IoU-aware class targets (config.loss.class_target "iou"): each matched pair's target probability of its
    class, IoU(query's box, its object's box) ** alpha, a constant of the loss (no gradient reaches the boxes
    through it). The cross-entropy then trains the class score toward the box's quality and no-object toward the
    rest, so scores rank detections by placement; the unmatched queries' target (no-object) is unchanged.

    Why this shape for a softmax over classes + no-object: the score DETR ranks by is p(class) (no-object dropped),
    so that is the probability to tie to the IoU; the remainder goes to no-object, never to another class, so the
    argmax among the classes stays the hard target's. At IoU 1 it is the hard target. alpha < 1 lifts low IoUs
    (0.1 ** 0.25 = 0.56), so early in training, with poor boxes, matched queries still learn their class.

    Args:
      pred_boxes: [B, N, 4] cxcywh normalised.
      indices: int32 [B, M] matched query per target slot, -1 where unmatched.
      targets: "boxes" [B, M, 4] cxcywh normalised.
    Returns:
      [B, M] in [0, 1] (what unmatched and padded slots hold is never used).
    """
    src = matched_predictions(pred_boxes, indices)  # [B, M, 4]
    iou = box_ops.elementwise_box_iou(box_ops.box_cxcywh_to_xyxy(src), box_ops.box_cxcywh_to_xyxy(targets["boxes"]))
    return jax.lax.stop_gradient(jnp.clip(iou, 0.0, 1.0) ** alpha)


def _label_losses(pred_logits, indices, targets, *, num_classes, eos_coef, shares=None, quality=None):
    """Weighted cross-entropy over all queries, plus class error of the matched ones.

    Args:
      pred_logits: [B, N, num_classes + 1].
      indices: int32 [B, M] matched query per target slot, -1 where unmatched.
      targets: dict "labels" [B, M], "mask" [B, M].
      shares: None, or this micro-batch's part of a global batch (`Criterion.normalisers`): "ce_weight" and
        "num_matched" of the whole batch and "share" (this micro-batch's fraction of its images); both values are
        then this micro-batch's shares, which add up over the micro-batches to the global batch's.
      quality: None (the hard target), or [B, M] each matched pair's target probability of its class
        (`class_quality`), no-object's being the rest; a matched query's weight stays 1.
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
    target_quality = None
    if quality is not None:  # [B, N]: 1 on unmatched queries (their target is no-object either way)
        target_quality = jnp.ones((batch_size, num_queries), quality.dtype).at[image, query].set(quality, mode="drop")
    loss_ce = weighted_cross_entropy(pred_logits, target_classes, num_classes=num_classes, eos_coef=eos_coef,
                                     normaliser=None if shares is None else shares["ce_weight"],
                                     quality=target_quality)

    # Top-1 accuracy of matched queries; official `accuracy` gives 0 with no targets,
    # hence class_error 100.
    matched_logits = matched_predictions(pred_logits, indices)  # [B, M, C+1]
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
    src_boxes = matched_predictions(pred_boxes, indices)  # [B, M, 4]
    tgt_boxes = targets["boxes"]  # [B, M, 4]

    return paired_box_losses(src_boxes, tgt_boxes, matched, num_boxes, bbox_loss_type)


def weighted_cross_entropy(pred_logits, target_classes, *, num_classes, eos_coef, valid=None, normaliser=None,
                           quality=None):
    """The official class-weighted CE: sum(w * nll) / sum(w), no-object (index num_classes) weighted eos_coef.

    pred_logits [..., C + 1], target_classes int [...]; `valid` bool [...] drops entries (weight 0).
    `normaliser`: sum(w) of the whole global batch when this is one of its micro-batches (else this sum(w)).
    `quality` [...]: a soft target, q on the target class and 1 - q on no-object (the weight stays the target
    class's); None: q = 1, the hard target.
    """
    log_prob = jax.nn.log_softmax(pred_logits, axis=-1)
    nll = -jnp.take_along_axis(log_prob, target_classes[..., None], axis=-1)[..., 0]
    if quality is not None:
        nll = quality * nll - (1.0 - quality) * log_prob[..., num_classes]
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
               bbox_loss_type="l1", num_boxes=None, shares=None, quality=None):
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
      quality: None (hard class targets), or [L, B, M] each layer's matched pairs' soft class targets
        (`class_quality`).
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
                                             num_classes=num_classes, eos_coef=eos_coef, shares=shares,
                                             quality=None if quality is None else quality[layer])
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
