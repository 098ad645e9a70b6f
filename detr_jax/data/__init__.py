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
from detr_jax.data.sources import SOURCE_CLASSES, check_source_kwargs, source_class
from detr_jax.data.sources.coco_folder import AnnotationError, CocoFolder, ImageReadError
from detr_jax.data.sources.coco_panoptic_folder import BoxesOnly, CocoPanopticFolder, ImagesOnly
from detr_jax.data.sources.synthetic import SyntheticDetection, write_coco_folder
from detr_jax.data.sources.synthetic_panoptic import SyntheticPanoptic
from detr_jax.data.transforms import make_eval_transforms, make_train_transforms

__all__ = ["AnnotationError", "CocoFolder", "CocoPanopticFolder", "build_data", "ImageReadError", "Loader",
           "SyntheticDetection", "SyntheticPanoptic", "build_source", "check_source_kwargs", "collate", "data_buckets",
           "fit_buckets",
           "make_eval_transforms", "make_train_transforms", "recipe_buckets", "simulate_output_sizes",
           "write_coco_folder"]

logger = logging.getLogger(__name__)
PANOPTIC_SOURCES = ("synthetic_panoptic", "coco_panoptic", "tfds_panoptic")  # examples with per-object "masks"
SOURCES = tuple(SOURCE_CLASSES)  # the registry's names, in its order


def build_source(kind: str, /, **kwargs):
    """A detection source by name (`sources.SOURCE_CLASSES`), built from kwargs its declaration takes.

    "synthetic": SyntheticDetection, "coco_folder": CocoFolder, "tfds": tfds_coco.TfdsCoco; panoptic (examples with
    per-object "masks"): "synthetic_panoptic": SyntheticPanoptic, "coco_panoptic": CocoPanopticFolder,
    "tfds_panoptic": tfds_coco_panoptic.TfdsCocoPanoptic. Each class's `ARGUMENTS` declares the kwargs it takes
    (type, default or required, one line each); a key it does not take, a value of another type or a required one
    missing is a one-line ValueError (`check_source_kwargs`), as is an unknown `kind`. The TFDS sources import
    tensorflow_datasets only here, when constructed, so the other sources work without it installed.
    """
    check_source_kwargs(kind, kwargs, where=f"build_source({kind!r})")
    return source_class(kind)(**kwargs)


def check_labels_fit(source, num_classes: int, what: str) -> None:
    """Refuse, in one line, data whose labels a model of `num_classes` classes cannot predict: the source's labels
    are 0..len(category_ids) - 1. A model with more classes than the data uses is fine (e.g. an official
    checkpoint on a folder of a few COCO categories)."""
    ids = getattr(source, "category_ids", None)
    if ids is not None and len(ids) > num_classes:
        raise ValueError(f"{what} has labels up to {len(ids) - 1} (category id {ids[-1]}) but the model has "
                         f"{num_classes} classes: set config.model.num_classes to at least {len(ids)}")


def data_buckets(config: ml_collections.ConfigDict, transforms, global_batch: int):
    """The static padded shapes [(H, W), ...] of a split's batches: config.data.buckets, or with "recipe" those
    fitted to the simulated output sizes of `transforms` (see data/batching.py); None: no buckets."""
    d = config.data
    if d.buckets != "recipe":
        return d.buckets
    return recipe_buckets(transforms, batch_size=global_batch, max_side=d.max_size, group_by_size=int(d.group_by_size),
                          max_buckets=d.max_buckets)


def build_data(config: ml_collections.ConfigDict, split: str, *, train: bool, process_index: int = 0,
               process_count: int = 1, batch_size: Optional[int] = None, source=None,
               images_only: bool = False) -> Loader:
    """The loader of `split` for this process: train augmentation and shuffling when `train`.

    Batches carry uint8 images; the jitted steps normalise them on the device (`normalize_images`).
    `source`: this source instead of the config's `split` (the evaluation of a panoptic folder). `images_only`:
    batches carry no objects (a panoptic evaluation reads the ground truth from the source at the original size).
    """
    d = config.data
    if source is None:  # the split's own kwargs (e.g. its image_dir) override the shared ones
        source = build_source(d.source, **dict(d.source_kwargs.to_dict(), **d[f"{split}_kwargs"].to_dict()))
    # Panoptic sources (their examples carry "masks"): the same recipe with the masks moved along with the boxes;
    # without config.panoptic.enabled the detector alone trains on their boxes (the official recipe's first stage).
    panoptic = getattr(source, "is_thing", None) is not None
    if images_only:
        source, panoptic = ImagesOnly(source), False
    elif panoptic and not config.panoptic.enabled:
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
    buckets = data_buckets(config, transforms, global_batch)
    if d.buckets == "recipe":
        logger.info("%s buckets for the %s recipe: %s", len(buckets), split, buckets)
    return Loader(source, transforms, global_batch // process_count, seed=config.seed, max_objects=d.max_objects,
                  buckets=[tuple(b) for b in buckets] if buckets else None, shuffle=train,
                  num_workers=d.num_workers, process_index=process_index, process_count=process_count,
                  drop_remainder=train, num_epochs=None if train else 1, group_by_size=group_by_size,
                  worker_type=d.worker_type)
