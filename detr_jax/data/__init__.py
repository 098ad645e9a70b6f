"""Detection data on the host (numpy + PIL): sources, DETR's augmentation, static-shape batching, the loader.

  sources      synthetic.SyntheticDetection, coco_folder.CocoFolder, tfds_coco.TfdsCoco (needs TFDS);
               each gives examples {"image" uint8 [H, W, 3], "boxes" float32 [K, 4] xyxy absolute,
               "labels" int32 [K], "image_id", "orig_size" (h, w), "iscrowd" bool [K]}
  transforms   make_train_transforms / make_eval_transforms (official recipe; boxes end cxcywh normalised)
  batching     buckets (static pad shapes) and collate -> the batch format the model and loss consume
  loader       Loader: deterministic, resumable, multi-process aware
"""

from detr_jax.data.batching import collate, fit_buckets, recipe_buckets, simulate_output_sizes
from detr_jax.data.coco_folder import AnnotationError, CocoFolder, ImageReadError
from detr_jax.data.loader import Loader
from detr_jax.data.synthetic import SyntheticDetection, write_coco_folder
from detr_jax.data.transforms import make_eval_transforms, make_train_transforms

__all__ = ["AnnotationError", "CocoFolder", "ImageReadError", "Loader", "SyntheticDetection", "build_source",
           "collate", "fit_buckets", "make_eval_transforms", "make_train_transforms", "recipe_buckets",
           "simulate_output_sizes", "write_coco_folder"]

SOURCES = ("synthetic", "coco_folder", "tfds")


def build_source(kind: str, /, **kwargs):
    """A detection source by name.

    "synthetic": SyntheticDetection(split, num_examples, image_size, ..., seed).
    "coco_folder": CocoFolder(ann_file, image_dir, label_space, keep_crowd, num_classes, skip_bad_images).
    "tfds": tfds_coco.TfdsCoco(split, data_dir, label_space, keep_crowd, num_classes, name, ...); imports
      tensorflow_datasets only here, so the other sources work without it installed.
    """
    if kind == "synthetic":
        return SyntheticDetection(**kwargs)
    if kind == "coco_folder":
        return CocoFolder(**kwargs)
    if kind == "tfds":
        from detr_jax.data import tfds_coco  # lazy: pulls in tensorflow_datasets
        return tfds_coco.TfdsCoco(**kwargs)
    raise ValueError(f"unknown data source {kind!r}; known: {SOURCES}")
