"""Train-step and inference speed: detr_jax against HF transformers' DetrForObjectDetection, same weights.

  python benchmarks/bench_train.py             # CPU: batch 2 x 512x512 (~2 min on 2 idle cores); GPU: 8 x 800x1200
  python benchmarks/bench_train.py --small     # a quick check: batch 1 x 256x256, fewer steps
  python benchmarks/bench_train.py --batch 4 --height 640 --width 640 --rounds 4 --no-append
  python benchmarks/bench_train.py --sweep     # CPU optimisation table (~18 min on 2 idle cores; bench_train_sweep.py)

Both sides run DETR-R50 (hidden 256, 6 + 6 layers, 8 heads, FFN 2048, 100 queries, 91 classes), the HF model
built offline with random weights and converted with `detr_jax.weights.hf.load_hf_detr`, so both compute with
the same weights. Dropout is 0 on both sides. A train step is forward + Hungarian matching (scipy on the host,
on both sides) + loss with the auxiliary decoder losses + backward + gradient clipping (0.1) + AdamW (lr 1e-4,
backbone 1e-5, weight decay 1e-4), on the official trainable set: ResNet stem and stage 1 frozen. HF's own
`DetrConvEncoder` meant to do that but tests "stage.1" against names like "stages.1", which freezes the whole
backbone; we set `requires_grad` explicitly so torch trains stages 2-4 as the official DETR (and detr_jax) do.
HF runs with `auxiliary_loss=True` here (its forward then feeds the normalised decoder output to the next
layer, one extra LayerNorm per layer: same cost, slightly other numbers; the inference comparison uses False).

PyTorch runs twice: as written (eager, torch's default precision) and, with --torch-best (default on a GPU and in
--small), as a PyTorch user tunes it: the same weights in channels_last, `torch.compile` (default mode), TF32
matmuls and convolutions in float32 or autocast(bfloat16) with --bf16, fused AdamW on CUDA (train_sides.py).

JAX and PyTorch are timed in alternating rounds in one process, so all sides see the same machine load; the ratios
are the numbers to read on a shared machine. Peak memory (VmHWM, the resident-set high-water mark) is measured in
separate processes, one per side, each building its model and running a few train steps (train_runs.py).

The script runs unchanged on a GPU machine: JAX uses jax.devices()[0], torch uses cuda when available;
--bf16 runs JAX with dtype=bfloat16 and torch under autocast(bfloat16).
"""

import argparse
import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from benchmarks import report  # noqa: E402 (no jax import)
from benchmarks import train_runs as runs  # noqa: E402
from benchmarks import train_sides as sides  # noqa: E402

TITLE = "Train step and inference: detr_jax vs HF DetrForObjectDetection"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=None, help="images per step (CPU 2, GPU 8)")
    p.add_argument("--height", type=int, default=None, help="image height (CPU 512, GPU 800)")
    p.add_argument("--width", type=int, default=None, help="image width (CPU 512, GPU 1200)")
    p.add_argument("--small", action="store_true", help="quick run: batch 1 x 256x256, 2 rounds of 1 step")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3, --small 2)")
    p.add_argument("--steps", type=int, default=None, help="steps per side per round (default 2, --small 1)")
    p.add_argument("--slots", type=int, default=20, help="padded target slots per image (M)")
    p.add_argument("--match-batch", type=int, default=64, help="images for the large-batch matcher measurement")
    p.add_argument("--bf16", action="store_true", help="bfloat16 compute (JAX dtype, torch autocast)")
    p.add_argument("--torch-best", action=argparse.BooleanOptionalAction, default=None,
                   help="also time PyTorch as a user tunes it (channels_last, torch.compile, TF32 or autocast bf16; "
                        "default: on a GPU and with --small)")
    p.add_argument("--torch-compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the --torch-best side (default: yes, except in --small on a CPU, where "
                        "compiling takes minutes)")
    p.add_argument("--xla-flags", default=None,
                   help=f"extra XLA_FLAGS for JAX (default: {runs.DEFAULT_XLA_FLAGS!r}); appended to $XLA_FLAGS")
    p.add_argument("--cpus", type=int, default=None, help="pin this process (and its children) to the first N "
                   "CPUs before JAX and torch start: both then use N threads (default: all)")
    p.add_argument("--no-malloc-tuning", action="store_true", help=f"do not re-run under GLIBC_TUNABLES="
                   f"{runs.MALLOC_TUNABLES} (see train_runs.MALLOC_TUNABLES)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-append", action="store_true", help="print only, do not append to BENCHMARKS.md")
    p.add_argument("--sweep", action="store_true", help="time the CPU optimisations (bench_train_sweep.py): code "
                   "variants alternating with torch in one process, XLA flags in child processes; appends that "
                   "table instead")
    p.add_argument("--variants", default=None, help="comma-separated subset of the sweep variants")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)  # old spelling of `train_runs.py KIND`
    return p.parse_args(argv)


def resolve_sizes(args, on_gpu):
    """Fill the unset sizes and switches: --small, else the GPU or the CPU defaults."""
    if args.small:
        defaults = (1, 256, 256, 2, 1)
    elif on_gpu:
        defaults = (8, 800, 1200, 3, 3)
    else:
        defaults = (2, 512, 512, 3, 2)
    for name, value in zip(("batch", "height", "width", "rounds", "steps"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.torch_best is None:
        args.torch_best = on_gpu or args.small
    if args.torch_compile is None:
        args.torch_compile = on_gpu or not args.small
    return args


# ---- the matcher, timed from outside the step --------------------------------------------------------------
def match_inputs(batch, layers=6, seed=0):
    """(logits, boxes, targets) of `batch`'s targets and random predictions: [L, B, 100, 92], [L, B, 100, 4]."""
    import jax
    logits, boxes = sides.random_predictions(layers, len(batch["labels"]), 100, 91, seed)
    targets = {k: jax.device_put(batch[k]) for k in ("labels", "boxes", "mask")}
    return jax.device_put(logits), jax.device_put(boxes), targets


def time_match(batch_size, slots, repeats=5):
    """Seconds for `hungarian_match` alone, jitted: on-device costs -> host transfer -> scipy -> indices back."""
    import jax

    from detr_jax.criterion.matcher import hungarian_match
    match = jax.jit(lambda lg, bx, tg: hungarian_match(lg, bx, tg, cost_class=1.0, cost_bbox=5.0, cost_giou=2.0))
    batch = sides.make_batch(batch_size, 8, 8, slots)
    return report.median_seconds(match, *match_inputs(batch), repeats=repeats)


def time_host_assignment(batch, repeats=5):
    """Seconds of the host solver's work for the step's shapes ([6, B, 100, M], the real target slots of `batch`):
    scipy's `linear_sum_assignment` per layer and image on the cost matrices of `match_cost_matrix`, as the
    matcher's host callback runs it; timed here rather than inside the step, on random predictions (the models
    have random weights too)."""
    import jax
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    from detr_jax.criterion.matcher import match_cost_matrix
    logits, boxes, targets = match_inputs(batch)
    costs = jax.vmap(lambda lg, bx: match_cost_matrix(lg, bx, targets["labels"], targets["boxes"], cost_class=1.0,
                                                      cost_bbox=5.0, cost_giou=2.0))(logits, boxes)
    costs = np.asarray(costs, np.float64)  # [L, B, N, M], as the callback receives them

    def solve():
        for b, mask in enumerate(batch["mask"]):
            slots = np.flatnonzero(mask)
            for layer_costs in costs[:, b]:
                linear_sum_assignment(layer_costs[:, slots])
    solve()
    return statistics.median(runs.timed(solve) for _ in range(repeats))


# ---- the run -----------------------------------------------------------------------------------------------
def build_sides(args, device):
    """{name: (step, infer)} for "jax", "torch" and, with --torch-best, "torch_best"; the JAX functions carry
    `.flops()`; plus the torch-best notes."""
    import jax

    from detr_jax.weights.hf import load_hf_detr
    batch = sides.make_batch(args.batch, args.height, args.width, args.slots)
    hf = sides.build_hf(device)
    model, variables = load_hf_detr(hf.cpu(), dropout=0.0, aux_loss=True,
                                    **({"dtype": jax.numpy.bfloat16} if args.bf16 else {}))
    hf.to(device)
    built = {"jax": (sides.make_jax_train_step(model, variables, batch), sides.make_jax_infer(model, variables, batch)),
             "torch": sides.make_torch_train_step(hf, batch, device, args.bf16)}
    notes = []
    if args.torch_best:
        *built["torch_best"], notes = sides.make_torch_best(hf, batch, device, args.bf16, args.torch_compile)
        if not args.torch_compile:
            notes.append("torch.compile off" + (" (--small on a CPU: compiling takes minutes; --torch-compile turns "
                                                "it on)" if args.small and device.type == "cpu" else ""))
            print("PyTorch-best: " + notes[-1], flush=True)
    return batch, built, notes


def main(argv=None):
    args = parse_args(argv)
    if args._child:
        runs.pin_cpus(args.cpus)
        runs.set_xla_flags(args.xla_flags)
        runs.quiet_and_shared_gpu()
        args.kind = args._child
        return runs.child_main(args)
    if not args.no_malloc_tuning:
        runs.reexec_with_malloc_tunables(__file__, sys.argv[1:] if argv is None else argv)
    runs.pin_cpus(args.cpus)
    runs.set_xla_flags(args.xla_flags)
    runs.quiet_and_shared_gpu()
    import jax
    on_gpu = jax.devices()[0].platform != "cpu"
    resolve_sizes(args, on_gpu)
    info = runs.system_info()
    print(json.dumps(info, indent=1), flush=True)
    if args.sweep:
        from benchmarks import bench_train_sweep  # only --sweep needs it
        report.publish(bench_train_sweep.sweep(args, info), "Train step, CPU optimisation sweep", info["jax_device"],
                       append=not args.no_append)
        return
    import torch
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"batch {args.batch} x {args.height}x{args.width}, {args.rounds} rounds x {args.steps} steps per side",
          flush=True)
    batch, built, best_notes = build_sides(args, device)
    (jax_step, jax_infer) = built["jax"]
    # warm-up: the first calls compile (JAX; torch.compile); one more call of each before timing
    first = runs.timed(jax_step)
    print(f"JAX train step first call (compile + run): {first:.1f} s", flush=True)
    first_infer = runs.timed(jax_infer)
    first_best = {}
    if "torch_best" in built:
        first_best = {kind: runs.timed(fn) for kind, fn in zip(("train", "infer"), built["torch_best"])}
        print(f"PyTorch-best first calls (compile + run): train {first_best['train']:.1f} s, inference "
              f"{first_best['infer']:.1f} s", flush=True)
    for name, (step_fn, infer_fn) in built.items():
        for _ in range(1 if name == "jax" else 2):  # the JAX step has run once already
            step_fn()
        infer_fn()
    train = runs.alternate({name: fns[0] for name, fns in built.items()}, args.rounds, args.steps)
    infer = runs.alternate({name: fns[1] for name, fns in built.items()}, args.rounds, args.steps)
    for what, times in (("train", train), ("inference", infer)):
        print(f"{what}: " + ", ".join(f"{name} {runs.median_wall(t):.3f} s ({runs.median_cpu(t):.2f} CPU s)"
                                      for name, t in times.items()), flush=True)

    flops = {"train": jax_step.flops(), "infer": jax_infer.flops()}
    if any(math.isnan(f) for f in flops.values()):  # no cost analysis before compiling here (GPU): count
        counted = runs.run_child(args, "flops", env={"JAX_PLATFORMS": "cpu"})  # the same programs lowered for CPU
        flops = {"train": counted["train"], "infer": counted["infer"]}
    memory = {}
    if not args.no_memory:
        for kind in ("jax", "torch"):
            memory[kind] = runs.run_child(args, kind, steps=1)
            print(f"peak memory {kind}: {memory[kind]['peak_rss_mb']:.0f} MB RSS", flush=True)
    matcher = {"host": time_host_assignment(batch), "batch": time_match(args.batch, args.slots),
               "large": time_match(args.match_batch, args.slots), "large_100": time_match(args.match_batch, 100)}
    peak = sides.bf16_peak_tflops(info["device_kind"]) if on_gpu else None
    results = dict(train=train, infer=infer, flops=flops, peak=peak, first=first, first_infer=first_infer,
                   first_best=first_best, best_notes=best_notes, memory=memory, matcher=matcher)
    text = report_text(args, info, results)
    report.publish(text, TITLE, info["jax_device"], append=not args.no_append)


def report_text(args, info, results):
    """The header lines and tables for BENCHMARKS.md (the heading and the command line come from report.publish).

    `results`: train / infer ({side: [(wall s, CPU s)]}), flops ({"train", "infer"}), peak (TFLOP/s or None),
    first / first_infer (JAX first-call seconds), first_best ({"train", "infer"} seconds, empty without
    --torch-best), best_notes, memory ({"jax", "torch"} child results, empty with --no-memory), matcher (seconds).
    """
    B, H, W = args.batch, args.height, args.width
    train, infer, flops, peak = results["train"], results["infer"], results["flops"], results["peak"]
    first_best, best_notes, memory = results["first_best"], results["best_notes"], results["memory"]
    host_s, match_b = results["matcher"]["host"], results["matcher"]["batch"]
    match_64, match_64_100 = results["matcher"]["large"], results["matcher"]["large_100"]
    t_jax = runs.median_wall(train["jax"])
    step_64 = t_jax / B * args.match_batch  # linear in images: an upper bound (the optimizer update is fixed)

    def row(label, times, flop_count, unit):
        w = {n: runs.median_wall(t) for n, t in times.items()}
        c = {n: runs.median_cpu(t) for n, t in times.items()}
        mfu = "-" if peak is None or math.isnan(flop_count) else f"{100 * flop_count / w['jax'] / (peak * 1e12):.1f}%"
        best = (f"{B / w['torch_best']:.3f}", f"**{w['torch_best'] / w['jax']:.2f}x**") if "torch_best" in w \
            else ("-", "-")
        return (label, f"{B / w['jax']:.3f}", f"{B / w['torch']:.3f}", f"**{w['torch'] / w['jax']:.2f}x**", *best,
                f"{flop_count / w['jax'] / 1e12:.2f}", mfu,
                f"{w['jax']:.3f} s vs {w['torch']:.3f} s per {unit}; CPU time {c['jax']:.2f} s vs {c['torch']:.2f} s "
                f"({c['torch'] / c['jax']:.2f}x)")

    rows = [row("train step (fwd + match + loss + bwd + AdamW)", train, flops["train"], "step"),
            row("inference (forward)", infer, flops["infer"], "batch")]
    if not first_best:
        best_line = "not run (--torch-best: on by default on a GPU and with --small)"
    else:
        settings = ["channels_last", "autocast(bfloat16)" if args.bf16 else "TF32 matmuls and convolutions"]
        settings += ["torch.compile (default mode)"] if args.torch_compile else []
        settings += ["fused AdamW"] if not info["torch_device"].startswith("cpu") else []
        first_calls = "first calls (compile + run)" if args.torch_compile else "first calls"
        best_line = (", ".join(settings + best_notes) + f"; {first_calls}: train {first_best['train']:.1f} s, "
                     f"inference {first_best['infer']:.1f} s")
    lines = [f"DETR-R50 (256 hidden, 6 + 6 layers, 100 queries, 91 classes), same weights (load_hf_detr), dropout 0, "
             f"batch {B} x {H}x{W}{', bf16' if args.bf16 else ', float32'}, {args.slots} target slots "
             f"({sides.COCO_MEAN_OBJECTS} objects per image on average); {args.rounds} alternating rounds x "
             f"{args.steps} steps per side after warm-up, medians.\n",
             f"- machine: {info['machine']}; load average at start {info['load']} (a shared machine: read the ratios)",
             f"- devices: JAX {info['jax_device']}; torch {info['torch_device']}",
             f"- {info['versions']}",
             f"- precision: {info['precision']}",
             f"- PyTorch-best: {best_line}",
             f"- model FLOPs per call (XLA cost analysis of the lowered JAX program): train step "
             f"{flops['train'] / 1e9:.0f} GFLOP, inference {flops['infer'] / 1e9:.0f} GFLOP; MFU = JAX model FLOP/s "
             f"over the dense bf16 peak ({peak if peak else '-'} TFLOP/s)",
             f"- XLA_FLAGS: `{info['xla_flags'] or '(none)'}`; "
             f"GLIBC_TUNABLES: `{info['glibc_tunables'] or '(none)'}`\n",
             "| measurement | JAX img/s | PyTorch img/s | JAX / PyTorch | PyTorch-best img/s | JAX / PyTorch-best "
             "| JAX TFLOP/s | JAX MFU | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    lines += ["",
              "| JAX detail | value |", "|---|---|",
              f"| compile time of the train step (first call - steady state) | {results['first'] - t_jax:.1f} s |",
              f"| compile time of inference (first call - steady state) | "
              f"{results['first_infer'] - runs.median_wall(infer['jax']):.1f} s |",
              f"| matcher host work at the step's shapes (scipy, {B} images x 6 layers; timed outside the step) | "
              f"{host_s * 1e3:.2f} ms = {100 * host_s / t_jax:.2f}% of the step |",
              f"| hungarian_match alone, batch {B} (costs + transfer + scipy + return) | {match_b * 1e3:.1f} ms = "
              f"{100 * match_b / t_jax:.2f}% of the step |",
              f"| hungarian_match alone, [6, {args.match_batch}, 100, {args.slots}] | {match_64 * 1e3:.1f} ms = "
              f"{100 * match_64 / step_64:.3f}% of a {args.match_batch}-image step ({step_64:.0f} s, extrapolated "
              f"linearly from batch {B}) |",
              f"| hungarian_match alone, [6, {args.match_batch}, 100, 100] (COCO config pads to 100) | "
              f"{match_64_100 * 1e3:.1f} ms = {100 * match_64_100 / step_64:.3f}% of that step |"]
    if memory:
        lines += ["", "| peak memory (separate process: build + compile + 2 train steps) | JAX | PyTorch |",
                  "|---|---|---|",
                  f"| peak RSS (VmHWM, the ru_maxrss of that address space), MB | {memory['jax']['peak_rss_mb']:.0f} "
                  f"| {memory['torch']['peak_rss_mb']:.0f} |",
                  f"| of which after imports, MB | {memory['jax']['baseline_rss_mb']:.0f} | "
                  f"{memory['torch']['baseline_rss_mb']:.0f} |"]
        if "device_peak_mb" in memory["jax"] or "device_peak_mb" in memory["torch"]:
            lines.append(f"| device peak, MB | {memory['jax'].get('device_peak_mb', float('nan')):.0f} | "
                         f"{memory['torch'].get('device_peak_mb', float('nan')):.0f} |")
    per_call = {what: "; ".join(f"{name} " + " ".join(f"{w:.2f}/{c:.2f}" for w, c in t) for name, t in times.items())
                for what, times in (("train", train), ("infer", infer))}
    lines.append(f"\nPer-step wall / CPU seconds, in the order run: {per_call['train']}. "
                 f"Inference: {per_call['infer']}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
