"""What every layer uses: box maths, torch-compatible interpolation, COCO panoptic id maps, the device mesh and
batch sharding, XLA flags. Imports nothing else of detr_jax.

  box_ops.py       cxcywh <-> xyxy, (generalised) IoU
  files.py         files written whole or not at all
  interpolate.py   torch's nearest and bilinear resize rules, on numpy
  interpolate_device.py  torch's bilinear resize on device (jit), with torch's roundings
  panoptic_ids.py  COCO panoptic id map <-> RGB
  sharding.py      the data-parallel mesh, global batches, multi-host start
  xla_flags.py     what every entry point sets before jax starts
"""
