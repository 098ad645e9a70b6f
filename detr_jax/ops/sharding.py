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
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def cluster_environment() -> Optional[str]:
    """The multi-process launcher this process runs under, if any: "SLURM", "Open MPI" or "TPU pod" (each
    with more than one process), else None. jax.distributed.initialize() reads the rest from the same
    environment."""
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in os.environ:
        return "SLURM"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "Open MPI"
    if len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
        return "TPU pod"
    return None


def maybe_initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None, multihost: Optional[bool] = None,
                                 coordinator_bind_address: Optional[str] = None,
                                 heartbeat_timeout_s: Optional[int] = None) -> None:
    """Start multi-host JAX when asked by arguments or the environment; a no-op for one process.

    Explicit: the coordinator address, process count and id, by argument or through DETR_JAX_COORDINATOR /
    DETR_JAX_NUM_PROCESSES / DETR_JAX_PROCESS_ID. Detected: `srun -n 4 ...` (SLURM), `mpirun -n 4 ...`
    (Open MPI) and multi-host TPU pods, where `jax.distributed.initialize()` finds everything itself; without
    this, each of those processes would run on its own, all writing the same work directory. `multihost=True`
    (--multihost, DETR_JAX_MULTIHOST=1) asks for `jax.distributed.initialize()` in any other environment it
    supports; False never initializes.

    Process 0's coordination service listens on `coordinator_bind_address` (DETR_JAX_COORDINATOR_BIND_ADDRESS),
    by default on the coordinator address itself (jax's own default is every interface, "[::]:PORT"); with a
    detected launcher and no address given, jax's default.

    `heartbeat_timeout_s`: a process that sends no heartbeat for this long counts as dead, and the others stop
    naming it (`training.loop`); None keeps jax's default (100 s).
    """
    coordinator_address = coordinator_address or os.environ.get("DETR_JAX_COORDINATOR")
    if num_processes is None and "DETR_JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["DETR_JAX_NUM_PROCESSES"])
    if process_id is None and "DETR_JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["DETR_JAX_PROCESS_ID"])
    if multihost is None and os.environ.get("DETR_JAX_MULTIHOST"):
        multihost = os.environ["DETR_JAX_MULTIHOST"] not in ("0", "false", "False")
    explicit = coordinator_address is not None or (num_processes or 1) > 1
    detected = cluster_environment()
    if multihost is False or not (explicit or detected or multihost):
        return
    bind = coordinator_bind_address or os.environ.get("DETR_JAX_COORDINATOR_BIND_ADDRESS") or coordinator_address
    timeout = {} if heartbeat_timeout_s is None else {"heartbeat_timeout_seconds": int(heartbeat_timeout_s)}
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, coordinator_bind_address=bind, **timeout)
    logging.info("jax.distributed (%s): process %d of %d, %d local / %d global devices",
                 "arguments" if explicit else detected or "--multihost", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())


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
