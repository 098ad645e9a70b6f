"""coco_like: a locally prepared TFDS builder with coco/2017's features, read by the COCO reader unchanged.

  python -m pytest -q tests/test_data_coco_like.py   (~10 s on 2 CPU cores; skipped without tensorflow_datasets)
"""

import time
from pathlib import Path

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
array_record_module = pytest.importorskip("array_record.python.array_record_module")

# pylint: disable=g-import-not-at-top,wrong-import-position
from detr_jax.data.batching import COCO_IMAGE_SIZES  # noqa: E402 (after importorskip)
from detr_jax.data.sources.coco_categories import COCO_CATEGORY_IDS, COCO_CLASS_NAMES  # noqa: E402 (after importorskip)
from detr_jax.data.sources.coco_like import CROWD_EVERY, VALIDATION_ID_OFFSET, prepare  # noqa: E402 (after importorskip)
from detr_jax.data.sources.synthetic import SyntheticDetection  # noqa: E402 (after importorskip)
from detr_jax.data.sources.tfds_coco import TfdsCoco  # noqa: E402 (after importorskip)

NUM_TRAIN, NUM_VALIDATION = 24, 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    prepare(str(path), num_train=NUM_TRAIN, num_validation=NUM_VALIDATION)
    return path


def _synthetic(split):
    return SyntheticDetection(split, NUM_TRAIN if split == "train" else NUM_VALIDATION,
                              image_size=list(COCO_IMAGE_SIZES), seed=0)


def _records(path: Path, split: str):
    """The raw serialized records of `split`'s ArrayRecord file(s), in order."""
    records = []
    for shard in sorted(path.glob(f"coco_like/1.0.0/coco_like-{split}.array_record-*")):
        reader = array_record_module.ArrayRecordReader(str(shard))
        records += reader.read_all()
        reader.close()
    return records


def test_features_equal_coco_2017(data_dir):
    pytest.importorskip("tensorflow")  # coco.py declares "image/id" as tf.int64
    # Constructing the coco builder reads only its code (GCS is off by default in TFDS): nothing is downloaded.
    coco = tfds.builder_cls("coco")(config="2017", data_dir=str(data_dir / "coco_info")).info.features
    ours = tfds.builder("coco_like", data_dir=str(data_dir)).info.features
    assert ours.to_json() == coco.to_json()  # structure, dtypes, shapes, image encoding "jpeg", 80 labels
    assert ours.get_serialized_info() == coco.get_serialized_info()
    assert tuple(ours["objects"]["label"].names) == COCO_CLASS_NAMES


def test_tfds_coco_reads_the_synthetic_examples(data_dir):
    src = TfdsCoco(split="train", data_dir=str(data_dir), name="coco_like",
                   label_space="official91")
    synthetic = _synthetic("train")
    assert len(src) == NUM_TRAIN
    for index in range(NUM_TRAIN):
        ex, want = src[index], synthetic[index]  # record i is synthetic example i (shuffling is disabled)
        assert ex["image_id"] == index + 1
        assert ex["image"].dtype == np.uint8 and ex["image"].shape == want["image"].shape
        assert ex["orig_size"] == want["orig_size"]
        np.testing.assert_allclose(ex["boxes"], want["boxes"], rtol=1e-3)  # [K, 4] xyxy absolute
        np.testing.assert_array_equal(ex["labels"], np.asarray(COCO_CATEGORY_IDS)[want["labels"]])
        assert not ex["iscrowd"].any()
        # JPEG changes pixels, not what the image shows.
        assert np.abs(ex["image"].astype(np.float32) - want["image"]).mean() < 20


def test_validation_ids_and_crowd_objects(data_dir):
    src = TfdsCoco(split="validation", data_dir=str(data_dir), name="coco_like", keep_crowd=True)
    synthetic = _synthetic("val")
    for index in range(NUM_VALIDATION):
        ex = src[index]
        assert ex["image_id"] == VALIDATION_ID_OFFSET + index + 1
        np.testing.assert_allclose(ex["boxes"], synthetic[index]["boxes"], rtol=1e-3)
        want_crowd = np.zeros(len(ex["labels"]), bool)
        want_crowd[0] = index % CROWD_EVERY == 0
        np.testing.assert_array_equal(ex["iscrowd"], want_crowd)
    dropping = TfdsCoco(split="validation", data_dir=str(data_dir), name="coco_like")
    for index in range(NUM_VALIDATION):
        dropping[index]  # pylint: disable=pointless-statement
    assert dropping.stats["crowd_dropped"] == -(-NUM_VALIDATION // CROWD_EVERY)


def test_image_sizes_follow_the_coco_mix(data_dir):
    src = TfdsCoco(split="train", data_dir=str(data_dir), name="coco_like")
    sizes = {src[i]["orig_size"] for i in range(len(src))}
    assert sizes <= set(COCO_IMAGE_SIZES) and len(sizes) >= 6
    assert any(h > w for h, w in sizes) and any(h < w for h, w in sizes)


def test_data_source_random_access(data_dir):
    source = tfds.data_source("coco_like", split="validation", data_dir=str(data_dir))
    assert len(source) == NUM_VALIDATION
    synthetic = _synthetic("val")
    for index in (5, 0, 7, 5):
        record = source[index]
        h, w = record["image"].shape[:2]
        boxes = synthetic[index]["boxes"]  # [K, 4] xyxy absolute
        assert record["image/id"] == VALIDATION_ID_OFFSET + index + 1
        assert record["image/filename"] == f"{VALIDATION_ID_OFFSET + index + 1:012d}.jpg".encode()
        np.testing.assert_array_equal(record["objects"]["area"],
                                      (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        np.testing.assert_allclose(np.asarray(record["objects"]["bbox"]),  # (ymin, xmin, ymax, xmax) normalised
                                   boxes[:, [1, 0, 3, 2]] / [h, w, h, w], rtol=1e-5)
        ids = np.asarray(record["objects"]["id"])
        assert np.array_equal(ids, (VALIDATION_ID_OFFSET + index + 1) * 100 + np.arange(len(boxes)))


def test_files_are_array_record_and_prepare_is_idempotent(data_dir, tmp_path):
    files = sorted(p.name for p in (data_dir / "coco_like" / "1.0.0").iterdir())
    assert "coco_like-train.array_record-00000-of-00001" in files and "dataset_info.json" in files
    assert len(_records(data_dir, "train")) == NUM_TRAIN and len(_records(data_dir, "validation")) == NUM_VALIDATION
    mtimes = {p: p.stat().st_mtime_ns for p in data_dir.rglob("*.array_record-*")}
    start = time.perf_counter()
    builder = prepare(str(data_dir), num_train=NUM_TRAIN, num_validation=NUM_VALIDATION)
    assert time.perf_counter() - start < 2.0
    assert {p: p.stat().st_mtime_ns for p in data_dir.rglob("*.array_record-*")} == mtimes
    assert builder.info.splits["train"].num_examples == NUM_TRAIN
    with pytest.raises(ValueError, match="holds coco_like with .*use another data_dir"):
        prepare(str(data_dir), num_train=NUM_TRAIN, num_validation=NUM_VALIDATION, seed=1)
    # Same seed, same data: a smaller preparation elsewhere writes byte-identical leading records.
    prepare(str(tmp_path), num_train=3, num_validation=2)
    assert _records(tmp_path, "train") == _records(data_dir, "train")[:3]
    assert _records(tmp_path, "validation") == _records(data_dir, "validation")[:2]
