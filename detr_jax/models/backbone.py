"""ResNet backbone with frozen batch norm, as DETR uses it (torchvision v1.5 layout, NHWC).

The layout (stride on the 3x3 conv of a bottleneck, `downsample` on the first block of a stage) and the
parameter names follow torchvision's ResNet so that official DETR and torchvision checkpoints convert
one-to-one (see `detr_jax.weights.official`). Convolutions are `layers.Conv2d`, torch's `nn.Conv2d`; how it runs fast is
its business (`detr_jax.models.layers`).
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from detr_jax.models.layers import Conv2d, kaiming_normal_fan_out, max_pool
from detr_jax.ops.interpolate import nearest_index

# depth -> (block type, blocks per stage)
RESNET_SPECS = {
        18: ("basic", (2, 2, 2, 2)),
        34: ("basic", (3, 4, 6, 3)),
        50: ("bottleneck", (3, 4, 6, 3)),
        101: ("bottleneck", (3, 4, 23, 3)),
        152: ("bottleneck", (3, 8, 36, 3)),
}
FROZEN_COLLECTION = "frozen"  # batch-norm statistics and affine: constants, never seen by an optimizer


def resnet_out_channels(depth: int) -> int:
    """Channels of the last stage of a ResNet of this depth (512 basic, 2048 bottleneck)."""
    return 512 if RESNET_SPECS[depth][0] == "basic" else 2048


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics and affine, as DETR's FrozenBatchNorm2d (eps 1e-5).

    All four arrays live in the "frozen" collection, so they are constants for jax.grad and optax.
    """
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):  # [B, H, W, C] -> [B, H, W, C]
        c = x.shape[-1]
        scale = self.variable(FROZEN_COLLECTION, "scale", lambda: jnp.ones((c,), jnp.float32)).value
        bias = self.variable(FROZEN_COLLECTION, "bias", lambda: jnp.zeros((c,), jnp.float32)).value
        mean = self.variable(FROZEN_COLLECTION, "mean", lambda: jnp.zeros((c,), jnp.float32)).value
        var = self.variable(FROZEN_COLLECTION, "var", lambda: jnp.ones((c,), jnp.float32)).value
        # Same algebra and order as the official code: fold into one scale and shift.
        s = scale * jnp.reciprocal(jnp.sqrt(var + self.eps))
        b = bias - mean * s
        return x * s.astype(x.dtype) + b.astype(x.dtype)


class MaskedGroupNorm(nn.Module):
    """GroupNorm (32 groups, eps 1e-5, learned scale and bias) whose statistics skip padded pixels.

    An option for training a backbone from scratch (`DETR.backbone_norm="group"`; there are no pretrained
    statistics to freeze). With a pixel mask the mean and variance are taken over real pixels only, so padding
    does not change an image's features; without one, over the whole map (as torch's GroupNorm).
    """
    num_groups: int = 32
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x, pixel_mask=None):  # [B, H, W, C], bool [B, H', W'] -> [B, H, W, C]
        b, h, w, c = x.shape
        g = min(self.num_groups, c)
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        xg = x.astype(jnp.float32).reshape(b, h, w, g, c // g)
        if pixel_mask is None:
            m = jnp.ones((b, h, w, 1, 1), jnp.float32)
        else:
            m = downsample_mask(pixel_mask, (h, w))[..., None, None].astype(jnp.float32)
        count = jnp.maximum(m.sum(axis=(1, 2, 4), keepdims=True) * (c // g), 1.0)
        mean = (xg * m).sum(axis=(1, 2, 4), keepdims=True) / count
        var = (jnp.square(xg - mean) * m).sum(axis=(1, 2, 4), keepdims=True) / count
        y = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        return (y * scale + bias).astype(x.dtype)


class MaskedBatchNorm(nn.Module):
    """BatchNorm (eps 1e-5, learned scale and bias) trained on batch statistics, evaluated as a frozen batch norm.

    An option for training a backbone from scratch (`DETR.backbone_norm="batch"`). With `train`, the mean and
    (biased) variance are taken over the batch and the spatial positions, over real pixels only when a pixel mask
    is given; under `jit` on a batch sharded over devices and hosts that mean is global (synchronised batch
    norm, with no extra code). The running statistics, updated as torch's (momentum 0.1, unbiased variance), live
    in the "frozen" collection under the names FrozenBatchNorm uses ("mean", "var"): the training step applies
    the model with that collection mutable; evaluation reads them, so the evaluated model computes exactly what
    a `FrozenBatchNorm` with these four arrays computes.
    """
    momentum: float = 0.1
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x, pixel_mask=None, train: bool = False):  # [B, H, W, C], bool [B, H', W'] -> [B, H, W, C]
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        running_mean = self.variable(FROZEN_COLLECTION, "mean", lambda: jnp.zeros((c,), jnp.float32))
        running_var = self.variable(FROZEN_COLLECTION, "var", lambda: jnp.ones((c,), jnp.float32))
        if not train:
            mean, var = running_mean.value, running_var.value
        else:
            xf = x.astype(jnp.float32)
            m = (jnp.ones(x.shape[:3], jnp.float32) if pixel_mask is None
                 else downsample_mask(pixel_mask, x.shape[1:3]).astype(jnp.float32))[..., None]  # [B, H, W, 1]
            count = jnp.maximum(m.sum(), 1.0)
            mean = (xf * m).sum(axis=(0, 1, 2)) / count
            var = (jnp.square(xf - mean) * m).sum(axis=(0, 1, 2)) / count
            if not self.is_initializing():
                unbiased = var * count / jnp.maximum(count - 1.0, 1.0)
                mean_, var_ = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(unbiased)
                running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean_
                running_var.value = (1 - self.momentum) * running_var.value + self.momentum * var_
        s = scale * jax.lax.rsqrt(var + self.eps)
        return (x.astype(jnp.float32) * s + (bias - mean * s)).astype(x.dtype)


BACKBONE_NORMS = ("frozen_bn", "group", "batch")


def _norm(kind: str, name: str, train: bool = False):
    """The backbone's normalisation layer: "frozen_bn" (official), "group" (MaskedGroupNorm) or "batch"
    (MaskedBatchNorm, batch statistics when `train`)."""
    if kind == "frozen_bn":
        return lambda x, pixel_mask=None: FrozenBatchNorm(name=name)(x)
    if kind == "group":
        return lambda x, pixel_mask=None: MaskedGroupNorm(name=name)(x, pixel_mask)
    return lambda x, pixel_mask=None: MaskedBatchNorm(name=name)(x, pixel_mask, train)  # "batch"


def conv3x3(planes: int, stride: int = 1, dilation: int = 1, name=None, dtype=jnp.float32):
    """torchvision's `conv3x3`: 3x3, padding = dilation, no bias; kaiming fan-out init as torchvision's ResNet."""
    return Conv2d(planes, 3, stride, padding=dilation, dilation=dilation, use_bias=False,
                  kernel_init=kaiming_normal_fan_out, dtype=dtype, name=name)


def conv1x1(planes: int, stride: int = 1, name=None, dtype=jnp.float32):
    """torchvision's `conv1x1`: no padding, no bias; kaiming fan-out init as torchvision's ResNet."""
    return Conv2d(planes, 1, stride, use_bias=False, kernel_init=kaiming_normal_fan_out, dtype=dtype, name=name)


class BasicBlock(nn.Module):
    planes: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    dtype: jnp.dtype = jnp.float32
    norm: str = "frozen_bn"

    @nn.compact
    def __call__(self, x, pixel_mask=None, train: bool = False):  # [B, H, W, Cin] -> [B, H/s, W/s, planes]
        norm = lambda name: _norm(self.norm, name, train)  # noqa: E731
        identity = x
        out = conv3x3(self.planes, self.stride, name="conv1", dtype=self.dtype)(x)
        out = mask_padding(nn.relu(norm("bn1")(out, pixel_mask)), pixel_mask)
        out = norm("bn2")(conv3x3(self.planes, name="conv2", dtype=self.dtype)(out), pixel_mask)
        if self.downsample:
            identity = norm("downsample_bn")(
                    conv1x1(self.planes, self.stride, name="downsample_conv", dtype=self.dtype)(x), pixel_mask)
        return mask_padding(nn.relu(out + identity), pixel_mask)


class Bottleneck(nn.Module):
    planes: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    dtype: jnp.dtype = jnp.float32
    norm: str = "frozen_bn"

    @nn.compact
    def __call__(self, x, pixel_mask=None, train: bool = False):  # [B, H, W, Cin] -> [B, H/s, W/s, 4 * planes]
        norm = lambda name: _norm(self.norm, name, train)  # noqa: E731
        identity = x
        out = norm("bn1")(conv1x1(self.planes, name="conv1", dtype=self.dtype)(x), pixel_mask)
        out = mask_padding(nn.relu(out), pixel_mask)
        # v1.5: the stride sits on the 3x3 conv, not on the first 1x1.
        out = norm("bn2")(
                conv3x3(self.planes, self.stride, self.dilation, name="conv2", dtype=self.dtype)(out), pixel_mask)
        out = mask_padding(nn.relu(out), pixel_mask)
        out = norm("bn3")(conv1x1(self.planes * 4, name="conv3", dtype=self.dtype)(out), pixel_mask)
        if self.downsample:
            identity = norm("downsample_bn")(
                    conv1x1(self.planes * 4, self.stride, name="downsample_conv", dtype=self.dtype)(x), pixel_mask)
        return mask_padding(nn.relu(out + identity), pixel_mask)


class ResNet(nn.Module):
    """ResNet body returning the last stage's features (output stride 32, or 16 with `dilation`).

    Attributes:
        depth: 18, 34, 50, 101 (or 152).
        dilation: DC5, replace the stride of the last stage by a dilation of 2 (bottleneck depths only),
            as torchvision's `replace_stride_with_dilation=[False, False, True]`.
        freeze_stem_and_layer1: no gradient flows into the stem and stage 1 (a `stop_gradient` on the output of
            stage 1), as in the official DETR, whose backbone has `requires_grad=False` there; DETR sets it, and
            `parameter_groups` never updates those parameters anyway. Saves their backward pass, the costliest
            part of the backbone's (the largest feature maps).
        norm: "frozen_bn" (official, the statistics of a pretrained model), "group" (`MaskedGroupNorm`) or "batch"
            (`MaskedBatchNorm`), both for training from scratch; their parameters keep the batch-norm names, e.g.
            "bn1/scale".
        return_stages: also return every stage's output (for `DETR.backbone_aux_stages`).
        remat: recompute each residual block's activations in the backward pass instead of keeping them
            (`jax.checkpoint`); the same outputs and gradients, less memory for one more forward of the backbone.
    """
    depth: int = 50
    dilation: bool = False
    dtype: jnp.dtype = jnp.float32
    freeze_stem_and_layer1: bool = False
    norm: str = "frozen_bn"
    return_stages: bool = False
    remat: bool = False

    @nn.compact
    def __call__(self, x, pixel_mask=None, train: bool = False):
        # [B, H, W, 3], bool [B, H, W] -> [B, H/32, W/32, C] (/16 with dilation); train: batch statistics ("batch")
        # With return_stages: (that, [the outputs of stages 1..4]), stage 3 being [B, H/16, W/16, C/2].
        norm = lambda name: _norm(self.norm, name, train)  # noqa: E731
        kind, stages = RESNET_SPECS[self.depth]  # config.check_config: a known depth, DC5 only with bottlenecks
        block_cls = BasicBlock if kind == "basic" else Bottleneck
        if self.remat:  # `train` (argument 3, counting the module) decides the norm's mode: static
            block_cls = nn.remat(block_cls, static_argnums=(3,))
        expansion = 1 if kind == "basic" else 4

        x = Conv2d(64, 7, 2, padding=3, use_bias=False, kernel_init=kaiming_normal_fan_out, dtype=self.dtype,
                   name="conv1")(x)
        x = mask_padding(nn.relu(norm("bn1")(x, pixel_mask)), pixel_mask)
        # Activations are >= 0 here, so the zeros of masked padding never win the max (like -inf padding).
        x = mask_padding(max_pool(x, 3, 2, 1), pixel_mask)

        in_channels, current_dilation = 64, 1
        stage_outputs = []
        for i, (num_blocks, planes) in enumerate(zip(stages, (64, 128, 256, 512))):
            stride = 1 if i == 0 else 2
            previous_dilation = current_dilation
            if i == 3 and self.dilation:
                current_dilation, stride = current_dilation * stride, 1
            for j in range(num_blocks):
                first = j == 0
                x = block_cls(
                        planes,
                        stride=stride if first else 1,
                        # torchvision: the first block of a dilated stage keeps the previous dilation.
                        dilation=previous_dilation if first else current_dilation,
                        downsample=first and (stride != 1 or in_channels != planes * expansion),
                        dtype=self.dtype,
                        norm=self.norm,
                        name=f"layer{i + 1}_{j}")(x, pixel_mask, train)
                in_channels = planes * expansion
            if i == 0 and self.freeze_stem_and_layer1:
                x = jax.lax.stop_gradient(x)
            stage_outputs.append(x)
        return (x, stage_outputs) if self.return_stages else x


def mask_padding(x, pixel_mask):
    """Zero `x` [B, h, w, C] where the padding mask (bool [B, H, W], True on real pixels) is padding; no-op for None."""
    if pixel_mask is None:
        return x
    return x * downsample_mask(pixel_mask, x.shape[1:3])[..., None].astype(x.dtype)


def downsample_mask(pixel_mask, out_hw: Sequence[int]):
    """Downsample a padding mask to a feature map exactly as torch's `F.interpolate(mode="nearest")`.

    Args:
        pixel_mask: bool [B, H, W], True on real pixels.
        out_hw: (h, w) of the feature map.
    Returns:
        bool [B, h, w], True on real positions.
    """
    in_h, in_w = pixel_mask.shape[1:3]
    rows, cols = nearest_index(in_h, out_hw[0]), nearest_index(in_w, out_hw[1])
    return pixel_mask[:, rows][:, :, cols]
