"""Will a config fit on a TPU slice, and at what batch per chip? Answered by compiling, on a machine without a TPU.

    result = plan(config, "v5e:4x4", batch_per_chip=2)       # experiments/plan.py is the command

libtpu (the `tpu` extra) compiles for any TPU topology it knows (v3, v4, v5e, v5p, v6e) on a CPU host:
`jax.experimental.topologies.get_topology_desc` gives the slice's devices, the run's own train step
(`make_train_step`) and the evaluator's forward are lowered for a `Mesh` of them at the config's largest bucket,
and XLA's `memory_analysis()` / `cost_analysis()` of the compiled programs say what one chip holds and computes.
Static buckets make that a promise: the largest bucket is the largest program the run ever runs, so a plan that
fits never goes out of memory mid-run. The figures are the compiler's, not measured on a TPU. The same compile
answers a CPU run's question against this machine's memory (`compile_checking_host_memory`).

Longer than 400 lines: the topology, the compiles, the largest-batch search and the verdict are one question
(does it fit), read top to bottom.
"""

import contextlib
import copy
import importlib.util
import os
import re
import tempfile
import time
from typing import Dict, Optional, Tuple

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from detr_jax.config import check_config
from detr_jax.data import data_buckets
from detr_jax.data.batching import choose_bucket, collate
from detr_jax.data.transforms import make_eval_transforms, make_train_transforms, normalize_images
from detr_jax.models import build_inference_model, build_training_model
from detr_jax.ops import sharding
from detr_jax.training.state import create_train_state
from detr_jax.training.step import make_train_step

GIB = 2 ** 30
# HBM per chip of each device kind that libtpu names (jax's `device_kind`), from Google Cloud's TPU system
# architecture pages (cloud.google.com/tpu/docs/v3, /v4, /v5e, /v5p, /v6e: "HBM capacity per chip").
HBM_BYTES_PER_CHIP = {
    "TPU v3": 32 * GIB,  # 2 TensorCores of 16 GiB each (each is one jax device)
    "TPU v4": 32 * GIB,
    "TPU v5 lite": 16 * GIB,  # v5e
    "TPU v5": 95 * GIB,  # v5p
    "TPU v6 lite": 32 * GIB,  # v6e (Trillium)
}
MAX_SEARCH_BATCH_PER_CHIP = 1024  # the largest-batch search stops doubling here


class PlanError(ValueError):
    """A plan that cannot be made (libtpu missing, an unknown topology, a batch the chips cannot divide): one line."""


def check_libtpu() -> None:
    if importlib.util.find_spec("libtpu") is None:
        raise PlanError("planning for a TPU compiles with libtpu, which is not installed: pip install -e '.[tpu]' "
                        "(the tpu extra; a CPU run is unchanged by it)")


@contextlib.contextmanager
def _quiet_stderr():
    """libtpu's C++ start-up warns on stderr that this host is no TPU VM (TPU_ACCELERATOR_TYPE, TPU_WORKER_HOSTNAMES):
    true and harmless when compiling for a named topology, so those lines are dropped."""
    fd = 2
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)


def topology_devices(name: str):
    """The devices of TPU topology `name` ("v5e:4x4", "v4:2x2x2", "v5p:2x2x2", "v6e:2x4", "v3:4x4"), compilable
    from this host."""
    check_libtpu()
    # libtpu takes a host-wide lock (/tmp/libtpu_lockfile) so that one process drives the TPU chips; compiling for
    # a named topology drives none, so a plan runs beside a training run or another plan.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        with _quiet_stderr():
            topology = topologies.get_topology_desc(topology_name=name, platform="tpu")
    except Exception as e:  # pylint: disable=broad-except  (libtpu's INVALID_ARGUMENT for a name it does not know)
        raise PlanError(f"--topology={name!r} is not a TPU topology libtpu knows ({str(e).splitlines()[0][:160]}): "
                        "use GENERATION:SHAPE, e.g. v5e:2x2, v5e:4x4, v4:2x2x2, v5p:2x2x2, v6e:2x4 "
                        "(v3, v4, v5e, v5p and v6e)") from None
    devices = list(topology.devices)
    kind = devices[0].device_kind
    if kind not in HBM_BYTES_PER_CHIP:
        raise PlanError(f"--topology={name!r} has devices of kind {kind!r}, whose memory per chip this planner does "
                        f"not know ({sorted(HBM_BYTES_PER_CHIP)})")
    return devices


def largest_bucket(config: ml_collections.ConfigDict, train: bool) -> Tuple[int, int]:
    """The largest padded (H, W) a run of `config` gives a batch (by area): its largest static bucket, the shape of
    the largest program it compiles (the same buckets as `data.build_data`)."""
    d = config.data
    if train:
        transforms = make_train_transforms(tuple(d.train_scales), d.max_size, tuple(d.crop_resize_scales),
                                           tuple(d.crop_size), normalize_pixels=False)
        batch = config.batch_size
    else:
        transforms = make_eval_transforms(d.eval_size, d.max_size, normalize_pixels=False)
        batch = config.eval_batch_size
    buckets = data_buckets(config, transforms, batch)
    if not buckets:  # no buckets: every batch pads to its own maximum, at most the pipeline's largest output
        side = max(d.max_size, max(d.train_scales) if train else d.eval_size)
        return choose_bucket(side, side, None)
    return tuple(max((tuple(b) for b in buckets), key=lambda b: (b[0] * b[1], b)))


def abstract_batch(config: ml_collections.ConfigDict, batch_size: int, bucket: Tuple[int, int]) -> Dict:
    """ShapeDtypeStructs of a collated batch of `batch_size` at `bucket` (what `batching.collate` gives), with the
    panoptic targets when config.panoptic.enabled."""
    h, w = bucket
    target = {"boxes": np.asarray([[0.5, 0.5, 0.2, 0.2]], np.float32), "labels": np.zeros(1, np.int32),
              "image_id": 0, "orig_size": (h, w), "size": (h, w)}
    if config.panoptic.enabled:
        target["masks"] = np.ones((1, 8, 8), bool)
        if config.panoptic.mask_loss_points:
            target["mask_points"] = np.zeros((config.panoptic.mask_loss_points, 2), np.float32)
    one = collate([(np.zeros((8, 8, 3), np.uint8), target)], config.data.max_objects, buckets=[bucket],
                  min_size=bucket)
    return {k: jax.ShapeDtypeStruct((batch_size,) + v.shape[1:], v.dtype) for k, v in one.items()}


def compiled_peak_bytes(compiled) -> int:
    """Peak bytes one device holds while running `compiled`: arguments + outputs - aliased (donated) + temporaries."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


_OUT_OF_MEMORY = re.compile(r"memory required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM "
                            r"\(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def _compile(lowered) -> Dict:
    """Compile for the topology: "peak_bytes" and "flops" per device and "compile_s"; a program that does not fit
    the chip is refused by the TPU compiler itself (RESOURCE_EXHAUSTED), which reports only the temporaries it
    needs: then "peak_bytes" is those (a lower bound), "flops" None and "out_of_memory" the compiler's line."""
    start = time.time()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        found = _OUT_OF_MEMORY.search(str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or found is None:
            raise
        need = float(found.group(1)) * _UNITS[found.group(2)]
        return {"peak_bytes": int(need), "flops": None, "compile_s": time.time() - start,
                "out_of_memory": str(e).strip().splitlines()[0]}
    return {"peak_bytes": compiled_peak_bytes(compiled), "flops": _flops(compiled), "compile_s": time.time() - start,
            "out_of_memory": None}


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def check_plan_config(config: ml_collections.ConfigDict) -> None:
    """`config.check_config` for a plan, in place: a plan reads no weights, so the panoptic mask-head stage
    (`panoptic.freeze_detr`) needs no `init.detr_checkpoint` (a placeholder is set, never read)."""
    if config.panoptic.enabled and config.panoptic.freeze_detr and not config.init.detr_checkpoint:
        config.init.detr_checkpoint = "(not read: a plan compiles, it loads no weights)"
    check_config(config)


def _planning_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config without its initial weights (reading checkpoints changes no shape) and without a compilation
    cache (compiling for a TPU topology writes nothing on this host)."""
    config = copy.deepcopy(config)
    config.init.update(backbone_checkpoint="", detr_checkpoint="")
    return config


def compile_train_step(config: ml_collections.ConfigDict, mesh: Mesh, global_batch: int,
                       bucket: Tuple[int, int]) -> Dict:
    """Compile the run's train step for `mesh` at `global_batch` x `bucket`; per device: "peak_bytes", "flops"
    (forward + backward + update), "compile_s" and "out_of_memory" (see `_compile`)."""
    config = _planning_config(config)
    model = build_training_model(config)
    held = {}

    def state_only():
        state, tx, _ = create_train_state(config, model, total_steps=1000, steps_per_epoch=100)
        held["tx"] = tx
        return state

    state = jax.eval_shape(state_only)
    step = make_train_step(model, held["tx"], config, mesh)
    return _compile(step.lower(state, abstract_batch(config, global_batch, bucket)))


def compile_eval_step(config: ml_collections.ConfigDict, mesh: Mesh, global_batch: int,
                      bucket: Tuple[int, int]) -> Dict:
    """Compile the evaluator's forward (the inference model, padding-invariant as config.eval_padding_invariant)
    for `mesh` at `global_batch` x `bucket`; per device: "peak_bytes", "flops", "compile_s", "out_of_memory"."""
    config = _planning_config(config)
    model = build_inference_model(config)
    if config.eval_padding_invariant:
        model = model.with_detector(padding_invariant=True)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jax.numpy.zeros((1, 64, 64, 3))))
    repl, sharded = sharding.replicated(mesh), sharding.batch_sharded(mesh)

    def forward(variables, images, pixel_mask):
        return model.apply(variables, normalize_images(images, pixel_mask), pixel_mask=pixel_mask)

    batch = abstract_batch(config, global_batch, bucket)
    step = jax.jit(forward, in_shardings=(repl, sharded, sharded), out_shardings=sharded)
    return _compile(step.lower(variables, batch["images"], batch["pixel_mask"]))


HOST_MEMORY_ENV = "DETR_JAX_HOST_MEMORY_GIB"  # plan a CPU run for a machine with this much memory instead


def host_memory_bytes() -> int:
    """The memory a CPU run may use: $DETR_JAX_HOST_MEMORY_GIB, else the kernel's MemAvailable (free memory plus
    what the page cache can give back)."""
    if os.environ.get(HOST_MEMORY_ENV):
        return int(float(os.environ[HOST_MEMORY_ENV]) * GIB)
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def check_host_memory(peak_bytes: int, available_bytes: int, bucket: Tuple[int, int], batch_size: int) -> None:
    """Refuse, before training, a CPU run whose train step at its largest bucket needs more memory than the machine
    has (it would be killed mid-run, at the first batch of that bucket); a peak equal to the memory is allowed."""
    if peak_bytes > available_bytes:
        raise ValueError(
            f"the train step at the largest bucket ({bucket[0]}x{bucket[1]}, batch {batch_size}) needs "
            f"{peak_bytes / GIB:.1f} GiB of memory but this machine has {available_bytes / GIB:.1f} GiB available: "
            "the run would be killed when that bucket comes. Fit it with smaller images (--config.data.max_size, "
            "--config.data.train_scales and --config.data.eval_size), a smaller --config.batch_size, "
            "--config.grad_accum_steps=K or --config.model.remat=full (experiments/plan.py measures a config)")


def compile_checking_host_memory(train_step, state, config: ml_collections.ConfigDict) -> Dict:
    """On CPUs: compile the run's train step for its largest bucket now and refuse, in one line, a run that would
    not fit in this machine's memory (`check_host_memory`). Returns {(H, W): the compiled step}, which the loop runs
    for batches of that shape, so the check compiles nothing twice; {} on accelerators."""
    if jax.devices()[0].platform != "cpu":
        return {}
    bucket = largest_bucket(config, train=True)
    compiled = train_step.lower(state, abstract_batch(config, config.batch_size, bucket)).compile()
    check_host_memory(compiled_peak_bytes(compiled) * jax.local_device_count(), host_memory_bytes(), bucket,
                      config.batch_size)
    return {tuple(bucket): compiled}


def _per_chip(flops: Optional[float], devices_per_chip: int) -> Optional[float]:
    return None if flops is None else flops * devices_per_chip


def fits(train_peak_bytes: int, eval_peak_bytes: int, hbm_bytes: int) -> bool:
    """Both programs fit in a chip's memory: a peak equal to the memory fits."""
    return max(train_peak_bytes, eval_peak_bytes) <= hbm_bytes


def plan(config: ml_collections.ConfigDict, topology: str, batch_per_chip: Optional[int] = None,
         search: bool = False, hbm_bytes: Optional[int] = None) -> Dict:
    """Compile `config`'s train and eval steps for `topology` and say whether they fit, per chip.

    Args:
      topology: a libtpu topology name ("v5e:4x4").
      batch_per_chip: images per chip per step (the global batch is that x chips); None: config.batch_size
        split over the chips. Evaluation runs at the same batch per chip.
      search: also find the largest batch per chip whose train step fits, by compiling (`largest_batch_per_chip`:
        predicted from the peaks compiled so far, then the bracket closed by compiling both sides), in steps of
        what the chip's devices (and micro-batches) divide.
      hbm_bytes: the memory of one chip (default: HBM_BYTES_PER_CHIP of the device kind).
    Returns:
      a dict: "topology", "device_kind", "chips", "hosts", "devices_per_chip", "batch_per_chip", "global_batch",
      "bucket" and "eval_bucket" ([H, W]), "dtype", "remat", "grad_accum_steps", "train_peak_bytes",
      "eval_peak_bytes" (per chip; a program the compiler refused as too large: the temporaries it reported,
      a lower bound), "hbm_bytes", "fits", "train_flops", "eval_flops" (per chip per step; None when refused),
      "compile_s" (train + eval), "out_of_memory" (the compiler's refusal, else None), "largest_batch_per_chip"
      (None without `search`), "search_peaks" ({batch per chip: train peak bytes per chip} of every batch the
      search compiled; a refused one at HBM + 1), "figures" ("compiled for TPU, not run").
    """
    devices = topology_devices(topology)
    kind = devices[0].device_kind
    chips = len({tuple(d.coords) for d in devices})
    per_chip = len(devices) // chips
    hosts = len({d.process_index for d in devices})
    accum = config.grad_accum_steps
    unit = per_chip * accum  # a batch per chip must split evenly over the chip's devices and the micro-batches
    if batch_per_chip is None:
        if config.batch_size % (chips * unit):
            raise PlanError(f"config.batch_size={config.batch_size} cannot be split evenly over the {chips} chips "
                            f"of {topology}" + (f" ({per_chip} devices each)" if per_chip > 1 else "")
                            + (f" in {accum} micro-batches" if accum > 1 else "")
                            + ": pass --batch_per_chip N (a global batch of N x chips) or another --config.batch_size")
        batch_per_chip = config.batch_size // chips
    if batch_per_chip <= 0 or batch_per_chip % unit:
        raise PlanError(f"--batch_per_chip={batch_per_chip} must be a positive multiple of {unit} on {topology} ("
                        f"{per_chip} device(s) per chip" + (f" x {accum} micro-batches" if accum > 1 else "") + ")")
    hbm = int(hbm_bytes or HBM_BYTES_PER_CHIP[kind])
    mesh = Mesh(np.asarray(devices), (sharding.DATA_AXIS,))
    bucket, eval_bucket = largest_bucket(config, train=True), largest_bucket(config, train=False)

    def train_at(b):
        return compile_train_step(config, mesh, b * chips, bucket)

    train = train_at(batch_per_chip)
    evaluation = compile_eval_step(config, mesh, batch_per_chip * chips, eval_bucket)
    result = {
        "topology": topology, "device_kind": kind, "chips": chips, "hosts": hosts, "devices_per_chip": per_chip,
        "batch_per_chip": batch_per_chip, "global_batch": batch_per_chip * chips, "bucket": list(bucket),
        "eval_bucket": list(eval_bucket), "dtype": "bfloat16" if config.half_precision else "float32",
        "remat": config.model.remat, "grad_accum_steps": accum,
        "train_peak_bytes": train["peak_bytes"] * per_chip, "eval_peak_bytes": evaluation["peak_bytes"] * per_chip,
        # XLA's cost analysis counts a loop's body once: the accumulation loop runs it `accum` times (the update
        # outside it, counted `accum` times too, is ~1e-3 of a step).
        "hbm_bytes": hbm, "train_flops": _per_chip(train["flops"] and train["flops"] * accum, per_chip),
        "eval_flops": _per_chip(evaluation["flops"], per_chip),
        "compile_s": round(train["compile_s"] + evaluation["compile_s"], 1),
        "out_of_memory": train["out_of_memory"] or evaluation["out_of_memory"],
        "largest_batch_per_chip": None, "search_peaks": None, "figures": "compiled for TPU, not run"}
    result["fits"] = not result["out_of_memory"] and fits(result["train_peak_bytes"], result["eval_peak_bytes"], hbm)
    if search:
        def peak_at(b):  # a train step the compiler refuses does not fit, whatever its lower bound says
            compiled = train_at(b)
            peak = compiled["peak_bytes"] * per_chip
            return max(peak, hbm + 1) if compiled["out_of_memory"] else peak

        known = max(result["train_peak_bytes"], hbm + 1) if train["out_of_memory"] else result["train_peak_bytes"]
        peaks = {batch_per_chip: known}
        result["largest_batch_per_chip"] = largest_batch_per_chip(peak_at, batch_per_chip, unit, hbm, known=peaks)
        result["search_peaks"] = {b: peaks[b] for b in sorted(peaks)}
    return result


def largest_batch_per_chip(peak_at, start: int, unit: int, hbm_bytes: int,
                           known: Optional[Dict[int, int]] = None) -> int:
    """The largest multiple of `unit` whose train step fits, `peak_at(batch)` being its compiled peak bytes per chip
    (0 if not even `unit` fits; at most MAX_SEARCH_BATCH_PER_CHIP).

    Compiles are minutes each, so the search predicts before it probes: the peak grows about linearly with the batch
    (activations; the parameters and optimizer state stay), so the line through the last two probes says where it
    crosses `hbm_bytes`; probing there and one step above closes the bracket [largest that fits, smallest that does
    not] in ~4 compiles. A wrong prediction only costs probes: the next candidate is always strictly inside the
    bracket (the midpoint when the line says nothing new), so the search ends with the exact boundary, assuming
    only that a batch fits whenever a larger one does. `known`: {batch: peak} already compiled, filled in place with
    every probe."""
    peaks = known if known is not None else {}  # filled in place: the caller sees every probe

    def peak(b):
        if b not in peaks:
            peaks[b] = peak_at(b)
        return peaks[b]

    low, high = 0, MAX_SEARCH_BATCH_PER_CHIP + unit  # low fits (0: nothing yet), high does not (or is past the cap)
    candidate = start
    while high - low > unit:
        candidate = min(max(candidate, low + unit), high - unit) // unit * unit
        if candidate <= low:
            candidate = low + unit
        if peak(candidate) <= hbm_bytes:
            low = candidate
        else:
            high = candidate
        probed = sorted(peaks)
        if len(probed) >= 2:  # the line through the two probes nearest the bracket
            (b0, b1) = sorted(probed, key=lambda b: abs(b - candidate))[:2] if len(probed) > 2 else probed
            slope = (peaks[b1] - peaks[b0]) / (b1 - b0) if b1 != b0 else 0.0
            predicted = b0 + (hbm_bytes - peaks[b0]) / slope if slope > 0 else high
            # The predicted boundary, then one step above it: the two probes that close the bracket.
            candidate = int(predicted) // unit * unit
            if candidate == low:
                candidate = low + unit
        else:
            candidate = candidate * 2 if low == candidate else candidate // 2
        if not low < candidate < high:
            candidate = (low + high) // 2
    return low


def advice(result: Dict) -> str:
    """What would make a plan that does not fit fit: remat, a smaller batch per chip, bfloat16."""
    ways = []
    if result["remat"] != "full":
        ways.append("--config.model.remat=full")
    largest = result.get("largest_batch_per_chip")
    if largest:
        ways.append(f"--batch_per_chip={largest} (the largest that fits)")
    elif result["batch_per_chip"] > result["devices_per_chip"] * result["grad_accum_steps"]:
        ways.append("a smaller --batch_per_chip (--search_batch finds the largest)")
    if result["batch_per_chip"] > result["devices_per_chip"]:
        ways.append("--config.grad_accum_steps=K (the same global batch in K micro-batches)")
    if result["dtype"] == "float32":
        ways.append("--config.half_precision=True (bfloat16)")
    return ", ".join(ways) if ways else "a chip with more memory"


def summary(result: Dict) -> str:
    """The table and the verdict line that experiments/plan.py prints."""
    gib = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    rows = [
        ("topology", f"{result['topology']}: {result['chips']} chips ({result['device_kind']}, "
                     f"{result['devices_per_chip']} device(s) each) on {result['hosts']} host(s)"),
        ("batch", f"{result['batch_per_chip']} per chip, {result['global_batch']} global"
                  + (f", {result['grad_accum_steps']} micro-batches" if result["grad_accum_steps"] > 1 else "")),
        ("largest bucket", f"train {result['bucket'][0]}x{result['bucket'][1]}, "
                           f"eval {result['eval_bucket'][0]}x{result['eval_bucket'][1]}"),
        ("dtype / remat", f"{result['dtype']} / {result['remat']}"),
        ("train step peak", f"{gib(result['train_peak_bytes'])} per chip of {gib(result['hbm_bytes'])}"),
        ("eval step peak", f"{gib(result['eval_peak_bytes'])} per chip"),
        ("train TFLOP", "- (refused: out of memory)" if result["train_flops"] is None else
         f"{result['train_flops'] / 1e12:.3f} per chip per step "
         f"({result['train_flops'] / 1e12 / max(result['batch_per_chip'], 1):.3f} per image)"),
        ("compile", f"{result['compile_s']:.0f} s on this host"),
    ]
    if result["largest_batch_per_chip"] is not None:
        rows.append(("largest batch", f"{result['largest_batch_per_chip']} per chip (train step, by compiling)"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if result["out_of_memory"]:
        lines.append(f"(the TPU compiler refused a program: {result['out_of_memory']})")
    lines.append("(figures compiled for TPU by XLA on this host, not run on a TPU)")
    if result["fits"]:
        lines.append(f"FITS: {result['topology']} trains this config at {result['batch_per_chip']} images per chip "
                     f"(peak {gib(max(result['train_peak_bytes'], result['eval_peak_bytes']))} of "
                     f"{gib(result['hbm_bytes'])})")
    else:
        at_least = "at least " if result["out_of_memory"] else ""
        lines.append(f"DOES NOT FIT: {result['topology']} at {result['batch_per_chip']} images per chip needs "
                     f"{at_least}{gib(max(result['train_peak_bytes'], result['eval_peak_bytes']))} of "
                     f"{gib(result['hbm_bytes'])} per chip; try {advice(result)}")
    return "\n".join(lines)
