"""detr_jax.criterion.mask_losses against the official SetCriterion (shared fixture) and the official formulas in
torch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detr_jax.criterion.mask_losses import (
    bilinear_at_pixels,
    dice_loss,
    mask_losses,
    sigmoid_focal_loss,
    upsample_bilinear,
)
from detr_jax.criterion.matcher import hungarian_match

_jit_mask_losses = jax.jit(mask_losses)


@pytest.fixture(scope="module")
def official(fixtures_dir):
    """Main-layer predictions, padded targets, our matching and the official criterion's mask losses."""
    data = dict(np.load(fixtures_dir / "official_detr_r50_tiny_panoptic" / "criterion.npz"))
    targets = {"labels": data["labels"], "boxes": data["boxes"], "mask": data["mask"]}
    # The official matcher sees the main layer only; cost weights as the fixture's (class 1, bbox 5, giou 2).
    indices = hungarian_match(data["layer2_pred_logits"][None], data["layer2_pred_boxes"][None], targets,
                              cost_class=1.0, cost_bbox=5.0, cost_giou=2.0)[-1]  # [B, M]
    num_boxes = max(int(data["mask"].sum()), 1)  # official: all real targets, at least 1
    return {"pred_masks": data["pred_masks"], "target_masks": data["target_masks"], "target_valid": data["mask"],
            "indices": np.asarray(indices), "num_boxes": num_boxes,
            "expected": {name: float(data[f"loss__{name}"]) for name in ("loss_mask", "loss_dice")}}


def _losses(case, **overrides):
    case = dict(case, **overrides)
    return _jit_mask_losses(case["pred_masks"], case["target_masks"], case["target_valid"], case["indices"],
                            case["num_boxes"])


# The official formulas (models/segmentation.py, models/detr.py), written out in torch.

def _torch_focal(inputs, targets, num_boxes, alpha=0.25, gamma=2):
    prob = inputs.sigmoid()
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_boxes


def _torch_dice(inputs, targets, num_boxes):
    inputs = inputs.sigmoid().flatten(1)
    numerator = 2 * (inputs * targets).sum(1)
    denominator = inputs.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_boxes


def _torch_loss_masks(pred_masks, target_masks, target_valid, indices, num_boxes):
    """Official `SetCriterion.loss_masks` on our padded arrays, with its list-of-(src, tgt) indices."""
    pairs = [(np.flatnonzero(valid & (idx >= 0)), idx) for valid, idx in zip(target_valid, indices)]
    batch_idx = torch.as_tensor(np.concatenate([np.full(len(slots), b) for b, (slots, _) in enumerate(pairs)]))
    src_idx = torch.as_tensor(np.concatenate([idx[slots] for slots, idx in pairs]))
    tgt_idx = torch.as_tensor(np.concatenate([slots for slots, _ in pairs]))
    src_masks = pred_masks[batch_idx, src_idx]
    tgt = torch.as_tensor(target_masks).to(src_masks)[batch_idx, tgt_idx]
    src_masks = F.interpolate(src_masks[:, None], size=tgt.shape[-2:], mode="bilinear", align_corners=False)
    src_masks = src_masks[:, 0].flatten(1)
    tgt = tgt.flatten(1)
    return {"loss_mask": _torch_focal(src_masks, tgt, num_boxes), "loss_dice": _torch_dice(src_masks, tgt, num_boxes)}


def test_parity_with_official_loss_masks(official):
    losses = _losses(official)
    assert set(losses) == set(official["expected"])
    for name, value in official["expected"].items():
        # Measured: |relative difference| < 1e-6 on CPU.
        np.testing.assert_allclose(losses[name], value, rtol=1e-5, atol=0, err_msg=name)


def test_matches_official_formulas_in_torch_with_gradients(official):
    """Values and d loss / d pred_masks against torch autograd through the official loss_masks."""
    pred = torch.tensor(official["pred_masks"], dtype=torch.float64, requires_grad=True)
    expected = _torch_loss_masks(pred, official["target_masks"], official["target_valid"], official["indices"],
                                 official["num_boxes"])
    (expected["loss_mask"] + 2.0 * expected["loss_dice"]).backward()

    def total(pred_masks):
        losses = mask_losses(pred_masks, official["target_masks"], official["target_valid"], official["indices"],
                             official["num_boxes"])
        return losses["loss_mask"] + 2.0 * losses["loss_dice"], losses

    (_, losses), grad = jax.jit(jax.value_and_grad(total, has_aux=True))(official["pred_masks"])
    for name in expected:
        np.testing.assert_allclose(losses[name], expected[name].item(), rtol=1e-5, err_msg=name)
    grad_torch = pred.grad.numpy()
    np.testing.assert_allclose(grad, grad_torch, rtol=1e-4, atol=1e-6 * np.abs(grad_torch).max())


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2), (-1.0, 2), (0.5, 1)])
def test_sigmoid_focal_loss_elementwise(alpha, gamma):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((5, 300)) * 6).astype(np.float32)
    logits[0, :4] = [40.0, -40.0, 90.0, -90.0]  # far in the tails: must stay finite, as torch's
    targets = rng.random((5, 300)) < 0.3
    expected = _torch_focal(torch.tensor(logits, dtype=torch.float64), torch.tensor(targets, dtype=torch.float64),
                            3.0, alpha, gamma).item()
    got = sigmoid_focal_loss(jnp.asarray(logits), targets, 3.0, alpha=alpha, gamma=gamma)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_dice_loss_elementwise():
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((6, 20, 30)) * 4).astype(np.float32)  # flattened after axis 0, as official
    targets = rng.random((6, 20, 30)) < 0.4
    targets[2] = False  # an empty target mask: the +1 smoothing keeps it finite
    expected = _torch_dice(torch.tensor(logits, dtype=torch.float64),
                           torch.tensor(targets.reshape(6, -1), dtype=torch.float64), 4.0).item()
    np.testing.assert_allclose(dice_loss(jnp.asarray(logits), targets, 4.0), expected, rtol=1e-5)


@pytest.mark.parametrize("in_size, out_size", [((16, 24), (64, 96)),  # the mask loss's 4x upsampling
                                               ((13, 21), (50, 70)),  # non-integer ratios
                                               ((64, 96), (27, 41))])  # shrinking: no antialiasing, as torch
def test_upsample_bilinear_matches_torch_interpolate(in_size, out_size):
    x = np.random.default_rng(2).standard_normal((2, 3) + in_size).astype(np.float32)
    expected = F.interpolate(torch.tensor(x), size=out_size, mode="bilinear", align_corners=False).numpy()
    np.testing.assert_allclose(upsample_bilinear(jnp.asarray(x), *out_size), expected, rtol=1e-5, atol=1e-5)


def test_padded_target_slots_change_nothing(official):
    rng = np.random.default_rng(3)
    batch_size, _, height, width = official["target_masks"].shape
    extra = 3
    # Garbage in the padded slots, and indices that point at real queries: validity alone must drop them.
    target_masks = np.concatenate([official["target_masks"], rng.random((batch_size, extra, height, width)) < 0.5],
                                  axis=1)
    target_valid = np.concatenate([official["target_valid"], np.zeros((batch_size, extra), bool)], axis=1)
    indices = np.concatenate([official["indices"], np.tile([[-1, 3, 0]], (batch_size, 1))], axis=1)
    padded = _losses(official, target_masks=target_masks, target_valid=target_valid, indices=indices)
    for name, value in _losses(official).items():
        np.testing.assert_allclose(padded[name], value, rtol=1e-6, err_msg=name)


def test_image_without_targets_contributes_nothing(official):
    assert not official["target_valid"][1].any()
    keep = [0, 2]
    without = _losses(official, **{k: official[k][keep] for k in
                                   ("pred_masks", "target_masks", "target_valid", "indices")})
    for name, value in _losses(official).items():
        np.testing.assert_allclose(without[name], value, rtol=1e-6, err_msg=name)


def test_grad_is_finite_and_zero_for_unmatched_queries(official):
    def total(pred_masks):
        losses = mask_losses(pred_masks, official["target_masks"], official["target_valid"], official["indices"],
                             official["num_boxes"])
        return losses["loss_mask"] + losses["loss_dice"]

    grad = np.asarray(jax.jit(jax.grad(total))(official["pred_masks"]))  # [B, N, h, w]
    assert np.isfinite(grad).all()
    matched = np.zeros(grad.shape[:2], bool)  # [B, N]
    for b, (valid, idx) in enumerate(zip(official["target_valid"], official["indices"])):
        matched[b, idx[valid & (idx >= 0)]] = True
    assert not matched[1].any()  # the image without targets
    assert (np.abs(grad[matched]).sum(axis=(-2, -1)) > 0).all()
    assert (grad[~matched] == 0).all()


@pytest.mark.parametrize("in_size,out_size", [((8, 10), (32, 40)), ((7, 5), (29, 18)), ((6, 6), (6, 6))])
def test_bilinear_at_pixels_is_the_upsampled_map_there(in_size, out_size):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3) + in_size).astype(np.float32)
    points = rng.integers(0, out_size[0] * out_size[1], (2, 50))
    full = np.asarray(upsample_bilinear(jnp.asarray(x), *out_size)).reshape(2, 3, -1)
    expected = np.take_along_axis(full, points[:, None, :], axis=2)
    got = bilinear_at_pixels(jnp.asarray(x), jnp.asarray(points), *out_size)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _at_points(case, points):
    """The fixture's target masks read at flat pixel indices points [B, P]: bool [B, M, P]."""
    target_masks = case["target_masks"]
    flat = target_masks.reshape(target_masks.shape[:2] + (-1,))
    return np.take_along_axis(flat, points[:, None, :], axis=2)


def test_point_losses_on_every_pixel_are_the_official_losses(official):
    batch_size, _, height, width = official["target_masks"].shape
    points = np.tile(np.arange(height * width), (batch_size, 1))
    got = mask_losses(official["pred_masks"], _at_points(official, points), official["target_valid"],
                      official["indices"], official["num_boxes"], points=jnp.asarray(points),
                      image_size=(height, width))
    for name, value in official["expected"].items():
        np.testing.assert_allclose(float(got[name]), value, rtol=1e-5)


def test_point_losses_on_sampled_pixels_estimate_the_official_losses(official):
    """P uniformly drawn pixels per image (config.panoptic.mask_loss_points): each draw is near the official
    losses, and the mean over draws nearer still (the focal loss is unbiased, the dice nearly so)."""
    batch_size, _, height, width = official["target_masks"].shape
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(8):
        points = rng.integers(0, height * width, (batch_size, height * width // 8))
        got = mask_losses(official["pred_masks"], _at_points(official, points), official["target_valid"],
                          official["indices"], official["num_boxes"], points=jnp.asarray(points),
                          image_size=(height, width))
        draws.append([float(got["loss_mask"]), float(got["loss_dice"])])
    expected = [official["expected"]["loss_mask"], official["expected"]["loss_dice"]]
    np.testing.assert_allclose(np.asarray(draws), np.tile(expected, (8, 1)), rtol=0.05)
    np.testing.assert_allclose(np.mean(draws, axis=0), expected, rtol=0.01)
