"""``visionattn export`` (ONNX, TorchScript, exported programs with dynamic sizes, checked against PyTorch,
written atomically, never over an existing file without ``--overwrite``) and ``segment --engine onnx``
(the same label maps as PyTorch on the bundled samples)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from visionattn.cli import main

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SAMPLES = Path(__file__).resolve().parents[1] / "visionattn" / "bundled" / "samples" / "images"


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp" in p.name]


def test_export_a_trained_run_to_onnx_and_never_over_an_existing_file(tmp_path, capsys):
    out = tmp_path / "hippocampus.onnx"
    assert main(["export", "hippocampus_agunet", "--format", "onnx", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    # checked at the run's window and two odd sizes, one line each, batch 2 then 1
    assert "2x1x40x56x40" in printed and "1x1x41x59x45" in printed and printed.count(" ok") == 3
    assert out.is_file() and not leftovers(tmp_path)
    before = out.read_bytes()
    assert main(["export", "hippocampus_agunet", "--format", "onnx", "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["export", "hippocampus_agunet", "--format", "onnx", "-o", str(out), "--overwrite",
                 "--sizes", "24x32x24", "25x33x27"]) == 0
    assert "1x1x25x33x27" in capsys.readouterr().out

    import onnx

    graph = onnx.load(str(out)).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 1, "x", "y", "z"] and graph.input[0].name == "image"


@pytest.mark.parametrize("fmt", ["torchscript", "exported-program"])
def test_export_a_registered_model_by_name(fmt, tmp_path, capsys):
    out = tmp_path / f"model.{fmt}"
    args = ["export", "daunet_3d", "--format", fmt, "-o", str(out), "--kwarg", "filters=[4, 8, 16, 16]",
            "--kwarg", "out_channels=3", "--kwarg", "bottleneck_attention=neighborhood", "--kwarg", "attention_kernel=3"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "random weights" in captured.err and captured.out.count(" ok") == 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load is deprecated upstream
        loaded = torch.jit.load(str(out)) if fmt == "torchscript" else torch.export.load(str(out)).module()
    x = torch.randn(1, 1, 19, 23, 17)
    assert loaded(x).shape == (1, 3, 19, 23, 17)


def test_a_mismatch_writes_nothing_and_exits_1(tmp_path, monkeypatch, capsys):
    from visionattn.tasks import export

    real = export.load_exported
    monkeypatch.setattr(export, "load_exported", lambda path, fmt: (lambda x, run=real(path, fmt): run(x) + 1.0))
    out = tmp_path / "net.onnx"
    assert main(["export", "agunet_2d", "--format", "onnx", "-o", str(out), "--kwarg", "filters=[4, 8, 8]"]) == 1
    captured = capsys.readouterr()
    assert captured.out.count("MISMATCH") == 3 and "nothing written" in captured.err
    assert not out.exists() and not leftovers(tmp_path)


def test_bad_export_requests_are_one_line_errors(tmp_path, capsys):
    out = str(tmp_path / "x.onnx")
    assert main(["export", "no_such_model", "--format", "onnx", "-o", out]) == 2
    assert "registered model" in capsys.readouterr().err
    assert main(["export", "convit_tiny", "--format", "onnx", "-o", out]) == 2
    assert "segmentation networks" in capsys.readouterr().err
    assert main(["export", "agunet_2d", "--format", "onnx", "-o", out, "--sizes", "32x32x32"]) == 2
    assert "--sizes" in capsys.readouterr().err
    assert main(["export", "agunet_2d", "--format", "onnx", "-o", str(tmp_path)]) == 2
    assert "a folder" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def _labels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(str(p)).dataobj) for p in sorted(folder.glob("*.nii.gz"))}


def test_segment_with_onnxruntime_gives_the_pytorch_labels(tmp_path, capsys):
    """The bundled demo twice, the network in PyTorch and in onnxruntime (exported on the fly); then one case
    with an ONNX file from `export`, and a file of the wrong network refused."""
    a, b = tmp_path / "A", tmp_path / "B"
    assert main(["segment", "-o", str(a), "--no-progress"]) == 0
    assert main(["segment", "-o", str(b), "--no-progress", "--engine", "onnx"]) == 0
    torch_labels, onnx_labels = _labels(a), _labels(b)
    assert len(torch_labels) == 3 and torch_labels.keys() == onnx_labels.keys()
    for name in torch_labels:
        np.testing.assert_array_equal(onnx_labels[name], torch_labels[name], err_msg=name)
    summary = json.loads((b / "summary.json").read_text())
    assert summary["engine"] == "onnx" and summary["mean_dice"] == json.loads((a / "summary.json").read_text())["mean_dice"]

    onnx_file = tmp_path / "hippocampus.onnx"
    assert main(["export", "hippocampus_agunet", "--format", "onnx", "-o", str(onnx_file), "--sizes", "40x56x40"]) == 0
    case = sorted(SAMPLES.glob("*.nii.gz"))[0]
    c = tmp_path / "C"
    assert main(["segment", "-i", str(case), "-o", str(c), "--no-progress", "--engine", "onnx", "--onnx",
                 str(onnx_file)]) == 0
    np.testing.assert_array_equal(_labels(c)[case.name], torch_labels[case.name])

    wrong = tmp_path / "wrong.onnx"
    assert main(["export", "agunet_2d", "--format", "onnx", "-o", str(wrong), "--kwarg", "filters=[4, 8, 8]"]) == 0
    capsys.readouterr()
    assert main(["segment", "-i", str(case), "-o", str(tmp_path / "D"), "--no-progress", "--engine", "onnx", "--onnx",
                 str(wrong)]) == 2
    assert "does not take the model's" in capsys.readouterr().err
    assert main(["segment", "-i", str(case), "-o", str(tmp_path / "E"), "--onnx", str(onnx_file)]) == 2
    assert "--engine onnx" in capsys.readouterr().err
