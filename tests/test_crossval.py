"""`visionattn crossval`: every case validated by exactly one fold, finished folds kept, unfinished ones resumed,
the report's figures equal to evaluating each fold's weights, and the Dice-versus-time plot."""
import json
import math
import shutil
from pathlib import Path

import pytest

from visionattn.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def small_msd(shared_data, tmp_path_factory) -> Path:
    src = shared_data / "msd_hippocampus"
    dest = tmp_path_factory.mktemp("msd")
    for sub in ("imagesTr", "labelsTr"):
        (dest / sub).mkdir()
    for f in sorted((src / "imagesTr").iterdir())[:6]:
        shutil.copy(f, dest / "imagesTr" / f.name)
        shutil.copy(src / "labelsTr" / f.name, dest / "labelsTr" / f.name)
    return dest


def tiny(data_root: Path) -> list[str]:
    return [f"data.root={data_root}", "model.kwargs.filters=[4,8,16]", "train.max_steps=2", "train.max_minutes=null",
            "train.schedule_by_time=false", "train.batch_size=2", "train.eval_every=1", "train.threads=1"]


def test_three_folds_train_resume_report_and_plot(small_msd, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    recipe = "configs/segmentation/hippocampus_agunet_cv.yaml"
    out = tmp_path / "cv"
    overrides = tiny(small_msd)
    # fold 1 only (--only): its own report, never crossval.json; then the full report refuses (folds 0 and 2
    # missing) and names the way on
    from visionattn.tasks.crossval import train_folds

    assert main(["crossval", recipe, *overrides, "--folds", "3", "-o", str(out), "--only", "1"]) == 0
    partial = json.loads((out / "crossval_folds_1.json").read_text())
    assert sorted(partial["folds"]) == ["1"] and partial["num_folds"] == 3 and not (out / "crossval.json").exists()
    capsys.readouterr()
    assert main(["crossval", recipe, *overrides, "--folds", "3", "-o", str(out), "--report-only"]) == 1
    assert "fold(s) [0, 2] not finished" in capsys.readouterr().err
    # fold 2 left half-done: a checkpoint, no summary; the command resumes it and keeps fold 1 as it is
    train_folds(recipe, overrides, 3, out, only=[2])
    (out / "fold2" / "summary.json").unlink()
    fold1_weights = (out / "fold1" / "model.safetensors").read_bytes()
    assert main(["crossval", recipe, *overrides, "--folds", "3", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fold 1: finished earlier" in printed and "fold 2: resuming" in printed and "fold 0: training" in printed
    assert (out / "fold1" / "model.safetensors").read_bytes() == fold1_weights
    report = json.loads((out / "crossval.json").read_text())
    assert report["cases"] == 6 and sorted(report["folds"]) == ["0", "1", "2"]
    # each case validated exactly once across the folds
    from visionattn.tasks.config import load_config
    from visionattn.tasks.segmentation import find_msd_cases, fixed_case_split

    cfg = load_config(recipe, overrides)
    cases = find_msd_cases(cfg["data"]["root"])
    seen = [c["case"] for k in range(3) for c in fixed_case_split(cases, 0.2, 0, folds=3, fold=k)[1]]
    assert sorted(seen) == sorted(c["case"] for c in cases)
    # the report lists every case once with its fold and metrics; a fold's cases average to its figures
    assert sorted(r["case"] for r in report["per_case"]) == sorted(seen)
    for k in range(3):
        rows = [r for r in report["per_case"] if r["fold"] == k]
        assert len(rows) == report["folds"][str(k)]["cases"] and "per_case" not in report["folds"][str(k)]
        for name in ("dice_anterior", "dice_posterior"):
            values = [r[name] for r in rows if not math.isnan(r[name])]
            assert report["folds"][str(k)][name] == pytest.approx(sum(values) / len(values)), (k, name)
    # the report's fold figures are those of `visionattn evaluate` on the fold's weights
    for k in range(3):
        capsys.readouterr()
        assert main(["evaluate", str(out / f"fold{k}" / "model.safetensors")]) == 0
        metrics = json.loads(capsys.readouterr().out)
        for name in ("dice", "dice_anterior", "dice_posterior", "nsd", "nsd_anterior", "nsd_posterior"):
            assert report["folds"][str(k)][name] == pytest.approx(metrics[name], nan_ok=True), (k, name)
    means = [report["folds"][str(k)]["dice"] for k in range(3)]
    assert report["mean"]["dice"] == pytest.approx(sum(means) / 3)
    weighted = sum(report["folds"][str(k)]["dice"] * report["folds"][str(k)]["cases"] for k in range(3)) / 6
    assert report["case_weighted_mean"]["dice"] == pytest.approx(weighted)
    # --tta: its own report, each fold's figures those of `evaluate ... inference.tta=true`; crossval.json kept
    plain = (out / "crossval.json").read_bytes()
    assert main(["crossval", recipe, *overrides, "--folds", "3", "-o", str(out), "--report-only", "--tta"]) == 0
    tta_report = json.loads((out / "crossval_tta.json").read_text())
    assert tta_report["tta_mirror_axes"] == [0] and (out / "crossval.json").read_bytes() == plain
    capsys.readouterr()
    assert main(["evaluate", str(out / "fold1" / "model.safetensors"), "inference.tta=true"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert tta_report["folds"]["1"]["dice"] == pytest.approx(metrics["dice"], nan_ok=True)
    # Dice against training time, two crossval folders side by side
    other = tmp_path / "other"
    shutil.copytree(out, other)
    png = tmp_path / "plot.png"
    assert main(["crossval", "--plot", str(png), str(out), str(other)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["crossval", "--plot", str(png), str(tmp_path / "absent")]) == 2


def test_crossval_refuses_what_it_cannot_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["crossval", "configs/segmentation/hippocampus_agunet_cv.yaml", "--folds", "1", "-o",
                 str(tmp_path)]) == 2
    assert "--folds must be 2 or more" in capsys.readouterr().err
    assert main(["crossval", "configs/classification/cifar10_convit.yaml", "--folds", "2", "-o",
                 str(tmp_path / "c")]) == 2
    assert "segmentation" in capsys.readouterr().err
    # --tta on a recipe that never flips: nothing to mirror, said before anything is evaluated
    assert main(["crossval", "configs/segmentation/hippocampus_agunet_cv.yaml", "data.augment.flip_axes=[]",
                 "--folds", "3", "-o", str(tmp_path / "e"), "--report-only", "--tta"]) == 2
    assert "no axis to mirror" in capsys.readouterr().err
    for only in ("3", "x", ","):
        assert main(["crossval", "configs/segmentation/hippocampus_agunet_cv.yaml", "--folds", "3", "--only", only,
                     "-o", str(tmp_path / "d")]) == 2
        assert "--only" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_the_segresnet_baseline_recipe_trains_on_the_cv_split(small_msd, tmp_path, monkeypatch):
    """The stronger MONAI baseline of the comparison (SegResNet) runs under the same cross-validation recipe."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "segresnet"
    assert main(["train", "configs/segmentation/hippocampus_monai_segresnet_cv.yaml", f"data.root={small_msd}",
                 "data.fold=2", f"output_dir={out}", "train.max_steps=1", "train.max_minutes=null",
                 "train.schedule_by_time=false", "train.batch_size=2", "train.eval_every=1", "train.threads=1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1
    assert "SegResNet" in (out / "config.yaml").read_text()


def test_validation_with_test_time_mirroring_changes_a_trained_models_prediction(small_msd, capsys):
    """``inference.tta=true`` reaches the validation of a trained model (the bundled AGUNet, trained with
    left-right flips): Dice with mirroring differs from Dice without, and both are those of a trained model."""
    bundled = str(REPO / "visionattn" / "bundled" / "hippocampus_agunet")
    dice = {}
    for tta in ("false", "true"):
        capsys.readouterr()
        assert main(["evaluate", bundled, f"data.root={small_msd}", "data.val_fraction=0.5",
                     f"inference.tta={tta}", "train.threads=1"]) == 0
        dice[tta] = json.loads(capsys.readouterr().out)["dice"]
    assert dice["false"] > 0.75 and dice["true"] > 0.75, dice
    assert dice["true"] != dice["false"], dice


def test_report_table_keeps_long_metric_names_apart_and_in_their_columns():
    from visionattn.tasks.crossval import format_table, summarise

    names = ["dice", "dice_vessel", "dice_pooled", "dice_pooled_vessel", "nsd_pooled_posterior_hippocampus"]
    per_fold = {k: {"cases": 4, "steps": 1288 + k, "train_minutes": 20.0, **{n: 0.8 + 0.01 * k + 0.001 * i
                                                                             for i, n in enumerate(names)}}
                for k in range(3)}
    lines = format_table(summarise(per_fold)).splitlines()
    assert lines[0].split() == ["fold", "cases", "steps", "train", "min", *names]
    ends = [i + 1 for i, c in enumerate(lines[0]) if c != " " and (i + 1 == len(lines[0]) or lines[0][i + 1] == " ")]
    for line in lines[1:]:  # every figure ends where its column's name ends
        assert len(line) == len(lines[0])
        assert all(line[e - 1] != " " and (e == len(line) or line[e] == " ") for e in ends[-len(names):])
    assert lines[-1].split()[-1] == "0.8140+-0.010"
