"""Process settings that the entry points make before JAX starts: XLA flags, glibc malloc options and, where libtpu
is installed on a host without a TPU, the CPU platform.

XLA flags: a flag already named in $XLA_FLAGS wins. Each backend reads only its own flags (`xla_cpu_*` on CPU,
`xla_gpu_*` on GPU), so one list serves all.
This module does not import jax: entry points call `set_process_defaults()` before the first `import jax`.
"""

import ctypes
import glob
import importlib.util
import logging
import os
import platform
import re
from typing import Mapping, MutableMapping, Optional

logger = logging.getLogger(__name__)

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


# One XLA flag as config.xla_flags takes it: --name=value.
FLAG_PATTERN = re.compile(r"--([A-Za-z0-9_]+)=(\S+)")


def default_xla_flags_string(current: str = "", extra=DEFAULT_XLA_FLAGS) -> str:
    """`current` with each (name, value) of `extra` appended as --name=value unless `current` already names it."""
    flags = [current.strip()] if current.strip() else []
    flags += [f"--{name}={value}" for name, value in extra if name not in current]
    return " ".join(flags)


def add_xla_flags(flags: str, environ: MutableMapping[str, str] = os.environ) -> str:
    """Add `flags` ("--name=value ...", config.xla_flags) to environ["XLA_FLAGS"], except those it names already
    (the user's, or detr_jax's defaults); returns the new value; a ValueError names a malformed flag. Only before jax
    starts its backend: XLA reads its flags once, when the first computation or device query starts it."""
    bad = [f for f in flags.split() if not FLAG_PATTERN.fullmatch(f)]
    if bad:
        raise ValueError(f"config.xla_flags must be whitespace-separated '--name=value' XLA flags, got {bad[0]!r}")
    pairs = [FLAG_PATTERN.fullmatch(f).groups() for f in flags.split()]
    environ["XLA_FLAGS"] = default_xla_flags_string(environ.get("XLA_FLAGS", ""), pairs)
    return environ["XLA_FLAGS"]


def set_default_xla_flags(environ: MutableMapping[str, str] = os.environ) -> str:
    """Put DEFAULT_XLA_FLAGS into environ["XLA_FLAGS"] (flags the user set win) and return the new value."""
    environ["XLA_FLAGS"] = default_xla_flags_string(environ.get("XLA_FLAGS", ""))
    return environ["XLA_FLAGS"]


# glibc mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
# Keep up to this much free memory at the top of the heap instead of handing it back to the kernel (the largest
# value mallopt takes; XLA's temporaries for the default config's train step are ~0.8 GB).
MALLOC_TRIM_THRESHOLD = 2 ** 31 - 1
NO_MALLOC_OPTIONS_ENV = "DETR_JAX_NO_MALLOC_OPTIONS"


def set_default_malloc_options(environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """Serve big allocations from the reused heap instead of fresh mmaps (glibc only); returns what was done.

    XLA:CPU allocates its temporaries afresh at every call of a compiled program. With glibc's defaults every
    big one is a new mmap, which the kernel zero-fills page by page on first touch and which is unmapped again
    at the end of the call. With these options the default config's train step alone takes 0.30-0.32 s instead
    of 0.35 s (a 400-step default run: 166 s instead of 178 s end to end), and DETR-R50 at 512 px is 1.14x
    faster (BENCHMARKS.md). The same as `GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...`,
    set from inside the process.

    The cost: freed memory stays in the process (its resident size stays near its peak), which suits a training
    or evaluation job. Not done when `$DETR_JAX_NO_MALLOC_OPTIONS` is set, when `$GLIBC_TUNABLES` already sets a
    malloc tunable (the user's choice wins), or where the C library is not glibc.
    """
    if environ.get(NO_MALLOC_OPTIONS_ENV):
        return None
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return None
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD) == 1
    except (OSError, AttributeError) as e:  # no mallopt symbol
        logger.info("glibc malloc options not set: %s", e)
        return None
    return f"mmap_max=0 trim_threshold={MALLOC_TRIM_THRESHOLD}" if ok else None


GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips are PCI devices of Google's vendor id (as jax's hardware_utils reads them)
GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")


def tpu_chips_attached(pci_root: str = "/sys/bus/pci/devices") -> bool:
    """Whether any PCI device of this host is Google's (a TPU chip)."""
    for path in glob.glob(os.path.join(pci_root, "*", "vendor")):
        try:
            with open(path) as f:
                if f.read().strip() == GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def set_default_platforms(environ: MutableMapping[str, str] = os.environ, pci_root: str = "/sys/bus/pci/devices",
                          find_spec=importlib.util.find_spec) -> Optional[str]:
    """JAX_PLATFORMS=cpu where libtpu is installed (the `tpu` extra, for experiments/plan.py) but no TPU chip and no
    GPU plugin is: jax would otherwise start libtpu, which prints warnings about TPU_ACCELERATOR_TYPE and
    TPU_WORKER_HOSTNAMES at every start, so that installing the extra would change what a CPU run shows. The
    user's JAX_PLATFORMS wins. Returns what was set."""
    if environ.get("JAX_PLATFORMS") or find_spec("libtpu") is None:
        return None
    if any(find_spec(plugin) is not None for plugin in GPU_PLUGINS) or tpu_chips_attached(pci_root):
        return None
    environ["JAX_PLATFORMS"] = "cpu"
    return "cpu"


def set_process_defaults(environ: MutableMapping[str, str] = os.environ) -> None:
    """What every entry point does before jax is imported: `set_default_xla_flags`, `set_default_malloc_options` and
    `set_default_platforms`."""
    set_default_xla_flags(environ)
    set_default_malloc_options(environ)
    set_default_platforms(environ)
