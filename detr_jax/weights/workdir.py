"""A detr_jax work directory's detector: its config.json and latest orbax checkpoint -> (config, model, variables),
for evaluation, inference, export and the panoptic recipe's second stage."""

import json
import os
from typing import Dict, Optional

import ml_collections
import orbax.checkpoint as ocp

from detr_jax.models import build_inference_model
from detr_jax.models.aids import MODEL


def detector_variables(params, frozen) -> Dict:
    """The detector's variables {"params", "frozen"} inside a training state of a `DETRWithAids` (what evaluation,
    inference and export apply): the sub-trees under "model"."""
    return {"params": params[MODEL], "frozen": frozen.get(MODEL, {})}


def load_workdir_checkpoint(workdir: str, step: Optional[int] = None):
    """(config, the plain `DETR`, its variables {"params", "frozen"}) from a training work directory (its config.json
    and orbax checkpoints)."""
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
    return config, build_inference_model(config), detector_variables(state["params"], state["frozen"])
