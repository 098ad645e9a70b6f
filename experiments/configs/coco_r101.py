"""DETR-R101 on COCO (official: 43.5 AP): the R50 recipe with a ResNet-101 backbone.

  python experiments/train.py --config experiments/configs/coco_r101.py --workdir DIR
  (backbone from torchvision's resnet101-63fe2227.pth via config.init.backbone_checkpoint)
"""

from experiments.configs import coco_r50


def get_config(arg: str = ""):
    config = coco_r50.get_config(arg)
    config.model.backbone_depth = 101
    return config
