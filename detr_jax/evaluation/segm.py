"""Instance AP of a mask head on a panoptic source: COCO "segm" AP, and "bbox" AP of the same predictions, as the
official DETR reports them with --masks (`PostProcess` + `PostProcessSegm`, `CocoEvaluator` with iou_types
("bbox", "segm")).

Ground truth: the panoptic source's thing segments are the instances (a crowd thing segment is an iscrowd=1
region, which COCOeval ignores); stuff segments are not instances. This is how panoptic ground truth serves
instance AP (detectron2's panoptic-to-instance conversion). The official number is on instances_val2017, whose
polygons overlap and are drawn independently of the panoptic PNGs, so the two differ slightly.

Predictions: every query, as the official gives them: score = the largest softmax probability over the real
classes, that label, the box scaled to the original image, the `post_process_segm` mask (sigmoid > 0.5 at the
original size) as an RLE. Queries whose label is no thing category of the dataset are left out: COCOeval scores
each category of the ground truth separately, and those categories have none, so the numbers are the same and
their masks need not be encoded. The masks are made on device for a batch (`postprocess_panoptic.segm_masks`, in the
column-major layout the RLE encoder reads), fetched and encoded one image at a time; only RLEs are kept.

Multi-process: each process encodes its own images (ground truth and predictions); the JSON of each process is
gathered to every process, and every process runs COCOeval (config.eval_backend's) on the whole, so all return the
same numbers.
"""

import json
from typing import Dict, List, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from pycocotools import mask as mask_util
from scipy.special import softmax

from detr_jax.evaluation.coco import EVAL_BACKENDS, coco_metrics

UNUSED_CLASS_NAME = "N/A"  # the name of a label that is no category (panoptic_sources, official250)


def encode_masks(masks) -> List[Dict]:
    """bool [K, H, W] -> K COCO RLEs {"size": [H, W], "counts": str} (JSON-ready, as the official encodes).
    Fastest when each mask is column-major (masks.transpose(1, 2, 0) Fortran-contiguous)."""
    masks = np.asarray(masks, bool)
    if not len(masks):
        return []
    # [H, W, K] uint8, column-major: no copy when each mask already is (`segm_masks`' layout)
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0)).view(np.uint8))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def instance_annotations(example: Dict, thing_labels, category_ids: Sequence[int]) -> List[Dict]:
    """COCO instance annotations (no "id") of a panoptic example's thing segments: {"image_id", "category_id",
    "segmentation" (RLE), "area" (pixels), "bbox" [x, y, w, h] (the mask's extent), "iscrowd"}. Stuff segments
    (labels not in `thing_labels`) are no instances."""
    labels = np.asarray(example["labels"])
    things = np.isin(labels, list(thing_labels))
    masks = np.asarray(example["masks"], bool)[things]
    crowd = np.asarray(example["iscrowd"], bool)[things]
    return [{"image_id": int(example["image_id"]), "category_id": int(category_ids[int(label)]),
             "segmentation": rle, "area": float(mask_util.area(rle)), "bbox": mask_util.toBbox(rle).tolist(),
             "iscrowd": int(is_crowd)}
            for label, rle, is_crowd in zip(labels[things], encode_masks(masks), crowd)]


def allgather_json(obj) -> list:
    """[obj of process 0, obj of process 1, ...] on every process (a collective: all processes call it).

    jax gathers arrays, not objects: each process's JSON travels as uint8 bytes padded to the longest.
    """
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray([len(data)], np.int32))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:len(data)] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [json.loads(row[:n].tobytes()) for row, n in zip(gathered, lengths)]


class InstanceScorer:
    """COCO segm and bbox AP of per-query masks and boxes on a panoptic source's thing segments, fed one image at
    a time (on the host).

    Args:
      source: a panoptic source: `category_ids`, `class_names`, `is_thing` per label.
      backend: the COCOeval that scores (`coco.EVAL_BACKENDS`, config.eval_backend).
    """

    def __init__(self, source, backend: str = EVAL_BACKENDS[0]):
        self.backend = backend
        self.category_ids = list(source.category_ids)
        self.thing_labels = [label for label, (name, thing) in enumerate(zip(source.class_names, source.is_thing))
                             if thing and name != UNUSED_CLASS_NAME]
        self.categories = [{"id": int(self.category_ids[label]), "name": str(source.class_names[label])}
                           for label in self.thing_labels]
        self.reset()

    def reset(self):
        self.images, self.annotations, self.segm_results, self.bbox_results = [], [], [], []

    def add(self, example: Dict, pred_logits, pred_boxes, masks):
        """Encode one image's ground truth and predictions.

        Args:
          example: the source's example ("masks", "labels", "iscrowd", "image_id", "orig_size").
          pred_logits: [N, C + 1] class logits, no-object last.
          pred_boxes: [N, 4] cxcywh, normalised.
          masks: bool [N, W', H'] (numpy or jax), `postprocess_panoptic.segm_masks`' row of this image: each query's
            `post_process_segm` mask at the original size (H, W), transposed, in the corner [:, :W, :H].
        """
        image_id = int(example["image_id"])
        orig_h, orig_w = (int(s) for s in example["orig_size"])
        self.images.append({"id": image_id, "height": orig_h, "width": orig_w})
        self.annotations += instance_annotations(example, self.thing_labels, self.category_ids)

        prob = softmax(np.asarray(pred_logits, np.float32), axis=-1)[:, :-1]  # official PostProcess
        scores, labels = prob.max(-1), prob.argmax(-1)
        keep = np.isin(labels, self.thing_labels)
        cx, cy, w, h = (np.asarray(pred_boxes, np.float32)[keep] * [orig_w, orig_h, orig_w, orig_h]).T
        masks = np.asarray(masks)[keep, :orig_w, :orig_h].transpose(0, 2, 1)  # [K, H, W], column-major
        for score, label, rle, x0, y0, bw, bh in zip(scores[keep], labels[keep], encode_masks(masks),
                                                     cx - w / 2, cy - h / 2, w, h):
            common = {"image_id": image_id, "category_id": int(self.category_ids[int(label)]), "score": float(score)}
            self.segm_results.append(dict(common, segmentation=rle))
            self.bbox_results.append(dict(common, bbox=[float(x0), float(y0), float(bw), float(bh)]))

    def compute(self) -> Dict[str, float]:
        """{"segm_AP", "segm_AP50", "segm_AP75", "bbox_AP", "bbox_AP50", "bbox_AP75"} (fractions) over the images
        of all processes (a collective); COCOeval's -1 where the ground truth has no instance."""
        parts = allgather_json({"images": self.images, "annotations": self.annotations, "segm": self.segm_results,
                                "bbox": self.bbox_results})
        images = [image for part in parts for image in part["images"]]
        if len({image["id"] for image in images}) != len(images):
            raise ValueError("InstanceScorer: an image was scored twice (by two processes, or added twice "
                             "without reset)")
        annotations = [dict(ann, id=i + 1) for i, ann in enumerate(a for part in parts for a in part["annotations"])]
        ground_truth = {"images": images, "annotations": annotations, "categories": self.categories}
        metrics = {}
        for iou_type in ("segm", "bbox"):
            coco = coco_metrics(ground_truth, [r for part in parts for r in part[iou_type]], iou_type,
                                self.backend)
            metrics.update({f"{iou_type}_{k}": coco[k] for k in ("AP", "AP50", "AP75")})
        return metrics
