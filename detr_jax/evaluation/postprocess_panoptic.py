"""Panoptic post-processing, as the official DETR does it: the data-dependent choices on the host, the pixels on
device (jit), with the official numbers.

- `post_process_panoptic`: the official `PostProcessPanoptic` (models/segmentation.py): confident queries ->
  per-pixel argmax of their mask logits -> COCO panoptic id map, PNG and `segments_info`.
- `post_process_segm` / `segm_masks`: the official `PostProcessSegm`: binary instance masks for COCO segm AP.
The panoptic quality metric (PQ) is in `panoptic_quality.py`.

Which queries survive and the merging of stuff segments are decided on the host; the masks' resize (torch's bilinear
with its roundings, `ops.interpolate_device`), the softmax argmax, the loop until no segment is too small and the
sigmoid threshold run on device, at the pixels of the original size only (the official nearest resizes, torch's for
the instance masks and PIL's for the id map, pick them), so the host never holds a full-resolution logit map.

COCO panoptic encoding (panopticapi.utils): an id map is stored as an RGB image, id = R + 256 G + 256^2 B."""

import functools
import io
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from detr_jax.ops.interpolate import linear_taps, nearest_index
from detr_jax.ops.interpolate_device import apply_taps_transposed, device_blend
from detr_jax.ops.panoptic_ids import id2rgb

# --- The official PostProcessPanoptic --------------------------------------------------------

def _softmax(x, axis):
    """Numerically stable softmax in float32, the way torch computes it (exp(x - max) / sum)."""
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _confident_queries(logits, threshold):
    """Queries kept by the official post-processing, and their classes.

    logits: [N, C + 1], no-object last. A query is kept when its most likely class is a real class and its
    probability is above `threshold`. Returns keep bool [N] and labels int [N] (the argmax over all C + 1).
    """
    prob = _softmax(np.asarray(logits, np.float32), axis=-1)
    scores, labels = prob.max(-1), prob.argmax(-1)
    keep = (labels != logits.shape[-1] - 1) & (scores > threshold)
    return keep, labels


def _stuff_equivalences(classes, is_thing_map):
    """{stuff class: [indices of the kept queries predicting it]}, in query order (official)."""
    equiv = defaultdict(list)
    for k, label in enumerate(classes):
        if not is_thing_map[int(label)]:
            equiv[int(label)].append(k)
    return equiv


def _png_bytes(image):
    """PNG encoding of a PIL image (the official `png_string`)."""
    with io.BytesIO() as out:
        image.save(out, format="PNG")
        return out.getvalue()


def _pil_nearest_index(in_size, out_size):
    """Source index of each output index in PIL's NEAREST resize (the official resize of the id map), read off
    PIL itself: a NEAREST resize picks rows and columns independently."""
    line = Image.fromarray(np.arange(in_size, dtype=np.int32)[None, :])  # mode "I"
    return np.asarray(line.resize((int(out_size), 1), resample=Image.NEAREST))[0].astype(np.int64)


def _taps(mask_size, sizes, targets, padded_sizes, out_size, pick):
    """Per image, the bilinear taps (mask_size -> its padded size, cropped to its size) of the pixels that the
    resize `pick` (in_size, out_size) -> source indices takes to its target size, padded to out_size with index 0,
    weight 0. Returns (i0, i1 int32, w0, w1 float32) of the height [B, out_h] + the same of the width [B, out_w]."""
    dtypes = (np.int32, np.int32, np.float32, np.float32)
    taps = [np.zeros((len(sizes), out_size[axis]), dtype) for axis in (0, 1) for dtype in dtypes]
    for b, (size, target, padded) in enumerate(zip(sizes, targets, padded_sizes)):
        for axis in (0, 1):
            picked = pick(int(size[axis]), int(target[axis]))  # in the crop [:size]: the taps' own indices
            for k, t in enumerate(linear_taps(int(mask_size[axis]), int(padded[axis]))):
                taps[4 * axis + k][b, :len(picked)] = t[picked]
    return taps


def _candidates(logits, threshold, is_thing_map):
    """The confident queries of one image (in query order), their classes, and the candidate that each one's
    pixels go to: itself, or the first candidate of its stuff class (the official `dedup`)."""
    keep, labels = _confident_queries(logits, threshold)
    queries, classes = np.flatnonzero(keep), labels[keep]
    owner = np.arange(len(queries))
    for equiv in _stuff_equivalences(classes, is_thing_map).values():
        owner[equiv] = equiv[0]
    return queries, classes, owner


@functools.partial(jax.jit, static_argnames="blend")
def _panoptic_ids(pred_masks, queries, owner, targets, taps, zero, blend):
    """The official `get_ids_area` and its loop, at the target pixels only, for a batch (see `_one_image_ids`)."""
    return jax.vmap(functools.partial(_one_image_ids, blend=blend, zero=zero))(pred_masks, queries, owner, targets,
                                                                              *taps)


def _one_image_ids(masks, queries, owner, target, r0, r1, rw0, rw1, c0, c1, cw0, cw1, blend, zero):
    """masks [N, h, w]; queries int32 [K] the candidates' queries; owner int32 [K] (-1: no candidate); target
    (H, W); the taps of the target pixels ([H'], [W'], padded). Each pixel goes to the candidate of the highest
    softmax over the candidates' resized logits, then to its owner; then, as long as a candidate covers <= 4 pixels,
    those are dropped and the pixels reassigned among the others (without owners, as official).
    Returns ids int32 [H', W'] (a candidate), valid bool [K] (the candidates left), area int32 [K] (pixels)."""
    logits = apply_taps_transposed(jnp.moveaxis(masks[queries], 0, -1), (r0, r1, rw0, rw1), (c0, c1, cw0, cw1),
                                   blend, zero, channels_last=True)  # [W', H', K]
    index = jnp.arange(len(queries))
    inside = (jnp.arange(logits.shape[0])[:, None] < target[1]) & (jnp.arange(logits.shape[1]) < target[0])

    def assign(valid, owner):  # numpy's _softmax(x, 0).argmax(0) over the valid candidates, each pixel's owner
        x = jnp.where(valid, logits, -jnp.inf)
        e = jnp.exp(x - x.max(-1, keepdims=True))
        ids = owner[jnp.argmax(e / e.sum(-1, keepdims=True), axis=-1)]  # [W', H']
        return ids, jnp.bincount(jnp.where(inside, ids, len(queries)).ravel(), length=len(queries) + 1)[:-1]

    def step(state):  # the first assignment (with owners), then each redo after dropping small candidates
        first, valid, _, area = state
        valid = jnp.where(first, valid, valid & (area > 4))
        return (jnp.asarray(False), valid) + assign(valid, jnp.where(first, owner, index))

    state = (jnp.asarray(True), owner >= 0, jnp.zeros(logits.shape[:2], jnp.int32), jnp.zeros(len(queries), jnp.int32))
    _, valid, ids, area = jax.lax.while_loop(lambda s: s[0] | jnp.any(s[1] & (s[3] <= 4)), step, state)
    return jnp.swapaxes(ids, 0, 1), valid, area


def _panoptic_result(ids, valid, area, classes, target, is_thing_map):
    """One image's result dict from `_panoptic_ids`' rows (ids at least [H, W], target (H, W))."""
    if not valid.any():  # no candidate, or none left: the map is all 0 (official) and no segment
        ids = np.zeros(target, np.int32)
    else:  # candidate -> its index among those left: the segment id
        ids = (np.cumsum(valid) - 1).astype(np.int32)[ids[:target[0], :target[1]]]
    segments_info = [{"id": i, "isthing": bool(is_thing_map[int(c)]), "category_id": int(c), "area": int(a)}
                     for i, (c, a) in enumerate(zip(classes[valid], area[valid]))]
    return {"segment_ids": ids, "png_string": _png_bytes(Image.fromarray(id2rgb(ids))),
            "segments_info": segments_info}


def post_process_panoptic(pred_logits, pred_masks, pred_boxes, processed_sizes, target_sizes, is_thing_map,
                          threshold=0.85, padded_size=None):
    """The official `PostProcessPanoptic.forward`: model outputs -> COCO panoptic predictions.

    The confident queries and the merging of stuff are chosen on the host; the resize of their masks, the per-pixel
    argmax and the dropping of small segments run on device (jit), at the pixels of the target size only (PIL's
    NEAREST resize of the official id map picks them).

    Args:
      pred_logits: [B, N, C + 1] class logits, no-object last.
      pred_masks: [B, N, h, w] mask logits (stride 4 of the padded batch); a jax array stays on its device.
      pred_boxes: [B, N, 4] cxcywh, normalised. Unused: the official converts them to xyxy and never
        reads them; kept so the call mirrors the official one.
      processed_sizes: B pairs (h, w): each image's size as fed to the model (after the transforms,
        before padding); the masks are resized to it.
      target_sizes: B pairs (H, W): the size of the output id map (usually the original image size).
      is_thing_map: {class id: bool}, True for thing classes, for every class a query may predict.
      threshold: a query is kept when its best class is not no-object and has probability > threshold.
      padded_size: None (official): each image's masks, padding included, are stretched to its processed size,
        which shifts them unless the batch was padded to exactly that image (the official evaluation pads to
        the largest image of a batch of 2). (H, W) of the padded batch: the masks are resized to it and cropped
        to the image instead, as `post_process_segm(padded_size=...)` does (detr_jax pads to buckets).
    Returns:
      a list of B dicts:
        "segment_ids": int32 [H, W] segment id of each pixel; ids index "segments_info". When no segment
          survives (no confident query), the map is all 0 and "segments_info" is empty.
        "png_string": bytes, the id map as an RGB PNG (id = R + 256 G + 256^2 B), the official output.
        "segments_info": [{"id", "isthing", "category_id", "area"}], area in pixels at the target size.
    """
    del pred_boxes  # the official output does not depend on them
    pred_logits = np.asarray(pred_logits)
    if not len(pred_logits) == len(pred_masks) == len(processed_sizes) == len(target_sizes):
        raise ValueError(f"post_process_panoptic: batch sizes differ: pred_logits {len(pred_logits)}, "
                         f"pred_masks {len(pred_masks)}, processed_sizes {len(processed_sizes)}, "
                         f"target_sizes {len(target_sizes)}.")
    sizes = np.asarray(processed_sizes, np.int64).reshape(-1, 2)
    targets = np.asarray(target_sizes, np.int64).reshape(-1, 2)
    candidates = [_candidates(logits, threshold, is_thing_map) for logits in pred_logits]
    num = max([len(queries) for queries, _, _ in candidates] + [0])
    if num == 0:
        return [_panoptic_result(None, np.zeros(0, bool), np.zeros(0, int), np.zeros(0, int), tuple(t), is_thing_map)
                for t in targets]
    num = min(-(-num // 8) * 8, pred_logits.shape[1])  # a multiple of 8: few shapes compile
    queries, owner = np.zeros((len(sizes), num), np.int32), np.full((len(sizes), num), -1, np.int32)
    for b, (q, _, o) in enumerate(candidates):
        queries[b, :len(q)], owner[b, :len(o)] = q, o
    padded = sizes if padded_size is None else [padded_size] * len(sizes)
    taps = _taps(np.shape(pred_masks)[-2:], sizes, targets, padded, -(-targets.max(0) // 32) * 32, _pil_nearest_index)
    ids, valid, area = (np.asarray(x) for x in _panoptic_ids(jnp.asarray(pred_masks, jnp.float32), queries, owner,
                                                             targets.astype(np.int32), taps, jnp.uint32(0),
                                                             device_blend()))
    return [_panoptic_result(ids[b], valid[b, :len(c)], area[b, :len(c)], c, tuple(targets[b]), is_thing_map)
            for b, (_, c, _) in enumerate(candidates)]


# --- The official PostProcessSegm ------------------------------------------------------------

def _sigmoid(x):
    return np.float32(1) / (np.float32(1) + np.exp(-x))


@functools.lru_cache(maxsize=None)
def logit_cut(threshold: float) -> np.float32:
    """The smallest float32 x whose float32 sigmoid (`_sigmoid`, 1 / (1 + exp(-x))) is > threshold: the sigmoid
    test of a mask logit is then the comparison x >= cut, with no exp on device. 0 < threshold < 1."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"the mask threshold is a probability in (0, 1), got {threshold}")

    def above(key):  # float32 of a key that orders the floats as integers (negative keys: negative floats)
        bits = np.asarray([abs(key) | (0x80000000 if key < 0 else 0)], np.uint32)
        with np.errstate(over="ignore"):
            return bool(_sigmoid(bits.view(np.float32))[0] > threshold)

    low, high = -0x7F800000, 0x7F800000  # -inf (below the cut), +inf (above it)
    while high - low > 1:  # invariant: not above(low), above(high)
        mid = (low + high) // 2
        low, high = (low, mid) if above(mid) else (mid, high)
    return np.asarray([abs(high) | (0x80000000 if high < 0 else 0)], np.uint32).view(np.float32)[0]


@functools.partial(jax.jit, static_argnames="blend")
def _segm_masks(pred_masks, taps, cut, zero, blend):
    def one_image(masks, r0, r1, rw0, rw1, c0, c1, cw0, cw1):
        return apply_taps_transposed(masks, (r0, r1, rw0, rw1), (c0, c1, cw0, cw1), blend, zero) >= cut
    return jax.vmap(one_image)(pred_masks, *taps)


def segm_masks(pred_masks, max_target_sizes, orig_target_sizes, threshold=0.5, padded_size=None):
    """`post_process_segm` on device (jit): the masks of the whole batch, transposed, in one bool array.

    Args: as `post_process_segm`; pred_masks may be a jax array (it stays on its device).
    Returns:
      bool [B, N, W, H] (a jax array): image b's masks at its original size (h, w) are [b, :, :w, :h], transposed
      (column-major, as COCO's RLE reads them); the rest is padding. (H, W): the largest original size of the batch
      rounded up to a multiple of 32, so that few shapes compile.
    """
    max_target_sizes = np.asarray(max_target_sizes, np.int64).reshape(-1, 2)
    orig_target_sizes = np.asarray(orig_target_sizes, np.int64).reshape(-1, 2)
    if not len(pred_masks) == len(max_target_sizes) == len(orig_target_sizes):
        raise ValueError(f"post_process_segm: batch sizes differ: pred_masks {len(pred_masks)}, "
                         f"max_target_sizes {len(max_target_sizes)}, orig_target_sizes {len(orig_target_sizes)}.")
    if padded_size is None:  # official
        padded_size = max_target_sizes.max(0) if len(max_target_sizes) else (1, 1)
    out_size = -(-orig_target_sizes.max(0, initial=1) // 32) * 32
    taps = _taps(np.shape(pred_masks)[-2:], max_target_sizes, orig_target_sizes, [padded_size] * len(pred_masks),
                 out_size, nearest_index)
    return _segm_masks(jnp.asarray(pred_masks, jnp.float32), taps, logit_cut(float(threshold)), jnp.uint32(0),
                       device_blend())


def post_process_segm(pred_masks, max_target_sizes, orig_target_sizes, threshold=0.5, padded_size=None):
    """The official `PostProcessSegm`: binary instance masks at the original image size, for COCO segm AP.

    As official, all masks of the batch are resized (bilinear) to the padded size of the batch, each image's
    are cropped to its processed size, binarised (sigmoid > threshold) and resized (nearest) to the original
    size. Only the pixels that survive the crop and the nearest resize are interpolated, on device
    (`segm_masks`), with torch's roundings.

    Args:
      pred_masks: [B, N, h, w] mask logits (stride 4 of the padded batch).
      max_target_sizes: B pairs (h, w): each image's processed size (after the transforms, before padding).
      orig_target_sizes: B pairs (H, W): each image's original size.
      threshold: on the sigmoid probability, in (0, 1).
      padded_size: (H, W) of the padded batch the masks are at stride 4 of. None: the largest of
        max_target_sizes, as official, whose batches are padded to exactly their largest image; detr_jax pads
        further (to a multiple of 32 or a bucket), and stretching that padding to the largest image would
        shift the masks.
    Returns:
      a list of B bool arrays [N, H, W] (the official returns them as uint8 [N, 1, H, W]), each mask
      column-major (Fortran order), as COCO's RLE encoder reads it.
    """
    masks = np.asarray(segm_masks(pred_masks, max_target_sizes, orig_target_sizes, threshold, padded_size))
    return [np.ascontiguousarray(masks[b, :, :w, :h]).transpose(0, 2, 1)
            for b, (h, w) in enumerate(np.asarray(orig_target_sizes, np.int64).reshape(-1, 2))]
