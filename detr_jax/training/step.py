"""The train step: forward -> criterion -> gradient -> update, one jit-compiled XLA program, data parallel.

`train_step(state, batch) -> (state, metrics)` is pure. What the loss is lives in `criterion.Criterion`; the
optimizer (parameter groups, clipping, schedules) in `training.state`.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from detr_jax.criterion import Criterion
from detr_jax.data.transforms import normalize_images
from detr_jax.models.aids import DETRWithAids
from detr_jax.models.backbone import FROZEN_COLLECTION
from detr_jax.ops import sharding
from detr_jax.training.state import TrainState


def make_train_step(model: DETRWithAids, tx, config: ml_collections.ConfigDict, mesh) -> Callable:
    """The jit-compiled `train_step(state, batch) -> (state, metrics)`, data parallel over `mesh`.

    The forward, loss, gradient all-reduce and update are one XLA program. With the host matcher the Hungarian
    assignment leaves the device once per step, per device shard, so each host solves the images it holds
    (`criterion.HungarianMatcher`). The loss is computed on the global batch: num_boxes is the global count (the
    official all_reduce(num_boxes) / world_size with DDP's gradient averaging gives the same).

    A non-finite loss or gradient leaves the parameters as they were and records its step in
    state["nonfinite_step"]; the loop stops on it (`loop.check_finite`).
    """
    criterion = Criterion.from_config(config, model, mesh)
    # backbone_norm "batch": training updates the running statistics in the "frozen" collection.
    mutable = [FROZEN_COLLECTION] if model.detector.backbone_norm == "batch" else False

    def loss_fn(params, frozen, batch, rng):
        images = normalize_images(batch["images"], batch["pixel_mask"])  # uint8 from the loader
        rngs, extra = {"dropout": rng}, {}
        if model.dn_groups > 0:  # denoising queries: noised targets, the noise a function of (seed, step)
            rngs["denoising"] = jax.random.fold_in(rng, 1)
            extra["targets"] = criterion.targets(batch)
        outputs = model.apply({"params": params, FROZEN_COLLECTION: frozen}, images,
                              pixel_mask=batch["pixel_mask"], train=True, rngs=rngs, mutable=mutable, **extra)
        (outputs, aids), frozen = outputs if mutable else (outputs, {FROZEN_COLLECTION: frozen})
        loss, terms = criterion(outputs, batch, aids)
        return loss, (terms, frozen[FROZEN_COLLECTION])

    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), state["step"])
        grads, (terms, frozen) = jax.grad(loss_fn, has_aux=True)(state["params"], state["frozen"], batch, rng)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(terms["loss"]) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = {"step": state["step"] + 1, "params": keep(params, state["params"]),
                     "frozen": keep(frozen, state["frozen"]), "opt_state": keep(opt_state, state["opt_state"]),
                     "nonfinite_step": jnp.where(finite | (state["nonfinite_step"] >= 0), state["nonfinite_step"],
                                                 state["step"])}
        metrics = dict(terms, grad_norm=grad_norm, num_boxes=batch["mask"].sum())
        return new_state, metrics

    repl = sharding.replicated(mesh)
    return jax.jit(train_step, in_shardings=(repl, sharding.batch_sharded(mesh)), out_shardings=(repl, repl),
                   donate_argnums=(0,))
