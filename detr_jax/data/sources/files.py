"""Reading the files of COCO-format folders: images (RGB uint8, 16-bit scaled, decompression bombs refused) and
annotation JSON, each failure one line naming the file (and the entry), for the folder sources and `inference`."""

import json
import math
import os
import struct
from typing import Dict, Optional

import numpy as np
from PIL import Image

# What Pillow raises on a hostile file: truncated or foreign data (OSError, SyntaxError, EOFError, struct.error,
# ValueError, IndexError), and a header declaring more than 2 * Image.MAX_IMAGE_PIXELS pixels
# (DecompressionBombError, not an OSError).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, Image.DecompressionBombError)


class AnnotationError(ValueError):
    """A malformed or inconsistent entry in the annotation file (the message names the annotation id)."""


class ImageReadError(OSError):
    """An image that is missing, unreadable, or not the size the annotation file says (names the file)."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_file_name(ann_file: str, where: str, name) -> str:
    """`name`, a "file_name" of `ann_file`, if it is a relative path inside its folder; AnnotationError naming
    `where` (the entry) otherwise: not a string, empty, absolute, or with a ".." component."""
    if not isinstance(name, str) or not name:
        raise AnnotationError(f"{ann_file}: {where} has file_name {_short(name)}; expected a non-empty string")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts or "\x00" in name:
        raise AnnotationError(f"{ann_file}: {where} has file_name {_short(name)}; expected a path relative to the "
                              "image folder, without '..'")
    return name


def pil_to_rgb(im: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3] RGB of an opened PIL image; ValueError naming the mode when it has no 8-bit reading.

    16-bit grayscale ("I;16*", or "I" with values in 0..65535, as Pillow opens 16-bit PNGs) keeps its top 8
    bits (`convert("RGB")` would clip it to near white); "I" beyond 16 bits and float ("F") images are refused.
    Other modes (L, P, LA, PA, RGBA, CMYK, YCbCr, 1 ...) go through `convert("RGB")` (alpha dropped).
    """
    if im.mode.startswith("I;16") or im.mode == "I":
        values = np.asarray(im)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"image mode {im.mode} has values outside 0..65535 (32-bit), which have no 8-bit "
                             "RGB reading; convert it to 8 bits first")
        gray = (values.astype(np.uint32) >> 8).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode == "F":
        raise ValueError("image mode F (32-bit float) has no 8-bit RGB reading; convert it to 8 bits first")
    return np.asarray(im.convert("RGB"))


def read_rgb(path: str, exif_transpose: bool = False) -> np.ndarray:
    """uint8 [H, W, 3] RGB of an image file (`pil_to_rgb`), the header's declared size checked (Pillow's
    decompression bomb limit) before the pixels are decoded. `exif_transpose`: apply the EXIF orientation (phone
    photos; inference only: training keeps COCO's convention of ignoring it, as the official code).
    Raises one of `DECODE_ERRORS` (FileNotFoundError for a missing file); callers name the file."""
    with Image.open(path) as im:  # reads the header; raises DecompressionBombError for a huge declared size
        if exif_transpose:
            from PIL import ImageOps  # pylint: disable=import-outside-toplevel

            try:
                transposed = ImageOps.exif_transpose(im)
            except (KeyError, TypeError, ZeroDivisionError) + DECODE_ERRORS:  # a broken EXIF block: ignore
                transposed = None  # (a broken file fails again below, with the decoder's error)
            if transposed is not None and transposed is not im:
                with transposed:
                    return pil_to_rgb(transposed)
        return pil_to_rgb(im)


def read_annotation_file(ann_file: str) -> Dict:
    """The JSON of a COCO(-panoptic) annotation file, with its "images", "annotations" and "categories" lists; one
    clear error naming the file otherwise."""
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file {ann_file} does not exist") from None
    except IsADirectoryError:
        raise AnnotationError(f"annotation file {ann_file} is a folder, not a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AnnotationError(f"annotation file {ann_file} is not valid JSON: {e}") from None
    except RecursionError:
        raise AnnotationError(f"annotation file {ann_file} is nested too deeply to be a COCO JSON") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key) if isinstance(data, dict) else None, list):
            raise AnnotationError(f"annotation file {ann_file} has no {key!r} list")
    return data


def _whole(value) -> Optional[int]:
    """An integer from the JSON (480, or 480.0 as some converters write it); None for anything else."""
    if _is_int(value):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _short(value, limit: int = 80) -> str:
    """repr of a value from the JSON, cut to `limit` characters (a message stays one readable line)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
