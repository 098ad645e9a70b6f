"""Training: the loop, the step, the optimizer and train state, checkpoints, the work directory.

  loop.py         train_and_evaluate: setup -> steps with periodic logs / checkpoints / evaluations -> leaving
  step.py         make_train_step: forward -> criterion -> grad -> update, one jitted program
  state.py        AdamW with the official parameter groups, schedules, clipping; create_train_state
  checkpoints.py  orbax checkpoints with the loader's position (exact resume)
  workdir.py      the lock, metrics.jsonl / TensorBoard, the progress line, the compilation cache

Only entry points (experiments/, benchmarks/, tests/) import this package.
"""

from detr_jax.training.loop import DataError, NonFiniteLossError, check_finite, train_and_evaluate
from detr_jax.training.state import build_optimizer, create_train_state
from detr_jax.training.step import make_train_step

__all__ = ["DataError", "NonFiniteLossError", "build_optimizer", "check_finite", "create_train_state",
           "make_train_step", "train_and_evaluate"]
