"""How bench_train.py (and its --sweep) measure: the process set-up (XLA flags, malloc tunables, CPU pinning),
alternating timing rounds, the run's system description, and child processes that run one side alone.

A child (peak memory, the sweep's per-flag timings, FLOP counts on a CPU) is this file run as a script:

  python benchmarks/train_runs.py jax --batch 2 --height 512 --width 512 --slots 20 --steps 2

It takes XLA_FLAGS and GLIBC_TUNABLES from its environment as given (the parent's, plus `run_child`'s `env`) and
prints one line `CHILD_RESULT {json}`.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout

from benchmarks import report  # noqa: E402 (no jax import)
from benchmarks import train_sides as sides  # noqa: E402
from detr_jax.ops.xla_flags import default_xla_flags_string  # noqa: E402 (no jax import)

# The XLA flags the entry points set (detr_jax/ops/xla_flags.py), used here by default. On CPU, region analysis lets
# XLA's copy insertion see that the AdamW update may overwrite the donated optimizer state in place: without it
# every step copies all of mu and nu first (472 copies, ~5% of a CPU step). On GPU, Triton GEMM fusions are off.
# The other flags tried are in bench_train_sweep.FLAG_VARIANTS and BENCHMARKS.md.
DEFAULT_XLA_FLAGS = default_xla_flags_string()

# glibc malloc: no mmap for large blocks and no trimming, so memory freed by one step is reused by the next.
# XLA:CPU allocates the ~0.8 GB of temporaries of a train step afresh at every call; by default glibc serves such
# blocks with new mmaps that the kernel zero-fills on first touch (~226k page faults, ~0.4 CPU s per step at
# batch 2 x 512x512). Set for the whole process, so for PyTorch too (it gains a few percent). glibc reads it at
# start-up: bench_train.py re-executes itself with it unless it is already set or --no-malloc-tuning is given.
MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184"


# ---- process set-up ----------------------------------------------------------------------------------------
def reexec_with_malloc_tunables(script, argv):
    """Re-execute `script` with `argv` under MALLOC_TUNABLES, unless they are already set (or not Linux)."""
    if "GLIBC_TUNABLES" in os.environ or platform.system() != "Linux":
        return
    env = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES)
    os.execve(sys.executable, [sys.executable, os.path.abspath(script)] + list(argv), env)


def pin_cpus(n):
    """Pin this process (and its future children) to the first `n` CPUs it may use; JAX and torch, started later,
    then use `n` threads. No-op for None or 0."""
    if n:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:n])


def set_xla_flags(extra):
    """Append `extra` (None: DEFAULT_XLA_FLAGS) to $XLA_FLAGS, before JAX starts."""
    flags = DEFAULT_XLA_FLAGS if extra is None else extra
    if flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()


def quiet_and_shared_gpu():
    # JAX and torch share one GPU in a process: no up-front grab of 75% of its memory by JAX.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import warnings
    warnings.filterwarnings("ignore")


# ---- timing ------------------------------------------------------------------------------------------------
def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed_cpu(fn):
    """(wall seconds, CPU seconds of this process: all its threads, user + system) of one call."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def alternate(fns, rounds, steps):
    """{name: [(wall s, cpu s) per call]}: `steps` calls of each fn per round, the order reversed every other round."""
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            for _ in range(steps):
                times[name].append(timed_cpu(fns[name]))
    return times


def median_wall(calls):
    return statistics.median([w for w, _ in calls])


def median_cpu(calls):
    return statistics.median([c for _, c in calls])


# ---- system ------------------------------------------------------------------------------------------------
def cpu_pressure():
    """', CPU pressure (PSI) some avg10 N%': the share of time runnable tasks waited for a CPU; '' if unknown."""
    try:
        with open("/proc/pressure/cpu") as f:
            return ", CPU pressure (PSI) some avg10 " + f.readline().split()[1].split("=")[1] + "%"
    except (OSError, IndexError):
        return ""


def system_info():
    """What the table's header lines say about this run: machine and load, devices, versions, precision, flags."""
    import flax
    import jax
    import jaxlib
    import torch
    import transformers
    dev = jax.devices()[0]
    torch_dev = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                 else f"cpu ({torch.get_num_threads()} threads)")
    return {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": report.machine(),
        "load": " ".join(f"{x:.1f}" for x in os.getloadavg()) + cpu_pressure(),
        "versions": f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, flax {flax.__version__}, "
                    f"torch {torch.__version__}, transformers {transformers.__version__}, "
                    f"python {platform.python_version()}",
        "jax_device": f"{dev.platform}: {dev.device_kind} (x{jax.device_count()})",
        "torch_device": torch_dev,
        "device_kind": dev.device_kind,
        "precision": f"JAX jax_default_matmul_precision={jax.config.jax_default_matmul_precision}; torch "
                     f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}, "
                     f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }


# ---- children: one side alone in a process -----------------------------------------------------------------
def rss_mb(field="VmHWM"):
    """This address space's resident set, MB: VmHWM (high-water mark) or VmRSS (now), from /proc/self/status.

    `getrusage(RUSAGE_SELF).ru_maxrss` would be the same high-water mark, but Linux carries it over fork() and
    execve(), so a child started from this (several GB) process would report the parent's peak; VmHWM belongs to
    the new address space only. Falls back to ru_maxrss where /proc is missing.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_main(args):
    """One side alone in this process; prints one JSON line. Kinds: jax, torch (memory), jax-time, torch-time
    (the sweep), flops (lowering only: the FLOP counts of the train step and inference programs)."""
    import numpy as np
    kind = args.kind
    batch = sides.make_batch(args.batch, args.height, args.width, args.slots)
    result = {"kind": kind}
    if kind == "flops":
        import jax
        model = sides.jax_detr(args.bf16)
        variables = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3), np.float32))
        result["train"] = sides.make_jax_train_step(model, variables, batch).flops()
        result["infer"] = sides.make_jax_infer(model, variables, batch).flops()
        print("CHILD_RESULT " + json.dumps(result), flush=True)
        return
    if kind.startswith("jax"):
        import jax
        rss0 = rss_mb("VmRSS")
        model = sides.jax_detr(args.bf16)
        variables = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3), np.float32))
        step = sides.make_jax_train_step(model, variables, batch)
        result["first_s"] = timed(step)
        result["times"], result["cpu"] = zip(*[timed_cpu(step) for _ in range(args.steps)])
        dev = jax.devices()[0]
        stats = dev.memory_stats() if dev.platform != "cpu" else None
        if stats and "peak_bytes_in_use" in stats:
            result["device_peak_mb"] = stats["peak_bytes_in_use"] / 2 ** 20
    else:
        import torch
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        rss0 = rss_mb("VmRSS")
        model = sides.build_hf(device)
        step, _ = sides.make_torch_train_step(model, batch, device, args.bf16)
        result["first_s"] = timed(step)
        result["times"], result["cpu"] = zip(*[timed_cpu(step) for _ in range(args.steps)])
        if device.type == "cuda":
            result["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    result["baseline_rss_mb"] = rss0  # after imports, before the model
    result["peak_rss_mb"] = rss_mb("VmHWM")
    print("CHILD_RESULT " + json.dumps(result), flush=True)


def run_child(args, kind, env=None, steps=None, cpus=None):
    """The result dict of `kind` run in a child process at args' sizes; `env` entries set (None: unset) variables
    of the child's environment, `cpus` pins it."""
    cmd = [sys.executable, os.path.abspath(__file__), kind, "--batch", str(args.batch), "--height",
           str(args.height), "--width", str(args.width), "--slots", str(args.slots), "--steps",
           str(steps or args.steps)]
    if cpus:
        cmd += ["--cpus", str(cpus)]
    if args.bf16:
        cmd.append("--bf16")
    child_env = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            child_env.pop(key, None)
        else:
            child_env[key] = value
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("CHILD_RESULT "):
            return json.loads(line[len("CHILD_RESULT "):])
    raise RuntimeError(f"child {kind} failed ({' '.join(cmd)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def parse_child_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=("jax", "torch", "jax-time", "torch-time", "flops"))
    for name in ("batch", "height", "width", "slots", "steps"):
        p.add_argument(f"--{name}", type=int, required=True)
    p.add_argument("--cpus", type=int, default=None, help="pin to the first N CPUs")
    p.add_argument("--bf16", action="store_true")
    return p.parse_args(argv)


if __name__ == "__main__":
    child_args = parse_child_args()
    pin_cpus(child_args.cpus)
    quiet_and_shared_gpu()
    child_main(child_args)
