"""Helpers for tests that start subprocesses (training runs, jax.distributed processes)."""

import json
import os
import socket
import subprocess
import sys
import time
from typing import Dict, Optional

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_TIMEOUT_S = 600  # from a run's start; generous, for a loaded machine


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


class TrainRun:
    """`experiments/train.py --config CONFIG --workdir WORKDIR ARGS...` started in the background: one process, or
    `num_processes` joined by jax.distributed on 127.0.0.1, each with `devices` simulated CPU devices.

    `cache_dir` shares compiled programs between runs that do not overlap in time (jax writes its cache
    files in place, so a run starting alongside a writer could read half a file). `env` adds variables.
    """

    def __init__(self, config, workdir, *args, devices=1, num_processes=1, cache_dir=None, name="run",
                 env=None, timeout_s=RUN_TIMEOUT_S):
        self.workdir = str(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        child_env = subprocess_env(devices, **(env or {}))
        if cache_dir:
            child_env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
        command = [sys.executable, os.path.join(REPO, "experiments", "train.py"), "--config", str(config),
                   "--workdir", self.workdir, *args]
        if num_processes > 1:
            port = free_port()
            commands = [command + [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
                                   f"--process_id={i}"] for i in range(num_processes)]
        else:
            commands = [command]
        self.logs, self.procs = [], []
        for i, cmd in enumerate(commands):
            out, err = (os.path.join(self.workdir, f"{name}.{i}.{ext}") for ext in ("out", "err"))
            with open(out, "w") as fo, open(err, "w") as fe:
                self.procs.append(subprocess.Popen(cmd, cwd=REPO, env=child_env, stdout=fo, stderr=fe))
            self.logs.append(err)
        self.outs = [log[:-len("err")] + "out" for log in self.logs]
        self.timeout_s = timeout_s
        self.deadline = time.time() + timeout_s

    def stderr(self, i=0):
        with open(self.logs[i]) as f:
            return f.read()

    def stdout(self, i=0):
        with open(self.outs[i]) as f:
            return f.read()

    def wait(self):
        """Return codes. A process that fails stops the others (a jax.distributed peer would wait for it until
        its timeout); a run past its deadline is killed and fails the test."""
        while True:
            codes = [p.poll() for p in self.procs]
            if None not in codes:
                return codes
            if any(code not in (None, 0) for code in codes):
                self.kill()
                return [p.returncode for p in self.procs]
            if time.time() > self.deadline:
                self.kill()
                pytest.fail(f"the run in {self.workdir} took longer than {self.timeout_s} s:\n{self.stderr()[-3000:]}")
            time.sleep(0.1)

    def wait_ok(self):
        codes = self.wait()
        if any(codes):
            i = next(i for i, code in enumerate(codes) if code not in (0, -9))  # not one killed by `wait`
            # Every process's stderr: a jax.distributed failure (a coordination service error, an abort) shows on
            # one process what another one did first.
            others = "".join(f"\n--- process {j} (exit {codes[j]}):\n{self.stderr(j)[-3000:]}"
                             for j in range(len(codes)) if j != i)
            pytest.fail(f"process {i} of the run in {self.workdir} exited with {codes[i]}:\n{self.stderr(i)[-4000:]}"
                        f"{others}")
        return self

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()  # SIGKILL: no handler runs, as in a crash or an out-of-memory kill
                p.wait()


def randomize_hf_detr(model) -> None:
    """Re-draw every weight and batch-norm buffer of an HF DETR in place (torch): HF initialises batch norms as the
    identity, norms as (1, 0), biases at 0 and Linears with std 0.02, so a dropped or swapped weight would hardly
    show in the outputs."""
    import torch  # pylint: disable=g-import-not-at-top (only the HF parity tests need it)
    from transformers.models.detr.modeling_detr import DetrFrozenBatchNorm2d  # pylint: disable=g-import-not-at-top

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, DetrFrozenBatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
            elif isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.2)
            elif isinstance(module, torch.nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                module.bias.normal_(0.0, 0.2)
            elif isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
            elif isinstance(module, torch.nn.Embedding):  # object queries, learned position tables
                module.weight.normal_(0.0, 1.0)


def workdir_layout(workdir):
    """What a work directory written by detr_jax holds, without values: the files, config.json's keys, the latest
    checkpoint's state tree (path -> shape, dtype) and its meta keys."""
    import jax
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")))
    step = manager.latest_step()
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                             meta=ocp.args.JsonRestore()))
    manager.close()
    state = {jax.tree_util.keystr(p): [list(x.shape), str(x.dtype)]
             for p, x in jax.tree_util.tree_flatten_with_path(restored["state"])[0]}
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(workdir, "class_names.json")) as f:
        names = json.load(f)
    kept = ("config.json", "class_names.json", "metrics.jsonl")
    return {"files": sorted(n for n in kept if os.path.exists(os.path.join(workdir, n))),
            "config": {k: sorted(v) if isinstance(v, dict) else None for k, v in config.items()},
            "class_names": sorted(names), "meta": sorted(restored["meta"]),
            "meta_model": sorted(restored["meta"]["model"]), "state": state}


def metrics_rows(workdir):
    """The rows of a (possibly running) run's metrics.jsonl; a line still being written is skipped."""
    path = os.path.join(workdir, "metrics.jsonl")
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass
    return rows
