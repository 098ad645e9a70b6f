"""Hostile official-format checkpoints and torch versions (issue 23): each refused by `load_official_checkpoint`
(what evaluate / predict / export call) with one line naming the file and the first key that does not fit.

  input                                             -> expected one line
  {"epoch": 3} (no "model", nothing a tensor)       -> "entry 'epoch' is a int, not a tensor"
  {"model": {"a": 1.0}} (a dict of non-tensors)     -> "entry 'a' is a float, not a tensor"
  {"model": {}}                                     -> "empty state dict"
  an extra unknown key of a known module            -> "key 'transformer.extra.weight' does not fit"
  query_embed.weight of rank 3                      -> "key 'query_embed.weight' has shape (12, 64, 1)"
  a conv weight of rank 2                           -> "key 'input_proj.weight' ... a conv weight has 4 dimensions"
  a Linear weight of rank 1                         -> "a linear weight has 2 dimensions"
  a wrong-sized weight                              -> "key 'class_embed.bias' does not fit" (and the flax path)
  a NaN / inf in a weight                           -> "tensor 'class_embed.bias' holds 1 NaN/inf value(s)"
  torch 2.5.1 / 2.9.0 beside detr_jax               -> ImportError "refusing to read ... torch 2.5.1"
Predictions (`Predictor`, experiments/predict.py):
  a NaN / inf box or score                          -> neither kept, drawn nor written; counted in a warning
  no detection passes the threshold (a young model) -> the top 3 drawn, captioned "none >= 0.70: the top 3 shown"
"""

import json
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from detr_jax.evaluation.visualize import draw_detections  # noqa: E402
from detr_jax.inference import Predictor  # noqa: E402
from detr_jax.weights.official import load_official_checkpoint, load_torchvision_backbone  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_sd(fixtures_dir):
    ckpt = torch.load(fixtures_dir / "official_detr_r18_tiny" / "detr_random.pth", map_location="cpu",
                      weights_only=False)
    return ckpt.get("model", ckpt)


def _load(tmp_path, obj, name="bad.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return load_official_checkpoint(str(path), num_heads=4)


def _one_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


@pytest.mark.parametrize("obj, message", [
    ({"epoch": 3}, r"bad.pth: entry 'epoch' is a int, not a tensor"),
    ({"model": {"a": 1.0}}, r"bad.pth: entry 'a' is a float, not a tensor"),
    ({"model": {}}, r"bad.pth holds an empty state dict"),
])
def test_non_tensor_state_dicts(tmp_path, obj, message):
    with pytest.raises(ValueError, match=message) as e:
        _load(tmp_path, obj)
    _one_line(e)


def _edited(sd, **changes):
    out = dict(sd)
    for key, value in changes.items():
        out[key.replace("__", ".")] = value
    return {"model": out}


def test_extra_unknown_key(tmp_path, tiny_sd):
    obj = _edited(tiny_sd, transformer__extra__weight=torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"bad.pth: key 'transformer.extra.weight' does not fit.*unexpected") as e:
        _load(tmp_path, obj)
    _one_line(e)


def test_wrong_size_names_the_official_key(tmp_path, tiny_sd):
    obj = _edited(tiny_sd, class_embed__bias=torch.zeros(7))
    with pytest.raises(ValueError, match=r"bad.pth: key 'class_embed.bias' does not fit.*mis-shaped.*class_embed"):
        _load(tmp_path, obj)


@pytest.mark.parametrize("key, value, message", [
    ("query_embed.weight", torch.zeros(12, 64, 1), r"bad.pth: key 'query_embed.weight' has shape \(12, 64, 1\)"),
    ("input_proj.weight", torch.zeros(64, 512), r"bad.pth: key 'input_proj.weight' .*conv weight has 4 dim"),
    ("bbox_embed.layers.0.weight", torch.zeros(64), r"bad.pth: key 'bbox_embed.layers.0.weight' .*linear weight"),
])
def test_wrong_rank(tmp_path, tiny_sd, key, value, message):
    obj = {"model": dict(tiny_sd, **{key: value})}
    with pytest.raises(ValueError, match=message) as e:
        _load(tmp_path, obj)
    _one_line(e)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path, tiny_sd, bad):
    value = tiny_sd["class_embed.bias"].clone()
    value[3] = bad
    with pytest.raises(ValueError, match=r"bad.pth: tensor 'class_embed.bias' holds 1 NaN/inf value") as e:
        _load(tmp_path, {"model": dict(tiny_sd, **{"class_embed.bias": value})})
    _one_line(e)


def test_bad_backbone_file_names_itself(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match=r"resnet.pth: key 'conv1.weight' .*conv weight"):
        load_torchvision_backbone(str(path), {}, 18)


@pytest.mark.parametrize("version", ["2.5.1", "2.9.0+cpu", "1.13.1"])
def test_old_torch_is_refused(tmp_path, tiny_sd, monkeypatch, version):
    path = tmp_path / "ok.pth"
    torch.save({"model": tiny_sd}, path)
    monkeypatch.setattr(torch, "__version__", version)
    message = rf"refusing to read .*ok.pth with torch {re.escape(version)}: .*CVE-2025-32434"
    with pytest.raises(ImportError, match=message) as e:
        load_official_checkpoint(str(path), num_heads=4)
    _one_line(e)


# ------------------------------------------------------------------ non-finite boxes; a model sure of nothing
# (the Predictor's call / draw, what experiments/predict.py writes and draws)

def test_draw_detections_skips_non_finite_boxes(caplog):
    image = np.full((40, 60, 3), 255, np.uint8)
    boxes = [[1, 1, 20, 20], [np.inf, 0, 5, 5], [0, np.nan, 5, 5], [0, 0, 1e30, -1e30], [2, 2, 9, 9]]
    scores = [0.9, 0.9, 0.9, 0.9, float("nan")]
    with caplog.at_level(logging.WARNING):
        picture = draw_detections(image, boxes, [1] * 5, scores, ["a", "b"], threshold=0.5, caption="hello")
    assert picture.size == (60, 40)
    assert "skipped 3 detection(s) with a non-finite box or score" in caplog.text
    pixels = np.asarray(picture)
    assert (pixels[:12, :30] == 0).all(-1).sum() > 30  # the caption on its filled black box


@pytest.fixture(scope="module")
def predictor(fixtures_dir):
    return Predictor.from_checkpoint(str(fixtures_dir / "official_detr_r18_tiny" / "detr_random.pth"),
                                     num_heads=4, size=64, max_size=96, threshold=0.0)


def test_non_finite_boxes_are_never_kept(predictor, caplog):
    bias = predictor.variables["params"]["bbox_embed"]["layers_2"]["bias"]
    params = dict(predictor.variables["params"], bbox_embed=dict(
        predictor.variables["params"]["bbox_embed"],
        layers_2=dict(predictor.variables["params"]["bbox_embed"]["layers_2"], bias=bias.at[0].set(np.nan))))
    broken = Predictor(predictor.model, dict(predictor.variables, params=params), predictor.class_names,
                       size=64, max_size=96, threshold=0.0)
    image = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    with caplog.at_level(logging.WARNING):
        detections = broken(image)
        picture = broken.draw(image, detections)
    assert len(detections["scores"]) == 0 and detections["non_finite"] == 12 and "top" not in detections
    assert "skipped 12 of 12 queries with a non-finite box or score" in caplog.text
    assert picture.size == (56, 40)


def test_unsure_model_draws_its_top_3_with_a_caption(predictor, monkeypatch):
    import detr_jax.inference as inference

    sure = Predictor(predictor.model, predictor.variables, predictor.class_names, size=64, max_size=96,
                     threshold=1.01)
    image = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    detections = sure(image)
    assert len(detections["scores"]) == 0 and len(detections["top"]["scores"]) == 3
    assert list(detections["top"]["scores"]) == sorted(sure.run(image)["scores"], reverse=True)[:3]
    seen = {}
    real = inference.draw_detections

    def spy(*args, **kwargs):
        seen.update(kwargs, n=len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "draw_detections", spy)
    assert sure.draw(image, detections).size == (56, 40)
    assert seen["caption"] == "none >= 1.01: the top 3 shown" and seen["n"] == 3
    predictor.draw(image)
    assert seen["caption"] == "score >= 0.00: 12 detections" and seen["n"] == 12


def test_predict_cli_unsure_model(fixtures_dir, tmp_path):
    Image.fromarray(np.full((40, 56, 3), 90, np.uint8)).save(tmp_path / "im0.png")
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "experiments", "predict.py"),
         f"--checkpoint={fixtures_dir / 'official_detr_r18_tiny' / 'detr_random.pth'}", "--num_heads=4",
         "--size=64", "--threshold=1.01", "--out=out", str(tmp_path / "im0.png")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "0 detections (none >= 1.01: the top 3 drawn, not listed)" in result.stdout
    assert json.loads((tmp_path / "out" / "detections.json").read_text()) == {str(tmp_path / "im0.png"): []}
    assert Image.open(tmp_path / "out" / "im0_detections.png").size == (56, 40)


@pytest.mark.parametrize("key, message", [
    ("backbone.0.body.bn1.foo", r"bad.pth: key 'backbone.0.body.bn1.foo' is not a DETR / ResNet weight name"),
    ("class_embed.bias.x", r"bad.pth: key 'class_embed.bias' is both a weight and a module"),
])
def test_unplaceable_keys(tmp_path, tiny_sd, key, message):
    with pytest.raises(ValueError, match=message) as e:
        _load(tmp_path, {"model": dict(tiny_sd, **{key: torch.zeros(3)})})
    _one_line(e)


def test_a_caption_and_labels_stay_whole_on_a_small_picture():
    """A 128 px picture: the caption wraps onto lines that fit its width instead of running off the right edge,
    and a label of a box at the right edge moves left to stay inside (the black boxes behind the text end before
    the last column)."""
    image = np.full((128, 128, 3), 255, np.uint8)
    picture = np.asarray(draw_detections(image, [[100, 60, 127, 90]], [0], [0.9], ["a long class name"],
                                         threshold=0.5, caption="none >= 0.70: the top 3 shown"))
    black = (picture == 0).all(-1)
    assert black[:, -1].sum() == 0  # nothing cut at the right edge
    assert black[:12, :].sum() > 0 and black[12:24, :60].sum() > 0  # the caption's second line
    assert black[60:75, 40:].sum() > 0  # the label, moved left of the box's x0 = 100
