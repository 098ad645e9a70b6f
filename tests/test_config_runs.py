"""Every shipped config starts: its real data path, a couple of train steps and an evaluation, as a user runs it.

Each config runs through `experiments/train.py` with a tiny-model override (the backbone depth and dilation
stay) on the data its source names: TFDS on the built-in COCO-like set (ArrayRecord, coco/2017's features,
prepared once per session), a COCO-format folder (the fine-tuning config, from the official R18 fixture's
checkpoint), or the synthetic shapes. `coco_r50.py:smoke` runs the recipe's full-size augmentation on one and
on two processes (jax.distributed on loopback), whose per-step losses must agree: the two processes read one
global order from the whole TFDS split and agree on every step's bucket without talking to each other.

The runs start together in the background (at most MAX_PARALLEL at once, for memory) when the first test of
this file runs; about 6 minutes on 2 cores.
"""

import json
import os
import threading
import time

import jax
import numpy as np
import pytest

from tests.helpers import REPO, TrainRun

pytest.importorskip("tensorflow_datasets")

CONFIGS = os.path.join(REPO, "experiments", "configs")
MAX_PARALLEL = 3

TINY_MODEL = ("--config.model.hidden_dim=32", "--config.model.num_heads=4", "--config.model.num_encoder_layers=1",
              "--config.model.num_decoder_layers=1", "--config.model.dim_feedforward=64",
              "--config.model.num_queries=8", "--config.model.dropout=0.0")
# One padded shape (one compile of the train and of the eval step); the smoke runs keep the recipe's buckets.
SMALL_IMAGES = ("--config.data.train_scales=(96, 128)", "--config.data.max_size=160",
                "--config.data.crop_resize_scales=(96, 128)", "--config.data.crop_size=(64, 96)",
                "--config.data.eval_size=96", "--config.data.max_buckets=1")
SHORT_RUN = ("--config.num_epochs=0", "--config.num_steps=2", "--config.log_every=1", "--config.eval_every=0",
             "--config.eval_at_end=True", "--config.batch_size=4", "--config.eval_batch_size=4")
# The smoke config as CI runs it: fewer steps and validation images than the documented smoke run.
SMOKE = ("--config.num_steps=3", "--config.log_every=1", "--config.model.dropout=0.0",
         "--config.data.val_kwargs.split=validation[:6]")


def _tfds(coco_like_dir):
    return ("--config.data.source_kwargs.name=coco_like", f"--config.data.source_kwargs.data_dir={coco_like_dir}",
            "--config.data.val_kwargs.split=validation[:8]", "--config.data.num_workers=1")


def _finetune_folder(root, fixtures_dir):
    """A COCO-format folder of the synthetic shapes and the official R18 fixture checkpoint's architecture."""
    from detr_jax.data import SyntheticDetection, write_coco_folder

    (train_ann, train_dir), (val_ann, val_dir) = (
        write_coco_folder(SyntheticDetection(split, num_examples=n, image_size=((96, 128), (128, 96)), seed=0),
                          root, image_format="jpg") for split, n in (("train", 8), ("val", 4)))
    checkpoint = os.path.join(fixtures_dir, "official_detr_r18_tiny", "detr_random.pth")
    return (f"--config.data.source_kwargs.ann_file={train_ann}", f"--config.data.train_kwargs.image_dir={train_dir}",
            f"--config.data.val_kwargs.ann_file={val_ann}", f"--config.data.val_kwargs.image_dir={val_dir}",
            "--config.model.num_classes=5", f"--config.init.detr_checkpoint={checkpoint}",
            # The fixture's architecture (shared/fixtures/README.md).
            "--config.model.backbone_depth=18", "--config.model.hidden_dim=64", "--config.model.num_heads=4",
            "--config.model.dim_feedforward=128", "--config.model.num_encoder_layers=2",
            "--config.model.num_decoder_layers=3", "--config.model.num_queries=12", "--config.model.dropout=0.0",
            "--config.data.num_workers=1")


class _Scheduler:
    """Starts the runs in order, at most MAX_PARALLEL at once, from a background thread."""

    def __init__(self, specs):
        self.specs, self.runs, self.started = specs, {}, {name: threading.Event() for name in specs}
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        for name, make in self.specs.items():
            while not self._stop and sum(any(p.poll() is None for p in r.procs)
                                         for r in self.runs.values()) >= MAX_PARALLEL:
                time.sleep(0.2)
            if self._stop:
                return
            self.runs[name] = make()
            self.started[name].set()

    def get(self, name):
        self.started[name].wait()
        return self.runs[name]

    def stop(self):
        self._stop = True
        self._thread.join()
        for run in self.runs.values():
            run.kill()


def _selected_runs(request):
    """The runs that the selected tests of this module need (all of them in a full run)."""
    names = set()
    for item in request.session.items:
        if item.module is request.module:
            callspec = getattr(item, "callspec", None)
            if callspec:
                names.add(callspec.params["name"])
            elif "two_stages" in item.name:
                names |= {"panoptic_recipe_boxes", "panoptic_recipe_masks"}
            elif "panoptic" in item.name:
                names.add("panoptic_default")
            else:
                names |= {"coco_r50_smoke", "coco_r50_smoke_2proc"}
    return names


def _after(holder, name, make):
    """make(run) once the run `name` of the scheduler in holder["scheduler"] has finished well (for a run that
    starts from another's work directory; list it last, as it holds the scheduler's thread while it waits)."""
    while "scheduler" not in holder:
        time.sleep(0.1)
    return make(holder["scheduler"].get(name).wait_ok())


@pytest.fixture(scope="module")
def config_runs(request, tmp_path_factory, coco_like_dir, coco_panoptic_like_dir, fixtures_dir):
    def workdir(name):
        return tmp_path_factory.mktemp(name)

    holder = {}
    panoptic_recipe = (f"--config.data.source_kwargs.data_dir={coco_panoptic_like_dir}", "--config.num_steps=3",
                       "--config.log_every=1", "--config.model.dropout=0.0", "--config.data.max_buckets=1")

    env = {"TFDS_DATA_DIR": coco_like_dir}
    tfds = _tfds(coco_like_dir)
    smoke = (f"--config.data.source_kwargs.data_dir={coco_like_dir}",) + SMOKE
    specs = {
        # The slowest first.
        "coco_r50_smoke_2proc": lambda: TrainRun(f"{CONFIGS}/coco_r50.py:smoke", workdir("smoke2"), *smoke,
                                                 num_processes=2, env=env),
        "coco_r50_smoke": lambda: TrainRun(f"{CONFIGS}/coco_r50.py:smoke", workdir("smoke1"), *smoke, env=env),
        "coco_r101": lambda: TrainRun(f"{CONFIGS}/coco_r101.py", workdir("r101"), *SHORT_RUN, *TINY_MODEL,
                                      *SMALL_IMAGES, *tfds, env=env),
        "coco_r50_dc5": lambda: TrainRun(f"{CONFIGS}/coco_r50_dc5.py", workdir("dc5"), *SHORT_RUN, *TINY_MODEL,
                                         *SMALL_IMAGES, *tfds, env=env),
        "finetune_coco_folder": lambda: TrainRun(  # the README's CPU-sized variant, at its own image sizes
            f"{CONFIGS}/finetune_coco_folder.py:cpu", workdir("finetune"), *SHORT_RUN, "--config.data.max_buckets=1",
            *_finetune_folder(str(workdir("finetune_data")), fixtures_dir)),
        "default": lambda: TrainRun(f"{CONFIGS}/default.py", workdir("default"), *SHORT_RUN,
                                    "--config.data.val_kwargs.num_examples=8"),
        "panoptic_default": lambda: TrainRun(f"{CONFIGS}/panoptic_default.py", workdir("panoptic"), *SHORT_RUN,
                                             "--config.data.val_kwargs.num_examples=4",
                                             "--config.data.num_workers=1"),
        "panoptic_recipe_boxes": lambda: TrainRun(f"{CONFIGS}/coco_r50_panoptic.py:boxes,smoke", workdir("pboxes"),
                                                  *panoptic_recipe),
        # Last: it starts from the box model's work directory, once that run has finished.
        "panoptic_recipe_masks": lambda: _after(holder, "panoptic_recipe_boxes", lambda boxes: TrainRun(
            f"{CONFIGS}/coco_r50_panoptic.py:smoke", workdir("pmasks"), *panoptic_recipe,
            f"--config.init.detr_checkpoint={boxes.workdir}")),
    }
    selected = _selected_runs(request)
    scheduler = _Scheduler({name: make for name, make in specs.items() if name in selected})
    holder["scheduler"] = scheduler
    yield scheduler
    scheduler.stop()


def _metrics(run):
    with open(os.path.join(run.workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _check_finished(run, steps):
    """The run trained `steps` steps with finite losses, logged the padded fraction, evaluated at the end and
    saved a final checkpoint; returns its {step: losses}."""
    rows = _metrics(run)
    train_rows = {r["step"]: r for r in rows if "loss" in r}
    assert sorted(train_rows) == list(range(1, steps + 1)), run.stderr()[-3000:]
    assert all(np.isfinite(r["loss"]) for r in train_rows.values())
    assert all(0 <= r["padded_fraction"] < 1 for r in train_rows.values())
    final = [r for r in rows if "eval_AP50" in r]
    assert len(final) == 1 and final[0]["step"] == steps and 0 <= final[0]["eval_AP50"] <= 1
    assert str(steps) in os.listdir(os.path.join(run.workdir, "checkpoints"))
    assert os.listdir(os.path.join(run.workdir, "jax_cache")), "no persistent compilation cache written"
    return train_rows


@pytest.mark.parametrize("name", ["coco_r50_dc5", "coco_r101", "finetune_coco_folder", "default"])
def test_config_trains_and_evaluates(config_runs, name):
    run = config_runs.get(name).wait_ok()
    _check_finished(run, 2)
    if name == "default":  # its xla_flags reach XLA (which would abort on a flag it does not know)
        line = [x for x in run.stderr().splitlines() if "(with config.xla_flags)" in x]
        assert len(line) == 1 and "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution" in line[0], \
            run.stderr()[-2000:]


def test_coco_r50_smoke_on_one_and_two_processes(config_runs):
    one = config_runs.get("coco_r50_smoke").wait_ok()
    two = config_runs.get("coco_r50_smoke_2proc").wait_ok()
    rows_one, rows_two = _check_finished(one, 3), _check_finished(two, 3)
    # The recipe's data path: TFDS through worker processes, recipe buckets, size grouping.
    log = one.stderr()
    assert "buckets for the train recipe" in log and "coco_like" in log
    for step in rows_one:
        for key in ("loss", "loss_ce", "loss_bbox", "loss_giou"):
            assert rows_two[step][key] == pytest.approx(rows_one[step][key], rel=1e-4, abs=1e-5), (step, key)
        # The same global batches: the same padding (process 0's half of the batch in the 2-process run).
        assert 0 <= rows_two[step]["padded_fraction"] < 1
    final_one = [r for r in _metrics(one) if "eval_AP" in r][0]
    final_two = [r for r in _metrics(two) if "eval_AP" in r][0]
    for key in ("eval_AP", "eval_AP50"):
        assert final_two[key] == pytest.approx(final_one[key], abs=1e-6)


def test_panoptic_default_trains_evaluates_and_predicts(config_runs):
    """The panoptic config: the mask losses train beside the detector's, the evaluation reports PQ, and the work
    directory alone gives a panoptic `Predictor` (a `DETRsegm` with the synthetic set's thing/stuff classes)."""
    from detr_jax.data.sources.synthetic_panoptic import SyntheticPanoptic
    from detr_jax.inference import Predictor

    run = config_runs.get("panoptic_default").wait_ok()
    rows = _metrics(run)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2], run.stderr()[-3000:]
    assert all(np.isfinite(r[k]) and r[k] > 0 for r in train_rows for k in ("loss_mask", "loss_dice"))
    final = [r for r in rows if "eval_PQ" in r]
    assert len(final) == 1 and all(0 <= final[0][k] <= 1 for k in ("eval_PQ", "eval_SQ", "eval_RQ"))
    predictor = Predictor.from_checkpoint(str(run.workdir), panoptic_threshold=0.0)
    source = SyntheticPanoptic("val", num_examples=1, seed=0)
    assert predictor.has_masks and predictor.is_thing == list(source.is_thing)
    image = source[0]["image"]
    result = predictor.panoptic(image)  # a 2-step model may keep no query: the shapes and the picture, then
    assert result["segment_ids"].shape == image.shape[:2]
    assert {s["id"] for s in result["segments_info"]} >= set(np.unique(result["segment_ids"])) - {0}
    assert predictor.draw(image).size == image.shape[1::-1]

    # experiments/evaluate.py scores the work directory on its own panoptic data: the training's final numbers.
    import subprocess
    import sys

    from tests.helpers import subprocess_env
    out = os.path.join(str(run.workdir), "evaluated")
    scored = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "evaluate.py"),
                             f"--checkpoint={run.workdir}", f"--out={out}"], capture_output=True, text=True,
                            timeout=300, env=subprocess_env(), cwd=REPO)
    assert scored.returncode == 0, scored.stderr[-3000:]
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    for key in ("PQ", "SQ", "RQ", "segm_AP"):
        assert metrics[key] == pytest.approx(final[0][f"eval_{key}"], abs=1e-9), key


def test_coco_r50_panoptic_recipe_in_two_stages(config_runs):
    """coco_r50_panoptic.py as the official README trains it, on TFDS (the COCO-panoptic-like set): the detector on
    the panoptic boxes (`:boxes`, detection AP), then the mask head from that work directory with the detector
    frozen (the mask losses on sampled pixels, PQ at the end): the second run's detector is exactly the first's."""
    from detr_jax.weights.workdir import load_workdir_checkpoint

    boxes = config_runs.get("panoptic_recipe_boxes").wait_ok()
    _check_finished(boxes, 3)
    masks = config_runs.get("panoptic_recipe_masks").wait_ok()
    rows = _metrics(masks)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3], masks.stderr()[-3000:]
    assert all(np.isfinite(r[k]) and r[k] > 0 for r in train_rows for k in ("loss_mask", "loss_dice"))
    final = [r for r in rows if "eval_PQ" in r]
    assert len(final) == 1 and all(0 <= final[0][k] <= 1 for k in ("eval_PQ", "eval_SQ", "eval_RQ"))
    _, detector, detector_variables = load_workdir_checkpoint(str(boxes.workdir))
    _, segm, segm_variables = load_workdir_checkpoint(str(masks.workdir))
    assert type(detector).__name__ == "DETR" and type(segm).__name__ == "DETRsegm"
    for collection in ("params", "frozen"):
        ours = jax.tree_util.tree_leaves_with_path(segm_variables[collection]["detr"])
        theirs = jax.tree_util.tree_leaves_with_path(detector_variables[collection])
        assert [path for path, _ in ours] == [path for path, _ in theirs]
        for (path, a), (_, b) in zip(ours, theirs):
            np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
