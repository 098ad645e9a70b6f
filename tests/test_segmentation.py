"""DETRsegm (models/segmentation.py) and panoptic checkpoint conversion: parity with the official panoptic DETR
(fixture official_detr_r50_tiny_panoptic), with the official MHAttentionMap / nearest upsampling written in torch,
and with HF transformers' DetrForSegmentation (random weights, its own ResNet: no download, no timm)."""

import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from detr_jax.models.detr import DETR  # noqa: E402
from detr_jax.models.segmentation import (  # noqa: E402
    DETRsegm,
    MaskHeadSmallConv,
    MHAttentionMap,
    resize_nearest,
    segm_parameter_groups,
)
from detr_jax.weights.official import (  # noqa: E402
    check_variables_match,
    infer_detr_config,
    load_official_checkpoint,
    load_torch_state_dict,
    panoptic_state_dict_to_variables,
)


def _fast_key():
    """An RNG key whose random initialisers compile in a fraction of threefry's time on XLA:CPU."""
    return jax.random.key(0, impl="rbg")


@pytest.fixture(scope="module")
def panoptic(fixtures_dir):
    folder = fixtures_dir / "official_detr_r50_tiny_panoptic"
    return folder / "detr_panoptic_random.pth", dict(np.load(folder / "forward.npz"))


@pytest.fixture(scope="module")
def panoptic_loaded(panoptic):
    path, _ = panoptic
    return load_official_checkpoint(str(path), num_heads=8)


def test_official_panoptic_forward_parity(panoptic, panoptic_loaded):
    """The converted random R50 panoptic DETR gives the official DETRsegm's outputs on a padded batch of two
    images: classes, boxes, aux outputs and the mask logits [2, 12, 48, 72] (measured max |diff| ~1.1e-5)."""
    _, ref = panoptic
    model, variables = panoptic_loaded
    out = jax.jit(lambda v, x, m: model.apply(v, x, pixel_mask=m))(variables, ref["images"], ref["pixel_mask"])
    assert out["pred_masks"].shape == ref["pred_masks"].shape and out["pred_masks"].dtype == jnp.float32
    np.testing.assert_allclose(out["pred_masks"], ref["pred_masks"], atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(out["pred_logits"], ref["pred_logits"], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(out["pred_boxes"], ref["pred_boxes"], atol=2e-6, rtol=1e-5)
    assert len(out["aux_outputs"]) == 2 and "features" not in out
    for i, aux in enumerate(out["aux_outputs"]):
        np.testing.assert_allclose(aux["pred_logits"], ref[f"aux{i}_pred_logits"], atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(aux["pred_boxes"], ref[f"aux{i}_pred_boxes"], atol=2e-6, rtol=1e-5)


def test_panoptic_checkpoint_converts_key_for_key(panoptic, panoptic_loaded):
    path, _ = panoptic
    model, variables = panoptic_loaded
    state_dict = load_torch_state_dict(str(path))
    assert isinstance(model, DETRsegm) and isinstance(model.detr, DETR)
    config = infer_detr_config(state_dict)  # reads the detector's keys of a panoptic state dict
    assert config == infer_detr_config({k[len("detr."):]: v for k, v in state_dict.items() if k.startswith("detr.")})
    assert config == dict(num_classes=250, num_queries=12, hidden_dim=128, num_encoder_layers=2,
                          num_decoder_layers=3, dim_feedforward=256, pre_norm=False, backbone_depth=50,
                          position_embedding="sine")
    assert (model.detr.num_heads, model.detr.dilation) == (8, False)
    assert len(jax.tree_util.tree_leaves(variables)) == len(
        [k for k in state_dict if not k.endswith("num_batches_tracked")])
    params = variables["params"]
    np.testing.assert_array_equal(params["mask_head"]["lay1"]["kernel"],
                                  state_dict["mask_head.lay1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["mask_head"]["adapter3"]["kernel"][0, 0],
                                  state_dict["mask_head.adapter3.weight"][:, :, 0, 0].T)
    np.testing.assert_array_equal(params["mask_head"]["gn4"]["scale"], state_dict["mask_head.gn4.weight"])
    np.testing.assert_array_equal(params["bbox_attention"]["k_linear"]["kernel"],
                                  state_dict["bbox_attention.k_linear.weight"].T)
    np.testing.assert_array_equal(params["detr"]["class_embed"]["kernel"], state_dict["detr.class_embed.weight"].T)
    np.testing.assert_array_equal(variables["frozen"]["detr"]["backbone"]["layer3_0"]["downsample_bn"]["var"],
                                  state_dict["detr.backbone.0.body.layer3.0.downsample.1.running_var"])


def test_broken_panoptic_checkpoint_is_refused_by_name(panoptic, tmp_path):
    path, _ = panoptic
    sd = torch.load(path, weights_only=True)["model"]
    del sd["mask_head.gn3.weight"], sd["detr.transformer.decoder.layers.1.norm2.weight"]
    sd["mask_head.lay6.weight"] = torch.zeros(4, 8, 3, 3)
    torch.save({"model": sd}, tmp_path / "broken.pth")
    with pytest.raises(ValueError) as info:
        load_official_checkpoint(str(tmp_path / "broken.pth"), num_heads=8)
    message = str(info.value)
    for name in ("broken.pth", "missing [", "params/mask_head/gn3/scale",
                 "params/detr/transformer/decoder_layers_1/norm2/scale", "unexpected [params/mask_head/lay6/kernel]"):
        assert name in message, (name, message)
    with pytest.raises(ValueError, match="freeze_detr.*panoptic"):
        load_official_checkpoint(str(path.parent.parent / "official_detr_r18_tiny" / "detr_random.pth"),
                                 num_heads=4, freeze_detr=True)


class _OfficialMHAttentionMap(torch.nn.Module):
    """The official `MHAttentionMap` (models/segmentation.py), dropout 0."""

    def __init__(self, query_dim, hidden_dim, num_heads):
        super().__init__()
        self.num_heads, self.hidden_dim = num_heads, hidden_dim
        self.q_linear = torch.nn.Linear(query_dim, hidden_dim)
        self.k_linear = torch.nn.Linear(query_dim, hidden_dim)
        self.normalize_fact = float(hidden_dim / self.num_heads) ** -0.5

    def forward(self, q, k, mask=None):  # q [B, N, D], k [B, D, h, w], mask [B, h, w] True on PADDING
        q = self.q_linear(q)
        k = F.conv2d(k, self.k_linear.weight.unsqueeze(-1).unsqueeze(-1), self.k_linear.bias)
        qh = q.view(q.shape[0], q.shape[1], self.num_heads, self.hidden_dim // self.num_heads)
        kh = k.view(k.shape[0], self.num_heads, self.hidden_dim // self.num_heads, k.shape[-2], k.shape[-1])
        weights = torch.einsum("bqnc,bnchw->bqnhw", qh * self.normalize_fact, kh)
        if mask is not None:
            weights.masked_fill_(mask.unsqueeze(1).unsqueeze(1), float("-inf"))
        return F.softmax(weights.flatten(2), dim=-1).view_as(weights)


def test_mh_attention_map_matches_official():
    """Weights [B, N, heads, h, w] equal the official module's on random inputs with a padded image; padded
    positions get exactly 0, each query's map sums to 1 over heads and positions, gradients stay finite."""
    rng = np.random.default_rng(0)
    b, n, d, heads, h, w = 2, 5, 32, 4, 6, 7
    q = rng.standard_normal((b, n, d)).astype(np.float32)
    k = rng.standard_normal((b, h, w, d)).astype(np.float32)
    real = np.ones((b, h, w), bool)
    real[1, 4:] = False
    real[1, :, 5:] = False
    module = MHAttentionMap(d, heads)
    params = jax.jit(module.init)(_fast_key(), q, k, real)["params"]
    assert not np.any(params["q_linear"]["bias"]) and not np.any(params["k_linear"]["bias"])  # official init
    params = jax.tree_util.tree_map(lambda p: p + 0.1 * rng.standard_normal(p.shape).astype(np.float32), params)
    ours = np.asarray(jax.jit(module.apply)({"params": params}, q, k, real))

    official = _OfficialMHAttentionMap(d, d, heads)
    with torch.no_grad():
        for name in ("q_linear", "k_linear"):
            getattr(official, name).weight.copy_(torch.tensor(np.asarray(params[name]["kernel"]).T))
            getattr(official, name).bias.copy_(torch.tensor(np.asarray(params[name]["bias"])))
        ref = official(torch.from_numpy(q), torch.from_numpy(k).permute(0, 3, 1, 2), torch.from_numpy(~real)).numpy()
    assert ours.shape == (b, n, heads, h, w)
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=1e-5)
    assert np.all(ours[1][:, :, ~real[1]] == 0)
    np.testing.assert_allclose(ours.sum(axis=(2, 3, 4)), 1.0, atol=1e-5)
    grads = jax.jit(jax.grad(lambda p: (module.apply({"params": p}, q, k, real) ** 2).sum()))(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))


@pytest.mark.parametrize("in_hw, out_hw", [((7, 9), (13, 17)), ((6, 5), (12, 10)), ((13, 25), (25, 50)),
                                           ((10, 8), (4, 3)), ((5, 5), (5, 5))])
def test_resize_nearest_is_torch_nearest(in_hw, out_hw):
    x = np.random.default_rng(1).standard_normal((2,) + in_hw + (3,)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=out_hw, mode="nearest").permute(0, 2, 3, 1)
    np.testing.assert_array_equal(np.asarray(resize_nearest(jnp.asarray(x), out_hw)), ref.numpy())


def test_mask_head_initialisation_is_official():
    """Official init: every conv kaiming_uniform_(a=1) (U(+-sqrt(3 / fan_in))) with zero bias, GroupNorm (1, 0);
    the adapters' input widths come from the ResNet stages (here ResNet-18's 256, 128, 64)."""
    b, n, d, heads = 1, 2, 128, 8
    x = jnp.zeros((b, 2, 3, d))
    maps = jnp.zeros((b, n, heads, 2, 3))
    fpns = [jnp.zeros((b, 4, 6, 256)), jnp.zeros((b, 8, 12, 128)), jnp.zeros((b, 16, 24, 64))]
    head = MaskHeadSmallConv(d)
    params = jax.jit(head.init)(_fast_key(), x, maps, fpns)["params"]
    widths = {"lay1": 136, "lay2": 64, "lay3": 32, "lay4": 16, "lay5": 8, "out_lay": 1,
              "adapter1": 64, "adapter2": 32, "adapter3": 16}
    assert set(params) == set(widths) | {f"gn{i}" for i in range(1, 6)}
    for name, width in widths.items():
        kernel = np.asarray(params[name]["kernel"])
        fan_in = np.prod(kernel.shape[:3])
        assert kernel.shape[-1] == width and not np.any(params[name]["bias"]), name
        assert np.abs(kernel).max() <= np.sqrt(3 / fan_in) and np.abs(kernel).max() > 0.9 * np.sqrt(3 / fan_in)
    assert [params[f"adapter{i}"]["kernel"].shape[2] for i in (1, 2, 3)] == [256, 128, 64]
    np.testing.assert_array_equal(params["gn1"]["scale"], np.ones(136))
    assert not np.any(params["gn5"]["bias"])
    assert jax.eval_shape(head.apply, {"params": params}, x, maps, fpns).shape == (b, n, 16, 24, 1)


def test_frozen_detr_trains_only_the_mask_head():
    """freeze_detr (official --frozen_weights): no gradient reaches the detector, the mask head gets one; and
    the parameter groups of a DETRsegm."""
    detr = DETR(num_classes=5, num_queries=3, hidden_dim=128, num_heads=8, num_encoder_layers=1,
                num_decoder_layers=1, dim_feedforward=64, dropout=0.0, backbone_depth=18)
    model = DETRsegm(detr, freeze_detr=True)
    rng = np.random.default_rng(2)
    images = rng.standard_normal((1, 64, 96, 3)).astype(np.float32)
    # Random values in the model's tree (cheaper than compiling `init` for a ResNet on a loaded CPU).
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    variables = jax.tree_util.tree_map_with_path(
        lambda path, s: (np.ones(s.shape, np.float32) if path[-1].key == "var" else
                         (0.05 * rng.standard_normal(s.shape)).astype(np.float32)), shapes)
    params = variables["params"]
    assert set(params) == {"detr", "bbox_attention", "mask_head"}

    def loss(p):
        out = model.apply({"params": p, "frozen": variables["frozen"]}, images, return_features=True)
        assert out["pred_masks"].shape == (1, 3, 16, 24) and "features" in out
        return out["pred_masks"].mean() + out["pred_logits"].mean() + out["pred_boxes"].mean()

    grads = jax.jit(jax.grad(loss))(params)
    assert all(not np.any(g) for g in jax.tree_util.tree_leaves(grads["detr"]))
    assert np.any(grads["mask_head"]["out_lay"]["kernel"]) and np.any(grads["bbox_attention"]["k_linear"]["kernel"])

    labels = flax.traverse_util.flatten_dict(segm_parameter_groups(params, freeze_detr=True), sep="/")
    assert {v for k, v in labels.items() if k.startswith("detr/")} == {"frozen"}
    assert {v for k, v in labels.items() if not k.startswith("detr/")} == {"transformer"}
    labels = flax.traverse_util.flatten_dict(segm_parameter_groups(params), sep="/")
    assert labels["detr/backbone/layer2_0/conv1/kernel"] == "backbone"
    assert labels["detr/backbone/layer1_0/conv1/kernel"] == "frozen"
    assert labels["detr/class_embed/kernel"] == labels["mask_head/lay1/kernel"] == "transformer"


# ---- HF transformers DetrForSegmentation as a second reference -------------------------------------------------
def _hf_head_to_official(key):
    """HF 5.x DetrForSegmentation head key -> official DETRsegm key."""
    for pattern, template in [
        (r"mask_head\.conv([12])\.conv\.", r"mask_head.lay\1."),
        (r"mask_head\.conv([12])\.norm\.", r"mask_head.gn\1."),
        (r"mask_head\.output_conv\.", "mask_head.out_lay."),
        (r"bbox_attention\.([qk])_proj\.", r"bbox_attention.\1_linear."),
    ]:
        if m := re.match(pattern, key):
            return m.expand(template) + key[m.end():]
    m = re.match(r"mask_head\.fpn_stages\.(\d)\.(fpn_adapter|refine\.conv|refine\.norm)\.", key)
    assert m, key
    i = int(m[1])
    name = {"fpn_adapter": f"adapter{i + 1}", "refine.conv": f"lay{i + 3}", "refine.norm": f"gn{i + 3}"}[m[2]]
    return f"mask_head.{name}." + key[m.end():]


def test_hf_detr_for_segmentation_parity():
    """A random HF DetrForSegmentation (ResNet-18, padded size not a multiple of 32, so the mask head's nearest
    upsampling is not a plain 2x) renamed to the official keys gives the same classes, boxes and masks."""
    transformers = pytest.importorskip("transformers")
    from detr_jax.weights.hf import hf_state_dict_to_official
    from tests.helpers import randomize_hf_detr

    torch.manual_seed(0)
    backbone = transformers.ResNetConfig(out_features=["stage1", "stage2", "stage3", "stage4"], layer_type="basic",
                                         depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512])
    config = transformers.DetrConfig(backbone_config=backbone, d_model=128, encoder_layers=1, decoder_layers=2,
                                     encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, num_queries=5, num_labels=7)
    hf = transformers.DetrForSegmentation(config).eval()
    randomize_hf_detr(hf)

    gen = torch.Generator().manual_seed(1)
    pixels, pixel_mask = torch.zeros(2, 3, 136, 168), torch.zeros(2, 136, 168, dtype=torch.long)
    for i, (h, w) in enumerate([(136, 168), (100, 121)]):
        pixels[i, :, :h, :w] = torch.randn(3, h, w, generator=gen)
        pixel_mask[i, :h, :w] = 1
    with torch.no_grad():
        ref = hf(pixels, pixel_mask=pixel_mask)

    hf_sd = hf.state_dict()
    official = {"detr." + k: v for k, v in hf_state_dict_to_official(
        {k[len("detr."):]: v for k, v in hf_sd.items() if k.startswith("detr.")}).items()}
    official.update({_hf_head_to_official(k): v.numpy() for k, v in hf_sd.items() if not k.startswith("detr.")})
    model = DETRsegm(DETR(**infer_detr_config(official), num_heads=8, aux_loss=False))
    variables = jax.tree_util.tree_map(jnp.asarray, panoptic_state_dict_to_variables(official))
    check_variables_match(model, variables, "the HF DetrForSegmentation state dict")
    out = jax.jit(lambda v, x, m: model.apply(v, x, pixel_mask=m))(
        variables, pixels.permute(0, 2, 3, 1).numpy(), pixel_mask.numpy().astype(bool))
    assert out["pred_masks"].shape == tuple(ref.pred_masks.shape) == (2, 5, 34, 42)
    np.testing.assert_allclose(out["pred_masks"], ref.pred_masks.numpy(), atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(out["pred_logits"], ref.logits.numpy(), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(out["pred_boxes"], ref.pred_boxes.numpy(), atol=2e-6, rtol=1e-5)
