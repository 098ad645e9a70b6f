"""A deterministic, resumable batch loader: source -> transforms (threads or worker processes) -> padded batches.

Determinism: the order of epoch e is a permutation drawn from (seed, e), and example i's augmentation draws
from a generator seeded with (seed, e, i). A batch is therefore a function of (seed, epoch, position) alone,
whatever the number of workers or processes, and a run resumed from `get_state()` sees exactly the batches
an uninterrupted run would have seen.

Multi-process: each step has one global batch of `batch_size * process_count` examples; process p takes
rows [p * batch_size, (p + 1) * batch_size). All processes must feed one jit step with the same shape, so
the bucket is chosen from the sizes of the whole global batch: each process predicts them without decoding
other processes' images, from `source.image_size(index)` and the transforms' `output_size` with the same
per-example generator.

Workers: threads (`worker_type="thread"`, one example per job, GIL-bound beyond a few cores) or processes
(`worker_type="process"`, one whole batch per job, through grain's `mp_prefetch`: spawned workers, batches
handed over in shared memory, round-robin so the order is the workers' order). Either way a batch is a pure
function of (seed, epoch, position), so every worker type and count gives the same batches. A worker process ends
by itself within a poll of the process that started it dying, SIGKILL included. The worker-process plumbing
(grain's `mp_prefetch`, shared memory, the parent watch) is `worker_processes.py`; the ordering, bucketing, state
and counting that the determinism above rests on are here, the same for every worker type.
"""

import collections
import concurrent.futures
import logging
import math
import queue
import threading
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from detr_jax.data import batching, worker_processes
from detr_jax.data.transforms import Normalize

logger = logging.getLogger(__name__)

# Random streams are seeded with 4 words [seed, epoch, index or 0, stream tag]. The tag keeps them apart:
# SeedSequence pads short entropy with zeros, so [seed, epoch] and [seed, epoch, 0] would be the same stream.
_ORDER, _GROUPING, _EXAMPLE = 1, 2, 3
WORKER_TYPES = ("thread", "process")


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Loader:
    """Iterates padded batches (format: `detr_jax.data.batching`), forever or for `num_epochs` epochs.

    Args:
      source: `len(source)` and `source[i]` -> example dict ("image" uint8 [H, W, 3], "boxes" xyxy absolute,
        "labels", "image_id", "orig_size", ...); `source.image_size(i)` -> (h, w), if present, lets processes
        agree on the bucket without reading each other's images.
      transforms: `transforms(image, target, rng) -> (image, target)` ending in Normalize (boxes cxcywh
        normalised); None means Normalize only. `output_size(size_hw, rng)` is used for the bucket prediction.
      batch_size: examples per batch on this process.
      seed: seeds the epoch orders and every example's augmentation.
      max_objects: M, target rows per image; extra objects are dropped, counted and logged.
      buckets: static (H, W) pad shapes (see `batching.recipe_buckets`); None pads to each batch's size
        rounded up to 32 (dynamic shapes; single-process only).
      shuffle: permute each epoch (False: source order, e.g. for evaluation).
      num_workers: threads or processes running source + transforms; 0 runs everything in the calling thread.
      worker_type: "thread" (a thread pool, one example per job) or "process" (grain worker processes, one
        batch per job; the source and transforms must pickle).
      prefetch: batches prepared ahead of the consumer (threads: at most 2 * prefetch batches held in memory;
        processes: `prefetch` per worker).
      process_index, process_count: this process's slice of every global batch (every process holds the whole
        source and reads only its slice).
      drop_remainder: drop the last incomplete global batch; False pads it with padding examples
        (image_id -1, all masks False), so evaluation sees every image exactly once.
      num_epochs: stop after this many epochs; None iterates forever.
      group_by_size: if > 0, batch images of similar predicted output shape together within pools of this many
        global batches (`batching.size_grouped_order`; fit the buckets with the same value). Cuts padding a lot
        for global batches > 1 (COCO recipe, batch 64, 12 buckets: ~62% -> ~23% padded, pool 32). Needs
        `source.image_size`.
    """

    def __init__(self, source, transforms: Optional[Callable], batch_size: int, seed: int, max_objects: int,
                 buckets: Optional[Sequence[Tuple[int, int]]], shuffle: bool = True, num_workers: int = 2,
                 prefetch: int = 2, process_index: int = 0, process_count: int = 1, drop_remainder: bool = True,
                 num_epochs: Optional[int] = None, group_by_size: int = 0, worker_type: str = "thread"):
        if batch_size < 1 or max_objects < 1:
            raise ValueError(f"batch_size and max_objects must be >= 1, got {batch_size}, {max_objects}")
        if worker_type not in WORKER_TYPES:
            raise ValueError(f"worker_type must be one of {WORKER_TYPES}, got {worker_type!r}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
        if buckets is None and process_count > 1:
            raise ValueError("buckets=None gives each process its own batch shape; pass static buckets with "
                             "process_count > 1 (see batching.recipe_buckets)")
        self.source = source
        self.transforms = transforms if transforms is not None else Normalize()
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.max_objects = int(max_objects)
        self.buckets = None if buckets is None else [tuple(int(v) for v in b) for b in buckets]
        self.shuffle = shuffle
        self.num_workers = int(num_workers)
        self.worker_type = worker_type
        self.prefetch = max(1, int(prefetch))
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.drop_remainder = drop_remainder
        self.num_epochs = num_epochs
        self.global_batch_size = self.batch_size * self.process_count
        n = len(source)
        self.batches_per_epoch = (n // self.global_batch_size if drop_remainder
                                  else math.ceil(n / self.global_batch_size))
        if self.batches_per_epoch == 0:
            raise ValueError(f"the source has {n} examples, fewer than one global batch of {self.global_batch_size} "
                             "with drop_remainder=True")
        self._predict_sizes = hasattr(source, "image_size") and hasattr(self.transforms, "output_size")
        if process_count > 1 and not self._predict_sizes:
            logger.info("source has no image_size(): every batch is padded to the largest bucket %s so that all "
                        "processes agree on the shape", max(self.buckets, key=lambda b: b[0] * b[1]))
        self.group_by_size = int(group_by_size)
        if self.group_by_size and not self._predict_sizes:
            raise ValueError("group_by_size needs a source with image_size(index) and transforms with output_size(); "
                             "set group_by_size=0")
        self._orders = {}  # epoch -> order, the last two epochs (the producer may run one epoch ahead)
        self._orders_lock = threading.Lock()
        self.stats = batching.BatchStats()
        self._epoch, self._position = 0, 0
        self._pool = None
        self._thread = None
        self._queue = None
        self._stop = None
        self._grain_iter = None
        self._worker_counters: Dict[str, int] = {}  # what worker processes counted, summed from their batches

    # ---- determinism --------------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> np.ndarray:
        """int64 [len(source)]: the source indices of `epoch` in order, a function of (seed, epoch) only."""
        with self._orders_lock:
            order = self._orders.get(epoch)
            if order is None:
                order = self._compute_order(epoch)
                self._orders[epoch] = order
                if len(self._orders) > 2:
                    del self._orders[min(self._orders)]
            return order

    def _compute_order(self, epoch: int) -> np.ndarray:
        n = len(self.source)
        order = np.random.default_rng([self.seed, epoch, 0, _ORDER]).permutation(n) if self.shuffle else np.arange(n)
        if self.group_by_size:
            sizes = np.asarray([self._predicted_size(epoch, i) for i in order], np.int64)
            rng = np.random.default_rng([self.seed, epoch, 0, _GROUPING])
            order = order[batching.size_grouped_order(sizes, self.global_batch_size, self.group_by_size, rng)]
        return order

    def example_rng(self, epoch: int, index: int) -> np.random.Generator:
        """The augmentation generator of source example `index` in `epoch`."""
        return np.random.default_rng([self.seed, epoch, int(index), _EXAMPLE])

    def global_indices(self, epoch: int, position: int) -> np.ndarray:
        """Source indices of the global batch at (epoch, position); shorter than global_batch_size only for the
        last batch with drop_remainder=False."""
        start = position * self.global_batch_size
        return self.epoch_order(epoch)[start:start + self.global_batch_size]

    def _predicted_size(self, epoch: int, index: int):
        """(h, w) example `index` will have after the transforms, without reading it."""
        return self.transforms.output_size(tuple(self.source.image_size(index)), self.example_rng(epoch, index))

    def counters(self) -> Dict[str, int]:
        """What the data layer dropped or changed so far: the source's `stats` (crowd / zero-area boxes, bad
        images) and batching's (objects over max_objects, batches outside the buckets). Prefetching counts
        batches before they are consumed."""
        counters = self._own_counters()
        for k, v in self._worker_counters.items():
            counters[k] = counters.get(k, 0) + v
        return counters

    def _own_counters(self) -> Dict[str, int]:
        """What this process (or, in a worker process, that worker) counted itself."""
        return {**getattr(self.source, "stats", {}), **self.stats.as_dict()}

    # ---- state --------------------------------------------------------------------------------------------
    def get_state(self) -> Dict[str, int]:
        """{"epoch", "position"} of the next batch this iterator returns."""
        return {"epoch": self._epoch, "position": self._position}

    def set_state(self, state: Dict[str, int]) -> None:
        """Continue from a `get_state()` result; prefetched batches are discarded."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.batches_per_epoch:
            raise ValueError(f"state {state} is out of range: position must be in [0, {self.batches_per_epoch})")
        self._stop_producer()
        self._epoch, self._position = epoch, position

    # ---- batches ------------------------------------------------------------------------------------------
    def _load_example(self, epoch: int, index: int):
        example = dict(self.source[int(index)])
        image = example.pop("image")
        return self.transforms(image, example, self.example_rng(epoch, index))

    def _plan(self, epoch: int, position: int):
        """(local indices, min_size) of a batch; min_size is the global batch's predicted max (h, w)."""
        indices = self.global_indices(epoch, position)
        first = self.process_index * self.batch_size
        local = indices[first:first + self.batch_size]
        min_size = None
        if self._predict_sizes and self.buckets is not None:
            sizes = [self._predicted_size(epoch, i) for i in indices]
            min_size = tuple(int(v) for v in np.max(sizes, axis=0))
        elif self.process_count > 1:
            min_size = max(self.buckets, key=lambda b: b[0] * b[1])
        return local, min_size

    def _collate(self, examples, min_size):
        return batching.collate(examples, self.max_objects, self.buckets, self.batch_size, min_size,
                                stats=self.stats)

    def make_batch(self, epoch: int, position: int) -> Dict[str, np.ndarray]:
        """This process's batch at (epoch, position), computed in the calling thread."""
        local, min_size = self._plan(epoch, position)
        return self._collate([self._load_example(epoch, i) for i in local], min_size)

    def _advance(self, epoch: int, position: int):
        position += 1
        if position == self.batches_per_epoch:
            epoch, position = epoch + 1, 0
        return epoch, position

    def _finished(self, epoch: int) -> bool:
        return self.num_epochs is not None and epoch >= self.num_epochs

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        if self._finished(self._epoch):
            self._stop_producer()  # workers (threads or processes) are not left idle behind a finished pass
            raise StopIteration
        if self.num_workers == 0:
            batch = self.make_batch(self._epoch, self._position)
        elif self.worker_type == "process":
            if self._grain_iter is None:
                self._start_processes()
            (epoch, position), shared, counters = next(self._grain_iter)
            # Out of grain's shared memory into plain arrays: the shared block is released now, not whenever
            # (or, at interpreter exit, never) the last reference to it goes.
            batch = {k: np.array(v) for k, v in shared.items()}
            del shared
            assert (epoch, position) == (self._epoch, self._position), "loader pipeline out of order"
            for k, v in counters.items():
                self._worker_counters[k] = self._worker_counters.get(k, 0) + v
        else:
            if self._thread is None:
                self._start_producer()
            item = self._queue.get()
            if isinstance(item, _Failure):
                self._stop_producer()
                raise item.error
            (epoch, position), batch = item
            assert (epoch, position) == (self._epoch, self._position), "loader pipeline out of order"
        self._epoch, self._position = self._advance(self._epoch, self._position)
        return batch

    # ---- background pipeline ------------------------------------------------------------------------------
    def _start_producer(self):
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.num_workers, thread_name_prefix="detr_loader")
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._produce, args=(self._epoch, self._position, self._stop,
                                                                    self._queue, self._pool),
                                        name="detr_loader_collate", daemon=True)
        self._thread.start()

    def _produce(self, epoch, position, stop, out_queue, pool):
        """Producer thread: keeps `prefetch` batches of example jobs submitted, collates them in order."""
        def put(item):
            while not stop.is_set():
                try:
                    out_queue.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        pending = collections.deque()
        cursor = (epoch, position)
        try:
            while not stop.is_set():
                while len(pending) < self.prefetch and not self._finished(cursor[0]):
                    local, min_size = self._plan(*cursor)
                    futures = [pool.submit(self._load_example, cursor[0], i) for i in local]
                    pending.append((cursor, futures, min_size))
                    cursor = self._advance(*cursor)
                if not pending:
                    return
                where, futures, min_size = pending.popleft()
                batch = self._collate([f.result() for f in futures], min_size)
                if not put((where, batch)):
                    return
        except BaseException as e:  # handed to the consumer, raised by __next__
            if not stop.is_set():
                put(_Failure(e))
        finally:
            for _, futures, _ in pending:
                for f in futures:
                    f.cancel()

    def _start_processes(self):
        """Worker processes (grain), from the current batch on: `worker_processes.start`."""
        self._grain_iter = worker_processes.start(self, self._epoch * self.batches_per_epoch + self._position)

    def _stop_producer(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self._thread = self._queue = self._stop = None
        if self._grain_iter is not None:
            close = getattr(self._grain_iter, "close", None)
            if close is not None:
                close()
            self._grain_iter = None
            worker_processes.release_shared_memory()
        worker_processes.forget(self)

    def __getstate__(self):
        """What a worker process needs to make batches: no threads, queues or iterators."""
        state = dict(self.__dict__)
        state.update(_pool=None, _thread=None, _queue=None, _stop=None, _grain_iter=None, _orders={},
                     _orders_lock=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._orders_lock = threading.Lock()

    def close(self) -> None:
        """Stop the background threads (also done on leaving a `with` block)."""
        self._stop_producer()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            if self._stop is not None:
                self._stop.set()
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
            if self._grain_iter is not None and hasattr(self._grain_iter, "close"):
                self._grain_iter.close()
        except Exception:  # interpreter shutdown
            pass
