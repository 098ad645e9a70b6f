"""Detection evaluation: official post-processing, COCO metrics with pycocotools (or faster-coco-eval:
config.eval_backend), a results JSON and pictures.

Every host predicts its shard of the evaluation set; predictions are gathered and scored once, on
process 0. Results do not depend on the evaluation batch or the padding bucket: the padding mask keeps
padded positions out of attention, and boxes are scaled by each image's own original size.
"""

import contextlib
import functools
import io
import json
import logging
import os
from typing import Dict, List, Optional, Sequence

import jax
import numpy as np

from detr_jax.data import build_data, check_labels_fit
from detr_jax.data.transforms import normalize_images
from detr_jax.evaluation.postprocess import postprocess
from detr_jax.evaluation.visualize import evaluation_sheet
from detr_jax.ops import sharding
from detr_jax.ops.files import atomic_write

logger = logging.getLogger(__name__)
COCO_METRIC_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
                     "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")
# config.eval_backend: the COCOeval that scores. pycocotools is the reference (the official numbers); faster-coco-eval
# is ~9x faster at COCO scale (BENCHMARKS.md) with stats equal to pycocotools' or one float64 rounding step (~1e-16)
# away: docs/coco_scoring.md, tests/test_eval_backend.py.
EVAL_BACKENDS = ("pycocotools", "faster_coco_eval")


def coco_ground_truth(source, category_ids: Sequence[int], class_names: Sequence[str]) -> Dict:
    """A COCO-format ground-truth dict (crowd boxes kept and flagged) of every example of `source`.

    Uses `source.target(i)` (annotations without decoding the image) where the source has it.
    """
    images, annotations = [], []
    read = getattr(source, "target", None) or source.__getitem__
    for i in range(len(source)):
        ex = read(i)
        h, w = ex["orig_size"]
        images.append({"id": int(ex["image_id"]), "height": int(h), "width": int(w)})
        crowd = np.asarray(ex.get("iscrowd", np.zeros(len(ex["labels"]), bool)), bool)
        for box, label, is_crowd in zip(np.asarray(ex["boxes"]).reshape(-1, 4), ex["labels"], crowd):
            x0, y0, x1, y1 = (float(v) for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": int(ex["image_id"]),
                                "category_id": int(category_ids[int(label)]), "bbox": [x0, y0, x1 - x0, y1 - y0],
                                "area": (x1 - x0) * (y1 - y0), "iscrowd": int(is_crowd)})
    categories = [{"id": int(c), "name": str(n)} for c, n in zip(category_ids, class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_api(backend: str = EVAL_BACKENDS[0]):
    """(COCO(), COCOeval(gt, dt, iou_type)) constructors of `backend`, one of EVAL_BACKENDS; a missing
    faster-coco-eval is one line saying what to do."""
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
        return COCO, COCOeval
    if backend != "faster_coco_eval":
        raise ValueError(f"eval_backend must be one of {EVAL_BACKENDS}, got {backend!r}")
    try:
        from faster_coco_eval import COCO, COCOeval_faster
    except ImportError:
        raise ImportError("config.eval_backend='faster_coco_eval' needs faster-coco-eval: pip install "
                          "faster-coco-eval==1.8.0, or set --config.eval_backend=pycocotools") from None
    quiet = lambda *args, **kwargs: None  # it logs its progress
    return functools.partial(COCO, print_function=quiet), functools.partial(COCOeval_faster, print_function=quiet)


def coco_metrics(ground_truth: Dict, results: List[Dict], iou_type: str = "bbox",
                 backend: str = EVAL_BACKENDS[0]) -> Dict[str, float]:
    """AP, AP50, AP75, AP/AR by size, AR@1/10/100 (COCOeval's 12 stats) of COCO-format results.

    Args:
      ground_truth: {"images", "annotations", "categories"}. Left as it is (COCOeval marks its annotations: it
        gets copies of them).
      results: [{"image_id", "category_id", "bbox": [x, y, w, h] absolute, "score"}]; for iou_type "segm",
        "segmentation" (an RLE) in place of "bbox". Left as they are (COCO.loadRes writes into its copies).
      iou_type: "bbox" or "segm", COCOeval's iouType.
      backend: the COCOeval: "pycocotools" or "faster_coco_eval" (EVAL_BACKENDS; config.eval_backend).
    """
    coco, coco_eval_class = coco_api(backend)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = coco()
        gt.dataset = dict(ground_truth, annotations=[dict(a) for a in ground_truth["annotations"]])
        gt.createIndex()
        if not results:
            return {k: 0.0 for k in COCO_METRIC_NAMES}
        dt = gt.loadRes([dict(r) for r in results])  # loadRes adds "area", "id" (and "bbox") to each result
        coco_eval = coco_eval_class(gt, dt, iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return {k: float(v) for k, v in zip(COCO_METRIC_NAMES, coco_eval.stats)}


def to_coco_results(image_ids, scores, labels, boxes, category_ids: Sequence[int]) -> List[Dict]:
    """Post-processed predictions ([B, K] / [B, K, 4] xyxy absolute) -> COCO results; padding images (id < 0)
    skipped, and so are labels that have no category in the data (a model of more classes than the data's: they
    can match no ground truth)."""
    results = []
    for image_id, s, lab, b in zip(image_ids, scores, labels, boxes):
        if image_id < 0:
            continue
        for score, label, (x0, y0, x1, y1) in zip(s, lab, b):
            if label >= len(category_ids):
                continue
            results.append({"image_id": int(image_id), "category_id": int(category_ids[int(label)]),
                            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], "score": float(score)})
    return results


class DetectionEvaluator:
    """COCO box AP of a detector on the config's validation split (or on `source`), its results JSON and pictures.

    Args:
      config: the run's config (data.*, eval_batch_size, eval_top_k, eval_padding_invariant, eval_backend).
      model: a `DETR` (or any model whose `.detector` is one); `evaluate` takes its variables.
      mesh: the device mesh; the global batch is split over it.
      source: evaluate on this source instead of the config's validation split.
      batch_size: the global batch (default config.eval_batch_size).
    """
    LOGGED = ("AP", "AP50", "AP75", "AR100")  # what a training run logs of `evaluate`'s metrics

    def __init__(self, config, model, mesh, *, source=None, batch_size: Optional[int] = None):
        # Padding-invariant backbone by default: each image is scored as if it were evaluated alone, so
        # metrics do not depend on the batch size or the bucket (the parameters are the same).
        if config.eval_padding_invariant:
            model = model.with_detector(padding_invariant=True)
        self.config, self.model, self.mesh = config, model, mesh
        self.loader = build_data(config, "val", train=False, process_index=jax.process_index(),
                                 process_count=jax.process_count(), batch_size=batch_size or config.eval_batch_size,
                                 source=source)
        source = self.loader.source
        num_classes = model.detector.num_classes
        check_labels_fit(source, num_classes, f"the evaluation data ({config.data.source}, split val)")
        self.category_ids = list(getattr(source, "category_ids", range(1, num_classes + 1)))
        self.class_names = list(getattr(source, "class_names", [str(c) for c in self.category_ids]))
        self.ground_truth = coco_ground_truth(source, self.category_ids, self.class_names) \
            if jax.process_index() == 0 else None
        if self.category_ids == list(range(len(self.category_ids))):
            # Labels are the category ids (official91: a folder of a subset of COCO's categories): a model label
            # past the data's table is that category id, as in the official results JSON. (COCOeval scores the
            # ground truth's categories only, so such detections change no metric.)
            self.category_ids = list(range(max(num_classes, len(self.category_ids))))
        top_k = config.eval_top_k
        repl = sharding.replicated(mesh)

        def predict(params, frozen, batch):
            images = normalize_images(batch["images"], batch["pixel_mask"])  # uint8 from the loader
            out = model.apply({"params": params, "frozen": frozen}, images, pixel_mask=batch["pixel_mask"])
            return postprocess(out["pred_logits"], out["pred_boxes"], batch["orig_size"], top_k)

        self._predict = jax.jit(predict, in_shardings=(repl, repl, sharding.batch_sharded(mesh)), out_shardings=repl)

    def predict(self, params, frozen) -> List[Dict]:
        """COCO results of the whole split (all hosts' predictions, on every host)."""
        from jax.experimental import multihost_utils

        results = []
        self.loader.set_state({"epoch": 0, "position": 0})
        for local in self.loader:
            image_ids = local["image_id"]
            batch = sharding.global_batch({k: local[k] for k in ("images", "pixel_mask", "orig_size")}, self.mesh)
            scores, labels, boxes = jax.device_get(self._predict(params, frozen, batch))
            if jax.process_count() > 1:
                image_ids = multihost_utils.process_allgather(image_ids, tiled=True)
            results += to_coco_results(image_ids, scores, labels, boxes, self.category_ids)
        return results

    def evaluate(self, variables, out_dir: Optional[str] = None, step: Optional[int] = None, draw: bool = False,
                 num_pictures: int = 4) -> Dict[str, float]:
        """The 12 COCO metrics (`COCO_METRIC_NAMES`) of the model's `variables` {"params", "frozen"} on process 0
        ({} on the others). With `out_dir`, writes the results JSON there (results.json, or results_step{step}.json)
        and, with `draw`, predictions_step{step}.png."""
        results = self.predict(variables["params"], variables.get("frozen", {}))
        if jax.process_index() != 0:
            return {}
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            name = "results.json" if step is None else f"results_step{step}.json"
            atomic_write(os.path.join(out_dir, name), json.dumps(results))
            if draw:
                self.draw(results, os.path.join(out_dir, f"predictions_step{step}.png"), num_pictures)
        # .get: the config.json of a work directory older than the field
        return coco_metrics(self.ground_truth, results, backend=self.config.get("eval_backend", EVAL_BACKENDS[0]))

    def close(self) -> None:
        self.loader.close()

    def draw(self, results: List[Dict], path: str, num_pictures: int, **kwargs) -> None:
        """`visualize.evaluation_sheet` of the first `num_pictures` validation images."""
        truth = {}
        for ann in (self.ground_truth or {}).get("annotations", []):
            truth.setdefault(ann["image_id"], []).append(ann["bbox"])
        source = self.loader.source
        examples = [source[i] for i in range(min(num_pictures, len(source)))]
        evaluation_sheet(examples, results, truth, self.category_ids, self.class_names, path, **kwargs)
