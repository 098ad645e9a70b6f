"""The official DETR-R50 recipe on COCO 2017 (TFDS `coco/2017`): 300 epochs, 42.0 AP in the paper.

  python experiments/train.py --config experiments/configs/coco_r50.py --workdir gs://bucket/detr_r50
  python experiments/train.py --config experiments/configs/coco_r50.py:smoke --workdir /tmp/smoke

`:smoke` runs this recipe's exact data path (TFDS ArrayRecord, the official multi-scale augmentation, recipe
buckets, size grouping, worker processes, sharded over every process) on the built-in COCO-like set
(`detr_jax.data.coco_like`, prepared into TFDS's data_dir on first use) with a tiny model, a few dozen steps
and a final evaluation: a few minutes on a 2-core CPU. It also runs as several processes
(--coordinator_address=127.0.0.1:PORT --num_processes=2 --process_id=I).

Global batch 64 (the paper: 16 V100 x 4), AdamW lr 1e-4, backbone 1e-5, weight decay 1e-4, grad-norm clip 0.1,
lr x0.1 at epoch 200, aux losses, 100 queries. The backbone starts from torchvision's ImageNet ResNet-50
(set config.init.backbone_checkpoint to resnet50-0676ba61.pth). Needs tensorflow-cpu + tensorflow-datasets and the
prepared TFDS data (see the README). About 3 days on 16 V100s for the official code.
"""

import ml_collections

from detr_jax.data.transforms import COCO_TRAIN_SCALES


def get_config(arg: str = ""):
    config = ml_collections.ConfigDict()
    config.seed = 42
    config.batch_size = 64
    config.eval_batch_size = 64
    config.num_steps = 0
    config.num_epochs = 300
    config.log_every = 100
    config.checkpoint_every = 2000
    config.keep_checkpoints = 3
    config.eval_every = 20000
    config.eval_at_end = True
    config.eval_top_k = None
    config.half_precision = False
    config.compilation_cache_dir = ""  # jax's persistent compilation cache: "" = <workdir>/jax_cache, "none" = off

    config.model = ml_collections.ConfigDict(dict(
        num_classes=91, num_queries=100, hidden_dim=256, num_heads=8, num_encoder_layers=6, num_decoder_layers=6,
        dim_feedforward=2048, dropout=0.1, pre_norm=False, backbone_depth=50, dilation=False,
        position_embedding="sine", aux_loss=True,
        # Options for training from scratch, off in the official recipe (see DETR in detr_jax/models/detr.py):
        num_query_groups=1, encoder_aux_loss=False, backbone_aux_stages=(), backbone_norm="frozen_bn",
        train_stem=False))

    config.data = ml_collections.ConfigDict(dict(
        source="tfds",
        # name: the TFDS dataset ("coco_like" is the built-in COCO-like set); data_dir "": TFDS's default.
        source_kwargs=dict(label_space="official91", name="coco/2017", data_dir=""),
        train_kwargs=dict(split="train"),
        val_kwargs=dict(split="validation"),
        train_scales=tuple(COCO_TRAIN_SCALES), max_size=1333, crop_resize_scales=(400, 500, 600),
        crop_size=(384, 600), eval_size=800,
        # 12 static shapes fitted to the recipe's simulated sizes; with size grouping the padded share is ~23%
        # at global batch 64 instead of ~62% (BENCHMARKS.md, bench_loader.py).
        buckets="recipe", max_buckets=12, group_by_size=32,
        # Decoding and augmentation in worker processes (grain), whole batches each; give them the host's cores.
        max_objects=100, num_workers=8, worker_type="process"))

    config.loss = ml_collections.ConfigDict(dict(
        eos_coef=0.1, cost_class=1.0, cost_bbox=5.0, cost_giou=2.0, ce_loss_coef=1.0, bbox_loss_coef=5.0,
        giou_loss_coef=2.0, bbox_loss_type="l1",
        matcher="auto"))  # Hungarian solver: "host" (scipy), "device" (optax) or "auto" (device on GPU/TPU)

    config.optimizer = ml_collections.ConfigDict(dict(
        lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4, grad_clip=0.1, schedule="step", warmup_steps=0,
        lr_drop_epochs=200, grad_accum_steps=1))

    config.init = ml_collections.ConfigDict(dict(backbone_checkpoint="", detr_checkpoint="", reinit_class_head=False))
    if arg == "smoke":
        smoke(config)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r} for coco_r50.py: use ':smoke' or nothing")
    return config


def smoke(config: ml_collections.ConfigDict) -> None:
    """The recipe's data path with a tiny model and the COCO-like TFDS set, in place (see the module docstring)."""
    config.batch_size = 4
    config.eval_batch_size = 4
    config.num_epochs = 0
    config.num_steps = 24
    config.log_every = 4
    config.checkpoint_every = 12
    config.eval_every = 0
    config.model.update(num_classes=91, num_queries=10, hidden_dim=32, num_heads=4, num_encoder_layers=1,
                        num_decoder_layers=2, dim_feedforward=64, backbone_depth=18)
    config.data.source_kwargs.name = "coco_like"
    config.data.val_kwargs = dict(split="validation[:16]")
    config.data.update(num_workers=2, max_buckets=3)
