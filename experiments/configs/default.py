"""Default: a small DETR on the built-in synthetic shapes set, CPU-friendly, nothing to download.

  python experiments/train.py                       # this config, into ./workdir/default
  python experiments/train.py --config.num_steps=200 --workdir=/tmp/detr_try

A ResNet-18 DETR (hidden 128, 3 + 3 layers, 20 queries) on 128 x 128 images of 5 shape classes, trained from
scratch. Nothing is pretrained, so the whole backbone trains (`train_stem`, backbone lr 1e-3 with batch norm on
batch statistics, `backbone_norm="batch"`), and three training-only aids speed it up: a class and a box per token
with a fixed one-to-many assignment on the encoder tokens (`encoder_aux_loss`) and on the backbone's stages 2 and 3
(`backbone_aux_stages`, strides 8 and 16, where small shapes are still several cells wide), and 3 query groups
(Group DETR, `num_query_groups`). Classification weighs 2 instead of 1 in the loss and the matching cost, and
the no-object class 0.2 instead of 0.1. The model that is evaluated and exported is a plain DETR (its batch norms
frozen at their running statistics). On an idle 2-core CPU it reaches AP50 0.55-0.67 on the validation split in
12-13 minutes end to end (13.1 on the slowest machine measured, with the Eigen convolutions below); the README has
the measured AP-vs-minutes curve, docs/default_run.md what each of these choices bought.
"""

from detr_jax.config import base_config


def get_config():
    config = base_config()
    config.update(seed=0, batch_size=8, eval_batch_size=16,
                  num_steps=2500,  # 11.8-13.1 minutes end to end on an idle 2-core CPU (README)
                  num_epochs=0, log_every=50, checkpoint_every=500, eval_every=500)
    config.model.update(num_classes=5, num_queries=20, hidden_dim=128, num_encoder_layers=3, num_decoder_layers=3,
                        dim_feedforward=512, dropout=0.0, backbone_depth=18, train_stem=True, backbone_norm="batch")
    config.training_aids.update(num_query_groups=3, encoder_aux_loss=True, backbone_aux_stages=(2, 3))

    config.data.source = "synthetic"
    # The kwargs differ per source: replaced, not merged into the base config's TFDS ones.
    config.data.source_kwargs = dict(image_size=(128, 128), min_objects=1, max_objects=8, seed=0)
    config.data.train_kwargs = dict(split="train", num_examples=20000)
    config.data.val_kwargs = dict(split="val", num_examples=200)
    config.data.update(
        train_scales=(96, 112, 128), max_size=128, crop_resize_scales=(96, 112, 128), crop_size=(64, 112),
        eval_size=128, group_by_size=0, max_objects=10,
        # Loader workers: threads here (the synthetic images are cheap; 2 cores); the COCO configs use processes.
        num_workers=2, worker_type="thread")
    with config.data.ignore_type():
        config.data.buckets = ((128, 128),)

    # Classification weighs twice the official 1 in the loss and in the matching cost: with the box terms of the
    # decoder and of every token head, the class term's share of the update was too small to train from scratch
    # (AP50 0.47 vs 0.26 at step 2000; 3 and 4 were worse than 2), and the no-object class weighs 0.2 instead of
    # the official 0.1 (0.51 vs 0.47) - docs/default_run.md, attempts O-R.
    config.loss.update(eos_coef=0.2, cost_class=2.0, ce_loss_coef=2.0)
    config.optimizer.update(lr=4e-4, lr_backbone=1e-3, schedule="cosine", warmup_steps=200)
    # XLA:CPU convolutions by Eigen instead of YNNPACK: 1.2x faster for this small model's 128-pixel images (the same
    # losses to float32 rounding; benchmarks/bench_default_step.py), 1.09x slower for DETR-R50 at 512 pixels, where
    # YNNPACK stays (BENCHMARKS.md, CPU optimisation sweep). Ignored on GPU and TPU.
    config.xla_flags = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
    return config
