"""TFDS COCO panoptic source ("tfds_panoptic"): record conversion (always), and the real TFDS path on the built-in
COCO-panoptic-like set, compared with the SyntheticPanoptic examples it was written from (needs TFDS).

  python -m pytest -q tests/test_data_tfds_panoptic.py   (~15 s on 2 CPU cores)
"""

import importlib.util

import numpy as np
import pytest

from detr_jax.data import PANOPTIC_SOURCES, build_data, build_source
from detr_jax.data.sources.coco_folder import AnnotationError
from detr_jax.data.sources.coco_panoptic_categories import COCO_PANOPTIC_CATEGORY_IDS
from detr_jax.data.sources.synthetic_panoptic import SyntheticPanoptic
from detr_jax.data.sources.tfds_coco_panoptic import convert_panoptic_record
from detr_jax.ops.panoptic_ids import id2rgb

_HAS_TFDS = importlib.util.find_spec("tensorflow_datasets") is not None
needs_tfds = pytest.mark.skipif(not _HAS_TFDS, reason="tensorflow_datasets not importable")
NUM_EXAMPLES = {"train": 16, "validation": 8}  # conftest's coco_panoptic_like_dir
# What each SyntheticPanoptic label (ellipse, rectangle, triangle, sky, grass, sand) stands for in
# coco_panoptic_like (its docstring).
COCO_NAMES = ("person", "bicycle", "car", "sky-other-merged", "grass-merged", "sand")
OFFICIAL250 = np.asarray(COCO_PANOPTIC_CATEGORY_IDS)  # TFDS label -> official250 label (= category id)
WHERE = "tfds coco/2017_panoptic validation record 3"


def _record():
    """A hand-made coco/2017_panoptic record: two segments on a 6 x 8 image, the second a crowd, the rest void."""
    id_map = np.zeros((6, 8), np.int64)
    id_map[:, :4] = 300
    id_map[2:5, 5:7] = 70_000  # all three RGB channels
    return {"image": np.zeros((6, 8, 3), np.uint8), "image/id": 42, "panoptic_image": id2rgb(id_map),
            "panoptic_objects": {"id": np.array([300, 70_000]), "label": np.array([0, 132]),
                                 "is_crowd": np.array([False, True])}}


def _convert(record, num_classes=250, keep_crowd=True):
    return convert_panoptic_record(record, OFFICIAL250, num_classes, keep_crowd, where=WHERE)


def test_convert_record_cuts_the_png_into_masks():
    example, dropped = _convert(_record())
    np.testing.assert_array_equal(example["labels"], [1, 200])  # person, rug-merged: the first and last category
    np.testing.assert_array_equal(example["segment_ids"], [300, 70_000])
    np.testing.assert_array_equal(example["boxes"], [[0, 0, 4, 6], [5, 2, 7, 5]])  # xyxy, exclusive max
    assert example["masks"].shape == (2, 6, 8) and example["masks"].sum(axis=(1, 2)).tolist() == [24, 6]
    np.testing.assert_array_equal(example["iscrowd"], [False, True])
    assert dropped == 0 and example["image_id"] == 42 and example["orig_size"] == (6, 8)
    example, dropped = _convert(_record(), keep_crowd=False)
    np.testing.assert_array_equal(example["segment_ids"], [300])
    assert dropped == 1 and not example["iscrowd"].any()


@pytest.mark.parametrize("edit, match", [
    (lambda o: o.update(id=np.array([300, 70_001])),
     r"\(image id 42\): the panoptic PNG has segment ids \[70000\] that panoptic_objects does not list"),
    (lambda o: o.update(id=np.array([300, 70_000, 5]), label=np.array([0, 1, 2]), is_crowd=np.zeros(3, bool)),
     r"\(image id 42\): panoptic_objects ids \[5\] are not in the panoptic PNG"),
    (lambda o: o.update(label=np.array([0, 133])), r"segment id 70000 has TFDS label 133 outside 0..132"),
    (lambda o: o.update(id=np.array([300, 0])), r"ids \[300, 0\] must be positive \(0 is void\) and distinct"),
    (lambda o: o.update(label=np.array([0])), r"panoptic_objects has 2 ids, 1 labels and 2 is_crowd flags"),
])
def test_a_mismatched_record_is_one_line_naming_it(edit, match):
    record = _record()
    edit(record["panoptic_objects"])
    with pytest.raises(AnnotationError, match=WHERE + ".*" + match) as info:
        _convert(record)
    assert "\n" not in str(info.value)


def test_label_beyond_num_classes_names_the_segment():
    with pytest.raises(ValueError, match=r"\(image id 42\): segment id 70000 has label 200 >= num_classes=150"):
        _convert(_record(), num_classes=150)


def _source(data_dir, split, **kwargs):
    return build_source("tfds_panoptic", name="coco_panoptic_like", data_dir=data_dir, split=split, **kwargs)


def _synthetic(split):
    from detr_jax.data.sources import coco_panoptic_like
    return SyntheticPanoptic("val" if split == "validation" else split, NUM_EXAMPLES[split],
                             image_size=list(coco_panoptic_like.IMAGE_SIZES), seed=0)


@needs_tfds
def test_features_equal_coco_2017_panoptic(coco_panoptic_like_dir, tmp_path):
    pytest.importorskip("tensorflow")  # coco.py declares "image/id" as tf.int64
    tfds = pytest.importorskip("tensorflow_datasets")
    # Constructing the coco builder reads only its code (GCS is off by default in TFDS): nothing is downloaded.
    coco = tfds.builder_cls("coco")(config="2017_panoptic", data_dir=str(tmp_path)).info.features
    ours = tfds.builder("coco_panoptic_like", data_dir=coco_panoptic_like_dir).info.features
    assert ours.to_json() == coco.to_json()  # structure, dtypes, jpeg image, png panoptic image, 133 labels
    assert ours.get_serialized_info() == coco.get_serialized_info()


@needs_tfds
def test_examples_are_the_synthetic_ones(coco_panoptic_like_dir):
    from detr_jax.data.sources.coco_panoptic_like import SEGMENT_ID_STRIDE
    src, synthetic = _source(coco_panoptic_like_dir, "train"), _synthetic("train")
    assert len(src) == NUM_EXAMPLES["train"] and src.num_classes == 250 and len(src.class_names) == 250
    for index in range(len(src)):
        ex, want = src[index], synthetic[index]  # record i is synthetic example i (shuffling is disabled)
        assert ex["image_id"] == index + 1 and ex["orig_size"] == want["orig_size"] == ex["image"].shape[:2]
        assert ex["masks"].dtype == bool and ex["boxes"].dtype == np.float32
        assert ex["labels"].dtype == ex["segment_ids"].dtype == np.int32
        np.testing.assert_array_equal(ex["masks"], want["masks"])  # [K, H, W], lossless through the PNG
        np.testing.assert_array_equal(ex["boxes"], want["boxes"])
        np.testing.assert_array_equal(ex["segment_ids"], want["segment_ids"] * SEGMENT_ID_STRIDE)
        # official250: the label is the category id, whose name and thing-ness are the synthetic class's.
        assert [src.class_names[label] for label in ex["labels"]] == [COCO_NAMES[label] for label in want["labels"]]
        np.testing.assert_array_equal(np.asarray(src.category_ids)[ex["labels"]], ex["labels"])
        assert [src.is_thing[label] for label in ex["labels"]] == [synthetic.is_thing[label]
                                                                   for label in want["labels"]]
        assert not ex["iscrowd"].any()
        # JPEG changes pixels, not what the image shows.
        assert np.abs(ex["image"].astype(np.float32) - want["image"]).mean() < 20


@needs_tfds
def test_contiguous_label_space(coco_panoptic_like_dir):
    src = _source(coco_panoptic_like_dir, "validation", label_space="contiguous")
    official = _source(coco_panoptic_like_dir, "validation")
    assert src.num_classes == len(src.class_names) == len(src.is_thing) == 133
    assert list(src.category_ids) == sorted(src.category_ids)
    for index in range(len(src)):
        ex, ref = src[index], official[index]
        assert np.all(ex["labels"] < 133)
        np.testing.assert_array_equal(np.asarray(src.category_ids)[ex["labels"]], ref["labels"])
        assert [src.class_names[c] for c in ex["labels"]] == [official.class_names[c] for c in ref["labels"]]
        assert [src.is_thing[c] for c in ex["labels"]] == [official.is_thing[c] for c in ref["labels"]]
        np.testing.assert_array_equal(ex["masks"], ref["masks"])


@needs_tfds
def test_crowd_segments_kept_or_dropped(coco_panoptic_like_dir):
    from detr_jax.data.sources.coco_like import CROWD_EVERY, VALIDATION_ID_OFFSET
    kept = _source(coco_panoptic_like_dir, "validation")  # keep_crowd=True by default, as CocoPanopticFolder
    dropping = _source(coco_panoptic_like_dir, "validation", keep_crowd=False)
    synthetic = _synthetic("validation")
    crowds = 0
    for index in range(len(kept)):
        ex, less, want = kept[index], dropping[index], synthetic[index]
        assert ex["image_id"] == less["image_id"] == VALIDATION_ID_OFFSET + index + 1
        # The first thing of every CROWD_EVERY-th validation image is a crowd.
        things = np.flatnonzero(np.asarray(synthetic.is_thing)[want["labels"]])
        crowd = np.zeros(len(want["labels"]), bool)
        if index % CROWD_EVERY == 0 and len(things):
            crowd[things[0]] = True
        crowds += int(crowd.sum())
        np.testing.assert_array_equal(ex["iscrowd"], crowd)
        np.testing.assert_array_equal(ex["masks"], want["masks"])
        np.testing.assert_array_equal(less["masks"], want["masks"][~crowd])  # the crowd's pixels become void
        np.testing.assert_array_equal(less["boxes"], want["boxes"][~crowd])
        assert not less["iscrowd"].any()
    assert crowds >= 1 and dropping.stats["crowd_dropped"] == crowds


@needs_tfds
def test_size_index_and_image_ids_agree_with_the_records(coco_panoptic_like_dir):
    from detr_jax.data.sources.coco_panoptic_like import IMAGE_SIZES
    src = _source(coco_panoptic_like_dir, "train")
    sizes = [src.image_size(i) for i in range(len(src))]
    assert sizes == [src[i]["image"].shape[:2] for i in range(len(src))]
    assert set(sizes) <= set(IMAGE_SIZES) and len(set(sizes)) >= 3
    assert src.image_ids == tuple(src[i]["image_id"] for i in range(len(src)))


@needs_tfds
def test_a_mismatched_record_of_the_source_is_named(coco_panoptic_like_dir):
    src = _source(coco_panoptic_like_dir, "validation")
    records = src._source

    class Unlisted:  # the record's last object is gone from panoptic_objects, its pixels stay in the PNG
        def __getitem__(self, index):
            record = records[index]
            record["panoptic_objects"] = {k: v[:-1] for k, v in record["panoptic_objects"].items()}
            return record

    src._source = Unlisted()
    with pytest.raises(AnnotationError, match=r"^tfds coco_panoptic_like validation record 3 \(image id 1000004\): "
                                              r"the panoptic PNG has segment ids \[\d+\] that panoptic_objects"):
        src[3]


@needs_tfds
def test_build_data_batches_carry_target_masks(coco_panoptic_like_dir):
    from detr_jax.config import check_config
    from tests.configs import tiny

    assert "tfds_panoptic" in PANOPTIC_SOURCES
    config = tiny.get_config()
    config.data.source = "tfds_panoptic"
    config.data.source_kwargs = dict(name="coco_panoptic_like", data_dir=coco_panoptic_like_dir,
                                     label_space="contiguous")
    config.data.train_kwargs = dict(split="train")
    config.data.val_kwargs = dict(split="validation")
    config.data.max_objects = 12
    config.model.update(num_classes=133, hidden_dim=128, num_heads=8)
    config.panoptic.enabled = True
    check_config(config)  # a panoptic source
    with build_data(config, "train", train=True, batch_size=4) as loader:
        batch = next(iter(loader))
    masks, valid = batch["target_masks"], batch["mask"]
    assert masks.dtype == bool and masks.shape == (4, 12) + batch["images"].shape[1:3]
    assert valid.any() and not masks[~valid].any()
    assert all(masks[i, k].any() for i, k in zip(*np.nonzero(valid)))  # every real object has pixels
