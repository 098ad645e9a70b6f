"""Hungarian matching time: the host solver (scipy through one callback) against the device one (optax, in jit).

  python benchmarks/bench_matcher.py                 # ~1 min on 2 CPU cores; appends to BENCHMARKS.md
  python benchmarks/bench_matcher.py --no-append --repeats 2

Times `detr_jax.criterion.matcher.hungarian_match` (cost matrices + assignment, jitted, after a warm-up call) on random
predictions and targets at [L, B, N, M] = decoder layers x images x queries x target slots, with 70% of the
slots real (the rest padding), as a train step calls it: one call per step for every layer and image.
"""

import argparse
import functools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from benchmarks import report  # noqa: E402

SHAPES = "6x8x100x20,6x64x100x20,6x64x100x100"


def inputs(shape, seed=0):
    num_layers, batch, queries, slots = shape
    rng = np.random.default_rng(seed)
    boxes = lambda *s: np.concatenate([rng.uniform(0.2, 0.8, s + (2,)), rng.uniform(0.05, 0.4, s + (2,))],
                                      -1).astype(np.float32)
    targets = {"labels": rng.integers(0, 91, (batch, slots)).astype(np.int32), "boxes": boxes(batch, slots),
               "mask": rng.random((batch, slots)) < 0.7}
    logits = rng.normal(size=(num_layers, batch, queries, 92)).astype(np.float32)
    return logits, boxes(num_layers, batch, queries), targets


def time_solver(shape, solver, repeats):
    import jax

    from detr_jax.criterion.matcher import hungarian_match
    match = jax.jit(functools.partial(hungarian_match, solver=solver))
    return report.median_seconds(match, *inputs(shape), repeats=repeats) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", default=SHAPES, help="comma-separated LxBxNxM")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    import jax
    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
    lines = [f"`detr_jax.criterion.matcher.hungarian_match`, jitted, median of {args.repeats} calls after a warm-up; "
             "random costs, 70% of the target slots real. Device: " + device, "",
             "| [L, B, N, M] | host (scipy, callback) ms | device (optax) ms | device / host |",
             "| --- | --- | --- | --- |"]
    for shape in [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]:
        host, dev = time_solver(shape, "host", args.repeats), time_solver(shape, "device", args.repeats)
        lines.append(f"| {list(shape)} | {host:.1f} | {dev:.1f} | {dev / host:.2g}x |")
        print(lines[-1], flush=True)
    report.publish("\n".join(lines), "Hungarian matcher, host vs device", device, append=not args.no_append)


if __name__ == "__main__":
    main()
