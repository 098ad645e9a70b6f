"""The XLA flags and glibc malloc options the entry points set before JAX starts."""

import importlib.util
import os
import platform
import subprocess
import sys

import pytest

from detr_jax.ops.xla_flags import (
    DEFAULT_XLA_FLAGS,
    NO_MALLOC_OPTIONS_ENV,
    add_xla_flags,
    default_xla_flags_string,
    set_default_malloc_options,
    set_default_xla_flags,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults_are_appended_and_a_flag_the_user_set_wins():
    assert default_xla_flags_string("") == " ".join(f"--{n}={v}" for n, v in DEFAULT_XLA_FLAGS)
    user = "--xla_gpu_enable_triton_gemm=true --xla_force_host_platform_device_count=8"
    flags = default_xla_flags_string(user).split()
    assert flags[:2] == user.split()
    assert "--xla_gpu_enable_triton_gemm=false" not in flags  # the user's value is kept
    assert "--xla_cpu_copy_insertion_use_region_analysis=true" in flags
    env = {"XLA_FLAGS": "--xla_cpu_copy_insertion_use_region_analysis=false"}
    set_default_xla_flags(env)
    assert env["XLA_FLAGS"] == "--xla_cpu_copy_insertion_use_region_analysis=false --xla_gpu_enable_triton_gemm=false"


def test_config_xla_flags_are_added_and_the_users_win():
    """config.xla_flags (experiments/train.py) adds to XLA_FLAGS what it does not name already; a malformed flag is
    one ValueError naming the field (XLA would abort the process on it)."""
    env = {"XLA_FLAGS": "--xla_cpu_a=user"}
    assert add_xla_flags("--xla_cpu_a=config --xla_cpu_b=x,-y", env) == "--xla_cpu_a=user --xla_cpu_b=x,-y"
    assert env["XLA_FLAGS"] == "--xla_cpu_a=user --xla_cpu_b=x,-y"
    assert add_xla_flags("", {}) == ""
    with pytest.raises(ValueError, match="config.xla_flags must be whitespace-separated '--name=value' XLA flags, "
                                         "got '--xla_cpu_c'"):
        add_xla_flags("--xla_cpu_b=1 --xla_cpu_c", {})


def test_the_entry_points_set_them_before_jax_starts_and_jax_accepts_them():
    """Each entry point, imported in a fresh process, leaves the defaults in XLA_FLAGS; jax then runs (an unknown
    flag would abort it) and reports the user's flag untouched."""
    code = ("import os, runpy; runpy.run_path({path!r}, run_name='not_main'); "
            "import jax; jax.numpy.ones(2).block_until_ready(); print(os.environ['XLA_FLAGS'])" + _PRINT_MMAPPED)
    for script in ("train.py", "evaluate.py", "predict.py"):
        path = os.path.join(REPO, "experiments", script)
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
        out = subprocess.run([sys.executable, "-c", code.format(path=path)], capture_output=True, text=True,
                             env=env, cwd=REPO, check=False)
        assert out.returncode == 0, (script, out.stderr[-2000:])
        flags = out.stdout.strip().splitlines()[-2].split()
        assert flags[0] == "--xla_force_host_platform_device_count=2", script
        assert set(f"--{n}={v}" for n, v in DEFAULT_XLA_FLAGS) <= set(flags), script
        if _GLIBC:  # the malloc options are set too: a 64 MiB block comes from the heap, not from its own mmap
            assert out.stdout.strip().splitlines()[-1] == "mmapped blocks 0", script


_GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
# Allocates a 64 MiB block with malloc and prints whether glibc served it with its own mmap (the change in
# mallinfo2's count of mmapped blocks).
_PRINT_MMAPPED = ("; import ctypes; libc = ctypes.CDLL(None)\n"
                  "class Info(ctypes.Structure): _fields_ = [(n, ctypes.c_size_t) for n in "
                  "'arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost'.split()]\n"
                  "libc.malloc.restype = ctypes.c_void_p; libc.mallinfo2.restype = Info\n"
                  "before = libc.mallinfo2().hblks; block = libc.malloc(64 << 20)\n"
                  "print('mmapped blocks', libc.mallinfo2().hblks - before)")


@pytest.mark.skipif(not _GLIBC, reason="glibc malloc options")
def test_malloc_options_serve_big_blocks_from_the_heap_unless_the_user_chose():
    def run(env, set_options):
        code = ("from detr_jax.ops.xla_flags import set_default_malloc_options as s; print(s())" if set_options
                else "print(None)") + _PRINT_MMAPPED
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True,
                             env=dict({k: v for k, v in os.environ.items()
                                       if k not in ("GLIBC_TUNABLES", NO_MALLOC_OPTIONS_ENV)}, **env))
        return out.stdout.strip().splitlines()

    assert run({}, set_options=False) == ["None", "mmapped blocks 1"]  # glibc's default: its own mmap
    done, mmapped = run({}, set_options=True)
    assert done.startswith("mmap_max=0") and mmapped == "mmapped blocks 0"
    assert run({NO_MALLOC_OPTIONS_ENV: "1"}, set_options=True) == ["None", "mmapped blocks 1"]
    assert run({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"}, set_options=True) == \
        ["None", "mmapped blocks 1"]
    assert set_default_malloc_options({NO_MALLOC_OPTIONS_ENV: "1"}) is None


def test_with_libtpu_on_a_host_without_a_tpu_the_entry_points_stay_on_the_cpu(tmp_path):
    """JAX_PLATFORMS=cpu is set only where libtpu is installed, no TPU chip is on the PCI bus, no GPU plugin is
    installed and the user chose no platform; an entry point then starts jax without libtpu's warnings."""
    from detr_jax.ops.xla_flags import set_default_platforms

    pci = tmp_path / "pci"
    (pci / "0000:00:04.0").mkdir(parents=True)
    (pci / "0000:00:04.0" / "vendor").write_text("0x8086\n")
    only = lambda *names: (lambda name: object() if name in names else None)  # noqa: E731  (a fake find_spec)
    env = {}
    assert set_default_platforms(env, str(pci), only("libtpu")) == "cpu" and env == {"JAX_PLATFORMS": "cpu"}
    for environ, find_spec in (({"JAX_PLATFORMS": "tpu"}, only("libtpu")), ({}, only()),
                               ({}, only("libtpu", "jax_cuda13_plugin"))):
        before = dict(environ)
        assert set_default_platforms(environ, str(pci), find_spec) is None and environ == before
    (pci / "0000:00:05.0").mkdir()
    (pci / "0000:00:05.0" / "vendor").write_text("0x1ae0\n")  # a TPU chip
    assert set_default_platforms({}, str(pci), only("libtpu")) is None

    if importlib.util.find_spec("libtpu") is None:
        return
    code = (f"import runpy; runpy.run_path({os.path.join(REPO, 'experiments', 'train.py')!r}, run_name='x'); "
            "import jax; print(jax.devices()[0].platform)")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert out.returncode == 0 and out.stdout.split()[-1] == "cpu", out.stderr[-2000:]
    assert "TPU_WORKER_HOSTNAMES" not in out.stderr and "TPU_ACCELERATOR_TYPE" not in out.stderr, out.stderr
