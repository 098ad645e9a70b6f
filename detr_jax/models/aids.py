"""Training-only aids composed around the paper's DETR: Group DETR query groups, one-to-many token heads and
DN-DETR's denoising queries.

`DETRWithAids` is the module a training run applies. It holds the detector under "model" (the parameters of a
plain `DETR`, the layout of an official checkpoint) and owns every parameter of the aids beside it, so
fine-tuning from an official checkpoint, evaluation and inference take `params["model"]` and never need to
know which aids a run used.
"""

from typing import Any, Dict, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from detr_jax.models.backbone import downsample_mask
from detr_jax.models.detr import DETR, MLP
from detr_jax.models.layers import Conv2d, Linear
from detr_jax.models.position_encoding import box_sine_encoding
from detr_jax.models.segmentation import DETRsegm
from detr_jax.ops import box_ops

MODEL = "model"  # the detector's sub-tree in a training state's params and "frozen" collection


class EncoderTokenHeads(nn.Module):
    """A class and a box for every token of a feature map (the one-to-many aids of `DETRWithAids`).

    The box centre is the token's cell centre plus an offset in cells (memory has no absolute position: the
    encodings only enter attention queries and keys), the size a sigmoid fraction of the image.
    """
    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, memory, mask):
        """memory [B, h * w, D], mask bool [B, h, w] (True on real positions) -> "pred_logits" [B, S, C + 1],
        "pred_boxes" [B, S, 4] cxcywh normalised, "token_mask" bool [B, S] (True on real tokens) and
        "token_centres" [B, S, 2] (x, y of each token's cell centre, normalised by the real feature-map size),
        S = h * w row-major."""
        d = memory.shape[-1]
        logits = Linear(self.num_classes + 1, dtype=self.dtype, name="class_embed")(memory).astype(jnp.float32)
        raw = MLP(d, 4, 3, self.dtype, name="bbox_embed")(memory).astype(jnp.float32)  # [B, S, 4]
        token_mask, centres = token_grid(mask)
        cell = 2.0 * centres[:, :1]  # [B, 1, 2]: the first token's centre is half a cell from the corner
        boxes = jnp.concatenate([centres + raw[..., :2] * cell, jax.nn.sigmoid(raw[..., 2:])], -1)
        return {"pred_logits": logits, "pred_boxes": boxes, "token_mask": token_mask, "token_centres": centres}


def token_grid(mask):
    """The tokens of a feature map's padding mask bool [B, h, w] (True on real positions): token_mask bool [B, S]
    and token_centres [B, S, 2] (x, y of each cell's centre, normalised by the real feature-map size), S = h * w
    row-major. A function of the mask alone, so gradient accumulation computes the dense losses' normalisers
    from the batch before any forward pass."""
    real_h = mask.any(axis=2).sum(axis=1).astype(jnp.float32)  # [B] real rows of the feature map
    real_w = mask.any(axis=1).sum(axis=1).astype(jnp.float32)
    h, w = mask.shape[1:]
    ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) + 0.5, jnp.arange(w, dtype=jnp.float32) + 0.5,
                          indexing="ij")
    cell = jnp.stack([1.0 / jnp.maximum(real_w, 1.0), 1.0 / jnp.maximum(real_h, 1.0)], -1)[:, None]  # [B, 1, 2]
    centres = jnp.stack([xs.reshape(-1), ys.reshape(-1)], -1)[None] * cell  # [B, S, 2]
    return mask.reshape(mask.shape[0], -1), centres


def add_noise(key, labels, boxes, positive, *, num_classes: int, box_noise: float, label_noise: float):
    """DN-DETR's label noise and DINO's box noise.

    Args:
        key: a PRNG key.
        labels: int32 [...] in [0, num_classes); boxes: [..., 4] cxcywh normalised; positive: bool [...].
        box_noise: each corner of a positive's box moves by up to box_noise x half the box's width (x) and height
            (y), a negative's by box_noise x [1, 2) of them, in a random direction; clipped to the image.
        label_noise: the probability that a label becomes a class drawn uniformly from [0, num_classes).
    Returns:
        (labels int32 [...], boxes [..., 4] cxcywh normalised).
    """
    k_flip, k_class, k_size, k_sign = jax.random.split(key, 4)
    flip = jax.random.uniform(k_flip, labels.shape) < label_noise
    labels = jnp.where(flip, jax.random.randint(k_class, labels.shape, 0, num_classes), labels)
    half = jnp.concatenate([boxes[..., 2:], boxes[..., 2:]], -1) / 2  # [..., 4] half (w, h, w, h)
    size = jax.random.uniform(k_size, boxes.shape) + jnp.where(positive, 0.0, 1.0)[..., None]
    sign = jax.random.rademacher(k_sign, boxes.shape, jnp.float32)
    corners = jnp.clip(box_ops.box_cxcywh_to_xyxy(boxes) + sign * size * half * box_noise, 0.0, 1.0)
    return labels, box_ops.box_xyxy_to_cxcywh(corners)


class DenoisingQueries(nn.Module):
    """DN-DETR's denoising queries (Li et al. 2022), with DINO's negatives as an option (Zhang et al. 2023).

    Every real target of an image becomes one query per group: its label, replaced by a random class with
    probability `label_noise`, is the query's content (a label embedding; the matching queries start at zero),
    and its box, each corner moved by up to `box_noise` x half the box's width / height (DINO's noise), is the
    query's position (sine-encoded, through a 2-layer MLP). A positive query must give back its own object's
    class and box. A negative query (`negatives`) is the same object's box moved by `box_noise` x [1, 2) half
    sizes, and must say no-object. The noise draws from the "denoising" rng (a function of the seed and the step
    in training; initialisation, which has none, draws from key 0).
    """
    num_classes: int
    hidden_dim: int
    groups: int
    box_noise: float = 0.4
    label_noise: float = 0.2
    negatives: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, labels, boxes, mask):
        """labels int [B, M] in [0, num_classes), boxes [B, M, 4] cxcywh normalised, mask bool [B, M] (True on real
        targets) -> (queries, targets), with Q = M per group (2M with negatives: M positives, then M negatives):

        queries: "content", "pos" [B, Gd, Q, D], "mask" bool [B, Gd, Q] (the decoder's `denoising` argument);
        targets: "labels" int32 [B, Gd * Q] (num_classes, no-object, on negatives), "boxes" [B, Gd * Q, 4]
            cxcywh normalised (the object's own box), "mask" bool [B, Gd * Q], "positive" bool [B, Gd * Q];
            group by group, as the decoder returns the queries' outputs.
        """
        key = self.make_rng("denoising") if self.has_rng("denoising") else jax.random.PRNGKey(0)
        b, m = labels.shape
        copies = 2 if self.negatives else 1
        shape = (b, self.groups, copies, m)
        labels = jnp.broadcast_to(labels[:, None, None].astype(jnp.int32), shape)
        boxes = jnp.broadcast_to(boxes[:, None, None].astype(jnp.float32), shape + (4,))
        mask = jnp.broadcast_to(mask[:, None, None].astype(bool), shape)
        positive = jnp.broadcast_to((jnp.arange(copies) == 0)[None, None, :, None], shape)
        noisy_labels, noisy_boxes = add_noise(key, labels, boxes, positive, num_classes=self.num_classes,
                                              box_noise=self.box_noise, label_noise=self.label_noise)

        d = self.hidden_dim
        content = nn.Embed(self.num_classes, d, name="label_embed")(noisy_labels)
        pos = MLP(d, d, 2, self.dtype, name="box_embed")(box_sine_encoding(noisy_boxes, d // 2))
        grouped = lambda t: t.reshape((b, self.groups, copies * m) + t.shape[4:])
        queries = {"content": grouped(content), "pos": grouped(pos), "mask": grouped(mask)}
        flat = lambda t: t.reshape((b, self.groups * copies * m) + t.shape[4:])
        targets = {"labels": flat(jnp.where(positive, labels, self.num_classes)), "boxes": flat(boxes),
                   "mask": flat(mask), "positive": flat(positive)}
        return queries, targets


class DETRWithAids(nn.Module):
    """A DETR and the training-only aids that help it train from scratch.

    Attributes:
        model: the detector (its parameters are "model/..."): a `DETR`, or a `DETRsegm` (DETR with the panoptic
            mask head, `config.panoptic`) whose outputs add "pred_masks".
        num_query_groups: Group DETR (Chen et al. 2023): with G > 1, training decodes G independent groups of
            N queries (no self-attention between groups), each matched to the targets on its own
            (`criterion.query_groups`). Groups 1..G-1 are the parameter "group_query_embed" [G - 1, N, D].
        encoder_aux_loss: in the spirit of Co-DETR's auxiliary heads (Zong et al. 2023): heads on every encoder
            token predict a class and a box ("enc"), for a dense one-to-many loss (`criterion.dense_losses`)
            that teaches the backbone and encoder where and what the objects are long before the decoder has
            learned to attend. Parameters "enc_heads".
        backbone_aux_stages: the same kind of token heads lower down, on each listed ResNet stage (1-4; stage 3 has
            stride 16, stage 2 stride 8), each through its own 1x1 projection and LayerNorm ("s{i}"), so that
            the backbone learns what the objects are where small objects are still several cells wide.
            Parameters "stage{i}_proj", "stage{i}_norm", "stage{i}_heads".
        dn_groups: DN-DETR's denoising training (Li et al. 2022), `DenoisingQueries`: with Gd > 0, training also
            decodes Gd groups of noised copies of the targets, each query reconstructing its own object without
            matching (`criterion.denoising`). The matching queries never see them and the groups never see each
            other (`transformer.DecoderLayer`). Parameters "denoising" (a label embedding and a box MLP).
        dn_box_noise, dn_label_noise, dn_negatives: `DenoisingQueries.box_noise`, `.label_noise`, `.negatives`.
    """
    model: Union[DETR, DETRsegm]
    num_query_groups: int = 1
    encoder_aux_loss: bool = False
    backbone_aux_stages: Sequence[int] = ()
    dn_groups: int = 0
    dn_box_noise: float = 0.4
    dn_label_noise: float = 0.2
    dn_negatives: bool = False

    @property
    def detector(self) -> DETR:
        """The DETR itself (inside the mask head's model for panoptic training)."""
        return self.model.detector

    @nn.compact
    def __call__(self, images, pixel_mask=None, train: bool = False,
                 targets: Optional[Dict] = None) -> Tuple[Dict, Dict]:
        """images float32 [B, H, W, 3] normalised, pixel_mask bool [B, H, W] (True on real pixels); targets
        (denoising only): "labels" int [B, M], "boxes" [B, M, 4] cxcywh normalised, "mask" bool [B, M].

        Returns (outputs, aids): `DETR`'s outputs with G * N queries, group by group; and {name: token-head
        outputs (see `EncoderTokenHeads`)} for every one-to-many aid, named "enc" and "s{i}"; with `dn_groups`
        and targets, "dn": the denoising queries' outputs ("pred_logits", "pred_boxes", "aux_outputs") and
        their "targets" (see `DenoisingQueries`).
        """
        m = self.detector
        groups = {}
        if self.num_query_groups > 1:  # (a DETRsegm decodes one query set: config.check_config refuses groups)
            groups["extra_queries"] = self.param("group_query_embed", nn.initializers.normal(1.0),
                                                 (self.num_query_groups - 1, m.num_queries, m.hidden_dim))
        dn_targets = None
        if self.dn_groups > 0 and (targets is not None or self.is_initializing()):  # (refused with a DETRsegm)
            if targets is None:  # initialisation: one inert slot per image makes the parameters
                b = images.shape[0]
                targets = {"labels": jnp.zeros((b, 1), jnp.int32), "boxes": jnp.full((b, 1, 4), 0.5),
                           "mask": jnp.zeros((b, 1), bool)}
            queries, dn_targets = DenoisingQueries(
                m.num_classes, m.hidden_dim, self.dn_groups, self.dn_box_noise, self.dn_label_noise,
                self.dn_negatives, m.dtype, name="denoising")(targets["labels"], targets["boxes"], targets["mask"])
            groups["denoising"] = queries
        if pixel_mask is None:
            pixel_mask = jnp.ones(images.shape[:3], bool)
        outputs = self.model(images, pixel_mask, train=train, return_features=True, **groups)
        features = outputs.pop("features")
        aids = {}
        if dn_targets is not None:
            aids["dn"] = dict(outputs.pop("denoising"), targets=dn_targets)
        if self.encoder_aux_loss:
            aids["enc"] = EncoderTokenHeads(m.num_classes, m.dtype, name="enc_heads")(features["memory"],
                                                                                      features["mask"])
        for i in self.backbone_aux_stages:  # the token heads on stage i, through their own projection
            f = features["stages"][i - 1]
            b, h, w, c = f.shape
            tokens = Conv2d(m.hidden_dim, kernel_size=1, dtype=m.dtype, name=f"stage{i}_proj")(f)
            tokens = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name=f"stage{i}_norm")(tokens.reshape(b, h * w, -1))
            aids[f"s{i}"] = EncoderTokenHeads(m.num_classes, m.dtype, name=f"stage{i}_heads")(
                tokens.astype(m.dtype), downsample_mask(pixel_mask, (h, w)))
        return outputs, aids
