"""``visionattn segment``: geometry of the outputs (shape, affine, qform/sform, dtype) on real files including
a non-RAS one, exact inversion of the preprocessing, multi-channel cases, every bad input of the issue, and
the bundled demo."""
import json
import os
import random
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from visionattn.cli import main
from visionattn.tasks.segment import SegmentError, find_cases, load_segmentation_model, run_segment
from visionattn.tasks.runtime import atomic_save_weights

ANATOMICAL = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"  # LAS, int16, 2 mm
WEIGHT = torch.tensor([[-4.0], [1.0], [4.0]])  # 3 classes from one channel: a monotone function of intensity
BIAS = torch.tensor([0.0, 2.0, -2.0])


def voxelwise_model_dir(tmp_path: Path, in_channels: int = 1, task: str = "segmentation", spacing=(2.0, 2.0, 2.0),
                        labels=("background", "a", "b")) -> Path:
    """A run folder whose network is a 1x1x1 convolution: labels depend on each voxel's value only, so any
    mistake in reorienting or inverting shows up as a voxel mismatch. ``spacing`` defaults to anatomical.nii's
    2 mm, so no resampling happens unless a test asks for it. ``labels``: the recipe's three label names."""
    run = tmp_path / f"run_{in_channels}_{task}"
    run.mkdir()
    cfg = {
        "task": task,
        "data": {"spatial_dims": 3, "in_channels": in_channels, "labels": list(labels), "orientation": "RAS",
                 "spacing": list(spacing), "intensity": "zscore", "roi_size": [16, 16, 16]}
        if task == "segmentation" else {"img_size": 16},  # another task's run folder, as its trainer writes it
        "inference": {"overlap": 0.25, "mode": "constant", "sw_batch_size": 2},
        "model": {"_target_": "torch.nn.Conv3d", "in_channels": in_channels, "out_channels": 3, "kernel_size": 1},
    }
    conv = torch.nn.Conv3d(in_channels, 3, 1)
    with torch.no_grad():
        conv.weight.copy_(WEIGHT.repeat(1, in_channels)[:, :, None, None, None] / in_channels)
        conv.bias.copy_(BIAS)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    atomic_save_weights(conv, run / "model.safetensors")
    return run


def expected_labels(volume: np.ndarray) -> np.ndarray:
    z = (volume - volume.mean()) / volume.std()
    logits = WEIGHT[:, 0].numpy()[:, None] * z.reshape(1, -1) + BIAS.numpy()[:, None]
    return logits.argmax(0).reshape(volume.shape).astype(np.uint8)


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob(".*") if ".tmp" in p.name]


def test_output_geometry_on_a_non_ras_file(tmp_path):
    run = voxelwise_model_dir(tmp_path)
    src = nib.load(str(ANATOMICAL))
    assert nib.aff2axcodes(src.affine) == ("L", "A", "S")
    out = tmp_path / "out"
    assert run_segment(str(ANATOMICAL), str(out), str(run), progress=False) == 0
    res = nib.load(str(out / "anatomical.nii.gz"))
    assert res.shape == src.shape
    np.testing.assert_allclose(res.affine, src.affine)
    for form in ("get_qform", "get_sform"):
        got, code = getattr(res.header, form)(coded=True)
        want, want_code = getattr(src.header, form)(coded=True)
        assert int(code) == int(want_code) and np.allclose(got, want)
    assert res.get_data_dtype() == np.uint8
    labels = np.asarray(res.dataobj)
    np.testing.assert_array_equal(labels, expected_labels(np.asarray(src.dataobj, dtype=np.float64)))
    assert no_temp_files(out)


def test_reoriented_copies_give_the_same_labels_in_world_space(tmp_path, shared_data):
    """The same volume stored RAS and as a flipped, axis-permuted copy: the label maps agree voxel for voxel
    after undoing the storage change."""
    run = voxelwise_model_dir(tmp_path, spacing=(1.0, 1.0, 1.0))
    src = nib.load(str(shared_data / "msd_hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"))
    data = np.asarray(src.dataobj, dtype=np.float32)
    ornt = np.array([[2, -1], [0, 1], [1, -1]])  # store z, x, y with two flips
    moved = src.as_reoriented(ornt)
    ins = tmp_path / "in"
    ins.mkdir()
    nib.save(src, str(ins / "ras.nii.gz"))
    nib.save(moved, str(ins / "moved.nii.gz"))
    out = tmp_path / "out"
    assert run_segment(str(ins), str(out), str(run), progress=False) == 0
    a = nib.load(str(out / "ras.nii.gz"))
    b = nib.load(str(out / "moved.nii.gz"))
    np.testing.assert_allclose(b.affine, moved.affine)
    back = b.as_reoriented(nib.orientations.ornt_transform(nib.io_orientation(b.affine), nib.io_orientation(a.affine)))
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.asarray(a.dataobj))
    np.testing.assert_array_equal(np.asarray(a.dataobj), expected_labels(data.astype(np.float64)))


def test_resampling_is_inverted_onto_the_input_grid(tmp_path):
    run = voxelwise_model_dir(tmp_path, spacing=(3.0, 3.0, 3.0))
    out = tmp_path / "out"
    assert run_segment(str(ANATOMICAL), str(out), str(run), progress=False, save_probabilities=True) == 0
    res = nib.load(str(out / "anatomical.nii.gz"))
    src = nib.load(str(ANATOMICAL))
    assert res.shape == src.shape and np.allclose(res.affine, src.affine)
    probs = np.load(out / "anatomical.npz")["probabilities"]
    assert probs.dtype == np.float16 and probs.shape == (3, *src.shape)
    np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=1e-2)
    # at 3 mm the labels are coarser but still mostly those of the voxel-wise rule
    agree = (np.asarray(res.dataobj) == expected_labels(np.asarray(src.dataobj, dtype=np.float64))).mean()
    assert agree > 0.8


def test_multichannel_cases_and_missing_channels(tmp_path):
    run = voxelwise_model_dir(tmp_path, in_channels=2)
    src = nib.load(str(ANATOMICAL))
    ins = tmp_path / "in"
    ins.mkdir()
    for case in ("caseA", "caseB"):
        nib.save(src, str(ins / f"{case}_0000.nii.gz"))
    nib.save(src, str(ins / "caseA_0001.nii.gz"))  # caseB lacks its second channel
    out = tmp_path / "out"
    cases = find_cases(ins, 2)
    assert [c.name for c in cases] == ["caseA", "caseB"] and cases[1].problems
    assert run_segment(str(ins), str(out), str(run), progress=False) == 1
    assert (out / "caseA.nii.gz").is_file() and not (out / "caseB.nii.gz").exists()
    summary = json.loads((out / "summary.json").read_text())
    failed = {c["case"]: c for c in summary["cases"] if c["status"] == "failed"}
    assert "caseB_0001" in failed["caseB"]["error"]
    # both channels equal: same labels as the one-channel rule
    np.testing.assert_array_equal(np.asarray(nib.load(str(out / "caseA.nii.gz")).dataobj),
                                  expected_labels(np.asarray(src.dataobj, dtype=np.float64)))


def test_bad_inputs_are_reported_by_case_and_the_rest_complete(tmp_path, capsys):
    run = voxelwise_model_dir(tmp_path)
    src = nib.load(str(ANATOMICAL))
    ins = tmp_path / "in"
    ins.mkdir()
    nib.save(src, str(ins / "good.nii.gz"))
    (ins / "corrupt.nii.gz").write_bytes(random.Random(0).randbytes(2000))  # fixed bytes: a failure reproduces
    whole = (ins / "good.nii.gz").read_bytes()
    (ins / "truncated.nii.gz").write_bytes(whole[: len(whole) // 2])
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), str(ins / "flat.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.float32), np.eye(4)), str(ins / "fourd.nii.gz"))
    nanvol = np.asarray(src.dataobj, dtype=np.float32).copy()
    nanvol[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(nanvol, src.affine), str(ins / "nans.nii.gz"))
    out = tmp_path / "out"
    assert main(["segment", "-i", str(ins), "-o", str(out), "--model", str(run), "--no-progress"]) == 1
    err = capsys.readouterr().err
    for case, words in (("corrupt", "cannot read"), ("truncated", "cannot read"), ("flat", "shape"),
                        ("fourd", "shape"), ("nans", "NaN")):
        line = next(line for line in err.splitlines() if f"case {case}:" in line)
        assert words in line, line
        assert not (out / f"{case}.nii.gz").exists()
    assert (out / "good.nii.gz").is_file()
    assert no_temp_files(out)
    summary = json.loads((out / "summary.json").read_text())
    assert {c["case"]: c["status"] for c in summary["cases"]}["good"] == "ok"


def test_existing_outputs_are_kept_unless_overwrite(tmp_path, capsys):
    run = voxelwise_model_dir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "anatomical.nii.gz").write_bytes(b"precious")
    # every requested output exists: the case is skipped (nnU-Net's re-run behaviour), which is no failure
    assert main(["segment", "-i", str(ANATOMICAL), "-o", str(out), "--model", str(run), "--no-progress"]) == 0
    assert "skipped: already in" in capsys.readouterr().out
    assert (out / "anatomical.nii.gz").read_bytes() == b"precious"
    assert main(["segment", "-i", str(ANATOMICAL), "-o", str(out), "--model", str(run), "--no-progress", "--overwrite"]) == 0
    assert nib.load(str(out / "anatomical.nii.gz")).shape == (33, 41, 25)


def test_whole_call_errors(tmp_path, capsys):
    run = voxelwise_model_dir(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["segment", "-i", str(empty), "-o", str(tmp_path / "o"), "--model", str(run)]) == 2
    assert "no .nii" in capsys.readouterr().err
    other = voxelwise_model_dir(tmp_path, task="classification")
    assert main(["segment", "-i", str(ANATOMICAL), "-o", str(tmp_path / "o"), "--model", str(other)]) == 2
    assert "classification model" in capsys.readouterr().err
    (tmp_path / "broken").mkdir()
    broken = voxelwise_model_dir(tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])  # a truncated download
    assert main(["segment", "-i", str(ANATOMICAL), "-o", str(tmp_path / "o"), "--model", str(broken)]) == 2
    assert f"cannot read checkpoint {weights}" in capsys.readouterr().err
    with pytest.raises(SegmentError, match="architecture without trained weights"):
        load_segmentation_model("agunet_3d")
    if os.geteuid() != 0:  # root can write anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        try:
            assert main(["segment", "-i", str(ANATOMICAL), "-o", str(locked / "sub"), "--model", str(run)]) == 2
            assert "not writable" in capsys.readouterr().err
        finally:
            locked.chmod(0o755)


def test_overlay_and_summary_volumes(tmp_path):
    run = voxelwise_model_dir(tmp_path)
    out = tmp_path / "out"
    assert run_segment(str(ANATOMICAL), str(out), str(run), progress=False, overlay=True) == 0
    assert (out / "anatomical.png").read_bytes()[:4] == b"\x89PNG"
    entry = json.loads((out / "summary.json").read_text())["cases"][0]
    labels = np.asarray(nib.load(str(out / "anatomical.nii.gz")).dataobj)
    voxel_ml = 2.0 * 2.0 * 2.0 / 1000
    assert entry["volume_ml"]["a"] == pytest.approx((labels == 1).sum() * voxel_ml)


def test_segment_benchmarks_run_on_small_inputs(tmp_path, shared_data):
    from visionattn.tasks.bench_segment import bench_segment_memory, bench_segment_time

    run = voxelwise_model_dir(tmp_path, spacing=(1.0, 1.0, 1.0))
    images = [str(shared_data / "msd_hippocampus" / "imagesTr" / "hippocampus_001.nii.gz")]
    table, rows = bench_segment_time(str(run), images, repeats=1)
    assert [r["method"] for r in rows] == ["visionattn segment", "plain MONAI script"] and "plain / this" in table
    table, rows = bench_segment_memory(str(run), shape=(40, 48, 32))
    assert rows[0]["status"] == "ok" and rows[0]["peak_rss_mib"] > 0


def test_plain_monai_script_gives_the_same_labels(tmp_path, shared_data):
    """The benchmark's baseline is a fair one: it writes the same label map as `segment`."""
    from visionattn.tasks.bench_segment import plain_monai_segment
    from visionattn.tasks.segment import load_segmentation_model

    run = voxelwise_model_dir(tmp_path, spacing=(1.0, 1.0, 1.0))
    image = shared_data / "msd_hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
    assert run_segment(str(image), str(tmp_path / "ours"), str(run), progress=False) == 0
    model = load_segmentation_model(str(run))
    plain_monai_segment(model.network, model.config, str(image), str(tmp_path / "plain"))
    ours = np.asarray(nib.load(str(tmp_path / "ours" / "hippocampus_001.nii.gz")).dataobj)
    plain = np.asarray(nib.load(str(tmp_path / "plain" / "hippocampus_001_seg.nii.gz")).dataobj)
    np.testing.assert_array_equal(ours, plain)


def test_torchrun_shares_cases_across_processes(tmp_path):
    import subprocess
    import sys

    run = voxelwise_model_dir(tmp_path)
    src = nib.load(str(ANATOMICAL))
    ins = tmp_path / "in"
    ins.mkdir()
    for i in range(3):
        nib.save(src, str(ins / f"case{i}.nii.gz"))
    out = tmp_path / "out"
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "visionattn", "segment", "-i", str(ins), "-o", str(out), "--model", str(run), "--no-progress"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [c["case"] for c in summary["cases"]] == ["case0", "case1", "case2"]
    want = expected_labels(np.asarray(src.dataobj, dtype=np.float64))
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(nib.load(str(out / f"case{i}.nii.gz")).dataobj), want)


README = Path(__file__).resolve().parents[1] / "README.md"


def readme_demo_cases() -> dict[str, list[float]]:
    """The case lines of the demo output pasted in the README: case -> its numbers after the time (volumes
    in ml, then Dice)."""
    text = README.read_text(encoding="utf-8")
    block = text[text.index("The demo prints one line per case"):].split("```text\n", 1)[1].split("```", 1)[0]
    return {m[1]: [float(x) for x in re.findall(r" (\d+\.\d+)(?= ml|,|$)", m[2])]
            for m in re.finditer(r"^(\S+) +ok +\d+\.\d+ s  (.*)$", block, re.M)}


def test_bundled_demo_segments_the_samples(tmp_path, capsys):
    """The README's main command: the bundled model on the bundled validation cases, a line per case with
    its volumes and Dice, as the README shows it (times aside), and the overlay the README shows."""
    out = tmp_path / "demo"
    assert main(["segment", "-o", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "mean Dice" in printed
    pasted = readme_demo_cases()
    assert sorted(pasted) == ["hippocampus_015", "hippocampus_020", "hippocampus_024"]
    for case, numbers in pasted.items():
        line = next(line for line in printed.splitlines() if line.startswith(case + " "))
        ours = [float(x) for x in re.findall(r" (\d+\.\d+)(?= ml|,|$)", line.split(" s  ", 1)[1])]
        assert len(numbers) == 4 and ours == pytest.approx(numbers, abs=0.01), (line, numbers)
    from PIL import Image

    shown = Image.open(README.parent / "docs" / "segment_overlay.png")
    assert "](docs/segment_overlay.png)" in README.read_text(encoding="utf-8")
    assert "1 anterior" in shown.text["Description"] and "2 posterior" in shown.text["Description"]
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["cases"]) == 3
    for name, dice in summary["mean_dice"].items():
        assert dice > 0.8, (name, dice)
    for case in summary["cases"]:
        assert (out / f"{case['case']}.nii.gz").is_file() and (out / f"{case['case']}.png").is_file()
