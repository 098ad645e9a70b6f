"""Panoptic default: the default run's small DETR with the official mask head, on the built-in synthetic panoptic
set (stuff bands, thing shapes on top), CPU-friendly, nothing to download.

  python experiments/train.py --config experiments/configs/panoptic_default.py

The detector and its training aids are those of default.py (ResNet-18 trained from scratch with batch norm, token
heads on the encoder and on stages 2 and 3; no query groups: the mask head decodes one query set), here for 3
thing and 3 stuff classes, and the mask head (`DETRsegm`) trains jointly with it on the official focal and dice
losses. Evaluation reports PQ / SQ / RQ on the validation split (all, things, stuff).
"""

from experiments.configs import default


def get_config():
    config = default.get_config()
    config.num_steps = 2000
    config.model.num_classes = 6  # SyntheticPanoptic: things 0-2, stuff 3-5
    config.training_aids.num_query_groups = 1
    config.panoptic.enabled = True
    config.data.source = "synthetic_panoptic"
    config.data.source_kwargs = dict(image_size=(128, 128), seed=0)
    config.data.train_kwargs = dict(split="train", num_examples=20000)
    config.data.val_kwargs = dict(split="val", num_examples=200)
    return config
