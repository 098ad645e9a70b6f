"""DETR's data augmentation on the host, in numpy + PIL (official `datasets/transforms.py`).

Every transform is a callable `t(image, target, rng) -> (image, target)`:
  image: uint8 or float32 [H, W, 3] numpy array.
  target: dict with "boxes" float32 [K, 4] xyxy in absolute pixels (cxcywh normalised by the image size
    after `Normalize`), "labels" int32 [K], optionally "iscrowd" bool [K] and "area" float32 [K], plus
    per-image entries ("image_id", "orig_size", ...) that pass through. Transforms never modify their inputs.
  rng: a `np.random.Generator`; all randomness comes from it, so an example's augmentation is a function of
    the generator's seed alone.
Each transform also has `output_size(size_hw, rng) -> (h, w)`, the image size it would produce, drawing the
same random numbers as `__call__`; `batching.simulate_output_sizes` uses it to pick static pad shapes.

Differences from the official code (which uses python's `random` and torchvision):
  * Random draws come from the explicit generator, so the streams differ from torch's; the distributions match.
  * RandomSizeCrop lowers `min_size` to the image side when the image is smaller than it (the official
    `random.randint` raises there); it only matters for the small configs.
  * Transforms keep a "size" entry (h, w) of the current image, as the official targets do.
"""

from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

# Per-object fields: filtered together when a crop drops objects.
PER_OBJECT_KEYS = ("boxes", "labels", "iscrowd", "area")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The official COCO recipe (`make_coco_transforms`).
COCO_TRAIN_SCALES = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
COCO_MAX_SIZE = 1333


# The longest side a resize without max_size may produce (the crop branch's RandomResize(crop_resize_scales)):
# a 1 x 4000 image resized to 400 would be 400 x 1.6M (~2 GB). Far above any COCO image's (~4000).
MAX_RESIZE_SIDE = 8192


def get_size(image_hw: Tuple[int, int], size: int, max_size: Optional[int] = None) -> Tuple[int, int]:
    """Output (h, w) for resizing the shorter side to `size` with the longer side at most `max_size`.

    Same rounding as the official `get_size_with_aspect_ratio`: the shorter side is first lowered to
    round(max_size * short / long) when the longer side would exceed max_size, then the longer side is
    truncated (int()), so the result may be one pixel under max_size.
    Extreme aspect ratios (where the official gives 0 pixels, e.g. 1 x 4000 -> (0, 0)): no side is below 1 and
    the longer side stays at most max_size (without max_size, at most MAX_RESIZE_SIDE), the aspect ratio then
    given up. Images with sides >= 1 px whose official result has no 0 keep the official numbers.
    """
    h, w = image_hw
    if h < 1 or w < 1:
        raise ValueError(f"cannot resize an image of {h}x{w} (h x w) pixels")
    if max_size is not None:
        min_original = float(min(w, h))
        max_original = float(max(w, h))
        if max_original / min_original * size > max_size:
            size = int(round(max_size * min_original / max_original))
    degenerate = size < 1  # the official would give a 0-pixel side
    size = max(int(size), 1)
    if (w <= h and w == size) or (h <= w and h == size):
        out_h, out_w = int(h), int(w)
    elif w < h:
        out_h, out_w = int(size * h / w), int(size)
    else:
        out_h, out_w = int(size), int(size * w / h)
    if max_size is None:
        cap = MAX_RESIZE_SIDE
    else:  # the official result may exceed max_size by a pixel (kept); a degenerate one is held to it
        cap = max(int(max_size), 1) if degenerate else max(out_h, out_w)
    return max(min(out_h, cap), 1), max(min(out_w, cap), 1)


def _resize_image(image: np.ndarray, size_hw: Tuple[int, int]) -> np.ndarray:
    """Bilinear resize of [H, W, 3] to [h, w, 3] with PIL (what torchvision's F.resize does on PIL images)."""
    h, w = size_hw
    if image.shape[:2] == (h, w):
        return image
    if image.dtype == np.uint8:
        return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    # PIL has no 3-channel float mode: resize channel by channel in mode "F".
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], np.float32)).resize(
        (w, h), Image.BILINEAR)) for c in range(image.shape[2])]
    return np.stack(channels, axis=-1).astype(image.dtype)


def resize(image: np.ndarray, target: Optional[Dict], size_hw: Tuple[int, int]):
    """Resize image [H, W, 3] to `size_hw` = (h, w) and scale "boxes" (xyxy absolute) and "area" with it."""
    in_h, in_w = image.shape[:2]
    out_h, out_w = size_hw
    image = _resize_image(image, (out_h, out_w))
    if target is None:
        return image, None
    target = dict(target)
    ratio_w, ratio_h = out_w / in_w, out_h / in_h
    if "boxes" in target:
        scale = np.array([ratio_w, ratio_h, ratio_w, ratio_h], np.float32)
        target["boxes"] = (np.asarray(target["boxes"], np.float32) * scale).astype(np.float32)
    if "area" in target:
        target["area"] = (np.asarray(target["area"], np.float32) * np.float32(ratio_w * ratio_h)).astype(np.float32)
    target["size"] = (out_h, out_w)
    return image, target


def crop(image: np.ndarray, target: Optional[Dict], region: Tuple[int, int, int, int]):
    """Crop `region` = (top, left, height, width) out of image [H, W, 3]; boxes (xyxy absolute) are shifted,
    clipped to the crop, and objects whose clipped box has zero area are dropped (as official `crop`)."""
    top, left, h, w = region
    image = image[top:top + h, left:left + w]
    if target is None:
        return image, None
    target = dict(target)
    target["size"] = (h, w)
    if "boxes" in target:
        boxes = np.asarray(target["boxes"], np.float32).reshape(-1, 2, 2) - np.array([left, top], np.float32)
        boxes = np.clip(boxes, 0, np.array([w, h], np.float32))  # [K, 2 corners, (x, y)]
        target["boxes"] = boxes.reshape(-1, 4).astype(np.float32)
        target["area"] = np.prod(boxes[:, 1] - boxes[:, 0], axis=1).astype(np.float32)
        keep = np.all(boxes[:, 1] > boxes[:, 0], axis=1)
        for key in PER_OBJECT_KEYS:
            if key in target:
                target[key] = np.asarray(target[key])[keep]
    return image, target


def hflip(image: np.ndarray, target: Optional[Dict]):
    """Mirror image [H, W, 3] left-right; boxes (xyxy absolute) become (W - x1, y0, W - x0, y1)."""
    w = image.shape[1]
    image = np.ascontiguousarray(image[:, ::-1])
    if target is None:
        return image, None
    target = dict(target)
    if "boxes" in target:
        boxes = np.asarray(target["boxes"], np.float32).reshape(-1, 4)
        target["boxes"] = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1)
    return image, target


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image, target, rng: np.random.Generator):
        for t in self.transforms:
            image, target = t(image, target, rng)
        return image, target

    def output_size(self, size_hw, rng: np.random.Generator):
        for t in self.transforms:
            size_hw = t.output_size(size_hw, rng)
        return size_hw

    def __repr__(self):
        inner = "".join(f"\n    {t!r}," for t in self.transforms)
        return f"Compose([{inner}\n])"


class RandomHorizontalFlip:
    """Flip with probability p."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, target, rng: np.random.Generator):
        if rng.random() < self.p:
            return hflip(image, target)
        return image, target

    def output_size(self, size_hw, rng: np.random.Generator):
        rng.random()  # keep the stream aligned with __call__
        return size_hw

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


class RandomResize:
    """Resize the shorter side to a size drawn uniformly from `sizes`, the longer side at most `max_size`."""

    def __init__(self, sizes: Sequence[int], max_size: Optional[int] = None):
        if not isinstance(sizes, (list, tuple)) or not sizes:
            raise ValueError(f"RandomResize needs a non-empty list of sizes, got {sizes!r}")
        self.sizes = tuple(int(s) for s in sizes)
        self.max_size = max_size

    def output_size(self, size_hw, rng: np.random.Generator):
        size = self.sizes[int(rng.integers(len(self.sizes)))]
        return get_size(size_hw, size, self.max_size)

    def __call__(self, image, target, rng: np.random.Generator):
        return resize(image, target, self.output_size(image.shape[:2], rng))

    def __repr__(self):
        return f"RandomResize(sizes={self.sizes}, max_size={self.max_size})"


class RandomSizeCrop:
    """Crop a random region with height and width each uniform in [min_size, min(side, max_size)]."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size = int(min_size)
        self.max_size = int(max_size)

    def region(self, size_hw, rng: np.random.Generator) -> Tuple[int, int, int, int]:
        """(top, left, height, width) of the crop, drawn as official RandomSizeCrop + T.RandomCrop.get_params."""
        img_h, img_w = size_hw
        w = int(rng.integers(min(self.min_size, img_w), min(img_w, self.max_size) + 1))
        h = int(rng.integers(min(self.min_size, img_h), min(img_h, self.max_size) + 1))
        top = int(rng.integers(0, img_h - h + 1))
        left = int(rng.integers(0, img_w - w + 1))
        return top, left, h, w

    def output_size(self, size_hw, rng: np.random.Generator):
        _, _, h, w = self.region(size_hw, rng)
        return h, w

    def __call__(self, image, target, rng: np.random.Generator):
        return crop(image, target, self.region(image.shape[:2], rng))

    def __repr__(self):
        return f"RandomSizeCrop({self.min_size}, {self.max_size})"


class RandomSelect:
    """Apply `transforms1` with probability p, else `transforms2`."""

    def __init__(self, transforms1: Callable, transforms2: Callable, p: float = 0.5):
        self.transforms1 = transforms1
        self.transforms2 = transforms2
        self.p = p

    def __call__(self, image, target, rng: np.random.Generator):
        if rng.random() < self.p:
            return self.transforms1(image, target, rng)
        return self.transforms2(image, target, rng)

    def output_size(self, size_hw, rng: np.random.Generator):
        if rng.random() < self.p:
            return self.transforms1.output_size(size_hw, rng)
        return self.transforms2.output_size(size_hw, rng)

    def __repr__(self):
        return f"RandomSelect({self.transforms1!r}, {self.transforms2!r}, p={self.p})"


class Normalize:
    """uint8 [H, W, 3] -> float32 (x / 255 - mean) / std; boxes xyxy absolute -> cxcywh normalised by (w, h).

    The normalising size is the image size here, i.e. the final unpadded size: padding happens later in
    batching and does not change the targets. With `pixels=False` the image stays uint8 (a quarter of the
    bytes to batch and ship) and `normalize_images` does the same arithmetic on the device.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 pixels: bool = True):
        self.pixels = pixels
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        # One fused multiply-add per pixel: x * (1 / (255 std)) - mean / std.
        self._scale = (1.0 / (255.0 * self.std)).astype(np.float32)
        self._offset = (self.mean / self.std).astype(np.float32)

    def __call__(self, image, target, rng: Optional[np.random.Generator] = None):
        if not self.pixels:
            if image.dtype != np.uint8:
                raise ValueError(f"Normalize(pixels=False) keeps uint8 images for the device; got {image.dtype}")
            out = image
        elif image.dtype == np.uint8:
            out = image.astype(np.float32)
            out *= self._scale
            out -= self._offset
        else:  # float input is taken to be in [0, 1], like torchvision's ToTensor output.
            out = image.astype(np.float32) * (self._scale * 255.0)
            out -= self._offset
        if target is None:
            return out, None
        target = dict(target)
        h, w = image.shape[:2]
        if "boxes" in target:
            boxes = np.asarray(target["boxes"], np.float32).reshape(-1, 4)
            cxcywh = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2,
                               boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1)
            target["boxes"] = (cxcywh / np.array([w, h, w, h], np.float32)).astype(np.float32)
        target["size"] = (h, w)
        return out, target

    def output_size(self, size_hw, rng: np.random.Generator):
        return size_hw

    def __repr__(self):
        return f"Normalize(mean={self.mean.tolist()}, std={self.std.tolist()}, pixels={self.pixels})"


def normalize_images(images, pixel_mask):
    """On the device (inside jit): uint8 images [B, H, W, 3] -> float32 (x / 255 - mean) / std with exactly the
    host numbers of `Normalize`, padding (pixel_mask False, [B, H, W]) zero. Float images are taken as
    normalised already and returned unchanged.

    A lookup in the 256 x 3 table of the host's values rather than the multiply-subtract: XLA contracts that
    into one FMA, whose single rounding differs from the host's two in the last bit of ~half the pixels.
    """
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top  (the host pipeline never needs jax)

    if images.dtype != jnp.uint8:
        return images
    host = Normalize()
    table = np.arange(256, dtype=np.float32)[:, None] * host._scale  # pylint: disable=protected-access
    table -= host._offset  # pylint: disable=protected-access
    index = images.astype(jnp.int32) * 3 + jnp.arange(3, dtype=jnp.int32)  # [B, H, W, 3] into the flat table
    out = jnp.take(jnp.asarray(table.reshape(-1)), index, mode="clip")
    return jnp.where(pixel_mask[..., None], out, 0.0)


def make_train_transforms(scales: Sequence[int] = COCO_TRAIN_SCALES, max_size: int = COCO_MAX_SIZE,
                          crop_resize_scales: Sequence[int] = (400, 500, 600),
                          crop_size: Tuple[int, int] = (384, 600), normalize_pixels: bool = True) -> Compose:
    """The official DETR train augmentation (defaults: the COCO recipe).

    flip -> 50/50 [resize(scales, max_size)] or [resize(crop_resize_scales) -> crop(crop_size) ->
    resize(scales, max_size)] -> normalise. Output: float32 [h, w, 3] (uint8 with normalize_pixels=False, for
    `normalize_images` on the device) and boxes cxcywh normalised by (w, h).
    Small configs shrink all sizes, e.g. scales=(96, 112, 128), max_size=213, crop_resize_scales=(80, 100, 120),
    crop_size=(64, 120).
    """
    return Compose([
        RandomHorizontalFlip(),
        RandomSelect(
            RandomResize(list(scales), max_size=max_size),
            Compose([
                RandomResize(list(crop_resize_scales)),
                RandomSizeCrop(*crop_size),
                RandomResize(list(scales), max_size=max_size),
            ])),
        Normalize(pixels=normalize_pixels),
    ])


def make_eval_transforms(size: int = 800, max_size: int = COCO_MAX_SIZE, normalize_pixels: bool = True) -> Compose:
    """The official DETR eval transform: shorter side to `size`, longer at most `max_size`, then normalise
    (boxes always; pixels unless normalize_pixels=False)."""
    return Compose([RandomResize([size], max_size=max_size), Normalize(pixels=normalize_pixels)])
