"""Data parallelism over every device of every host: one mesh axis, batch split, parameters replicated.

We use `jax.jit` with a `Mesh` and `NamedSharding` rather than `pmap`: the same code runs on one CPU, 8
simulated devices and a multi-host pod, XLA inserts the gradient all-reduce itself, and only the host
matcher needs an explicit per-device region (`shard_map`), so that each host solves the assignments of the
images it holds and nothing is gathered onto one device.
"""

import logging
import os
from typing import Any, Dict, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None) -> None:
    """Start multi-host JAX when asked by arguments or the environment; a no-op for one process.

    On TPU pods (and SLURM/Open MPI clusters) `jax.distributed.initialize()` discovers everything itself;
    on plain CPU/GPU clusters pass the coordinator address, process count and id, by argument or through
    DETR_JAX_COORDINATOR / DETR_JAX_NUM_PROCESSES / DETR_JAX_PROCESS_ID.
    """
    coordinator_address = coordinator_address or os.environ.get("DETR_JAX_COORDINATOR")
    if num_processes is None and "DETR_JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["DETR_JAX_NUM_PROCESSES"])
    if process_id is None and "DETR_JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["DETR_JAX_PROCESS_ID"])
    if coordinator_address is None and (num_processes or 1) <= 1:
        return
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh() -> Mesh:
    """A 1-D mesh over all devices of all processes, axis "data"."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the devices."""
    return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(local_batch: Dict[str, np.ndarray], mesh: Mesh) -> Dict[str, Any]:
    """Assemble this process's part of the global batch into global arrays sharded over the batch axis.

    Args:
      local_batch: numpy arrays whose leading axis is this process's share (global batch / process count).
    """
    sharding = batch_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
