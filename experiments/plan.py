"""Will it fit on my pod? `python experiments/plan.py --config CONFIG --topology v5e:4x4 [--batch_per_chip N]`.

Compiles the config's train step and its evaluator's forward for the TPU slice named by --topology (libtpu, the
`tpu` extra: `pip install -e ".[tpu]"`), at the config's largest bucket, on this machine (no TPU needed), and
prints the peak memory and FLOPs per chip with one verdict line. --search_batch also finds the largest batch per
chip that fits, by compiling (minutes per compile for DETR-R50 on a 2-core host). --out writes the plan as JSON.
Exit status 0: it fits; 1: it does not (the verdict says what would); 2: a bad argument.
"""

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from detr_jax.cli import config_value, define_config_file, parse_flags, quiet_logs  # noqa: E402 (no jax import)

# Compiling for a named TPU topology needs no accelerator: jax itself stays on the CPU (also on a TPU VM, whose
# chips may be busy training).
os.environ["JAX_PLATFORMS"] = "cpu"

_CONFIG = define_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "coco_r50.py"),
    "Training config file (a get_config() returning a ConfigDict); --config.* overrides as in train.py.",
    lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "The TPU slice, GENERATION:SHAPE (v5e:4x4 = 16 v5e chips on 4 "
                                "hosts; v4:2x2x2, v5p:2x2x2, v6e:2x4, v3:4x4).", required=True)
_BATCH_PER_CHIP = flags.DEFINE_integer("batch_per_chip", None, "Images per chip per step (default: "
                                       "config.batch_size / chips).", lower_bound=1)
_SEARCH = flags.DEFINE_bool("search_batch", False, "Also find the largest batch per chip whose train step fits, by "
                            "compiling (where the compiled peaks' line crosses the memory, then both sides of it).")
_HBM_GIB = flags.DEFINE_float("hbm_gib", None, "Memory per chip in GiB (default: the device kind's HBM).",
                              lower_bound=0.001)
_OUT = flags.DEFINE_string("out", None, "Write the plan as JSON to this file.")


def main(argv):
    del argv
    quiet_logs()
    config = config_value(_CONFIG, sys.argv)
    from detr_jax.training import plan as planning

    try:
        planning.check_plan_config(config)
        result = planning.plan(config, _TOPOLOGY.value, batch_per_chip=_BATCH_PER_CHIP.value, search=_SEARCH.value,
                               hbm_bytes=int(_HBM_GIB.value * planning.GIB) if _HBM_GIB.value else None)
    except ValueError as e:  # PlanError and check_config's: one line naming the argument
        if os.environ.get("DETR_JAX_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(planning.summary(result), flush=True)
    if _OUT.value:
        from detr_jax.ops.files import atomic_write
        atomic_write(_OUT.value, json.dumps(result, indent=1))
    sys.exit(0 if result["fits"] else 1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
