"""The COCO recipe's whole training loop on one machine: `experiments/train.py` against the bare step.

  python benchmarks/bench_recipe.py                      # GPU machine: real R50, fp32 + bf16, ~7 min on one H200
  python benchmarks/bench_recipe.py --tiny --steps 8 --batch 2 --precisions fp32 --no-append   # CPU check, ~3 min

For each precision it runs `experiments/train.py --config experiments/configs/coco_r50.py` (the official recipe:
TFDS ArrayRecord, multi-scale augmentation, recipe buckets (--max-buckets of them, 4 instead of 12 by default, so
that compiling leaves time to measure), size grouping, worker processes on every core, uint8 batches, the matcher
of `config.loss.matcher`) on the built-in COCO-like set for --steps steps, and reads from its
metrics.jsonl the loop's images/s once its shapes are compiled (the median of the logged rows of the second half;
a row that compiled a new shape is slower) and its padded fraction. Then, in this process, the same train step
on one fixed batch of the most frequent bucket (no loader, no host work but the step's own): the bare step's
images/s, and the compile time of that shape. The loop is "fed" when it reaches >= 90% of the bare step (the
loop pads to several buckets, the bare step to one: compare at similar padding). Finally the loader alone:
`bench_loader.py` throughput rows at 1/2/4/8/16 worker processes.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import report  # noqa: E402

TINY = ("--config.model.backbone_depth=18", "--config.model.hidden_dim=32", "--config.model.num_heads=4",
        "--config.model.num_encoder_layers=1", "--config.model.num_decoder_layers=1",
        "--config.model.dim_feedforward=64", "--config.model.num_queries=10")


def run_loop(args, precision, workdir):
    """experiments/train.py on the recipe -> (steady img/s, padded fraction, shapes compiled, wall s)."""
    command = [sys.executable, os.path.join(REPO, "experiments", "train.py"), "--config",
               os.path.join(REPO, "experiments", "configs", "coco_r50.py"), "--workdir", workdir,
               "--config.data.source_kwargs.name=coco_like", f"--config.data.source_kwargs.data_dir={args.data_dir}",
               f"--config.num_steps={args.steps}", f"--config.batch_size={args.batch}", "--config.num_epochs=0",
               f"--config.log_every={args.log_every}", "--config.eval_every=0", "--config.eval_at_end=False",
               f"--config.checkpoint_every={10 ** 6}", f"--config.data.num_workers={args.workers}",
               "--config.compilation_cache_dir=none", f"--config.half_precision={precision == 'bf16'}",
               f"--config.data.max_buckets={args.max_buckets}",
               *(TINY if args.tiny else ())]
    start = time.time()
    with open(os.path.join(workdir + ".log"), "w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=args.timeout)
    wall = time.time() - start
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if "images_per_sec" in line]
    steady = [r["images_per_sec"] for r in rows[len(rows) // 2:]]
    with open(workdir + ".log") as f:
        shapes = sum("compiling the train step for image shape" in line for line in f)
    return statistics.median(steady), statistics.mean(r["padded_fraction"] for r in rows), shapes, wall


def bare_step(args, precision):
    """The train step of the same config on one fixed loader batch of the most frequent bucket, in this process:
    (img/s, compile s, bucket (h, w), padded fraction of that batch)."""
    import collections

    import jax
    import numpy as np

    from detr_jax import training
    from detr_jax.data import build_data
    from detr_jax.models import build_training_model
    from detr_jax.ops import sharding
    from detr_jax.training.state import create_train_state
    from experiments.configs import coco_r50

    config = coco_r50.get_config()
    config.data.source_kwargs.update(name="coco_like", data_dir=args.data_dir)
    config.batch_size = args.batch
    config.half_precision = precision == "bf16"
    config.data.num_workers = 0
    config.data.max_buckets = args.max_buckets
    for override in (TINY if args.tiny else ()):
        key, value = override[len("--config.model."):].split("=")
        config.model[key] = type(config.model[key])(value)
    loader = build_data(config, "train", train=True)
    batches = [next(loader) for _ in range(16)]
    loader.close()
    common = collections.Counter(b["images"].shape[1:3] for b in batches).most_common(1)[0][0]
    batch = next(b for b in batches if b["images"].shape[1:3] == common)
    mesh = sharding.make_mesh()
    model = build_training_model(config)
    state, tx, _ = create_train_state(config, model, total_steps=1000, steps_per_epoch=1000)
    state = jax.device_put(state, sharding.replicated(mesh))
    step = training.make_train_step(model, tx, config, mesh)
    global_batch = sharding.global_batch(batch, mesh)
    t0 = time.perf_counter()
    compiled = step.lower(state, global_batch).compile()
    compile_s = time.perf_counter() - t0
    state, metrics = compiled(state, global_batch)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(args.bare_steps):
        state, metrics = compiled(state, global_batch)
    jax.block_until_ready(metrics)
    rate = args.bare_steps * args.batch / (time.perf_counter() - t0)
    padded = 1 - float(np.prod(batch["size"], axis=1).sum()) / float(np.prod(batch["images"].shape[:3]))
    return rate, compile_s, common, padded


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=8, help="global batch (the recipe's 64 is 16 V100s x 4)")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="loader worker processes of the loop")
    p.add_argument("--loader-workers", default="1,2,4,8,16", help="bench_loader.py rows (empty: skip)")
    p.add_argument("--bare-steps", type=int, default=10)
    p.add_argument("--max-buckets", type=int, default=4, help="the recipe's 12 shapes would take most of the time "
                   "budget to compile (15-60 s each); 4 let the loop reach its steady state within --steps")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--data-dir", default="/tmp/detr_jax_bench_tfds_recipe")
    p.add_argument("--num-train", type=int, default=1024)
    p.add_argument("--root", default="/tmp/detr_jax_bench_recipe")
    p.add_argument("--tiny", action="store_true", help="ResNet-18, hidden 32: a CPU check of this script")
    p.add_argument("--timeout", type=float, default=420)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args()

    from detr_jax.data.sources import coco_like
    coco_like.prepare(args.data_dir, num_train=args.num_train)
    import jax
    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
    os.makedirs(args.root, exist_ok=True)
    lines = [f"Device: {device}; host {os.cpu_count()} cores. Model: "
             f"{'tiny (ResNet-18, hidden 32)' if args.tiny else 'DETR-R50 (official)'}; global batch {args.batch}; "
             f"{args.steps} steps of the loop with {args.workers} loader worker processes, {args.max_buckets} buckets; "
             "matcher auto.", "",
             "| precision | loop img/s | loop padded | shapes compiled | loop wall s | bare step img/s | bare bucket "
             "(padded) | compile s (one shape) | loop / bare |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for precision in args.precisions.split(","):
        workdir = os.path.join(args.root, f"{precision}_{int(time.time())}")
        loop_rate, loop_padded, shapes, wall = run_loop(args, precision, workdir)
        rate, compile_s, bucket, padded = bare_step(args, precision)
        lines.append(f"| {precision} | {loop_rate:.1f} | {loop_padded:.0%} | {shapes} | {wall:.0f} | {rate:.1f} | "
                     f"{bucket[0]}x{bucket[1]} ({padded:.0%}) | {compile_s:.1f} | {loop_rate / rate:.2f} |")
        print("\n".join(lines[-1:]), flush=True)
    text = "\n".join(lines)
    if args.loader_workers:
        loader = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_loader.py"), "--no-append",
                                 "--worker-types", "process", "--workers", args.loader_workers,
                                 "--data-dir", args.data_dir, "--num-train", str(args.num_train)],
                                capture_output=True, text=True, timeout=args.timeout)
        table = [line for line in loader.stdout.splitlines() if line.startswith("| ")][:3 + len(
            args.loader_workers.split(","))]
        text += "\n\nLoader alone (bench_loader.py, worker processes):\n\n" + "\n".join(table)
    report.publish(text, "The COCO recipe's loop vs the bare step", device, append=not args.no_append)


if __name__ == "__main__":
    main()
