"""Every config in experiments/configs loads, builds its model, and names a known data source."""

import glob
import os
import re
import sys

import jax
import jax.numpy as jnp
import pytest
from ml_collections import config_flags  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
CONFIGS = sorted(glob.glob(os.path.join(REPO, "experiments", "configs", "*.py")))
CONFIGS = [c for c in CONFIGS if not c.endswith("__init__.py")]


def _load(path):
    import importlib.util
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_the_required_configs_exist():
    names = {os.path.basename(c)[:-3] for c in CONFIGS}
    assert {"default", "coco_r50", "coco_r50_dc5", "coco_r101", "finetune_coco_folder"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p))
def test_config_builds_its_model(path):
    from detr_jax.data import SOURCES
    from detr_jax.models.detr import build_model

    config = _load(path)
    assert config.data.source in SOURCES
    model = build_model(config)
    out = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))[0])
    assert out["pred_logits"].shape == (1, config.model.num_queries, config.model.num_classes + 1)


def test_official_recipe_values():
    config = _load(os.path.join(REPO, "experiments", "configs", "coco_r50.py"))
    opt = config.optimizer
    assert (opt.lr, opt.lr_backbone, opt.weight_decay, opt.grad_clip,
            opt.lr_drop_epochs) == (1e-4, 1e-5, 1e-4, 0.1, 200)
    assert (config.batch_size, config.num_epochs, config.model.num_queries,
            config.model.aux_loss) == (64, 300, 100, True)
    assert _load(os.path.join(REPO, "experiments", "configs", "coco_r50_dc5.py")).model.dilation
    assert _load(os.path.join(REPO, "experiments", "configs", "coco_r101.py")).model.backbone_depth == 101
    assert _load(os.path.join(REPO, "experiments", "configs", "finetune_coco_folder.py")).init.reinit_class_head


def _schema(config, prefix=""):
    """Dotted field names; the contents of the data sources' kwargs (different per source) are left out."""
    names = set()
    for key, value in config.items():
        name = prefix + key
        names.add(name)
        if hasattr(value, "items") and not key.endswith("kwargs"):
            names |= _schema(value, name + ".")
    return names


@pytest.mark.parametrize("path", CONFIGS + [os.path.join(REPO, "tests", "configs", "tiny.py")],
                         ids=lambda p: os.path.basename(p))
def test_every_config_has_exactly_the_base_schema(path):
    """One schema: a named config overrides fields of `base_config()`; it neither adds nor drops one."""
    from detr_jax.config import base_config, check_config

    config = _load(path)
    assert _schema(config) == _schema(base_config())
    if config.panoptic.freeze_detr:  # a mask-head stage: the user names the trained detector
        with pytest.raises(ValueError, match="init.detr_checkpoint must be the trained detector"):
            check_config(config)
        config.init.detr_checkpoint = "box_model_workdir"
    check_config(config)


@pytest.mark.parametrize("field, value, message", [
    ("loss.bbox_loss_type", "l2", "config.loss.bbox_loss_type must be 'l1' or 'smooth_l1', got 'l2'"),
    ("loss.matcher", "gpu", "config.loss.matcher must be 'auto', 'host' or 'device', got 'gpu'"),
    ("model.position_embedding", "rope", "config.model.position_embedding must be 'sine' or 'learned'"),
    ("model.backbone_norm", "layer", "config.model.backbone_norm must be 'frozen_bn', 'group' or 'batch'"),
    ("training_aids.num_query_groups", 0, "config.training_aids.num_query_groups must be an integer >= 1, got 0"),
    ("training_aids.backbone_aux_stages", (5,), "config.training_aids.backbone_aux_stages must be ResNet stages"),
    ("optimizer.schedule", "linear", "config.optimizer.schedule must be 'step', 'cosine' or 'constant'"),
    ("model.remat", "all", "config.model.remat must be 'none', 'backbone', 'transformer' or 'full', got 'all'"),
    ("loss.class_target", "soft", "config.loss.class_target must be 'hard' or 'iou', got 'soft'"),
])
def test_check_config_refuses_what_the_model_and_the_criterion_trust(field, value, message):
    """The model, the criterion and the optimizer no longer check these: check_config is the one place."""
    from detr_jax.config import base_config, check_config

    config = base_config()
    section, name = field.split(".")
    with config[section].ignore_type():
        config[section][name] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        check_config(config)


@pytest.mark.parametrize("field, value, message", [
    ("ema.decay", 1.0, "config.ema.decay must be in [0, 1) (0: no EMA), got 1.0"),  # the boundary: refused
    ("ema.decay", -0.1, "config.ema.decay must be in [0, 1)"),
    ("ema.decay", 0.0, None),  # the boundary: off
    ("ema.decay", 0.9999, None),
    ("ema.warmup_steps", -1, "config.ema.warmup_steps must be an integer >= 0 (0: no warm-up), got -1"),
    ("ema.warmup_steps", 0, None),  # the boundary
    ("loss.class_target_alpha", 0.0, "config.loss.class_target_alpha must be > 0, got 0.0"),  # the boundary
    ("loss.class_target_alpha", 1e-6, None),
    ("xla_flags", "--xla_cpu_a=1  --xla_cpu_b=x,-y", None),
    ("xla_flags", "", None),  # none
    ("xla_flags", "--xla_cpu_a=1 --xla_cpu_b", "config.xla_flags must be '' or whitespace-separated '--name=value'"),
    ("xla_flags", "-xla_cpu_a=1", "config.xla_flags must be"),
])
def test_ema_class_target_and_xla_flags_values_at_their_boundaries(field, value, message):
    from detr_jax.config import base_config, check_config

    config = base_config()
    node, name = (config, field) if "." not in field else (config[field.split(".")[0]], field.split(".")[1])
    node[name] = value
    if message is None:
        check_config(config)
    else:
        with pytest.raises(ValueError, match=re.escape(message)):
            check_config(config)


@pytest.mark.parametrize("depth, refused", [(18, True), (34, True), (50, False), (101, False)])
def test_dilation_needs_a_bottleneck_resnet(depth, refused):
    """DC5 with ResNet-18/34 is refused before any work (torchvision's BasicBlock has no dilation either)."""
    from detr_jax.config import base_config, check_config

    config = base_config()
    config.model.update(dict(backbone_depth=depth, dilation=True))
    if refused:
        with pytest.raises(ValueError, match=f"config.model.dilation must be False with backbone_depth={depth}"):
            check_config(config)
    else:
        check_config(config)


def test_check_config_refuses_a_misspelt_source_argument():
    from detr_jax.config import base_config, check_config

    config = base_config()
    config.data.source_kwargs = dict(config.data.source_kwargs.to_dict(), label_sapce="official91")
    with pytest.raises(ValueError, match="config.data.source_kwargs: .*'label_sapce'.*label_space"):
        check_config(config)


@pytest.mark.parametrize("changes, message", [
    (dict(grad_accum_steps=0), "config.grad_accum_steps must be an integer >= 1, got 0"),
    (dict(grad_accum_steps=3), "config.batch_size must be a multiple of grad_accum_steps=3, got 64"),
    (dict(grad_accum_steps=2, dn_groups=1), "config.training_aids.dn_groups must be 0 with grad_accum_steps > 1"),
    (dict(grad_accum_steps=2, backbone_norm="batch"), "config.model.backbone_norm must be 'frozen_bn' or 'group' "
     "with grad_accum_steps > 1"),
    (dict(grad_accum_steps=64), None),  # a micro-batch of one image
    (dict(grad_accum_steps=1, dn_groups=1, backbone_norm="batch"), None),
])
def test_check_config_refuses_what_gradient_accumulation_cannot_make_exact(changes, message):
    from detr_jax.config import base_config, check_config

    config = base_config()
    config.grad_accum_steps = changes["grad_accum_steps"]
    config.training_aids.dn_groups = changes.get("dn_groups", 0)
    config.model.backbone_norm = changes.get("backbone_norm", "frozen_bn")
    if message is None:
        check_config(config)
    else:
        with pytest.raises(ValueError, match=re.escape(message)):
            check_config(config)
