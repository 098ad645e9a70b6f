"""Transforms keep boxes and pixels consistent, and match the official rounding and crop rules."""

import numpy as np
import pytest

from detr_jax.data import transforms as T

# Each object is a filled rectangle in a pure primary colour on black: object k owns channel k, so a pixel
# belongs to it when that channel is above half (bilinear blending with black only darkens it).
_LABELS = np.array([0, 1, 2], np.int32)


def _scene(rng, h=60, w=80):
    """uint8 [h, w, 3] with three non-overlapping rectangles and their target (boxes xyxy absolute)."""
    image = np.zeros((h, w, 3), np.uint8)
    boxes = []
    columns = np.linspace(0, w, 4).astype(int)  # one vertical band per object: no overlaps
    for k in range(3):
        x0 = int(rng.integers(columns[k], columns[k + 1] - 6))
        x1 = int(rng.integers(x0 + 4, columns[k + 1] + 1))
        y0 = int(rng.integers(0, h - 6))
        y1 = int(rng.integers(y0 + 4, h + 1))
        image[y0:y1, x0:x1, k] = 255
        boxes.append((x0, y0, x1, y1))
    target = {"boxes": np.asarray(boxes, np.float32), "labels": _LABELS.copy(), "iscrowd": np.array([0, 1, 0], bool),
              "image_id": 7, "orig_size": (h, w)}
    return image, target


def _extent(image, channel):
    """xyxy (exclusive max) of the pixels where `channel` is above half, or None."""
    ys, xs = np.nonzero(image[..., channel] > 127)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def _check_consistent(image, target, tol):
    """Every kept box is tight around its colour (within tol px) and every visible colour has its box."""
    assert image.dtype == np.uint8 and image.ndim == 3
    boxes = np.asarray(target["boxes"])
    assert boxes.shape == (len(target["labels"]), 4) and boxes.dtype == np.float32
    assert len(target["iscrowd"]) == len(target["labels"])
    h, w = image.shape[:2]
    assert tuple(target.get("size", (h, w))) == (h, w)
    for channel in range(3):
        extent = _extent(image, channel)
        kept = np.flatnonzero(np.asarray(target["labels"]) == channel)
        if extent is None:  # allowed only for a sliver that resampling blended below half
            assert len(kept) == 0 or min(boxes[kept[0], 2:] - boxes[kept[0], :2]) <= tol, \
                f"label {channel} kept with box {boxes[kept]} but its pixels are gone"
            continue
        assert len(kept) == 1, f"label {channel} visible but its box was dropped"
        box = boxes[kept[0]]
        np.testing.assert_allclose(box, extent, atol=tol, err_msg=f"box of label {channel} not tight")
        assert 0 <= box[0] < box[2] <= w + 1e-4 and 0 <= box[1] < box[3] <= h + 1e-4


@pytest.mark.parametrize("image_hw,size,max_size,expected", [
    ((480, 640), 800, 1333, (800, 1066)),       # int() truncation of 1066.67
    ((427, 640), 800, 1333, (800, 1199)),
    ((640, 427), 800, 1333, (1199, 800)),
    ((100, 1000), 800, 1333, (133, 1330)),      # capped: size = round(1333 * 100 / 1000) = 133
    ((480, 640), 480, 1333, (480, 640)),        # already the right size: unchanged
    ((600, 600), 512, None, (512, 512)),
    ((375, 500), 608, 800, (600, 800)),         # cap: round(800 * 375 / 500) = 600
])
def test_get_size_matches_official_rounding(image_hw, size, max_size, expected):
    # Expected values worked by hand from the official get_size_with_aspect_ratio.
    assert T.get_size(image_hw, size, max_size) == expected


def test_hflip_exact():
    rng = np.random.default_rng(0)
    image, target = _scene(rng)
    out, t = T.hflip(image, target)
    np.testing.assert_array_equal(out, image[:, ::-1])
    w = image.shape[1]
    b = target["boxes"]
    np.testing.assert_array_equal(t["boxes"], np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1))
    _check_consistent(out, t, tol=0)
    np.testing.assert_array_equal(target["boxes"], b)  # input untouched


@pytest.mark.parametrize("out_hw", [(60, 80), (90, 120), (45, 60), (123, 77), (30, 200)])
def test_resize_consistent(out_hw):
    for seed in range(4):
        image, target = _scene(np.random.default_rng(seed))
        out, t = T.resize(image, target, out_hw)
        assert out.shape == (*out_hw, 3)
        scale = max(image.shape[0] / out_hw[0], image.shape[1] / out_hw[1], 1.0)
        _check_consistent(out, t, tol=0.5 + scale / 2)


def test_crop_consistent_and_drops_zero_area():
    rng = np.random.default_rng(1)
    dropped = 0
    for seed in range(40):
        image, target = _scene(np.random.default_rng(seed))
        h, w = image.shape[:2]
        ch, cw = int(rng.integers(5, h)), int(rng.integers(5, w))
        region = (int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw)
        out, t = T.crop(image, target, region)
        assert out.shape == (ch, cw, 3)
        _check_consistent(out, t, tol=0)  # crops do not resample: exact
        assert len(t["area"]) == len(t["labels"])
        wh = t["boxes"][:, 2:] - t["boxes"][:, :2]
        np.testing.assert_allclose(t["area"], wh[:, 0] * wh[:, 1])
        dropped += 3 - len(t["labels"])
    assert dropped > 0, "the test should exercise dropping"


def test_crop_boxes_match_official_formula():
    # Official: boxes - [j, i, j, i], min with [w, h], clamp(min=0), keep where x1 > x0 and y1 > y0.
    target = {"boxes": np.array([[0, 0, 10, 10], [5, 5, 30, 30], [25, 2, 40, 8], [12, 12, 12, 20]], np.float32),
              "labels": np.array([1, 2, 3, 4], np.int32)}
    _, t = T.crop(np.zeros((50, 50, 3), np.uint8), target, (4, 8, 16, 16))  # top 4, left 8, 16x16
    np.testing.assert_array_equal(t["boxes"], [[0, 0, 2, 6], [0, 1, 16, 16]])
    np.testing.assert_array_equal(t["labels"], [1, 2])  # [25, 2, 40, 8] is right of the crop: x0 = 17 -> 16
    assert t["size"] == (16, 16)


def test_random_size_crop_small_image_does_not_raise():
    image, target = _scene(np.random.default_rng(0), h=20, w=30)
    out, _ = T.RandomSizeCrop(384, 600)(image, target, np.random.default_rng(0))
    assert out.shape == (20, 30, 3)


def _small_train():
    return T.make_train_transforms(scales=(48, 56, 64), max_size=100, crop_resize_scales=(40, 50, 60),
                                   crop_size=(32, 60))


def test_every_random_transform_consistent():
    pipelines = {
        "flip": T.RandomHorizontalFlip(0.5),
        "resize": T.RandomResize([40, 72, 90], max_size=120),
        "size_crop": T.RandomSizeCrop(10, 50),
        "select": T.RandomSelect(T.RandomResize([50]), T.Compose([T.RandomResize([60]), T.RandomSizeCrop(20, 40)])),
        "train_without_normalize": T.Compose(_small_train().transforms[:-1]),
    }
    for name, t in pipelines.items():
        for seed in range(12):
            image, target = _scene(np.random.default_rng(seed))
            out, tt = t(image, target, np.random.default_rng(seed))
            scale = max(image.shape[0] / out.shape[0], image.shape[1] / out.shape[1], 1.0)
            try:
                _check_consistent(out, tt, tol=1.0 + scale)
            except AssertionError as e:
                raise AssertionError(f"{name}, seed {seed}: {e}") from None


def test_normalize_pixels_and_cxcywh_boxes():
    image, target = _scene(np.random.default_rng(3))
    out, t = T.Normalize()(image, target)
    mean, std = np.array(T.IMAGENET_MEAN), np.array(T.IMAGENET_STD)
    np.testing.assert_allclose(out, (image / 255.0 - mean) / std, atol=1e-5)
    assert out.dtype == np.float32
    h, w = image.shape[:2]
    b = target["boxes"]
    expected = np.stack([(b[:, 0] + b[:, 2]) / 2 / w, (b[:, 1] + b[:, 3]) / 2 / h,
                         (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h], 1)
    np.testing.assert_allclose(t["boxes"], expected, rtol=1e-6)
    assert t["size"] == (h, w) and t["image_id"] == 7


def test_train_pipeline_output_and_output_size_prediction():
    t = _small_train()
    for seed in range(30):
        image, target = _scene(np.random.default_rng(seed))
        out, tt = t(image, target, np.random.default_rng(seed))
        assert out.dtype == np.float32
        # output_size consumes the generator exactly as __call__, so it predicts the shape without pixels.
        assert t.output_size(image.shape[:2], np.random.default_rng(seed)) == out.shape[:2]
        assert tuple(tt["size"]) == out.shape[:2]
        assert min(out.shape[:2]) in (48, 56, 64) or max(out.shape[:2]) <= 100
        assert np.all((tt["boxes"] >= 0) & (tt["boxes"] <= 1))


def test_train_pipeline_is_deterministic_given_the_generator():
    image, target = _scene(np.random.default_rng(0))
    t = _small_train()
    a = t(image, target, np.random.default_rng(5))
    b = t(image, target, np.random.default_rng(5))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1]["boxes"], b[1]["boxes"])


def test_train_pipeline_takes_both_branches_and_flips():
    t = _small_train()
    shapes, flips = set(), 0
    image = np.zeros((60, 80, 3), np.uint8)
    image[:, :40, 0] = 255
    for seed in range(40):
        out, _ = t(image, {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int32)},
                   np.random.default_rng(seed))
        shapes.add(out.shape[:2])
        flips += out[0, -1, 0] > out[0, 0, 0]  # red half moved to the right
    # The plain branch keeps the 3:4 aspect ratio; crops make others.
    aspects = {round(w / h, 2) for h, w in shapes}
    assert len(aspects) > 3 and 5 < flips < 35


def test_eval_transforms():
    image, target = _scene(np.random.default_rng(0), h=60, w=80)
    out, t = T.make_eval_transforms(size=48, max_size=100)(image, target, np.random.default_rng(0))
    assert out.shape == (48, 64, 3) and t["size"] == (48, 64)


def test_float_image_resize():
    image, target = _scene(np.random.default_rng(0))
    out_u8, _ = T.resize(image, target, (30, 40))
    out_f, _ = T.resize(image.astype(np.float32) / 255, target, (30, 40))
    assert out_f.dtype == np.float32
    np.testing.assert_allclose(out_f * 255, out_u8, atol=1.0)
