"""COCO 2017 from TensorFlow Datasets (`coco/2017`) as a random-access detection source.

Reads through `tfds.data_source`, which needs the dataset prepared in the ArrayRecord format:
  tfds.builder("coco/2017", data_dir=...).download_and_prepare(file_format="array_record")
Each process reads only its own shard (`tfds.split_for_jax_process`), so the source is `process_sharded`:
the Loader then iterates the shard whole on every process instead of slicing a global batch, and pads
every batch to the largest bucket when there are several processes (they cannot see each other's sizes).

TFDS labels are 0..79 in COCO category-id order; label_space "contiguous" keeps them, "official91" maps them
to the raw COCO category ids (the official DETR 91-class space of the released checkpoints).
tensorflow_datasets is imported here only, so the other sources never need TensorFlow.
"""

import logging
import threading
from typing import Dict, Optional

import numpy as np

from detr_jax.data.coco_categories import COCO_CATEGORY_IDS, COCO_CLASS_NAMES, OFFICIAL91_CLASS_NAMES

logger = logging.getLogger(__name__)


def _import_tfds():
    try:
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise ImportError("the 'tfds' data source needs tensorflow_datasets (and array_record): "
                          "`pip install tensorflow-datasets array-record`, or use the 'coco_folder' source with the "
                          f"COCO annotation JSON and image folder instead ({e})") from e
    return tfds


class TfdsCoco:
    """COCO detection examples from TFDS, this process's shard of `split`.

    Args:
      split: TFDS split ("train", "validation", "train[:1000]", ...).
      data_dir: TFDS data directory (default: TFDS's).
      label_space: "contiguous" (labels 0..79) or "official91" (label = COCO category id, num_classes 91).
      keep_crowd: keep is_crowd objects (flagged in "iscrowd"), for evaluation; False drops them (training).
      num_classes: labels >= num_classes raise ValueError naming the annotation id. Default: the space's size.
      process_index, process_count: this process's shard (default: jax's).
      drop_remainder: make every shard the same length (needed so all processes run the same number of steps).
      name: TFDS dataset name.

    Examples: as SyntheticDetection/CocoFolder: "image" uint8 [H, W, 3], "boxes" float32 [K, 4] xyxy absolute,
    "labels" int32 [K], "image_id" int, "orig_size" (H, W), "iscrowd" bool [K].
    """

    process_sharded = True

    def __init__(self, split: str = "train", data_dir: Optional[str] = None, label_space: str = "contiguous",
                 keep_crowd: bool = False, num_classes: Optional[int] = None, process_index: Optional[int] = None,
                 process_count: Optional[int] = None, drop_remainder: bool = True, name: str = "coco/2017"):
        if label_space not in ("contiguous", "official91"):
            raise ValueError(f"label_space must be 'contiguous' or 'official91', got {label_space!r}")
        tfds = _import_tfds()
        self.split = tfds.split_for_jax_process(split, process_index=process_index, process_count=process_count,
                                                drop_remainder=drop_remainder)
        try:
            self._source = tfds.data_source(name, split=self.split, data_dir=data_dir)
        except Exception as e:
            raise RuntimeError(f"cannot open {name} split {self.split!r} as a random-access TFDS data source; "
                               f"prepare it with file_format='array_record' "
                               f"(tfds.builder({name!r}).download_and_prepare(file_format='array_record')): {e}"
                               ) from e
        self.label_space = label_space
        self.keep_crowd = keep_crowd
        if label_space == "contiguous":
            self.category_ids = COCO_CATEGORY_IDS
            self.class_names = COCO_CLASS_NAMES
            self._label_map = np.arange(len(COCO_CATEGORY_IDS), dtype=np.int32)
        else:
            self.category_ids = tuple(range(len(OFFICIAL91_CLASS_NAMES)))
            self.class_names = OFFICIAL91_CLASS_NAMES
            self._label_map = np.asarray(COCO_CATEGORY_IDS, np.int32)
        self.num_classes = len(self.class_names) if num_classes is None else int(num_classes)
        self.stats: Dict[str, int] = {"crowd_dropped": 0, "zero_area_dropped": 0}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Dict:
        example, crowd_dropped, zero_area_dropped = convert_record(
            self._source[int(index)], self._label_map, self.num_classes, self.keep_crowd, where=self.split)
        with self._lock:  # counted per read, so one pass over the split counts each object once
            self.stats["crowd_dropped"] += crowd_dropped
            self.stats["zero_area_dropped"] += zero_area_dropped
        return example


def convert_record(record: Dict, label_map: np.ndarray, num_classes: int, keep_crowd: bool, where: str = "tfds"):
    """One TFDS coco/2017 record -> (example dict, crowd objects dropped, zero-area objects dropped).

    Args:
      record: {"image": uint8 [H, W, 3], "image/id", "objects": {"bbox": float [K, 4] (ymin, xmin, ymax, xmax)
        normalised to [0, 1], "label": int [K] in 0..79, "is_crowd": bool [K], "id": int [K]}}.
      label_map: int [80], the label of each TFDS label (identity, or COCO_CATEGORY_IDS for official91).
      num_classes: labels >= num_classes raise ValueError naming the annotation id.
      keep_crowd: keep is_crowd objects (flagged) instead of dropping them.
    Returns the example with "boxes" float32 [K', 4] xyxy absolute (clipped; zero-area ones dropped).
    """
    image = np.asarray(record["image"], np.uint8)
    if image.ndim == 2 or image.shape[-1] == 1:
        image = np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=-1)
    h, w = image.shape[:2]
    objects = record["objects"]
    image_id = int(record.get("image/id", -1))
    bbox = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)
    tfds_labels = np.asarray(objects["label"], np.int64).reshape(-1)
    crowd = np.asarray(objects.get("is_crowd", np.zeros(len(tfds_labels), bool)), bool).reshape(-1)
    ann_ids = np.asarray(objects.get("id", np.full(len(tfds_labels), -1)), np.int64).reshape(-1)
    lengths = {len(bbox), len(tfds_labels), len(crowd), len(ann_ids)}
    if len(lengths) > 1:
        # Real TFDS COCO records never disagree; tfds.testing.mock_data draws each field's length on its own.
        n = min(lengths)
        logger.warning("%s: image id %d has object fields of different lengths %s; keeping the first %d objects",
                       where, image_id, sorted(lengths), n)
        bbox, tfds_labels, crowd, ann_ids = bbox[:n], tfds_labels[:n], crowd[:n], ann_ids[:n]
    outside = (tfds_labels < 0) | (tfds_labels >= len(label_map))
    if np.any(outside):
        bad = int(np.flatnonzero(outside)[0])
        raise ValueError(f"{where}: annotation id {ann_ids[bad]} (image id {image_id}) has TFDS label "
                         f"{tfds_labels[bad]} outside 0..{len(label_map) - 1}")
    labels = np.asarray(label_map, np.int32)[tfds_labels]
    too_big = labels >= num_classes
    if np.any(too_big):
        bad = int(np.flatnonzero(too_big)[0])
        raise ValueError(f"{where}: annotation id {ann_ids[bad]} (image id {image_id}) has label {labels[bad]} "
                         f">= num_classes={num_classes}")
    boxes = np.stack([bbox[:, 1] * w, bbox[:, 0] * h, bbox[:, 3] * w, bbox[:, 2] * h], axis=1)
    boxes = np.clip(boxes, 0, np.array([w, h, w, h], np.float32)).astype(np.float32)
    kept_crowd = np.ones(len(labels), bool) if keep_crowd else ~crowd
    nonzero = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    keep = kept_crowd & nonzero
    example = {"image": image, "boxes": boxes[keep], "labels": labels[keep], "image_id": image_id,
               "orig_size": (h, w), "iscrowd": crowd[keep]}
    return example, int(np.sum(~kept_crowd)), int(np.sum(kept_crowd & ~nonzero))
