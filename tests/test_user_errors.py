"""Bad data as a user meets it through `experiments/train.py`: one line naming the file, a clean exit, no lost
progress (a checkpoint saved before exiting), and `skip_bad_images` as the documented, counted way around."""

import json
import os

import numpy as np
import pytest

from tests.helpers import REPO, TrainRun

TINY_CONFIG = os.path.join(REPO, "tests", "configs", "tiny.py")


def _folder(root, n=48):
    """A COCO folder of n synthetic 64x64 images and a config file training the tiny model on it; returns
    (train.py arguments, image folder)."""
    from detr_jax.data import SyntheticDetection, write_coco_folder

    ann, image_dir = write_coco_folder(SyntheticDetection("train", num_examples=n, image_size=(64, 64),
                                                          max_objects=4, seed=0), str(root))
    config = root / "config.py"
    config.write_text(f"""
import importlib.util
import ml_collections
spec = importlib.util.spec_from_file_location("tiny", {TINY_CONFIG!r})
tiny = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tiny)

def get_config():
    config = tiny.get_config()
    config.data.source = "coco_folder"
    config.data.source_kwargs = ml_collections.ConfigDict(dict(ann_file={ann!r}, image_dir={image_dir!r},
                                                               skip_bad_images=False))
    config.data.train_kwargs = ml_collections.ConfigDict()
    config.data.val_kwargs = ml_collections.ConfigDict()
    return config
""")
    return str(config), image_dir


def _error_lines(text):
    return [line for line in text.splitlines() if line.startswith("E") and "] " in line]


def test_missing_image_fails_before_training_with_one_line(tmp_path):
    config, image_dir = _folder(tmp_path / "data")
    os.remove(os.path.join(image_dir, "000000000005.png"))
    run = TrainRun(config, tmp_path / "run", "--config.num_steps=2")
    assert run.wait() == [1]
    err = run.stderr()
    assert "Traceback" not in err, err[-3000:]
    (line,) = _error_lines(err)
    assert "000000000005.png (image id 5)" in line and "skip_bad_images=True" in line
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "1")  # nothing trained


def test_unreadable_image_mid_run_saves_and_stops_then_skip_bad_images_goes_on(tmp_path):
    config, image_dir = _folder(tmp_path / "data")
    # Exists (the start check passes) but does not decode: met when its batch is made, after some steps.
    with open(os.path.join(image_dir, "000000000030.png"), "r+b") as f:
        f.truncate(20)
    run = TrainRun(config, tmp_path / "run", "--config.num_steps=8")
    assert run.wait() == [1]
    err = run.stderr()
    assert "Traceback" not in err and "Fatal Python error" not in err, err[-3000:]
    (line,) = _error_lines(err)
    assert "could not be made" in line and ".png (image id" in line and "skip_bad_images=True" in line, line
    steps = [json.loads(r)["step"] for r in open(tmp_path / "run" / "metrics.jsonl")]
    assert f"resumes from the checkpoint of step {max(steps, default=0)}" in line, line
    if steps:
        assert str(max(steps)) in os.listdir(tmp_path / "run" / "checkpoints")

    again = TrainRun(config, tmp_path / "run", "--config.num_steps=8",
                     "--config.data.source_kwargs.skip_bad_images=True", name="again").wait_ok()
    assert "skipping bad image" in again.stderr() and "000000000030.png" in again.stderr()
    rows = [json.loads(r) for r in open(tmp_path / "run" / "metrics.jsonl")]
    assert sorted(r["step"] for r in rows)[-1] == 8 and all(np.isfinite(r["loss"]) for r in rows)


def test_work_directory_describes_itself(tmp_path):
    """evaluate.py scores a work directory on its own config's data; predict.py needs only the work directory
    (class names saved at the start of training), names its pictures without collisions, and says plainly when
    --checkpoint is not a checkpoint."""
    import shutil
    import subprocess
    import sys

    from PIL import Image

    from tests.helpers import subprocess_env

    config, _ = _folder(tmp_path / "data", n=8)
    workdir = tmp_path / "run"
    TrainRun(config, workdir, "--config.num_steps=1").wait_ok()
    names = json.load(open(workdir / "class_names.json"))
    assert names["class_names"] == ["rectangle", "ellipse", "triangle", "cross", "diamond"]

    def cli(script, *args):
        return subprocess.run([sys.executable, os.path.join(REPO, "experiments", script), *args], cwd=tmp_path,
                              env=subprocess_env(), capture_output=True, text=True, timeout=300)

    evaluated = cli("evaluate.py", f"--checkpoint={workdir}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "on coco_folder data (the run's config.json)" in evaluated.stderr
    assert "[process=0]" not in evaluated.stderr  # orbax's INFO lines stay quiet
    assert json.load(open(workdir / "metrics.json"))["AP50"] >= 0

    shutil.rmtree(tmp_path / "data")  # the training data is gone: predicting needs only the work directory
    for folder in ("a", "b"):
        os.makedirs(tmp_path / folder)
        Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / folder / "cat.png")
    predicted = cli("predict.py", f"--checkpoint={workdir}", "--out=out", "a/cat.png", "b/cat.png")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert "[process=0]" not in predicted.stderr
    assert sorted(f for f in os.listdir(tmp_path / "out") if f.endswith(".png")) == [
        "cat_2_detections.png", "cat_detections.png"]

    (tmp_path / "notes.txt").write_text("not weights")
    refused = cli("predict.py", "--checkpoint=notes.txt", "a/cat.png")
    assert refused.returncode != 0 and "notes.txt is not a DETR checkpoint" in refused.stderr
    assert "Traceback" not in refused.stderr and "torch" not in refused.stderr


@pytest.mark.parametrize("args,expected", [
    (["--config.foo=1"], "error: --config.foo=1: the config has no field 'foo'"),
    (["--config.model.fo.bar=2"], "error: --config.model.fo.bar=2: the config has no field 'fo'"),
    (["--config=nope.py"], "error: cannot load the config file nope.py: [Errno 2] No such file"),
    (["--config", "nope.py"], "error: cannot load the config file nope.py: [Errno 2] No such file"),
    (["--config.num_steps=abc"], "error: --config.num_steps=abc: the field takes an integer, got 'abc'"),
    (["--config.model.hiden_dim=8"], "error: --config.model.hiden_dim=8: the config has no field 'hiden_dim', did "
                                     "you mean 'hidden_dim'?"),
    (["--config.model.num_classes=-1"], "config.model.num_classes must be > 0, got -1"),
    (["--heartbeat_timeout_s=0"], "error: flag --heartbeat_timeout_s=0: 0 is not a positive integer"),
    (["--config.data.worker_type=fork"], "config.data.worker_type must be one of ('thread', 'process'), got 'fork'"),
    (["--config.optimizer.schedule=linear"], "config.optimizer.schedule must be 'step', 'cosine' or 'constant'"),
    (["--config.model.num_classes=4"], "the training data (synthetic, split train) has labels up to 4 (category id 5) "
                                       "but the model has 4 classes: set config.model.num_classes to at least 5"),
    (["--config.xla_flags=--xla_cpu_foo=1 xla_cpu_bar"], "config.xla_flags must be whitespace-separated "
                                                        "'--name=value' XLA flags, got 'xla_cpu_bar'"),
    (["--config.panoptic.enabled=True"], "config.data.source must be a panoptic source ('synthetic_panoptic', "
                                         "'coco_panoptic' or 'tfds_panoptic') with config.panoptic.enabled, got "
                                         "'synthetic'"),
])
def test_command_line_mistakes_get_one_line(tmp_path, args, expected):
    import subprocess
    import sys

    from tests.helpers import subprocess_env

    result = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "train.py"), *args,
                             f"--workdir={tmp_path / 'run'}"], cwd=tmp_path, env=subprocess_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode in (1, 2), result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.stderr[-2000:]
    assert not os.path.exists(tmp_path / "run")  # a failed start leaves no work directory behind


def test_a_second_run_in_a_busy_work_directory_is_refused(tmp_path):
    import time

    config = os.path.join(REPO, "tests", "configs", "tiny.py")
    first = TrainRun(config, tmp_path, "--config.num_steps=100000", "--config.checkpoint_every=2", name="first")
    try:
        while not os.path.exists(tmp_path / "metrics.jsonl") or not open(tmp_path / "metrics.jsonl").read():
            assert first.procs[0].poll() is None, first.stderr()[-3000:]
            assert time.time() < first.deadline
            time.sleep(0.1)
        second = TrainRun(config, tmp_path, "--config.num_steps=100000", name="second")
        assert second.wait() == [1]
        (line,) = _error_lines(second.stderr())
        assert f"is in use by the run of pid {first.procs[0].pid} on host" in line, second.stderr()[-2000:]
    finally:
        first.kill()  # kill -9: the kernel releases the lock; the next start resumes
    last = max(json.loads(r)["step"] for r in open(tmp_path / "metrics.jsonl") if r.endswith("\n"))
    TrainRun(config, tmp_path, f"--config.num_steps={last + 1}", name="third").wait_ok()


def test_multi_process_launchers_are_detected(monkeypatch):
    import jax

    from detr_jax.ops import sharding

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    for key in ("SLURM_NTASKS", "SLURM_PROCID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "DETR_JAX_COORDINATOR",
                "DETR_JAX_NUM_PROCESSES", "DETR_JAX_PROCESS_ID", "DETR_JAX_MULTIHOST"):
        monkeypatch.delenv(key, raising=False)
    sharding.maybe_initialize_distributed()
    assert calls == [] and sharding.cluster_environment() is None  # one plain process
    for env, name in (({"SLURM_NTASKS": "4", "SLURM_PROCID": "2"}, "SLURM"),
                      ({"OMPI_COMM_WORLD_SIZE": "2"}, "Open MPI"),
                      ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, "TPU pod")):
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            assert sharding.cluster_environment() == name
            calls.clear()
            sharding.maybe_initialize_distributed()  # srun -n 4 python experiments/train.py: one run, not four
            assert calls == [dict(coordinator_address=None, num_processes=None, process_id=None,
                                  coordinator_bind_address=None)]
            calls.clear()
            sharding.maybe_initialize_distributed(multihost=False)
            assert calls == []
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task SLURM job is one process
    monkeypatch.setenv("SLURM_PROCID", "0")
    sharding.maybe_initialize_distributed()
    assert calls == []
    sharding.maybe_initialize_distributed(multihost=True)
    assert len(calls) == 1


def test_fine_tuning_from_a_work_directory_takes_its_architecture(tmp_path):
    """init.detr_checkpoint=<work directory> with a config that asks for another model (the README's fine-tune
    command on a default-run work directory): the model takes the checkpoint's architecture, and the log says what
    the checkpoint holds and what the config asked for, in words, instead of a list of mismatched arrays."""
    first = TrainRun(TINY_CONFIG, tmp_path / "first", "--config.num_steps=1", name="first").wait_ok()
    second = TrainRun(TINY_CONFIG, tmp_path / "second", "--config.num_steps=1", "--config.model.hidden_dim=64",
                      "--config.model.num_queries=10", "--config.model.backbone_depth=34",
                      f"--config.init.detr_checkpoint={first.workdir}", "--config.init.reinit_class_head=True",
                      name="second").wait_ok()
    assert (f"init.detr_checkpoint {first.workdir} holds a ResNet-18 DETR with hidden 32, 6 queries, 1 + 2 layers "
            "and 5 classes; the config asked for a ResNet-34 DETR with hidden 64, 10 queries, 1 + 2 layers and 5 "
            "classes: the model takes the checkpoint's architecture (backbone_depth 34 -> 18, hidden_dim 64 -> 32, "
            "num_queries 10 -> 6)") in " ".join(second.stderr().split()), second.stderr()[-3000:]
    assert second.stdout().startswith(f"setting up the run in {tmp_path / 'second'}")  # at once, before the data
    with open(tmp_path / "second" / "config.json") as f:
        model = json.load(f)["model"]
    assert (model["backbone_depth"], model["hidden_dim"], model["num_queries"]) == (18, 32, 6)
