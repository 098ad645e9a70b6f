"""The official DETR-R50 recipe on COCO 2017 (TFDS `coco/2017`): 300 epochs, 42.0 AP in the paper.

  python experiments/train.py --config experiments/configs/coco_r50.py --workdir gs://bucket/detr_r50
  python experiments/train.py --config experiments/configs/coco_r50.py:smoke --workdir /tmp/smoke

`:smoke` runs this recipe's exact data path (TFDS ArrayRecord, the official multi-scale augmentation, recipe
buckets, size grouping, worker processes, sharded over every process) on the built-in COCO-like set
(`detr_jax.data.sources.coco_like`, prepared into TFDS's data_dir on first use) with a tiny model, a few dozen steps
and a final evaluation: a few minutes on a 2-core CPU. It also runs as several processes
(--coordinator_address=127.0.0.1:PORT --num_processes=2 --process_id=I).

Global batch 64 (the paper: 16 V100 x 4), AdamW lr 1e-4, backbone 1e-5, weight decay 1e-4, grad-norm clip 0.1,
lr x0.1 at epoch 200, aux losses, 100 queries. The backbone starts from torchvision's ImageNet ResNet-50
(set config.init.backbone_checkpoint to resnet50-0676ba61.pth). Needs tensorflow-cpu + tensorflow-datasets and the
prepared TFDS data (see the README). About 3 days on 16 V100s for the official code.
"""

import ml_collections

from detr_jax.config import base_config


def get_config(arg: str = ""):
    config = base_config()  # the base config is this recipe, on TFDS coco/2017
    # Denoising training (DN-DETR; a training-only aid, off as in the official recipe). To turn it on:
    #   --config.training_aids.dn_groups=2 [--config.training_aids.dn_negatives=True]
    # Each group decodes data.max_objects (100) more queries in training; evaluation is unchanged (docs/denoising.md).
    config.training_aids.dn_groups = 0
    # Off, as in the official recipe (config.py says what each does). To turn them on:
    #   --config.ema.decay=0.9999 --config.ema.warmup_steps=2000   (a parameter EMA, RT-DETR's values)
    #   --config.loss.class_target=iou                            (IoU-aware class targets)
    config.ema.decay = 0.0
    config.loss.class_target = "hard"
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
    config.model.update(num_queries=10, hidden_dim=32, num_heads=4, num_encoder_layers=1,
                        num_decoder_layers=2, dim_feedforward=64, backbone_depth=18)
    config.data.source_kwargs.name = "coco_like"
    config.data.val_kwargs = dict(split="validation[:16]")
    config.data.update(num_workers=2, max_buckets=3)
