"""The sides bench_train.py times: HF transformers' DETR in PyTorch (as written, and as a PyTorch user tunes it)
and detr_jax, built with the same architecture, weights, batch and optimizer; plus the FLOP counts for MFU.

Every side is a pair of zero-argument callables, `step()` (one train step, returns the loss) and `infer()` (one
forward pass), each waiting for its device before it returns, so a wall clock around the call times it.
"""

import contextlib
import copy

HF_ARCH = dict(d_model=256, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8, decoder_attention_heads=8,
               encoder_ffn_dim=2048, decoder_ffn_dim=2048, num_queries=100, num_labels=91)
RESNET50 = dict(layer_type="bottleneck", depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048])
LR, LR_BACKBONE, WEIGHT_DECAY, GRAD_CLIP = 1e-4, 1e-5, 1e-4, 0.1
COCO_MEAN_OBJECTS = 7.3  # objects per COCO train image


# ---- shapes and data ---------------------------------------------------------------------------------------
def make_batch(batch, height, width, slots, seed=0):
    """Random normalised images (no padding) and COCO-like targets, numpy: "images" [B, H, W, 3] float32,
    "pixel_mask" bool [B, H, W], "labels" int32 [B, M], "boxes" [B, M, 4] cxcywh normalised, "mask" bool [B, M]."""
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
    """(logits [L, B, N, classes + 1], boxes [L, B, N, 4] cxcywh in (0, 1)), numpy float32."""
    import numpy as np
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((layers, batch, queries, classes + 1)).astype(np.float32)
    boxes = 1 / (1 + np.exp(-rng.standard_normal((layers, batch, queries, 4)))).astype(np.float32)
    return logits, boxes


# ---- PyTorch: HF DetrForObjectDetection --------------------------------------------------------------------
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


def torch_inputs(batch, device, memory_format=None):
    """(pixel_values [B, 3, H, W], pixel_mask long [B, H, W], HF labels: one dict per image, real objects only)."""
    import torch
    pixels = torch.from_numpy(batch["images"]).permute(0, 3, 1, 2).contiguous().to(device)
    if memory_format is not None:
        pixels = pixels.contiguous(memory_format=memory_format)
    pixel_mask = torch.from_numpy(batch["pixel_mask"]).long().to(device)
    labels = [{"class_labels": torch.from_numpy(batch["labels"][i][batch["mask"][i]]).long().to(device),
               "boxes": torch.from_numpy(batch["boxes"][i][batch["mask"][i]]).to(device)}
              for i in range(len(batch["images"]))]
    return pixels, pixel_mask, labels


def make_torch_train_step(model, batch, device, bf16):
    """(step, infer) for HF DETR as written: eager, float32 (or autocast bfloat16 with `bf16`), torch's defaults."""
    import torch
    pixels, pixel_mask, labels = torch_inputs(batch, device)
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


@contextlib.contextmanager
def tf32_enabled():
    """TF32 matmuls and cuDNN convolutions while inside (what a PyTorch user sets for float32 on an Ampere or later
    GPU; no effect on a CPU); the previous settings come back on exit, so the eager side keeps torch's defaults."""
    import torch
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def make_torch_best(model, batch, device, bf16, compile_model=True):
    """(step, infer, notes) for HF DETR as a PyTorch user runs it for speed: a copy of `model` (same weights) and its
    inputs in channels_last, `torch.compile(model)` (default mode), autocast(bfloat16) with `bf16`, else TF32
    matmuls and convolutions, and AdamW with `fused=True` on CUDA. `notes` (a list) says what was left out.

    torch.compile compiles at the first call; should that fail (no C++ compiler, an unsupported op), the side
    prints a note and runs the same model eagerly from then on, keeping the other settings."""
    import torch
    best = copy.deepcopy(model).to(memory_format=torch.channels_last)
    pixels, pixel_mask, labels = torch_inputs(batch, device, torch.channels_last)
    groups = torch_param_groups(best)
    trainable = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=LR, weight_decay=WEIGHT_DECAY, fused=device.type == "cuda")
    notes = []
    forward = {"fn": torch.compile(best) if compile_model else best}

    def precision():
        if bf16:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return tf32_enabled()

    def run(fn):
        """fn(forward) under the precision settings; on a compile failure, once more eagerly."""
        try:
            with precision():
                return fn(forward["fn"])
        except Exception as e:  # noqa: BLE001 (any compiler error): fall back, as a user would
            if forward["fn"] is best:
                raise
            print(f"PyTorch-best: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                  "running eagerly", flush=True)
            notes.append("torch.compile failed, eager")
            forward["fn"] = best
            opt.zero_grad(set_to_none=True)
            with precision():
                return fn(best)

    def train_loss(fwd):
        best.train()
        best.config.auxiliary_loss = True
        loss = fwd(pixel_values=pixels, pixel_mask=pixel_mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    def step():
        loss = run(train_loss)
        torch.nn.utils.clip_grad_norm_(trainable, GRAD_CLIP)
        opt.step()
        return loss.item()  # waits for the device

    def forward_only(fwd):
        best.eval()
        best.config.auxiliary_loss = False
        with torch.inference_mode():
            return float(fwd(pixel_values=pixels, pixel_mask=pixel_mask).logits[0, 0, 0])  # waits for the device

    def infer():
        return run(forward_only)

    return step, infer, notes


# ---- JAX: detr_jax -----------------------------------------------------------------------------------------
def jax_config():
    """The base config (detr_jax/config.py) with the benchmark's optimizer: a constant learning rate."""
    from detr_jax.config import base_config

    config = base_config()
    config.seed = 0
    config.model.train_stem = False  # the official trainable set: stem and stage 1 frozen
    config.loss.matcher = "host"  # the host matcher on both sides (scipy), as HF does
    config.optimizer.update(lr=LR, lr_backbone=LR_BACKBONE, weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP,
                            schedule="constant", warmup_steps=0)
    return config


def jax_detr(bf16):
    """The same DETR as `load_hf_detr` gives for the HF model above, freshly initialised (no torch needed)."""
    import jax.numpy as jnp

    from detr_jax.models.detr import DETR
    return DETR(num_classes=91, num_queries=100, hidden_dim=256, num_heads=8, num_encoder_layers=6,
                num_decoder_layers=6, dim_feedforward=2048, dropout=0.0, backbone_depth=50,
                dtype=jnp.bfloat16 if bf16 else jnp.float32)


def make_jax_train_step(model, variables, batch):
    """step() -> loss: `detr_jax.training.make_train_step` on the global batch, for the DETR `model` with `variables`
    (no training aids: `DETRWithAids(model)`, whose parameters are the DETR's under "model"); `step.flops()`
    counts one call."""
    import jax

    from detr_jax.models.aids import DETRWithAids
    from detr_jax.ops import sharding
    from detr_jax.training.loop import make_train_step
    from detr_jax.training.state import build_optimizer
    config = jax_config()
    mesh = sharding.make_mesh()
    params, frozen = {"model": variables["params"]}, {"model": variables["frozen"]}
    tx, _ = build_optimizer(config, params, total_steps=10 ** 6, steps_per_epoch=10 ** 4)
    state = {"step": jax.numpy.zeros((), jax.numpy.int32), "params": params, "frozen": frozen,
             "opt_state": tx.init(params), "nonfinite_step": jax.numpy.full((), -1, jax.numpy.int32)}
    state = jax.tree_util.tree_map(lambda x: jax.numpy.array(x, copy=True), state)  # the step donates it
    holder = {"state": jax.device_put(state, sharding.replicated(mesh))}
    device_batch = sharding.global_batch(batch, mesh)
    train_step = make_train_step(DETRWithAids(model), tx, config, mesh)

    def step():
        holder["state"], metrics = train_step(holder["state"], device_batch)
        jax.block_until_ready((holder["state"], metrics))
        return float(metrics["loss"])

    step.flops = lambda: lowered_flops(train_step, holder["state"], device_batch)
    return step


def make_jax_infer(model, variables, batch):
    """infer() -> a logit: the jitted forward pass without auxiliary outputs; `infer.flops()` counts one call."""
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
