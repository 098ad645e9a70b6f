"""TPU plans of the COCO recipes, compiled on this host for real TPU topologies (libtpu, no TPU): peak memory per
chip against HBM, TFLOP per image, compile time, and how many chips the recipe's global batch of 64 needs.

    python benchmarks/bench_plan.py [--configs coco_r50,coco_r50_dc5] [--topologies v5e:4x4]
                                    [--remat none,full] [--dtypes float32,bfloat16] [--batch_per_chip 2] [--search]
                                    [--rows benchmarks/plan_rows.jsonl] [--publish]

Each row is one `detr_jax.training.plan.plan` (the run's own train step and the evaluator's forward at the
largest bucket); --search adds the largest batch per chip whose train step fits (several compiles a row).
An R50 row takes 5-20 minutes to compile on 2 cores, so the matrix is built over several invocations: every row
is kept in --rows (JSON lines, one plan each, with the host's load while it compiled) and a row already there is
not compiled again; --publish appends the table of every kept row to BENCHMARKS.md.
Compiled figures, not runs: labelled so in BENCHMARKS.md.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ["JAX_PLATFORMS"] = "cpu"  # compiling for a named TPU topology needs no accelerator

from benchmarks import report  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "experiments", "configs")
ROWS = os.path.join(ROOT, "benchmarks", "plan_rows.jsonl")
GIB = 1024 ** 3


def load_config(name: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def key(row) -> tuple:
    return (row["config"], row["topology"], row["dtype"], row["remat"], row["batch_per_chip"], row["searched"])


def read_rows(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def table_row(r) -> str:
    gib = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    flops = r["train_flops"]
    per_image = "-" if flops is None else f"{flops / r['batch_per_chip'] / 1e12:.3f}"
    oom = "no (compiler: out of memory)" if r["out_of_memory"] else "no"
    more = ">" if r["out_of_memory"] else ""
    largest = r["largest_batch_per_chip"]
    most = largest if largest is not None else (r["batch_per_chip"] if r["fits"] else None)
    chips = "-" if not most else str(-(-64 // most))
    probes = ", ".join(f"{b}: {'>' if int(p) > r['hbm_bytes'] else ''}{gib(min(int(p), r['hbm_bytes'] + 1))}"
                       for b, p in sorted((r.get("search_peaks") or {}).items(), key=lambda kv: int(kv[0])))
    return (f"| {r['config']} | {r['topology']} ({r['device_kind']}) | {r['dtype']} | {r['remat']} "
            f"| {r['batch_per_chip']} | {r['bucket'][0]}x{r['bucket'][1]} | {more}{gib(r['train_peak_bytes'])} "
            f"| {gib(r['eval_peak_bytes'])} | {gib(r['hbm_bytes'])} | {'yes' if r['fits'] else oom} | {per_image} "
            f"| {'-' if largest is None else largest} | {probes or '-'} | {chips} | {r['compile_s']:.0f} "
            f"| {r.get('load', '-')} |")


def table(rows) -> str:
    lines = ["| config | topology | dtype | remat | batch/chip | bucket | train peak GiB/chip | eval peak GiB/chip "
             "| HBM GiB | fits | TFLOP/image (train) | largest batch/chip | search: train peak GiB/chip at batch "
             "| chips for batch 64 | compile s | host load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = lambda r: (r["config"], r["device_kind"], r["dtype"], r["remat"], r["batch_per_chip"])  # noqa: E731
    lines += [table_row(r) for r in sorted(rows, key=order)]
    notes = ("Compiled for TPU by XLA (libtpu) on this host, not run on a TPU. Peak = arguments + outputs - aliased "
             "+ temporaries of the compiled program, per chip ('>': the TPU compiler refused the program as too large "
             "and reported only its temporaries, a lower bound); 'chips for batch 64': the global batch of 64 at the "
             "largest batch per chip that fits (or at the row's batch when not searched); 'compile s': the row's "
             "train and eval compiles (not the search's), on this 2-core host at the 1-minute load average shown.")
    return "\n".join(lines + ["", notes])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="coco_r50,coco_r50_dc5")
    parser.add_argument("--topologies", default="v5e:4x4")
    parser.add_argument("--remat", default="none,full")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--batch_per_chip", type=int, default=2)
    parser.add_argument("--search", action="store_true", help="also the largest batch per chip (by compiling)")
    parser.add_argument("--rows", default=ROWS, help="JSON lines of every plan made; a row there is not redone")
    parser.add_argument("--publish", action="store_true", help="append the table of every row to BENCHMARKS.md")
    parser.add_argument("--no_compile", action="store_true", help="only --publish the rows already kept")
    args = parser.parse_args()
    from detr_jax.training import plan as planning

    done = {key(r) for r in read_rows(args.rows)}
    for name in [] if args.no_compile else args.configs.split(","):
        for topology in args.topologies.split(","):
            for dtype in args.dtypes.split(","):
                for remat in args.remat.split(","):
                    want = (name, topology, dtype, remat, args.batch_per_chip, args.search)
                    if want in done:
                        print(f"kept: {want}", flush=True)
                        continue
                    config = load_config(name)
                    config.model.remat = remat
                    config.half_precision = dtype == "bfloat16"
                    load = os.getloadavg()[0]
                    r = planning.plan(config, topology, batch_per_chip=args.batch_per_chip, search=args.search)
                    r.update(config=name, searched=args.search, load=f"{(load + os.getloadavg()[0]) / 2:.1f}")
                    with open(args.rows, "a") as f:
                        f.write(json.dumps(r) + "\n")
                    print(table_row(r), flush=True)
    if args.publish:
        report.publish(table(read_rows(args.rows)), "TPU plans: compiled for TPU, not run", "TPU compiler (libtpu)")


if __name__ == "__main__":
    main()
