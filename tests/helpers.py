"""Helpers for tests that start subprocesses (training runs, jax.distributed processes)."""

import os
import socket
from typing import Dict, Optional


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a jax.distributed coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(devices: Optional[int] = None, **extra: str) -> Dict[str, str]:
    """This process's environment for a child jax process on the CPU: without the caller's XLA_FLAGS, JAX_* and
    DETR_JAX_* settings (they would change the child's devices, caches or fixtures), with `devices` simulated
    CPU devices when given, and `extra` variables on top."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "DETR_JAX_", "JAX_"))}
    env["JAX_PLATFORMS"] = "cpu"
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.update(extra)
    return env
