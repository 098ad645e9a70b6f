"""Official DETR and torchvision ResNet checkpoints (PyTorch .pth) -> Flax variables.

Names map one-to-one because the Flax modules keep the official names (see models/*.py); only layouts
change: Linear weights [out, in] -> kernels [in, out], Conv weights [O, I, kh, kw] -> [kh, kw, I, O], batch
norm buffers -> the "frozen" collection. torch is needed only to unpickle a .pth.

Panoptic checkpoints (e.g. detr-r50-panoptic-00ce5173.pth) hold the detector under "detr." and the mask head
under "bbox_attention." / "mask_head." (official `DETRsegm`); they become a `models.segmentation.DETRsegm`, whose
variables hold the detector's under "detr".
"""

import argparse
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from detr_jax.models.backbone import FROZEN_COLLECTION, RESNET_SPECS
from detr_jax.models.detr import DETR
from detr_jax.models.segmentation import DETRsegm

_BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def load_torch_state_dict(path: str) -> Dict[str, np.ndarray]:
    """Read a PyTorch checkpoint and return its (model) state dict as numpy arrays.

    Accepts the official layout `{"model": state_dict, ...}` and a bare state dict (torchvision).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"checkpoint file not found: {path}") from e
    except IsADirectoryError as e:
        raise ValueError(f"{path} is a folder, not a .pth file") from e
    # torch.save writes a zip archive (since torch 1.6) or, before, a pickle (protocol 2+: 0x80 then the protocol).
    if head[:4] != b"PK\x03\x04" and not (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        raise ValueError(f"{path} is not a DETR checkpoint: neither a PyTorch .pth file (like detr-r50-e632da11.pth) "
                         "nor a detr_jax training work directory")
    if head[:4] == b"PK\x03\x04":  # a truncated or damaged archive: say so before torch is needed
        import zipfile  # pylint: disable=import-outside-toplevel

        try:
            with zipfile.ZipFile(path) as archive:
                archive.namelist()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise ValueError(f"{path} is a truncated or damaged .pth file (its zip archive cannot be read: {e}); "
                             "download it again") from None
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ImportError(f"Reading the PyTorch checkpoint {path} needs torch, only to unpickle it: "
                                            "`pip install torch==2.13.0` (a CPU build is enough)") from e
    _refuse_unsafe_torch(torch.__version__, path)
    try:
        # Official training checkpoints also pickle the argparse Namespace of the run: allow that one class.
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"checkpoint file not found: {path}") from e
    except Exception as e:  # a truncated or foreign file: say which one
        raise ValueError(f"could not read {path} as a PyTorch checkpoint: {e}") from e
    state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{path} holds no state dict (expected {{'model': state_dict}} or a state dict)")
    arrays = {}
    for key, value in state_dict.items():
        if not isinstance(key, str) or not hasattr(value, "detach"):
            raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor: not a DETR / "
                             "torchvision state dict (expected {'model': {name: tensor}} or {name: tensor})")
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()  # bfloat16 / float16 have no numpy dtype (bf16) or lose nothing as float32
        array = value.numpy()
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            n = int(array.size - np.isfinite(array).sum())
            raise ValueError(f"{path}: tensor {key!r} holds {n} NaN/inf value(s) of {array.size}: the weights are "
                             "broken (a diverged run or a damaged file); refusing to load them")
        arrays[key] = array
    if not arrays:
        raise ValueError(f"{path} holds an empty state dict (no tensors)")
    return arrays


MIN_SAFE_TORCH = (2, 10)  # torch.load(weights_only=True) has known bypasses before (CVE-2025-32434 for <= 2.5.1)


def _refuse_unsafe_torch(version: str, path: str) -> None:
    """Refuse to unpickle `path` with a torch whose `weights_only=True` loader is known to be bypassable."""
    m = re.match(r"(\d+)\.(\d+)", str(version))
    if m and (int(m.group(1)), int(m.group(2))) < MIN_SAFE_TORCH:
        raise ImportError(f"refusing to read {path} with torch {version}: torch.load(weights_only=True) can run "
                          "code hidden in a .pth before torch 2.10 (CVE-2025-32434 for <= 2.5.1 and a later "
                          "advisory); `pip install torch==2.13.0` (a CPU build is enough)")


def _torch_key_to_flax(key: str) -> Optional[Tuple[str, Tuple[str, ...], str]]:
    """Map an official/torchvision key to (collection, flax path, kind); None for keys we do not use.

    kind is "linear" (transpose), "conv" (OIHW -> HWIO), or "copy".
    """
    if key.endswith("num_batches_tracked") or key.startswith("fc."):
        return None
    key = re.sub(r"^backbone\.0\.body\.", "backbone.", key)
    key = re.sub(r"^backbone\.1\.", "position_embedding.", key)
    if not key.startswith(("backbone.", "position_embedding.", "transformer.", "class_embed.", "bbox_embed.",
                                                  "query_embed.", "input_proj.")):
        key = "backbone." + key  # a torchvision ResNet state dict
    key = re.sub(r"\.(layer\d)\.(\d+)\.", r".\1_\2.", key)
    key = key.replace("downsample.0.", "downsample_conv.").replace("downsample.1.", "downsample_bn.")
    key = re.sub(r"\.(encoder|decoder)\.layers\.(\d+)\.", r".\1_layers_\2.", key)
    key = re.sub(r"\.(linear[12])\.", r".ffn.\1.", key)
    key = key.replace("transformer.encoder.norm.", "transformer.encoder_norm.")
    key = key.replace("transformer.decoder.norm.", "transformer.decoder_norm.")
    key = re.sub(r"\.layers\.(\d+)\.", r".layers_\1.", key)  # bbox_embed MLP
    parts = key.split(".")
    *path, leaf = parts

    if path[0] == "backbone" and re.fullmatch(r"bn\d|downsample_bn", path[-1]):
        return FROZEN_COLLECTION, tuple(path) + (_BN_NAMES[leaf],), "copy"
    if leaf == "in_proj_weight":
        return "params", tuple(path) + ("in_proj_kernel",), "linear"
    if leaf == "in_proj_bias":
        return "params", tuple(path) + ("in_proj_bias",), "copy"
    if path[0] in ("query_embed", "position_embedding"):  # nn.Embedding tables, stored as they are
        return "params", tuple(path), "copy"
    if leaf == "weight" and re.search(r"conv\d?$|downsample_conv$|input_proj$", path[-1]):
        return "params", tuple(path) + ("kernel",), "conv"
    if re.fullmatch(r"norm\d?|encoder_norm|decoder_norm", path[-1]):
        return "params", tuple(path) + ({"weight": "scale", "bias": "bias"}[leaf],), "copy"
    if leaf == "weight":
        return "params", tuple(path) + ("kernel",), "linear"
    return "params", tuple(path) + (leaf,), "copy"


def torch_state_dict_to_variables(state_dict: Mapping[str, np.ndarray], origin: Optional[Dict[str, str]] = None,
                                  prefix: str = "") -> Dict[str, Any]:
    """Convert an official DETR (or torchvision ResNet) state dict to a nested Flax variables dict.

    A key that cannot be converted (an unknown layer kind, a weight of the wrong rank) raises a ValueError naming
    it. `origin`, when given, receives {"collection/flax/path": official key} (keys written with `prefix`)."""
    flat: Dict[Tuple[str, ...], np.ndarray] = {}
    for key, value in state_dict.items():
        try:
            mapped = _torch_key_to_flax(key)
        except (KeyError, IndexError) as e:
            raise ValueError(f"key {prefix + key!r} is not a DETR / ResNet weight name (cannot place {e})") from None
        if mapped is None:
            continue
        collection, path, kind = mapped
        flat[(collection,) + path] = _to_flax_layout(value, kind, prefix + key)
        if origin is not None:
            origin["/".join((collection,) + path)] = prefix + key
    return _unflatten(flat, origin)


def _unflatten(flat, origin):
    """`flax.traverse_util.unflatten_dict`, a clash (a key both a weight and a module) named as a ValueError."""
    try:
        return flax.traverse_util.unflatten_dict(flat)
    except (AssertionError, TypeError, KeyError, IndexError, ValueError):
        paths = sorted("/".join(k) for k in flat)
        clash = next((a for a, b in zip(paths, paths[1:]) if b.startswith(a + "/")), paths[0] if paths else "")
        raise ValueError(f"key {(origin or {}).get(clash, clash)!r} is both a weight and a module") from None


_RANK = {"linear": 2, "conv": 4}


def _to_flax_layout(value, kind: str, key: str = "") -> np.ndarray:
    """A torch array as flax stores it: Linear [out, in] -> [in, out], Conv [O, I, kh, kw] -> [kh, kw, I, O]."""
    value = np.asarray(value, np.float32)
    if kind in _RANK and value.ndim != _RANK[kind]:
        raise ValueError(f"key {key!r} has shape {tuple(value.shape)}: a {kind} weight has {_RANK[kind]} dimensions")
    if kind == "linear":
        return value.T
    if kind == "conv":
        return value.transpose(2, 3, 1, 0)
    return value


PANOPTIC_DETR_PREFIX = "detr."  # the detector's keys in a panoptic (DETRsegm) state dict


def is_panoptic_state_dict(state_dict: Mapping[str, np.ndarray]) -> bool:
    """Whether `state_dict` is an official `DETRsegm`'s (detector keys under "detr.")."""
    return any(k.startswith(PANOPTIC_DETR_PREFIX) for k in state_dict)


def _detector_state_dict(state_dict: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The detector's keys of a panoptic state dict, "detr." stripped (the layout of a plain DETR's)."""
    n = len(PANOPTIC_DETR_PREFIX)
    return {k[n:]: v for k, v in state_dict.items() if k.startswith(PANOPTIC_DETR_PREFIX)}


def _segm_key_to_flax(key: str) -> Tuple[str, Tuple[str, ...], str]:
    """Map an official `DETRsegm` key outside "detr." to (collection, flax path, kind), as `_torch_key_to_flax`.

    "bbox_attention.{q,k}_linear" are Linear layers; "mask_head.lay1-5 / out_lay / adapter1-3" 2-D convolutions,
    "mask_head.gn1-5" GroupNorms. Any other key keeps its path, so that `check_variables_match` names it.
    """
    *path, leaf = key.split(".")
    if path and path[0] == "mask_head" and re.fullmatch(r"gn\d", path[-1]):
        return "params", tuple(path) + ({"weight": "scale"}.get(leaf, leaf),), "copy"
    if leaf == "weight" and path and path[0] == "mask_head":
        return "params", tuple(path) + ("kernel",), "conv"
    if leaf == "weight" and path and path[0] == "bbox_attention":
        return "params", tuple(path) + ("kernel",), "linear"
    return "params", tuple(path) + (leaf,), "copy"


def panoptic_state_dict_to_variables(state_dict: Mapping[str, np.ndarray],
                                     origin: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Convert an official `DETRsegm` state dict to the nested Flax variables of a `DETRsegm`.

    The "detr." keys are converted as a plain DETR's (`torch_state_dict_to_variables`) and nested under "detr"
    in each collection; the "bbox_attention." / "mask_head." keys go to the modules of the same names.
    """
    inner: Dict[str, str] = {}
    detector = flax.traverse_util.flatten_dict(torch_state_dict_to_variables(
        _detector_state_dict(state_dict), inner, prefix=PANOPTIC_DETR_PREFIX))
    flat = {(collection, "detr") + tuple(path): value for (collection, *path), value in detector.items()}
    if origin is not None:
        origin.update({"/".join([c, "detr"] + p): k for (c, *p), k in ((n.split("/"), k) for n, k in inner.items())})
    for key, value in state_dict.items():
        if key.startswith(PANOPTIC_DETR_PREFIX) or key.endswith("num_batches_tracked"):
            continue
        collection, path, kind = _segm_key_to_flax(key)
        flat[(collection,) + path] = _to_flax_layout(value, kind, key)
        if origin is not None:
            origin["/".join((collection,) + path)] = key
    return _unflatten(flat, origin)


def infer_detr_config(state_dict: Mapping[str, np.ndarray]) -> Dict[str, Any]:
    """Read the architecture of an official DETR from its weights (what the weights can tell).

    A panoptic state dict is read from its detector's keys ("detr." stripped)."""
    if is_panoptic_state_dict(state_dict):
        state_dict = _detector_state_dict(state_dict)

    def count(pattern):
        return len({m.group(1) for k in state_dict if (m := re.match(pattern, k))})

    if "query_embed.weight" not in state_dict or "class_embed.weight" not in state_dict:
        raise ValueError("not an official DETR state dict: missing query_embed.weight / class_embed.weight")
    ffn = [k for k in ("transformer.encoder.layers.0.linear1.weight", "transformer.decoder.layers.0.linear1.weight")
           if k in state_dict]
    if not ffn:
        raise ValueError("not an official DETR state dict: missing transformer.{encoder,decoder}.layers.0.linear1"
                         ".weight")
    for key in ("query_embed.weight", "class_embed.weight", ffn[0]):
        if np.ndim(state_dict[key]) != 2:
            raise ValueError(f"key {key!r} has shape {tuple(np.shape(state_dict[key]))}: expected 2 dimensions")
    stages = tuple(count(rf"backbone\.0\.body\.layer{i}\.(\d+)\.") for i in range(1, 5))
    kind = "bottleneck" if "backbone.0.body.layer1.0.conv3.weight" in state_dict else "basic"
    depth = [d for d, spec in RESNET_SPECS.items() if spec == (kind, stages)]
    if not depth:
        raise ValueError(f"unknown ResNet layout in checkpoint: {kind} blocks {stages}")
    num_queries, hidden_dim = state_dict["query_embed.weight"].shape
    return dict(
            num_classes=state_dict["class_embed.weight"].shape[0] - 1,
            num_queries=num_queries,
            hidden_dim=hidden_dim,
            num_encoder_layers=count(r"transformer\.encoder\.layers\.(\d+)\."),
            num_decoder_layers=count(r"transformer\.decoder\.layers\.(\d+)\."),
            dim_feedforward=state_dict[ffn[0]].shape[0],
            pre_norm="transformer.encoder.norm.weight" in state_dict,
            backbone_depth=depth[0],
            position_embedding="learned" if "backbone.1.row_embed.weight" in state_dict else "sine",
    )


def check_variables_match(model, variables, source: str, sample_hw=(64, 64), may_miss=(),
                          origin: Optional[Mapping[str, str]] = None) -> None:
    """Raise a ValueError naming every missing, unexpected or mis-shaped array against `model`'s own tree.

    `may_miss`: "collection/module" prefixes (e.g. "params/class_embed") the variables need not have. `origin`
    ({"collection/flax/path": official key}) lets the message start with the first official key that does not
    fit."""
    expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + tuple(sample_hw) + (3,))))
    want = flax.traverse_util.flatten_dict(flax.core.unfreeze(expected), sep="/")
    have = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables), sep="/")
    missing = sorted(k for k in set(want) - set(have) if not k.startswith(tuple(p + "/" for p in may_miss)))
    unexpected = sorted(set(have) - set(want))
    mis_shaped = sorted(f"{k}: checkpoint {tuple(have[k].shape)} vs model {tuple(want[k].shape)}"
                        for k in set(want) & set(have) if tuple(have[k].shape) != tuple(want[k].shape))
    if missing or unexpected or mis_shaped:
        def show(items):
            return ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "")
        first = next((origin[k] for k in unexpected + sorted(k for k in set(want) & set(have)
                                                             if tuple(have[k].shape) != tuple(want[k].shape))
                      if k in origin), None) if origin else None
        lead = f"{source}: key {first!r} does not fit; it" if first else source
        raise ValueError(f"{lead} does not match the model config: missing [{show(missing)}], "
                         f"unexpected [{show(unexpected)}], mis-shaped [{show(mis_shaped)}]")


def load_pretrained(init, model: DETR, variables, detector_variables=None):
    """Apply a config's `init`: a torchvision ImageNet backbone and/or an official DETR checkpoint.

    Args:
        init: `config.init` (backbone_checkpoint, detr_checkpoint, reinit_class_head).
        model, variables: a plain `DETR` and its fresh {"params", "frozen"}.
        detector_variables: the {"params", "frozen"} of a trained detr_jax `DETR`, used instead of reading
          `init.detr_checkpoint` when that names a work directory (the caller reads it:
          `checkpoints.load_workdir_checkpoint`).
    Returns:
        The variables with the checkpoints' arrays; with `reinit_class_head` (fine-tuning on other classes) the
        class head keeps its fresh initialisation.
    """
    if init.backbone_checkpoint:
        variables = load_torchvision_backbone(init.backbone_checkpoint, variables, model.backbone_depth)
    if init.detr_checkpoint:
        may_miss = ("params/class_embed",) if init.reinit_class_head else ()
        if detector_variables is not None:  # a detr_jax work directory's detector
            loaded = flax.core.unfreeze(detector_variables)
            if init.reinit_class_head:
                loaded["params"] = {k: v for k, v in loaded["params"].items() if k != "class_embed"}
        else:
            state_dict = load_torch_state_dict(init.detr_checkpoint)
            if init.reinit_class_head:
                state_dict = {k: v for k, v in state_dict.items() if not k.startswith("class_embed.")}
            try:
                loaded = torch_state_dict_to_variables(state_dict)
            except ValueError as e:
                raise ValueError(f"{init.detr_checkpoint}: {e}") from None
        check_variables_match(model, loaded, init.detr_checkpoint, may_miss=may_miss)
        ours = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
        ours.update({k: jnp.asarray(v) for k, v in flax.traverse_util.flatten_dict(loaded).items()})
        variables = flax.traverse_util.unflatten_dict(ours)
    return variables


def load_official_checkpoint(path: str, dilation: bool = False, num_heads: int = 8, **overrides):
    """Load a released official DETR checkpoint (e.g. detr-r50-e632da11.pth) as (model, variables).

    Depth, hidden size, FFN size, layer counts, queries, classes, pre-norm and the position encoding are read
    from the weights; `dilation` (DC5) and `num_heads` cannot be, so they are arguments with the official
    defaults. `overrides` set any other `DETR` field (e.g. aux_loss=False), or `DETRsegm.freeze_detr`.

    A panoptic checkpoint (e.g. detr-r50-panoptic-00ce5173.pth, keys "detr.*", "bbox_attention.*",
    "mask_head.*"; 250 classes for COCO panoptic) gives a `DETRsegm` around the `DETR`.

    Returns:
        model: a `DETR` (or `DETRsegm`) module; variables: {"params": ..., "frozen": ...} for `model.apply`.
    """
    state_dict = load_torch_state_dict(path)
    panoptic = is_panoptic_state_dict(state_dict)
    segm_overrides = {k: overrides.pop(k) for k in ("freeze_detr",) if k in overrides}
    if segm_overrides and not panoptic:
        raise ValueError(f"{sorted(segm_overrides)} only applies to a panoptic checkpoint; {path} is a detector's")
    origin: Dict[str, str] = {}
    try:
        config = infer_detr_config(state_dict)
        if panoptic:
            variables = panoptic_state_dict_to_variables(state_dict, origin)
        else:
            variables = torch_state_dict_to_variables(state_dict, origin)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    config.update(dilation=dilation, num_heads=num_heads, **overrides)
    model = DETR(**config)
    if panoptic:
        model = DETRsegm(model, **segm_overrides)
    variables = jax.tree_util.tree_map(jnp.asarray, variables)
    check_variables_match(model, variables, path, origin=origin)
    return model, variables


def load_torchvision_backbone(path: str, variables, depth: int):
    """Put a torchvision ImageNet ResNet (e.g. resnet50-0676ba61.pth) into DETR variables' backbone.

    Args:
        path: torchvision ResNet .pth (a bare state dict; `fc.*` is ignored).
        variables: DETR variables {"params", "frozen"} to update (not modified in place).
        depth: the model's backbone depth, checked against the file.
    Returns:
        New variables with backbone params and frozen batch-norm buffers from the file.
    """
    try:
        converted = torch_state_dict_to_variables(load_torch_state_dict(path))
    except ValueError as e:
        raise ValueError(e if str(e).startswith(path) else f"{path}: {e}") from None
    for collection in ("params", FROZEN_COLLECTION):
        theirs = flax.traverse_util.flatten_dict(converted.get(collection, {}).get("backbone", {}), sep="/")
        ours = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables[collection]["backbone"]), sep="/")
        if set(theirs) != set(ours) or any(theirs[k].shape != tuple(ours[k].shape) for k in ours):
            raise ValueError(f"{path} is not a torchvision ResNet-{depth} state dict matching the model backbone "
                             f"(missing {sorted(set(ours) - set(theirs))[:5]}, "
                             f"unexpected {sorted(set(theirs) - set(ours))[:5]})")
    out = flax.core.unfreeze(jax.tree_util.tree_map(lambda x: x, variables))
    for collection in ("params", FROZEN_COLLECTION):
        out[collection]["backbone"] = jax.tree_util.tree_map(jnp.asarray, converted[collection]["backbone"])
    return out
