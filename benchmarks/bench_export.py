"""CPU latency per image of the exported ONNX model in onnxruntime against the jitted JAX apply, side by side.

  python benchmarks/bench_export.py                  # DETR-R18 and DETR-R50 at 512x512; appends to BENCHMARKS.md
  python benchmarks/bench_export.py --r50-800        # also DETR-R50 at 800x800
  python benchmarks/bench_export.py --quick          # the official R18 fixture (tiny) at 64x64, 3 runs; < 60 s

Each model is exported by `detr_jax.export.export_model` (jax2onnx; the official, non-padding-invariant detector,
float32, batch 1) into a temporary folder and loaded in onnxruntime's CPU provider with intra-op threads = the
machine's core count. The JAX side is `model.apply` (aux_loss off, float32, the default layer formulations) jitted
with the variables as arguments, as `Predictor` runs it. Both get the same float32 image (standard normal, the
bottom/right eighth zero padding, as `preprocess` pads) at batch 1; after `--warmup` calls each, the runs are
interleaved (onnxruntime, JAX, onnxruntime, JAX, ...) so that load drift on a shared machine hits both, and the
median and p90 of `--runs` calls are reported. The outputs of the two are compared (max |diff| of logits and
boxes), so that both time the same computation.

Models: "r18" and "r50" are random-weight DETRs at the official sizes (hidden 256, 8 heads, FFN 2048, 6 + 6
layers, 100 queries, 91 classes; ResNet-18 / ResNet-50 backbones); "tiny" is the official R18 test fixture
(../shared/fixtures/official_detr_r18_tiny, hidden 64, 2 + 3 layers, 12 queries), or a random model of its sizes
where the fixtures are missing. Random weights do not change the latency. --quick only checks the pipeline: at
64x64 the last stage's map is 2x2, and XLA:CPU rewrites its padded 3x3 convolutions into a slow form (kernel
reversal, operands swapped), so its JAX time says nothing about real input sizes.
"""

import argparse
import importlib.metadata
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from benchmarks import report  # noqa: E402
from detr_jax.ops.xla_flags import set_process_defaults  # noqa: E402 (no jax import)

set_process_defaults()  # before jax is imported, as the entry points do

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(os.environ.get("DETR_JAX_FIXTURES", os.path.join(REPO, "..", "shared", "fixtures")),
                       "official_detr_r18_tiny", "detr_random.pth")
OFFICIAL = dict(num_classes=91, num_queries=100, hidden_dim=256, num_heads=8, num_encoder_layers=6,
                num_decoder_layers=6, dim_feedforward=2048)
TINY = dict(num_classes=91, num_queries=12, hidden_dim=64, num_heads=4, num_encoder_layers=2,
            num_decoder_layers=3, dim_feedforward=128, backbone_depth=18)
MODELS = {"tiny": TINY, "r18": dict(OFFICIAL, backbone_depth=18), "r50": dict(OFFICIAL, backbone_depth=50)}


def random_variables(model, seed: int = 0):
    """Variables of `model` drawn in numpy (no compiled init): kernels ~ N(0, 1/fan_in), batch-norm variances in
    [0.5, 1.5], scales ~1, biases and means ~0, queries ~ N(0, 1); activations stay of order 1."""
    import jax
    import jax.numpy as jnp

    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if "var" in name:
            return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
        if "kernel" in name or "query_embed" in name:
            std = np.prod(s.shape[:-1]) ** -0.5 if "kernel" in name else 1.0
            return rng.normal(0.0, std, s.shape).astype(np.float32)
        return (("scale" in name) + rng.normal(0.0, 0.1, s.shape)).astype(np.float32)

    return jax.tree_util.tree_map(jnp.asarray, jax.tree_util.tree_map_with_path(draw, shapes))


def build(name: str):
    """(model, variables, info, source) of a model name (see the module docstring)."""
    from detr_jax.export import load_for_export
    from detr_jax.models import DETR

    if name == "tiny" and os.path.isfile(FIXTURE):
        model, variables, info = load_for_export(FIXTURE, num_heads=4)
        return model, variables, info, "official R18 fixture weights"
    model = DETR(**MODELS[name])
    info = dict(class_names=[str(i) for i in range(model.num_classes)], size=800, max_size=1333)
    return model, random_variables(model), info, "random weights"


def inputs(hw, seed: int = 0):
    """One float32 [1, H, W, 3] image, standard normal on its top-left 7/8 x 7/8 and zero on the padding, and its
    bool [1, H, W] pixel mask."""
    h, w = hw
    images = np.random.default_rng(seed).standard_normal((1, h, w, 3)).astype(np.float32)
    pixel_mask = np.zeros((1, h, w), bool)
    pixel_mask[0, :h - h // 8, :w - w // 8] = True
    return images * pixel_mask[..., None], pixel_mask


def ort_session(path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def prepare(name: str, hw, threads: int, out_dir: str):
    """Export, load and compile one model at one shape: (run_ort, run_jax, row) with the setup times in row."""
    import jax
    import jax.numpy as jnp

    from detr_jax.export import export_model

    model, variables, info, source = build(name)
    t0 = time.perf_counter()
    export_model(model, variables, info, out_dir, "onnx", 1, hw)
    t_export = time.perf_counter() - t0
    t0 = time.perf_counter()
    session = ort_session(os.path.join(out_dir, "model.onnx"), threads)
    t_load = time.perf_counter() - t0
    size_mb = os.path.getsize(os.path.join(out_dir, "model.onnx")) / 2 ** 20
    detector = model.with_detector(padding_invariant=False, aux_loss=False, dtype=jnp.float32)

    def forward(variables, images, pixel_mask):
        out = detector.apply(variables, images, pixel_mask=pixel_mask)
        return out["pred_logits"], out["pred_boxes"]

    images, pixel_mask = inputs(hw)
    t0 = time.perf_counter()
    compiled = jax.jit(forward).lower(variables, images, pixel_mask).compile()
    t_compile = time.perf_counter() - t0
    feed = {"images": images, "pixel_mask": pixel_mask}
    jax_args = (variables, jnp.asarray(images), jnp.asarray(pixel_mask))

    def run_ort():
        return session.run(["pred_logits", "pred_boxes"], feed)

    def run_jax():
        return jax.block_until_ready(compiled(*jax_args))

    params = sum(x.size for x in jax.tree_util.tree_leaves(variables))
    row = dict(model=name, hw=hw, source=source, params=params, onnx_mb=size_mb, export_s=t_export,
               ort_load_s=t_load, jax_compile_s=t_compile)
    return run_ort, run_jax, row


def measure(run_ort, run_jax, warmup: int, runs: int):
    """Warm-up calls of each, the outputs' max |diff|, then `runs` interleaved timed calls: a dict of results."""
    for _ in range(warmup):
        ort_out = run_ort()
        jax_out = run_jax()
    diff_logits = float(np.abs(ort_out[0] - np.asarray(jax_out[0])).max())
    diff_boxes = float(np.abs(ort_out[1] - np.asarray(jax_out[1])).max())
    times = {"ort": [], "jax": []}
    for _ in range(runs):
        for side, fn in (("ort", run_ort), ("jax", run_jax)):
            t0 = time.perf_counter()
            fn()
            times[side].append(time.perf_counter() - t0)
    result = dict(diff_logits=diff_logits, diff_boxes=diff_boxes)
    for side, values in times.items():
        result[f"{side}_median"] = statistics.median(values)
        result[f"{side}_p90"] = float(np.percentile(values, 90))
    result["ratio"] = result["ort_median"] / result["jax_median"]
    return result


def table(rows, threads: int, args) -> str:
    """The markdown text of the results."""
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("jax", "jaxlib", "onnxruntime",
                                                                          "jax2onnx"))
    lines = [f"Latency per image, batch 1, float32, same input (padded bottom/right by 1/8) to both: onnxruntime "
             f"CPUExecutionProvider (intra_op_num_threads={threads} = the core count, inter_op 1, sequential, "
             f"ORT_ENABLE_ALL) on the ONNX file of `detr_jax.export.export_model` vs the jitted JAX apply "
             f"(`jax.jit`, variables as arguments, XLA:CPU). {args.warmup} warm-up calls each, then {args.runs} "
             f"runs interleaved ORT/JAX/ORT/JAX; ms. {versions}.", "",
             "| model | H x W | params | ORT median | ORT p90 | JAX median | JAX p90 | ORT / JAX | max diff logits "
             "| max diff boxes |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['hw'][0]} x {r['hw'][1]} | {r['params'] / 1e6:.1f} M | "
                     f"{r['ort_median'] * 1e3:.1f} | {r['ort_p90'] * 1e3:.1f} | {r['jax_median'] * 1e3:.1f} | "
                     f"{r['jax_p90'] * 1e3:.1f} | {r['ratio']:.2f}x | {r['diff_logits']:.1e} | "
                     f"{r['diff_boxes']:.1e} |")
    lines += ["", "Setup (s, once per model and shape): " + "; ".join(
        f"{r['model']} {r['hw'][0]}x{r['hw'][1]} ({r['source']}): export {r['export_s']:.1f} "
        f"({r['onnx_mb']:.0f} MiB .onnx), ORT session {r['ort_load_s']:.1f}, JAX compile {r['jax_compile_s']:.1f}"
        for r in rows) + f". 1-min load average at the end: {os.getloadavg()[0]:.1f}."]
    niceness = os.nice(0)
    if args.shared:
        lines += ["", f"The machine was shared with a background training run at normal priority while this ran at "
                  f"niceness {niceness}: absolute times are pessimistic (both sides were slowed, interleaved), the "
                  "ORT / JAX ratio is the result."]
    elif niceness:
        lines += ["", f"Ran at niceness {niceness}."]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="r18,r50", help="comma-separated: tiny, r18, r50")
    parser.add_argument("--size", type=int, default=512, help="square input side")
    parser.add_argument("--r50-800", action="store_true", help="also DETR-R50 at 800x800")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="onnxruntime intra-op threads")
    parser.add_argument("--quick", action="store_true", help="the tiny fixture at 64x64, 3 runs, no append")
    parser.add_argument("--shared", action="store_true", help="say under the table that a training run at normal "
                        "priority shared the machine")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.models, args.size, args.runs, args.warmup, args.r50_800, args.no_append = "tiny", 64, 3, 1, False, True
    cases = [(m, (args.size, args.size)) for m in args.models.split(",")]
    if args.r50_800:
        cases.append(("r50", (800, 800)))
    rows = []
    for name, hw in cases:
        with tempfile.TemporaryDirectory() as out_dir:
            run_ort, run_jax, row = prepare(name, hw, args.threads, out_dir)
            row.update(measure(run_ort, run_jax, args.warmup, args.runs))
        rows.append(row)
        print({k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        del run_ort, run_jax
    device = "no accelerator, onnxruntime and XLA on the CPU"
    report.publish(table(rows, args.threads, args), "Exported ONNX in onnxruntime vs jitted JAX, CPU latency per "
                   "image", device, append=not args.no_append)


if __name__ == "__main__":
    main()
