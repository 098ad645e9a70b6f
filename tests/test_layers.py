"""detr_jax.models.layers against flax's own layers and the reference attention.

`Conv2d` and `Linear` must have exactly the parameters of `nn.Conv` / `nn.Dense` (names, shapes, initial values:
checkpoint conversion depends on them) and compute the same outputs and gradients in every formulation;
`fused_attention` must equal `transformer.masked_attention` with DETR's bottom/right padding masks.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detr_jax.models.layers import (
    FORMULATIONS,
    Conv2d,
    Linear,
    attention_implementation,
    formulation,
    formulations,
    fused_attention,
    kaiming_normal_fan_out,
    torch_default_bias_init,
    torch_default_kernel_init,
)
from detr_jax.models.transformer import MultiheadAttention, Transformer, masked_attention

TOL = 1e-6  # float32 rounding: the formulations sum in other orders


def _flat(tree):
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def _assert_same_parameters(ours, flax_layer):
    a, b = _flat(ours), _flat(flax_layer)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=str(key))


def _assert_close(ours, ref, tol=TOL):
    """Largest difference within tol relative to the reference's largest magnitude (absolute for tiny ones)."""
    for x, y in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape
        scale = max(1.0, float(np.abs(y).max()))
        assert float(np.abs(x - y).max()) <= tol * scale, (float(np.abs(x - y).max()), scale)


def _outputs_and_grads(module, variables, x, seed=3):
    """Output, and the gradients w.r.t. the parameters and the input for a random cotangent."""
    y, vjp = jax.vjp(lambda p, x: module.apply({"params": p}, x), variables["params"], x)
    cotangent = jax.random.normal(jax.random.PRNGKey(seed), y.shape, y.dtype)
    return y, vjp(cotangent)


# ---- Conv2d ------------------------------------------------------------------------------------------------
CONV_CASES = [  # (kernel, stride, padding, dilation, use_bias, H, W)
    (1, 1, 0, 1, False, 7, 9),
    (1, 2, 0, 1, False, 7, 9),  # ResNet downsample: odd sizes
    (1, 2, 0, 1, False, 8, 6),
    (1, 1, 0, 1, True, 5, 4),  # input_proj
    (3, 2, 1, 1, False, 7, 9),  # the strided 3x3 of a ResNet stage: odd sizes
    (3, 2, 1, 1, False, 8, 10),
    (3, 2, 1, 1, False, 1, 3),
    (3, 2, 1, 1, True, 5, 6),
    (3, 1, 1, 1, False, 6, 5),
    (3, 1, 2, 2, False, 9, 7),  # DC5: dilation 2, padding 2
    (7, 2, 3, 1, False, 11, 13),  # the stem
]


@pytest.mark.parametrize("kernel, stride, padding, dilation, use_bias, h, w", CONV_CASES)
def test_conv2d_equals_nn_conv(kernel, stride, padding, dilation, use_bias, h, w):
    cin, cout = 5, 6
    x = jax.random.normal(jax.random.PRNGKey(0), (2, h, w, cin))
    ref = nn.Conv(cout, (kernel, kernel), strides=(stride, stride), padding=[(padding, padding)] * 2,
                  kernel_dilation=(dilation, dilation), use_bias=use_bias, kernel_init=torch_default_kernel_init,
                  bias_init=torch_default_bias_init(cin * kernel * kernel))
    ours = Conv2d(cout, kernel, stride, padding, dilation, use_bias)  # torch's initialisers by default
    ref_vars, our_vars = ref.init(jax.random.PRNGKey(1), x), ours.init(jax.random.PRNGKey(1), x)
    _assert_same_parameters(our_vars, ref_vars)
    y_ref, g_ref = _outputs_and_grads(ref, ref_vars, x)
    trick = "conv1x1" if kernel == 1 else "conv3x3_stride2"
    for choice in FORMULATIONS[trick]:
        with formulations(**{trick: choice}):
            y, g = _outputs_and_grads(ours, our_vars, x)
        assert y.shape == y_ref.shape
        _assert_close(y, y_ref)
        _assert_close(g, g_ref)


def test_conv2d_uses_the_fast_formulations_unless_switched_off():
    """The tricks run by default (no convolution in a 1x1 layer, the custom VJP on a 3x3 stride-2 one) and
    `formulations` switches them back to lax.conv."""
    x = jnp.zeros((1, 8, 8, 4))

    def primitives(module):
        variables = module.init(jax.random.PRNGKey(0), x)
        return str(jax.make_jaxpr(lambda v: module.apply(v, x))(variables))

    assert "conv_general_dilated" not in primitives(Conv2d(3, 1, 2, use_bias=False))
    assert "custom_vjp" in primitives(Conv2d(3, 3, 2, 1, use_bias=False))
    with formulations(conv1x1="conv", conv3x3_stride2="conv"):
        assert "conv_general_dilated" in primitives(Conv2d(3, 1, 2, use_bias=False))
        assert "custom_vjp" not in primitives(Conv2d(3, 3, 2, 1, use_bias=False))
    assert formulation("conv1x1") == "matmul"  # restored on exit


def test_conv2d_kernel_init_is_passed_through():
    x = jnp.zeros((1, 4, 4, 8))
    ours = Conv2d(16, 3, padding=1, use_bias=False, kernel_init=kaiming_normal_fan_out)
    ref = nn.Conv(16, (3, 3), padding=[(1, 1)] * 2, use_bias=False, kernel_init=kaiming_normal_fan_out)
    _assert_same_parameters(ours.init(jax.random.PRNGKey(4), x), ref.init(jax.random.PRNGKey(4), x))


# ---- Linear ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(6, 5), (2, 7, 5), (3, 2, 4, 5)])
@pytest.mark.parametrize("use_bias", [True, False])
def test_linear_equals_nn_dense(shape, use_bias):
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    ref = nn.Dense(3, use_bias=use_bias, kernel_init=torch_default_kernel_init,
                   bias_init=torch_default_bias_init(shape[-1]))
    ours = Linear(3, use_bias=use_bias)  # torch's initialisers by default
    ref_vars, our_vars = ref.init(jax.random.PRNGKey(1), x), ours.init(jax.random.PRNGKey(1), x)
    _assert_same_parameters(our_vars, ref_vars)
    y_ref, g_ref = _outputs_and_grads(ref, ref_vars, x)
    for choice in FORMULATIONS["linear"]:
        with formulations(linear=choice):
            y, g = _outputs_and_grads(ours, our_vars, x)
        _assert_close(y, y_ref)
        _assert_close(g, g_ref)


def test_linear_is_one_2d_product():
    x = jnp.zeros((2, 7, 5))
    layer = Linear(3)
    variables = layer.init(jax.random.PRNGKey(0), x)
    jaxpr = jax.make_jaxpr(lambda v: layer.apply(v, x))(variables).jaxpr
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 1 and dots[0].invars[0].aval.shape == (14, 5)


def test_formulations_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown trick"):
        with formulations(conv5x5="fast"):
            pass
    with pytest.raises(ValueError, match="conv1x1"):
        with formulations(conv1x1="winograd"):
            pass


# ---- attention ---------------------------------------------------------------------------------------------
def _detr_mask(real_hw, map_hw=(5, 7)):
    """bool [B, h * w] flattened row by row, True on the real top-left real_hw[i] block of each image."""
    h, w = map_hw
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    return jnp.asarray(np.stack([((rows < rh) & (cols < rw)).reshape(-1) for rh, rw in real_hw]))


def _qkv(batch, sq, sk, heads=2, head_dim=8, seed=0):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(kq, (batch, sq, heads, head_dim)) * head_dim ** -0.5
    return q, jax.random.normal(kk, (batch, sk, heads, head_dim)), jax.random.normal(kv, (batch, sk, heads, head_dim))


MASKS = {
    "padded": [(5, 7), (3, 4), (1, 1), (4, 7), (5, 2)],  # real padding in all but the first image
    "fully padded image": [(3, 4), (0, 0)],  # never in DETR; the reference gives uniform weights
}


@pytest.mark.parametrize("sq", [35, 6])  # encoder self-attention, decoder cross-attention
@pytest.mark.parametrize("case", list(MASKS))
def test_jax_dot_product_attention_with_the_detr_mask_equals_the_reference(sq, case):
    key_mask = _detr_mask(MASKS[case])
    q, k, v = _qkv(key_mask.shape[0], sq, key_mask.shape[1])
    ref, _ = masked_attention(q, k, v, key_mask)
    out = jax.nn.dot_product_attention(q, k, v, mask=key_mask[:, None, None, :], scale=1.0, implementation="xla")
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("sq", [35, 6])
@pytest.mark.parametrize("case", list(MASKS))
def test_fused_attention_sorting_keys_equals_the_reference(sq, case):
    """The formulation cuDNN receives (real keys moved first, per-image key counts), run by XLA: outputs and
    gradients equal the reference."""
    key_mask = _detr_mask(MASKS[case])
    q, k, v = _qkv(key_mask.shape[0], sq, key_mask.shape[1])

    def run(fn):
        y, vjp = jax.vjp(fn, q, k, v)
        return y, vjp(jax.random.normal(jax.random.PRNGKey(7), y.shape))

    ref, ref_grads = run(lambda q, k, v: masked_attention(q, k, v, key_mask)[0])
    out, grads = run(lambda q, k, v: fused_attention(q, k, v, key_mask, "xla"))
    np.testing.assert_allclose(out, ref, atol=1e-5)
    for g, g_ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g, g_ref, atol=1e-5)


def test_sequence_lengths_alone_are_wrong_for_the_detr_mask():
    """Why the keys are sorted: a 2-D bottom/right mask is not a prefix of the flattened keys, so passing the
    key counts without moving the real keys first attends to padding (this test's masks are sensitive to it)."""
    key_mask = _detr_mask(MASKS["padded"])
    q, k, v = _qkv(key_mask.shape[0], 35, key_mask.shape[1])
    ref, _ = masked_attention(q, k, v, key_mask)
    lengths = key_mask.sum(-1, dtype=jnp.int32)
    naive = jax.nn.dot_product_attention(q, k, v, scale=1.0, key_value_seq_lengths=lengths, implementation="xla")
    assert float(jnp.abs(naive - ref).max()) > 1e-2


def test_fused_attention_without_mask_equals_the_reference():
    q, k, v = _qkv(2, 6, 9)
    np.testing.assert_allclose(fused_attention(q, k, v, None, "xla"), masked_attention(q, k, v)[0], atol=1e-5)


def test_multihead_attention_xla_equals_reference_with_weights():
    key_mask = _detr_mask(MASKS["padded"])
    b, s, d = key_mask.shape[0], key_mask.shape[1], 16
    query = jax.random.normal(jax.random.PRNGKey(0), (b, 6, d))
    memory = jax.random.normal(jax.random.PRNGKey(1), (b, s, d))
    ref = MultiheadAttention(4, attention_impl="reference")
    variables = ref.init(jax.random.PRNGKey(2), query, memory, memory, key_mask)
    _assert_same_parameters(MultiheadAttention(4, attention_impl="xla").init(jax.random.PRNGKey(2), query, memory,
                                                                              memory, key_mask), variables)
    out_ref, w_ref = ref.apply(variables, query, memory, memory, key_mask, return_weights=True)
    out, w = MultiheadAttention(4, attention_impl="xla").apply(variables, query, memory, memory, key_mask,
                                                               return_weights=True)
    np.testing.assert_allclose(out, out_ref, atol=1e-5)
    np.testing.assert_allclose(w, w_ref, atol=1e-6)
    assert not np.asarray(w)[~np.broadcast_to(np.asarray(key_mask)[:, None], w.shape)].any()


def test_transformer_xla_attention_equals_reference():
    b, h, w, d = 3, 4, 5, 16
    mask = np.ones((b, h, w), bool)
    mask[1, 3:] = False
    mask[2, 2:] = False
    mask[2, :, 3:] = False
    src, pos = jax.random.normal(jax.random.PRNGKey(0), (2, b, h, w, d))
    queries = jax.random.normal(jax.random.PRNGKey(1), (6, d))
    args = (src, jnp.asarray(mask), queries, pos)
    ref = Transformer(4, 2, 2, 32, dropout=0.1, attention_impl="reference")
    variables = ref.init(jax.random.PRNGKey(2), *args)
    outputs_ref = ref.apply(variables, *args)
    outputs = Transformer(4, 2, 2, 32, dropout=0.1, attention_impl="xla").apply(variables, *args)
    for x, y in zip(outputs, outputs_ref):  # hs, cross-attention weights, memory
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_attention_implementation_choice():
    on_cpu = jax.default_backend() == "cpu"
    if on_cpu:  # today's math on CPUs, whatever the dtype
        assert attention_implementation("auto", jnp.bfloat16, 32, dropout_active=False) == "reference"
    assert attention_implementation("auto", jnp.float32, 32, dropout_active=False) == "reference"  # cuDNN: no f32
    assert attention_implementation("auto", jnp.bfloat16, 32, dropout_active=True) == "reference"
    assert attention_implementation("xla", jnp.float32, 32, dropout_active=False) == "xla"
    with pytest.raises(ValueError, match="dropout"):
        attention_implementation("cudnn", jnp.bfloat16, 32, dropout_active=True)
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        attention_implementation("flash", jnp.float32, 32, dropout_active=False)


def test_fused_attention_refuses_attention_dropout_in_training():
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 8))
    attn = MultiheadAttention(2, dropout=0.1, attention_impl="xla")
    variables = attn.init(jax.random.PRNGKey(1), x, x, x)
    attn.apply(variables, x, x, x)  # evaluation: no dropout, fine
    with pytest.raises(ValueError, match="no dropout on the attention weights"):
        attn.apply(variables, x, x, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
