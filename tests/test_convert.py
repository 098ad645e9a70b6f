"""Official checkpoint conversion: parity with the official DETR's outputs and key coverage of R50/R101."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from detr_jax.models.detr import DETR  # noqa: E402
from detr_jax.weights.official import (  # noqa: E402
    infer_detr_config,
    load_official_checkpoint,
    load_torch_state_dict,
    load_torchvision_backbone,
)


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    folder = fixtures_dir / "official_detr_r18_tiny"
    return folder / "detr_random.pth", dict(np.load(folder / "forward.npz"))


def test_official_forward_parity(tiny):
    """The converted random R18 DETR gives the official model's outputs on a padded batch of two images."""
    path, ref = tiny
    model, variables = load_official_checkpoint(str(path), num_heads=4)
    out = jax.jit(lambda v, x, m: model.apply(v, x, pixel_mask=m))(variables, ref["images"], ref["pixel_mask"])
    np.testing.assert_allclose(out["pred_logits"], ref["pred_logits"], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(out["pred_boxes"], ref["pred_boxes"], atol=2e-6, rtol=1e-5)
    assert len(out["aux_outputs"]) == 2
    for i, aux in enumerate(out["aux_outputs"]):
        np.testing.assert_allclose(aux["pred_logits"], ref[f"aux{i}_pred_logits"], atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(aux["pred_boxes"], ref[f"aux{i}_pred_boxes"], atol=2e-6, rtol=1e-5)


def test_config_inferred_from_weights(tiny):
    path, _ = tiny
    config = infer_detr_config(load_torch_state_dict(str(path)))
    assert config == dict(num_classes=91, num_queries=12, hidden_dim=64, num_encoder_layers=2,
                          num_decoder_layers=3, dim_feedforward=128, pre_norm=False, backbone_depth=18,
                          position_embedding="sine")


def _r50_state_dict(fixtures_dir, extra_layer3_blocks=0):
    """A random state dict with every key and shape of the released DETR-R50 (R101 with extra blocks)."""
    rng = np.random.default_rng(0)
    sd = {}
    for line in (fixtures_dir / "official_detr_r50_keys.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, dtype, shape = line.split("\t")
        shape = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
        sd[key] = torch.from_numpy(rng.standard_normal(shape).astype(np.float32) * 0.01)
    for b in range(6, 6 + extra_layer3_blocks):
        for key in [k for k in sd if k.startswith("backbone.0.body.layer3.5.")]:
            sd[key.replace("layer3.5.", f"layer3.{b}.")] = sd[key].clone()
    return sd


@pytest.mark.parametrize("extra, depth", [(0, 50), (17, 101)])
def test_every_official_r50_r101_key_converts(fixtures_dir, tmp_path, extra, depth):
    sd = _r50_state_dict(fixtures_dir, extra)
    path = tmp_path / "detr.pth"
    torch.save({"model": sd}, path)
    model, variables = load_official_checkpoint(str(path), dilation=True)  # raises on any key left over
    assert (model.backbone_depth, model.hidden_dim, model.num_queries, model.num_classes) == (depth, 256, 100, 91)
    assert (model.num_encoder_layers, model.num_decoder_layers, model.dim_feedforward) == (6, 6, 2048)
    n_arrays = len(jax.tree_util.tree_leaves(variables))
    assert n_arrays == len([k for k in sd if not k.endswith("num_batches_tracked")])
    # A weight lands where the model reads it, transposed to a kernel.
    np.testing.assert_array_equal(
        variables["params"]["transformer"]["decoder_layers_5"]["multihead_attn"]["in_proj_kernel"],
        sd["transformer.decoder.layers.5.multihead_attn.in_proj_weight"].numpy().T)
    np.testing.assert_array_equal(variables["frozen"]["backbone"]["layer4_0"]["downsample_bn"]["var"],
                                  sd["backbone.0.body.layer4.0.downsample.1.running_var"].numpy())


def test_mismatched_checkpoint_is_refused(tiny, tmp_path):
    path, _ = tiny
    with pytest.raises(ValueError, match="class_embed.*mis-shaped|mis-shaped.*class_embed"):
        load_official_checkpoint(str(path), num_heads=4, num_classes=20)
    sd = torch.load(path, weights_only=True)["model"]
    del sd["transformer.decoder.layers.1.norm2.weight"]
    torch.save({"model": sd}, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="decoder_layers_1/norm2/scale"):
        load_official_checkpoint(str(tmp_path / "broken.pth"), num_heads=4)


def test_unreadable_checkpoint_names_the_file(tmp_path):
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="truncated.pth"):
        load_official_checkpoint(str(bad))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_official_checkpoint(str(tmp_path / "missing.pth"))


def test_missing_torch_says_how_to_install(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="pip install torch"):
        load_torch_state_dict(str(tiny[0]))


def test_torchvision_backbone_loads(tiny, tmp_path):
    """A torchvision-layout ResNet-18 state dict (random, with fc) becomes the DETR backbone."""
    path, _ = tiny
    official = torch.load(path, weights_only=True)["model"]
    tv = {k.replace("backbone.0.body.", ""): v.clone() + 1.0 for k, v in official.items()
          if k.startswith("backbone.0.body.")}
    tv["fc.weight"], tv["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    torch.save(tv, tmp_path / "resnet18.pth")
    model = DETR(num_queries=12, hidden_dim=64, num_heads=4, num_encoder_layers=2, num_decoder_layers=3,
                 dim_feedforward=128, backbone_depth=18)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    loaded = load_torchvision_backbone(str(tmp_path / "resnet18.pth"), variables, depth=18)
    np.testing.assert_array_equal(loaded["params"]["backbone"]["layer2_0"]["conv1"]["kernel"],
                                  tv["layer2.0.conv1.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(loaded["frozen"]["backbone"]["bn1"]["mean"], tv["bn1.running_mean"].numpy())
    # The rest of the model is untouched.
    np.testing.assert_array_equal(loaded["params"]["query_embed"], variables["params"]["query_embed"])
    with pytest.raises(ValueError, match="ResNet-50"):
        wrong = DETR(num_queries=12, hidden_dim=64, num_heads=4, num_encoder_layers=1, num_decoder_layers=1,
                     dim_feedforward=128, backbone_depth=50)
        load_torchvision_backbone(str(tmp_path / "resnet18.pth"),
                                  jax.eval_shape(lambda: wrong.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))),
                                  depth=50)


def test_finetuning_init_loads_all_but_the_class_head_and_the_training_aids(tiny):
    """config.init.detr_checkpoint with reinit_class_head (the finetune config): every official weight is loaded
    into a model for 5 classes with the training-only aids on; the class head, the extra query groups and the
    token heads keep their fresh initialisation. A checkpoint that does not fit is refused by name."""
    import flax

    from detr_jax.config import base_config
    from detr_jax.models import build_training_model
    from detr_jax.training.state import create_train_state

    path, _ = tiny
    official = infer_detr_config(load_torch_state_dict(str(path)))
    config = base_config()
    config.model.update(official, num_classes=5, num_heads=4)
    config.training_aids.update(num_query_groups=2, encoder_aux_loss=True, backbone_aux_stages=(2, 3))
    config.init.update(detr_checkpoint=str(path), reinit_class_head=True)
    model = build_training_model(config)
    state, _, _ = create_train_state(config, model, total_steps=10, steps_per_epoch=10)
    fresh = jax.jit(model.init)(jax.random.PRNGKey(config.seed), jnp.zeros((1, 64, 64, 3)))
    loaded = flax.traverse_util.flatten_dict({"params": state["params"], "frozen": state["frozen"]})
    _, reference = load_official_checkpoint(str(path), num_heads=4)
    reference, fresh = flax.traverse_util.flatten_dict(reference), flax.traverse_util.flatten_dict(fresh)
    assert len(loaded) == len(fresh)
    for key, value in loaded.items():
        if key[1] == "model" and key[2] != "class_embed":
            np.testing.assert_array_equal(value, reference[(key[0],) + key[2:]], err_msg="/".join(key))
        else:  # the class head and the aids
            np.testing.assert_array_equal(value, fresh[key], err_msg="/".join(key))
    assert {k[1] for k in loaded if k[1] != "model"} == {"group_query_embed", "enc_heads", "stage2_proj",
                                                         "stage2_norm", "stage2_heads", "stage3_proj",
                                                         "stage3_norm", "stage3_heads"}

    config.init.reinit_class_head = False  # 91-class head into a 5-class model
    with pytest.raises(ValueError, match="does not match the model config.*class_embed"):
        create_train_state(config, model, total_steps=10, steps_per_epoch=10)
