"""A small COCO-like detection dataset as a TensorFlow Datasets builder, prepared locally (no download).

The records have exactly the features of TFDS `coco/2017` and are written in the ArrayRecord format, so the
COCO reader `tfds_coco.TfdsCoco(..., name="coco_like")` and `tfds.data_source("coco_like", ...)` read them
unchanged: the whole tfds -> loader -> train path runs on a CPU without COCO. Neither writing nor reading
imports TensorFlow (TFDS serializes and decodes with numpy and PIL here).

  python -c "from detr_jax.data.sources.coco_like import prepare; prepare('/tmp/tfds')"   # ~3 s on 2 CPU cores

writes /tmp/tfds/coco_like/1.0.0/{coco_like-train.array_record-00000-of-00001, ...-validation..., *.json}.

Example i of a split is SyntheticDetection(split, image_size=the COCO size mix, seed)[i] (TFDS "validation"
is synthetic "val"), stored as record i (shuffling is disabled, so record order = synthetic index):
  image        the synthetic image, JPEG (quality 90), h x w drawn uniformly from batching.COCO_IMAGE_SIZES
  image/id     index + 1 in train, VALIDATION_ID_OFFSET + index + 1 in validation (unique over both splits)
  objects/id   image id * 100 + k for the k-th object (unique; images have at most max_objects < 100 objects)
  objects/bbox the tight synthetic box as (ymin, xmin, ymax, xmax) normalised by the image size
  objects/area its area in pixels (int; COCO's is the mask's area, here the box's)
  objects/label the shape label 0..4, read as the first 5 COCO classes: rectangle=person, ellipse=bicycle,
               triangle=car, cross=motorcycle, diamond=airplane (COCO category ids 1..5, as write_coco_folder)
  objects/is_crowd  False in train; in validation the first object of every CROWD_EVERY-th image
               (index % CROWD_EVERY == 0), so the crowd handling of readers and evaluation is exercised.
"""

import abc
import contextlib
import fcntl
import io
import os
import sys
from typing import Optional, Type

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from detr_jax.data.batching import COCO_IMAGE_SIZES
from detr_jax.data.sources.coco_categories import COCO_CLASS_NAMES
from detr_jax.data.sources.synthetic import SyntheticDetection

VALIDATION_ID_OFFSET = 1_000_000
CROWD_EVERY = 8
SYNTHETIC_SPLITS = {"train": "train", "validation": "val"}  # TFDS split -> synthetic split
_MAX_OBJECTS = 8  # SyntheticDetection's default; annotation ids need < 100


class SyntheticSplitsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A TFDS builder of a "train" and a "validation" split generated here (nothing is downloaded): the part that
    CocoLike and coco_panoptic_like.CocoPanopticLike share. Subclasses give `_features()` and
    `_generate_examples(split)`; the module's docstring is the dataset's description.

    Args:
      num_train, num_validation: examples per split (written into the dataset_info; a prepared data_dir holds
        one size: prepare_locally() raises on a mismatch).
      seed: the synthetic set's seed.
      **kwargs: tfds.core.GeneratorBasedBuilder's (data_dir, file_format, ...).
    """

    # TFDS looks for a checksums file beside the builder's code through `code_path`, which in TFDS 4.9.10 on
    # Python >= 3.9 needs the undeclared package importlib_resources (tensorflow/datasets#11212). Nothing is
    # downloaded here, so there is no checksums file to find.
    code_path = None

    def __init__(self, *, num_train: int = 256, num_validation: int = 64, seed: int = 0, **kwargs):
        self.num_examples = {"train": int(num_train), "validation": int(num_validation)}
        self.seed = int(seed)
        super().__init__(**kwargs)

    @abc.abstractmethod
    def _features(self) -> tfds.features.FeaturesDict:
        """The dataset's features."""

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=sys.modules[type(self).__module__].__doc__, features=self._features(),
            disable_shuffling=True, metadata=tfds.core.MetadataDict(seed=self.seed, num_examples=self.num_examples))

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in SYNTHETIC_SPLITS}


class CocoLike(SyntheticSplitsBuilder):
    """COCO-like detection dataset: synthetic shapes with coco/2017's features (see the module docstring).
    Arguments as SyntheticSplitsBuilder's (the seed is SyntheticDetection's)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Synthetic shapes with the coco/2017 detection features."}

    def _features(self) -> tfds.features.FeaturesDict:
        # As tensorflow_datasets/object_detection/coco.py (config 2017); there ClassLabel(num_classes=80) gets
        # these names during generation.
        return tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            "image/filename": tfds.features.Text(),
            "image/id": np.int64,
            "objects": tfds.features.Sequence({
                "id": np.int64,
                "area": np.int64,
                "bbox": tfds.features.BBoxFeature(),
                "label": tfds.features.ClassLabel(names=COCO_CLASS_NAMES),
                "is_crowd": np.bool_,
            }),
        })

    def _generate_examples(self, split: str):
        source = SyntheticDetection(SYNTHETIC_SPLITS[split], num_examples=self.num_examples[split],
                                    image_size=list(COCO_IMAGE_SIZES), max_objects=_MAX_OBJECTS, seed=self.seed)
        for index in range(len(source)):
            yield index, synthetic_to_record(source[index], index, split)  # int keys: written in this order


def image_id(index: int, split: str) -> int:
    """The COCO image id of example `index` of `split` ("train" or "validation")."""
    return index + 1 + (VALIDATION_ID_OFFSET if split == "validation" else 0)


def synthetic_to_record(example: dict, index: int, split: str) -> dict:
    """A SyntheticDetection example ("image" uint8 [H, W, 3], "boxes" float32 [K, 4] xyxy absolute, integer
    valued, "labels" int32 [K] in 0..4) -> a coco/2017 record dict for tfds (the image as JPEG bytes)."""
    h, w = example["image"].shape[:2]
    img_id = image_id(index, split)
    objects = []
    for k, ((x0, y0, x1, y1), label) in enumerate(zip(example["boxes"].tolist(), example["labels"].tolist())):
        objects.append({
            "id": img_id * 100 + k,
            "area": int(round((x1 - x0) * (y1 - y0))),
            "bbox": tfds.features.BBox(ymin=y0 / h, xmin=x0 / w, ymax=y1 / h, xmax=x1 / w),
            "label": int(label),
            "is_crowd": split == "validation" and k == 0 and index % CROWD_EVERY == 0,
        })
    return {"image": encode_image(example["image"], "jpeg"), "image/filename": f"{img_id:012d}.jpg", "image/id": img_id,
            "objects": objects}


def encode_image(image: np.ndarray, image_format: str) -> bytes:
    """uint8 [H, W, 3] -> "jpeg" (quality 90) or "png" (lossless) bytes, as TFDS stores images."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=image_format, **({"quality": 90} if image_format == "jpeg" else {}))
    return buffer.getvalue()


def prepare(data_dir: Optional[str] = None, num_train: int = 256, num_validation: int = 64,
            seed: int = 0, any_prepared: bool = False) -> CocoLike:
    """Write coco_like into `data_dir` (default: TFDS's, ~/tensorflow_datasets) unless it is there already; returns
    the builder. See prepare_locally."""
    return prepare_locally(CocoLike, data_dir, num_train, num_validation, seed, any_prepared)


def prepare_locally(builder_cls: Type[SyntheticSplitsBuilder], data_dir: Optional[str], num_train: int,
                    num_validation: int, seed: int, any_prepared: bool) -> SyntheticSplitsBuilder:
    """Write `builder_cls`'s dataset into `data_dir` (default: TFDS's, ~/tensorflow_datasets) as ArrayRecord unless
    it is there already; returns the builder.

    Idempotent: a second call only reads the dataset_info (well under a second). Processes of one machine
    preparing the same folder at once take turns (a file lock), so one writes and the others find it prepared.
    Raises ValueError naming the folder when it holds the dataset with other sizes, another seed or another file
    format, unless `any_prepared` (what readers use: whatever the folder holds is fine).
    """
    data_dir = os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, f".{builder_cls.name}.lock"), "a") as lock, contextlib.ExitStack() as stack:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stack.callback(fcntl.flock, lock, fcntl.LOCK_UN)
        builder = builder_cls(data_dir=data_dir, num_train=num_train, num_validation=num_validation, seed=seed,
                              file_format="array_record")
        if builder.is_prepared():
            found = {"num_examples": {s: builder.info.splits[s].num_examples for s in SYNTHETIC_SPLITS},
                     "seed": builder.info.metadata["seed"], "file_format": builder.info.file_format.value}
            wanted = {"num_examples": builder.num_examples, "seed": builder.seed, "file_format": "array_record"}
            if found != wanted and not any_prepared:
                raise ValueError(f"{builder.data_dir} holds {builder.name} with {found}, not the requested {wanted}; "
                                 f"use another data_dir or delete that folder")
            return builder
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        return builder
