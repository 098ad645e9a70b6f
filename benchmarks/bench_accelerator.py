"""Numerics and attention kernels on the default JAX device (written for GPUs; runs on a CPU too).

  python benchmarks/bench_accelerator.py              # appends its section to BENCHMARKS.md
  python benchmarks/bench_accelerator.py --no-append  # print only

1. Parity with the official DETR on this device. The converted official R18 fixture
   (`shared/fixtures/official_detr_r18_tiny`, outputs of the PyTorch model on a CPU; DETR_JAX_FIXTURES points
   elsewhere) runs on `jax.devices()[0]` under each `jax_default_matmul_precision` (default, "high",
   "highest") and as a bfloat16 model. The table gives the largest difference from the official outputs over
   the main and auxiliary outputs, against the tolerances of `tests/test_convert.py::test_official_forward_parity`
   (2e-5 on logits, 2e-6 on normalised boxes), and whether every query's best class is the official one.
   On GPUs, float32 matmuls and convolutions use TF32 under JAX's default precision: this shows what that
   costs in agreement with the released checkpoints, and which setting restores it.
2. Attention kernels. The attention core of `detr_jax.models.transformer.MultiheadAttention` (`masked_attention`:
   einsum, float32 softmax with a key-padding mask, einsum) against `jax.nn.dot_product_attention` with
   implementation "xla" and "cudnn" (the fused cuDNN flash-attention kernel), forward + backward, at the shapes
   of DETR-R50 on an 800x1200 batch of 8: encoder self-attention (950 tokens) and decoder cross-attention
   (100 queries over 950 tokens), 8 heads of 32. Each case reports the largest difference from ours, or why
   the implementation refused it.
"""

import argparse
import contextlib
import datetime
import os
import platform
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout
from benchmarks import report  # noqa: E402 (no jax import)
from detr_jax.ops.xla_flags import set_default_xla_flags  # noqa: E402 (no jax import)

# The entry points' XLA flags: without them (Triton GEMM fusions on) XLA:GPU in jax 0.11.2 aborted while
# compiling the gradient of the encoder-attention case (triton_tiling_propagation.cc, openxla/xla#47381).
set_default_xla_flags()
BENCHMARKS_MD = os.path.join(REPO, "BENCHMARKS.md")
DEFAULT_FIXTURES = os.path.join(os.path.dirname(REPO), "shared", "fixtures")
LOGIT_TOL, BOX_TOL = 2e-5, 2e-6  # tests/test_convert.py::test_official_forward_parity (atol)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fixtures", default=os.environ.get("DETR_JAX_FIXTURES", DEFAULT_FIXTURES),
                   help="folder holding official_detr_r18_tiny/ (default: $DETR_JAX_FIXTURES or ../shared/fixtures)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per attention case (median)")
    p.add_argument("--batch", type=int, default=8, help="attention batch")
    p.add_argument("--tokens", type=int, default=950, help="encoder tokens (25 x 38 for 800x1200 at stride 32)")
    p.add_argument("--padded", type=float, default=0.2, help="fraction of each image's keys masked as padding")
    p.add_argument("--no-append", action="store_true", help="print only, do not append to BENCHMARKS.md")
    return p.parse_args(argv)


# ---- 1. parity with the official outputs on this device --------------------------------------------------
def parity_rows(fixtures):
    """[(setting, max |d logits|, max |d boxes|, best class agrees (fraction))] on the official R18 fixture."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from detr_jax.weights.official import load_official_checkpoint
    folder = os.path.join(fixtures, "official_detr_r18_tiny")
    if not os.path.isdir(folder):
        raise SystemExit(f"fixtures folder {folder} not found: pass --fixtures or set DETR_JAX_FIXTURES")
    ref = dict(np.load(os.path.join(folder, "forward.npz")))
    model, variables = load_official_checkpoint(os.path.join(folder, "detr_random.pth"), num_heads=4)
    settings = [("float32, default precision", None, model), ("float32, precision 'high'", "high", model),
                ("float32, precision 'highest'", "highest", model),
                ("bfloat16 model", None, model.clone(dtype=jnp.bfloat16))]
    rows = []
    for name, precision, setting_model in settings:
        with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
            forward = jax.jit(lambda v, x, m, model=setting_model: model.apply(v, x, pixel_mask=m))
            out = forward(variables, ref["images"], ref["pixel_mask"])
            out = jax.device_get(out)
        outs = [out] + list(out["aux_outputs"])
        names = [""] + [f"aux{i}_" for i in range(len(out["aux_outputs"]))]
        d_logits = max(float(np.abs(np.asarray(o["pred_logits"], np.float32) - ref[n + "pred_logits"]).max())
                       for o, n in zip(outs, names))
        d_boxes = max(float(np.abs(np.asarray(o["pred_boxes"], np.float32) - ref[n + "pred_boxes"]).max())
                      for o, n in zip(outs, names))
        agree = float(np.mean(np.argmax(out["pred_logits"], -1) == np.argmax(ref["pred_logits"], -1)))
        rows.append((name, d_logits, d_boxes, agree))
        print(f"parity {name}: logits {d_logits:.2e}, boxes {d_boxes:.2e}, best class agrees {agree:.0%}", flush=True)
    return rows


# ---- 2. attention kernels ----------------------------------------------------------------------------------
def attention_inputs(batch, queries, tokens, heads, head_dim, padded, dtype, seed=0):
    """q [B, Sq, H, hd] (scaled), k, v [B, Sk, H, hd], key_mask bool [B, Sk] (bottom/right padding: a suffix)."""
    import jax
    import jax.numpy as jnp
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(kq, (batch, queries, heads, head_dim), dtype) * head_dim ** -0.5
    k = jax.random.normal(kk, (batch, tokens, heads, head_dim), dtype)
    v = jax.random.normal(kv, (batch, tokens, heads, head_dim), dtype)
    # image i keeps a different number of real tokens; image 0 is unpadded
    real = [tokens - int(padded * tokens * i / max(batch - 1, 1)) for i in range(batch)]
    key_mask = jnp.arange(tokens)[None, :] < jnp.array(real)[:, None]
    return q, k, v, key_mask


def attention_impls():
    """name -> f(q, k, v, key_mask) -> [B, Sq, H, hd]."""
    import jax

    from detr_jax.models.layers import fused_attention
    from detr_jax.models.transformer import masked_attention

    def ours(q, k, v, key_mask):
        return masked_attention(q, k, v, key_mask)[0]

    def jax_nn(implementation, full_mask=False):
        def f(q, k, v, key_mask):  # q is already scaled, as in ours
            mask = key_mask[:, None, None, :]  # [B, 1, 1, Sk]
            if full_mask:  # cuDNN takes the mask as a bias of the full [B, 1, Sq, Sk] shape only
                mask = jax.numpy.broadcast_to(mask, (q.shape[0], 1, q.shape[1], k.shape[1]))
            return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0, implementation=implementation)
        return f

    return {"detr_jax (einsum, f32 softmax)": ours, "jax.nn.dot_product_attention xla": jax_nn("xla"),
            "jax.nn.dot_product_attention cudnn": jax_nn("cudnn"),
            "jax.nn.dot_product_attention cudnn, mask [B, 1, Sq, Sk]": jax_nn("cudnn", full_mask=True),
            # What detr_jax's attention_impl "cudnn" runs: real keys sorted first, per-image key counts.
            "detr_jax fused_attention cudnn (keys sorted, seq lengths)":
                lambda q, k, v, key_mask: fused_attention(q, k, v, key_mask, "cudnn")}


def time_attention(fn, args, repeats):
    """(median seconds of forward + backward, output) for fn(q, k, v, mask), gradient w.r.t. q, k, v."""
    import jax
    import jax.numpy as jnp

    def loss(q, k, v, mask):
        return jnp.sum(fn(q, k, v, mask).astype(jnp.float32) ** 2)

    fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    return report.median_seconds(fwd_bwd, *args, repeats=repeats), jax.jit(fn)(*args)


def attention_rows(args):
    """[(case, dtype, impl, ms or None, max |d out| vs ours or the refusal)]."""
    import jax.numpy as jnp
    import numpy as np
    cases = [("encoder self-attention", args.tokens), ("decoder cross-attention", 100)]
    rows = []
    for case, queries in cases:
        for dtype in (jnp.float32, jnp.bfloat16):
            inputs = attention_inputs(args.batch, queries, args.tokens, 8, 32, args.padded, dtype)
            reference = None
            for name, fn in attention_impls().items():
                label = f"[{args.batch}, {queries} x {args.tokens}, 8 x 32]"
                try:
                    seconds, out = time_attention(fn, inputs, args.repeats)
                except Exception as e:  # an implementation that does not support this case says why
                    reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
                    rows.append((f"{case} {label}", jnp.dtype(dtype).name, name, None, f"refused: {reason}"))
                    print(f"attention {case} {jnp.dtype(dtype).name} {name}: refused ({reason})", flush=True)
                    continue
                out = np.asarray(out, np.float32)
                reference = out if reference is None else reference
                diff = float(np.abs(out - reference).max())
                rows.append((f"{case} {label}", jnp.dtype(dtype).name, name, seconds * 1e3, f"{diff:.1e}"))
                print(f"attention {case} {jnp.dtype(dtype).name} {name}: {seconds * 1e3:.3f} ms, diff {diff:.1e}",
                      flush=True)
    return rows


def system_info():
    import flax
    import jax
    import jaxlib
    dev = jax.devices()[0]
    return {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "device": f"{dev.platform}: {dev.device_kind} (x{jax.device_count()})",
            "versions": f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, flax {flax.__version__}, "
                        f"python {platform.python_version()}; XLA_FLAGS `{os.environ.get('XLA_FLAGS', '')}`"}


def main(argv=None):
    args = parse_args(argv)
    info = system_info()
    print(info, flush=True)
    parity = parity_rows(args.fixtures)
    attention = attention_rows(args)
    lines = [f"\n## Numerics and attention kernels on {info['device']} ({info['date']})\n",
             "`python benchmarks/bench_accelerator.py` - " + info["versions"] + ".\n",
             "Official R18 fixture (random weights, 2 padded images) on this device, largest difference from the "
             f"official PyTorch outputs over main + aux outputs (the parity test allows {LOGIT_TOL:g} on logits and "
             f"{BOX_TOL:g} on boxes):\n",
             "| setting | max abs diff, logits | max abs diff, boxes (normalised cxcywh) | within the test's tolerance "
             "| best class = official |", "|---|---|---|---|---|"]
    for name, d_logits, d_boxes, agree in parity:
        ok = "yes" if d_logits <= LOGIT_TOL and d_boxes <= BOX_TOL else "no"
        lines.append(f"| {name} | {d_logits:.2e} | {d_boxes:.2e} | {ok} | {agree:.0%} |")
    lines += ["", f"Attention core, forward + backward (gradient w.r.t. q, k, v), median of {args.repeats} calls; "
              f"keys {args.padded:.0%} padded at most (key-padding mask); difference from detr_jax's output:\n",
              "| case | dtype | implementation | ms | max abs diff vs detr_jax |", "|---|---|---|---|---|"]
    for case, dtype, name, ms, diff in attention:
        lines.append(f"| {case} | {dtype} | {name} | {'-' if ms is None else f'{ms:.3f}'} | {diff} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_append:
        with open(BENCHMARKS_MD, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
