"""Denoising training (DN-DETR, `models.aids.DenoisingQueries`, `criterion.denoising`): the attention mask, the
reconstruction targets, the noise, and that with dn_groups = 0 nothing changes.

The train step's side (the noise is a function of the seed and the step; the matching queries' losses do not
move when denoising queries are added) is in test_train.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detr_jax.criterion.denoising import denoising_losses
from detr_jax.models.aids import DenoisingQueries, DETRWithAids, add_noise
from detr_jax.models.detr import DETR
from detr_jax.models.transformer import Transformer

C, D, N = 5, 32, 6  # classes, hidden size, queries per group


def _detr():
    return DETR(num_classes=C, num_queries=N, hidden_dim=D, num_heads=4, num_encoder_layers=1, num_decoder_layers=2,
                dim_feedforward=48, backbone_depth=18, dropout=0.0)


def _images():
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))
    return images, jnp.ones((2, 64, 64), bool).at[1, 40:].set(False)


def test_matching_queries_and_other_groups_never_see_a_denoising_query():
    """Through the decoder's self-attention (the heads are per query): the gradient of the matching queries' outputs
    (both Group DETR groups) with respect to every denoising query's content and position is exactly zero; so is
    that of denoising group 0 with respect to group 1's queries and to its own padded slots; group 0's real
    queries do see each other; and the matching queries' outputs are those of a decoder without denoising."""
    transformer = Transformer(num_heads=4, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=48,
                              dropout=0.0)
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    src, pos = jax.random.normal(keys[0], (2, 4, 4, D)), jax.random.normal(keys[1], (2, 4, 4, D))
    mask = jnp.ones((2, 4, 4), bool).at[1, 3:].set(False)
    queries = jax.random.normal(keys[2], (2, N, D))  # two matching groups (Group DETR)
    groups, size = 2, 4
    real = jnp.ones((2, groups, size), bool).at[:, :, 3].set(False)  # slot 3 padded in every group
    content = jax.random.normal(keys[3], (2, groups, size, D))
    dn_pos = jax.random.normal(keys[4], (2, groups, size, D))
    variables = transformer.init(keys[5], src, mask, queries, pos)
    weights = jax.random.normal(keys[5], (2, 2, 2 * N + groups * size, D))

    def hs(content, dn_pos):  # [L, B, 2N + Gd * size, D], matching queries first
        denoising = {"content": content, "pos": dn_pos, "mask": real}
        return transformer.apply(variables, src, mask, queries, pos, denoising=denoising)[0]

    grad = jax.jit(jax.grad(lambda c, p, rows: (hs(c, p) * weights * rows[:, None]).sum(), argnums=(0, 1)))

    def grads(rows):  # d(weighted sum of the given query rows) / d(content), d(pos)
        return grad(content, dn_pos, jnp.zeros(2 * N + groups * size).at[rows].set(1.0))

    for g in grads(slice(0, 2 * N)):  # the matching queries
        assert float(jnp.abs(g).max()) == 0.0
    for g in grads(slice(2 * N, 2 * N + 1)):  # group 0's first query
        assert float(jnp.abs(g[:, 1]).max()) == 0.0 and float(jnp.abs(g[:, 0, 3]).max()) == 0.0
        assert float(jnp.abs(g[:, 0, 1:3]).max(axis=-1).min()) > 0  # ... sees the group's other real queries
    plain = transformer.apply(variables, src, mask, queries, pos)[0]
    np.testing.assert_allclose(hs(content, dn_pos)[:, :, :2 * N], plain, atol=1e-5)


def _targets():
    labels = jnp.array([[1, 4, 0], [3, 0, 0]], jnp.int32)
    boxes = jnp.array([[[0.3, 0.4, 0.2, 0.3], [0.6, 0.5, 0.4, 0.2], [0.5, 0.5, 0.1, 0.1]],
                       [[0.5, 0.5, 0.3, 0.3], [0.5, 0.5, 0.1, 0.1], [0.5, 0.5, 0.1, 0.1]]])
    return labels, boxes, jnp.array([[True, True, False], [True, False, False]])


def test_each_denoising_query_targets_its_own_object():
    """Group by group, M positives then M negatives: a positive's target is its own label and box, a negative's
    no-object (its box is its object's), padded slots stay padded; and with no label noise the content is the
    label's embedding, as the box embedding is the noised box's."""
    labels, boxes, mask = _targets()
    dn = DenoisingQueries(C, D, groups=3, box_noise=0.4, label_noise=0.0, negatives=True)
    variables = dn.init(jax.random.PRNGKey(0), labels, boxes, mask)
    queries, targets = dn.apply(variables, labels, boxes, mask, rngs={"denoising": jax.random.PRNGKey(7)})
    assert queries["content"].shape == queries["pos"].shape == (2, 3, 6, D) and queries["mask"].shape == (2, 3, 6)
    t = {k: np.asarray(v).reshape((2, 3, 2, 3) + v.shape[2:]) for k, v in targets.items()}  # [B, Gd, copies, M]
    for g in range(3):
        np.testing.assert_array_equal(t["labels"][:, g, 0], labels)
        np.testing.assert_array_equal(t["labels"][:, g, 1], np.full((2, 3), C))
        for copy in range(2):
            np.testing.assert_array_equal(t["boxes"][:, g, copy], boxes)
            np.testing.assert_array_equal(t["mask"][:, g, copy], mask)
        assert t["positive"][:, g, 0].all() and not t["positive"][:, g, 1].any()
    table = variables["params"]["label_embed"]["embedding"]
    np.testing.assert_array_equal(queries["content"], np.asarray(table)[np.asarray(
        jnp.broadcast_to(labels[:, None, None], (2, 3, 2, 3)).reshape(2, 3, 6))])


@pytest.mark.parametrize("box_noise", [0.0, 0.4])
def test_box_noise_keeps_positives_near_and_pushes_negatives_away(box_noise):
    """Each corner of a positive moves by at most box_noise x half the size (0 moves nothing, the boundary), a
    negative's by box_noise x [1, 2) of it; boxes are well inside the image, so nothing is clipped."""
    boxes = jnp.broadcast_to(jnp.array([0.5, 0.5, 0.4, 0.2]), (2, 500, 4))
    positive = jnp.broadcast_to(jnp.array([True, False])[:, None], (2, 500))
    labels = jnp.zeros((2, 500), jnp.int32)
    _, noisy = add_noise(jax.random.PRNGKey(0), labels, boxes, positive, num_classes=C, box_noise=box_noise,
                         label_noise=0.0)
    moved = np.abs(np.asarray(_xyxy(noisy) - _xyxy(boxes))) / np.array([0.2, 0.1, 0.2, 0.1])  # in half sizes
    assert moved[0].max() <= box_noise + 1e-5
    if box_noise:
        assert moved[0].max() > 0.9 * box_noise and moved[1].min() >= box_noise - 1e-5
        assert moved[1].max() <= 2 * box_noise + 1e-5 and moved[1].max() > 1.9 * box_noise
    else:
        np.testing.assert_allclose(noisy, boxes, atol=1e-7)  # (the xyxy round trip rounds)


def _xyxy(b):
    return jnp.concatenate([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)


@pytest.mark.parametrize("label_noise", [0.0, 0.3, 1.0])
def test_label_noise_replaces_that_share_of_labels(label_noise):
    labels = jnp.full((20000,), 2, jnp.int32)
    noisy, _ = add_noise(jax.random.PRNGKey(0), labels, jnp.full((20000, 4), 0.5), jnp.ones(20000, bool),
                         num_classes=C, box_noise=0.4, label_noise=label_noise)
    noisy = np.asarray(noisy)
    assert noisy.min() >= 0 and noisy.max() < C
    # A replaced label is uniform over the C classes, so it stays 2 one time in C.
    assert abs((noisy != 2).mean() - label_noise * (C - 1) / C) < 0.01


def test_denoising_losses_pair_each_query_with_its_own_target_and_ignore_padding():
    labels, boxes, mask = _targets()
    dn = DenoisingQueries(C, D, groups=2, negatives=True)
    _, targets = dn.apply(dn.init(jax.random.PRNGKey(0), labels, boxes, mask), labels, boxes, mask,
                          rngs={"denoising": jax.random.PRNGKey(1)})
    confident = 20.0 * jax.nn.one_hot(targets["labels"], C + 1)
    perfect = {"pred_logits": confident, "pred_boxes": targets["boxes"], "targets": targets}
    kw = dict(num_classes=C, eos_coef=0.1, ce_loss_coef=1.0, bbox_loss_coef=5.0, giou_loss_coef=2.0)
    out = denoising_losses(perfect, **kw)
    assert float(out["loss_bbox_dn"]) == 0.0 and abs(float(out["loss_giou_dn"])) < 1e-6
    assert float(out["loss_ce_dn"]) < 1e-6
    # Garbage in the padded slots changes nothing; moving the real predictions to other queries does.
    pad = ~targets["mask"]
    garbage = dict(perfect, pred_logits=jnp.where(pad[..., None], 1e3, confident),
                   pred_boxes=jnp.where(pad[..., None], 0.9, targets["boxes"]))
    assert float(denoising_losses(garbage, **kw)["loss_dn"]) == pytest.approx(float(out["loss_dn"]), abs=1e-6)
    rolled = dict(perfect, pred_boxes=jnp.roll(targets["boxes"], 1, axis=1))
    assert float(denoising_losses(rolled, **kw)["loss_bbox_dn"]) > 0.1
    # Box losses are over the positives only: per real positive, as DN-DETR normalises.
    shifted = dict(perfect, pred_boxes=targets["boxes"] + 0.01)
    np.testing.assert_allclose(float(denoising_losses(shifted, **kw)["loss_bbox_dn"]), 0.04, rtol=1e-4)


def test_dn_groups_zero_is_the_model_of_before():
    """dn_groups = 0: no "denoising" parameters, the targets are ignored, and no "dn" aid; with dn_groups > 0 the
    evaluated detector ("model") has the parameters of the run without it, the denoising ones beside it."""
    images, mask = _images()
    labels, boxes, tmask = _targets()
    targets = {"labels": labels, "boxes": boxes, "mask": tmask}
    off = DETRWithAids(_detr(), num_query_groups=2)
    variables = jax.jit(off.init)(jax.random.PRNGKey(0), images)
    assert set(variables["params"]) == {"model", "group_query_embed"}
    apply = jax.jit(off.apply, static_argnames="train")
    out, aids = apply(variables, images, mask, train=True, targets=targets)
    ref, _ = apply(variables, images, mask, train=True)
    assert aids == {}
    np.testing.assert_array_equal(out["pred_boxes"], ref["pred_boxes"])

    on = DETRWithAids(_detr(), num_query_groups=2, dn_groups=3, dn_negatives=True)
    on_params = jax.eval_shape(on.init, jax.random.PRNGKey(0), images)["params"]
    assert set(on_params) == {"model", "group_query_embed", "denoising"}
    shapes = lambda t: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), t)  # noqa: E731
    assert shapes(on_params["model"]) == shapes(variables["params"]["model"])
    # (the values are the same too, and so are the matching queries' losses: test_train.py)
