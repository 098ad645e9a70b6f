"""Panoptic evaluation: the post-processing + PQ path on ground-truth predictions, the instance AP (segm, bbox)
against pycocotools on hand-built JSON, and a panoptic checkpoint through experiments/evaluate.py."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_jax.data.sources.coco_panoptic_folder import CocoPanopticFolder
from detr_jax.data.sources.synthetic_panoptic import SyntheticPanoptic, write_coco_panoptic_folder
from detr_jax.data.transforms import normalize_images
from detr_jax.evaluation.panoptic import PanopticEvaluator, PanopticScorer, dataset_categories
from detr_jax.evaluation.postprocess_panoptic import post_process_segm
from detr_jax.evaluation.segm import instance_annotations
from detr_jax.ops.sharding import make_mesh
from tests.helpers import REPO, free_port, subprocess_env

TINY_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "tiny.py")
# COCO-panoptic-like ids for the 3 thing and 3 stuff classes: things <= 90, stuff above, gaps in between.
CATEGORY_IDS = (1, 5, 17, 92, 120, 200)
NUM_IMAGES = 4


@pytest.fixture(scope="module")
def panoptic_folder(tmp_path_factory):
    """(ann_file, image_dir, panoptic_dir) of 4 synthetic 64 x 64 images with category ids CATEGORY_IDS."""
    source = SyntheticPanoptic("val", num_examples=NUM_IMAGES, image_size=(64, 64), seed=5)
    return write_coco_panoptic_folder(source, str(tmp_path_factory.mktemp("panoptic")), category_ids=CATEGORY_IDS)


def _oracle_outputs(example, label_map, num_classes, num_queries=12, stride=4):
    """Model outputs that say the ground truth: query k is segment k, its class logit one-hot (+-10) on
    label_map[label], its box the segment's extent; its mask logits +-10 from the fraction of each
    stride x stride cell inside the segment (what a perfect mask head at stride 4 could output). Other queries
    predict no-object. Returns pred_logits [N, C + 1], pred_boxes [N, 4] cxcywh normalised,
    pred_masks [N, H / stride, W / stride]."""
    masks, labels = example["masks"], example["labels"]
    k, (h, w) = len(labels), masks.shape[1:]
    assert k <= num_queries
    logits = np.full((num_queries, num_classes + 1), -10.0, np.float32)
    logits[np.arange(k), [label_map[int(label)] for label in labels]] = 10.0
    logits[k:, num_classes] = 10.0
    x0, y0, x1, y1 = np.asarray(example["boxes"], np.float32).T / [[w], [h], [w], [h]]
    boxes = np.full((num_queries, 4), 0.5, np.float32)
    boxes[:k] = np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], 1)
    fraction = masks.reshape(k, h // stride, stride, w // stride, stride).mean(axis=(2, 4))
    mask_logits = np.full((num_queries, h // stride, w // stride), -10.0, np.float32)
    mask_logits[:k] = 20.0 * fraction - 10.0
    return logits, boxes, mask_logits


def _scored(source, outputs):
    """PanopticScorer's metrics of per-image outputs [(logits, boxes, masks)] for every image of `source` (one
    size), fed in two batches, the second with a padding example (image id -1), which must be skipped."""
    scorer = PanopticScorer(source)
    examples = [source[i] for i in range(len(source))]
    sizes = np.asarray([ex["orig_size"] for ex in examples])
    # Images of one size: the masks at stride 4 of the batch are at stride 4 of each image (no padding to
    # stretch, see post_process_panoptic).
    image_ids = np.asarray([ex["image_id"] for ex in examples] + [-1])
    logits, boxes, masks = (np.stack([o[j] for o in outputs] + [outputs[0][j]]) for j in range(3))
    sizes = np.concatenate([sizes, sizes[:1]])
    for part in (slice(0, 2), slice(2, None)):
        scorer.add(image_ids[part], logits[part], masks[part], sizes[part], sizes[part], pred_boxes=boxes[part])
    return scorer.compute()


def _oracle_pq(source, label_map):
    return _scored(source, [_oracle_outputs(source[i], label_map, source.num_classes) for i in range(len(source))])


@pytest.mark.parametrize("label_space", ["official250", "contiguous"])
def test_pq_of_ground_truth_predictions_is_near_one_and_of_wrong_labels_zero(panoptic_folder, label_space):
    source = CocoPanopticFolder(*panoptic_folder, label_space=label_space)
    assert set(dataset_categories(source)) == set(CATEGORY_IDS)
    real_labels = [label for label, name in enumerate(source.class_names) if name != "N/A"]
    assert len(real_labels) == len(CATEGORY_IDS)

    metrics = _oracle_pq(source, {label: label for label in real_labels})
    assert metrics["num_images"] == NUM_IMAGES
    assert metrics["num_categories_th"] == 3 and metrics["num_categories_st"] == 3
    # Not exactly 1: the masks are 16 x 16 logits upsampled to 64 x 64, so boundaries (the triangles' tips,
    # the slanted stuff bands) move by a pixel or two; every segment is still matched (RQ 1) with IoU > 0.85.
    assert metrics["RQ"] == pytest.approx(1.0)
    assert 0.85 < metrics["SQ"] < 1.0
    assert metrics["PQ"] == pytest.approx(metrics["SQ"])
    for part in ("_th", "_st"):
        assert metrics["PQ" + part] > 0.85
    # Instance AP of the same outputs: every thing found (AP50 1), the boxes exact. segm AP is not 1 for the same
    # reason as SQ: masks at stride 4, upsampled, move the boundaries of these small things by a pixel or two,
    # and AP averages over IoU thresholds up to 0.95.
    assert metrics["segm_AP50"] == 1.0 and metrics["bbox_AP"] == pytest.approx(1.0)
    assert 0.7 < metrics["segm_AP"] < 1.0

    # Every segment predicted as another category of the dataset: nothing matches.
    shifted = {label: real_labels[(i + 1) % len(real_labels)] for i, label in enumerate(real_labels)}
    wrong = _oracle_pq(source, shifted)
    assert wrong["PQ"] == 0.0 and wrong["RQ"] == 0.0
    assert wrong["num_categories"] == len(CATEGORY_IDS)
    assert wrong["segm_AP"] == 0.0 and wrong["segm_AP50"] == 0.0 and wrong["bbox_AP"] == 0.0


class _OracleModel:
    """A stand-in for DETRsegm whose outputs for an image are the oracle outputs of the nearest stored image:
    it lets the whole evaluator loop (loader, jitted forward, batch rows -> image ids -> ground truth) be
    checked against the scorer alone."""

    def __init__(self, num_classes):
        self.detr = self.detector = type("Detr", (), {"num_classes": num_classes})()

    def with_detector(self, **changes):
        return self

    def apply(self, variables, images, pixel_mask):
        p = variables["params"]
        stored = normalize_images(p["images"], jnp.ones(p["images"].shape[:3], bool))
        distance = jnp.abs(images[:, None] - stored[None]).sum(axis=(2, 3, 4))  # [B, num stored]
        nearest = jnp.argmin(distance, axis=1)
        return {"pred_logits": p["logits"][nearest], "pred_boxes": p["boxes"][nearest],
                "pred_masks": p["masks"][nearest]}


def test_evaluator_loop_scores_each_image_against_its_own_ground_truth(panoptic_folder):
    source = CocoPanopticFolder(*panoptic_folder, label_space="contiguous")
    identity = {label: label for label in range(source.num_classes)}
    params = _oracle_params(source)
    # Batch 3 for 4 images: a last batch with 2 padding examples. 64 x 64 images, no resize, no padding.
    evaluator = PanopticEvaluator(_eval_config(3 * jax.process_count()), _OracleModel(source.num_classes),
                                  make_mesh(), source=source)
    metrics = evaluator.evaluate({"params": params, "frozen": {}})
    assert metrics == _oracle_pq(source, identity)
    assert metrics["PQ"] > 0.85
    assert evaluator.evaluate({"params": params, "frozen": {}}) == metrics  # evaluate twice: same numbers


def _eval_config(batch_size):
    """Evaluation at 64 x 64 (no resize, no padding), one bucket, loading in this process."""
    from detr_jax.config import base_config

    config = base_config()
    config.data.update(dict(eval_size=64, max_size=64, num_workers=0, group_by_size=0))
    with config.data.ignore_type():
        config.data.buckets = ((64, 64),)
    config.eval_batch_size = batch_size
    return config


def _oracle_params(source):
    """_OracleModel's variables for every image of `source` (identity label map)."""
    identity = {label: label for label in range(source.num_classes)}
    examples = [source[i] for i in range(len(source))]
    outputs = [_oracle_outputs(ex, identity, source.num_classes) for ex in examples]
    return {"images": jnp.asarray(np.stack([ex["image"] for ex in examples])),
            "logits": jnp.asarray(np.stack([o[0] for o in outputs])),
            "boxes": jnp.asarray(np.stack([o[1] for o in outputs])),
            "masks": jnp.asarray(np.stack([o[2] for o in outputs]))}


_TWO_PROCESS_PANOPTIC_EVAL = r"""
import json, sys
sys.path.insert(0, sys.argv[4])
from detr_jax.ops.sharding import maybe_initialize_distributed, make_mesh
maybe_initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
import jax
from detr_jax.data.sources.coco_panoptic_folder import CocoPanopticFolder
from detr_jax.evaluation.panoptic import PanopticEvaluator
from test_evaluate_panoptic import _OracleModel, _eval_config, _oracle_params
source = CocoPanopticFolder(*sys.argv[5:8], label_space="contiguous")
evaluator = PanopticEvaluator(_eval_config(6), _OracleModel(source.num_classes), make_mesh(), source=source)
metrics = evaluator.evaluate({"params": _oracle_params(source), "frozen": {}})
with open(sys.argv[3] + f".{jax.process_index()}", "w") as f:
    json.dump(metrics, f)
"""


def test_two_process_evaluation_equals_one_process(panoptic_folder, tmp_path):
    """Multi-host PQ and instance AP: each process scores its share of every batch (global batch 6 for 4 images:
    padding examples too), the per-category sums and the RLE JSON are gathered, and both processes report the
    single-process numbers."""
    script = tmp_path / "two_process_panoptic_eval.py"
    script.write_text(_TWO_PROCESS_PANOPTIC_EVAL)
    env = subprocess_env(PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    out, port = str(tmp_path / "metrics"), free_port()
    procs = [subprocess.Popen([sys.executable, str(script), f"127.0.0.1:{port}", str(i), out,
                               os.path.dirname(__file__), *panoptic_folder], env=env, stderr=subprocess.PIPE)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-3000:]
    source = CocoPanopticFolder(*panoptic_folder, label_space="contiguous")
    single = _oracle_pq(source, {label: label for label in range(source.num_classes)})
    assert single["num_images"] == NUM_IMAGES and single["PQ"] > 0.85 and single["segm_AP50"] == 1.0
    for i in range(2):
        with open(f"{out}.{i}") as f:
            assert json.load(f) == pytest.approx(single, abs=1e-12)


def test_predictions_of_labels_outside_the_dataset_are_void(panoptic_folder):
    """Official250: a label that is no category ("N/A") is not scored as a category of its own."""
    source = CocoPanopticFolder(*panoptic_folder, label_space="official250")
    metrics = _oracle_pq(source, {label: 0 for label in CATEGORY_IDS})  # label 0 is "N/A" in COCO's ids
    assert metrics["PQ"] == 0.0
    assert metrics["num_categories"] == len(CATEGORY_IDS)  # only false negatives, of the real categories


def _rle(mask):
    rle = mask_util.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
    return dict(rle, counts=rle["counts"].decode())


def _reference_instance_ap(source, outputs):
    """COCOeval segm and bbox (AP, AP50, AP75) written out by hand: the ground truth is the thing segments as
    COCO instances (RLE, crowd flagged); the results are every query, as the official PostProcess and
    PostProcessSegm make them (no query left out, whatever its label)."""
    examples = [source[i] for i in range(len(source))]
    thing_labels = [label for label, thing in enumerate(source.is_thing) if thing]
    images, annotations, results = [], [], {"segm": [], "bbox": []}
    for ex, (logits, boxes, masks) in zip(examples, outputs):
        h, w = ex["orig_size"]
        images.append({"id": int(ex["image_id"]), "height": h, "width": w})
        for mask, label, crowd, (x0, y0, x1, y1) in zip(ex["masks"], ex["labels"], ex["iscrowd"], ex["boxes"]):
            if label in thing_labels:
                annotations.append({"id": len(annotations) + 1, "image_id": int(ex["image_id"]),
                                    "category_id": source.category_ids[label], "segmentation": _rle(mask),
                                    "area": float(mask.sum()), "bbox": [float(x0), float(y0), float(x1 - x0),
                                                                        float(y1 - y0)], "iscrowd": int(crowd)})
        scores, labels = torch.softmax(torch.from_numpy(logits), -1)[:, :-1].max(-1)
        (binary,) = post_process_segm(masks[None], [(h, w)], [(h, w)])
        for score, label, mask, (cx, cy, bw, bh) in zip(scores.tolist(), labels.tolist(), binary, boxes):
            common = {"image_id": int(ex["image_id"]), "category_id": source.category_ids[label], "score": score}
            results["segm"].append(dict(common, segmentation=_rle(mask)))
            results["bbox"].append(dict(common, bbox=[float((cx - bw / 2) * w), float((cy - bh / 2) * h),
                                                      float(bw * w), float(bh * h)]))
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations,
                  "categories": [{"id": source.category_ids[label]} for label in thing_labels]}
    gt.createIndex()
    reference = {}
    for iou_type in ("segm", "bbox"):
        coco_eval = COCOeval(gt, gt.loadRes(results[iou_type]), iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
        reference.update({f"{iou_type}_{k}": coco_eval.stats[i] for i, k in enumerate(("AP", "AP50", "AP75"))})
    return reference


def test_instance_ap_is_cocoeval_of_the_thing_segments_and_every_query(panoptic_folder):
    """Noisy oracle outputs (wrong and unsure labels, ragged masks, shifted boxes) give a middling AP, equal to
    pycocotools' on JSON built here from the source's masks and post_process_segm's."""
    source = CocoPanopticFolder(*panoptic_folder, label_space="contiguous")
    identity = {label: label for label in range(source.num_classes)}
    rng = np.random.default_rng(0)
    outputs = []
    for i in range(len(source)):
        logits, boxes, masks = _oracle_outputs(source[i], identity, source.num_classes)
        outputs.append((logits + rng.normal(0, 3, logits.shape).astype(np.float32),
                        boxes + rng.normal(0, 0.02, boxes.shape).astype(np.float32),
                        masks + rng.normal(0, 3, masks.shape).astype(np.float32)))
    metrics = _scored(source, outputs)
    reference = _reference_instance_ap(source, outputs)
    assert {k: metrics[k] for k in reference} == pytest.approx(reference, abs=1e-12)
    assert 0.2 < metrics["segm_AP"] < 0.9 and 0.2 < metrics["bbox_AP"] < 0.9  # neither trivial nor perfect


class _CrowdSynthetic(SyntheticPanoptic):
    """SyntheticPanoptic with each image's first thing segment flagged iscrowd."""

    def __getitem__(self, index):
        ex = super().__getitem__(index)
        ex["iscrowd"][np.flatnonzero(np.asarray(self.is_thing)[ex["labels"]])[0]] = True
        return ex


def test_thing_segments_are_the_instances_crowd_ones_ignored():
    source = _CrowdSynthetic("val", num_examples=3, image_size=(64, 64), min_things=2, seed=1)
    ex = source[0]
    things = np.asarray(source.is_thing)[ex["labels"]]
    annotations = instance_annotations(ex, [0, 1, 2], source.category_ids)
    assert len(annotations) == things.sum() < len(ex["labels"])  # stuff segments are no instances
    assert [a["iscrowd"] for a in annotations] == ex["iscrowd"][things].astype(int).tolist()
    assert sum(a["iscrowd"] for a in annotations) == 1
    for a, mask, box in zip(annotations, ex["masks"][things], ex["boxes"][things]):
        np.testing.assert_array_equal(mask_util.decode(a["segmentation"]), mask)
        assert a["bbox"] == pytest.approx([box[0], box[1], box[2] - box[0], box[3] - box[1]])
        assert a["area"] == mask.sum()

    # The crowd segment is an ignored region: not predicting it changes nothing; missing another thing does.
    identity = {label: label for label in range(source.num_classes)}
    examples = [source[i] for i in range(len(source))]
    outputs = [_oracle_outputs(ex, identity, source.num_classes) for ex in examples]
    segm_ap = {k: v for k, v in _scored(source, outputs).items() if k.startswith("segm")}

    def without(outputs, query_of):
        """The outputs with one query per image turned into a no-object query (as the last one)."""
        out = [tuple(o.copy() for o in output) for output in outputs]
        for (logits, _, masks), ex in zip(out, examples):
            k = query_of(ex)
            logits[k], masks[k] = logits[-1], masks[-1]
        return out

    no_crowd = _scored(source, without(outputs, lambda ex: np.flatnonzero(ex["iscrowd"])[0]))
    assert {k: no_crowd[k] for k in segm_ap} == segm_ap
    thing = np.asarray(source.is_thing)
    no_thing = _scored(source, without(outputs, lambda ex: np.flatnonzero(thing[ex["labels"]] & ~ex["iscrowd"])[0]))
    assert no_thing["segm_AP50"] < segm_ap["segm_AP50"]


def test_official_panoptic_checkpoint_through_experiments_evaluate(panoptic_folder, fixtures_dir, tmp_path):
    """The random-weights official panoptic fixture (250 classes) scores the folder end to end: PQ ~0."""
    checkpoint = fixtures_dir / "official_detr_r50_tiny_panoptic" / "detr_panoptic_random.pth"
    ann_file, image_dir, panoptic_dir = panoptic_folder
    # Batch 3 for 4 images: the last batch has 2 padding examples, which must not be scored.
    cmd = [sys.executable, os.path.join(REPO, "experiments", "evaluate.py"), f"--checkpoint={checkpoint}",
           f"--config={TINY_CONFIG}", "--config.eval_batch_size=3", f"--out={tmp_path}",
           f"--panoptic_ann_file={ann_file}", f"--panoptic_image_dir={image_dir}", f"--panoptic_dir={panoptic_dir}"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_images"] == NUM_IMAGES
    assert metrics["num_categories"] > 0  # the ground truth's segments count, at least as false negatives
    assert 0.0 <= metrics["PQ"] < 0.2
    assert f"PQ {metrics['PQ']:.4f}" in run.stdout
    assert 0.0 <= metrics["segm_AP"] < 0.2 and f"segm_AP {metrics['segm_AP']:.4f}" in run.stdout
    assert not (tmp_path / "results.json").exists()

    # Without the folder, a panoptic checkpoint is refused with a message naming the flags.
    refused = subprocess.run(cmd[:5], capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=REPO)
    assert refused.returncode != 0 and "--panoptic_ann_file" in refused.stderr
