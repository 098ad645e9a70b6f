"""Who may start in a work directory and how processes meet (issue 23): the lock's refusals reach every process
of a multi-process run, a file system without locks is named as such, and process 0's coordination service
listens on the address it was given."""

import errno
import fcntl
import os
import time

import pytest

from tests.helpers import TrainRun

TINY_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny.py")


def _error_lines(text):
    return [line for line in text.splitlines() if line.startswith("E") and "] " in line]


def test_a_file_system_without_locks_is_named_and_can_be_overridden(tmp_path, monkeypatch):
    from detr_jax.training import workdir as wd

    def no_locks(f, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    monkeypatch.delenv("DETR_JAX_NO_WORKDIR_LOCK", raising=False)
    expected = (f"the file system of {tmp_path} does not support file locks "
                r"\(No locks available locking .*\.lock\); .*DETR_JAX_NO_WORKDIR_LOCK=1")
    with pytest.raises(wd.WorkdirInUseError, match=expected):
        with wd.workdir_lock(str(tmp_path)):
            pass
    monkeypatch.setenv("DETR_JAX_NO_WORKDIR_LOCK", "1")
    with wd.workdir_lock(str(tmp_path)):
        entered = True
    assert entered


def test_a_busy_work_directory_refuses_every_process_of_a_multi_process_run(tmp_path):
    """Process 0 cannot take the lock (held here, as a live run would): both processes stop at once with one line,
    the other process naming process 0's answer, instead of waiting for a collective."""
    lock = open(tmp_path / ".lock", "a+")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    lock.write("pid 4242 on host elsewhere, started now")
    lock.flush()
    try:
        run = TrainRun(TINY_CONFIG, tmp_path, "--config.num_steps=2", num_processes=2, timeout_s=180)
        while any(p.poll() is None for p in run.procs):  # (run.wait() would stop the other at the first exit)
            if time.time() > run.deadline:
                run.kill()
                pytest.fail("a process kept waiting:\n" + run.stderr(1)[-2000:])
            time.sleep(0.1)
        assert [p.returncode for p in run.procs] == [1, 1], run.stderr(1)[-2000:]
        for i in range(2):
            (line,) = _error_lines(run.stderr(i))
            assert f"{tmp_path} is in use by the run of pid 4242 on host elsewhere" in line, run.stderr(i)[-2000:]
        assert "process 0 refused the run: " in _error_lines(run.stderr(1))[0]
        assert not os.path.exists(tmp_path / "checkpoints")
    finally:
        lock.close()


def test_process_zero_listens_on_the_coordinator_address_unless_told(monkeypatch):
    import jax

    from detr_jax.ops import sharding

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    for key in ("DETR_JAX_COORDINATOR_BIND_ADDRESS", "DETR_JAX_COORDINATOR", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(key, raising=False)
    sharding.maybe_initialize_distributed("10.0.0.5:1234", 2, 0)
    assert calls[-1]["coordinator_bind_address"] == "10.0.0.5:1234"  # not jax's default, every interface
    assert "heartbeat_timeout_seconds" not in calls[-1]  # jax's default
    sharding.maybe_initialize_distributed("10.0.0.5:1234", 2, 0, heartbeat_timeout_s=1)
    assert calls[-1]["heartbeat_timeout_seconds"] == 1
    sharding.maybe_initialize_distributed("10.0.0.5:1234", 2, 0, coordinator_bind_address="[::]:1234")
    assert calls[-1]["coordinator_bind_address"] == "[::]:1234"
    monkeypatch.setenv("DETR_JAX_COORDINATOR_BIND_ADDRESS", "0.0.0.0:1234")
    sharding.maybe_initialize_distributed("10.0.0.5:1234", 2, 1)
    assert calls[-1]["coordinator_bind_address"] == "0.0.0.0:1234"


def test_heartbeat_timeout_flag_takes_one_second_and_refuses_zero():
    """--heartbeat_timeout_s: 1 (its lower bound) is passed on; 0 is refused by the flag parser (test_user_errors
    checks the one line a user sees)."""
    from absl import flags

    from detr_jax.cli import define_multihost_flags

    flag_values = flags.FlagValues()
    values = define_multihost_flags(flag_values)
    flag_values(["train.py", "--heartbeat_timeout_s=1"])
    assert values()["heartbeat_timeout_s"] == 1
    with pytest.raises(flags.IllegalFlagValueError, match="--heartbeat_timeout_s=0"):
        flag_values(["train.py", "--heartbeat_timeout_s=0"])


def test_a_lock_left_by_a_killed_run_is_taken_over_and_said(tmp_path, caplog):
    """A .lock whose run was killed holds that run's line but no lock: the next run takes it and says so; a run that
    ended normally leaves the file empty, so the run after it says nothing."""
    import logging

    from detr_jax.training import workdir as wd

    (tmp_path / ".lock").write_text("pid 12345 on host gone, started 2026-12-01 10:00:00")
    with caplog.at_level(logging.INFO):
        with wd.workdir_lock(str(tmp_path)):
            assert f"pid {os.getpid()}" in (tmp_path / ".lock").read_text()
    assert f"{tmp_path / '.lock'} was left by the run of pid 12345 on host gone, started 2026-12-01 10:00:00, which " \
           "is no longer running: taking it over" in caplog.text
    assert (tmp_path / ".lock").read_text() == ""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        with wd.workdir_lock(str(tmp_path)):
            pass
    assert "was left by" not in caplog.text
