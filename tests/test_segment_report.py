"""What ``visionattn segment`` tells its user (issue 14): ``--device auto`` (the default) and ``--threads``,
the overlay's legend (label names from the run's recipe, in their colours), one line per case as it is done
with its volumes in ml and Dice, and ``summary.json`` with rounded numbers, volumes and this run's totals."""
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import visionattn.tasks.segment as segment
from test_segment import ANATOMICAL, expected_labels, voxelwise_model_dir
from visionattn.cli import build_parser, main
from visionattn.tasks.segment import SegmentError, format_ml, label_colours, overlay_figure, resolve_device

NAMES = ("background", "hippocampus head", "tail")  # not the helper's default names: they must come from the recipe


def fake_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


# ---------------------------------------------------------------------------------------------------
# --device and --threads


def test_device_auto_takes_a_gpu_only_where_there_is_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    fake_gpus(monkeypatch, 0)
    assert resolve_device("auto") == "cpu" and resolve_device(None) == "cpu" and resolve_device("CPU") == "cpu"
    for asked in ("cuda", "cuda:0"):
        with pytest.raises(SegmentError, match=r"no CUDA GPU.*use --device cpu"):
            resolve_device(asked)
    fake_gpus(monkeypatch, 2)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda") == "cuda"
    assert resolve_device("cuda:1") == "cuda:1"
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(SegmentError, match="cuda:0 .. cuda:1"):
        resolve_device("cuda:2")
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun each process takes its own GPU
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == "cuda:1" and resolve_device("cuda:0") == "cuda:0"
    fake_gpus(monkeypatch, 1)  # fewer GPUs than processes: auto keeps every process on the CPU, cuda is refused
    assert resolve_device("auto") == "cpu"
    with pytest.raises(SegmentError, match="LOCAL_RANK 1"):
        resolve_device("cuda")
    for bad in ("gpu", "cuda:x", "tpu"):
        with pytest.raises(SegmentError, match="not a device"):
            resolve_device(bad)


@pytest.mark.parametrize("gpus, expected", [(0, "cpu"), (1, "cuda")])
def test_the_command_defaults_to_auto(monkeypatch, tmp_path, gpus, expected):
    assert build_parser().parse_args(["segment"]).device == "auto"
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    fake_gpus(monkeypatch, gpus)
    asked = []

    def from_run(spec, **settings):  # stop before a (fake) GPU would be used
        asked.append(settings["device"])
        raise SegmentError("stopped here by the test")

    monkeypatch.setattr(segment.Segmenter, "from_run", from_run)
    assert main(["segment", "-i", str(ANATOMICAL), "-o", str(tmp_path / "out"), "--no-progress"]) == 2
    assert asked == [expected]


def test_cuda_without_a_gpu_is_one_line_naming_the_fix(monkeypatch, tmp_path, capsys):
    fake_gpus(monkeypatch, 0)
    run = voxelwise_model_dir(tmp_path)
    out = tmp_path / "out"
    assert main(["segment", "-i", str(ANATOMICAL), "-o", str(out), "--model", str(run), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("visionattn segment: error: --device cuda: no CUDA GPU"), err
    assert "--device cpu" in err and "Traceback" not in err
    assert not out.exists()  # refused before anything was written


def test_threads_sets_torch_threads_for_the_run(monkeypatch, tmp_path, capsys):
    run = voxelwise_model_dir(tmp_path)
    calls = []
    set_num_threads = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), set_num_threads(n)))
    before = torch.get_num_threads()
    out = tmp_path / "out"
    assert main(["segment", "-i", str(ANATOMICAL), "-o", str(out), "--model", str(run), "--device", "cpu",
                 "--threads", "1", "--no-progress"]) == 0
    assert calls[0] == 1 and torch.get_num_threads() == before  # set for the run, then restored
    assert "on cpu (1 thread)" in capsys.readouterr().out.splitlines()[0]
    assert json.loads((out / "summary.json").read_text())["threads"] == 1
    assert main(["segment", "-i", str(ANATOMICAL), "-o", str(out), "--model", str(run), "--threads", "0"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# the overlay's legend


def test_overlay_legend_shows_each_recipe_label_in_its_colour(monkeypatch, tmp_path):
    from PIL import Image

    run = voxelwise_model_dir(tmp_path, labels=NAMES)
    boxes = []
    write_overlay = segment.write_overlay
    monkeypatch.setattr(segment, "write_overlay", lambda *a, **k: boxes.append(write_overlay(*a, **k)) or boxes[-1])
    out = tmp_path / "out"
    assert segment.run_segment(str(ANATOMICAL), str(out), str(run), progress=False, overlay=True) == 0
    png = Image.open(out / "anatomical.png")
    rgb = np.asarray(png.convert("RGB")).astype(int)
    (left, top, right, bottom), = boxes
    assert bottom == rgb.shape[0] and top > rgb.shape[0] // 2  # a band under the slices
    legend, slices = rgb[top:bottom, left:right], rgb[:top]
    colours = (label_colours(len(NAMES)) * 255).round().astype(int)
    for k in (1, 2):
        in_legend = (np.abs(legend - colours[k]).max(-1) <= 2).sum()
        assert in_legend >= 50, (NAMES[k], in_legend)  # a solid patch of the label's colour
        # on the slices the label is drawn half-transparent: its pure colour is not there
        assert (np.abs(slices - colours[k]).max(-1) <= 2).sum() < in_legend
    assert len({tuple(c) for c in colours[1:]}) == 2
    # the names: from the recipe, in label order, with each label's colour (the PNG's description)
    description = png.text["Description"]
    entry = json.loads((out / "summary.json").read_text())["cases"][0]
    for k, name in enumerate(NAMES[1:], start=1):
        hex_code = "#" + "".join(f"{c:02x}" for c in colours[k])
        assert f"{k} {name} ({format_ml(entry['volume_ml'][name])} ml) {hex_code}" in description, description


def test_legend_texts_and_colours_for_many_labels():
    labels = (np.arange(12 * 8 * 6).reshape(12, 8, 6) % 13).astype(np.uint8)
    names = [f"structure {k}" for k in range(13)]
    fig, legend_ax = overlay_figure(np.random.default_rng(0).random((12, 8, 6)), labels, names)
    legend = legend_ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == names[1:]
    colours = label_colours(13)
    patches = [tuple(np.round(h.get_facecolor()[:3], 4)) for h in legend.legend_handles]
    assert patches == [tuple(np.round(c, 4)) for c in colours[1:]]
    assert len(set(patches)) == 12
    import matplotlib.pyplot as plt

    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# volumes, Dice, the printed lines and the summary


def anisotropic_case(folder: Path, zooms=(1.5, 2.0, 2.5)) -> Path:
    """anatomical.nii's values on a grid of ``zooms`` mm voxels."""
    folder.mkdir(parents=True, exist_ok=True)
    data = np.asarray(nib.load(str(ANATOMICAL)).dataobj, dtype=np.float32)
    img = nib.Nifti1Image(data, np.diag([*zooms, 1.0]))
    img.header.set_zooms(zooms)
    nib.save(img, str(folder / "aniso.nii.gz"))
    return folder / "aniso.nii.gz"


def test_volumes_are_in_ml_on_the_input_grid(tmp_path, capsys):
    run = voxelwise_model_dir(tmp_path, spacing=(3.0, 3.0, 3.0), labels=NAMES)  # resampled to 3 mm and back
    case = anisotropic_case(tmp_path / "in")
    out = tmp_path / "out"
    assert main(["segment", "-i", str(case), "-o", str(out), "--model", str(run), "--no-progress"]) == 0
    labels = np.asarray(nib.load(str(out / "aniso.nii.gz")).dataobj)
    assert labels.shape == nib.load(str(case)).shape
    entry = json.loads((out / "summary.json").read_text())["cases"][0]
    voxel_ml = 1.5 * 2.0 * 2.5 / 1000
    for k, name in enumerate(NAMES[1:], start=1):
        assert (labels == k).sum() > 0
        assert entry["volume_ml"][name] == round((labels == k).sum() * voxel_ml, 3)
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("aniso "))
    assert re.match(r"^aniso +ok +\d+\.\d\d s  hippocampus head \d+\.\d+ ml, tail \d+\.\d+ ml$", line), line
    assert f"hippocampus head {format_ml(entry['volume_ml']['hippocampus head'])} ml" in line


def test_format_ml_never_prints_float_noise():
    assert [format_ml(v) for v in (0.0, 0.1 + 0.2, 1.5, 12.3456, 123.456, 4321.5)] == \
        ["0.000", "0.300", "1.500", "12.35", "123.5", "4322"]


def cases_with_references(tmp_path: Path, n: int = 2) -> tuple[Path, Path]:
    src = nib.load(str(ANATOMICAL))
    ins, refs = tmp_path / "in", tmp_path / "refs"
    ins.mkdir()
    refs.mkdir()
    truth = expected_labels(np.asarray(src.dataobj, dtype=np.float64))
    for i in range(n):
        nib.save(src, str(ins / f"case{i}.nii.gz"))
        ref = truth.copy()
        ref[: 4 * (i + 1)] = 0  # Dice below 1, different per case
        nib.save(nib.Nifti1Image(ref, src.affine), str(refs / f"case{i}.nii.gz"))
    return ins, refs


def test_each_case_line_is_printed_as_soon_as_the_case_is_done(tmp_path, capsys, monkeypatch):
    run = voxelwise_model_dir(tmp_path, labels=NAMES)
    ins, refs = cases_with_references(tmp_path)
    seen_before = {}
    segment_case = segment.segment_case

    def spying(segmenter, case, outputs, **kwargs):
        seen_before[case.name] = capsys.readouterr().out  # what was printed before this case started
        print(seen_before[case.name], end="")  # keep it in the captured output
        return segment_case(segmenter, case, outputs, **kwargs)

    monkeypatch.setattr(segment, "segment_case", spying)
    out = tmp_path / "out"
    assert main(["segment", "-i", str(ins), "-o", str(out), "--model", str(run), "--labels", str(refs),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "case0 " not in seen_before["case0"] and re.search(r"^case0 +ok", seen_before["case1"], re.MULTILINE)
    summary = json.loads((out / "summary.json").read_text())
    for entry in summary["cases"]:
        line = next(line for line in printed.splitlines() if line.startswith(entry["case"] + " "))
        dice = entry["dice"]
        assert 0.5 < dice["tail"] < 1.0
        assert line.endswith("  Dice " + ", ".join(f"{k} {v:.3f}" for k, v in dice.items())), line
        assert ", ".join(f"{k} {format_ml(v)} ml" for k, v in entry["volume_ml"].items()) in line


def float_texts(text: str) -> list[str]:
    """Every float in a JSON text, as written."""
    found = []
    json.loads(text, parse_float=lambda s: found.append(s) or float(s))
    return found


def test_summary_numbers_are_rounded_and_totals_follow_each_run(tmp_path, capsys):
    run = voxelwise_model_dir(tmp_path, labels=NAMES)
    ins, refs = cases_with_references(tmp_path)
    out = tmp_path / "out"
    argv = ["segment", "-i", str(ins), "-o", str(out), "--model", str(run), "--labels", str(refs), "--no-progress"]
    assert main(argv) == 0
    text = (out / "summary.json").read_text()
    floats = float_texts(text)
    assert floats and all(re.fullmatch(r"\d+\.\d{1,4}", f) for f in floats), floats
    summary = json.loads(text)
    assert summary["labels"] == list(NAMES) and summary["device"] == "cpu"
    totals = summary["totals"]
    assert {k: totals[k] for k in ("cases", "written", "skipped", "failed")} == \
        {"cases": 2, "written": 2, "skipped": 0, "failed": 0}
    assert totals["seconds"] >= sum(c["seconds"] for c in summary["cases"]) - 0.01
    for name in NAMES[1:]:
        per_case = [c["dice"][name] for c in summary["cases"]]
        assert totals["mean_dice"][name] == pytest.approx(np.mean(per_case), abs=1e-4)
        assert summary["mean_dice"][name] == totals["mean_dice"][name]
    assert f"2 of 2 cases written to {out}; " in capsys.readouterr().out

    # a re-run with one more case and one bad file: the summary is merged, the totals are this run's
    src = nib.load(str(ANATOMICAL))
    nib.save(src, str(ins / "case2.nii.gz"))
    (ins / "broken.nii.gz").write_bytes(b"not a nifti file")
    assert main(argv) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert {c["case"]: c["status"] for c in summary["cases"]} == \
        {"broken": "failed", "case0": "skipped", "case1": "skipped", "case2": "ok"}
    assert {k: summary["totals"][k] for k in ("cases", "written", "skipped", "failed")} == \
        {"cases": 4, "written": 1, "skipped": 2, "failed": 1}
    assert summary["counts"] == {"ok": 1, "skipped": 2, "failed": 1}
    skipped = [c for c in summary["cases"] if c["status"] == "skipped"]
    assert all(c["volume_ml"] and c["dice"] for c in skipped)  # kept from the first run
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.startswith("case0 "))
    assert "skipped: already in" in line and " ml" in line and "Dice " in line
    assert all(re.fullmatch(r"\d+\.\d{1,4}", f) for f in float_texts((out / "summary.json").read_text()))
    assert not list(out.glob(".*tmp*"))
