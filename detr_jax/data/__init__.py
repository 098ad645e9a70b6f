"""Detection data on the host (numpy + PIL): sources, DETR's augmentation, static-shape batching, the loader.

  sources      synthetic.SyntheticDetection, coco_folder.CocoFolder, tfds_coco.TfdsCoco (needs TFDS);
               each gives examples {"image" uint8 [H, W, 3], "boxes" float32 [K, 4] xyxy absolute,
               "labels" int32 [K], "image_id", "orig_size" (h, w), "iscrowd" bool [K]}
  transforms   make_train_transforms / make_eval_transforms (official recipe; boxes end cxcywh normalised)
  batching     buckets (static pad shapes) and collate -> the batch format the model and loss consume
  loader       Loader: deterministic, resumable, multi-process aware
  build_data   the Loader of a config's split
"""

import logging
from typing import Optional

import ml_collections

from detr_jax.data.batching import collate, fit_buckets, recipe_buckets, simulate_output_sizes
from detr_jax.data.loader import Loader
from detr_jax.data.panoptic_transforms import make_panoptic_eval_transforms, make_panoptic_train_transforms
from detr_jax.data.sources.coco_folder import AnnotationError, CocoFolder, ImageReadError
from detr_jax.data.sources.coco_panoptic_folder import BoxesOnly, CocoPanopticFolder
from detr_jax.data.sources.synthetic import SyntheticDetection, write_coco_folder
from detr_jax.data.sources.synthetic_panoptic import SyntheticPanoptic
from detr_jax.data.transforms import make_eval_transforms, make_train_transforms

__all__ = ["AnnotationError", "CocoFolder", "build_data", "ImageReadError", "Loader", "SyntheticDetection",
           "build_source", "collate", "fit_buckets", "make_eval_transforms", "make_train_transforms", "recipe_buckets",
           "simulate_output_sizes", "write_coco_folder"]

logger = logging.getLogger(__name__)
PANOPTIC_SOURCES = ("synthetic_panoptic", "coco_panoptic", "tfds_panoptic")  # examples with per-object "masks"
SOURCES = ("synthetic", "coco_folder", "tfds") + PANOPTIC_SOURCES


def build_source(kind: str, /, **kwargs):
    """A detection source by name.

    "synthetic": SyntheticDetection(split, num_examples, image_size, ..., seed).
    "coco_folder": CocoFolder(ann_file, image_dir, label_space, keep_crowd, num_classes, skip_bad_images).
    "tfds": tfds_coco.TfdsCoco(split, data_dir, label_space, keep_crowd, num_classes, name, ...); imports
      tensorflow_datasets only here, so the other sources work without it installed.
    "synthetic_panoptic": SyntheticPanoptic(split, num_examples, image_size, ..., seed), "coco_panoptic":
      CocoPanopticFolder(ann_file, image_dir, panoptic_dir, label_space, ...) and "tfds_panoptic":
      tfds_coco_panoptic.TfdsCocoPanoptic(split, data_dir, label_space, keep_crowd, num_classes, name, ...)
      (name "coco/2017_panoptic"; "coco_panoptic_like" is the built-in set, prepared on first use; imports
      tensorflow_datasets only here): examples with per-object "masks".
    """
    if kind == "synthetic":
        return SyntheticDetection(**kwargs)
    if kind == "coco_folder":
        return CocoFolder(**kwargs)
    if kind == "tfds":
        from detr_jax.data import tfds_coco  # lazy: pulls in tensorflow_datasets
        return tfds_coco.TfdsCoco(**kwargs)
    if kind == "synthetic_panoptic":
        return SyntheticPanoptic(**kwargs)
    if kind == "coco_panoptic":
        return CocoPanopticFolder(**kwargs)
    if kind == "tfds_panoptic":
        from detr_jax.data import tfds_coco_panoptic  # lazy: pulls in tensorflow_datasets
        return tfds_coco_panoptic.TfdsCocoPanoptic(**kwargs)
    raise ValueError(f"unknown data source {kind!r}; known: {SOURCES}")


def build_data(config: ml_collections.ConfigDict, split: str, *, train: bool, process_index: int = 0,
               process_count: int = 1, batch_size: Optional[int] = None) -> Loader:
    """The loader of `split` for this process: train augmentation and shuffling when `train`.

    Batches carry uint8 images; the jitted steps normalise them on the device (`normalize_images`).
    """
    d = config.data
    # The split's own kwargs (e.g. its image_dir) override the shared ones.
    source = build_source(d.source, **dict(d.source_kwargs.to_dict(), **d[f"{split}_kwargs"].to_dict()))
    # Panoptic sources (their examples carry "masks"): the same recipe with the masks moved along with the boxes;
    # without config.panoptic.enabled the detector alone trains on their boxes (the official recipe's first stage).
    panoptic = getattr(source, "is_thing", None) is not None
    if panoptic and not config.panoptic.enabled:
        source, panoptic = BoxesOnly(source), False
    if train and panoptic:  # the mask losses' pixels are drawn with the augmentation (mask_loss_points)
        transforms = make_panoptic_train_transforms(
            tuple(d.train_scales), d.max_size, tuple(d.crop_resize_scales), tuple(d.crop_size),
            normalize_pixels=False, mask_points=config.panoptic.mask_loss_points)
    elif train:
        transforms = make_train_transforms(tuple(d.train_scales), d.max_size, tuple(d.crop_resize_scales),
                                           tuple(d.crop_size), normalize_pixels=False)
    else:
        make = make_panoptic_eval_transforms if panoptic else make_eval_transforms
        transforms = make(d.eval_size, d.max_size, normalize_pixels=False)
    global_batch = batch_size or config.batch_size
    if global_batch % process_count:
        raise ValueError(f"batch_size {global_batch} must be divisible by the process count {process_count}")
    # Evaluation groups sizes too: its order does not matter, its padding does (COCO val at batch 64: ~4% padded
    # instead of ~45%, BENCHMARKS.md).
    group_by_size = int(d.group_by_size)
    buckets = d.buckets
    if buckets == "recipe":  # fitted to the simulated output sizes of this pipeline (see data/batching.py)
        buckets = recipe_buckets(transforms, batch_size=global_batch, max_side=d.max_size, group_by_size=group_by_size,
                                 max_buckets=d.max_buckets)
        logger.info("%s buckets for the %s recipe: %s", len(buckets), split, buckets)
    return Loader(source, transforms, global_batch // process_count, seed=config.seed, max_objects=d.max_objects,
                  buckets=[tuple(b) for b in buckets] if buckets else None, shuffle=train,
                  num_workers=d.num_workers, process_index=process_index, process_count=process_count,
                  drop_remainder=train, num_epochs=None if train else 1, group_by_size=group_by_size,
                  worker_type=d.worker_type)
