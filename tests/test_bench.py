"""The benchmark commands run and print their comparison tables (no timing assertions: targets are
checked by reading the benchmark, not by unit tests)."""
import json

from visionattn.cli import main


def test_bench_models_compare_timm(capsys, tmp_path):
    out_json = tmp_path / "b.json"
    rc = main(["bench", "models", "convit_tiny", "--compare", "timm", "--img-size", "64", "--batch-size", "2",
               "--min-time", "0.2", "--json", str(out_json)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "speedup" in table and "timm_img_s" in table and "convit_tiny" in table
    (row,) = json.loads(out_json.read_text())
    assert row["ours_img_s"] > 0 and row["timm_img_s"] > 0
    assert row["max_abs_diff"] <= 1e-5  # same weights, same outputs


def test_bench_models_needs_a_name(capsys):
    assert main(["bench", "models"]) == 2
    assert "name at least one model" in capsys.readouterr().err
