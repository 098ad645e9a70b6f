"""The criterion (matching + set losses) against the official SetCriterion (shared fixtures), HF's DETR loss and hand
references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detr_jax.criterion import Criterion, HungarianMatcher
from detr_jax.criterion import set_losses as set_losses_module
from detr_jax.criterion.matcher import hungarian_match
from detr_jax.criterion.set_losses import set_losses
from detr_jax.ops import box_ops

COEFS = dict(ce_loss_coef=1.0, bbox_loss_coef=5.0, giou_loss_coef=2.0)


@pytest.fixture(scope="module")
def official(fixtures_dir):
    """Predictions of 3 decoder layers, padded targets and the official SetCriterion's values."""
    data = dict(np.load(fixtures_dir / "official_detr_r18_tiny" / "criterion.npz"))
    layers = [{"pred_logits": data[f"layer{i}_pred_logits"], "pred_boxes": data[f"layer{i}_pred_boxes"]}
              for i in range(3)]
    outputs = dict(layers[-1], aux_outputs=layers[:-1])
    targets = {"labels": data["labels"], "boxes": data["boxes"], "mask": data["mask"]}
    expected = {k[len("loss__"):]: float(v) for k, v in data.items() if k.startswith("loss__")}
    return outputs, targets, expected


@jax.jit
def _match(outputs, targets):
    """The official matcher's indices [L, B, M] (costs 1 / 5 / 2) of every layer, aux first."""
    layers = list(outputs.get("aux_outputs", [])) + [outputs]
    return hungarian_match(jnp.stack([layer["pred_logits"] for layer in layers]),
                           jnp.stack([layer["pred_boxes"] for layer in layers]), targets)


# Jitted as in training (and one XLA compile is much faster than op-by-op dispatch).
@functools.partial(jax.jit, static_argnames=("num_classes", "bbox_loss_type"))
def _set_losses(outputs, targets, indices, num_boxes=None, num_classes=91, bbox_loss_type="l1"):
    return set_losses(outputs, targets, indices, num_classes=num_classes, eos_coef=0.1, **COEFS,
                      bbox_loss_type=bbox_loss_type, num_boxes=num_boxes)


def _criterion(outputs, targets, indices=None, **kwargs):
    """The set losses with the official matching (or the given `indices`)."""
    return _set_losses(outputs, targets, _match(outputs, targets) if indices is None else indices, **kwargs)


def test_parity_with_official_set_criterion(official):
    """The whole `Criterion` (matching on the device's costs, host assignment, every layer's terms, the total)."""
    outputs, targets, expected = official
    criterion = Criterion(91, HungarianMatcher(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0), eos_coef=0.1)
    total, losses = jax.jit(lambda o, t: criterion(o, t))(outputs, targets)
    assert total == losses["loss"]
    assert set(expected) == set(losses) - {"loss"}
    for name, value in expected.items():
        np.testing.assert_allclose(losses[name], value, rtol=1e-5, err_msg=name)
    total = sum(COEFS[f"{term}_loss_coef"] * expected[f"loss_{term}{suffix}"]
                for term in ("ce", "bbox", "giou") for suffix in ("", "_0", "_1"))
    np.testing.assert_allclose(losses["loss"], total, rtol=1e-5)


def test_set_losses_with_the_matchers_indices_equal_the_criterion(official):
    outputs, targets, _ = official
    criterion = Criterion(91, HungarianMatcher(), eos_coef=0.1)
    _, whole = jax.jit(lambda o, t: criterion(o, t))(outputs, targets)
    for name, value in _criterion(outputs, targets).items():
        np.testing.assert_allclose(whole[name], value, rtol=1e-6, err_msg=name)


@jax.jit
def _loss_and_grads(outputs, targets):
    """Total loss and its gradient w.r.t. the main layer's predictions."""
    def total(preds):
        return _criterion(dict(outputs, **preds), targets)["loss"]

    return jax.value_and_grad(total)({k: outputs[k] for k in ("pred_logits", "pred_boxes")})


def test_grad_is_finite(official):
    outputs, targets, _ = official
    loss, grads = _loss_and_grads(outputs, targets)
    assert np.isfinite(loss)
    for grad in grads.values():
        assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).sum() > 0


def test_batch_without_objects_is_finite(official):
    outputs, targets, _ = official
    empty = dict(targets, mask=np.zeros_like(targets["mask"]), boxes=np.zeros_like(targets["boxes"]))
    losses = _criterion(outputs, empty)
    assert all(np.isfinite(np.asarray(v)) for v in losses.values())
    assert losses["loss_bbox"] == 0 and losses["loss_giou"] == 0
    assert losses["class_error"] == 100  # official `accuracy` returns 0 with no targets
    loss, grads = _loss_and_grads(outputs, empty)
    assert np.isfinite(loss)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads.values())


def test_smooth_l1_matches_hand_reference(official):
    outputs, targets, _ = official
    # Fixed matching for the main layer: target slot m of image b -> query m.
    mask = np.asarray(targets["mask"])
    indices = np.where(mask, np.arange(mask.shape[1])[None, :], -1)[None].astype(np.int32)
    main = {k: outputs[k] for k in ("pred_logits", "pred_boxes")}
    l1 = _criterion(main, targets, indices=indices)
    smooth = _criterion(main, targets, indices=indices, bbox_loss_type="smooth_l1")

    diff = np.abs(main["pred_boxes"][:, : mask.shape[1]] - targets["boxes"]).astype(np.float64)[mask]
    smooth_ref = np.where(diff < 1, 0.5 * diff ** 2, diff - 0.5).sum() / mask.sum()
    np.testing.assert_allclose(l1["loss_bbox"], diff.sum() / mask.sum(), rtol=1e-5)
    np.testing.assert_allclose(smooth["loss_bbox"], smooth_ref, rtol=1e-5)
    assert not np.isclose(smooth["loss_bbox"], l1["loss_bbox"])
    # Only the box term changes.
    np.testing.assert_allclose(smooth["loss_giou"], l1["loss_giou"])
    np.testing.assert_allclose(smooth["loss_ce"], l1["loss_ce"])


def test_num_boxes_scales_box_losses(official):
    outputs, targets, _ = official
    default = _criterion(outputs, targets)  # num_boxes = 15 valid targets
    num_valid = int(np.asarray(targets["mask"]).sum())
    halved = _criterion(outputs, targets, num_boxes=2.0 * num_valid)
    for name in ("loss_bbox", "loss_giou", "loss_bbox_0", "loss_giou_1"):
        np.testing.assert_allclose(halved[name], default[name] / 2, rtol=1e-6)
    np.testing.assert_allclose(halved["loss_ce"], default["loss_ce"])
    # The official clamp: num_boxes never goes below 1.
    tiny = _criterion(outputs, targets, num_boxes=0.25)
    np.testing.assert_allclose(tiny["loss_bbox"], default["loss_bbox"] * num_valid, rtol=1e-6)


def test_class_weighted_cross_entropy_hand_reference():
    # One image, 3 queries, 2 classes + no-object; target class 1 matched to query 2.
    logits = np.array([[[2.0, 0.5, 0.1], [0.0, 1.0, 3.0], [0.3, 2.0, -1.0]]], np.float32)
    boxes = np.array([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1], [0.6, 0.4, 0.3, 0.2]]], np.float32)
    targets = {"labels": np.array([[1, 0]], np.int32), "mask": np.array([[True, False]]),
               "boxes": np.array([[[0.6, 0.5, 0.3, 0.2], [0, 0, 0, 0]]], np.float32)}
    losses = _criterion({"pred_logits": logits, "pred_boxes": boxes}, targets, num_classes=2,
                        indices=np.array([[[2, -1]]], np.int32))
    log_prob = logits[0] - np.log(np.exp(logits[0]).sum(-1, keepdims=True))
    nll = -log_prob[[0, 1, 2], [2, 2, 1]]
    weights = np.array([0.1, 0.1, 1.0])
    np.testing.assert_allclose(losses["loss_ce"], (weights * nll).sum() / weights.sum(), rtol=1e-6)
    np.testing.assert_allclose(losses["loss_bbox"], 0.1, rtol=1e-5)
    giou = box_ops.elementwise_generalized_box_iou(box_ops.box_cxcywh_to_xyxy(boxes[0, 2]),
                                                   box_ops.box_cxcywh_to_xyxy(targets["boxes"][0, 0]))
    np.testing.assert_allclose(losses["loss_giou"], 1 - giou, rtol=1e-6)
    assert losses["class_error"] == 0  # query 2 predicts class 1
    assert losses["cardinality_error"] == 1  # queries 0 and 2 predict objects, 1 target


def test_losses_equal_hf_transformers_detr_loss():
    """Our matcher + criterion against transformers' own DETR loss (ForObjectDetectionLoss) on random inputs."""
    import types

    torch = pytest.importorskip("torch")
    hf_loss = pytest.importorskip("transformers.loss.loss_for_object_detection")

    rng = np.random.default_rng(11)
    num_layers, b, n, m, num_classes = 3, 3, 10, 5, 7
    logits = rng.standard_normal((num_layers, b, n, num_classes + 1)).astype(np.float32)
    boxes = np.concatenate([rng.uniform(0.2, 0.8, (num_layers, b, n, 2)),
                            rng.uniform(0.05, 0.4, (num_layers, b, n, 2))], -1).astype(np.float32)
    counts = [3, 0, 5]
    tgt_labels = np.zeros((b, m), np.int32)
    tgt_boxes = np.tile(np.array([0.5, 0.5, 1.0, 1.0], np.float32), (b, m, 1))
    mask = np.zeros((b, m), bool)
    hf_targets = []
    for i, k in enumerate(counts):
        tgt_labels[i, :k] = rng.integers(0, num_classes, k)
        tgt_boxes[i, :k] = np.concatenate([rng.uniform(0.2, 0.8, (k, 2)), rng.uniform(0.05, 0.4, (k, 2))], -1)
        mask[i, :k] = True
        hf_targets.append({"class_labels": torch.from_numpy(tgt_labels[i, :k].astype(np.int64)),
                           "boxes": torch.from_numpy(tgt_boxes[i, :k].copy())})
    config = types.SimpleNamespace(class_cost=1, bbox_cost=5, giou_cost=2, num_labels=num_classes, eos_coefficient=0.1,
                                   auxiliary_loss=True, bbox_loss_coefficient=5, giou_loss_coefficient=2,
                                   decoder_layers=num_layers)
    _, ref, _ = hf_loss.ForObjectDetectionLoss(
        torch.from_numpy(logits[-1]), hf_targets, "cpu", torch.from_numpy(boxes[-1]), config,
        outputs_class=torch.from_numpy(logits), outputs_coord=torch.from_numpy(boxes))

    outputs = {"pred_logits": logits[-1], "pred_boxes": boxes[-1],
               "aux_outputs": [{"pred_logits": logits[i], "pred_boxes": boxes[i]} for i in range(num_layers - 1)]}
    ours = _criterion(outputs, {"labels": tgt_labels, "boxes": tgt_boxes, "mask": mask}, num_classes=num_classes)
    compared = 0
    for key, value in ref.items():
        if key.startswith(("loss_ce", "loss_bbox", "loss_giou", "cardinality_error")):
            np.testing.assert_allclose(float(ours[key]), float(value), rtol=1e-5, atol=1e-6, err_msg=key)
            compared += 1
    assert compared == 4 * num_layers


def test_query_groups_loss_is_the_mean_of_each_group_alone(official):
    """Group DETR: after `split_query_groups` every group is matched one-to-one on its own, and each loss term
    is the mean over groups of what that group alone would give (a plain DETR loss when G = 1)."""
    from detr_jax.criterion.query_groups import split_query_groups

    outputs, targets, _ = official
    rng = np.random.default_rng(0)
    groups = [outputs]
    for _ in range(2):  # two more groups: other logits, boxes jittered
        groups.append(jax.tree_util.tree_map(np.asarray, outputs))
        for layer in [groups[-1]] + groups[-1]["aux_outputs"]:
            layer["pred_logits"] = layer["pred_logits"] + rng.normal(size=layer["pred_logits"].shape).astype(np.float32)
            layer["pred_boxes"] = np.clip(layer["pred_boxes"] + rng.uniform(-0.05, 0.05, layer["pred_boxes"].shape),
                                          0.01, 0.99).astype(np.float32)
    joined = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs, axis=1), *groups)  # [B, 3 * N, ...]
    split_outputs, split_targets = split_query_groups(joined, targets, 3)
    assert split_outputs["pred_logits"].shape == ((3 * outputs["pred_logits"].shape[0],)
                                                  + outputs["pred_logits"].shape[1:])
    losses = _criterion(split_outputs, split_targets)
    alone = [_criterion(g, targets) for g in groups]
    for name in ("loss", "loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_giou_1"):
        np.testing.assert_allclose(float(losses[name]), np.mean([float(a[name]) for a in alone]), rtol=1e-5,
                                   err_msg=name)


def _encoder_dense_reference(logits, pred_boxes, token_mask, centres, labels, boxes, mask, num_classes, eos):
    """Loop-by-loop reference of `encoder_dense_losses` (the assignment rule written out per token)."""
    ce_num = ce_den = l1 = giou_sum = positives = 0.0
    for b in range(logits.shape[0]):
        cell = 2 * centres[b, 0]
        for s in range(logits.shape[1]):
            if not token_mask[b, s]:
                continue
            best, best_area = None, np.inf
            for m in range(labels.shape[1]):
                if not mask[b, m]:
                    continue
                d = np.abs(centres[b, s] - boxes[b, m, :2])
                if (np.all(d <= cell / 2) or np.all(d <= 0.25 * boxes[b, m, 2:])) and \
                        boxes[b, m, 2] * boxes[b, m, 3] < best_area:
                    best, best_area = m, boxes[b, m, 2] * boxes[b, m, 3]
            cls = num_classes if best is None else labels[b, best]
            logp = logits[b, s] - np.log(np.exp(logits[b, s]).sum())
            w = eos if best is None else 1.0
            ce_num, ce_den = ce_num - w * logp[cls], ce_den + w
            if best is not None:
                positives += 1
                l1 += np.abs(pred_boxes[b, s] - boxes[b, best]).sum()
                to_xyxy = lambda x: np.concatenate([x[:2] - x[2:] / 2, x[:2] + x[2:] / 2])
                giou_sum += 1 - float(box_ops.generalized_box_iou(to_xyxy(pred_boxes[b, s])[None],
                                                                  to_xyxy(boxes[b, best])[None])[0, 0])
    return ce_num / ce_den, l1 / positives, giou_sum / positives


def test_encoder_dense_losses_equal_the_per_token_reference():
    from detr_jax.criterion.dense_losses import encoder_dense_losses

    rng = np.random.default_rng(0)
    b, h, w, m, c = 3, 4, 5, 6, 5
    token_mask = np.ones((b, h, w), bool)
    token_mask[1, 3:] = False  # padded rows / columns: centres are relative to the real map
    token_mask[2, :, 4:] = False
    real_h, real_w = token_mask.any(2).sum(1), token_mask.any(1).sum(1)
    ys, xs = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    centres = np.stack([np.stack([xs.ravel() / real_w[i], ys.ravel() / real_h[i]], -1) for i in range(b)])
    boxes = np.concatenate([rng.uniform(0.1, 0.9, (b, m, 2)), rng.uniform(0.05, 0.6, (b, m, 2))], -1)
    mask = rng.random((b, m)) < 0.7
    labels = rng.integers(0, c, (b, m))
    logits = rng.normal(size=(b, h * w, c + 1))
    pred_boxes = np.concatenate([rng.uniform(0.1, 0.9, (b, h * w, 2)), rng.uniform(0.05, 0.5, (b, h * w, 2))], -1)
    enc = {"pred_logits": jnp.asarray(logits, jnp.float32), "pred_boxes": jnp.asarray(pred_boxes, jnp.float32),
           "token_mask": jnp.asarray(token_mask.reshape(b, -1)), "token_centres": jnp.asarray(centres, jnp.float32)}
    targets = {"labels": jnp.asarray(labels), "boxes": jnp.asarray(boxes, jnp.float32), "mask": jnp.asarray(mask)}
    got = encoder_dense_losses(enc, targets, num_classes=c, eos_coef=0.1)
    ref = _encoder_dense_reference(logits, pred_boxes, token_mask.reshape(b, -1), centres, labels, boxes, mask, c, 0.1)
    np.testing.assert_allclose([float(got[k]) for k in ("loss_ce_enc", "loss_bbox_enc", "loss_giou_enc")], ref,
                               rtol=1e-5)
    assert 0 < float(got["enc_positives"])


# ---- rules that every fixture happens to satisfy (each test fails on a one-line bug the others pass) ----------
def test_every_weight_comes_from_its_own_config_field(official):
    """Criterion.from_config with every weight distinct (the shipped configs set ce_loss_coef = cost_class, bbox =
    cost_bbox, giou = cost_giou): the total is the loss coefficients' sum of the official terms, the matcher has the
    matching costs, and the mask weights are panoptic's."""
    from detr_jax.config import base_config
    from detr_jax.models import build_training_model

    config = base_config()
    config.loss.update(cost_class=1.5, cost_bbox=4.5, cost_giou=2.5, ce_loss_coef=3.0, bbox_loss_coef=6.0,
                       giou_loss_coef=7.0)
    config.panoptic.update(mask_loss_coef=8.0, dice_loss_coef=9.0)
    criterion = Criterion.from_config(config, build_training_model(config))
    assert criterion.matcher.costs == dict(cost_class=1.5, cost_bbox=4.5, cost_giou=2.5)
    assert criterion.weights == dict(ce=3.0, bbox=6.0, giou=7.0, mask=8.0, dice=9.0)
    outputs, targets, _ = official
    _, terms = jax.jit(lambda o, t: criterion(o, t))(outputs, targets)
    total = sum(coef * terms[f"loss_{term}{suffix}"] for term, coef in (("ce", 3.0), ("bbox", 6.0), ("giou", 7.0))
                for suffix in ("", "_0", "_1"))
    np.testing.assert_allclose(terms["loss"], total, rtol=1e-6)


def test_the_mask_losses_use_the_main_layers_matching():
    """A Criterion with a mask head, end to end, on a case where the auxiliary layer matches the two targets the
    other way round: the mask losses are those of the main (last) layer's matching, as official."""
    from detr_jax.criterion.mask_losses import mask_losses

    rng = np.random.default_rng(0)
    boxes = np.array([[[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.3, 0.3]]], np.float32)  # [1, 2, 4]
    logits = np.full((1, 2, 3), -5.0, np.float32)
    logits[0, 0, 0] = logits[0, 1, 1] = 5.0  # query i says the class of target i
    main = {"pred_logits": logits, "pred_boxes": boxes}  # query i = target i
    aux = {"pred_logits": logits[:, ::-1], "pred_boxes": boxes[:, ::-1]}  # query i = target 1 - i
    batch = {"labels": np.array([[0, 1]], np.int32), "boxes": boxes, "mask": np.ones((1, 2), bool),
             "target_masks": rng.random((1, 2, 16, 16)) < 0.5, "pixel_mask": np.ones((1, 16, 16), bool)}
    pred_masks = rng.normal(size=(1, 2, 4, 4)).astype(np.float32)
    outputs = dict(main, pred_masks=pred_masks, aux_outputs=[aux])
    criterion = Criterion(2, HungarianMatcher(), eos_coef=0.1)
    _, terms = jax.jit(lambda o, b: criterion(o, b))(outputs, batch)

    def expected(indices):
        return mask_losses(pred_masks, batch["target_masks"], batch["mask"], np.array([indices], np.int32), 2)

    main_losses, aux_losses = expected([0, 1]), expected([1, 0])
    assert abs(float(main_losses["loss_mask"]) - float(aux_losses["loss_mask"])) > 1e-3  # the case tells them apart
    for k in ("loss_mask", "loss_dice"):
        np.testing.assert_allclose(terms[k], main_losses[k], rtol=1e-6, err_msg=k)


def test_a_token_inside_two_boxes_belongs_to_the_smaller():
    """The dense losses' assignment: a token whose cell holds the centres of a large and a small object (of other
    classes) is positive for the small one, whichever comes first in the targets."""
    from detr_jax.criterion.dense_losses import assign_tokens, encoder_dense_losses
    from detr_jax.models.aids import token_grid

    token_mask, centres = token_grid(jnp.ones((1, 1, 1), bool))  # one token, centre (0.5, 0.5)
    large, small = [0.5, 0.5, 0.8, 0.8], [0.5, 0.5, 0.2, 0.2]
    for order in ((large, small), (small, large)):
        boxes = jnp.asarray([order], jnp.float32)
        targets = {"labels": jnp.asarray([[1, 2]] if order[0] == large else [[2, 1]]), "boxes": boxes,
                   "mask": jnp.ones((1, 2), bool)}
        owner, positive = assign_tokens(centres, token_mask, targets)
        assert bool(positive[0, 0]) and int(owner[0, 0]) == order.index(small)
        logits = jnp.asarray([[[-9.0, -9.0, 9.0, -9.0]]])  # says class 2, the small object's
        dense = encoder_dense_losses({"pred_logits": logits, "pred_boxes": jnp.asarray([[small]], jnp.float32),
                                      "token_mask": token_mask, "token_centres": centres}, targets, num_classes=3)
        assert float(dense["loss_bbox_enc"]) == 0.0 and float(dense["loss_giou_enc"]) < 1e-6
        assert float(dense["loss_ce_enc"]) < 1e-6


# ---- IoU-aware class targets (config.loss.class_target "iou") -----------------------------------------------
def _iou_criterion(class_target, alpha=0.25):
    return Criterion(91, HungarianMatcher(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0), eos_coef=0.1,
                     class_target=class_target, class_target_alpha=alpha)


def test_iou_class_target_is_the_hard_target_when_every_box_is_exact(official):
    """Each matched query's box moved onto its object's (IoU 1): "iou" gives the hard target's cross-entropy, on
    every layer, while with the fixture's own boxes it does not."""
    outputs, targets, _ = official
    indices = np.asarray(_match(outputs, targets))  # [L, B, M]
    layers = list(outputs["aux_outputs"]) + [outputs]
    exact = []
    for layer, idx in zip(layers, indices):
        boxes = np.array(layer["pred_boxes"])
        for b, m in zip(*np.nonzero(idx >= 0)):
            boxes[b, idx[b, m]] = targets["boxes"][b, m]
        exact.append(dict(layer, pred_boxes=boxes))
    exact = dict(exact[-1], aux_outputs=exact[:-1])
    ce = lambda terms: {k: float(v) for k, v in terms.items() if k.startswith("loss_ce")}  # noqa: E731
    hard = ce(jax.jit(lambda o, t: _iou_criterion("hard")(o, t)[1])(exact, targets))
    iou = ce(jax.jit(lambda o, t: _iou_criterion("iou")(o, t)[1])(exact, targets))
    assert set(hard) == {"loss_ce", "loss_ce_0", "loss_ce_1"}
    for name in hard:
        np.testing.assert_allclose(iou[name], hard[name], rtol=1e-6, err_msg=name)
    loose = ce(jax.jit(lambda o, t: _iou_criterion("iou")(o, t)[1])(outputs, targets))
    assert all(abs(loose[k] - ce(jax.jit(lambda o, t: _iou_criterion("hard")(o, t)[1])(outputs, targets))[k]) > 1e-3
               for k in hard)


def test_iou_class_target_equals_a_hand_computed_soft_cross_entropy():
    """One image, 3 queries, 1 object matched to query 1 at IoU 0.5 (a box of half its area inside it): the target
    is 0.5 ** alpha on the class and the rest on no-object; queries 0 and 2 keep no-object (weight eos)."""
    logits = np.array([[[0.3, -1.0, 0.5], [1.2, 0.1, -0.4], [-0.2, 0.7, 0.0]]], np.float32)  # [1, 3, C + 1], C = 2
    pred = np.array([[[0.5, 0.5, 0.2, 0.2], [0.45, 0.5, 0.2, 0.4], [0.2, 0.2, 0.1, 0.1]]], np.float32)
    targets = {"labels": np.array([[0, 0]], np.int32), "boxes": np.array([[[0.5, 0.5, 0.4, 0.4], [0, 0, 0, 0]]],
                                                                          np.float32),
               "mask": np.array([[True, False]])}
    indices = np.array([[[1, -1]]], np.int32)  # [L=1, B, M]
    alpha, eos = 0.5, 0.1
    quality = np.asarray(set_losses_module.class_quality(pred, indices[0], targets, alpha=alpha))
    np.testing.assert_allclose(quality[0, 0], 0.5 ** alpha, rtol=1e-6)
    terms = set_losses({"pred_logits": logits, "pred_boxes": pred}, targets, indices, num_classes=2, eos_coef=eos,
                       **COEFS, quality=quality[None])
    logp = logits[0] - np.log(np.exp(logits[0]).sum(-1, keepdims=True))
    q = 0.5 ** alpha
    expected = (eos * -logp[0, 2] + (-q * logp[1, 0] - (1 - q) * logp[1, 2]) + eos * -logp[2, 2]) / (eos + 1 + eos)
    np.testing.assert_allclose(float(terms["loss_ce"]), expected, rtol=1e-6)


def test_no_gradient_reaches_the_boxes_through_the_iou_class_target(official):
    outputs, targets, _ = official
    indices = _match(outputs, targets)

    def ce(boxes, class_target):
        out = dict(outputs, pred_boxes=boxes)
        return _iou_criterion(class_target).set_losses(out, targets, indices)["loss_ce"]

    grad = jax.grad(ce)(jnp.asarray(outputs["pred_boxes"]), "iou")
    np.testing.assert_array_equal(np.asarray(grad), 0.0)
    # ... while the target does depend on the boxes (the gradient is stopped, not absent):
    moved = np.asarray(outputs["pred_boxes"]) * 0.9
    assert abs(float(ce(moved, "iou")) - float(ce(jnp.asarray(outputs["pred_boxes"]), "iou"))) > 1e-4


def test_padded_targets_are_inert_under_the_iou_class_target(official):
    """A padded slot's (mask False) label and box change no term (the fixture's real objects are all matched)."""
    outputs, targets, _ = official
    criterion = _iou_criterion("iou")
    indices = np.asarray(_match(outputs, targets))
    run = jax.jit(lambda t, i: criterion.set_losses(outputs, t, i))
    before = run(targets, indices)
    padded = np.argwhere(~np.asarray(targets["mask"]))
    assert len(padded), "the fixture has padded target slots"
    changed = {k: np.array(v) for k, v in targets.items()}
    for b, m in padded:
        changed["labels"][b, m] = 3
        changed["boxes"][b, m] = [0.3, 0.6, 0.2, 0.1]
    after = run(changed, indices)
    for name in before:
        np.testing.assert_array_equal(np.asarray(after[name]), np.asarray(before[name]), err_msg=name)
