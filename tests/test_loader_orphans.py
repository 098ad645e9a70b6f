"""A killed run leaves nothing behind: its loader worker processes and the multiprocessing resource tracker end
within seconds, and its shared memory (batches in flight, queue semaphores) leaves /dev/shm (issue 27).

The run is a Loader with worker processes in a subprocess, started the way training starts it
(`Loader._start_processes`), killed with SIGKILL mid-epoch: no handler, finalizer or `close()` runs in it.
"""

import contextlib
import glob
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, subprocess_env

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and /dev/shm")

# 32 batches per epoch; it takes 2 and waits, its 2 workers' buffers full (~100 shared-memory blocks in flight).
_RUN = """
import time
from detr_jax.data.loader import Loader
from detr_jax.data.sources.synthetic import SyntheticDetection
source = SyntheticDetection(num_examples=64, image_size=[(48, 64)], max_objects=4, seed=0)
loader = Loader(source, None, batch_size=2, seed=0, max_objects=4, buckets=[(64, 64)], num_workers=2,
                worker_type="process", prefetch=2)
next(loader), next(loader)
print("ready", flush=True)
time.sleep(600)
"""
_GONE_WITHIN_S = 10


def _stat(pid):
    """(state, start time) of a live process, None once it is gone (pids are recycled: start time tells)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], fields[19]


def _descendants(pid):
    """{pid: start time} of every process below `pid`."""
    found, todo = {}, [pid]
    while todo:
        for path in glob.glob(f"/proc/{todo.pop()}/task/*/children"):
            try:
                with open(path) as f:
                    children = [int(c) for c in f.read().split()]
            except OSError:
                continue
            for child in children:
                stat = _stat(child)
                if stat is not None and child not in found:
                    found[child] = stat[1]
                    todo.append(child)
    return found


def _alive(processes):
    """The pids of `processes` ({pid: start time}) still running; a zombie holds no memory and counts as gone."""
    alive = []
    for pid, start in processes.items():
        stat = _stat(pid)
        if stat is not None and stat[0] != "Z" and stat[1] == start:
            alive.append(pid)
    return alive


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read().replace("\0", " ")
    except OSError:
        return ""


def _kill(pids):
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _shm():
    """Names of grain's shared-memory blocks (psm_*) and multiprocessing's semaphores (sem.mp-*) in /dev/shm."""
    return {n for n in os.listdir("/dev/shm") if n.startswith(("psm_", "sem.mp-"))}


def _shm_in_use():
    """/dev/shm names some live process has open or mapped (another program's, when not this run's)."""
    used = set()
    for proc in glob.glob("/proc/[0-9]*"):
        try:
            with open(f"{proc}/maps") as f:
                used.update(line.split("/dev/shm/", 1)[1].split()[0] for line in f if "/dev/shm/" in line)
            used.update(os.readlink(fd)[len("/dev/shm/"):] for fd in glob.glob(f"{proc}/fd/*")
                        if os.readlink(fd).startswith("/dev/shm/"))
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return used


def test_killed_run_leaves_no_worker_process_and_no_shared_memory(tmp_path):
    before = _shm()
    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "w") as fo, open(err, "w") as fe:
        run = subprocess.Popen([sys.executable, "-c", _RUN], cwd=REPO, env=subprocess_env(), stdout=fo, stderr=fe)
    processes, ours = {}, set()
    try:
        deadline = time.time() + 120
        while "ready" not in out.read_text():
            assert run.poll() is None and time.time() < deadline, f"the run did not start:\n{err.read_text()[-3000:]}"
            time.sleep(0.05)
        time.sleep(0.5)  # the workers fill their buffers
        processes = _descendants(run.pid)
        workers = [pid for pid in processes if "spawn_main" in _cmdline(pid)]
        assert len(workers) == 2, {pid: _cmdline(pid) for pid in processes}
        run.kill()  # SIGKILL
        run.wait()
        killed = time.time()
        ours = _shm() - before
        assert any(n.startswith("psm_") for n in ours), "no batch in shared memory: the test tests nothing"
        while (_alive(processes) or ours & _shm()) and time.time() - killed < _GONE_WITHIN_S:
            time.sleep(0.05)
        print(f"{len(processes)} processes and {len(ours)} /dev/shm entries of the run; "
              f"{time.time() - killed:.2f} s after the kill left: {len(_alive(processes))}, {len(ours & _shm())}")
        alive = {pid: _cmdline(pid) for pid in _alive(processes)}
        assert not alive, f"still running {_GONE_WITHIN_S} s after their run was killed: {alive}"
        left = sorted((ours & _shm()) - _shm_in_use())
        assert not left, f"in /dev/shm {_GONE_WITHIN_S} s after their run was killed: {left[:10]} ({len(left)})"
    finally:  # a failure leaves nothing behind either: workers first, then the tracker cleans /dev/shm up and ends
        if run.poll() is None:
            run.kill()
            run.wait()
        _kill([pid for pid in _alive(processes) if "resource_tracker" not in _cmdline(pid)])
        deadline = time.time() + 5
        while _alive(processes) and time.time() < deadline:
            time.sleep(0.05)
        _kill(_alive(processes))


def test_worker_whose_parent_is_already_gone_exits_at_once():
    """A worker whose parent died before its watch started (the pid it was given is not its parent's) ends at
    once rather than at its first poll."""
    code = ("import os, time\nfrom detr_jax.data import worker_processes\n"
            "worker_processes._exit_with_parent(os.getppid() + 1, poll_s=600)\ntime.sleep(600)\n")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), timeout=120).returncode == 1
