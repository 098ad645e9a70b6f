"""One-to-many dense losses on token heads (the training aids' `EncoderTokenHeads`): a fixed, on-device assignment
of tokens to objects (no matcher), then the decoder's class and box losses per positive token."""

import jax.numpy as jnp

from detr_jax.criterion.set_losses import paired_box_losses, weighted_cross_entropy


def assign_tokens(centres, token_mask, targets, center_fraction=0.5):
    """The fixed assignment of `encoder_dense_losses`: centres [B, S, 2] (x, y normalised), token_mask bool [B, S],
    targets "boxes" [B, M, 4] cxcywh normalised and "mask" bool [B, M] -> (owner int [B, S]: the object each token
    is positive for, the smallest one; positive bool [B, S])."""
    cell = 2.0 * centres[:, :1]  # [B, 1, 2]: the first token's centre is half a cell from the corner
    boxes = targets["boxes"]  # [B, M, 4]
    offset = jnp.abs(centres[:, :, None] - boxes[:, None, :, :2])  # [B, S, M, 2]
    in_cell = jnp.all(offset <= cell[:, :, None] / 2, axis=-1)
    in_centre = jnp.all(offset <= center_fraction * boxes[:, None, :, 2:] / 2, axis=-1)
    candidate = (in_cell | in_centre) & targets["mask"][:, None, :] & token_mask[:, :, None]  # [B, S, M]
    area = boxes[..., 2] * boxes[..., 3]  # [B, M]
    owner = jnp.argmin(jnp.where(candidate, area[:, None, :], jnp.inf), axis=-1)  # [B, S]
    return owner, candidate.any(axis=-1)


def encoder_dense_losses(enc_outputs, targets, *, num_classes=91, eos_coef=0.1, ce_loss_coef=1.0,
                         bbox_loss_coef=5.0, giou_loss_coef=2.0, center_fraction=0.5, name="enc", shares=None):
    """One-to-many losses on the encoder tokens (training-only aid, see `models.aids.DETRWithAids`).

    Assignment, fixed and on device (no matcher): a token is positive for an object if the object's centre
    lies in the token's cell, or if the token's centre lies in the central `center_fraction` of the object's
    box (FCOS-style centre sampling); a token positive for several objects takes the smallest one. Every
    object whose centre is on the map is assigned its own cell unless a smaller object also claims it.

    Args:
      enc_outputs: "pred_logits" [B, S, num_classes + 1], "pred_boxes" [B, S, 4] cxcywh normalised,
        "token_mask" bool [B, S], "token_centres" [B, S, 2] (x, y normalised; see `models.aids.EncoderTokenHeads`).
      targets: "labels" int32 [B, M], "boxes" [B, M, 4] cxcywh normalised, "mask" bool [B, M].
      name: the suffix of the returned keys ("enc" for the encoder tokens, "s3" for the stage-3 heads, ...).
      shares: None, or (gradient accumulation) the global batch's "ce_weight", "positives" and "objects" of these
        tokens (`Criterion.normalisers`): the returned values are then this micro-batch's shares of the global
        batch's, which add up over its micro-batches.
    Returns:
      dict of scalars, for name "enc": "loss_ce_enc" (weighted CE over real tokens, no-object weight
      `eos_coef`, as the decoder's), "loss_bbox_enc" and "loss_giou_enc" (mean over positive tokens),
      "loss_enc" (their sum with the loss coefficients), "enc_positives" (positive tokens per object).
    """
    centres, token_mask = enc_outputs["token_centres"], enc_outputs["token_mask"]  # [B, S, 2], [B, S]
    owner, positive = assign_tokens(centres, token_mask, targets, center_fraction)
    boxes = targets["boxes"]  # [B, M, 4]

    labels = jnp.take_along_axis(targets["labels"].astype(jnp.int32), owner, axis=1)
    target_classes = jnp.where(positive, labels, num_classes)
    loss_ce = weighted_cross_entropy(enc_outputs["pred_logits"], target_classes, num_classes=num_classes,
                                      eos_coef=eos_coef, valid=token_mask,
                                      normaliser=None if shares is None else shares["ce_weight"])

    positives = positive.sum() if shares is None else shares["positives"]
    objects = targets["mask"].sum() if shares is None else shares["objects"]
    num_positive = jnp.maximum(positives, 1).astype(jnp.float32)
    target_boxes = jnp.take_along_axis(boxes, owner[..., None], axis=1)  # [B, S, 4]
    loss_bbox, loss_giou = paired_box_losses(enc_outputs["pred_boxes"], target_boxes, positive, num_positive, "l1")
    return {f"loss_ce_{name}": loss_ce, f"loss_bbox_{name}": loss_bbox, f"loss_giou_{name}": loss_giou,
            f"loss_{name}": ce_loss_coef * loss_ce + bbox_loss_coef * loss_bbox + giou_loss_coef * loss_giou,
            f"{name}_positives": positive.sum() / jnp.maximum(objects, 1)}
