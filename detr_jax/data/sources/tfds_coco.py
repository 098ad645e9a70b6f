"""COCO 2017 from TensorFlow Datasets (`coco/2017`) as a random-access detection source.

Reads through `tfds.data_source`, which needs the dataset prepared in the ArrayRecord format:
  tfds.builder("coco/2017", data_dir=...).download_and_prepare(file_format="array_record")
Every process opens the whole split (ArrayRecord reads any record directly) and the Loader gives each process
its slice of every global batch, as for the other sources: all processes then share one global order, one size
grouping and one bucket per step, with no padding to the largest bucket and no per-step exchange.

Size grouping and the bucket choice need each image's (h, w) before it is decoded, and TFDS COCO stores no
image size: the size index reads every record once with the image left encoded (only the JPEG header is
parsed), split across processes and gathered, then cached next to the prepared data (or under
~/.cache/detr_jax when that folder is read-only), so later starts load it.

TFDS labels are 0..79 in COCO category-id order; label_space "contiguous" keeps them, "official91" maps them
to the raw COCO category ids (the official DETR 91-class space of the released checkpoints).
tensorflow_datasets is imported here only, so the other sources never need TensorFlow. name="coco_like" is
the built-in COCO-like set (`detr_jax.data.sources.coco_like`), prepared on first use.
"""

import functools
import io
import logging
import os
import re
import threading
from typing import Dict, Optional, Tuple

import numpy as np
from PIL import Image

from detr_jax.data.sources.arguments import PATH, Arg, Arguments
from detr_jax.data.sources.coco_categories import COCO_CATEGORY_IDS, COCO_CLASS_NAMES, OFFICIAL91_CLASS_NAMES

logger = logging.getLogger(__name__)


class _NoOpenCVNotice(logging.Filter):
    """Drops TFDS's "OpenCV is not installed ... Defaulting to PIL" notice (once per worker process: PIL decodes
    COCO's JPEGs as well; nothing to do about it). Every other absl record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("OpenCV is not installed")


def _silence_opencv_notice() -> None:
    absl = logging.getLogger("absl")  # absl.logging writes through this logger
    if not any(isinstance(f, _NoOpenCVNotice) for f in absl.filters):
        absl.addFilter(_NoOpenCVNotice())


_silence_opencv_notice()  # at import: also in each worker process, which imports this module to unpickle a source
# Guards the sources' counters against the loader's worker threads. Module-level, not per source: a source then
# pickles as it is (loader worker processes get a copy, whose counters the loader sums).
_STATS_LOCK = threading.Lock()


class MissingPackageError(ImportError):
    """A TFDS source without tensorflow / tensorflow_datasets installed; the one-line message says what to install."""


class DatasetNotPreparedError(FileNotFoundError):
    """The TFDS dataset is not prepared in the data directory (detr_jax never starts TFDS's download on its own)."""


def _import_tfds(source: str = "tfds", instead: str = "coco_folder"):
    try:
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise MissingPackageError(
            f"the {source!r} data source needs tensorflow and tensorflow_datasets (and array_record): "
            f"`pip install -e \".[tfds]\"`, or use the {instead!r} source with the COCO annotation JSON and image "
            f"folder instead ({type(e).__name__}: {' '.join(str(e).split())})") from e
    return tfds


def _check_prepared(tfds, name: str, data_dir: Optional[str]) -> None:
    """Refuse, in one line, a dataset that is not prepared in data_dir: tfds.data_source would start downloading
    it (COCO: ~25 GB) on its own."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # TFDS warns that the version folder has no dataset_info.json: said below
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        prepared, where = builder.is_prepared(), builder.data_dir
    except tfds.core.registered.DatasetNotFoundError:  # its message lists every TFDS dataset
        prepared, where = False, os.path.join(data_dir or "TFDS's data_dir (~/tensorflow_datasets)", name)
    finally:
        absl.setLevel(level)
    if not prepared:
        shown = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets (TFDS's default)"
        raise DatasetNotPreparedError(
            f"the TFDS dataset {name} is not prepared in {shown} (no {where}/dataset_info.json) and is not "
            f"downloaded on its own (COCO is ~25 GB): prepare it once as the README says (python -c \"import "
            f"tensorflow_datasets as tfds; tfds.builder('{name}', data_dir='{data_dir or 'DATA'}')"
            f".download_and_prepare(file_format='array_record')\") or set the source's data_dir to where it is")


class TfdsRecords:
    """Random access to one split of a prepared TFDS dataset, and the size index of its images: the part of the
    TFDS sources (TfdsCoco, tfds_coco_panoptic.TfdsCocoPanoptic) that does not depend on the annotations.

    Args:
      name, split, data_dir: the TFDS dataset, split and data directory (None: TFDS's).
      encoded: the image features that `_encoded` leaves encoded (its records give sizes and ids cheaply).
      size_cache_dir: where the image-size index is cached (default: next to the prepared data).
    Subclasses name their build_source kind (SOURCE) and folder alternative (FOLDER_SOURCE) for the ImportError,
    and may prepare a built-in set on first use (`_prepare_builtin`).
    """

    SOURCE, FOLDER_SOURCE = "tfds", "coco_folder"

    def __init__(self, name: str, split: str, data_dir: Optional[str], encoded: Tuple[str, ...],
                 size_cache_dir: Optional[str]):
        tfds = _import_tfds(self.SOURCE, self.FOLDER_SOURCE)
        data_dir = data_dir or None
        self._prepare_builtin(name, data_dir)
        _check_prepared(tfds, name, data_dir)
        self.name, self.split, self.data_dir = name, split, data_dir
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
            # The same records with the images left encoded: sizes from the JPEG header, targets without decoding.
            self._encoded = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                             decoders={key: tfds.decode.SkipDecoding() for key in encoded})
        except Exception as e:
            raise RuntimeError(f"cannot open {name} split {split!r} (data_dir {data_dir}) as a random-access TFDS "
                               f"data source; prepare it with file_format='array_record' "
                               f"(tfds.builder({name!r}).download_and_prepare(file_format='array_record')): {e}"
                               ) from e
        self.where = f"tfds {name} {split}"
        self._length = len(self._source)
        # Before any batch: a record whose image header cannot be read fails here, naming it.
        self._sizes = image_size_index(self, size_cache_dir)  # int32 [N, 2] (h, w)

    def _prepare_builtin(self, name: str, data_dir: Optional[str]) -> None:
        """Write the built-in set `name` into data_dir if it is one and not there yet (subclasses)."""

    def __len__(self) -> int:
        return self._length

    def image_size(self, index: int) -> Tuple[int, int]:
        """(h, w) of record `index` from the size index, without decoding it."""
        h, w = self._sizes[int(index)]
        return int(h), int(w)

    @functools.cached_property
    def image_ids(self) -> Tuple[int, ...]:
        """The "image/id" of every record, in record order (read once, with the images left encoded)."""
        return tuple(int(self._record(self._encoded, i)["image/id"]) for i in range(len(self)))

    def _count(self, **dropped: int) -> None:
        """Add to the subclass's `stats` counters (counted per read, so one pass over the split counts each object
        once)."""
        with _STATS_LOCK:
            for key, value in dropped.items():
                self.stats[key] += value

    def _record(self, source, index: int) -> Dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records of {self.where}")
        try:
            return source[index]
        except Exception as e:  # a corrupt record or an image that does not decode
            raise ValueError(f"{self.where}: cannot read record {index}: {type(e).__name__}: {e}") from None


class TfdsCoco(TfdsRecords):
    """COCO detection examples from TFDS, the whole of `split` (random access).

    Arguments: `ARGUMENTS` (positional in that order, or keywords).

    Examples: as SyntheticDetection/CocoFolder: "image" uint8 [H, W, 3], "boxes" float32 [K, 4] xyxy absolute,
    "labels" int32 [K], "image_id" int, "orig_size" (H, W), "iscrowd" bool [K].
    """

    ARGUMENTS = Arguments(
        split=Arg(str, "train", 'TFDS split ("train", "validation", "train[:1000]", ...)'),
        data_dir=Arg(PATH + (None,), None, 'TFDS data directory (None or "": TFDS\'s)'),
        label_space=Arg(str, "contiguous", '"contiguous" (labels 0..79) or "official91" (label = COCO category id)'),
        keep_crowd=Arg(bool, False, 'keep is_crowd objects (flagged in "iscrowd"), for evaluation; False drops them'),
        num_classes=Arg((int, None), None, "model classes; a larger label is an error (None: the label space's size)"),
        name=Arg(str, "coco/2017", 'TFDS dataset name ("coco_like": the built-in set, prepared on first use)'),
        size_cache_dir=Arg(PATH + (None,), None, "where the image-size index is cached (None: by the prepared data)"),
    )
    __signature__ = ARGUMENTS.signature

    def __init__(self, *args, **kwargs):
        a = self.ARGUMENTS.bind(type(self).__name__, args, kwargs)
        if a.label_space not in ("contiguous", "official91"):
            raise ValueError(f"label_space must be 'contiguous' or 'official91', got {a.label_space!r}")
        super().__init__(a.name, a.split, a.data_dir, ("image",), a.size_cache_dir)
        self.label_space = a.label_space
        self.keep_crowd = a.keep_crowd
        if a.label_space == "contiguous":
            self.category_ids = COCO_CATEGORY_IDS
            self.class_names = COCO_CLASS_NAMES
            self._label_map = np.arange(len(COCO_CATEGORY_IDS), dtype=np.int32)
        else:
            self.category_ids = tuple(range(len(OFFICIAL91_CLASS_NAMES)))
            self.class_names = OFFICIAL91_CLASS_NAMES
            self._label_map = np.asarray(COCO_CATEGORY_IDS, np.int32)
        self.num_classes = len(self.class_names) if a.num_classes is None else int(a.num_classes)
        self.stats: Dict[str, int] = {"crowd_dropped": 0, "zero_area_dropped": 0}

    def _prepare_builtin(self, name: str, data_dir: Optional[str]) -> None:
        if name == "coco_like":
            from detr_jax.data.sources import coco_like  # pylint: disable=g-import-not-at-top
            coco_like.prepare(data_dir, any_prepared=True)

    def __getitem__(self, index: int) -> Dict:
        record = self._record(self._source, index)
        example, crowd_dropped, zero_area_dropped = convert_record(
            record, self._label_map, self.num_classes, self.keep_crowd, where=f"{self.where} record {index}")
        self._count(crowd_dropped=crowd_dropped, zero_area_dropped=zero_area_dropped)
        return example

    def target(self, index: int) -> Dict:
        """Example `index` without its image (for ground truth): the image stays encoded, sizes from the index."""
        record = dict(self._record(self._encoded, index))
        record["image"] = None
        example, _, _ = convert_record(record, self._label_map, self.num_classes, self.keep_crowd,
                                       where=f"{self.where} record {index}", image_hw=self.image_size(index))
        return example


def _encoded_image_size(record: Dict, where: str) -> Tuple[int, int]:
    """(h, w) from the header of an encoded image (PIL reads the header only)."""
    data = record["image"]
    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            w, h = im.size
    except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f"{where} (image id {int(record.get('image/id', -1))}): the image does not decode: "
                         f"{type(e).__name__}: {e}") from None
    return h, w


def image_size_index(source: TfdsRecords, cache_dir: Optional[str] = None) -> np.ndarray:
    """int32 [N, 2] (h, w) of every record of `source`'s split, cached.

    With several jax processes each reads 1/P of the records' headers and the parts are gathered (so this is a
    collective: every process calls it, as `build_data` does); process 0 writes the cache.
    """
    n = len(source)
    path = _size_cache_path(source, cache_dir)
    sizes = _load_sizes(path, n)
    count, index = _jax_processes()
    if count > 1:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        have = multihost_utils.process_allgather(np.asarray([sizes is not None], np.int32))
        if not np.all(have):
            sizes = None
    if sizes is not None:
        return sizes
    per = -(-n // count)
    mine = range(index * per, min(n, (index + 1) * per))
    logger.info("%s: reading the image sizes of %d records (once; cached in %s)", source.where, len(mine), path)
    local = np.zeros((per, 2), np.int32)
    for row, i in enumerate(mine):
        local[row] = _encoded_image_size(source._record(source._encoded, i), f"{source.where} record {i}")  # pylint: disable=protected-access
    if count > 1:
        sizes = np.asarray(multihost_utils.process_allgather(local, tiled=True))[:n]
    else:
        sizes = local[:n]
    if index == 0:
        _save_sizes(path, sizes)
    return sizes


def _jax_processes() -> Tuple[int, int]:
    """(process count, index) of a running multi-process jax, else (1, 0); never starts a jax backend itself."""
    import sys  # pylint: disable=g-import-not-at-top
    if "jax" not in sys.modules:
        return 1, 0
    import jax  # pylint: disable=g-import-not-at-top
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    if distributed.global_state.client is None:
        return 1, 0
    return jax.process_count(), jax.process_index()


def _size_cache_path(source: TfdsRecords, cache_dir: Optional[str]) -> str:
    split = re.sub(r"[^A-Za-z0-9_.-]+", "_", source.split)
    name = f"detr_jax_image_sizes.{split}.{len(source)}.npy"
    if cache_dir:
        return os.path.join(cache_dir, name)
    info = getattr(source._source, "dataset_info", None)  # pylint: disable=protected-access
    data_dir = str(getattr(info, "data_dir", "") or "")
    if data_dir and not data_dir.startswith(("gs://", "s3://")) and os.access(data_dir, os.W_OK):
        return os.path.join(data_dir, name)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{source.name}_{data_dir}")
    return os.path.join(os.path.expanduser("~/.cache/detr_jax"), safe, name)


def _load_sizes(path: str, n: int) -> Optional[np.ndarray]:
    try:
        sizes = np.load(path)
    except (OSError, ValueError):
        return None
    return sizes.astype(np.int32) if sizes.shape == (n, 2) else None


def _save_sizes(path: str, sizes: np.ndarray) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            np.save(f, sizes)
        os.replace(tmp, path)  # readers never see half a file
    except OSError as e:
        logger.warning("could not cache the image sizes in %s (%s); they will be read again next start", path, e)


def as_rgb(image) -> np.ndarray:
    """A decoded TFDS image, uint8 [H, W, 3], [H, W, 1] or [H, W] -> uint8 [H, W, 3]."""
    image = np.asarray(image, np.uint8)
    if image.ndim == 2 or image.shape[-1] == 1:
        image = np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=-1)
    return image


def convert_record(record: Dict, label_map: np.ndarray, num_classes: int, keep_crowd: bool, where: str = "tfds",
                   image_hw: Optional[Tuple[int, int]] = None):
    """One TFDS coco/2017 record -> (example dict, crowd objects dropped, zero-area objects dropped).

    Args:
      record: {"image": uint8 [H, W, 3], "image/id", "objects": {"bbox": float [K, 4] (ymin, xmin, ymax, xmax)
        normalised to [0, 1], "label": int [K] in 0..79, "is_crowd": bool [K], "id": int [K]}}.
      label_map: int [80], the label of each TFDS label (identity, or COCO_CATEGORY_IDS for official91).
      num_classes: labels >= num_classes raise ValueError naming the annotation id.
      keep_crowd: keep is_crowd objects (flagged) instead of dropping them.
      image_hw: (h, w) when record["image"] is None (targets only; the example then has no "image").
    Returns the example with "boxes" float32 [K', 4] xyxy absolute (clipped to the image, as the official
    ConvertCocoPolysToMask does; zero-area ones dropped).
    """
    if record["image"] is None:
        image = None
        h, w = image_hw
    else:
        image = as_rgb(record["image"])
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
    labels = map_labels(tfds_labels, label_map, num_classes,
                        lambda i: f"{where}: annotation id {ann_ids[i]} (image id {image_id})")
    boxes = np.stack([bbox[:, 1] * w, bbox[:, 0] * h, bbox[:, 3] * w, bbox[:, 2] * h], axis=1)
    boxes = np.clip(boxes, 0, np.array([w, h, w, h], np.float32)).astype(np.float32)
    kept_crowd = np.ones(len(labels), bool) if keep_crowd else ~crowd
    nonzero = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    keep = kept_crowd & nonzero
    example = {"image": image, "boxes": boxes[keep], "labels": labels[keep], "image_id": image_id,
               "orig_size": (h, w), "iscrowd": crowd[keep]}
    if image is None:
        del example["image"]
    return example, int(np.sum(~kept_crowd)), int(np.sum(kept_crowd & ~nonzero))


def map_labels(tfds_labels: np.ndarray, label_map, num_classes: int, name, error=ValueError) -> np.ndarray:
    """TFDS labels int [K] -> our labels int32 [K] (`label_map[tfds_label]`). A TFDS label outside the map, or a
    label >= num_classes, raises `error` with one line that starts with `name(i)`, naming object i."""
    outside = (tfds_labels < 0) | (tfds_labels >= len(label_map))
    if np.any(outside):
        bad = int(np.flatnonzero(outside)[0])
        raise error(f"{name(bad)} has TFDS label {tfds_labels[bad]} outside 0..{len(label_map) - 1}")
    labels = np.asarray(label_map, np.int32)[tfds_labels]
    too_big = labels >= num_classes
    if np.any(too_big):
        bad = int(np.flatnonzero(too_big)[0])
        raise error(f"{name(bad)} has label {labels[bad]} >= num_classes={num_classes}")
    return labels
