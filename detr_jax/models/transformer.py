"""DETR's encoder-decoder transformer, layer for layer as the official `models/transformer.py`.

Sequences are batch-major here ([B, S, D]; the official code is sequence-major). Position encodings are
added to queries and keys, never to values, in every attention layer. Parameter names follow the
official state dict (`self_attn`, `multihead_attn`, `linear1`, `norm1`, ...) for one-to-one conversion.
"""

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

xavier = nn.initializers.xavier_uniform()


def torch_default_bias_init(fan_in: int):
    """torch.nn.Linear's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / fan_in ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def torch_linear(features: int, fan_in: int, name: str, dtype, xavier_weight: bool = True):
    """A Dense initialised as the official code does: xavier weights (Transformer._reset_parameters)."""
    kernel_init = xavier if xavier_weight else nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    return nn.Dense(features, kernel_init=kernel_init, bias_init=torch_default_bias_init(fan_in),
                                    name=name, dtype=dtype)


def dense_2d(fn, x):
    """Apply a map of the last axis, `fn` ([M, D] -> [M, F]), to x [..., D] as one 2-D product: [..., F].

    Same numbers as `fn(x)`. For speed: the weight gradient of a 2-D product is one GEMM over the rows, which
    XLA:CPU runs as it is, while a [B, S, D] operand makes XLA transpose it first ([D, B * S]).
    """
    y = fn(x.reshape(-1, x.shape[-1]))
    return y.reshape(x.shape[:-1] + y.shape[-1:])


def masked_attention(q, k, v, key_mask=None, dropout: Callable = lambda w: w):
    """Softmax attention per head, the core of `MultiheadAttention` (softmax in float32).

    Args:
        q: [B, Sq, H, hd], already scaled by hd ** -0.5; k, v: [B, Sk, H, hd].
        key_mask: bool [B, Sk], True on keys that may be attended; None for all.
        dropout: applied to the weights before they multiply v (identity by default).
    Returns:
        out [B, Sq, H, hd] in v's dtype, weights float32 [B, H, Sq, Sk] (before dropout).
    """
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    if key_mask is not None:
        # A large finite negative instead of -inf: a fully padded row stays finite (torch would give NaN).
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", dropout(weights).astype(v.dtype), v)
    return out, weights


class MultiheadAttention(nn.Module):
    """torch.nn.MultiheadAttention with a fused in-projection and a key padding mask.

    The fused `in_proj_kernel` [D, 3D] (q, k, v blocks) keeps xavier's fan-in/out of the 3D x D torch matrix,
    so initialisation matches the official code, and converts from `in_proj_weight` by a transpose.
    """
    num_heads: int
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32

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
        if d % self.num_heads:
            raise ValueError(f"hidden dim {d} is not divisible by num_heads={self.num_heads}")
        head_dim = d // self.num_heads
        w = self.param("in_proj_kernel", xavier, (d, 3 * d)).astype(self.dtype)
        b = self.param("in_proj_bias", nn.initializers.zeros, (3 * d,)).astype(self.dtype)
        q = dense_2d(lambda x: x @ w[:, :d] + b[:d], query.astype(self.dtype))
        k = dense_2d(lambda x: x @ w[:, d:2 * d] + b[d:2 * d], key.astype(self.dtype))
        v = dense_2d(lambda x: x @ w[:, 2 * d:] + b[2 * d:], value.astype(self.dtype))

        def heads(x):  # [B, S, D] -> [B, S, H, hd]
            return x.reshape(x.shape[:2] + (self.num_heads, head_dim))

        dropout = nn.Dropout(self.dropout)
        out, weights = masked_attention(heads(q) * head_dim ** -0.5, heads(k), heads(v), key_mask,
                                        lambda w: dropout(w, deterministic=not train))
        out = out.reshape(query.shape[:2] + (d,))
        out = dense_2d(nn.Dense(d, kernel_init=xavier, bias_init=nn.initializers.zeros, name="out_proj",
                                dtype=self.dtype), out)
        return (out, weights.mean(axis=1)) if return_weights else out


class FeedForward(nn.Module):
    dim_feedforward: int
    dropout: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):  # [B, S, D] -> [B, S, D]
        d = x.shape[-1]
        x = nn.relu(dense_2d(torch_linear(self.dim_feedforward, d, "linear1", self.dtype), x))
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        return dense_2d(torch_linear(d, self.dim_feedforward, "linear2", self.dtype), x)


def _layer_norm(name):
    return nn.LayerNorm(epsilon=1e-5, name=name, dtype=jnp.float32)


class EncoderLayer(nn.Module):
    num_heads: int
    dim_feedforward: int
    dropout: float
    pre_norm: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, src, pos, key_mask, train: bool):  # [B, S, D], [B, S, D], bool [B, S] -> [B, S, D]
        attn = MultiheadAttention(self.num_heads, self.dropout, self.dtype, name="self_attn")
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

    @nn.compact
    def __call__(self, tgt, memory, pos, query_pos, memory_mask, train: bool, groups: int = 1):
        """tgt, query_pos: [B, N, D]; memory, pos: [B, S, D]; memory_mask: bool [B, S] -> ([B, N, D], [B, N, S]).

        With `groups` G > 1 the N queries are G independent groups of N / G (group by group): the self-attention
        runs within each group only; the cross-attention and the feed-forward are per query anyway.
        """
        self_attn = MultiheadAttention(self.num_heads, self.dropout, self.dtype, name="self_attn")
        cross_attn = MultiheadAttention(self.num_heads, self.dropout, self.dtype, name="multihead_attn")
        ffn = FeedForward(self.dim_feedforward, self.dropout, self.dtype, name="ffn")
        drop = lambda x: nn.Dropout(self.dropout)(x, deterministic=not train)
        norm1, norm2, norm3 = _layer_norm("norm1"), _layer_norm("norm2"), _layer_norm("norm3")

        def self_attention(x):  # [B, N, D], attending within each group: [B * G, N / G, D] inside
            b, n, d = x.shape
            split = lambda t: t.reshape(b * groups, n // groups, d)
            q = split(x + query_pos)
            return self_attn(q, q, split(x), None, train).reshape(b, n, d)

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

    @nn.compact
    def __call__(self, src, mask, query_embed, pos, train: bool = False):
        """Run encoder and decoder.

        Args:
            src: [B, h, w, D] projected backbone features.
            mask: bool [B, h, w], True on real (unpadded) positions.
            query_embed: [N, D] learned query position embeddings, or [G, N, D]: G independent groups of queries
                (Group DETR), each decoded as its own set, with no self-attention between groups.
            pos: [B, h, w, D] position encodings.
        Returns:
            hs: [L, B, N, D] normalised decoder outputs, first layer first ([L, B, G * N, D] for groups, group
                by group);
            cross_attn: [L, B, N, h * w] head-averaged cross-attention weights of each decoder layer ([L, B, G * N,
                h * w] for groups);
            memory: [B, h * w, D] the encoder's output.
        """
        b, h, w, d = src.shape
        src, pos, key_mask = src.reshape(b, h * w, d), pos.reshape(b, h * w, d), mask.reshape(b, h * w)
        memory = src
        for i in range(self.num_encoder_layers):
            memory = EncoderLayer(self.num_heads, self.dim_feedforward, self.dropout, self.pre_norm, self.dtype,
                                                        name=f"encoder_layers_{i}")(memory, pos, key_mask, train)
        if self.pre_norm:  # the official encoder has a final norm only in the pre-norm variant
            memory = _layer_norm("encoder_norm")(memory)
        encoded = memory

        groups = query_embed.shape[0] if query_embed.ndim == 3 else 1
        query_embed = query_embed.reshape(-1, d)  # [G * N, D], group by group
        query_pos = jnp.broadcast_to(query_embed[None].astype(src.dtype), (b,) + query_embed.shape)
        tgt = jnp.zeros_like(query_pos)  # decoder slots start at zero; the queries enter as positions
        decoder_norm = _layer_norm("decoder_norm")
        hs, attn = [], []
        for i in range(self.num_decoder_layers):
            layer = DecoderLayer(self.num_heads, self.dim_feedforward, self.dropout, self.pre_norm, self.dtype,
                                 name=f"decoder_layers_{i}")
            tgt, weights = layer(tgt, memory, pos, query_pos, key_mask, train, groups)
            hs.append(decoder_norm(tgt))
            attn.append(weights)
        hs, attn = jnp.stack(hs), jnp.stack(attn)  # [L, B, G * N, D], [L, B, G * N, S]
        return hs, attn, encoded
