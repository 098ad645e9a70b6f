"""ONNX export (detr_jax/export.py, experiments/export.py): onnxruntime, run in a process without jax, gives the
JAX model's outputs on the official R18 fixture's padded batch and the Predictor's detections for a work directory.

jax2onnx and onnxruntime come with the `test` extra (the `export` extra): these tests never skip.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detr_jax.export import (
    PanopticExportError,
    export_model,
    inference_function,
    load_for_export,
    preprocess,
)
from detr_jax.models.layers import formulations, max_pool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, "tests", "configs", "tiny.py")

# Runs an ONNX file in onnxruntime (CPU) on arrays from an .npz, in a fresh interpreter that must not import jax:
# what a deployment has. argv: model.onnx inputs.npz outputs.npz [manifest.json orig_h orig_w] (with a manifest
# also the official PostProcess in numpy: the README's example).
ORT_SCRIPT = r"""
import sys
import numpy as np
import onnxruntime as ort

model, inputs, outputs = sys.argv[1:4]
feed = dict(np.load(inputs))
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
logits, boxes = session.run(["pred_logits", "pred_boxes"], feed)
result = dict(pred_logits=logits, pred_boxes=boxes)
if len(feed["images"]) > 1:  # the last image alone: another batch size
    result["last_pred_logits"] = session.run(["pred_logits"], {k: v[-1:] for k, v in feed.items()})[0]
if len(sys.argv) > 4:
    h, w = int(sys.argv[5]), int(sys.argv[6])
    prob = np.exp(logits - logits.max(-1, keepdims=True))
    prob = (prob / prob.sum(-1, keepdims=True))[..., :-1]  # no-object last
    cx, cy, bw, bh = np.moveaxis(boxes, -1, 0)
    result.update(scores=prob.max(-1), labels=prob.argmax(-1),
                  boxes=np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1) * [w, h, w, h])
assert "jax" not in sys.modules and "jaxlib" not in sys.modules, "the onnxruntime side imported jax"
np.savez(outputs, **result)
"""


def run_onnxruntime(tmp_path, model_path, feed, *extra):
    """ORT_SCRIPT in a subprocess: its outputs as a dict of arrays."""
    np.savez(tmp_path / "feed.npz", **feed)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAX_"))}
    proc = subprocess.run([sys.executable, "-c", ORT_SCRIPT, str(model_path), str(tmp_path / "feed.npz"),
                           str(tmp_path / "ort_out.npz"), *map(str, extra)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(tmp_path / "ort_out.npz"))


@pytest.fixture(scope="module")
def official_tiny(fixtures_dir):
    folder = fixtures_dir / "official_detr_r18_tiny"
    return str(folder / "detr_random.pth"), dict(np.load(folder / "forward.npz"))


def test_explicit_pad_max_pool_is_bit_equal():
    """The export's max-pool formulation (-inf padding, then "VALID") is the training one, bit for bit."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 13, 10, 5))
    with formulations(max_pool="explicit_pad"):
        padded = jax.jit(lambda x: max_pool(x, 3, 2, 1))(x)
    np.testing.assert_array_equal(padded, jax.jit(lambda x: max_pool(x, 3, 2, 1))(x))
    assert padded.shape == (2, 7, 5, 5)


def test_official_fixture_onnx_equals_flax_and_official(official_tiny, tmp_path):
    """The official R18 fixture exported with a symbolic batch: onnxruntime on its padded batch of two images (and
    on one of them alone) equals the Flax model, and so the official DETR's outputs."""
    path, ref = official_tiny
    model, variables, info = load_for_export(path, num_heads=4)
    assert len(info["class_names"]) == 91 and info["size"] == 800
    h, w = ref["images"].shape[1:3]
    meta = export_model(model, variables, info, str(tmp_path / "out"), "onnx", None, (h, w))
    assert meta["inputs"][0] == dict(name="images", shape=["B", h, w, 3], dtype="float32")
    assert meta["outputs"][0]["shape"] == ["B", 12, 92] and meta["padding_invariant"] is False
    with open(tmp_path / "out" / "manifest.json") as f:
        assert json.load(f) == meta

    feed = dict(images=ref["images"], pixel_mask=ref["pixel_mask"])
    out = run_onnxruntime(tmp_path, tmp_path / "out" / "model.onnx", feed)
    logits, boxes = jax.jit(inference_function(model, variables))(ref["images"], ref["pixel_mask"])
    np.testing.assert_allclose(out["pred_logits"], logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["pred_boxes"], boxes, atol=1e-5, rtol=0)
    # The official outputs, with test_convert's tolerances.
    np.testing.assert_allclose(out["pred_logits"], ref["pred_logits"], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(out["pred_boxes"], ref["pred_boxes"], atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(out["last_pred_logits"], ref["pred_logits"][1:], atol=2e-5, rtol=1e-5)


def _tiny_workdir(path):
    """A work directory as a default run of tests/configs/tiny.py leaves it (config.json, class_names.json, an
    orbax checkpoint of the train state with the detector under "model"), its weights drawn at random."""
    import orbax.checkpoint as ocp

    from detr_jax.models import build_inference_model

    spec = importlib.util.spec_from_file_location("tiny_config", TINY_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    model = build_inference_model(config)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    rng = np.random.default_rng(3)  # random weights without compiling init

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if "var" in name:  # batch-norm variances
            return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
        if "kernel" in name or "query_embed" in name:  # activations of order 1, distinct queries
            std = np.prod(s.shape[:-1]) ** -0.5 if "kernel" in name else 1.0
            return rng.normal(0.0, std, s.shape).astype(np.float32)
        return (("scale" in name) + rng.normal(0.0, 0.1, s.shape)).astype(np.float32)  # scales ~1, biases ~0

    variables = jax.tree_util.tree_map_with_path(draw, shapes)
    state = {"params": {"model": variables["params"]}, "frozen": {"model": variables["frozen"]}}
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))
    with open(os.path.join(path, "class_names.json"), "w") as f:
        json.dump(dict(class_names=["rectangle", "ellipse", "triangle", "cross", "diamond"]), f)
    manager = ocp.CheckpointManager(os.path.join(path, "checkpoints"))
    manager.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    manager.wait_until_finished()
    manager.close()
    return str(path)


def test_workdir_exports_and_predicts_as_the_predictor(tmp_path):
    """A tiny work directory exported padding-invariant at the Predictor's padded size: onnxruntime plus the
    official PostProcess in numpy give the Predictor's scores, labels and boxes on an image needing padding."""
    from detr_jax.inference import Predictor

    workdir = _tiny_workdir(tmp_path / "wd")
    model, variables, info = load_for_export(workdir)  # what from_checkpoint loads, once
    assert info["class_names"][0] == "rectangle" and (info["size"], info["max_size"]) == (64, 64)
    meta = export_model(model, variables, info, str(tmp_path / "out"), "onnx", None, (64, 64),
                        padding_invariant=True)
    assert meta["class_names"] == info["class_names"] and meta["padding_invariant"] is True

    image = np.random.default_rng(0).integers(0, 255, (50, 75, 3), dtype=np.uint8)  # resized to 43 x 64
    images, pixel_mask = preprocess(image, meta["size"], meta["max_size"], (64, 64))
    assert not pixel_mask.all()
    out = run_onnxruntime(tmp_path, tmp_path / "out" / "model.onnx", dict(images=images, pixel_mask=pixel_mask),
                          tmp_path / "out" / "manifest.json", *image.shape[:2])
    expected = Predictor(model, variables, info["class_names"], info["size"], info["max_size"], 0.0).run(image)
    assert np.isfinite(out["boxes"]).all() and np.ptp(expected["scores"]) > 5e-3  # queries differ
    np.testing.assert_allclose(out["scores"][0], expected["scores"], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(out["labels"][0], expected["labels"])
    np.testing.assert_allclose(out["boxes"][0], expected["boxes"], atol=1e-4, rtol=0)


def test_panoptic_checkpoint_is_refused(fixtures_dir):
    path = fixtures_dir / "official_detr_r50_tiny_panoptic" / "detr_panoptic_random.pth"
    with pytest.raises(PanopticExportError, match="panoptic checkpoint"):
        load_for_export(str(path))


def test_stablehlo_needs_a_batch_size(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        export_model(None, None, {}, str(tmp_path), "stablehlo", None, (64, 64))


def test_export_command(tmp_path):
    """`experiments/export.py` as a user runs it: a work directory at the smallest --size (32, the backbone's
    stride: accepted) writes model.onnx and its manifest and prints onnxruntime's agreement with JAX (within the
    issue's tolerances); --size 31x64 is refused in one line before anything is loaded."""
    workdir = _tiny_workdir(tmp_path / "wd")
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_FLAGS")}
    command = [sys.executable, os.path.join(REPO, "experiments", "export.py"), f"--checkpoint={workdir}",
               f"--out={tmp_path / 'out'}"]
    proc = subprocess.run(command + ["--size=32x64"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "out" / "manifest.json") as f:
        meta = json.load(f)
    assert meta["file"] == "model.onnx" and os.path.getsize(tmp_path / "out" / "model.onnx") > 0
    assert meta["inputs"] == [dict(name="images", shape=["B", 32, 64, 3], dtype="float32"),
                              dict(name="pixel_mask", shape=["B", 32, 64], dtype="bool")]
    assert meta["class_names"][0] == "rectangle"
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("onnxruntime vs JAX on a random padded batch: max |diff| logits "), proc.stdout
    diff_logits, diff_boxes = (float(part.split()[-1]) for part in line.split(":")[-1].split(","))
    assert diff_logits <= 1e-4 and diff_boxes <= 1e-5, line

    assert meta["padding_invariant"] is True  # the default: the Predictor's model, export = predict
    assert "exported the padding-invariant model: each image's detections are predict.py's" in proc.stdout

    proc = subprocess.run(command + [f"--out={tmp_path / 'default_size'}", "--noverify", "--nopadding_invariant"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--size not given: 64x64, which holds every image of the eval resize (shorter side 64, longer at most " \
           "64)" in proc.stdout and "exported the official model" in proc.stdout
    with open(tmp_path / "default_size" / "manifest.json") as f:
        meta = json.load(f)
    assert meta["inputs"][0]["shape"] == ["B", 64, 64, 3] and meta["padding_invariant"] is False

    proc = subprocess.run(command + ["--size=31x64"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["error: --size 31x64: H and W must be at least 32 (the backbone's "
                                                "stride)"]
