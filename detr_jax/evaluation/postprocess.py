"""The official `PostProcess`: DETR's outputs -> scored, labelled boxes in original-image pixels (jit-able)."""

from typing import Optional

import jax
import jax.numpy as jnp

from detr_jax.ops import box_ops


def postprocess(pred_logits, pred_boxes, orig_size, top_k: Optional[int] = None):
    """The official `PostProcess`: best non-no-object class per query, boxes to original-image pixels.

    Args:
      pred_logits: [B, N, C + 1] (no-object last); pred_boxes: [B, N, 4] cxcywh normalised.
      orig_size: int [B, 2] (h, w) of the original images.
      top_k: keep only the k highest-scoring queries per image (None: all N, as official).
    Returns:
      scores [B, K], labels int32 [B, K], boxes [B, K, 4] xyxy in absolute pixels of the original image.
    """
    prob = jax.nn.softmax(pred_logits, axis=-1)[..., :-1]
    scores, labels = prob.max(-1), prob.argmax(-1).astype(jnp.int32)
    h, w = orig_size[:, 0].astype(jnp.float32), orig_size[:, 1].astype(jnp.float32)
    scale = jnp.stack([w, h, w, h], axis=-1)[:, None, :]
    boxes = box_ops.box_cxcywh_to_xyxy(pred_boxes) * scale
    if top_k is not None and top_k < scores.shape[1]:
        scores, idx = jax.lax.top_k(scores, top_k)
        labels = jnp.take_along_axis(labels, idx, axis=1)
        boxes = jnp.take_along_axis(boxes, idx[..., None], axis=1)
    return scores, labels, boxes
