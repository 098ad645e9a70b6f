"""torch's bilinear resize (`interpolate.linear_taps`) applied on device, jit-able, with torch's numbers.

torch's CPU kernel blends as fused multiply-adds: w0 * a + w1 * b is fma(a, w0, fl(w1 * b)) (see interpolate.py).
XLA's CPU compiler contracts the float32 expression `a * w0 + b * w1` into exactly that fma (checked on x86; other
backends may or may not), so the plain expression gives torch's numbers (`plain_blend`). `device_blend` checks that
once per backend against `interpolate.apply_taps` (float64 products, rounded once) and otherwise uses `exact_blend`:
the same result from error-free float32 transformations, which no contraction changes (~4x the arithmetic).
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from detr_jax.ops.interpolate import apply_taps, linear_taps


def plain_blend(a, w0, b, w1, zero):
    """a * w0 + b * w1 as XLA compiles it (contracted: fma(a, w0, fl(b * w1)), torch's rounding). zero: unused."""
    del zero
    return a * w0 + b * w1


def _opaque(x, zero):
    """x, through integer bits: a product the compiler can no longer fuse into the addition that reads it.
    zero: uint32 0, a run-time value (a jit argument), so that the round trip cannot be folded away."""
    return lax.bitcast_convert_type(lax.bitcast_convert_type(x, jnp.uint32) ^ zero, jnp.float32)


def _split(x):
    """x = hi + lo exactly, hi its 12 leading significand bits, lo the other 12: products of halves are exact."""
    hi = lax.bitcast_convert_type(lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(0xFFFFF000), jnp.float32)
    return hi, x - hi


def exact_blend(a, w0, b, w1, zero):
    """fma(a, w0, fl(b * w1)) in float32 whether or not the compiler contracts: a * w0 as the exact pair
    hi + lo (Dekker), hi + fl(b * w1) as the exact pair s + err (Knuth), then s + (err + lo), one rounding as
    float64 products rounded to float32 give it (up to the same rare double roundings). Finite inputs."""
    q = _opaque(b * w1, zero)
    hi = _opaque(a * w0, zero)
    a_hi, a_lo = _split(a)
    w_hi, w_lo = _split(w0)
    lo = (((a_hi * w_hi - hi) + a_hi * w_lo) + a_lo * w_hi) + a_lo * w_lo  # a * w0 - hi
    s = hi + q
    t = s - hi
    err = (hi - (s - t)) + (q - t)  # hi + q - s
    return s + (err + lo)


def apply_taps_transposed(x, rows, cols, blend=plain_blend, zero=None, channels_last=False):
    """Bilinear resize of x float32 [..., h, w] with the `linear_taps` of each axis, transposed: [..., W, H].

    rows: (i0, i1, w0, w1) of the height ([H] each), cols: those of the width ([W]), as `interpolate.apply_taps`
    takes them (jax or numpy arrays; a crop or a subset of the taps resizes only those pixels). Width first, then
    height, as torch, so the roundings agree. The result is transposed because that is the layout COCO's RLE
    reads (column-major masks); a vmap over a leading axis takes per-image taps.
    blend: `plain_blend` or `exact_blend` (`device_blend()` says which gives torch's numbers); zero: uint32 0.
    channels_last: x is [h, w, ...] and the result [W, H, ...] instead (the same numbers; reductions over the
      channels then read contiguous memory).
    """
    zero = jnp.uint32(0) if zero is None else zero
    (r0, r1, rw0, rw1), (c0, c1, cw0, cw1) = rows, cols
    x = jnp.asarray(x, jnp.float32)
    if channels_last:
        xt, tail = jnp.swapaxes(x, 0, 1), (None,) * (x.ndim - 2)  # [w, h, ...]
        along_width = blend(xt[c0], cw0[(slice(None), None) + tail], xt[c1], cw1[(slice(None), None) + tail], zero)
        return blend(along_width[:, r0], rw0[(slice(None),) + tail], along_width[:, r1], rw1[(slice(None),) + tail],
                     zero)  # [W, H, ...]
    xt = jnp.swapaxes(x, -1, -2)  # [..., w, h]
    along_width = blend(xt[..., c0, :], cw0[:, None], xt[..., c1, :], cw1[:, None], zero)  # [..., W, h]
    return blend(along_width[..., r0], rw0, along_width[..., r1], rw1, zero)  # [..., W, H]


@functools.lru_cache(maxsize=None)
def _blend_of(platform: str):  # platform: the cache key (jit compiles for the default backend)
    x = np.random.default_rng(0).normal(scale=10.0, size=(4, 16, 20)).astype(np.float32)
    rows, cols = linear_taps(16, 61), linear_taps(20, 77)  # ~1 in 4 of these blends is off by an ulp unfused
    expected = np.swapaxes(apply_taps(x, rows, cols), -1, -2)
    for blend in (plain_blend, exact_blend):
        resize = jax.jit(apply_taps_transposed, static_argnums=3)
        if np.array_equal(np.asarray(resize(x, rows, cols, blend, jnp.uint32(0))), expected):
            return blend
    logging.getLogger(__name__).warning(
        "neither blend gives torch's bilinear numbers on the %s backend: masks resized on it may differ from the "
        "official ones by an ulp of their logits (a pixel at the threshold or at a tie can change)", platform)
    return exact_blend


def device_blend():
    """The blend (`plain_blend` or `exact_blend`) whose `apply_taps_transposed` equals `interpolate.apply_taps`
    (torch's numbers) on jax's default backend; checked once per backend, on a small resize (neither: a warning,
    and `exact_blend`)."""
    return _blend_of(jax.default_backend())
