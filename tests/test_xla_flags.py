"""The XLA flags the entry points set before JAX starts."""

import os
import subprocess
import sys

from detr_jax.xla_flags import DEFAULT_XLA_FLAGS, default_xla_flags_string, set_default_xla_flags

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


def test_the_entry_points_set_them_before_jax_starts_and_jax_accepts_them():
    """Each entry point, imported in a fresh process, leaves the defaults in XLA_FLAGS; jax then runs (an unknown
    flag would abort it) and reports the user's flag untouched."""
    code = ("import os, runpy; runpy.run_path({path!r}, run_name='not_main'); "
            "import jax; jax.numpy.ones(2).block_until_ready(); print(os.environ['XLA_FLAGS'])")
    for script in ("train.py", "evaluate.py", "predict.py"):
        path = os.path.join(REPO, "experiments", script)
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
        out = subprocess.run([sys.executable, "-c", code.format(path=path)], capture_output=True, text=True,
                             env=env, cwd=REPO, check=False)
        assert out.returncode == 0, (script, out.stderr[-2000:])
        flags = out.stdout.strip().splitlines()[-1].split()
        assert flags[0] == "--xla_force_host_platform_device_count=2", script
        assert set(f"--{n}={v}" for n, v in DEFAULT_XLA_FLAGS) <= set(flags), script
