"""DETR: backbone -> 1x1 projection -> transformer -> class and box heads (official `models/detr.py`)."""

from typing import Any, Dict

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from detr_jax.models.backbone import ResNet, downsample_mask
from detr_jax.models.layers import Conv2d, Linear
from detr_jax.models.position_encoding import LearnedPositionEncoding, sine_position_encoding
from detr_jax.models.transformer import Transformer

POSITION_EMBEDDINGS = ("sine", "learned")
# DETR.remat: which activations the backward pass recomputes instead of keeping (jax.checkpoint per residual block
# of the backbone and per transformer layer); "none" is the plain program.
REMAT_CHOICES = ("none", "backbone", "transformer", "full")


class MLP(nn.Module):
    """The box head: `num_layers` Linear layers with ReLU between them."""
    hidden_dim: int
    output_dim: int
    num_layers: int = 3
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # [..., D] -> [..., output_dim]
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            x = Linear(self.output_dim if last else self.hidden_dim, dtype=self.dtype, name=f"layers_{i}")(x)
            if not last:
                x = nn.relu(x)
        return x


class DETR(nn.Module):
    """The DETR detector of the paper and the official `models/detr.py`.

    Attributes:
        num_classes: object classes; the class head has num_classes + 1 logits, no-object LAST.
        num_queries: object queries N.
        hidden_dim, num_heads, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout, pre_norm: the
            transformer's (official flags hidden_dim, nheads, enc_layers, dec_layers, dim_feedforward, dropout,
            pre_norm).
        backbone_depth, dilation: ResNet-18/34/50/101, DC5.
        position_embedding: "sine" (official default) or "learned".
        aux_loss: also return every decoder layer's predictions ("aux_outputs").
        padding_invariant: True: padding does not change any image's outputs (see `ResNet`); False: the official
            behaviour.
        backbone_norm, train_stem: the backbone's normalisation and whether its stem trains (`ResNet.norm`,
            `ResNet.freeze_stem_and_layer1`); the official values are "frozen_bn" and False.
        remat: rematerialisation, one of REMAT_CHOICES: "backbone" recomputes each ResNet block's activations
            in the backward pass, "transformer" each encoder and decoder layer's, "full" both; the outputs and
            gradients are those of "none" (memory for compute: `experiments/plan.py` measures what it buys).
        dtype: compute dtype (bfloat16 for mixed precision); parameters and outputs stay float32.

    Training-only aids (query groups, token heads) are not here: `models/aids.py` composes them around it.
    """
    num_classes: int = 91
    num_queries: int = 100
    hidden_dim: int = 256
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    pre_norm: bool = False
    backbone_depth: int = 50
    dilation: bool = False
    position_embedding: str = "sine"
    aux_loss: bool = True
    padding_invariant: bool = False
    backbone_norm: str = "frozen_bn"
    train_stem: bool = False
    remat: str = "none"
    dtype: Any = jnp.float32

    @property
    def detector(self) -> "DETR":
        """The detector itself; `DETRsegm` and `DETRWithAids` answer the DETR inside them."""
        return self

    def with_detector(self, **changes) -> "DETR":
        """A copy with the detector's fields changed (e.g. `padding_invariant=True`)."""
        return self.clone(**changes)

    @nn.compact
    def __call__(self, images, pixel_mask=None, train: bool = False, return_attention: bool = False,
                 return_features: bool = False, extra_queries=None, denoising=None):
        """Predict boxes and classes.

        Args:
            images: float32 [B, H, W, 3], already normalised, zero-padded bottom/right.
            pixel_mask: bool [B, H, W], True on real pixels; None means no padding.
            train: enables dropout (needs a "dropout" rng), and batch statistics with `backbone_norm="batch"`.
            return_attention: also return the last decoder layer's cross-attention.
            return_features: also return the intermediate features ("features"), for heads built on top of DETR
                (the panoptic mask head, the training aids of `aux_heads.py`).
            extra_queries: [G, N, D] more query groups, each decoded as its own set beside the learned queries
                (no self-attention between groups; Group DETR, see `aids.DETRWithAids`).
            denoising: training only, the denoising queries of `aids.DETRWithAids.dn_groups` ("content", "pos"
                [B, Gd, Md, D], "mask" bool [B, Gd, Md]; see `Transformer`), decoded in groups no other query sees.
        Returns:
            "pred_logits": [B, N, num_classes + 1]; "pred_boxes": [B, N, 4] cxcywh normalised by the unpadded
            image size; "aux_outputs": list of L-1 dicts with the same keys, first decoder layer first (when
            aux_loss). With extra_queries, N is (G + 1) * num_queries, the learned queries first.
            With return_attention: "cross_attention" [B, N, h, w] and "feature_mask" bool [B, h, w].
            With return_features, "features": "stages" (the 4 ResNet stage outputs [B, H/4, W/4, C1] ..
            [B, H/32, W/32, C4]), "src" [B, h, w, D] (the projected last stage), "pos" [B, h, w, D],
            "mask" bool [B, h, w] (True on real positions), "memory" [B, h * w, D] (the encoder's output),
            "hs" [L, B, N, D] (every decoder layer's normalised output).
            With denoising, "denoising": the same "pred_logits", "pred_boxes" and "aux_outputs" for the Gd * Md
            denoising queries (group by group); every other output is the matching queries' only.
        """
        if pixel_mask is None:
            pixel_mask = jnp.ones(images.shape[:3], bool)
        features, stages = ResNet(self.backbone_depth, self.dilation, self.dtype,
                                  freeze_stem_and_layer1=not self.train_stem, norm=self.backbone_norm,
                                  return_stages=True, remat=self.remat in ("backbone", "full"), name="backbone")(
            images.astype(self.dtype), pixel_mask if self.padding_invariant else None, train)
        b, h, w, c = features.shape
        mask = downsample_mask(pixel_mask, (h, w))  # bool [B, h, w]
        if self.position_embedding == "sine":
            pos = sine_position_encoding(mask, self.hidden_dim // 2)
        else:  # "learned" (config.check_config allows POSITION_EMBEDDINGS only)
            pos = LearnedPositionEncoding(self.hidden_dim // 2, name="position_embedding")(mask)

        src = Conv2d(self.hidden_dim, kernel_size=1, dtype=self.dtype, name="input_proj")(features)
        query_embed = self.param("query_embed", nn.initializers.normal(1.0), (self.num_queries, self.hidden_dim))
        if extra_queries is not None:
            query_embed = jnp.concatenate([query_embed[None], extra_queries])  # [G + 1, N, D]
        transformer = Transformer(self.num_heads, self.num_encoder_layers, self.num_decoder_layers,
                                  self.dim_feedforward, self.dropout, self.pre_norm, self.dtype,
                                  remat=self.remat in ("transformer", "full"), name="transformer")
        pos = pos.astype(self.dtype)
        hs, attn, memory = transformer(src, mask, query_embed, pos, train, denoising)

        # [L, B, N, C + 1]
        logits = Linear(self.num_classes + 1, dtype=self.dtype, name="class_embed")(hs).astype(jnp.float32)
        boxes = jax.nn.sigmoid(MLP(self.hidden_dim, 4, 3, self.dtype, name="bbox_embed")(hs).astype(jnp.float32))

        def layered(logits, boxes):  # [L, B, n, ...] -> the last layer's, and every earlier one's as aux_outputs
            out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
            if self.aux_loss:
                out["aux_outputs"] = [{"pred_logits": logits[i], "pred_boxes": boxes[i]} for i in range(len(hs) - 1)]
            return out

        if denoising is None:
            out = layered(logits, boxes)
        else:  # the matching queries (G * N) first, the denoising ones after them
            n = query_embed.size // self.hidden_dim
            out = layered(logits[:, :, :n], boxes[:, :, :n])
            out["denoising"] = layered(logits[:, :, n:], boxes[:, :, n:])
            hs, attn = hs[:, :, :n], attn[:, :, :n]
        if return_attention:
            out["cross_attention"] = attn[-1].reshape(b, -1, h, w)
            out["feature_mask"] = mask
        if return_features:
            out["features"] = {"stages": stages, "src": src, "pos": pos, "mask": mask, "memory": memory, "hs": hs}
        return out


def parameter_groups(params, train_stem: bool = False) -> Dict:
    """Label each parameter for the optimizer, as the official training does.

    Returns a pytree like `params` with "frozen" (ResNet stem and stage 1: the official `train_backbone`
    freezes everything but layer2-4; none with `train_stem`, see `DETR`), "backbone" (the other backbone
    parameters, trained with the backbone learning rate) or "transformer" (everything else). Batch-norm
    statistics are not params (collection "frozen").
    """
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))

    def label(path):
        if path[0] != "backbone":
            return "transformer"
        return "backbone" if train_stem or path[1].split("_")[0] in ("layer2", "layer3", "layer4") else "frozen"

    return flax.traverse_util.unflatten_dict({k: label(k) for k in flat})


def build_model(config) -> DETR:
    """The DETR of `config.model` (the fields of `DETR`), with bfloat16 compute if `config.half_precision`."""
    return DETR(**config.model.to_dict(), dtype=jnp.bfloat16 if config.half_precision else jnp.float32)
