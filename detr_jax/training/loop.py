"""Training: config -> data -> model -> optimizer -> sharding -> jit step -> loop with checkpoints and logs.

The step is pure (`train_step(state, batch) -> (state, metrics)`); the loop owns everything with side
effects: the loader, orbax checkpoints (with the loader's iterator state, so a resumed run sees exactly
the batches an uninterrupted run would have seen), metrics.jsonl, TensorBoard, periodic evaluation.
"""

import json
import logging
import os
import signal
import sys
import time
from typing import Callable, Dict

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from detr_jax.config import check_config
from detr_jax.criterion.mask_losses import mask_losses
from detr_jax.criterion.matcher import hungarian_match, resolve_solver
from detr_jax.criterion.set_losses import encoder_dense_losses, set_criterion
from detr_jax.data import build_data, build_source
from detr_jax.data.transforms import normalize_images
from detr_jax.evaluation.coco import Evaluator
from detr_jax.evaluation.panoptic import PanopticEvaluator
from detr_jax.models.aids import DETRWithAids, build_training_model, detector_variables, split_query_groups
from detr_jax.models.backbone import FROZEN_COLLECTION
from detr_jax.ops import sharding
from detr_jax.training.checkpoints import (
    checkpoint_manager,
    load_workdir_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from detr_jax.training.state import TrainState, create_train_state, learning_rate_schedule
from detr_jax.training.workdir import MetricLogger, enable_compilation_cache, final_summary, progress_line, workdir_lock

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient became NaN/inf; the parameters were not updated with it."""


class DataError(RuntimeError):
    """A batch could not be made mid-run (an image that became unreadable, a corrupt record, a dead loader worker);
    the message names it and says where the run resumes."""


# ---- the step ----------------------------------------------------------------------------------------------
def make_train_step(model: DETRWithAids, tx, config: ml_collections.ConfigDict, mesh) -> Callable:
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
    mutable = [FROZEN_COLLECTION] if model.detector.backbone_norm == "batch" else False
    num_classes = model.detector.num_classes
    panoptic = config.panoptic

    def loss_fn(params, frozen, batch, rng):
        images = normalize_images(batch["images"], batch["pixel_mask"])  # uint8 from the loader
        outputs = model.apply({"params": params, FROZEN_COLLECTION: frozen}, images,
                              pixel_mask=batch["pixel_mask"], train=True, rngs={"dropout": rng}, mutable=mutable)
        (outputs, aids), frozen = outputs if mutable else (outputs, {FROZEN_COLLECTION: frozen})
        targets = {"labels": batch["labels"], "boxes": batch["boxes"], "mask": batch["mask"]}
        outputs, targets = split_query_groups(outputs, targets, model.num_query_groups)
        layers = list(outputs.get("aux_outputs", [])) + [outputs]
        indices = match(jnp.stack([o["pred_logits"] for o in layers]), jnp.stack([o["pred_boxes"] for o in layers]),
                        targets["labels"], targets["boxes"], targets["mask"])
        # The loss is computed on the global batch: num_boxes is the global count (the official code's
        # all_reduce(num_boxes) / world_size combined with DDP's gradient averaging gives the same).
        losses = set_criterion(outputs, targets, indices=indices, num_classes=num_classes,
                               eos_coef=loss_cfg.eos_coef, bbox_loss_coef=loss_cfg.bbox_loss_coef,
                               giou_loss_coef=loss_cfg.giou_loss_coef, ce_loss_coef=loss_cfg.ce_loss_coef,
                               bbox_loss_type=loss_cfg.bbox_loss_type, **costs)
        if "pred_masks" in outputs:  # panoptic: the official mask losses, on the main output's matches only
            masks = mask_losses(outputs["pred_masks"], batch["target_masks"], targets["mask"], indices[-1],
                                targets["mask"].sum(), points=batch.get("mask_points"),
                                image_size=batch["pixel_mask"].shape[1:])
            losses = dict(losses, **masks, loss=losses["loss"] + panoptic.mask_loss_coef * masks["loss_mask"]
                          + panoptic.dice_loss_coef * masks["loss_dice"])
        for suffix, dense_outputs in aids.items():  # the one-to-many token aids, each named by DETRWithAids
            extra = encoder_dense_losses(dense_outputs, batch, num_classes=num_classes,
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



def _check_finite(state: TrainState, manager) -> None:
    """Stop on a non-finite loss, naming the step, before anything is logged or saved after it."""
    nonfinite = int(jax.device_get(state["nonfinite_step"]))
    if nonfinite >= 0:
        manager.wait_until_finished()
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {nonfinite + 1}: training stopped and the parameters were not "
            f"updated with it; the last good checkpoint in {manager.directory} is step {manager.latest_step()}. "
            "Lower the learning rate, check the data, or enable gradient clipping.")


# ---- the loop ----------------------------------------------------------------------------------------------
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
    total_steps = int(config.num_steps) if config.num_steps else int(config.num_epochs * steps_per_epoch)
    model = build_training_model(config)
    pretrained = None  # init.detr_checkpoint may name a detr_jax work directory (the panoptic recipe's box model)
    if config.init.detr_checkpoint and os.path.isdir(config.init.detr_checkpoint):
        _, _, pretrained = load_workdir_checkpoint(config.init.detr_checkpoint)
    state, tx, schedules = create_train_state(config, model, total_steps, steps_per_epoch,
                                              pretrained_detector=pretrained)
    state = jax.device_put(state, sharding.replicated(mesh))
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
            names = {"class_names": list(getattr(source, "class_names", [])),
                     "category_ids": [int(c) for c in getattr(source, "category_ids", [])]}
            if getattr(source, "is_thing", None) is not None:  # panoptic: things and stuff
                names["is_thing"] = [bool(t) for t in source.is_thing]
            json.dump(names, f, indent=1)
        n_params = sum(x.size for x in jax.tree_util.tree_leaves(state["params"]))
        logger.info("DETR with %.2fM parameters; %d devices on %d processes; %d steps (%d per epoch), "
                    "global batch %d; compilation cache %s", n_params / 1e6, jax.device_count(), jax.process_count(),
                    total_steps, steps_per_epoch, config.batch_size, cache_dir or "off")
    train_step = make_train_step(model, tx, config, mesh)
    metric_logger = MetricLogger(workdir, total_steps, is_main)
    evaluator = None
    if config.eval_every or config.eval_at_end:  # the model without the aids, which are training-only
        if config.panoptic.enabled:
            d = config.data
            val_source = build_source(d.source, **dict(d.source_kwargs.to_dict(), **d.val_kwargs.to_dict()))
            evaluator = PanopticEvaluator.from_config(config, val_source, model.model, mesh,
                                                      threshold=config.panoptic.threshold,
                                                      segm=config.panoptic.eval_segm)
        else:
            evaluator = Evaluator(config, model.model, mesh)

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
                metric_logger.write(step, last_metrics, progress_line(step, total_steps, last_metrics, now - t_start,
                                                                  start_step))
                t_log, images_since_log = now, 0
            if step % config.checkpoint_every == 0 and step != total_steps:
                _check_finite(state, manager)
                save_checkpoint(manager, step, state, train_loader, config, total_steps=total_steps)
            if evaluator is not None and config.eval_every and step % config.eval_every == 0 \
                    and step != total_steps:
                eval_metrics = _evaluate(evaluator, state, workdir, step)
                metric_logger.write(step, eval_metrics,
                                    "eval " + " ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
                t_log = time.time()
        _check_finite(state, manager)
        if manager.latest_step() != step:  # equal when a finished run is started again: orbax refuses a re-save
            save_checkpoint(manager, step, state, train_loader, config, force=True, total_steps=total_steps)
        manager.wait_until_finished()
        if evaluator is not None and config.eval_at_end:
            final = _evaluate(evaluator, state, workdir, step, draw=True)
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


def _evaluate(evaluator, state: TrainState, workdir: str, step: int, draw: bool = False) -> Dict[str, float]:
    """The evaluation metrics of `state`'s detector ("eval_AP" ... or, panoptic, "eval_PQ" ...)."""
    variables = detector_variables(state["params"], state["frozen"])
    if isinstance(evaluator, PanopticEvaluator):
        metrics = evaluator.evaluate(variables)
        logged = ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "segm_AP", "segm_AP50", "bbox_AP", "bbox_AP50")
        return {f"eval_{k}": v for k, v in metrics.items() if k in logged}
    return evaluator.evaluate(variables, workdir, step, draw=draw)


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
