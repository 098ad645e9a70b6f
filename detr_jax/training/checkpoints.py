"""Orbax checkpoints of a training run: the train state with the loader's position, resumable exactly. (Reading a
work directory's detector for evaluation and inference: `weights.workdir`.)"""

import json
import logging
import os
from typing import Any, Dict, Optional, Tuple

import jax
import ml_collections
import orbax.checkpoint as ocp

from detr_jax.data.loader import Loader
from detr_jax.ops import sharding
from detr_jax.training.state import TrainState

logger = logging.getLogger(__name__)


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(save_interval_steps=config.checkpoint_every,
                                           max_to_keep=config.keep_checkpoints, enable_async_checkpointing=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def model_signature(config: ml_collections.ConfigDict) -> Dict[str, Any]:
    """What a checkpoint must agree on to be resumed: the model architecture, its training aids and whether it has
    the panoptic mask head (all of them parameters). Not model.remat: it changes what the backward pass keeps, not
    a parameter, so a run may resume with another (e.g. on a smaller slice)."""
    model = {k: v for k, v in json.loads(config.model.to_json()).items() if k != "remat"}
    return dict(model, training_aids=json.loads(config.training_aids.to_json()),
                masks=bool(config.panoptic.enabled))


def save_checkpoint(manager, step: int, state: TrainState, loader: Loader, config, force: bool = False,
                    total_steps: Optional[int] = None) -> bool:
    return manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave({"loader": loader.get_state(), "model": model_signature(config), "step": step,
                                "total_steps": total_steps, "ema": "ema" in state})),
        force=force)


def restore_checkpoint(manager, state: TrainState, config, mesh) -> Tuple[TrainState, Optional[Dict], int]:
    """Resume from the latest checkpoint if there is one; refuses a checkpoint of another model config.

    The parameters' EMA (config.ema) may be turned on or off between starts: a checkpoint without one starts it at
    its parameters, and one that has it while config.ema.decay is 0 drops it (each said in a warning).
    Returns (state, the checkpoint's meta {"loader", "model", "step", "total_steps", "ema"} or None, step)."""
    step = manager.latest_step()
    if step is None:
        return state, None, 0
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if meta["model"] != model_signature(config):
        diff = {k: (meta["model"].get(k), v) for k, v in model_signature(config).items() if meta["model"].get(k) != v}
        raise ValueError(f"the checkpoint in {manager.directory} (step {step}) is of another model config "
                         f"(checkpoint vs config: {diff}); use another --workdir or the matching config")
    repl = sharding.replicated(mesh)
    saved_ema, want_ema = bool(meta.get("ema", False)), "ema" in state  # .get: checkpoints older than the EMA
    template = {k: v for k, v in state.items() if k != "ema"}
    if saved_ema:
        template["ema"] = {"params": state["params"], "frozen": state["frozen"]}
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), template)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    if want_ema and not saved_ema:
        logger.warning("the checkpoint at step %d has no parameter EMA: config.ema starts it from its parameters",
                       step)
        restored["ema"] = jax.tree_util.tree_map(lambda x: x.copy(), {"params": restored["params"],
                                                                       "frozen": restored["frozen"]})
    elif saved_ema and not want_ema:
        logger.warning("config.ema.decay is 0: the checkpoint's parameter EMA (step %d) is not kept", step)
        del restored["ema"]
    logger.info("resumed from %s at step %d", manager.directory, step)
    return restored, meta, step
