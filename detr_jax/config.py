"""The one config schema: every field with its default (the official DETR-R50 recipe) and what it means.

Named configs (experiments/configs/*.py, tests/configs/tiny.py) start from `base_config()` and override only what
they change; any field can be set on the command line (`--config.optimizer.lr=2e-4`). `check_config` refuses a
bad value before any work, naming the field.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from detr_jax.criterion.matcher import CHOICES as MATCHERS
from detr_jax.criterion.set_losses import BBOX_LOSS_TYPES, CLASS_TARGETS
from detr_jax.data import PANOPTIC_SOURCES, SOURCES
from detr_jax.data.loader import WORKER_TYPES
from detr_jax.data.sources import check_data_kwargs
from detr_jax.data.transforms import COCO_MAX_SIZE, COCO_TRAIN_SCALES
from detr_jax.models.backbone import BACKBONE_NORMS, RESNET_SPECS
from detr_jax.models.detr import POSITION_EMBEDDINGS, REMAT_CHOICES
from detr_jax.ops.xla_flags import FLAG_PATTERN

SCHEDULES = ("step", "cosine", "constant")  # optimizer.schedule (training.state.learning_rate_schedule)
EVAL_BACKENDS = ("pycocotools", "faster_coco_eval")  # eval_backend: evaluation.coco.EVAL_BACKENDS (not importable here)


def base_config() -> ml_collections.ConfigDict:
    """Every field, with the official recipe's values where it has one (facebookresearch/detr main.py)."""
    config = ml_collections.ConfigDict()
    config.seed = 42
    config.batch_size = 64  # global, split over every device of every process (official: 16 GPUs x 4)
    config.eval_batch_size = 64
    config.num_steps = 0  # steps to train; 0: num_epochs epochs
    config.num_epochs = 300
    config.log_every = 100  # one row of metrics.jsonl / TensorBoard / the progress line
    config.checkpoint_every = 2000
    config.keep_checkpoints = 3
    config.eval_every = 20000  # 0: no periodic evaluation
    config.eval_at_end = True
    config.eval_top_k = placeholder(int)  # None: every query is a detection (official); k: the k best per image
    # Evaluate with padding that changes no image's outputs (see ResNet); False: the official behaviour, where a
    # batch's padding changes every image's backbone output a little.
    config.eval_padding_invariant = True
    # The COCOeval that scores: "pycocotools" (the reference) or "faster_coco_eval" (~9x faster at COCO scale, stats
    # equal or ~1e-16 away: docs/coco_scoring.md).
    config.eval_backend = "pycocotools"
    config.half_precision = False  # bfloat16 compute; parameters and optimizer state stay float32
    config.compilation_cache_dir = ""  # jax's persistent compilation cache: "" = <workdir>/jax_cache, "none" = off
    # XLA flags for this run ("--name=value ..."), added by experiments/train.py to detr_jax's defaults before jax
    # starts (detr_jax/ops/xla_flags.py); a flag that $XLA_FLAGS names already keeps its value. Each backend reads
    # only its own (xla_cpu_* on CPU, xla_gpu_* on GPU).
    config.xla_flags = ""

    # The detector: the fields of `detr_jax.models.detr.DETR`.
    config.model = ml_collections.ConfigDict(dict(
        num_classes=91, num_queries=100, hidden_dim=256, num_heads=8, num_encoder_layers=6, num_decoder_layers=6,
        dim_feedforward=2048, dropout=0.1, pre_norm=False, backbone_depth=50, dilation=False,
        position_embedding="sine",  # "sine" or "learned"
        aux_loss=True,  # losses on every decoder layer
        padding_invariant=False,  # in training; evaluation follows eval_padding_invariant
        backbone_norm="frozen_bn",  # "frozen_bn" (official), "group" or "batch" (training from scratch)
        train_stem=False,  # train the ResNet stem and stage 1 too (frozen in the official recipe)
        # Rematerialisation (memory for compute; the same losses and gradients): "none", "backbone" (each ResNet
        # block), "transformer" (each encoder / decoder layer) or "full" (both). experiments/plan.py measures it.
        remat="none"))

    # Training-only aids for training from scratch, off in the official recipe: see DETRWithAids in
    # detr_jax/models/aids.py. The evaluated and exported model never has them.
    config.training_aids = ml_collections.ConfigDict(dict(
        num_query_groups=1, encoder_aux_loss=False, backbone_aux_stages=(),
        # DN-DETR's denoising queries: dn_groups noised copies of the targets, each reconstructing its own object
        # (0: off); corners moved by up to dn_box_noise x half the box size, labels replaced with probability
        # dn_label_noise; dn_negatives adds DINO's negatives (moved 1-2 x as far, to be called no-object).
        dn_groups=0, dn_box_noise=0.4, dn_label_noise=0.2, dn_negatives=False))

    # Panoptic segmentation (the official `--masks`): the official mask head on top of DETR (`DETRsegm`), trained
    # with the sigmoid focal and dice losses on the matched masks; needs a panoptic data source.
    config.panoptic = ml_collections.ConfigDict(dict(
        enabled=False,
        freeze_detr=False,  # the official --frozen_weights: only the mask head trains (start from a trained DETR)
        mask_loss_coef=1.0, dice_loss_coef=1.0,  # official
        # 0: the mask losses on every pixel of the padded batch, the targets travelling as whole masks (official;
        # at COCO sizes ~1 GB of bool masks per batch of 8 with 100 objects). P > 0: on P pixels per image drawn
        # uniformly (unbiased for the focal loss, as Mask2Former's point losses): P values per object travel.
        mask_loss_points=0,
        threshold=0.85,  # evaluation: the class probability a query needs to become a segment (official)
        # Evaluation also reports segm AP (and bbox AP) of the thing segments as instances; its post-processing
        # runs on the host (~1 s per COCO-sized image with 100 queries): False keeps periodic evaluations quick.
        eval_segm=True))

    config.data = ml_collections.ConfigDict(dict(
        # "synthetic", "coco_folder", "tfds"; panoptic: "synthetic_panoptic", "coco_panoptic", "tfds_panoptic"
        source="tfds",  # (detr_jax.data.build_source)
        # The source's arguments; train_kwargs / val_kwargs override them per split.
        # tfds: name (the TFDS dataset; "coco_like" is the built-in COCO-like set), data_dir ("": TFDS's default).
        source_kwargs=dict(label_space="official91", name="coco/2017", data_dir=""),
        train_kwargs=dict(split="train"),
        val_kwargs=dict(split="validation"),
        # The official augmentation: shorter side from train_scales (longer <= max_size), or a resize to
        # crop_resize_scales + a random crop of crop_size (min, max) then the same; evaluation at eval_size.
        train_scales=COCO_TRAIN_SCALES, max_size=COCO_MAX_SIZE,
        crop_resize_scales=(400, 500, 600), crop_size=(384, 600), eval_size=800,
        # The static padded shapes: "recipe" (fitted to the simulated output sizes, at most max_buckets) or a
        # tuple of (height, width); group_by_size > 0 groups images of similar shape within that many batches
        # (~23% padding at batch 64 on COCO instead of ~62%, BENCHMARKS.md).
        buckets="recipe", max_buckets=12, group_by_size=32,
        max_objects=100,  # targets per image after augmentation (more are dropped, counted and logged)
        num_workers=8, worker_type="process"))  # loader workers: "thread" or "process" (grain)

    config.loss = ml_collections.ConfigDict(dict(
        eos_coef=0.1,  # the no-object class's weight in the cross-entropy
        cost_class=1.0, cost_bbox=5.0, cost_giou=2.0,  # the matching cost
        ce_loss_coef=1.0, bbox_loss_coef=5.0, giou_loss_coef=2.0,  # the loss
        bbox_loss_type="l1",  # "l1" (official) or "smooth_l1"
        # The matched queries' class target: "hard" (official: the class, 1) or "iou" (the class IoU^alpha and
        # no-object the rest, the IoU of the query's box with its object's; set_losses.class_quality).
        class_target="hard", class_target_alpha=0.25,
        matcher="auto"))  # Hungarian solver: "host" (scipy), "device" (optax) or "auto" (host: measured faster)

    config.optimizer = ml_collections.ConfigDict(dict(
        lr=1e-4, lr_backbone=1e-5,  # AdamW; lr_backbone 0: the backbone does not train
        weight_decay=1e-4,
        grad_clip=0.1,  # global gradient-norm clip (0: none)
        schedule="step",  # "step" (x0.1 at lr_drop_epochs), "cosine" (down to cosine_alpha * lr) or "constant"
        lr_drop_epochs=200, cosine_alpha=0.01,
        warmup_steps=0))  # linear warmup from 0 in front of the schedule
    # Gradient accumulation: each step's global batch runs as this many micro-batches (one in memory at a time) and
    # makes one update equal to the whole batch's (every normaliser the global batch's). For fewer chips than the
    # recipe's batch: experiments/plan.py shows what it saves. Dropout masks are drawn per micro-batch (the same
    # distribution, other draws); refused with denoising queries and with backbone_norm "batch".
    config.grad_accum_steps = 1
    # An exponential moving average of the parameters (RT-DETR, D-FINE, RF-DETR), kept in the train state and its
    # checkpoints: after update n, ema = d * ema + (1 - d) * params with d = decay * (1 - exp(-n / warmup_steps))
    # (d = decay without warmup). Evaluation reports both weights, the EMA's as the main metrics; predict, evaluate
    # and export use the EMA's when a run has them (--raw_weights: the trained ones). decay 0: off (official).
    config.ema = ml_collections.ConfigDict(dict(decay=0.0, warmup_steps=0))

    # Weights to start from: a torchvision ImageNet ResNet .pth and/or a DETR: an official .pth or a detr_jax work
    # directory (its latest checkpoint's detector; the panoptic recipe's box model); reinit_class_head keeps a
    # fresh class head (fine-tuning on other classes).
    config.init = ml_collections.ConfigDict(dict(backbone_checkpoint="", detr_checkpoint="", reinit_class_head=False))
    return config


def _need(ok, field, value, what):
    if not ok:
        raise ValueError(f"config.{field} must be {what}, got {value!r}")


def _check_grad_accum(config: ml_collections.ConfigDict) -> None:
    """Gradient accumulation is exact (training.step): refuse what cannot be, naming the field."""
    k = config.grad_accum_steps
    _need(isinstance(k, int) and k >= 1, "grad_accum_steps", k, "an integer >= 1")
    if k > 1:
        _need(config.batch_size % k == 0, "batch_size", config.batch_size, f"a multiple of grad_accum_steps={k}")
        _need(config.training_aids.dn_groups == 0, "training_aids.dn_groups", config.training_aids.dn_groups,
              "0 with grad_accum_steps > 1 (the denoising noise is drawn per batch: micro-batches would draw other "
              "noise than the whole batch)")
        _need(config.model.backbone_norm != "batch", "model.backbone_norm", config.model.backbone_norm,
              "'frozen_bn' or 'group' with grad_accum_steps > 1 (batch statistics of a micro-batch are not the "
              "whole batch's)")


def _check_class_target_and_ema(config: ml_collections.ConfigDict) -> None:
    loss, ema = config.loss, config.ema
    _need(loss.class_target in CLASS_TARGETS, "loss.class_target", loss.class_target,
          " or ".join(repr(t) for t in CLASS_TARGETS))
    _need(loss.class_target_alpha > 0, "loss.class_target_alpha", loss.class_target_alpha, "> 0")
    _need(0 <= ema.decay < 1, "ema.decay", ema.decay, "in [0, 1) (0: no EMA)")
    _need(isinstance(ema.warmup_steps, int) and ema.warmup_steps >= 0, "ema.warmup_steps", ema.warmup_steps,
          "an integer >= 0 (0: no warm-up)")


def _check_xla_flags(config: ml_collections.ConfigDict) -> None:
    """config.xla_flags: whitespace-separated --name=value (XLA aborts the process on a malformed flag)."""
    flags = config.xla_flags
    _need(isinstance(flags, str) and all(FLAG_PATTERN.fullmatch(f) for f in flags.split()), "xla_flags", flags,
          "'' or whitespace-separated '--name=value' XLA flags")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Refuse, before any work, values that would fail later or deep inside jax: one ValueError naming the field.
    The allowed values are the constants of the code that uses them."""
    m, d, opt = config.model, config.data, config.optimizer

    need = _need

    def either(values):  # ("a", "b", "c") -> "'a', 'b' or 'c'"
        quoted = [repr(v) for v in values]
        return ", ".join(quoted[:-1]) + " or " + quoted[-1]

    def positive(field, value):
        need(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0, field, value, "> 0")

    for field in ("num_classes", "num_queries", "hidden_dim", "num_heads", "num_decoder_layers", "dim_feedforward"):
        positive(f"model.{field}", m[field])
    need(m.num_encoder_layers >= 0, "model.num_encoder_layers", m.num_encoder_layers, ">= 0")
    need(m.hidden_dim % m.num_heads == 0, "model.hidden_dim", m.hidden_dim, f"a multiple of num_heads={m.num_heads}")
    need(m.backbone_depth in RESNET_SPECS, "model.backbone_depth", m.backbone_depth, f"one of {sorted(RESNET_SPECS)}")
    need(not m.dilation or RESNET_SPECS[m.backbone_depth][0] == "bottleneck", "model.dilation", m.dilation,
         f"False with backbone_depth={m.backbone_depth}: DC5 needs a bottleneck ResNet (50/101); torchvision's "
         "BasicBlock does not support dilation either")
    need(m.backbone_norm in BACKBONE_NORMS, "model.backbone_norm", m.backbone_norm, either(BACKBONE_NORMS))
    need(m.position_embedding in POSITION_EMBEDDINGS, "model.position_embedding", m.position_embedding,
         either(POSITION_EMBEDDINGS))
    need(0 <= m.dropout < 1, "model.dropout", m.dropout, "in [0, 1)")
    need(m.remat in REMAT_CHOICES, "model.remat", m.remat, either(REMAT_CHOICES))
    for field in ("batch_size", "eval_batch_size"):
        positive(field, config[field])
    need(config.eval_backend in EVAL_BACKENDS, "eval_backend", config.eval_backend, either(EVAL_BACKENDS))
    need(config.num_steps > 0 or config.num_epochs > 0, "num_steps", config.num_steps, "> 0 (or num_epochs > 0)")
    need(d.source in SOURCES, "data.source", d.source, f"one of {SOURCES}")
    check_data_kwargs(d)  # each split's source arguments: known keys of the declared types (data/sources)
    need(d.worker_type in WORKER_TYPES, "data.worker_type", d.worker_type, f"one of {WORKER_TYPES}")
    need(d.num_workers >= 0, "data.num_workers", d.num_workers, ">= 0")
    for field in ("max_size", "eval_size", "max_objects", "max_buckets"):
        positive(f"data.{field}", d[field])
    for field in ("train_scales", "crop_resize_scales", "crop_size"):
        need(len(d[field]) > 0 and all(isinstance(v, int) and v > 0 for v in d[field]), f"data.{field}", d[field],
             "a non-empty tuple of positive integers")
    need(d.buckets == "recipe" or (d.buckets and all(len(b) == 2 and min(b) > 0 for b in d.buckets)),
         "data.buckets", d.buckets, "'recipe' or a tuple of (height, width) pairs")
    _check_grad_accum(config)
    need(opt.schedule in SCHEDULES, "optimizer.schedule", opt.schedule, either(SCHEDULES))
    need(opt.lr > 0 and opt.lr_backbone >= 0, "optimizer.lr", (opt.lr, opt.lr_backbone),
         "> 0 (and lr_backbone >= 0)")
    need(config.loss.matcher in MATCHERS, "loss.matcher", config.loss.matcher, either(MATCHERS))
    aids = config.training_aids
    need(isinstance(aids.num_query_groups, int) and aids.num_query_groups >= 1, "training_aids.num_query_groups",
         aids.num_query_groups, "an integer >= 1")
    need(all(i in (1, 2, 3, 4) for i in aids.backbone_aux_stages), "training_aids.backbone_aux_stages",
         aids.backbone_aux_stages, "ResNet stages among 1, 2, 3, 4")
    need(isinstance(aids.dn_groups, int) and aids.dn_groups >= 0, "training_aids.dn_groups", aids.dn_groups,
         "an integer >= 0 (0: no denoising queries)")
    need(aids.dn_box_noise >= 0, "training_aids.dn_box_noise", aids.dn_box_noise, ">= 0")
    need(0 <= aids.dn_label_noise <= 1, "training_aids.dn_label_noise", aids.dn_label_noise, "in [0, 1]")
    pan = config.panoptic
    if pan.enabled:
        need(d.source in PANOPTIC_SOURCES, "data.source", d.source, f"a panoptic source ({either(PANOPTIC_SOURCES)}) "
             "with config.panoptic.enabled")
        need(aids.num_query_groups == 1, "training_aids.num_query_groups", aids.num_query_groups,
             "1 with config.panoptic.enabled (the mask head decodes one query set)")
        need(aids.dn_groups == 0, "training_aids.dn_groups", aids.dn_groups, "0 with config.panoptic.enabled "
             "(denoising trains the detector: use it in the detection stage, before the mask head)")
        need(m.hidden_dim % 128 == 0, "model.hidden_dim", m.hidden_dim, "a multiple of 128 with "
             "config.panoptic.enabled (the mask head narrows it to hidden_dim / 16 channels in GroupNorms of 8)")
        need((m.hidden_dim + m.num_heads) % 8 == 0, "model.num_heads", m.num_heads, "a multiple of 8 with "
             "config.panoptic.enabled (the mask head's first GroupNorm of 8 has hidden_dim + num_heads channels)")
        need(not pan.freeze_detr or config.init.detr_checkpoint, "init.detr_checkpoint", config.init.detr_checkpoint,
             "the trained detector (a detr_jax work directory or an official .pth) with config.panoptic.freeze_detr "
             "(only the mask head trains)")
    for field in ("mask_loss_coef", "dice_loss_coef"):
        need(pan[field] >= 0, f"panoptic.{field}", pan[field], ">= 0")
    need(0 <= pan.threshold < 1, "panoptic.threshold", pan.threshold, "in [0, 1)")
    need(isinstance(pan.mask_loss_points, int) and pan.mask_loss_points >= 0, "panoptic.mask_loss_points",
         pan.mask_loss_points, "an int >= 0 (0: every pixel)")
    need(config.loss.bbox_loss_type in BBOX_LOSS_TYPES, "loss.bbox_loss_type", config.loss.bbox_loss_type,
         either(BBOX_LOSS_TYPES))
    _check_class_target_and_ema(config)
    _check_xla_flags(config)
