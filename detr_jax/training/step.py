"""The train step: forward -> criterion -> gradient -> update, one jit-compiled XLA program, data parallel.

`train_step(state, batch) -> (state, metrics)` is pure. What the loss is lives in `criterion.Criterion`; the
optimizer (parameter groups, clipping, schedules) in `training.state`.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from detr_jax.criterion import Criterion
from detr_jax.data.transforms import normalize_images
from detr_jax.models.aids import DETRWithAids, token_grid
from detr_jax.models.backbone import FROZEN_COLLECTION, downsample_mask
from detr_jax.ops import sharding
from detr_jax.training.state import TrainState, ema_decay


def make_train_step(model: DETRWithAids, tx, config: ml_collections.ConfigDict, mesh) -> Callable:
    """The jit-compiled `train_step(state, batch) -> (state, metrics)`, data parallel over `mesh`.

    The forward, loss, gradient all-reduce and update are one XLA program. With the host matcher the Hungarian
    assignment leaves the device once per step, per device shard, so each host solves the images it holds
    (`criterion.HungarianMatcher`). The loss is computed on the global batch: num_boxes is the global count (the
    official all_reduce(num_boxes) / world_size with DDP's gradient averaging gives the same).

    A non-finite loss or gradient leaves the parameters as they were and records its step in
    state["nonfinite_step"]; the loop stops on it (`loop.check_finite`). A state with "ema" (config.ema) also
    updates the parameters' moving average (`state.ema_decay`).
    """
    criterion = Criterion.from_config(config, model, mesh)
    # backbone_norm "batch": training updates the running statistics in the "frozen" collection.
    mutable = [FROZEN_COLLECTION] if model.detector.backbone_norm == "batch" else False
    accum = int(config.grad_accum_steps)

    def loss_fn(params, frozen, batch, rng, shares=None):
        images = normalize_images(batch["images"], batch["pixel_mask"])  # uint8 from the loader
        rngs, extra = {"dropout": rng}, {}
        if model.dn_groups > 0:  # denoising queries: noised targets, the noise a function of (seed, step)
            rngs["denoising"] = jax.random.fold_in(rng, 1)
            extra["targets"] = criterion.targets(batch)
        outputs = model.apply({"params": params, FROZEN_COLLECTION: frozen}, images,
                              pixel_mask=batch["pixel_mask"], train=True, rngs=rngs, mutable=mutable, **extra)
        (outputs, aids), frozen = outputs if mutable else (outputs, {FROZEN_COLLECTION: frozen})
        loss, terms = criterion(outputs, batch, aids, shares)
        return loss, (terms, frozen[FROZEN_COLLECTION])

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def accumulated_gradients(params, frozen, batch, rng):
        """Gradient accumulation: the gradient and terms of the global batch, as the sum of its `accum`
        micro-batches' shares (`Criterion.__call__(shares=)`), one micro-batch in memory at a time."""
        micro = micro_batches(batch, accum, mesh)  # [k, B / k, ...]
        first = jax.tree_util.tree_map(lambda x: x[0], micro)
        shapes = jax.eval_shape(lambda: model.apply({"params": params, FROZEN_COLLECTION: frozen},
                                                    normalize_images(first["images"], first["pixel_mask"]),
                                                    pixel_mask=first["pixel_mask"], train=False))
        shares = criterion.normalisers(batch, token_grids(shapes[1], batch["pixel_mask"]))
        zeros = lambda tree: jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), tree)  # noqa: E731
        terms0 = jax.eval_shape(lambda: grad_fn(params, frozen, first, rng, shares)[1][0])

        def add(carry, xs):
            micro_batch, index = xs
            grads, (terms, _) = grad_fn(params, frozen, micro_batch, jax.random.fold_in(rng, index), shares)
            return jax.tree_util.tree_map(jnp.add, carry, (grads, terms)), None

        (grads, terms), _ = jax.lax.scan(add, (zeros(params), zeros(terms0)), (micro, jnp.arange(accum)))
        return grads, (terms, frozen)

    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), state["step"])
        if accum == 1:
            grads, (terms, frozen) = grad_fn(state["params"], state["frozen"], batch, rng)
        else:
            grads, (terms, frozen) = accumulated_gradients(state["params"], state["frozen"], batch, rng)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(terms["loss"]) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = {"step": state["step"] + 1, "params": keep(params, state["params"]),
                     "frozen": keep(frozen, state["frozen"]), "opt_state": keep(opt_state, state["opt_state"]),
                     "nonfinite_step": jnp.where(finite | (state["nonfinite_step"] >= 0), state["nonfinite_step"],
                                                 state["step"])}
        if "ema" in state:  # the moving average of what this step keeps (batch-norm statistics too, when trained)
            decay = ema_decay(config, state["step"] + 1)
            average = lambda new, old: optax.incremental_update(new, old, 1.0 - decay)  # noqa: E731
            ema = {"params": average(params, state["ema"]["params"]),
                   "frozen": average(frozen, state["ema"]["frozen"]) if mutable else frozen}
            new_state["ema"] = keep(ema, state["ema"])
        metrics = dict(terms, grad_norm=grad_norm, num_boxes=batch["mask"].sum())
        return new_state, metrics

    repl = sharding.replicated(mesh)
    return jax.jit(train_step, in_shardings=(repl, sharding.batch_sharded(mesh)), out_shardings=(repl, repl),
                   donate_argnums=(0,))


def micro_batches(batch, accum: int, mesh):
    """Split a global batch [B, ...], sharded over the mesh's devices, into `accum` micro-batches [accum, B / accum,
    ...]: micro-batch j holds the j-th part of every device's shard, so each stays spread over every device and
    nothing moves between devices."""
    devices = mesh.size

    def split(x):
        per_device = x.shape[0] // devices
        x = x.reshape((devices, accum, per_device // accum) + x.shape[1:])
        x = jnp.swapaxes(x, 0, 1).reshape((accum, x.shape[0] * x.shape[2]) + x.shape[3:])
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, sharding.DATA_AXIS)))

    return jax.tree_util.tree_map(split, batch)


def token_grids(aids_shapes, pixel_mask):
    """{aid name: (token_mask [B, S], token_centres [B, S, 2])} of the token-head aids, for the global batch's
    `pixel_mask` bool [B, H, W]: each aid's feature map is the padded image at its stride (buckets are multiples
    of 32, so S = (H / stride) * (W / stride))."""
    out = {}
    height, width = pixel_mask.shape[1:]
    for name, shapes in aids_shapes.items():
        if "token_mask" not in shapes:  # the denoising queries
            continue
        tokens = shapes["token_mask"].shape[1]
        stride = round((height * width / tokens) ** 0.5)
        h, w = height // stride, width // stride
        if h * w != tokens:
            raise ValueError(f"gradient accumulation: the {name} tokens ({tokens}) are no grid of the padded "
                             f"{height}x{width} batch at stride {stride}")
        out[name] = token_grid(downsample_mask(pixel_mask, (h, w)))
    return out
