"""Train-step and inference speed: detr_jax against HF transformers' DetrForObjectDetection, same weights.

  python benchmarks/bench_train.py             # CPU: batch 2 x 512x512 (~2 min on 2 idle cores); GPU: 8 x 800x1200
  python benchmarks/bench_train.py --small     # a quick check: batch 1 x 256x256, fewer steps
  python benchmarks/bench_train.py --batch 4 --height 640 --width 640 --rounds 4 --no-append
  python benchmarks/bench_train.py --sweep     # CPU optimisation table (~18 min on 2 idle cores)

Both sides run DETR-R50 (hidden 256, 6 + 6 layers, 8 heads, FFN 2048, 100 queries, 91 classes), the HF model
built offline with random weights and converted with `detr_jax.convert_hf.load_hf_detr`, so both compute with
the same weights. Dropout is 0 on both sides. A train step is forward + Hungarian matching (scipy on the host,
on both sides) + loss with the auxiliary decoder losses + backward + gradient clipping (0.1) + AdamW (lr 1e-4,
backbone 1e-5, weight decay 1e-4), on the official trainable set: ResNet stem and stage 1 frozen. HF's own
`DetrConvEncoder` meant to do that but tests "stage.1" against names like "stages.1", which freezes the whole
backbone; we set `requires_grad` explicitly so torch trains stages 2-4 as the official DETR (and detr_jax) do.
HF runs with `auxiliary_loss=True` here (its forward then feeds the normalised decoder output to the next
layer, one extra LayerNorm per layer: same cost, slightly other numbers; the inference comparison uses False).

JAX and PyTorch are timed in alternating rounds in one process, so both see the same machine load; the ratios
are the numbers to read on a shared machine. Peak memory (VmHWM, the resident-set high-water mark) is measured in
separate processes, one per side, each building its model and running a few train steps.

The script runs unchanged on a GPU machine: JAX uses jax.devices()[0], torch uses cuda when available;
--bf16 runs JAX with dtype=bfloat16 and torch under autocast(bfloat16).
"""

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout
BENCHMARKS_MD = os.path.join(REPO, "BENCHMARKS.md")

# The XLA flags the entry points set (detr_jax/xla_flags.py), used here by default. On CPU, region analysis lets
# XLA's copy insertion see that the AdamW update may overwrite the donated optimizer state in place: without it
# every step copies all of mu and nu first (472 copies, ~5% of a CPU step). On GPU, Triton GEMM fusions are off.
# The other flags tried are in FLAG_VARIANTS (--sweep) and BENCHMARKS.md.
from detr_jax.xla_flags import default_xla_flags_string  # noqa: E402 (no jax import)

DEFAULT_XLA_FLAGS = default_xla_flags_string()

HF_ARCH = dict(d_model=256, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8, decoder_attention_heads=8,
               encoder_ffn_dim=2048, decoder_ffn_dim=2048, num_queries=100, num_labels=91)
RESNET50 = dict(layer_type="bottleneck", depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048])
LR, LR_BACKBONE, WEIGHT_DECAY, GRAD_CLIP = 1e-4, 1e-5, 1e-4, 0.1
COCO_MEAN_OBJECTS = 7.3  # objects per COCO train image


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=None, help="images per step (CPU 2, GPU 8)")
    p.add_argument("--height", type=int, default=None, help="image height (CPU 512, GPU 800)")
    p.add_argument("--width", type=int, default=None, help="image width (CPU 512, GPU 1200)")
    p.add_argument("--small", action="store_true", help="quick run: batch 1 x 256x256, 2 rounds of 1 step")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3, --small 2)")
    p.add_argument("--steps", type=int, default=None, help="steps per side per round (default 2, --small 1)")
    p.add_argument("--slots", type=int, default=20, help="padded target slots per image (M)")
    p.add_argument("--match-batch", type=int, default=64, help="images for the large-batch matcher measurement")
    p.add_argument("--bf16", action="store_true", help="bfloat16 compute (JAX dtype, torch autocast)")
    p.add_argument("--xla-flags", default=None,
                   help=f"extra XLA_FLAGS for JAX (default: {DEFAULT_XLA_FLAGS!r}); appended to $XLA_FLAGS")
    p.add_argument("--cpus", type=int, default=None, help="pin this process (and its children) to the first N "
                   "CPUs before JAX and torch start: both then use N threads (default: all)")
    p.add_argument("--no-malloc-tuning", action="store_true", help=f"do not re-run under GLIBC_TUNABLES="
                   f"{MALLOC_TUNABLES} (see MALLOC_TUNABLES)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-append", action="store_true", help="print only, do not append to BENCHMARKS.md")
    p.add_argument("--sweep", action="store_true", help="time the CPU optimisations: code variants (CODE_VARIANTS) "
                   "alternating with torch in one process, XLA flags (FLAG_VARIANTS) in child processes; appends "
                   "that table instead")
    p.add_argument("--variants", default=None, help="comma-separated subset of the sweep variants")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# glibc malloc: no mmap for large blocks and no trimming, so memory freed by one step is reused by the next.
# XLA:CPU allocates the ~0.8 GB of temporaries of a train step afresh at every call; by default glibc serves such
# blocks with new mmaps that the kernel zero-fills on first touch (~226k page faults, ~0.4 CPU s per step at
# batch 2 x 512x512). Set for the whole process, so for PyTorch too (it gains a few percent). glibc reads it at
# start-up: main() re-executes the script with it unless it is already set or --no-malloc-tuning is given.
MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184"


def reexec_with_malloc_tunables(args, argv):
    if args.no_malloc_tuning or args._child or "GLIBC_TUNABLES" in os.environ or platform.system() != "Linux":
        return
    env = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES)
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + list(sys.argv[1:] if argv is None
                                                                                   else argv), env)


def pin_cpus(n):
    if n:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:n])


def set_xla_flags(extra):
    flags = DEFAULT_XLA_FLAGS if extra is None else extra
    if flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()


# ---- shapes and data ---------------------------------------------------------------------------------------
def resolve_sizes(args, on_gpu):
    if args.small:
        defaults = (1, 256, 256, 2, 1)
    elif on_gpu:
        defaults = (8, 800, 1200, 3, 3)
    else:
        defaults = (2, 512, 512, 3, 2)
    names = ("batch", "height", "width", "rounds", "steps")
    for name, value in zip(names, defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def make_batch(batch, height, width, slots, seed=0):
    """Random normalised images (no padding) and COCO-like targets: numpy dict + the HF `labels` list."""
    import numpy as np
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch, height, width, 3), dtype=np.float32)
    counts = np.clip(rng.poisson(COCO_MEAN_OBJECTS, batch), 1, slots)
    mask = np.arange(slots)[None, :] < counts[:, None]
    labels = np.where(mask, rng.integers(0, 91, (batch, slots)), 0).astype(np.int32)
    centers = rng.uniform(0.2, 0.8, (batch, slots, 2))
    sizes = rng.uniform(0.05, 0.4, (batch, slots, 2))
    boxes = np.where(mask[..., None], np.concatenate([centers, sizes], -1), 0).astype(np.float32)
    return {"images": images, "pixel_mask": np.ones((batch, height, width), bool), "labels": labels,
            "boxes": boxes, "mask": mask}


def random_predictions(layers, batch, queries, classes, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((layers, batch, queries, classes + 1)).astype(np.float32)
    boxes = 1 / (1 + np.exp(-rng.standard_normal((layers, batch, queries, 4)))).astype(np.float32)
    return logits, boxes


# ---- the two models ----------------------------------------------------------------------------------------
def build_hf(device, seed=0):
    """HF DETR-R50 with random weights, dropout 0, aux loss on, the official trainable set."""
    import torch
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig
    torch.manual_seed(seed)
    config = DetrConfig(backbone_config=ResNetConfig(out_features=["stage4"], **RESNET50), dropout=0.0,
                        attention_dropout=0.0, activation_dropout=0.0, auxiliary_loss=True, **HF_ARCH)
    model = DetrForObjectDetection(config).to(device)
    for name, param in model.named_parameters():
        in_backbone = name.startswith("model.backbone.")
        trainable_stage = any(f"stages.{i}." in name for i in (1, 2, 3))
        param.requires_grad_(not in_backbone or trainable_stage)
    return model.train()


def torch_param_groups(model):
    backbone = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("model.backbone.")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("model.backbone.")]
    return [{"params": rest, "lr": LR}, {"params": backbone, "lr": LR_BACKBONE}]


def make_torch_train_step(model, batch, device, bf16):
    import torch
    pixels = torch.from_numpy(batch["images"]).permute(0, 3, 1, 2).contiguous().to(device)
    pixel_mask = torch.from_numpy(batch["pixel_mask"]).long().to(device)
    labels = [{"class_labels": torch.from_numpy(batch["labels"][i][batch["mask"][i]]).long().to(device),
               "boxes": torch.from_numpy(batch["boxes"][i][batch["mask"][i]]).to(device)}
              for i in range(len(batch["images"]))]
    groups = torch_param_groups(model)
    trainable = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=LR, weight_decay=WEIGHT_DECAY)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step():
        model.train()
        model.config.auxiliary_loss = True
        with autocast:
            out = model(pixel_values=pixels, pixel_mask=pixel_mask, labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, GRAD_CLIP)
        opt.step()
        return out.loss.item()  # waits for the device

    def infer():
        model.eval()
        model.config.auxiliary_loss = False
        with torch.inference_mode(), autocast:
            out = model(pixel_values=pixels, pixel_mask=pixel_mask)
        return float(out.logits[0, 0, 0])  # waits for the device

    return step, infer


def jax_config():
    import ml_collections
    return ml_collections.ConfigDict(dict(
        seed=0,
        model=dict(train_stem=False),  # the official trainable set: stem and stage 1 frozen
        # The host matcher on both sides (scipy), as HF does.
        loss=dict(eos_coef=0.1, cost_class=1.0, cost_bbox=5.0, cost_giou=2.0, ce_loss_coef=1.0, bbox_loss_coef=5.0,
                  giou_loss_coef=2.0, bbox_loss_type="l1", matcher="host"),
        optimizer=dict(lr=LR, lr_backbone=LR_BACKBONE, weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP,
                       schedule="constant", warmup_steps=0, lr_drop_epochs=200, grad_accum_steps=1)))


def jax_detr(bf16):
    """The same DETR as `load_hf_detr` gives for the HF model above, freshly initialised (no torch needed)."""
    import jax.numpy as jnp
    from detr_jax.models.detr import DETR
    return DETR(num_classes=91, num_queries=100, hidden_dim=256, num_heads=8, num_encoder_layers=6,
                num_decoder_layers=6, dim_feedforward=2048, dropout=0.0, backbone_depth=50,
                dtype=jnp.bfloat16 if bf16 else jnp.float32)


def make_jax_train_step(model, variables, batch):
    """(step() -> loss, state holder): `detr_jax.train.make_train_step` on the global batch."""
    import jax
    from detr_jax import sharding
    from detr_jax.train import build_optimizer, make_train_step
    config = jax_config()
    mesh = sharding.make_mesh()
    tx, _, _ = build_optimizer(config, variables["params"], total_steps=10 ** 6, steps_per_epoch=10 ** 4)
    state = {"step": jax.numpy.zeros((), jax.numpy.int32), "params": variables["params"],
             "frozen": variables["frozen"], "opt_state": tx.init(variables["params"]),
             "nonfinite_step": jax.numpy.full((), -1, jax.numpy.int32)}
    state = jax.tree_util.tree_map(lambda x: jax.numpy.array(x, copy=True), state)  # the step donates it
    holder = {"state": jax.device_put(state, sharding.replicated(mesh))}
    device_batch = sharding.global_batch(batch, mesh)
    train_step = make_train_step(model, tx, config, mesh)

    def step():
        holder["state"], metrics = train_step(holder["state"], device_batch)
        jax.block_until_ready((holder["state"], metrics))
        return float(metrics["loss"])

    step.flops = lambda: lowered_flops(train_step, holder["state"], device_batch)
    return step


def make_jax_infer(model, variables, batch):
    import jax
    infer_model = model.clone(aux_loss=False)
    apply = jax.jit(lambda v, x, m: infer_model.apply(v, x, pixel_mask=m))
    images, pixel_mask = jax.device_put(batch["images"]), jax.device_put(batch["pixel_mask"])

    def infer():
        out = apply(variables, images, pixel_mask)
        return float(jax.block_until_ready(out["pred_logits"])[0, 0, 0])

    infer.flops = lambda: lowered_flops(apply, variables, images, pixel_mask)
    return infer


def lowered_flops(jitted, *args):
    """Floating-point operations of one call of `jitted`, by XLA's cost analysis of the lowered (unoptimised)
    program: convolutions, matmuls and elementwise work, forward and backward; the host matcher counts 0."""
    cost = jitted.lower(*args).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


# Dense bf16 tensor-core peaks (TFLOP/s, vendor datasheets, SXM parts) for the MFU column: model FLOP/s over
# this peak, whatever precision the run used (float32 matmuls run as TF32 on these GPUs under JAX's defaults).
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}


def bf16_peak_tflops(device_kind):
    for name, peak in BF16_PEAK_TFLOPS.items():
        if name in device_kind:
            return peak
    return None


# ---- timing ------------------------------------------------------------------------------------------------
def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed_cpu(fn):
    """(wall seconds, CPU seconds of this process: all its threads, user + system) of one call."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def alternate(fns, rounds, steps):
    """{name: [(wall s, cpu s) per call]}: `steps` calls of each fn per round, the order reversed every other round."""
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            for _ in range(steps):
                times[name].append(timed_cpu(fns[name]))
    return times


def median(xs):
    import numpy as np
    return float(np.median(xs))


def install_host_timer():
    """Wrap the matcher's host function (before the step is traced) to record its wall time per call."""
    from detr_jax import matcher
    original = matcher._assign_on_host
    calls = []

    def timed_assign(costs, tgt_mask):
        t0 = time.perf_counter()
        out = original(costs, tgt_mask)
        calls.append(time.perf_counter() - t0)
        return out

    matcher._assign_on_host = timed_assign
    return calls


def time_match(batch_size, slots, repeats=5, layers=6, seed=0):
    """Seconds for `hungarian_match` alone, jitted: on-device costs -> host transfer -> scipy -> indices back."""
    import jax
    from detr_jax.matcher import hungarian_match
    logits, boxes = random_predictions(layers, batch_size, 100, 91, seed)
    t = make_batch(batch_size, 8, 8, slots, seed)
    targets = {k: jax.device_put(t[k]) for k in ("labels", "boxes", "mask")}
    logits, boxes = jax.device_put(logits), jax.device_put(boxes)
    match = jax.jit(lambda lg, bx, tg: hungarian_match(lg, bx, tg, cost_class=1.0, cost_bbox=5.0, cost_giou=2.0))
    jax.block_until_ready(match(logits, boxes, targets))
    return median([timed(lambda: jax.block_until_ready(match(logits, boxes, targets))) for _ in range(repeats)])


# ---- system ------------------------------------------------------------------------------------------------
def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_pressure():
    """', CPU pressure (PSI) some avg10 N%': the share of time runnable tasks waited for a CPU; '' if unknown."""
    try:
        with open("/proc/pressure/cpu") as f:
            return ", CPU pressure (PSI) some avg10 " + f.readline().split()[1].split("=")[1] + "%"
    except (OSError, IndexError):
        return ""


def system_info():
    import flax
    import jax
    import jaxlib
    import torch
    import transformers
    dev = jax.devices()[0]
    torch_dev = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                 else f"cpu ({torch.get_num_threads()} threads)")
    return {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "nproc": os.cpu_count(), "cpu": cpu_model(),
        "load": " ".join(f"{x:.1f}" for x in os.getloadavg()) + cpu_pressure(),
        "versions": f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, flax {flax.__version__}, "
                    f"torch {torch.__version__}, transformers {transformers.__version__}, "
                    f"python {platform.python_version()}",
        "jax_device": f"{dev.platform}: {dev.device_kind} (x{jax.device_count()})",
        "torch_device": torch_dev,
        "device_kind": dev.device_kind,
        "precision": f"JAX jax_default_matmul_precision={jax.config.jax_default_matmul_precision}; torch "
                     f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}, "
                     f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }


# ---- children: peak memory and sweep timings ---------------------------------------------------------------
def rss_mb(field="VmHWM"):
    """This address space's resident set, MB: VmHWM (high-water mark) or VmRSS (now), from /proc/self/status.

    `getrusage(RUSAGE_SELF).ru_maxrss` would be the same high-water mark, but Linux carries it over fork() and
    execve(), so a child started from this (several GB) process would report the parent's peak; VmHWM belongs to
    the new address space only. Falls back to ru_maxrss where /proc is missing.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_main(args):
    """One side alone in this process; prints one JSON line. Kinds: jax, torch (memory), jax-time, torch-time."""
    import numpy as np
    kind = args._child
    batch = make_batch(args.batch, args.height, args.width, args.slots)
    result = {"kind": kind}
    if kind == "flops":  # lowering only (no compile, no run): the FLOP counts of the two programs
        import jax
        model = jax_detr(args.bf16)
        variables = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3), np.float32))
        result["train"] = make_jax_train_step(model, variables, batch).flops()
        result["infer"] = make_jax_infer(model, variables, batch).flops()
        print("CHILD_RESULT " + json.dumps(result), flush=True)
        return
    if kind.startswith("jax"):
        import jax
        rss0 = rss_mb("VmRSS")
        model = jax_detr(args.bf16)
        variables = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3), np.float32))
        step = make_jax_train_step(model, variables, batch)
        result["first_s"] = timed(step)
        result["times"], result["cpu"] = zip(*[timed_cpu(step) for _ in range(args.steps)])
        dev = jax.devices()[0]
        stats = dev.memory_stats() if dev.platform != "cpu" else None
        if stats and "peak_bytes_in_use" in stats:
            result["device_peak_mb"] = stats["peak_bytes_in_use"] / 2 ** 20
    else:
        import torch
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        rss0 = rss_mb("VmRSS")
        model = build_hf(device)
        step, _ = make_torch_train_step(model, batch, device, args.bf16)
        result["first_s"] = timed(step)
        result["times"], result["cpu"] = zip(*[timed_cpu(step) for _ in range(args.steps)])
        if device.type == "cuda":
            result["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    result["baseline_rss_mb"] = rss0  # after imports, before the model
    result["peak_rss_mb"] = rss_mb("VmHWM")
    print("CHILD_RESULT " + json.dumps(result), flush=True)


def run_child(args, kind, env=None, steps=None, cpus=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", kind, "--batch", str(args.batch), "--height",
           str(args.height), "--width", str(args.width), "--slots", str(args.slots), "--steps",
           str(steps or args.steps), "--xla-flags", ""]
    if cpus:
        cmd += ["--cpus", str(cpus)]
    if args.bf16:
        cmd.append("--bf16")
    child_env = dict(os.environ)
    for key, value in (env or {}).items():  # None: unset
        if value is None:
            child_env.pop(key, None)
        else:
            child_env[key] = value
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("CHILD_RESULT "):
            return json.loads(line[len("CHILD_RESULT "):])
    raise RuntimeError(f"child {kind} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


# ---- the optimisation sweep (CPU) --------------------------------------------------------------------------
# Each "before:" patch puts back, while the train step is traced, what the library computed before one of the
# CPU optimisations (same parameters, same numbers), so each row shows what that change buys.
def _nn_conv(features, kernel, stride=1, dtype=None, name=None, use_bias=False, kernel_init=None, bias_init=None):
    import flax.linen as nn
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=[(pad, pad), (pad, pad)],
                   use_bias=use_bias, name=name, dtype=dtype, kernel_init=kernel_init,
                   **({"bias_init": bias_init} if bias_init else {}))


def _before_no_freeze():
    from detr_jax.models import detr
    resnet = detr.ResNet
    return detr, "ResNet", lambda *a, **k: resnet(*a, **dict(k, freeze_stem_and_layer1=False))


def _before_conv1x1_nn_conv():
    from detr_jax.models import backbone
    return backbone, "Conv1x1", lambda features, stride=1, dtype=None, name=None: _nn_conv(
        features, 1, stride, dtype, name, kernel_init=backbone._KAIMING_FAN_OUT)


def _before_conv1x1_4d_dot():
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from detr_jax.models import backbone

    class Conv1x1DotGeneral(backbone.Conv1x1):  # the product on the 4-D activation, not flattened
        @nn.compact
        def __call__(self, x):
            kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features), jnp.float32)
            x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
            x = x[:, ::self.stride, ::self.stride]
            return jax.lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())))
    return backbone, "Conv1x1", Conv1x1DotGeneral


def _before_dense_3d():
    from detr_jax.models import transformer
    return transformer, "dense_2d", lambda fn, x: fn(x)


def _before_dense_3d_heads():
    from detr_jax.models import detr
    return detr, "dense_2d", lambda fn, x: fn(x)


def _before_strided_nn_conv():
    from detr_jax.models import backbone
    return backbone, "Conv3x3Stride2", lambda features, dtype=None, name=None: _nn_conv(
        features, 3, 2, dtype, name, kernel_init=backbone._KAIMING_FAN_OUT)


def _before_input_proj_nn_conv():
    from detr_jax.models import detr
    return detr, "Conv1x1", lambda features, dtype=None, kernel_init=None, use_bias=False, bias_init=None, name=None: \
        _nn_conv(features, 1, 1, dtype, name, use_bias, kernel_init, bias_init)


CODE_VARIANTS = {  # name -> (patches, description)
    "default": ((), "the library now (all changes below)"),
    "before:no-freeze": ((_before_no_freeze,), "gradients also computed for the stem and stage 1 (then zeroed)"),
    "before:conv1x1-nn.Conv": ((_before_conv1x1_nn_conv,), "ResNet 1x1 convolutions as nn.Conv"),
    "before:conv1x1-4d-dot": ((_before_conv1x1_4d_dot,), "ResNet 1x1 convolutions as a 4-D dot_general"),
    "before:dense-3d": ((_before_dense_3d, _before_dense_3d_heads), "transformer/head Dense layers on 3-D/4-D inputs"),
    "before:strided-nn.Conv": ((_before_strided_nn_conv,), "stride-2 3x3 convolutions as nn.Conv (zero-dilated "
                               "input gradient)"),
    "before:input_proj-nn.Conv": ((_before_input_proj_nn_conv,), "input_proj as nn.Conv"),
    "before:all": ((_before_no_freeze, _before_conv1x1_nn_conv, _before_dense_3d, _before_dense_3d_heads,
                    _before_strided_nn_conv, _before_input_proj_nn_conv), "the library before this work"),
}
_YNN = "--xla_cpu_experimental_ynn_fusion_type="
FLAG_VARIANTS = {  # name -> (XLA_FLAGS appended after the defaults (the last setting wins), CPUs, description)
    "flags:default": ("", None, f"default flags `{DEFAULT_XLA_FLAGS or '(none)'}`"),
    "flags:no-region-analysis": ("--xla_cpu_copy_insertion_use_region_analysis=false", None,
                                 "XLA's default copy insertion (472 optimizer-state copies per step)"),
    "flags:ynn-no-dot": (_YNN + "-individual_dot", None, "dots by Eigen instead of YNNPACK"),
    "flags:ynn-no-conv": (_YNN + "-individual_convolution", None, "convolutions by Eigen instead of YNNPACK"),
    "flags:ynn-off": (_YNN + "-individual_dot,-individual_convolution", None, "no YNNPACK: Eigen for both"),
    "flags:xnn-dot": (_YNN + "-individual_dot --xla_cpu_experimental_xnn_fusion_type=individual_dot", None,
                      "dots by XNNPACK"),
    "flags:onednn-dot": (_YNN + "-individual_dot --xla_cpu_experimental_onednn_fusion_type=dot", None,
                         "dots by oneDNN"),
    "flags:onednn": ("--xla_cpu_use_onednn=true", None, "oneDNN op rewrites on"),
    "flags:legacy-runtime": ("--xla_cpu_use_thunk_runtime=false", None, "thunk runtime off"),
    "flags:eigen-1-thread": ("--xla_cpu_multi_thread_eigen=false", None, "single-threaded Eigen calls"),
    "flags:concurrency-scheduler": ("--xla_cpu_enable_concurrency_optimized_scheduler=true", None,
                                    "concurrency-optimised scheduler"),
    "flags:xnn-graph": ("--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY", None,
                        "XNNPACK graph fusion (greedy)"),
    "threads:1-cpu": ("", 1, "JAX and torch each pinned to 1 CPU (1 thread each; robust to other jobs)"),
    "env:glibc-malloc-default": ("", None, "glibc malloc defaults (GLIBC_TUNABLES unset: fresh zero-filled mmaps for "
                                 "XLA's temporaries at every step)"),
}
FLAG_ENV = {"env:glibc-malloc-default": {"GLIBC_TUNABLES": None}}


@contextlib.contextmanager
def patched(patches):
    """Apply `patches` (functions returning (module, attribute, value)), restoring the attributes on exit."""
    saved = []
    try:
        for make in patches:
            module, attr, value = make()
            saved.append((module, attr, getattr(module, attr)))
            setattr(module, attr, value)
        yield
    finally:
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)


def sweep(args, info):
    """CPU optimisation table: code variants alternated with torch in this process, XLA flags in child processes."""
    import jax
    import numpy as np
    import torch
    selected = args.variants.split(",") if args.variants else list(CODE_VARIANTS) + list(FLAG_VARIANTS)
    batch = make_batch(args.batch, args.height, args.width, args.slots)
    model = jax_detr(args.bf16)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3), np.float32))
    fns, compile_s = {}, {}
    for name in [n for n in CODE_VARIANTS if n in selected]:
        with patched(CODE_VARIANTS[name][0]):
            fns[name] = make_jax_train_step(model, variables, batch)
            compile_s[name] = timed(fns[name])  # traced (with the patches) and compiled here
        print(f"{name}: first call {compile_s[name]:.1f} s", flush=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch_step, _ = make_torch_train_step(build_hf(device), batch, device, args.bf16)
    fns["torch"] = torch_step
    for fn in fns.values():
        fn()
    times = alternate(fns, args.rounds, args.steps)
    wall = {n: median([w for w, _ in t]) for n, t in times.items()}
    cpu = {n: median([c for _, c in t]) for n, t in times.items()}
    rows = [(n, CODE_VARIANTS[n][1], wall[n], cpu[n], compile_s[n] - wall[n]) for n in CODE_VARIANTS if n in fns]

    flag_rows = []
    base_flags = os.environ.get("XLA_FLAGS", "")
    for name in [n for n in FLAG_VARIANTS if n in selected]:
        flags, cpus, desc = FLAG_VARIANTS[name]
        env = {"XLA_FLAGS": (base_flags + " " + flags).strip(), **FLAG_ENV.get(name, {})}
        res = run_child(args, "jax-time", env=env, cpus=cpus)
        t_torch = c_torch = None
        if cpus:
            ref = run_child(args, "torch-time", cpus=cpus)
            t_torch, c_torch = median(ref["times"]), median(ref["cpu"])
        t_jax = median(res["times"])
        flag_rows.append((name, desc, flags, t_jax, median(res["cpu"]), res["first_s"] - t_jax, t_torch, c_torch))
        print(f"{name}: JAX {flag_rows[-1][3]:.2f} s/step ({flag_rows[-1][4]:.2f} CPU s)", flush=True)

    lines = [f"\n## Train step, CPU optimisation sweep ({info['date']})\n",
             f"`python benchmarks/bench_train.py --sweep` - batch {args.batch} x {args.height}x{args.width}. Wall time "
             "is what a user sees; CPU time (all threads of the process, user + system) is much less sensitive to "
             "other jobs on a shared machine for JAX, and the column to compare JAX variants by. PyTorch's OpenMP "
             "threads spin-wait, so its CPU time also grows when the machine is oversubscribed.\n",
             f"- machine: {info['nproc']} CPUs, {info['cpu']}, load average at start {info['load']}",
             f"- {info['versions']}\n",
             f"Code variants, one process, {args.rounds} alternating rounds x {args.steps} steps, medians; "
             f"each `before:` row puts back one formulation the library used before (same parameters, same numbers):\n",
             "| variant | what | JAX s/step (CPU s) | default is faster by (CPU time) | PyTorch / JAX time, wall |"
             " compile s |", "|---|---|---|---|---|---|"]
    for name, desc, w, c, comp in rows:
        lines.append(f"| {name} | {desc} | {w:.2f} ({c:.2f}) | {c / cpu['default']:.2f}x | {wall['torch'] / w:.2f}x "
                     f"| {comp:.0f} |")
    lines.append(f"| torch | HF DetrForObjectDetection, same step | {wall['torch']:.2f} ({cpu['torch']:.2f}) | | | |")
    if flag_rows:
        base = {r[0]: r for r in flag_rows}.get("flags:default")
        lines += ["", f"XLA flags and environment, one process each ({args.steps} timed steps after the compiling "
                  "call); the library as it is now:\n",
                  "| variant | what | JAX s/step (CPU s) | flags:default is faster by (CPU time) | compile s |",
                  "|---|---|---|---|---|"]
        for name, desc, flags, w, c, comp, t_torch, c_torch in flag_rows:
            what = desc + (f" `{flags}`" if flags else "")
            vs = f"{c / base[4]:.2f}x" if base and not t_torch else "-"
            if t_torch:
                what += f"; PyTorch at 1 CPU: {t_torch:.2f} s/step ({c_torch:.2f} CPU s), JAX speed / PyTorch " \
                        f"{t_torch / w:.2f}x"
            lines.append(f"| {name} | {what} | {w:.2f} ({c:.2f}) | {vs} | {comp:.0f} |")
    return "\n".join(lines) + "\n"


# ---- main --------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    reexec_with_malloc_tunables(args, argv)
    pin_cpus(args.cpus)
    set_xla_flags(args.xla_flags)
    # JAX and torch share one GPU in this process: no up-front grab of 75% of its memory by JAX.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import warnings
    warnings.filterwarnings("ignore")
    if args._child:  # sizes come from the parent; a torch child never starts JAX
        return child_main(args)
    import jax
    on_gpu = jax.devices()[0].platform != "cpu"
    resolve_sizes(args, on_gpu)
    info = system_info()
    print(json.dumps(info, indent=1), flush=True)
    if args.sweep:
        text = sweep(args, info)
        print(text)
        if not args.no_append:
            with open(BENCHMARKS_MD, "a") as f:
                f.write(text)
        return

    import torch
    from detr_jax.convert_hf import load_hf_detr
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    B, H, W = args.batch, args.height, args.width
    print(f"batch {B} x {H}x{W}, {args.rounds} rounds x {args.steps} steps per side", flush=True)
    batch = make_batch(B, H, W, args.slots)

    hf = build_hf(device)
    model, variables = load_hf_detr(hf.cpu(), dropout=0.0, aux_loss=True,
                                    **({"dtype": jax.numpy.bfloat16} if args.bf16 else {}))
    hf.to(device)
    host_calls = install_host_timer()
    jax_step = make_jax_train_step(model, variables, batch)
    jax_infer = make_jax_infer(model, variables, batch)
    torch_step, torch_infer = make_torch_train_step(hf, batch, device, args.bf16)

    # warm-up: the JAX first call compiles; one more call of each before timing
    first = timed(jax_step)
    print(f"JAX train step first call (compile + run): {first:.1f} s", flush=True)
    first_infer = timed(jax_infer)
    for fn in (jax_step, torch_step, torch_step, jax_infer, torch_infer):
        fn()
    del host_calls[:]

    train = alternate({"jax": jax_step, "torch": torch_step}, args.rounds, args.steps)
    host_per_step = list(host_calls)
    def wall(ts):
        return median([w for w, _ in ts])

    def cpu(ts):
        return median([c for _, c in ts])
    t_jax, t_torch = wall(train["jax"]), wall(train["torch"])
    c_jax, c_torch = cpu(train["jax"]), cpu(train["torch"])
    print(f"train: JAX {t_jax:.3f} s/step ({c_jax:.2f} CPU s), torch {t_torch:.3f} s/step ({c_torch:.2f} CPU s)",
          flush=True)
    infer = alternate({"jax": jax_infer, "torch": torch_infer}, args.rounds, args.steps)
    i_jax, i_torch = wall(infer["jax"]), wall(infer["torch"])
    ic_jax, ic_torch = cpu(infer["jax"]), cpu(infer["torch"])
    print(f"inference: JAX {i_jax:.3f} s ({ic_jax:.2f} CPU s), torch {i_torch:.3f} s ({ic_torch:.2f} CPU s)",
          flush=True)

    # matcher: in-step host time, and hungarian_match alone (costs + transfer + scipy + return)
    host_s = median(host_per_step) if host_per_step else float("nan")
    match_b = time_match(B, args.slots)
    match_64 = time_match(args.match_batch, args.slots)
    match_64_100 = time_match(args.match_batch, 100)
    step_64 = t_jax / B * args.match_batch  # linear in images: an upper bound (the optimizer update is fixed)
    compile_s = first - t_jax
    train_flops, infer_flops = jax_step.flops(), jax_infer.flops()
    if math.isnan(train_flops) or math.isnan(infer_flops):  # no cost analysis before compiling here (GPU): count
        counted = run_child(args, "flops", env={"JAX_PLATFORMS": "cpu"})  # the same programs lowered for the CPU
        train_flops, infer_flops = counted["train"], counted["infer"]
    peak = bf16_peak_tflops(info["device_kind"]) if on_gpu else None

    def mfu(flops, seconds):
        if peak is None or math.isnan(flops):
            return "-"
        return f"{100 * flops / seconds / (peak * 1e12):.1f}%"

    memory = {}
    if not args.no_memory:
        for kind in ("jax", "torch"):
            memory[kind] = run_child(args, kind, steps=1)
            print(f"peak memory {kind}: {memory[kind]['peak_rss_mb']:.0f} MB RSS", flush=True)

    rows = [
        ("train step (fwd + match + loss + bwd + AdamW)", f"{B / t_jax:.3f}", f"{B / t_torch:.3f}",
         f"**{t_torch / t_jax:.2f}x**", f"{train_flops / t_jax / 1e12:.2f}", mfu(train_flops, t_jax),
         f"{t_jax:.3f} s vs {t_torch:.3f} s per step; CPU time {c_jax:.2f} s vs {c_torch:.2f} s "
         f"({c_torch / c_jax:.2f}x)"),
        ("inference (forward)", f"{B / i_jax:.3f}", f"{B / i_torch:.3f}", f"**{i_torch / i_jax:.2f}x**",
         f"{infer_flops / i_jax / 1e12:.2f}", mfu(infer_flops, i_jax),
         f"{i_jax:.3f} s vs {i_torch:.3f} s per batch; CPU time {ic_jax:.2f} s vs {ic_torch:.2f} s "
         f"({ic_torch / ic_jax:.2f}x)"),
    ]
    lines = [f"\n## Train step and inference: detr_jax vs HF DetrForObjectDetection ({info['date']})\n",
             f"`python benchmarks/bench_train.py{' --small' if args.small else ''}` - DETR-R50 (256 hidden, 6 + 6 "
             f"layers, 100 queries, 91 classes), same weights (load_hf_detr), dropout 0, batch {B} x {H}x{W}"
             f"{', bf16' if args.bf16 else ', float32'}, {args.slots} target slots ({COCO_MEAN_OBJECTS} objects "
             f"per image on average); {args.rounds} alternating rounds x {args.steps} steps per side after "
             "warm-up, medians.\n",
             f"- machine: {info['nproc']} CPUs, {info['cpu']}; load average at start {info['load']} "
             "(a shared machine: read the ratios)",
             f"- devices: JAX {info['jax_device']}; torch {info['torch_device']}",
             f"- {info['versions']}",
             f"- precision: {info['precision']}",
             f"- model FLOPs per call (XLA cost analysis of the lowered JAX program): train step "
             f"{train_flops / 1e9:.0f} GFLOP, inference {infer_flops / 1e9:.0f} GFLOP; MFU = JAX model FLOP/s over "
             f"the dense bf16 peak ({peak if peak else '-'} TFLOP/s)",
             f"- XLA_FLAGS: `{info['xla_flags'] or '(none)'}`; "
             f"GLIBC_TUNABLES: `{info['glibc_tunables'] or '(none)'}`\n",
             "| measurement | JAX img/s | PyTorch img/s | JAX / PyTorch | JAX TFLOP/s | JAX MFU | notes |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    lines += ["",
              "| JAX detail | value |", "|---|---|",
              f"| compile time of the train step (first call - steady state) | {compile_s:.1f} s |",
              f"| compile time of inference (first call - steady state) | {first_infer - i_jax:.1f} s |",
              f"| matcher host function inside the step (scipy, {B} images x 6 layers) | {host_s * 1e3:.1f} ms = "
              f"{100 * host_s / t_jax:.2f}% of the step |",
              f"| hungarian_match alone, batch {B} (costs + transfer + scipy + return) | {match_b * 1e3:.1f} ms = "
              f"{100 * match_b / t_jax:.2f}% of the step |",
              f"| hungarian_match alone, [6, {args.match_batch}, 100, {args.slots}] | {match_64 * 1e3:.1f} ms = "
              f"{100 * match_64 / step_64:.3f}% of a {args.match_batch}-image step ({step_64:.0f} s, extrapolated "
              f"linearly from batch {B}) |",
              f"| hungarian_match alone, [6, {args.match_batch}, 100, 100] (COCO config pads to 100) | "
              f"{match_64_100 * 1e3:.1f} ms = {100 * match_64_100 / step_64:.3f}% of that step |"]
    if memory:
        lines += ["", "| peak memory (separate process: build + compile + 2 train steps) | JAX | PyTorch |",
                  "|---|---|---|",
                  f"| peak RSS (VmHWM, the ru_maxrss of that address space), MB | {memory['jax']['peak_rss_mb']:.0f} "
                  f"| {memory['torch']['peak_rss_mb']:.0f} |",
                  f"| of which after imports, MB | {memory['jax']['baseline_rss_mb']:.0f} | "
                  f"{memory['torch']['baseline_rss_mb']:.0f} |"]
        if "device_peak_mb" in memory["jax"] or "device_peak_mb" in memory["torch"]:
            lines.append(f"| device peak, MB | {memory['jax'].get('device_peak_mb', float('nan')):.0f} | "
                         f"{memory['torch'].get('device_peak_mb', float('nan')):.0f} |")
    lines.append("\nPer-step wall / CPU seconds, in the order run: JAX " +
                 " ".join(f"{w:.2f}/{c:.2f}" for w, c in train["jax"]) + "; torch " +
                 " ".join(f"{w:.2f}/{c:.2f}" for w, c in train["torch"]) + ". Inference: JAX " +
                 " ".join(f"{w:.2f}/{c:.2f}" for w, c in infer["jax"]) + "; torch " +
                 " ".join(f"{w:.2f}/{c:.2f}" for w, c in infer["torch"]) + ".")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_append:
        with open(BENCHMARKS_MD, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
