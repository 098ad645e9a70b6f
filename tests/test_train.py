"""The trainer: data-parallel equivalence, multi-process, bit-exact resume, config checks, parameter groups.

The in-process tests drive the jitted step of `detr_jax.training.loop` on a fixed batch. The end-to-end tests run
`experiments/train.py --config tests/configs/tiny.py` in subprocesses (the device count and jax.distributed
are fixed per process) and compare their per-step losses from metrics.jsonl with one uninterrupted
single-device run of the same config, the reference. About 6 CPU-minutes; the runs overlap, so on 2 cores
shared with other jobs the file took 6 minutes.
"""

import copy
import importlib.util
import json
import os
import shutil
import time

import flax
import jax
import numpy as np
import pytest

from detr_jax import training
from detr_jax.data import build_data
from detr_jax.data.transforms import normalize_images
from detr_jax.models import build_training_model
from detr_jax.ops import sharding
from detr_jax.training.checkpoints import checkpoint_manager
from detr_jax.training.state import build_optimizer, create_train_state, training_parameter_groups
from detr_jax.weights.workdir import detector_variables
from tests.helpers import TrainRun, metrics_rows, workdir_layout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, "tests", "configs", "tiny.py")
REFERENCE_STEPS = 10


# ---- helpers -----------------------------------------------------------------------------------------------
def _tiny_config():
    spec = importlib.util.spec_from_file_location("tiny_config", TINY_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _Run(workdir, num_steps, *overrides, **kwargs):  # pylint: disable=invalid-name
    """The tiny config for `num_steps` steps, logging every step (see `tests.helpers.TrainRun`)."""
    return TrainRun(TINY_CONFIG, workdir, f"--config.num_steps={num_steps}", "--config.log_every=1", *overrides,
                    **kwargs)


def _metrics(workdir):
    """{step: metrics} from metrics.jsonl; a step logged twice (before and after a resume) keeps its last line."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            out[record.pop("step")] = record
    return out


def _logged_steps(workdir):
    """Steps in the metrics.jsonl of a running process."""
    return [row["step"] for row in metrics_rows(workdir)]


def _max_loss_difference(metrics, reference, steps):
    assert sorted(metrics) == list(steps), f"logged steps {sorted(metrics)}, expected {list(steps)}"
    return max(abs(metrics[s][k] - reference[s][k]) for s in steps for k in reference[s] if k.startswith("loss"))


def _checkpoint_steps(workdir):
    """Committed checkpoints: orbax writes into a temporary folder and renames it to the step on commit."""
    path = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


EMA_STEPS = 3
EMA_RUN = ("--config.ema.decay=0.5", "--config.eval_at_end=True")


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module", autouse=True)
def runs(request, tmp_path_factory, compile_cache):
    """The reference, 8-device and two-process runs (and the EMA run), started in the background before the first
    test of this file, each only when a selected test needs it: they are independent of each other and of the
    in-process tests, and much of a run (start-up, compilation) is single-threaded, so two cores finish everything
    sooner side by side."""
    needed = {name for item in request.session.items if item.module is request.module for name in item.fixturenames}
    started = {}
    if "reference" in needed:
        started = {"reference": _Run(tmp_path_factory.mktemp("reference"), REFERENCE_STEPS, cache_dir=compile_cache),
                   "eight_devices": _Run(tmp_path_factory.mktemp("eight_devices"), 4, devices=8),
                   "two_processes": _Run(tmp_path_factory.mktemp("two_processes"), 4, devices=2, num_processes=2)}
    if "ema_run" in needed:
        started["ema"] = _Run(tmp_path_factory.mktemp("ema"), EMA_STEPS, *EMA_RUN, name="ema")
    yield started
    for run in started.values():
        run.kill()


@pytest.fixture(scope="module")
def ema_run(runs):
    """A run with config.ema and a final evaluation, finished."""
    return runs["ema"].wait_ok()


@pytest.fixture(scope="module")
def reference(runs):
    """One uninterrupted single-device run of REFERENCE_STEPS steps: (workdir, {step: metrics})."""
    workdir = runs["reference"].wait_ok().workdir
    metrics = _metrics(workdir)
    assert sorted(metrics) == list(range(1, REFERENCE_STEPS + 1))
    assert all(np.isfinite(m["loss"]) for m in metrics.values())
    return workdir, metrics


# ---- in process: the step on a fixed batch -----------------------------------------------------------------
LR, LR_BACKBONE = 2e-3, 2e-4


class _Unit:
    """A jitted train step of the tiny model with a constant schedule, no weight decay and no clipping (so
    that the first Adam step moves every parameter by its group's learning rate), and a fixed batch."""

    def __init__(self):
        config = _tiny_config()
        batch_size = max(4, jax.device_count())
        config.batch_size = batch_size
        config.data.train_kwargs.num_examples = batch_size
        config.optimizer.update(schedule="constant", lr=LR, lr_backbone=LR_BACKBONE, weight_decay=0.0,
                                grad_clip=0.0, warmup_steps=0)
        self.config = config
        self.mesh = sharding.make_mesh()
        loader = build_data(config, "train", train=False)  # no augmentation: the same images every step
        with loader:
            self.local_batch = next(iter(loader))
        self.batch = sharding.global_batch(self.local_batch, self.mesh)
        # The model's input: the loader ships uint8, the step normalises (float batches pass as normalised).
        self.images = np.asarray(normalize_images(self.local_batch["images"], self.local_batch["pixel_mask"]))
        self.model = model = build_training_model(config)
        state, self.tx, _ = create_train_state(config, model, total_steps=1000, steps_per_epoch=1)
        self.labels = flax.traverse_util.flatten_dict(training_parameter_groups(state["params"]))
        self.initial = jax.device_get(state)
        self.step = training.make_train_step(model, self.tx, config, self.mesh)

    def fresh_state(self):
        # The step donates its input state: every test starts from its own copy.
        return jax.device_put(self.initial, sharding.replicated(self.mesh))


@pytest.fixture(scope="module")
def unit():
    return _Unit()


def _flat(tree):
    return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items()}


def _official_group(path):
    """The official recipe: the backbone trains only layer2-4 (at lr_backbone), everything else at lr."""
    assert path[0] == "model"  # the detector's parameters (no training aid in the tiny config)
    if path[1] != "backbone":
        return "transformer"
    return "backbone" if any(f"layer{i}" in "/".join(path) for i in (2, 3, 4)) else "frozen"


def test_frozen_parameters_stay_and_groups_move_at_their_learning_rates(unit):
    assert unit.labels == {path: _official_group(path) for path in unit.labels}
    assert {"frozen", "backbone", "transformer"} == set(unit.labels.values())
    # The optimizer alone (the model also stops the gradient at stage 1): the first Adam step of a gradient
    # of ones is -lr (to float32 rounding of the bias corrections) in each trained group, 0 in the frozen one.
    params = unit.initial["params"]
    ones = jax.tree_util.tree_map(np.ones_like, params)
    updates, _ = jax.jit(unit.tx.update)(ones, unit.tx.init(params), params)
    expected = {"frozen": 0.0, "backbone": -LR_BACKBONE, "transformer": -LR}
    for k, update in _flat(updates).items():
        np.testing.assert_allclose(update, expected[unit.labels[k]], rtol=1e-4, atol=0, err_msg="/".join(k))

    before = _flat(unit.initial["params"])
    state, _ = unit.step(unit.fresh_state(), unit.batch)
    after = _flat(jax.device_get(state["params"]))
    moves = {k: np.abs(after[k] - before[k]).ravel() for k in before}
    assert all((moves[k] == 0).all() for k in moves if unit.labels[k] == "frozen"), "a frozen parameter moved"
    assert all(moves[k].max() > 0 for k in moves if unit.labels[k] == "backbone"), "a layer2-4 parameter stayed"
    for group, lr in (("backbone", LR_BACKBONE), ("transformer", LR)):
        # The first Adam step is lr * g / (|g| + eps): lr where the gradient is not ~0, 0 where it is 0 (dead
        # ReLUs; the first decoder layer's self-attention, whose input is zero, as in the official model).
        ratio = np.concatenate([moves[k] for k in moves if unit.labels[k] == group]) / lr
        moved = ratio[ratio > 0]
        assert moved.size > 0.5 * ratio.size, f"{group}: only {moved.size} of {ratio.size} parameters moved"
        assert ratio.max() < 1.01, f"{group}: a parameter moved by {ratio.max():.3f} x its learning rate"
        assert np.mean(np.abs(moved - 1) < 0.01) > 0.99, f"{group}: median move {np.median(moved):.3f} x its lr"

    for _ in range(2):
        state, _ = unit.step(state, unit.batch)
    after = _flat(jax.device_get(state["params"]))
    for k in before:
        if unit.labels[k] == "frozen":
            np.testing.assert_array_equal(after[k], before[k], err_msg="/".join(k))
    frozen_before, frozen_after = _flat(unit.initial["frozen"]), _flat(jax.device_get(state["frozen"]))
    assert frozen_before.keys() == frozen_after.keys() and frozen_before  # the batch-norm statistics
    for k in frozen_before:
        np.testing.assert_array_equal(frozen_after[k], frozen_before[k], err_msg="/".join(k))


def test_nonfinite_step_keeps_the_parameters_and_stops_the_loop(unit, tmp_path):
    state, metrics = unit.step(unit.fresh_state(), unit.batch)  # step 1: fine
    assert np.isfinite(metrics["loss"])
    good = jax.device_get(state)
    poisoned = dict(unit.local_batch, images=unit.images.copy())
    poisoned["images"][1] = np.nan
    state, metrics = unit.step(state, sharding.global_batch(poisoned, unit.mesh))  # step 2: NaN
    assert not np.isfinite(metrics["loss"])
    after = jax.device_get(state)
    jax.tree_util.tree_map(np.testing.assert_array_equal, after["params"], good["params"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, after["opt_state"], good["opt_state"])
    state, _ = unit.step(state, unit.batch)  # step 3: fine again, but the first bad step is remembered
    assert int(state["step"]) == 3 and int(state["nonfinite_step"]) == 1

    manager = checkpoint_manager(str(tmp_path), unit.config)
    with pytest.raises(training.NonFiniteLossError, match="at step 2"):
        training.check_finite(state, manager)
    manager.close()


def test_overfits_a_fixed_batch_to_ap50_above_0_9(unit):
    """The whole training path learns: the tiny model overfits its 4 fixed images (loss down ~30x, and COCO
    AP50 = 1.0 on those images after 150 steps at the time of writing, through the evaluation post-processing
    and pycocotools). A broken loss, matcher, update or post-processing stalls far below."""
    from detr_jax.data import build_source
    from detr_jax.evaluation.coco import coco_ground_truth, coco_metrics, to_coco_results
    from detr_jax.evaluation.postprocess import postprocess

    state = unit.fresh_state()
    losses = []
    for _ in range(160):
        state, metrics = unit.step(state, unit.batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all()
    print(f"overfitting {unit.config.batch_size} images: loss {losses[0]:.3f} -> {min(losses[-5:]):.3f}")
    assert losses[0] / min(losses[-5:]) > 5

    config, batch = unit.config, unit.local_batch
    out = jax.jit(unit.model.model.apply)(detector_variables(state["params"], state["frozen"]), unit.images,
                                          pixel_mask=batch["pixel_mask"])
    scores, labels, boxes = (np.asarray(x) for x in postprocess(out["pred_logits"], out["pred_boxes"],
                                                                  batch["orig_size"]))
    source = build_source(config.data.source, **dict(config.data.source_kwargs.to_dict(),
                                                     **config.data.train_kwargs.to_dict()))
    classes = list(range(config.model.num_classes))
    ground_truth = coco_ground_truth(source, classes, [str(c) for c in classes])
    assert len(ground_truth["images"]) == len(batch["image_id"])  # exactly the images trained on
    metrics = coco_metrics(ground_truth, to_coco_results(batch["image_id"], scores, labels, boxes, classes))
    print(f"AP50 on the trained images: {metrics['AP50']:.3f} (AP {metrics['AP']:.3f})")
    assert metrics["AP50"] >= 0.9


# ---- the parameters' EMA (config.ema) -------------------------------------------------------------------------
def _ema_config(unit, decay=0.9, warmup_steps=2):
    config = copy.deepcopy(unit.config)
    config.ema.update(decay=decay, warmup_steps=warmup_steps)
    return config


def _ema_step(config, unit):
    """The EMA config's step and its state at the unit's initial parameters (the EMA starting there)."""
    step, state = _step_for(config, unit)
    ema = {"params": unit.initial["params"], "frozen": unit.initial["frozen"]}
    return step, dict(state, ema=jax.device_put(ema, sharding.replicated(unit.mesh)))


def test_the_ema_follows_its_recurrence_and_changes_no_training_step(unit):
    """3 steps with config.ema (decay 0.9, warm-up 2): the parameters and metrics are bit for bit the run's without
    EMA, and the EMA is e_n = d_n e_(n-1) + (1 - d_n) p_n with d_n = 0.9 (1 - exp(-n / 2)), from e_0 = p_0."""
    from detr_jax.training.state import ema_decay

    config = _ema_config(unit)
    step, state = _ema_step(config, unit)
    plain = unit.fresh_state()
    expected = {k: v.astype(np.float64) for k, v in _flat(unit.initial["params"]).items()}
    for n in range(1, 4):
        state, metrics = step(state, unit.batch)
        plain, plain_metrics = unit.step(plain, unit.batch)
        params = _flat(jax.device_get(state["params"]))
        for k, v in _flat(jax.device_get(plain["params"])).items():
            np.testing.assert_array_equal(params[k], v, err_msg=str(k))
        assert {k: float(v) for k, v in jax.device_get(metrics).items()} == \
            {k: float(v) for k, v in jax.device_get(plain_metrics).items()}
        d = 0.9 * (1.0 - np.exp(-n / 2))
        expected = {k: d * expected[k] + (1 - d) * params[k] for k in params}
        ema = _flat(jax.device_get(state["ema"]["params"]))
        for k in params:
            np.testing.assert_allclose(ema[k], expected[k], rtol=1e-6, atol=1e-7, err_msg=f"step {n} {k}")
    assert float(ema_decay(config, np.int32(2))) == pytest.approx(0.9 * (1 - np.exp(-1.0)), rel=1e-6)  # n = warm-up
    assert float(ema_decay(_ema_config(unit, warmup_steps=0), np.int32(1))) == pytest.approx(0.9, rel=1e-7)


def test_a_checkpoint_resumes_the_ema_exactly_and_the_ema_may_be_turned_on_or_off(unit, tmp_path):
    """Save after 2 EMA steps, then step 3 straight on and from the restored checkpoint: bit-identical parameters
    and EMA. The same checkpoint restored without config.ema drops the EMA; a checkpoint without one, restored with
    config.ema, starts the EMA at its parameters."""
    from detr_jax.training.checkpoints import restore_checkpoint, save_checkpoint

    class _Loader:  # the checkpoint's loader position: none, in-process
        @staticmethod
        def get_state():
            return {}

    config = _ema_config(unit)
    step, state = _ema_step(config, unit)
    for _ in range(2):
        state, _ = step(state, unit.batch)
    manager = checkpoint_manager(str(tmp_path / "ema"), config)
    save_checkpoint(manager, 2, state, _Loader(), config, force=True)
    manager.wait_until_finished()
    straight, _ = step(state, unit.batch)
    _, template = _ema_step(config, unit)
    restored, meta, at = restore_checkpoint(manager, template, config, unit.mesh)
    assert (at, meta["ema"]) == (2, True)
    resumed, _ = step(restored, unit.batch)
    for part in ("params", "ema"):
        for k, v in _flat(jax.device_get(straight[part])).items():
            np.testing.assert_array_equal(_flat(jax.device_get(resumed[part]))[k], v, err_msg=f"{part} {k}")

    off, _, _ = restore_checkpoint(manager, unit.fresh_state(), unit.config, unit.mesh)
    assert "ema" not in off
    manager.close()

    manager = checkpoint_manager(str(tmp_path / "plain"), unit.config)
    plain, _ = unit.step(unit.fresh_state(), unit.batch)
    save_checkpoint(manager, 1, plain, _Loader(), unit.config, force=True)
    manager.wait_until_finished()
    _, template = _ema_step(config, unit)
    on, meta, _ = restore_checkpoint(manager, template, config, unit.mesh)
    manager.close()
    assert meta["ema"] is False
    for part in ("params", "frozen"):
        for k, v in _flat(jax.device_get(on[part])).items():
            np.testing.assert_array_equal(_flat(jax.device_get(on["ema"][part]))[k], v, err_msg=f"{part} {k}")


def test_a_run_with_ema_evaluates_both_weights_and_its_work_directory_gives_the_ema(ema_run):
    """A run with config.ema logs the EMA's evaluation as the main metrics and the trained parameters' as eval_raw_*
    (results in eval/ and eval/raw/); reading its work directory (evaluate, predict, export, fine-tuning) gives the
    EMA, and the trained parameters with raw_weights, as `evaluate.py --raw_weights` scores them."""
    import subprocess
    import sys

    import orbax.checkpoint as ocp

    from detr_jax.export import load_for_export
    from detr_jax.inference import Predictor
    from detr_jax.weights.workdir import load_workdir_checkpoint
    from tests.helpers import subprocess_env

    workdir = ema_run.workdir
    final = _metrics(workdir)[EMA_STEPS]
    assert {"eval_AP", "eval_AP50", "eval_raw_AP", "eval_raw_AP50"} <= set(final), sorted(final)
    ema_results = os.path.join(workdir, "eval", f"results_step{EMA_STEPS}.json")
    raw_results = os.path.join(workdir, "eval", "raw", f"results_step{EMA_STEPS}.json")
    with open(ema_results) as f, open(raw_results) as g:
        ema_scores, raw_scores = [r["score"] for r in json.load(f)], [r["score"] for r in json.load(g)]
    assert len(ema_scores) == len(raw_scores) and not np.allclose(ema_scores, raw_scores)

    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    saved = manager.restore(EMA_STEPS, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    manager.close()
    ema, raw = _flat(saved["ema"]["params"]["model"]), _flat(saved["params"]["model"])
    assert any(not np.array_equal(ema[k], raw[k]) for k in raw)

    def same(variables, expected):
        got = _flat(variables["params"])
        assert set(got) == set(expected)
        for k, v in expected.items():
            np.testing.assert_array_equal(np.asarray(got[k]), v, err_msg=str(k))

    same(load_workdir_checkpoint(workdir)[2], ema)
    same(load_workdir_checkpoint(workdir, raw_weights=True)[2], raw)
    same(load_for_export(workdir)[1], ema)
    same(load_for_export(workdir, raw_weights=True)[1], raw)
    same(Predictor.from_checkpoint(workdir).variables, ema)
    same(Predictor.from_checkpoint(workdir, raw_weights=True).variables, raw)

    out = os.path.join(workdir, "evaluated_raw")
    scored = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "evaluate.py"),
                             f"--checkpoint={workdir}", f"--out={out}", "--raw_weights"], capture_output=True,
                            text=True, timeout=300, env=subprocess_env(), cwd=REPO)
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert "the trained parameters (--raw_weights)" in scored.stderr, scored.stderr[-2000:]
    with open(os.path.join(out, "results.json")) as f:
        np.testing.assert_allclose([r["score"] for r in json.load(f)], raw_scores, rtol=1e-5, atol=1e-6)


# ---- end to end --------------------------------------------------------------------------------------------
def test_eight_devices_give_the_single_device_losses(runs, reference):
    # The matcher runs per device shard (shard_map) and the loss normalises by the global box count: the
    # losses of a global batch must not depend on how it is split.
    workdir = runs["eight_devices"].wait_ok().workdir
    diff = _max_loss_difference(_metrics(workdir), reference[1], range(1, 5))
    print(f"1 vs 8 devices: max |loss difference| over 4 steps {diff:.3g}")
    assert diff < 1e-5


def test_two_processes_give_the_single_process_losses(runs, reference):
    # Each process loads its half of the global batch; only process 0 writes metrics; both save checkpoints.
    workdir = runs["two_processes"].wait_ok().workdir
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert len(f.readlines()) == 4, "only process 0 writes metrics.jsonl"
    diff = _max_loss_difference(_metrics(workdir), reference[1], range(1, 5))
    print(f"1 process vs 2 processes x 2 devices: max |loss difference| over 4 steps {diff:.3g}")
    assert diff < 1e-5
    assert _checkpoint_steps(workdir)[-1] == 4, "the two-process run saved no final checkpoint"


@pytest.mark.parametrize("source, resumed_on", [("two_processes", dict(devices=2)),
                                                ("eight_devices", dict(devices=1, num_processes=2))],
                         ids=["2x2_on_1x2", "1x8_on_2x1"])
def test_a_run_resumes_on_another_slice_size_and_follows_the_uninterrupted_run(runs, reference, tmp_path, source,
                                                                                resumed_on):
    """Preempted onto another slice: the checkpoint of step 4 of a 2-process x 2-device run goes on on 1 process
    with 2 devices, and that of a 1 x 8-device run on 2 processes x 1 device. The global batches are the loader's
    (its position is in global batches), so every later step sees the batch the uninterrupted single-device run
    saw, and its losses follow that run's to float32 reduction order (a device count sums in another order)."""
    shutil.copytree(runs[source].wait_ok().workdir, tmp_path / "run")
    resumed = _Run(tmp_path / "run", REFERENCE_STEPS, name="resumed", **resumed_on).wait_ok()
    assert "at step 4" in resumed.stderr(), resumed.stderr()[-2000:]
    metrics, ref = _metrics(tmp_path / "run"), reference[1]
    assert sorted(metrics) == list(range(1, REFERENCE_STEPS + 1))  # each step once: none skipped or repeated
    for step in range(5, REFERENCE_STEPS + 1):
        for key in (k for k in ref[step] if k.startswith("loss")):
            assert metrics[step][key] == pytest.approx(ref[step][key], rel=1e-4, abs=1e-5), (step, key)
    import orbax.checkpoint as ocp

    loaders = []
    for workdir in (str(tmp_path / "run"), reference[0]):
        manager = checkpoint_manager(workdir, _tiny_config())
        loaders.append(manager.restore(REFERENCE_STEPS, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                       ["loader"])
        manager.close()
    assert loaders[0] == loaders[1]  # the same place in the same epoch's order


# The killed and the resumed run load with worker processes, the reference with a thread: the same batches.
WORKER_PROCESSES = ("--config.data.worker_type=process", "--config.data.num_workers=2")


def test_resume_after_kill_is_bit_exact(reference, tmp_path, compile_cache):
    first = _Run(tmp_path, REFERENCE_STEPS, "--config.checkpoint_every=3", *WORKER_PROCESSES, cache_dir=compile_cache,
                 name="first")
    try:
        while True:
            assert first.procs[0].poll() is None, (f"the run ended (exit {first.procs[0].returncode}) before it "
                                                   f"could be killed:\n{first.stderr()[-3000:]}")
            assert time.time() < first.deadline, "no checkpoint at step >= 3 followed by a logged step in time"
            saved = [s for s in _checkpoint_steps(tmp_path) if s >= 3]
            logged = _logged_steps(tmp_path)
            if saved and logged and max(logged) > saved[-1]:
                break
            time.sleep(0.05)
    finally:
        first.kill()
    restored = _checkpoint_steps(tmp_path)[-1]
    killed_at = max(_logged_steps(tmp_path))
    assert restored < killed_at < REFERENCE_STEPS
    print(f"killed after step {killed_at}; resuming from the checkpoint of step {restored}")
    resumed = _Run(tmp_path, REFERENCE_STEPS, "--config.checkpoint_every=3", *WORKER_PROCESSES,
                   cache_dir=compile_cache, name="resumed").wait_ok()
    # It resumed from the checkpoint rather than starting again (which would also reproduce the losses) ...
    assert f"at step {restored}" in resumed.stderr(), resumed.stderr()[-2000:]
    # ... and metrics.jsonl holds each step once, as an uninterrupted run's: the rows the killed run wrote after its
    # checkpoint were dropped on resume (crash consistency), and every row equals the reference's.
    assert _logged_steps(tmp_path) == list(range(1, REFERENCE_STEPS + 1))
    metrics, ref = _metrics(tmp_path), reference[1]
    for step in range(1, REFERENCE_STEPS + 1):
        for key, value in ref[step].items():
            if key != "images_per_sec":
                assert metrics[step][key] == value, f"step {step} {key}: resumed {metrics[step][key]!r} vs {value!r}"
    assert _checkpoint_steps(tmp_path)[-1] == REFERENCE_STEPS


def test_finished_run_restarts_as_a_no_op_and_refuses_another_model(reference, tmp_path, compile_cache):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    lines = (workdir / "metrics.jsonl").read_text()

    again = _Run(workdir, REFERENCE_STEPS, "--config.eval_at_end=True", cache_dir=compile_cache, name="again")
    assert again.wait() == [0], f"restarting a finished run failed:\n{again.stderr()[-3000:]}"
    assert "is already complete (10 of 10 steps): nothing to do" in again.stdout(), again.stdout()[-2000:]
    assert (workdir / "metrics.jsonl").read_text() == lines  # no second final evaluation
    assert not (workdir / "eval").exists()

    longer = tmp_path / "longer"  # the same run, 2 more steps: it trains on, and says the schedule follows
    shutil.copytree(reference[0], longer)
    more = _Run(longer, REFERENCE_STEPS + 2, cache_dir=compile_cache, name="more").wait_ok()
    assert f"planned for {REFERENCE_STEPS} steps, this one for {REFERENCE_STEPS + 2}" in more.stderr()
    assert max(_logged_steps(longer)) == REFERENCE_STEPS + 2

    other = _Run(workdir, REFERENCE_STEPS, "--config.model.hidden_dim=64", cache_dir=compile_cache, name="other")
    assert other.wait() != [0]
    assert "another model config" in other.stderr() and "hidden_dim" in other.stderr(), other.stderr()[-3000:]
    assert (workdir / "metrics.jsonl").read_text() == lines


# ---- options -----------------------------------------------------------------------------------------------
def _step_for(config, unit):
    """The step of `config` from the unit's initial parameters."""
    model = build_training_model(config)
    tx, _ = build_optimizer(config, unit.initial["params"], total_steps=1000, steps_per_epoch=1)
    state = dict(unit.initial, opt_state=tx.init(unit.initial["params"]))
    return training.make_train_step(model, tx, config, unit.mesh), jax.device_put(state, sharding.replicated(unit.mesh))


def _three_steps(config, batches, mesh):
    """Parameters and metrics after training `config` from its seed's initial parameters on `batches`."""
    model = build_training_model(config)
    state, tx, _ = create_train_state(config, model, total_steps=1000, steps_per_epoch=100)
    step = training.make_train_step(model, tx, config, mesh)
    state, metrics = jax.device_put(state, sharding.replicated(mesh)), []
    for batch in batches:
        state, m = step(state, sharding.global_batch(batch, mesh))
        metrics.append(jax.device_get(m))
    return _flat(jax.device_get(state["params"])), metrics


def test_gradient_accumulation_equals_the_whole_batch_step():
    """grad_accum_steps=4 makes the update of the whole batch, for a recipe with query groups and token heads on
    the encoder and on stage 3: three steps (AdamW, clipping after accumulation, warmup), every logged term and
    every parameter to float32 rounding. The images hold 1-8 objects and the 6 queries fewer than some of them
    (matching assigns min(objects, N)), so every normaliser differs between micro-batches and the whole batch."""
    config = _tiny_config()
    config.training_aids.update(num_query_groups=2, encoder_aux_loss=True, backbone_aux_stages=(3,))
    config.data.source_kwargs = dict(image_size=(64, 64), min_objects=1, max_objects=8, seed=0)
    config.optimizer.grad_clip = 0.1
    with build_data(config, "train", train=True) as loader:
        batches = [b for b, _ in zip(loader, range(3))]
    assert max(b["mask"].sum(-1).max() for b in batches) > config.model.num_queries
    mesh = sharding.make_mesh()
    whole, whole_metrics = _three_steps(config, batches, mesh)
    config.grad_accum_steps = 4
    accumulated, accumulated_metrics = _three_steps(config, batches, mesh)
    for ours, ref in zip(accumulated_metrics, whole_metrics):
        assert ours.keys() == ref.keys()
        for k in ref:
            np.testing.assert_allclose(ours[k], ref[k], rtol=2e-6, atol=1e-6, err_msg=k)
    # The key projections' biases have an exactly zero gradient in exact arithmetic (a softmax does not see a
    # shift of its logits), so Adam turns their float32 noise into +-lr steps: hence the absolute 1e-7 floor.
    for k in whole:
        diff = float(np.abs(accumulated[k] - whole[k]).max())
        assert diff <= 1e-5 * float(np.abs(whole[k]).max()) + 1e-7, ("/".join(k), diff)


def test_gradient_accumulation_shares_add_up_to_each_term_of_the_whole_batch():
    """Term by term (each normaliser on its own, as RF-DETR got two of them wrong): the criterion on 4 micro-batches
    with the whole batch's `normalisers` adds up to the criterion on the whole batch, for random outputs with
    query groups, token heads and one image with more objects than queries and one with none."""
    from detr_jax.criterion import Criterion
    from detr_jax.criterion.matcher import HungarianMatcher
    from detr_jax.models.aids import token_grid

    rng = np.random.default_rng(0)
    b, n, groups, m, c, (h, w) = 8, 3, 2, 5, 4, (4, 6)
    counts = np.array([5, 0, 1, 2, 3, 4, 1, 2])
    mask = np.arange(m)[None] < counts[:, None]
    xy = rng.uniform(0.2, 0.8, (b, m, 2))
    batch = {"labels": rng.integers(0, c, (b, m)).astype(np.int32), "mask": mask,
             "boxes": np.concatenate([xy, rng.uniform(0.05, 0.4, (b, m, 2))], -1).astype(np.float32)}
    pixel = np.ones((b, h, w), bool)
    pixel[::3, :, 4:] = False  # some images narrower than the padded map
    token_mask, centres = token_grid(pixel)

    def head(queries):
        return {"pred_logits": rng.normal(size=(b, queries, c + 1)).astype(np.float32),
                "pred_boxes": rng.uniform(0.1, 0.9, (b, queries, 4)).astype(np.float32)}

    outputs = dict(head(groups * n), aux_outputs=[head(groups * n)])
    aids = {"enc": dict(head(h * w), token_mask=token_mask, token_centres=centres)}
    criterion = Criterion(c, HungarianMatcher(1.0, 5.0, 2.0), eos_coef=0.1, num_query_groups=groups, num_queries=n)
    _, whole = criterion(outputs, batch, aids)
    shares = criterion.normalisers(batch, {"enc": (token_mask, centres)})
    parts = []
    for i in range(4):
        cut = lambda tree, rows=slice(2 * i, 2 * i + 2): jax.tree_util.tree_map(lambda x: x[rows], tree)  # noqa: E731
        parts.append(criterion(cut(outputs), cut(batch), cut(aids), shares)[1])
    assert set(whole) == set(parts[0])
    for k in whole:
        np.testing.assert_allclose(sum(float(p[k]) for p in parts), float(whole[k]), rtol=1e-5, atol=1e-5,
                                   err_msg=k)


def test_remat_gives_the_same_losses_and_gradients(unit):
    """config.model.remat recomputes activations in the backward pass: the loss and every gradient are those
    without it (1e-6), with dropout on (the recomputation redraws the same masks)."""
    from detr_jax.criterion import Criterion

    def loss_and_grads(remat):
        config = copy.deepcopy(unit.config)
        config.model.update(remat=remat, dropout=0.1)
        model = build_training_model(config)
        criterion = Criterion.from_config(config, model)

        def loss_fn(params):
            outputs, aids = model.apply({"params": params, "frozen": unit.initial["frozen"]}, unit.images,
                                        pixel_mask=unit.local_batch["pixel_mask"], train=True,
                                        rngs={"dropout": jax.random.PRNGKey(3)})
            return criterion(outputs, unit.local_batch, aids)[0]

        return jax.jit(jax.value_and_grad(loss_fn))(unit.initial["params"])

    loss, grads = loss_and_grads("none")
    for remat in ("full", "backbone"):
        remat_loss, remat_grads = loss_and_grads(remat)
        np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
        ours, ref = _flat(remat_grads), _flat(grads)
        scale = max(float(np.abs(g).max()) for g in ref.values())  # relative to the gradient's largest entry
        worst = max(ref, key=lambda k: float(np.abs(ours[k] - ref[k]).max()))
        assert float(np.abs(ours[worst] - ref[worst]).max()) <= 1e-6 * scale, (remat, "/".join(worst))


def test_half_precision_step_is_close_to_float32(unit):
    config = copy.deepcopy(unit.config)
    config.half_precision = True
    bf16_step, state = _step_for(config, unit)
    _, ref = unit.step(unit.fresh_state(), unit.batch)
    state, metrics = bf16_step(state, unit.batch)
    assert state["params"]["model"]["class_embed"]["kernel"].dtype == np.float32  # parameters stay float32
    assert metrics["loss"].dtype == np.float32 and np.isfinite(float(metrics["loss"]))
    assert float(metrics["loss"]) == pytest.approx(float(ref["loss"]), rel=0.05)


def test_denoising_noise_follows_the_seed_and_step_and_leaves_the_matching_losses(unit):
    """dn_groups > 0: the same state gives the same step (the noise is a function of the seed and the step, so a
    resumed run draws what the uninterrupted one drew), another step number other noise; the matching queries'
    losses are those of the step without denoising (they never see the denoising queries)."""
    config = copy.deepcopy(unit.config)
    config.training_aids.update(dn_groups=2, dn_negatives=True)
    model = build_training_model(config)
    initial, tx, _ = create_train_state(config, model, total_steps=1000, steps_per_epoch=1)
    initial = jax.device_get(initial)
    assert set(initial["params"]) == {"model", "denoising"}
    ours, ref = _flat(initial["params"]["model"]), _flat(unit.initial["params"]["model"])
    assert ours.keys() == ref.keys() and all(np.array_equal(ours[k], ref[k]) for k in ref)
    step = training.make_train_step(model, tx, config, unit.mesh)
    run = lambda state: step(jax.device_put(state, sharding.replicated(unit.mesh)), unit.batch)[1]  # noqa: E731
    first, again, later = run(initial), run(initial), run(dict(initial, step=initial["step"] + 1))
    assert float(first["loss_dn"]) == float(again["loss_dn"]) and float(first["loss"]) == float(again["loss"])
    assert float(later["loss_dn"]) != float(first["loss_dn"])
    _, plain = unit.step(unit.fresh_state(), unit.batch)
    for key in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0"):
        assert float(first[key]) == pytest.approx(float(plain[key]), rel=1e-5, abs=1e-6), key
    assert float(first["loss"]) > float(plain["loss"])  # ... plus the denoising losses


def test_batch_norm_backbone_step_updates_the_running_statistics(unit):
    """backbone_norm "batch": the step's new "frozen" statistics are those of a training-mode forward on the
    batch (momentum 0.1, torch's rule), the parameters still update, the EMA (config.ema) averages the statistics
    too, and a non-finite step keeps all of them."""
    config = copy.deepcopy(unit.config)
    config.model.update(backbone_norm="batch", train_stem=True)
    config.ema.decay = 0.5  # and the EMA averages the statistics too
    model = build_training_model(config)
    initial, tx, _ = create_train_state(config, model, total_steps=1000, steps_per_epoch=1)
    initial = jax.device_get(initial)
    step = training.make_train_step(model, tx, config, unit.mesh)
    state, metrics = step(jax.device_put(initial, sharding.replicated(unit.mesh)), unit.batch)
    assert np.isfinite(float(metrics["loss"]))

    _, expected = model.model.apply(detector_variables(initial["params"], initial["frozen"]), unit.images,
                                    pixel_mask=unit.local_batch["pixel_mask"], train=True, mutable=["frozen"],
                                    rngs={"dropout": jax.random.PRNGKey(0)})
    expected = {"frozen": {"model": expected["frozen"]}}
    got, want, before = _flat(state["frozen"]), _flat(expected["frozen"]), _flat(initial["frozen"])
    assert got.keys() == want.keys() == before.keys() and len(got) == 2 * 20  # mean and var of 20 norms (R18)
    for k in want:
        assert np.abs(got[k] - before[k]).max() > 0, "/".join(k)
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5, err_msg="/".join(k))
    assert _flat(state["params"])[("model", "backbone", "bn1", "scale")].shape == (64,)
    ema = _flat(state["ema"]["frozen"])
    for k in want:
        np.testing.assert_allclose(ema[k], 0.5 * before[k] + 0.5 * got[k], rtol=1e-6, atol=1e-7, err_msg="/".join(k))

    poisoned = dict(unit.local_batch, images=np.full_like(unit.images, np.nan))
    state_ema = jax.device_get(state["ema"])  # the step donates its input
    bad, _ = step(state, sharding.global_batch(poisoned, unit.mesh))
    for k, v in _flat(bad["frozen"]).items():
        np.testing.assert_array_equal(v, got[k], err_msg="/".join(k))
    for k, v in _flat(bad["ema"]).items():  # the EMA too
        np.testing.assert_array_equal(v, _flat(state_ema)[k], err_msg="/".join(k))


def test_a_lost_process_stops_the_others_naming_it_and_the_run_resumes(tmp_path):
    """kill -9 of process 1 of 2: process 0 stops once the coordination service misses its heartbeats
    (--heartbeat_timeout_s=15 here; no hang until a timeout of its own, no abort with a stack trace as its last word)
    with one line naming process 1 and the checkpoint to resume from; both started again finish the run from
    there."""
    steps, heartbeat = 20, "--heartbeat_timeout_s=15"
    run = _Run(tmp_path, steps, "--config.checkpoint_every=4", heartbeat, devices=1, num_processes=2, name="first")
    try:
        while not [s for s in _checkpoint_steps(tmp_path) if s >= 4] or max(_logged_steps(tmp_path), default=0) < 6:
            assert all(p.poll() is None for p in run.procs), run.stderr(0)[-3000:] + run.stderr(1)[-3000:]
            assert time.time() < run.deadline, "no checkpoint in time"
            time.sleep(0.1)
        run.procs[1].kill()
        killed = time.time()
        code = run.procs[0].wait(timeout=150)
        print(f"process 0 stopped {time.time() - killed:.0f} s after process 1 was killed (exit {code})")
        assert time.time() - killed < 60 and code == 1  # jax's default heartbeat timeout alone is 100 s
    finally:
        run.kill()
    err = run.stderr(0)
    lines = [line for line in err.splitlines() if "loop.py" in line and line.startswith("E")]  # our logger's lines
    assert len(lines) == 1 and "process 1 of 2 is gone" in lines[0] and "Start all 2 processes again" in lines[0], \
        err[-3000:]
    saved = _checkpoint_steps(tmp_path)[-1]
    assert f"resumes from the checkpoint of step {saved}" in lines[0]
    _Run(tmp_path, steps, "--config.checkpoint_every=4", heartbeat, devices=1, num_processes=2,
         name="again").wait_ok()
    assert max(_logged_steps(tmp_path)) == steps


def test_work_directories_keep_the_layout_of_before_the_package_reorganisation(reference):
    """A work directory written by 51c9f6a (before the layers became subpackages) holds what today's code writes:
    the same files, config fields, checkpoint meta and state tree (paths, shapes, dtypes), so the code of today
    resumes, evaluates and predicts from it. tests/data/workdir_layout_51c9f6a.json is that layout, read from a
    tiny run of 51c9f6a (the orbax checkpoint itself is ~100 MB: a ResNet-18 and its Adam state)."""
    with open(os.path.join(os.path.dirname(__file__), "data", "workdir_layout_51c9f6a.json")) as f:
        old = json.load(f)
    new = json.loads(json.dumps(workdir_layout(reference[0])))  # tuples -> lists, as in the file
    assert new["state"] == old["state"], sorted(set(new["state"]) ^ set(old["state"]))[:10]
    # Config fields added since, each with a default for a config.json without it: config.eval_backend (read with
    # .get, pycocotools), the denoising aid's (DETRWithAids' defaults: off).
    config = dict(new["config"])
    assert config.pop("eval_backend", "missing") is None
    dn = {"dn_groups", "dn_box_noise", "dn_label_noise", "dn_negatives"}
    assert dn <= set(config["training_aids"])
    config["training_aids"] = sorted(set(config["training_aids"]) - dn)
    # config.grad_accum_steps replaced optimizer.grad_accum_steps (optax.MultiSteps across steps; now the exact
    # accumulation inside a step): only training reads it, from its config file, never from a config.json. Model
    # remat ("none" by DETR's default for a config.json without it) changes no parameter and is no part of the
    # checkpoint's model signature.
    assert config.pop("grad_accum_steps", "missing") is None
    assert "remat" in config["model"] and "grad_accum_steps" in old["config"]["optimizer"]
    config["model"] = sorted(set(config["model"]) - {"remat"})
    config["optimizer"] = sorted(set(config["optimizer"]) | {"grad_accum_steps"})
    # The parameter EMA (config.ema; off for a config.json without it: only training reads it) and the class target
    # (loss.class_target, "hard" without it: only training reads it); the checkpoint's meta says whether its state
    # holds an EMA (restore_checkpoint: .get, False for a checkpoint without the key).
    assert config.pop("ema", "missing") == ["decay", "warmup_steps"]
    # config.xla_flags: read by experiments/train.py from the config it starts with, never from a config.json.
    assert config.pop("xla_flags", "missing") is None
    assert {"class_target", "class_target_alpha"} <= set(config["loss"])
    config["loss"] = sorted(set(config["loss"]) - {"class_target", "class_target_alpha"})
    assert "ema" in new["meta"] and "ema" not in old["meta"]
    new["meta"] = sorted(set(new["meta"]) - {"ema"})
    new["config"] = config
    assert {k: v for k, v in new.items() if k != "state"} == {k: v for k, v in old.items() if k != "state"}
