"""COCO folder source: round trip with the synthetic export, label spaces, crowd, zero-area, bad input."""

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from detr_jax.data import build_source
from detr_jax.data.sources.coco_folder import AnnotationError, CocoFolder, ImageReadError
from detr_jax.data.sources.synthetic import SyntheticDetection, write_coco_folder


@pytest.fixture(scope="module")
def synthetic():
    return SyntheticDetection("val", num_examples=8, image_size=[(40, 56), (56, 40)], seed=0)


@pytest.fixture(scope="module")
def exported(synthetic, tmp_path_factory):
    return write_coco_folder(synthetic, str(tmp_path_factory.mktemp("coco")))


def test_round_trip_equals_synthetic(synthetic, exported):
    src = CocoFolder(*exported)
    assert len(src) == len(synthetic)
    assert src.class_names == synthetic.class_names and src.num_classes == synthetic.num_classes
    for i in range(len(src)):
        a, b = src[i], synthetic[i]
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
        assert a["boxes"].dtype == np.float32 and a["labels"].dtype == np.int32 and a["iscrowd"].dtype == bool
        assert src.image_size(i) == a["orig_size"]
    assert src.stats["zero_area_dropped"] == 0 and src.stats["objects"] == sum(len(synthetic[i]["labels"])
                                                                               for i in range(len(synthetic)))


def test_matches_pycocotools(exported):
    src = CocoFolder(*exported)
    coco = COCO(exported[0])
    for i, image_id in enumerate(sorted(coco.getImgIds())):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False))
        xywh = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
        ex = src[i]
        assert ex["image_id"] == image_id
        np.testing.assert_allclose(ex["boxes"], np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1))


def test_jpeg_folder_reads(synthetic, tmp_path):
    src = CocoFolder(*write_coco_folder(synthetic, str(tmp_path), indices=[0, 1], image_format="jpg"))
    ex = src[0]
    assert ex["image"].shape == synthetic[0]["image"].shape
    diff = ex["image"].astype(int) - synthetic[0]["image"]  # lossy (and the noise backgrounds compress badly)
    assert np.abs(diff.mean(axis=(0, 1))).max() < 3 and np.abs(diff).mean() < 30


def test_sparse_category_ids(synthetic, tmp_path):
    sparse = (3, 7, 11, 20, 42)
    ann_file, image_dir = write_coco_folder(synthetic, str(tmp_path), category_ids=sparse)
    contiguous = CocoFolder(ann_file, image_dir)
    assert contiguous.category_ids == sparse and contiguous.num_classes == 5
    official = build_source("coco_folder", ann_file=ann_file, image_dir=image_dir, label_space="official91")
    assert official.num_classes == 43 and official.category_ids == tuple(range(43))
    assert official.class_names[7] == synthetic.class_names[1] and official.class_names[0] == "N/A"
    for i in range(len(synthetic)):
        labels = synthetic[i]["labels"]
        np.testing.assert_array_equal(contiguous[i]["labels"], labels)
        np.testing.assert_array_equal(official[i]["labels"], np.asarray(sparse)[labels])


def _write(tmp_path, annotations, images=None, categories=None):
    """A hand-made folder: two 20x30 (h x w) images and the given annotations."""
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    if images is None:
        images = []
        for image_id in (1, 2):
            Image.fromarray(np.full((20, 30, 3), 40 * image_id, np.uint8)).save(image_dir / f"{image_id}.png")
            images.append({"id": image_id, "file_name": f"{image_id}.png", "height": 20, "width": 30})
    categories = categories or [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}]
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(ann_file), str(image_dir)


def _ann(ann_id, bbox, category_id=5, image_id=1, iscrowd=0):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": iscrowd,
            "area": 1.0}


def test_crowd_dropped_for_training_kept_for_eval(tmp_path):
    paths = _write(tmp_path, [_ann(1, [1, 1, 5, 5]), _ann(2, [2, 2, 10, 8], category_id=9, iscrowd=1)])
    train = CocoFolder(*paths)
    assert train.stats["crowd_dropped"] == 1
    np.testing.assert_array_equal(train[0]["labels"], [0])
    evaluation = CocoFolder(*paths, keep_crowd=True)
    ex = evaluation[0]
    np.testing.assert_array_equal(ex["labels"], [0, 1])
    np.testing.assert_array_equal(ex["iscrowd"], [False, True])
    np.testing.assert_array_equal(ex["boxes"][1], [2, 2, 12, 10])


def test_clipping_and_zero_area_counted(tmp_path, caplog):
    paths = _write(tmp_path, [
        _ann(1, [-5, 2, 10, 30]),      # clipped to [0, 2, 5, 20]
        _ann(2, [3, 3, 0, 4]),         # zero width
        _ann(3, [40, 5, 6, 6]),        # entirely right of the 30-wide image
        _ann(4, [1, 1, 2, 2], image_id=2),
    ])
    with caplog.at_level(logging.WARNING):
        src = CocoFolder(*paths)
    assert src.stats["zero_area_dropped"] == 2 and src.stats["objects"] == 2
    assert "zero area" in caplog.text
    np.testing.assert_array_equal(src[0]["boxes"], [[0, 2, 5, 20]])
    assert src[1]["boxes"].shape == (1, 4)


def test_images_without_annotations_are_kept(tmp_path):
    src = CocoFolder(*_write(tmp_path, [_ann(1, [1, 1, 5, 5])]))
    assert len(src) == 2
    ex = src[1]
    assert ex["boxes"].shape == (0, 4) and ex["labels"].shape == (0,)


@pytest.mark.parametrize("bad,message", [
    ({"bbox": [1, 2, 3]}, "annotation id 7 has bbox"),
    ({"bbox": [1, 2, "3", 4]}, "annotation id 7 has bbox"),
    ({"bbox": [1, 2, float("nan"), 4]}, "annotation id 7 has bbox"),
    ({"bbox": [1, 2, -3, 4]}, "annotation id 7 has bbox .* negative"),
    ({"category_id": 6}, "annotation id 7 has category_id 6, which is not in 'categories'"),
    ({"image_id": 99}, "annotation id 7 refers to image id 99"),
])
def test_malformed_annotation_names_its_id(tmp_path, bad, message):
    ann = dict(_ann(7, [1, 1, 4, 4]), **bad)
    with pytest.raises(AnnotationError, match=message):
        CocoFolder(*_write(tmp_path, [_ann(1, [1, 1, 2, 2]), ann]))


def test_label_beyond_num_classes_names_annotation(tmp_path):
    paths = _write(tmp_path, [_ann(1, [1, 1, 2, 2]), _ann(8, [1, 1, 4, 4], category_id=9)])
    with pytest.raises(AnnotationError, match="annotation id 8 has label 1 .*>= num_classes=1"):
        CocoFolder(*paths, num_classes=1)
    with pytest.raises(AnnotationError, match="annotation id 8 has label 9 .*>= num_classes=6"):
        CocoFolder(*paths, label_space="official91", num_classes=6)
    assert CocoFolder(*paths, label_space="official91", num_classes=91).num_classes == 91


def test_missing_and_corrupt_images(tmp_path, caplog):
    paths = _write(tmp_path, [_ann(1, [1, 1, 5, 5]), _ann(2, [1, 1, 5, 5], image_id=2)])
    with open(os.path.join(paths[1], "2.png"), "wb") as f:
        f.write(b"\x89PNG not really")
    with pytest.raises(ImageReadError, match="2.png"):  # unreadable: found when read
        CocoFolder(*paths)[1]
    os.remove(os.path.join(paths[1], "1.png"))
    # Missing: found at start, before any training, with how many and what to do.
    with pytest.raises(ImageReadError, match=r"1 of the 2 image files .* are missing .*1.png \(image id 1\); "
                                             r"restore them, or set skip_bad_images=True"):
        CocoFolder(*paths)


def test_skip_bad_images_counts_and_logs(tmp_path, caplog):
    paths = _write(tmp_path, [_ann(1, [1, 1, 5, 5]), _ann(2, [2, 2, 5, 5], image_id=2)])
    os.remove(os.path.join(paths[1], "1.png"))
    with caplog.at_level(logging.WARNING):
        src = CocoFolder(*paths, skip_bad_images=True)
    assert len(src) == 1 and src[0]["image_id"] == 2  # dropped at start, with its annotations
    assert src.stats["missing_images_skipped"] == 1 and "1.png" in caplog.text
    paths = _write(tmp_path, [_ann(1, [1, 1, 5, 5]), _ann(2, [2, 2, 5, 5], image_id=2)])
    src = CocoFolder(*paths, skip_bad_images=True)
    with open(os.path.join(paths[1], "1.png"), "wb") as f:  # unreadable after the start
        f.write(b"\x89PNG not really")
    with caplog.at_level(logging.WARNING):
        ex = src[0]
        src[0]
    assert ex["image_id"] == 2  # replaced by the next readable image
    assert src.stats["bad_images_skipped"] == 1


def test_image_size_mismatch_names_file(tmp_path):
    paths = _write(tmp_path, [_ann(1, [1, 1, 5, 5])])
    Image.fromarray(np.zeros((21, 30, 3), np.uint8)).save(os.path.join(paths[1], "1.png"))
    with pytest.raises(ImageReadError, match="1.png.*21x30"):
        CocoFolder(*paths)[0]


def test_missing_width_height_reads_header(tmp_path):
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    Image.fromarray(np.zeros((12, 17, 3), np.uint8)).save(image_dir / "a.png")
    paths = _write(tmp_path, [_ann(1, [10, 0, 20, 20])], images=[{"id": 1, "file_name": "a.png"}])
    ex = CocoFolder(*paths)[0]
    np.testing.assert_array_equal(ex["boxes"], [[10, 0, 17, 12]])


def test_bad_files_and_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoFolder(str(tmp_path / "nope.json"), str(tmp_path))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(AnnotationError, match="bad.json"):
        CocoFolder(str(tmp_path / "bad.json"), str(tmp_path))
    with pytest.raises(ValueError, match="label_space"):
        CocoFolder(str(tmp_path / "bad.json"), str(tmp_path), label_space="coco80")
