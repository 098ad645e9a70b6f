"""Batching and the loader: batch format, buckets, object cap, determinism, resume, process slicing."""

import logging

import numpy as np
import pytest

from detr_jax.data import batching
from detr_jax.data.loader import Loader
from detr_jax.data.sources.synthetic import SyntheticDetection
from detr_jax.data.transforms import make_eval_transforms, make_train_transforms

SIZES = {(48, 64): 0.5, (64, 48): 0.3, (56, 56): 0.2}


def _source(n=24, max_objects=8):
    return SyntheticDetection(num_examples=n, image_size=list(SIZES), max_objects=max_objects, seed=0)


def _train():
    return make_train_transforms(scales=(40, 48, 56), max_size=80, crop_resize_scales=(32, 40, 48), crop_size=(24, 48))


def _buckets(batch_size):
    return batching.recipe_buckets(_train(), SIZES, batch_size=batch_size, max_buckets=4, max_side=80, stride=16)


def _loader(**kw):
    args = dict(source=_source(), transforms=_train(), batch_size=4, seed=0, max_objects=10, buckets=_buckets(4),
                num_workers=0)
    args.update(kw)
    return Loader(**args)


def _take(loader, n):
    with loader:
        return [next(loader) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_format_and_masks():
    source, buckets = _source(), _buckets(4)
    batches = _take(_loader(source=source, buckets=buckets), 6)
    for batch in batches:
        assert {k: (v.dtype, v.ndim) for k, v in batch.items()} == {
            "images": (np.float32, 4), "pixel_mask": (np.bool_, 3), "labels": (np.int32, 2), "boxes": (np.float32, 3),
            "mask": (np.bool_, 2), "image_id": (np.int32, 1), "orig_size": (np.int32, 2), "size": (np.int32, 2)}
        b, h, w, _ = batch["images"].shape
        assert b == 4 and (h, w) in buckets and batch["boxes"].shape == (4, 10, 4)
        for i in range(b):
            sh, sw = batch["size"][i]
            expected = np.zeros((h, w), bool)
            expected[:sh, :sw] = True
            np.testing.assert_array_equal(batch["pixel_mask"][i], expected)
            assert np.all(batch["images"][i][~expected] == 0)
            example = source[batch["image_id"][i] - 1]
            assert tuple(batch["orig_size"][i]) == example["orig_size"]
            k = int(batch["mask"][i].sum())
            assert k <= len(example["labels"]) and np.all(batch["mask"][i, :k])  # crops may drop objects
            real = batch["boxes"][i][batch["mask"][i]]
            assert np.all((real >= 0) & (real <= 1)) and np.all(real[:, 2:] > 0)
            np.testing.assert_array_equal(batch["boxes"][i][~batch["mask"][i]],
                                          np.broadcast_to(batching.PADDING_BOX, (10 - k, 4)))


def test_fit_buckets_cover_every_shape():
    sizes = batching.simulate_output_sizes(_train(), SIZES, num_samples=2000, seed=1)
    for batch_size in (1, 4):
        shapes = batching.batch_max_sizes(sizes, batch_size)
        buckets = batching.fit_buckets(shapes, max_buckets=5, stride=16)
        assert len(buckets) <= 5 and all(h % 16 == 0 and w % 16 == 0 for h, w in buckets)
        for h, w in shapes:
            assert batching.choose_bucket(h, w, buckets) in buckets
        assert batching.padded_fraction(sizes, buckets, batch_size, stride=16) >= batching.padded_fraction(
            sizes, None, batch_size)
    assert len(batching.fit_buckets(shapes, max_buckets=1)) == 1


def test_padded_fraction_by_hand():
    sizes = np.array([[30, 40], [40, 30]])
    assert batching.padded_fraction(sizes, [(32, 48), (48, 32)], 1) == pytest.approx(1 - 2400 / (2 * 1536))
    assert batching.padded_fraction(sizes, None, 2) == pytest.approx(1 - 2400 / (2 * 1600))


def test_choose_bucket_and_fallback(caplog):
    buckets = [(32, 32), (32, 64), (64, 64)]
    assert batching.choose_bucket(30, 20, buckets) == (32, 32)
    assert batching.choose_bucket(30, 40, buckets) == (32, 64)
    assert batching.choose_bucket(40, 40, buckets) == (64, 64)
    stats = batching.BatchStats()
    example = (np.ones((70, 10, 3), np.float32), {"boxes": np.zeros((0, 4)), "labels": np.zeros(0), "image_id": 1,
                                                  "orig_size": (70, 10), "size": (70, 10)})
    with caplog.at_level(logging.WARNING):
        batch = batching.collate([example], 3, buckets, stats=stats)
    assert batch["images"].shape == (1, 96, 32, 3) and stats.unbucketed_batches == 1 and "fits no bucket" in caplog.text


def test_max_objects_drop_is_counted_and_logged(caplog):
    with caplog.at_level(logging.WARNING):
        loader = _loader(transforms=make_eval_transforms(48, 80), max_objects=2, buckets=None)
        batches = _take(loader, 3)
    assert all(b["mask"].sum(axis=1).max() == 2 for b in batches)
    assert loader.stats.objects_dropped > 0 and loader.stats.images_with_dropped_objects > 0
    assert "max_objects=2" in caplog.text
    assert loader.counters()["objects_dropped"] == loader.stats.objects_dropped


def test_padding_examples_and_every_image_once():
    source = _source(n=10)
    loader = Loader(source, make_eval_transforms(48, 80), batch_size=4, seed=0, max_objects=8, buckets=[(80, 80)],
                    shuffle=False, drop_remainder=False, num_epochs=1, num_workers=2)
    with loader:
        batches = list(loader)
    assert len(batches) == 3 == loader.batches_per_epoch
    ids = np.concatenate([b["image_id"] for b in batches])
    np.testing.assert_array_equal(ids, list(range(1, 11)) + [-1, -1])
    last = batches[-1]
    assert not last["pixel_mask"][2:].any() and not last["mask"][2:].any() and np.all(last["size"][2:] == 0)
    assert loader.get_state() == {"epoch": 1, "position": 0}


@pytest.mark.parametrize("num_workers", [1, 2, 3])
def test_deterministic_whatever_the_workers(num_workers):
    reference = _take(_loader(num_workers=0), 8)  # 8 batches: crosses into epoch 1 (6 batches per epoch)
    _assert_batches_equal(reference, _take(_loader(num_workers=num_workers, prefetch=3), 8))


def test_epochs_are_permutations():
    loader = _loader(transforms=make_eval_transforms(48, 80))
    orders = [loader.epoch_order(e) for e in range(3)]
    assert all(sorted(o) == list(range(24)) for o in orders)
    assert not np.array_equal(orders[0], orders[1])
    assert not np.array_equal(loader.epoch_order(0), _loader(seed=1).epoch_order(0))
    batches = _take(loader, 6)
    np.testing.assert_array_equal(np.concatenate([b["image_id"] for b in batches]) - 1, orders[0])


@pytest.mark.parametrize("stop_after", [2, 5, 7])
def test_resume_from_state_gives_identical_batches(stop_after):
    full = _take(_loader(num_workers=2), 10)
    first = _loader(num_workers=2)
    with first:
        for _ in range(stop_after):
            next(first)
        state = dict(first.get_state())
    assert state == {"epoch": stop_after // 6, "position": stop_after % 6}
    resumed = _loader(num_workers=2)
    resumed.set_state(state)
    _assert_batches_equal(full[stop_after:], _take(resumed, 10 - stop_after))


def test_set_state_mid_stream_discards_prefetched():
    loader = _loader(num_workers=2, prefetch=2)
    with loader:
        a = [next(loader) for _ in range(3)]
        loader.set_state({"epoch": 0, "position": 1})
        b = [next(loader) for _ in range(2)]
    _assert_batches_equal(a[1:3], b)
    with pytest.raises(ValueError, match="out of range"):
        loader.set_state({"epoch": 0, "position": 6})


def test_process_slices_cover_the_global_batch():
    buckets = _buckets(4)
    whole = _take(_loader(batch_size=4, buckets=buckets), 7)
    parts = [_take(_loader(batch_size=2, buckets=buckets, process_index=p, process_count=2, num_workers=p), 7)
             for p in range(2)]
    for step, batch in enumerate(whole):
        a, b = parts[0][step], parts[1][step]
        assert a["images"].shape == b["images"].shape  # every process picks the same bucket
        assert not set(a["image_id"]) & set(b["image_id"])
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), batch[key], err_msg=key)


def test_worker_errors_reach_the_consumer():
    class Broken:
        def __len__(self):
            return 8

        def __getitem__(self, index):
            raise RuntimeError(f"broken example {index}")

    loader = Loader(Broken(), None, batch_size=2, seed=0, max_objects=4, buckets=None, num_workers=2)
    with loader, pytest.raises(RuntimeError, match="broken example"):
        next(loader)


def test_bad_arguments():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        _loader(source=_source(n=3))
    with pytest.raises(ValueError, match="process_index"):
        _loader(process_index=2, process_count=2)
    with pytest.raises(ValueError, match="buckets=None"):
        _loader(buckets=None, process_count=2)


def test_size_grouped_order():
    rng = np.random.default_rng(0)
    sizes = np.concatenate([rng.integers(20, 40, (50, 1)), rng.integers(20, 40, (50, 1))], 1)
    order = batching.size_grouped_order(sizes, 4, 3, np.random.default_rng(1))
    assert sorted(order) == list(range(50))
    np.testing.assert_array_equal(order[48:], [48, 49])  # the incomplete tail stays last
    for start in range(0, 48, 12):  # items stay within their pool of 3 batches
        assert set(order[start:start + 12]) == set(range(start, start + 12))
    grouped = batching.padded_fraction(sizes[order[:48]], None, 4)
    assert grouped < batching.padded_fraction(sizes[:48], None, 4)


def test_group_by_size_loader():
    buckets = batching.recipe_buckets(_train(), SIZES, batch_size=4, max_buckets=4, max_side=80, stride=16,
                                      group_by_size=3)
    loader = _loader(group_by_size=3, buckets=buckets)
    order = loader.epoch_order(0)
    assert sorted(order) == list(range(24))
    full = _take(_loader(group_by_size=3, buckets=buckets, num_workers=2), 8)
    # Sorted by orientation within each pool of 3 batches: at most one batch per pool mixes orientations.
    mixed = [len(set((b["size"][:, 0] > b["size"][:, 1]).tolist())) > 1 for b in full[:6]]
    assert sum(mixed[:3]) <= 1 and sum(mixed[3:]) <= 1
    resumed = _loader(group_by_size=3, buckets=buckets)
    resumed.set_state({"epoch": 0, "position": 4})
    _assert_batches_equal(full[4:], _take(resumed, 4))
    parts = [_take(_loader(group_by_size=3, buckets=buckets, batch_size=2, process_index=p, process_count=2), 3)
             for p in range(2)]
    for step in range(3):
        np.testing.assert_array_equal(np.concatenate([parts[0][step]["image_id"], parts[1][step]["image_id"]]),
                                      full[step]["image_id"])


def _by_image(batches):
    """{image_id: (image cropped to its size, boxes of its real objects)} over batches (padding examples skipped)."""
    out = {}
    for b in batches:
        for i, image_id in enumerate(b["image_id"]):
            if image_id >= 0:
                h, w = b["size"][i]
                out[int(image_id)] = (b["images"][i, :h, :w], b["boxes"][i][b["mask"][i]])
    return out


def test_augmentation_changes_with_the_epoch_and_only_with_it():
    # 6 batches per epoch: batches 0-5 are epoch 0, 6-11 epoch 1; every image appears once in each.
    batches = _take(_loader(num_workers=2), 12)
    epoch0, epoch1 = _by_image(batches[:6]), _by_image(batches[6:])
    assert sorted(epoch0) == sorted(epoch1) == list(range(1, 25))
    same = [i for i in epoch0
            if epoch0[i][0].shape == epoch1[i][0].shape and np.array_equal(epoch0[i][0], epoch1[i][0])]
    # Flip x resize-or-crop x 3 scales: an image keeps its epoch-0 augmentation in epoch 1 by chance only.
    assert len(same) <= 6, f"{len(same)} of 24 images got the same augmentation in epochs 0 and 1"
    # Within an epoch the augmentation is the example's own: the same with other workers and after a resume.
    resumed = _loader(num_workers=1)
    resumed.set_state({"epoch": 0, "position": 4})
    again = _take(resumed, 5)  # epoch 0 positions 4-5, then epoch 1 positions 0-2
    for part, expected in ((again[:2], epoch0), (again[2:], epoch1)):
        for image_id, (image, boxes) in _by_image(part).items():
            np.testing.assert_array_equal(image, expected[image_id][0])
            np.testing.assert_array_equal(boxes, expected[image_id][1])


def test_uint8_images_are_the_host_normalisation_on_the_device():
    import jax

    from detr_jax.data.transforms import normalize_images

    def loader(normalize_pixels):
        transforms = make_train_transforms(scales=(40, 48, 56), max_size=80, crop_resize_scales=(32, 40, 48),
                                           crop_size=(24, 48), normalize_pixels=normalize_pixels)
        return _loader(transforms=transforms)

    host, raw = _take(loader(True), 3), _take(loader(False), 3)
    for a, b in zip(host, raw):
        assert a["images"].dtype == np.float32 and b["images"].dtype == np.uint8
        assert b["images"].nbytes * 4 == a["images"].nbytes
        for key in a:
            if key != "images":
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        on_device = np.asarray(jax.jit(normalize_images)(b["images"], b["pixel_mask"]))
        np.testing.assert_array_equal(on_device, a["images"])  # bit for bit, padding included


@pytest.mark.parametrize("group_by_size", [0, 3])
def test_worker_processes_give_the_same_batches_and_resume(group_by_size):
    buckets = batching.recipe_buckets(_train(), SIZES, batch_size=4, max_buckets=4, max_side=80, stride=16,
                                      group_by_size=group_by_size)
    kwargs = dict(group_by_size=group_by_size, buckets=buckets, max_objects=3)  # 3: objects get dropped
    expected = _take(_loader(**kwargs), 9)
    inline = _loader(**kwargs)
    _take(inline, 5)
    processes = _loader(num_workers=2, worker_type="process", **kwargs)
    with processes:
        got = [next(processes) for _ in range(5)]
        state = processes.get_state()
        # Counted in the workers and summed here: what this process counts making the same 5 batches.
        assert processes.counters() == inline.counters() and inline.counters()["objects_dropped"] > 0
    _assert_batches_equal(expected[:5], got)
    resumed = _loader(num_workers=2, worker_type="process", **kwargs)
    resumed.set_state(state)
    _assert_batches_equal(expected[5:], _take(resumed, 4))


def test_worker_processes_refuse_a_source_that_does_not_pickle():
    import threading

    class HoldsALock:
        def __init__(self):
            self.lock = threading.Lock()

        def __len__(self):
            return 8

        def __getitem__(self, index):
            raise AssertionError("never read")

    loader = Loader(HoldsALock(), None, batch_size=2, seed=0, max_objects=4, buckets=None, num_workers=2,
                    worker_type="process")
    with loader, pytest.raises(ValueError, match="HoldsALock does not pickle .*use worker_type='thread'"):
        next(loader)
