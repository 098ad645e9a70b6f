"""A tiny DETR on 64 x 64 synthetic images, for the trainer and evaluation tests.

  python experiments/train.py --config tests/configs/tiny.py --workdir /tmp/detr_tiny --config.num_steps=4

ResNet-18, hidden 32, 1 encoder + 2 decoder layers, 6 queries; a step takes well under a second on a 2-core
CPU. Dropout is 0 so that a run gives the same losses on any number of devices and processes, and the
learning rate (2 warmup steps, then a step decay at epoch 200) does not depend on num_steps, so that runs of
different lengths agree step by step.
"""

from detr_jax.config import base_config


def get_config():
    config = base_config()
    config.update(seed=0, batch_size=8, eval_batch_size=8, num_steps=4, num_epochs=0, log_every=1,
                  checkpoint_every=1000, eval_every=0, eval_at_end=False)
    config.model.update(num_classes=5, num_queries=6, hidden_dim=32, num_heads=4, num_encoder_layers=1,
                        num_decoder_layers=2, dim_feedforward=64, dropout=0.0, backbone_depth=18)
    config.data.source = "synthetic"
    # The kwargs differ per source: replaced, not merged into the base config's TFDS ones.
    config.data.source_kwargs = dict(image_size=(64, 64), min_objects=1, max_objects=4, seed=0)
    config.data.train_kwargs = dict(split="train", num_examples=64)
    config.data.val_kwargs = dict(split="val", num_examples=8)
    config.data.update(
        train_scales=(64,), max_size=64, crop_resize_scales=(64,), crop_size=(48, 64),
        eval_size=64, group_by_size=0, max_objects=8, num_workers=1, worker_type="thread")
    with config.data.ignore_type():
        config.data.buckets = ((64, 64),)
    config.optimizer.warmup_steps = 2
    return config
