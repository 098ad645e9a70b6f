"""The model: the paper's DETR (detr.py) and what it is made of, the panoptic mask head, the training aids.

  detr.py               DETR: backbone -> 1x1 projection -> transformer -> class and box heads
  backbone.py           ResNet-18/34/50/101 with frozen BatchNorm (or group / batch norm), DC5
  position_encoding.py  2-D sine or learned position encodings
  transformer.py        encoder / decoder (post-norm or pre-norm)
  layers.py             Conv2d, Linear, attention kernels: speed-only formulations, same numbers
  segmentation.py       DETRsegm: the official panoptic mask head around a DETR
  aids.py               DETRWithAids: training-only aids (query groups, token heads) around the detector

Every model answers `.detector` (the DETR inside) and `.with_detector(**changes)`.
"""

from typing import Union

from detr_jax.models.aids import DETRWithAids
from detr_jax.models.detr import DETR, build_model
from detr_jax.models.segmentation import DETRsegm

__all__ = ["DETR", "DETRsegm", "DETRWithAids", "build_model", "build_inference_model", "build_training_model"]


def build_inference_model(config) -> Union[DETR, DETRsegm]:
    """The model evaluation and inference apply: `build_model(config)`, inside a `DETRsegm` with
    `config.panoptic.enabled`."""
    detector = build_model(config)
    # Work directories of before the panoptic block have no config.panoptic.
    if "panoptic" in config and config.panoptic.enabled:
        return DETRsegm(detector, freeze_detr=config.panoptic.freeze_detr)
    return detector


def build_training_model(config) -> DETRWithAids:
    """The module a training run applies: `build_inference_model(config)` with the aids of
    `config.training_aids`."""
    return DETRWithAids(build_inference_model(config), **config.training_aids.to_dict())
