"""Host data-pipeline benchmark: loader throughput at COCO sizes and the static-shape bucket simulation.

  python benchmarks/bench_loader.py                 # ~1 min on 2 CPU cores; appends to BENCHMARKS.md
  python benchmarks/bench_loader.py --no-append --num-batches 10

Throughput: the official train recipe (flip, multi-scale 480..800 / max 1333, 50% resize-crop-resize,
normalise) on 640x480 synthetic images, through `Loader` with its thread pool; also the single-thread cost
of each stage. Buckets: the recipe's output sizes are simulated on the approximate COCO size mix
(`batching.COCO_IMAGE_SIZES`), buckets fitted on one simulation (seed 0) and measured on another (seed 1),
against the official dynamic padding (pad to the batch max, one shape per batch).
"""

import argparse
import datetime
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from detr_jax.data import batching
from detr_jax.data.loader import Loader
from detr_jax.data.synthetic import SyntheticDetection
from detr_jax.data.transforms import COCO_MAX_SIZE, make_eval_transforms, make_train_transforms

BENCHMARKS_MD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "BENCHMARKS.md")


def simulate_buckets(batch_sizes=(1, 4, 16, 64), max_buckets: int = 12, num_samples: int = 16384,
                     group_by_size: int = 32):
    """Rows (pipeline, global batch, grouping pool, #shapes, bucket padded fraction, dynamic padded fraction,
    buckets) for the COCO train and eval recipes, with and without size grouping."""
    rows = []
    for name, transforms in (("train", make_train_transforms()), ("eval", make_eval_transforms())):
        held_out = batching.simulate_output_sizes(transforms, num_samples=num_samples, seed=1)
        for batch_size in batch_sizes:
            for group in sorted({0, group_by_size if batch_size > 1 else 0}):
                sizes = held_out
                if group:
                    sizes = held_out[batching.size_grouped_order(held_out, batch_size, group, np.random.default_rng(2))]
                buckets = batching.recipe_buckets(transforms, batch_size=batch_size, max_buckets=max_buckets,
                                                  max_side=COCO_MAX_SIZE, group_by_size=group, num_samples=num_samples,
                                                  seed=0)
                rows.append((name, batch_size, group, len(buckets),
                             batching.padded_fraction(sizes, buckets, batch_size),
                             batching.padded_fraction(sizes, None, batch_size), buckets))
    return rows


def time_stages(num_images: int = 20):
    """Single-thread ms per image of: synthetic 640x480 generation, train transforms, collate (batch of 1)."""
    source = SyntheticDetection(num_examples=num_images, image_size=(480, 640), seed=0)
    transforms = make_train_transforms()
    t0 = time.perf_counter()
    examples = [source[i] for i in range(num_images)]
    t1 = time.perf_counter()
    out = []
    for i, ex in enumerate(examples):
        ex = dict(ex)
        image = ex.pop("image")
        out.append(transforms(image, ex, np.random.default_rng(i)))
    t2 = time.perf_counter()
    for item in out:
        batching.collate([item], 100, [(1344, 1344)])
    t3 = time.perf_counter()
    return {"generate": (t1 - t0) / num_images * 1e3, "transforms": (t2 - t1) / num_images * 1e3,
            "collate": (t3 - t2) / num_images * 1e3}


def loader_throughput(batch_size: int = 2, num_workers: int = 2, num_batches: int = 30, warmup: int = 3):
    """Images/s of Loader on 640x480 synthetic images with the official train recipe."""
    source = SyntheticDetection(num_examples=4096, image_size=(480, 640), seed=0)
    transforms = make_train_transforms()
    buckets = batching.recipe_buckets(transforms, {(480, 640): 1.0}, batch_size=batch_size, max_side=COCO_MAX_SIZE)
    shapes = set()
    with Loader(source, transforms, batch_size, seed=0, max_objects=100, buckets=buckets,
                num_workers=num_workers, prefetch=2) as loader:
        for _ in range(warmup):
            next(loader)
        start = time.perf_counter()
        for _ in range(num_batches):
            shapes.add(next(loader)["images"].shape[1:3])
        elapsed = time.perf_counter() - start
    return num_batches * batch_size / elapsed, len(shapes)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-batches", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args()

    cpu = platform.processor() or platform.machine()
    print(f"host: {os.cpu_count()} CPU cores ({cpu}), python {platform.python_version()}")
    lines = []

    rows = simulate_buckets()
    lines.append("Bucket simulation, official COCO recipe (shorter side 480..800 step 32, max 1333, 50% crop path; "
                 "eval 800/1333) on the approximate COCO size mix; buckets fitted on one simulation (seed 0), padding "
                 "measured on another (seed 1). Padded fraction = padded pixels / all pixels; 'official dynamic' pads "
                 "each batch to its own max (h, w), one jit shape per batch. Global batch = all processes together "
                 "(one jit step needs one shape). Grouping = Loader(group_by_size=32).")
    lines.append("")
    lines.append("| pipeline | global batch | grouping pool | shapes | padded, buckets | padded, official dynamic |")
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for name, batch_size, group, n, bucketed, dynamic, _ in rows:
        lines.append(f"| {name} | {batch_size} | {group or '-'} | {n} | {bucketed:.1%} | {dynamic:.1%} |")
    lines.append("")
    train_b1 = [r for r in rows if r[0] == "train" and r[1] == 1][0]
    lines.append(f"Train buckets for global batch 1 (h, w): {train_b1[6]}")
    lines.append("")

    load_before = os.getloadavg()[0]
    stages = time_stages()
    lines.append("Single-thread cost per 640x480 image: " + ", ".join(f"{k} {v:.1f} ms" for k, v in stages.items()))
    for workers in (1, 2):
        rate, n_shapes = loader_throughput(args.batch_size, workers, args.num_batches)
        lines.append(f"Loader, official train recipe, 640x480 synthetic, batch {args.batch_size}, {workers} worker(s): "
                     f"{rate:.1f} images/s ({n_shapes} distinct batch shapes in {args.num_batches} batches)")
    lines.append(f"(1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after the timing: other "
                 f"processes on the host slow these rates down.)")
    text = "\n".join(lines)
    print(text)
    if not args.no_append:
        date = datetime.date.today().isoformat()
        with open(BENCHMARKS_MD, "a") as f:
            if f.tell() == 0:
                f.write("# Benchmarks\n")
            f.write(f"\n## Data loader ({date}, {os.cpu_count()} CPU cores, no accelerator)\n\n"
                    f"`python benchmarks/bench_loader.py`\n\n{text}\n")
        print(f"appended to {BENCHMARKS_MD}")


if __name__ == "__main__":
    main()
