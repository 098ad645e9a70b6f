"""DN-DETR's loss side (Li et al. 2022; `models.aids.DenoisingQueries`): every denoising query is scored against
its own object, with no matching."""

from typing import Dict

import jax.numpy as jnp

from detr_jax.criterion.set_losses import paired_box_losses, weighted_cross_entropy


def denoising_losses(dn_outputs: Dict, *, num_classes: int, eos_coef: float, ce_loss_coef: float,
                     bbox_loss_coef: float, giou_loss_coef: float, bbox_loss_type: str = "l1") -> Dict:
    """The set losses of the denoising queries, every decoder layer, each query paired with its own target.

    Args:
      dn_outputs: "pred_logits" [B, Q, C + 1], "pred_boxes" [B, Q, 4] cxcywh normalised, optional "aux_outputs"
        (earlier decoder layers, same keys), and "targets": "labels" int32 [B, Q] (num_classes on negatives),
        "boxes" [B, Q, 4] cxcywh normalised, "mask" bool [B, Q] (True on real targets), "positive" bool [B, Q].
      num_classes, eos_coef: as the set losses' (negatives are no-object, weighted eos_coef in the CE).
      ce_loss_coef, bbox_loss_coef, giou_loss_coef, bbox_loss_type: as the set losses'.
    Returns:
      "loss_dn" (the weighted sum over layers), and the last layer's "loss_ce_dn", "loss_bbox_dn", "loss_giou_dn":
      the CE is the official weighted mean over the real queries; the box losses are summed over the real
      positives and divided by their number (DN-DETR's normaliser), so padding never counts.
    """
    t = dn_outputs["targets"]
    positives = t["mask"] & t["positive"]  # [B, Q]
    normaliser = jnp.maximum(positives.sum().astype(jnp.float32), 1.0)
    layers = list(dn_outputs.get("aux_outputs") or []) + [dn_outputs]
    total, terms = 0.0, {}
    for layer in layers:
        ce = weighted_cross_entropy(layer["pred_logits"], t["labels"], num_classes=num_classes, eos_coef=eos_coef,
                                    valid=t["mask"])
        bbox, giou = paired_box_losses(layer["pred_boxes"], t["boxes"], positives, normaliser, bbox_loss_type)
        total = total + ce_loss_coef * ce + bbox_loss_coef * bbox + giou_loss_coef * giou
        terms = {"loss_ce_dn": ce, "loss_bbox_dn": bbox, "loss_giou_dn": giou}
    return dict(terms, loss_dn=total)
