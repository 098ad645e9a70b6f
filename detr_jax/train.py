"""Training: config -> data -> model -> optimizer -> sharding -> jit step -> loop with checkpoints and logs.

The step is pure (`train_step(state, batch) -> (state, metrics)`); the loop owns everything with side
effects: the loader, orbax checkpoints (with the loader's iterator state, so a resumed run sees exactly
the batches an uninterrupted run would have seen), metrics.jsonl, TensorBoard, periodic evaluation.
"""

import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import socket
import sys
import time
from typing import Any, Callable, Dict, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import PartitionSpec as P

from detr_jax import sharding
from detr_jax.data import SOURCES, Loader, build_source, make_eval_transforms, make_train_transforms, recipe_buckets
from detr_jax.data.loader import WORKER_TYPES
from detr_jax.data.transforms import normalize_images
from detr_jax.losses import BBOX_LOSS_TYPES, encoder_dense_losses, set_criterion
from detr_jax.matcher import CHOICES as MATCHERS
from detr_jax.matcher import hungarian_match, resolve_solver
from detr_jax.models.backbone import BACKBONE_NORMS, FROZEN_COLLECTION, RESNET_SPECS
from detr_jax.models.detr import DETR, POSITION_EMBEDDINGS, parameter_groups

logger = logging.getLogger(__name__)
TrainState = Dict[str, Any]  # {"step", "params", "frozen", "opt_state", "nonfinite_step"}
SCHEDULES = ("step", "cosine", "constant")  # config.optimizer.schedule (`learning_rate_schedule`)


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient became NaN/inf; the parameters were not updated with it."""


class DataError(RuntimeError):
    """A batch could not be made mid-run (an image that became unreadable, a corrupt record, a dead loader worker);
    the message names it and says where the run resumes."""


# ---- building blocks ---------------------------------------------------------------------------------------
def check_config(config: ml_collections.ConfigDict) -> None:
    """Refuse, before any work, values that would fail later or deep inside jax: one ValueError naming the field.
    The allowed values are the constants of the code that uses them."""
    m, d, opt = config.model, config.data, config.optimizer

    def need(ok, field, value, what):
        if not ok:
            raise ValueError(f"config.{field} must be {what}, got {value!r}")

    def either(values):  # ("a", "b", "c") -> "'a', 'b' or 'c'"
        quoted = [repr(v) for v in values]
        return ", ".join(quoted[:-1]) + " or " + quoted[-1]

    def positive(field, value):
        need(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0, field, value, "> 0")

    for field in ("num_classes", "num_queries", "hidden_dim", "num_heads", "num_decoder_layers", "dim_feedforward"):
        positive(f"model.{field}", m[field])
    need(m.num_encoder_layers >= 0, "model.num_encoder_layers", m.num_encoder_layers, ">= 0")
    need(m.hidden_dim % m.num_heads == 0, "model.hidden_dim", m.hidden_dim, f"a multiple of num_heads={m.num_heads}")
    need(m.backbone_depth in RESNET_SPECS, "model.backbone_depth", m.backbone_depth, f"one of {sorted(RESNET_SPECS)}")
    need(m.backbone_norm in BACKBONE_NORMS, "model.backbone_norm", m.backbone_norm, either(BACKBONE_NORMS))
    need(m.position_embedding in POSITION_EMBEDDINGS, "model.position_embedding", m.position_embedding,
         either(POSITION_EMBEDDINGS))
    need(0 <= m.dropout < 1, "model.dropout", m.dropout, "in [0, 1)")
    for field in ("batch_size", "eval_batch_size"):
        positive(field, config[field])
    need(config.num_steps > 0 or config.num_epochs > 0, "num_steps", config.num_steps, "> 0 (or num_epochs > 0)")
    need(d.source in SOURCES, "data.source", d.source, f"one of {SOURCES}")
    need(d.worker_type in WORKER_TYPES, "data.worker_type", d.worker_type, f"one of {WORKER_TYPES}")
    need(d.num_workers >= 0, "data.num_workers", d.num_workers, ">= 0")
    for field in ("max_size", "eval_size", "max_objects", "max_buckets"):
        positive(f"data.{field}", d[field])
    for field in ("train_scales", "crop_resize_scales", "crop_size"):
        need(len(d[field]) > 0 and all(isinstance(v, int) and v > 0 for v in d[field]), f"data.{field}", d[field],
             "a non-empty tuple of positive integers")
    need(d.buckets == "recipe" or (d.buckets and all(len(b) == 2 and min(b) > 0 for b in d.buckets)),
         "data.buckets", d.buckets, "'recipe' or a tuple of (height, width) pairs")
    need(opt.schedule in SCHEDULES, "optimizer.schedule", opt.schedule, either(SCHEDULES))
    need(opt.lr > 0 and opt.lr_backbone >= 0, "optimizer.lr", (opt.lr, opt.lr_backbone),
         "> 0 (and lr_backbone >= 0)")
    need(config.loss.matcher in MATCHERS, "loss.matcher", config.loss.matcher, either(MATCHERS))
    need(config.loss.bbox_loss_type in BBOX_LOSS_TYPES, "loss.bbox_loss_type", config.loss.bbox_loss_type,
         either(BBOX_LOSS_TYPES))


def build_model(config: ml_collections.ConfigDict) -> DETR:
    """The DETR of `config.model` (field names of `DETR`), with bf16 compute if `config.half_precision`."""
    dtype = jnp.bfloat16 if config.get("half_precision", False) else jnp.float32
    return DETR(**config.model.to_dict(), dtype=dtype)


def build_data(config: ml_collections.ConfigDict, split: str, *, train: bool, process_index: int = 0,
               process_count: int = 1, batch_size: Optional[int] = None) -> Loader:
    """The loader of `split` for this process: train augmentation and shuffling when `train`.

    Batches carry uint8 images; the jitted steps normalise them on the device (`normalize_images`).
    """
    d = config.data
    # The split's own kwargs (e.g. its image_dir) override the shared ones.
    source = build_source(d.source, **dict(d.source_kwargs.to_dict(), **d.get(f"{split}_kwargs", {}).to_dict()))
    if train:
        transforms = make_train_transforms(tuple(d.train_scales), d.max_size, tuple(d.crop_resize_scales),
                                           tuple(d.crop_size), normalize_pixels=False)
    else:
        transforms = make_eval_transforms(d.eval_size, d.max_size, normalize_pixels=False)
    global_batch = batch_size or config.batch_size
    if global_batch % process_count:
        raise ValueError(f"batch_size {global_batch} must be divisible by the process count {process_count}")
    # Evaluation groups sizes too: its order does not matter, its padding does (COCO val at batch 64: ~4% padded
    # instead of ~45%, BENCHMARKS.md).
    group_by_size = int(d.group_by_size)
    buckets = d.buckets
    if buckets == "recipe":  # fitted to the simulated output sizes of this pipeline (see data/batching.py)
        buckets = recipe_buckets(transforms, batch_size=global_batch, max_side=d.max_size, group_by_size=group_by_size,
                                 max_buckets=d.max_buckets)
        logger.info("%s buckets for the %s recipe: %s", len(buckets), split, buckets)
    return Loader(source, transforms, global_batch // process_count, seed=config.seed, max_objects=d.max_objects,
                  buckets=[tuple(b) for b in buckets] if buckets else None, shuffle=train,
                  num_workers=d.num_workers, process_index=process_index, process_count=process_count,
                  drop_remainder=train, num_epochs=None if train else 1, group_by_size=group_by_size,
                  worker_type=d.worker_type)


def learning_rate_schedule(base_lr: float, config: ml_collections.ConfigDict, total_steps: int,
                           steps_per_epoch: int) -> optax.Schedule:
    """Step decay (official: x0.1 at `lr_drop_epochs`), or cosine; optional linear warmup in front."""
    opt = config.optimizer
    warmup = int(opt.get("warmup_steps", 0))
    if opt.schedule == "step":
        drop_step = int(opt.lr_drop_epochs * steps_per_epoch)
        main = optax.piecewise_constant_schedule(base_lr, {max(drop_step - warmup, 1): 0.1})
    elif opt.schedule == "cosine":
        main = optax.cosine_decay_schedule(base_lr, max(total_steps - warmup, 1), alpha=opt.get("cosine_alpha", 0.01))
    elif opt.schedule == "constant":
        main = optax.constant_schedule(base_lr)
    else:
        raise ValueError(f"config.optimizer.schedule must be 'step', 'cosine' or 'constant', got {opt.schedule!r}")
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, base_lr, warmup), main], [warmup])


def build_optimizer(config: ml_collections.ConfigDict, params, total_steps: int, steps_per_epoch: int):
    """AdamW with the backbone at its own learning rate, frozen parameters never updated, global-norm clipping.

    Returns (optax transform, {group: schedule}, labels pytree).
    """
    opt = config.optimizer
    labels = parameter_groups(params, train_stem=config.model.get("train_stem", False))
    schedules = {"transformer": learning_rate_schedule(opt.lr, config, total_steps, steps_per_epoch),
                 "backbone": learning_rate_schedule(opt.lr_backbone, config, total_steps, steps_per_epoch)}
    groups = {name: optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=opt.weight_decay)
              for name, schedule in schedules.items()}
    if opt.lr_backbone <= 0:  # the official `lr_backbone=0` means "do not train the backbone"
        groups["backbone"] = optax.set_to_zero()
    groups["frozen"] = optax.set_to_zero()
    # Frozen parameters have no gradient in the official code: zero theirs before the global norm is taken.
    tx = optax.chain(optax.masked(optax.set_to_zero(), jax.tree_util.tree_map(lambda l: l == "frozen", labels)),
                     optax.clip_by_global_norm(opt.grad_clip) if opt.grad_clip > 0 else optax.identity(),
                     optax.multi_transform(groups, labels))
    if opt.get("grad_accum_steps", 1) > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=opt.grad_accum_steps)
    return tx, schedules, labels


def init_state(model: DETR, tx, config: ml_collections.ConfigDict, image_hw: Tuple[int, int]) -> TrainState:
    """Fresh parameters (optionally from pretrained weights named in `config.init`) and optimizer state."""
    x = jnp.zeros((1,) + tuple(image_hw) + (3,), jnp.float32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(config.seed), x)
    variables = load_pretrained(config, model, variables)
    params = variables["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": params, "frozen": variables.get("frozen", {}),
            "opt_state": tx.init(params), "nonfinite_step": jnp.full((), -1, jnp.int32)}


# Parameters an official checkpoint does not have: the class head (re-initialised for other classes) and the
# training-only aids (Group DETR queries, token heads), which start fresh.
# (the stage heads are "stage{i}_proj", "stage{i}_norm", "stage{i}_heads").
TRAINING_ONLY = ("class_embed", "group_query_embed", "enc_heads")


def _training_only(name: str) -> bool:
    return name in TRAINING_ONLY or re.fullmatch(r"stage\d_(proj|norm|heads)", name) is not None


def load_pretrained(config: ml_collections.ConfigDict, model: DETR, variables):
    """Apply `config.init`: a torchvision ImageNet backbone and/or an official DETR checkpoint.

    With `config.init.detr_checkpoint`, everything is loaded except, when `reinit_class_head` (fine-tuning on
    other classes), the class head, which keeps its fresh initialisation.
    """
    from detr_jax import convert  # torch is needed only here, only when weights are named

    init = config.get("init", ml_collections.ConfigDict())
    if init.get("backbone_checkpoint"):
        variables = convert.load_torchvision_backbone(init.backbone_checkpoint, variables, model.backbone_depth)
    if init.get("detr_checkpoint"):
        state_dict = convert.load_torch_state_dict(init.detr_checkpoint)
        if init.get("reinit_class_head", False):
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("class_embed.")}
        loaded = convert.torch_state_dict_to_variables(state_dict)
        ours = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
        theirs = flax.traverse_util.flatten_dict(loaded)
        bad = [k for k in theirs if k not in ours or theirs[k].shape != ours[k].shape]
        missing = [k for k in ours if k not in theirs and not _training_only(k[1])]
        if bad or missing:
            raise ValueError(f"{init.detr_checkpoint} does not match config.model: unexpected or mis-shaped "
                             f"{['/'.join(k) for k in bad][:6]}, missing {['/'.join(k) for k in missing][:6]}")
        ours.update({k: jnp.asarray(v) for k, v in theirs.items()})
        variables = flax.traverse_util.unflatten_dict(ours)
    return variables


# ---- the step ----------------------------------------------------------------------------------------------
def split_query_groups(outputs, targets, groups: int):
    """Group DETR: make each query group its own image, with its own copy of the targets.

    Args:
        outputs: DETR training outputs, "pred_logits" [B, G * N, C + 1], "pred_boxes" [B, G * N, 4] (and the
            same in every "aux_outputs" entry), group by group.
        targets: "labels" [B, M], "boxes" [B, M, 4] cxcywh normalised, "mask" [B, M].
        groups: G.
    Returns:
        (outputs, targets) with batch B * G (row b * G + g is group g of image b) and N queries, so that the
        matcher assigns every group one-to-one on its own and the criterion averages over groups (num_boxes
        counts every copy: the loss has the scale of a single-group DETR's).
    """
    def split(o):
        return {k: v.reshape((v.shape[0] * groups, v.shape[1] // groups) + v.shape[2:]) for k, v in o.items()}

    out = split({k: outputs[k] for k in ("pred_logits", "pred_boxes")})
    if "aux_outputs" in outputs:
        out["aux_outputs"] = [split(o) for o in outputs["aux_outputs"]]
    return out, {k: jnp.repeat(v, groups, axis=0) for k, v in targets.items()}


def make_train_step(model: DETR, tx, config: ml_collections.ConfigDict, mesh) -> Callable:
    """The jit-compiled `train_step(state, batch) -> (state, metrics)`, data parallel over `mesh`.

    The forward, loss, gradient all-reduce and update are one XLA program. With the host matcher
    (`config.loss.matcher`) the Hungarian assignment leaves the device, per device shard (`shard_map`), so each
    host solves the images it holds; with the device matcher nothing leaves the device.
    """
    loss_cfg = config.loss
    costs = dict(cost_class=loss_cfg.cost_class, cost_bbox=loss_cfg.cost_bbox, cost_giou=loss_cfg.cost_giou)
    solver = resolve_solver(loss_cfg.matcher)

    def local_match(pred_logits, pred_boxes, labels, boxes, mask):  # this device's images
        return hungarian_match(pred_logits, pred_boxes, {"labels": labels, "boxes": boxes, "mask": mask}, **costs,
                               solver=solver)

    match = jax.shard_map(local_match, mesh=mesh, in_specs=(P(None, sharding.DATA_AXIS),) * 2 +
                          (P(sharding.DATA_AXIS),) * 3, out_specs=P(None, sharding.DATA_AXIS), check_vma=False)

    # backbone_norm "batch": training updates the running statistics in the "frozen" collection.
    mutable = [FROZEN_COLLECTION] if model.backbone_norm == "batch" else False

    def loss_fn(params, frozen, batch, rng):
        images = normalize_images(batch["images"], batch["pixel_mask"])  # uint8 from the loader
        outputs = model.apply({"params": params, FROZEN_COLLECTION: frozen}, images,
                              pixel_mask=batch["pixel_mask"], train=True, rngs={"dropout": rng}, mutable=mutable)
        outputs, frozen = outputs if mutable else (outputs, {FROZEN_COLLECTION: frozen})
        targets = {"labels": batch["labels"], "boxes": batch["boxes"], "mask": batch["mask"]}
        dense = {suffix: outputs.pop(key) for key, suffix in
                 [("enc_outputs", "enc")] + [(f"stage{i}_outputs", f"s{i}") for i in model.backbone_aux_stages]
                 if key in outputs}
        if model.num_query_groups > 1:
            outputs, targets = split_query_groups(outputs, targets, model.num_query_groups)
        layers = list(outputs.get("aux_outputs", [])) + [outputs]
        indices = match(jnp.stack([o["pred_logits"] for o in layers]), jnp.stack([o["pred_boxes"] for o in layers]),
                        targets["labels"], targets["boxes"], targets["mask"])
        # The loss is computed on the global batch: num_boxes is the global count (the official code's
        # all_reduce(num_boxes) / world_size combined with DDP's gradient averaging gives the same).
        losses = set_criterion(outputs, targets, indices=indices, num_classes=model.num_classes,
                               eos_coef=loss_cfg.eos_coef, bbox_loss_coef=loss_cfg.bbox_loss_coef,
                               giou_loss_coef=loss_cfg.giou_loss_coef, ce_loss_coef=loss_cfg.ce_loss_coef,
                               bbox_loss_type=loss_cfg.bbox_loss_type, **costs)
        for suffix, dense_outputs in dense.items():  # one-to-many token aids: encoder_aux_loss, backbone_aux_stages
            extra = encoder_dense_losses(dense_outputs, batch, num_classes=model.num_classes,
                                         eos_coef=loss_cfg.eos_coef, ce_loss_coef=loss_cfg.ce_loss_coef,
                                         bbox_loss_coef=loss_cfg.bbox_loss_coef, giou_loss_coef=loss_cfg.giou_loss_coef,
                                         name=suffix)
            losses = dict(losses, **extra, loss=losses["loss"] + extra["loss_" + suffix])
        return losses["loss"], (losses, frozen[FROZEN_COLLECTION])

    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), state["step"])
        grads, (losses, frozen) = jax.grad(loss_fn, has_aux=True)(state["params"], state["frozen"], batch, rng)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(losses["loss"]) & jnp.isfinite(grad_norm)
        # A non-finite step leaves the parameters as they were and records the step; the loop stops on it.
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = {"step": state["step"] + 1, "params": keep(params, state["params"]),
                     "frozen": keep(frozen, state["frozen"]), "opt_state": keep(opt_state, state["opt_state"]),
                     "nonfinite_step": jnp.where(finite | (state["nonfinite_step"] >= 0), state["nonfinite_step"],
                                                 state["step"])}
        metrics = dict(losses, grad_norm=grad_norm, num_boxes=batch["mask"].sum())
        return new_state, metrics

    repl = sharding.replicated(mesh)
    return jax.jit(train_step, in_shardings=(repl, sharding.batch_sharded(mesh)), out_shardings=(repl, repl),
                   donate_argnums=(0,))


# ---- checkpoints -------------------------------------------------------------------------------------------
def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(save_interval_steps=config.checkpoint_every,
                                           max_to_keep=config.keep_checkpoints, enable_async_checkpointing=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def model_signature(config: ml_collections.ConfigDict) -> Dict[str, Any]:
    """What a checkpoint must agree on to be resumed: the model architecture."""
    return json.loads(config.model.to_json())


def save_checkpoint(manager, step: int, state: TrainState, loader: Loader, config, force: bool = False,
                    total_steps: Optional[int] = None) -> bool:
    return manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave({"loader": loader.get_state(), "model": model_signature(config), "step": step,
                                "total_steps": total_steps})),
        force=force)


def restore_checkpoint(manager, state: TrainState, config, mesh) -> Tuple[TrainState, Optional[Dict], int]:
    """Resume from the latest checkpoint if there is one; refuses a checkpoint of another model config.

    Returns (state, the checkpoint's meta {"loader", "model", "step", "total_steps"} or None, step)."""
    step = manager.latest_step()
    if step is None:
        return state, None, 0
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if meta["model"] != model_signature(config):
        diff = {k: (meta["model"].get(k), v) for k, v in model_signature(config).items() if meta["model"].get(k) != v}
        raise ValueError(f"the checkpoint in {manager.directory} (step {step}) is of another model config "
                         f"(checkpoint vs config: {diff}); use another --workdir or the matching config")
    repl = sharding.replicated(mesh)
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), state)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    logger.info("resumed from %s at step %d", manager.directory, step)
    return restored, meta, step


# ---- logging -----------------------------------------------------------------------------------------------
class MetricLogger:
    """metrics.jsonl (one line per logged step), TensorBoard event files, and a one-line progress report."""

    def __init__(self, workdir: str, total_steps: int, enabled: bool):
        self.enabled, self.total_steps = enabled, total_steps
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a") if enabled else None
        self._tb = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:
                logger.warning("tensorboardX is not installed: no TensorBoard summaries (metrics.jsonl still written)")

    def write(self, step: int, metrics: Dict[str, float], progress: Optional[str] = None):
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(dict(step=step, **metrics)) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if progress:
            print(progress, flush=True)

    def close(self):
        if self._jsonl:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _progress(step, total, metrics, elapsed, start_step):
    done = step - start_step
    eta = elapsed / max(done, 1) * (total - step)
    width = 20
    bar = "#" * int(width * step / total) + "-" * (width - int(width * step / total))
    return (f"[{bar}] step {step}/{total} loss {metrics['loss']:.4f} (ce {metrics['loss_ce']:.3f} "
            f"l1 {metrics['loss_bbox']:.3f} giou {metrics['loss_giou']:.3f}) {metrics['images_per_sec']:.1f} img/s "
            f"ETA {int(eta // 60)}m{int(eta % 60):02d}s")


def _check_finite(state: TrainState, manager) -> None:
    """Stop on a non-finite loss, naming the step, before anything is logged or saved after it."""
    nonfinite = int(jax.device_get(state["nonfinite_step"]))
    if nonfinite >= 0:
        manager.wait_until_finished()
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {nonfinite + 1}: training stopped and the parameters were not "
            f"updated with it; the last good checkpoint in {manager.directory} is step {manager.latest_step()}. "
            "Lower the learning rate, check the data, or enable gradient clipping.")


def enable_compilation_cache(config: ml_collections.ConfigDict, workdir: str) -> Optional[str]:
    """JAX's persistent compilation cache, so that a restarted run (preemption) does not compile its step shapes
    again: `config.compilation_cache_dir`, "" for <workdir>/jax_cache, "none" for off. A cache directory the
    user set for jax (JAX_COMPILATION_CACHE_DIR) wins. Returns the directory in use (None: off).

    All processes share it: jax writes entries from process 0 only and every process reads them. Programs with a
    host callback are never written (jax's rule): the train step is cached only with the device matcher
    (`config.loss.matcher`).
    """
    user = jax.config.jax_compilation_cache_dir
    if user:
        return user
    path = config.compilation_cache_dir
    if path == "none":
        return None
    path = path or os.path.join(workdir, "jax_cache")
    jax.config.update("jax_compilation_cache_dir", path)
    return path


# ---- the loop ----------------------------------------------------------------------------------------------
class WorkdirInUseError(ValueError):
    """Another live run owns the work directory."""


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Hold <workdir>/.lock (an flock, released by the kernel however the process ends) for the whole run, so that
    a second run started in the same work directory is refused by name instead of writing over the first one's
    checkpoints. Process 0 of a multi-process run holds it for all. Not on object stores (gs://), which have no
    locks."""
    if "://" in workdir or jax.process_index() != 0:
        yield
        return
    path = os.path.join(workdir, ".lock")
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            owner = f.read().strip() or "another process"
            raise WorkdirInUseError(f"{workdir} is in use by the run of {owner}; wait for it, stop it, or use another "
                                    "--workdir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on host {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
    """Train `config` in `workdir`, resuming from its latest checkpoint; returns the final metrics."""
    check_config(config)
    os.makedirs(workdir, exist_ok=True)
    with workdir_lock(workdir):
        return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
    cache_dir = enable_compilation_cache(config, workdir)
    mesh = sharding.make_mesh()
    is_main = jax.process_index() == 0
    train_loader = build_data(config, "train", train=True, process_index=jax.process_index(),
                              process_count=jax.process_count())
    steps_per_epoch = train_loader.batches_per_epoch
    total_steps = int(config.num_steps) if config.get("num_steps") else int(config.num_epochs * steps_per_epoch)
    model = build_model(config)
    sample_hw = (64, 64)  # parameter shapes do not depend on the image size
    tx_holder = {}

    def make_state():
        params_shape = jax.eval_shape(lambda: jax.jit(model.init)(jax.random.PRNGKey(0),
                                                                   jnp.zeros((1,) + sample_hw + (3,))))["params"]
        tx, schedules, _ = build_optimizer(config, params_shape, total_steps, steps_per_epoch)
        tx_holder.update(tx=tx, schedules=schedules)
        return init_state(model, tx, config, sample_hw)

    state = jax.device_put(make_state(), sharding.replicated(mesh))
    tx, schedules = tx_holder["tx"], tx_holder["schedules"]
    manager = checkpoint_manager(workdir, config)
    try:
        state, meta, start_step = restore_checkpoint(manager, state, config, mesh)
    except ValueError:
        manager.close()
        train_loader.close()
        raise
    if meta is not None:
        planned = meta.get("total_steps")
        if start_step >= total_steps:
            manager.close()
            train_loader.close()
            message = (f"the run in {workdir} is already complete ({start_step} of {total_steps} steps): nothing to "
                       "do. Its results are in metrics.jsonl and eval/; raise config.num_steps to train further.")
            if is_main:
                print(message, flush=True)
            return {}
        if planned is not None and planned != total_steps:
            lr = lambda total: float(learning_rate_schedule(config.optimizer.lr, config, total, steps_per_epoch)(
                start_step))
            logger.warning("the checkpoint's run was planned for %d steps, this one for %d: the learning-rate "
                           "schedule follows the new length from step %d on (lr %.3g there instead of %.3g)",
                           planned, total_steps, start_step, lr(total_steps), lr(planned))
        train_loader.set_state(meta["loader"])
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json(indent=2))
        # The work directory describes itself: predict.py needs the class names, not the training data.
        source = train_loader.source
        with open(os.path.join(workdir, "class_names.json"), "w") as f:
            json.dump({"class_names": list(getattr(source, "class_names", [])),
                       "category_ids": [int(c) for c in getattr(source, "category_ids", [])]}, f, indent=1)
        n_params = sum(x.size for x in jax.tree_util.tree_leaves(state["params"]))
        logger.info("DETR with %.2fM parameters; %d devices on %d processes; %d steps (%d per epoch), "
                    "global batch %d; compilation cache %s", n_params / 1e6, jax.device_count(), jax.process_count(),
                    total_steps, steps_per_epoch, config.batch_size, cache_dir or "off")
    train_step = make_train_step(model, tx, config, mesh)
    metric_logger = MetricLogger(workdir, total_steps, is_main)
    evaluator = None
    if config.get("eval_every", 0) or config.get("eval_at_end", True):
        from detr_jax.evaluate import Evaluator
        evaluator = Evaluator(config, model, mesh)

    # Ctrl-C and SIGTERM (preemption) save a checkpoint before exiting.
    # Both only set a flag, so a step is never cut in half (its input state is donated to XLA).
    interrupted = []
    previous_handlers = {sig: signal.signal(sig, lambda signum, _: interrupted.append(signal.Signals(signum).name))
                         for sig in (signal.SIGINT, signal.SIGTERM)}
    seen_shapes = set()
    step, last_metrics, final = start_step, {}, {}
    t_log, images_since_log, t_start = time.time(), 0, time.time()
    real_pixels = all_pixels = 0  # this process's batches since the last row: the padded_fraction metric

    def save_before_leaving():
        """Checkpoint the last completed step unless it is saved already or went non-finite."""
        manager.wait_until_finished()
        if manager.latest_step() != step and int(jax.device_get(state["nonfinite_step"])) < 0:
            save_checkpoint(manager, step, state, train_loader, config, force=True, total_steps=total_steps)
        manager.wait_until_finished()

    try:
        iterator = iter(train_loader)
        while step < total_steps:
            if interrupted:
                raise KeyboardInterrupt(interrupted[0])
            try:
                local = next(iterator)
            except Exception as e:  # pylint: disable=broad-except  (the loader's own error names the record)
                raise DataError(f"the batch of step {step + 1} could not be made: {type(e).__name__}: {e}") from e
            shape = local["images"].shape[1:3]
            if shape not in seen_shapes:
                seen_shapes.add(shape)
                logger.info("compiling the train step for image shape %s (%d shapes so far)", shape, len(seen_shapes))
            real_pixels += int(np.prod(local["size"], axis=1, dtype=np.int64).sum())
            all_pixels += int(np.prod(local["images"].shape[:3], dtype=np.int64))
            batch = sharding.global_batch(local, mesh)
            state, metrics = train_step(state, batch)
            step += 1
            images_since_log += config.batch_size
            if step % config.log_every == 0 or step == total_steps:
                metrics = jax.device_get(metrics)
                _check_finite(state, manager)
                now = time.time()
                last_metrics = {k: float(v) for k, v in metrics.items()}
                last_metrics.update(images_per_sec=images_since_log / (now - t_log), epoch=step / steps_per_epoch,
                                    lr=float(schedules["transformer"](step - 1)),
                                    lr_backbone=float(schedules["backbone"](step - 1)),
                                    padded_fraction=1.0 - real_pixels / max(all_pixels, 1))
                real_pixels = all_pixels = 0
                metric_logger.write(step, last_metrics, _progress(step, total_steps, last_metrics, now - t_start,
                                                                  start_step))
                t_log, images_since_log = now, 0
            if step % config.checkpoint_every == 0 and step != total_steps:
                _check_finite(state, manager)
                save_checkpoint(manager, step, state, train_loader, config, total_steps=total_steps)
            if evaluator is not None and config.get("eval_every", 0) and step % config.eval_every == 0 \
                    and step != total_steps:
                eval_metrics = evaluator.evaluate(state, workdir, step)
                metric_logger.write(step, eval_metrics, "eval " + " ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
                t_log = time.time()
        _check_finite(state, manager)
        if manager.latest_step() != step:  # equal when a finished run is started again: orbax refuses a re-save
            save_checkpoint(manager, step, state, train_loader, config, force=True, total_steps=total_steps)
        manager.wait_until_finished()
        if evaluator is not None and config.get("eval_at_end", True):
            final = evaluator.evaluate(state, workdir, step, draw=True)
            metric_logger.write(step, final, "final eval " + " ".join(f"{k} {v:.4f}" for k, v in final.items()))
    except (jax.errors.JaxRuntimeError, ValueError) as e:
        # A failed collective (gloo reports one as a ValueError with an XLA status): most likely another process
        # died. Say which, and neither hang nor abort.
        if jax.process_count() > 1 and (isinstance(e, jax.errors.JaxRuntimeError)
                                        or str(e).startswith(("UNKNOWN:", "UNAVAILABLE:", "INTERNAL:", "ABORTED:"))):
            _stop_after_losing_a_process(e, manager)
        raise
    except DataError as e:
        # One process alone cannot save (a save is collective): with several, the last periodic checkpoint stands.
        if jax.process_count() == 1:
            save_before_leaving()
        latest = manager.latest_step()
        saved = f"the run resumes from the checkpoint of step {latest}" if latest is not None else "no checkpoint yet"
        raise DataError(f"{e} -- {saved} in {manager.directory}; fix the data (a COCO folder can skip bad images: "
                        "--config.data.source_kwargs.skip_bad_images=True) and start the run again") from e.__cause__
    except KeyboardInterrupt as e:
        logger.warning("interrupted (%s) at step %d: saving a checkpoint before exiting", e or "Ctrl-C", step)
        save_before_leaving()
        raise
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        train_loader.close()
        if evaluator is not None:
            evaluator.loader.close()
        metric_logger.close()
        manager.close()
    summary = dict(last_metrics, **final)
    if is_main:
        print(final_summary(summary, step - start_step, time.time() - t_start, workdir), file=sys.stdout, flush=True)
    return summary


def _stop_after_losing_a_process(error: Exception, manager) -> None:
    """A collective failed in a multi-process run: name the processes the coordination service no longer sees,
    say how to resume, and leave at once. Leaving normally would wait in jax's shutdown barrier for the dead process
    (a minute or more) and then abort with a C++ stack trace."""
    from jax._src import distributed  # pylint: disable=g-import-not-at-top

    everyone = list(range(jax.process_count()))
    lost = []
    try:
        for _ in range(20):  # the service may take a moment to see a killed process go
            live = distributed.global_state.client.get_live_nodes(everyone)
            lost = [i for i in everyone if i not in live]
            if lost:
                break
            time.sleep(0.5)
    except Exception:  # pylint: disable=broad-except  (the service itself may be gone with process 0)
        pass
    who = (f"process {', '.join(map(str, lost))} of {len(everyone)} is gone" if lost
           else "another process of this run has probably died")
    first_line = str(error).strip().splitlines()[0][:300]
    logger.error("%s (this process %d: a collective failed: %s); stopping this process too. Start all %d processes "
                 "again: the run resumes from the checkpoint of step %s in %s", who, jax.process_index(), first_line,
                 len(everyone), manager.latest_step(), manager.directory)
    logging.shutdown()
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)  # pylint: disable=protected-access


def final_summary(summary: Dict[str, float], steps: int, seconds: float, workdir: str) -> str:
    """The few lines a person reads at the end of a run; every metric is in metrics.jsonl and TensorBoard."""
    lines = [f"done: {steps} steps in {seconds / 60:.1f} min"
             + (f" ({summary['images_per_sec']:.1f} img/s at the end)" if "images_per_sec" in summary else "")
             + (f", last loss {summary['loss']:.4f}" if "loss" in summary else "")]
    if "eval_AP" in summary:
        lines.append("eval: " + "  ".join(f"{k[5:]} {summary[k]:.4f}" for k in ("eval_AP", "eval_AP50", "eval_AP75",
                                                                                 "eval_AR100") if k in summary))
    lines.append(f"outputs: {workdir}/ (metrics.jsonl, tensorboard/, checkpoints/, eval/)")
    return "\n".join(lines)
