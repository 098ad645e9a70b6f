"""HF transformers `DetrForObjectDetection` -> official DETR key names -> Flax variables.

HF's DETR computes the official model (with `auxiliary_loss=False`, see `load_hf_detr`) under other names:
q/k/v projections are separate Linears (the official fuses them into `in_proj_weight` [3D, D], rows q, k, v),
layer norms are named by their role (`self_attn_layer_norm` ...), and its own ResNet (`ResNetBackbone`) names
torchvision's `layer2.0.conv1` `encoder.stages.1.layers.0.layer.0.convolution`. Renaming to the official keys
lets `detr_jax.weights.official` do the rest (layouts, config inference, the shape check).

Accepted layouts: transformers 5.x (`o_proj`, `mlp.fc1`) and the 4.x names of hub checkpoints (`out_proj`,
`fc1`, `backbone.conv_encoder.`); a ResNet backbone from HF's ResNet or from timm (torchvision names already).
"""

import re
import warnings
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from detr_jax.models.detr import DETR
from detr_jax.weights.official import check_variables_match, infer_detr_config, torch_state_dict_to_variables

_BACKBONE_PREFIX = re.compile(r"model\.backbone\.(?:conv_encoder\.)?model\.")
_LAYER_KEY = re.compile(r"model\.(encoder|decoder)\.layers\.(\d+)\.(.+)")
_NORMS = {  # HF layer-norm role -> official name, per stack
    "encoder": {"self_attn_layer_norm": "norm1", "final_layer_norm": "norm2"},
    "decoder": {"self_attn_layer_norm": "norm1", "encoder_attn_layer_norm": "norm2", "final_layer_norm": "norm3"},
}
_TOP_LEVEL = [  # (HF pattern, official template) for keys outside the backbone and the layer stacks
    (r"model\.(?:backbone\.)?position_embedding\.row_embeddings\.weight", "backbone.1.row_embed.weight"),
    (r"model\.(?:backbone\.)?position_embedding\.column_embeddings\.weight", "backbone.1.col_embed.weight"),
    (r"model\.query_position_embeddings\.weight", "query_embed.weight"),
    (r"model\.input_projection\.(weight|bias)", r"input_proj.\1"),
    (r"model\.decoder\.layernorm\.(weight|bias)", r"transformer.decoder.norm.\1"),
    (r"class_labels_classifier\.(weight|bias)", r"class_embed.\1"),
    (r"bbox_predictor\.layers\.(\d+)\.(weight|bias)", r"bbox_embed.layers.\1.\2"),
]


def _backbone_name(rest: str) -> Optional[str]:
    """A backbone key after its prefix -> the torchvision name; None when not a ResNet key."""
    if m := re.fullmatch(r"embedder\.embedder\.(convolution|normalization)\.(\w+)", rest):
        return ("conv1." if m[1] == "convolution" else "bn1.") + m[2]
    block_key = r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(shortcut|layer\.(\d))\.(convolution|normalization)\.(\w+)"
    if m := re.fullmatch(block_key, rest):
        stage, block, part, index, kind, leaf = m.groups()
        if part == "shortcut":
            name = "downsample.0" if kind == "convolution" else "downsample.1"
        else:  # layer.0/1/2 of a block are torchvision's conv1/bn1, conv2/bn2, conv3/bn3
            name = ("conv" if kind == "convolution" else "bn") + str(int(index) + 1)
        return f"layer{int(stage) + 1}.{block}.{name}.{leaf}"
    if re.fullmatch(r"(conv1|bn1|layer[1-4]\.\d+\.(conv\d|bn\d|downsample\.[01]))\.\w+", rest):
        return rest  # timm's ResNet keeps the torchvision names
    return None


def _layer_name(stack: str, rest: str) -> Optional[Tuple[str, Optional[int]]]:
    """A key inside `model.{stack}.layers.N.` -> (official suffix, q/k/v index or None); None if unknown."""
    attn_names = {"self_attn": "self_attn"}
    if stack == "decoder":
        attn_names["encoder_attn"] = "multihead_attn"
    if (m := re.fullmatch(r"(\w+)\.([qkv])_proj\.(weight|bias)", rest)) and m[1] in attn_names:
        return f"{attn_names[m[1]]}.in_proj_{m[3]}", "qkv".index(m[2])
    if (m := re.fullmatch(r"(\w+)\.(?:o_proj|out_proj)\.(weight|bias)", rest)) and m[1] in attn_names:
        return f"{attn_names[m[1]]}.out_proj.{m[2]}", None
    if m := re.fullmatch(r"(?:mlp\.)?fc([12])\.(weight|bias)", rest):
        return f"linear{m[1]}.{m[2]}", None
    if (m := re.fullmatch(r"(\w+)\.(weight|bias)", rest)) and m[1] in _NORMS[stack]:
        return f"{_NORMS[stack][m[1]]}.{m[2]}", None
    return None


def _to_numpy(value) -> np.ndarray:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def hf_state_dict_to_official(state_dict: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    """Rename an HF `DetrForObjectDetection` state dict to the official facebookresearch/detr keys.

    Args:
        state_dict: HF key -> torch tensor or array (`model.state_dict()`).
    Returns:
        official key -> numpy array, q/k/v fused into `in_proj_weight` [3D, D] / `in_proj_bias` [3D].
    Raises:
        ValueError naming the keys that are not part of a DETR object detector (e.g. a segmentation head),
        or an attention missing one of q/k/v.
    """
    official: Dict[str, np.ndarray] = {}
    qkv_parts: Dict[str, Dict[int, np.ndarray]] = {}
    unknown = []
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        name, part = None, None
        if m := _BACKBONE_PREFIX.match(key):
            rest = _backbone_name(key[m.end():])
            name = rest and "backbone.0.body." + rest
        elif m := _LAYER_KEY.fullmatch(key):
            stack, index, rest = m.groups()
            mapped = _layer_name(stack, rest)
            if mapped:
                name, part = f"transformer.{stack}.layers.{index}.{mapped[0]}", mapped[1]
        else:
            for pattern, template in _TOP_LEVEL:
                if m := re.fullmatch(pattern, key):
                    name = m.expand(template)
                    break
        if name is None:
            unknown.append(key)
        elif part is None:
            official[name] = _to_numpy(value)
        else:
            qkv_parts.setdefault(name, {})[part] = _to_numpy(value)
    if unknown:
        more = f" ... ({len(unknown)} in all)" if len(unknown) > 8 else ""
        raise ValueError(f"not HF DetrForObjectDetection keys (no official DETR name): {unknown[:8]}{more}")
    for name, parts in qkv_parts.items():
        if sorted(parts) != [0, 1, 2]:
            missing = [p for i, p in enumerate("qkv") if i not in parts]
            raise ValueError(f"{name}: the HF state dict lacks the {missing} projection(s) to fuse")
        official[name] = np.concatenate([parts[0], parts[1], parts[2]], axis=0)
    return official


def _config_from_hf(hf_config) -> Dict[str, Any]:
    """The `DETR` fields the weights cannot tell (num_heads, dilation), read from an HF `DetrConfig`.

    Raises a ValueError for HF options our DETR does not have, naming the config field.
    """
    if hf_config.encoder_attention_heads != hf_config.decoder_attention_heads:
        raise ValueError(f"DetrConfig.encoder_attention_heads={hf_config.encoder_attention_heads} != "
                         f"decoder_attention_heads={hf_config.decoder_attention_heads}: our DETR has one num_heads")
    if hf_config.encoder_ffn_dim != hf_config.decoder_ffn_dim:
        raise ValueError(f"DetrConfig.encoder_ffn_dim={hf_config.encoder_ffn_dim} != decoder_ffn_dim="
                         f"{hf_config.decoder_ffn_dim}: our DETR has one dim_feedforward")
    if hf_config.activation_function != "relu":
        raise ValueError(f"DetrConfig.activation_function={hf_config.activation_function!r}: DETR uses 'relu'")
    if hf_config.auxiliary_loss:
        # HF's decoder then feeds each layer the *normalised* output of the previous one (and normalises the last
        # twice), so its forward is no longer the official DETR's; the converted model computes the official one.
        warnings.warn("DetrConfig.auxiliary_loss=True: HF's decoder then differs from the official DETR "
                      "(normalised states fed forward); the converted model follows the official DETR and "
                      "matches HF with auxiliary_loss=False", stacklevel=2)
    backbone = hf_config.backbone_config
    if backbone.model_type == "resnet":
        expected = {"hidden_act": "relu", "embedding_size": 64, "downsample_in_first_stage": False,
                    "downsample_in_bottleneck": False}
        for field, value in expected.items():
            if getattr(backbone, field) != value:
                raise ValueError(f"ResNetConfig.{field}={getattr(backbone, field)!r}: the torchvision ResNet of "
                                 f"DETR needs {value!r}")
        if hf_config.dilation:
            # HF's own ResNet has no dilation: `DetrConfig.dilation` is then ignored and the HF model has output
            # stride 32. Follow what HF computes.
            warnings.warn("DetrConfig.dilation=True is ignored by HF with its own ResNet backbone (only timm "
                          "dilates); converting as undilated, as the HF model runs", stacklevel=2)
        dilation = False
    elif backbone.model_type == "timm_backbone":
        dilation = bool(hf_config.dilation)
    else:
        raise ValueError(f"DetrConfig.backbone_config.model_type={backbone.model_type!r}: only ResNet backbones "
                         "('resnet' or 'timm_backbone') convert")
    return {"num_heads": hf_config.encoder_attention_heads, "dilation": dilation}


def load_hf_detr(model_or_state_dict, **overrides):
    """Convert an HF transformers `DetrForObjectDetection` (torch model or its state dict) to (model, variables).

    Hidden size, FFN size, layer counts, queries, classes, ResNet depth and the position encoding are read from the
    weights; num_heads and dilation (DC5) from the model's config when a model is given, else they are the
    official defaults (8, False) unless set in `overrides`, as any other `DETR` field.

    Returns:
        model: a `DETR` module; variables: {"params": ..., "frozen": ...} for `model.apply`.
    """
    hf_config = getattr(model_or_state_dict, "config", None)
    is_model = callable(getattr(model_or_state_dict, "state_dict", None))
    state_dict = model_or_state_dict.state_dict() if is_model else model_or_state_dict
    official = hf_state_dict_to_official(state_dict)
    config = infer_detr_config(official)
    if hf_config is not None:
        config.update(_config_from_hf(hf_config))
    config.update(overrides)
    model = DETR(**config)
    variables = jax.tree_util.tree_map(jnp.asarray, torch_state_dict_to_variables(official))
    check_variables_match(model, variables, "the HF DETR state dict")
    return model, variables
