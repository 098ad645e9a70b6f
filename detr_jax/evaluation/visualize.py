"""Pictures: detections or a panoptic segmentation on an image, the evaluation sheet of a run, a query's
cross-attention (PIL, host side)."""

import colorsys
import logging
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190)]


def draw_detections(image: np.ndarray, boxes, labels, scores, class_names: Sequence[str], threshold: float = 0.5,
                    caption: Optional[str] = None):
    """A PIL image of `image` (uint8 [H, W, 3]) with labelled boxes (xyxy absolute) scoring above `threshold`.

    Labels are written on a filled black box (readable on any background); `caption`, if given, the same way at
    the top-left corner. Boxes or scores that are not finite (a diverged model) are skipped and counted in a
    warning; the picture keeps the image's size."""
    pil = Image.fromarray(np.asarray(image, np.uint8))
    draw = ImageDraw.Draw(pil)
    w, h = pil.size
    non_finite = 0
    for box, label, score in zip(boxes, labels, scores):
        box = np.asarray(box, np.float64)
        if not (np.isfinite(box).all() and np.isfinite(float(score))):
            non_finite += 1
            continue
        if score < threshold:
            continue
        colour = PALETTE[int(label) % len(PALETTE)]
        # Far outside the picture (a wild box): clipped, so PIL's integer coordinates cannot overflow.
        x0, y0, x1, y1 = (float(v) for v in np.clip(box, [-w, -h, -w, -h], [2 * w, 2 * h, 2 * w, 2 * h]))
        draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], outline=colour, width=2)
        name = class_names[int(label)] if 0 <= int(label) < len(class_names) else str(int(label))
        text = f"{name} {score:.2f}"
        text_w = draw.textbbox((0, 0), text)[2]
        # Inside the picture: a box at the right edge gets its label moved left rather than cut off.
        _label(draw, (max(0.0, min(max(x0, 0.0) + 2, w - text_w - 3)), min(max(y0, 0.0), h - 1) + 1), text, colour)
    if caption:
        _label(draw, (2, 2), _wrapped(draw, caption, w - 4), (255, 255, 255))
    if non_finite:
        logger.warning("skipped %d detection(s) with a non-finite box or score (not drawn)", non_finite)
    return pil


def _wrapped(draw, text: str, width: int) -> str:
    """`text` broken into lines (at spaces) no wider than `width` pixels where the words allow: a caption of a small
    picture is shown whole rather than cut off at its right edge."""
    lines = []
    for word in text.split(" "):
        if lines and draw.textbbox((0, 0), f"{lines[-1]} {word}")[2] <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return "\n".join(lines)


def _label(draw, origin, text: str, colour) -> None:
    """`text` at `origin` in `colour` on a filled black box: readable over any picture."""
    left, top, right, bottom = draw.textbbox(origin, text)
    draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=(0, 0, 0))
    draw.text(origin, text, fill=colour)


def detections_caption(num_shown: int, threshold: float, fallback: bool) -> str:
    """The caption of a detections picture: how many pass `threshold`, or that none does and the best are shown."""
    if fallback:
        return f"none >= {threshold:.2f}: the top {num_shown} shown"
    return f"score >= {threshold:.2f}: {num_shown} detections"


def segment_colour(index: int):
    """A bright RGB colour for segment `index`; hues a golden angle apart, so neighbouring ids differ."""
    r, g, b = colorsys.hsv_to_rgb((0.08 + index * 0.618034) % 1.0, 0.75, 0.95)
    return round(255 * r), round(255 * g), round(255 * b)


def draw_panoptic(image: np.ndarray, segment_ids, segments_info: Sequence[Mapping], class_names: Sequence[str],
                  alpha: float = 0.5):
    """A PIL image of `image` (uint8 [H, W, 3]) with each segment of a panoptic segmentation in its own colour.

    Args:
      segment_ids: int [H, W] segment id of each pixel (`post_process_panoptic`'s "segment_ids"); pixels whose id
        is not in `segments_info` (void) are left as they are.
      segments_info: [{"id", "category_id", "isthing", ...}]; the category id indexes `class_names`.
      alpha: opacity of the colours over the image.
    Each segment's class name is written at its centroid; things also get the box around their pixels.
    """
    img = np.asarray(image, np.uint8)
    segment_ids = np.asarray(segment_ids)
    if segment_ids.shape != img.shape[:2]:
        raise ValueError(f"segment_ids has shape {segment_ids.shape}, the image {img.shape[:2]}: they must match "
                         f"(post-process the panoptic result to the original image size)")
    colours = np.zeros(img.shape, np.float32)
    painted = np.zeros(img.shape[:2], bool)
    labels = []  # (centroid, box or None, colour, name)
    for seg in segments_info:
        pixels = segment_ids == seg["id"]
        rows, cols = np.nonzero(pixels)
        if not len(rows):
            continue
        colour = segment_colour(int(seg["id"]))
        colours[pixels] = colour
        painted |= pixels
        category = int(seg["category_id"])
        name = class_names[category] if category < len(class_names) else str(category)
        box = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) if seg.get("isthing") else None
        labels.append(((cols.mean(), rows.mean()), box, colour, name))
    blended = img.astype(np.float32)
    blended[painted] = (1 - alpha) * blended[painted] + alpha * colours[painted]
    pil = Image.fromarray(np.clip(np.round(blended), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _, box, colour, _ in labels:
        if box is not None:
            draw.rectangle([float(v) for v in box], outline=colour, width=2)
    for (x, y), _, colour, name in labels:  # on top of every box
        left, top, right, bottom = draw.textbbox((0, 0), name)  # no anchor: PIL's bitmap font lacks them
        origin = (x - (left + right) / 2, y - (top + bottom) / 2)
        draw.rectangle(draw.textbbox(origin, name), fill=(0, 0, 0))
        draw.text(origin, name, fill=colour)
    return pil


def evaluation_sheet(examples: Sequence[Mapping], results: List[Dict], truth: Mapping[int, List], category_ids,
                     class_names: Sequence[str], path: str, threshold: float = 0.5, top_k: int = 3,
                     min_side: int = 320) -> None:
    """One PNG of `examples` (source examples: "image" uint8 [H, W, 3], "image_id") side by side, enlarged to a
    shorter side of at least `min_side`, ground truth `truth` ({image_id: [COCO xywh boxes]}) in white and the COCO
    `results` scoring >= `threshold` in class colours, the threshold written above each image. When no prediction
    of an image passes it (a young model), its `top_k` best are drawn with their scores instead, and the caption
    says so."""
    label_of = {c: i for i, c in enumerate(category_ids)}
    panels = []
    for ex in examples:
        image_id = int(ex["image_id"])
        mine = sorted((r for r in results if r["image_id"] == image_id), key=lambda r: -r["score"])
        shown = [r for r in mine if r["score"] >= threshold]
        caption = f"score >= {threshold:.2f}: {len(shown)} detections; white: ground truth"
        if not shown and mine:
            shown = mine[:top_k]
            caption = f"none >= {threshold:.2f}: the top {len(shown)} shown; white: ground truth"
        h, w = ex["image"].shape[:2]
        scale = max(1.0, min_side / min(h, w))
        image = Image.fromarray(np.asarray(ex["image"], np.uint8)).resize((round(w * scale), round(h * scale)),
                                                                         Image.BILINEAR)

        def xyxy(b, scale=scale):  # COCO xywh -> xyxy
            return [v * scale for v in (b[0], b[1], b[0] + b[2], b[1] + b[3])]

        panel = draw_detections(np.asarray(image), [xyxy(r["bbox"]) for r in shown],
                                [label_of[r["category_id"]] for r in shown], [r["score"] for r in shown],
                                class_names, threshold=-np.inf)
        draw = ImageDraw.Draw(panel)
        for box in truth.get(image_id, []):
            draw.rectangle(xyxy(box), outline=(255, 255, 255), width=1)
        framed = Image.new("RGB", (panel.width, panel.height + 16), (255, 255, 255))
        framed.paste(panel, (0, 16))
        ImageDraw.Draw(framed).text((2, 2), caption, fill=(0, 0, 0))
        panels.append(framed)
    if not panels:
        return
    canvas = Image.new("RGB", (sum(p.width for p in panels) + 4 * (len(panels) - 1), max(p.height for p in panels)),
                       (255, 255, 255))
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width + 4
    canvas.save(path)
    logger.info("wrote %s", path)


def attention_picture(image: np.ndarray, attention: np.ndarray, feature_mask: np.ndarray, box, caption: str):
    """A query's cross-attention over the image, as the official notebook shows it.

    Args:
        image: uint8 [H, W, 3]; attention: [h, w] over the padded feature map; feature_mask: bool [h, w] (True on
        real cells); box: xyxy pixels of the query's detection; caption: written at the box.
    Returns:
        a PIL image: the picture with the attention as a red overlay and the box in yellow.
    """
    img = np.asarray(image, np.uint8)
    h, w = img.shape[:2]
    attn = attention[:feature_mask.any(1).sum(), :feature_mask.any(0).sum()]  # [fh, fw], real cells only
    attn = attn / max(float(attn.max()), 1e-12)
    heat = np.asarray(Image.fromarray((attn * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)) / 255.0
    overlay = img.astype(np.float32) * (0.35 + 0.65 * heat[..., None])
    overlay[..., 0] = np.maximum(overlay[..., 0], 255 * heat)
    pil = Image.fromarray(np.clip(overlay, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    x0, y0, x1, y1 = (float(v) for v in box)
    draw.rectangle([x0, y0, x1, y1], outline=(255, 255, 0), width=2)
    draw.text((x0 + 2, y0 + 1), caption, fill=(255, 255, 0))
    return pil
