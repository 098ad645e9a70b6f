"""Evaluation: official post-processing, COCO metrics with pycocotools, a results JSON and pictures.

Every host predicts its shard of the evaluation set; predictions are gathered and scored once, on
process 0. Results do not depend on the evaluation batch or the padding bucket: the padding mask keeps
padded positions out of attention, and boxes are scaled by each image's own original size.
"""

import contextlib
import io
import json
import logging
import os
from typing import Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from detr_jax import box_ops
from detr_jax.data.transforms import normalize_images

logger = logging.getLogger(__name__)
COCO_METRIC_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
                     "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")


def postprocess(pred_logits, pred_boxes, orig_size, top_k: Optional[int] = None):
    """The official `PostProcess`: best non-no-object class per query, boxes to original-image pixels.

    Args:
      pred_logits: [B, N, C + 1] (no-object last); pred_boxes: [B, N, 4] cxcywh normalised.
      orig_size: int [B, 2] (h, w) of the original images.
      top_k: keep only the k highest-scoring queries per image (None: all N, as official).
    Returns:
      scores [B, K], labels int32 [B, K], boxes [B, K, 4] xyxy in absolute pixels of the original image.
    """
    prob = jax.nn.softmax(pred_logits, axis=-1)[..., :-1]
    scores, labels = prob.max(-1), prob.argmax(-1).astype(jnp.int32)
    h, w = orig_size[:, 0].astype(jnp.float32), orig_size[:, 1].astype(jnp.float32)
    scale = jnp.stack([w, h, w, h], axis=-1)[:, None, :]
    boxes = box_ops.box_cxcywh_to_xyxy(pred_boxes) * scale
    if top_k is not None and top_k < scores.shape[1]:
        scores, idx = jax.lax.top_k(scores, top_k)
        labels = jnp.take_along_axis(labels, idx, axis=1)
        boxes = jnp.take_along_axis(boxes, idx[..., None], axis=1)
    return scores, labels, boxes


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


def coco_metrics(ground_truth: Dict, results: List[Dict]) -> Dict[str, float]:
    """AP, AP50, AP75, AP/AR by size, AR@1/10/100 with pycocotools, for COCO-format results.

    Args:
      results: [{"image_id", "category_id", "bbox": [x, y, w, h] absolute, "score"}].
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = ground_truth
        gt.createIndex()
        if not results:
            return {k: 0.0 for k in COCO_METRIC_NAMES}
        dt = gt.loadRes(results)
        coco_eval = COCOeval(gt, dt, "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return {k: float(v) for k, v in zip(COCO_METRIC_NAMES, coco_eval.stats)}


def to_coco_results(image_ids, scores, labels, boxes, category_ids: Sequence[int]) -> List[Dict]:
    """Post-processed predictions ([B, K] / [B, K, 4] xyxy absolute) -> COCO results; padding images (id < 0) skipped."""
    results = []
    for image_id, s, l, b in zip(image_ids, scores, labels, boxes):
        if image_id < 0:
            continue
        for score, label, (x0, y0, x1, y1) in zip(s, l, b):
            results.append({"image_id": int(image_id), "category_id": int(category_ids[int(label)]),
                            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], "score": float(score)})
    return results


def draw_detections(image: np.ndarray, boxes, labels, scores, class_names: Sequence[str], threshold: float = 0.5):
    """A PIL image of `image` (uint8 [H, W, 3]) with labelled boxes (xyxy absolute) scoring above `threshold`."""
    from PIL import Image, ImageDraw

    pil = Image.fromarray(np.asarray(image, np.uint8))
    draw = ImageDraw.Draw(pil)
    palette = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
               (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190)]
    for box, label, score in zip(boxes, labels, scores):
        if score < threshold:
            continue
        colour = palette[int(label) % len(palette)]
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=2)
        name = class_names[int(label)] if int(label) < len(class_names) else str(int(label))
        draw.text((x0 + 2, y0 + 1), f"{name} {score:.2f}", fill=colour)
    return pil


class Evaluator:
    """Periodic and final evaluation of a training run on the validation split (COCO metrics)."""

    def __init__(self, config, model, mesh, batch_size: Optional[int] = None):
        from detr_jax import sharding
        from detr_jax.train import build_data

        # Padding-invariant backbone by default: each image is scored as if it were evaluated alone, so
        # metrics do not depend on the batch size or the bucket (the parameters are the same).
        if config.get("eval_padding_invariant", True):
            model = model.clone(padding_invariant=True)
        self.config, self.model, self.mesh = config, model, mesh
        self.loader = build_data(config, "val", train=False, process_index=jax.process_index(),
                                 process_count=jax.process_count(),
                                 batch_size=batch_size or config.get("eval_batch_size", config.batch_size))
        source = self.loader.source
        self.category_ids = list(getattr(source, "category_ids", range(1, model.num_classes + 1)))
        self.class_names = list(getattr(source, "class_names", [str(c) for c in self.category_ids]))
        if model.num_classes > len(self.category_ids):  # a predicted label would have no category id
            raise ValueError(f"the model has {model.num_classes} classes but the evaluation data "
                             f"({config.data.source}, split val) has only {len(self.category_ids)} categories: set "
                             f"config.model.num_classes (or the data's label space) to match")
        self.ground_truth = coco_ground_truth(source, self.category_ids, self.class_names) \
            if jax.process_index() == 0 else None
        top_k = config.get("eval_top_k", None)
        repl = sharding.replicated(mesh)

        def predict(params, frozen, batch):
            images = normalize_images(batch["images"], batch["pixel_mask"])  # uint8 from the loader
            out = model.apply({"params": params, "frozen": frozen}, images, pixel_mask=batch["pixel_mask"])
            return postprocess(out["pred_logits"], out["pred_boxes"], batch["orig_size"], top_k)

        self._predict = jax.jit(predict, in_shardings=(repl, repl, sharding.batch_sharded(mesh)), out_shardings=repl)
        self._sharding = sharding

    def predict(self, params, frozen) -> List[Dict]:
        """COCO results of the whole split (all hosts' predictions, on every host)."""
        from jax.experimental import multihost_utils

        results = []
        self.loader.set_state({"epoch": 0, "position": 0})
        for local in self.loader:
            image_ids = local["image_id"]
            batch = self._sharding.global_batch({k: local[k] for k in ("images", "pixel_mask", "orig_size")}, self.mesh)
            scores, labels, boxes = jax.device_get(self._predict(params, frozen, batch))
            if jax.process_count() > 1:
                image_ids = multihost_utils.process_allgather(image_ids, tiled=True)
            results += to_coco_results(image_ids, scores, labels, boxes, self.category_ids)
        return results

    def evaluate(self, state, workdir: str, step: int, draw: bool = False, num_pictures: int = 4) -> Dict[str, float]:
        """COCO metrics of `state` on the validation split; writes the results JSON (and pictures) to workdir."""
        results = self.predict(state["params"], state["frozen"])
        if jax.process_index() != 0:
            return {}
        os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
        with open(os.path.join(workdir, "eval", f"results_step{step}.json"), "w") as f:
            json.dump(results, f)
        metrics = coco_metrics(self.ground_truth, results)
        if draw:
            self.draw(results, os.path.join(workdir, "eval", f"predictions_step{step}.png"), num_pictures)
        return {f"eval_{k}": v for k, v in metrics.items() if k in ("AP", "AP50", "AP75", "AR100")}

    def draw(self, results: List[Dict], path: str, num_pictures: int, threshold: float = 0.5, top_k: int = 3,
             min_side: int = 320) -> None:
        """One PNG: the first validation images side by side, enlarged to a shorter side of at least `min_side`,
        ground truth in white and predictions scoring >= `threshold` in class colours, the threshold written
        above each image. When no prediction of an image passes it (a young model), its `top_k` best are drawn
        with their scores instead, and the caption says so."""
        from PIL import Image, ImageDraw

        source = self.loader.source
        label_of = {c: i for i, c in enumerate(self.category_ids)}
        truth = {}
        for ann in (self.ground_truth or {}).get("annotations", []):
            truth.setdefault(ann["image_id"], []).append(ann["bbox"])
        panels = []
        for i in range(min(num_pictures, len(source))):
            ex = source[i]
            image_id = int(ex["image_id"])
            mine = sorted((r for r in results if r["image_id"] == image_id), key=lambda r: -r["score"])
            shown = [r for r in mine if r["score"] >= threshold]
            caption = f"score >= {threshold:.2f}: {len(shown)} detections; white: ground truth"
            if not shown and mine:
                shown = mine[:top_k]
                caption = f"none >= {threshold:.2f}: the top {len(shown)} shown; white: ground truth"
            h, w = ex["image"].shape[:2]
            scale = max(1.0, min_side / min(h, w))
            image = Image.fromarray(np.asarray(ex["image"], np.uint8)).resize((round(w * scale), round(h * scale)),
                                                                             Image.BILINEAR)
            xyxy = lambda b: [v * scale for v in (b[0], b[1], b[0] + b[2], b[1] + b[3])]  # COCO xywh -> xyxy
            panel = draw_detections(np.asarray(image), [xyxy(r["bbox"]) for r in shown],
                                    [label_of[r["category_id"]] for r in shown], [r["score"] for r in shown],
                                    self.class_names, threshold=-np.inf)
            draw = ImageDraw.Draw(panel)
            for box in truth.get(image_id, []):
                draw.rectangle(xyxy(box), outline=(255, 255, 255), width=1)
            framed = Image.new("RGB", (panel.width, panel.height + 16), (255, 255, 255))
            framed.paste(panel, (0, 16))
            ImageDraw.Draw(framed).text((2, 2), caption, fill=(0, 0, 0))
            panels.append(framed)
        if not panels:
            return
        canvas = Image.new("RGB", (sum(p.width for p in panels) + 4 * (len(panels) - 1), max(p.height for p in panels)),
                           (255, 255, 255))
        x = 0
        for p in panels:
            canvas.paste(p, (x, 0))
            x += p.width + 4
        canvas.save(path)
        logger.info("wrote %s", path)
