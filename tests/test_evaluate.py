"""Evaluation: official post-processing, COCO metrics plumbing, and independence from batch size / padding."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detr_jax.data import SyntheticDetection
from detr_jax.evaluation.coco import DetectionEvaluator, coco_ground_truth, coco_metrics, to_coco_results
from detr_jax.evaluation.postprocess import postprocess
from detr_jax.ops.sharding import make_mesh
from tests.helpers import free_port, subprocess_env

torch = pytest.importorskip("torch")

TINY_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "tiny.py")


def _official_postprocess(out_logits, out_bbox, target_sizes):
    """models/detr.py PostProcess.forward, transcribed."""
    prob = torch.nn.functional.softmax(out_logits, -1)
    scores, labels = prob[..., :-1].max(-1)
    x_c, y_c, w, h = out_bbox.unbind(-1)
    boxes = torch.stack([x_c - 0.5 * w, y_c - 0.5 * h, x_c + 0.5 * w, y_c + 0.5 * h], dim=-1)
    img_h, img_w = target_sizes.unbind(1)
    scale_fct = torch.stack([img_w, img_h, img_w, img_h], dim=1)
    return scores, labels, boxes * scale_fct[:, None, :]


def test_postprocess_equals_official():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 7, 6)).astype(np.float32)
    boxes = rng.uniform(0.1, 0.6, (3, 7, 4)).astype(np.float32)
    sizes = np.array([[480, 640], [333, 500], [100, 90]], np.int32)
    ref = _official_postprocess(torch.from_numpy(logits), torch.from_numpy(boxes), torch.from_numpy(sizes).float())
    ours = postprocess(jnp.asarray(logits), jnp.asarray(boxes), jnp.asarray(sizes))
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), rtol=1e-6, atol=1e-4)
    top = postprocess(jnp.asarray(logits), jnp.asarray(boxes), jnp.asarray(sizes), top_k=3)
    np.testing.assert_allclose(np.asarray(top[0]), np.sort(ref[0].numpy(), axis=1)[:, ::-1][:, :3], rtol=1e-6)


def test_coco_metrics_of_ground_truth_and_of_shifted_boxes():
    source = SyntheticDetection("val", num_examples=6, image_size=(64, 80), seed=3)
    gt = coco_ground_truth(source, source.category_ids, source.class_names)
    perfect = [dict(image_id=a["image_id"], category_id=a["category_id"], bbox=a["bbox"], score=1.0)
               for a in gt["annotations"]]
    assert coco_metrics(gt, perfect)["AP"] == pytest.approx(1.0)
    # Shifting every box by 60% of its width drops IoU below 0.5: AP50 falls to zero.
    shifted = [dict(p, bbox=[p["bbox"][0] + 0.6 * p["bbox"][2]] + p["bbox"][1:]) for p in perfect]
    assert coco_metrics(gt, shifted)["AP50"] == pytest.approx(0.0)
    wrong_class = [dict(p, category_id=p["category_id"] % 5 + 1) for p in perfect]
    assert coco_metrics(gt, wrong_class)["AP"] == pytest.approx(0.0)
    assert coco_metrics(gt, [])["AP"] == 0.0


def test_to_coco_results_skips_padding_images_and_converts_boxes():
    results = to_coco_results(np.array([5, -1]), np.array([[0.9], [0.8]]), np.array([[1], [0]]),
                              np.array([[[10., 20., 30., 60.]], [[0., 0., 1., 1.]]]), category_ids=[7, 9])
    assert results == [dict(image_id=5, category_id=9, bbox=[10.0, 20.0, 20.0, 40.0], score=0.9)]


def _tiny_config(eval_batch_size, tfds_dir=None, size_cache_dir=None):
    """The tiny test config; with `tfds_dir`, its validation data is the COCO-like TFDS set (11 images at
    COCO's sizes, scaled to 64) instead of the synthetic squares."""
    import importlib.util

    import ml_collections
    spec = importlib.util.spec_from_file_location("tiny_config", TINY_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    # Images of several sizes, so that batches of 4 pad most of their images.
    config.data.source_kwargs.image_size = ((64, 64), (40, 64), (64, 48), (36, 52))
    config.data.val_kwargs.num_examples = 8
    config.data.eval_size = 64
    config.eval_batch_size = eval_batch_size
    if tfds_dir:
        config.data.source = "tfds"
        config.data.source_kwargs = dict(name="coco_like", data_dir=tfds_dir, label_space="official91",
                                         size_cache_dir=size_cache_dir)
        config.data.val_kwargs = dict(split="validation[:11]")  # 11: the last global batch is padded
        config.model.num_classes = 91  # official91 labels: the category ids, up to 90
        config.data = ml_collections.ConfigDict(dict(config.data.to_dict(), max_size=96, buckets="recipe",
                                                     max_buckets=3))
    return config


def test_predictions_do_not_depend_on_batch_size_or_padding(tmp_path):
    from detr_jax.models.detr import build_model

    mesh = make_mesh()
    config1 = _tiny_config(1)
    model = build_model(config1)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    state = {"params": variables["params"], "frozen": variables["frozen"]}
    one = DetectionEvaluator(config1, model, mesh).predict(state["params"], state["frozen"])
    four = DetectionEvaluator(_tiny_config(4), model, mesh).predict(state["params"], state["frozen"])
    # Both lists are in (image, query) order: the evaluation loader does not shuffle.
    assert [r["image_id"] for r in one] == [r["image_id"] for r in four]
    assert len(one) == len(four) == 8 * config1.model.num_queries
    np.testing.assert_allclose([r["score"] for r in one], [r["score"] for r in four], atol=1e-5)
    np.testing.assert_allclose([r["bbox"] for r in one], [r["bbox"] for r in four], atol=1e-3)
    evaluator = DetectionEvaluator(config1, model, mesh)
    metrics1 = coco_metrics(evaluator.ground_truth, one)
    metrics4 = coco_metrics(evaluator.ground_truth, four)
    assert metrics1 == pytest.approx(metrics4, abs=1e-6)
    # Without the padding-invariant backbone (the official behaviour) batching changes the predictions.
    config4 = _tiny_config(4)
    config4.eval_padding_invariant = False
    leaky = DetectionEvaluator(config4, model, mesh).predict(state["params"], state["frozen"])
    assert np.abs(np.array([r["score"] for r in leaky]) - [r["score"] for r in one]).max() > 1e-4


_TWO_PROCESS_EVAL = r"""
import json, sys
import jax, jax.numpy as jnp
sys.path.insert(0, sys.argv[4])
from detr_jax.ops.sharding import maybe_initialize_distributed, make_mesh
maybe_initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
from test_evaluate import _tiny_config
from detr_jax.evaluation.coco import DetectionEvaluator
from detr_jax.models.detr import build_model
config = _tiny_config(4, *(sys.argv[5:7] if len(sys.argv) > 5 else ()))
model = build_model(config)
variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
results = DetectionEvaluator(config, model, make_mesh()).predict(variables["params"], variables["frozen"])
with open(sys.argv[3] + f".{jax.process_index()}", "w") as f:
    json.dump(results, f)
"""


@pytest.mark.parametrize("source", ["synthetic", "tfds"])
def test_two_process_evaluation_equals_one_process(tmp_path, source, request):
    """Multi-host evaluation: each process predicts its share of every batch, the image ids are gathered, and
    every process ends with the predictions of the whole split, equal to a single process's. On TFDS the two
    processes also build the image-size index together (each reads half of the headers)."""
    import json
    import subprocess
    import sys

    from detr_jax.models.detr import build_model

    port = free_port()
    script = tmp_path / "two_process_eval.py"
    script.write_text(_TWO_PROCESS_EVAL)
    env = subprocess_env(PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                                     os.environ.get("PYTHONPATH", "")]))
    out = str(tmp_path / "results")
    tfds_args = []
    if source == "tfds":
        tfds_args = [request.getfixturevalue("coco_like_dir"), str(tmp_path / "size_index")]
    procs = [subprocess.Popen([sys.executable, str(script), f"127.0.0.1:{port}", str(i), out,
                               os.path.dirname(__file__), *tfds_args], env=env, stderr=subprocess.PIPE)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-3000:]
    if source == "tfds":  # the index the two processes gathered, as one process reads it
        from detr_jax.data import build_source
        gathered = np.load(next((tmp_path / "size_index").iterdir()))
        whole = build_source("tfds", name="coco_like", data_dir=tfds_args[0], split="validation[:11]")
        np.testing.assert_array_equal(gathered, [whole[i]["image"].shape[:2] for i in range(11)])

    config = _tiny_config(4, *tfds_args[:1])
    model = build_model(config)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    single = DetectionEvaluator(config, model, make_mesh()).predict(variables["params"], variables["frozen"])
    for i in range(2):
        with open(f"{out}.{i}") as f:
            multi = json.load(f)
        assert sorted(r["image_id"] for r in multi) == sorted(r["image_id"] for r in single)
        assert len({r["image_id"] for r in single}) == (11 if source == "tfds" else 8)
        key = lambda r: (r["image_id"], -r["score"])
        multi, ref = sorted(multi, key=key), sorted(single, key=key)
        assert [r["category_id"] for r in multi] == [r["category_id"] for r in ref]
        np.testing.assert_allclose([r["score"] for r in multi], [r["score"] for r in ref], atol=1e-5)
        np.testing.assert_allclose([r["bbox"] for r in multi], [r["bbox"] for r in ref], atol=1e-3)


def test_a_model_with_fewer_classes_than_the_datas_labels_is_refused_by_name():
    """Labels 0..4: a 4-class model cannot predict label 4 (refused, naming both numbers); 5 classes (the boundary)
    and 7 (more than the data uses, e.g. an official checkpoint on a few of COCO's categories) are fine."""
    from detr_jax.models.detr import build_model

    config = _tiny_config(4)
    config.model.num_classes = 4
    with pytest.raises(ValueError, match=r"the evaluation data \(synthetic, split val\) has labels up to 4 .* but the "
                                         r"model has 4 classes: set config.model.num_classes to at least 5"):
        DetectionEvaluator(config, build_model(config), make_mesh())
    for num_classes in (5, 7):
        config.model.num_classes = num_classes
        evaluator = DetectionEvaluator(config, build_model(config), make_mesh())
        assert len(evaluator.category_ids) == 5  # synthetic ids 1..5: labels past them have no category
        evaluator.close()


def test_picture_of_a_young_model_shows_its_best_guesses_and_the_ground_truth(tmp_path):
    """Nothing scores above the threshold: each panel then shows the top 3 predictions (in colour) over the
    ground truth (white), enlarged from <= 64 px to a readable 320."""
    from PIL import Image

    from detr_jax.models.detr import build_model

    config = _tiny_config(1)
    evaluator = DetectionEvaluator(config, build_model(config), make_mesh())
    ids = [int(evaluator.loader.source[i]["image_id"]) for i in range(2)]
    results = [{"image_id": i, "category_id": evaluator.category_ids[0], "bbox": [4.0 + k, 4.0, 20.0, 20.0],
                "score": 0.1 - 0.01 * k} for i in ids for k in range(5)]
    path = str(tmp_path / "pictures.png")
    evaluator.draw(results, path, num_pictures=2)
    picture = np.asarray(Image.open(path).convert("RGB"))
    assert picture.shape[0] >= 320 + 16 and picture.shape[1] >= 2 * 320, picture.shape  # enlarged, captioned
    colour = np.asarray((230, 25, 75))  # the first class's colour: the predictions were drawn though below 0.5
    assert (np.abs(picture.astype(int) - colour).sum(-1) == 0).sum() > 100
    assert (picture == 255).all(-1)[16:].sum() > 100  # white ground-truth boxes (and the white frame)


def test_an_official_checkpoint_scores_a_folder_of_a_subset_of_cocos_categories(fixtures_dir, tmp_path):
    """Issue 26: person (1), dog (18) and chair (62) in a COCO folder, label_space official91, scored with the
    official (91-class) fixture checkpoint: not refused; every query is a detection as in the official results JSON,
    its category id its label (ids the folder lacks included), and the metrics are those of the folder's id table
    alone (COCOeval scores the ground truth's categories only)."""
    from PIL import Image

    from detr_jax.config import base_config
    from detr_jax.weights.official import load_official_checkpoint

    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "images")
    images, annotations = [], []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": 48, "width": 64})
        for k, category in enumerate((1, 18, 62)[:i + 1]):
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": category,
                                "bbox": [4.0 + 10 * k, 6.0, 20.0, 18.0], "area": 360.0, "iscrowd": 0})
    categories = [{"id": c, "name": n} for c, n in ((1, "person"), (18, "dog"), (62, "chair"))]
    with open(tmp_path / "ann.json", "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)

    model, variables = load_official_checkpoint(str(fixtures_dir / "official_detr_r18_tiny" / "detr_random.pth"),
                                                num_heads=4)
    config = base_config()
    config.data.update(dict(source="coco_folder", eval_size=48, max_size=64, num_workers=0, group_by_size=0))
    config.data.source_kwargs = dict(ann_file=str(tmp_path / "ann.json"), image_dir=str(tmp_path / "images"),
                                     label_space="official91")
    config.data.val_kwargs = {}
    config.eval_batch_size = 2
    config.model.num_classes = 91
    evaluator = DetectionEvaluator(config, model, make_mesh())
    metrics = evaluator.evaluate(variables, str(tmp_path / "out"))
    evaluator.close()
    with open(tmp_path / "out" / "results.json") as f:
        results = json.load(f)
    assert len(results) == 3 * model.num_queries  # every query of every image, as the official PostProcess
    ids = {r["category_id"] for r in results}
    assert ids - {1, 18, 62} and ids <= set(range(91)), ids  # labels past the folder's table keep their id
    # The folder's table is ids 0..62 (official91: the label is the id); detections past it change no metric.
    assert metrics == coco_metrics(evaluator.ground_truth, [r for r in results if r["category_id"] <= 62])
    assert metrics["AP_small"] == 0.0  # scored (-1 would mean no ground truth of that size was seen)
