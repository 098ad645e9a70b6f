"""detr_jax.criterion.matcher against an independent numpy cost + scipy solve (the official HungarianMatcher)."""

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from detr_jax.criterion import matcher

NUM_CLASSES = 7
COSTS = dict(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0)

# Jitted as in training (and one XLA compile is much faster than op-by-op dispatch).
_match = jax.jit(functools.partial(matcher.hungarian_match, **COSTS))


def _numpy_cost(logits, boxes, labels, tgt_boxes):
    """Official HungarianMatcher cost for one image, in float64 numpy: [N, C+1], [N, 4], [M], [M, 4] -> [N, M]."""
    logits = logits.astype(np.float64)
    prob = np.exp(logits - logits.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    cost_class = -prob[:, labels]
    cost_bbox = np.abs(boxes[:, None, :] - tgt_boxes[None, :, :]).sum(-1)

    def xyxy(b):
        return np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], -1).astype(np.float64)

    b1, b2 = xyxy(boxes), xyxy(tgt_boxes)
    area1 = (b1[:, 2] - b1[:, 0]) * (b1[:, 3] - b1[:, 1])
    area2 = (b2[:, 2] - b2[:, 0]) * (b2[:, 3] - b2[:, 1])
    inter_wh = np.clip(np.minimum(b1[:, None, 2:], b2[None, :, 2:]) - np.maximum(b1[:, None, :2], b2[None, :, :2]),
                       0, None)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    hull_wh = np.maximum(b1[:, None, 2:], b2[None, :, 2:]) - np.minimum(b1[:, None, :2], b2[None, :, :2])
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    giou = inter / union - (hull - union) / hull
    return COSTS["cost_bbox"] * cost_bbox + COSTS["cost_class"] * cost_class - COSTS["cost_giou"] * giou


def _random_batch(seed, num_layers=2, batch_size=3, num_queries=8, num_slots=5, num_valid=(3, 0, 5)):
    rng = np.random.default_rng(seed)

    def boxes(*shape):
        return np.concatenate([rng.uniform(0.2, 0.8, shape + (2,)), rng.uniform(0.05, 0.4, shape + (2,))],
                              -1).astype(np.float32)

    logits = rng.normal(size=(num_layers, batch_size, num_queries, NUM_CLASSES + 1)).astype(np.float32)
    mask = np.arange(num_slots)[None, :] < np.array(num_valid)[:, None]
    # Padded slots hold random labels and boxes: they must be ignored, whatever they contain.
    targets = {"labels": rng.integers(0, NUM_CLASSES, (batch_size, num_slots)).astype(np.int32),
               "boxes": boxes(batch_size, num_slots), "mask": mask}
    return logits, boxes(num_layers, batch_size, num_queries), targets


def _reference_indices(logits, boxes, targets):
    num_layers, batch_size = logits.shape[:2]
    expected = np.full((num_layers, batch_size, targets["mask"].shape[1]), -1, np.int32)
    for layer in range(num_layers):
        for b in range(batch_size):
            valid = np.flatnonzero(targets["mask"][b])
            cost = _numpy_cost(logits[layer, b], boxes[layer, b], targets["labels"][b, valid],
                               targets["boxes"][b, valid])
            rows, cols = linear_sum_assignment(cost)
            expected[layer, b, valid[cols]] = rows
    return expected


def test_cost_matrix_matches_numpy():
    logits, boxes, targets = _random_batch(0)
    cost = jax.jit(functools.partial(matcher.match_cost_matrix, **COSTS))(
        logits[0], boxes[0], targets["labels"], targets["boxes"])
    assert cost.shape == (3, 8, 5)
    for b in range(3):
        ref = _numpy_cost(logits[0, b], boxes[0, b], targets["labels"][b], targets["boxes"][b])
        np.testing.assert_allclose(cost[b], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_assignment_matches_scipy_with_padding(seed):
    logits, boxes, targets = _random_batch(seed)
    indices = np.asarray(_match(logits, boxes, targets))
    assert indices.shape == (2, 3, 5) and indices.dtype == np.int32
    np.testing.assert_array_equal(indices, _reference_indices(logits, boxes, targets))
    # Padded slots (and the image with no targets at all) stay unmatched.
    assert (indices[:, ~targets["mask"]] == -1).all()
    assert (indices[:, 1] == -1).all()
    # A query serves at most one target.
    for layer in range(2):
        for b in range(3):
            matched = indices[layer, b][indices[layer, b] >= 0]
            assert len(set(matched.tolist())) == len(matched)


def test_more_targets_than_queries_leaves_extra_targets_unmatched():
    logits, boxes, targets = _random_batch(3, num_queries=3, num_valid=(5, 2, 4))
    indices = np.asarray(_match(logits, boxes, targets))
    np.testing.assert_array_equal(indices, _reference_indices(logits, boxes, targets))
    assert ((indices >= 0).sum(-1) == np.minimum(3, targets["mask"].sum(-1))).all()


def test_one_host_call_for_all_layers_and_images(monkeypatch):
    calls = []

    def counting(costs, mask):
        calls.append(costs.shape)
        return host_fn(costs, mask)

    host_fn = matcher._assign_on_host
    monkeypatch.setattr(matcher, "_assign_on_host", counting)
    logits, boxes, targets = _random_batch(4, num_layers=6)
    jax.block_until_ready(jax.jit(matcher.hungarian_match)(logits, boxes, targets))
    assert calls == [(6, 3, 8, 5)]


def test_non_finite_costs_do_not_raise():
    logits, boxes, targets = _random_batch(5)
    logits[0, 0, 0, 0] = np.nan
    boxes[1, 2, :, :] = np.inf
    indices = np.asarray(_match(logits, boxes, targets))
    assert ((indices >= 0).sum(-1) == targets["mask"].sum(-1)).all()


def test_no_gradient_through_matching():
    logits, boxes, targets = _random_batch(6)

    def f(pred_logits, pred_boxes):
        indices = matcher.hungarian_match(pred_logits, pred_boxes, targets)
        return (pred_logits.sum() + pred_boxes.sum()) * 0 + indices.sum().astype(jnp.float32)

    grads = jax.jit(jax.grad(f, argnums=(0, 1)))(logits, boxes)
    assert all(np.all(np.asarray(g) == 0) for g in grads)


def test_works_inside_shard_map_one_call_per_shard():
    # Two host "devices" need XLA_FLAGS before jax starts, hence a fresh interpreter.
    script = textwrap.dedent("""
        import jax, numpy as np
        from jax.sharding import Mesh, PartitionSpec as P
        import test_matcher as t
        from detr_jax.criterion import matcher
        shapes, host_fn = [], matcher._assign_on_host
        matcher._assign_on_host = lambda c, m: shapes.append(c.shape) or host_fn(c, m)
        logits, boxes, targets = t._random_batch(7, batch_size=4, num_valid=(3, 0, 5, 2))
        mesh = Mesh(np.array(jax.devices()), ("data",))
        batch = P(None, "data")  # [L, B, ...]: shard the image axis
        match = jax.jit(jax.shard_map(lambda l, b, tg: matcher.hungarian_match(l, b, tg, **t.COSTS),
                                      mesh=mesh, in_specs=(batch, batch, P("data")), out_specs=batch))
        indices = np.asarray(match(logits, boxes, targets))
        assert len(jax.devices()) == 2
        assert shapes == [(2, 2, 8, 5)] * 2, shapes  # each shard solves only its local images
        np.testing.assert_array_equal(indices, t._reference_indices(logits, boxes, targets))
    """)
    tests_dir = Path(__file__).resolve().parent
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(tests_dir), str(tests_dir.parent)]))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_assignment_is_optimal_against_brute_force():
    """On small random cost matrices the host assignment's total cost is the minimum over all injections
    of the valid targets into the queries (brute force over permutations)."""
    import itertools

    from detr_jax.criterion.matcher import _assign_on_host

    rng = np.random.default_rng(7)
    for trial in range(200):
        n, m = int(rng.integers(1, 7)), int(rng.integers(1, 5))
        costs = rng.standard_normal((1, 1, n, m))
        mask = rng.random((1, m)) < 0.8
        indices = _assign_on_host(costs, mask)[0, 0]
        valid = np.flatnonzero(mask[0])
        assert np.all(indices[~mask[0]] == -1)
        k = min(len(valid), n)
        if k == 0:
            continue
        # Targets left unmatched (more targets than queries) are -1; every query is used at most once.
        matched = indices[valid] >= 0
        assert matched.sum() == k and len(set(indices[valid][matched])) == k
        ours = costs[0, 0, indices[valid][matched], valid[matched]].sum()
        best = min(costs[0, 0, list(queries), list(targets)].sum()
                   for targets in itertools.combinations(valid, k)
                   for queries in itertools.permutations(range(n), k))
        assert ours == pytest.approx(best, abs=1e-9), trial


# ---- the device solver ---------------------------------------------------------------------------------------
_device_assign = jax.jit(matcher._assign_on_device)


def _matched_cost(costs, indices, mask):
    """float64 total cost [L, B] of the assignment `indices` [L, B, M] (-1: unmatched) over costs [L, B, N, M]."""
    total = np.zeros(costs.shape[:2])
    for layer, b, slot in zip(*np.nonzero(indices >= 0)):
        assert mask[b, slot], "a padded slot was matched"
        total[layer, b] += costs[layer, b, indices[layer, b, slot], slot]
    return total


@pytest.mark.parametrize("n,m,ties", [(8, 5, False), (20, 12, False), (3, 6, False), (10, 10, False), (8, 5, True)])
def test_device_solver_total_cost_equals_scipy(n, m, ties):
    """Random costs with padded slots, images without targets and, with `ties`, costs rounded to a coarse grid
    (many equal optima): the device solver's total matched cost equals scipy's for every (layer, image)."""
    rng = np.random.default_rng(n * 100 + m + ties)
    costs = rng.standard_normal((3, 6, n, m)).astype(np.float32)
    if ties:
        costs = np.round(costs * 2) / 2
    mask = rng.random((6, m)) < 0.7
    mask[0] = False  # no targets
    mask[1] = True  # every slot real (M > N when m > n: more targets than queries)
    host = matcher._assign_on_host(costs, mask)
    device = np.asarray(_device_assign(costs, mask))
    assert device.shape == host.shape and device.dtype == np.int32
    np.testing.assert_array_equal(device >= 0, host >= 0)  # the same slots matched (all real ones, or N of them)
    for layer in range(3):
        for b in range(6):
            matched = device[layer, b][device[layer, b] >= 0]
            assert len(set(matched.tolist())) == len(matched)  # a query serves one target
    np.testing.assert_allclose(_matched_cost(costs, device, mask), _matched_cost(costs, host, mask), atol=1e-5)
    if not ties:  # a unique optimum: the same assignment
        np.testing.assert_array_equal(device, host)


def test_device_solver_through_hungarian_match_and_losses():
    """The whole match (costs + device solve) equals the host one, and so do the set-criterion losses."""
    from detr_jax.criterion.set_losses import set_losses

    logits, boxes, targets = _random_batch(8, num_layers=2, num_valid=(3, 0, 5))
    host = np.asarray(_match(logits, boxes, targets))
    device = np.asarray(jax.jit(functools.partial(matcher.hungarian_match, solver="device", **COSTS))(
        logits, boxes, targets))
    np.testing.assert_array_equal(device, host)
    outputs = {"pred_logits": logits[-1], "pred_boxes": boxes[-1],
               "aux_outputs": [{"pred_logits": logits[0], "pred_boxes": boxes[0]}]}
    coefs = dict(num_classes=NUM_CLASSES, eos_coef=0.1, ce_loss_coef=1.0, bbox_loss_coef=5.0, giou_loss_coef=2.0)
    loss_host = set_losses(outputs, targets, host, **coefs)
    loss_device = set_losses(outputs, targets, device, **coefs)
    for key in loss_host:
        np.testing.assert_allclose(np.asarray(loss_device[key]), np.asarray(loss_host[key]), rtol=1e-6, err_msg=key)


def test_device_solver_has_no_host_callback():
    logits, boxes, targets = _random_batch(9)
    jaxpr = str(jax.make_jaxpr(functools.partial(matcher.hungarian_match, solver="device", **COSTS))(
        logits, boxes, targets))
    assert "callback" not in jaxpr
    host_jaxpr = str(jax.make_jaxpr(functools.partial(matcher.hungarian_match, solver="host", **COSTS))(
        logits, boxes, targets))
    assert "pure_callback" in host_jaxpr  # the check would see one


def test_device_solver_non_finite_costs():
    logits, boxes, targets = _random_batch(5)
    logits[0, 0, 0, 0] = np.nan
    boxes[1, 2, :, :] = np.inf
    indices = np.asarray(jax.jit(functools.partial(matcher.hungarian_match, solver="device", **COSTS))(
        logits, boxes, targets))
    assert ((indices >= 0).sum(-1) == targets["mask"].sum(-1)).all()


def test_auto_is_the_host_solver_everywhere():
    """Until the device solver is measured faster on an accelerator, "auto" is the host solver (BENCHMARKS.md)."""
    assert matcher.resolve_solver("auto") == "host"
    assert matcher.resolve_solver("device") == "device" and matcher.resolve_solver("host") == "host"
