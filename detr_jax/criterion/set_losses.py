"""DETR set criterion: Hungarian matching, then class, box and GIoU losses per decoder layer.

Same semantics and metric names as the official `SetCriterion` (models/detr.py), for
padded targets: every target array is [B, M] with a `mask` saying which slots are real.
"""

import jax
import jax.numpy as jnp

from detr_jax.criterion.matcher import hungarian_match
from detr_jax.ops import box_ops

BBOX_LOSS_TYPES = ("l1", "smooth_l1")


def _label_losses(pred_logits, indices, targets, *, num_classes, eos_coef):
    """Weighted cross-entropy over all queries, plus class error of the matched ones.

    Args:
      pred_logits: [B, N, num_classes + 1].
      indices: int32 [B, M] matched query per target slot, -1 where unmatched.
      targets: dict "labels" [B, M], "mask" [B, M].
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
    loss_ce = _weighted_cross_entropy(pred_logits, target_classes, num_classes=num_classes, eos_coef=eos_coef)

    # Top-1 accuracy of matched queries; official `accuracy` gives 0 with no targets,
    # hence class_error 100.
    matched_logits = jnp.take_along_axis(
        pred_logits, jnp.maximum(indices, 0)[..., None], axis=1)  # [B, M, C+1]
    correct = (matched_logits.argmax(-1) == targets["labels"]) & matched
    num_matched = matched.sum()
    accuracy = jnp.where(num_matched > 0, 100.0 * correct.sum() / jnp.maximum(num_matched, 1), 0.0)
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

    return _paired_box_losses(src_boxes, tgt_boxes, matched, num_boxes, bbox_loss_type)


def _weighted_cross_entropy(pred_logits, target_classes, *, num_classes, eos_coef, valid=None):
    """The official class-weighted CE: sum(w * nll) / sum(w), no-object (index num_classes) weighted eos_coef.

    pred_logits [..., C + 1], target_classes int [...]; `valid` bool [...] drops entries (weight 0).
    """
    log_prob = jax.nn.log_softmax(pred_logits, axis=-1)
    nll = -jnp.take_along_axis(log_prob, target_classes[..., None], axis=-1)[..., 0]
    weight = jnp.where(target_classes == num_classes, eos_coef, 1.0)
    if valid is not None:
        weight = weight * valid
    return (weight * nll).sum() / jnp.maximum(weight.sum(), 1e-6)


def _paired_box_losses(src_boxes, tgt_boxes, valid, normaliser, bbox_loss_type):
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


def set_criterion(outputs, targets, *, num_classes=91, eos_coef=0.1,
                  cost_class=1.0, cost_bbox=5.0, cost_giou=2.0,
                  bbox_loss_coef=5.0, giou_loss_coef=2.0, ce_loss_coef=1.0,
                  num_boxes=None, bbox_loss_type="l1", indices=None):
    """DETR losses for the last decoder layer and every auxiliary one.

    Args:
      outputs: dict "pred_logits" [B, N, num_classes + 1] (no-object last),
        "pred_boxes" [B, N, 4] cxcywh normalised, optional "aux_outputs": list of
        L - 1 dicts with the same two keys, first decoder layer first.
      targets: dict "labels" int32 [B, M] in [0, num_classes) on real objects (the data layer rejects labels
        out of range, naming the annotation; here an out-of-range label would silently become another class),
        "boxes" float32 [B, M, 4] cxcywh normalised,
        "mask" bool [B, M] (True on real objects).
      num_classes: number of object classes; index num_classes is no-object.
      eos_coef: class weight of no-object in the cross-entropy.
      cost_class, cost_bbox, cost_giou: matching cost weights.
      bbox_loss_coef, giou_loss_coef, ce_loss_coef: loss weights in "loss".
      num_boxes: box-loss normaliser. Default: valid targets in this batch (min 1).
        Under data parallelism pass the global count divided by the number of devices,
        as the official code does with all_reduce / world_size.
      bbox_loss_type: "l1" (official) or "smooth_l1".
      indices: optional int32 [L, B, M] matcher output (see `hungarian_match`), layers
        in the same order (aux first, main last); matched here when None.
    Returns:
      dict of scalars: "loss" (weighted total over all layers), "loss_ce", "loss_bbox",
      "loss_giou", "cardinality_error", "class_error" for the last layer, and
      "loss_ce_i", "loss_bbox_i", "loss_giou_i", "cardinality_error_i" for aux layer i
      (as official, class_error is logged for the last layer only).
    """
    if bbox_loss_type not in BBOX_LOSS_TYPES:
        raise ValueError(f"set_criterion: bbox_loss_type must be 'l1' or 'smooth_l1', got {bbox_loss_type!r}")
    layers = list(outputs.get("aux_outputs") or []) + [outputs]
    pred_logits = jnp.stack([layer["pred_logits"] for layer in layers])  # [L, B, N, C+1]
    pred_boxes = jnp.stack([layer["pred_boxes"] for layer in layers])  # [L, B, N, 4]
    targets = dict(targets, mask=jnp.asarray(targets["mask"], bool))

    if indices is None:
        indices = hungarian_match(pred_logits, pred_boxes, targets, cost_class=cost_class,
                                  cost_bbox=cost_bbox, cost_giou=cost_giou)
    indices = jnp.asarray(indices, jnp.int32)  # [L, B, M]
    if num_boxes is None:
        num_boxes = targets["mask"].sum()
    num_boxes = jnp.maximum(jnp.asarray(num_boxes, jnp.float32), 1.0)

    losses = {}
    total = 0.0
    for layer in range(len(layers)):
        suffix = "" if layer == len(layers) - 1 else f"_{layer}"
        loss_ce, class_error = _label_losses(pred_logits[layer], indices[layer], targets,
                                             num_classes=num_classes, eos_coef=eos_coef)
        loss_bbox, loss_giou = _box_losses(pred_boxes[layer], indices[layer], targets,
                                           num_boxes=num_boxes, bbox_loss_type=bbox_loss_type)
        losses["loss_ce" + suffix] = loss_ce
        losses["loss_bbox" + suffix] = loss_bbox
        losses["loss_giou" + suffix] = loss_giou
        losses["cardinality_error" + suffix] = _cardinality_error(pred_logits[layer], targets["mask"])
        if not suffix:
            losses["class_error"] = class_error
        total = total + (ce_loss_coef * loss_ce + bbox_loss_coef * loss_bbox
                         + giou_loss_coef * loss_giou)
    losses["loss"] = total
    return losses


def encoder_dense_losses(enc_outputs, targets, *, num_classes=91, eos_coef=0.1, ce_loss_coef=1.0,
                         bbox_loss_coef=5.0, giou_loss_coef=2.0, center_fraction=0.5, name="enc"):
    """One-to-many losses on the encoder tokens (training-only aid, see `DETR.encoder_aux_loss`).

    Assignment, fixed and on device (no matcher): a token is positive for an object if the object's centre
    lies in the token's cell, or if the token's centre lies in the central `center_fraction` of the object's
    box (FCOS-style centre sampling); a token positive for several objects takes the smallest one. Every
    object whose centre is on the map is assigned its own cell unless a smaller object also claims it.

    Args:
      enc_outputs: "pred_logits" [B, S, num_classes + 1], "pred_boxes" [B, S, 4] cxcywh normalised,
        "token_mask" bool [B, S], "token_centres" [B, S, 2] (x, y normalised; see `DETR.__call__`).
      targets: "labels" int32 [B, M], "boxes" [B, M, 4] cxcywh normalised, "mask" bool [B, M].
      name: the suffix of the returned keys ("enc" for the encoder tokens, "s3" for the stage-3 heads, ...).
    Returns:
      dict of scalars, for name "enc": "loss_ce_enc" (weighted CE over real tokens, no-object weight
      `eos_coef`, as the decoder's), "loss_bbox_enc" and "loss_giou_enc" (mean over positive tokens),
      "loss_enc" (their sum with the loss coefficients), "enc_positives" (positive tokens per object).
    """
    centres, token_mask = enc_outputs["token_centres"], enc_outputs["token_mask"]  # [B, S, 2], [B, S]
    cell = 2.0 * centres[:, :1]  # [B, 1, 2]: the first token's centre is half a cell from the corner
    boxes = targets["boxes"]  # [B, M, 4]
    offset = jnp.abs(centres[:, :, None] - boxes[:, None, :, :2])  # [B, S, M, 2]
    in_cell = jnp.all(offset <= cell[:, :, None] / 2, axis=-1)
    in_centre = jnp.all(offset <= center_fraction * boxes[:, None, :, 2:] / 2, axis=-1)
    candidate = (in_cell | in_centre) & targets["mask"][:, None, :] & token_mask[:, :, None]  # [B, S, M]
    area = boxes[..., 2] * boxes[..., 3]  # [B, M]
    owner = jnp.argmin(jnp.where(candidate, area[:, None, :], jnp.inf), axis=-1)  # [B, S]
    positive = candidate.any(axis=-1)  # [B, S]

    labels = jnp.take_along_axis(targets["labels"].astype(jnp.int32), owner, axis=1)
    target_classes = jnp.where(positive, labels, num_classes)
    loss_ce = _weighted_cross_entropy(enc_outputs["pred_logits"], target_classes, num_classes=num_classes,
                                      eos_coef=eos_coef, valid=token_mask)

    num_positive = jnp.maximum(positive.sum(), 1).astype(jnp.float32)
    target_boxes = jnp.take_along_axis(boxes, owner[..., None], axis=1)  # [B, S, 4]
    loss_bbox, loss_giou = _paired_box_losses(enc_outputs["pred_boxes"], target_boxes, positive, num_positive, "l1")
    return {f"loss_ce_{name}": loss_ce, f"loss_bbox_{name}": loss_bbox, f"loss_giou_{name}": loss_giou,
            f"loss_{name}": ce_loss_coef * loss_ce + bbox_loss_coef * loss_bbox + giou_loss_coef * loss_giou,
            f"{name}_positives": positive.sum() / jnp.maximum(targets["mask"].sum(), 1)}
