"""`visionattn curves`: validation metric against training time from run folders the trainer wrote, and run
folders that are not what they claim (bad rows, an oversized file, a config that tries to run code)."""
import csv
import json
import shutil
from pathlib import Path

import pytest

from visionattn.cli import main

RECIPE = """
seed: 1
output_dir: {out}
model:
  name: ninformer_cifar
  kwargs: {{img_size: 16, patch_size: 4, embed_dim: 16, mlp_dim: 32, depth: 1}}
data:
  kind: image_folder
  root: {data}
  val_per_class: 4
  img_size: 16
train:
  epochs: 3
  batch_size: 8
  lr: 0.003
  log_every: 1
"""


@pytest.fixture(scope="module")
def trained_run(make_image_folder, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("curves")
    out = root / "run_a"
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE.format(out=out, data=make_image_folder(12)))
    assert main(["train", str(recipe), "train.threads=1"]) == 0
    return out


def test_curves_of_trained_runs(trained_run, tmp_path, capsys):
    capsys.readouterr()
    other = tmp_path / "run_b"
    shutil.copytree(trained_run, other)
    png = tmp_path / "plots" / "acc.png"
    assert main(["curves", str(trained_run), str(other), "-o", str(png)]) == 0
    out = capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the default metric is the task's (classification: acc); one validation per epoch, in time order
    rows = list(csv.DictReader((trained_run / "metrics.csv").open()))
    val = [(int(r["step"]), float(r["value"])) for r in rows if r["split"] == "val" and r["name"] == "acc"]
    times = {int(r["step"]): float(r["value"]) for r in rows if r["split"] == "time"}
    assert len(val) == 3 and all(step in times for step, _ in val)
    line = next(x for x in out.splitlines() if x.startswith(f"| {trained_run} |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == f"{times[val[-1][0]] / 60:.1f}" and cells[2] == str(val[-1][0])
    assert cells[3] == f"{val[-1][1]:.4f}" and cells[4].startswith(f"{max(v for _, v in val):.4f} (")
    assert "| last acc |" in out and f"wrote {png}" in out
    # a metric that no run logged is an error, not an empty plot
    assert main(["curves", str(trained_run), "-o", str(png), "--metric", "map_50"]) == 2
    assert "no run in run_a has validation 'map_50'" in capsys.readouterr().err


def test_curves_refuse_what_is_not_a_run(trained_run, tmp_path, capsys):
    png = tmp_path / "c.png"
    bad = tmp_path / "bad_row"
    shutil.copytree(trained_run, bad)
    with (bad / "metrics.csv").open("a") as f:
        f.write("12,1,val,acc,__import__('os')\n")
    capsys.readouterr()
    assert main(["curves", str(bad), "-o", str(png)]) == 2
    err = capsys.readouterr().err
    assert "metrics.csv, line" in err and "are not numbers" in err
    # a metrics file far larger than any the trainer writes is refused before it is read
    huge = tmp_path / "huge"
    shutil.copytree(trained_run, huge)
    with (huge / "metrics.csv").open("r+b") as f:
        f.truncate(65 * 2**20)
    assert main(["curves", str(huge), "-o", str(png)]) == 2
    assert "more than 64 MiB" in capsys.readouterr().err
    # the default metric comes from config.yaml, read as untrusted YAML: a python tag runs nothing
    hostile = tmp_path / "hostile"
    shutil.copytree(trained_run, hostile)
    marker = tmp_path / "pwned"
    (hostile / "config.yaml").write_text(f"task: !!python/object/apply:os.system ['touch {marker}']\n")
    assert main(["curves", str(hostile), "-o", str(png)]) == 2
    err = capsys.readouterr().err
    assert "--metric" in err and not marker.exists()
    assert main(["curves", str(hostile), "-o", str(png), "--metric", "acc"]) == 0  # the curve itself is fine
    capsys.readouterr()
    # neither a run nor a crossval folder; a missing folder
    (tmp_path / "empty").mkdir()
    assert main(["curves", str(tmp_path / "empty"), "-o", str(png)]) == 2
    assert "neither a run folder" in capsys.readouterr().err
    assert main(["curves", str(tmp_path / "absent"), "-o", str(png)]) == 2
    assert "no such folder" in capsys.readouterr().err
    json.loads((trained_run / "summary.json").read_text())  # the source run is left as it was
