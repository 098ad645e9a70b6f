"""Parity with HF transformers' `DetrForObjectDetection` through `detr_jax.weights.hf` (random weights, offline).

The HF model is built from a config with its own ResNet (no download, no timm), every weight re-drawn so that no
batch norm is the identity and no LayerNorm or bias is trivial, then run on a padded batch of two images.

Where HF departs from the official DETR (the reference; our parity with it is tests/test_convert.py):
- `auxiliary_loss=True` changes HF's forward: each decoder layer then gets the LayerNorm-ed output of the previous
  one and the last output is normalised twice. The official decoder normalises only the copies it returns. So the
  HF model runs with `auxiliary_loss=False` (HF's default, and how its released checkpoints run), and the official
  aux outputs are rebuilt from HF's weights: each decoder layer's raw output -> decoder LayerNorm -> heads.
- `DetrConfig.dilation` (DC5) is honoured only by a timm backbone; HF's own ResNet ignores it and keeps stride 32.
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig  # noqa: E402

from detr_jax.weights.hf import hf_state_dict_to_official, load_hf_detr  # noqa: E402
from tests.helpers import randomize_hf_detr  # noqa: E402

RESNETS = {  # our depth -> HF ResNetConfig fields
    18: {"layer_type": "basic", "depths": [2, 2, 2, 2], "hidden_sizes": [64, 128, 256, 512]},
    50: {"layer_type": "bottleneck", "depths": [3, 4, 6, 3], "hidden_sizes": [256, 512, 1024, 2048]},
}
TINY = {"d_model": 32, "encoder_layers": 2, "decoder_layers": 3, "encoder_attention_heads": 4,
        "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "num_queries": 6, "num_labels": 5}


def build_hf_detr(depth=18, seed=0, **config_fields):
    """A random HF DETR in eval mode, every weight and batch-norm buffer re-drawn.

    HF initialises batch norms as the identity, LayerNorms as (1, 0), biases at 0 and Linears with std 0.02: a
    dropped or swapped weight would hardly show in the outputs.
    """
    torch.manual_seed(seed)
    fields = {**TINY, **config_fields}
    config = DetrConfig(backbone_config=ResNetConfig(out_features=["stage4"], **RESNETS[depth]), **fields)
    model = DetrForObjectDetection(config).eval()
    randomize_hf_detr(model)
    return model


@pytest.fixture(scope="module")
def padded_batch():
    """Two images (128x160 and 90x100), zero-padded bottom/right to 128x160: NCHW pixels, long mask (1 = real)."""
    gen = torch.Generator().manual_seed(1)
    pixels = torch.zeros(2, 3, 128, 160)
    pixel_mask = torch.zeros(2, 128, 160, dtype=torch.long)
    for i, (h, w) in enumerate([(128, 160), (90, 100)]):
        pixels[i, :, :h, :w] = torch.randn(3, h, w, generator=gen)
        pixel_mask[i, :h, :w] = 1
    return pixels, pixel_mask


def hf_official_outputs(model, pixels, pixel_mask):
    """HF's outputs, plus the official aux outputs from the raw output of each decoder layer (hooked).

    Returns a list of (logits [B, N, C + 1], boxes [B, N, 4]) per decoder layer, first layer first; the last is
    HF's own `logits` / `pred_boxes`.
    """
    raw = []

    def keep(_module, _inputs, out):
        raw.append(out[0] if isinstance(out, tuple) else out)

    hooks = [layer.register_forward_hook(keep) for layer in model.model.decoder.layers]
    try:
        with torch.no_grad():
            out = model(pixels, pixel_mask=pixel_mask)
            per_layer = []
            for hidden in raw:
                hidden = model.model.decoder.layernorm(hidden)
                per_layer.append((model.class_labels_classifier(hidden).numpy(),
                                  model.bbox_predictor(hidden).sigmoid().numpy()))
    finally:
        for hook in hooks:
            hook.remove()
    # The rebuilt last layer must be HF's own output, or the hooks did not see what we think.
    np.testing.assert_allclose(per_layer[-1][0], out.logits.numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(per_layer[-1][1], out.pred_boxes.numpy(), atol=1e-6, rtol=0)
    return per_layer


def run_ours(model, variables, pixels, pixel_mask):
    images = pixels.permute(0, 2, 3, 1).numpy()  # NCHW -> NHWC
    out = jax.jit(lambda v, x, m: model.apply(v, x, pixel_mask=m))(variables, images, pixel_mask.numpy().astype(bool))
    return jax.tree_util.tree_map(np.asarray, out)


DC5_SKIP = pytest.mark.skip(reason="no HF DC5 to compare with: HF's own ResNet has no dilation (DetrConfig.dilation "
                                   "is honoured only by a timm backbone, not installed here); "
                                   "test_hf_resnet_ignores_dilation shows HF ignoring it")


@pytest.mark.parametrize("depth, position_embedding", [
    (18, "sine"),
    (18, "learned"),
    (50, "sine"),
    pytest.param(50, "dc5", marks=DC5_SKIP),
])
def test_forward_parity(padded_batch, depth, position_embedding):
    """Converted weights give HF's logits and boxes, and the official aux outputs, on a padded batch."""
    hf = build_hf_detr(depth, position_embedding_type=position_embedding)
    expected = hf_official_outputs(hf, *padded_batch)
    model, variables = load_hf_detr(hf)
    assert (model.backbone_depth, model.position_embedding, model.num_heads, model.dilation) == (
        depth, position_embedding, 4, False)
    assert (model.num_classes, model.num_queries, model.hidden_dim, model.dim_feedforward) == (5, 6, 32, 64)
    out = run_ours(model, variables, *padded_batch)

    ours = [(a["pred_logits"], a["pred_boxes"]) for a in out["aux_outputs"]] + [(out["pred_logits"], out["pred_boxes"])]
    assert len(ours) == len(expected) == 3
    for layer, ((logits, boxes), (hf_logits, hf_boxes)) in enumerate(zip(ours, expected)):
        np.testing.assert_allclose(logits, hf_logits, atol=1e-4, rtol=1e-5, err_msg=f"logits, decoder layer {layer}")
        np.testing.assert_allclose(boxes, hf_boxes, atol=1e-4, rtol=1e-5, err_msg=f"boxes, decoder layer {layer}")


def test_renamed_keys_are_the_official_checkpoint_keys(fixtures_dir):
    """An HF DETR shaped as the official tiny fixture renames to exactly its keys and shapes."""
    official = torch.load(fixtures_dir / "official_detr_r18_tiny" / "detr_random.pth", weights_only=True)["model"]
    hf = build_hf_detr(18, d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128, num_queries=12, num_labels=91)
    hf_state = hf.state_dict()
    renamed = hf_state_dict_to_official(hf_state)
    assert sorted(renamed) == sorted(official)
    assert {k: tuple(v.shape) for k, v in renamed.items()} == {k: tuple(v.shape) for k, v in official.items()}
    # q, k, v fused in that order; BN buffers and the ResNet names land where torchvision has them.
    layer = "model.decoder.layers.2.encoder_attn."
    fused = torch.cat([hf_state[layer + p + "_proj.weight"] for p in "qkv"]).numpy()
    np.testing.assert_array_equal(renamed["transformer.decoder.layers.2.multihead_attn.in_proj_weight"], fused)
    np.testing.assert_array_equal(
        renamed["backbone.0.body.layer3.0.downsample.1.running_var"],
        hf_state["model.backbone.model.encoder.stages.2.layers.0.shortcut.normalization.running_var"].numpy())
    np.testing.assert_array_equal(
        renamed["backbone.0.body.layer4.1.bn2.weight"],
        hf_state["model.backbone.model.encoder.stages.3.layers.1.layer.1.normalization.weight"].numpy())


def test_legacy_hub_names_convert():
    """transformers 4.x names (hub checkpoints: `out_proj`, `fc1`, `backbone.conv_encoder.`) rename the same way."""
    hf_state = build_hf_detr(18).state_dict()
    legacy = {k.replace("model.backbone.model.", "model.backbone.conv_encoder.model.")
              .replace(".o_proj.", ".out_proj.").replace(".mlp.fc", ".fc"): v for k, v in hf_state.items()}
    assert legacy.keys() != hf_state.keys()
    current, old = hf_state_dict_to_official(hf_state), hf_state_dict_to_official(legacy)
    assert current.keys() == old.keys()
    for key in current:
        np.testing.assert_array_equal(current[key], old[key])


def test_state_dict_needs_num_heads_from_caller():
    """A bare state dict converts too; num_heads then comes from the caller (the weights cannot tell it)."""
    hf = build_hf_detr(18)
    model, variables = load_hf_detr(hf)
    from_dict, dict_variables = load_hf_detr(hf.state_dict(), num_heads=4)
    assert from_dict == model
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, dict_variables)


def test_hf_auxiliary_loss_changes_the_forward(padded_batch):
    """Why the parity test runs HF with auxiliary_loss=False: with True, HF's decoder is not the official one."""
    hf = build_hf_detr(18)
    official = hf_official_outputs(hf, *padded_batch)
    hf.config.auxiliary_loss = True  # the decoder reads the flag at call time
    with torch.no_grad():
        changed = hf(*padded_batch[:1], pixel_mask=padded_batch[1]).logits.numpy()
    assert np.abs(changed - official[-1][0]).max() > 1e-2, (
        "HF's auxiliary_loss decoder now matches the official: update the module docstring and convert_hf")
    with pytest.warns(UserWarning, match="auxiliary_loss"):
        load_hf_detr(hf)


def test_hf_resnet_ignores_dilation(padded_batch):
    """DetrConfig.dilation=True with HF's ResNet keeps stride 32 in HF, so the conversion stays undilated."""
    hf = build_hf_detr(18, dilation=True)
    with torch.no_grad():
        out = hf(*padded_batch[:1], pixel_mask=padded_batch[1])
    assert out.encoder_last_hidden_state.shape[1] == (128 // 32) * (160 // 32)  # not (128 // 16) * (160 // 16)
    with pytest.warns(UserWarning, match="dilation"):
        model, _ = load_hf_detr(hf)
    assert not model.dilation


def test_unconvertible_inputs_are_named():
    hf_state = build_hf_detr(18).state_dict()
    with pytest.raises(ValueError, match="mask_head.output_conv.weight"):  # a DetrForSegmentation head
        hf_state_dict_to_official({**hf_state, "mask_head.output_conv.weight": torch.zeros(1)})
    without_k = {k: v for k, v in hf_state.items() if k != "model.encoder.layers.1.self_attn.k_proj.bias"}
    with pytest.raises(ValueError, match=r"encoder\.layers\.1\.self_attn\.in_proj_bias.*\['k'\]"):
        hf_state_dict_to_official(without_k)
    with pytest.raises(ValueError, match="decoder_attention_heads"):
        load_hf_detr(build_hf_detr(18, decoder_attention_heads=2))
