"""Model pieces against the official PyTorch code, transcribed here with torch as the reference.

The full post-norm model with sine encodings is checked against the official outputs in test_convert.py;
these tests cover what that fixture does not: the mask downsampling on many sizes, the learned
encoding, the pre-norm layers, DC5, parameter groups and initialisation.
"""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from detr_jax.models.aids import DETRWithAids  # noqa: E402
from detr_jax.models.backbone import ResNet, downsample_mask  # noqa: E402
from detr_jax.models.detr import DETR, parameter_groups  # noqa: E402
from detr_jax.models.position_encoding import (  # noqa: E402
    LearnedPositionEncoding,
    sine_position_encoding,
)
from detr_jax.models.transformer import DecoderLayer, EncoderLayer  # noqa: E402
from detr_jax.training.state import training_parameter_groups  # noqa: E402
from detr_jax.weights.workdir import detector_variables  # noqa: E402


@pytest.mark.parametrize("in_hw, out_hw", [((200, 300), (7, 10)), ((97, 131), (4, 5)), ((800, 1201), (50, 76)),
                                           ((33, 17), (33, 17)), ((10, 10), (3, 7))])
def test_mask_downsampling_equals_torch_nearest(in_hw, out_hw):
    rng = np.random.default_rng(0)
    mask = rng.random((2,) + in_hw) > 0.3
    ref = F.interpolate(torch.from_numpy(mask)[None].float(), size=out_hw).to(torch.bool)[0].numpy()
    np.testing.assert_array_equal(np.asarray(downsample_mask(jnp.asarray(mask), out_hw)), ref)


def _official_sine(mask_pad, num_pos_feats, temperature=10000, scale=2 * math.pi):
    """models/position_encoding.py PositionEmbeddingSine.forward (normalize=True); mask True on padding."""
    not_mask = ~mask_pad
    y_embed = not_mask.cumsum(1, dtype=torch.float32)
    x_embed = not_mask.cumsum(2, dtype=torch.float32)
    eps = 1e-6
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3)  # NHWC (the official permutes to NCHW)


def test_sine_encoding_equals_official():
    mask = np.ones((2, 9, 13), bool)
    mask[0, 6:] = False
    mask[1, :, 10:] = False
    ref = _official_sine(torch.from_numpy(~mask), 32).numpy()
    np.testing.assert_allclose(np.asarray(sine_position_encoding(jnp.asarray(mask), 32)), ref, atol=1e-5)


def test_learned_encoding_equals_official():
    mod = LearnedPositionEncoding(num_pos_feats=8)
    mask = jnp.ones((2, 5, 7), bool)
    params = mod.init(jax.random.PRNGKey(0), mask)["params"]
    row, col = torch.tensor(np.asarray(params["row_embed"])), torch.tensor(np.asarray(params["col_embed"]))
    h, w = 5, 7
    x_emb, y_emb = col[torch.arange(w)], row[torch.arange(h)]
    ref = torch.cat([x_emb.unsqueeze(0).repeat(h, 1, 1), y_emb.unsqueeze(1).repeat(1, w, 1)], dim=-1)
    np.testing.assert_allclose(np.asarray(mod.apply({"params": params}, mask))[1], ref.numpy())
    with pytest.raises(ValueError, match="50x50"):
        mod.apply({"params": params}, jnp.ones((1, 51, 4), bool))


def _torch_mha(p, d, heads):
    mha = torch.nn.MultiheadAttention(d, heads, dropout=0.0)
    mha.in_proj_weight.data = torch.from_numpy(np.asarray(p["in_proj_kernel"]).T.copy())
    mha.in_proj_bias.data = torch.from_numpy(np.asarray(p["in_proj_bias"]).copy())
    mha.out_proj.weight.data = torch.from_numpy(np.asarray(p["out_proj"]["kernel"]).T.copy())
    mha.out_proj.bias.data = torch.from_numpy(np.asarray(p["out_proj"]["bias"]).copy())
    return mha


def _torch_linear(p):
    lin = torch.nn.Linear(*np.asarray(p["kernel"]).shape)
    lin.weight.data = torch.from_numpy(np.asarray(p["kernel"]).T.copy())
    lin.bias.data = torch.from_numpy(np.asarray(p["bias"]).copy())
    return lin


def _torch_norm(p):
    norm = torch.nn.LayerNorm(np.asarray(p["scale"]).shape[0])
    norm.weight.data = torch.from_numpy(np.asarray(p["scale"]).copy())
    norm.bias.data = torch.from_numpy(np.asarray(p["bias"]).copy())
    return norm


def _t(x):  # [B, S, D] jax -> [S, B, D] torch, the official layout
    return torch.from_numpy(np.asarray(x)).transpose(0, 1)


def _randomise(params, seed):
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("pre_norm", [True, False])
def test_encoder_layer_equals_official(pre_norm):
    b, s, d, heads = 2, 11, 16, 4
    rng = np.random.default_rng(1)
    src, pos = rng.standard_normal((2, b, s, d)).astype(np.float32)
    key_mask = np.ones((b, s), bool)
    key_mask[1, 7:] = False
    layer = EncoderLayer(heads, 24, 0.0, pre_norm)
    p = _randomise(layer.init(jax.random.PRNGKey(0), src, pos, key_mask, False)["params"], 1)
    out = layer.apply({"params": p}, src, pos, key_mask, False)

    attn = _torch_mha(p["self_attn"], d, heads)
    lin1, lin2 = _torch_linear(p["ffn"]["linear1"]), _torch_linear(p["ffn"]["linear2"])
    norm1, norm2 = _torch_norm(p["norm1"]), _torch_norm(p["norm2"])
    x, tpos, pad = _t(src), _t(pos), torch.from_numpy(~key_mask)
    with torch.no_grad():  # official TransformerEncoderLayer.forward_pre / forward_post
        if pre_norm:
            x2 = norm1(x)
            x = x + attn(x2 + tpos, x2 + tpos, value=x2, key_padding_mask=pad)[0]
            x = x + lin2(F.relu(lin1(norm2(x))))
        else:
            x = norm1(x + attn(x + tpos, x + tpos, value=x, key_padding_mask=pad)[0])
            x = norm2(x + lin2(F.relu(lin1(x))))
    np.testing.assert_allclose(np.asarray(out), x.transpose(0, 1).numpy(), atol=2e-5)


@pytest.mark.parametrize("pre_norm", [True, False])
def test_decoder_layer_equals_official(pre_norm):
    b, n, s, d, heads = 2, 5, 11, 16, 4
    rng = np.random.default_rng(2)
    tgt, query_pos = rng.standard_normal((2, b, n, d)).astype(np.float32)
    memory, pos = rng.standard_normal((2, b, s, d)).astype(np.float32)
    key_mask = np.ones((b, s), bool)
    key_mask[0, 9:] = False
    layer = DecoderLayer(heads, 24, 0.0, pre_norm)
    p = _randomise(layer.init(jax.random.PRNGKey(0), tgt, memory, pos, query_pos, key_mask, False)["params"], 2)
    out, _ = layer.apply({"params": p}, tgt, memory, pos, query_pos, key_mask, False)

    sa, ca = _torch_mha(p["self_attn"], d, heads), _torch_mha(p["multihead_attn"], d, heads)
    lin1, lin2 = _torch_linear(p["ffn"]["linear1"]), _torch_linear(p["ffn"]["linear2"])
    n1, n2, n3 = (_torch_norm(p[f"norm{i}"]) for i in (1, 2, 3))
    t, qp, mem, tpos, pad = _t(tgt), _t(query_pos), _t(memory), _t(pos), torch.from_numpy(~key_mask)
    with torch.no_grad():  # official TransformerDecoderLayer.forward_pre / forward_post
        if pre_norm:
            t2 = n1(t)
            t = t + sa(t2 + qp, t2 + qp, value=t2)[0]
            t2 = n2(t)
            t = t + ca(t2 + qp, mem + tpos, value=mem, key_padding_mask=pad)[0]
            t = t + lin2(F.relu(lin1(n3(t))))
        else:
            t = n1(t + sa(t + qp, t + qp, value=t)[0])
            t = n2(t + ca(t + qp, mem + tpos, value=mem, key_padding_mask=pad)[0])
            t = n3(t + lin2(F.relu(lin1(t))))
    np.testing.assert_allclose(np.asarray(out), t.transpose(0, 1).numpy(), atol=2e-5)


@pytest.mark.parametrize("depth, dilation, channels, stride", [(18, False, 512, 32), (34, False, 512, 32),
                                                               (50, False, 2048, 32), (50, True, 2048, 16)])
def test_backbone_output_stride(depth, dilation, channels, stride):
    shape = jax.eval_shape(lambda: ResNet(depth, dilation).init_with_output(
        jax.random.PRNGKey(0), jnp.zeros((1, 128, 96, 3)))[0])
    assert shape.shape == (1, 128 // stride, 96 // stride, channels)


def _tiny_detr(**kw):
    cfg = dict(num_classes=5, num_queries=6, hidden_dim=32, num_heads=4, num_encoder_layers=1,
               num_decoder_layers=2, dim_feedforward=48, backbone_depth=18)
    cfg.update(kw)
    return DETR(**cfg)


def test_parameter_groups_freeze_stem_and_stage1():
    model = _tiny_detr()
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))["params"]
    labels = flax.traverse_util.flatten_dict(parameter_groups(params), sep="/")
    assert labels["backbone/conv1/kernel"] == "frozen"
    assert labels["backbone/layer1_1/conv2/kernel"] == "frozen"
    assert labels["backbone/layer2_0/downsample_conv/kernel"] == "backbone"
    assert labels["backbone/layer4_1/conv2/kernel"] == "backbone"
    assert labels["transformer/decoder_norm/scale"] == "transformer"
    assert labels["class_embed/kernel"] == "transformer"
    assert set(labels.values()) == {"frozen", "backbone", "transformer"}


def test_initialisation_follows_official():
    """xavier on the fused in_proj (fan-in d, fan-out 3d), zero in_proj bias, N(0,1) queries."""
    d = 256
    model = _tiny_detr(hidden_dim=d, num_heads=8, num_queries=300)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))["params"]
    w = np.asarray(params["transformer"]["encoder_layers_0"]["self_attn"]["in_proj_kernel"])
    bound = math.sqrt(6 / (d + 3 * d))
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
    assert not np.asarray(params["transformer"]["encoder_layers_0"]["self_attn"]["in_proj_bias"]).any()
    q = np.asarray(params["query_embed"])
    assert abs(q.std() - 1.0) < 0.02 and abs(q.mean()) < 0.02


def test_dropout_only_in_training():
    model = _tiny_detr()
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 64, 64, 3))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    apply = jax.jit(model.apply, static_argnames="train")
    eval1 = apply(variables, x)["pred_logits"]
    eval2 = apply(variables, x)["pred_logits"]
    train = apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})["pred_logits"]
    np.testing.assert_array_equal(eval1, eval2)
    assert np.abs(np.asarray(train - eval1)).max() > 1e-3


def test_padding_mask_excludes_padded_keys():
    """Changing pixels under the padding changes nothing in the transformer (only the backbone sees them)."""
    model = _tiny_detr()
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 64, 96, 3))
    variables = model.init(jax.random.PRNGKey(0), x)
    mask = jnp.ones((1, 64, 96), bool).at[:, :, 64:].set(False)
    out = model.apply(variables, x, pixel_mask=mask, return_attention=True)
    attn = np.asarray(out["cross_attention"])  # [1, N, 2, 3]
    assert attn.shape == (1, 6, 2, 3)
    assert np.all(attn[..., 2] == 0) and np.allclose(attn.sum(axis=(2, 3)), 1, atol=1e-5)


@pytest.mark.parametrize("depth, dilation, norm", [(18, False, "frozen_bn"), (50, True, "frozen_bn"),
                                                   (18, False, "group"), (18, False, "batch")])
def test_padding_invariant_backbone(depth, dilation, norm):
    """With padding_invariant, an image padded into a bigger canvas gives the outputs of the image alone;
    without it (the official behaviour), padding leaks into the border features and changes them."""
    kw = dict(backbone_depth=depth, dilation=dilation, backbone_norm=norm)
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 72, 104, 3))  # not a multiple of the stride
    canvas = jnp.zeros((1, 128, 160, 3)).at[:, :72, :104].set(x)
    mask = jnp.zeros((1, 128, 160), bool).at[:, :72, :104].set(True)
    variables = jax.jit(_tiny_detr(**kw).init)(jax.random.PRNGKey(0), canvas)
    for invariant, expect_equal in ((True, True), (False, False)):
        apply = jax.jit(_tiny_detr(padding_invariant=invariant, **kw).apply)
        alone = apply(variables, x, pixel_mask=jnp.ones((1, 72, 104), bool))["pred_boxes"]
        padded = apply(variables, canvas, pixel_mask=mask)["pred_boxes"]
        diff = float(np.abs(np.asarray(alone - padded)).max())
        assert (diff < 1e-5) == expect_equal, (invariant, diff)


def test_parameter_groups_train_stem():
    model = _tiny_detr(train_stem=True)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))["params"]
    labels = flax.traverse_util.flatten_dict(parameter_groups(params, train_stem=True), sep="/")
    assert labels["backbone/conv1/kernel"] == "backbone"
    assert labels["backbone/layer1_1/conv2/kernel"] == "backbone"
    assert set(labels.values()) == {"backbone", "transformer"}


def test_train_stem_lets_the_gradient_reach_the_stem():
    images = jax.random.normal(jax.random.PRNGKey(1), (1, 64, 64, 3))
    variables = jax.jit(_tiny_detr().init)(jax.random.PRNGKey(0), images)  # train_stem adds no parameter

    def stem_grad(model):
        loss = lambda p: model.apply({**variables, "params": p}, images)["pred_boxes"].sum()
        return np.abs(np.asarray(jax.jit(jax.grad(loss))(variables["params"])["backbone"]["conv1"]["kernel"])).max()

    assert stem_grad(_tiny_detr()) == 0.0  # official: stop_gradient after stage 1
    assert stem_grad(_tiny_detr(train_stem=True)) > 0.0


def _with_aids(**aids):
    return DETRWithAids(_tiny_detr(dropout=0.0, num_queries=aids.pop("num_queries", 6)), **aids)


def test_query_groups_decode_independently_and_the_detector_is_group_zero():
    """Group DETR: in training each group's outputs are what that group alone would give (no attention between
    groups); the detector's own parameters ("model") are a one-group DETR that evaluation applies alone."""
    groups, n = 3, 6
    model = _with_aids(num_query_groups=groups, num_queries=n)
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))
    mask = jnp.ones((2, 64, 64), bool).at[1, 40:].set(False)
    variables = model.init(jax.random.PRNGKey(0), images)
    assert set(variables["params"]) == {"model", "group_query_embed"}
    assert variables["params"]["group_query_embed"].shape == (groups - 1, n, 32)
    train_out, aids = model.apply(variables, images, pixel_mask=mask, train=True)
    assert aids == {} and train_out["pred_logits"].shape == (2, groups * n, 6)
    assert len(train_out["aux_outputs"]) == 1 and train_out["aux_outputs"][0]["pred_boxes"].shape == (2, groups * n, 4)

    single = model.model
    detector = detector_variables(variables["params"], variables["frozen"])
    for g in range(groups):
        params = detector["params"]
        if g:
            params = dict(params, query_embed=variables["params"]["group_query_embed"][g - 1])
        ref = single.apply({**detector, "params": params}, images, pixel_mask=mask)
        for key in ("pred_logits", "pred_boxes"):
            np.testing.assert_allclose(np.asarray(train_out[key][:, g * n:(g + 1) * n]), np.asarray(ref[key]),
                                       atol=2e-5)


def test_encoder_token_heads_give_cell_centres_of_the_real_map():
    model = _with_aids(encoder_aux_loss=True)
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 128, 192, 3))
    mask = jnp.ones((2, 128, 192), bool).at[1, :, 96:].set(False)  # image 1 is 128 x 96: a 4 x 3 real map
    variables = model.init(jax.random.PRNGKey(0), images)
    assert set(variables["params"]) == {"model", "enc_heads"}
    outputs, aids = model.apply(variables, images, pixel_mask=mask, train=True)
    enc = aids["enc"]
    assert enc["pred_logits"].shape == (2, 4 * 6, 6) and enc["pred_boxes"].shape == (2, 24, 4)
    centres = np.asarray(enc["token_centres"]).reshape(2, 4, 6, 2)
    np.testing.assert_allclose(centres[0, 1, 2], [2.5 / 6, 1.5 / 4], rtol=1e-6)
    np.testing.assert_allclose(centres[1, 3, 2], [2.5 / 3, 3.5 / 4], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(enc["token_mask"]).reshape(2, 4, 6)[1].any(0), [1, 1, 1, 0, 0, 0])
    plain = model.model.apply(detector_variables(variables["params"], variables["frozen"]), images, pixel_mask=mask)
    np.testing.assert_array_equal(np.asarray(outputs["pred_boxes"]), np.asarray(plain["pred_boxes"]))


def test_group_norm_without_mask_equals_torch():
    from detr_jax.models.backbone import MaskedGroupNorm

    x = np.random.default_rng(0).normal(2.0, 3.0, (2, 5, 7, 64)).astype(np.float32)
    module = MaskedGroupNorm()
    variables = module.init(jax.random.PRNGKey(0), jnp.asarray(x))
    scale = np.random.default_rng(1).normal(size=64).astype(np.float32)
    bias = np.random.default_rng(2).normal(size=64).astype(np.float32)
    ours = module.apply({"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}, jnp.asarray(x))
    gn = torch.nn.GroupNorm(32, 64, eps=1e-5)
    with torch.no_grad():
        gn.weight.copy_(torch.from_numpy(scale))
        gn.bias.copy_(torch.from_numpy(bias))
        ref = gn(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    assert set(variables["params"]) == {"scale", "bias"}
    np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-5)


def _torch_batch_norm(x, scale, bias, train):
    """torch.nn.BatchNorm2d (momentum 0.1) on NHWC numpy x; returns (output NHWC, running mean, running var)."""
    bn = torch.nn.BatchNorm2d(x.shape[-1], eps=1e-5, momentum=0.1)
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(scale))
        bn.bias.copy_(torch.from_numpy(bias))
        bn.train(train)
        y = bn(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    return y, bn.running_mean.numpy(), bn.running_var.numpy()


def test_batch_norm_equals_torch_in_training_and_evaluation():
    """backbone_norm "batch": in training, torch's BatchNorm2d in train mode (output and running statistics after
    one step); in evaluation, FrozenBatchNorm with the same four arrays (torch's eval mode)."""
    from detr_jax.models.backbone import (
        FROZEN_COLLECTION,
        FrozenBatchNorm,
        MaskedBatchNorm,
    )

    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (3, 5, 7, 16)).astype(np.float32)
    scale, bias = rng.normal(size=16).astype(np.float32), rng.normal(size=16).astype(np.float32)
    module = MaskedBatchNorm()
    variables = module.init(jax.random.PRNGKey(0), jnp.asarray(x))
    assert set(variables["params"]) == {"scale", "bias"} and set(variables[FROZEN_COLLECTION]) == {"mean", "var"}
    variables = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)},
                 FROZEN_COLLECTION: variables[FROZEN_COLLECTION]}
    ours, updated = module.apply(variables, jnp.asarray(x), train=True, mutable=[FROZEN_COLLECTION])
    ref, ref_mean, ref_var = _torch_batch_norm(x, scale, bias, train=True)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-5)
    np.testing.assert_allclose(np.asarray(updated[FROZEN_COLLECTION]["mean"]), ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(updated[FROZEN_COLLECTION]["var"]), ref_var, rtol=1e-5)

    stats = {"mean": rng.normal(size=16).astype(np.float32), "var": rng.uniform(0.5, 2, 16).astype(np.float32)}
    evaluated = module.apply({"params": variables["params"], FROZEN_COLLECTION: stats}, jnp.asarray(x))
    frozen = FrozenBatchNorm().apply({FROZEN_COLLECTION: dict(stats, scale=scale, bias=bias)}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(evaluated), np.asarray(frozen), atol=1e-5)
    bn = torch.nn.BatchNorm2d(16, eps=1e-5).eval()
    with torch.no_grad():
        for name, value in (("weight", scale), ("bias", bias), ("running_mean", stats["mean"]),
                            ("running_var", stats["var"])):
            getattr(bn, name).copy_(torch.from_numpy(value))
        ref = bn(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(evaluated), ref, atol=2e-5)


def test_masked_batch_norm_takes_statistics_over_real_pixels_only():
    """With a pixel mask the training statistics are torch's over the real pixels alone (padding excluded)."""
    from detr_jax.models.backbone import FROZEN_COLLECTION, MaskedBatchNorm

    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, (2, 6, 8, 4)).astype(np.float32)
    mask = np.ones((2, 6, 8), bool)
    mask[1, 4:], mask[1, :, 5:] = False, False
    scale, bias = np.ones(4, np.float32), np.zeros(4, np.float32)
    module = MaskedBatchNorm()
    variables = module.init(jax.random.PRNGKey(0), jnp.asarray(x))
    ours, updated = module.apply(variables, jnp.asarray(x), jnp.asarray(mask), train=True,
                                 mutable=[FROZEN_COLLECTION])
    real = x[mask][:, None, None, :]  # [P, 1, 1, C]: the real pixels as a batch of 1x1 maps
    ref, ref_mean, ref_var = _torch_batch_norm(real, scale, bias, train=True)
    np.testing.assert_allclose(np.asarray(ours)[mask], ref[:, 0, 0], atol=2e-5)
    np.testing.assert_allclose(np.asarray(updated[FROZEN_COLLECTION]["var"]), ref_var, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(updated[FROZEN_COLLECTION]["mean"]), ref_mean, rtol=1e-5, atol=1e-6)


def test_stage3_token_heads_are_on_the_stride_16_map_and_training_only():
    """backbone_aux_stages=(3,): the token heads see the backbone's stage 3 (its 1x1 projection and LayerNorm), with
    cell centres of the real stride-16 map; the detector neither runs nor needs them, and its detections do not
    change."""
    model = _with_aids(backbone_aux_stages=(3,))
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 128, 192, 3))
    mask = jnp.ones((2, 128, 192), bool).at[1, :, 96:].set(False)  # image 1: a 8 x 6 real stage-3 map
    variables = model.init(jax.random.PRNGKey(0), images)
    assert set(variables["params"]) == {"model", "stage3_proj", "stage3_norm", "stage3_heads"}
    outputs, aids = model.apply(variables, images, pixel_mask=mask, train=True)
    s3 = aids["s3"]
    assert s3["pred_logits"].shape == (2, 8 * 12, 6) and s3["pred_boxes"].shape == (2, 96, 4)
    centres = np.asarray(s3["token_centres"]).reshape(2, 8, 12, 2)
    np.testing.assert_allclose(centres[1, 7, 5], [5.5 / 6, 7.5 / 8], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(s3["token_mask"]).reshape(2, 8, 12)[1].any(0), [1] * 6 + [0] * 6)

    def head_grad_of(name):  # does the stage-3 heads' output depend on this backbone stage? (4 comes after 3)
        def loss(p):
            return model.apply({**variables, "params": p}, images, pixel_mask=mask,
                               train=True)[1]["s3"]["pred_logits"].sum()
        grads = jax.grad(loss)(variables["params"])["model"]["backbone"]
        return np.abs(np.asarray(grads[name]["conv1"]["kernel"])).max()

    assert head_grad_of("layer3_0") > 0 and head_grad_of("layer4_0") == 0
    ref = model.model.apply(detector_variables(variables["params"], variables["frozen"]), images, pixel_mask=mask)
    np.testing.assert_array_equal(np.asarray(outputs["pred_boxes"]), np.asarray(ref["pred_boxes"]))


def test_training_parameter_groups_put_the_aids_with_the_transformer():
    model = _with_aids(num_query_groups=2, backbone_aux_stages=(2,))
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))["params"]
    labels = flax.traverse_util.flatten_dict(training_parameter_groups(params), sep="/")
    detector = flax.traverse_util.flatten_dict(parameter_groups(params["model"]), sep="/")
    assert {k: v for k, v in labels.items() if k.startswith("model/")} == {f"model/{k}": v for k, v in detector.items()}
    aids = {k: v for k, v in labels.items() if not k.startswith("model/")}
    assert aids and set(aids.values()) == {"transformer"} and "group_query_embed" in aids
