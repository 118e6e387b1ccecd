"""Hostile image files, built byte by byte in each test: decompression bombs (PNG, GIF, BMP, TIFF headers
declaring huge sizes, and a complete, valid 110-megapixel PNG of 14 kB), truncated PNG and JPEG, corrupt
compressed data, an empty file, a text file, a folder and an EPS file named .png, float and out-of-range
32-bit samples. Each must give one ImageError line naming the file, from the reader and from every command
that reads user images (detect, predict, the training data sets), while the other images complete.
16-bit, palette, alpha, CMYK, 1-bit and multi-frame images must be read faithfully.
"""
import csv
import io
import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import visionattn
from visionattn.cli import main
from visionattn.tasks import detect as detect_cmd
from visionattn.tasks import detection_data as dd
from visionattn.tasks.data import DataError, ImageFolderClassification
from visionattn.tasks.imageio import (
    DEFAULT_MAX_IMAGE_PIXELS, ImageError, check_image, image_size, pixel_limit, read_image,
)

PIL_LIMIT = Image.MAX_IMAGE_PIXELS

# ---------------------------------------------------------------------------------------------------
# payloads


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    """A PNG with the given IHDR and one IDAT chunk (already compressed), every CRC correct."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))


def noise(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Random ``[H, W, C]`` uint8 pixels (they do not compress, so a cut file is really cut)."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def encoded(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def bomb_png(path: Path) -> Path:
    """A 1 kB PNG whose header declares 30000x30000 8-bit grey pixels (900 MB, 2.7 GB as RGB)."""
    path.write_bytes(png_bytes(30000, 30000, 8, 0, zlib.compress(bytes(4 * 30001), 9)))
    return path


def valid_bomb_png(path: Path) -> Path:
    """A complete, valid 11000x10000 1-bit PNG of about 14 kB: 110 M pixels, 330 MB once converted to RGB.
    Above our default limit but below Pillow's own ceiling (179 M), so Pillow alone only warns and decodes."""
    rows = (b"\x00" + bytes(11000 // 8)) * 10000  # filter byte + 1375 bytes of 1-bit samples per row
    path.write_bytes(png_bytes(11000, 10000, 1, 0, zlib.compress(rows, 9)))
    return path


def bomb_gif(path: Path) -> Path:
    """A 1x1 GIF whose logical screen is patched to 20000x20000."""
    data = bytearray(encoded(np.zeros((1, 1), np.uint8), "GIF"))
    data[6:10] = struct.pack("<HH", 20000, 20000)
    path.write_bytes(bytes(data))
    return path


def bomb_bmp(path: Path) -> Path:
    """A 2x2 BMP whose header is patched to 20000x20000 (biWidth, biHeight)."""
    data = bytearray(encoded(noise(2, 2), "BMP"))
    data[18:26] = struct.pack("<ii", 20000, 20000)
    path.write_bytes(bytes(data))
    return path


def bomb_tiff(path: Path) -> Path:
    """A 4x4 uncompressed TIFF whose ImageWidth/ImageLength tags are patched to 12000 (144 M pixels: over our
    limit, under Pillow's own ceiling)."""
    data = bytearray(encoded(noise(4, 4), "TIFF"))
    assert data[:2] == b"II"  # Pillow writes little-endian TIFFs
    ifd = struct.unpack_from("<I", data, 4)[0]
    for k in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * k
        tag, kind = struct.unpack_from("<HH", data, entry)
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT (3) or LONG (4) held in the entry itself
            struct.pack_into("<H" if kind == 3 else "<I", data, entry + 8, 12000)
    path.write_bytes(bytes(data))
    return path


def truncated(path: Path, fmt: str) -> Path:
    data = encoded(noise(64, 64), fmt)
    path.write_bytes(data[: len(data) // 2])
    return path


def corrupt_idat_png(path: Path) -> Path:
    """A 16x16 PNG whose compressed data is damaged, with the chunk CRCs recomputed so only zlib notices."""
    idat = bytearray(zlib.compress(b"".join(b"\x00" + bytes(noise(1, 16, seed=r)) for r in range(16))))
    idat[8:40] = bytes(range(32))
    path.write_bytes(png_bytes(16, 16, 8, 2, bytes(idat)))
    return path


def tiff_of(array: np.ndarray, mode: str, path: Path) -> Path:
    """A TIFF with the given PIL mode (``F``, ``I``, ``I;16B``) and samples."""
    if mode == "I;16B":
        image = Image.frombytes(mode, array.shape[::-1], array.astype(">u2").tobytes())
    else:
        image = Image.fromarray(array.astype(np.float32 if mode == "F" else np.int32), mode)
    image.save(path)
    return path


def folder_named_png(path: Path) -> Path:
    path.mkdir()
    return path


def written(data: bytes):
    """A builder writing ``data`` as the file."""
    return lambda path: path.write_bytes(data)


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n0 0 moveto 100 100 lineto stroke\nshowpage\n%%EOF\n"

# name -> (builder, part of the expected message, whether the header alone gives it away)
HOSTILE = {
    "bomb.png": (bomb_png, "decompression bomb", True),
    "valid_bomb.png": (valid_bomb_png, "11000x10000 = 110,000,000 pixels is over the limit of 100,000,000", True),
    "bomb.gif": (bomb_gif, "decompression bomb", True),
    "bomb.bmp": (bomb_bmp, "decompression bomb", True),
    "bomb.tif": (bomb_tiff, "12000x12000 = 144,000,000 pixels is over the limit", True),
    "truncated.png": (lambda p: truncated(p, "PNG"), "truncated", False),
    "truncated.jpg": (lambda p: truncated(p, "JPEG"), "truncated", False),
    "corrupt_idat.png": (corrupt_idat_png, "broken data stream", False),
    "empty.jpg": (written(b""), "not an image in a supported format", True),
    "text.png": (written(b"this is not an image\n" * 20), "not an image in a supported format", True),
    "zero_width.png": (written(png_bytes(0, 10, 8, 0, zlib.compress(b""))), "not an image", True),
    "eps_named.png": (written(EPS), "not an image in a supported format", True),
    "folder.png": (folder_named_png, "IsADirectoryError", True),
    "float.tif": (lambda p: tiff_of(np.full((4, 4), 0.5), "F", p), "floating-point", True),
    "int32_range.tif": (lambda p: tiff_of(np.array([[-5, 70000]]), "I", p), "range over -5..70000", False),
}


def make(name: str, folder: Path) -> Path:
    path = folder / name
    HOSTILE[name][0](path)
    return path


def good_png(path: Path, height: int = 48, width: int = 40, seed: int = 0) -> Path:
    path.write_bytes(encoded(noise(height, width, seed=seed), "PNG"))
    return path


# ---------------------------------------------------------------------------------------------------
# the reader


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_each_hostile_file_is_one_image_error_naming_it(name, tmp_path):
    path = make(name, tmp_path)
    _, expected, header_shows_it = HOSTILE[name]
    for mode in ("RGB", "L"):
        with pytest.raises(ImageError) as info:
            read_image(path, mode)
        message = str(info.value)
        assert message.startswith(f"cannot read image {path}: ") and expected in message
        assert "\n" not in message and isinstance(info.value, DataError)
    if header_shows_it:  # found by the cheap header scan the training data sets run
        with pytest.raises(ImageError, match=re.escape(f"cannot read image {path}: ")):
            check_image(path)
    else:  # damage inside the pixel data: the header scan passes it, reading names it
        assert check_image(path) == image_size(path)
    assert Image.MAX_IMAGE_PIXELS == PIL_LIMIT  # Pillow's global limit left as it was


def test_the_payloads_defeat_the_naive_reader(tmp_path):
    """What the reader did before (PIL open + convert("RGB"), catching OSError/ValueError) on the same files."""

    def naive(path):
        try:
            with Image.open(path) as im:
                return np.array(im.convert("RGB"))
        except (OSError, ValueError) as e:
            raise DataError(str(e)) from e

    with pytest.raises(Image.DecompressionBombError):  # not a DataError: it stopped `visionattn detect`
        naive(bomb_png(tmp_path / "bomb.png"))
    values = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16)[None].repeat(4, 0)  # 0..65535
    gradient = tmp_path / "gradient16.png"
    Image.fromarray(values).save(gradient)
    assert (naive(gradient) == 255).mean() > 0.99  # a blank white image, without a word
    assert np.array_equal(read_image(gradient, "L")[0], np.arange(256))
    with pytest.warns(Image.DecompressionBombWarning), Image.open(valid_bomb_png(tmp_path / "b.png")) as im:
        im.verify()  # a complete, valid file Pillow alone would decode (330 MB as RGB)
        assert im.size == (11000, 10000)
    with Image.open(make("eps_named.png", tmp_path)) as im:
        assert im.format == "EPS"  # Pillow would hand it to Ghostscript when loading it


def test_sixteen_and_32_bit_integer_images_are_scaled_not_clipped(tmp_path):
    values = np.zeros((3, 256), np.uint16)
    values[0] = np.arange(256) * 257  # 0, 257, ..., 65535 -> 0, 1, ..., 255 exactly
    values[1, :4] = [65535, 32768, 32767, 128]  # -> 255, 128, 127, 0 (round(v * 255 / 65535))
    files = {"I;16": tmp_path / "gray16.png", "I;16B": tmp_path / "gray16b.tif", "I": tmp_path / "gray32.tif"}
    Image.fromarray(values).save(files["I;16"])
    tiff_of(values, "I;16B", files["I;16B"])
    tiff_of(values, "I", files["I"])
    for mode, path in files.items():
        with Image.open(path) as im:
            assert im.mode == mode
        gray = read_image(path, "L")
        assert gray.dtype == np.uint8 and gray.shape == (3, 256)
        assert np.array_equal(gray[0], np.arange(256)) and list(gray[1, :4]) == [255, 128, 127, 0]
        rgb = read_image(path, "RGB")
        assert rgb.shape == (3, 256, 3) and all(np.array_equal(rgb[..., c], gray) for c in range(3))


def test_palette_alpha_cmyk_1bit_and_multiframe_images_convert(tmp_path):
    rgb = noise(8, 6)
    rgba = np.concatenate([rgb, np.full((8, 6, 1), 7, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(read_image(tmp_path / "rgba.png"), rgb)  # alpha dropped, colours kept

    palette = Image.new("P", (5, 4))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    palette.putdata([0, 1, 2, 1, 0] * 4)
    palette.save(tmp_path / "palette.png", transparency=2)
    image = read_image(tmp_path / "palette.png")
    assert image.shape == (4, 5, 3) and list(image[0, 0]) == [255, 0, 0] and list(image[0, 2]) == [0, 0, 255]

    la = np.stack([np.arange(20, dtype=np.uint8).reshape(4, 5), np.zeros((4, 5), np.uint8)], axis=2)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert np.array_equal(read_image(tmp_path / "la.png", "L"), la[..., 0])

    Image.fromarray(np.eye(8, dtype=bool)).save(tmp_path / "bits.png")
    assert np.array_equal(read_image(tmp_path / "bits.png", "L"), np.eye(8, dtype=np.uint8) * 255)

    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # pure red in CMYK
    red = read_image(tmp_path / "cmyk.jpg").astype(int)
    assert red.shape == (8, 8, 3) and (red[..., 0] > 200).all() and (red[..., 1:] < 60).all()

    frames = [Image.new("RGB", (6, 6), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "two.gif", save_all=True, append_images=frames[1:])
    first = read_image(tmp_path / "two.gif")
    assert (first[..., 0] > 200).all() and (first[..., 2] < 60).all()


def test_the_pixel_limit_is_checked_before_decoding_and_can_be_raised(tmp_path, monkeypatch):
    from PIL import ImageFile

    path = tmp_path / "wide.png"
    Image.new("L", (2000, 1000), 9).save(path)
    with monkeypatch.context() as m:
        m.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded an image over the limit"))
        with pytest.raises(ImageError, match=r"wide.png: 2000x1000 = 2,000,000 pixels is over the limit of "
                                             r"1,000,000 .*--max-image-pixels"):
            read_image(path, max_pixels=1_000_000)
    assert read_image(path, "L", max_pixels=2_000_000).shape == (1000, 2000)
    assert image_size(path, 2.0e6) == (2000, 1000)
    assert DEFAULT_MAX_IMAGE_PIXELS == pixel_limit(None) == 100_000_000
    for bad in (0, -1, 1.5, "1e9", True):
        with pytest.raises(ValueError, match="max_image_pixels must be a positive whole number"):
            pixel_limit(bad)


# ---------------------------------------------------------------------------------------------------
# commands and data sets

SMALL_DFIR = dict(widths=(8, 16, 32, 64, 128), depths=(1, 1, 1, 1), head_dim=16, hidden_dim=64, num_heads=4,
                  ffn_dim=128, fusion_blocks=1, num_queries=30, num_denoising=12, max_detections=40, input_size=128)


@pytest.fixture(scope="module")
def small_detector():
    torch.manual_seed(0)
    return visionattn.create_model("dfir_detr", num_classes=2, **SMALL_DFIR).eval()


def stderr_lines(captured) -> list[str]:
    return [line for line in captured.err.splitlines() if line.strip()]


def test_detect_names_bad_images_and_finishes_the_good_ones(small_detector, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    bomb, cut = bomb_png(inputs / "bomb.png"), truncated(inputs / "cut.jpg", "JPEG")
    good = good_png(inputs / "good.png")
    out = tmp_path / "out"
    for run in range(2):  # the re-run skips the good image and names the bad ones again
        summary = detect_cmd.detect(small_detector, detect_cmd.collect_images(inputs), out, classes=["a", "b"],
                                    score_threshold=0.0)
        assert summary["images"] == 1 and (summary["written"], summary["skipped"]) == ((1, 0) if run == 0 else (0, 1))
        assert sorted(Path(f["path"]).name for f in summary["failed"]) == ["bomb.png", "cut.jpg"]
        captured = capsys.readouterr()
        lines = stderr_lines(captured)
        assert "Traceback" not in "".join(lines)
        # one line each, naming the image
        assert sorted(lines) == sorted(f"detect: image {f['image']}: {f['error']}" for f in summary["failed"])
        assert any(str(bomb) in line and "decompression bomb" in line for line in lines)
        assert any(str(cut) in line and "truncated" in line for line in lines)
        dataset = json.loads((out / "images.json").read_text())
        assert [im["file_name"] for im in dataset["images"]] == ["good.png"]
        assert dataset["images"][0]["path"] == str(good)
        results = json.loads((out / "results.json").read_text())
        assert results and {r["image_id"] for r in results} == {1}
        entries = {e["image"]: e for e in json.loads((out / "summary.json").read_text())["images"]}
        assert {f["image"]: f["error"] for f in summary["failed"]} == \
               {name: e["error"] for name, e in entries.items() if e["status"] == "failed"}
        assert entries["good.png"]["status"] == ("ok" if run == 0 else "skipped")
        assert [p.name for p in (out / "images").iterdir()] == ["good.png"]
        assert [p.name for p in (out / "detections").iterdir()] == ["good.json"]


def test_detect_command_exit_codes_and_pixel_limit_option(small_detector, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(detect_cmd, "load_detection_model", lambda *a, **k: (small_detector, ["a", "b"]))
    inputs = tmp_path / "in"
    inputs.mkdir()
    valid_bomb_png(inputs / "big.png")
    make("text.png", inputs)
    good_png(inputs / "good.png")
    assert main(["detect", "-i", str(inputs), "-o", str(tmp_path / "o1"), "--model", "small"]) == 1  # some failed
    captured = capsys.readouterr()
    assert len(stderr_lines(captured)) == 2 and "Traceback" not in captured.err
    assert "results.json: 1 images, " in captured.out and "2 failed" in captured.out
    good = str(inputs / "good.png")
    assert main(["detect", "-i", good, "-o", str(tmp_path / "o2"), "--model", "small"]) == 0
    assert main(["detect", "-i", good, "-o", str(tmp_path / "o3"), "--model", "small",
                 "--max-image-pixels", "1000"]) == 1
    err = capsys.readouterr().err
    assert "good.png: 40x48 = 1,920 pixels is over the limit of 1,000" in err
    assert main(["detect", "-i", str(inputs / "big.png"), "-o", str(tmp_path / "o4"), "--model", "small",
                 "--max-image-pixels", "0"]) == 2  # a bad setting is refused up front
    assert "max_image_pixels must be a positive whole number" in capsys.readouterr().err


RECIPE = """
seed: 0
output_dir: {out}
model:
  name: ninformer_cifar
  kwargs: {{img_size: 16, patch_size: 4, embed_dim: 32, mlp_dim: 64, depth: 2}}
data:
  kind: image_folder
  root: {data}
  img_size: 16
"""


def test_predict_names_bad_images_and_classifies_the_others(tmp_path, capsys):
    from safetensors.torch import save_file

    data = tmp_path / "data"
    for k, name in enumerate(("dark", "bright")):
        (data / name).mkdir(parents=True)
        good_png(data / name / "0.png", 16, 16, seed=k)
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(RECIPE.format(out=tmp_path / "run", data=data))
    model = visionattn.create_model("ninformer_cifar", num_classes=2, img_size=16, patch_size=4, embed_dim=32,
                                    mlp_dim=64, depth=2)
    weights = tmp_path / "model.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(weights))

    images = tmp_path / "images"
    images.mkdir()
    good_png(images / "a_good.png", 16, 16)
    Image.fromarray((np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)).save(images / "b_gray16.png")
    bad = [make(name, images) for name in ("bomb.png", "truncated.png", "eps_named.png")]
    out = tmp_path / "pred.csv"
    assert main(["predict", str(cfg), "--checkpoint", str(weights), "-i", str(images), "-o", str(out)]) == 1
    captured = capsys.readouterr()
    lines = stderr_lines(captured)
    assert len(lines) == 3 and "Traceback" not in captured.err
    for path in bad:  # one line each, naming the file
        assert sum(line.startswith(f"predict: cannot read image {path}: ") for line in lines) == 1
    rows = list(csv.DictReader(out.open()))
    assert [Path(r["path"]).name for r in rows] == ["a_good.png", "b_gray16.png"]
    assert "2 images classified, 3 failed" in captured.out


def test_image_folder_refuses_bad_images_when_built(tmp_path):
    root = tmp_path / "folder"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        good_png(root / name / "0.png", 8, 8)
    bomb = bomb_png(root / "b" / "1.png")
    with pytest.raises(DataError, match=rf"1 of 3 images in {root} cannot be used[^\n]*\n  cannot read image {bomb}: "):
        ImageFolderClassification(str(root))
    bomb.unlink()
    ImageFolderClassification(str(root))  # fine again
    tiff_of(np.full((4, 4), 0.5), "F", root / "a" / "float.tif")
    for k in range(12):
        (root / "b" / f"bad{k:02d}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(k))
    with pytest.raises(DataError) as info:
        ImageFolderClassification(str(root), max_image_pixels=10**6)
    lines = str(info.value).splitlines()
    assert lines[0].startswith("13 of 15 images") and len(lines) == 1 + 10 + 1 and lines[-1] == "  ... and 3 more"
    assert "float.tif: 32-bit floating-point" in lines[1]
    # header only: a truncated file passes the scan, and reading it names it
    for path in (root / "a" / "float.tif", *(root / "b").glob("bad*.png")):
        path.unlink()
    truncated(root / "a" / "1.png", "PNG")
    ds = ImageFolderClassification(str(root))
    with pytest.raises(ImageError, match=r"cannot read image .*a/1.png: .*truncated"):
        ds[1]
    assert ds[0][0].mode == "RGB" and ds[0][1] == 0


VOC_XML = """<annotation><filename>{name}</filename><size><width>40</width><height>48</height><depth>3</depth></size>
<object><name>thing</name><difficult>0</difficult>
<bndbox><xmin>2</xmin><ymin>2</ymin><xmax>20</xmax><ymax>20</ymax></bndbox></object>
</annotation>"""


def test_detection_data_set_lists_every_bad_image(tmp_path):
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    good_png(root / "JPEGImages" / "ok.png")
    bad = [bomb_tiff(root / "JPEGImages" / "bomb.tif"), make("text.png", root / "JPEGImages")]
    for path in [root / "JPEGImages" / "ok.png", *bad]:
        (root / "Annotations" / f"{path.stem}.xml").write_text(VOC_XML.format(name=path.name))
    with pytest.raises(DataError) as info:
        dd.VOCDetection(root)
    message = str(info.value)
    assert message.startswith("2 of 3 images") and all(f"cannot read image {p}" in message for p in bad)
    for path in bad:
        path.unlink()
        (root / "Annotations" / f"{path.stem}.xml").unlink()
    assert len(dd.VOCDetection(root)) == 1
    with pytest.raises(DataError, match="ok.png: 40x48 = 1,920 pixels is over the limit of 1,000"):
        dd.VOCDetection(root, max_image_pixels=1000)


def test_2d_segmentation_refuses_a_bomb_before_decoding_it(tmp_path):
    from visionattn.tasks.segmentation import SegmentationCases

    mask = tmp_path / "1_mask.gif"
    Image.fromarray(np.eye(16, dtype=np.uint8) * 255).save(mask)
    good = {"case": "1", "image": good_png(tmp_path / "1_image.png", 16, 16), "label": mask}
    data = dict(kind="image_mask", spatial_dims=2, in_channels=3, labels=["background", "vessel"],
                label_values=[0, 255], intensity="zscore", roi_size=[16, 16])
    image, label = SegmentationCases([good], data, augment=False)[0]  # the header check lets good files through
    assert image.shape == (3, 16, 16) and torch.equal(label[0], torch.eye(16, dtype=torch.uint8))
    bomb = dict(good, case="2", image=valid_bomb_png(tmp_path / "2_image.png"))
    with pytest.raises(DataError, match=r"case 2: .*cannot read image .*2_image.png: 11000x10000 = 110,000,000 "
                                        r"pixels is over the limit"):
        SegmentationCases([good, bomb], data, augment=False)
