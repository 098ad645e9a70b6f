"""A tiny DETR on 64 x 64 synthetic images, for the trainer and evaluation tests.

  python experiments/train.py --config tests/configs/tiny.py --workdir /tmp/detr_tiny --config.num_steps=4

ResNet-18, hidden 32, 1 encoder + 2 decoder layers, 6 queries; a step takes well under a second on a 2-core
CPU. Dropout is 0 so that a run gives the same losses on any number of devices and processes, and the
learning rate (2 warmup steps, then a step decay at epoch 200) does not depend on num_steps, so that runs of
different lengths agree step by step.
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.batch_size = 8  # global, split over every device of every process
    config.eval_batch_size = 8
    config.num_steps = 4
    config.num_epochs = 0
    config.log_every = 1
    config.checkpoint_every = 1000
    config.keep_checkpoints = 3
    config.eval_every = 0
    config.eval_at_end = False
    config.eval_top_k = None
    config.half_precision = False
    config.compilation_cache_dir = ""  # jax's persistent compilation cache: "" = <workdir>/jax_cache, "none" = off

    config.model = ml_collections.ConfigDict(dict(
        num_classes=5, num_queries=6, hidden_dim=32, num_heads=4, num_encoder_layers=1, num_decoder_layers=2,
        dim_feedforward=64, dropout=0.0, pre_norm=False, backbone_depth=18, dilation=False,
        position_embedding="sine", aux_loss=True, train_stem=False, num_query_groups=1, encoder_aux_loss=False,
        backbone_aux_stages=(),
        backbone_norm="frozen_bn"))

    config.data = ml_collections.ConfigDict(dict(
        source="synthetic",
        source_kwargs=dict(image_size=(64, 64), min_objects=1, max_objects=4, seed=0),
        train_kwargs=dict(split="train", num_examples=64),
        val_kwargs=dict(split="val", num_examples=8),
        train_scales=(64,), max_size=64, crop_resize_scales=(64,), crop_size=(48, 64),
        eval_size=64, buckets=((64, 64),), max_buckets=12, group_by_size=0, max_objects=8, num_workers=1,
        worker_type="thread"))

    config.loss = ml_collections.ConfigDict(dict(
        eos_coef=0.1, cost_class=1.0, cost_bbox=5.0, cost_giou=2.0, ce_loss_coef=1.0, bbox_loss_coef=5.0,
        giou_loss_coef=2.0, bbox_loss_type="l1",
        matcher="auto"))  # Hungarian solver: "host" (scipy), "device" (optax) or "auto" (device on GPU/TPU)

    config.optimizer = ml_collections.ConfigDict(dict(
        lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4, grad_clip=0.1, schedule="step", warmup_steps=2,
        lr_drop_epochs=200, grad_accum_steps=1))

    config.init = ml_collections.ConfigDict(dict(backbone_checkpoint="", detr_checkpoint="", reinit_class_head=False))
    return config
