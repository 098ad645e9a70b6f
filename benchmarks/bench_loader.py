"""Host data-pipeline benchmark: the COCO recipe's loader throughput by worker type and count, the padding of
the global batch with 1 and 8 processes, and the static-shape bucket simulation.

  python benchmarks/bench_loader.py                 # ~2 min on 2 CPU cores; appends to BENCHMARKS.md
  python benchmarks/bench_loader.py --no-append --num-batches 2 --batch-size 2 --max-workers 1 --num-train 64 \\
      --sim-images 1024 --bucket-samples 2048 --data-dir /tmp/detr_jax_bench_tfds_tiny   # smoke, < 1 min

1. Throughput: the official train recipe (`experiments/configs/coco_r50.py`: flip, multi-scale 480..800 / max
   1333, 50% resize-crop-resize, recipe buckets, size grouping 32, uint8 batches) through the real path,
   `build_data(config, "train", train=True, batch_size=B)`, on the built-in COCO-like TFDS set (JPEGs at
   COCO's mix of sizes, `detr_jax.data.sources.coco_like`, prepared into --data-dir on first use), for worker threads
   and worker processes (grain) at 1..cores workers, and inline (0 workers). CPU % is the CPU time of this process
   and of its worker processes (while they live, with psutil) over wall time x cores.
2. Padding of the global batch 64 with the recipe's buckets, on a source that only knows image sizes (drawn from
   `batching.COCO_IMAGE_SIZES`; no pixels): 1 process (batch 64) against 8 simulated processes (8 Loaders,
   process_index 0..7, batch 8 each), which must pick the same bucket at every step; compared with the old
   multi-process behaviour (no image sizes: every batch padded to the largest bucket) and with no size grouping.
3. Bucket simulation: the recipe's output sizes simulated on the COCO size mix, buckets fitted on one simulation
   (seed 0) and measured on another (seed 1), against the official dynamic padding (pad to the batch max).
"""

import argparse
import os
import platform
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from benchmarks import report  # noqa: E402
from detr_jax.data import batching  # noqa: E402
from detr_jax.data.transforms import COCO_MAX_SIZE, make_eval_transforms, make_train_transforms  # noqa: E402

try:
    import psutil
except ImportError:  # CPU time of worker processes is then only counted once they have exited
    psutil = None



# ---- configuration -----------------------------------------------------------------------------------------
def recipe_config(data_dir: str, worker_type: str = "process", num_workers: int = 2):
    """coco_r50.get_config() (the official recipe) reading the COCO-like TFDS set in `data_dir`."""
    from experiments.configs import coco_r50  # pylint: disable=g-import-not-at-top
    config = coco_r50.get_config()
    config.data.source_kwargs = dict(label_space="official91", name="coco_like", data_dir=data_dir)
    config.data.worker_type = worker_type
    config.data.num_workers = num_workers
    return config


def train_transforms(config):
    """The train transforms `build_data` builds for `config` (uint8 output)."""
    d = config.data
    return make_train_transforms(tuple(d.train_scales), d.max_size, tuple(d.crop_resize_scales), tuple(d.crop_size),
                                 normalize_pixels=False)


# ---- 1. throughput -----------------------------------------------------------------------------------------
class CpuClock:
    """CPU seconds (user + system) of this process and its children, including children still running.

    psutil: this process + reaped children (RUSAGE_CHILDREN) + live descendants, so worker processes count while
    they work. Without psutil: getrusage(SELF) + getrusage(CHILDREN), which counts a child only once it has
    exited and been waited for (worker processes alive during the timing are missed).
    """

    def __init__(self):
        self.exact = psutil is not None
        self._me = psutil.Process() if self.exact else None

    def __call__(self) -> float:
        if self.exact:
            t = self._me.cpu_times()
            total = t.user + t.system + t.children_user + t.children_system
            for child in self._me.children(recursive=True):
                try:
                    c = child.cpu_times()
                    total += c.user + c.system
                except psutil.Error:  # exited between the listing and the read
                    pass
            return total
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def batch_nbytes(batch) -> int:
    return int(sum(np.asarray(v).nbytes for v in batch.values()))


def loader_throughput(config, batch_size: int, num_batches: int, warmup: int):
    """One row: build the loader like training does, warm up, time `num_batches` batches.

    Returns dict(rate img/s, cpu fraction of all cores, cpu ms per image, bytes per image, shapes, build s,
    image ids of the timed batches).
    """
    from detr_jax.data import build_data  # pylint: disable=g-import-not-at-top (jax: not in spawned workers' imports)
    clock = CpuClock()
    t0 = time.perf_counter()
    loader = build_data(config, "train", train=True, batch_size=batch_size)
    build_s = time.perf_counter() - t0
    shapes, nbytes, ids = set(), 0, []
    try:
        for _ in range(warmup):
            next(loader)
        cpu0, start = clock(), time.perf_counter()
        for _ in range(num_batches):
            batch = next(loader)
            shapes.add(tuple(batch["images"].shape[1:3]))
            nbytes += batch_nbytes(batch)
            ids.append(batch["image_id"].tolist())
        elapsed = time.perf_counter() - start
        cpu = clock() - cpu0
    finally:
        loader.close()
    images = num_batches * batch_size
    return dict(rate=images / elapsed, cpu=cpu / (elapsed * os.cpu_count()), cpu_ms=cpu / images * 1e3,
                bytes=nbytes / images, shapes=len(shapes), build_s=build_s, ids=ids)


def stage_costs(config, num_images: int = 16):
    """Single-thread ms per image of the real path's stages: TFDS read + JPEG decode + target conversion
    (`source[i]`), the train transforms, and collate into the recipe's bucket."""
    from detr_jax.data import build_data  # pylint: disable=g-import-not-at-top
    config = config.copy_and_resolve_references()
    config.data.num_workers = 0
    loader = build_data(config, "train", train=True, batch_size=1)
    try:
        indices = loader.epoch_order(0)[:num_images]
        t0 = time.perf_counter()
        examples = [dict(loader.source[int(i)]) for i in indices]
        t1 = time.perf_counter()
        out = [loader.transforms(ex.pop("image"), ex, loader.example_rng(0, i)) for ex, i in zip(examples, indices)]
        t2 = time.perf_counter()
        for item in out:
            batching.collate([item], loader.max_objects, loader.buckets)
        t3 = time.perf_counter()
    finally:
        loader.close()
    n = len(indices)
    return {"read + decode": (t1 - t0) / n * 1e3, "transforms": (t2 - t1) / n * 1e3, "collate": (t3 - t2) / n * 1e3}


# ---- 2. padding of the global batch, 1 vs 8 processes -------------------------------------------------------
class SizesOnly:
    """A source that knows its images' (h, w) and nothing else: enough for the Loader's plan."""

    def __init__(self, sizes: np.ndarray):
        self.sizes = np.asarray(sizes, np.int64)

    def __len__(self):
        return len(self.sizes)

    def image_size(self, index):
        h, w = self.sizes[int(index)]
        return int(h), int(w)


class NoSizes:
    """The same images without `image_size`: the Loader cannot predict sizes (the old multi-process path)."""

    def __init__(self, sizes: np.ndarray):
        self.sizes = np.asarray(sizes, np.int64)

    def __len__(self):
        return len(self.sizes)


def coco_sizes(num_images: int, seed: int = 0) -> np.ndarray:
    """int64 [N, 2] original (h, w) drawn from batching.COCO_IMAGE_SIZES with its weights."""
    shapes = list(batching.COCO_IMAGE_SIZES)
    weights = np.asarray([batching.COCO_IMAGE_SIZES[s] for s in shapes], np.float64)
    picks = np.random.default_rng(seed).choice(len(shapes), size=num_images, p=weights / weights.sum())
    return np.asarray(shapes, np.int64)[picks]


def simulate_global_padding(config, global_batch: int, process_count: int, group_by_size: int, sizes: np.ndarray,
                            predict_sizes: bool = True):
    """Padded fraction of one epoch's global batches as the Loaders of `process_count` processes pad them.

    Buckets as `build_data` fits them (recipe, max_buckets, this group_by_size). Per position: every
    process's `_plan`; asserts they agree on min_size and that their slices make up the global batch; the bucket
    is `choose_bucket(*min_size)`; real pixels are the predicted output sizes of the global batch.
    Returns dict(padded, dynamic (pad to each batch's max), shapes used, batches, buckets).
    """
    from detr_jax.data.loader import Loader  # pylint: disable=g-import-not-at-top
    d = config.data
    transforms = train_transforms(config)
    buckets = batching.recipe_buckets(transforms, batch_size=global_batch, max_side=d.max_size,
                                      group_by_size=group_by_size, max_buckets=d.max_buckets)
    source = SizesOnly(sizes) if predict_sizes else NoSizes(sizes)
    loaders = [Loader(source, transforms, global_batch // process_count, seed=config.seed, max_objects=d.max_objects,
                      buckets=buckets, num_workers=0, process_index=p, process_count=process_count,
                      group_by_size=group_by_size)
               for p in range(process_count)]
    real = padded_total = dynamic_total = 0.0
    used = set()
    epoch = 0
    for position in range(loaders[0].batches_per_epoch):
        plans = [loader._plan(epoch, position) for loader in loaders]  # pylint: disable=protected-access
        min_sizes = {tuple(min_size) for _, min_size in plans}
        assert len(min_sizes) == 1, f"processes disagree on the batch size at position {position}: {min_sizes}"
        global_indices = loaders[0].global_indices(epoch, position)
        assert np.array_equal(np.concatenate([local for local, _ in plans]), global_indices), position
        # Output sizes of the global batch with each example's own generator (what its transforms will draw).
        out = np.asarray([transforms.output_size(tuple(int(v) for v in sizes[i]), loaders[0].example_rng(epoch, i))
                          for i in global_indices], np.int64)
        bucket = batching.choose_bucket(*min_sizes.pop(), buckets)
        used.add(bucket)
        real += float(np.prod(out, axis=1).sum())
        padded_total += global_batch * float(bucket[0] * bucket[1])
        dynamic_total += global_batch * float(np.prod(out.max(axis=0)))
    for loader in loaders:
        loader.close()
    return dict(padded=1.0 - real / padded_total, dynamic=1.0 - real / dynamic_total, shapes=len(used),
                batches=loaders[0].batches_per_epoch, buckets=buckets)


def global_padding_rows(config, num_images: int, global_batch: int = 64, processes=(1, 8)):
    """Rows (label, processes, per-process batch, result) of the padding comparison."""
    sizes = coco_sizes(num_images)
    group = int(config.data.group_by_size)
    rows = []
    for label, group_by_size, predict in ((f"recipe: grouping {group}, sizes predicted", group, True),
                                          ("no size grouping, sizes predicted", 0, True),
                                          ("old: no image sizes (largest bucket)", 0, False)):
        for count in processes:
            if not predict and count == 1:
                continue  # one process pads its own batch; the old fallback was for process_count > 1
            rows.append((label, count, global_batch // count,
                         simulate_global_padding(config, global_batch, count, group_by_size, sizes, predict)))
    return rows


# ---- 3. bucket simulation ------------------------------------------------------------------------------------
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


# ---- report ------------------------------------------------------------------------------------------------
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="/tmp/detr_jax_bench_tfds",
                        help="TFDS data_dir for the COCO-like set (prepared there on first use; a folder holds one "
                             "size: use another folder for another --num-train)")
    parser.add_argument("--num-train", type=int, default=1024, help="COCO-like train images to prepare")
    parser.add_argument("--batch-size", type=int, default=16, help="per-process batch of the throughput rows")
    parser.add_argument("--num-batches", type=int, default=12, help="timed batches per throughput row")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed batches first, plus --max-workers (worker processes must spawn)")
    parser.add_argument("--max-workers", type=int, default=os.cpu_count(), help="rows for 1..this many workers")
    parser.add_argument("--worker-types", default="thread,process")
    parser.add_argument("--workers", default="", help="comma-separated worker counts (e.g. 1,2,4,8,16) instead of "
                        "1..--max-workers")
    parser.add_argument("--sim-images", type=int, default=8192,
                        help="images of the size-only source for the 1 vs 8 process padding (8192: 128 batches of 64)")
    parser.add_argument("--bucket-samples", type=int, default=16384, help="samples of the bucket simulation table")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args()

    print(f"host: {report.machine()}, python {platform.python_version()}, "
          f"CPU time {'with psutil' if psutil else 'without psutil'}", flush=True)
    lines = []
    config = recipe_config(args.data_dir)

    # 1. throughput through build_data
    if not args.skip_throughput:
        from detr_jax.data.sources import coco_like  # pylint: disable=g-import-not-at-top
        t0 = time.perf_counter()
        coco_like.prepare(args.data_dir, num_train=args.num_train)
        print(f"coco_like ({args.num_train} train images) in {args.data_dir}: {time.perf_counter() - t0:.1f} s",
              flush=True)
        load_before = os.getloadavg()[0]
        stages = stage_costs(config)
        # The same warm-up in every row, so that every row times the same batches (a batch is a function of
        # (seed, epoch, position)); worker processes take seconds to spawn: each delivers a batch before the timing.
        counts = ([int(n) for n in args.workers.split(",")] if args.workers
                  else list(range(1, args.max_workers + 1)))
        warmup = args.warmup + max(counts)
        settings = [("inline", 0)] + [(t, n) for t in args.worker_types.split(",") for n in counts]
        results = {}
        for worker_type, workers in settings:
            row_config = recipe_config(args.data_dir, "thread" if worker_type == "inline" else worker_type, workers)
            results[worker_type, workers] = r = loader_throughput(row_config, args.batch_size, args.num_batches,
                                                                  warmup)
            print(f"  {worker_type} x {workers}: {r['rate']:.1f} img/s, CPU {r['cpu']:.0%} "
                  f"(build_data {r['build_s']:.1f} s)", flush=True)
        load_after = os.getloadavg()[0]
        same = all(r["ids"] == results["inline", 0]["ids"] for r in results.values())
        cpu_note = ("CPU % = CPU time of this process and its worker processes (psutil, summed while they live) / "
                    "(wall time x cores)" if psutil else
                    "CPU % = getrusage(SELF + CHILDREN) / (wall time x cores); psutil is not installed, so live "
                    "worker processes are NOT counted: the process rows under-count")
        lines.append(f"Loader throughput, official COCO train recipe (`coco_r50.get_config()`: multi-scale 480..800 "
                     f"/ max 1333, 50% crop path, {config.data.max_buckets} recipe buckets, group_by_size "
                     f"{config.data.group_by_size}, uint8 batches) through `build_data(config, \"train\", "
                     f"train=True, batch_size={args.batch_size})` on the COCO-like TFDS set ({args.num_train} JPEGs "
                     f"at COCO's size mix, ArrayRecord). {args.num_batches} batches of {args.batch_size} timed after "
                     f"{warmup} warm-up batches ({'the same batches in every row' if same else 'DIFFERENT batches'}"
                     f"). {cpu_note}. Bytes/image = host batch "
                     f"nbytes (all arrays) / batch size.")
        lines.append("")
        lines.append("| workers | count | img/s | speed-up vs 1 | CPU % | CPU ms/img | bytes/img | shapes |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for (worker_type, workers), r in results.items():
            one = results.get((worker_type, 1))
            speedup = f"{r['rate'] / one['rate']:.2f}x" if one and worker_type != "inline" else "-"
            lines.append(f"| {worker_type} | {workers} | {r['rate']:.1f} | {speedup} | {r['cpu']:.0%} | "
                         f"{r['cpu_ms']:.0f} | {r['bytes'] / 2 ** 20:.2f} MiB | {r['shapes']} |")
        lines.append("")
        lines.append("Single-thread cost per image on this set: "
                     + ", ".join(f"{k} {v:.1f} ms" for k, v in stages.items()))
        lines.append(f"(1-min load average {load_before:.1f} before, {load_after:.1f} after: other processes on the "
                     f"host slow these rates down.)")
        lines.append("")

    # 2. padding of the global batch, 1 vs 8 processes
    t0 = time.perf_counter()
    rows = global_padding_rows(config, args.sim_images)
    print(f"global-batch padding simulation: {time.perf_counter() - t0:.1f} s", flush=True)
    recipe = {count: r for label, count, _, r in rows if label.startswith("recipe")}
    lines.append(f"Padding of global batch 64 with the recipe's buckets ({config.data.max_buckets}, fitted as "
                 f"`build_data` fits them) over one epoch of {args.sim_images} images "
                 f"({recipe[1]['batches']} global batches) drawn from the COCO size mix (a source with only "
                 f"`image_size`, no pixels). 8 processes = 8 Loaders (process_index 0..7, batch 8 each); the bucket "
                 f"of a step is `choose_bucket(*min_size)` from `Loader._plan`, and all 8 processes returned the same "
                 f"min_size at every step (asserted). 'Dynamic' = the official padding to each batch's own max "
                 f"(h, w), one jit shape per batch.")
    lines.append("")
    lines.append("| loader | processes | batch per process | padded | padded, dynamic | shapes used |")
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for label, count, per_process, r in rows:
        lines.append(f"| {label} | {count} | {per_process} | {r['padded']:.1%} | {r['dynamic']:.1%} | "
                     f"{r['shapes']} |")
    lines.append("")
    agree = abs(recipe[1]["padded"] - recipe[8]["padded"]) < 1e-12
    lines.append(f"1 process vs 8 processes, recipe: {recipe[1]['padded']:.1%} vs {recipe[8]['padded']:.1%} "
                 f"({'identical' if agree else 'DIFFERENT'}).")
    lines.append("")

    # 3. bucket simulation
    t0 = time.perf_counter()
    bucket_rows = simulate_buckets(num_samples=args.bucket_samples)
    print(f"bucket simulation: {time.perf_counter() - t0:.1f} s", flush=True)
    lines.append(f"Bucket simulation, official COCO recipe (shorter side 480..800 step 32, max 1333, 50% crop path; "
                 f"eval 800/1333) on the approximate COCO size mix ({args.bucket_samples} samples); buckets fitted "
                 f"on one simulation (seed 0), padding measured on another (seed 1). Padded fraction = padded pixels "
                 f"/ all pixels; 'official dynamic' pads each batch to its own max (h, w), one jit shape per batch. "
                 f"Global batch = all processes together (one jit step needs one shape). Grouping = "
                 f"Loader(group_by_size=32).")
    lines.append("")
    lines.append("| pipeline | global batch | grouping pool | shapes | padded, buckets | padded, official dynamic |")
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for name, batch_size, group, n, bucketed, dynamic, _ in bucket_rows:
        lines.append(f"| {name} | {batch_size} | {group or '-'} | {n} | {bucketed:.1%} | {dynamic:.1%} |")
    lines.append("")
    train_b1 = [r for r in bucket_rows if r[0] == "train" and r[1] == 1][0]
    lines.append(f"Train buckets for global batch 1 (h, w): {train_b1[6]}")

    text = "\n".join(lines)
    print()
    report.publish(text, "Data loader", append=not args.no_append)


if __name__ == "__main__":
    main()
