"""Time to the first train step with and without JAX's persistent compilation cache (<workdir>/jax_cache).

  python benchmarks/bench_compile_cache.py                  # a few minutes on 2 CPU cores; appends to BENCHMARKS.md
  python benchmarks/bench_compile_cache.py --runs default --no-append

Each run starts `experiments/train.py` twice in the same fresh work directory: the first start compiles and
fills <workdir>/jax_cache; before the second, the checkpoints folder is deleted (so it trains from step 0 again,
with the same shapes) and the second start reads its programs from the cache. Measured from the launch of the
process: the first "compiling the train step" log line (the first batch is ready: jax imported, data and state
built), the first logged step (--config.log_every=1, so it is step 1; the moment its line reaches
metrics.jsonl), and the exit; and which programs the cache holds afterwards (jax writes no entry for a program
with host callbacks, e.g. the matcher's `pure_callback`, nor for one compiled in under
jax_persistent_cache_min_compile_time_secs, nor from a process other than 0). Runs:

  default     experiments/configs/default.py, 1 step, no evaluation (synthetic data, thread workers)
  coco_smoke  experiments/configs/coco_r50.py:smoke, 3 steps, no evaluation: the COCO recipe's data path
              (TFDS ArrayRecord coco_like in --data-dir, worker processes, recipe buckets) with a tiny model
  *_device_matcher  the same with --config.loss.matcher=device (no host callback in the train step)
"""

import argparse
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout

from benchmarks import report  # noqa: E402

TRAIN = os.path.join(ROOT, "experiments", "train.py")

COMPILE_LINE = re.compile(r"compiling the train step for image shape")
STEP_LINE = re.compile(r"step (\d+)/(\d+) loss")


def run_specs(data_dir: str):
    """name -> (train.py arguments after --workdir, extra environment)."""
    specs = {
        "default": ([
            "--config", os.path.join(ROOT, "experiments", "configs", "default.py"),
            "--config.num_steps=1", "--config.eval_at_end=False", "--config.eval_every=0", "--config.log_every=1",
        ], {}),
        "coco_smoke": ([
            "--config", os.path.join(ROOT, "experiments", "configs", "coco_r50.py") + ":smoke",
            "--config.num_steps=3", "--config.eval_at_end=False", "--config.eval_every=0", "--config.log_every=1",
            f"--config.data.source_kwargs.data_dir={data_dir}",
        ], {"TFDS_DATA_DIR": data_dir}),
    }
    # The same with the on-device Hungarian solver: no host callback, so the train step itself is cached.
    for name in list(specs):
        specs[name + "_device_matcher"] = (specs[name][0] + ["--config.loss.matcher=device"], specs[name][1])
    return specs


def folder_stats(path: str):
    """(files, bytes) under path (0, 0 if missing)."""
    files = size = 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            try:
                size += os.path.getsize(os.path.join(dirpath, name))
                files += 1
            except OSError:
                pass
    return files, size


def cached_programs(path: str):
    """Names of the programs in a jax cache folder ("jit_init-<hash>-cache" -> "jit_init"), sorted."""
    try:
        names = os.listdir(path)
    except OSError:
        return []
    return sorted(re.sub(r"-[0-9a-f]{16,}(-cache|-atime)?$", "", n) for n in names if n.endswith("-cache"))


def count_lines(path: str) -> int:
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def start_once(args_list, env_extra, workdir: str, timeout: float, log_path: str):
    """Launch train.py once; returns dict(first_compile, first_step, total, rc, shapes) in seconds from launch."""
    metrics = os.path.join(workdir, "metrics.jsonl")
    lines_before = count_lines(metrics)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **env_extra)
    command = [sys.executable, TRAIN, *args_list, "--workdir", workdir]
    events = {"first_compile": None, "first_step_stdout": None, "shapes": 0}
    start = time.perf_counter()
    # Own session: on a timeout the run and its worker processes are stopped together (this process group only).
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)

    def read(log):
        for line in proc.stdout:
            now = time.perf_counter() - start
            log.write(f"[{now:8.2f}] {line}")
            if COMPILE_LINE.search(line):
                events["shapes"] += 1
                if events["first_compile"] is None:
                    events["first_compile"] = now
            if events["first_step_stdout"] is None and STEP_LINE.search(line):
                events["first_step_stdout"] = now

    with open(log_path, "w") as log:
        log.write(" ".join(command) + "\n")
        reader = threading.Thread(target=read, args=(log,), daemon=True)
        reader.start()
        first_step = None
        while proc.poll() is None:
            if first_step is None and count_lines(metrics) > lines_before:
                first_step = time.perf_counter() - start
            if time.perf_counter() - start > timeout:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                break
            time.sleep(0.05)
        total = time.perf_counter() - start
        reader.join(10)
    if first_step is None and count_lines(metrics) > lines_before:
        first_step = events["first_step_stdout"]  # written between two polls just before the exit
    return dict(first_compile=events["first_compile"], first_step=first_step, total=total, rc=proc.returncode,
                shapes=events["shapes"])


def fmt(seconds) -> str:
    return "-" if seconds is None else f"{seconds:.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="default,default_device_matcher,coco_smoke,coco_smoke_device_matcher",
                        help="comma-separated: default, coco_smoke, and each with _device_matcher")
    parser.add_argument("--starts", type=int, default=2, help="starts per run in the same work directory")
    parser.add_argument("--root", default="/tmp/detr_jax_bench_compile_cache",
                        help="work directories go to ROOT/<run> (deleted first: each run starts without a cache)")
    parser.add_argument("--data-dir", default="/tmp/detr_jax_bench_tfds",
                        help="TFDS data_dir holding coco_like for coco_smoke (prepared with --num-train images if "
                             "absent; bench_loader.py uses the same folder)")
    parser.add_argument("--num-train", type=int, default=1024)
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per start before it is stopped")
    parser.add_argument("--extra", action="append", default=[],
                        help="another train.py argument for every run, e.g. --extra=--config.batch_size=2 (repeatable)")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args()

    names = [n for n in args.runs.split(",") if n]
    specs = run_specs(os.path.abspath(args.data_dir))
    unknown = [n for n in names if n not in specs]
    if unknown:
        parser.error(f"unknown runs {unknown}; known: {list(specs)}")
    if any(n.startswith("coco_smoke") for n in names):
        from detr_jax.data.sources import coco_like  # pylint: disable=g-import-not-at-top
        coco_like.prepare(args.data_dir, num_train=args.num_train, any_prepared=True)
    print(f"host: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
          f"python {platform.python_version()}", flush=True)

    rows = []
    load_before = os.getloadavg()[0]
    for name in names:
        train_args, env_extra = specs[name]
        workdir = os.path.join(args.root, name)
        shutil.rmtree(workdir, ignore_errors=True)
        os.makedirs(workdir)
        for start in range(1, args.starts + 1):
            shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)  # train from step 0 again
            cache_before = folder_stats(os.path.join(workdir, "jax_cache"))
            log_path = os.path.join(args.root, f"{name}.start{start}.log")
            r = start_once(train_args + args.extra, env_extra, workdir, args.timeout, log_path)
            r.update(name=name, start=start, cache_before=cache_before,
                     cache_after=folder_stats(os.path.join(workdir, "jax_cache")), log=log_path,
                     programs=cached_programs(os.path.join(workdir, "jax_cache")))
            rows.append(r)
            print(f"  {name} start {start}: first compile {fmt(r['first_compile'])} s, first step "
                  f"{fmt(r['first_step'])} s, total {fmt(r['total'])} s, exit {r['rc']} (log {log_path})", flush=True)

    lines = [f"`experiments/train.py` started {args.starts} times in one fresh work directory per run (checkpoints "
             f"deleted between the starts, so each trains from step 0 with the same shapes; the first start fills "
             f"<workdir>/jax_cache, later ones read it). Seconds from the launch of the process: 'data ready' = "
             f"the first 'compiling the train step' log line (jax imported, loader and state built, first batch "
             f"ready), 'first step' = step 1 written to metrics.jsonl (--config.log_every=1), 'total' = exit "
             f"(no evaluation). default = `experiments/configs/default.py --config.num_steps=1`; coco_smoke = "
             f"`experiments/configs/coco_r50.py:smoke --config.num_steps=3` on coco_like (TFDS ArrayRecord, worker "
             f"processes)." + (f" Extra arguments: `{' '.join(args.extra)}`." if args.extra else ""), "",
             "| run | start | jax_cache before | data ready | first step | step compile + run | total | exit | "
             "programs in jax_cache after |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        files, size = r["cache_before"]
        cache = f"{files} files, {size / 2 ** 20:.1f} MiB" if files else "empty"
        step_part = (r["first_step"] - r["first_compile"]
                     if r["first_step"] is not None and r["first_compile"] is not None else None)
        lines.append(f"| {r['name']} | {r['start']} | {cache} | {fmt(r['first_compile'])} | {fmt(r['first_step'])} | "
                     f"{fmt(step_part)} | {fmt(r['total'])} | {r['rc']} | {', '.join(r['programs']) or '-'} |")
    lines.append("")
    for name in names:
        first, *later = [r for r in rows if r["name"] == name]
        for r in later:
            if first["first_step"] and r["first_step"]:
                lines.append(f"{name}: time to the first step {fmt(first['first_step'])} s -> {fmt(r['first_step'])} s "
                             f"({first['first_step'] / r['first_step']:.2f}x) on start {r['start']}, total "
                             f"{fmt(first['total'])} s -> {fmt(r['total'])} s.")
    lines.append(f"(1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after: other processes "
                 f"on the host slow these times down.)")
    text = "\n".join(lines)
    print()
    failed = [r for r in rows if r["rc"] != 0]
    for r in failed:
        print(f"{r['name']} start {r['start']} exited with {r['rc']}: see {r['log']}")
    accelerator = "an NVIDIA GPU present" if shutil.which("nvidia-smi") else "no accelerator"
    report.publish(text, "Compilation cache: time to the first train step", accelerator, append=not args.no_append)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
