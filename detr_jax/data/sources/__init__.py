"""Data sources: examples {"image", "boxes" xyxy absolute, "labels", ...} from the synthetic sets, COCO folders and
TFDS; and their registry, `build_source` name -> class, each with its declared arguments.

Every source gives examples {"image" uint8 [H, W, 3], "boxes" float32 [K, 4] xyxy absolute, "labels" int32 [K],
"image_id", "orig_size" (H, W), "iscrowd" bool [K]}; the panoptic ones add "masks" bool [K, H, W] and
"segment_ids" int32 [K]. A source declares the keyword arguments it accepts once, in its class-level `ARGUMENTS`
(`arguments.Arguments`: each argument's accepted types, default or REQUIRED, one line), which its constructor
binds; `check_source_kwargs` / `check_data_kwargs` check a config's kwargs against it before anything is built.

Importing this package imports no source module; `source_class` imports one (never tensorflow_datasets, which the
TFDS sources import only when constructed).
"""

import importlib
from typing import Any, Mapping

from detr_jax.data.sources.arguments import REQUIRED, Arg, Arguments

__all__ = ["REQUIRED", "Arg", "Arguments", "SOURCE_CLASSES", "check_data_kwargs", "check_source_kwargs",
           "source_arguments", "source_class", "split_kwargs"]

# build_source name -> "module:Class" (imported on first use).
SOURCE_CLASSES = {
    "synthetic": "detr_jax.data.sources.synthetic:SyntheticDetection",
    "coco_folder": "detr_jax.data.sources.coco_folder:CocoFolder",
    "tfds": "detr_jax.data.sources.tfds_coco:TfdsCoco",
    "synthetic_panoptic": "detr_jax.data.sources.synthetic_panoptic:SyntheticPanoptic",
    "coco_panoptic": "detr_jax.data.sources.coco_panoptic_folder:CocoPanopticFolder",
    "tfds_panoptic": "detr_jax.data.sources.tfds_coco_panoptic:TfdsCocoPanoptic",
}


def source_class(source_name: str) -> type:
    """The class of a source name; ValueError (one line, listing the known names) for an unknown one."""
    path = SOURCE_CLASSES.get(source_name)
    if path is None:
        raise ValueError(f"unknown data source {source_name!r}; known: {tuple(SOURCE_CLASSES)}")
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def source_arguments(source_name: str) -> Arguments:
    """The declared arguments of a source name (its class's ARGUMENTS)."""
    return source_class(source_name).ARGUMENTS


def _owner(source_name: str) -> str:
    return f"data source {source_name!r} ({SOURCE_CLASSES[source_name].split(':')[1]})"


def check_source_kwargs(source_name: str, kwargs: Mapping[str, Any], where: str) -> None:
    """Refuse kwargs that `build_source(source_name, **kwargs)` would not take, before anything is built.

    Args:
      source_name: a `build_source` name ("synthetic", "coco_folder", "tfds", ...).
      kwargs: all the kwargs the source would get (a split's merged kwargs: `split_kwargs`).
      where: what holds them, for the message ("config.data.train_kwargs").
    Raises ValueError, one line, for: an unknown source name (listing the known ones); a key the source does not
    take (naming `where`, the source and the key, listing the keys it accepts); a value of a type its declaration
    does not take (naming the key, the expected type and the value; int is taken for float, list for tuple); a
    required argument missing.
    """
    source_class(source_name).ARGUMENTS.check(dict(kwargs), _owner(source_name), where)


def split_kwargs(data, split: str) -> dict:
    """The kwargs `build_data` gives the source of `split` ("train", "val"): config.data.source_kwargs overridden by
    config.data.<split>_kwargs (`data` is config.data)."""
    return dict(_as_dict(data["source_kwargs"]), **_as_dict(data[f"{split}_kwargs"]))


def check_data_kwargs(data) -> None:
    """`check_source_kwargs` for every split of a config (`data` is config.data: its source, source_kwargs and each
    <split>_kwargs), on the kwargs `build_data` would merge; the message names the dict that holds the key at
    fault (for a required argument missing, both)."""
    source_name = data["source"]
    arguments = source_arguments(source_name)  # an unknown name: ValueError listing the known ones
    shared = _as_dict(data["source_kwargs"])
    for field in data.keys():
        if not field.endswith("_kwargs") or field == "source_kwargs":
            continue
        own = _as_dict(data[field])
        # Each key is checked where it is set, then the merge (what the source gets) for its required arguments.
        for where, kwargs in ((f"config.data.{field}", own),
                              ("config.data.source_kwargs", {k: v for k, v in shared.items() if k not in own})):
            arguments.check(kwargs, _owner(source_name), where, complete=False)
        arguments.check(dict(shared, **own), _owner(source_name), f"config.data.source_kwargs + config.data.{field}")


def _as_dict(kwargs) -> dict:
    return kwargs.to_dict() if hasattr(kwargs, "to_dict") else dict(kwargs)
