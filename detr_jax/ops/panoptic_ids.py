"""COCO panoptic id maps <-> RGB PNG pixels (panopticapi.utils): id = R + 256 G + 256^2 B."""

import numpy as np


def id2rgb(id_map):
    """int [H, W] segment ids -> uint8 [H, W, 3] RGB with id = R + 256 G + 256^2 B."""
    id_map = np.asarray(id_map, np.int64)
    return np.stack([(id_map // 256 ** i) % 256 for i in range(3)], axis=-1).astype(np.uint8)


def rgb2id(rgb):
    """uint8 [H, W, 3] RGB -> int32 [H, W] segment ids (id = R + 256 G + 256^2 B)."""
    rgb = np.asarray(rgb, np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
