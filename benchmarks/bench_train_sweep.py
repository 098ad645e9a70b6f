"""The CPU optimisation sweep of the train step: what each of detr_jax's CPU optimisations and XLA flags buys.

  python benchmarks/bench_train.py --sweep                       # the whole table (~18 min on 2 idle cores)
  python benchmarks/bench_train.py --sweep --variants default,before:all,flags:ynn-off --no-append

Code variants (CODE_VARIANTS) are timed in alternating rounds with HF's PyTorch DETR in the bench_train.py process;
XLA-flag and environment variants (FLAG_VARIANTS) each in a child process (`train_runs.run_child`), since XLA
reads its flags once per process. Sizes, rounds and steps are bench_train.py's.
"""

import os
import statistics

from benchmarks.train_runs import DEFAULT_XLA_FLAGS, alternate, median_cpu, median_wall, run_child, timed
from benchmarks.train_sides import build_hf, jax_detr, make_batch, make_jax_train_step, make_torch_train_step

# Each "before:" variant puts back what the library computed before one of the CPU optimisations (same parameters,
# same numbers), so each row shows what that change buys: other formulations of the layers' kernel tricks
# (`detr_jax.models.layers.formulations`, in force while the train step is traced) and/or other model fields.
CODE_VARIANTS = {  # name -> (layers.formulations(...) choices, DETR field overrides, description)
    "default": ({}, {}, "the library now (all changes below)"),
    "before:no-freeze": ({}, {"train_stem": True}, "gradients also computed for the stem and stage 1 (then zeroed: "
                         "the optimizer still freezes them)"),
    "before:conv1x1-nn.Conv": ({"conv1x1": "conv"}, {}, "1x1 convolutions (ResNet and input_proj) as nn.Conv"),
    "before:conv1x1-4d-dot": ({"conv1x1": "dot_general"}, {}, "1x1 convolutions as a 4-D dot_general"),
    "before:dense-3d": ({"linear": "dense"}, {}, "transformer/head Linear layers on 3-D/4-D inputs (nn.Dense)"),
    "before:strided-nn.Conv": ({"conv3x3_stride2": "conv"}, {}, "stride-2 3x3 convolutions as nn.Conv "
                               "(zero-dilated input gradient)"),
    "before:all": ({"conv1x1": "conv", "linear": "dense", "conv3x3_stride2": "conv"}, {"train_stem": True},
                   "the library before this work"),
}
_YNN = "--xla_cpu_experimental_ynn_fusion_type="
FLAG_VARIANTS = {  # name -> (XLA_FLAGS appended after the defaults (the last setting wins), CPUs, description)
    "flags:default": ("", None, f"default flags `{DEFAULT_XLA_FLAGS or '(none)'}`"),
    "flags:no-region-analysis": ("--xla_cpu_copy_insertion_use_region_analysis=false", None,
                                 "XLA's default copy insertion (472 optimizer-state copies per step)"),
    "flags:ynn-no-dot": (_YNN + "-individual_dot", None, "dots by Eigen instead of YNNPACK"),
    "flags:ynn-no-conv": (_YNN + "-individual_convolution", None, "convolutions by Eigen instead of YNNPACK"),
    "flags:ynn-off": (_YNN + "-individual_dot,-individual_convolution", None, "no YNNPACK: Eigen for both"),
    "flags:xnn-dot": (_YNN + "-individual_dot --xla_cpu_experimental_xnn_fusion_type=individual_dot", None,
                      "dots by XNNPACK"),
    "flags:onednn-dot": (_YNN + "-individual_dot --xla_cpu_experimental_onednn_fusion_type=dot", None,
                         "dots by oneDNN"),
    "flags:onednn": ("--xla_cpu_use_onednn=true", None, "oneDNN op rewrites on"),
    "flags:legacy-runtime": ("--xla_cpu_use_thunk_runtime=false", None, "thunk runtime off"),
    "flags:eigen-1-thread": ("--xla_cpu_multi_thread_eigen=false", None, "single-threaded Eigen calls"),
    "flags:concurrency-scheduler": ("--xla_cpu_enable_concurrency_optimized_scheduler=true", None,
                                    "concurrency-optimised scheduler"),
    "flags:xnn-graph": ("--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY", None,
                        "XNNPACK graph fusion (greedy)"),
    "threads:1-cpu": ("", 1, "JAX and torch each pinned to 1 CPU (1 thread each; robust to other jobs)"),
    "env:glibc-malloc-default": ("", None, "glibc malloc defaults (GLIBC_TUNABLES unset: fresh zero-filled mmaps for "
                                 "XLA's temporaries at every step)"),
}
FLAG_ENV = {"env:glibc-malloc-default": {"GLIBC_TUNABLES": None}}


def time_code_variants(args, selected):
    """({name: [(wall, cpu)]} for the selected code variants and "torch", {name: first-call seconds})."""
    import jax
    import numpy as np
    import torch

    from detr_jax.models import layers
    batch = make_batch(args.batch, args.height, args.width, args.slots)
    model = jax_detr(args.bf16)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3), np.float32))
    fns, first_s = {}, {}
    for name in [n for n in CODE_VARIANTS if n in selected]:
        choices, overrides, _ = CODE_VARIANTS[name]
        with layers.formulations(**choices):
            fns[name] = make_jax_train_step(model.clone(**overrides), variables, batch)
            first_s[name] = timed(fns[name])  # traced (with these formulations) and compiled here
        print(f"{name}: first call {first_s[name]:.1f} s", flush=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fns["torch"], _ = make_torch_train_step(build_hf(device), batch, device, args.bf16)
    for fn in fns.values():
        fn()
    return alternate(fns, args.rounds, args.steps), first_s


def time_flag_variants(args, selected):
    """Rows (name, description, flags, wall, cpu, compile s, torch wall or None, torch cpu or None), one child
    process per variant (and one for torch where the variant pins CPUs)."""
    rows = []
    base_flags = os.environ.get("XLA_FLAGS", "")
    for name in [n for n in FLAG_VARIANTS if n in selected]:
        flags, cpus, desc = FLAG_VARIANTS[name]
        env = {"XLA_FLAGS": (base_flags + " " + flags).strip(), **FLAG_ENV.get(name, {})}
        res = run_child(args, "jax-time", env=env, cpus=cpus)
        t_torch = c_torch = None
        if cpus:
            ref = run_child(args, "torch-time", cpus=cpus)
            t_torch, c_torch = statistics.median(ref["times"]), statistics.median(ref["cpu"])
        t_jax = statistics.median(res["times"])
        rows.append((name, desc, flags, t_jax, statistics.median(res["cpu"]), res["first_s"] - t_jax, t_torch, c_torch))
        print(f"{name}: JAX {rows[-1][3]:.2f} s/step ({rows[-1][4]:.2f} CPU s)", flush=True)
    return rows


def sweep(args, info):
    """The sweep's markdown (header lines and tables) for BENCHMARKS.md."""
    selected = args.variants.split(",") if args.variants else list(CODE_VARIANTS) + list(FLAG_VARIANTS)
    times, first_s = time_code_variants(args, selected)
    wall = {n: median_wall(t) for n, t in times.items()}
    cpu = {n: median_cpu(t) for n, t in times.items()}
    flag_rows = time_flag_variants(args, selected)

    lines = [f"Batch {args.batch} x {args.height}x{args.width}. Wall time is what a user sees; CPU time (all threads "
             "of the process, user + system) is much less sensitive to other jobs on a shared machine for JAX, and the "
             "column to compare JAX variants by. PyTorch's OpenMP threads spin-wait, so its CPU time also grows when "
             "the machine is oversubscribed.\n",
             f"- machine: {info['machine']}, load average at start {info['load']}",
             f"- {info['versions']}\n",
             f"Code variants, one process, {args.rounds} alternating rounds x {args.steps} steps, medians; "
             f"each `before:` row puts back one formulation the library used before (same parameters, same numbers):\n",
             "| variant | what | JAX s/step (CPU s) | default is faster by (CPU time) | PyTorch / JAX time, wall |"
             " compile s |", "|---|---|---|---|---|---|"]
    for name in [n for n in CODE_VARIANTS if n in first_s]:
        w, c = wall[name], cpu[name]
        vs_default = f"{c / cpu['default']:.2f}x" if "default" in cpu else "-"
        lines.append(f"| {name} | {CODE_VARIANTS[name][2]} | {w:.2f} ({c:.2f}) | {vs_default} | "
                     f"{wall['torch'] / w:.2f}x | {first_s[name] - w:.0f} |")
    lines.append(f"| torch | HF DetrForObjectDetection, same step | {wall['torch']:.2f} ({cpu['torch']:.2f}) | | | |")
    if flag_rows:
        base = {r[0]: r for r in flag_rows}.get("flags:default")
        lines += ["", f"XLA flags and environment, one process each ({args.steps} timed steps after the compiling "
                  "call); the library as it is now:\n",
                  "| variant | what | JAX s/step (CPU s) | flags:default is faster by (CPU time) | compile s |",
                  "|---|---|---|---|---|"]
        for name, desc, flags, w, c, comp, t_torch, c_torch in flag_rows:
            what = desc + (f" `{flags}`" if flags else "")
            vs = f"{c / base[4]:.2f}x" if base and not t_torch else "-"
            if t_torch:
                what += f"; PyTorch at 1 CPU: {t_torch:.2f} s/step ({c_torch:.2f} CPU s), JAX speed / PyTorch " \
                        f"{t_torch / w:.2f}x"
            lines.append(f"| {name} | {what} | {w:.2f} ({c:.2f}) | {vs} | {comp:.0f} |")
    return "\n".join(lines) + "\n"
