"""torch's Conv2d and Linear as flax layers, plus the kernel tricks that make them fast; fused attention.

The model files use `Conv2d` and `Linear` where torchvision's ResNet and the official DETR use `nn.Conv2d` and
`nn.Linear`. Each layer owns exactly the parameters of the flax layer it stands for (`nn.Conv`: "kernel"
[kh, kw, Cin, Cout] and "bias" [Cout]; `nn.Dense`: "kernel" [Cin, Cout] and "bias" [Cout]), created in the same
order with the same initialisers, so parameter trees, initial values and converted checkpoints are those of the
flax layers, and it computes the same numbers. Only the formulation differs, where another is faster on XLA:CPU
(BENCHMARKS.md, "CPU optimisation sweep"):

- a 1x1 convolution is one matrix product [B*H*W, Cin] x [Cin, Cout]: XLA:CPU turns the weight gradient of a
  1x1 `lax.conv` into a convolution whose window is the whole feature map (3-5x slower than the forward);
- the input gradient of a 3x3 stride-2 convolution is four stride-1 convolutions, one per parity of the input
  pixel (`conv3x3_stride2`), instead of XLA's convolution of the zero-dilated gradient (4x the work);
- a Linear layer on [..., Cin] is one 2-D product: its weight gradient is then one GEMM, which XLA:CPU runs as it
  is, while for a 3-D operand it first transposes it.

`formulations(...)` switches a trick back to the plain flax formulation while a model is traced (benchmarks,
tests). `fused_attention` runs DETR's masked attention through `jax.nn.dot_product_attention` (cuDNN's fused
kernel on GPUs); `transformer.MultiheadAttention` decides when (`attention_implementation`).
"""

import contextlib
import contextvars
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

# ---- initialisers ------------------------------------------------------------------------------------------
# torch.nn.Linear / Conv2d default weight init, kaiming_uniform(a=sqrt(5)), is U(+-1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
# torchvision's ResNet: kaiming_normal_(mode="fan_out", nonlinearity="relu") on every convolution.
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# The official Transformer._reset_parameters: xavier_uniform_ on every matrix.
xavier_uniform = nn.initializers.xavier_uniform()


def torch_default_bias_init(fan_in: int):
    """torch.nn.Linear / Conv2d default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / fan_in ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


# ---- the formulation switch --------------------------------------------------------------------------------
FORMULATIONS = {  # trick -> its formulations, the default (fastest on XLA:CPU) first
    "conv1x1": ("matmul", "dot_general", "conv"),  # 2-D product / 4-D dot_general / lax.conv (= nn.Conv)
    "conv3x3_stride2": ("split_input_grad", "conv"),  # conv3x3_stride2 / lax.conv with XLA's gradient
    "linear": ("matmul_2d", "dense"),  # 2-D product / dot_general on [..., Cin] (= nn.Dense)
    "max_pool": ("window_padding", "explicit_pad"),  # nn.max_pool padding=pairs / -inf jnp.pad, then "VALID"
}
_CHOICES = contextvars.ContextVar("detr_jax_layer_formulations", default=None)  # None: every default


@contextlib.contextmanager
def formulations(**choices: str):
    """Layers traced inside this context compute with the given formulations, e.g. `formulations(conv1x1="conv")`.

    Same parameters, same numbers (to float rounding); for benchmarks and tests. The choice is read when a model is
    traced: a jitted step traced inside the context keeps it after the context exits, and one already traced
    before it (a cached `jax.jit`) does not see it.
    """
    for trick, choice in choices.items():
        if trick not in FORMULATIONS:
            raise ValueError(f"formulations(): unknown trick {trick!r}; known: {sorted(FORMULATIONS)}")
        if choice not in FORMULATIONS[trick]:
            raise ValueError(f"formulations({trick}=...) must be one of {FORMULATIONS[trick]}, got {choice!r}")
    token = _CHOICES.set({**(_CHOICES.get() or {}), **choices})
    try:
        yield
    finally:
        _CHOICES.reset(token)


def formulation(trick: str) -> str:
    """The formulation of `trick` in force (see `formulations`)."""
    return (_CHOICES.get() or {}).get(trick, FORMULATIONS[trick][0])


# ---- Linear ------------------------------------------------------------------------------------------------
def linear(x, kernel, bias=None):
    """x @ kernel + bias over the last axis: x [..., Cin], kernel [Cin, Cout], bias [Cout] -> [..., Cout].

    Computed as one 2-D product [M, Cin] x [Cin, Cout] (see the module docstring); `nn.Dense`'s dot_general on the
    N-D input under `formulations(linear="dense")`.
    """
    if formulation("linear") == "dense":
        y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    else:
        y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel).reshape(x.shape[:-1] + kernel.shape[-1:])
    return y if bias is None else y + bias


class Linear(nn.Module):
    """torch.nn.Linear, as `nn.Dense(features)`: same "kernel" [Cin, features] and "bias" [features], same outputs.

    Initialisers default to torch's: `torch_default_kernel_init` and, with `bias_init=None`,
    `torch_default_bias_init(Cin)`.
    """
    features: int
    use_bias: bool = True
    kernel_init: Callable = torch_default_kernel_init
    bias_init: Optional[Callable] = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # [..., Cin] -> [..., features]
        cin = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (cin, self.features), jnp.float32)
        bias = None
        if self.use_bias:
            bias_init = self.bias_init if self.bias_init is not None else torch_default_bias_init(cin)
            bias = self.param("bias", bias_init, (self.features,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return linear(x, kernel, bias)


# ---- max pool ----------------------------------------------------------------------------------------------
def max_pool(x, window: int, stride: int, padding: int):
    """torch's `MaxPool2d(window, stride, padding)` on NHWC: `nn.max_pool` with explicit (padding, padding) pairs.

    Under `formulations(max_pool="explicit_pad")` the input is first padded with -inf (the value reduce_window
    pads with) and pooled "VALID": the same maximum over the same windows, bit for bit. The ONNX export uses it:
    jax2onnx 0.13's `nn.max_pool` plugin reads explicit padding pairs as "VALID" (a 49 x 74 map where torch has
    50 x 75), and its `lax.reduce_window` lowering makes a 4-D MaxPool window that onnxruntime refuses.
    """
    if formulation("max_pool") == "explicit_pad":
        p = padding
        x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=-jnp.inf)
        return nn.max_pool(x, window_shape=(window, window), strides=(stride, stride), padding="VALID")
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=[(padding, padding)] * 2)


# ---- Conv2d ------------------------------------------------------------------------------------------------
_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv3x3_s2(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (2, 2), [(1, 1), (1, 1)], dimension_numbers=_NHWC)


def _input_grad_3x3_s2(g, kernel, in_hw):
    """Gradient of `_conv3x3_s2` w.r.t. its input, split by input parity into four stride-1 convolutions.

    Input pixel (2a + p, 2b + q) receives kernel rows {1} (p = 0) or {2, 0} from gradient rows a, a + 1 (p = 1),
    and the same for columns: 1 + 2 + 2 + 4 = 9 taps in all, the forward's work. XLA's own transpose convolves the
    gradient dilated with zeros (lhs_dilation 2), 4x the work, on a slower Eigen path.
    """
    h, w = in_hw
    hh, hw = -(-h // 2), -(-w // 2)
    gp = jnp.pad(g, ((0, 0), (0, 1), (0, 1), (0, 0)))
    taps = ([1], [2, 0])
    phases = []
    for p in (0, 1):
        row = []
        for q in (0, 1):
            k = kernel[jnp.array(taps[p])][:, jnp.array(taps[q])]  # [kh, kw, Cin, Cout]
            out = jax.lax.conv_general_dilated(gp, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWOI", "NHWC"))
            row.append(jnp.pad(out[:, :hh, :hw], ((0, 0), (0, hh - min(hh, out.shape[1])),
                                                  (0, hw - min(hw, out.shape[2])), (0, 0))))
        phases.append(jnp.stack(row, axis=3))  # [B, hh, hw, 2 (q), Cin]
    dx = jnp.stack(phases, axis=2)  # [B, hh, 2 (p), hw, 2 (q), Cin]
    return dx.reshape(g.shape[0], 2 * hh, 2 * hw, -1)[:, :h, :w]


@jax.custom_vjp
def conv3x3_stride2(x, kernel):
    """3x3 convolution, stride 2, padding 1 (the strided convolution of a ResNet stage), NHWC / HWIO.

    Same forward as `lax.conv_general_dilated`; the input gradient is computed by `_input_grad_3x3_s2`.
    """
    return _conv3x3_s2(x, kernel)


def _conv3x3_s2_fwd(x, kernel):
    return _conv3x3_s2(x, kernel), (x, kernel)


def _conv3x3_s2_bwd(residuals, g):
    x, kernel = residuals
    dx = _input_grad_3x3_s2(g, kernel, x.shape[1:3]).astype(x.dtype)
    (dkernel,) = jax.vjp(lambda k: _conv3x3_s2(x, k), kernel)[1](g)
    return dx, dkernel


conv3x3_stride2.defvjp(_conv3x3_s2_fwd, _conv3x3_s2_bwd)


class Conv2d(nn.Module):
    """torch.nn.Conv2d on NHWC, as `nn.Conv(features, (k, k), strides=stride, padding=[(padding, padding)] * 2,
    kernel_dilation=dilation, use_bias=use_bias)`: same "kernel" [k, k, Cin, features] and "bias", same outputs.

    Initialisers default to torch's: `torch_default_kernel_init` and, with `bias_init=None`,
    `torch_default_bias_init(Cin * k * k)`. A 1x1 convolution without padding runs as a matrix product and a 3x3
    stride-2 one with padding 1 through `conv3x3_stride2` (module docstring; `formulations` switches them off).
    """
    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    use_bias: bool = True
    kernel_init: Callable = torch_default_kernel_init
    bias_init: Optional[Callable] = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        # [B, H, W, Cin] -> [B, H', W', features], H' = (H + 2 padding - dilation (k - 1) - 1) // stride + 1
        k, s, cin = self.kernel_size, self.stride, x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (k, k, cin, self.features), jnp.float32)
        bias = None
        if self.use_bias:
            bias_init = self.bias_init if self.bias_init is not None else torch_default_bias_init(cin * k * k)
            bias = self.param("bias", bias_init, (self.features,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if k == 1 and self.padding == 0 and formulation("conv1x1") != "conv":
            x = x[:, ::s, ::s]  # a 1x1 window at stride s reads every s-th pixel
            if formulation("conv1x1") == "matmul":
                # Flattened first: the weight gradient is then a 2-D product contracting the leading axis of both
                # operands, which XLA:CPU runs without transposing them (with the 4-D dot_general it materialises a
                # transposed copy of the gradient, fused with the batch-norm backward).
                y = jnp.dot(x.reshape(-1, cin), kernel[0, 0]).reshape(x.shape[:-1] + (self.features,))
            else:
                y = jax.lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())))
        elif ((k, s, self.padding, self.dilation) == (3, 2, 1, 1)
              and formulation("conv3x3_stride2") == "split_input_grad"):
            y = conv3x3_stride2(x, kernel)
        else:
            p, d = self.padding, self.dilation
            y = jax.lax.conv_general_dilated(x, kernel, (s, s), [(p, p), (p, p)], lhs_dilation=(1, 1),
                                             rhs_dilation=(d, d), dimension_numbers=_NHWC)
        return y if bias is None else y + bias


# ---- fused attention ---------------------------------------------------------------------------------------
ATTENTION_IMPLS = ("auto", "reference", "xla", "cudnn")


@functools.lru_cache(maxsize=None)
def cudnn_attention_available() -> bool:
    """Whether `jax.nn.dot_product_attention(implementation="cudnn")` accepts a small bfloat16 call here.

    Only traced (`jax.eval_shape`), which runs jax's checks of the platform, cuDNN version and GPU generation.
    """
    if jax.default_backend() != "gpu":
        return False
    q = jax.ShapeDtypeStruct((1, 16, 1, 32), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
    try:
        jax.eval_shape(lambda q, n: jax.nn.dot_product_attention(
            q, q, q, key_value_seq_lengths=n, implementation="cudnn"), q, lengths)
    except Exception:  # any refusal (no cuDNN, ROCm, an old GPU) means "not here"
        return False
    return True


def attention_implementation(requested: str, dtype, head_dim: int, dropout_active: bool) -> str:
    """The attention implementation `MultiheadAttention` runs: "reference", "xla" or "cudnn".

    "auto" is "cudnn" where cuDNN's fused kernel can run this attention exactly: a GPU with cuDNN attention,
    bfloat16 or float16 compute (cuDNN refuses float32), a head dim that is a multiple of 8 and at most 128, and no
    dropout on the attention weights (`dropout_active`: training with dropout > 0; the fused kernel has none);
    elsewhere (CPUs, float32, training with attention dropout) "reference", the explicit softmax. "xla" and
    "cudnn" are `fused_attention` with that implementation; they refuse `dropout_active`.
    """
    if requested not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {requested!r}")
    if requested == "auto":
        fused = (not dropout_active and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
                 and head_dim % 8 == 0 and head_dim <= 128 and cudnn_attention_available())
        return "cudnn" if fused else "reference"
    if requested != "reference" and dropout_active:
        raise ValueError(f"attention_impl={requested!r} has no dropout on the attention weights, but the model is "
                         "training with dropout > 0: use attention_impl='auto' or 'reference' (the explicit softmax "
                         "with dropout), or dropout=0")
    return requested


def fused_attention(q, k, v, key_mask=None, implementation: str = "xla"):
    """Softmax attention by `jax.nn.dot_product_attention`, equal to `transformer.masked_attention`'s output.

    Args:
        q: [B, Sq, H, hd], already scaled by hd ** -0.5 (so scale 1 here); k, v: [B, Sk, H, hd].
        key_mask: bool [B, Sk], True on keys that may be attended; None for all.
        implementation: "xla" or "cudnn" (cuDNN's fused flash-attention kernel, bfloat16/float16 only).
    Returns:
        [B, Sq, H, hd]. No attention weights and no dropout on them: the fused kernel has neither.

    The key mask goes in as per-image key counts (`key_value_seq_lengths`), the form cuDNN's kernel takes for
    padding (a boolean mask becomes a [B, 1, Sq, Sk] bias there, which it refuses or materialises). A count means
    "the first n keys are real", and DETR's mask is not such a prefix: bottom/right padding of a 2-D map, flattened
    row by row, leaves padded keys at the end of every row. So each image's real keys are moved to the front first,
    k and v by the same permutation (a stable sort on the mask). This is exact: attention is a sum over keys of
    weight x value, and permuting keys together with their values only reorders that sum; padded keys get weight
    exactly 0 in both (here they are cut off, in the reference exp(finfo.min - max) underflows to 0). An image with
    no real key (never in DETR: pixel (0, 0) is always real) gets uniform weights from "xla", as in the reference,
    and an undefined result from "cudnn".
    """
    if key_mask is None:
        return jax.nn.dot_product_attention(q, k, v, scale=1.0, implementation=implementation)
    order = jnp.argsort(jnp.logical_not(key_mask).astype(jnp.int32), axis=-1, stable=True)  # [B, Sk], real first
    k = jnp.take_along_axis(k, order[:, :, None, None], axis=1)
    v = jnp.take_along_axis(v, order[:, :, None, None], axis=1)
    lengths = key_mask.sum(axis=-1, dtype=jnp.int32)  # [B]
    return jax.nn.dot_product_attention(q, k, v, scale=1.0, key_value_seq_lengths=lengths,
                                        implementation=implementation)
