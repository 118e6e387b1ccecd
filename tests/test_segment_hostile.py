"""``visionattn segment`` never loses or corrupts data, whatever the input (issues 12 and 14).

Every payload is built here with nibabel: outputs that would land on inputs (same folder, ``./x`` vs ``x``,
symlinks, the labels folder), re-runs into a used folder, an unreadable earlier summary, case names that
collide, intensity scaling that overflows float32, and headers that declare far more voxels (or header
extension bytes) than the file holds, and damaged gzip streams. ``HOSTILE_INPUTS`` counts the hostile inputs
tried."""
import gzip
import hashlib
import json
import os
import resource
import struct
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from test_segment import ANATOMICAL, no_temp_files, voxelwise_model_dir
from visionattn.cli import main

HOSTILE_INPUTS = 34  # the sum of the per-section counts noted below


def segment(*args: str) -> int:
    return main(["segment", *map(str, args), "--no-progress"])


def digests(folder: Path) -> dict[str, str]:
    """Name -> sha256 of every file under ``folder`` (symlinks as their target's bytes)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def two_cases(folder: Path) -> Path:
    """``folder`` holding ``a.nii.gz`` and ``b.nii.gz`` (single-file cases: their outputs share their names)."""
    folder.mkdir(parents=True, exist_ok=True)
    src = nib.load(str(ANATOMICAL))
    nib.save(src, str(folder / "a.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj)[::-1].copy(), src.affine), str(folder / "b.nii.gz"))
    return folder


def summary_cases(out: Path) -> dict[str, dict]:
    return {c["case"]: c for c in json.loads((out / "summary.json").read_text())["cases"]}


# ---------------------------------------------------------------------------------------------------
# outputs never land on inputs (8 hostile inputs)


@pytest.mark.parametrize("how", ["same path", "./in vs in", "symlink to the input folder"])
def test_output_folder_that_is_the_input_folder_is_refused_even_with_overwrite(tmp_path, capsys, monkeypatch, how):
    run = voxelwise_model_dir(tmp_path)
    ins = two_cases(tmp_path / "in")
    before = digests(ins)
    monkeypatch.chdir(tmp_path)
    inp, out = {"same path": (ins, ins), "./in vs in": ("./in", "in"), "symlink to the input folder": (ins, "link")}[how]
    if how.startswith("symlink"):
        os.symlink(ins, tmp_path / "link")
    assert segment("-i", inp, "-o", out, "--model", run, "--overwrite") == 2
    assert "is the input folder" in capsys.readouterr().err
    assert digests(ins) == before  # not one byte changed, and nothing added (no summary.json either)


def test_output_file_that_is_an_input_is_refused(tmp_path, capsys):
    """A single input file whose output is itself, and an output path that is a symlink to an input."""
    run = voxelwise_model_dir(tmp_path)
    ins = two_cases(tmp_path / "in")
    before = digests(ins)
    assert segment("-i", ins / "a.nii.gz", "-o", ins, "--model", run, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "refusing to write over inputs" in err and "a.nii.gz" in err
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(ins / "b.nii.gz", out / "b.nii.gz")
    assert segment("-i", ins, "-o", out, "--model", run, "--overwrite") == 2
    assert f"is the input {ins / 'b.nii.gz'}" in capsys.readouterr().err
    assert digests(ins) == before and (out / "b.nii.gz").is_symlink()


def test_reference_labels_are_never_written_over(tmp_path, capsys):
    """``-o`` that is the ``--labels`` folder, and an output that is a symlink to a reference label file."""
    run = voxelwise_model_dir(tmp_path)
    ins = two_cases(tmp_path / "in")
    labels = tmp_path / "labels"
    labels.mkdir()
    truth = nib.load(str(ANATOMICAL))
    for name in ("a", "b"):
        nib.save(nib.Nifti1Image((np.asarray(truth.dataobj) > 40).astype(np.uint8), truth.affine), str(labels / f"{name}.nii.gz"))
    before = digests(labels)
    assert segment("-i", ins, "-o", labels, "--model", run, "--labels", labels, "--overwrite") == 2
    assert "is the --labels folder" in capsys.readouterr().err
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(labels / "a.nii.gz", out / "a.nii.gz")
    assert segment("-i", ins, "-o", out, "--model", run, "--labels", labels, "--overwrite") == 2
    assert f"is the input {labels / 'a.nii.gz'}" in capsys.readouterr().err
    assert digests(labels) == before


def test_reference_labels_on_another_grid_fail_the_case_before_anything_is_written(tmp_path, capsys):
    run = voxelwise_model_dir(tmp_path)
    ins = two_cases(tmp_path / "in")
    labels = tmp_path / "labels"
    labels.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), np.eye(4)), str(labels / "a.nii.gz"))
    out = tmp_path / "out"
    assert segment("-i", ins, "-o", out, "--model", run, "--labels", labels) == 1
    assert "reference labels" in capsys.readouterr().err
    assert not (out / "a.nii.gz").exists() and (out / "b.nii.gz").is_file()


# ---------------------------------------------------------------------------------------------------
# re-runs into the same folder (6 hostile inputs: a used folder, a corrupt input, partial outputs, 3 summaries)


def test_second_run_skips_finished_cases_and_keeps_their_summary(tmp_path, capsys):
    run = voxelwise_model_dir(tmp_path)
    ins = two_cases(tmp_path / "in")
    (ins / "broken.nii.gz").write_bytes(_deflate_garbage())
    out = tmp_path / "out"
    assert segment("-i", ins, "-o", out, "--model", run, "--overlay") == 1  # broken fails, a and b written
    first = summary_cases(out)
    written = digests(out)
    printed = capsys.readouterr()
    assert (printed.out + printed.err).count("cannot read broken.nii.gz") == 1  # each error printed once

    (ins / "broken.nii.gz").unlink()
    assert segment("-i", ins, "-o", out, "--model", run, "--overlay") == 0  # skipped cases are no failure
    printed = capsys.readouterr().out
    assert printed.count(f"skipped: already in {out}; --overwrite to redo") == 2
    again = summary_cases(out)
    for name in ("a", "b"):
        assert again[name] == {**first[name], "status": "skipped"}
    assert again["broken"] == first["broken"]  # a case not run this time keeps its entry
    assert no_temp_files(out)
    assert {k: v for k, v in digests(out).items() if k != "summary.json"} == \
           {k: v for k, v in written.items() if k != "summary.json"}

    # a run on one more case merges into the summary; --overwrite redoes a skipped case
    nib.save(nib.load(str(ANATOMICAL)), str(tmp_path / "c.nii.gz"))
    assert segment("-i", tmp_path / "c.nii.gz", "-o", out, "--model", run, "--overlay") == 0
    assert set(summary_cases(out)) == {"a", "b", "broken", "c"}
    assert segment("-i", ins / "a.nii.gz", "-o", out, "--model", run, "--overlay", "--overwrite") == 0
    assert summary_cases(out)["a"]["status"] == "ok" and summary_cases(out)["b"]["status"] == "skipped"


def test_partly_existing_outputs_are_kept_without_overwrite(tmp_path, capsys):
    run = voxelwise_model_dir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "anatomical.nii.gz").write_bytes(b"an earlier label map")
    assert segment("-i", ANATOMICAL, "-o", out, "--model", run, "--overlay") == 1
    err = capsys.readouterr().err  # not skipped: the existing label map may come from another model or input
    assert "anatomical.nii.gz already in" in err and "anatomical.png not" in err and "--overwrite" in err
    assert (out / "anatomical.nii.gz").read_bytes() == b"an earlier label map"
    assert not (out / "anatomical.png").exists()


@pytest.mark.parametrize("payload", [b"{\"cases\": [{\"case\": \"x\", \"sta", b"[1, 2, 3]",
                                     b"{\"cases\": [{\"case\": \"x\", \"status\": \"ok\", \"dice\": {\"a\": NaN}}]}"],
                         ids=["truncated", "not a summary", "NaN"])
def test_unreadable_earlier_summary_is_moved_aside_not_destroyed(tmp_path, capsys, payload):
    run = voxelwise_model_dir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_bytes(payload)
    assert segment("-i", ANATOMICAL, "-o", out, "--model", run) == 0
    err = capsys.readouterr().err
    aside = list(out.glob("summary.json.unreadable-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == payload
    assert aside[0].name in err and "cannot be read" in err
    summary = json.loads((out / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert [c["status"] for c in summary["cases"]] == ["ok"]


# ---------------------------------------------------------------------------------------------------
# case names that collide (3 hostile inputs)


def test_colliding_case_names_fail_those_cases_and_the_others_complete(tmp_path, capsys):
    run = voxelwise_model_dir(tmp_path)
    src = nib.load(str(ANATOMICAL))
    ins = tmp_path / "in"
    ins.mkdir()
    pairs = {"a": ("a.nii", "a.nii.gz"), "b": ("b.nii.gz", "b_0000.nii.gz"), "c": ("c_0000.nii", "c_0000.nii.gz")}
    for names in pairs.values():
        for name in names:
            nib.save(src, str(ins / name))
    nib.save(src, str(ins / "good.nii.gz"))
    out = tmp_path / "out"
    assert segment("-i", ins, "-o", out, "--model", run) == 1
    err = capsys.readouterr().err
    for case, names in pairs.items():
        line = next(line for line in err.splitlines() if f"case {case}:" in line)
        assert names[0] in line and names[1] in line, line
        assert not (out / f"{case}.nii.gz").exists()
    assert (out / "good.nii.gz").is_file()
    assert {c: e["status"] for c, e in summary_cases(out).items()} == \
           {"a": "failed", "b": "failed", "c": "failed", "good": "ok"}


# ---------------------------------------------------------------------------------------------------
# intensities as the model sees them: float32 after scaling and normalisation (4 hostile inputs)


def _slope_1e38(path: Path) -> None:
    img = nib.load(str(ANATOMICAL))
    img = nib.Nifti1Image(np.asarray(img.dataobj), img.affine)
    img.header.set_slope_inter(1e38, 0.0)
    nib.save(img, str(path))


def _slope_inf(path: Path) -> None:
    path = path.with_name(path.name[:-3])  # an uncompressed .nii, so the header bytes can be patched in place
    src = nib.load(str(ANATOMICAL))
    img = nib.Nifti1Image(np.asarray(src.dataobj), src.affine)  # a new header: native byte order
    nib.save(img, str(path))
    raw = bytearray(path.read_bytes())
    raw[112:116] = struct.pack("=f", np.inf)  # scl_slope; nibabel ignores an infinite slope, MONAI too
    path.write_bytes(bytes(raw))


def _float64_beyond_float32(path: Path) -> None:
    data = np.asarray(nib.load(str(ANATOMICAL)).dataobj, dtype=np.float64) * 1e300
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), str(path))


def _float32_overflowing_normalisation(path: Path) -> None:
    data = np.full((16, 16, 16), 3e38, np.float32)
    data[::2] = -3e38
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), str(path))


@pytest.mark.parametrize("make, words", [
    (_slope_1e38, "overflow float32 once scaled"),
    (_slope_inf, "scl_slope = inf"),
    (_float64_beyond_float32, "overflow float32"),
    (_float32_overflowing_normalisation, "intensity normalisation"),
], ids=["scl_slope 1e38", "scl_slope inf", "float64 1e300", "float32 3e38"])
def test_intensities_that_are_not_finite_float32_fail_the_case(tmp_path, capsys, make, words):
    run = voxelwise_model_dir(tmp_path)
    ins = tmp_path / "in"
    ins.mkdir()
    make(ins / "hostile.nii.gz")
    nib.save(nib.load(str(ANATOMICAL)), str(ins / "good.nii.gz"))
    out = tmp_path / "out"
    assert segment("-i", ins, "-o", out, "--model", run) == 1
    line = next(line for line in capsys.readouterr().err.splitlines() if "case hostile:" in line)
    assert words in line and "hostile.nii" in line, line
    assert not (out / "hostile.nii.gz").exists() and (out / "good.nii.gz").is_file()


# ---------------------------------------------------------------------------------------------------
# sizes judged from the header before any voxel data is read (7 hostile inputs)


def gzip_of_zeros(path: Path, head: bytes, n_zeros: int, chunk: int = 2**24) -> None:
    """``head`` then ``n_zeros`` zero bytes, gzip-compressed, without ever holding the zeros: gzip members
    are concatenated (a valid gzip stream), one compressed chunk of zeros written over and over."""
    member = gzip.compress(bytes(chunk), compresslevel=9)
    with open(path, "wb") as f:
        f.write(gzip.compress(head))
        for _ in range(n_zeros // chunk):
            f.write(member)
        f.write(gzip.compress(bytes(n_zeros % chunk)))


def nifti_header(shape, vox_offset: int = 352, extension_flag: int = 0) -> bytes:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.uint8)
    hdr.set_qform(np.eye(4), 1)
    hdr.set_sform(np.eye(4), 1)
    hdr["vox_offset"] = vox_offset
    return hdr.binaryblock + struct.pack("<i", extension_flag)


def test_a_1024_cubed_gzip_bomb_is_refused_from_its_header_fast_and_without_memory(tmp_path, capsys):
    run = voxelwise_model_dir(tmp_path)
    bomb = tmp_path / "bomb.nii.gz"
    gzip_of_zeros(bomb, nifti_header((1024, 1024, 1024)), 1024**3)
    assert bomb.stat().st_size < 5 * 2**20
    assert nib.load(str(bomb)).shape == (1024, 1024, 1024)  # a valid NIfTI; reading the header costs nothing
    assert segment("-i", ANATOMICAL, "-o", tmp_path / "warm", "--model", run) == 0  # imports and caches, not timed
    capsys.readouterr()

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tracemalloc.start()
    start = time.perf_counter()
    try:
        code = segment("-i", bomb, "-o", tmp_path / "out", "--model", run)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    rss_growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert code == 1
    err = capsys.readouterr().err
    assert "1024x1024x1024" in err and "--max-voxels" in err
    assert seconds < 2.0, seconds
    assert peak < 64 * 2**20, peak  # numpy and Python allocations; the volume alone would be 1 GiB
    assert rss_growth_mib < 256, rss_growth_mib
    assert not (tmp_path / "out" / "bomb.nii.gz").exists()


def _extension_of_a_gibibyte(path: Path) -> None:
    esize = 2**30 + 32  # a multiple of 16, as the standard wants
    head = nifti_header((8, 8, 8), vox_offset=352 + esize, extension_flag=1) + struct.pack("<ii", esize, 0)
    gzip_of_zeros(path, head, esize - 8 + 8**3)


def _extension_to_the_end_of_the_file(path: Path) -> None:
    # vox_offset 0 before the extensions: nibabel then reads extensions up to the end of the file
    head = nifti_header((8, 8, 8), vox_offset=0, extension_flag=1) + struct.pack("<ii", 2**30, 0)
    gzip_of_zeros(path, head, 2**30)


def _huge_voxels(path: Path) -> None:
    # 512 voxels of 400 mm: resampled to the model's 2 mm, 1601^3 = 4.1e9 voxels (16 GiB as float32)
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.diag([400.0, 400.0, 400.0, 1.0])), str(path))


def _zero_voxel_size(path: Path) -> None:
    hdr = nib.Nifti1Header()  # nibabel will not build a qform from a singular affine; an sform it keeps
    hdr.set_data_shape((8, 8, 8))
    hdr.set_data_dtype(np.float32)
    hdr.set_sform(np.diag([2.0, 0.0, 2.0, 1.0]), 1)
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), None, hdr), str(path))


def _many_volumes(path: Path) -> None:
    # a 4-D header: 64^3 x 2048 = 2^29 voxels, in a small gzip stream
    gzip_of_zeros(path, nifti_header((64, 64, 64, 2048)), 64**3 * 2048)


def _negative_dimension(path: Path) -> None:
    raw = bytearray(nifti_header((8, 8, 8)))
    raw[42:44] = struct.pack("<h", -8)  # dim[1]
    path.write_bytes(gzip.compress(bytes(raw) + bytes(512)))


@pytest.mark.parametrize("make, words", [
    (_extension_of_a_gibibyte, "header extensions"),
    (_extension_to_the_end_of_the_file, "header extensions"),
    (_huge_voxels, "resampled to the model's spacing"),
    (_zero_voxel_size, "voxel sizes"),
    (_many_volumes, "--max-voxels"),
    (_negative_dimension, "declares dimensions"),
], ids=["1 GiB extension", "extension to EOF", "400 mm voxels", "zero voxel size", "4-D 2^29", "negative dim"])
def test_hostile_headers_fail_the_case_fast(tmp_path, capsys, make, words):
    run = voxelwise_model_dir(tmp_path)
    ins = tmp_path / "in"
    ins.mkdir()
    make(ins / "hostile.nii.gz")
    nib.save(nib.load(str(ANATOMICAL)), str(ins / "good.nii.gz"))
    out = tmp_path / "out"
    start = time.perf_counter()
    assert segment("-i", ins, "-o", out, "--model", run) == 1
    assert time.perf_counter() - start < 20  # the good case included; none of these reads its voxel data
    line = next(line for line in capsys.readouterr().err.splitlines() if "case hostile:" in line)
    assert words in line, line
    assert (out / "good.nii.gz").is_file() and not (out / "hostile.nii.gz").exists()


# ---------------------------------------------------------------------------------------------------
# damaged files (5 hostile inputs): each fails its own case with "cannot read", whatever layer of the
# file is broken (zlib raises zlib.error, which is not an OSError, for a damaged deflate stream)


def _gzip_header() -> bytes:
    return b"\x1f\x8b\x08\x00" + bytes(4) + b"\x00\xff"  # magic, deflate, no flags, mtime, xfl, OS


def _deflate_garbage() -> bytes:
    # a valid gzip member header, then bytes that are no deflate stream (block type 3 is reserved)
    return _gzip_header() + b"\xff" * 500


def _valid_case_bytes(tmp_path: Path) -> bytes:
    src = tmp_path / "src.nii.gz"
    nib.save(nib.load(str(ANATOMICAL)), str(src))
    return src.read_bytes()


DAMAGED = {
    "not gzip": lambda good: b"\x1f\x8b" + b"\x00" * 500,  # gzip magic, then a compression method zlib lacks
    "deflate garbage": lambda good: _deflate_garbage(),
    "cut in the header": lambda good: good[:40],
    "cut in the voxels": lambda good: good[:len(good) // 2],
    "voxel stream bit-flipped": lambda good: good[:len(good) // 2] + bytes(b ^ 0x5A for b in good[len(good) // 2:][:64])
    + good[len(good) // 2 + 64:],
}


def test_damaged_gzip_payloads_break_a_naive_reader(tmp_path):
    """Each payload makes the plain ``gzip`` reader raise, and not always an ``OSError``: a reader that catches
    only that (as ours once did) would crash the whole run instead of failing the case."""
    good = _valid_case_bytes(tmp_path)
    raised = set()
    for make in DAMAGED.values():
        with pytest.raises(Exception) as e:
            gzip.decompress(make(good))
        raised.add(type(e.value).__name__)
    assert "error" in raised, raised  # zlib.error
    assert raised - {"error"}, raised  # and some OSError/EOFError


@pytest.mark.parametrize("damage", list(DAMAGED))
def test_damaged_files_fail_their_case_and_the_others_complete(tmp_path, capsys, damage):
    run = voxelwise_model_dir(tmp_path)
    ins = tmp_path / "in"
    ins.mkdir()
    (ins / "hostile.nii.gz").write_bytes(DAMAGED[damage](_valid_case_bytes(tmp_path)))
    nib.save(nib.load(str(ANATOMICAL)), str(ins / "good.nii.gz"))
    out = tmp_path / "out"
    assert segment("-i", ins, "-o", out, "--model", run) == 1
    printed = capsys.readouterr()
    line = next(line for line in printed.err.splitlines() if "case hostile:" in line)
    assert "cannot read hostile.nii.gz" in line and "corrupt or truncated" in line, line
    assert (out / "good.nii.gz").is_file() and not (out / "hostile.nii.gz").exists()
    assert no_temp_files(out)


def test_max_voxels_option(tmp_path, capsys):
    run = voxelwise_model_dir(tmp_path)
    out = tmp_path / "out"
    assert segment("-i", ANATOMICAL, "-o", out, "--model", run, "--max-voxels", "30000") == 1  # 33x41x25 = 33,825
    assert "33,825 voxels, over the limit of 30,000 (--max-voxels)" in capsys.readouterr().err
    assert segment("-i", ANATOMICAL, "-o", out, "--model", run, "--max-voxels", "40000") == 0


# ---------------------------------------------------------------------------------------------------
# the README's main command, run again into its folder (1 hostile input)


def test_bundled_demo_runs_again_and_again(tmp_path, capsys):
    """The README's main command twice into one folder: the second run skips every case, exits 0 and still
    reports Dice, from the first run's entries."""
    out = tmp_path / "demo"
    assert segment("-o", out) == 0
    first = summary_cases(out)
    capsys.readouterr()
    assert segment("-o", out) == 0
    printed = capsys.readouterr()
    assert printed.out.count("skipped: already in") == 3 and "mean Dice" in printed.out and not printed.err
    summary = json.loads((out / "summary.json").read_text())
    assert [c["status"] for c in summary["cases"]] == ["skipped"] * 3
    for case in summary["cases"]:
        assert case["dice"] == first[case["case"]]["dice"]
    for name, dice in summary["mean_dice"].items():
        assert dice > 0.8, (name, dice)
