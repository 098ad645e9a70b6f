"""DETR: backbone -> 1x1 projection -> transformer -> class and box heads (official `models/detr.py`)."""

from typing import Any, Dict

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from detr_jax.models.backbone import Conv1x1, ResNet, downsample_mask
from detr_jax.models.position_encoding import LearnedPositionEncoding, sine_position_encoding
from detr_jax.models.transformer import Transformer, dense_2d, torch_default_bias_init, torch_linear

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
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, pixel_mask=None, train: bool = False, return_attention: bool = False):
        """Predict boxes and classes.

        Args:
            images: float32 [B, H, W, 3], already normalised, zero-padded bottom/right.
            pixel_mask: bool [B, H, W], True on real pixels; None means no padding.
            train: enables dropout (needs a "dropout" rng).
            return_attention: also return the last decoder layer's cross-attention.
        Returns:
            "pred_logits": [B, N, num_classes + 1]; "pred_boxes": [B, N, 4] cxcywh normalised by the unpadded
            image size; "aux_outputs": list of L-1 dicts with the same keys, first decoder layer first (when
            aux_loss); with return_attention, "cross_attention": [B, N, h, w] and "feature_mask": bool [B, h, w].
        """
        if pixel_mask is None:
            pixel_mask = jnp.ones(images.shape[:3], bool)
        # The stem and stage 1 are frozen as in the official DETR (see `parameter_groups`): no gradient into them.
        features = ResNet(self.backbone_depth, self.dilation, self.dtype, freeze_stem_and_layer1=True, name="backbone")(
            images.astype(self.dtype), pixel_mask if self.padding_invariant else None)
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
        hs, attn = Transformer(self.num_heads, self.num_encoder_layers, self.num_decoder_layers, self.dim_feedforward,
                                                      self.dropout, self.pre_norm, self.dtype, name="transformer")(
                                                              src, mask, query_embed, pos.astype(self.dtype), train)

        logits = dense_2d(torch_linear(self.num_classes + 1, self.hidden_dim, "class_embed", self.dtype,
                                       xavier_weight=False), hs).astype(jnp.float32)  # [L, B, N, C + 1]
        boxes = jax.nn.sigmoid(MLP(self.hidden_dim, 4, 3, self.dtype, name="bbox_embed")(hs).astype(jnp.float32))
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": logits[i], "pred_boxes": boxes[i]} for i in range(len(hs) - 1)]
        if return_attention:
            out["cross_attention"] = attn[-1].reshape(b, self.num_queries, h, w)
            out["feature_mask"] = mask
        return out


def parameter_groups(params) -> Dict:
    """Label each parameter for the optimizer, as the official training does.

    Returns a pytree like `params` with "frozen" (ResNet stem and stage 1: the official `train_backbone`
    freezes everything but layer2-4), "backbone" (stages 2-4, trained with the backbone learning rate) or
    "transformer" (everything else). Batch-norm statistics are not params (collection "frozen").
    """
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))

    def label(path):
        if path[0] != "backbone":
            return "transformer"
        return "backbone" if path[1].split("_")[0] in ("layer2", "layer3", "layer4") else "frozen"

    return flax.traverse_util.unflatten_dict({k: label(k) for k in flat})
