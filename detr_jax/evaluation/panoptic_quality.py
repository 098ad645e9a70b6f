"""Panoptic quality: PQ / SQ / RQ as panopticapi's `pq_compute` (cocodataset/panopticapi, evaluation.py),
accumulated over images, from id maps held in memory (`panoptic.post_process_panoptic`'s output and the ground
truth in the same form) instead of PNG files on disk. Numpy, on the host.
"""

import dataclasses
from collections import defaultdict

import numpy as np

_OFFSET = 256 * 256 * 256
VOID = 0  # the id of unlabelled pixels in a COCO panoptic id map


@dataclasses.dataclass
class CategoryStats:
    """Counts of one category, summed over images: sum of the IoUs of the matches, tp, fp, fn."""
    iou: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __iadd__(self, other):
        self.iou += other.iou
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        return self


def _pixel_counts(ids):
    """{segment id: number of pixels} of an int id map."""
    labels, counts = np.unique(ids, return_counts=True)
    return {int(k): int(c) for k, c in zip(labels, counts)}


def _pair_intersections(gt_ids, pred_ids):
    """{(gt id, pred id): number of pixels with that pair}, for two id maps of the same shape."""
    pairs = gt_ids.astype(np.uint64) * _OFFSET + pred_ids.astype(np.uint64)
    labels, counts = np.unique(pairs, return_counts=True)
    return {(int(k // _OFFSET), int(k % _OFFSET)): int(c) for k, c in zip(labels, counts)}


def _pred_segments_with_area(pred_ids, pred_segments_info, categories):
    """{id: segment} of the predictions, each with "area" recounted from the id map (as panopticapi).

    Raises ValueError, as panopticapi does, when the map and the list disagree: a non-zero id in the map
    with no segment, a segment absent from the map, or a category outside `categories`.
    """
    segments = {s["id"]: dict(s) for s in pred_segments_info}
    unseen = set(segments)
    for label, count in _pixel_counts(pred_ids).items():
        if label not in segments:
            if label == VOID:  # unlabelled prediction pixels are allowed
                continue
            raise ValueError(f"Predicted segment id {label} is in the id map but not in segments_info.")
        segments[label]["area"] = count
        unseen.discard(label)
        if segments[label]["category_id"] not in categories:
            raise ValueError(f"Predicted segment {label} has category_id {segments[label]['category_id']}, "
                             "which is not in the categories.")
    if unseen:
        raise ValueError(f"Predicted segment ids {sorted(unseen)} are in segments_info but not in the id map.")
    return segments


def image_pq_stats(gt_ids, gt_segments_info, pred_ids, pred_segments_info, categories):
    """Per-category PQ counts of one image, as panopticapi's `pq_compute_single_core`.

    A gt and a predicted segment of the same category match when IoU > 0.5 (so at most one match each),
    where the union leaves out the predicted pixels on VOID (id 0) of the ground truth. Unmatched gt
    segments are false negatives unless crowd (iscrowd=1); unmatched predictions are false positives unless
    more than half of them lies on VOID or on the crowd region of their category.

    Args:
      gt_ids: int [H, W] gt id map; 0 (and any id not in gt_segments_info) is unlabelled.
      gt_segments_info: [{"id", "category_id", "iscrowd"}]. "area" is recounted from gt_ids (panopticapi
        reads it from the json, where COCO stores the pixel count of the PNG).
      pred_ids: int [H, W] predicted id map (e.g. `post_process_panoptic`'s "segment_ids"); 0 is a
        segment when segments_info lists it, unlabelled otherwise.
      pred_segments_info: [{"id", "category_id"}] ("area" is recounted from pred_ids, as panopticapi).
      categories: {category id: {"isthing": 0/1, ...}}.
    Returns:
      {category id: CategoryStats}.
    """
    gt_ids, pred_ids = np.asarray(gt_ids), np.asarray(pred_ids)
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(f"gt id map {gt_ids.shape} and predicted id map {pred_ids.shape} differ in shape: "
                         "resize the prediction to the original image size (target_sizes).")
    gt_area = _pixel_counts(gt_ids)
    gt_segments = {s["id"]: dict(s, area=gt_area.get(s["id"], 0)) for s in gt_segments_info}
    pred_segments = _pred_segments_with_area(pred_ids, pred_segments_info, categories)
    intersections = _pair_intersections(gt_ids, pred_ids)
    stats = defaultdict(CategoryStats)

    gt_matched, pred_matched = set(), set()
    for (gt_label, pred_label), intersection in intersections.items():
        gt, pred = gt_segments.get(gt_label), pred_segments.get(pred_label)
        if gt is None or pred is None or gt["iscrowd"] == 1 or gt["category_id"] != pred["category_id"]:
            continue
        # Predicted pixels on unlabelled ground truth are not counted against the prediction.
        union = pred["area"] + gt["area"] - intersection - intersections.get((VOID, pred_label), 0)
        iou = intersection / union
        if iou > 0.5:
            stats[gt["category_id"]].tp += 1
            stats[gt["category_id"]].iou += iou
            gt_matched.add(gt_label)
            pred_matched.add(pred_label)

    crowd_by_category = {}  # as panopticapi: one crowd segment per category (the last listed)
    for gt_label, gt in gt_segments.items():
        if gt_label in gt_matched:
            continue
        if gt["iscrowd"] == 1:
            crowd_by_category[gt["category_id"]] = gt_label
            continue
        stats[gt["category_id"]].fn += 1

    for pred_label, pred in pred_segments.items():
        if pred_label in pred_matched:
            continue
        ignored = intersections.get((VOID, pred_label), 0)
        if pred["category_id"] in crowd_by_category:
            ignored += intersections.get((crowd_by_category[pred["category_id"]], pred_label), 0)
        # A prediction mostly on unlabelled or crowd pixels is not penalised.
        if ignored / pred["area"] > 0.5:
            continue
        stats[pred["category_id"]].fp += 1
    return dict(stats)


def pq_average(stats, categories, isthing=None):
    """PQ, SQ, RQ averaged over the categories with any tp, fp or fn (panopticapi's `pq_average`).

    Args:
      stats: {category id: CategoryStats}, summed over the images.
      categories: {category id: {"isthing": 0/1, ...}}; only these categories are averaged.
      isthing: True: thing categories only; False: stuff only; None: all.
    Returns:
      ({"pq", "sq", "rq", "n"}, {category id: {"pq", "sq", "rq"}}), n the number of categories averaged.
      With n = 0, pq = sq = rq = 0 (panopticapi divides by zero).
    """
    totals = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
    per_class, n = {}, 0
    for label, info in categories.items():
        if isthing is not None and (info["isthing"] == 1) != isthing:
            continue
        s = stats.get(label, CategoryStats())
        if s.tp + s.fp + s.fn == 0:
            per_class[label] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
            continue
        n += 1
        denominator = s.tp + 0.5 * s.fp + 0.5 * s.fn
        per_class[label] = {"pq": s.iou / denominator, "sq": s.iou / s.tp if s.tp else 0.0,
                            "rq": s.tp / denominator}
        for key in totals:
            totals[key] += per_class[label][key]
    summary = {key: value / n if n else 0.0 for key, value in totals.items()}
    summary["n"] = n
    return summary, per_class


def _categories_by_id(categories):
    """COCO's categories list [{"id", "isthing", ...}] (or already {id: info}) -> {id: info}."""
    if isinstance(categories, dict):
        return categories
    return {c["id"]: c for c in categories}


class PanopticQuality:
    """COCO panoptic quality accumulated over images, as panopticapi's `pq_compute`.

    Usage:
      metric = PanopticQuality(coco_panoptic_json["categories"])
      for each image: metric.update(gt_ids, gt_segments_info, pred["segment_ids"], pred["segments_info"])
      results = metric.compute()  # {"All", "Things", "Stuff": {"pq", "sq", "rq", "n"}, "per_class": {...}}

    The counts (tp, fp, fn, sum of IoUs) are summed per category over all images before the average,
    so the result is not a mean of per-image PQs.
    """

    def __init__(self, categories):
        """categories: COCO's list [{"id", "isthing", ...}] or {category id: {"isthing": 0/1, ...}}."""
        self.categories = _categories_by_id(categories)
        self.stats = defaultdict(CategoryStats)

    def update(self, gt_ids, gt_segments_info, pred_ids, pred_segments_info):
        """Adds one image. gt_ids, pred_ids int [H, W] id maps; see `image_pq_stats` for the segment lists."""
        for label, s in image_pq_stats(gt_ids, gt_segments_info, pred_ids, pred_segments_info,
                                       self.categories).items():
            self.stats[label] += s

    def compute(self):
        """{"All", "Things", "Stuff": {"pq", "sq", "rq", "n"}, "per_class": {category id: {"pq", "sq", "rq"}}}."""
        results = {}
        for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
            results[name], per_class = pq_average(self.stats, self.categories, isthing)
            if isthing is None:
                results["per_class"] = per_class
        return results
