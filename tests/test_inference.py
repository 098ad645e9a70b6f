"""Inference API and CLI, attention pictures and jax.export, on the official random R18 checkpoint; panoptic
inference and pictures on the official random R50 panoptic checkpoint."""

import copy
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from detr_jax.data.sources.coco_panoptic_categories import OFFICIAL250_CLASS_NAMES
from detr_jax.evaluation.postprocess import postprocess
from detr_jax.evaluation.postprocess_panoptic import post_process_panoptic
from detr_jax.evaluation.visualize import draw_panoptic, segment_colour
from detr_jax.inference import Predictor, export_inference, read_image
from detr_jax.ops.panoptic_ids import rgb2id

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
        pixels = np.random.default_rng(i).integers(0, 255, (40, 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"im{i}.png")
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


# --- Panoptic ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def panoptic_checkpoint(fixtures_dir):
    return str(fixtures_dir / "official_detr_r50_tiny_panoptic" / "detr_panoptic_random.pth")


@pytest.fixture(scope="module")
def panoptic_predictor(panoptic_checkpoint):
    # Random weights are never confident: panoptic_threshold 0 keeps every query that is not no-object.
    return Predictor.from_checkpoint(panoptic_checkpoint, size=64, max_size=96, threshold=0.0, panoptic_threshold=0.0)


@pytest.fixture(scope="module")
def panoptic_image():
    return np.random.default_rng(3).integers(0, 255, (96, 128, 3), dtype=np.uint8)


def _reference_panoptic(predictor, image, run, is_thing_map, threshold):
    """The official single-image path by hand: the eval transform, the model on the unpadded image, and
    `post_process_panoptic` with processed size = the resized image, target size = the original image.

    The model's outputs are checked against `run`'s (the predictor's forward), and the post-processing is fed
    `run`'s: the random model's masks differ between queries by ~1e-7, below the float noise between two
    compilations (~1e-5), so the per-pixel argmax of two forwards would be noise.
    """
    x, _ = predictor.transforms(image, None, np.random.default_rng(0))
    out = predictor.model.apply(predictor.variables, jnp.asarray(x[None]))
    assert run["pred_masks"].shape == out["pred_masks"].shape[1:]
    # Padding would move them by ~1 (the mask head's GroupNorm and convolutions see it).
    np.testing.assert_allclose(run["pred_masks"], np.asarray(out["pred_masks"][0]), atol=1e-4)
    np.testing.assert_allclose(run["pred_logits"], np.asarray(out["pred_logits"][0]), atol=1e-4)
    return post_process_panoptic(run["pred_logits"][None], run["pred_masks"][None], out["pred_boxes"],
                                 [x.shape[:2]], [image.shape[:2]], is_thing_map, threshold=threshold)[0]


def test_panoptic_checkpoint_loads_with_coco_panoptic_labels(panoptic_predictor, predictor):
    assert panoptic_predictor.has_masks and not predictor.has_masks
    names = panoptic_predictor.class_names
    assert len(names) == 250 and names == list(OFFICIAL250_CLASS_NAMES)
    assert (names[1], names[90], names[92], names[199], names[200]) == (
        "person", "toothbrush", "banner", "wall-other-merged", "rug-merged")
    assert sum(name != "N/A" for name in names) == 133
    # Official coco_panoptic: is_thing_map = {i: i <= 90 for i in range(250)}.
    assert panoptic_predictor.is_thing == [i <= 90 for i in range(250)]
    with pytest.raises(ValueError, match="mask head"):
        predictor.panoptic(np.zeros((40, 50, 3), np.uint8))
    assert "panoptic" not in predictor(np.zeros((40, 50, 3), np.uint8))


def test_panoptic_equals_model_and_official_postprocess(panoptic_predictor, panoptic_image):
    # All labels things: no stuff merging, so every query keeps its own segment and the id map is informative.
    # (The thing map is read on the host: a copy shares the compiled forward.)
    things = copy.copy(panoptic_predictor)
    things.is_thing = [True] * 250
    run = things.run(panoptic_image)
    assert run["processed_size"] == (64, 85)
    assert run["pred_masks"].shape == (12, 16, 22)  # stride 4 of the unpadded resized image
    ref = _reference_panoptic(things, panoptic_image, run, {i: True for i in range(250)}, 0.0)
    got = run["panoptic"]
    assert got["segment_ids"].shape == (96, 128)
    np.testing.assert_array_equal(got["segment_ids"], ref["segment_ids"])
    assert got["png_string"] == ref["png_string"]
    assert len(ref["segments_info"]) >= 3
    assert [{k: s[k] for k in ("id", "isthing", "category_id", "area")} for s in got["segments_info"]] == \
        ref["segments_info"]
    for seg in got["segments_info"]:
        assert seg["label_name"] == OFFICIAL250_CLASS_NAMES[seg["category_id"]]
        rows, cols = np.nonzero(got["segment_ids"] == seg["id"])
        assert seg["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]
    # The panoptic model's detections: the detector's, on the same forward.
    detections = things(panoptic_image)
    np.testing.assert_allclose(detections["scores"], run["scores"])
    np.testing.assert_array_equal(detections["panoptic"]["segment_ids"], got["segment_ids"])


def test_panoptic_official_thing_map_covers_the_image(panoptic_predictor, panoptic_image):
    run = panoptic_predictor.run(panoptic_image)
    result = panoptic_predictor.panoptic(panoptic_image)
    ref = _reference_panoptic(panoptic_predictor, panoptic_image, run, {i: i <= 90 for i in range(250)}, 0.0)
    np.testing.assert_array_equal(result["segment_ids"], ref["segment_ids"])
    info = result["segments_info"]
    assert len(info) >= 1 and [s["category_id"] for s in info] == [s["category_id"] for s in ref["segments_info"]]
    # Every original pixel belongs to a listed segment.
    assert result["segment_ids"].shape == panoptic_image.shape[:2]
    assert np.isin(result["segment_ids"], [s["id"] for s in info]).all()
    assert sum(s["area"] for s in info) == 96 * 128
    # At the official threshold 0.85 no query of the random model is confident: an empty segmentation.
    strict = copy.copy(panoptic_predictor)
    strict.panoptic_threshold = 0.85
    empty = strict(panoptic_image)["panoptic"]
    assert empty["segments_info"] == [] and not empty["segment_ids"].any()
    assert strict.draw(panoptic_image).size == (128, 96)


def test_panoptic_picture(panoptic_predictor, panoptic_image):
    picture = panoptic_predictor.draw(panoptic_image)
    assert picture.mode == "RGB" and picture.size == (128, 96)
    assert np.abs(np.asarray(picture, np.float32) - panoptic_image).mean() > 5  # the segments are painted
    boxes = panoptic_predictor.draw(panoptic_image, panoptic=False)  # the detections picture is still there
    assert boxes.size == (128, 96) and not np.array_equal(np.asarray(boxes), np.asarray(picture))
    assert panoptic_predictor.attention_picture(panoptic_image).size == (128, 96)  # the detector's maps


def test_draw_panoptic_blends_labels_and_boxes():
    image = np.full((100, 200, 3), 100, np.uint8)
    ids = np.full((100, 200), 7, np.int32)  # 7: void (not listed)
    ids[:, :100] = 0  # stuff
    ids[20:50, 130:180] = 3  # a thing
    info = [{"id": 0, "category_id": 199, "isthing": False}, {"id": 3, "category_id": 1, "isthing": True}]
    picture = np.asarray(draw_panoptic(image, ids, info, OFFICIAL250_CLASS_NAMES, alpha=0.5)).astype(int)
    stuff = np.round(0.5 * 100 + 0.5 * np.array(segment_colour(0))).astype(int)
    np.testing.assert_array_equal(picture[95, 2], stuff)  # far from the label
    assert (picture[60:, 100:] == 100).all()  # void, away from the thing's label, untouched
    # The thing's box around its pixels (rows 20..49, columns 130..179) in its colour; none around the stuff.
    np.testing.assert_array_equal(picture[20, 150], segment_colour(3))
    np.testing.assert_array_equal(picture[49, 130], segment_colour(3))
    assert not (picture[:, :100] == segment_colour(0)).all(-1).any()
    # Labels at the centroids, text on black: the stuff's around (50, 50), the thing's around (155, 35).
    assert (picture[44:56, 10:90] == 0).all(-1).sum() > 100
    assert (picture[28:42, 135:175] == 0).all(-1).sum() > 30
    with pytest.raises(ValueError, match="segment_ids"):
        draw_panoptic(image, ids[:50], info, OFFICIAL250_CLASS_NAMES)


def test_predict_cli_panoptic(panoptic_checkpoint, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / "im0.png")
    result = _predict_cli([f"--checkpoint={panoptic_checkpoint}", "--size=64", "--threshold=0",
                           "--panoptic_threshold=0", "--out=out", str(folder)], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / "out"
    listed = next(iter(json.loads((out / "detections.json").read_text()).values()))
    assert len(listed) == 12
    assert [d["score"] for d in listed] == sorted((d["score"] for d in listed), reverse=True)  # the best first
    assert Image.open(out / "im0_detections.png").size == (64, 48)
    picture = Image.open(out / "im0_panoptic.png")
    assert picture.size == (64, 48) and picture.mode == "RGB"
    panoptic = json.loads((out / "panoptic.json").read_text())
    assert len(panoptic["categories"]) == 133
    assert {"id": 199, "name": "wall-other-merged", "isthing": 0} in panoptic["categories"]
    (annotation,) = panoptic["annotations"]
    assert annotation["file_name"] == "im0.png" and annotation["image"].endswith("im0.png")
    segments = annotation["segments_info"]
    assert segments and {"id", "category_id", "iscrowd", "isthing", "area", "bbox", "label_name"} <= set(segments[0])
    ids = rgb2id(np.asarray(Image.open(out / "panoptic" / "im0.png")))
    assert ids.shape == (48, 64)
    assert sorted(np.unique(ids)) == sorted(s["id"] for s in segments)
    assert sum(s["area"] for s in segments) == 48 * 64


def test_a_model_with_more_classes_than_names_names_the_rest_by_number(checkpoint):
    """A work directory's class_names.json lists the data's categories; a model of more classes (allowed: more than
    the data uses) predicts labels past them, which are named by their number instead of failing."""
    from detr_jax.weights.official import load_official_checkpoint

    model, variables = load_official_checkpoint(checkpoint, num_heads=4)
    predictor = Predictor(model, variables, ["person", "bicycle"], size=64, max_size=96, threshold=0.0)
    assert predictor.class_names[:2] == ["person", "bicycle"] and predictor.class_names[90] == "90"
    detections = predictor(np.full((48, 64, 3), 128, np.uint8))
    assert len(detections["label_names"]) == len(detections["labels"]) > 0
