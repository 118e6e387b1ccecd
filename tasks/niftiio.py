"""Checks on a NIfTI file before its voxels are used, shared by ``segment`` and the training data loader.

nibabel trusts a file's header: it reads header extensions whole, allocates what the dimensions say, and
stops reading a gzip stream at the last voxel, before the CRC in its trailer. So a file is checked from its
first bytes (voxel count, extensions, intensity scaling) before nibabel reads anything, and a ``.gz`` file is
decompressed to its end once so that zlib verifies it. Problems raise
:class:`~visionattn.tasks.errors.SegmentError` naming the file.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visionattn.tasks.errors import SegmentError

# 512 x 512 x 1024 voxels; a volume (or its resampling to the model's spacing) above this is refused from its
# header. Peak memory grows with the voxel count (tens of bytes per voxel through preprocessing, windows
# and inversion), so this keeps a hostile header from taking the machine down; raise it with --max-voxels
# (``segment``) or data.max_voxels (recipes).
DEFAULT_MAX_VOXELS = 2**28
MAX_HEADER_EXTENSION_BYTES = 64 * 2**20  # nibabel reads header extensions whole, before the voxel data
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass
class NiftiHeader:
    """The header fields that bound the cost of reading a file, read from its first bytes."""

    dims: tuple[int, ...]
    vox_offset: float
    header_size: int
    has_extensions: bool
    scl_slope: float
    scl_inter: float


# what reading a damaged file raises: zlib.error (a broken deflate stream) is not an OSError
FILE_READ_ERRORS = (OSError, EOFError, zlib.error)


def cannot_read(path: Path, error: BaseException) -> SegmentError:
    return SegmentError(f"cannot read {path.name}: {type(error).__name__}: {error} (corrupt or truncated file?)")


def read_nifti_header(path: Path) -> NiftiHeader:
    """Parse the fixed NIfTI-1/NIfTI-2 header of ``path`` (decompressing only its first 544 bytes), before
    nibabel reads anything else: nibabel reads the header extensions whole, and the voxel count and scaling
    must be judged before any voxel data is decompressed."""
    try:
        with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as f:
            raw = f.read(544)
    except FILE_READ_ERRORS as e:
        raise cannot_read(path, e) from e
    for endian in "<>":
        size = struct.unpack(endian + "i", raw[:4])[0] if len(raw) >= 4 else 0
        if size == 348 and len(raw) >= 348:  # NIfTI-1: dim int16[8] at 40, vox_offset and scl_* float32 at 108
            dim = struct.unpack(endian + "8h", raw[40:56])
            vox_offset, slope, inter = struct.unpack(endian + "3f", raw[108:120])
            break
        if size == 540 and len(raw) >= 540:  # NIfTI-2: dim int64[8] at 16, vox_offset int64 at 168, scl_* float64
            dim = struct.unpack(endian + "8q", raw[16:80])
            vox_offset = struct.unpack(endian + "q", raw[168:176])[0]
            slope, inter = struct.unpack(endian + "2d", raw[176:192])
            break
    else:
        raise SegmentError(f"cannot read {path.name}: not a NIfTI-1 or NIfTI-2 header (corrupt or truncated file?)")
    ndim = dim[0]
    if not 1 <= ndim <= 7 or any(d < 1 for d in dim[1:ndim + 1]):
        raise SegmentError(f"cannot read {path.name}: its header declares dimensions {list(dim[:ndim + 1])} "
                           f"(corrupt file?)")
    has_extensions = raw[size:size + 1] not in (b"", b"\x00")  # the 4 bytes after the header; nonzero: extensions
    return NiftiHeader(tuple(int(d) for d in dim[1:ndim + 1]), float(vox_offset), size, has_extensions,
                       float(slope), float(inter))


def check_header(path: Path, max_voxels: int) -> NiftiHeader:
    """Refuse, from the header alone, a file whose voxel count is over ``max_voxels``, whose header extensions
    are implausibly large, or whose intensity scaling is not finite or does not fit float32."""
    hdr = read_nifti_header(path)
    n = int(np.prod(hdr.dims, dtype=object))
    if n > max_voxels:
        raise SegmentError(f"{path.name}: {'x'.join(map(str, hdr.dims))} = {n:,} voxels, over the limit of "
                           f"{max_voxels:,} (--max-voxels); refused before reading any voxel data")
    # nibabel reads extensions up to vox_offset, or to the end of the file when vox_offset is before them
    unbounded = hdr.has_extensions and hdr.vox_offset < hdr.header_size + 4
    if unbounded or not np.isfinite(hdr.vox_offset) or hdr.vox_offset - hdr.header_size > MAX_HEADER_EXTENSION_BYTES:
        extent = "to the end of the file" if unbounded else f"to byte {hdr.vox_offset:,.0f}"
        raise SegmentError(f"{path.name}: its header extensions run {extent}; more than "
                           f"{MAX_HEADER_EXTENSION_BYTES // 2**20} MiB of them is refused (corrupt or hostile file)")
    # scl_slope 0 or NaN means "no scaling" (nibabel writes NaN), and scl_inter is then unused
    slope_used = hdr.scl_slope != 0 and not np.isnan(hdr.scl_slope)
    for field_name, value, used in (("scl_slope", hdr.scl_slope, slope_used), ("scl_inter", hdr.scl_inter, slope_used)):
        if np.isinf(value) or (used and (np.isnan(value) or abs(value) > _FLOAT32_MAX)):
            raise SegmentError(f"{path.name}: intensity scaling {field_name} = {value} in its header is not a finite "
                               f"float32 number; fix the header (e.g. nibabel's header.set_slope_inter)")
    return hdr


def verify_gzip_stream(path: Path, chunk: int = 2**24) -> None:
    """Decompress a ``.gz`` file to its end, chunk by chunk, so that zlib checks the CRC-32 and length in its
    trailer. nibabel reads only the bytes the voxels need and never reaches the trailer, so a damaged deflate
    stream that still decodes (to wrong voxels) would otherwise be segmented without a word. Call it after
    :func:`check_header`, which bounds what the stream may hold."""
    if not path.name.endswith(".gz"):
        return
    try:
        with gzip.open(path, "rb") as f:
            while f.read(chunk):
                pass
    except FILE_READ_ERRORS as e:
        raise cannot_read(path, e) from e
