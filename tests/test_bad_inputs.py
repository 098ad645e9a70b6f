"""Hostile inputs (issue 23): malformed images, annotation files and checkpoints, made tiny at test time, each
run through the code that meets it in practice. Each gets one clear line naming the file / entry / field, or a
documented, counted skip (CocoFolder's skip_bad_images=True) -- never a traceback from deep inside.

Images (CocoFolder built with `build_source("coco_folder", ...)`; `inference.read_image` / `Predictor`):
  input                                      -> expected outcome
  empty (0-byte) .png                        -> ImageReadError naming the file; skip_bad_images: skipped, counted
  random bytes named .jpg                    -> ImageReadError / ValueError naming the file
  text file named .png                       -> ValueError naming the file (read_image)
  truncated PNG (half its bytes)             -> ImageReadError / ValueError naming the file
  a folder given as an image                 -> ValueError naming it (read_image)
  JPEG bytes with a .png extension           -> read as the JPEG it is
  RGBA PNG                                   -> RGB, alpha dropped
  palette ("P") PNG                          -> RGB of the palette colours
  CMYK JPEG                                  -> uint8 [H, W, 3]
  1x1 image                                  -> read; the train transforms give a >= 1 px image
  1x4000 image                               -> get_size never below 1 px nor above max_size (official: (0, 0));
                                                train transforms and Predictor run (crop branch <= 8192 px)
  decompression bomb: PNG declaring 20000 x 10000
      no width/height in the JSON            -> ImageReadError at construction naming the file (header check);
                                                skip_bad_images: dropped at construction, counted
      width/height in the JSON               -> ImageReadError naming the file when read; skip: next image, counted
      read_image                             -> ValueError naming the file, "DecompressionBombError"
  16-bit grayscale PNG ("I;16")              -> top 8 bits (0x8000 -> 128), not clipped to white
  32-bit float TIFF ("F")                    -> refused, naming the file and "mode F"
  JPEG with EXIF orientation 6               -> read_image / Predictor: upright (rotated); CocoFolder: as stored
Annotation files (CocoFolder's JSON) -> AnnotationError naming the file, the entry and the field, at construction:
  empty file; binary garbage; a JSON list    -> "not valid JSON" / "has no 'images' list"
  image height "abc" / None; negative width  -> names the image id and height / width
  image entry not an object                  -> "image entry #0"
  integer file_name; absolute; with ".."     -> names the image id and file_name
  duplicate image id / annotation id         -> "appears twice"
  annotation not an object                   -> "annotation #1"
  iscrowd "0"                                -> names the annotation id and iscrowd (was: counted as crowd)
  image_id a list (unhashable)               -> names the annotation id and image id
  category not an object                     -> "category #0"
  category id 10^9, label_space official91  -> refused naming the id (contiguous: fine)
  boxes outside the image                    -> clipped to it, degenerate ones dropped and counted (official)
Checkpoints (`weights.official.load_official_checkpoint`) -> one line naming the file:
  empty .pth; random bytes .pth; JSON renamed .pth; a folder -> ValueError "not a DETR checkpoint" / "folder"
  truncated .pth (a zip cut short)           -> ValueError "truncated or damaged" (before torch is needed)
  missing .pth                               -> FileNotFoundError
  no 'model', non-tensors, unknown key, wrong rank, NaN/inf weights, torch < 2.10 -> tests/test_checkpoint_inputs.py
Noise (one clear line or none):
  a process Loader left open at exit         -> closed at exit: no "N leaked shared_memory objects" warning
  TFDS's "OpenCV is not installed" notice    -> dropped (a logging filter on "absl", that message only)
"""

import io
import json
import logging
import struct
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from detr_jax.data import build_source
from detr_jax.data.sources.coco_folder import AnnotationError, ImageReadError
from detr_jax.data.transforms import get_size, make_train_transforms
from detr_jax.inference import read_image
from detr_jax.weights.official import load_official_checkpoint

H, W = 6, 8  # the good images' size (h x w)


# ---------------------------------------------------------------------------------------------------- generators

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 20000, height: int = 10000) -> bytes:
    """A ~60-byte PNG whose header declares width x height 8-bit grayscale pixels (its data is a few bytes)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + _png_chunk(b"IEND", b""))


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def good_png(value: int = 100) -> bytes:
    return encode(Image.fromarray(np.full((H, W, 3), value, np.uint8)), "PNG")


def exif_rotated_jpeg() -> bytes:
    """Stored 8 wide x 16 high, a red 4x4 block top-left, EXIF orientation 6 (shown rotated 90 degrees clockwise:
    16 wide x 8 high, the block top-right)."""
    stored = np.zeros((16, 8, 3), np.uint8)
    stored[:4, :4] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(stored), "JPEG", exif=exif, quality=95)


def folder(tmp_path, files, images=None, annotations=(), categories=None, raw_json=None, **kwargs):
    """A CocoFolder over `files` {name: bytes} through build_source. `images` defaults to one entry per file, with
    the good images' size; `raw_json` (text) replaces the whole annotation file."""
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    for name, data in files.items():
        (image_dir / name).write_bytes(data)
    if images is None:
        images = [{"id": i + 1, "file_name": name, "height": H, "width": W} for i, name in enumerate(files)]
    ann_file = tmp_path / "instances.json"
    if raw_json is not None:
        ann_file.write_bytes(raw_json if isinstance(raw_json, bytes) else raw_json.encode())
    else:
        ann_file.write_text(json.dumps({"images": images, "annotations": list(annotations),
                                        "categories": categories or [{"id": 1, "name": "thing"}]}))
    return build_source("coco_folder", ann_file=str(ann_file), image_dir=str(image_dir), **kwargs)


def ann(ann_id, bbox=(1, 1, 2, 2), image_id=1, category_id=1, **extra):
    return dict({"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": list(bbox),
                 "iscrowd": 0, "area": 4.0}, **extra)


def one_line(message: str) -> str:
    assert "\n" not in message, message
    return message


# -------------------------------------------------------------------------------------------------------- images

@pytest.mark.parametrize("name,data", [
    ("empty.png", b""),
    ("noise.jpg", np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()),
    ("truncated.png", good_png()[:40]),
])
def test_unreadable_image_names_the_file_or_is_skipped(tmp_path, caplog, name, data):
    files = {"a_good.png": good_png(), name: data}
    src = folder(tmp_path, files)
    with pytest.raises(ImageReadError, match=name) as info:
        src[1]
    one_line(str(info.value))
    with pytest.raises(ValueError, match=name):
        read_image(str(tmp_path / "images" / name))
    with caplog.at_level(logging.WARNING):
        skipping = folder(tmp_path, files, skip_bad_images=True)
        ex = skipping[1]  # replaced by the next readable one
    assert ex["image_id"] == 1 and skipping.stats["bad_images_skipped"] == 1
    assert name in caplog.text


def test_text_and_folder_given_as_images(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("these are not pixels\n")
    with pytest.raises(ValueError, match="notes.png"):
        read_image(str(text))
    (tmp_path / "photos.jpg").mkdir()
    with pytest.raises(ValueError, match="photos.jpg.*folder"):
        read_image(str(tmp_path / "photos.jpg"))


def test_working_oddities(tmp_path):
    """A JPEG named .png, RGBA and palette PNGs, a CMYK JPEG and a 1x1 image are all read as RGB."""
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10  # nearly transparent red: alpha is dropped, as convert("RGB")
    palette = Image.fromarray(np.full((H, W), 3, np.uint8), "P")
    palette.putpalette([0, 0, 0] * 3 + [10, 20, 30] + [0, 0, 0] * 252)
    files = {
        "jpeg_inside.png": encode(Image.fromarray(np.full((H, W, 3), 90, np.uint8)), "JPEG"),
        "alpha.png": encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "palette.png": encode(palette, "PNG"),
        "cmyk.jpg": encode(Image.new("CMYK", (W, H), (0, 255, 255, 0)), "JPEG", quality=95),
    }
    src = folder(tmp_path, files)
    images = [src[i]["image"] for i in range(len(src))]
    for image in images:
        assert image.shape == (H, W, 3) and image.dtype == np.uint8
    assert abs(int(images[0].mean()) - 90) <= 2
    np.testing.assert_array_equal(images[1][0, 0], [200, 0, 0])
    np.testing.assert_array_equal(images[2][0, 0], [10, 20, 30])
    assert images[3][0, 0, 0] > 200 and images[3][0, 0, 1:].max() < 60  # CMYK (0, 255, 255, 0) is red
    for name in files:
        assert read_image(str(tmp_path / "images" / name)).shape == (H, W, 3)


def test_one_pixel_image(tmp_path):
    files = {"dot.png": encode(Image.fromarray(np.full((1, 1, 3), 7, np.uint8)), "PNG")}
    src = folder(tmp_path, files, images=[{"id": 1, "file_name": "dot.png"}], annotations=[ann(1, (0, 0, 1, 1))])
    ex = src[0]
    assert ex["image"].shape == (1, 1, 3) and src.image_size(0) == (1, 1)
    np.testing.assert_array_equal(ex["boxes"], [[0, 0, 1, 1]])
    transforms = make_train_transforms(scales=(32,), max_size=48, crop_resize_scales=(24,), crop_size=(16, 32))
    for seed in range(6):
        image, target = transforms(ex["image"], {"boxes": ex["boxes"], "labels": ex["labels"]},
                                   np.random.default_rng(seed))
        assert min(image.shape[:2]) >= 1 and target["boxes"].shape[1] == 4


def test_extreme_aspect_ratio_sizes():
    """The official gives (0, 0) for 1 x 4000 (then PIL raises); ours is >= 1 px and <= max_size, official
    numbers elsewhere."""
    assert get_size((1, 4000), 800, 1333) == (1, 1333)
    assert get_size((4000, 1), 800, 1333) == (1333, 1)
    assert get_size((480, 640), 800, 1333) == (800, 1066)  # official numbers for normal images
    assert get_size((1334, 500), 800, 1333) == (1334, 500)  # the official one-pixel overshoot is kept
    h, w = get_size((1, 4000), 400)  # the crop branch's resize (no max_size) asks for megabytes, not gigabytes
    assert h * w * 3 < 64 * 2 ** 20
    image = np.zeros((1, 4000, 3), np.uint8)
    target = {"boxes": np.array([[0, 0, 4000, 1]], np.float32), "labels": np.zeros(1, np.int32)}
    transforms = make_train_transforms(scales=(64,), max_size=107, crop_resize_scales=(48,), crop_size=(32, 64))
    for seed in range(8):  # both branches of the RandomSelect
        out, _ = transforms(image, target, np.random.default_rng(seed))
        assert 1 <= min(out.shape[:2]) and max(out.shape[:2]) <= 107


def test_decompression_bomb(tmp_path, caplog):
    files = {"a_good.png": good_png(), "bomb.png": bomb_png()}
    no_size = [{"id": 1, "file_name": "a_good.png"}, {"id": 2, "file_name": "bomb.png"}]
    with pytest.raises(ImageReadError, match="bomb.png.*DecompressionBombError") as info:  # the header check
        folder(tmp_path, files, images=no_size)
    one_line(str(info.value))
    with caplog.at_level(logging.WARNING):
        skipped = folder(tmp_path, files, images=no_size, annotations=[ann(1, image_id=2)], skip_bad_images=True)
    assert len(skipped) == 1 and skipped.stats["bad_images_skipped"] == 1 and "bomb.png" in caplog.text
    sized = folder(tmp_path, files)  # the JSON gives a size: the bomb is met when read
    with pytest.raises(ImageReadError, match="bomb.png.*DecompressionBombError"):
        sized[1]
    skipping = folder(tmp_path, files, skip_bad_images=True)
    assert skipping[1]["image_id"] == 1 and skipping.stats["bad_images_skipped"] == 1
    with pytest.raises(ValueError, match="bomb.png.*DecompressionBombError"):
        read_image(str(tmp_path / "images" / "bomb.png"))


def test_sixteen_bit_grayscale_is_scaled(tmp_path):
    values = np.full((H, W), 0x8000, np.uint16)
    values[0, 0], values[0, 1] = 0xFFFF, 0x00FF
    files = {"deep.png": encode(Image.fromarray(values), "PNG")}
    src = folder(tmp_path, files)
    for image in (src[0]["image"], read_image(str(tmp_path / "images" / "deep.png"))):
        assert image.shape == (H, W, 3) and image.dtype == np.uint8
        assert image[1, 1].tolist() == [128] * 3 and image[0, 0].tolist() == [255] * 3
        assert image[0, 1].tolist() == [0] * 3


def test_float_image_is_refused_naming_file_and_mode(tmp_path):
    files = {"float.tif": encode(Image.fromarray(np.full((H, W), 0.5, np.float32)), "TIFF")}
    with pytest.raises(ImageReadError, match="float.tif.*mode F"):
        folder(tmp_path, files)[0]
    with pytest.raises(ValueError, match="float.tif.*mode F"):
        read_image(str(tmp_path / "images" / "float.tif"))


def test_exif_orientation_applied_for_inference_only(tmp_path):
    path = tmp_path / "phone.jpg"
    path.write_bytes(exif_rotated_jpeg())
    upright = read_image(str(path))
    assert upright.shape == (8, 16, 3)
    assert upright[1, -2, 0] > 150 and upright[1, -2, 1] < 100 and upright[1, 1, 0] < 100  # the block: top-right
    src = folder(tmp_path, {"phone.jpg": path.read_bytes()},
                 images=[{"id": 1, "file_name": "phone.jpg", "height": 16, "width": 8}])
    assert src[0]["image"].shape == (16, 8, 3)  # training: as stored, as COCO and the official


def test_predictor_on_exif_and_extreme_images(tmp_path):
    """Predictor takes the EXIF-rotated photo upright and a 1 x 4000 image (both pad to 32 x 64: one compile)."""
    import jax
    import jax.numpy as jnp

    from detr_jax.inference import Predictor
    from detr_jax.models.detr import DETR

    model = DETR(num_classes=2, num_queries=3, hidden_dim=16, num_heads=2, num_encoder_layers=1,
                 num_decoder_layers=1, dim_feedforward=16, backbone_depth=18)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
    variables = jax.tree_util.tree_map(lambda s: jnp.full(s.shape, 0.01, s.dtype), shapes)
    predictor = Predictor(model, variables, ["a", "b"], size=32, max_size=64, threshold=0.0)
    path = tmp_path / "phone.jpg"
    path.write_bytes(exif_rotated_jpeg())
    out = predictor.run(str(path))
    assert out["image"].shape == (8, 16, 3) and out["boxes"].shape == (3, 4)
    out = predictor.run(np.zeros((1, 4000, 3), np.uint8))
    assert out["boxes"].shape == (3, 4) and np.isfinite(out["boxes"]).all()
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    with pytest.raises(ValueError, match="bomb.png"):
        predictor(str(tmp_path / "bomb.png"))


# ---------------------------------------------------------------------------------------------- annotation files

@pytest.mark.parametrize("raw,message", [
    ("", "instances.json is not valid JSON"),
    (b"\xff\xfe\x00garbage\x9c", "instances.json is not valid JSON"),
    ("[1, 2, 3]", "instances.json has no 'images' list"),
])
def test_unreadable_annotation_file(tmp_path, raw, message):
    with pytest.raises(AnnotationError, match=message) as info:
        folder(tmp_path, {"a.png": good_png()}, raw_json=raw)
    one_line(str(info.value))


def _image(**fields):
    return [dict({"id": 1, "file_name": "a.png", "height": H, "width": W}, **fields)]


@pytest.mark.parametrize("images,message", [
    (_image(height="abc"), "image id 1 .* has height 'abc'"),
    (_image(height=6.5), "image id 1 .* has height 6.5"),
    (_image(height=None), "image id 1 .* has height None"),
    (_image(width=-8), "image id 1 .* has height 6 and width -8; expected positive"),
    (["a.png"], "image entry #0 'a.png' needs an integer 'id'"),
    (_image(file_name=5), "image id 1 .* has file_name 5"),
    (_image(file_name="/etc/passwd"), "image id 1 .* has file_name '/etc/passwd'; expected a path relative"),
    (_image(file_name="../a.png"), r"image id 1 .* has file_name '\.\./a\.png'"),
    (_image() + _image(file_name="b.png"), "image id 1 appears twice"),
])
def test_malformed_image_entry_names_it(tmp_path, images, message):
    with pytest.raises(AnnotationError, match="instances.json: " + message) as info:
        folder(tmp_path, {"a.png": good_png(), "b.png": good_png()}, images=images)
    one_line(str(info.value))


@pytest.mark.parametrize("annotations,message", [
    ([ann(1), ann(1)], "annotation id 1 appears twice"),
    ([ann(1), "box"], "annotation #1 is 'box', not an object"),
    ([ann(3, iscrowd="0")], "annotation id 3 has iscrowd '0'; expected 0 or 1"),
    ([ann(4, image_id=[1])], r"annotation id 4 refers to image id \[1\]"),
    ([ann(5, category_id="1")], "annotation id 5 has category_id '1'"),
    ([ann("six")], "annotation #0 has id 'six'"),
])
def test_malformed_annotation_names_it(tmp_path, annotations, message):
    with pytest.raises(AnnotationError, match="instances.json: " + message) as info:
        folder(tmp_path, {"a.png": good_png()}, annotations=annotations)
    one_line(str(info.value))


def test_malformed_categories(tmp_path):
    with pytest.raises(AnnotationError, match="category #0 'person' needs a non-negative integer 'id'"):
        folder(tmp_path, {"a.png": good_png()}, categories=["person"])
    huge = [{"id": 10 ** 9, "name": "far"}]
    with pytest.raises(AnnotationError, match="category id 1000000000 .* too large for label_space='official91'"):
        folder(tmp_path, {"a.png": good_png()}, categories=huge, label_space="official91")
    src = folder(tmp_path, {"a.png": good_png()}, categories=huge, annotations=[ann(1, category_id=10 ** 9)])
    assert src.num_classes == 1 and src[0]["labels"].tolist() == [0]


def test_boxes_outside_the_image_clipped_as_official(tmp_path):
    src = folder(tmp_path, {"a.png": good_png()}, annotations=[
        ann(1, (-3, -2, 6, 5)),       # clipped to [0, 0, 3, 3]
        ann(2, (5, 4, 100, 100)),     # clipped to [5, 4, 8, 6]
        ann(3, (20, 1, 4, 4)),        # right of the 8-wide image: dropped
        ann(4, (1, -9, 2, 3)),        # above the image: dropped
    ])
    np.testing.assert_array_equal(src[0]["boxes"], [[0, 0, 3, 3], [5, 4, 8, 6]])  # [K, 4] xyxy absolute
    assert src.stats["zero_area_dropped"] == 2 and src.stats["objects"] == 2


def test_lenient_where_harmless(tmp_path):
    """iscrowd as an int or a bool, sizes as whole floats (480.0, as some converters write), sub-folders."""
    (tmp_path / "images" / "sub").mkdir(parents=True)
    src = folder(tmp_path, {"sub/a.png": good_png()}, images=[{"id": 1, "file_name": "sub/a.png", "height": 6.0,
                                                               "width": 8}],
                 annotations=[ann(1), ann(2, iscrowd=1), ann(3, iscrowd=False)], keep_crowd=True)
    assert src[0]["iscrowd"].tolist() == [False, True, False] and src.image_size(0) == (6, 8)


# --------------------------------------------------------------------------------------------------- checkpoints

def _truncated_pth() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00." * 50)
    return buffer.getvalue()[:60]


@pytest.mark.parametrize("name,data,message", [
    ("empty.pth", b"", "empty.pth is not a DETR checkpoint"),
    ("noise.pth", np.random.default_rng(1).integers(0, 256, 256, dtype=np.uint8).tobytes(),
     "noise.pth is not a DETR checkpoint"),
    ("renamed.pth", json.dumps({"model": {}}).encode(), "renamed.pth is not a DETR checkpoint"),
    ("cut.pth", _truncated_pth(), "cut.pth is a truncated or damaged .pth file"),
])
def test_bad_checkpoint_names_the_file(tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ValueError, match=message) as info:
        load_official_checkpoint(str(path))
    one_line(str(info.value))


def test_checkpoint_folder_or_missing(tmp_path):
    (tmp_path / "dir.pth").mkdir()
    with pytest.raises(ValueError, match="dir.pth is a folder"):
        load_official_checkpoint(str(tmp_path / "dir.pth"))
    with pytest.raises(FileNotFoundError, match="gone.pth"):
        load_official_checkpoint(str(tmp_path / "gone.pth"))


# ------------------------------------------------------------------------------- noise at exit / from libraries

_UNCLOSED_LOADER = """
import sys, time
sys.path.insert(0, {tests!r})
from test_data_loader import _loader

if __name__ == "__main__":
    loader = _loader(num_workers=2, worker_type="process")
    for _ in range(2):
        next(loader)
    time.sleep(2)  # the workers fill their buffers with batches nobody takes
    print("done")  # exits with the loader still open
"""


def test_process_loader_leaves_no_shared_memory_at_exit(tmp_path):
    """A run that exits with a process loader still open (prefetched batches in shared memory): closed at exit,
    its blocks unlinked -- no "N leaked shared_memory objects" warning from the resource tracker."""
    import os
    import subprocess
    import sys

    script = tmp_path / "unclosed.py"
    script.write_text(_UNCLOSED_LOADER.format(tests=os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0 and "done" in result.stdout, result.stderr[-2000:]
    assert "leaked shared_memory" not in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_tfds_opencv_notice_is_silenced(caplog):
    """TFDS's "OpenCV is not installed" notice (once per worker process) is dropped; other absl records pass."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from absl import logging as absl_logging

    import detr_jax.data.sources.tfds_coco  # noqa: F401  (installs the filter)

    with caplog.at_level(logging.WARNING):
        decoded = tfds.features.Image().decode_example_np(good_png())
        absl_logging.warning("another absl notice")
    assert decoded.shape == (H, W, 3)
    assert "OpenCV" not in caplog.text and "another absl notice" in caplog.text
