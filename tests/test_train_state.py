"""The optimizer and the train state of `detr_jax.training.state`: gradient clipping where torch does it (on the
gradients, before Adam), and a dropout mask that changes every step."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from detr_jax import training
from detr_jax.data import build_data
from detr_jax.models import build_training_model
from detr_jax.ops import sharding
from detr_jax.training.state import create_train_state, training_parameter_groups
from tests.configs import tiny


def _trained(labels):
    """A mask of the parameters the optimizer trains (the frozen stem and stage 1 excluded)."""
    return jax.tree_util.tree_map(lambda label: label != "frozen", labels)


def _norm(tree, mask):
    return float(optax.tree.norm(jax.tree_util.tree_map(lambda x, m: x if m else jnp.zeros_like(x), tree, mask)))


@pytest.fixture(scope="module")
def clipped():
    """The tiny config's train state and optimizer with the official grad_clip 0.1 and a huge learning rate."""
    config = tiny.get_config()
    config.optimizer.update(grad_clip=0.1, lr=10.0, lr_backbone=10.0, weight_decay=0.0, warmup_steps=0)
    state, tx, _ = create_train_state(config, build_training_model(config), total_steps=100, steps_per_epoch=100)
    return state, tx, _trained(training_parameter_groups(state["params"]))


def test_gradients_are_clipped_before_adam(clipped):
    """A gradient of global norm 1000 enters Adam's first moment clipped to norm 0.1: mu = (1 - b1) * g_clipped
    has norm 0.01 (clipping the updates instead would leave it at 100)."""
    state, tx, trained = clipped
    params = state["params"]
    grads = jax.tree_util.tree_map(lambda x: jnp.ones_like(x), params)
    grads = jax.tree_util.tree_map(lambda g: g * (1000.0 / float(optax.tree.norm(grads))), grads)
    _, opt_state = jax.jit(tx.update)(grads, tx.init(params), params)
    moments = [v for _, v in optax.tree.get_all_with_path(opt_state, "mu")]
    norm = float(np.sqrt(sum(float(optax.tree.norm(m)) ** 2 for m in moments)))
    assert norm == pytest.approx((1 - 0.9) * 0.1, rel=1e-3)


def test_a_large_learning_rate_update_is_not_clipped(clipped):
    """Clipping bounds the gradient, not the step: Adam's first step moves every trained parameter by ~lr, so at
    lr 10 the update's norm is far above the clip norm 0.1."""
    state, tx, trained = clipped
    params = state["params"]
    grads = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 1e-3), params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    n_trained = sum(x.size for x, m in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(trained)) if m)
    assert _norm(updates, trained) == pytest.approx(10.0 * np.sqrt(n_trained), rel=1e-3)


def test_dropout_changes_with_the_step_and_repeats_within_it():
    """With dropout 0.1 the same batch and parameters give different losses at steps 0 and 1 (a new dropout mask
    every step), and exactly the same loss when step 0 is run again (the mask is a function of seed and step)."""
    config = tiny.get_config()
    config.model.dropout = 0.1
    mesh = sharding.make_mesh()
    model = build_training_model(config)
    state, tx, _ = create_train_state(config, model, total_steps=100, steps_per_epoch=100)
    initial = jax.device_get(state)
    with build_data(config, "train", train=False) as loader:
        batch = sharding.global_batch(next(iter(loader)), mesh)
    step = training.make_train_step(model, tx, config, mesh)

    def loss_at(step_number):  # the step donates its input: a fresh copy each time
        fresh = dict(copy.deepcopy(initial), step=np.asarray(step_number, np.int32))
        _, metrics = step(jax.device_put(fresh, sharding.replicated(mesh)), batch)
        return float(metrics["loss"])

    first, again, second = loss_at(0), loss_at(0), loss_at(1)
    assert first == again
    assert abs(first - second) > 1e-4 * abs(first), (first, second)
