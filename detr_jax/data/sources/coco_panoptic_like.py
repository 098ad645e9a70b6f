"""A small COCO-panoptic-like dataset as a TensorFlow Datasets builder, prepared locally (no download).

The panoptic twin of `coco_like`: the records have exactly the features of TFDS `coco/2017_panoptic` and are
written in the ArrayRecord format, so `tfds_coco_panoptic.TfdsCocoPanoptic(..., name="coco_panoptic_like")` and
`tfds.data_source("coco_panoptic_like", ...)` read them as they would COCO panoptic. Neither writing nor reading
imports TensorFlow.

  python -c "from detr_jax.data.sources.coco_panoptic_like import prepare; prepare('/tmp/tfds')"   # ~2 s on 2 CPU cores

writes /tmp/tfds/coco_panoptic_like/1.0.0/{coco_panoptic_like-train.array_record-00000-of-00001, ..., *.json}.

Example i of a split is SyntheticPanoptic(split, image_size=IMAGE_SIZES, seed)[i] (TFDS "validation" is
synthetic "val"), stored as record i (shuffling is disabled, so record order = synthetic index):
  image            the synthetic image, JPEG (quality 90), h x w drawn uniformly from IMAGE_SIZES
  image/id         as coco_like: index + 1 in train, VALIDATION_ID_OFFSET + index + 1 in validation
  panoptic_image   the segments as a COCO panoptic PNG (id = R + 256 G + 256^2 B, 0 void), lossless
  panoptic_objects one per segment, in the synthetic order (stuff bands, then things):
    id        the segment's id in the PNG: synthetic segment id k (1..K) * SEGMENT_ID_STRIDE
    area      its pixel count; bbox its mask's extent (ymin, xmin, ymax, xmax) normalised by the image size
    label     the index into the 133 panoptic categories sorted by id of CATEGORY_IDS[synthetic label]: the
              things ellipse, rectangle, triangle as person, bicycle, car; the stuff sky, grass, sand as
              sky-other-merged, grass-merged, sand
    is_crowd  False in train; in validation the first thing of every CROWD_EVERY-th image (index % CROWD_EVERY
              == 0), so the crowd handling of readers and evaluation is exercised.
"""

from typing import Optional

import numpy as np
import tensorflow_datasets as tfds

from detr_jax.data.panoptic_transforms import masks_to_boxes
from detr_jax.data.sources import coco_like
from detr_jax.data.sources.coco_panoptic_categories import COCO_PANOPTIC_CATEGORY_IDS, COCO_PANOPTIC_CLASS_NAMES
from detr_jax.data.sources.synthetic_panoptic import SyntheticPanoptic
from detr_jax.ops.panoptic_ids import id2rgb

IMAGE_SIZES = ((96, 128), (128, 96), (112, 112), (128, 160), (160, 128))  # (h, w): small, both orientations
# 0x030201: segment k is RGB (k, 2k, 3k), so the id decoding uses all three channels (SyntheticPanoptic has at
# most 9 segments, well under 256 / 3).
SEGMENT_ID_STRIDE = 1 + 2 * 256 + 3 * 256 ** 2
CATEGORY_IDS = (1, 2, 3, 187, 193, 154)  # the COCO panoptic category of each SyntheticPanoptic label
TFDS_LABELS = tuple(COCO_PANOPTIC_CATEGORY_IDS.index(c) for c in CATEGORY_IDS)  # their coco/2017_panoptic labels


class CocoPanopticLike(coco_like.SyntheticSplitsBuilder):
    """COCO-panoptic-like dataset: synthetic stuff and things with coco/2017_panoptic's features (see the module
    docstring). Arguments as coco_like.SyntheticSplitsBuilder's (the seed is SyntheticPanoptic's)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Synthetic stuff and things with the coco/2017_panoptic features."}

    def _features(self) -> tfds.features.FeaturesDict:
        # As tensorflow_datasets/object_detection/coco.py (config 2017_panoptic); there ClassLabel(num_classes=133)
        # gets the names of the panoptic JSON's categories during generation.
        return tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            "image/filename": tfds.features.Text(),
            "image/id": np.int64,
            "panoptic_image": tfds.features.Image(encoding_format="png"),
            "panoptic_image/filename": tfds.features.Text(),
            "panoptic_objects": tfds.features.Sequence({
                "id": np.int64,
                "area": np.int64,
                "bbox": tfds.features.BBoxFeature(),
                "label": tfds.features.ClassLabel(names=COCO_PANOPTIC_CLASS_NAMES),
                "is_crowd": np.bool_,
            }),
        })

    def _generate_examples(self, split: str):
        source = SyntheticPanoptic(coco_like.SYNTHETIC_SPLITS[split], num_examples=self.num_examples[split],
                                   image_size=list(IMAGE_SIZES), seed=self.seed)
        for index in range(len(source)):
            yield index, synthetic_to_record(source[index], index, split, source.is_thing)  # written in this order


def synthetic_to_record(example: dict, index: int, split: str, is_thing) -> dict:
    """A SyntheticPanoptic example ("image" uint8 [H, W, 3], "masks" bool [K, H, W], "labels" int32 [K] in 0..5,
    "segment_ids" int32 [K]; `is_thing` per label) -> a coco/2017_panoptic record dict for tfds (images as bytes)."""
    h, w = example["image"].shape[:2]
    img_id = coco_like.image_id(index, split)
    png_ids = example["segment_ids"].astype(np.int64) * SEGMENT_ID_STRIDE
    id_map = np.zeros((h, w), np.int64)
    for mask, png_id in zip(example["masks"], png_ids):
        id_map[mask] = png_id
    things = [k for k, label in enumerate(example["labels"].tolist()) if is_thing[label]]
    crowd_k = things[0] if split == "validation" and index % coco_like.CROWD_EVERY == 0 and things else -1
    objects = []
    for k, (mask, png_id, label, (x0, y0, x1, y1)) in enumerate(zip(
            example["masks"], png_ids.tolist(), example["labels"].tolist(), masks_to_boxes(example["masks"]).tolist())):
        objects.append({
            "id": png_id,
            "area": int(mask.sum()),
            "bbox": tfds.features.BBox(ymin=y0 / h, xmin=x0 / w, ymax=y1 / h, xmax=x1 / w),
            "label": TFDS_LABELS[label],
            "is_crowd": k == crowd_k,
        })
    return {"image": coco_like.encode_image(example["image"], "jpeg"), "image/filename": f"{img_id:012d}.jpg",
            "image/id": img_id, "panoptic_image": coco_like.encode_image(id2rgb(id_map), "png"),
            "panoptic_image/filename": f"{img_id:012d}.png", "panoptic_objects": objects}


def prepare(data_dir: Optional[str] = None, num_train: int = 256, num_validation: int = 64,
            seed: int = 0, any_prepared: bool = False) -> CocoPanopticLike:
    """Write coco_panoptic_like into `data_dir` (default: TFDS's, ~/tensorflow_datasets) unless it is there already;
    returns the builder. See coco_like.prepare_locally (idempotent, locked, raises on other sizes or seed unless
    `any_prepared`)."""
    return coco_like.prepare_locally(CocoPanopticLike, data_dir, num_train, num_validation, seed, any_prepared)
