"""What every benchmark script does with its table: print it and append it to BENCHMARKS.md under a dated heading."""

import datetime
import os
import platform
import statistics
import sys
import time

BENCHMARKS_MD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "BENCHMARKS.md")


def machine() -> str:
    """'N CPU cores (model)' of this host."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({model})"


def publish(text: str, title: str, device: str = "no accelerator", append: bool = True) -> None:
    """Print `text`; with `append`, add it to BENCHMARKS.md as `## title (date, machine, device)` followed by the
    command line that produced it."""
    print(text)
    if not append:
        return
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    command = " ".join(["python", os.path.relpath(sys.argv[0], os.path.dirname(BENCHMARKS_MD))] + sys.argv[1:])
    with open(BENCHMARKS_MD, "a") as f:
        if f.tell() == 0:
            f.write("# Benchmarks\n")
        f.write(f"\n## {title} ({date}, {machine()}, {device})\n\n`{command}`\n\n{text}\n")
    print(f"appended to {BENCHMARKS_MD}")


def median_seconds(fn, *args, repeats: int = 5) -> float:
    """Median wall time of `fn(*args)` (a jitted function) over `repeats` calls after one warm-up call, waiting
    for its device results each time."""
    import jax  # pylint: disable=g-import-not-at-top

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
