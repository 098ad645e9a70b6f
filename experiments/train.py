"""Train DETR: `python experiments/train.py [--config experiments/configs/NAME.py] [--workdir DIR]`.

Config fields can be overridden from the command line, e.g. `--config.batch_size=64 --config.num_steps=500`.
A run resumes from the latest checkpoint in its work directory. Multi-host on CPU/GPU clusters: pass
--coordinator_address, --num_processes and --process_id (TPU pods need none of them).
"""

import logging
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from detr_jax.cli import config_value, define_config_file, define_multihost_flags, parse_flags, quiet_logs  # noqa: E402 (no jax import)
from detr_jax.ops.xla_flags import add_xla_flags, set_process_defaults  # noqa: E402 (no jax import)

set_process_defaults()  # before jax is imported: XLA flags (the user's XLA_FLAGS win) and glibc malloc options

_CONFIG = define_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py"),
    "Training config file (a get_config() returning a ConfigDict).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and pictures go "
                               "(default: ./workdir/<config name>).")
_MULTIHOST_FLAGS = define_multihost_flags()


def main(argv):
    del argv
    quiet_logs()  # our progress at INFO; orbax's and jax's chatter only when it is a warning
    config = config_value(_CONFIG, sys.argv)  # a mistyped field or a missing file: one line, before any work
    if config.xla_flags:  # before jax starts its backend, which reads XLA_FLAGS once
        try:
            add_xla_flags(config.xla_flags)  # the training loop's first line shows XLA_FLAGS
        except ValueError as e:  # a malformed flag, which XLA would answer by aborting the process
            logging.error("%s", e)
            sys.exit(1)
    from detr_jax import training  # after flags: jax.distributed must start before any jax call
    from detr_jax.data import ImageReadError
    from detr_jax.data.sources.tfds_coco import MissingPackageError
    from detr_jax.ops import sharding
    from detr_jax.training.loop import DiskFullError

    sharding.maybe_initialize_distributed(**_MULTIHOST_FLAGS())
    config_name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
    workdir = _WORKDIR.value or os.path.join("workdir", config_name)
    try:
        training.train_and_evaluate(config, workdir)
    except KeyboardInterrupt:
        logging.warning("stopped; the run resumes from %s when started again", workdir)
        sys.exit(130)
    except (training.NonFiniteLossError, training.DataError, ImageReadError, ValueError, FileNotFoundError,
            DiskFullError, MissingPackageError) as e:
        # A bad config, data or checkpoint, a full disk, TFDS not installed or its data not prepared: the message
        # names it. DETR_JAX_TRACEBACK=1 shows the traceback.
        if os.environ.get("DETR_JAX_TRACEBACK"):
            raise
        logging.error("%s", e)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
