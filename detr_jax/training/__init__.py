"""Training: the loop, the step, the train state, checkpoints and the work directory."""

from detr_jax.training.loop import DataError, NonFiniteLossError, _check_finite, make_train_step, train_and_evaluate

__all__ = ["DataError", "NonFiniteLossError", "make_train_step", "train_and_evaluate", "_check_finite"]
