"""Panoptic segmentation source: a COCO panoptic folder (the built-in synthetic set: `synthetic_panoptic.py`).

Examples are the detection examples of `detr_jax.data` (see its docstring) plus, per object, in the order of
"boxes" / "labels":
  "masks": bool [K, H, W], one segment each (segments do not overlap; pixels in none are void);
  "segment_ids": int32 [K], the segment's id in the panoptic PNG (id = R + 256 G + 256^2 B).
Boxes are the masks' extents, xyxy absolute with an exclusive max (`panoptic_transforms.masks_to_boxes`),
as the official `coco_panoptic.py` derives them (`masks_to_boxes`, whose max is inclusive).
Sources expose `class_names`, `category_ids` (the dataset id of each label), `is_thing` (bool per label),
`num_classes` and `image_size(index)`. Use `panoptic_transforms` to augment them: it moves the masks too.
"""

import os
from typing import Dict, Tuple

import numpy as np
from PIL import Image

from detr_jax.data.panoptic_transforms import masks_to_boxes
from detr_jax.data.sources.arguments import PATH, REQUIRED, Arg, Arguments
from detr_jax.data.sources.coco_folder import (
    DECODE_ERRORS,
    AnnotationError,
    ImageReadError,
    _is_int,
    _short,
    _whole,
    check_file_name,
    read_annotation_file,
    read_rgb,
)
from detr_jax.ops.panoptic_ids import rgb2id

LABEL_SPACES = ("official250", "contiguous")
OFFICIAL_NUM_CLASSES = 250  # the official panoptic DETR's num_classes (COCO panoptic ids go to 200)


class CocoPanopticFolder:
    """Examples from a COCO panoptic JSON, its image directory and its directory of segment PNGs.

    Arguments: `ARGUMENTS` (positional in that order, or keywords). More on some of them:
      ann_file: the panoptic JSON: "images" [{"id", "file_name", "height", "width"}], "annotations" (one per
        image: {"image_id", "file_name" of the PNG, "segments_info": [{"id", "category_id", "iscrowd", ...}]})
        and "categories" [{"id", "name", "isthing"}].
      label_space: "official250" uses the category id as the label, with num_classes 250, as the official
        panoptic DETR (`category_ids[label] == label`, unused labels named "N/A"); "contiguous" maps the sorted
        category ids to labels 0..K-1.
      keep_crowd: True keeps crowd segments, as the official panoptic training (unlike its detection training);
        False drops them (their pixels become void).
      num_classes: None is 250 for "official250", the number of categories for "contiguous".

    The JSON is parsed and validated, and every image and PNG checked to exist, in the constructor; the PNG of an
    example is decoded, and checked against its "segments_info", when the example is read.
    Each example: "image" uint8 [H, W, 3]; "boxes" float32 [K, 4]; "labels" int32 [K]; "image_id"; "orig_size"
    (H, W); "iscrowd" bool [K]; "masks" bool [K, H, W]; "segment_ids" int32 [K] (see the module docstring).
    """

    ARGUMENTS = Arguments(
        ann_file=Arg(PATH, REQUIRED, "path of the panoptic JSON: its images, annotations and categories"),
        image_dir=Arg(PATH, REQUIRED, "directory holding each image's file_name"),
        panoptic_dir=Arg(PATH, REQUIRED, "directory holding each annotation's segment PNG"),
        label_space=Arg(str, "official250", f"one of {LABEL_SPACES}: label = category id (250 classes), or 0..K-1"),
        keep_crowd=Arg(bool, True, 'keep iscrowd=1 segments (flagged in "iscrowd"); False makes their pixels void'),
        num_classes=Arg((int, None), None, "model classes; a larger label is an error (None: the label space's size)"),
    )
    __signature__ = ARGUMENTS.signature

    def __init__(self, *args, **kwargs):
        a = self.ARGUMENTS.bind(type(self).__name__, args, kwargs)
        if a.label_space not in LABEL_SPACES:
            raise ValueError(f"label_space must be one of {LABEL_SPACES}, got {a.label_space!r}")
        for name, path in (("image", a.image_dir), ("panoptic PNG", a.panoptic_dir)):
            if not os.path.isdir(path):
                raise FileNotFoundError(f"{name} directory {path} does not exist")
        self.ann_file, self.image_dir, self.panoptic_dir = a.ann_file, a.image_dir, a.panoptic_dir
        self.label_space = a.label_space
        self.keep_crowd = a.keep_crowd
        data = read_annotation_file(a.ann_file)
        self._build_label_space(data["categories"], a.num_classes)
        self._images = self._parse_images(data["images"])
        self._segments = self._parse_annotations(data["annotations"])
        self.image_ids = sorted(self._images)
        self._check_files()

    def _build_label_space(self, categories, num_classes):
        names, things = {}, {}
        for cat in categories:
            cid = cat.get("id") if isinstance(cat, dict) else None
            if not _is_int(cid) or cid < 0:
                raise AnnotationError(f"{self.ann_file}: category {cat!r} needs a non-negative integer 'id'")
            if cid in names:
                raise AnnotationError(f"{self.ann_file}: category id {cid} appears twice")
            if cat.get("isthing") not in (0, 1):  # True/False compare equal to 1/0
                raise AnnotationError(f"{self.ann_file}: category id {cid} needs 'isthing' 0 or 1, got "
                                      f"{cat.get('isthing')!r}")
            names[cid], things[cid] = str(cat.get("name", cid)), bool(cat["isthing"])
        if not names:
            raise AnnotationError(f"{self.ann_file}: the 'categories' list is empty")
        if self.label_space == "contiguous":
            self.category_ids = tuple(sorted(names))
            self._label_of = {c: i for i, c in enumerate(self.category_ids)}
            self.num_classes = len(self.category_ids) if num_classes is None else int(num_classes)
        else:
            self.num_classes = OFFICIAL_NUM_CLASSES if num_classes is None else int(num_classes)
            self.category_ids = tuple(range(self.num_classes))
            self._label_of = {c: c for c in names}
        self.class_names = tuple(names.get(c, "N/A") for c in self.category_ids)
        self.is_thing = tuple(things.get(c, False) for c in self.category_ids)
        too_large = [c for c in names if self._label_of[c] >= self.num_classes]
        if too_large:
            raise AnnotationError(f"{self.ann_file}: category ids {too_large} give labels >= num_classes="
                                  f"{self.num_classes}; raise num_classes or use label_space='contiguous'")

    def _parse_images(self, images):
        out = {}
        for entry in images:
            image_id = entry.get("id") if isinstance(entry, dict) else None
            if not _is_int(image_id) or not isinstance(entry.get("file_name"), str):
                raise AnnotationError(f"{self.ann_file}: image entry {entry!r} needs an integer 'id' and a "
                                      "'file_name'")
            check_file_name(self.ann_file, f"image id {image_id}", entry["file_name"])
            if image_id in out:
                raise AnnotationError(f"{self.ann_file}: image id {image_id} appears twice")
            size = None
            if "height" in entry or "width" in entry:  # whole floats (480.0) too, as the detection folder reads
                height, width = _whole(entry.get("height")), _whole(entry.get("width"))
                if height is None or width is None or height <= 0 or width <= 0:
                    raise AnnotationError(f"{self.ann_file}: image id {image_id} has height "
                                          f"{_short(entry.get('height'))} and width {_short(entry.get('width'))}; "
                                          "expected positive integers")
                size = (height, width)
            out[image_id] = {"file_name": entry["file_name"], "size": size}
        return out

    def _parse_annotations(self, annotations):
        per_image = {}
        for ann in annotations:
            image_id = ann.get("image_id") if isinstance(ann, dict) else None
            where = f"{self.ann_file}: the annotation of image id {image_id!r}"
            if not _is_int(image_id) or image_id not in self._images:
                raise AnnotationError(f"{where} refers to an image that is not in 'images'")
            if image_id in per_image:
                raise AnnotationError(f"{where} appears twice")
            if not isinstance(ann.get("file_name"), str):
                raise AnnotationError(f"{where} needs the 'file_name' of its PNG, got {ann.get('file_name')!r}")
            check_file_name(self.ann_file, f"the annotation of image id {image_id!r}", ann["file_name"])
            if not isinstance(ann.get("segments_info"), list):
                raise AnnotationError(f"{where} ({ann['file_name']}) needs a 'segments_info' list, got "
                                      f"{ann.get('segments_info')!r}")
            ids, labels, crowd, all_ids = [], [], [], set()
            for seg in ann["segments_info"]:
                seg_id = seg.get("id") if isinstance(seg, dict) else None
                if not _is_int(seg_id) or seg_id <= 0:
                    raise AnnotationError(f"{where} ({ann['file_name']}): segment {seg!r} needs a positive integer "
                                          "'id' (0 is void)")
                if seg_id in all_ids:
                    raise AnnotationError(f"{where} ({ann['file_name']}): segment id {seg_id} appears twice")
                all_ids.add(seg_id)
                cid = seg.get("category_id")
                if not _is_int(cid) or cid not in self._label_of:
                    raise AnnotationError(f"{where} ({ann['file_name']}): segment id {seg_id} has category_id "
                                          f"{cid!r}, which is not in 'categories' (known: {sorted(self._label_of)})")
                if seg.get("iscrowd", 0) not in (0, 1):
                    raise AnnotationError(f"{where} ({ann['file_name']}): segment id {seg_id} has iscrowd "
                                          f"{seg.get('iscrowd')!r}; expected 0 or 1")
                if seg.get("iscrowd", 0) and not self.keep_crowd:
                    continue
                ids.append(seg_id)
                labels.append(self._label_of[cid])
                crowd.append(bool(seg.get("iscrowd", 0)))
            per_image[image_id] = {"file_name": ann["file_name"], "all_ids": all_ids,
                                   "segment_ids": np.asarray(ids, np.int32), "labels": np.asarray(labels, np.int32),
                                   "iscrowd": np.asarray(crowd, bool)}
        unannotated = sorted(set(self._images) - set(per_image))
        if unannotated:
            raise AnnotationError(f"{self.ann_file}: {len(unannotated)} images have no entry in 'annotations', "
                                  f"e.g. image id {unannotated[0]} ({self._images[unannotated[0]]['file_name']})")
        return per_image

    def _check_files(self):
        """Every image and PNG exists (a stat each), so a missing file fails before any training."""
        for kind, folder, entries in (("image", self.image_dir, self._images),
                                      ("panoptic PNG", self.panoptic_dir, self._segments)):
            missing = [i for i in self.image_ids if not os.path.isfile(os.path.join(folder, entries[i]["file_name"]))]
            if missing:
                raise ImageReadError(f"{len(missing)} of the {len(self.image_ids)} {kind} files that {self.ann_file} "
                                     f"lists are missing from {folder}, e.g. "
                                     f"{os.path.join(folder, entries[missing[0]]['file_name'])} "
                                     f"(image id {missing[0]})")

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, index: int) -> str:
        return os.path.join(self.image_dir, self._images[self.image_ids[index]]["file_name"])

    def panoptic_path(self, index: int) -> str:
        return os.path.join(self.panoptic_dir, self._segments[self.image_ids[index]]["file_name"])

    def image_size(self, index: int) -> Tuple[int, int]:
        """(h, w) of example `index`: from the JSON, else from the image file's header."""
        entry = self._images[self.image_ids[index]]
        if entry["size"] is None:
            try:
                with Image.open(self.image_path(index)) as im:  # PIL reads the header only
                    entry["size"] = (im.height, im.width)
            except DECODE_ERRORS as e:  # DecompressionBombError (a huge declared size) included
                raise ImageReadError(f"cannot read image file {self.image_path(index)} (image id "
                                     f"{self.image_ids[index]}): {e}") from None
        return entry["size"]

    def _read(self, path: str, image_id: int, what: str) -> np.ndarray:
        try:
            return read_rgb(path)  # 16-bit grayscale scaled to 8 bits (a panoptic PNG then fails its id check)
        except DECODE_ERRORS as e:  # missing, truncated, not an image, a decompression bomb, 32-bit / float
            raise ImageReadError(f"cannot read {what} {path} (image id {image_id}): {type(e).__name__}: "
                                 f"{e}") from None

    def __getitem__(self, index: int) -> Dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images in {self.ann_file}")
        image_id = self.image_ids[index]
        image = self._read(self.image_path(index), image_id, "image file")
        size = self.image_size(index)
        if image.shape[:2] != size:
            raise ImageReadError(f"image file {self.image_path(index)} (image id {image_id}) is "
                                 f"{image.shape[0]}x{image.shape[1]} (h x w) but {self.ann_file} says "
                                 f"{size[0]}x{size[1]}")
        png = self.panoptic_path(index)
        id_map = rgb2id(self._read(png, image_id, "panoptic PNG"))
        if id_map.shape != image.shape[:2]:
            raise ImageReadError(f"panoptic PNG {png} (image id {image_id}) is {id_map.shape[0]}x{id_map.shape[1]} "
                                 f"(h x w) but its image {self.image_path(index)} is {image.shape[0]}x{image.shape[1]}")
        seg = self._segments[image_id]
        masks, unknown, empty = segment_masks(id_map, seg["segment_ids"], seg["all_ids"])
        if unknown:
            raise AnnotationError(f"panoptic PNG {png} (image id {image_id}) has segment ids {unknown[:10]} that its "
                                  f"'segments_info' in {self.ann_file} does not list")
        if empty:
            raise AnnotationError(f"{self.ann_file}: segment ids {empty} of image id {image_id} are not in "
                                  f"its panoptic PNG {png}")
        return {"image": image, "boxes": masks_to_boxes(masks), "labels": seg["labels"].copy(), "image_id": image_id,
                "orig_size": tuple(image.shape[:2]), "iscrowd": seg["iscrowd"].copy(), "masks": masks,
                "segment_ids": seg["segment_ids"].copy()}


def segment_masks(id_map: np.ndarray, segment_ids: np.ndarray, listed_ids) -> Tuple[np.ndarray, list, list]:
    """The masks of a panoptic PNG's segments, and what in it disagrees with its annotation.

    Args:
      id_map: int [H, W], the PNG's segment id per pixel (`rgb2id`; 0 is void).
      segment_ids: int [K], the segments to cut out (the annotation's, less any dropped crowd segments).
      listed_ids: every segment id the annotation lists (dropped ones included: their pixels become void).
    Returns (masks bool [K, H, W], the PNG's ids that `listed_ids` lacks (sorted, void left out), the
    `segment_ids` with no pixel in the PNG); a source raises, naming its record, when either list is not empty.
    """
    unknown = sorted(set(np.unique(id_map).tolist()) - set(listed_ids) - {0})
    masks = id_map[None] == np.asarray(segment_ids)[:, None, None]
    return masks, unknown, np.asarray(segment_ids)[~masks.any(axis=(1, 2))].tolist()


class BoxesOnly:
    """A panoptic source seen as a detection source: its examples without "masks" and "segment_ids" (the boxes,
    of things and stuff, stay). The first stage of the official panoptic recipe trains the detector on these
    (the official `coco_panoptic` dataset with `return_masks=False`). Not a panoptic source: no `is_thing`.
    """

    def __init__(self, source):
        self.source = source
        for name in ("class_names", "category_ids", "num_classes"):
            if hasattr(source, name):
                setattr(self, name, getattr(source, name))
        if hasattr(source, "image_size"):
            self.image_size = source.image_size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Dict:
        example = dict(self.source[index])
        example.pop("masks", None)
        example.pop("segment_ids", None)
        return example


class ImagesOnly(BoxesOnly):
    """A source seen as images without objects (what a panoptic evaluation loads: its scorer reads the ground truth
    from `source` at the original size)."""

    def __getitem__(self, index: int) -> Dict:
        ex = self.source[index]
        return {"image": ex["image"], "image_id": ex["image_id"], "orig_size": ex["orig_size"],
                "boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int32), "iscrowd": np.zeros(0, bool)}
