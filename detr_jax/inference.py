"""Inference for people: load once, call on images; attention maps; `jax.export` of the inference function.

    predictor = Predictor.from_checkpoint("detr-r50-e632da11.pth")      # or a training work directory
    detections = predictor("street.jpg")                                # or a uint8 [H, W, 3] array
    # {"boxes": [K, 4] xyxy pixels, "scores": [K], "labels": [K], "label_names": [...]}

A panoptic checkpoint (e.g. detr-r50-panoptic-00ce5173.pth: a `DETRsegm`, COCO panoptic label space) also
segments: `predictor.panoptic("street.jpg")` gives the official `PostProcessPanoptic` result at the original
size, with label names, and `predictor.draw` paints the segments.
"""

import json
import logging
import os
from typing import Dict, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from detr_jax.data import build_source
from detr_jax.data.sources.coco_categories import OFFICIAL91_CLASS_NAMES
from detr_jax.data.sources.coco_panoptic_categories import OFFICIAL250_CLASS_NAMES, OFFICIAL250_IS_THING
from detr_jax.data.sources.files import DECODE_ERRORS, read_rgb
from detr_jax.data.transforms import make_eval_transforms
from detr_jax.evaluation.postprocess import postprocess
from detr_jax.evaluation.postprocess_panoptic import post_process_panoptic
from detr_jax.evaluation.visualize import attention_picture, detections_caption, draw_detections, draw_panoptic
from detr_jax.models.detr import DETR
from detr_jax.models.segmentation import DETRsegm
from detr_jax.weights.official import load_official_checkpoint
from detr_jax.weights.workdir import load_workdir_checkpoint

STRIDE = 32  # pad to a multiple of the backbone stride: few compiled shapes, exact mask downsampling
TOP_K_FALLBACK = 3  # detections drawn (with a caption saying so) when none passes the threshold
logger = logging.getLogger(__name__)


def read_image(path: str) -> np.ndarray:
    """uint8 [H, W, 3] RGB of an image file, turned upright by its EXIF orientation (phone photos; training data
    keeps COCO's convention of ignoring it). 16-bit grayscale is scaled to 8 bits; a decompression bomb (a header
    declaring more than 2 * PIL.Image.MAX_IMAGE_PIXELS pixels) is refused before decoding. Any file that cannot
    be read: one ValueError (FileNotFoundError when missing) naming the file."""
    try:
        return read_rgb(path, exif_transpose=True)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"image not found: {path}") from e
    except IsADirectoryError as e:
        raise ValueError(f"cannot read image {path}: it is a folder") from e
    except DECODE_ERRORS as e:  # not an image, truncated, a decompression bomb, 32-bit / float pixels
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def _detr_with_attention(next_fun, args, kwargs, context):
    """A flax method interceptor: the `DETR` inside a `DETRsegm` also returns its cross-attention (`DETRsegm`
    has no `return_attention` of its own, and a second detector pass only for the maps would double the cost)."""
    if isinstance(context.module, DETR) and context.method_name == "__call__":
        kwargs = dict(kwargs, return_attention=True)
    return next_fun(*args, **kwargs)


def _segment_boxes(segment_ids: np.ndarray, segments_info: Sequence[Dict]):
    """COCO xywh box of each segment's pixels in `segment_ids` [H, W] ([0, 0, 0, 0] for a segment without any)."""
    boxes = []
    for seg in segments_info:
        rows, cols = np.nonzero(segment_ids == seg["id"])
        boxes.append([int(cols.min()), int(rows.min()), int(cols.max() - cols.min() + 1),
                      int(rows.max() - rows.min() + 1)] if len(rows) else [0, 0, 0, 0])
    return boxes


class Predictor:
    """A DETR ready to run on single images: eval transform, padding, jit per padded shape, post-processing.

    Args:
      model, variables: a `DETR` (or a `DETRsegm`, DETR with the panoptic mask head) and its {"params", "frozen"}.
      class_names: name of each label (no-object excluded).
      size, max_size: the eval resize (shorter side, longer-side cap), official 800 / 1333.
      threshold: detections scoring below it are dropped.
      is_thing: for a `DETRsegm`, whether each label is a thing (False: stuff, whose queries merge into one
        segment per class). Default: the official COCO panoptic map (labels <= 90) for 250 classes, else all things.
      panoptic_threshold: for a `DETRsegm`, the class probability a query needs to become a segment (official 0.85).

    A `DETRsegm` runs on the unpadded image, one compilation per image size: its mask head's GroupNorm and
    convolutions see the padding, so padded masks would differ from the official single-image result.
    """

    def __init__(self, model, variables, class_names: Sequence[str], size: int = 800, max_size: int = 1333,
                 threshold: float = 0.7, is_thing: Optional[Sequence[bool]] = None, panoptic_threshold: float = 0.85):
        self.has_masks = isinstance(model, DETRsegm)
        self.model = model.with_detector(padding_invariant=True, aux_loss=False)
        self.variables = variables
        num_classes = model.detector.num_classes
        # A model may have more classes than its data named (an official checkpoint fine-tuned on a few categories
        # without reinit): a label past the names is named by its number.
        self.class_names = list(class_names) + [str(i) for i in range(len(class_names), num_classes)]
        self.transforms = make_eval_transforms(size, max_size)
        self.threshold = threshold
        self.panoptic_threshold = panoptic_threshold
        if is_thing is None:
            is_thing = OFFICIAL250_IS_THING if num_classes == len(OFFICIAL250_IS_THING) else [True] * num_classes
        if len(is_thing) != num_classes:
            raise ValueError(f"is_thing has {len(is_thing)} entries but the model has {num_classes} classes: give "
                             f"one bool per label")
        self.is_thing = [bool(t) for t in is_thing]

        def forward(variables, images, pixel_mask, orig_size):
            if self.has_masks:
                with nn.intercept_methods(_detr_with_attention):
                    out = self.model.apply(variables, images, pixel_mask=pixel_mask)
            else:
                out = self.model.apply(variables, images, pixel_mask=pixel_mask, return_attention=True)
            scores, labels, boxes = postprocess(out["pred_logits"], out["pred_boxes"], orig_size)
            masks = (out["pred_logits"], out["pred_masks"]) if self.has_masks else ()
            return (scores, labels, boxes, out["cross_attention"], out["feature_mask"]) + masks

        self._forward = jax.jit(forward)

    @classmethod
    def from_checkpoint(cls, path: str, raw_weights: bool = False, **kwargs) -> "Predictor":
        """From an official DETR .pth (COCO 91-id class names; a panoptic one: the 250-id COCO panoptic names and
        thing/stuff map) or a detr_jax training work directory.

        For a .pth, `dilation` and `num_heads` (official defaults False, 8) may be given; other kwargs go to
        the constructor. A work directory's run with a parameter EMA (config.ema) predicts with the EMA, unless
        `raw_weights`.
        """
        if os.path.isdir(path):
            config, model, variables = load_workdir_checkpoint(path, raw_weights=raw_weights)
            d = config.data
            names_file = os.path.join(path, "class_names.json")
            if os.path.isfile(names_file):  # written at the start of training: the data need not be here
                with open(names_file) as f:
                    written = json.load(f)
                names = written["class_names"]
                if "is_thing" in written:
                    kwargs.setdefault("is_thing", written["is_thing"])
            else:  # a work directory of an older version: ask the data
                source = build_source(d.source, **dict(d.source_kwargs, **d.val_kwargs))
                names = getattr(source, "class_names", [])
            names = list(names) or [str(i) for i in range(model.detector.num_classes)]
            kwargs.setdefault("size", d.eval_size)
            kwargs.setdefault("max_size", d.max_size)
            return cls(model, variables, names, **kwargs)
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint not found: {path} (an official .pth or a training work directory)")
        arch = {k: kwargs.pop(k) for k in ("dilation", "num_heads") if k in kwargs}  # not in the weights
        model, variables = load_official_checkpoint(path, **arch)
        num_classes = model.detector.num_classes
        official = {len(names): names for names in (OFFICIAL91_CLASS_NAMES, OFFICIAL250_CLASS_NAMES)}
        names = official.get(num_classes, [str(i) for i in range(num_classes)])
        return cls(model, variables, names, **kwargs)

    def _prepare(self, image: np.ndarray):
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
        x, _ = self.transforms(image.astype(np.uint8), None, np.random.default_rng(0))
        h, w = x.shape[:2]
        stride = 1 if self.has_masks else STRIDE  # see the class docstring
        ph, pw = -(-h // stride) * stride, -(-w // stride) * stride
        images = np.zeros((1, ph, pw, 3), np.float32)
        images[0, :h, :w] = x
        pixel_mask = np.zeros((1, ph, pw), bool)
        pixel_mask[0, :h, :w] = True
        return images, pixel_mask, np.array([image.shape[:2]], np.int32)

    def run(self, image: Union[str, np.ndarray]) -> Dict:
        """All queries: scores [N], labels [N], boxes [N, 4] xyxy pixels of the original image, attention [N, h, w]
        over the padded feature map, feature_mask bool [h, w] (True on real cells), and the image.

        With a mask head also "panoptic" (see `panoptic`), "pred_logits" [N, C + 1] and "pred_masks" [N, h4, w4]
        (mask logits at stride 4 of the resized image) and "processed_size" (h, w) of the resized image.
        """
        if isinstance(image, (str, os.PathLike)):
            image = read_image(str(image))
        images, pixel_mask, orig_size = self._prepare(image)
        scores, labels, boxes, attention, feature_mask, *masks = jax.device_get(
            self._forward(self.variables, images, pixel_mask, orig_size))
        out = dict(scores=scores[0], labels=labels[0], boxes=boxes[0], attention=attention[0],
                   feature_mask=feature_mask[0], image=image)
        if self.has_masks:
            pred_logits, pred_masks = masks
            processed_size = images.shape[1:3]  # unpadded (see `_prepare`)
            out.update(pred_logits=pred_logits[0], pred_masks=pred_masks[0], processed_size=processed_size,
                       panoptic=self._panoptic(pred_logits, pred_masks, processed_size, image.shape[:2]))
        return out

    def _panoptic(self, pred_logits, pred_masks, processed_size, orig_size) -> Dict:
        """The official PostProcessPanoptic of one image's outputs, plus each segment's box and label name."""
        result = post_process_panoptic(pred_logits, pred_masks, None, [processed_size], [orig_size],
                                       dict(enumerate(self.is_thing)), threshold=self.panoptic_threshold)[0]
        boxes = _segment_boxes(result["segment_ids"], result["segments_info"])
        names = self.class_names
        result["segments_info"] = [
            dict(seg, bbox=box, label_name=names[seg["category_id"]] if seg["category_id"] < len(names)
                 else str(seg["category_id"]))
            for seg, box in zip(result["segments_info"], boxes)]
        return result

    def panoptic(self, image: Union[str, np.ndarray]) -> Dict:
        """The panoptic segmentation of an image (models with a mask head), the official `PostProcessPanoptic`
        with processed size = the resized image and target size = the original image:

          "segment_ids": int32 [H, W] in original-image pixels, indexing "segments_info" (all 0 and no segments
            when no query passes `panoptic_threshold`);
          "png_string": the id map as a COCO panoptic PNG (id = R + 256 G + 256^2 B);
          "segments_info": [{"id", "isthing", "category_id" (the label), "area" (pixels), "bbox" (COCO xywh of
            the segment's pixels), "label_name"}].
        """
        if not self.has_masks:
            raise ValueError("panoptic segmentation needs a checkpoint with a mask head (e.g. the official "
                             "detr-r50-panoptic-00ce5173.pth); this model is a detector only")
        return self.run(image)["panoptic"]

    def __call__(self, image: Union[str, np.ndarray]) -> Dict:
        """Detections above the threshold: boxes [K, 4] xyxy pixels, scores [K], labels [K], label_names;
        with a mask head also "panoptic" (see `panoptic`). Queries with a non-finite box or score are never
        kept: "non_finite" counts them (and a warning says so). When none passes the threshold, "top" holds the
        `TOP_K_FALLBACK` best (same fields), which `draw` shows with a caption saying so."""
        out = self.run(image)
        finite = np.isfinite(out["boxes"]).all(-1) & np.isfinite(out["scores"])
        keep = finite & (out["scores"] >= self.threshold)
        detections = self._select(out, keep)
        detections["non_finite"] = int((~finite).sum())
        if detections["non_finite"]:
            logger.warning("skipped %d of %d queries with a non-finite box or score (a diverged model?)",
                           detections["non_finite"], len(finite))
        if not keep.any() and finite.any():  # a young model: its best guesses, for the picture only
            best = np.flatnonzero(finite)[np.argsort(-out["scores"][finite], kind="stable")[:TOP_K_FALLBACK]]
            detections["top"] = self._select(out, best)
        if self.has_masks:
            detections["panoptic"] = out["panoptic"]
        return detections

    def _select(self, out: Dict, index) -> Dict:
        labels = out["labels"][index]
        return dict(boxes=out["boxes"][index], scores=out["scores"][index], labels=labels,
                    label_names=[self.class_names[int(label)] for label in labels])

    def draw(self, image: Union[str, np.ndarray], detections: Optional[Dict] = None, panoptic: Optional[bool] = None):
        """A PIL image of `detections` (`self(image)` if not given): with `panoptic` (default: when the model has
        a mask head) the coloured, labelled segments, things with their boxes; else the labelled boxes."""
        if isinstance(image, (str, os.PathLike)):
            image = read_image(str(image))
        detections = detections if detections is not None else self(image)
        if self.has_masks if panoptic is None else panoptic:
            if "panoptic" not in detections:
                raise ValueError("no panoptic result to draw: the model has no mask head" if not self.has_masks
                                 else "`detections` lacks 'panoptic': pass the output of this predictor's call")
            result = detections["panoptic"]
            return draw_panoptic(image, result["segment_ids"], result["segments_info"], self.class_names)
        shown, fallback = detections, False
        if not len(detections["scores"]) and detections.get("top") is not None:
            shown, fallback = detections["top"], True  # none passes the threshold: the best few, said so
        caption = detections_caption(len(shown["scores"]), self.threshold, fallback)
        return draw_detections(image, shown["boxes"], shown["labels"], shown["scores"], self.class_names,
                               threshold=-np.inf, caption=caption)

    def attention_picture(self, image: Union[str, np.ndarray], query: Optional[int] = None):
        """The last decoder layer's cross-attention of one query (default: the best-scoring) over the image.

        Returns a PIL image: the picture with the attention as a red overlay and the query's box, as in the
        official notebook's visualisation.
        """
        out = self.run(image)
        query = int(np.argmax(out["scores"])) if query is None else int(query)
        label = self.class_names[int(out["labels"][query])]
        return attention_picture(out["image"], out["attention"][query], out["feature_mask"], out["boxes"][query],
                                 f"query {query}: {label} {out['scores'][query]:.2f}")


def export_inference(model, variables, batch_size: int, image_hw: Sequence[int]):
    """`jax.export` the jitted inference function for one static input shape, weights included.

    The exported function takes images float32 [batch_size, H, W, 3] (normalised, zero-padded) and pixel_mask
    bool [batch_size, H, W], and returns (pred_logits [B, N, C + 1], pred_boxes [B, N, 4] cxcywh normalised).
    H and W are the padding bucket (multiples of 32); export one function per bucket.
    Returns a `jax.export.Exported`; `.serialize()` gives bytes, `jax.export.deserialize(b).call(...)` runs them.
    """
    model = model.clone(aux_loss=False)

    def infer(images, pixel_mask):
        out = model.apply(variables, images, pixel_mask=pixel_mask)
        return out["pred_logits"], out["pred_boxes"]

    h, w = image_hw
    args = (jax.ShapeDtypeStruct((batch_size, h, w, 3), jnp.float32),
            jax.ShapeDtypeStruct((batch_size, h, w), jnp.bool_))
    return jax.export.export(jax.jit(infer))(*args)
