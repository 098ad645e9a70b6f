"""Panoptic post-processing and metrics, on the host in numpy, as the official DETR does them.

- `post_process_panoptic`: the official `PostProcessPanoptic` (models/segmentation.py): confident queries ->
  per-pixel argmax of their mask logits -> COCO panoptic id map, PNG and `segments_info`.
- `post_process_segm`: the official `PostProcessSegm`: binary instance masks for COCO segm AP.
The panoptic quality metric (PQ) is in `panoptic_quality.py`.

All of it runs after the jitted forward pass: the outputs are data dependent (how many queries survive,
the merging of stuff segments, a loop until no segment is too small), and the official result is defined
by torch's interpolation and PIL's resize, reproduced here on numpy arrays.

COCO panoptic encoding (panopticapi.utils): an id map is stored as an RGB image, id = R + 256 G + 256^2 B.
"""

import io
from collections import defaultdict

import numpy as np
from PIL import Image

from detr_jax.ops.interpolate import apply_taps, linear_taps, nearest_index, resize_bilinear
from detr_jax.ops.panoptic_ids import id2rgb, rgb2id

_SEGM_CHUNK = 16  # queries resized at once by post_process_segm


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


def _segment_image(masks, target_size, stuff_equiv=None):
    """The official `get_ids_area`: id map, its RGB image at the target size, and each segment's area.

    masks: float32 [K, h, w] mask logits at the processed size. Each pixel goes to the query with the
    highest softmax over the K masks (query index = segment id; all 0 when K = 0). With `stuff_equiv`
    (the official `dedup=True`), the queries that share a stuff class are merged into the first of them.
    The id map is resized to target_size (H, W) as an id2rgb image with PIL's NEAREST, as official.
    Returns ids int32 [H, W], the PIL RGB image, area list of K ints (pixels of each query at target size).
    """
    num_masks, h, w = masks.shape
    if num_masks == 0:
        ids = np.zeros((h, w), np.int64)
    else:
        ids = _softmax(masks, axis=0).argmax(0)
    for equiv in (stuff_equiv or {}).values():
        if len(equiv) > 1:
            ids[np.isin(ids, equiv)] = equiv[0]
    final_h, final_w = target_size
    image = Image.fromarray(id2rgb(ids)).resize((final_w, final_h), resample=Image.NEAREST)
    ids = rgb2id(np.asarray(image))
    area = np.bincount(ids.ravel(), minlength=num_masks)[:num_masks]
    return ids, image, [int(a) for a in area]


def _png_bytes(image):
    """PNG encoding of a PIL image (the official `png_string`)."""
    with io.BytesIO() as out:
        image.save(out, format="PNG")
        return out.getvalue()


def _panoptic_one_image(logits, masks, processed_size, target_size, is_thing_map, threshold, padded_size=None):
    """`post_process_panoptic` for one image: logits [N, C + 1], masks [N, h, w] -> result dict."""
    keep, labels = _confident_queries(logits, threshold)
    classes = labels[keep]
    if padded_size is None:  # official: the whole mask (padding included) is stretched to the processed size
        masks = resize_bilinear(masks[keep], processed_size)
    else:  # resized to the padded canvas, of which only the image's pixels are computed (the crop)
        (h, w), (img_h, img_w) = masks.shape[-2:], processed_size
        rows = tuple(t[:img_h] for t in linear_taps(h, int(padded_size[0])))
        cols = tuple(t[:img_w] for t in linear_taps(w, int(padded_size[1])))
        masks = apply_taps(np.asarray(masks[keep], np.float32), rows, cols)
    ids, image, area = _segment_image(masks, target_size, _stuff_equivalences(classes, is_thing_map))
    # Merged stuff queries now have area 0. Drop every segment of <= 4 pixels and redo the assignment
    # (official: without merging again) until none is that small; the dropped pixels go to the others.
    while len(classes) and min(area) <= 4:
        large = np.asarray(area) > 4
        classes, masks = classes[large], masks[large]
        ids, image, area = _segment_image(masks, target_size)
    # (The official sets cur_classes = ones(1) when no query is kept; with no area there is no segment.)
    segments_info = [
        {"id": i, "isthing": bool(is_thing_map[int(c)]), "category_id": int(c), "area": a}
        for i, (c, a) in enumerate(zip(classes, area))
    ]
    return {"segment_ids": ids.astype(np.int32), "png_string": _png_bytes(image), "segments_info": segments_info}


def post_process_panoptic(pred_logits, pred_masks, pred_boxes, processed_sizes, target_sizes, is_thing_map,
                          threshold=0.85, padded_size=None):
    """The official `PostProcessPanoptic.forward`: model outputs -> COCO panoptic predictions.

    Args:
      pred_logits: [B, N, C + 1] class logits, no-object last.
      pred_masks: [B, N, h, w] mask logits (stride 4 of the padded batch).
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
    pred_logits, pred_masks = np.asarray(pred_logits), np.asarray(pred_masks, np.float32)
    if not len(pred_logits) == len(pred_masks) == len(processed_sizes) == len(target_sizes):
        raise ValueError(f"post_process_panoptic: batch sizes differ: pred_logits {len(pred_logits)}, "
                         f"pred_masks {len(pred_masks)}, processed_sizes {len(processed_sizes)}, "
                         f"target_sizes {len(target_sizes)}.")
    return [
        _panoptic_one_image(logits, masks, tuple(int(s) for s in size), tuple(int(s) for s in target),
                            is_thing_map, threshold, padded_size)
        for logits, masks, size, target in zip(pred_logits, pred_masks, processed_sizes, target_sizes)
    ]


# --- The official PostProcessSegm ------------------------------------------------------------

def _sigmoid(x):
    return np.float32(1) / (np.float32(1) + np.exp(-x))


def post_process_segm(pred_masks, max_target_sizes, orig_target_sizes, threshold=0.5, padded_size=None):
    """The official `PostProcessSegm`: binary instance masks at the original image size, for COCO segm AP.

    As official, all masks of the batch are resized (bilinear) to the padded size of the batch, each image's
    are cropped to its processed size, binarised (sigmoid > threshold) and resized (nearest) to the original
    size. Only the pixels that survive the crop and the nearest resize are interpolated.

    Args:
      pred_masks: [B, N, h, w] mask logits (stride 4 of the padded batch).
      max_target_sizes: B pairs (h, w): each image's processed size (after the transforms, before padding).
      orig_target_sizes: B pairs (H, W): each image's original size.
      threshold: on the sigmoid probability.
      padded_size: (H, W) of the padded batch the masks are at stride 4 of. None: the largest of
        max_target_sizes, as official, whose batches are padded to exactly their largest image; detr_jax pads
        further (to a multiple of 32 or a bucket), and stretching that padding to the largest image would
        shift the masks.
    Returns:
      a list of B bool arrays [N, H, W] (the official returns them as uint8 [N, 1, H, W]).
    """
    pred_masks = np.asarray(pred_masks, np.float32)
    max_target_sizes = np.asarray(max_target_sizes, np.int64).reshape(-1, 2)
    orig_target_sizes = np.asarray(orig_target_sizes, np.int64).reshape(-1, 2)
    if not len(pred_masks) == len(max_target_sizes) == len(orig_target_sizes):
        raise ValueError(f"post_process_segm: batch sizes differ: pred_masks {len(pred_masks)}, "
                         f"max_target_sizes {len(max_target_sizes)}, orig_target_sizes {len(orig_target_sizes)}.")
    h, w = pred_masks.shape[-2:]
    max_h, max_w = max_target_sizes.max(0) if padded_size is None else (int(s) for s in padded_size)
    rows, cols = linear_taps(h, max_h), linear_taps(w, max_w)
    results = []
    for masks, (img_h, img_w), (orig_h, orig_w) in zip(pred_masks, max_target_sizes, orig_target_sizes):
        # Crop to the image, then keep only the pixels that the nearest resize to the original size reads:
        # the same numbers as resizing everything, at a fraction of the cost.
        out_rows = nearest_index(int(img_h), int(orig_h))
        out_cols = nearest_index(int(img_w), int(orig_w))
        row_taps = tuple(t[:img_h][out_rows] for t in rows)
        col_taps = tuple(t[:img_w][out_cols] for t in cols)
        # A few queries at a time: N float64 intermediates at full resolution would take gigabytes.
        results.append(np.concatenate([
            _sigmoid(apply_taps(masks[i:i + _SEGM_CHUNK], row_taps, col_taps)) > threshold
            for i in range(0, max(len(masks), 1), _SEGM_CHUNK)
        ]))
    return results
