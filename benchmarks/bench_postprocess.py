"""Evaluation post-processing time per COCO-sized image: detection, panoptic PQ, segm AP; which part dominates.

  python benchmarks/bench_postprocess.py               # ~2 min on 2 CPU cores; appends to BENCHMARKS.md
  python benchmarks/bench_postprocess.py --no-append --images 1 --repeats 1

Simulated model outputs of a COCO val2017 image: a ~800 x 1066 input padded to 800 x 1068 (480 x 640 original),
100 queries, mask logits [100, 200, 267] (stride 4) shaped as blobs of random sizes with a little noise.
- detection (91 classes): `postprocess` (jitted, on device) and the COCO results JSON (host).
- panoptic PQ (250 classes, 20 confident queries, things and stuff, some of one stuff class): "host (before)" is
  the former numpy `post_process_panoptic` (float64 resize of the kept masks to the processed size, softmax argmax,
  PIL resize of the id map, the loop that drops small segments, PNG), reproduced here; "device (after)" is today's
  (`_panoptic_ids` on device, at the original size's pixels). Then the PQ counts of the image (`image_pq_stats`).
- segm AP (`post_process_segm` + RLE, per `InstanceScorer`): every query's mask (the official post-processes all
  of them; the scorer encodes those of a thing label: all 100 here, the worst case). "host (before)" is the former
  numpy path (float64 resize of the kept pixels, sigmoid, the column-major uint8 copy, `mask.encode`); "device" is
  `segm_masks` (jit: resize, threshold, column-major bool masks) then the host's copy of the image's masks and
  `mask.encode`.
Both paths give the same masks, id maps, PNGs and areas (checked). Wall and CPU seconds (all threads of this
process) per image, median of the repeats after a warm-up; the device parts run on a batch of --images. On a
shared host the CPU seconds are the steadier measure.
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from PIL import Image  # noqa: E402
from pycocotools import mask as mask_util  # noqa: E402

from benchmarks import report  # noqa: E402
from detr_jax.evaluation import postprocess_panoptic as pp  # noqa: E402
from detr_jax.evaluation.coco import to_coco_results  # noqa: E402
from detr_jax.evaluation.panoptic_quality import image_pq_stats  # noqa: E402
from detr_jax.evaluation.postprocess import postprocess  # noqa: E402
from detr_jax.evaluation.segm import encode_masks  # noqa: E402
from detr_jax.ops.interpolate import apply_taps, linear_taps, nearest_index  # noqa: E402
from detr_jax.ops.interpolate_device import device_blend  # noqa: E402
from detr_jax.ops.panoptic_ids import id2rgb, rgb2id  # noqa: E402

SIZE, PADDED, ORIG = (800, 1066), (800, 1068), (480, 640)  # processed, padded batch, original (h, w)
QUERIES, KEPT, PANOPTIC_CLASSES, DETECTION_CLASSES = 100, 20, 250, 91
IS_THING = {c: c <= 90 for c in range(PANOPTIC_CLASSES + 1)}


def simulate(seed=0):
    """(logits [N, 251], boxes [N, 4] cxcywh, mask logits [N, 200, 267]) of one image: see the docstring."""
    rng = np.random.default_rng(seed)
    h, w = PADDED[0] // 4, PADDED[1] // 4
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = rng.uniform(0, SIZE[0] / 4, (2, QUERIES, 1, 1)) * [[[[1.0]]], [[[SIZE[1] / SIZE[0]]]]]
    ry, rx = rng.uniform(5, 60, (2, QUERIES, 1, 1))
    blobs = 8.0 * (1 - ((yy - cy) / ry) ** 2 - ((xx - cx) / rx) ** 2)
    masks = (np.maximum(blobs, -20.0) + rng.normal(0, 0.3, blobs.shape)).astype(np.float32)
    logits = rng.normal(size=(QUERIES, PANOPTIC_CLASSES + 1)).astype(np.float32)
    logits[:, -1] = 5.0  # no-object, except for the confident queries
    classes = rng.choice(np.r_[1:91, 92:201], KEPT)
    classes[:3] = 105  # three queries of one stuff class: merged, then the small-segment loop runs again
    logits[np.arange(KEPT), classes] = 12.0
    boxes = np.concatenate([rng.uniform(0.2, 0.8, (QUERIES, 2)), rng.uniform(0.05, 0.4, (QUERIES, 2))], 1)
    return logits, boxes.astype(np.float32), masks


def timed(fn, repeats, per=1):
    """(median wall s, median CPU s) of fn() / per over `repeats` calls after one warm-up, and its last result."""
    result = jax.block_until_ready(fn())
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        result = jax.block_until_ready(fn())
        walls.append((time.perf_counter() - w0) / per)
        cpus.append((time.process_time() - c0) / per)
    return (statistics.median(walls), statistics.median(cpus)), result


def rle_json(rles):
    """The results' dicts, as `InstanceScorer.add` makes them (the RLE's counts already str)."""
    return [{"image_id": 1, "category_id": 1, "score": 0.5, "segmentation": rle} for rle in rles]


def segm_before(masks, repeats):
    """The former host path, part by part: {part: (wall, cpu)}, and its masks bool [N, H, W]."""
    h, w = masks.shape[-2:]
    rows = tuple(t[:SIZE[0]][nearest_index(SIZE[0], ORIG[0])] for t in linear_taps(h, PADDED[0]))
    cols = tuple(t[:SIZE[1]][nearest_index(SIZE[1], ORIG[1])] for t in linear_taps(w, PADDED[1]))
    parts = {}
    parts["resize (float64 taps, 16 queries at a time)"], logits = timed(
        lambda: np.concatenate([apply_taps(masks[i:i + 16], rows, cols) for i in range(0, len(masks), 16)]), repeats)
    parts["sigmoid + threshold"], binary = timed(lambda: pp._sigmoid(logits) > 0.5, repeats)
    parts["[N, H, W] -> column-major uint8 copy"], fortran = timed(
        lambda: np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)), repeats)
    parts["mask.encode"], rles = timed(lambda: mask_util.encode(fortran), repeats)
    parts["counts to str + result dicts"], _ = timed(
        lambda: rle_json([dict(r, counts=r["counts"].decode("ascii")) for r in rles]), repeats)
    return parts, binary


def segm_device(masks, num_images, repeats):
    """The device path, part by part (per image, the device part on a batch of num_images), and its masks."""
    batch = jax.device_put(np.stack([masks] * num_images))
    sizes, origs = [SIZE] * num_images, [ORIG] * num_images
    parts = {}
    parts["device: resize + threshold (jit, column-major bool)"], out = timed(
        lambda: pp.segm_masks(batch, sizes, origs, padded_size=PADDED), repeats, per=num_images)
    keep = np.ones(len(masks), bool)
    parts["to host (the batch) + the image's masks (copy)"], mine = timed(
        lambda: np.asarray(out)[0][keep, :ORIG[1], :ORIG[0]].transpose(0, 2, 1), repeats)
    parts["mask.encode + counts to str"], rles = timed(lambda: encode_masks(mine), repeats)
    parts["result dicts"], _ = timed(lambda: rle_json(rles), repeats)
    return parts, mine


def ground_truth_rles(repeats, num=20):
    """`encode_masks` of num ground-truth masks bool [num, H, W] (C order, as a source gives them), per image."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:ORIG[0], 0:ORIG[1]]
    centres, radii = rng.uniform(0, ORIG[0], (num, 2)) * [1, ORIG[1] / ORIG[0]], rng.uniform(10, 150, (num, 2))
    masks = np.stack([((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1 for (cy, cx), (ry, rx) in zip(centres, radii)])
    return timed(lambda: encode_masks(masks), repeats)[0]


def _segment(masks, equiv=None):
    """The former host `get_ids_area`: argmax of the softmax, merging, PIL resize, areas."""
    ids = pp._softmax(masks, 0).argmax(0)
    for same in (equiv or {}).values():
        ids[np.isin(ids, same)] = same[0]
    image = Image.fromarray(id2rgb(ids)).resize(ORIG[::-1], resample=Image.NEAREST)
    ids = rgb2id(np.asarray(image))
    return ids, image, np.bincount(ids.ravel(), minlength=len(masks))[:len(masks)]


def panoptic_before(logits, masks, repeats):
    """The former host `post_process_panoptic` (numpy; the padded canvas cropped): total, parts, and its
    (segment_ids, png, classes, areas)."""
    keep, labels = pp._confident_queries(logits, 0.85)
    rows = tuple(t[:SIZE[0]] for t in linear_taps(masks.shape[1], PADDED[0]))
    cols = tuple(t[:SIZE[1]] for t in linear_taps(masks.shape[2], PADDED[1]))

    def former():
        classes, resized = labels[keep], apply_taps(masks[keep], rows, cols)
        ids, image, area = _segment(resized, pp._stuff_equivalences(classes, IS_THING))
        passes = 1
        while len(classes) and min(area) <= 4:
            classes, resized = classes[area > 4], resized[area > 4]
            (ids, image, area), passes = _segment(resized), passes + 1
        return ids.astype(np.int32), pp._png_bytes(image), classes, area, passes

    total, out = timed(former, repeats)
    parts = {}
    parts["resize of the kept masks (float64 taps)"], resized = timed(
        lambda: apply_taps(masks[keep], rows, cols), repeats)
    parts[f"softmax + argmax, x {out[-1]} passes"], ids = timed(lambda: pp._softmax(resized, 0).argmax(0), repeats)
    parts[f"id map to the original size + areas, x {out[-1]} passes"], _ = timed(
        lambda: _segment(np.zeros((1,) + resized.shape[1:], np.float32)), repeats)  # (argmax of 1: ~free)
    parts["PNG"], _ = timed(lambda: pp._png_bytes(Image.fromarray(id2rgb(out[0]))), repeats)
    for part in list(parts)[1:3]:
        parts[part] = tuple(t * out[-1] for t in parts[part])
    return total, parts, out[:4]


def panoptic_device(logits, masks, num_images, repeats):
    """post_process_panoptic (device): total, parts (per image, the device part on a batch of num_images), result."""
    batch = jax.device_put(np.stack([masks] * num_images))
    total, results = timed(lambda: pp.post_process_panoptic(np.stack([logits] * num_images), batch, None,
                                                            [SIZE] * num_images, [ORIG] * num_images, IS_THING,
                                                            padded_size=PADDED), repeats, per=num_images)
    queries, classes, owner = pp._candidates(logits, 0.85, IS_THING)
    num = -(-len(queries) // 8) * 8
    tile = lambda a, fill: np.stack([np.pad(a, (0, num - len(a)), constant_values=fill)] * num_images).astype(np.int32)
    targets = np.asarray([ORIG] * num_images)
    prepare = lambda: pp._taps(masks.shape[1:], [SIZE] * num_images, targets, [PADDED] * num_images,
                               -(-targets.max(0) // 32) * 32, pp._pil_nearest_index)
    parts = {}
    parts["host: confident queries, merging, taps"], taps = timed(
        lambda: ([pp._candidates(logits, 0.85, IS_THING) for _ in range(num_images)], prepare())[1], repeats,
        per=num_images)
    parts["device: resize + softmax argmax + small-segment loop (jit)"], out = timed(
        lambda: pp._panoptic_ids(batch, tile(queries, 0), tile(owner, -1), targets.astype(np.int32), taps,
                                 jnp.uint32(0), device_blend()), repeats, per=num_images)
    ids, valid, area = (np.asarray(x) for x in out)
    parts["host: segment ids, PNG, segments_info"], _ = timed(
        lambda: pp._panoptic_result(ids[0], valid[0, :len(classes)], area[0, :len(classes)], classes, ORIG, IS_THING),
        repeats)
    return total, parts, results[0]


def pq_counts(result, repeats):
    """The PQ counts of one image (`image_pq_stats`) against a ground-truth id map of 19 segments."""
    gt = np.random.default_rng(1).integers(1, 20, ORIG).astype(np.int32)
    gt_info = [{"id": i, "category_id": 1, "iscrowd": 0} for i in range(1, 20)]
    pred_info = [{"id": s["id"] + 1, "category_id": 1} for s in result["segments_info"]]
    return timed(lambda: image_pq_stats(gt, gt_info, result["segment_ids"] + 1, pred_info, {1: {"isthing": 1}}),
                 repeats)[0]


def detection_parts(boxes, num_images, repeats):
    """postprocess (jit, on device) and the COCO results JSON (host) of a batch of num_images, per image."""
    logits = np.random.default_rng(2).normal(size=(num_images, QUERIES, DETECTION_CLASSES + 1)).astype(np.float32)
    boxes = np.stack([boxes] * num_images)
    orig = np.asarray([ORIG] * num_images, np.int32)
    fn = jax.jit(postprocess)
    parts = {}
    parts["device: postprocess (jit)"], out = timed(lambda: fn(logits, boxes, orig), repeats, per=num_images)
    scores, labels, xyxy = (np.asarray(x) for x in out)
    parts["COCO results JSON (to_coco_results)"], _ = timed(
        lambda: to_coco_results(np.arange(num_images), scores, labels, xyxy, list(range(DETECTION_CLASSES + 1))),
        repeats, per=num_images)
    return parts


def summed(parts):
    """(wall, cpu) of parts done one after the other."""
    return tuple(sum(t[i] for t in parts.values()) for i in (0, 1))


def table(sections):
    """The markdown table of {section: (total (wall, cpu), {part: (wall, cpu)})}."""
    lines = ["| post-processing | part | wall s / image | CPU s / image |", "| --- | --- | --- | --- |"]
    for section, (total, parts) in sections.items():
        lines.append(f"| **{section}** | **total** | **{total[0]:.4f}** | **{total[1]:.4f}** |")
        lines += [f"| {section} | {part} | {wall:.4f} | {cpu:.4f} |" for part, (wall, cpu) in parts.items()]
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4, help="batch of the device parts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    logits, boxes, masks = simulate()
    detection = detection_parts(boxes, args.images, args.repeats)
    sections = {"detection": (summed(detection), detection)}
    total, parts, former = panoptic_before(logits, masks, args.repeats)
    sections["panoptic PQ, host (before)"] = total, parts
    total, parts, result = panoptic_device(logits, masks, args.images, args.repeats)
    sections["panoptic PQ, device (after)"] = total, parts
    sections["PQ counts of one image (host, unchanged)"] = pq_counts(result, args.repeats), {}
    before, host_masks = segm_before(masks, args.repeats)
    after, device_masks = segm_device(masks, args.images, args.repeats)
    sections["segm AP, host (before)"] = summed(before), before
    sections["segm AP, device (after)"] = summed(after), after
    sections["segm AP: RLEs of 20 ground-truth masks (host, unchanged)"] = ground_truth_rles(args.repeats), {}
    same_segm = np.array_equal(host_masks, device_masks)
    same_panoptic = (np.array_equal(former[0], result["segment_ids"]) and former[1] == result["png_string"]
                     and [s["area"] for s in result["segments_info"]] == former[3].tolist())
    lines = [f"Simulated COCO-sized outputs: {QUERIES} queries, masks [{QUERIES}, {PADDED[0] // 4}, {PADDED[1] // 4}] "
             f"of a {SIZE[0]} x {SIZE[1]} input padded to {PADDED[0]} x {PADDED[1]}, original {ORIG[0]} x {ORIG[1]}; "
             f"{KEPT} confident panoptic queries ({len(result['segments_info'])} segments left); segm AP on all "
             f"{QUERIES} masks. Device: {jax.devices()[0].platform}, batch {args.images}; median of {args.repeats}.",
             ""] + table(sections) + [""]
    for name, (_, parts) in sections.items():
        if parts:
            top = max(parts, key=lambda part: parts[part][1])
            lines.append(f"- {name}: {top} dominates ({parts[top][1]:.3f} CPU s / image).")
    load = os.getloadavg()[0]
    lines.append(f"\nSame results on both paths: segm masks {'yes' if same_segm else 'NO'}, panoptic id map, PNG and "
                 f"areas {'yes' if same_panoptic else 'NO'}. 1-min load average at the end: {load:.1f}"
                 + (" (other processes share the cores: compare the CPU seconds)." if load > 1.5 else "."))
    report.publish("\n".join(lines), "Evaluation post-processing per COCO-sized image", jax.devices()[0].platform,
                   append=not args.no_append)
    if not (same_segm and same_panoptic):
        raise SystemExit("the device results differ from the host results")


if __name__ == "__main__":
    main()
