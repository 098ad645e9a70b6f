"""A COCO-format folder as a detection source: an instances JSON plus a directory of images.

Follows the official `datasets/coco.py` (`ConvertCocoPolysToMask`): COCO [x, y, w, h] boxes become xyxy,
clipped to the image, and boxes left with zero area are dropped. Unlike the official code, the drops are
counted and logged, crowd annotations can be kept for evaluation, and bad input fails with the file or
annotation id at fault. Annotations are parsed and validated once, in the constructor.
"""

import logging
import math
import os
import threading
from typing import Dict, Optional, Tuple

import numpy as np
from PIL import Image

from detr_jax.data.sources.arguments import PATH, REQUIRED, Arg, Arguments
from detr_jax.data.sources.files import (  # noqa: F401  (AnnotationError, ImageReadError: the errors of this source)
    DECODE_ERRORS,
    AnnotationError,
    ImageReadError,
    _is_int,
    _short,
    _whole,
    check_file_name,
    pil_to_rgb,
    read_annotation_file,
    read_rgb,
)

logger = logging.getLogger(__name__)
# Guards the sources' counters against the loader's worker threads. Module-level, not per source: a source then
# pickles as it is (loader worker processes get a copy, whose counters the loader sums).
_STATS_LOCK = threading.Lock()

LABEL_SPACES = ("contiguous", "official91")
# label_space="official91" builds a table of max category id + 1 classes; a larger id is refused, naming it.
MAX_OFFICIAL_CATEGORY_ID = 100_000


class CocoFolder:
    """Examples from a COCO instances JSON and its image directory, in ascending image id order.

    Arguments: `ARGUMENTS` (positional in that order, or keywords). More on some of them:
      label_space: "contiguous" maps the sorted category ids to labels 0..K-1 (`category_ids[label]` gives the id
        back); "official91" keeps the raw category id as the label (the official DETR space: num_classes = max
        id + 1 = 91 for COCO, as the released checkpoints use).
      keep_crowd: False (training) drops iscrowd=1 annotations, as the official code does.
      skip_bad_images: images whose file is missing are dropped at start (counted in
        `stats["missing_images_skipped"]`), as are images without width/height in the JSON whose header cannot
        be read (e.g. a decompression bomb: more than 2 * PIL.Image.MAX_IMAGE_PIXELS declared); an image that
        turns out unreadable later is replaced by the next readable one; both logged and counted in
        `stats["bad_images_skipped"]`, instead of raising ImageReadError.
        Without it, a missing file fails here, before any training, naming the file and how many are missing.

    The JSON is validated in the constructor: a malformed entry (not an object, a field of the wrong type, a
    non-positive size, a file_name that is absolute or has "..", a duplicate image or annotation id, an unknown
    category id, iscrowd other than 0 / 1) raises AnnotationError naming the file, the entry and the field.
    Images are decoded by `read_rgb` (16-bit grayscale scaled to 8 bits; EXIF orientation ignored, as COCO's).

    Each example is a dict:
      "image": uint8 [H, W, 3] RGB; "boxes": float32 [K, 4] xyxy in absolute pixels, clipped to the image;
      "labels": int32 [K]; "image_id": int (the COCO id); "orig_size": (H, W); "iscrowd": bool [K].
    Attributes: `num_classes`, `class_names` (indexed by label), `category_ids` (COCO id of each label), `stats`.
    """

    ARGUMENTS = Arguments(
        ann_file=Arg(PATH, REQUIRED, "path of the instances JSON: its images, annotations and categories"),
        image_dir=Arg(PATH, REQUIRED, "directory holding each image's file_name"),
        label_space=Arg(str, "contiguous", f"one of {LABEL_SPACES}: labels 0..K-1, or label = COCO category id"),
        keep_crowd=Arg(bool, False, 'keep iscrowd=1 annotations (flagged in "iscrowd"), for evaluation'),
        num_classes=Arg((int, None), None, "model classes; a larger label is an error (None: the label space's size)"),
        skip_bad_images=Arg(bool, False, "drop missing images at start and skip unreadable ones (counted, logged)"),
    )
    __signature__ = ARGUMENTS.signature

    def __init__(self, *args, **kwargs):
        a = self.ARGUMENTS.bind(type(self).__name__, args, kwargs)
        if a.label_space not in LABEL_SPACES:
            raise ValueError(f"label_space must be one of {LABEL_SPACES}, got {a.label_space!r}")
        if not os.path.isdir(a.image_dir):
            raise FileNotFoundError(f"image directory {a.image_dir} does not exist")
        self.ann_file = a.ann_file
        self.image_dir = a.image_dir
        self.label_space = a.label_space
        self.keep_crowd = a.keep_crowd
        self.skip_bad_images = a.skip_bad_images
        data = read_annotation_file(a.ann_file)

        self._build_label_space(data["categories"])
        self.num_classes = len(self.class_names) if a.num_classes is None else int(a.num_classes)
        self.stats: Dict[str, int] = {"images": 0, "annotations": 0, "objects": 0, "crowd_dropped": 0,
                                      "zero_area_dropped": 0, "bad_images_skipped": 0, "missing_images_skipped": 0}
        self._bad_files = set()  # paths of the unreadable images skipped (skip_bad_images)
        self._unreadable_ids = set()  # images dropped at start for an unreadable header (skip_bad_images)
        self._images = self._parse_images(data["images"])
        self._missing_ids = set()  # dropped by skip_bad_images; their annotations are skipped
        self._check_files()
        self.image_ids = sorted(self._images)
        self._objects = self._parse_annotations(data["annotations"])
        self.stats["images"] = len(self.image_ids)
        logger.info("%s: %d images, %d objects kept of %d annotations (%d crowd dropped, %d zero-area dropped)",
                    self.ann_file, self.stats["images"], self.stats["objects"], self.stats["annotations"],
                    self.stats["crowd_dropped"], self.stats["zero_area_dropped"])
        if self.stats["zero_area_dropped"]:
            logger.warning("%s: dropped %d boxes with zero area after clipping to the image", self.ann_file,
                           self.stats["zero_area_dropped"])

    def _build_label_space(self, categories):
        names = {}
        for index, cat in enumerate(categories):
            cid = cat.get("id") if isinstance(cat, dict) else None
            if not _is_int(cid) or cid < 0:
                raise AnnotationError(f"{self.ann_file}: category #{index} {_short(cat)} needs a non-negative "
                                      "integer 'id'")
            if cid in names:
                raise AnnotationError(f"{self.ann_file}: category id {cid} appears twice")
            if self.label_space == "official91" and cid > MAX_OFFICIAL_CATEGORY_ID:
                raise AnnotationError(f"{self.ann_file}: category id {cid} (category #{index}) is too large for "
                                      f"label_space='official91' (label = id, a table of id + 1 classes; at most "
                                      f"{MAX_OFFICIAL_CATEGORY_ID}); use label_space='contiguous'")
            names[cid] = str(cat.get("name", cid))
        if not names:
            raise AnnotationError(f"{self.ann_file}: the 'categories' list is empty")
        if self.label_space == "contiguous":
            self.category_ids = tuple(sorted(names))
            self.class_names = tuple(names[c] for c in self.category_ids)
            self._label_of = {c: i for i, c in enumerate(self.category_ids)}
        else:
            self.category_ids = tuple(range(max(names) + 1))
            self.class_names = tuple(names.get(c, "N/A") for c in self.category_ids)
            self._label_of = {c: c for c in names}

    def _parse_images(self, images):
        """{image id: {"file_name", "size": (h, w) or None (file missing)}}; every field checked, naming the entry.
        Without width/height in the entry, the size comes from the file's header (which also catches a
        decompression bomb before any decoding)."""
        out = {}
        for index, entry in enumerate(images):
            image_id = entry.get("id") if isinstance(entry, dict) else None
            if not _is_int(image_id):
                raise AnnotationError(f"{self.ann_file}: image entry #{index} {_short(entry)} needs an integer 'id'")
            where = f"image id {image_id} (image entry #{index})"
            if "file_name" not in entry:
                raise AnnotationError(f"{self.ann_file}: {where} needs a 'file_name'")
            check_file_name(self.ann_file, where, entry["file_name"])
            if image_id in out:
                raise AnnotationError(f"{self.ann_file}: image id {image_id} appears twice")
            path = os.path.join(self.image_dir, entry["file_name"])
            if "width" in entry or "height" in entry:
                height, width = _whole(entry.get("height")), _whole(entry.get("width"))
                if height is None or width is None or height <= 0 or width <= 0:
                    raise AnnotationError(f"{self.ann_file}: {where} has height {_short(entry.get('height'))} and "
                                          f"width {_short(entry.get('width'))}; expected positive integers")
                size = (height, width)
            elif not os.path.isfile(path):
                size = None  # a missing file: `_check_files` reports it (or drops it with skip_bad_images)
            else:
                size = self._header_size(path, image_id)
                if size is None:  # unreadable, skipped
                    continue
            out[image_id] = {"file_name": entry["file_name"], "size": size}
        return out

    def _header_size(self, path: str, image_id: int) -> Optional[Tuple[int, int]]:
        """(h, w) from the header of an image file (PIL decodes lazily); an unreadable one raises ImageReadError,
        or with skip_bad_images is counted and None."""
        try:
            with Image.open(path) as im:  # DecompressionBombError here for a huge declared size
                return im.height, im.width
        except DECODE_ERRORS as e:
            message = (f"image file {path} (image id {image_id}) has no width/height in {self.ann_file} and cannot "
                       f"be read: {type(e).__name__}: {e}")
        if not self.skip_bad_images:
            raise ImageReadError(message)
        self._unreadable_ids.add(image_id)
        self._bad_files.add(path)
        self.stats["bad_images_skipped"] = len(self._bad_files)
        logger.warning("skipping bad image: %s", message)
        return None

    def _check_files(self):
        """Every listed image file exists (a stat each: seconds for COCO's 118k files on a local disk)."""
        missing = [i for i, entry in self._images.items()
                   if not os.path.isfile(os.path.join(self.image_dir, entry["file_name"]))]
        if not missing:
            if not self._images and self._unreadable_ids:
                raise ImageReadError(f"none of the image files that {self.ann_file} lists in {self.image_dir} "
                                     "is readable")
            return
        first = os.path.join(self.image_dir, self._images[missing[0]]["file_name"])
        if not self.skip_bad_images:
            raise ImageReadError(f"{len(missing)} of the {len(self._images)} image files that {self.ann_file} lists "
                                 f"are missing from {self.image_dir}, e.g. {first} (image id {missing[0]}); restore "
                                 "them, or set skip_bad_images=True (config.data.source_kwargs.skip_bad_images) to "
                                 "train without them")
        for image_id in missing:
            del self._images[image_id]
        self._missing_ids = set(missing)
        self.stats["missing_images_skipped"] = len(missing)
        logger.warning("%s: skipping %d images whose file is missing from %s (e.g. %s)", self.ann_file, len(missing),
                       self.image_dir, first)
        if not self._images:
            raise ImageReadError(f"none of the image files that {self.ann_file} lists is in {self.image_dir}")

    def _parse_annotations(self, annotations):
        per_image = {i: ([], [], []) for i in self._images}  # boxes, labels, iscrowd
        skipped = self._missing_ids | self._unreadable_ids
        seen_ids = set()
        for index, ann in enumerate(annotations):
            self.stats["annotations"] += 1
            if not isinstance(ann, dict):
                raise AnnotationError(f"{self.ann_file}: annotation #{index} is {_short(ann)}, not an object")
            ann_id = ann.get("id")
            where = f"{self.ann_file}: annotation id {ann_id}" + (f" (annotation #{index})" if ann_id is None else "")
            if ann_id is not None:
                if not _is_int(ann_id):
                    raise AnnotationError(f"{self.ann_file}: annotation #{index} has id {_short(ann_id)}; expected "
                                          "an integer")
                if ann_id in seen_ids:
                    raise AnnotationError(f"{where} appears twice (annotation #{index})")
                seen_ids.add(ann_id)
            image_id = ann.get("image_id")
            if not _is_int(image_id) or image_id not in self._images and image_id not in skipped:
                raise AnnotationError(f"{where} refers to image id {_short(image_id)}, which is not in 'images'")
            cid = ann.get("category_id")
            if not _is_int(cid) or cid not in self._label_of:
                raise AnnotationError(f"{where} has category_id {_short(cid)}, which is not in 'categories' "
                                      f"(known ids: {_short(sorted(self._label_of))})")
            iscrowd = ann.get("iscrowd", 0)
            if not isinstance(iscrowd, (int, float)) or iscrowd not in (0, 1):
                raise AnnotationError(f"{where} has iscrowd {_short(iscrowd)}; expected 0 or 1")
            if image_id in skipped:
                continue
            bbox = ann.get("bbox")
            if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)):
                raise AnnotationError(f"{where} has bbox {_short(bbox)}; expected 4 finite numbers [x, y, w, h]")
            x, y, w, h = (float(v) for v in bbox)
            if w < 0 or h < 0:
                raise AnnotationError(f"{where} has bbox {bbox!r} with negative width or height")
            label = self._label_of[cid]
            if label >= self.num_classes:
                raise AnnotationError(f"{where} has label {label} (category_id {cid}) >= "
                                      f"num_classes={self.num_classes}; raise num_classes or use "
                                      f"label_space='contiguous'")
            crowd = bool(iscrowd)
            if crowd and not self.keep_crowd:
                self.stats["crowd_dropped"] += 1
                continue
            # As the official ConvertCocoPolysToMask: xywh -> xyxy, clamped to the image, degenerate boxes dropped.
            img_h, img_w = self._images[image_id]["size"]
            x0, x1 = min(max(x, 0.0), img_w), min(max(x + w, 0.0), img_w)
            y0, y1 = min(max(y, 0.0), img_h), min(max(y + h, 0.0), img_h)
            if not (x1 > x0 and y1 > y0):
                self.stats["zero_area_dropped"] += 1
                continue
            boxes, labels, iscrowd_list = per_image[image_id]
            boxes.append((x0, y0, x1, y1))
            labels.append(label)
            iscrowd_list.append(crowd)
            self.stats["objects"] += 1
        # boxes float32 [K, 4] xyxy absolute (clipped), labels int32 [K], iscrowd bool [K] per image id
        return {i: (np.asarray(b, np.float32).reshape(-1, 4), np.asarray(lab, np.int32), np.asarray(c, bool))
                for i, (b, lab, c) in per_image.items()}

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, index: int) -> str:
        """Path of the image file of example `index`."""
        return os.path.join(self.image_dir, self._images[self.image_ids[index]]["file_name"])

    def image_size(self, index: int) -> Tuple[int, int]:
        """(h, w) of example `index` from the annotation file, without reading the image."""
        return self._images[self.image_ids[index]]["size"]

    def _read_image(self, index: int) -> np.ndarray:
        image_id = self.image_ids[index]
        path = self.image_path(index)
        try:
            image = read_rgb(path)
        except DECODE_ERRORS as e:  # missing, truncated, not an image, a decompression bomb, 32-bit / float
            raise ImageReadError(f"cannot read image file {path} (image id {image_id}): {type(e).__name__}: "
                                 f"{e}") from None
        expected = self._images[image_id]["size"]
        if image.shape[:2] != expected:
            raise ImageReadError(f"image file {path} (image id {image_id}) is {image.shape[0]}x{image.shape[1]} "
                                 f"(h x w) but {self.ann_file} says {expected[0]}x{expected[1]}")
        return image

    def __getitem__(self, index: int) -> Dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images in {self.ann_file}")
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            try:
                image = self._read_image(i)
                break
            except ImageReadError as e:
                if not self.skip_bad_images:
                    raise
                with _STATS_LOCK:
                    if self.image_path(i) not in self._bad_files:
                        self._bad_files.add(self.image_path(i))
                        self.stats["bad_images_skipped"] = len(self._bad_files)
                        logger.warning("skipping bad image (replaced by the next readable one): %s", e)
        else:
            raise ImageReadError(f"no readable image in {self.image_dir} ({len(self)} tried)")
        image_id = self.image_ids[i]
        boxes, labels, iscrowd = self._objects[image_id]
        return {"image": image, "boxes": boxes.copy(), "labels": labels.copy(), "image_id": image_id,
                "orig_size": tuple(image.shape[:2]), "iscrowd": iscrowd.copy()}
