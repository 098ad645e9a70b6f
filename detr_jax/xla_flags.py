"""XLA flags that the entry points set before JAX starts; a flag already named in $XLA_FLAGS wins.

Each backend reads only its own flags (`xla_cpu_*` on CPU, `xla_gpu_*` on GPU), so one list serves all.
This module does not import jax: call `set_default_xla_flags()` before the first `import jax`.
"""

import os
from typing import MutableMapping

DEFAULT_XLA_FLAGS = (
    # XLA:CPU copy insertion with region analysis: the AdamW update then overwrites the donated optimizer state
    # in place instead of copying it first; 1.06x on the CPU train step (BENCHMARKS.md, optimisation sweep).
    ("xla_cpu_copy_insertion_use_region_analysis", "true"),
    # XLA:GPU GEMM fusions emitted by Triton off (cuBLAS/cuDNN instead). With jax 0.11.2 on an H200 the default
    # config's train step aborted the process while compiling ("triton_tiling_propagation.cc: Check failed:
    # subdim_size_accumulator == dim_size", the crash of openxla/xla#47381). Without them the DETR-R50 train
    # step was also faster (0.048 vs 0.053 s at 8 x 800x1200) and compiled in 21 s instead of 62 s (BENCHMARKS.md).
    ("xla_gpu_enable_triton_gemm", "false"),
)


def default_xla_flags_string(current: str = "") -> str:
    """`current` with each of DEFAULT_XLA_FLAGS appended as --name=value unless `current` already names it."""
    flags = [current.strip()] if current.strip() else []
    flags += [f"--{name}={value}" for name, value in DEFAULT_XLA_FLAGS if name not in current]
    return " ".join(flags)


def set_default_xla_flags(environ: MutableMapping[str, str] = os.environ) -> str:
    """Put DEFAULT_XLA_FLAGS into environ["XLA_FLAGS"] (flags the user set win) and return the new value."""
    environ["XLA_FLAGS"] = default_xla_flags_string(environ.get("XLA_FLAGS", ""))
    return environ["XLA_FLAGS"]
