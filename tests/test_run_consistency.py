"""A run's outputs stay consistent however it ends, and what it cannot do is said in one line at the start
(issue 23): metrics.jsonl after kill -9 and a resume equals an uninterrupted run's; config.json / class_names.json are
written atomically and a full disk is one line naming the file; a batch size the devices cannot split, TFDS not
installed or its data not prepared are refused at the start; the final metrics are printed once."""

import errno
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, subprocess_env

TINY_CONFIG = os.path.join(REPO, "tests", "configs", "tiny.py")
TRAIN_PY = os.path.join(REPO, "experiments", "train.py")


def _checkpoint_steps(workdir):
    path = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def _stderr_lines(text):
    return [line for line in text.splitlines() if line.strip()]


def _error_lines(text):
    return [line for line in text.splitlines() if line.startswith("E") and "] " in line]


def _train_with_patch(tmp_path, patch: str, *args, devices=None, timeout=300):
    """experiments/train.py as a user runs it, with `patch` (Python source) executed first in the process: a fault
    (a full disk, a missing package) injected without touching the machine."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(f"import runpy, sys\n{patch}\nsys.argv = [{TRAIN_PY!r}] + sys.argv[1:]\n"
                        f"runpy.run_path({TRAIN_PY!r}, run_name='__main__')\n")
    return subprocess.run([sys.executable, str(launcher), *args], cwd=tmp_path, env=subprocess_env(devices),
                          capture_output=True, text=True, timeout=timeout)


# ---- 1. metrics.jsonl after kill -9 and a resume ------------------------------------------------------------
def test_metric_logger_drops_the_rows_after_the_resumed_checkpoint(tmp_path, monkeypatch):
    from detr_jax.training import workdir as wd

    path = tmp_path / "metrics.jsonl"
    rows = [dict(step=s, loss=float(s)) for s in range(1, 8)] + [dict(step=4, eval_AP=0.5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "lo')  # cut short by kill -9
    purges = []

    class Writer:
        def __init__(self, logdir, purge_step=None):
            purges.append(purge_step)

        def close(self):
            pass

    monkeypatch.setattr("tensorboardX.SummaryWriter", Writer)
    logger = wd.MetricLogger(str(tmp_path), 10, True, resume_step=4)
    logger.close()
    assert [json.loads(r) for r in path.read_text().splitlines()] == [r for r in rows if r["step"] <= 4]
    assert purges == [5]  # TensorBoard hides the events of steps >= 5 written before the resume
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    wd.MetricLogger(str(tmp_path), 10, True, resume_step=0).close()  # a new run keeps (appends to) the file
    assert purges == [5, None] and len(path.read_text().splitlines()) == 5


# ---- 2. atomic description files, a full disk ----------------------------------------------------------------
def test_atomic_write_leaves_the_old_file_on_a_full_disk(tmp_path, monkeypatch):
    from detr_jax.training.workdir import atomic_write

    path = str(tmp_path / "config.json")
    atomic_write(path, "old")

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError) as e:
        atomic_write(path, "new")
    assert e.value.errno == errno.ENOSPC and e.value.filename == path
    assert open(path).read() == "old" and os.listdir(tmp_path) == ["config.json"]


_FULL_AT_START = """
import errno, os
_replace = os.replace
def _full(src, dst, *a, **k):
    if str(dst).endswith("config.json"):
        raise OSError(errno.ENOSPC, "No space left on device")
    return _replace(src, dst, *a, **k)
os.replace = _full
"""

_FULL_AT_STEP_3 = """
import builtins, errno
_open = builtins.open
class _Filling:
    def __init__(self, f):
        self._f, self._rows = f, 0
    def write(self, text):
        self._rows += 1
        if self._rows == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._f.write(text)
    def __getattr__(self, name):
        return getattr(self._f, name)
def _patched(file, mode="r", *a, **k):
    f = _open(file, mode, *a, **k)
    return _Filling(f) if str(file).endswith("metrics.jsonl") and "a" in mode else f
builtins.open = _patched
"""


def test_a_full_disk_at_the_start_is_one_line_naming_the_file(tmp_path):
    workdir = tmp_path / "run"
    result = _train_with_patch(tmp_path, _FULL_AT_START, "--config", TINY_CONFIG, f"--workdir={workdir}",
                               "--config.num_steps=2")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = _error_lines(result.stderr)
    assert f"no space left on device writing {workdir}/config.json: the run stopped; no checkpoint" in line, line
    assert not os.path.exists(workdir / "config.json")
    assert not [f for f in os.listdir(workdir) if ".tmp" in f]


def test_a_full_disk_mid_run_is_one_line_and_the_last_checkpoint_stands(tmp_path):
    workdir = tmp_path / "run"
    result = _train_with_patch(tmp_path, _FULL_AT_STEP_3, "--config", TINY_CONFIG, f"--workdir={workdir}",
                               "--config.num_steps=6", "--config.log_every=1", "--config.checkpoint_every=2")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = _error_lines(result.stderr)
    assert (f"no space left on device writing {workdir}/metrics.jsonl: the run stopped; the last checkpoint (step 2 "
            f"in {workdir}/checkpoints) stands") in line, line
    assert _checkpoint_steps(workdir) == [2]


# ---- 3. a batch the devices cannot split -----------------------------------------------------------------------
@pytest.mark.parametrize("args,field", [
    (["--config.batch_size=3"], "batch_size=3"),
    (["--config.eval_batch_size=3", "--config.eval_at_end=True"], "eval_batch_size=3"),
])
def test_a_batch_size_the_devices_cannot_split_is_refused_at_the_start(tmp_path, args, field):
    result = subprocess.run([sys.executable, TRAIN_PY, "--config", TINY_CONFIG, f"--workdir={tmp_path / 'run'}",
                             *args], cwd=tmp_path, env=subprocess_env(2), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    (line,) = _stderr_lines(result.stderr)
    assert f"config.{field} must be a multiple of the 2 devices" in line, result.stderr[-3000:]
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_eval_batch_size_is_checked_only_when_the_run_evaluates():
    import ml_collections

    from detr_jax.training.loop import check_batch_sizes

    config = ml_collections.ConfigDict(dict(batch_size=4, eval_batch_size=3, eval_every=0, eval_at_end=False,
                                            grad_accum_steps=1))
    check_batch_sizes(config, 2)
    config.eval_every = 10
    with pytest.raises(ValueError, match=r"config.eval_batch_size=3 must be a multiple of the 2 devices"):
        check_batch_sizes(config, 2)


def test_a_batch_must_split_over_the_devices_and_the_micro_batches():
    import ml_collections

    from detr_jax.training.loop import check_batch_sizes

    config = ml_collections.ConfigDict(dict(batch_size=8, eval_batch_size=8, eval_every=0, eval_at_end=False,
                                            grad_accum_steps=4))
    check_batch_sizes(config, 2)  # exactly 2 devices x 4 micro-batches of one image
    with pytest.raises(ValueError, match=r"config.batch_size=8 must be a multiple of the 4 devices x "
                                         r"grad_accum_steps=4 .*--config.batch_size=16"):
        check_batch_sizes(config, 4)


# ---- 5. TFDS not installed, TFDS data not prepared ----------------------------------------------------------
def test_tfds_data_not_prepared_is_refused_without_downloading(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from detr_jax.data import build_source
    from detr_jax.data.sources.tfds_coco import DatasetNotPreparedError

    with pytest.raises(DatasetNotPreparedError) as e:
        build_source("tfds", name="coco/2017", data_dir=str(tmp_path), split="validation")
    message = str(e.value)
    assert "\n" not in message and f"not prepared in {tmp_path}" in message and "download_and_prepare" in message
    assert os.listdir(tmp_path) == []  # nothing downloaded
    with pytest.raises(DatasetNotPreparedError, match="no_such_set is not prepared"):
        build_source("tfds", name="no_such_set", data_dir=str(tmp_path), split="train")


def test_tfds_without_tensorflow_names_the_install(monkeypatch):
    from detr_jax.data import build_source
    from detr_jax.data.sources.tfds_coco import MissingPackageError

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # `import tensorflow_datasets` raises ImportError
    for source in ("tfds", "tfds_panoptic"):
        with pytest.raises(MissingPackageError, match=r'pip install -e "\.\[tfds\]"'):
            build_source(source, split="train")


def test_coco_r50_without_prepared_data_is_one_line(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    empty = tmp_path / "tfds"
    empty.mkdir()
    result = subprocess.run([sys.executable, TRAIN_PY, "--config", os.path.join(REPO, "experiments", "configs",
                                                                                  "coco_r50.py"),
                             f"--workdir={tmp_path / 'run'}", f"--config.data.source_kwargs.data_dir={empty}"],
                            cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = _error_lines(result.stderr)  # (tensorflow's import adds its own I/W lines)
    assert f"the TFDS dataset coco/2017 is not prepared in {empty}" in line and "README" in line, line
    assert os.listdir(empty) == []  # nothing downloaded


def test_coco_r50_without_tensorflow_is_one_line(tmp_path):
    result = _train_with_patch(tmp_path, "sys.modules['tensorflow_datasets'] = None",
                               "--config", os.path.join(REPO, "experiments", "configs", "coco_r50.py"),
                               f"--workdir={tmp_path / 'run'}")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = _stderr_lines(result.stderr)
    assert 'pip install -e ".[tfds]"' in line, line


def test_the_final_summary_prints_each_metric_once():
    """The last progress line has the losses and speed; the summary adds the final evaluation, each value once."""
    from detr_jax.training.workdir import final_summary

    text = final_summary({"loss": 1.2345, "images_per_sec": 30.0, "eval_AP50": 0.5851, "eval_AP": 0.2242}, 2500,
                         700.0, "W")
    assert text.count("0.5851") == 1 and text.count("AP50") == 1 and "1.2345" not in text, text
