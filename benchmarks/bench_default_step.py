"""Where a step of the default run (`experiments/configs/default.py`) spends its time on this CPU, what the config's
XLA flags buy, and what splitting its batch over the host's cores as devices would.

  python benchmarks/bench_default_step.py                                  # ~12 min on 2 idle cores
  python benchmarks/bench_default_step.py --rounds 1 --steps 2 --flag-rounds 1 --no-append   # CPU-path check

The process runs as the default run's does (`set_process_defaults`: XLA flags, glibc malloc options; the config's
`xla_flags` unless --without-config-xla-flags) with one simulated CPU device per core
(`--xla_force_host_platform_device_count`), so that in one process the same step runs on a mesh of 1 device (what
`experiments/train.py` runs) and of every core. All on one fixed, augmented batch of the default run's loader (8
images, 128x128), from the same initial state:

0. The config's `xla_flags` against detr_jax's default flags alone: the 1-device step in child processes (XLA reads
   its flags once per process), alternating, `--flag-rounds` per side; and 3 steps' losses of the two.
1. The step and its parts, by difference, timed in alternating rounds (`--rounds` rounds of `--steps` steps of
   each variant, the order reversed every other round; medians): the whole step; the forward and loss alone (no
   gradient, no update); without the training aids' token heads (`encoder_aux_loss`, `backbone_aux_stages`);
   with 1 query group instead of 3; with the stem and stage 1 frozen (`train_stem=False`); the parameter EMA on.
2. Outside the step: the host side of the matcher's callback (scipy on the step's [L, B * G, N, M] costs), the
   optimizer update alone (jitted on the parameter tree), the loader alone (images/s from its threads) and one of
   the run's evaluations.
3. The step on a mesh of every core (data parallel, one device per core): its time against the 1-device step in
   the same rounds, and 3 steps' losses, gradient norms and parameter updates against the 1-device step's from the
   same initial state (the same computation but for the split: they agree to float32 reduction order).
"""

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from detr_jax.ops.xla_flags import add_xla_flags, set_process_defaults  # noqa: E402 (no jax import)

set_process_defaults()  # before jax is imported (it reads JAX_PLATFORMS then)

from experiments.configs import default as default_config  # noqa: E402 (imports jax, does not start its backend)

CHILD = "--child" in sys.argv
if "--without-config-xla-flags" not in sys.argv:  # as experiments/train.py does with the config's xla_flags
    add_xla_flags(default_config.get_config().xla_flags)
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
if not CHILD:
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={CORES}"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from benchmarks import report  # noqa: E402
from benchmarks.train_runs import alternate, cpu_pressure, median_wall  # noqa: E402
from detr_jax.criterion import Criterion  # noqa: E402
from detr_jax.criterion import matcher as matcher_lib  # noqa: E402
from detr_jax.data import build_data  # noqa: E402
from detr_jax.data.transforms import normalize_images  # noqa: E402
from detr_jax.models import build_training_model  # noqa: E402
from detr_jax.models.backbone import FROZEN_COLLECTION  # noqa: E402
from detr_jax.ops import sharding  # noqa: E402
from detr_jax.training import step as step_lib  # noqa: E402
from detr_jax.training.state import create_train_state  # noqa: E402

PARITY_STEPS = 3


def variant_configs():
    """{name: config} of the step variants of part 1 (the default config, one change each)."""
    def make(**changes):
        config = default_config.get_config()
        for dotted, value in changes.items():
            *parents, leaf = dotted.split("__")
            node = config
            for p in parents:
                node = node[p]
            node[leaf] = value
        return config
    return {"default step": make(),
            "no token heads": make(training_aids__encoder_aux_loss=False, training_aids__backbone_aux_stages=()),
            "1 query group": make(training_aids__num_query_groups=1),
            "stem and stage 1 frozen": make(model__train_stem=False),
            "EMA on": make(ema__decay=0.998, ema__warmup_steps=200)}


class Side:
    """One variant's jitted step, its state (rolled forward by each call) and the fixed batch, on `mesh`."""

    def __init__(self, config, mesh, local_batch):
        self.model = build_training_model(config)
        state, self.tx, _ = create_train_state(config, self.model, total_steps=config.num_steps, steps_per_epoch=1)
        self.initial = jax.device_get(state)
        self.mesh = mesh
        self.state = jax.device_put(self.initial, sharding.replicated(mesh))
        self.batch = sharding.global_batch(local_batch, mesh)
        self.step = step_lib.make_train_step(self.model, self.tx, config, mesh)
        self.config = config

    def __call__(self):
        self.state, metrics = self.step(self.state, self.batch)
        jax.block_until_ready(metrics)

    def run_from(self, initial, steps):
        """([metrics of each step], params after the last) of `steps` steps from `initial` (a host copy of a
        state)."""
        state, rows = jax.device_put(initial, sharding.replicated(self.mesh)), []
        for _ in range(steps):
            state, metrics = self.step(state, self.batch)
            rows.append(jax.device_get(metrics))
        return rows, jax.device_get(state["params"])


def forward_loss(side):
    """A call of the forward and the loss alone (train mode, no gradient, no update) of `side`'s model."""
    model, config = side.model, side.config
    criterion = Criterion.from_config(config, model, side.mesh)

    @jax.jit
    def loss(params, frozen, batch):
        images = normalize_images(batch["images"], batch["pixel_mask"])
        (outputs, aids), _ = model.apply({"params": params, FROZEN_COLLECTION: frozen}, images,
                                         pixel_mask=batch["pixel_mask"], train=True,
                                         rngs={"dropout": jax.random.PRNGKey(0)}, mutable=[FROZEN_COLLECTION])
        return criterion(outputs, batch, aids)[0]

    return lambda: jax.block_until_ready(loss(side.state["params"], side.state["frozen"], side.batch))


def optimizer_alone(side):
    """A call of the optimizer update alone on `side`'s parameter tree (gradients of ones)."""
    import optax
    tx = side.tx

    @functools.partial(jax.jit, donate_argnums=(0, 1))  # as the step, which donates its state
    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params = jax.tree_util.tree_map(jax.numpy.array, side.initial["params"])
    grads = jax.tree_util.tree_map(lambda p: np.full(p.shape, 1e-3, p.dtype), params)
    holder = {"params": params, "opt": tx.init(params)}

    def call():
        holder["params"], holder["opt"] = update(holder["params"], holder["opt"], grads)
        jax.block_until_ready(holder["params"])
    return call


def host_matching_seconds(config, local_batch, repeats=20):
    """Median seconds of the matcher callback's host side (`_assign_on_host`) on costs of the step's shape:
    [decoder layers, images x query groups, queries, target slots], the batch's own target masks."""
    layers, groups = config.model.num_decoder_layers, config.training_aids.num_query_groups
    mask = np.repeat(local_batch["mask"], groups, axis=0)  # [B * G, M]
    costs = np.random.default_rng(0).random((layers, mask.shape[0], config.model.num_queries, mask.shape[1]),
                                            dtype=np.float32)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        matcher_lib._assign_on_host(costs, mask)  # pylint: disable=protected-access
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def loader_images_per_second(config, batches=60):
    """The train loader alone (its worker threads, augmentation, uint8 collation): images/s after 5 batches."""
    loader = build_data(config, "train", train=True)
    with loader:
        it = iter(loader)
        for _ in range(5):
            next(it)
        t = time.perf_counter()
        for _ in range(batches):
            next(it)
        return batches * config.batch_size / (time.perf_counter() - t)


def evaluation_seconds(side, out_dir):
    """Seconds of one evaluation as the loop makes it every `eval_every` steps (the validation split's 200 images:
    forward, post-processing, COCO scoring), after one to compile; the initial parameters (a model that detects
    little: scoring costs more once it finds objects)."""
    from detr_jax.evaluation import build_evaluator
    from detr_jax.weights.workdir import detector_variables

    evaluator = build_evaluator(side.config, side.model.model, side.mesh)
    variables = detector_variables(side.initial["params"], side.initial["frozen"])
    try:
        evaluator.evaluate(variables, out_dir, 0, draw=False)
        t = time.perf_counter()
        evaluator.evaluate(variables, out_dir, 1, draw=False)
        return time.perf_counter() - t
    finally:
        evaluator.close()


def child_main(args):
    """One side of the XLA-flag comparison, in its own process (XLA reads its flags once): the default step's
    median seconds over `args.steps` steps after PARITY_STEPS from the initial state, whose losses it prints too."""
    config = default_config.get_config()
    mesh = Mesh(np.asarray(jax.devices()[:1]), (sharding.DATA_AXIS,))
    loader = build_data(config, "train", train=True)
    with loader:
        local_batch = next(iter(loader))
    side = Side(config, mesh, local_batch)
    rows, _ = side.run_from(side.initial, PARITY_STEPS)  # compiles too
    times = [timed(side) for _ in range(args.steps)]
    print("CHILD_RESULT " + json.dumps({"seconds": statistics.median(times),
                                        "losses": [{k: float(v) for k, v in r.items()} for r in rows]}))


def compare_config_xla_flags(rounds, steps):
    """(seconds without, seconds with, max relative loss difference): the default step in child processes without
    and with the default config's xla_flags, alternating, `rounds` each; medians over rounds."""
    results = {False: [], True: []}
    for r in range(rounds):
        for with_flags in ((False, True) if r % 2 == 0 else (True, False)):
            command = [sys.executable, os.path.abspath(__file__), "--child", "--steps", str(steps)]
            if not with_flags:
                command.append("--without-config-xla-flags")
            env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
            out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
            results[with_flags].append(json.loads(out.split("CHILD_RESULT ", 1)[1]))
    seconds = {side: statistics.median(r["seconds"] for r in rows) for side, rows in results.items()}
    ref, new = results[False][0]["losses"], results[True][0]["losses"]
    return seconds[False], seconds[True], loss_differences(new, ref)


def loss_differences(rows, reference):
    """(step 1, all steps): the max relative difference of the losses and the gradient norm between two runs'
    metrics rows. Step 1 compares the forward and the gradient at the same parameters; later steps also carry the
    earlier steps' rounding, which training from scratch (batch-norm statistics) amplifies."""
    keys = [k for k in reference[0] if k.startswith("loss") or k == "grad_norm"]
    per_step = [max(relative_difference(row[k], ref[k]) for k in keys) for row, ref in zip(rows, reference)]
    return per_step[0], max(per_step)


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def relative_difference(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))
                 / max(float(np.max(np.abs(np.asarray(b, np.float64)))), 1e-30))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    p.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    p.add_argument("--flag-rounds", type=int, default=4, help="alternating child processes per side for the "
                   "config's XLA flags (0: skip that part)")
    p.add_argument("--no-append", action="store_true", help="print only, do not append to BENCHMARKS.md")
    p.add_argument("--without-config-xla-flags", action="store_true", help="this process without the default "
                   "config's xla_flags (read before argparse runs)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child_main(args)
    flag_rows = compare_config_xla_flags(args.flag_rounds, 4 * args.steps) if args.flag_rounds else None

    configs = variant_configs()
    base = configs["default step"]
    loader = build_data(base, "train", train=True)
    with loader:
        local_batch = next(iter(loader))
    one, every = (Mesh(np.asarray(jax.devices()[:n]), (sharding.DATA_AXIS,)) for n in (1, CORES))
    t = time.perf_counter()
    sides = {name: Side(config, one, local_batch) for name, config in configs.items()}
    sides[f"default step, {CORES} devices"] = Side(base, every, local_batch)
    calls = dict(sides)
    calls["forward + loss only"] = forward_loss(sides["default step"])
    calls["optimizer update alone"] = optimizer_alone(sides["default step"])
    for call in calls.values():  # compile
        call()
    setup_s = time.perf_counter() - t
    timings = {name: median_wall(times) for name, times in alternate(calls, args.rounds, args.steps).items()}

    # The data-parallel step against the 1-device step: PARITY_STEPS steps from the same initial state (the first
    # Adam update is about lr * sign(gradient), so the later steps are the ones that compare the gradients).
    initial = sides["default step"].initial
    ref_rows, ref_params = sides["default step"].run_from(initial, PARITY_STEPS)
    dp_rows, dp_params = sides[f"default step, {CORES} devices"].run_from(initial, PARITY_STEPS)
    loss_diff = loss_differences(dp_rows, ref_rows)
    flat = lambda t: jax.tree_util.tree_leaves(t)  # noqa: E731
    moved = [(np.asarray(d) - i, np.asarray(r) - i)
             for d, r, i in zip(flat(dp_params), flat(ref_params), flat(initial["params"]))]
    update_diff = (np.sqrt(sum(float(np.sum((d - r) ** 2)) for d, r in moved))
                   / np.sqrt(sum(float(np.sum(r ** 2)) for _, r in moved)))

    matching_s = host_matching_seconds(base, local_batch)
    loader_rate = loader_images_per_second(base)
    with tempfile.TemporaryDirectory() as out_dir:
        eval_s = evaluation_seconds(sides["default step"], out_dir)

    step_s = timings["default step"]
    images = base.batch_size
    lines = [f"Machine: {report.machine()}{cpu_pressure()}; jax {jax.__version__}; {CORES} CPU devices in this process "
             f"(the 1-device rows use the first). Default config, one augmented batch of {images} images "
             f"({'x'.join(map(str, local_batch['images'].shape[1:3]))}), {args.rounds} alternating rounds of "
             f"{args.steps} steps, medians; set-up and compiles {setup_s:.0f} s.", "",
             "| what | s per step | images/s | vs the default step |", "|---|---|---|---|"]
    for name, seconds in timings.items():
        lines.append(f"| {name} | {seconds:.3f} | {images / seconds:.1f} | {seconds / step_s:.2f}x |")
    lines += ["", "| outside the step | value |", "|---|---|",
              f"| matcher callback, host side (scipy, {base.model.num_decoder_layers} layers x "
              f"{images * base.training_aids.num_query_groups} images) | {matching_s * 1e3:.1f} ms per step "
              f"({100 * matching_s / step_s:.1f}% of the step) |",
              f"| loader alone (threads: {base.data.num_workers}) | {loader_rate:.0f} images/s |",
              f"| one evaluation ({base.data.val_kwargs.num_examples} validation images, initial parameters) | "
              f"{eval_s:.1f} s (= {eval_s / step_s:.0f} steps) |",
              f"| {CORES} devices vs 1: losses and gradient norm, max relative difference at step 1 / over "
              f"{PARITY_STEPS} steps | {loss_diff[0]:.2e} / {loss_diff[1]:.2e} |",
              f"| {CORES} devices vs 1: the {PARITY_STEPS} steps' update of all parameters, relative difference "
              f"(norm) | {update_diff:.2e} |",
              f"| {CORES} devices vs 1: images/s ratio | {step_s / timings[f'default step, {CORES} devices']:.3f}x |"]
    config_flags = base.xla_flags or "(none)"
    lines[0] += (f" XLA flags of the config ({config_flags}): "
                 f"{'not used' if args.without_config_xla_flags else 'used'} in this table.")
    if flag_rows:
        without, with_flags, diff = flag_rows
        lines += ["", f"The default config's `xla_flags` ({config_flags}), the 1-device default step in "
                  f"{args.flag_rounds} alternating child processes per side, {4 * args.steps} timed steps each:", "",
                  "| XLA flags | s per step | images/s |", "|---|---|---|",
                  f"| detr_jax's defaults only | {without:.3f} | {images / without:.1f} |",
                  f"| + the config's | {with_flags:.3f} | {images / with_flags:.1f} |",
                  f"| ratio (images/s) | {without / with_flags:.3f}x | |",
                  f"| losses and gradient norm from the same initial state, max relative difference at step 1 / "
                  f"over {PARITY_STEPS} steps | {diff[0]:.2e} / {diff[1]:.2e} | |"]
    report.publish("\n".join(lines), "The default run's step on this CPU: its parts, and its batch split over the "
                   "cores", append=not args.no_append)


if __name__ == "__main__":
    main()
