"""torch.nn.functional.interpolate's rules on numpy, so that resized masks and padding masks are torch's numbers.

- `nearest_index`: torch's legacy `mode="nearest"` source index, the one rule used by the backbone's padding mask,
  the mask head's FPN upsampling, the data layer's mask resize and the panoptic post-processing.
- `resize_nearest`, `resize_bilinear` (align_corners=False), and the bilinear taps they are made of.
"""

import numpy as np

# torch's CPU bilinear kernel (x86 builds with AVX2 + FMA; checked on torch 2.13) computes its source
# coordinates and its blends as fused multiply-adds. Unfused float32 moves a coordinate by an ulp and the
# result by up to ~1e-4 on mask logits of ~10, enough to flip near-tie argmaxes of the panoptic masks.
# A product of two float32 numbers is exact in float64, so float64 arithmetic rounded once to float32 gives
# the fused results (up to rare double roundings).

def linear_taps(in_size, out_size):
    """Source rows (or columns) and weights of torch's bilinear resize, align_corners=False.

    Half-pixel centres: output index d samples input coordinate (d + 0.5) * in / out - 0.5, clamped at 0.
    Computed in float32 with torch's roundings, so the weights are the same numbers.
    Returns i0, i1 int [out_size] and w0, w1 float32 [out_size], with output = w0 * x[i0] + w1 * x[i1].
    """
    scale = np.float32(in_size) / np.float32(out_size)
    centres = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    src = np.maximum((np.float64(scale) * centres - 0.5).astype(np.float32), np.float32(0))  # fused
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    return i0, i1, np.float32(1) - w1, w1


def _blend(a, w0, b, w1):
    """float32 fma(a, w0, b * w1), torch's rounding of w0 * a + w1 * b. a, b hold float32 values."""
    return (a * w0.astype(np.float64) + (b * w1).astype(np.float32)).astype(np.float32)


def apply_taps(x, rows, cols):
    """Bilinear resize of x float32 [..., h, w] with the `linear_taps` of each axis -> float32 [..., H, W].

    Width first, then height, as torch's CPU kernel, so the roundings agree. Each input row is interpolated
    along the width once (h rows, not H): the rows of the output reuse them.
    """
    r0, r1, rw0, rw1 = rows
    c0, c1, cw0, cw1 = cols
    x = np.asarray(x, np.float64)  # once, on the small input: exact products in `_blend`
    along_width = _blend(x[..., c0], cw0, x[..., c1], cw1)  # [..., h, W]
    return _blend(along_width[..., r0, :], rw0[:, None], along_width[..., r1, :], rw1[:, None])


def resize_bilinear(x, size):
    """`F.interpolate(x, size, mode="bilinear", align_corners=False)` for x float [..., h, w] -> [..., H, W].

    size: (H, W). The result is float32, equal to torch's CPU numbers whenever H + W > 128; for smaller
    outputs torch switches to a separable kernel with renormalised weights (differences ~1e-6 relative).
    """
    x = np.asarray(x, np.float32)
    (h, w), (out_h, out_w) = x.shape[-2:], size
    return apply_taps(x, linear_taps(h, out_h), linear_taps(w, out_w))


def nearest_index(in_size, out_size):
    """Source index of each output index in torch's `mode="nearest"`: floor(d * in / out), in float32."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(src, in_size - 1)


def resize_nearest(x, size):
    """`F.interpolate(x, size, mode="nearest")` (torch's legacy nearest, not "nearest-exact").

    x [..., h, w] of any dtype -> [..., H, W] of the same dtype; size (H, W).
    """
    (h, w), (out_h, out_w) = x.shape[-2:], size
    return x[..., nearest_index(h, out_h), :][..., nearest_index(w, out_w)]
