"""The loader's worker processes (`Loader(worker_type="process")`): grain's `mp_prefetch` over global batch numbers,
batches handed over in shared memory and released when the pipeline closes, and workers that end with their parent.

What a batch is (its order, bucket and augmentation draws) is the Loader's (`loader.py`): a worker only calls
`Loader.make_batch(epoch, position)` on its pickled copy, so any number of workers gives the same batches.
"""

import atexit
import copy
import functools
import gc
import logging
import os
import threading
import time
import weakref

PARENT_POLL_S = 0.5  # how often a worker process checks that the process that started it is still there


def start(loader, first: int):
    """grain: a map over global batch numbers (epoch * batches_per_epoch + position) from `first`, each mapped to
    its batch by a worker process of `loader`; `mp_prefetch` gives worker w the numbers w, w + k, ... and yields them
    back in order. Returns the iterator of ((epoch, position), batch in shared memory, counters)."""
    import cloudpickle  # pylint: disable=g-import-not-at-top  (grain's serializer, one of its dependencies)
    import grain  # pylint: disable=g-import-not-at-top

    _mark_absl_flags_parsed()  # grain reads its absl flags; outside app.run nobody parsed them
    stop = loader.num_epochs * loader.batches_per_epoch if loader.num_epochs is not None else first + 2 ** 40
    job = _BatchJob(loader)
    try:
        cloudpickle.dumps(job)  # what grain sends to each worker; fail here with a readable line
    except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f"worker_type='process' sends the source and transforms to worker processes, but "
                         f"{type(loader.source).__name__} does not pickle ({type(e).__name__}: {e}); make it "
                         "picklable or use worker_type='thread'") from None
    dataset = grain.MapDataset.range(first, stop).map(job)
    # One batch at a time inside a worker: the parallelism is across workers.
    dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=loader.num_workers,
                                                               per_worker_buffer_size=loader.prefetch),
                                  worker_init_fn=functools.partial(_init_worker, os.getpid()))
    iterator = iter(dataset)
    _OPEN_PROCESS_LOADERS.add(loader)  # closed at exit if nobody did: see `_close_open_loaders`
    atexit.unregister(_close_open_loaders)  # atexit runs the last registered first: before grain's own
    atexit.register(_close_open_loaders)
    return iterator


_OPEN_PROCESS_LOADERS = weakref.WeakSet()  # loaders whose grain worker processes are running


def release_shared_memory() -> None:
    """Unlink the shared-memory blocks of a closed grain pipeline now, not at interpreter exit.

    Batches the workers had handed over but nobody took (prefetched) are unlinked when grain's arrays over them
    are deleted, by a one-thread pool (`SharedMemoryArray.enable_async_del`). Collect them and wait for that
    pool: a run that then exits leaves nothing in /dev/shm and no "N leaked shared_memory objects" warning."""
    gc.collect()
    try:
        from grain._src.python.ipc.shared_memory_array import SharedMemoryArray  # pylint: disable=g-import-not-at-top
    except ImportError:
        return
    pool = getattr(SharedMemoryArray, "_del_thread_pool", None)
    if pool is not None:
        try:
            pool.apply(int)  # one worker thread, requests in order: when this one ran, every earlier one had
        except Exception:  # pylint: disable=broad-except  (a pool already shut down at exit: nothing to wait for)
            pass


def _close_open_loaders() -> None:
    """Close the process loaders still open at exit, before the interpreter tears down grain's modules (their
    `__del__` then fails half-way and leaves the prefetched batches' shared memory behind)."""
    for loader in list(_OPEN_PROCESS_LOADERS):
        try:
            loader.close()
        except Exception:  # pylint: disable=broad-except
            logging.getLogger(__name__).warning("could not close a data loader at exit", exc_info=True)


def forget(loader) -> None:
    """`loader`'s worker processes are closed: nothing to close at exit."""
    _OPEN_PROCESS_LOADERS.discard(loader)


class _BatchJob:
    """In a worker process: global batch number -> ((epoch, position), batch, counters counted making it)."""

    def __init__(self, loader):
        self.loader = copy.copy(loader)  # pickled without threads (Loader.__getstate__)

    def __call__(self, number: int):
        loader = self.loader
        epoch, position = divmod(int(number), loader.batches_per_epoch)
        before = loader._own_counters()  # pylint: disable=protected-access
        batch = loader.make_batch(epoch, position)
        after = loader._own_counters()  # pylint: disable=protected-access
        counters = {k: int(v) - int(before.get(k, 0)) for k, v in after.items() if v != before.get(k, 0)}
        return (epoch, position), batch, counters


def _init_worker(parent_pid: int, worker_index: int, worker_count: int) -> None:
    """Spawned grain workers: end with `parent_pid`; absl flags parsed (libraries read them outside app.run);
    quiet TensorFlow."""
    del worker_index, worker_count
    _exit_with_parent(parent_pid)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _mark_absl_flags_parsed()


def _exit_with_parent(parent_pid: int, poll_s: float = PARENT_POLL_S) -> None:
    """Ends this worker process within `poll_s` of its parent's end, however the parent ends.

    grain stops its workers only from the parent (`close()`, or a finalizer at a normal exit). A parent killed
    with SIGKILL (or by the out-of-memory killer) runs neither: its workers, re-parented to init, fill their
    buffers and then wait on them forever (~260 MB each), and keep the multiprocessing resource tracker alive
    with them, so the shared-memory blocks and semaphores it would release stay in /dev/shm too. Once the
    workers are gone the tracker sees its pipe close, releases what the run left in /dev/shm and exits. (A kill
    of the whole process group takes the tracker along: the blocks in flight then stay in /dev/shm.)

    A daemon thread compares `os.getppid()` with `parent_pid` every `poll_s` seconds: a parent that has died
    has re-parented this process, whatever killed it. Its first check runs at once, so a parent that died
    before the worker got here is noticed too. `prctl(PR_SET_PDEATHSIG)` would not do: the signal follows the
    thread that started the process, not the process, and grain starts its workers from one of its prefetch
    threads. No per-batch cost: the thread sleeps in between.

    Args:
      parent_pid: the pid of the process that started this worker (taken there, before the start).
      poll_s: seconds between two checks.
    """
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)  # pylint: disable=protected-access  (no clean-up left to do: nobody reads this worker's queue)

    threading.Thread(target=watch, name="detr_loader_exit_with_parent", daemon=True).start()


def _mark_absl_flags_parsed() -> None:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
