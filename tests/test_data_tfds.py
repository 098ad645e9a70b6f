"""TFDS COCO source: record conversion (always), and the real TFDS path on the built-in COCO-like set (needs TFDS)."""

import importlib.util

import numpy as np
import pytest

from detr_jax.data import build_source
from detr_jax.data.sources.coco_categories import COCO_CATEGORY_IDS, COCO_CLASS_NAMES, OFFICIAL91_CLASS_NAMES
from detr_jax.data.sources.tfds_coco import convert_record

_HAS_TF = importlib.util.find_spec("tensorflow") is not None and importlib.util.find_spec(
    "tensorflow_datasets") is not None


def _record():
    return {
        "image": np.zeros((20, 40, 3), np.uint8),
        "image/id": 139,
        "objects": {
            "bbox": np.array([[0.1, 0.25, 0.6, 0.5],     # (ymin, xmin, ymax, xmax)
                              [0.0, 0.0, 1.0, 1.0],      # crowd
                              [0.5, 0.5, 0.5, 0.9]],     # zero height
                             np.float32),
            "label": np.array([0, 79, 11]),
            "is_crowd": np.array([False, True, False]),
            "id": np.array([11, 12, 13]),
        },
    }


def test_category_tables():
    assert OFFICIAL91_CLASS_NAMES[1] == "person" and OFFICIAL91_CLASS_NAMES[90] == "toothbrush"
    assert OFFICIAL91_CLASS_NAMES[12] == "N/A" and len(OFFICIAL91_CLASS_NAMES) == 91
    assert COCO_CLASS_NAMES[11] == "stop sign" and COCO_CATEGORY_IDS[11] == 13


def test_convert_record_contiguous_and_official91():
    example, crowd, zero = convert_record(_record(), np.arange(80), 80, keep_crowd=False)
    assert (crowd, zero) == (1, 1)
    np.testing.assert_allclose(example["boxes"], [[10, 2, 20, 12]])
    np.testing.assert_array_equal(example["labels"], [0])
    assert example["image_id"] == 139 and example["orig_size"] == (20, 40)
    example, crowd, zero = convert_record(_record(), np.asarray(COCO_CATEGORY_IDS), 91, keep_crowd=True)
    np.testing.assert_array_equal(example["labels"], [1, 90])  # person, toothbrush in the raw id space
    np.testing.assert_array_equal(example["iscrowd"], [False, True])
    assert (crowd, zero) == (0, 1)


def test_convert_record_label_beyond_num_classes_names_annotation():
    with pytest.raises(ValueError, match="annotation id 12 .*label 90 >= num_classes=80"):
        convert_record(_record(), np.asarray(COCO_CATEGORY_IDS), 80, keep_crowd=True)


@pytest.mark.skipif(_HAS_TF, reason="tensorflow_datasets is installed")
def test_clear_error_without_tfds():
    with pytest.raises(ImportError, match="tensorflow_datasets"):
        build_source("tfds", split="train")


def test_encoded_image_size_names_a_bad_record():
    from detr_jax.data.sources.tfds_coco import _encoded_image_size
    with pytest.raises(ValueError, match=r"train record 7 \(image id 42\): the image does not decode"):
        _encoded_image_size({"image": b"not a jpeg", "image/id": 42}, "tfds coco/2017 train record 7")


@pytest.mark.skipif(not _HAS_TF, reason="tensorflow_datasets not importable")
def test_tfds_source_on_the_coco_like_set(coco_like_dir, monkeypatch):
    src = build_source("tfds", name="coco_like", data_dir=coco_like_dir, split="validation", label_space="official91",
                       keep_crowd=True)
    assert len(src) == 64 and src.num_classes == 91
    for i in (0, 5, 63):
        ex = src[i]
        assert ex["image"].dtype == np.uint8 and ex["image"].shape[2] == 3
        # The size index (JPEG headers only) agrees with the decoded image; target() with the full example.
        assert src.image_size(i) == ex["image"].shape[:2] == ex["orig_size"]
        target = src.target(i)
        assert "image" not in target and target["orig_size"] == ex["orig_size"]
        for key in ("boxes", "labels", "iscrowd"):
            np.testing.assert_array_equal(target[key], ex[key])
        assert np.all(np.isin(ex["labels"], COCO_CATEGORY_IDS))
        h, w = ex["orig_size"]
        assert np.all(ex["boxes"] >= 0) and np.all(ex["boxes"][:, [0, 2]] <= w) and np.all(ex["boxes"][:, [1, 3]] <= h)
    assert len({src.image_size(i) for i in range(len(src))}) >= 5  # COCO's mix of sizes and orientations
    # A second start reads the cached index: no header is parsed again.
    from detr_jax.data.sources import tfds_coco
    monkeypatch.setattr(tfds_coco, "_encoded_image_size", lambda *a: pytest.fail("size index not cached"))
    again = build_source("tfds", name="coco_like", data_dir=coco_like_dir, split="validation")
    assert [again.image_size(i) for i in range(64)] == [src.image_size(i) for i in range(64)]


@pytest.mark.skipif(not _HAS_TF, reason="tensorflow_datasets not importable")
def test_unreadable_record_is_named(coco_like_dir):
    src = build_source("tfds", name="coco_like", data_dir=coco_like_dir, split="validation")

    class Broken:
        def __getitem__(self, index):
            raise OSError("truncated file")

    src._source = Broken()
    with pytest.raises(ValueError, match=r"tfds coco_like validation: cannot read record 3: OSError: truncated file"):
        src[3]
