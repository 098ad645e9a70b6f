"""experiments/plan.py and detr_jax.training.plan: the tiny config compiled for a real TPU topology (v5e:2x2, four
chips) by libtpu on this CPU, its numbers against a direct compile, the verdict at its exact boundary, and the
one-line refusals. About 70 s: one plan (two TPU compiles) and one direct compile of the train step."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.helpers import REPO

pytest.importorskip("libtpu", reason="the tpu extra (libtpu) compiles for TPU topologies")

PLAN = os.path.join(REPO, "experiments", "plan.py")
TINY_CONFIG = os.path.join(REPO, "tests", "configs", "tiny.py")
TOPOLOGY = "v5e:2x2"


def _plan_cli(*args, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, PLAN, "--config", TINY_CONFIG, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def _tiny_config():
    import importlib.util
    spec = importlib.util.spec_from_file_location("tiny_config", TINY_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """The plan of the tiny config on v5e:2x2 at its batch of 8 (2 per chip), against a chip of 0.1 GiB so
    that it does not fit: (the completed process, the JSON it wrote)."""
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    done = _plan_cli("--topology", TOPOLOGY, "--hbm_gib", "0.1", "--out", str(out))
    assert out.exists(), done.stderr[-3000:]
    return done, json.loads(out.read_text())


def test_the_plan_reports_every_field_of_the_slice(planned):
    _, result = planned
    assert {"topology", "device_kind", "chips", "hosts", "batch_per_chip", "bucket", "dtype", "remat",
            "train_peak_bytes", "eval_peak_bytes", "hbm_bytes", "fits", "train_flops", "compile_s",
            "largest_batch_per_chip"} <= set(result)
    assert (result["topology"], result["device_kind"], result["chips"], result["hosts"]) == (TOPOLOGY, "TPU v5 lite",
                                                                                          4, 1)
    assert (result["batch_per_chip"], result["global_batch"], result["bucket"]) == (2, 8, [64, 64])
    assert (result["dtype"], result["remat"], result["largest_batch_per_chip"]) == ("float32", "none", None)
    assert result["hbm_bytes"] == int(0.1 * 2 ** 30)
    assert 0 < result["eval_peak_bytes"] < result["train_peak_bytes"] and result["train_flops"] > 0


def test_the_plan_equals_a_direct_compile_of_the_train_step(planned):
    """What the issue did by hand: the run's own step on a Mesh of the topology's devices, lowered with abstract
    arguments and compiled; memory_analysis() and cost_analysis() give the plan's numbers."""
    from jax.experimental import topologies
    from jax.sharding import Mesh

    from detr_jax.models import build_training_model
    from detr_jax.training.state import create_train_state
    from detr_jax.training.step import make_train_step

    _, result = planned
    config = _tiny_config()
    devices = topologies.get_topology_desc(topology_name=TOPOLOGY, platform="tpu").devices
    mesh = Mesh(np.asarray(devices), ("data",))
    model = build_training_model(config)
    _, tx, _ = create_train_state(config, model, 1000, 100)
    state = jax.eval_shape(lambda: create_train_state(config, model, 1000, 100)[0])
    b, (h, w), m = 8, (64, 64), config.data.max_objects
    spec = jax.ShapeDtypeStruct
    batch = {"images": spec((b, h, w, 3), np.uint8), "pixel_mask": spec((b, h, w), bool),
             "labels": spec((b, m), np.int32), "boxes": spec((b, m, 4), np.float32), "mask": spec((b, m), bool),
             "image_id": spec((b,), np.int32), "orig_size": spec((b, 2), np.int32), "size": spec((b, 2), np.int32)}
    compiled = make_train_step(model, tx, config, mesh).lower(state, batch).compile()
    memory = compiled.memory_analysis()
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes)
    assert result["train_peak_bytes"] == peak
    cost = compiled.cost_analysis()
    assert result["train_flops"] == (cost[0] if isinstance(cost, list) else cost)["flops"]


def test_a_plan_that_does_not_fit_says_what_would(planned):
    done, result = planned
    assert done.returncode == 1 and not result["fits"]
    verdict = done.stdout.strip().splitlines()[-1]
    assert verdict.startswith("DOES NOT FIT: v5e:2x2 at 2 images per chip needs"), done.stdout
    for way in ("--config.model.remat=full", "--batch_per_chip", "--config.half_precision=True"):
        assert way in verdict
    assert "compiled for TPU" in done.stdout
    assert "TPU_WORKER_HOSTNAMES" not in done.stderr and "TPU_ACCELERATOR_TYPE" not in done.stderr


def test_fits_flips_at_the_chip_memory(planned):
    from detr_jax.training.plan import fits, summary

    _, result = planned
    train, evaluation = result["train_peak_bytes"], result["eval_peak_bytes"]
    assert fits(train, evaluation, train)  # a peak equal to the memory fits
    assert not fits(train, evaluation, train - 1)
    assert summary(dict(result, hbm_bytes=train, fits=True)).splitlines()[-1].startswith("FITS: v5e:2x2 trains")


@pytest.mark.parametrize("peak", [lambda b: 3e9 + 0.7e9 * b,  # linear in the batch, as activations are
                                  lambda b: 3e9 + 0.2e9 * b ** 1.3,  # not quite
                                  lambda b: 3e9 + 0.7e9 * b + (4e9 if b > 9 else 0)],  # a jump the line cannot see
                         ids=["linear", "superlinear", "step"])
def test_the_largest_batch_search_closes_the_bracket_exactly(peak):
    from detr_jax.training.plan import MAX_SEARCH_BATCH_PER_CHIP, largest_batch_per_chip

    for hbm in (3.5e9, 3.7e9, 8e9, 16e9, 95e9, 2e12):
        for unit in (1, 2):
            probed = []
            found = largest_batch_per_chip(lambda b, probed=probed: probed.append(b) or peak(b), 2, unit, hbm)
            fitting = [b for b in range(unit, MAX_SEARCH_BATCH_PER_CHIP + 1, unit) if peak(b) <= hbm]
            assert found == max(fitting, default=0), (hbm, unit)
            assert len(probed) == len(set(probed)) and all(b % unit == 0 for b in probed)
            assert len(probed) <= 12, probed
    probed, known = [], {2: 3e9 + 1.4e9}
    largest_batch_per_chip(lambda b: probed.append(b) or 3e9 + 0.7e9 * b, 2, 1, 16e9, known=known)
    assert len(probed) <= 3, probed  # a linear peak: the line, then both sides of the boundary
    assert known == {b: 3e9 + 0.7e9 * b for b in [2] + probed}  # every probe is the plan's "search_peaks"


@pytest.mark.parametrize("args, message", [
    (["--topology", "v9z:2x2"], "--topology='v9z:2x2' is not a TPU topology libtpu knows"),
    (["--topology", "v5e:4x4", "--config.batch_size=8"], "config.batch_size=8 cannot be split evenly over the 16 "
     "chips of v5e:4x4: pass --batch_per_chip N"),
    (["--topology", "v4:2x2x1", "--batch_per_chip", "3"], "--batch_per_chip=3 must be a positive multiple of 2 on "
     "v4:2x2x1 (2 device(s) per chip)"),
])
def test_plan_refuses_in_one_line_before_compiling(args, message):
    done = _plan_cli(*args, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = [x for x in done.stderr.splitlines() if x.strip()]
    assert line.startswith("error: ") and message in line, line


def test_plan_without_libtpu_names_the_extra(monkeypatch):
    from detr_jax.training import plan

    monkeypatch.setattr(plan.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(plan.PlanError, match=r"libtpu, which is not installed: pip install -e '\.\[tpu\]'"):
        plan.topology_devices(TOPOLOGY)


def test_a_program_the_tpu_compiler_refuses_does_not_fit_and_reports_what_it_needs():
    """libtpu refuses a program larger than the chip at compile time (RESOURCE_EXHAUSTED, naming only the
    temporaries): the plan reports those as a lower bound and the verdict says it does not fit."""
    from detr_jax.training import plan

    class Refused:
        def compile(self):
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required "
                                             "for HLO temporaries (26.41G) exceeds available HBM (15.75G).")

    compiled = plan._compile(Refused())
    assert compiled["peak_bytes"] == int(26.41 * 2 ** 30) and compiled["flops"] is None
    assert compiled["out_of_memory"].startswith("RESOURCE_EXHAUSTED: Ran out of memory on HBM")

    class Broken:
        def compile(self):
            raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    with pytest.raises(jax.errors.JaxRuntimeError, match="something else"):
        plan._compile(Broken())


# ---- the same check for a CPU run, against this machine's memory ---------------------------------------------
def test_host_memory_check_refuses_above_the_memory_and_allows_it_exactly():
    from detr_jax.training.plan import check_host_memory

    check_host_memory(2 ** 30, 2 ** 30, (1344, 1344), 8)  # a peak equal to the memory fits
    with pytest.raises(ValueError, match=r"^the train step at the largest bucket \(1344x1344, batch 8\) needs 1\.0 "
                                         r"GiB of memory but this machine has 1\.0 GiB available: .*"
                                         r"--config.model.remat=full"):
        check_host_memory(2 ** 30 + 1, 2 ** 30, (1344, 1344), 8)


def test_a_cpu_run_that_would_not_fit_in_memory_stops_before_training_in_one_line(tmp_path):
    """The fine-tune that a 24 GB machine killed mid-compile: now refused at start, naming the bucket and what
    would fit ($DETR_JAX_HOST_MEMORY_GIB stands in for a small machine)."""
    from tests.helpers import TrainRun

    run = TrainRun(TINY_CONFIG, tmp_path / "run", "--config.num_steps=2", env={"DETR_JAX_HOST_MEMORY_GIB": "0.01"})
    assert run.wait() == [1]
    errors = [line for line in run.stderr().splitlines() if line.startswith("E") and "] " in line]
    assert len(errors) == 1 and "the train step at the largest bucket (64x64, batch 8) needs" in errors[0], errors
    assert "0.0 GiB available" in errors[0] and not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_the_mask_head_stage_is_planned_without_its_detector_checkpoint():
    """coco_r50_panoptic.py's stage 2 trains only with a trained detector (check_config refuses it without one), but
    a plan reads no weights: planning it needs none."""
    import importlib.util

    from detr_jax.config import check_config
    from detr_jax.training.plan import check_plan_config

    spec = importlib.util.spec_from_file_location(
        "coco_r50_panoptic", os.path.join(REPO, "experiments", "configs", "coco_r50_panoptic.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    with pytest.raises(ValueError, match="init.detr_checkpoint must be the trained detector"):
        check_config(config)
    check_plan_config(config)
