"""config.eval_backend: both backends against pycocotools (run here, directly) on small COCO-format cases with crowd
objects, images without objects and detections on them, boxes and masks; faster-coco-eval's one difference
(docs/coco_scoring.md), pinned down; the evaluators score with the configured backend; a bad or missing backend is
one clear line. ~3 s."""

import contextlib
import copy
import io
import re
import sys

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_jax.evaluation.coco import COCO_METRIC_NAMES, EVAL_BACKENDS, DetectionEvaluator, coco_metrics

H, W = 200, 240
ONE_ULP_BELOW_1 = 1 - 2.0 ** -52  # pycocotools' precision of a lone true positive: 1 / (1 + np.spacing(1))


def _object(rng, image_id, category_id, box=None, jitter=0.0):
    """A rectangle mask: its RLE, its [x, y, w, h] box (float, `jitter` of its size off) and pixel area."""
    if box is None:
        w, h = rng.uniform(4, 150, 2)
        box = [rng.uniform(0, W - w), rng.uniform(0, H - h), w, h]
    box = [v + jitter * rng.normal() * box[2 + i % 2] for i, v in enumerate(box)]
    x0, y0 = max(int(box[0]), 0), max(int(box[1]), 0)
    mask = np.zeros((H, W), np.uint8)
    mask[y0:max(int(box[1] + box[3]), y0 + 1), x0:max(int(box[0] + box[2]), x0 + 1)] = 1
    rle = mask_util.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")
    return {"image_id": image_id, "category_id": category_id, "segmentation": rle, "bbox": [float(v) for v in box],
            "area": float(mask_util.area(rle))}


def _case(seed=0, num_images=16):
    """(ground truth, box results, mask results): 3 categories; every 4th image without objects, the first object of
    every 3rd a crowd one; a jittered detection of most objects (crowd ones too), random ones on every image."""
    rng = np.random.default_rng(seed)
    images, annotations, detections = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "height": H, "width": W})
        for k in range(0 if image_id % 4 == 0 else int(rng.integers(1, 6))):
            ann = _object(rng, image_id, int(rng.integers(1, 4)))
            ann.update(id=len(annotations) + 1, iscrowd=int(k == 0 and image_id % 3 == 0))
            ann["bbox"] = mask_util.toBbox(ann["segmentation"]).tolist()
            annotations.append(ann)
            if rng.random() < 0.8:
                category = ann["category_id"] if rng.random() < 0.8 else int(rng.integers(1, 4))
                detections.append(_object(rng, image_id, category, ann["bbox"], jitter=0.05))
        detections += [_object(rng, image_id, int(rng.integers(1, 4))) for _ in range(int(rng.integers(0, 4)))]
    for det in detections:
        det["score"] = float(rng.uniform(0.05, 1.0))
    categories = [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]
    boxes = [{k: d[k] for k in ("image_id", "category_id", "bbox", "score")} for d in detections]
    masks = [{k: d[k] for k in ("image_id", "category_id", "segmentation", "score")} for d in detections]
    return {"images": images, "annotations": annotations, "categories": categories}, boxes, masks


def _pycocotools(ground_truth, results, iou_type):
    """pycocotools' COCOeval, run here without detr_jax: (the 12 stats, eval["precision"], eval["recall"])."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(ground_truth)
        gt.createIndex()
        coco_eval = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return list(coco_eval.stats), coco_eval.eval["precision"], coco_eval.eval["recall"]


def test_the_case_has_crowd_objects_empty_images_and_detections_on_them():
    ground_truth, boxes, _ = _case()
    with_objects = {a["image_id"] for a in ground_truth["annotations"]}
    empty = [i["id"] for i in ground_truth["images"] if i["id"] not in with_objects]
    assert len(empty) == 4 and any(d["image_id"] in empty for d in boxes)
    assert sum(a["iscrowd"] for a in ground_truth["annotations"]) >= 3
    stats = _pycocotools(ground_truth, boxes, "bbox")[0]
    assert all(0.05 < s < 0.95 for s in stats), stats  # no trivial 0 / 1, no -1: every size range present


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_stats_of_both_backends_against_pycocotools(iou_type):
    """The "pycocotools" backend gives pycocotools' 12 stats exactly; "faster_coco_eval" within 1e-15 (on this small
    case 1-3 of them differ by ~1e-16: see the next test, docs/coco_scoring.md)."""
    ground_truth, boxes, masks = _case()
    results = boxes if iou_type == "bbox" else masks
    reference = _pycocotools(ground_truth, results, iou_type)[0]
    stats = coco_metrics(ground_truth, results, iou_type, backend="pycocotools")
    assert [stats[k] for k in COCO_METRIC_NAMES] == reference  # exactly
    stats = coco_metrics(ground_truth, results, iou_type, backend="faster_coco_eval")
    np.testing.assert_allclose([stats[k] for k in COCO_METRIC_NAMES], reference, rtol=0, atol=1e-15)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_precision_differs_only_where_pycocotools_adds_its_epsilon(iou_type, seed):
    """pycocotools' precision is tp / (tp + fp + np.spacing(1)), faster-coco-eval's tp / (tp + fp): they differ where
    tp + fp = 1 only (1 - 2^-52 against 1.0); recall is the same everywhere, the stats within 1e-15."""
    from faster_coco_eval import COCO as FasterCOCO
    from faster_coco_eval import COCOeval_faster

    ground_truth, boxes, masks = _case(seed)
    results = boxes if iou_type == "bbox" else masks
    stats, precision, recall = _pycocotools(ground_truth, results, iou_type)
    quiet = lambda *args, **kwargs: None
    gt = FasterCOCO(copy.deepcopy(ground_truth), print_function=quiet)
    fast = COCOeval_faster(gt, gt.loadRes(copy.deepcopy(results)), iou_type, print_function=quiet)
    fast.evaluate()
    fast.accumulate()
    fast.summarize()
    fast_precision = np.asarray(fast.eval["precision"])
    np.testing.assert_array_equal(np.asarray(fast.eval["recall"]), recall)
    differ = fast_precision != precision
    assert np.all(precision[differ] == ONE_ULP_BELOW_1) and np.all(fast_precision[differ] == 1.0)
    assert np.abs(np.asarray(fast.stats) - stats).max() <= 1e-15


def _perfect():
    """(ground truth of one object, its perfect detection)."""
    ground_truth, _, _ = _case(num_images=1)
    ground_truth["annotations"] = [dict(ground_truth["annotations"][0], iscrowd=0)]
    ann = ground_truth["annotations"][0]
    return ground_truth, [{"image_id": 1, "category_id": ann["category_id"], "bbox": ann["bbox"], "score": 0.9}]


def test_a_perfect_detection_shows_the_difference():
    """The smallest case: pycocotools' AP of one perfect detection is 1 - 2^-52, faster-coco-eval's 1.0."""
    ground_truth, perfect = _perfect()
    assert coco_metrics(ground_truth, perfect, backend="pycocotools")["AP"] == ONE_ULP_BELOW_1
    assert coco_metrics(ground_truth, perfect, backend="faster_coco_eval")["AP"] == 1.0


def test_evaluators_score_with_config_eval_backend():
    """DetectionEvaluator and the panoptic InstanceScorer: the perfect detection tells which backend scored; a
    work directory's config.json older than the field scores with pycocotools."""
    import ml_collections

    from detr_jax.evaluation.segm import InstanceScorer

    ground_truth, perfect = _perfect()
    evaluator = object.__new__(DetectionEvaluator)  # no model: its predictions are given
    evaluator.ground_truth, evaluator.predict = ground_truth, lambda params, frozen: perfect
    for backend, ap in (("faster_coco_eval", 1.0), ("pycocotools", ONE_ULP_BELOW_1), (None, ONE_ULP_BELOW_1)):
        evaluator.config = ml_collections.ConfigDict({} if backend is None else {"eval_backend": backend})
        assert evaluator.evaluate({"params": {}})["AP"] == ap, backend

        source = type("Source", (), dict(category_ids=[0, ground_truth["annotations"][0]["category_id"]],
                                         class_names=["bg", "thing"], is_thing=[False, True]))
        scorer = InstanceScorer(source, evaluator.config.get("eval_backend", EVAL_BACKENDS[0]))
        scorer.images = ground_truth["images"]
        scorer.annotations = [{k: v for k, v in a.items() if k != "id"} for a in ground_truth["annotations"]]
        scorer.bbox_results = perfect
        scorer.segm_results = [dict(perfect[0], segmentation=ground_truth["annotations"][0]["segmentation"])]
        metrics = scorer.compute()
        assert metrics["segm_AP"] == metrics["bbox_AP"] == ap, backend


def test_check_config_refuses_an_unknown_eval_backend():
    from detr_jax.config import EVAL_BACKENDS as CONFIG_CHOICES
    from detr_jax.config import base_config, check_config

    assert CONFIG_CHOICES == EVAL_BACKENDS and base_config().eval_backend == "pycocotools"
    config = base_config()
    config.eval_backend = "detectron2"
    message = "config.eval_backend must be 'pycocotools' or 'faster_coco_eval', got 'detectron2'"
    with pytest.raises(ValueError, match=re.escape(message)):
        check_config(config)
    config.eval_backend = "faster_coco_eval"
    check_config(config)


def test_a_missing_faster_coco_eval_is_one_line(monkeypatch):
    ground_truth, boxes, _ = _case(num_images=2)
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import fails
    with pytest.raises(ImportError) as error:
        coco_metrics(ground_truth, boxes, backend="faster_coco_eval")
    text = str(error.value)
    assert "\n" not in text and "pip install faster-coco-eval" in text and "eval_backend=pycocotools" in text
    assert coco_metrics(ground_truth, boxes, backend="pycocotools")["AP"] > 0


def test_the_benchmark_set_scores_alike():
    """benchmarks/bench_coco_scoring.py at a tiny size: both scorers run, the same stats within 1e-15."""
    from benchmarks.bench_coco_scoring import STAGES, score, simulate

    ground_truth, results = simulate(20, detections_per_image=20)
    (ref, ref_times), (fast, fast_times) = (score(b, ground_truth, results) for b in EVAL_BACKENDS)
    assert set(ref_times) == set(fast_times) == set(STAGES)
    assert 0 < ref[0] < 1 and np.abs(ref - fast).max() <= 1e-15
