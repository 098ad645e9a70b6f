"""Weights from elsewhere -> Flax variables of our models.

  official.py   the official DETR .pth (detection and panoptic) and torchvision ResNet checkpoints
  hf.py         HF transformers' DetrForObjectDetection / DetrForSegmentation
  workdir.py    a detr_jax work directory's latest checkpoint (its detector)
"""
