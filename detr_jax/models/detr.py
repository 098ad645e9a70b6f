"""DETR: backbone -> 1x1 projection -> transformer -> class and box heads (official `models/detr.py`)."""

from typing import Any, Dict, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from detr_jax.models.backbone import Conv1x1, ResNet, downsample_mask
from detr_jax.models.position_encoding import LearnedPositionEncoding, sine_position_encoding
from detr_jax.models.transformer import Transformer, dense_2d, torch_default_bias_init, torch_linear

POSITION_EMBEDDINGS = ("sine", "learned")

# torch's default init for Linear/Conv weights (kaiming_uniform with a=sqrt(5)) is U(+-1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class MLP(nn.Module):
    """The box head: `num_layers` Linear layers with ReLU between them."""
    hidden_dim: int
    output_dim: int
    num_layers: int = 3
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # [..., D] -> [..., output_dim]
        for i in range(self.num_layers):
            fan_in = x.shape[-1]
            last = i == self.num_layers - 1
            x = dense_2d(torch_linear(self.output_dim if last else self.hidden_dim, fan_in, f"layers_{i}", self.dtype,
                                      xavier_weight=False), x)
            if not last:
                x = nn.relu(x)
        return x


class DETR(nn.Module):
    """The DETR detector.

    Attributes:
        num_classes: object classes; the class head has num_classes + 1 logits, no-object LAST.
        num_queries: object queries N.
        num_query_groups: Group DETR (Chen et al. 2023), a training-only convergence aid: with G > 1, training
            decodes G independent groups of N queries (no self-attention between groups), each matched to the
            targets on its own; evaluation and inference use group 0 only, so the deployed model is a plain DETR.
            Groups 1..G-1 are the parameter "group_query_embed" [G - 1, N, D]; everything else is shared.
        encoder_aux_loss: a training-only convergence aid in the spirit of Co-DETR's auxiliary heads (Zong et al.
            2023): in training, extra heads on every encoder token predict a class and a box ("enc_outputs"), for
            a dense one-to-many loss (`losses.encoder_dense_losses`) that teaches the backbone and encoder where
            and what the objects are long before the decoder has learned to attend. Inference never runs them.
        backbone_aux_stages: a training-only aid like `encoder_aux_loss`, lower down: the same kind of token heads
            on each listed backbone stage (1-4; stage 3 has stride 16, stage 2 stride 8), each through its own 1x1
            projection and LayerNorm ("stage{i}_outputs", same keys as "enc_outputs"), so that the backbone learns
            what the objects are where small objects are still several cells wide.
        backbone_norm: "frozen_bn" (official), "group" (GroupNorm with learned affine) or "batch" (batch norm on
            batch statistics in training, synchronised over devices, and on its running statistics in evaluation;
            training applies the model with the "frozen" collection mutable, see `backbone.MaskedBatchNorm`). The
            last two are for a backbone trained from scratch; their statistics skip padding when
            `padding_invariant`.
        train_stem: also train the ResNet stem and stage 1 (frozen in the official DETR, which starts from
            ImageNet weights); for training a backbone from scratch.
        dtype: compute dtype (bfloat16 for mixed precision); parameters and outputs stay float32.
    """
    num_classes: int = 91
    num_queries: int = 100
    hidden_dim: int = 256
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    pre_norm: bool = False
    backbone_depth: int = 50
    dilation: bool = False
    position_embedding: str = "sine"
    aux_loss: bool = True
    # True: padding does not change any image's outputs (see ResNet); False: the official behaviour.
    padding_invariant: bool = False
    num_query_groups: int = 1
    encoder_aux_loss: bool = False
    backbone_norm: str = "frozen_bn"
    backbone_aux_stages: Sequence[int] = ()
    train_stem: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, pixel_mask=None, train: bool = False, return_attention: bool = False):
        """Predict boxes and classes.

        Args:
            images: float32 [B, H, W, 3], already normalised, zero-padded bottom/right.
            pixel_mask: bool [B, H, W], True on real pixels; None means no padding.
            train: enables dropout (needs a "dropout" rng), and batch statistics with `backbone_norm="batch"`.
            return_attention: also return the last decoder layer's cross-attention.
        Returns:
            "pred_logits": [B, N, num_classes + 1]; "pred_boxes": [B, N, 4] cxcywh normalised by the unpadded
            image size; "aux_outputs": list of L-1 dicts with the same keys, first decoder layer first (when
            aux_loss); with return_attention, "cross_attention": [B, N, h, w] and "feature_mask": bool [B, h, w].
            With `num_query_groups` G > 1 and `train`, N is G * num_queries: group g is queries g*N .. (g+1)*N-1.
            With `encoder_aux_loss` and `train`, "enc_outputs": "pred_logits" [B, S, C + 1] and "pred_boxes"
            [B, S, 4] (cxcywh normalised) per encoder token (S = h * w, row-major), "token_mask" bool [B, S]
            (True on real tokens) and "token_centres" [B, S, 2] (x, y of each token's cell centre, normalised by
            the real feature-map size). With `backbone_aux_stages` and `train`, "stage{i}_outputs": the same on
            the map of stage i (S = H/16 * W/16 for stage 3).
        """
        if pixel_mask is None:
            pixel_mask = jnp.ones(images.shape[:3], bool)
        # The stem and stage 1 are frozen as in the official DETR (see `parameter_groups`): no gradient into them,
        # unless `train_stem`.
        if any(i not in (1, 2, 3, 4) for i in self.backbone_aux_stages):
            raise ValueError(f"backbone_aux_stages are ResNet stages 1..4, got {tuple(self.backbone_aux_stages)}")
        stage_heads = bool(self.backbone_aux_stages) and (train or self.is_initializing())
        features = ResNet(self.backbone_depth, self.dilation, self.dtype, freeze_stem_and_layer1=not self.train_stem,
                          norm=self.backbone_norm, return_stages=stage_heads, name="backbone")(
            images.astype(self.dtype), pixel_mask if self.padding_invariant else None, train)
        if stage_heads:
            features, stages = features
        b, h, w, c = features.shape
        mask = downsample_mask(pixel_mask, (h, w))  # bool [B, h, w]
        if self.position_embedding == "sine":
            pos = sine_position_encoding(mask, self.hidden_dim // 2)
        elif self.position_embedding == "learned":
            pos = LearnedPositionEncoding(self.hidden_dim // 2, name="position_embedding")(mask)
        else:
            raise ValueError(f"position_embedding must be 'sine' or 'learned', got {self.position_embedding!r}")

        # nn.Conv(hidden_dim, (1, 1)) with bias, computed as a matrix product (faster gradient, see Conv1x1).
        src = Conv1x1(self.hidden_dim, dtype=self.dtype, kernel_init=torch_default_kernel_init, use_bias=True,
                      bias_init=torch_default_bias_init(c), name="input_proj")(features)
        query_embed = self.param("query_embed", nn.initializers.normal(1.0), (self.num_queries, self.hidden_dim))
        if self.num_query_groups < 1:
            raise ValueError(f"num_query_groups must be >= 1, got {self.num_query_groups}")
        if self.num_query_groups > 1 and (train or self.is_initializing()):  # evaluation never needs them
            groups = self.param("group_query_embed", nn.initializers.normal(1.0),
                                (self.num_query_groups - 1, self.num_queries, self.hidden_dim))
            if train:
                query_embed = jnp.concatenate([query_embed[None], groups])  # [G, N, D]
        transformer = Transformer(self.num_heads, self.num_encoder_layers, self.num_decoder_layers,
                                  self.dim_feedforward, self.dropout, self.pre_norm, self.dtype, name="transformer")
        hs, attn, memory = transformer(src, mask, query_embed, pos.astype(self.dtype), train)

        logits = dense_2d(torch_linear(self.num_classes + 1, self.hidden_dim, "class_embed", self.dtype,
                                       xavier_weight=False), hs).astype(jnp.float32)  # [L, B, N, C + 1]
        boxes = jax.nn.sigmoid(MLP(self.hidden_dim, 4, 3, self.dtype, name="bbox_embed")(hs).astype(jnp.float32))
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": logits[i], "pred_boxes": boxes[i]} for i in range(len(hs) - 1)]
        if self.encoder_aux_loss and (train or self.is_initializing()):
            out["enc_outputs"] = EncoderTokenHeads(self.num_classes, self.dtype, name="enc_heads")(memory, mask)
        for i in self.backbone_aux_stages if stage_heads else ():  # the token heads on stage i, own projection
            f = stages[i - 1]
            bi, hi, wi, ci = f.shape
            tokens = Conv1x1(self.hidden_dim, dtype=self.dtype, kernel_init=torch_default_kernel_init, use_bias=True,
                             bias_init=torch_default_bias_init(ci), name=f"stage{i}_proj")(f)
            tokens = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name=f"stage{i}_norm")(
                tokens.reshape(bi, hi * wi, -1))
            out[f"stage{i}_outputs"] = EncoderTokenHeads(self.num_classes, self.dtype, name=f"stage{i}_heads")(
                tokens.astype(self.dtype), downsample_mask(pixel_mask, (hi, wi)))
        if return_attention:
            out["cross_attention"] = attn[-1].reshape(b, -1, h, w)
            out["feature_mask"] = mask
        return out


class EncoderTokenHeads(nn.Module):
    """A class and a box for every encoder token (training-only heads, see `DETR.encoder_aux_loss`).

    The box centre is the token's cell centre plus an offset in cells (memory has no absolute position: the
    encodings only enter attention queries and keys), the size a sigmoid fraction of the image.
    """
    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, memory, mask):
        """memory [B, h * w, D], mask bool [B, h, w] (True on real positions) -> dict, see `DETR.__call__`."""
        d = memory.shape[-1]
        logits = dense_2d(torch_linear(self.num_classes + 1, d, "class_embed", self.dtype, xavier_weight=False),
                          memory).astype(jnp.float32)
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


def parameter_groups(params, train_stem: bool = False) -> Dict:
    """Label each parameter for the optimizer, as the official training does.

    Returns a pytree like `params` with "frozen" (ResNet stem and stage 1: the official `train_backbone`
    freezes everything but layer2-4; none with `train_stem`, see `DETR`), "backbone" (the other backbone
    parameters, trained with the backbone learning rate) or "transformer" (everything else). Batch-norm
    statistics are not params (collection "frozen").
    """
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))

    def label(path):
        if path[0] != "backbone":
            return "transformer"
        return "backbone" if train_stem or path[1].split("_")[0] in ("layer2", "layer3", "layer4") else "frozen"

    return flax.traverse_util.unflatten_dict({k: label(k) for k in flat})
