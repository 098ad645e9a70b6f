"""COCO box scoring time: pycocotools' COCOeval against faster-coco-eval's, on one simulated COCO-sized set.

  python benchmarks/bench_coco_scoring.py               # ~3 min on 2 CPU cores; appends to BENCHMARKS.md
  python benchmarks/bench_coco_scoring.py --no-append --images 200

The set is val2017-like: `COCO_IMAGE_SIZES`' size mix (~640 x 480), ~7.4 objects per image (Poisson; 1% of the
images have none) of the 80 COCO categories, ~1% of them crowd, about 41% / 34% / 25% small / medium / large; and
DETR-like results: 100 detections per image, a jittered copy of most objects (mostly the right category, high
scores) and random boxes of random categories (low scores) for the rest. Each scorer gets its own copy of the results
and times the ground truth's index + loadRes, then evaluate, accumulate and summarize, one after the other in one
process.
faster-coco-eval's evaluate also accumulates (its C++ does both in one pass): compare the sums.
"""

import argparse
import contextlib
import copy
import importlib.metadata
import io
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from benchmarks import report  # noqa: E402
from detr_jax.data.batching import COCO_IMAGE_SIZES  # noqa: E402
from detr_jax.data.sources.coco_categories import COCO_CATEGORY_IDS  # noqa: E402

STAGES = ("index + loadRes", "evaluate", "accumulate", "summarize")


def _boxes(rng, n, h, w, sides):
    """n [x, y, w, h] boxes inside an h x w image, of square-root areas `sides`, aspect ratios in [1/2, 2]."""
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0), n))
    bw = np.minimum(sides * np.sqrt(aspect), w - 1)
    bh = np.minimum(sides / np.sqrt(aspect), h - 1)
    x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
    return np.stack([x, y, bw, bh], 1).round(2)


def simulate(num_images, detections_per_image=100, seed=0):
    """(ground truth, results) of a COCO-sized set: see the module docstring."""
    rng = np.random.default_rng(seed)
    shapes = list(COCO_IMAGE_SIZES)
    weights = np.asarray([COCO_IMAGE_SIZES[s] for s in shapes])
    images, annotations, results = [], [], []
    for image_id in range(1, num_images + 1):
        h, w = shapes[rng.choice(len(shapes), p=weights / weights.sum())]
        images.append({"id": image_id, "height": h, "width": w})
        n = 0 if rng.random() < 0.01 else rng.poisson(7.4)
        size_class = rng.choice(3, n, p=[0.41, 0.34, 0.25])
        low, high = np.array([4, 32, 96])[size_class], np.array([32, 96, min(h, w)])[size_class]
        boxes = _boxes(rng, n, h, w, rng.uniform(low, high))
        cats = rng.choice(COCO_CATEGORY_IDS, n)
        crowd = rng.random(n) < 0.01
        for box, cat, is_crowd in zip(boxes.tolist(), cats.tolist(), crowd.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat, "bbox": box,
                                "area": box[2] * box[3], "iscrowd": int(is_crowd)})
        found = rng.random(n) < 0.7  # a jittered copy of 70% of the objects
        jitter = boxes[found] + rng.normal(0, 0.08, (found.sum(), 4)) * boxes[found][:, [2, 3, 2, 3]]
        jitter[:, 2:] = np.maximum(jitter[:, 2:], 1.0)
        hit_cats = np.where(rng.random(found.sum()) < 0.85, cats[found], rng.choice(COCO_CATEGORY_IDS, found.sum()))
        rest = detections_per_image - len(jitter)
        noise = _boxes(rng, rest, h, w, np.exp(rng.uniform(np.log(4), np.log(min(h, w)), rest)))
        det_boxes = np.concatenate([jitter, noise]).round(2)
        det_cats = np.concatenate([hit_cats, rng.choice(COCO_CATEGORY_IDS, rest)])
        scores = np.concatenate([rng.uniform(0.3, 1.0, len(jitter)), rng.uniform(0.0, 0.4, rest)]).round(5)
        for box, cat, score in zip(det_boxes.tolist(), det_cats.tolist(), scores.tolist()):
            results.append({"image_id": image_id, "category_id": cat, "bbox": box, "score": score})
    categories = [{"id": c, "name": str(c)} for c in COCO_CATEGORY_IDS]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def score(backend, ground_truth, results):
    """(12 stats, {stage: seconds}) of `backend`'s COCOeval on copies of the inputs."""
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    else:
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as COCOeval
    ground_truth, results = copy.deepcopy(ground_truth), copy.deepcopy(results)
    quiet = {} if backend == "pycocotools" else {"print_function": lambda *args, **kwargs: None}
    times = {}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        t0 = time.perf_counter()
        gt = COCO(**quiet)
        gt.dataset = ground_truth
        gt.createIndex()
        coco_eval = COCOeval(gt, gt.loadRes(results), "bbox", **quiet)
        times["index + loadRes"] = time.perf_counter() - t0
        for stage in STAGES[1:]:
            t0 = time.perf_counter()
            getattr(coco_eval, stage)()
            times[stage] = time.perf_counter() - t0
    return np.asarray(coco_eval.stats, np.float64), times


def version(package):
    return importlib.metadata.version(package)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--detections", type=int, default=100, help="per image")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    t0 = time.perf_counter()
    ground_truth, results = simulate(args.images, args.detections)
    simulated = time.perf_counter() - t0
    runs = {}
    for backend in ("pycocotools", "faster_coco_eval"):
        runs[backend] = score(backend, ground_truth, results)
        print(backend, {k: round(v, 2) for k, v in runs[backend][1].items()}, flush=True)
    (ref, ref_t), (fast, fast_t) = runs["pycocotools"], runs["faster_coco_eval"]
    n_crowd = sum(a["iscrowd"] for a in ground_truth["annotations"])
    n_empty = args.images - len({a["image_id"] for a in ground_truth["annotations"]})
    lines = [f"COCOeval \"bbox\" on a simulated val2017-like set: {args.images} images ({n_empty} without objects), "
             f"{len(ground_truth['annotations'])} objects ({n_crowd} crowd), {len(results)} detections "
             f"({args.detections} per image; simulated in {simulated:.1f} s). pycocotools {version('pycocotools')}, "
             f"faster-coco-eval {version('faster-coco-eval')}; seconds, one run each, in this process "
             "(faster-coco-eval's evaluate also accumulates).", "",
             "| stage | pycocotools s | faster-coco-eval s | pycocotools / faster |", "| --- | --- | --- | --- |"]
    for stage in STAGES:
        ratio = f"{ref_t[stage] / fast_t[stage]:.1f}x" if min(ref_t[stage], fast_t[stage]) >= 0.05 else "-"
        lines.append(f"| {stage} | {ref_t[stage]:.2f} | {fast_t[stage]:.2f} | {ratio} |")
    ref_s, fast_s = (sum(t[s] for s in STAGES[1:]) for t in (ref_t, fast_t))
    lines.append(f"| evaluate + accumulate + summarize | {ref_s:.2f} | {fast_s:.2f} | {ref_s / fast_s:.1f}x |")
    ref_all, fast_all = sum(ref_t.values()), sum(fast_t.values())
    lines.append(f"| all | {ref_all:.2f} | {fast_all:.2f} | {ref_all / fast_all:.1f}x |")
    diff = np.abs(ref - fast)
    lines += ["", f"The 12 stats: {'identical' if (ref == fast).all() else 'NOT identical'} (max |difference| "
              f"{diff.max():.3g}, in {int((diff > 0).sum())} of 12); AP {ref[0]:.4f}, AP50 {ref[1]:.4f}. "
              f"1-min load average at the end: {os.getloadavg()[0]:.1f}."]
    report.publish("\n".join(lines), "COCO scoring, pycocotools vs faster-coco-eval", "no accelerator",
                   append=not args.no_append)


if __name__ == "__main__":
    main()
