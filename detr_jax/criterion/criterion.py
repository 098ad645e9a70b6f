"""The criterion: the one owner of "what is the loss" (the official `SetCriterion`, scenic's `loss_function`).

    criterion = Criterion.from_config(config, model, mesh)
    loss, terms = criterion(outputs, batch, aids)   # inside the jitted train step

It matches every decoder layer to the targets (Hungarian, `matcher.py`), then adds up each weighted term: the
set losses of every layer (`set_losses.py`), the panoptic mask losses of the main layer (`mask_losses.py`) and
the dense losses of the training aids' token heads (`dense_losses.py`), with Group DETR's query groups each
matched on its own (`query_groups.py`), and the denoising queries' losses without matching (`denoising.py`).
The train step knows none of them: forward -> criterion -> grad -> update. A new term is a method here and a line
in `__call__`.
"""

from typing import Dict, Mapping, Optional, Tuple

import jax.numpy as jnp

from detr_jax.criterion.denoising import denoising_losses
from detr_jax.criterion.dense_losses import assign_tokens, encoder_dense_losses
from detr_jax.criterion.mask_losses import mask_losses
from detr_jax.criterion.matcher import HungarianMatcher
from detr_jax.criterion.query_groups import split_query_groups
from detr_jax.criterion.set_losses import class_quality, set_losses


class Criterion:
    """Matching, then the weighted total and every logged term.

    Args:
      num_classes: object classes; index num_classes of the logits is no-object.
      matcher: a `HungarianMatcher` (cost weights, solver, the device mesh it runs on).
      eos_coef: the no-object class's weight in the cross-entropy (official 0.1).
      weights: each term's weight in the total: "ce", "bbox", "giou" (every decoder layer, and the aids' dense
        losses), "mask", "dice" (panoptic).
      bbox_loss_type: "l1" (official) or "smooth_l1".
      num_query_groups: Group DETR's G: the outputs hold G groups of queries, each matched on its own.
      num_queries: N, the queries of a group (for `normalisers`).
      class_target: the matched queries' class target, "hard" (official) or "iou" (`class_targets`).
      class_target_alpha: the IoU's exponent of "iou".
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, *, eos_coef: float = 0.1,
                 weights: Optional[Mapping[str, float]] = None, bbox_loss_type: str = "l1",
                 num_query_groups: int = 1, num_queries: Optional[int] = None, class_target: str = "hard",
                 class_target_alpha: float = 0.25):
        self.num_classes, self.matcher, self.eos_coef = num_classes, matcher, eos_coef
        self.class_target, self.class_target_alpha = class_target, class_target_alpha
        self.num_queries = num_queries
        self.weights = {**dict(ce=1.0, bbox=5.0, giou=2.0, mask=1.0, dice=1.0), **(weights or {})}
        self.bbox_loss_type, self.num_query_groups = bbox_loss_type, num_query_groups

    @classmethod
    def from_config(cls, config, model, mesh=None) -> "Criterion":
        """The criterion of a run: config.loss (matching costs, solver, loss weights), config.panoptic's mask loss
        weights; `model` (a `DETR`, `DETRsegm` or `DETRWithAids`) gives the classes and the query groups. With a
        `mesh`, matching runs per device shard."""
        loss = config.loss
        matcher = HungarianMatcher(loss.cost_class, loss.cost_bbox, loss.cost_giou, solver=loss.matcher, mesh=mesh)
        weights = dict(ce=loss.ce_loss_coef, bbox=loss.bbox_loss_coef, giou=loss.giou_loss_coef,
                       mask=config.panoptic.mask_loss_coef, dice=config.panoptic.dice_loss_coef)
        return cls(model.detector.num_classes, matcher, eos_coef=loss.eos_coef, weights=weights,
                   bbox_loss_type=loss.bbox_loss_type, num_query_groups=getattr(model, "num_query_groups", 1),
                   num_queries=model.detector.num_queries, class_target=loss.class_target,
                   class_target_alpha=loss.class_target_alpha)

    def __call__(self, outputs: Dict, batch: Dict, aids: Optional[Dict] = None,
                 shares: Optional[Dict] = None) -> Tuple[jnp.ndarray, Dict]:
        """The loss of one (global) batch, or with `shares` one micro-batch's share of it.

        Args:
          outputs: the model's: "pred_logits" [B, G * N, C + 1], "pred_boxes" [B, G * N, 4] cxcywh normalised,
            "aux_outputs" (the earlier decoder layers), panoptic "pred_masks" [B, N, h, w].
          batch: "labels" int32 [B, M], "boxes" [B, M, 4] cxcywh normalised, "mask" bool [B, M] (True on real
            objects); panoptic "target_masks" (bool [B, M, H, W], or [B, M, P] with "mask_points" int [B, P]),
            "pixel_mask" bool [B, H, W].
          aids: {name: token-head outputs} of the training aids (`models.aids.DETRWithAids`); "dn": the
            denoising queries' outputs and targets.
          shares: gradient accumulation: `normalisers` of the global batch that `batch` is one micro-batch of.
            Every term is then this micro-batch's share, and the micro-batches' totals, terms and gradients add up
            to the global batch's (each normaliser is the global batch's, fixed by its masks before any runs).
        Returns:
          (total, terms): the weighted total, and a dict of every logged scalar ("loss" is the total).
        """
        targets = self.targets(batch)
        outputs, targets = split_query_groups(outputs, targets, self.num_query_groups)
        layers = list(outputs.get("aux_outputs", [])) + [outputs]
        indices = self.matcher(jnp.stack([o["pred_logits"] for o in layers]),
                               jnp.stack([o["pred_boxes"] for o in layers]), targets)  # [L, B, M]
        terms = self.set_losses(outputs, targets, indices, shares)
        w = self.weights
        if "pred_masks" in outputs:  # panoptic
            masks = self.mask_losses(outputs, batch, targets, indices, shares)
            terms = dict(terms, **masks, loss=terms["loss"] + w["mask"] * masks["loss_mask"]
                         + w["dice"] * masks["loss_dice"])
        aids = dict(aids or {})
        if "dn" in aids:  # weighted inside, with the decoder's weights (config.check_config: never with shares)
            dn = self.denoising_losses(aids.pop("dn"))
            terms = dict(terms, **dn, loss=terms["loss"] + dn["loss_dn"])
        for name, dense_outputs in aids.items():  # weighted inside, with the decoder's weights
            dense = self.dense_losses(dense_outputs, batch, name, shares)
            terms = dict(terms, **dense, loss=terms["loss"] + dense["loss_" + name])
        return terms["loss"], terms

    def normalisers(self, batch: Mapping, tokens: Optional[Mapping] = None) -> Dict:
        """What every loss term of the global `batch` is normalised by, from its masks alone, before any of its
        micro-batches runs (gradient accumulation: `__call__(..., shares=)`).

        Matching assigns each image's min(objects, N) targets in every query group, so the cross-entropy's weight
        sum (matched queries 1, the others eos_coef) follows from the masks as num_boxes does.
        `tokens`: {aid name: (token_mask bool [B, S], token_centres [B, S, 2])} of the aids' token heads
        (`models.aids.token_grid`), for their dense losses' normalisers.
        """
        mask = jnp.asarray(batch["mask"], bool)  # [B, M]
        groups, queries = self.num_query_groups, self.num_queries
        matched = groups * jnp.minimum(mask.sum(-1), queries).sum()
        all_queries = mask.shape[0] * groups * queries
        out = {"images": mask.shape[0], "num_boxes": groups * mask.sum(), "mask_boxes": mask.sum(),
               "num_matched": matched,
               "ce_weight": self.eos_coef * (all_queries - matched) + matched}
        for name, (token_mask, centres) in (tokens or {}).items():
            _, positive = assign_tokens(centres, token_mask, self.targets(batch))
            positives = positive.sum()
            out[name] = {"ce_weight": self.eos_coef * (token_mask.sum() - positives) + positives,
                         "positives": positives, "objects": mask.sum()}
        return out

    def set_losses(self, outputs, targets, indices, shares=None) -> Dict:
        """Class, box and GIoU losses of every decoder layer (`set_losses.set_losses`); "loss" their weighted sum."""
        w = self.weights
        extra = dict(quality=self.class_targets(outputs, targets, indices))
        extra.update({} if shares is None else dict(
            num_boxes=shares["num_boxes"],
            shares=dict(ce_weight=shares["ce_weight"], num_matched=shares["num_matched"],
                        share=targets["mask"].shape[0] / (shares["images"] * self.num_query_groups))))
        return set_losses(outputs, targets, indices, num_classes=self.num_classes, eos_coef=self.eos_coef,
                          ce_loss_coef=w["ce"], bbox_loss_coef=w["bbox"], giou_loss_coef=w["giou"],
                          bbox_loss_type=self.bbox_loss_type, **extra)

    def class_targets(self, outputs, targets, indices) -> Optional[jnp.ndarray]:
        """The matched queries' class targets of every decoder layer: None for "hard" (the class, official), or
        for "iou" [L, B, M] each matched pair's probability of its class (`set_losses.class_quality`; no-object gets
        the rest). Only the decoder's set losses use them; the aids' token heads and denoising keep hard targets."""
        if self.class_target == "hard":
            return None
        layers = list(outputs.get("aux_outputs") or []) + [outputs]
        return jnp.stack([class_quality(layer["pred_boxes"], indices[i], targets, alpha=self.class_target_alpha)
                          for i, layer in enumerate(layers)])

    def mask_losses(self, outputs, batch, targets, indices, shares=None) -> Dict:
        """Panoptic: the official focal and dice losses on the main layer's matched masks ("loss_mask",
        "loss_dice"), normalised by the real targets as the box losses."""
        num_boxes = targets["mask"].sum() if shares is None else shares["mask_boxes"]
        return mask_losses(outputs["pred_masks"], batch["target_masks"], targets["mask"], indices[-1],
                           num_boxes, points=batch.get("mask_points"),
                           image_size=batch["pixel_mask"].shape[1:])

    @staticmethod
    def targets(batch: Mapping) -> Dict:
        """The set targets of a batch: "labels" int32 [B, M], "boxes" [B, M, 4] cxcywh normalised, "mask" bool
        [B, M] (True on real objects)."""
        return {k: batch[k] for k in ("labels", "boxes", "mask")}

    def denoising_losses(self, dn_outputs) -> Dict:
        """The denoising queries' losses, each against its own object ("loss_dn" weighted with the decoder's
        weights, and the last layer's parts; `denoising.denoising_losses`)."""
        w = self.weights
        return denoising_losses(dn_outputs, num_classes=self.num_classes, eos_coef=self.eos_coef,
                                ce_loss_coef=w["ce"], bbox_loss_coef=w["bbox"], giou_loss_coef=w["giou"],
                                bbox_loss_type=self.bbox_loss_type)

    def dense_losses(self, dense_outputs, batch, name: str, shares=None) -> Dict:
        """A training aid's one-to-many token losses ("loss_<name>", weighted with the decoder's weights, and its
        parts)."""
        w = self.weights
        return encoder_dense_losses(dense_outputs, batch, num_classes=self.num_classes, eos_coef=self.eos_coef,
                                    ce_loss_coef=w["ce"], bbox_loss_coef=w["bbox"], giou_loss_coef=w["giou"],
                                    name=name, shares=None if shares is None else shares[name])
