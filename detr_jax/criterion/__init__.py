"""What the loss is: `Criterion` (criterion.py) matches and adds up every term.

  matcher.py        the matching cost (class, L1, GIoU) and the Hungarian assignment (host scipy or device optax)
  set_losses.py     class / box / GIoU losses per decoder layer, given the matching
  mask_losses.py    panoptic focal and dice mask losses
  dense_losses.py   the training aids' one-to-many token losses
  query_groups.py   Group DETR: each query group matched on its own
"""

from detr_jax.criterion.criterion import Criterion
from detr_jax.criterion.matcher import HungarianMatcher, hungarian_match

__all__ = ["Criterion", "HungarianMatcher", "hungarian_match"]
