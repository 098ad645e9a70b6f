"""Panoptic data: the COCO panoptic folder (read back exactly, bad input), the synthetic set, mask-carrying
transforms (boxes stay the masks' extents; nearest mask resize equals torch's)."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from detr_jax.data import transforms
from detr_jax.data.panoptic_transforms import (
    crop,
    hflip,
    make_panoptic_eval_transforms,
    make_panoptic_train_transforms,
    masks_to_boxes,
    resize,
    resize_masks,
)
from detr_jax.data.sources.coco_folder import AnnotationError, ImageReadError
from detr_jax.data.sources.coco_panoptic_folder import CocoPanopticFolder
from detr_jax.data.sources.synthetic_panoptic import SyntheticPanoptic, write_coco_panoptic_folder
from detr_jax.ops.panoptic_ids import id2rgb

# A hand-made 6 x 8 panoptic image: ids use all three PNG channels; 0 is void.
A, B, C, D = 7, 300, 70000, 42  # thing, stuff, crowd thing, thing (second image)
ID_MAP = np.array([
    [B, B, B, B, B, B, B, B],
    [B, A, A, 0, B, B, B, B],
    [B, A, A, 0, B, C, C, B],
    [B, B, A, B, B, C, C, B],
    [0, 0, 0, 0, B, B, B, B],
    [B, B, B, B, B, B, B, B],
])
CATEGORIES = [{"id": 1, "name": "person", "isthing": 1}, {"id": 3, "name": "car", "isthing": 1},
              {"id": 184, "name": "tree-merged", "isthing": 0}]


def _write_folder(root, id_maps=None, segments=None, categories=CATEGORIES):
    """A COCO panoptic folder of the given id maps; returns (ann_file, image_dir, panoptic_dir)."""
    if id_maps is None:
        id_maps = (ID_MAP, np.where(ID_MAP == A, D, ID_MAP))
    segments = segments or [
        [{"id": A, "category_id": 1, "iscrowd": 0}, {"id": B, "category_id": 184, "iscrowd": 0},
         {"id": C, "category_id": 3, "iscrowd": 1}],
        [{"id": C, "category_id": 3, "iscrowd": 1}, {"id": D, "category_id": 3}, {"id": B, "category_id": 184}],
    ]
    image_dir, pan_dir = os.path.join(root, "images"), os.path.join(root, "panoptic")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(pan_dir, exist_ok=True)
    images, annotations = [], []
    for n, (id_map, segs) in enumerate(zip(id_maps, segments)):
        image_id = 10 - n  # descending, so the source must sort them
        h, w = id_map.shape
        pixels = np.random.default_rng(n).integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(image_dir, f"{image_id}.png"))
        Image.fromarray(id2rgb(id_map)).save(os.path.join(pan_dir, f"{image_id}_pan.png"))
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": h, "width": w})
        annotations.append({"image_id": image_id, "file_name": f"{image_id}_pan.png", "segments_info": segs})
    ann_file = os.path.join(root, "panoptic.json")
    with open(ann_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return ann_file, image_dir, pan_dir


def test_folder_reads_back_exactly(tmp_path):
    src = CocoPanopticFolder(*_write_folder(str(tmp_path)))
    assert len(src) == 2 and src.image_ids == [9, 10]
    assert src.num_classes == 250 and len(src.class_names) == 250
    assert src.class_names[184] == "tree-merged" and src.class_names[2] == "N/A" and src.category_ids[184] == 184
    assert src.is_thing[1] and src.is_thing[3] and not src.is_thing[184] and not src.is_thing[0]
    ex = src[1]  # image id 10, the first written
    assert ex["image_id"] == 10 and ex["orig_size"] == (6, 8) and src.image_size(1) == (6, 8)
    np.testing.assert_array_equal(ex["image"], np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8))
    np.testing.assert_array_equal(ex["segment_ids"], [A, B, C])
    np.testing.assert_array_equal(ex["masks"], [ID_MAP == A, ID_MAP == B, ID_MAP == C])
    assert ex["masks"].dtype == bool and ex["boxes"].dtype == np.float32 and ex["labels"].dtype == np.int32
    np.testing.assert_array_equal(ex["labels"], [1, 184, 3])
    np.testing.assert_array_equal(ex["iscrowd"], [False, False, True])
    # Extents by hand, x1/y1 exclusive: A spans columns 1-2, rows 1-3; B everything; C columns 5-6, rows 2-3.
    np.testing.assert_array_equal(ex["boxes"], [[1, 1, 3, 4], [0, 0, 8, 6], [5, 2, 7, 4]])
    ex = src[0]
    np.testing.assert_array_equal(ex["segment_ids"], [C, D, B])
    np.testing.assert_array_equal(ex["labels"], [3, 3, 184])
    np.testing.assert_array_equal(ex["iscrowd"], [True, False, False])


def test_folder_contiguous_labels_and_crowd_drop(tmp_path):
    src = CocoPanopticFolder(*_write_folder(str(tmp_path)), label_space="contiguous", keep_crowd=False)
    assert src.category_ids == (1, 3, 184) and src.class_names == ("person", "car", "tree-merged")
    assert src.is_thing == (True, True, False) and src.num_classes == 3
    ex = src[1]
    np.testing.assert_array_equal(ex["labels"], [0, 2])
    np.testing.assert_array_equal(ex["segment_ids"], [A, B])
    np.testing.assert_array_equal(ex["masks"], [ID_MAP == A, ID_MAP == B])  # the crowd pixels are now void
    assert not ex["iscrowd"].any()
    with pytest.raises(AnnotationError, match="num_classes=100"):
        CocoPanopticFolder(*_write_folder(str(tmp_path)), num_classes=100)


def test_synthetic_round_trip_through_folder(tmp_path):
    synthetic = SyntheticPanoptic("val", num_examples=3, image_size=[(48, 64), (64, 48)], seed=1)
    src = CocoPanopticFolder(*write_coco_panoptic_folder(synthetic, str(tmp_path)), label_space="contiguous")
    assert src.class_names == synthetic.class_names and src.is_thing == synthetic.is_thing
    for i in range(3):
        a, b = src[i], synthetic[i]
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def _expect_error(tmp_path, error, match, **kwargs):
    with pytest.raises(error, match=match):
        src = CocoPanopticFolder(*_write_folder(str(tmp_path), **kwargs))
        for i in range(len(src)):
            src[i]


def test_missing_png_names_file(tmp_path):
    ann_file, image_dir, pan_dir = _write_folder(str(tmp_path))
    os.remove(os.path.join(pan_dir, "9_pan.png"))
    with pytest.raises(ImageReadError, match=r"1 of the 2 panoptic PNG files.*9_pan\.png \(image id 9\)"):
        CocoPanopticFolder(ann_file, image_dir, pan_dir)


def test_unreadable_png_names_file(tmp_path):
    ann_file, image_dir, pan_dir = _write_folder(str(tmp_path))
    with open(os.path.join(pan_dir, "10_pan.png"), "wb") as f:
        f.write(b"not a png")
    src = CocoPanopticFolder(ann_file, image_dir, pan_dir)
    src[0]
    with pytest.raises(ImageReadError, match=r"panoptic PNG .*10_pan\.png \(image id 10\)"):
        src[1]


def test_segment_missing_from_png_names_png_and_segment(tmp_path):
    segments = [[{"id": A, "category_id": 1}, {"id": B, "category_id": 184}, {"id": C, "category_id": 3},
                 {"id": 99, "category_id": 3}], [{"id": C, "category_id": 3}, {"id": D, "category_id": 3},
                                                 {"id": B, "category_id": 184}]]
    _expect_error(tmp_path, AnnotationError, r"segment ids \[99\] of image id 10 are not in its panoptic PNG .*10_pan",
                  segments=segments)


def test_png_segment_missing_from_json(tmp_path):
    segments = [[{"id": A, "category_id": 1}, {"id": B, "category_id": 184}],
                [{"id": C, "category_id": 3}, {"id": D, "category_id": 3}, {"id": B, "category_id": 184}]]
    _expect_error(tmp_path, AnnotationError, r"10_pan\.png \(image id 10\) has segment ids \[70000\]",
                  segments=segments)


@pytest.mark.parametrize("bad_segment, match", [
    ({"id": A, "category_id": 2}, r"image id 10 \(10_pan.png\): segment id 7 has category_id 2"),
    ({"id": "7", "category_id": 1}, r"image id 10 \(10_pan.png\): segment .* positive integer 'id'"),
    ({"id": A, "category_id": 1, "iscrowd": 2}, r"image id 10 .*segment id 7 has iscrowd 2"),
])
def test_malformed_segment_names_record(tmp_path, bad_segment, match):
    segments = [[bad_segment, {"id": B, "category_id": 184}, {"id": C, "category_id": 3}],
                [{"id": C, "category_id": 3}, {"id": D, "category_id": 3}, {"id": B, "category_id": 184}]]
    _expect_error(tmp_path, AnnotationError, match, segments=segments)


def test_malformed_fields_name_record(tmp_path):
    _expect_error(tmp_path / "a", AnnotationError, "category id 3 needs 'isthing'",
                  categories=[CATEGORIES[0], {"id": 3, "name": "car"}, CATEGORIES[2]])
    ann_file, image_dir, pan_dir = _write_folder(str(tmp_path / "b"))
    with open(ann_file) as f:
        data = json.load(f)
    data["annotations"][1]["segments_info"] = None
    with open(ann_file, "w") as f:
        json.dump(data, f)
    with pytest.raises(AnnotationError, match=r"image id 9 \(9_pan.png\) needs a 'segments_info' list"):
        CocoPanopticFolder(ann_file, image_dir, pan_dir)
    data["annotations"].pop(1)
    with open(ann_file, "w") as f:
        json.dump(data, f)
    with pytest.raises(AnnotationError, match=r"no entry in 'annotations', e.g. image id 9 \(9.png\)"):
        CocoPanopticFolder(ann_file, image_dir, pan_dir)


def test_image_sizes_as_whole_floats_are_read_and_others_named(tmp_path):
    """height/width written as 6.0 (as some converters do) read as 6, as in the detection folder; 6.5, 0 and
    "6" are refused naming the image id."""
    ann_file, image_dir, pan_dir = _write_folder(str(tmp_path))
    with open(ann_file) as f:
        data = json.load(f)
    for height, width in ((6.0, 8.0), (6.5, 8), (0, 8), ("6", 8)):
        data["images"][0].update(height=height, width=width)  # image id 10
        with open(ann_file, "w") as f:
            json.dump(data, f)
        if height == 6.0:
            src = CocoPanopticFolder(ann_file, image_dir, pan_dir)
            assert src.image_size(1) == (6, 8) and src[1]["orig_size"] == (6, 8)
            assert all(type(v) is int for v in src.image_size(1))  # not 6.0: sizes index arrays
            continue
        with pytest.raises(AnnotationError, match=f"image id 10 has height {height!r} and width 8; expected "
                                                   "positive integers"):
            CocoPanopticFolder(ann_file, image_dir, pan_dir)


# --- synthetic -------------------------------------------------------------------------------------

def test_synthetic_deterministic_and_complete():
    ds = SyntheticPanoptic("train", num_examples=40, seed=3)
    again = SyntheticPanoptic("train", num_examples=40, seed=3)
    other = SyntheticPanoptic("train", num_examples=40, seed=4)
    val = SyntheticPanoptic("val", num_examples=40, seed=3)
    things = []
    for i in range(len(ds)):
        ex = ds[i]
        for k, v in ex.items():
            np.testing.assert_array_equal(np.asarray(v), np.asarray(again[i][k]), err_msg=k)
        h, w = ex["orig_size"]
        assert ex["image"].shape == (h, w, 3) and ex["masks"].shape == (len(ex["labels"]), h, w)
        np.testing.assert_array_equal(ex["masks"].sum(axis=0), 1)  # every pixel in exactly one segment
        np.testing.assert_array_equal(ex["boxes"], masks_to_boxes(ex["masks"]))
        is_thing = np.asarray(ds.is_thing)[ex["labels"]]
        stuff = ex["labels"][~is_thing]
        assert len(set(stuff.tolist())) == len(stuff) >= 1  # one segment per stuff class
        things.append(int(is_thing.sum()))
        areas = ex["masks"][is_thing].sum(axis=(1, 2))
        assert (areas >= 0.5 * 0.15 ** 2 * 128 ** 2 * 0.4).all()  # half of the smallest triangle stays visible
        # Things are solid colours: one colour per thing mask.
        for m in ex["masks"][is_thing]:
            assert len(np.unique(ex["image"][m], axis=0)) == 1
    assert 1 <= min(things) and max(things) <= 6 and len(set(things)) >= 4
    assert not all(np.array_equal(ds[i]["image"], other[i]["image"]) for i in range(3))
    assert not np.array_equal(ds[0]["image"], val[0]["image"])
    assert ds.image_size(5) == ds[5]["orig_size"]


# --- transforms -----------------------------------------------------------------------------------

def _assert_boxes_are_extents(target, image_hw, atol):
    masks = target["masks"]
    assert masks.shape[1:] == tuple(image_hw) and masks.dtype == bool
    n = len(masks)
    for key in ("boxes", "labels", "iscrowd", "segment_ids"):
        assert len(target[key]) == n, key
    assert masks.any(axis=(1, 2)).all()
    np.testing.assert_allclose(target["boxes"], masks_to_boxes(masks), atol=atol)


@pytest.mark.parametrize("in_hw, out_hw", [((6, 8), (13, 17)), ((37, 23), (12, 9)), ((128, 128), (100, 150)),
                                           ((5, 7), (5, 7)), ((30, 40), (45, 60))])
def test_mask_resize_matches_torch_nearest(in_hw, out_hw):
    masks = np.random.default_rng(0).random((3,) + in_hw) < 0.3
    official = torch.nn.functional.interpolate(torch.as_tensor(masks)[:, None].float(), out_hw,
                                               mode="nearest")[:, 0] > 0.5
    np.testing.assert_array_equal(resize_masks(masks, out_hw), official.numpy())


def test_hflip_resize_crop_keep_masks_and_boxes_consistent():
    ds = SyntheticPanoptic("train", num_examples=5, seed=0)
    ex = ds[0]
    image, target = ex["image"], {k: v for k, v in ex.items() if k != "image"}
    flipped_image, flipped = hflip(image, target)
    np.testing.assert_array_equal(flipped["masks"], ex["masks"][:, :, ::-1])
    np.testing.assert_array_equal(flipped_image, image[:, ::-1])
    _assert_boxes_are_extents(flipped, (128, 128), atol=0)  # exact with exclusive maxima
    for size in [(200, 150), (57, 91)]:
        resized_image, resized = resize(image, target, size)
        assert resized_image.shape[:2] == size
        _assert_boxes_are_extents(resized, size, atol=1.0)
    for region in [(10, 20, 50, 70), (0, 0, 128, 128), (100, 3, 28, 40)]:
        cropped_image, cropped = crop(image, target, region)
        _assert_boxes_are_extents(cropped, region[2:], atol=0)
        expected_masks = ex["masks"][:, region[0]:region[0] + region[2], region[1]:region[1] + region[3]]
        kept = expected_masks.any(axis=(1, 2))
        np.testing.assert_array_equal(cropped["masks"], expected_masks[kept])
        np.testing.assert_array_equal(cropped["segment_ids"], ex["segment_ids"][kept])
        np.testing.assert_array_equal(cropped["labels"], ex["labels"][kept])


def test_official_crop_semantics():
    """boxes_from_masks=False: boxes clipped, objects kept by clipped box area as transforms.crop."""
    masks = np.zeros((3, 10, 10), bool)
    masks[0, 0:4, 0:4] = np.tril(np.ones((4, 4), bool))  # lower triangle: its box corner (0, 3) has no pixels
    masks[1, 6:9, 6:9] = True
    masks[2, 0:2, 8:10] = True
    target = {"boxes": masks_to_boxes(masks), "labels": np.array([5, 6, 7], np.int32), "masks": masks,
              "segment_ids": np.array([1, 2, 3], np.int32), "iscrowd": np.zeros(3, bool)}
    image = np.zeros((10, 10, 3), np.uint8)
    region = (0, 3, 2, 5)  # rows 0-1, columns 3-7: box 0's empty corner, nothing of 1, next to 2
    _, official = crop(image, target, region, boxes_from_masks=False)
    _, reference = transforms.crop(image, {k: target[k] for k in ("boxes", "labels")}, region)
    np.testing.assert_array_equal(official["labels"], reference["labels"])
    np.testing.assert_array_equal(official["boxes"], reference["boxes"])
    np.testing.assert_array_equal(official["labels"], [5])
    assert not official["masks"].any()  # kept for its box although its mask is empty here (official)
    _, consistent = crop(image, target, region)
    assert len(consistent["labels"]) == 0 and consistent["masks"].shape == (0, 2, 5)


def test_train_and_eval_pipelines_keep_masks_consistent():
    ds = SyntheticPanoptic("train", num_examples=30, seed=2)
    train = make_panoptic_train_transforms(scales=(96, 112, 128), max_size=213, crop_resize_scales=(80, 100, 120),
                                           crop_size=(64, 120), normalize_pixels=False)
    detection = transforms.make_train_transforms(scales=(96, 112, 128), max_size=213,
                                                 crop_resize_scales=(80, 100, 120), crop_size=(64, 120),
                                                 normalize_pixels=False)
    evaluation = make_panoptic_eval_transforms(96, 213, normalize_pixels=False)
    for i in range(len(ds)):
        ex = ds[i]
        target = {k: v for k, v in ex.items() if k != "image"}
        for pipeline, seed in ((train, i), (evaluation, 0)):
            image, out = pipeline(ex["image"], target, np.random.default_rng(seed))
            h, w = image.shape[:2]
            assert pipeline.output_size(ex["orig_size"], np.random.default_rng(seed)) == (h, w)
            cxcywh = out["boxes"] * np.array([w, h, w, h], np.float32)
            out["boxes"] = np.concatenate([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], 1)
            # Two resizes each move an edge by under a pixel at most.
            _assert_boxes_are_extents(out, (h, w), atol=2.0)
        # Same random draws as the detection recipe: the same images.
        det_image, _ = detection(ex["image"], {"boxes": ex["boxes"], "labels": ex["labels"]},
                                 np.random.default_rng(i))
        pan_image, _ = train(ex["image"], target, np.random.default_rng(i))
        np.testing.assert_array_equal(det_image, pan_image)


@pytest.mark.parametrize("train", [True, False])
def test_build_data_batches_carry_the_masks_with_the_boxes(train):
    """A panoptic source through `build_data`: the panoptic transforms move the masks, and the batch has them as
    "target_masks" bool [B, M, H, W] at the padded size: each real object's mask spans its box (cxcywh, normalised
    by the unpadded size), padding objects and padding pixels are empty."""
    from detr_jax.data import build_data
    from tests.configs import tiny

    config = tiny.get_config()
    config.data.source = "synthetic_panoptic"
    config.data.source_kwargs = dict(image_size=(64, 64), seed=0)
    config.data.train_kwargs = dict(split="train", num_examples=16)
    config.data.val_kwargs = dict(split="val", num_examples=4)
    config.model.num_classes = 6
    config.panoptic.enabled = True
    with build_data(config, "train" if train else "val", train=train, batch_size=4) as loader:
        batch = next(iter(loader))
    masks, boxes, valid = batch["target_masks"], batch["boxes"], batch["mask"]
    assert masks.dtype == bool and masks.shape == (4, config.data.max_objects) + batch["images"].shape[1:3]
    assert not masks[~valid].any() and valid.any()
    for i in range(4):
        h, w = batch["size"][i]
        assert not masks[i][:, h:].any() and not masks[i][:, :, w:].any()
        for k in np.flatnonzero(valid[i]):
            rows, cols = np.nonzero(masks[i, k])
            cx, cy, bw, bh = boxes[i, k] * np.array([w, h, w, h])
            extent = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
            np.testing.assert_allclose(extent, [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], atol=2.01)


def test_mask_loss_points_carry_the_masks_at_the_drawn_pixels():
    """config.panoptic.mask_loss_points: the same batch (the points are drawn after the augmentation), with
    "mask_points" int32 [B, P] and "target_masks" bool [B, M, P] equal to the whole masks read at those pixels."""
    from detr_jax.data import build_data
    from tests.configs import tiny

    config = tiny.get_config()
    config.data.source = "synthetic_panoptic"
    config.data.source_kwargs = dict(image_size=(64, 64), seed=0)
    config.data.train_kwargs = dict(split="train", num_examples=16)
    config.model.num_classes = 6
    config.panoptic.enabled = True
    with build_data(config, "train", train=True, batch_size=4) as loader:
        whole = next(iter(loader))
    config.panoptic.mask_loss_points = 300
    with build_data(config, "train", train=True, batch_size=4) as loader:
        sampled = next(iter(loader))
    for key in ("images", "boxes", "labels", "mask"):
        np.testing.assert_array_equal(sampled[key], whole[key])
    points, masks = sampled["mask_points"], sampled["target_masks"]
    height, width = whole["images"].shape[1:3]
    assert points.shape == (4, 300) and points.dtype == np.int32 and masks.shape == (4, config.data.max_objects, 300)
    assert 0 <= points.min() and points.max() < height * width
    flat = whole["target_masks"].reshape(4, config.data.max_objects, -1)
    np.testing.assert_array_equal(masks, np.take_along_axis(flat, points[:, None, :].astype(np.int64), axis=2))
    assert masks.any() and len(np.unique(points[0])) > 250  # spread over the image, not one pixel


def test_without_panoptic_enabled_a_panoptic_source_trains_the_detector_on_its_boxes():
    """The official recipe's first stage (the box model): config.panoptic.enabled False on a panoptic source gives
    detection batches (no masks travel) with the same images and boxes (things and stuff) as the panoptic ones."""
    from detr_jax.data import build_data
    from tests.configs import tiny

    config = tiny.get_config()
    config.data.source = "synthetic_panoptic"
    config.data.source_kwargs = dict(image_size=(64, 64), seed=0)
    config.data.val_kwargs = dict(split="val", num_examples=4)
    config.model.num_classes = 6
    with build_data(config, "val", train=False, batch_size=4) as loader:
        boxes_only = next(iter(loader))
        assert not hasattr(loader.source, "is_thing") and loader.source.class_names[3] == "sky"
    config.panoptic.enabled = True
    with build_data(config, "val", train=False, batch_size=4) as loader:
        panoptic = next(iter(loader))
    assert "target_masks" not in boxes_only and "target_masks" in panoptic
    for key in ("images", "boxes", "labels", "mask"):
        np.testing.assert_array_equal(boxes_only[key], panoptic[key])
    assert (boxes_only["labels"][boxes_only["mask"]] >= 3).any()  # stuff boxes too
