"""Is bfloat16 AP-neutral? The default run in float32 and in bfloat16 (`config.half_precision`), several seeds each.

  python benchmarks/bench_bf16_recipe.py                      # on a GPU: ~1 minute a run, 6 runs; appends a table
  python benchmarks/bench_bf16_recipe.py --seeds 0 --steps 20 --no-append   # a quick check of the script (CPU)

Each run is `experiments/train.py` with the default config (the promise of the README: AP50 >= 0.5) in a fresh work
directory, `--config.seed=S`, one process on the default device. Parameters and optimizer state stay float32 in
both (`config.half_precision` only changes the compute dtype). The table gives each run's final AP / AP50 and
minutes, and per precision the mean and spread over seeds; bfloat16 is AP-neutral when its mean AP50 lies within
the float32 runs' seed spread.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout

from benchmarks import report  # noqa: E402 (no jax import)

TRAIN = os.path.join(ROOT, "experiments", "train.py")
DEFAULT_CONFIG = os.path.join(ROOT, "experiments", "configs", "default.py")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=0, help="override num_steps (0: the config's)")
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--extra", action="append", default=[], help="another train.py argument for every run")
    parser.add_argument("--workdir", default="", help="where the runs go (default: a temporary folder)")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to BENCHMARKS.md")
    return parser.parse_args(argv)


def final_eval(workdir: str) -> dict:
    """The last metrics.jsonl line with an evaluation (eval_AP ...)."""
    last = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "eval_AP50" in record:
                last = record
    return last


def run(args, precision: str, seed: int, root: str) -> dict:
    workdir = os.path.join(root, f"{precision}_seed{seed}")
    command = [sys.executable, TRAIN, "--config", args.config, f"--workdir={workdir}", f"--config.seed={seed}",
               f"--config.half_precision={precision == 'bf16'}", "--config.eval_every=0"]
    if args.steps:
        command.append(f"--config.num_steps={args.steps}")
    command += args.extra
    t0 = time.time()
    result = subprocess.run(command, capture_output=True, text=True)
    minutes = (time.time() - t0) / 60
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    metrics = final_eval(workdir)
    print(f"{precision} seed {seed}: AP50 {metrics.get('eval_AP50', float('nan')):.4f} "
          f"AP {metrics.get('eval_AP', float('nan')):.4f} in {minutes:.1f} min", flush=True)
    return dict(precision=precision, seed=seed, minutes=minutes, AP=metrics.get("eval_AP", float("nan")),
                AP50=metrics.get("eval_AP50", float("nan")))


def table(rows) -> str:
    lines = ["| precision | seed | AP50 | AP | minutes end to end |", "|---|---|---|---|---|"]
    lines += [f"| {r['precision']} | {r['seed']} | {r['AP50']:.4f} | {r['AP']:.4f} | {r['minutes']:.1f} |"
              for r in rows]
    lines += ["", "| precision | runs | AP50 mean | AP50 min-max | AP mean |", "|---|---|---|---|---|"]
    for precision in ("fp32", "bf16"):
        mine = [r for r in rows if r["precision"] == precision]
        ap50 = [r["AP50"] for r in mine]
        lines.append(f"| {precision} | {len(mine)} | {statistics.mean(ap50):.4f} | {min(ap50):.4f}-{max(ap50):.4f} | "
                     f"{statistics.mean(r['AP'] for r in mine):.4f} |")
    fp32 = [r["AP50"] for r in rows if r["precision"] == "fp32"]
    bf16 = statistics.mean(r["AP50"] for r in rows if r["precision"] == "bf16")
    verdict = "within" if min(fp32) <= bf16 <= max(fp32) else "outside"
    lines += ["", f"bf16's mean AP50 {bf16:.4f} is {verdict} the float32 runs' range "
                  f"{min(fp32):.4f}-{max(fp32):.4f}."]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    root = args.workdir or tempfile.mkdtemp(prefix="bf16_recipe_")
    rows = [run(args, precision, seed, root) for seed in args.seeds for precision in ("fp32", "bf16")]
    import jax  # pylint: disable=g-import-not-at-top (after the runs: they own the device)

    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
    report.publish(table(rows), "bf16 vs fp32: the default run's AP (bench_bf16_recipe.py)", device=device,
                   append=not args.no_append)


if __name__ == "__main__":
    main()
