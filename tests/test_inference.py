"""Inference API and CLI, attention pictures and jax.export, on the official random R18 checkpoint."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from detr_jax.evaluate import postprocess
from detr_jax.inference import Predictor, export_inference, read_image

pytest.importorskip("torch")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoint(fixtures_dir):
    return str(fixtures_dir / "official_detr_r18_tiny" / "detr_random.pth")


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return Predictor.from_checkpoint(checkpoint, num_heads=4, size=96, max_size=160, threshold=0.0)


def test_predictor_equals_model_on_the_transformed_image(predictor):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)
    out = predictor(image)
    # Reference: resize (shorter side 96 -> 96x144), normalise, no padding needed (multiples of 32? 96x144 is
    # padded to 96x160), plain model.apply and the official post-processing.
    x, _ = predictor.transforms(image, None, np.random.default_rng(0))
    assert x.shape[:2] == (96, 144)
    ref = predictor.model.apply(predictor.variables, jnp.asarray(x[None]))
    scores, labels, boxes = postprocess(ref["pred_logits"], ref["pred_boxes"], jnp.array([[60, 90]]))
    np.testing.assert_allclose(out["scores"], np.asarray(scores[0]), atol=1e-5)
    np.testing.assert_array_equal(out["labels"], np.asarray(labels[0]))
    np.testing.assert_allclose(out["boxes"], np.asarray(boxes[0]), atol=1e-3)
    assert out["boxes"].shape == (12, 4) and len(out["label_names"]) == 12
    assert out["label_names"][0] == predictor.class_names[int(out["labels"][0])]


def test_attention_picture(predictor):
    image = np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    picture = predictor.attention_picture(image, query=3)
    assert picture.size == (70, 50)
    run = predictor.run(image)
    real = run["feature_mask"]
    # Attention over real cells sums to one; padded cells get none.
    np.testing.assert_allclose(run["attention"][3][real].sum(), 1.0, atol=1e-5)
    assert np.all(run["attention"][3][~real] == 0)


def test_export_roundtrip(predictor):
    model, variables = predictor.model, predictor.variables
    exported = export_inference(model, variables, batch_size=2, image_hw=(64, 96))
    restored = jax.export.deserialize(exported.serialize())
    rng = np.random.default_rng(2)
    images = rng.standard_normal((2, 64, 96, 3)).astype(np.float32)
    mask = np.ones((2, 64, 96), bool)
    mask[1, 40:] = False
    logits, boxes = restored.call(images, mask)
    ref = model.apply(variables, images, pixel_mask=mask)
    np.testing.assert_allclose(logits, ref["pred_logits"], atol=1e-5)
    np.testing.assert_allclose(boxes, ref["pred_boxes"], atol=1e-6)


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\x00\x01 not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        read_image(str(bad))
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        read_image(str(tmp_path / "nothere.png"))


def _predict_cli(args, cwd):
    return subprocess.run([sys.executable, os.path.join(REPO, "experiments", "predict.py")] + args, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_predict_cli(checkpoint, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    result = _predict_cli([f"--checkpoint={checkpoint}", "--num_heads=4", "--size=64", "--threshold=0",
                           "--attention", "--out=out", str(folder)], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    detections = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert sorted(os.path.basename(k) for k in detections) == ["im0.png", "im1.png"]
    first = next(iter(detections.values()))
    assert len(first) == 12 and set(first[0]) == {"box_xyxy", "label", "score"}
    for stem in ("im0", "im1"):
        assert Image.open(tmp_path / "out" / f"{stem}_detections.png").size == (56, 40)
        assert (tmp_path / "out" / f"{stem}_attention.png").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _predict_cli([f"--checkpoint={checkpoint}", str(empty)], tmp_path)
    assert result.returncode != 0 and "has no images" in result.stderr
    result = _predict_cli([f"--checkpoint={tmp_path / 'missing.pth'}", str(folder)], tmp_path)
    assert result.returncode != 0 and "missing.pth" in result.stderr
