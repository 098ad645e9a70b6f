"""Panoptic evaluation: PQ / SQ / RQ (all, things, stuff) of a `DETRsegm` on a panoptic source, as the official
DETR scores COCO panoptic (engine.py `evaluate` + `PanopticEvaluator`, panopticapi's `pq_compute`), and the
instance AP of the same outputs (COCO segm and bbox AP on the thing segments, `evaluate_segm`).

The official path, kept here: the images go through the evaluation transforms (shorter side eval_size, longer
<= max_size) and are padded into a batch; the model predicts class logits and mask logits at stride 4 of the
padded batch; `PostProcessPanoptic` resizes each image's kept masks to its processed size (the resized size
before padding), takes the per-pixel argmax and resizes the id map to the original size; PQ compares it with
the ground-truth id map. The forward pass is jitted, and so are the resizes, the argmax and the thresholds of the
post-processing (`postprocess_panoptic`: on device, at the original size's pixels only); the data-dependent choices
(which queries, the merging of stuff) are made on the host, as are the PNGs, the RLEs and the PQ bookkeeping.

Labels are the model's classes; `source.category_ids[label]` is the dataset's category id. Predicted
segments of a label that is no category of the dataset (an "N/A" label of the official 250-class space) are
made void before scoring; panopticapi would refuse the whole prediction.

Multi-process: every process predicts and scores its share of the images; the per-category counts (sum of
IoUs, tp, fp, fn), which add up over images, are summed over the processes before the averages; the instance
AP's RLEs are gathered and scored on every process.
"""

import logging
from typing import Dict, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec

from detr_jax.data import build_data, check_labels_fit
from detr_jax.data.transforms import normalize_images
from detr_jax.evaluation.coco import EVAL_BACKENDS
from detr_jax.evaluation.panoptic_quality import VOID, CategoryStats, PanopticQuality
from detr_jax.evaluation.postprocess_panoptic import post_process_panoptic, segm_masks
from detr_jax.evaluation.segm import UNUSED_CLASS_NAME, InstanceScorer
from detr_jax.ops import sharding

logger = logging.getLogger(__name__)
OFFICIAL_THRESHOLD = 0.85  # PostProcessPanoptic's default: a query is kept above this class probability


def dataset_categories(source) -> Dict[int, Dict]:
    """{category id: {"isthing": 0/1, "name"}} of the source's real categories (labels named "N/A" left out)."""
    return {int(c): {"isthing": int(t), "name": str(n)}
            for c, n, t in zip(source.category_ids, source.class_names, source.is_thing) if n != UNUSED_CLASS_NAME}


def ground_truth_segments(example: Dict, category_ids: Sequence[int]) -> Tuple[np.ndarray, list]:
    """The COCO panoptic ground truth of a panoptic example ("masks" bool [K, H, W], "segment_ids", "labels",
    "iscrowd"): id map int32 [H, W] (0 void) and segments_info [{"id", "category_id", "iscrowd"}]."""
    masks = np.asarray(example["masks"], bool)
    ids = np.zeros(masks.shape[1:], np.int32)
    segments = []
    for mask, seg_id, label, crowd in zip(masks, example["segment_ids"], example["labels"], example["iscrowd"]):
        ids[mask] = seg_id
        segments.append({"id": int(seg_id), "category_id": int(category_ids[int(label)]), "iscrowd": int(crowd)})
    return ids, segments


def prediction_segments(result: Dict, category_ids: Sequence[int], categories: Dict) -> Tuple[np.ndarray, list]:
    """`post_process_panoptic`'s result for one image -> (id map int32 [H, W], segments_info) in category ids.

    Segment ids are shifted by one so that 0 is void (post-processing numbers the segments from 0). Void: the
    pixels of no listed segment (all of them when no query was kept) and those of a label not in `categories`.
    """
    segments = []
    for seg in result["segments_info"]:
        label = seg["category_id"]  # post-processing's "category_id" is the label
        category_id = int(category_ids[label]) if label < len(category_ids) else None  # past the data's: void
        if category_id in categories:
            segments.append({"id": seg["id"] + 1, "category_id": category_id})
    raw = result["segment_ids"].astype(np.int32)
    ids = np.where(np.isin(raw + 1, [s["id"] for s in segments]), raw + 1, VOID).astype(np.int32)
    return ids, segments


class PanopticScorer:
    """PQ (and instance AP) of predictions on a panoptic source, fed one batch of raw model outputs at a time (on
    the host).

    Args:
      source: a panoptic source (`CocoPanopticFolder`, `SyntheticPanoptic`): examples with "masks",
        "segment_ids", "labels", "iscrowd", "image_id"; `category_ids`, `class_names`, `is_thing` per label.
      threshold: `post_process_panoptic`'s class probability threshold (official 0.85).
      segm: also the COCO segm and bbox AP of every query (`evaluate_segm.InstanceScorer`); `add` then needs
        pred_boxes. Costs every query's mask at the original size (on device) and the RLEs of those of a thing label.
      backend: the COCOeval of the segm AP (`coco.EVAL_BACKENDS`, config.eval_backend).
    """

    def __init__(self, source, threshold: float = OFFICIAL_THRESHOLD, segm: bool = True,
                 backend: str = EVAL_BACKENDS[0]):
        self.source, self.threshold = source, threshold
        self.instances = InstanceScorer(source, backend) if segm else None
        self.category_ids = list(source.category_ids)
        self.categories = dataset_categories(source)
        self.is_thing_map = dict(enumerate(source.is_thing))  # in label space, as post-processing reads it
        image_ids = getattr(source, "image_ids", None)
        if image_ids is None:
            image_ids = [source[i]["image_id"] for i in range(len(source))]
        self._index_of = {int(image_id): i for i, image_id in enumerate(image_ids)}
        self.reset()

    def reset(self):
        self.metric = PanopticQuality(self.categories)
        self.num_images = 0
        if self.instances is not None:
            self.instances.reset()

    def add(self, image_ids, pred_logits, pred_masks, sizes, orig_sizes, pred_boxes=None, padded_size=None):
        """Post-process and score one batch; padding examples (image_id < 0) are skipped.

        Args:
          image_ids: int [B].
          pred_logits: [B, N, C + 1] class logits, no-object last.
          pred_masks: [B, N, h, w] mask logits at stride 4 of the padded batch (numpy, or a jax array: the
            post-processing then runs where it is, without a copy through the host).
          sizes: int [B, 2] each image's (h, w) after the transforms, before padding (the processed size).
          orig_sizes: int [B, 2] the original (H, W): the predicted id map is made at this size.
          pred_boxes: [B, N, 4] cxcywh normalised; needed with segm.
          padded_size: (H, W) of the padded batch: the masks are resized to it and cropped to each image (see
            `post_process_panoptic`, `post_process_segm`). None: as official (panoptic: each image's whole mask
            stretched to its size; instances: the padded size taken to be the largest of `sizes`).
        """
        if self.instances is not None and pred_boxes is None:
            raise ValueError("PanopticScorer(segm=True).add needs pred_boxes (the bbox AP is of the same queries); "
                             "pass them or build the scorer with segm=False")
        image_ids, pred_logits = np.asarray(image_ids), np.asarray(pred_logits)
        sizes, orig_sizes = np.asarray(sizes), np.asarray(orig_sizes)
        pred_boxes = None if pred_boxes is None else np.asarray(pred_boxes)
        real = image_ids >= 0
        if not real.any():
            return
        if not real.all():  # the padding examples of a last batch: left out before anything is computed
            rows = np.flatnonzero(real)
            pred_masks, sizes, orig_sizes = pred_masks[rows], sizes[rows], orig_sizes[rows]
            image_ids, pred_logits = image_ids[rows], pred_logits[rows]
            pred_boxes = None if pred_boxes is None else pred_boxes[rows]
        if self.instances is not None:  # dispatched first: the device makes them while the host works below
            segm = segm_masks(pred_masks, sizes, orig_sizes, padded_size=padded_size)
        results = post_process_panoptic(pred_logits, pred_masks, None, sizes, orig_sizes, self.is_thing_map,
                                        self.threshold, padded_size=padded_size)
        if self.instances is not None:
            segm = np.asarray(segm)  # one transfer (B x N x W x H bytes; none on a CPU)
        for i, result in enumerate(results):
            example = self.source[self._index_of[int(image_ids[i])]]
            gt_ids, gt_segments = ground_truth_segments(example, self.category_ids)
            pred_ids, pred_segments = prediction_segments(result, self.category_ids, self.categories)
            self.metric.update(gt_ids, gt_segments, pred_ids, pred_segments)
            self.num_images += 1
            if self.instances is not None:
                self.instances.add(example, pred_logits[i], pred_boxes[i], segm[i])

    def _gathered(self):
        """(PanopticQuality, number of images) summed over all processes (a collective: all processes call it);
        this scorer's own counts stay as they are."""
        if jax.process_count() == 1:
            return self.metric, self.num_images
        order = sorted(self.categories)
        stats = self.metric.stats
        # jax gathers float32 (x64 is off): each IoU sum travels as a float32 and its float32 remainder, so the
        # total keeps float64 precision; the counts are exact in float32 up to 2^24.
        iou = np.asarray([stats[c].iou for c in order] + [0.0], np.float64)
        iou_high = iou.astype(np.float32)
        local = np.stack([iou_high, (iou - iou_high).astype(np.float32),
                          [stats[c].tp for c in order] + [self.num_images],
                          [stats[c].fp for c in order] + [0], [stats[c].fn for c in order] + [0]], 1)
        gathered = np.asarray(multihost_utils.process_allgather(local.astype(np.float32)), np.float64)
        total = gathered.sum(0)
        metric = PanopticQuality(self.categories)
        for c, (high, low, tp, fp, fn) in zip(order, total[:-1]):
            metric.stats[c] = CategoryStats(float(high + low), int(tp), int(fp), int(fn))
        return metric, int(total[-1, 2])

    def compute(self) -> Dict[str, float]:
        """{"PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st"} (fractions, not percent),
        the numbers of categories averaged ("num_categories", "_th", "_st") and "num_images"; with segm, the
        instance AP ("segm_AP", "segm_AP50", "segm_AP75", "bbox_AP", "bbox_AP50", "bbox_AP75", see
        `InstanceScorer.compute`). Over all processes."""
        metric, num_images = self._gathered()
        pq = metric.compute()
        metrics = {}
        for name, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
            for key in ("pq", "sq", "rq"):
                metrics[key.upper() + suffix] = float(pq[name][key])
            metrics["num_categories" + suffix] = int(pq[name]["n"])
        metrics["num_images"] = num_images
        if self.instances is not None:
            metrics.update(self.instances.compute())
        return metrics


class PanopticEvaluator:
    """PQ (and segm / bbox AP) of a `DETRsegm` on the config's panoptic validation split (or on `source`), through
    the official evaluation transforms and post-processing. The same interface as `DetectionEvaluator`.

    Args:
      config: the run's config: data.* (eval_size, max_size, buckets, workers), eval_batch_size,
        eval_padding_invariant (not official: with the official backbone a batch's padding changes every image's
        outputs a little), panoptic.threshold (official 0.85), panoptic.eval_segm, eval_backend.
      model: a `models.segmentation.DETRsegm`; `evaluate` takes its variables.
      mesh: the device mesh; the global batch is split over it. With segm, the host receives [B, N, W, H] bool
        instance masks per batch (B x 100 x 640 x 640 bytes at COCO sizes: ~40 MB an image), so keep the batch
        moderate; with several processes, also the [B, N, H/4, W/4] float32 mask logits of its images.
      source: a panoptic source (see `PanopticScorer`) instead of the config's validation split; its labels must
        be the model's classes.
      batch_size: the global batch (default config.eval_batch_size).
      segm: also the COCO segm and bbox AP (default config.panoptic.eval_segm).
    """
    LOGGED = ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "segm_AP", "segm_AP50", "bbox_AP", "bbox_AP50")

    def __init__(self, config, model, mesh, *, source=None, batch_size: Optional[int] = None,
                 segm: Optional[bool] = None):
        if not hasattr(model, "detr"):
            raise ValueError(f"PanopticEvaluator needs a DETRsegm (a model with masks), got {type(model).__name__}; "
                             "score a detector with detr_jax.evaluation.DetectionEvaluator")
        if config.eval_padding_invariant:
            model = model.with_detector(padding_invariant=True)
        self.model, self.mesh = model, mesh
        # The loader carries images only: the scorer reads the ground truth at the original size.
        self.loader = build_data(config, "val", train=False, process_index=jax.process_index(),
                                 process_count=jax.process_count(), batch_size=batch_size or config.eval_batch_size,
                                 source=source, images_only=True)
        self.source = self.loader.source.source
        check_labels_fit(self.source, model.detector.num_classes, "the panoptic data")
        self.scorer = PanopticScorer(self.source, config.panoptic.threshold,
                                     segm=config.panoptic.eval_segm if segm is None else segm,
                                     backend=config.get("eval_backend", EVAL_BACKENDS[0]))  # .get: older runs
        repl, sharded = sharding.replicated(mesh), sharding.batch_sharded(mesh)

        def predict(params, frozen, batch):
            images = normalize_images(batch["images"], batch["pixel_mask"])  # uint8 from the loader
            out = model.apply({"params": params, "frozen": frozen}, images, pixel_mask=batch["pixel_mask"])
            return out["pred_logits"], out["pred_boxes"], out["pred_masks"]

        # Outputs stay sharded: each process fetches only its own images' masks.
        self._predict = jax.jit(predict, in_shardings=(repl, repl, sharded), out_shardings=(sharded,) * 3)

    def _local(self, array):
        """This process's rows of a batch-sharded output, as numpy."""
        if jax.process_count() == 1:
            return np.asarray(jax.device_get(array))
        return np.asarray(multihost_utils.global_array_to_host_local_array(array, self.mesh,
                                                                           PartitionSpec(sharding.DATA_AXIS)))

    def evaluate(self, variables, out_dir: Optional[str] = None, step: Optional[int] = None,
                 draw: bool = False) -> Dict[str, float]:
        """PQ / SQ / RQ and, with segm, segm / bbox AP (see `PanopticScorer.compute`) of the model's `variables`
        {"params", "frozen"}, on every process. (`out_dir`, `step`, `draw`: the detection evaluator's interface;
        nothing is written.)"""
        del out_dir, step, draw
        self.scorer.reset()
        self.loader.set_state({"epoch": 0, "position": 0})
        params, frozen = variables["params"], variables.get("frozen", {})
        for local in self.loader:
            batch = sharding.global_batch({k: local[k] for k in ("images", "pixel_mask")}, self.mesh)
            logits, boxes, masks = self._predict(params, frozen, batch)
            # One process: the masks stay on the device(s), where the instance masks are made from them.
            masks = masks if jax.process_count() == 1 else self._local(masks)
            self.scorer.add(local["image_id"], self._local(logits), masks, local["size"],
                            local["orig_size"], pred_boxes=self._local(boxes), padded_size=local["images"].shape[1:3])
        metrics = self.scorer.compute()
        logger.info("panoptic: PQ %.4f SQ %.4f RQ %.4f (things PQ %.4f, stuff PQ %.4f) on %d images",
                    metrics["PQ"], metrics["SQ"], metrics["RQ"], metrics["PQ_th"], metrics["PQ_st"],
                    metrics["num_images"])
        if "segm_AP" in metrics:
            logger.info("instances: segm AP %.4f AP50 %.4f, bbox AP %.4f AP50 %.4f", metrics["segm_AP"],
                        metrics["segm_AP50"], metrics["bbox_AP"], metrics["bbox_AP50"])
        return metrics

    def close(self) -> None:
        self.loader.close()
