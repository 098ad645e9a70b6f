"""TPU plans of the COCO recipes, compiled on this host for real TPU topologies (libtpu, no TPU): peak memory per
chip against HBM, TFLOP per image, compile time, and how many chips the recipe's global batch of 64 needs.

    python benchmarks/bench_plan.py [--configs coco_r50,coco_r50_dc5] [--topologies v5e:4x4]
                                    [--remat none,full] [--dtypes float32] [--batch_per_chip 2] [--search]

Each row is one `detr_jax.training.plan.plan` (the run's own train step and the evaluator's forward at the
largest bucket); --search adds the largest batch per chip whose train step fits (several compiles a row).
Compiled figures, not runs: labelled so in BENCHMARKS.md.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ["JAX_PLATFORMS"] = "cpu"  # compiling for a named TPU topology needs no accelerator

from benchmarks import report  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "configs")


def load_config(name: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="coco_r50,coco_r50_dc5")
    parser.add_argument("--topologies", default="v5e:4x4")
    parser.add_argument("--remat", default="none,full")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--batch_per_chip", type=int, default=2)
    parser.add_argument("--search", action="store_true", help="also the largest batch per chip (by compiling)")
    parser.add_argument("--no_append", action="store_true")
    args = parser.parse_args()
    from detr_jax.training import plan as planning

    gib = lambda b: f"{b / planning.GIB:.2f}"  # noqa: E731
    lines = ["| config | topology | dtype | remat | batch/chip | bucket | train peak GiB/chip | eval peak GiB/chip "
             "| HBM GiB | fits | TFLOP/image (train) | largest batch/chip | chips for batch 64 | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in args.configs.split(","):
        for topology in args.topologies.split(","):
            for dtype in args.dtypes.split(","):
                for remat in args.remat.split(","):
                    config = load_config(name)
                    config.model.remat = remat
                    config.half_precision = dtype == "bfloat16"
                    r = planning.plan(config, topology, batch_per_chip=args.batch_per_chip, search=args.search)
                    flops = r["train_flops"]
                    per_image = "-" if flops is None else f"{flops / r['batch_per_chip'] / 1e12:.3f}"
                    oom = "no (compiler: out of memory)" if r["out_of_memory"] else "no"
                    more = ">" if r["out_of_memory"] else ""
                    largest = r["largest_batch_per_chip"]
                    most = largest if largest is not None else (r["batch_per_chip"] if r["fits"] else None)
                    chips = "-" if not most else str(-(-64 // most))
                    row = (f"| {name} | {topology} ({r['device_kind']}) | {dtype} | {remat} | {r['batch_per_chip']} "
                           f"| {r['bucket'][0]}x{r['bucket'][1]} | {more}{gib(r['train_peak_bytes'])} "
                           f"| {gib(r['eval_peak_bytes'])} | {gib(r['hbm_bytes'])} | {'yes' if r['fits'] else oom} "
                           f"| {per_image} | {'-' if largest is None else largest} | {chips} "
                           f"| {r['compile_s']:.0f} |")
                    print(row, flush=True)
                    lines.append(row)
    notes = ("Compiled for TPU by XLA (libtpu) on this host, not run on a TPU. Peak = arguments + outputs - aliased "
             "+ temporaries of the compiled program, per chip ('>': the TPU compiler refused the program as too large "
             "and reported only its temporaries, a lower bound); 'chips for batch 64': the global batch of 64 at the "
             "largest batch per chip that fits (or at the row's batch when not searched).")
    report.publish("\n".join(lines + ["", notes]), "TPU plans: compiled for TPU, not run", "TPU compiler (libtpu)",
                   append=not args.no_append)


if __name__ == "__main__":
    main()
