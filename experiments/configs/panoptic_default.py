"""Panoptic default: the default run's small DETR with the official mask head, on the built-in synthetic panoptic
set (stuff bands, thing shapes on top), CPU-friendly, nothing to download.

  python experiments/train.py --config experiments/configs/panoptic_default.py

The detector and its training aids are those of default.py (ResNet-18 trained from scratch with batch norm, token
heads on the encoder and on stages 2 and 3; no query groups: the mask head decodes one query set), here for 3
thing and 3 stuff classes, and the mask head (`DETRsegm`) trains jointly with it on the official focal and dice
losses, weighted 10 and 5 instead of the official 1 and 1 (with every other loss of a from-scratch detector
beside them, the masks got too small a share of the clipped gradient: PQ 0.46 instead of 0.76 at step 2000 of
a 2800-step run, docs/panoptic_default_run.md). Evaluation reports PQ / SQ / RQ on the validation split (all,
things, stuff) and the segm / bbox AP of the thing segments. The README has the measured PQ-vs-minutes curve.
"""

from experiments.configs import default


def get_config():
    config = default.get_config()
    config.num_steps = 2000
    config.model.num_classes = 6  # SyntheticPanoptic: things 0-2, stuff 3-5
    config.training_aids.num_query_groups = 1
    config.panoptic.update(enabled=True, mask_loss_coef=10.0, dice_loss_coef=5.0)
    config.data.source = "synthetic_panoptic"
    config.data.source_kwargs = dict(image_size=(128, 128), seed=0)
    config.data.train_kwargs = dict(split="train", num_examples=20000)
    config.data.val_kwargs = dict(split="val", num_examples=200)
    return config
