"""What a run writes into its work directory, and how it owns it: the lock, metrics.jsonl and TensorBoard, the
progress line, jax's compilation cache, the closing summary."""

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from typing import Dict, Optional

import jax
import ml_collections

logger = logging.getLogger(__name__)


class MetricLogger:
    """metrics.jsonl (one line per logged step), TensorBoard event files, and a one-line progress report."""

    def __init__(self, workdir: str, total_steps: int, enabled: bool):
        self.enabled, self.total_steps = enabled, total_steps
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a") if enabled else None
        self._tb = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:
                logger.warning("tensorboardX is not installed: no TensorBoard summaries (metrics.jsonl still written)")

    def write(self, step: int, metrics: Dict[str, float], progress: Optional[str] = None):
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(dict(step=step, **metrics)) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if progress:
            print(progress, flush=True)

    def close(self):
        if self._jsonl:
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
    """Another live run owns the work directory."""


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Hold <workdir>/.lock (an flock, released by the kernel however the process ends) for the whole run, so that
    a second run started in the same work directory is refused by name instead of writing over the first one's
    checkpoints. Process 0 of a multi-process run holds it for all. Not on object stores (gs://), which have no
    locks."""
    if "://" in workdir or jax.process_index() != 0:
        yield
        return
    path = os.path.join(workdir, ".lock")
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            owner = f.read().strip() or "another process"
            raise WorkdirInUseError(f"{workdir} is in use by the run of {owner}; wait for it, stop it, or use another "
                                    "--workdir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on host {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def final_summary(summary: Dict[str, float], steps: int, seconds: float, workdir: str) -> str:
    """The few lines a person reads at the end of a run; every metric is in metrics.jsonl and TensorBoard."""
    lines = [f"done: {steps} steps in {seconds / 60:.1f} min"
             + (f" ({summary['images_per_sec']:.1f} img/s at the end)" if "images_per_sec" in summary else "")
             + (f", last loss {summary['loss']:.4f}" if "loss" in summary else "")]
    if "eval_PQ" in summary:
        lines.append("eval: " + "  ".join(f"{k[5:]} {summary[k]:.4f}" for k in ("eval_PQ", "eval_SQ", "eval_RQ",
                                                                                 "eval_PQ_th", "eval_PQ_st")
                                           if k in summary))
    if "eval_AP" in summary:
        lines.append("eval: " + "  ".join(f"{k[5:]} {summary[k]:.4f}" for k in ("eval_AP", "eval_AP50", "eval_AP75",
                                                                                 "eval_AR100") if k in summary))
    lines.append(f"outputs: {workdir}/ (metrics.jsonl, tensorboard/, checkpoints/, eval/)")
    return "\n".join(lines)
