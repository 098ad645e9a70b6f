"""DETR-R50-DC5 on COCO (official: 43.3 AP): the R50 recipe with a dilated last stage (output stride 16).

  python experiments/train.py --config experiments/configs/coco_r50_dc5.py --workdir DIR
"""

from experiments.configs import coco_r50


def get_config(arg: str = ""):
    config = coco_r50.get_config(arg)
    config.model.dilation = True
    return config
