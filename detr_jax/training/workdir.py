"""What a run writes into its work directory, and how it owns it: the lock, metrics.jsonl and TensorBoard, the
progress line, jax's compilation cache, the closing summary."""

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from typing import Dict, Optional

import jax
import ml_collections
import numpy as np

from detr_jax.ops.files import atomic_write

logger = logging.getLogger(__name__)


def drop_rows_after(path: str, step: int) -> int:
    """Keep the rows of metrics.jsonl `path` up to `step` (the checkpoint a run resumes from), so that the resumed
    run's rows replace those an interrupted run logged after its last checkpoint; a row cut short by a crash goes
    too. Rewritten atomically; returns the number of rows dropped."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.read().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if line.endswith("\n") and json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    if len(kept) != len(lines):
        atomic_write(path, "".join(kept))
    return len(lines) - len(kept)


class MetricLogger:
    """metrics.jsonl (one line per logged step), TensorBoard event files, and a one-line progress report.

    `resume_step`: the step of the checkpoint the run resumed from (0: a new run). The rows and TensorBoard events
    an interrupted run wrote after it are dropped (tensorboardX's purge_step), so that a resumed run's metrics equal
    an uninterrupted run's."""

    def __init__(self, workdir: str, total_steps: int, enabled: bool, resume_step: int = 0):
        self.enabled, self.total_steps = enabled, total_steps
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._jsonl = self._tb = None
        if not enabled:
            return
        if resume_step:
            dropped = drop_rows_after(self.path, resume_step)
            if dropped:
                logger.info("dropped %d rows of metrics.jsonl logged after the checkpoint of step %d (the run "
                            "logs them again)", dropped, resume_step)
        try:
            self._jsonl = open(self.path, "a")
        except OSError as e:
            raise OSError(e.errno, e.strerror, self.path) from e
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            logger.warning("tensorboardX is not installed: no TensorBoard summaries (metrics.jsonl still written)")
            return
        # purge_step: TensorBoard hides the events of steps >= it written before this writer (an interrupted run's).
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                 purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, metrics: Dict[str, float], progress: Optional[str] = None):
        if not self.enabled:
            return
        try:
            self._jsonl.write(json.dumps(dict(step=step, **metrics)) + "\n")
            self._jsonl.flush()
        except OSError as e:  # a full disk: name the file (a write's OSError names none)
            raise OSError(e.errno, e.strerror, self.path) from e
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if progress:
            print(progress, flush=True)

    def close(self):
        if self._jsonl:
            with contextlib.suppress(OSError):  # a full disk was reported where it happened
                self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def progress_line(step, total, metrics, elapsed, start_step) -> str:
    """The one-line progress report: a bar, the losses, images/s and the time left at this rate."""
    done = step - start_step
    eta = elapsed / max(done, 1) * (total - step)
    width = 20
    bar = "#" * int(width * step / total) + "-" * (width - int(width * step / total))
    return (f"[{bar}] step {step}/{total} loss {metrics['loss']:.4f} (ce {metrics['loss_ce']:.3f} "
            f"l1 {metrics['loss_bbox']:.3f} giou {metrics['loss_giou']:.3f}) {metrics['images_per_sec']:.1f} img/s "
            f"ETA {int(eta // 60)}m{int(eta % 60):02d}s")


def enable_compilation_cache(config: ml_collections.ConfigDict, workdir: str) -> Optional[str]:
    """JAX's persistent compilation cache, so that a restarted run (preemption) does not compile its step shapes
    again: `config.compilation_cache_dir`, "" for <workdir>/jax_cache, "none" for off. A cache directory the
    user set for jax (JAX_COMPILATION_CACHE_DIR) wins. Returns the directory in use (None: off).

    All processes share it: jax writes entries from process 0 only and every process reads them. Programs with a
    host callback are never written (jax's rule): the train step is cached only with the device matcher
    (`config.loss.matcher`).
    """
    user = jax.config.jax_compilation_cache_dir
    if user:
        return user
    path = config.compilation_cache_dir
    if path == "none":
        return None
    path = path or os.path.join(workdir, "jax_cache")
    jax.config.update("jax_compilation_cache_dir", path)
    return path


class WorkdirInUseError(ValueError):
    """Another live run owns the work directory, or its file system cannot lock it."""


LOCK_MESSAGE_BYTES = 1024  # process 0's refusal, as every process of a multi-process run learns it


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Hold <workdir>/.lock (an flock, released by the kernel however the process ends) for the whole run, so that
    a second run started in the same work directory is refused by name instead of writing over the first one's
    checkpoints. Process 0 of a multi-process run holds it for all, and every process learns its answer before
    any other collective (none is left waiting for a process that stopped). A file system without locks is
    refused as such (DETR_JAX_NO_WORKDIR_LOCK=1 runs without the lock). Not on object stores (gs://), which
    have no locks."""
    if "://" in workdir:
        yield
        return
    with contextlib.ExitStack() as stack:
        refusal = _take_lock(stack, workdir) if jax.process_index() == 0 else ""
        if jax.process_count() > 1:
            refusal = _from_process_zero(refusal)
        if refusal:
            raise WorkdirInUseError(refusal)
        yield


def _take_lock(stack: contextlib.ExitStack, workdir: str) -> str:
    """Lock <workdir>/.lock for the life of `stack`; "" when held, else the line that refuses the run."""
    path = os.path.join(workdir, ".lock")
    f = stack.enter_context(open(path, "a+"))
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            f.seek(0)
            owner = f.read().strip() or "another process"
            return f"{workdir} is in use by the run of {owner}; wait for it, stop it, or use another --workdir"
        if os.environ.get("DETR_JAX_NO_WORKDIR_LOCK", "") not in ("", "0"):
            logging.warning("running without the work directory lock (%s: %s)", path, os.strerror(e.errno))
            return ""
        return (f"the file system of {workdir} does not support file locks ({os.strerror(e.errno)} locking {path}); "
                "use a work directory on a local or lock-capable file system, or set DETR_JAX_NO_WORKDIR_LOCK=1 "
                "to run without the lock (nothing then stops a second run in the same --workdir)")
    f.seek(0)
    stale = f.read().strip()
    if stale:  # a lock file nobody holds: its run ended without releasing it (killed); it never blocks
        logging.info("%s was left by the run of %s, which is no longer running: taking it over", path, stale)
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on host {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
    f.flush()

    def release():  # a run that ends leaves an empty lock file; a killed one leaves its line (said on the next start)
        f.seek(0)
        f.truncate()
        f.flush()
        fcntl.flock(f, fcntl.LOCK_UN)

    stack.callback(release)
    return ""


def _from_process_zero(refusal: str) -> str:
    """Process 0's `refusal` ("" for none) on every process (a broadcast all of them join)."""
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    data = np.zeros(LOCK_MESSAGE_BYTES, np.uint8)
    encoded = refusal.encode()[:LOCK_MESSAGE_BYTES]
    data[:len(encoded)] = np.frombuffer(encoded, np.uint8)
    shared = np.asarray(multihost_utils.broadcast_one_to_all(data))
    text = bytes(shared[shared != 0]).decode(errors="replace")
    if text and jax.process_index() != 0:
        text = f"process 0 refused the run: {text}"
    return text


def final_summary(summary: Dict[str, float], steps: int, seconds: float, workdir: str) -> str:
    """The few lines a person reads at the end of a run, after the last progress line (which has the last losses
    and speed, not repeated here); every metric is in metrics.jsonl and TensorBoard."""
    lines = [f"done: {steps} steps in {seconds / 60:.1f} min"]
    first = ("eval_PQ", "eval_SQ", "eval_RQ", "eval_PQ_th", "eval_PQ_st", "eval_AP", "eval_AP50", "eval_AP75",
             "eval_AR100")
    evaluated = [k for k in first if k in summary] + sorted(k for k in summary if k.startswith("eval_")
                                                            and k not in first)
    if evaluated:  # the final evaluation, printed here only
        lines.append("eval: " + "  ".join(f"{k[5:]} {summary[k]:.4f}" for k in evaluated))
    lines.append(f"outputs: {workdir}/ (metrics.jsonl, tensorboard/, checkpoints/, eval/)")
    return "\n".join(lines)


def remove_if_only_scaffolding(workdir: str) -> None:
    """A run that this start created and that failed before writing anything of its own (only the lock file and
    the compilation cache): remove the folder rather than leave a work directory with no run in it."""
    if set(os.listdir(workdir)) <= {".lock", "jax_cache"}:
        shutil.rmtree(workdir, ignore_errors=True)


def disk_full(error: BaseException):
    """The OSError ENOSPC that caused `error` (itself, or in its chain: orbax wraps its own), else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return error
        error = error.__cause__ or error.__context__
    return None


def disk_full_message(error: OSError, workdir: str) -> str:
    checkpoints = os.path.join(workdir, "checkpoints")
    if "://" in workdir:  # an object store: orbax's own listing would be another request that may fail as well
        return (f"no space left writing {error.filename or 'into ' + workdir}: the run stopped; the last checkpoint "
                f"in {checkpoints} stands and the run resumes from it when started again with free space")
    steps = sorted(int(d) for d in os.listdir(checkpoints) if d.isdigit()) if os.path.isdir(checkpoints) else []
    stands = (f"the last checkpoint (step {steps[-1]} in {os.path.abspath(checkpoints)}) stands and the run resumes "
              "from it" if steps else "no checkpoint was saved yet, so the run starts over")
    return (f"no space left on device writing {error.filename or 'into ' + workdir}: the run stopped; {stands} when "
            "started again with free space")
