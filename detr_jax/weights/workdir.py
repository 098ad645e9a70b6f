"""A detr_jax work directory's detector: its config.json and latest orbax checkpoint -> (config, model, variables),
for evaluation, inference, export and the panoptic recipe's second stage."""

import json
import logging
import os
from typing import Dict, List, Optional

import ml_collections
import orbax.checkpoint as ocp

from detr_jax.models import build_inference_model
from detr_jax.models.aids import MODEL

logger = logging.getLogger(__name__)


def detector_variables(params, frozen) -> Dict:
    """The detector's variables {"params", "frozen"} inside a training state of a `DETRWithAids` (what evaluation,
    inference and export apply): the sub-trees under "model"."""
    return {"params": params[MODEL], "frozen": frozen.get(MODEL, {})}


def load_workdir_checkpoint(workdir: str, step: Optional[int] = None, raw_weights: bool = False):
    """(config, the plain `DETR`, its variables {"params", "frozen"}) from a training work directory (its config.json
    and orbax checkpoints): the parameters' EMA when the run kept one (config.ema), unless `raw_weights` (then, and
    in a run without EMA, the trained parameters)."""
    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{workdir} is not a detr_jax work directory: no config.json in it")
    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    manager.close()
    if "training_aids" not in config or "model" not in state["params"]:
        raise ValueError(f"{workdir} was written by an older detr_jax (before the detector's parameters moved under "
                         "'model'); train it again, or evaluate it with that version")
    weights = state if raw_weights or "ema" not in state else state["ema"]
    if "ema" in state:
        logger.info("%s (step %d): the %s", workdir, step, "trained parameters (--raw_weights), not their EMA"
                    if raw_weights else "parameters' EMA (config.ema; --raw_weights: the trained parameters)")
    return config, build_inference_model(config), detector_variables(weights["params"], weights.get("frozen", {}))


# The config.model fields that make a detector's parameters (or what they mean): what fine-tuning from a work
# directory takes from it (`adopt_checkpoint_architecture`).
ARCHITECTURE_FIELDS = ("backbone_depth", "dilation", "hidden_dim", "num_heads", "num_encoder_layers",
                       "num_decoder_layers", "dim_feedforward", "num_queries", "pre_norm", "position_embedding",
                       "backbone_norm")


def describe_detector(model: ml_collections.ConfigDict) -> str:
    """A config.model in words: "a ResNet-18 DETR with hidden 128, 20 queries, 2 + 2 layers and 5 classes"."""
    return (f"a ResNet-{model.backbone_depth}{'-DC5' if model.dilation else ''} DETR with hidden {model.hidden_dim}, "
            f"{model.num_queries} queries, {model.num_encoder_layers} + {model.num_decoder_layers} layers and "
            f"{model.num_classes} classes")


def adopt_checkpoint_architecture(config: ml_collections.ConfigDict,
                                  checkpoint_config: ml_collections.ConfigDict) -> List[str]:
    """Fine-tuning from a work directory: set config.model's architecture (and num_classes, unless the class head is
    re-initialised) to the checkpoint's, in place, since its weights fit no other. Returns the changes, as
    "hidden_dim 256 -> 128"."""
    fields = ARCHITECTURE_FIELDS + (() if config.init.reinit_class_head else ("num_classes",))
    changes = []
    for field in fields:
        theirs = checkpoint_config.model.get(field, config.model[field])
        if theirs != config.model[field]:
            changes.append(f"{field} {config.model[field]!r} -> {theirs!r}")
            config.model[field] = theirs
    return changes
