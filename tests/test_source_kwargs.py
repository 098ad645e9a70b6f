"""The data sources' declared arguments (`ARGUMENTS`): each matches its constructor, and `check_source_kwargs` /
`check_data_kwargs` refuse a misspelt key, a mistyped value or a missing required argument in one line, on the
kwargs `build_data` merges; every shipped config passes."""

import glob
import importlib.util
import inspect
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from detr_jax.data import SOURCES, SyntheticDetection, build_source, write_coco_folder
from detr_jax.data.sources import (
    REQUIRED,
    SOURCE_CLASSES,
    Arguments,
    check_data_kwargs,
    check_source_kwargs,
    source_arguments,
    source_class,
    split_kwargs,
)
from detr_jax.data.sources.synthetic_panoptic import SyntheticPanoptic, write_coco_panoptic_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def required_args(tmp_path_factory):
    """{source name: its required arguments} for the sources cheap to build: tiny folders written from the
    synthetic sets."""
    root = tmp_path_factory.mktemp("folders")
    ann_file, image_dir = write_coco_folder(SyntheticDetection("val", num_examples=2, image_size=(32, 32)),
                                            str(root / "coco"))
    pan_ann, pan_images, pan_pngs = write_coco_panoptic_folder(
        SyntheticPanoptic("val", num_examples=2, image_size=(32, 32)), str(root / "panoptic"))
    return {"synthetic": {}, "synthetic_panoptic": {}, "coco_folder": dict(ann_file=ann_file, image_dir=image_dir),
            "coco_panoptic": dict(ann_file=pan_ann, image_dir=pan_images, panoptic_dir=pan_pngs)}


def test_the_registry_names_every_source():
    assert set(SOURCE_CLASSES) == set(SOURCES)
    with pytest.raises(ValueError, match=r"^unknown data source 'imagenet'; known: \('synthetic'"):
        check_source_kwargs("imagenet", {}, "config.data.source_kwargs")


@pytest.mark.parametrize("name", SOURCES)
def test_every_declaration_matches_its_constructor(name):
    """One declaration per argument: the constructor's signature is the declaration's; every default is of its
    declared type; every argument has a one-line comment; required arguments come first (positional order)."""
    cls = source_class(name)
    arguments = cls.ARGUMENTS
    assert isinstance(arguments, Arguments) and source_arguments(name) is arguments
    params = inspect.signature(cls).parameters
    assert list(params) == list(arguments.names())
    required = [arg.required for arg in arguments.args.values()]
    assert required == sorted(required, reverse=True), "required arguments first"
    for key, arg in arguments.args.items():
        assert (params[key].default is inspect.Parameter.empty) == arg.required
        assert arg.default is REQUIRED or arg.accepts(arg.default), (key, arg)
        assert arg.doc and "\n" not in arg.doc and len(arg.doc) <= 100, key
    # The constructor binds through the declaration: a misspelt key fails before anything is opened (no TFDS).
    with pytest.raises(ValueError, match=f"^{cls.__name__} has no argument 'splitt'"):
        cls(splitt="train")


@pytest.mark.parametrize("name", ["synthetic", "synthetic_panoptic", "coco_folder", "coco_panoptic"])
def test_cheap_sources_build_with_the_declared_defaults(name, required_args):
    arguments = source_arguments(name)
    given = dict(required_args[name])
    explicit = build_source(name, **given, **arguments.defaults())  # every default spelt out
    implicit = build_source(name, **given)
    assert len(explicit) == len(implicit) > 0
    a, b = explicit[0], implicit[0]
    assert a.keys() == b.keys() >= {"image", "boxes", "labels", "image_id", "orig_size", "iscrowd"}
    for key in ("image", "boxes", "labels"):
        np.testing.assert_array_equal(a[key], b[key])
    for key, default in arguments.defaults().items():  # the attributes a source keeps are the defaults
        if key in ("image_size", "num_classes"):  # stored parsed (image_sizes) or resolved (num_classes)
            continue
        if hasattr(implicit, key):
            assert getattr(implicit, key) == default, key


def test_sources_bind_positional_arguments_in_declaration_order(required_args):
    by_keyword = SyntheticDetection(split="val", num_examples=2, image_size=(32, 32), seed=5)
    np.testing.assert_array_equal(SyntheticDetection("val", 2, (32, 32), seed=5)[1]["image"], by_keyword[1]["image"])
    folder = required_args["coco_folder"]
    assert len(source_class("coco_folder")(folder["ann_file"], folder["image_dir"])) == 2
    with pytest.raises(TypeError, match="at most 9 positional arguments"):
        SyntheticDetection("val", 2, (32, 32), 1, 2, 0.1, 0.5, 0.5, 0, 7)
    with pytest.raises(TypeError, match="multiple values for argument 'split'"):
        SyntheticDetection("val", split="train")


@pytest.mark.parametrize("name", SOURCES)
def test_a_misspelt_key_is_refused_naming_the_source_and_the_accepted_keys(name):
    arguments = source_arguments(name)
    with pytest.raises(ValueError) as e:
        check_source_kwargs(name, {"label_spaec": "contiguous"}, "config.data.train_kwargs")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"config.data.train_kwargs: data source {name!r} ({source_class(name).__name__}) "
                              "has no argument 'label_spaec'")
    assert message.endswith("it accepts " + arguments.accepted())
    for key in arguments.names():
        assert key in message
    if "label_space" in arguments.names():
        assert "(did you mean 'label_space'?)" in message


def test_build_source_refuses_a_misspelt_key_in_one_line():
    with pytest.raises(ValueError, match=r"^build_source\('synthetic'\): data source 'synthetic' "
                                         r"\(SyntheticDetection\) has no argument 'num_example' \(did you mean "
                                         r"'num_examples'\?\); it accepts split, num_examples, image_size,"):
        build_source("synthetic", num_example=3)
    with pytest.raises(ValueError, match="unknown data source 'imagenet'"):
        build_source("imagenet")


@pytest.mark.parametrize("name, key, value, expected", [
    ("synthetic", "num_examples", "100", "int"),
    ("synthetic", "num_examples", 100.0, "int"),
    ("synthetic", "seed", True, "int"),  # a bool is no int here
    ("synthetic", "max_occlusion", "0.5", "float (or int)"),
    ("synthetic", "image_size", 64, "tuple (or list)"),
    ("synthetic_panoptic", "noise", None, "float (or int)"),
    ("coco_folder", "keep_crowd", 1, "bool"),  # an int is no bool
    ("coco_folder", "num_classes", "91", "int or None"),
    ("coco_panoptic", "ann_file", 3, "str or path"),
    ("tfds", "data_dir", 0, "str or path or None"),
    ("tfds_panoptic", "split", ("train",), "str"),
])
def test_a_mistyped_value_is_refused_naming_the_key_the_type_and_the_value(name, key, value, expected):
    with pytest.raises(ValueError) as e:
        check_source_kwargs(name, {key: value}, "config.data.source_kwargs")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"config.data.source_kwargs: data source {name!r} ({source_class(name).__name__}) "
                              f"takes {expected} for {key!r} (")
    assert message.endswith(f", got {value!r} of type {type(value).__name__}")


def test_values_the_declarations_take():
    check_source_kwargs("synthetic", dict(max_occlusion=1, image_size=[64, 64], num_examples=np.int64(4),
                                          min_object_size=np.float32(0.2)), "here")  # int for float, list for tuple
    check_source_kwargs("synthetic", dict(image_size=[(64, 64), (48, 96)]), "here")
    check_source_kwargs("tfds", dict(data_dir="", num_classes=None, size_cache_dir=None), "here")
    check_source_kwargs("coco_folder", dict(ann_file="a.json", image_dir="images", num_classes=91), "here")


@pytest.mark.parametrize("name, given, missing", [
    ("coco_folder", dict(image_dir="images"), "ann_file"),
    ("coco_folder", dict(ann_file="a.json"), "image_dir"),
    ("coco_panoptic", dict(ann_file="a.json", image_dir="images"), "panoptic_dir"),
])
def test_a_missing_required_argument_is_refused(name, given, missing):
    with pytest.raises(ValueError, match=f"^config.data.val_kwargs: data source {name!r} .* needs {missing!r} .*; "
                                         f"it accepts ann_file \\(required\\), image_dir \\(required\\)"):
        check_source_kwargs(name, given, "config.data.val_kwargs")
    with pytest.raises(ValueError, match=f"needs {missing!r}"):
        build_source(name, **given)


def _data(source, source_kwargs, **split_kwargs):
    return ml_collections.ConfigDict(dict(source=source, source_kwargs=source_kwargs,
                                          train_kwargs=split_kwargs.get("train", {}),
                                          val_kwargs=split_kwargs.get("val", {})))


def test_check_data_kwargs_checks_both_splits_merged_as_build_data_does():
    data = _data("coco_folder", dict(ann_file="train.json", label_space="contiguous"),
                 train=dict(image_dir="train"), val=dict(image_dir="val", ann_file="val.json"))
    check_data_kwargs(data)  # ann_file shared, image_dir per split
    assert split_kwargs(data, "val") == dict(data.source_kwargs.to_dict(), **data.val_kwargs.to_dict())
    assert split_kwargs(data, "val")["ann_file"] == "val.json"  # the split's own override the shared ones

    del data.val_kwargs["image_dir"]
    with pytest.raises(ValueError, match=r"^config.data.source_kwargs \+ config.data.val_kwargs: data source "
                                         r"'coco_folder' \(CocoFolder\) needs 'image_dir'"):
        check_data_kwargs(data)
    data.val_kwargs.image_dir = "val"

    data.train_kwargs.image_dri = "train"
    with pytest.raises(ValueError, match=r"^config.data.train_kwargs: data source 'coco_folder' \(CocoFolder\) has no "
                                         r"argument 'image_dri' \(did you mean 'image_dir'\?\)"):
        check_data_kwargs(data)
    del data.train_kwargs["image_dri"]

    data.source_kwargs.keep_crowd = "yes"
    with pytest.raises(ValueError, match=r"^config.data.source_kwargs: data source 'coco_folder' \(CocoFolder\) takes "
                                         r"bool for 'keep_crowd'"):
        check_data_kwargs(data)
    # What build_data gives the source is checked: a shared value both splits override never reaches it.
    data.train_kwargs.keep_crowd = data.val_kwargs.keep_crowd = False
    check_data_kwargs(data)

    with pytest.raises(ValueError, match="^unknown data source 'coco'"):
        check_data_kwargs(_data("coco", {}))


def _config_variants():
    """(path, argument) of every shipped config and its named variants (`coco_r50.py:smoke`, ...)."""
    paths = sorted(glob.glob(os.path.join(REPO, "experiments", "configs", "*.py")))
    paths = [p for p in paths if not p.endswith("__init__.py")] + [os.path.join(REPO, "tests", "configs", "tiny.py")]
    variants = []
    for path in paths:
        module = _module(path)
        variants.append((path, ""))
        if inspect.signature(module.get_config).parameters:  # the named variants: its ARGUMENTS, else "smoke"
            words = tuple(getattr(module, "ARGUMENTS", ("smoke",)))
            variants += [(path, w) for w in dict.fromkeys(words + (",".join(words),))]
    return variants


def _module(path):
    if REPO not in sys.path:
        sys.path.insert(0, REPO)  # the configs import experiments.configs.coco_r50
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CONFIG_VARIANTS = _config_variants()


def test_the_named_config_variants_are_listed():
    names = {f"{os.path.basename(p)}:{a}" if a else os.path.basename(p) for p, a in CONFIG_VARIANTS}
    assert {"default.py", "tiny.py", "coco_r50.py:smoke", "coco_r50_panoptic.py:boxes,smoke",
            "finetune_coco_folder.py"} <= names


@pytest.mark.parametrize("path, arg", CONFIG_VARIANTS,
                         ids=[f"{os.path.basename(p)}:{a}" if a else os.path.basename(p) for p, a in CONFIG_VARIANTS])
def test_every_shipped_config_passes_the_check(path, arg):
    module = _module(path)
    config = module.get_config(arg) if arg else module.get_config()
    check_data_kwargs(config.data)
    for split in ("train", "val"):
        check_source_kwargs(config.data.source, split_kwargs(config.data, split), f"config.data.{split}_kwargs")


def test_the_tfds_declarations_need_no_tensorflow():
    """The check (and a refused key) never imports tensorflow_datasets: the TFDS sources import it when built."""
    code = ("import sys, pytest\n"
            "from detr_jax.data import build_source\n"
            "from detr_jax.data.sources import check_source_kwargs\n"
            "for name in ('tfds', 'tfds_panoptic'):\n"
            "    check_source_kwargs(name, dict(split='train', data_dir='', name='coco/2017'), 'here')\n"
            "    with pytest.raises(ValueError, match='has no argument'):\n"
            "        build_source(name, splitt='train')\n"
            "assert 'tensorflow_datasets' not in sys.modules and 'tensorflow' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
