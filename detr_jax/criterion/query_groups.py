"""Group DETR's loss side (Chen et al. 2023; `models.aids.DETRWithAids.num_query_groups`): each group of queries is
matched and scored as if it were its own image."""

import jax.numpy as jnp


def split_query_groups(outputs, targets, groups: int):
    """Group DETR (`DETRWithAids.num_query_groups`): make each query group its own image, with its own copy of the
    targets.

    Args:
        outputs: "pred_logits" [B, G * N, C + 1], "pred_boxes" [B, G * N, 4] (and the same in every
            "aux_outputs" entry), group by group.
        targets: "labels" [B, M], "boxes" [B, M, 4] cxcywh normalised, "mask" [B, M].
        groups: G.
    Returns:
        (outputs, targets) with batch B * G (row b * G + g is group g of image b) and N queries, so that the
        matcher assigns every group one-to-one on its own and the criterion averages over groups (num_boxes
        counts every copy: the loss has the scale of a single-group DETR's).
    """
    if groups == 1:
        return outputs, targets

    def split(o):
        return {k: v.reshape((v.shape[0] * groups, v.shape[1] // groups) + v.shape[2:]) for k, v in o.items()}

    out = split({k: outputs[k] for k in ("pred_logits", "pred_boxes")})
    if "aux_outputs" in outputs:
        out["aux_outputs"] = [split(o) for o in outputs["aux_outputs"]]
    return out, {k: jnp.repeat(v, groups, axis=0) for k, v in targets.items()}
