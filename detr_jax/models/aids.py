"""Training-only aids composed around the paper's DETR: Group DETR query groups and one-to-many token heads.

`DETRWithAids` is the module a training run applies. It holds the detector under "model" (the parameters of a
plain `DETR`, the layout of an official checkpoint) and owns every parameter of the aids beside it, so
fine-tuning from an official checkpoint, evaluation and inference take `params["model"]` and never need to
know which aids a run used.
"""

from typing import Any, Dict, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from detr_jax.models.backbone import downsample_mask
from detr_jax.models.detr import DETR, MLP
from detr_jax.models.layers import Conv2d, Linear
from detr_jax.models.segmentation import DETRsegm

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
        real_h = mask.any(axis=2).sum(axis=1).astype(jnp.float32)  # [B] real rows of the feature map
        real_w = mask.any(axis=1).sum(axis=1).astype(jnp.float32)
        h, w = mask.shape[1:]
        ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) + 0.5, jnp.arange(w, dtype=jnp.float32) + 0.5,
                              indexing="ij")
        cell = jnp.stack([1.0 / jnp.maximum(real_w, 1.0), 1.0 / jnp.maximum(real_h, 1.0)], -1)[:, None]  # [B, 1, 2]
        centres = jnp.stack([xs.reshape(-1), ys.reshape(-1)], -1)[None] * cell  # [B, S, 2]
        boxes = jnp.concatenate([centres + raw[..., :2] * cell, jax.nn.sigmoid(raw[..., 2:])], -1)
        return {"pred_logits": logits, "pred_boxes": boxes, "token_mask": mask.reshape(mask.shape[0], -1),
                "token_centres": centres}


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
    """
    model: Union[DETR, DETRsegm]
    num_query_groups: int = 1
    encoder_aux_loss: bool = False
    backbone_aux_stages: Sequence[int] = ()

    @property
    def detector(self) -> DETR:
        """The DETR itself (inside the mask head's model for panoptic training)."""
        return self.model.detector

    @nn.compact
    def __call__(self, images, pixel_mask=None, train: bool = False) -> Tuple[Dict, Dict]:
        """images float32 [B, H, W, 3] normalised, pixel_mask bool [B, H, W] (True on real pixels).

        Returns (outputs, aids): `DETR`'s outputs with G * N queries, group by group; and {name: token-head
        outputs (see `EncoderTokenHeads`)} for every one-to-many aid, named "enc" and "s{i}".
        """
        m = self.detector
        groups = {}
        if self.num_query_groups > 1:  # (a DETRsegm decodes one query set: config.check_config refuses groups)
            groups["extra_queries"] = self.param("group_query_embed", nn.initializers.normal(1.0),
                                                 (self.num_query_groups - 1, m.num_queries, m.hidden_dim))
        if pixel_mask is None:
            pixel_mask = jnp.ones(images.shape[:3], bool)
        outputs = self.model(images, pixel_mask, train=train, return_features=True, **groups)
        features = outputs.pop("features")
        aids = {}
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
