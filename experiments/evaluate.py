"""COCO metrics of a checkpoint: `python experiments/evaluate.py --checkpoint CKPT [--config CONFIG]`.

CKPT is a detr_jax training work directory (its latest checkpoint, scored on the validation data of its own
config.json unless --config names other data) or an official DETR .pth (its architecture is read from the
weights; --config gives the data). Prints AP, AP50, AP75, ... and writes the COCO results
JSON into --out so anyone can re-score it.

A panoptic work directory is scored on its own config's panoptic validation data (TFDS coco/2017_panoptic, a
folder, the synthetic set). A panoptic .pth (e.g. the official detr-r50-panoptic-00ce5173.pth) is scored with
PQ / SQ / RQ on a COCO panoptic folder; the config gives the evaluation settings (eval_size, max_size,
eval_batch_size, buckets, workers):

  python experiments/evaluate.py --checkpoint detr-r50-panoptic-00ce5173.pth \
    --config experiments/configs/coco_r50.py --config.eval_batch_size=8 \
    --panoptic_ann_file coco/annotations/panoptic_val2017.json --panoptic_image_dir coco/val2017 \
    --panoptic_dir coco/annotations/panoptic_val2017

It prints PQ, SQ, RQ and their things / stuff parts, the COCO segm and bbox AP of the same outputs (on the
folder's thing segments as instances) and writes metrics.json into --out.
"""

import json
import logging
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from detr_jax.cli import config_value, define_config_file, define_multihost_flags, parse_flags, quiet_logs  # noqa: E402 (no jax import)
from detr_jax.ops.files import atomic_write  # noqa: E402 (no jax import)
from detr_jax.ops.xla_flags import set_process_defaults  # noqa: E402 (no jax import)

set_process_defaults()  # before jax is imported: XLA flags (the user's XLA_FLAGS win) and glibc malloc options

_CONFIG = define_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py"),
    "Config giving the evaluation data (and the model, for a work directory without config.json).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training work directory or official .pth.", required=True)
_OUT = flags.DEFINE_string("out", None,
                           "Where to write results.json and metrics.json (default: beside the checkpoint).")
_RAW_WEIGHTS = flags.DEFINE_bool("raw_weights", False, "A work directory of a run with a parameter EMA (config.ema): "
                                  "the trained parameters instead of their EMA.")
_DILATION = flags.DEFINE_bool("dilation", False, "The official checkpoint is a DC5 model.")
_PANOPTIC_ANN_FILE = flags.DEFINE_string("panoptic_ann_file", None,
                                         "COCO panoptic JSON: score a panoptic checkpoint on this folder.")
_PANOPTIC_IMAGE_DIR = flags.DEFINE_string("panoptic_image_dir", None, "Images of --panoptic_ann_file.")
_PANOPTIC_DIR = flags.DEFINE_string("panoptic_dir", None, "Segment PNGs of --panoptic_ann_file.")
_PANOPTIC_LABEL_SPACE = flags.DEFINE_enum(
    "panoptic_label_space", "official250", ["official250", "contiguous"],
    "The model's labels: the category ids (official checkpoints) or the sorted categories 0..K-1.")
_MULTIHOST_FLAGS = define_multihost_flags()


def main(argv):
    del argv
    quiet_logs()  # our lines at INFO; orbax's and jax's chatter only when it is a warning
    from detr_jax.data import PANOPTIC_SOURCES, ImageReadError
    from detr_jax.data.sources.coco_panoptic_folder import CocoPanopticFolder
    from detr_jax.evaluation import build_evaluator
    from detr_jax.ops.sharding import make_mesh, maybe_initialize_distributed
    from detr_jax.weights.official import load_official_checkpoint
    from detr_jax.weights.workdir import load_workdir_checkpoint

    # Multi-host: every process predicts its share of the split; process 0 scores and writes.
    maybe_initialize_distributed(**_MULTIHOST_FLAGS())
    import jax

    config = config_value(_CONFIG, sys.argv)
    path = _CHECKPOINT.value
    try:
        if os.path.isdir(path):
            run_config, model, variables = load_workdir_checkpoint(path, raw_weights=_RAW_WEIGHTS.value)
            if not flags.FLAGS["config"].present:  # the work directory's own data, not default.py's
                config = run_config
            logging.getLogger("detr_jax").info("evaluating %s on %s data (%s)", path, config.data.source,
                                               "--config" if flags.FLAGS["config"].present else "the run's config.json")
        elif os.path.isfile(path):
            model, variables = load_official_checkpoint(path, dilation=_DILATION.value)
        else:
            raise FileNotFoundError(f"checkpoint not found: {path}")
        panoptic_paths = (_PANOPTIC_ANN_FILE.value, _PANOPTIC_IMAGE_DIR.value, _PANOPTIC_DIR.value)
        panoptic = hasattr(model, "detr")  # a DETRsegm
        # A panoptic work directory is scored on its config's panoptic data unless the flags name a folder.
        own_data = panoptic and not any(panoptic_paths) and config.data.source in PANOPTIC_SOURCES
        if panoptic and not own_data and not all(panoptic_paths):
            raise ValueError(f"{path} is a panoptic model: give its data with --panoptic_ann_file, "
                             "--panoptic_image_dir and --panoptic_dir (a COCO panoptic folder)")
        if any(panoptic_paths) and not panoptic:
            raise ValueError(f"--panoptic_* flags were given but {path} is a detector without a mask head")
        source = None  # the config's validation data, or a COCO panoptic folder named by the flags
        if panoptic and not own_data:
            source = CocoPanopticFolder(*panoptic_paths, label_space=_PANOPTIC_LABEL_SPACE.value,
                                        num_classes=model.detector.num_classes)
        evaluator = build_evaluator(config, model, make_mesh(), source=source, segm=True)
    except (FileNotFoundError, ValueError, ImportError, ImageReadError) as e:
        sys.exit(f"error: {e}")
    out = _OUT.value or (path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))
    metrics = evaluator.evaluate(variables, out)  # detection: also results.json in out (process 0)
    evaluator.close()
    if jax.process_index() != 0:
        return
    os.makedirs(out, exist_ok=True)
    atomic_write(os.path.join(out, "metrics.json"), json.dumps(metrics, indent=1))
    print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
