"""The 133 COCO panoptic categories (80 things, 53 stuff) in the label space of the official panoptic DETR.

The official `coco_panoptic` setup classifies into the raw category ids (num_classes=250: labels 0..249, label =
category id, unused ids never appear as targets), things keeping their detection ids 1..90 and stuff ids 92..200;
a label is a thing when it is <= 90 (official `is_thing_map = {i: i <= 90 for i in range(250)}`). Stuff names from
panopticapi's `panoptic_coco_categories.json` (cocodataset/panopticapi).
"""

from detr_jax.data.sources.coco_categories import COCO_CATEGORY_IDS, COCO_CLASS_NAMES

COCO_PANOPTIC_STUFF = (  # (category id, name)
    (92, "banner"), (93, "blanket"), (95, "bridge"), (100, "cardboard"), (107, "counter"), (109, "curtain"),
    (112, "door-stuff"), (118, "floor-wood"), (119, "flower"), (122, "fruit"), (125, "gravel"), (128, "house"),
    (130, "light"), (133, "mirror-stuff"), (138, "net"), (141, "pillow"), (144, "platform"), (145, "playingfield"),
    (147, "railroad"), (148, "river"), (149, "road"), (151, "roof"), (154, "sand"), (155, "sea"), (156, "shelf"),
    (159, "snow"), (161, "stairs"), (166, "tent"), (168, "towel"), (171, "wall-brick"), (175, "wall-stone"),
    (176, "wall-tile"), (177, "wall-wood"), (178, "water-other"), (180, "window-blind"), (181, "window-other"),
    (184, "tree-merged"), (185, "fence-merged"), (186, "ceiling-merged"), (187, "sky-other-merged"),
    (188, "cabinet-merged"), (189, "table-merged"), (190, "floor-other-merged"), (191, "pavement-merged"),
    (192, "mountain-merged"), (193, "grass-merged"), (194, "dirt-merged"), (195, "paper-merged"),
    (196, "food-other-merged"), (197, "building-other-merged"), (198, "rock-merged"), (199, "wall-other-merged"),
    (200, "rug-merged"))

OFFICIAL250_NUM_CLASSES = 250
OFFICIAL250_THING_MAX = 90  # labels <= 90 are things (official is_thing_map)

# index = label = COCO panoptic category id, "N/A" where COCO has no category.
_NAMES = {**dict(zip(COCO_CATEGORY_IDS, COCO_CLASS_NAMES)), **dict(COCO_PANOPTIC_STUFF)}
OFFICIAL250_CLASS_NAMES = tuple(_NAMES.get(i, "N/A") for i in range(OFFICIAL250_NUM_CLASSES))
OFFICIAL250_IS_THING = tuple(i <= OFFICIAL250_THING_MAX for i in range(OFFICIAL250_NUM_CLASSES))

# The 133 categories sorted by id: the order of the panoptic JSON's "categories", hence TFDS coco/2017_panoptic's
# label order (label i is category COCO_PANOPTIC_CATEGORY_IDS[i]).
COCO_PANOPTIC_CATEGORY_IDS = tuple(sorted(_NAMES))
COCO_PANOPTIC_CLASS_NAMES = tuple(_NAMES[i] for i in COCO_PANOPTIC_CATEGORY_IDS)
COCO_PANOPTIC_IS_THING = tuple(i <= OFFICIAL250_THING_MAX for i in COCO_PANOPTIC_CATEGORY_IDS)

assert len(COCO_PANOPTIC_STUFF) == 53 and len(_NAMES) == 133
