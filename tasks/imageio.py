"""Reading user images: the one place where image files a user gives us are decoded.

Every image file is treated as hostile until it has been checked:

* the size its header declares is checked against a pixel limit *before* any pixel is decoded, so a small
  file that declares 30000x30000 pixels (a decompression bomb) is refused instead of allocating gigabytes;
* only the formats the tasks read are tried (:data:`FORMATS`). Pillow identifies a file by its content, not
  its name, and would otherwise also try formats such as EPS, which it decodes by running Ghostscript;
* every error Pillow raises for a truncated, corrupt or unidentifiable file, including its own
  ``DecompressionBombError``, becomes an :class:`ImageError` (a :class:`~visionattn.tasks.errors.DataError`)
  whose one-line message names the file;
* 16-bit images are scaled to 8 bits instead of being clipped (Pillow's ``convert("RGB")`` turns almost
  every 16-bit value into 255, a blank white image).

Pillow's global ``PIL.Image.MAX_IMAGE_PIXELS`` is left alone: our own limit is checked per call, and
Pillow's ceiling (twice that value, 179M pixels by default) still applies on top of it.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from visionattn.tasks.errors import DataError

# 100 million pixels: a 10000x10000 scan or a 50-megapixel camera photo still reads, and the largest image
# allowed costs 300 MB as [H, W, 3] uint8 and 1.2 GB as the float32 [3, H, W] tensor the detectors take,
# which a training or detect run can absorb. A hostile 30000x30000 header (2.7 GB as uint8 RGB, 10.8 GB as
# float32) is refused before decoding. Raise it per run with `visionattn detect --max-image-pixels N` or
# a recipe's `data.max_image_pixels`.
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000

# Pillow format names tried when opening a file: those of IMAGE_SUFFIXES (tasks/data.py) and the GIF masks
# of 2-D segmentation data (JPEG also covers multi-picture MPO files).
FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF")

# Pillow modes holding unsigned 16-bit samples (little-, big- and native-endian)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

MAX_LISTED = 10  # bad files named in a data set's error; the rest are counted


class ImageError(DataError):
    """An image file that cannot be used: unreadable, corrupt, truncated, too large, or of an unsupported
    kind. The message is one line and names the file."""


def pixel_limit(max_pixels: int | float | None) -> int:
    """``max_pixels`` as a positive int (a whole float such as YAML's ``2.0e+8`` is accepted); ``None`` means
    :data:`DEFAULT_MAX_IMAGE_PIXELS`. Anything else is a ``ValueError``."""
    if max_pixels is None:
        return DEFAULT_MAX_IMAGE_PIXELS
    whole = isinstance(max_pixels, (int, np.integer)) or (isinstance(max_pixels, float) and max_pixels.is_integer())
    if isinstance(max_pixels, bool) or not whole or max_pixels < 1:
        raise DataError(f"max_image_pixels must be a positive whole number of pixels, got {max_pixels!r}")
    return int(max_pixels)


def _describe(error: BaseException) -> str:
    """``"Type: message"`` on one line."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _fail(path: Path, reason: str) -> ImageError:
    return ImageError(f"cannot read image {path}: {reason}")


@contextmanager
def _open_checked(path: str | Path, max_pixels: int | None) -> Iterator:
    """The opened PIL image (header parsed, no pixel decoded) once its size is within ``max_pixels``."""
    from PIL import Image

    path, limit = Path(path), pixel_limit(max_pixels)
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS (89.5M by default, below our default limit); our own
            # limit is checked right below, so the warning would only be noise (or, with warnings turned
            # into errors, refuse images the caller allowed)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path, formats=FORMATS)
    except Image.DecompressionBombError as e:
        raise _fail(path, f"Pillow refuses it as a possible decompression bomb ({' '.join(str(e).split())}); "
                          "Pillow's ceiling, 2 x PIL.Image.MAX_IMAGE_PIXELS, applies on top of max-image-pixels") from e
    except Image.UnidentifiedImageError as e:
        raise _fail(path, f"not an image in a supported format ({', '.join(FORMATS)})") from e
    except Exception as e:  # noqa: BLE001  any error parsing the file's bytes belongs to the file
        raise _fail(path, _describe(e)) from e
    with im:
        width, height = im.size
        if width < 1 or height < 1:
            raise _fail(path, f"the header declares an empty {width}x{height} image")
        if width * height > limit:
            raise _fail(path, f"{width}x{height} = {width * height:,} pixels is over the limit of {limit:,} "
                              "(a possible decompression bomb); if the image is genuine, raise the limit "
                              "(visionattn detect --max-image-pixels N, or data.max_image_pixels in a recipe)")
        yield im


def image_size(path: str | Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """``(width, height)`` from the image header (no pixel decoded), or :class:`ImageError` naming the file
    when it is not a readable image of :data:`FORMATS` or declares more than ``max_pixels`` pixels
    (``None``: :data:`DEFAULT_MAX_IMAGE_PIXELS`)."""
    with _open_checked(path, max_pixels) as im:
        return im.size


def _header_problem(im) -> str | None:
    """Why :func:`read_image` would refuse an image, as far as its header tells."""
    if im.mode == "F":
        return ("32-bit floating-point samples (Pillow mode F) have no fixed range to map to 0..255; "
                "save the image with 8- or 16-bit samples")
    return None


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    """Samples in 0..65535 (any integer dtype) -> uint8 ``round(v * 255 / 65535)``, same shape."""
    return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _to_uint8(im, mode: str, path: Path) -> np.ndarray:
    """A loaded PIL image as ``[H, W, 3]`` (``mode="RGB"``) or ``[H, W]`` (``"L"``) uint8."""
    problem = _header_problem(im)
    if problem:
        raise _fail(path, problem)
    if im.mode in SIXTEEN_BIT_MODES or im.mode == "I":
        values = np.asarray(im)
        if im.mode == "I":
            # 32-bit signed samples: how older Pillow versions open 16-bit PNGs, and how 16-bit data is often
            # stored in 32-bit TIFFs, so values within 0..65535 are read as 16-bit; others have no known range
            low, high = int(values.min()), int(values.max())
            if low < 0 or high > 65535:
                raise _fail(path, f"32-bit integer samples range over {low}..{high}, outside the 16-bit range "
                                  "0..65535 that can be scaled to 0..255; save the image with 8- or 16-bit samples")
        gray = _scale_16bit(values)
        return gray if mode == "L" else np.repeat(gray[:, :, None], 3, axis=2)
    # palette, LA/PA, RGBA, CMYK, YCbCr, 1-bit, ...: Pillow's own conversion (alpha is dropped, not blended)
    return np.array(im.convert(mode))


def read_image(path: str | Path, mode: str = "RGB", max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode an image file to uint8 pixels: ``[H, W, 3]`` for ``mode="RGB"``, ``[H, W]`` for ``mode="L"``.

    The header's width x height is checked against ``max_pixels`` (``None``: :data:`DEFAULT_MAX_IMAGE_PIXELS`)
    before anything is decoded. Multi-frame files (GIF, TIFF, APNG, MPO) give their first frame. Sample
    formats:

    * 8-bit and 1-bit, palette, LA, RGBA, CMYK, YCbCr: Pillow's conversion to ``mode``;
    * 16-bit integer (Pillow modes ``I;16``, ``I;16B``, ...): scaled, ``round(v * 255 / 65535)``
      (65535 -> 255, 32768 -> 128), not clipped; grey is repeated over R, G, B for ``"RGB"``;
    * 32-bit integer (mode ``I``): read as 16-bit when every sample lies in 0..65535 (16-bit data in a
      32-bit container), otherwise refused;
    * 32-bit float (mode ``F``): refused, since such samples have no fixed range.

    EXIF orientation is not applied: pixels come as stored, which is what annotations refer to. Any failure
    (unreadable, unidentified, corrupt, truncated, too large, unsupported) raises :class:`ImageError` with
    one line naming the file.
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    path = Path(path)
    with _open_checked(path, max_pixels) as im:
        try:
            im.load()  # decodes the current frame, the first one after opening
            return _to_uint8(im, mode, path)
        except ImageError:
            raise
        except Exception as e:  # noqa: BLE001  truncated/corrupt data (OSError, SyntaxError, EOFError, ...)
            raise _fail(path, _describe(e)) from e


def check_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """:func:`image_size`, and also :class:`ImageError` when the header shows samples that :func:`read_image`
    refuses (32-bit float). Nothing is decoded."""
    with _open_checked(path, max_pixels) as im:
        problem = _header_problem(im)
        if problem:
            raise _fail(Path(path), problem)
        return im.size


def check_images(paths: Sequence[str | Path], max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                 where: str = "the data set") -> list[tuple[int, int]]:
    """:func:`check_image` on every file before a data set is used: each must open as an image of
    :data:`FORMATS`, declare at most ``max_pixels`` pixels and have samples :func:`read_image` can convert
    (as far as the header tells; nothing is decoded, so damage inside the pixel data is found only when read).

    Returns each image's ``(width, height)``; otherwise raises one :class:`DataError` listing the bad files
    (the first :data:`MAX_LISTED`, then a count), so a run fails at the start rather than mid-training.
    """
    sizes, errors = [], []
    for path in paths:
        try:
            sizes.append(check_image(path, max_pixels))
        except ImageError as e:
            errors.append(e)
    if errors:
        raise bad_images_error(errors, len(paths), where)
    return sizes


def bad_images_error(errors: Sequence[ImageError], total: int, where: str = "the data set") -> DataError:
    """One :class:`DataError` for ``errors`` out of ``total`` images: the first :data:`MAX_LISTED` messages,
    one per line, then how many more."""
    lines = [f"{len(errors)} of {total} images in {where} cannot be used (fix or remove them):"]
    lines += [f"  {e}" for e in errors[:MAX_LISTED]]
    if len(errors) > MAX_LISTED:
        lines.append(f"  ... and {len(errors) - MAX_LISTED} more")
    return DataError("\n".join(lines))
