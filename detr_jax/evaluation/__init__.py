"""Evaluation: post-processing, COCO box AP, panoptic quality and segm AP, pictures; one evaluator interface.

  postprocess.py            the official PostProcess: top classes and absolute xyxy boxes
  coco.py                   DetectionEvaluator: COCO box AP (pycocotools or faster-coco-eval), results JSON, pictures
  postprocess_panoptic.py   the official PostProcessPanoptic / PostProcessSegm (choices on host, pixels on device)
  panoptic_quality.py       PQ / SQ / RQ (panopticapi's definition)
  segm.py                   COCO segm / bbox AP of the thing segments
  panoptic.py               PanopticEvaluator: PQ and segm AP of a DETRsegm
  visualize.py              detection and panoptic pictures, attention maps

`build_evaluator(config, model, mesh)` gives the one a config needs; both answer
`evaluate(variables, out_dir=None, step=None, draw=False) -> {metric: value}`, list the metrics a training run logs
in `LOGGED`, and `close()` their loader.
"""

from typing import Optional, Union

from detr_jax.evaluation.coco import DetectionEvaluator
from detr_jax.evaluation.panoptic import PanopticEvaluator

__all__ = ["DetectionEvaluator", "PanopticEvaluator", "build_evaluator"]


def build_evaluator(config, model, mesh, *, source=None, batch_size: Optional[int] = None,
                    segm: Optional[bool] = None) -> Union[DetectionEvaluator, PanopticEvaluator]:
    """The evaluator of `model` (a `DETR` or a `DETRsegm`): PQ for a model with the mask head, COCO box AP
    otherwise; on the config's validation split, or on `source`. `segm`: for a panoptic model, also segm AP
    (default config.panoptic.eval_segm)."""
    if hasattr(model, "detr"):  # a DETRsegm
        return PanopticEvaluator(config, model, mesh, source=source, batch_size=batch_size, segm=segm)
    return DetectionEvaluator(config, model, mesh, source=source, batch_size=batch_size)
