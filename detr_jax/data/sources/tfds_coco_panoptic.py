"""COCO 2017 panoptic from TensorFlow Datasets (`coco/2017_panoptic`) as a random-access panoptic source.

The panoptic twin of `tfds_coco.TfdsCoco` (same ArrayRecord random access, size index and one-line errors naming
the record), giving the examples of `panoptic_sources.CocoPanopticFolder`: each record's panoptic PNG is cut into
one mask per listed segment, and the boxes are the masks' extents (the records' own "bbox" is not used, as the
official `coco_panoptic.py` ignores the JSON's).

TFDS labels are 0..132, the panoptic categories in category-id order; label_space "contiguous" keeps them,
"official250" maps them to the raw category ids (the official panoptic DETR's 250-class space).
name="coco_panoptic_like" is the built-in COCO-panoptic-like set (`detr_jax.data.sources.coco_panoptic_like`),
prepared on first use.
"""

import logging
from typing import Dict, Optional

import numpy as np

from detr_jax.data.panoptic_transforms import masks_to_boxes
from detr_jax.data.sources.arguments import PATH, Arg, Arguments
from detr_jax.data.sources.coco_folder import AnnotationError
from detr_jax.data.sources.coco_panoptic_categories import (
    COCO_PANOPTIC_CATEGORY_IDS,
    COCO_PANOPTIC_CLASS_NAMES,
    COCO_PANOPTIC_IS_THING,
    OFFICIAL250_CLASS_NAMES,
    OFFICIAL250_IS_THING,
)
from detr_jax.data.sources.coco_panoptic_folder import LABEL_SPACES, segment_masks
from detr_jax.data.sources.tfds_coco import TfdsRecords, as_rgb, map_labels
from detr_jax.ops.panoptic_ids import rgb2id

logger = logging.getLogger(__name__)


class TfdsCocoPanoptic(TfdsRecords):
    """COCO panoptic examples from TFDS, the whole of `split` (random access).

    Arguments: `ARGUMENTS` (positional in that order, or keywords). label_space "official250" is the official
    panoptic DETR's (`category_ids[label] == label`, unused labels "N/A"); keep_crowd is True by default, as the
    official panoptic training and CocoPanopticFolder.

    Examples as CocoPanopticFolder's: "image" uint8 [H, W, 3], "boxes" float32 [K, 4] xyxy absolute (the masks'
    extents), "labels" int32 [K], "image_id", "orig_size" (H, W), "iscrowd" bool [K], "masks" bool [K, H, W],
    "segment_ids" int32 [K] (the segments' ids in the panoptic PNG).
    """

    SOURCE, FOLDER_SOURCE = "tfds_panoptic", "coco_panoptic"

    ARGUMENTS = Arguments(
        split=Arg(str, "train", 'TFDS split ("train", "validation", "validation[:500]", ...)'),
        data_dir=Arg(PATH + (None,), None, 'TFDS data directory (None or "": TFDS\'s)'),
        label_space=Arg(str, "official250", '"official250" (label = category id, 250) or "contiguous" (0..132)'),
        keep_crowd=Arg(bool, True, 'keep is_crowd segments (flagged in "iscrowd"); False makes their pixels void'),
        num_classes=Arg((int, None), None, "model classes; a larger label is an error (None: the label space's size)"),
        name=Arg(str, "coco/2017_panoptic", 'TFDS dataset name ("coco_panoptic_like": built in, made on first use)'),
        size_cache_dir=Arg(PATH + (None,), None, "where the image-size index is cached (None: by the prepared data)"),
    )
    __signature__ = ARGUMENTS.signature

    def __init__(self, *args, **kwargs):
        a = self.ARGUMENTS.bind(type(self).__name__, args, kwargs)
        if a.label_space not in LABEL_SPACES:
            raise ValueError(f"label_space must be one of {LABEL_SPACES}, got {a.label_space!r}")
        super().__init__(a.name, a.split, a.data_dir, ("image", "panoptic_image"), a.size_cache_dir)
        self._check_label_names()
        self.label_space = a.label_space
        self.keep_crowd = a.keep_crowd
        if a.label_space == "contiguous":
            self.category_ids = COCO_PANOPTIC_CATEGORY_IDS
            self.class_names = COCO_PANOPTIC_CLASS_NAMES
            self.is_thing = COCO_PANOPTIC_IS_THING
            self._label_map = np.arange(len(COCO_PANOPTIC_CATEGORY_IDS), dtype=np.int32)
        else:
            self.category_ids = tuple(range(len(OFFICIAL250_CLASS_NAMES)))
            self.class_names = OFFICIAL250_CLASS_NAMES
            self.is_thing = OFFICIAL250_IS_THING
            self._label_map = np.asarray(COCO_PANOPTIC_CATEGORY_IDS, np.int32)
        self.num_classes = len(self.class_names) if a.num_classes is None else int(a.num_classes)
        self.stats: Dict[str, int] = {"crowd_dropped": 0}

    def _prepare_builtin(self, name: str, data_dir: Optional[str]) -> None:
        if name == "coco_panoptic_like":
            from detr_jax.data.sources import coco_panoptic_like  # pylint: disable=g-import-not-at-top
            coco_panoptic_like.prepare(data_dir, any_prepared=True)

    def _check_label_names(self) -> None:
        """The labels must be the 133 categories in id order: the label -> category id map assumes it."""
        info = getattr(self._source, "dataset_info", None)
        try:
            names = tuple(info.features["panoptic_objects"]["label"].names)
        except (AttributeError, KeyError, TypeError):
            return  # no dataset_info to check against (a stand-in data source)
        if len(names) != len(COCO_PANOPTIC_CLASS_NAMES):
            raise ValueError(f"{self.where}: panoptic_objects/label has {len(names)} classes, not the "
                             f"{len(COCO_PANOPTIC_CLASS_NAMES)} COCO panoptic categories this source maps to ids")
        differ = [(i, n, want) for i, (n, want) in enumerate(zip(names, COCO_PANOPTIC_CLASS_NAMES)) if n != want]
        if differ:
            logger.warning("%s: %d label names differ from the COCO panoptic categories in id order, e.g. label %d "
                           "is %r, expected %r; labels are mapped by position", self.where, len(differ), *differ[0])

    def __getitem__(self, index: int) -> Dict:
        record = self._record(self._source, index)
        example, crowd_dropped = convert_panoptic_record(record, self._label_map, self.num_classes, self.keep_crowd,
                                                         where=f"{self.where} record {index}")
        self._count(crowd_dropped=crowd_dropped)
        return example


def convert_panoptic_record(record: Dict, label_map: np.ndarray, num_classes: int, keep_crowd: bool,
                            where: str = "tfds"):
    """One TFDS coco/2017_panoptic record -> (example dict as CocoPanopticFolder's, crowd segments dropped).

    Args:
      record: {"image": uint8 [H, W, 3], "image/id", "panoptic_image": uint8 [H, W, 3] (id = R + 256 G + 256^2 B,
        0 void), "panoptic_objects": {"id": int [K] (the segment ids in the PNG), "label": int [K] in 0..132,
        "is_crowd": bool [K], ...}}.
      label_map: int [133], the label of each TFDS label (identity, or the category ids for official250).
      num_classes: labels >= num_classes raise ValueError naming the segment.
      keep_crowd: keep is_crowd segments (flagged) instead of dropping them.
      where: names the record in errors ("tfds coco/2017_panoptic train record 7").
    Raises AnnotationError (a ValueError), one line naming `where` and the image id, when the PNG and
    panoptic_objects disagree: an id in the PNG not listed, a listed id with no pixel, fields of different lengths.
    """
    image = as_rgb(record["image"])
    where = f"{where} (image id {int(record.get('image/id', -1))})"
    id_map = rgb2id(as_rgb(record["panoptic_image"]))  # int32 [H, W]
    if id_map.shape != image.shape[:2]:
        raise AnnotationError(f"{where}: the panoptic PNG is {id_map.shape[0]}x{id_map.shape[1]} (h x w) but the "
                              f"image is {image.shape[0]}x{image.shape[1]}")
    objects = record["panoptic_objects"]
    ids = np.asarray(objects["id"], np.int64).reshape(-1)
    tfds_labels = np.asarray(objects["label"], np.int64).reshape(-1)
    crowd = np.asarray(objects["is_crowd"], bool).reshape(-1)
    if not len(ids) == len(tfds_labels) == len(crowd):
        raise AnnotationError(f"{where}: panoptic_objects has {len(ids)} ids, {len(tfds_labels)} labels and "
                              f"{len(crowd)} is_crowd flags")
    if np.any(ids <= 0) or len(np.unique(ids)) != len(ids):
        raise AnnotationError(f"{where}: panoptic_objects ids {ids.tolist()} must be positive (0 is void) and "
                              "distinct")
    labels = map_labels(tfds_labels, label_map, num_classes, lambda i: f"{where}: segment id {ids[i]}",
                        AnnotationError)
    keep = np.ones(len(ids), bool) if keep_crowd else ~crowd
    masks, unknown, empty = segment_masks(id_map, ids[keep], ids.tolist())
    if unknown:
        raise AnnotationError(f"{where}: the panoptic PNG has segment ids {unknown[:10]} that panoptic_objects does "
                              "not list")
    if empty:
        raise AnnotationError(f"{where}: panoptic_objects ids {empty} are not in the panoptic PNG")
    example = {"image": image, "boxes": masks_to_boxes(masks), "labels": labels[keep],
               "image_id": int(record.get("image/id", -1)), "orig_size": tuple(image.shape[:2]),
               "iscrowd": crowd[keep], "masks": masks, "segment_ids": ids[keep].astype(np.int32)}
    return example, int(np.sum(~keep))
