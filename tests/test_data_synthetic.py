"""The synthetic dataset: deterministic, well-formed, tight boxes, readable by pycocotools when exported."""

import numpy as np
import pytest
from pycocotools.coco import COCO

from detr_jax.data import build_source
from detr_jax.data.sources.synthetic import CLASS_NAMES, SyntheticDetection, write_coco_folder


def _equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_format():
    ds = SyntheticDetection(num_examples=20, image_size=(64, 96), seed=1)
    assert len(ds) == 20 and ds.num_classes == len(CLASS_NAMES) >= 4
    for i in range(len(ds)):
        ex = ds[i]
        assert ex["image"].shape == (64, 96, 3) and ex["image"].dtype == np.uint8
        k = len(ex["labels"])
        assert 1 <= k <= 8
        assert ex["boxes"].shape == (k, 4) and ex["boxes"].dtype == np.float32
        assert ex["labels"].dtype == np.int32 and np.all((ex["labels"] >= 0) & (ex["labels"] < ds.num_classes))
        assert ex["iscrowd"].shape == (k,) and ex["iscrowd"].dtype == bool and not ex["iscrowd"].any()
        assert ex["image_id"] == i + 1 and ex["orig_size"] == (64, 96)
        b = ex["boxes"]
        assert np.all(b[:, :2] >= 0) and np.all(b[:, 2] <= 96) and np.all(b[:, 3] <= 64)
        assert np.all(b[:, 2:] > b[:, :2])


def test_deterministic_and_split_dependent():
    a = SyntheticDetection(num_examples=5, image_size=(48, 48), seed=3)
    b = SyntheticDetection(num_examples=5, image_size=(48, 48), seed=3)
    for i in range(5):
        _equal(a[i], b[i])
    other_seed = SyntheticDetection(num_examples=5, image_size=(48, 48), seed=4)
    val = SyntheticDetection("val", num_examples=5, image_size=(48, 48), seed=3)
    assert not np.array_equal(a[0]["image"], other_seed[0]["image"])
    assert not np.array_equal(a[0]["image"], val[0]["image"])


def test_top_object_box_is_tight():
    # The last-drawn object is never occluded: its colour touches all four sides of its box.
    ds = SyntheticDetection(num_examples=30, image_size=(80, 80), seed=0)
    for i in range(len(ds)):
        ex = ds[i]
        x0, y0, x1, y1 = ex["boxes"][-1].astype(int)
        patch = ex["image"][y0:y1, x0:x1].astype(int)
        # the shape's colour is the most common colour on the box's central row or column (cross/diamond/... all
        # cover the centre)
        centre = tuple(patch[(y1 - y0) // 2, (x1 - x0) // 2])
        inside = np.all(patch == centre, axis=-1)
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any(), (i, CLASS_NAMES[
            ex["labels"][-1]])


def test_sizes_and_variety():
    ds = SyntheticDetection(num_examples=60, image_size=[(64, 64), (48, 96)], min_object_size=0.2,
                            max_object_size=0.5, seed=2)
    sizes, labels, counts = set(), [], []
    for i in range(len(ds)):
        ex = ds[i]
        assert ds.image_size(i) == ex["orig_size"] == ex["image"].shape[:2]
        sizes.add(ex["orig_size"])
        short = min(ex["orig_size"])
        wh = ex["boxes"][:, 2:] - ex["boxes"][:, :2]
        side = np.sqrt(wh[:, 0] * wh[:, 1])
        clipped = (wh[:, 0] >= ex["orig_size"][1]) | (wh[:, 1] >= ex["orig_size"][0])
        assert np.all((side >= 0.2 * short - 1) | clipped) and np.all(side <= 0.5 * short + 1)
        labels += ex["labels"].tolist()
        counts.append(len(ex["labels"]))
    assert sizes == {(64, 64), (48, 96)}
    assert set(labels) == set(range(len(CLASS_NAMES)))
    assert min(counts) <= 2 and max(counts) >= 7


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        SyntheticDetection(split="test")
    with pytest.raises(ValueError, match="min_object_size"):
        SyntheticDetection(min_object_size=0.7, max_object_size=0.5)
    with pytest.raises(IndexError):
        SyntheticDetection(num_examples=3)[3]


def test_coco_export_reads_in_pycocotools(tmp_path):
    ds = SyntheticDetection("val", num_examples=6, image_size=(40, 56), seed=0)
    ann_file, image_dir = write_coco_folder(ds, str(tmp_path))
    coco = COCO(ann_file)
    assert sorted(coco.getImgIds()) == [1, 2, 3, 4, 5, 6]
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASS_NAMES)
    for i in range(6):
        ex = ds[i]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=ex["image_id"]))
        xywh = np.array([a["bbox"] for a in anns], np.float32)
        np.testing.assert_array_equal(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1), ex["boxes"])
        assert [a["category_id"] - 1 for a in anns] == ex["labels"].tolist()


def test_build_source_factory():
    ds = build_source("synthetic", split="val", num_examples=2, image_size=(32, 32), seed=5)
    np.testing.assert_array_equal(ds[1]["image"], SyntheticDetection("val", 2, (32, 32), seed=5)[1]["image"])
    with pytest.raises(ValueError, match="unknown data source 'imagenet'"):
        build_source("imagenet")
