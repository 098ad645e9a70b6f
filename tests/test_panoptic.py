"""detr_jax.evaluation.postprocess_panoptic against the official DETR post-processing (fixture outputs and a torch
transcription of models/segmentation.py) and against a brute-force panoptic quality written from panopticapi's
definition."""

import io
import json
import os
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from detr_jax.evaluation import panoptic_quality
from detr_jax.evaluation import postprocess_panoptic as panoptic
from detr_jax.ops import interpolate, interpolate_device, panoptic_ids

# As tests/conftest.py: the official reference outputs live in ../shared/fixtures, or DETR_JAX_FIXTURES.
_FIXTURES = Path(os.environ.get("DETR_JAX_FIXTURES",
                                Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"))
_PANOPTIC_FIXTURE = _FIXTURES / "official_detr_r50_tiny_panoptic"

# The fixture's convention (as the official build for coco_panoptic): class ids <= 90 are things.
_IS_THING = {i: i <= 90 for i in range(251)}


# --- Reference: panopticapi.utils and the official PostProcessPanoptic / PostProcessSegm, in torch --------

def _ref_id2rgb(id_map):
    id_map = id_map.copy()
    rgb = np.zeros(id_map.shape + (3,), dtype=np.uint8)
    for i in range(3):
        rgb[..., i] = id_map % 256
        id_map //= 256
    return rgb


def _ref_rgb2id(color):
    color = color.astype(np.int32)
    return color[:, :, 0] + 256 * color[:, :, 1] + 256 * 256 * color[:, :, 2]


def _ref_post_process_panoptic(pred_logits, pred_masks, processed_sizes, target_sizes, is_thing_map,
                               threshold=0.85):
    """The official PostProcessPanoptic.forward (boxes dropped: unused), plus how often it re-assigned."""
    preds = []
    for cur_logits, cur_masks, size, target_size in zip(torch.from_numpy(pred_logits),
                                                        torch.from_numpy(pred_masks),
                                                        processed_sizes, target_sizes):
        scores, labels = cur_logits.softmax(-1).max(-1)
        keep = labels.ne(pred_logits.shape[-1] - 1) & (scores > threshold)
        cur_scores, cur_classes = cur_logits.softmax(-1).max(-1)
        cur_scores, cur_classes, cur_masks = cur_scores[keep], cur_classes[keep], cur_masks[keep]
        if len(cur_masks):
            cur_masks = F.interpolate(cur_masks[None], tuple(size), mode="bilinear").squeeze(0)
        else:  # util.misc.interpolate: an empty batch gets an empty output of the new size
            cur_masks = cur_masks.new_empty((0,) + tuple(size))
        h, w = cur_masks.shape[-2:]
        cur_masks = cur_masks.flatten(1)
        stuff_equiv_classes = defaultdict(list)
        for k, label in enumerate(cur_classes):
            if not is_thing_map[label.item()]:
                stuff_equiv_classes[label.item()].append(k)

        def get_ids_area(masks, scores, dedup=False, *, h=h, w=w, stuff_equiv_classes=stuff_equiv_classes,
                         target_size=target_size):  # bound now: the official closure, called in this iteration only
            m_id = masks.transpose(0, 1).softmax(-1)
            if m_id.shape[-1] == 0:
                m_id = torch.zeros((h, w), dtype=torch.long)
            else:
                m_id = m_id.argmax(-1).view(h, w)
            if dedup:
                for equiv in stuff_equiv_classes.values():
                    if len(equiv) > 1:
                        for eq_id in equiv:
                            m_id.masked_fill_(m_id.eq(eq_id), equiv[0])
            final_h, final_w = target_size
            seg_img = Image.fromarray(_ref_id2rgb(m_id.view(h, w).numpy()))
            seg_img = seg_img.resize(size=(final_w, final_h), resample=Image.NEAREST)
            m_id = torch.from_numpy(_ref_rgb2id(np.asarray(seg_img)))
            return [m_id.eq(i).sum().item() for i in range(len(scores))], seg_img

        area, seg_img = get_ids_area(cur_masks, cur_scores, dedup=True)
        reassignments = 0
        if cur_classes.numel() > 0:
            while True:
                filtered_small = torch.as_tensor([area[i] <= 4 for i, c in enumerate(cur_classes)], dtype=torch.bool)
                if filtered_small.any().item():
                    cur_scores = cur_scores[~filtered_small]
                    cur_classes = cur_classes[~filtered_small]
                    cur_masks = cur_masks[~filtered_small]
                    area, seg_img = get_ids_area(cur_masks, cur_scores)
                    reassignments += 1
                else:
                    break
        else:
            cur_classes = torch.ones(1, dtype=torch.long)
        segments_info = [{"id": i, "isthing": is_thing_map[cur_classes[i].item()],
                          "category_id": cur_classes[i].item(), "area": a} for i, a in enumerate(area)]
        with io.BytesIO() as out:
            seg_img.save(out, format="PNG")
            preds.append({"png_string": out.getvalue(), "segments_info": segments_info,
                          "reassignments": reassignments})
    return preds


def _ref_post_process_segm(pred_masks, max_target_sizes, orig_target_sizes, threshold=0.5):
    """The official PostProcessSegm.forward: uint8 [N, 1, H, W] per image."""
    max_target_sizes, orig_target_sizes = torch.as_tensor(max_target_sizes), torch.as_tensor(orig_target_sizes)
    max_h, max_w = max_target_sizes.max(0)[0].tolist()
    outputs_masks = F.interpolate(torch.from_numpy(pred_masks), size=(max_h, max_w), mode="bilinear",
                                  align_corners=False)
    outputs_masks = (outputs_masks.sigmoid() > threshold).cpu()
    results = []
    for cur_mask, t, tt in zip(outputs_masks, max_target_sizes, orig_target_sizes):
        img_h, img_w = t[0], t[1]
        masks = cur_mask[:, :img_h, :img_w].unsqueeze(1)
        results.append(F.interpolate(masks.float(), size=tuple(tt.tolist()), mode="nearest").byte())
    return results


def _decode_png(png_bytes):
    return _ref_rgb2id(np.asarray(Image.open(io.BytesIO(png_bytes)).convert("RGB")))


# --- Interpolation against torch --------------------------------------------------------------

@pytest.mark.parametrize("in_size,out_size", [
    ((48, 72), (192, 288)),    # x4, the stride of the mask head
    ((40, 50), (170, 230)),    # non-integer upsampling
    ((48, 72), (131, 257)),
    ((200, 150), (97, 101)),   # downsampling
    ((300, 200), (64, 65)),
    ((30, 60), (129, 60)),     # one axis unchanged
])
def test_resize_bilinear_matches_torch(in_size, out_size):
    x = np.random.default_rng(0).normal(scale=10.0, size=(2, 3) + in_size).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(x), size=out_size, mode="bilinear", align_corners=False).numpy()
    got = interpolate.resize_bilinear(x, out_size)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-5


def test_resize_bilinear_small_outputs_close_to_torch():
    # torch uses another (separable) kernel when out_h + out_w <= 128: not the same roundings, close values.
    x = np.random.default_rng(1).normal(scale=10.0, size=(2, 3, 33, 31)).astype(np.float32)
    for out_size in [(100, 7), (20, 13), (61, 67)]:
        expected = F.interpolate(torch.from_numpy(x), size=out_size, mode="bilinear", align_corners=False).numpy()
        assert np.abs(interpolate.resize_bilinear(x, out_size) - expected).max() <= 2e-5


@pytest.mark.parametrize("in_size,out_size", [((48, 72), (96, 144)), ((37, 53), (111, 70)), ((90, 64), (31, 200))])
def test_resize_nearest_matches_torch(in_size, out_size):
    x = np.random.default_rng(2).normal(size=(2, 3) + in_size).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(x), size=out_size, mode="nearest").numpy()
    np.testing.assert_array_equal(interpolate.resize_nearest(x, out_size), expected)


def test_id_rgb_round_trip():
    ids = np.random.default_rng(3).integers(0, 256 ** 3, size=(5, 7))
    rgb = panoptic_ids.id2rgb(ids)
    np.testing.assert_array_equal(rgb, _ref_id2rgb(ids))
    np.testing.assert_array_equal(panoptic_ids.rgb2id(rgb), ids)


# --- PostProcessPanoptic ----------------------------------------------------------------------

def test_post_process_panoptic_matches_official_fixture():
    if not _PANOPTIC_FIXTURE.is_dir():
        pytest.skip(f"official panoptic fixture {_PANOPTIC_FIXTURE} not found")
    data = np.load(_PANOPTIC_FIXTURE / "postprocess.npz")
    meta = json.loads((_PANOPTIC_FIXTURE / "postprocess.json").read_text())
    results = panoptic.post_process_panoptic(data["pred_logits"], data["pred_masks"], data["pred_boxes"],
                                             meta["processed_sizes"], meta["target_sizes"], _IS_THING,
                                             threshold=meta["threshold"])
    assert len(results) == len(meta["segments_info"])
    for b, result in enumerate(results):
        expected_ids = data[f"segment_ids_{b}"]
        assert result["segment_ids"].dtype == np.int32
        np.testing.assert_array_equal(result["segment_ids"], expected_ids)
        np.testing.assert_array_equal(_decode_png(result["png_string"]), expected_ids)
        assert result["segments_info"] == meta["segments_info"][b]


def _random_outputs(seed, batch=2, num_queries=20, num_kept=12, num_classes=250, mask_size=(12, 14)):
    """Model-like outputs with `num_kept` confident queries per image, some of them on a shared stuff class."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(batch, num_queries, num_classes + 1)).astype(np.float32)
    for b in range(batch):
        classes = rng.choice(np.r_[1:30, 100:110], size=num_kept)
        classes[:3] = 105  # three queries of one stuff class, to be merged
        logits[b, np.arange(num_kept), classes] = 12.0
    masks = rng.normal(scale=3.0, size=(batch, num_queries) + mask_size).astype(np.float32)
    boxes = rng.uniform(size=(batch, num_queries, 4)).astype(np.float32)
    return logits, masks, boxes


def _assert_same_as_official(logits, masks, boxes, processed_sizes, target_sizes):
    results = panoptic.post_process_panoptic(logits, masks, boxes, processed_sizes, target_sizes, _IS_THING)
    expected = _ref_post_process_panoptic(logits, masks, processed_sizes, target_sizes, _IS_THING)
    for result, ref, target in zip(results, expected, target_sizes):
        assert result["segment_ids"].shape == tuple(target)
        np.testing.assert_array_equal(result["segment_ids"], _decode_png(ref["png_string"]))
        np.testing.assert_array_equal(_decode_png(result["png_string"]), _decode_png(ref["png_string"]))
        assert result["segments_info"] == ref["segments_info"]
    return expected


def test_post_process_panoptic_matches_torch_transcription_with_small_segments():
    # Noisy masks at many confident queries leave segments of <= 4 pixels: the drop-and-reassign loop runs.
    logits, masks, boxes = _random_outputs(seed=0)
    expected = _assert_same_as_official(logits, masks, boxes, [(72, 80), (70, 66)], [(150, 170), (141, 99)])
    assert all(ref["reassignments"] >= 1 for ref in expected)
    assert all(len(ref["segments_info"]) < 12 for ref in expected)


def test_post_process_panoptic_of_a_padded_batch_crops_instead_of_stretching():
    """padded_size: each image's masks are resized (official bilinear) to the padded canvas and cropped to the
    image, then post-processed as official: the official result on those cropped masks (whose resize to the
    processed size is then the identity). Without it (official), the padding is stretched in and the maps move."""
    logits, masks, boxes = _random_outputs(seed=3, mask_size=(16, 20))  # stride 4 of a 64 x 80 canvas
    processed, targets = [(50, 80), (64, 57)], [(100, 160), (128, 111)]
    results = panoptic.post_process_panoptic(logits, masks, boxes, processed, targets, _IS_THING, padded_size=(64, 80))
    canvas = F.interpolate(torch.from_numpy(masks), (64, 80), mode="bilinear")
    for b, (result, (h, w), target) in enumerate(zip(results, processed, targets)):
        cropped = canvas[b:b + 1, :, :h, :w].numpy()
        (ref,) = _ref_post_process_panoptic(logits[b:b + 1], cropped, [(h, w)], [target], _IS_THING)
        np.testing.assert_array_equal(result["segment_ids"], _decode_png(ref["png_string"]))
        assert result["segments_info"] == ref["segments_info"]
    stretched = panoptic.post_process_panoptic(logits, masks, boxes, processed, targets, _IS_THING)
    assert (stretched[0]["segment_ids"] != results[0]["segment_ids"]).mean() > 0.05


def test_post_process_panoptic_without_confident_queries():
    logits, masks, boxes = _random_outputs(seed=1)
    logits[..., -1] = 50.0  # every query is no-object
    _assert_same_as_official(logits, masks, boxes, [(72, 80), (70, 66)], [(150, 170), (141, 99)])
    results = panoptic.post_process_panoptic(logits, masks, boxes, [(72, 80)] * 2, [(150, 170)] * 2, _IS_THING)
    for result in results:
        assert result["segments_info"] == []
        assert not result["segment_ids"].any()


def test_post_process_panoptic_threshold_and_no_object():
    logits = np.zeros((1, 3, 6), np.float32)
    logits[0, 0, 2] = 10.0   # confident class 2
    logits[0, 1, 5] = 10.0   # confident no-object: dropped
    logits[0, 2, 3] = 1.0    # class 3 but not confident: dropped
    masks = np.zeros((1, 3, 8, 8), np.float32)
    is_thing = {c: True for c in range(6)}
    (result,) = panoptic.post_process_panoptic(logits, masks, np.zeros((1, 3, 4)), [(16, 16)], [(32, 32)], is_thing)
    assert result["segments_info"] == [{"id": 0, "isthing": True, "category_id": 2, "area": 32 * 32}]


def test_post_process_panoptic_drops_segments_of_at_most_4_pixels():
    # Processed size = mask size = target size: no resampling, so the winners are set pixel by pixel.
    # Query 0 wins everywhere but a 2x2 block (query 1, 4 pixels: dropped) and a 1x5 strip (query 2, kept);
    # query 1's pixels go to the next best query, 0, in the recomputation.
    masks = np.zeros((1, 3, 8, 8), np.float32)
    masks[0, 0] = 1.0
    masks[0, 1, 2:4, 2:4] = 2.0
    masks[0, 2, 6, 1:6] = 2.0
    logits = np.zeros((1, 3, 6), np.float32)
    logits[0, [0, 1, 2], [1, 2, 3]] = 10.0
    is_thing = {c: c != 3 for c in range(6)}
    (result,) = panoptic.post_process_panoptic(logits, masks, np.zeros((1, 3, 4)), [(8, 8)], [(8, 8)], is_thing)
    assert result["segments_info"] == [{"id": 0, "isthing": True, "category_id": 1, "area": 59},
                                       {"id": 1, "isthing": False, "category_id": 3, "area": 5}]
    expected_ids = np.zeros((8, 8), np.int32)
    expected_ids[6, 1:6] = 1
    np.testing.assert_array_equal(result["segment_ids"], expected_ids)
    (ref,) = _ref_post_process_panoptic(logits, masks, [(8, 8)], [(8, 8)], is_thing)
    assert ref["segments_info"] == result["segments_info"]


# --- PostProcessSegm --------------------------------------------------------------------------

def test_post_process_segm_matches_official():
    masks = np.random.default_rng(4).normal(scale=3.0, size=(2, 5, 30, 40)).astype(np.float32)
    max_sizes, orig_sizes = [(110, 150), (90, 160)], [(220, 300), (181, 333)]
    got = panoptic.post_process_segm(masks, max_sizes, orig_sizes)
    expected = _ref_post_process_segm(masks, max_sizes, orig_sizes)
    for g, e, size in zip(got, expected, orig_sizes):
        assert g.shape == (5,) + size and g.dtype == bool
        np.testing.assert_array_equal(g, e[:, 0].numpy().astype(bool))



def test_post_process_segm_of_a_padded_batch_is_the_official_of_a_batch_that_fills_the_padding():
    """padded_size: the masks are at stride 4 of a canvas larger than every image (detr_jax pads to a multiple of
    32 or a bucket; the official pads to the largest image). Upsampled to the canvas, then cropped: the official
    result of the same batch with one more image as large as the canvas."""
    masks = np.random.default_rng(5).normal(scale=3.0, size=(3, 5, 32, 40)).astype(np.float32)
    max_sizes, orig_sizes = [(110, 150), (90, 160)], [(220, 300), (181, 333)]
    got = panoptic.post_process_segm(masks[:2], max_sizes, orig_sizes, padded_size=(128, 160))
    expected = _ref_post_process_segm(masks, max_sizes + [(128, 160)], orig_sizes + [(128, 160)])
    for g, e in zip(got, expected[:2]):
        np.testing.assert_array_equal(g, e[:, 0].numpy().astype(bool))
    # Stretched to the largest image instead (padded_size None), the masks move.
    assert any((g != s).any() for g, s in zip(got, panoptic.post_process_segm(masks[:2], max_sizes, orig_sizes)))


@pytest.mark.parametrize("blend", [interpolate_device.plain_blend, interpolate_device.exact_blend])
@pytest.mark.parametrize("in_size,out_size", [((48, 72), (192, 288)), ((40, 50), (170, 230)), ((200, 150), (97, 101))])
def test_device_resize_is_torchs_with_either_blend(blend, in_size, out_size):
    """The device resize gives torch's numbers (not merely close ones) with the blend the backend picked and with
    the error-free emulation kept for backends that do not contract `a * w0 + b * w1` into torch's fma."""
    x = np.random.default_rng(6).normal(scale=10.0, size=(2, 3) + in_size).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(x), size=out_size, mode="bilinear", align_corners=False).numpy()
    rows, cols = interpolate.linear_taps(in_size[0], out_size[0]), interpolate.linear_taps(in_size[1], out_size[1])
    got = jax.jit(interpolate_device.apply_taps_transposed, static_argnums=3)(x, rows, cols, blend, jnp.uint32(0))
    np.testing.assert_array_equal(np.swapaxes(np.asarray(got), -1, -2), interpolate.apply_taps(x, rows, cols))
    assert np.abs(np.swapaxes(np.asarray(got), -1, -2) - expected).max() <= 1e-5  # as the host resize's test
    assert interpolate_device.device_blend() in (interpolate_device.plain_blend, interpolate_device.exact_blend)


@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.9, 1e-6])
def test_logit_cut_is_the_sigmoid_threshold(threshold):
    """x >= logit_cut(t) exactly when the float32 sigmoid of x is > t: on every float32 within 2^17 ulps of the cut
    and on random logits."""
    cut = panoptic.logit_cut(threshold)
    near = np.float32(cut) + np.arange(-2 ** 17, 2 ** 17) * np.spacing(np.abs(np.float32(cut)))
    far = np.random.default_rng(7).normal(scale=20.0, size=2 ** 18)
    for x in (near.astype(np.float32), far.astype(np.float32)):
        with np.errstate(over="ignore"):
            np.testing.assert_array_equal(x >= cut, panoptic._sigmoid(x) > threshold)
    with pytest.raises(ValueError, match="probability"):
        panoptic.logit_cut(1.0)


def test_post_process_segm_at_another_threshold_and_coco_like_sizes():
    masks = np.random.default_rng(8).normal(scale=3.0, size=(2, 4, 50, 67)).astype(np.float32)
    max_sizes, orig_sizes = [(200, 266), (190, 250)], [(120, 160), (427, 640)]  # down- and upsampled
    got = panoptic.post_process_segm(masks, max_sizes, orig_sizes, threshold=0.3)
    expected = _ref_post_process_segm(masks, max_sizes, orig_sizes, threshold=0.3)
    for g, e, size in zip(got, expected, orig_sizes):
        assert g.shape == (4,) + size and g.dtype == bool
        assert g[0].T.flags.c_contiguous  # column-major: what the RLE encoder reads without a copy
        np.testing.assert_array_equal(g, e[:, 0].numpy().astype(bool))

# --- Panoptic quality: hand-computed cases ----------------------------------------------------

# Categories 1, 2 are things; 3, 4 stuff.
_CATEGORIES = [{"id": 1, "isthing": 1}, {"id": 2, "isthing": 1}, {"id": 3, "isthing": 0}, {"id": 4, "isthing": 0}]


def _segments(ids_to_categories, crowd=()):
    return [{"id": i, "category_id": c, "iscrowd": int(i in crowd)} for i, c in ids_to_categories.items()]


def _pq(*images):
    metric = panoptic_quality.PanopticQuality(_CATEGORIES)
    for gt_ids, gt_info, pred_ids, pred_info in images:
        metric.update(np.asarray(gt_ids), gt_info, np.asarray(pred_ids), pred_info)
    return metric.compute()


def test_pq_perfect_prediction():
    gt = [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 3, 3]]
    pred = [[7, 7, 8, 8], [7, 7, 8, 8], [0, 0, 0, 0]]  # other ids, and id 0 as a real segment (as DETR)
    r = _pq((gt, _segments({1: 1, 2: 2, 3: 3}), pred, _segments({7: 1, 8: 2, 0: 3})))
    assert r["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 3}
    assert r["Things"]["n"] == 2 and r["Stuff"]["n"] == 1
    assert r["per_class"][4] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}  # absent category: not averaged


@pytest.mark.parametrize("pred_length,matched", [(3, False), (4, True)])
def test_pq_iou_must_exceed_half(pred_length, matched):
    # gt: 6 pixels of thing 1 then 4 of stuff 3. pred: thing 1 on the first pred_length pixels (IoU 3/6 or 4/6),
    # stuff 3 on the rest (IoU 4/7 or 4/6).
    gt = [[1] * 6 + [2] * 4]
    pred = [[5] * pred_length + [6] * (10 - pred_length)]
    r = _pq((gt, _segments({1: 1, 2: 3}), pred, _segments({5: 1, 6: 3})))
    stuff_iou = 4 / (10 - pred_length)
    if matched:
        assert r["per_class"][1] == pytest.approx({"pq": 4 / 6, "sq": 4 / 6, "rq": 1.0})
    else:  # one false negative and one false positive
        assert r["per_class"][1] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
    assert r["per_class"][3] == pytest.approx({"pq": stuff_iou, "sq": stuff_iou, "rq": 1.0})
    assert r["All"]["n"] == 2


def test_pq_false_positive_and_false_negative():
    gt = [[1, 1, 1, 2, 2, 2]]
    pred = [[5, 5, 5, 6, 6, 6]]
    r = _pq((gt, _segments({1: 1, 2: 2}), pred, _segments({5: 1, 6: 4})))  # segment 6 has the wrong class
    assert r["per_class"][1] == {"pq": 1.0, "sq": 1.0, "rq": 1.0}
    assert r["per_class"][2] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}   # fn only
    assert r["per_class"][4] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}   # fp only
    assert r["All"] == pytest.approx({"pq": 1 / 3, "sq": 1 / 3, "rq": 1 / 3, "n": 3})
    assert r["Things"] == pytest.approx({"pq": 0.5, "sq": 0.5, "rq": 0.5, "n": 2})
    assert r["Stuff"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 1}


def test_pq_void_pixels_are_left_out_of_the_union():
    # Thing 1 covers 4 labelled pixels; the prediction also covers the 4 void ones: IoU 4 / (8 + 4 - 4 - 4) = 1.
    gt = [[1, 1, 1, 1, 0, 0, 0, 0]]
    pred = [[5, 5, 5, 5, 5, 5, 5, 5]]
    r = _pq((gt, _segments({1: 1}), pred, _segments({5: 1})))
    assert r["per_class"][1] == {"pq": 1.0, "sq": 1.0, "rq": 1.0}


@pytest.mark.parametrize("gt,is_false_positive", [
    ([[1, 1, 1, 1, 0, 0, 2, 2, 2, 2]], False),  # 2 of the 3 pixels of segment 7 on void: ignored
    ([[1, 1, 1, 1, 1, 0, 2, 2, 2, 2]], True),   # 1 of 3 on void: a false positive
])
def test_pq_prediction_mostly_on_void_is_not_a_false_positive(gt, is_false_positive):
    pred = [[5, 5, 5, 5, 7, 7, 7, 6, 6, 6]]
    r = _pq((gt, _segments({1: 1, 2: 2}), pred, _segments({5: 1, 6: 2, 7: 4})))
    assert r["per_class"][2] == pytest.approx({"pq": 3 / 4, "sq": 3 / 4, "rq": 1.0})
    assert r["per_class"][1]["rq"] == 1.0
    assert r["All"]["n"] == 2 + is_false_positive  # stuff 4 is averaged only when it has a false positive
    assert r["Stuff"]["n"] == int(is_false_positive)


def test_pq_crowd_regions():
    # Thing 2 is a crowd region: no false negative for it, and a thing-2 prediction on it is not a false positive.
    gt = [[1, 1, 1, 1, 2, 2, 2, 2]]
    gt_info = _segments({1: 1, 2: 2}, crowd={2})
    pred = [[5, 5, 5, 5, 6, 6, 6, 6]]
    r = _pq((gt, gt_info, pred, _segments({5: 1, 6: 2})))
    assert r["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 1}
    # The crowd region of thing 2 does not excuse a prediction of thing 1 on it.
    r = _pq((gt, gt_info, pred, _segments({5: 1, 6: 1})))
    assert r["per_class"][1] == pytest.approx({"pq": 1 / 1.5, "sq": 1.0, "rq": 1 / 1.5})


def test_pq_accumulates_counts_over_images():
    gt, gt_info = [[1, 1, 2, 2]], _segments({1: 1, 2: 3})
    perfect = (gt, gt_info, [[5, 5, 6, 6]], _segments({5: 1, 6: 3}))
    missed_thing = (gt, gt_info, [[6, 6, 6, 6]], _segments({6: 3}))  # thing 1 missed; stuff 3 IoU 2/4
    r = _pq(perfect, missed_thing)
    # Thing 1: tp 1, fn 1 -> PQ 1 / 1.5 (not the mean of per-image PQs, 0.5). Stuff 3: tp 1, fn 1, fp 1.
    assert r["per_class"][1] == pytest.approx({"pq": 1 / 1.5, "sq": 1.0, "rq": 1 / 1.5})
    assert r["per_class"][3] == pytest.approx({"pq": 1 / 2, "sq": 1.0, "rq": 1 / 2})


def test_pq_rejects_inconsistent_predictions():
    gt, gt_info = np.array([[1, 1, 2, 2]]), _segments({1: 1, 2: 3})
    metric = panoptic_quality.PanopticQuality(_CATEGORIES)
    with pytest.raises(ValueError, match="not in segments_info"):
        metric.update(gt, gt_info, np.array([[5, 5, 6, 6]]), _segments({5: 1}))
    with pytest.raises(ValueError, match="not in the id map"):
        metric.update(gt, gt_info, np.array([[5, 5, 5, 5]]), _segments({5: 1, 6: 3}))
    with pytest.raises(ValueError, match="category_id 9"):
        metric.update(gt, gt_info, np.array([[5, 5, 5, 5]]), _segments({5: 9}))


def test_pq_on_post_process_panoptic_output():
    logits, masks, boxes = _random_outputs(seed=2)
    results = panoptic.post_process_panoptic(logits, masks, boxes, [(72, 80)] * 2, [(150, 170)] * 2, _IS_THING)
    categories = [{"id": c, "isthing": int(t)} for c, t in _IS_THING.items()]
    metric = panoptic_quality.PanopticQuality(categories)
    for result in results:
        # Ground truth = the prediction with ids shifted by one (gt id 0 means void).
        gt_info = [{"id": s["id"] + 1, "category_id": s["category_id"], "iscrowd": 0} for s in result["segments_info"]]
        metric.update(result["segment_ids"] + 1, gt_info, result["segment_ids"], result["segments_info"])
    r = metric.compute()
    assert r["All"]["pq"] == 1.0 and r["All"]["n"] == len({s["category_id"] for x in results
                                                             for s in x["segments_info"]})


# --- Panoptic quality: brute force on random id maps ------------------------------------------

def _brute_force_pq(images, categories):
    """PQ from its definition, with explicit masks for every (gt, pred) pair."""
    counts = defaultdict(lambda: {"tp": 0, "fp": 0, "fn": 0, "iou": 0.0})
    for gt_ids, gt_info, pred_ids, pred_info in images:
        void = gt_ids == 0
        matched_gt, matched_pred = set(), set()
        for g in gt_info:
            if g["iscrowd"]:
                continue
            gt_mask = gt_ids == g["id"]
            for p in pred_info:
                if p["category_id"] != g["category_id"]:
                    continue
                pred_mask = pred_ids == p["id"]
                intersection = (gt_mask & pred_mask).sum()
                union = (gt_mask | pred_mask).sum() - (pred_mask & void).sum()
                if intersection and intersection / union > 0.5:
                    counts[g["category_id"]]["tp"] += 1
                    counts[g["category_id"]]["iou"] += intersection / union
                    matched_gt.add(g["id"])
                    matched_pred.add(p["id"])
        for g in gt_info:
            if not g["iscrowd"] and g["id"] not in matched_gt:
                counts[g["category_id"]]["fn"] += 1
        for p in pred_info:
            if p["id"] in matched_pred:
                continue
            pred_mask = pred_ids == p["id"]
            ignored = void.copy()
            for g in gt_info:
                if g["iscrowd"] and g["category_id"] == p["category_id"]:
                    ignored |= gt_ids == g["id"]
            if (pred_mask & ignored).sum() / pred_mask.sum() <= 0.5:
                counts[p["category_id"]]["fp"] += 1

    def average(selected):
        per_class = {}
        for c in selected:
            k = counts[c]
            if k["tp"] + k["fp"] + k["fn"]:
                denominator = k["tp"] + 0.5 * k["fp"] + 0.5 * k["fn"]
                per_class[c] = {"pq": k["iou"] / denominator, "sq": k["iou"] / k["tp"] if k["tp"] else 0.0,
                                "rq": k["tp"] / denominator}
        n = len(per_class)
        return {m: sum(v[m] for v in per_class.values()) / n for m in ("pq", "sq", "rq")} | {"n": n}, per_class

    things = [c["id"] for c in categories if c["isthing"]]
    stuff = [c["id"] for c in categories if not c["isthing"]]
    return {"All": average(things + stuff)[0], "Things": average(things)[0], "Stuff": average(stuff)[0],
            "per_class": average(things + stuff)[1]}


def _random_image(rng, num_categories=6, shape=(9, 12)):
    """Blocky gt id map with noise (0 = void), and a prediction that mostly follows it."""
    blocks = rng.integers(0, 6, size=(3, 4))
    gt_ids = np.kron(blocks, np.ones((3, 3), np.int64))
    noise = rng.uniform(size=shape) < 0.1
    gt_ids[noise] = rng.integers(0, 6, size=noise.sum())
    gt_info, crowd_categories = [], set()
    for i in np.unique(gt_ids[gt_ids > 0]):
        category = int(rng.integers(1, num_categories + 1))
        # At most one crowd region per category, as in COCO (panopticapi keeps only one per category).
        iscrowd = int(rng.uniform() < 0.2 and category not in crowd_categories)
        crowd_categories |= {category} if iscrowd else set()
        gt_info.append({"id": int(i), "category_id": category, "iscrowd": iscrowd})
    category_of = {g["id"]: g["category_id"] for g in gt_info}

    relabel = rng.permutation(8)  # pred ids differ from gt ids; pred id 0 is sometimes a segment
    pred_ids = relabel[gt_ids]
    noise = rng.uniform(size=shape) < 0.2
    pred_ids[noise] = rng.integers(0, 8, size=noise.sum())
    pred_info = []
    for i in np.unique(pred_ids):
        if i == 0 and rng.uniform() < 0.5:
            continue  # unlabelled prediction pixels
        source = np.flatnonzero(relabel == i)[0]
        category = category_of.get(int(source), int(rng.integers(1, num_categories + 1)))
        if rng.uniform() < 0.15:
            category = int(rng.integers(1, num_categories + 1))
        pred_info.append({"id": int(i), "category_id": category})
    return gt_ids, gt_info, pred_ids, pred_info


def test_pq_matches_brute_force_on_random_id_maps():
    rng = np.random.default_rng(5)
    categories = [{"id": c, "isthing": int(c <= 3)} for c in range(1, 7)]
    images = [_random_image(rng) for _ in range(60)]
    metric = panoptic_quality.PanopticQuality(categories)
    for image in images:
        metric.update(*image)
    got, expected = metric.compute(), _brute_force_pq(images, categories)
    for name in ("All", "Things", "Stuff"):
        assert got[name] == pytest.approx(expected[name]), name
    for c, values in got["per_class"].items():
        assert values == pytest.approx(expected["per_class"].get(c, {"pq": 0.0, "sq": 0.0, "rq": 0.0})), c
    # The random cases cover matches, misses, void and crowd alike.
    totals = {k: sum(getattr(s, k) for s in metric.stats.values()) for k in ("tp", "fp", "fn")}
    assert min(totals.values()) > 10
    assert any(g["iscrowd"] for image in images for g in image[1])
