"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest

from detr_jax.ops.xla_flags import set_default_platforms

# The tests run on the CPU; with the tpu extra installed (tests/test_plan.py compiles for TPU topologies), jax
# would start libtpu in every process without this, as the entry points also avoid.
set_default_platforms()

# The official-DETR reference outputs live beside the repository, in shared/fixtures
# (see its README.md); DETR_JAX_FIXTURES points elsewhere.
_DEFAULT_FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir():
    """Folder of the official-DETR reference fixtures. Fails (never skips) when missing."""
    path = Path(os.environ.get("DETR_JAX_FIXTURES", _DEFAULT_FIXTURES))
    if not path.is_dir():
        pytest.fail(f"Reference fixtures folder {path} not found: parity tests need it. "
                    "Set DETR_JAX_FIXTURES to the folder holding official_detr_r18_tiny/, "
                    "or place it at <repo>/../shared/fixtures.")
    return path


@pytest.fixture(scope="session")
def coco_like_dir(tmp_path_factory):
    """A TFDS data_dir holding the built-in COCO-like set (256 train / 64 validation JPEGs at COCO's sizes,
    ArrayRecord, coco/2017's features), prepared once per session (~3 s). Skips without tensorflow_datasets."""
    pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("array_record")
    from detr_jax.data.sources import coco_like
    path = tmp_path_factory.mktemp("tfds")
    coco_like.prepare(str(path))
    return str(path)


@pytest.fixture(scope="session")
def coco_panoptic_like_dir(tmp_path_factory):
    """A TFDS data_dir holding the built-in COCO-panoptic-like set, tiny (16 train / 8 validation images of at
    most 160 x 160, ArrayRecord, coco/2017_panoptic's features), prepared once per session (~1 s). Skips without
    tensorflow_datasets."""
    pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("array_record")
    from detr_jax.data.sources import coco_panoptic_like
    path = tmp_path_factory.mktemp("tfds_panoptic")
    coco_panoptic_like.prepare(str(path), num_train=16, num_validation=8)
    return str(path)


# The files that take longest (minutes: background training runs, many compiles), first. pytest-xdist's
# `--dist loadfile --no-loadscope-reorder` (the README's test command) hands whole files to its workers in collection
# order, the first to worker 0, the second to worker 1, ..., so these start at once on different workers rather than
# one worker finishing a long file alone at the end.
SLOW_FILES_FIRST = ("test_train.py", "test_config_runs.py", "test_user_errors.py", "test_models.py",
                    "test_benchmarks.py", "test_evaluate.py", "test_train_parity.py")


def pytest_collection_modifyitems(session, config, items):  # pylint: disable=unused-argument
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order
