"""DETR for panoptic segmentation: a mask head on top of a DETR (official `models/segmentation.py`, `DETRsegm`).

Every decoder output of the last layer attends over the encoder's memory (`MHAttentionMap`, one attention map per
head, no values); the maps, concatenated to the projected backbone features, are upsampled by a small FPN-like
convolutional head (`MaskHeadSmallConv`) fed by ResNet stages 3, 2 and 1, to one mask logit map per query at
stride 4 of the padded batch. Parameter names follow the official state dict (`detr.*`, `bbox_attention.*`,
`mask_head.*`) so the released panoptic checkpoints convert one-to-one (`detr_jax.weights.official`). Layout NHWC.
"""

from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp

from detr_jax.models.detr import DETR, parameter_groups
from detr_jax.models.layers import Conv2d, Linear, xavier_uniform
from detr_jax.ops.interpolate import nearest_index

# The official MaskHeadSmallConv re-initialises every conv with kaiming_uniform_(a=1): U(+-sqrt(3 / fan_in)).
kaiming_uniform_a1 = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


class MHAttentionMap(nn.Module):
    """Multi-head attention weights of queries over a 2-D map, without values (official `MHAttentionMap`).

    Attributes:
        hidden_dim: width of the q and k projections ("q_linear", "k_linear": xavier weights, zero biases).
        num_heads: heads; each scales its logits by (hidden_dim / num_heads) ** -0.5.
    The official module has dropout on the weights, constructed with p=0 by `DETRsegm`: there is none here.
    """
    hidden_dim: int
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, q, k, mask=None):
        """q [B, N, Dq], k [B, h, w, Dk], mask bool [B, h, w] (True on real positions; None for all) ->
        float32 [B, N, num_heads, h, w], summing to 1 over (num_heads, h, w) together for each query."""
        def proj(name):
            return Linear(self.hidden_dim, kernel_init=xavier_uniform, bias_init=nn.initializers.zeros,
                          dtype=self.dtype, name=name)

        q = proj("q_linear")(q)  # [B, N, hidden]
        k = proj("k_linear")(k)  # [B, h, w, hidden]: the official applies k_linear's weights as a 1x1 conv
        head_dim = self.hidden_dim // self.num_heads
        qh = q.reshape(q.shape[:2] + (self.num_heads, head_dim))
        kh = k.reshape(k.shape[:3] + (self.num_heads, head_dim))
        normalize_fact = float(self.hidden_dim / self.num_heads) ** -0.5
        weights = jnp.einsum("bqnc,bhwnc->bqnhw", qh * normalize_fact, kh).astype(jnp.float32)
        if mask is not None:
            # -inf as the official masked_fill_: position (0, 0) is always real, so no row is all -inf.
            weights = jnp.where(mask[:, None, None], weights, -jnp.inf)
        # One softmax over heads and positions together (the official flattens (heads, h, w)).
        b, n = weights.shape[:2]
        return jax.nn.softmax(weights.reshape(b, n, -1), axis=-1).reshape(weights.shape)


def resize_nearest(x, out_hw):
    """torch's `F.interpolate(x, size=out_hw, mode="nearest")` on NHWC: x [B, H, W, C] -> [B, h, w, C].

    Source indices by `ops.interpolate.nearest_index`; an exact 2x upsampling (every step of the mask head on
    sizes divisible by 32) is a repeat.
    """
    def along(x, axis, n_out):
        n_in = x.shape[axis]
        if n_out == n_in:
            return x
        if n_out == 2 * n_in:
            return jnp.repeat(x, 2, axis=axis)
        return jnp.take(x, jnp.asarray(nearest_index(n_in, n_out)), axis=axis)

    return along(along(x, 1, out_hw[0]), 2, out_hw[1])


class SharedInputConv3x3(nn.Module):
    """`Conv2d(features, 3, padding=1)` on concat([shared, per_query], channels), shared broadcast over queries.

    The official mask head convolves [B * N, h, w, D + heads] with the projected features repeated for every
    query. A convolution is linear in its input channels, so the D shared channels are convolved once per image
    and only the attention-map channels once per query: the same parameters ("kernel" [3, 3, D + heads,
    features], "bias") and numbers (to float rounding), without N copies of the largest product (for DETR-R50,
    N = 100, D = 256, about 30x fewer multiply-adds in this layer).
    """
    features: int
    kernel_init: Any = kaiming_uniform_a1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, shared, per_query):
        """shared [B, h, w, D], per_query [B, N, h, w, K] -> [B, N, h, w, features]."""
        b, n, h, w, c_q = per_query.shape
        c_s = shared.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (3, 3, c_s + c_q, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        shared, per_query, kernel, bias = nn.dtypes.promote_dtype(shared, per_query, kernel, bias, dtype=self.dtype)

        def conv(x, k):
            return jax.lax.conv_general_dilated(x, k, (1, 1), [(1, 1), (1, 1)],
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))

        y_shared = conv(shared, kernel[:, :, :c_s])  # [B, h, w, F]
        y_query = conv(per_query.reshape(b * n, h, w, c_q), kernel[:, :, c_s:]).reshape(b, n, h, w, -1)
        return y_shared[:, None] + y_query + bias


class MaskHeadSmallConv(nn.Module):
    """The official FPN-like mask head: 3x3 convs with GroupNorm(8) and ReLU, upsampled x2 three times with
    1x1-adapted ResNet features added at each scale.

    Attributes:
        context_dim: the transformer width D; the layers narrow D + heads -> D/2 -> D/4 -> D/8 -> D/16 -> 1.
    Convolutions: "lay1".."lay5", "out_lay" (3x3, padding 1), "adapter1".."adapter3" (1x1), all kaiming-uniform
    (a=1) weights and zero biases; GroupNorms "gn1".."gn5" (eps 1e-5, statistics over padding too, as torch's).
    """
    context_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, bbox_mask, fpns):
        """Mask logits per query.

        Args:
            x: [B, h, w, D] the projected last backbone stage (DETR's `input_proj` output).
            bbox_mask: [B, N, heads, h, w] the attention maps of `MHAttentionMap`.
            fpns: [stage 3 [B, H/16, W/16, C3], stage 2 [B, H/8, W/8, C2], stage 1 [B, H/4, W/4, C1]].
        Returns:
            [B, N, H/4, W/4, 1] mask logits (the size of stage 1), in the compute dtype.
        """
        d = self.context_dim
        b, n = bbox_mask.shape[:2]
        inter_dims = [d // 2, d // 4, d // 8, d // 16]

        def conv3x3(features, name):
            return Conv2d(features, 3, padding=1, kernel_init=kaiming_uniform_a1, bias_init=nn.initializers.zeros,
                          dtype=self.dtype, name=name)

        def adapter(features, name):
            return Conv2d(features, 1, kernel_init=kaiming_uniform_a1, bias_init=nn.initializers.zeros,
                          dtype=self.dtype, name=name)

        def gn_relu(y, name):
            norm = nn.GroupNorm(num_groups=8, epsilon=1e-5, use_fast_variance=False, dtype=self.dtype, name=name)
            return nn.relu(norm(y))

        maps = jnp.moveaxis(bbox_mask, 2, -1).astype(self.dtype)  # [B, N, h, w, heads]
        y = SharedInputConv3x3(d + maps.shape[-1], dtype=self.dtype, name="lay1")(x, maps)  # [B, N, h, w, D + heads]
        y = gn_relu(y.reshape((b * n,) + y.shape[2:]), "gn1")  # [B * N, h, w, D + heads]
        y = gn_relu(conv3x3(inter_dims[0], "lay2")(y), "gn2")
        for i, fpn in enumerate(fpns):
            # The adapter runs once per image; the official repeats its output for every query (`_expand`).
            cur_fpn = adapter(inter_dims[i], f"adapter{i + 1}")(fpn)  # [B, H', W', C]
            y = resize_nearest(y, cur_fpn.shape[1:3])
            y = (y.reshape((b, n) + y.shape[1:]) + cur_fpn[:, None]).reshape((b * n,) + y.shape[1:])
            y = gn_relu(conv3x3(inter_dims[i + 1], f"lay{i + 3}")(y), f"gn{i + 3}")
        y = conv3x3(1, "out_lay")(y)  # [B * N, H/4, W/4, 1]
        return y.reshape((b, n) + y.shape[1:])


class DETRsegm(nn.Module):
    """DETR with the panoptic mask head (official `DETRsegm`).

    Attributes:
        detr: the detector; its parameters are "detr/..." (the official `detr.*` keys). Its backbone must be a
            ResNet whose stages 1-3 feed the mask head (the released models: ResNet-50/101, with or without DC5).
        freeze_detr: the official `--frozen_weights` training: the detector gets no gradient, only
            "bbox_attention" and "mask_head" learn (`stop_gradient` on everything DETR returns; pair it with
            `segm_parameter_groups(..., freeze_detr=True)` so the optimizer does not decay the detector either).
    Submodules "bbox_attention" (`MHAttentionMap`, width and heads of the transformer) and "mask_head"
    (`MaskHeadSmallConv`).
    """
    detr: DETR
    freeze_detr: bool = False

    @property
    def detector(self) -> DETR:
        """The DETR inside."""
        return self.detr

    def with_detector(self, **changes) -> "DETRsegm":
        """A copy whose detector's fields are changed (e.g. `padding_invariant=True`)."""
        return self.clone(detr=self.detr.clone(**changes))

    @nn.compact
    def __call__(self, images, pixel_mask=None, train: bool = False, return_features: bool = False
                 ) -> Dict[str, Any]:
        """Predict classes, boxes and masks.

        Args:
            images: float32 [B, H, W, 3], already normalised, zero-padded bottom/right.
            pixel_mask: bool [B, H, W], True on real pixels; None means no padding.
            train: enables dropout in the detector (needs a "dropout" rng).
            return_features: also return the detector's intermediate features ("features", see `DETR`).
        Returns:
            DETR's outputs ("pred_logits" [B, N, C + 1], "pred_boxes" [B, N, 4] cxcywh normalised, "aux_outputs"
            when aux_loss) and "pred_masks" float32 [B, N, H4, W4], mask logits of the last decoder layer's
            queries over the padded batch at stride 4 (H4, W4: the size of ResNet stage 1, ceil(H / 4) ...).
        """
        detr = self.detr
        out = detr(images, pixel_mask, train=train, return_features=True)
        if self.freeze_detr:
            out = jax.lax.stop_gradient(out)
        features = out["features"]
        src, mask, hs = features["src"], features["mask"], features["hs"]
        b, h, w, d = src.shape
        memory = features["memory"].reshape(b, h, w, d)
        bbox_mask = MHAttentionMap(d, detr.num_heads, dtype=detr.dtype, name="bbox_attention")(hs[-1], memory, mask)
        stages = features["stages"]
        masks = MaskHeadSmallConv(d, dtype=detr.dtype, name="mask_head")(src, bbox_mask,
                                                                          [stages[2], stages[1], stages[0]])
        out["pred_masks"] = masks[..., 0].astype(jnp.float32)
        if not return_features:
            del out["features"]
        return out


def segm_parameter_groups(params, train_stem: bool = False, freeze_detr: bool = False) -> Dict:
    """`detr.parameter_groups` for a `DETRsegm` tree: the detector's labels under "detr" (all "frozen" with
    `freeze_detr`, the official `--frozen_weights`); "bbox_attention" and "mask_head" train with the
    transformer's learning rate."""
    def label(name, sub):
        if name != "detr":
            return jax.tree_util.tree_map(lambda _: "transformer", sub)
        if freeze_detr:
            return jax.tree_util.tree_map(lambda _: "frozen", sub)
        return parameter_groups(sub, train_stem)

    return {name: label(name, sub) for name, sub in params.items()}
