"""detr_jax.ops.box_ops against hand-computed values and a torch copy of the official util/box_ops.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from detr_jax.ops import box_ops

# --- Reference: the official facebookresearch/detr util/box_ops.py, in torch. ---------------

def _torch_cxcywh_to_xyxy(x):
    x_c, y_c, w, h = x.unbind(-1)
    return torch.stack([x_c - 0.5 * w, y_c - 0.5 * h, x_c + 0.5 * w, y_c + 0.5 * h], dim=-1)


def _torch_xyxy_to_cxcywh(x):
    x0, y0, x1, y1 = x.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def _torch_box_area(boxes):
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _torch_box_iou(boxes1, boxes2):
    area1, area2 = _torch_box_area(boxes1), _torch_box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, :, 0] * wh[:, :, 1]
    union = area1[:, None] + area2 - inter
    return inter / union, union


def _torch_generalized_box_iou(boxes1, boxes2):
    iou, union = _torch_box_iou(boxes1, boxes2)
    lt = torch.min(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    area = wh[:, :, 0] * wh[:, :, 1]
    return iou - (area - union) / area


def _random_cxcywh(rng, n):
    centre = rng.uniform(0.1, 0.9, (n, 2))
    size = rng.uniform(0.05, 0.5, (n, 2))
    return np.concatenate([centre, size], -1).astype(np.float32)


# --- Hand-computed cases. ---------------------------------------------------------------------

def test_conversions_hand_values():
    cxcywh = np.array([[0.5, 0.5, 0.2, 0.4], [10.0, 20.0, 4.0, 6.0]], np.float32)
    xyxy = np.array([[0.4, 0.3, 0.6, 0.7], [8.0, 17.0, 12.0, 23.0]], np.float32)
    np.testing.assert_allclose(box_ops.box_cxcywh_to_xyxy(cxcywh), xyxy, rtol=1e-6)
    np.testing.assert_allclose(box_ops.box_xyxy_to_cxcywh(xyxy), cxcywh, rtol=1e-6)
    np.testing.assert_allclose(box_ops.box_area(xyxy), [0.08, 24.0], rtol=1e-5)


def test_iou_and_giou_hand_values():
    a = np.array([[0.0, 0.0, 2.0, 2.0]], np.float32)
    b = np.array([[1.0, 1.0, 3.0, 3.0],    # overlap 1, union 7, enclosing 3x3
                  [4.0, 0.0, 6.0, 2.0],    # disjoint: iou 0, union 8, enclosing 6x2
                  [0.0, 0.0, 2.0, 2.0]],   # identical
                 np.float32)
    iou, union = box_ops.box_iou(a, b)
    np.testing.assert_allclose(iou, [[1 / 7, 0.0, 1.0]], rtol=1e-6)
    np.testing.assert_allclose(union, [[7.0, 8.0, 4.0]], rtol=1e-6)
    giou = box_ops.generalized_box_iou(a, b)
    np.testing.assert_allclose(giou, [[1 / 7 - 2 / 9, 0.0 - 4 / 12, 1.0]], rtol=1e-6)


# --- Against the official code. ---------------------------------------------------------------

def test_matches_official_on_random_boxes():
    rng = np.random.default_rng(0)
    boxes1 = _random_cxcywh(rng, 7)
    boxes2 = _random_cxcywh(rng, 5)
    t1, t2 = _torch_cxcywh_to_xyxy(torch.from_numpy(boxes1)), _torch_cxcywh_to_xyxy(torch.from_numpy(boxes2))
    j1, j2 = box_ops.box_cxcywh_to_xyxy(boxes1), box_ops.box_cxcywh_to_xyxy(boxes2)
    np.testing.assert_allclose(j1, t1.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(box_ops.box_xyxy_to_cxcywh(j1), _torch_xyxy_to_cxcywh(t1).numpy(),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(box_ops.box_area(j1), _torch_box_area(t1).numpy(), rtol=1e-6)

    iou, union = box_ops.box_iou(j1, j2)
    ref_iou, ref_union = _torch_box_iou(t1, t2)
    assert iou.shape == (7, 5)
    np.testing.assert_allclose(iou, ref_iou.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(union, ref_union.numpy(), rtol=1e-6, atol=1e-7)
    ref_giou = _torch_generalized_box_iou(t1, t2).numpy()
    np.testing.assert_allclose(box_ops.generalized_box_iou(j1, j2), ref_giou, rtol=1e-6, atol=1e-7)

    # Elementwise is the diagonal of the pairwise version (official loss: torch.diag(...)).
    k1, k2 = j1[:5], j2
    np.testing.assert_allclose(box_ops.elementwise_generalized_box_iou(k1, k2),
                               np.diag(ref_giou[:5]), rtol=1e-6, atol=1e-7)


def test_pairwise_batched_leading_dims():
    rng = np.random.default_rng(1)
    boxes1 = _random_cxcywh(rng, 2 * 4).reshape(2, 4, 4)
    boxes2 = _random_cxcywh(rng, 2 * 3).reshape(2, 3, 4)

    @jax.jit
    def batched_and_per_image(b1, b2):
        b1, b2 = box_ops.box_cxcywh_to_xyxy(b1), box_ops.box_cxcywh_to_xyxy(b2)
        return box_ops.generalized_box_iou(b1, b2), jax.vmap(box_ops.generalized_box_iou)(b1, b2)

    batched, per_image = batched_and_per_image(boxes1, boxes2)
    assert batched.shape == (2, 4, 3)
    np.testing.assert_allclose(batched, per_image, rtol=1e-6)


# --- Degenerate boxes: padded zeros, points, lines. --------------------------------------------

_DEGENERATE = np.array([[0.0, 0.0, 0.0, 0.0],    # padded target
                        [0.3, 0.3, 0.3, 0.3],    # point
                        [0.2, 0.1, 0.2, 0.6],    # zero width
                        [0.1, 0.2, 0.5, 0.6]],   # a normal box
                       np.float32)


def test_degenerate_boxes_give_finite_values():
    iou, union = box_ops.box_iou(_DEGENERATE, _DEGENERATE)
    giou = box_ops.generalized_box_iou(_DEGENERATE, _DEGENERATE)
    elementwise = box_ops.elementwise_generalized_box_iou(_DEGENERATE, _DEGENERATE[::-1])
    for value in (iou, union, giou, elementwise):
        assert np.isfinite(np.asarray(value)).all()
    # Where the official formula is defined (positive union and enclosing area) we agree.
    ref = _torch_generalized_box_iou(torch.from_numpy(_DEGENERATE), torch.from_numpy(_DEGENERATE)).numpy()
    defined = np.isfinite(ref)
    assert defined.sum() >= 7
    np.testing.assert_allclose(np.asarray(giou)[defined], ref[defined], rtol=1e-6)


@pytest.mark.parametrize("fn", [box_ops.generalized_box_iou, box_ops.elementwise_generalized_box_iou,
                                lambda a, b: box_ops.box_iou(a, b)[0]])
def test_degenerate_boxes_give_finite_gradients(fn):
    def total(a, b):
        return fn(box_ops.box_cxcywh_to_xyxy(a), box_ops.box_cxcywh_to_xyxy(b)).sum()

    cxcywh = box_ops.box_xyxy_to_cxcywh(jnp.asarray(_DEGENERATE))
    grads = jax.jit(jax.grad(total, argnums=(0, 1)))(cxcywh, cxcywh)
    for grad in grads:
        assert np.isfinite(np.asarray(grad)).all()
