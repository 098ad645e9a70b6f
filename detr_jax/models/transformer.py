"""DETR's encoder-decoder transformer, layer for layer as the official `models/transformer.py`.

Sequences are batch-major here ([B, S, D]; the official code is sequence-major). Position encodings are
added to queries and keys, never to values, in every attention layer. Parameter names follow the
official state dict (`self_attn`, `multihead_attn`, `linear1`, `norm1`, ...) for one-to-one conversion.
Linear layers are `layers.Linear` (torch's `nn.Linear`); the fused attention kernels live in `layers` too.
"""

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from detr_jax.models.layers import (
    Linear,
    attention_implementation,
    fused_attention,
    linear,
    xavier_uniform,
)


def attention_weights(q, k, key_mask=None):
    """Softmax over keys, in float32: q [B, Sq, H, hd] (already scaled), k [B, Sk, H, hd], key_mask bool [B, Sk]
    (True on keys that may be attended; None for all) -> [B, H, Sq, Sk]."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    if key_mask is not None:
        # A large finite negative instead of -inf: a fully padded row stays finite (torch would give NaN).
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)


def masked_attention(q, k, v, key_mask=None, dropout: Callable = lambda w: w):
    """Softmax attention per head, the core of `MultiheadAttention` (softmax in float32).

    Args:
        q: [B, Sq, H, hd], already scaled by hd ** -0.5; k, v: [B, Sk, H, hd].
        key_mask: bool [B, Sk], True on keys that may be attended; None for all.
        dropout: applied to the weights before they multiply v (identity by default).
    Returns:
        out [B, Sq, H, hd] in v's dtype, weights float32 [B, H, Sq, Sk] (before dropout).
    """
    weights = attention_weights(q, k, key_mask)
    out = jnp.einsum("bhqk,bkhd->bqhd", dropout(weights).astype(v.dtype), v)
    return out, weights


class MultiheadAttention(nn.Module):
    """torch.nn.MultiheadAttention with a fused in-projection and a key padding mask.

    The fused `in_proj_kernel` [D, 3D] (q, k, v blocks) keeps xavier's fan-in/out of the 3D x D torch matrix,
    so initialisation matches the official code, and converts from `in_proj_weight` by a transpose.

    `attention_impl` picks how softmax(q k^T) v is computed (`layers.attention_implementation`): "reference" is
    `masked_attention`, the explicit float32 softmax; "xla" and "cudnn" are `layers.fused_attention`
    (`jax.nn.dot_product_attention`; "cudnn" is the fused flash-attention kernel, bfloat16/float16 only); "auto"
    is "cudnn" where that kernel can run, else "reference" (so CPUs and float32 models compute as before). The
    fused kernels have no dropout on the attention weights: training with dropout > 0 uses "reference" ("auto")
    or is refused. The weights returned by `return_weights` always come from the explicit softmax; under `jit`
    XLA drops that computation when the caller does not use them.
    """
    num_heads: int
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, query, key, value, key_mask=None, train: bool = False, return_weights: bool = False):
        """Attention of `query` over `key`/`value`.

        Args:
            query: [B, Sq, D]; key: [B, Sk, D]; value: [B, Sk, D].
            key_mask: bool [B, Sk], True on keys that may be attended (real pixels); None for all.
        Returns:
            [B, Sq, D], and the head-averaged weights [B, Sq, Sk] if `return_weights`.
        """
        d = query.shape[-1]
        head_dim = d // self.num_heads
        w = self.param("in_proj_kernel", xavier_uniform, (d, 3 * d)).astype(self.dtype)
        b = self.param("in_proj_bias", nn.initializers.zeros, (3 * d,)).astype(self.dtype)
        q = linear(query.astype(self.dtype), w[:, :d], b[:d])
        k = linear(key.astype(self.dtype), w[:, d:2 * d], b[d:2 * d])
        v = linear(value.astype(self.dtype), w[:, 2 * d:], b[2 * d:])

        def heads(x):  # [B, S, D] -> [B, S, H, hd]
            return x.reshape(x.shape[:2] + (self.num_heads, head_dim))

        q, k, v = heads(q) * head_dim ** -0.5, heads(k), heads(v)
        impl = attention_implementation(self.attention_impl, self.dtype, head_dim,
                                        dropout_active=train and self.dropout > 0)
        if impl == "reference":
            dropout = nn.Dropout(self.dropout)
            out, weights = masked_attention(q, k, v, key_mask, lambda w: dropout(w, deterministic=not train))
        else:
            out = fused_attention(q, k, v, key_mask, impl)
            weights = attention_weights(q, k, key_mask) if return_weights else None
        out = out.reshape(query.shape[:2] + (d,))
        out = Linear(d, kernel_init=xavier_uniform, bias_init=nn.initializers.zeros, dtype=self.dtype,
                     name="out_proj")(out)
        return (out, weights.mean(axis=1)) if return_weights else out


class FeedForward(nn.Module):
    dim_feedforward: int
    dropout: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):  # [B, S, D] -> [B, S, D]
        d = x.shape[-1]
        # xavier weights as the official Transformer._reset_parameters; torch's default biases
        x = nn.relu(Linear(self.dim_feedforward, kernel_init=xavier_uniform, dtype=self.dtype, name="linear1")(x))
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        return Linear(d, kernel_init=xavier_uniform, dtype=self.dtype, name="linear2")(x)


def _layer_norm(name):
    return nn.LayerNorm(epsilon=1e-5, name=name, dtype=jnp.float32)


class EncoderLayer(nn.Module):
    num_heads: int
    dim_feedforward: int
    dropout: float
    pre_norm: bool = False
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, src, pos, key_mask, train: bool):  # [B, S, D], [B, S, D], bool [B, S] -> [B, S, D]
        attn = MultiheadAttention(self.num_heads, self.dropout, self.dtype, self.attention_impl, name="self_attn")
        ffn = FeedForward(self.dim_feedforward, self.dropout, self.dtype, name="ffn")
        drop = lambda x: nn.Dropout(self.dropout)(x, deterministic=not train)
        norm1, norm2 = _layer_norm("norm1"), _layer_norm("norm2")
        if self.pre_norm:
            x = norm1(src)
            src = src + drop(attn(x + pos, x + pos, x, key_mask, train))
            return src + drop(ffn(norm2(src), train))
        src = norm1(src + drop(attn(src + pos, src + pos, src, key_mask, train)))
        return norm2(src + drop(ffn(src, train)))


class DecoderLayer(nn.Module):
    num_heads: int
    dim_feedforward: int
    dropout: float
    pre_norm: bool = False
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, tgt, memory, pos, query_pos, memory_mask, train: bool, groups: int = 1,
                 denoising_mask=None):
        """tgt, query_pos: [B, N, D]; memory, pos: [B, S, D]; memory_mask: bool [B, S] -> ([B, N, D], [B, N, S]).

        With `groups` G > 1 the N queries are G independent groups of N / G (group by group): the self-attention
        runs within each group only; the cross-attention and the feed-forward are per query anyway.
        With `denoising_mask` (bool [B, Gd, Md], True on real denoising queries), the last Gd * Md of the N
        queries are Gd denoising groups (`aids.DETRWithAids.dn_groups`): each attends within itself only, to its
        real queries, and the first N - Gd * Md (the matching queries) never see them.
        """
        self_attn = MultiheadAttention(self.num_heads, self.dropout, self.dtype, self.attention_impl, name="self_attn")
        cross_attn = MultiheadAttention(self.num_heads, self.dropout, self.dtype, self.attention_impl,
                                        name="multihead_attn")
        ffn = FeedForward(self.dim_feedforward, self.dropout, self.dtype, name="ffn")
        drop = lambda x: nn.Dropout(self.dropout)(x, deterministic=not train)
        norm1, norm2, norm3 = _layer_norm("norm1"), _layer_norm("norm2"), _layer_norm("norm3")

        def grouped(x, query_pos):  # [B, N, D], attending within each group: [B * G, N / G, D] inside
            b, n, d = x.shape
            split = lambda t: t.reshape(b * groups, n // groups, d)
            q = split(x + query_pos)
            return self_attn(q, q, split(x), None, train).reshape(b, n, d)

        def self_attention(x):
            if denoising_mask is None:
                return grouped(x, query_pos)
            b, dn_groups, dn_size = denoising_mask.shape
            n = x.shape[1] - dn_groups * dn_size  # the matching queries first, then the denoising groups
            split = lambda t: t[:, n:].reshape(b * dn_groups, dn_size, t.shape[-1])
            q = split(x + query_pos)
            dn = self_attn(q, q, split(x), denoising_mask.reshape(b * dn_groups, dn_size), train)
            return jnp.concatenate([grouped(x[:, :n], query_pos[:, :n]), dn.reshape(b, -1, x.shape[-1])], 1)

        if self.pre_norm:
            tgt = tgt + drop(self_attention(norm1(tgt)))
            x, weights = cross_attn(norm2(tgt) + query_pos, memory + pos, memory, memory_mask, train,
                                    return_weights=True)
            tgt = tgt + drop(x)
            return tgt + drop(ffn(norm3(tgt), train)), weights
        tgt = norm1(tgt + drop(self_attention(tgt)))
        x, weights = cross_attn(tgt + query_pos, memory + pos, memory, memory_mask, train, return_weights=True)
        tgt = norm2(tgt + drop(x))
        return norm3(tgt + drop(ffn(tgt, train))), weights


class Transformer(nn.Module):
    """Encoder over the flattened feature map, decoder over the object queries.

    Returns every decoder layer's output after the decoder's final LayerNorm (the official
    `return_intermediate=True`), which the heads turn into the main and auxiliary predictions.
    """
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    pre_norm: bool = False
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "auto"  # see MultiheadAttention: "auto", "reference", "xla" or "cudnn"
    remat: bool = False  # recompute each layer's activations in the backward pass (jax.checkpoint): less memory

    @nn.compact
    def __call__(self, src, mask, query_embed, pos, train: bool = False, denoising=None):
        """Run encoder and decoder.

        Args:
            src: [B, h, w, D] projected backbone features.
            mask: bool [B, h, w], True on real (unpadded) positions.
            query_embed: [N, D] learned query position embeddings, or [G, N, D]: G independent groups of queries
                (Group DETR), each decoded as its own set, with no self-attention between groups.
            pos: [B, h, w, D] position encodings.
            denoising: training only (`aids.DETRWithAids.dn_groups`): "content" [B, Gd, Md, D] and "pos"
                [B, Gd, Md, D] (the denoising queries' starting slots and positions) and "mask" bool [B, Gd, Md]
                (True on real queries); decoded after the matching queries, Gd groups that see only themselves.
        Returns:
            hs: [L, B, N, D] normalised decoder outputs, first layer first ([L, B, G * N, D] for groups, group
                by group; [L, B, G * N + Gd * Md, D] with denoising, the denoising queries last);
            cross_attn: [L, B, N, h * w] head-averaged cross-attention weights of each decoder layer ([L, B, G * N,
                h * w] for groups);
            memory: [B, h * w, D] the encoder's output.
        """
        b, h, w, d = src.shape
        src, pos, key_mask = src.reshape(b, h * w, d), pos.reshape(b, h * w, d), mask.reshape(b, h * w)
        # `train` (argument 4 of an encoder layer, 6 of a decoder layer, counting the module) and the decoder's
        # `groups` (7) are Python values: static under remat.
        encoder_cls = nn.remat(EncoderLayer, static_argnums=(4,)) if self.remat else EncoderLayer
        decoder_cls = nn.remat(DecoderLayer, static_argnums=(6, 7)) if self.remat else DecoderLayer
        memory = src
        for i in range(self.num_encoder_layers):
            memory = encoder_cls(self.num_heads, self.dim_feedforward, self.dropout, self.pre_norm, self.dtype,
                                  self.attention_impl, name=f"encoder_layers_{i}")(memory, pos, key_mask, train)
        if self.pre_norm:  # the official encoder has a final norm only in the pre-norm variant
            memory = _layer_norm("encoder_norm")(memory)
        encoded = memory

        groups = query_embed.shape[0] if query_embed.ndim == 3 else 1
        query_embed = query_embed.reshape(-1, d)  # [G * N, D], group by group
        query_pos = jnp.broadcast_to(query_embed[None].astype(src.dtype), (b,) + query_embed.shape)
        tgt = jnp.zeros_like(query_pos)  # decoder slots start at zero; the queries enter as positions
        dn_mask = None
        if denoising is not None:  # appended after the matching queries: [B, G * N + Gd * Md, D]
            flat = lambda t: t.reshape(b, -1, d).astype(src.dtype)
            tgt = jnp.concatenate([tgt, flat(denoising["content"])], 1)
            query_pos = jnp.concatenate([query_pos, flat(denoising["pos"])], 1)
            dn_mask = denoising["mask"]
        decoder_norm = _layer_norm("decoder_norm")
        hs, attn = [], []
        for i in range(self.num_decoder_layers):
            layer = decoder_cls(self.num_heads, self.dim_feedforward, self.dropout, self.pre_norm, self.dtype,
                                 self.attention_impl, name=f"decoder_layers_{i}")
            tgt, weights = layer(tgt, memory, pos, query_pos, key_mask, train, groups, dn_mask)
            hs.append(decoder_norm(tgt))
            attn.append(weights)
        hs, attn = jnp.stack(hs), jnp.stack(attn)  # [L, B, G * N, D], [L, B, G * N, S]
        return hs, attn, encoded
