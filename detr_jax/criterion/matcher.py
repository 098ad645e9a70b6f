"""Hungarian matching between predictions and padded targets.

The cost matrices are computed on device, inside jit. The assignment is exact (Hungarian) with either of two
solvers, which give the same optimum (equal total cost; the same assignment wherever it is unique):
  "host": scipy's `linear_sum_assignment` through one `jax.pure_callback`, the single host/device boundary of
    the training step;
  "device": `optax.assignment.hungarian_algorithm`, vmapped over layers and images, no host round trip.
    On accelerators the device then never waits for the host, and a step without a host callback can be
    stored in jax's persistent compilation cache (jax never stores programs with callbacks).
`resolve_solver("auto")` picks "host" everywhere: on CPU scipy is 2.4-10x faster than the vmapped while loops
(BENCHMARKS.md), and on an H200 the host solve is 2.4-5.2% of a step; the device solver has not been timed on a GPU
or TPU. Choose "device" for a train step that jax's persistent compilation cache can store (restarts skip the
compile), at the price of the device solver's time. Why the host solver exists at all:
  * the official DETR uses scipy, and an exact Hungarian solve is what makes our
    matching (hence our losses) identical to it; approximate on-device solvers (auction,
    Sinkhorn) give different assignments on near-ties;
  * the problem is tiny (about 100 queries x a few dozen targets) and sequential, a poor
    fit for an accelerator anyway.
The round trip is paid once per step: every decoder layer and every image of the local
batch go to the host together, as one [L, B, N, M] array.

No gradient flows through the matching: the costs are wrapped in `stop_gradient`.
Works inside `jax.shard_map` too: the callback only sees the local shard's arrays.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec
from optax import assignment
from scipy.optimize import linear_sum_assignment

from detr_jax.ops import box_ops, sharding

SOLVERS = ("host", "device")
CHOICES = ("auto",) + SOLVERS  # what config.loss.matcher may say

# Stands in for nan / inf costs (e.g. from a diverging model) so scipy never raises
# "cost matrix is infeasible"; big enough to lose against any real cost.
_LARGE_COST = 1e8


def match_cost_matrix(pred_logits, pred_boxes, tgt_labels, tgt_boxes, *,
                      cost_class, cost_bbox, cost_giou):
    """Matching cost of every query against every target slot, per image.

    Args:
      pred_logits: [B, N, num_classes + 1] class logits (no-object is the last index).
      pred_boxes: [B, N, 4] cxcywh, normalised.
      tgt_labels: [B, M] int class ids (padded slots may hold anything).
      tgt_boxes: [B, M, 4] cxcywh, normalised.
      cost_class, cost_bbox, cost_giou: weights of the three terms.
    Returns:
      [B, N, M] cost; padded target columns hold meaningless (but finite) values.
    """
    prob = jax.nn.softmax(pred_logits, axis=-1)  # [B, N, C+1]
    # Contrary to the loss, the class cost is not the NLL but -prob[target class]
    # (1 - prob, minus the constant 1 that does not change the assignment), as official.
    labels = jnp.clip(tgt_labels, 0, pred_logits.shape[-1] - 1)
    class_cost = -jnp.take_along_axis(prob, labels[:, None, :], axis=-1)  # [B, N, M]
    bbox_cost = jnp.abs(pred_boxes[:, :, None, :] - tgt_boxes[:, None, :, :]).sum(-1)
    giou_cost = -box_ops.generalized_box_iou(
        box_ops.box_cxcywh_to_xyxy(pred_boxes), box_ops.box_cxcywh_to_xyxy(tgt_boxes))
    return cost_bbox * bbox_cost + cost_class * class_cost + cost_giou * giou_cost


def _assign_on_host(costs, tgt_mask):
    """Host side of the callback: exact Hungarian solve per (layer, image).

    Args:
      costs: np [L, B, N, M] matching costs.
      tgt_mask: np bool [B, M], True on real targets.
    Returns:
      np int32 [L, B, M]: matched query index per target slot; -1 for padded slots
      (and for real targets left over when there are more targets than queries).
    """
    costs = np.nan_to_num(np.asarray(costs, np.float64),
                          nan=_LARGE_COST, posinf=_LARGE_COST, neginf=-_LARGE_COST)
    tgt_mask = np.asarray(tgt_mask, bool)
    num_layers, batch_size, _, num_slots = costs.shape
    indices = np.full((num_layers, batch_size, num_slots), -1, np.int32)
    for b in range(batch_size):
        valid_slots = np.flatnonzero(tgt_mask[b])
        if valid_slots.size == 0:
            continue
        for layer in range(num_layers):
            # Only real targets take part: a padded slot must never steal a query.
            queries, cols = linear_sum_assignment(costs[layer, b][:, valid_slots])
            indices[layer, b, valid_slots[cols]] = queries
    return indices


def _assign_on_device(costs, tgt_mask):
    """`_assign_on_host` in jax: the same optimum, no callback.

    Padded target columns get one constant cost, above every real cost of their image: with N >= M every column
    is assigned and a constant column adds the same to every assignment (neutral); with M > N a padded column is
    never chosen over a free real one. Non-finite costs become large finite ones, as on the host.

    Args / returns: as `_assign_on_host` (costs [L, B, N, M], tgt_mask bool [B, M]) -> int32 [L, B, M].
    """
    costs = jnp.nan_to_num(costs.astype(jnp.float32), nan=_DEVICE_LARGE_COST, posinf=_DEVICE_LARGE_COST,
                           neginf=-_DEVICE_LARGE_COST)
    mask = tgt_mask[None, :, None, :]  # [1, B, 1, M]
    largest = jnp.max(jnp.where(mask, jnp.abs(costs), 0.0), axis=(-2, -1), keepdims=True)  # [L, B, 1, 1]
    costs = jnp.where(mask, costs, largest + 1.0)
    num_layers, batch_size, _, num_slots = costs.shape

    def solve(cost):  # [N, M] -> [M] query per slot, -1 where unassigned (M > N)
        queries, slots = assignment.hungarian_algorithm(cost)
        return jnp.full((num_slots,), -1, jnp.int32).at[slots].set(queries.astype(jnp.int32))

    indices = jax.vmap(jax.vmap(solve))(costs)  # [L, B, M]
    return jnp.where(tgt_mask[None], indices, -1)


# Float32 on the device: large enough to lose against any real cost, small enough to keep the others' precision.
_DEVICE_LARGE_COST = 1e6


def resolve_solver(solver: str) -> str:
    """"host" or "device" for a config value (`config.check_config` refuses others). "auto" is the host solver
    everywhere: it is the one measured faster on CPU (BENCHMARKS.md) and at 2.4-5.2% of an H200 step, while the
    device solver has not been timed on a GPU or TPU yet."""
    return "host" if solver == "auto" else solver


def hungarian_match(pred_logits, pred_boxes, targets, *,
                    cost_class=1.0, cost_bbox=5.0, cost_giou=2.0, solver: str = "host"):
    """Match all decoder layers of a batch to their targets (with solver="host", in one host call).

    Args:
      pred_logits: [L, B, N, num_classes + 1], L decoder layers stacked.
      pred_boxes: [L, B, N, 4] cxcywh, normalised.
      targets: dict with "labels" int [B, M], "boxes" [B, M, 4] cxcywh normalised,
        "mask" bool [B, M] (True on real objects).
      cost_class, cost_bbox, cost_giou: matching cost weights (official defaults).
      solver: "host" (scipy through a callback) or "device" (optax, in the program).
    Returns:
      int32 [L, B, M]: for each target slot the index of its query, -1 on padded slots (and on real targets
      left over when there are more targets than queries).
    """
    per_layer_cost = jax.vmap(lambda logits, boxes: match_cost_matrix(
        logits, boxes, targets["labels"], targets["boxes"],
        cost_class=cost_class, cost_bbox=cost_bbox, cost_giou=cost_giou))
    costs = jax.lax.stop_gradient(per_layer_cost(pred_logits, pred_boxes))  # [L, B, N, M]
    if solver == "device":
        return _assign_on_device(costs, jnp.asarray(targets["mask"], bool))
    num_layers, batch_size, _, num_slots = costs.shape
    result_shape = jax.ShapeDtypeStruct((num_layers, batch_size, num_slots), jnp.int32)
    return jax.pure_callback(_assign_on_host, result_shape,
                             costs, jnp.asarray(targets["mask"], bool))


class HungarianMatcher:
    """The official `HungarianMatcher`: cost weights and solver, callable on stacked decoder layers.

    With a `mesh`, each device's shard of the batch is matched on its own (`shard_map`): with the host solver each
    host then solves only the images it holds.
    """

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0, solver: str = "host",
                 mesh=None):
        self.costs = dict(cost_class=cost_class, cost_bbox=cost_bbox, cost_giou=cost_giou)
        self.solver = resolve_solver(solver)
        self.mesh = mesh

    def __call__(self, pred_logits, pred_boxes, targets):
        """pred_logits [L, B, N, C + 1], pred_boxes [L, B, N, 4] cxcywh normalised, targets "labels" [B, M], "boxes"
        [B, M, 4] cxcywh normalised, "mask" bool [B, M] -> int32 [L, B, M] (see `hungarian_match`)."""
        def local(pred_logits, pred_boxes, labels, boxes, mask):  # this device's images
            return hungarian_match(pred_logits, pred_boxes, {"labels": labels, "boxes": boxes, "mask": mask},
                                   **self.costs, solver=self.solver)

        args = (pred_logits, pred_boxes, targets["labels"], targets["boxes"], targets["mask"])
        if self.mesh is None:
            return local(*args)
        layers, images = PartitionSpec(None, sharding.DATA_AXIS), PartitionSpec(sharding.DATA_AXIS)
        return jax.shard_map(local, mesh=self.mesh, in_specs=(layers,) * 2 + (images,) * 3, out_specs=layers,
                             check_vma=False)(*args)
