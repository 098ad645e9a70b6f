"""The optimizer (AdamW, parameter groups, schedules, clipping) and the train state: what the loop, the tests and the
benchmarks all start from.

    model = models.build_training_model(config)
    state, tx, schedules = create_train_state(config, model, total_steps, steps_per_epoch)
"""

import functools
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from detr_jax.models.aids import MODEL, DETRWithAids
from detr_jax.models.backbone import FROZEN_COLLECTION
from detr_jax.models.detr import parameter_groups
from detr_jax.models.segmentation import DETRsegm, segm_parameter_groups
from detr_jax.weights.official import load_pretrained

TrainState = Dict[str, Any]  # {"step", "params", "frozen", "opt_state", "nonfinite_step"[, "ema"]}


def learning_rate_schedule(base_lr: float, config: ml_collections.ConfigDict, total_steps: int,
                           steps_per_epoch: int) -> optax.Schedule:
    """Step decay (official: x0.1 at `lr_drop_epochs`), or cosine; optional linear warmup in front."""
    opt = config.optimizer
    warmup = int(opt.warmup_steps)
    if opt.schedule == "step":
        drop_step = int(opt.lr_drop_epochs * steps_per_epoch)
        main = optax.piecewise_constant_schedule(base_lr, {max(drop_step - warmup, 1): 0.1})
    elif opt.schedule == "cosine":
        main = optax.cosine_decay_schedule(base_lr, max(total_steps - warmup, 1), alpha=opt.cosine_alpha)
    else:  # "constant" (config.SCHEDULES)
        main = optax.constant_schedule(base_lr)
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, base_lr, warmup), main], [warmup])


def training_parameter_groups(params, train_stem: bool = False, freeze_detr: bool = False) -> Dict:
    """The optimizer's label of every parameter of a `DETRWithAids` tree: the detector's (`detr.parameter_groups`,
    a `DETRsegm`'s by `segm_parameter_groups`) under "model"; the aids train with the transformer's learning rate."""
    def model_groups(sub):
        if "mask_head" in sub:
            return segm_parameter_groups(sub, train_stem, freeze_detr)
        return parameter_groups(sub, train_stem)

    return {name: model_groups(sub) if name == MODEL else jax.tree_util.tree_map(lambda _: "transformer", sub)
            for name, sub in params.items()}


def build_optimizer(config: ml_collections.ConfigDict, params, total_steps: int, steps_per_epoch: int):
    """AdamW with the backbone at its own learning rate, frozen parameters never updated, global-norm clipping
    of the gradients (before Adam, as torch's clip_grad_norm_ before optimizer.step()).

    Args:
        params: a `DETRWithAids` parameter tree (or its shapes).
    Returns:
        (optax transform, {"transformer", "backbone": schedule}).
    """
    opt = config.optimizer
    labels = training_parameter_groups(params, train_stem=config.model.train_stem,
                                       freeze_detr=config.panoptic.enabled and config.panoptic.freeze_detr)
    schedules = {"transformer": learning_rate_schedule(opt.lr, config, total_steps, steps_per_epoch),
                 "backbone": learning_rate_schedule(opt.lr_backbone, config, total_steps, steps_per_epoch)}
    groups = {name: optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=opt.weight_decay)
              for name, schedule in schedules.items()}
    if opt.lr_backbone <= 0:  # the official `lr_backbone=0` means "do not train the backbone"
        groups["backbone"] = optax.set_to_zero()
    groups["frozen"] = optax.set_to_zero()
    # Frozen parameters have no gradient in the official code: zero theirs before the global norm is taken.
    tx = optax.chain(optax.masked(optax.set_to_zero(), jax.tree_util.tree_map(lambda group: group == "frozen", labels)),
                     optax.clip_by_global_norm(opt.grad_clip) if opt.grad_clip > 0 else optax.identity(),
                     optax.multi_transform(groups, labels))
    return tx, schedules


def create_train_state(config: ml_collections.ConfigDict, model: DETRWithAids, total_steps: int,
                       steps_per_epoch: int, sample_hw: Tuple[int, int] = (64, 64), pretrained_detector=None):
    """Fresh parameters (with the pretrained weights of `config.init`), the optimizer and its state.

    Parameter shapes do not depend on the image size, so a small `sample_hw` initialises them.
    `pretrained_detector`: when config.init.detr_checkpoint names a detr_jax work directory, its detector's
    {"params", "frozen"} (read by the caller with `checkpoints.load_workdir_checkpoint`).
    Returns (state, tx, schedules): state {"step", "params", "frozen", "opt_state", "nonfinite_step"}, and "ema"
    {"params", "frozen"} (the moving average, starting at the parameters; the batch-norm statistics averaged too
    when training updates them) when config.ema.decay > 0.
    """
    x = jnp.zeros((1,) + tuple(sample_hw) + (3,), jnp.float32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(config.seed), x)
    params, frozen = dict(variables["params"]), dict(variables.get(FROZEN_COLLECTION, {}))
    init = config.init
    if init.backbone_checkpoint or init.detr_checkpoint:
        # The pretrained weights are a DETR's: into the detector (inside the mask head's model for panoptic).
        path = ("model", "detr") if isinstance(model.model, DETRsegm) else ("model",)
        sub = lambda tree: functools.reduce(lambda t, k: t.get(k, {}), path, tree)  # noqa: E731
        loaded = load_pretrained(init, model.detector, {"params": sub(params), FROZEN_COLLECTION: sub(frozen)},
                                 detector_variables=pretrained_detector)
        params = _replace(params, path, loaded["params"])
        if loaded.get(FROZEN_COLLECTION):
            frozen = _replace(frozen, path, loaded[FROZEN_COLLECTION])
    tx, schedules = build_optimizer(config, params, total_steps, steps_per_epoch)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "frozen": frozen, "opt_state": tx.init(params),
             "nonfinite_step": jnp.full((), -1, jnp.int32)}
    if config.ema.decay > 0:
        state["ema"] = jax.tree_util.tree_map(jnp.array, {"params": params, "frozen": frozen})  # copies: donated
    return state, tx, schedules


def ema_decay(config: ml_collections.ConfigDict, updates):
    """The EMA's decay after `updates` updates (int array): config.ema.decay, times 1 - exp(-updates / warmup_steps)
    with a warm-up (RT-DETR's), so the average follows the parameters closely at first."""
    decay = jnp.float32(config.ema.decay)
    if config.ema.warmup_steps > 0:
        decay = decay * (1.0 - jnp.exp(-updates.astype(jnp.float32) / config.ema.warmup_steps))
    return decay


def _replace(tree: Dict, path: Tuple[str, ...], value) -> Dict:
    """A copy of the nested dict `tree` with `value` at `path`."""
    if not path:
        return value
    return dict(tree, **{path[0]: _replace(dict(tree.get(path[0], {})), path[1:], value)})
