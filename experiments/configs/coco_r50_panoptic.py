"""The official panoptic DETR-R50 recipe on COCO panoptic 2017 (TFDS `coco/2017_panoptic`): PQ 43.4 in the paper.

Two stages, as the official README trains it:

  # 1. The detector on the panoptic boxes (things and stuff, the 250-class id space), 300 epochs:
  python experiments/train.py --config experiments/configs/coco_r50_panoptic.py:boxes --workdir gs://b/box_model
  # 2. The mask head with that detector frozen (the official --frozen_weights), 25 epochs, lr x0.1 at 15:
  python experiments/train.py --config experiments/configs/coco_r50_panoptic.py --workdir gs://b/panoptic \
      --config.init.detr_checkpoint=gs://b/box_model

`init.detr_checkpoint` takes the box model's work directory (its latest checkpoint) or an official DETR .pth
with 250 classes. Evaluation reports PQ / SQ / RQ (all, things, stuff) on the validation split.

Where this differs from the official code, and why:
- The mask losses are computed on 112 x 112 = 12544 uniformly drawn pixels per image
  (`panoptic.mask_loss_points`, Mask2Former's number) instead of every pixel: the batch then carries 12544 values
  per object instead of whole masks (at batch 64 with 100 objects per image, ~0.8 GB instead of ~11 GB of bool
  masks per step). The focal loss is an unbiased estimate of the official one; set it to 0 for the official loss.
- Evaluation batches are 16 images. The periodic and final evaluations report PQ and, as the official does with
  --masks, the segm / bbox AP of the same outputs: the masks' post-processing runs on device, leaving the host the
  PNGs and RLEs (~0.03 s an image at COCO sizes, BENCHMARKS.md) and [B, 100, W, H] bool masks to fetch per batch
  (~40 MB an image). --config.panoptic.eval_segm=False reports PQ only.

`:smoke` (with or without `boxes`, e.g. `:boxes,smoke`) runs each stage's data path (TFDS ArrayRecord with the
panoptic PNGs, the official augmentation at small scales, recipe buckets, worker processes) on the built-in
COCO-panoptic-like set (`detr_jax.data.sources.coco_panoptic_like`, prepared into TFDS's data_dir on first use) with a
tiny model, a few steps and a final evaluation: a minute or two on a 2-core CPU. The second stage's smoke needs the
first stage's smoke work directory as its init.detr_checkpoint.
"""

import ml_collections

from detr_jax.config import base_config

ARGUMENTS = ("boxes", "smoke")


def get_config(arg: str = ""):
    words = [w for w in arg.split(",") if w]
    unknown = sorted(set(words) - set(ARGUMENTS))
    if unknown:
        raise ValueError(f"unknown config argument(s) {unknown} for coco_r50_panoptic.py: use 'boxes', 'smoke', "
                         "'boxes,smoke' or nothing")
    config = base_config()  # the official R50 recipe
    config.model.num_classes = 250  # the official panoptic label space: label = COCO panoptic category id
    config.data.source = "tfds_panoptic"
    config.data.source_kwargs = dict(name="coco/2017_panoptic", label_space="official250", data_dir="")
    config.eval_batch_size = 16
    if "boxes" not in words:  # stage 2: the mask head on the frozen detector
        config.num_epochs = 25
        config.optimizer.lr_drop_epochs = 15
        config.panoptic.update(enabled=True, freeze_detr=True, mask_loss_points=112 * 112)
    if "smoke" in words:
        smoke(config)
    return config


def smoke(config: ml_collections.ConfigDict) -> None:
    """Either stage's data path with a tiny model and the COCO-panoptic-like TFDS set (see the module docstring)."""
    config.batch_size = 4
    config.eval_batch_size = 4
    config.num_epochs = 0
    config.num_steps = 6
    config.log_every = 2
    config.checkpoint_every = 6
    config.eval_every = 0
    # hidden_dim 128 and 8 heads: the smallest the mask head takes (GroupNorms of 8 on hidden_dim / 16 and on
    # hidden_dim + num_heads channels).
    config.model.update(num_queries=10, hidden_dim=128, num_heads=8, num_encoder_layers=1, num_decoder_layers=2,
                        dim_feedforward=128, backbone_depth=18)
    config.data.source_kwargs.name = "coco_panoptic_like"
    config.data.val_kwargs = dict(split="validation[:8]")
    config.data.update(train_scales=(96, 128), max_size=160, crop_resize_scales=(96, 128), crop_size=(64, 96),
                       eval_size=128, max_buckets=3, num_workers=2)
    if config.panoptic.enabled:
        config.panoptic.mask_loss_points = 1024
