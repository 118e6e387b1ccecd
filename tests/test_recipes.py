"""Every recipe in configs/ loads, passes the allow-list, and (with the shared data present) trains a few
steps and evaluates on the real data set."""
from pathlib import Path

import pytest

from visionattn.cli import main
from visionattn.tasks.config import load_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (REPO / "configs" / "classification").glob("*.yaml") if not p.name.startswith("_"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads(recipe):
    cfg = load_config(recipe)
    assert cfg["model"]["name"] and cfg["data"]["kind"] in ("image_folder", "npz") and cfg["train"]["epochs"] > 0


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_on_real_data(recipe, shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    rc = main(["train", str(recipe), f"output_dir={tmp_path}", "train.max_steps=2", "train.epochs=1",
               "train.batch_size=16"])
    assert rc == 0
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "metrics.csv").is_file()
    metrics = (tmp_path / "metrics.csv").read_text()
    assert ",val,acc," in metrics and ",train,loss," in metrics  # it trained and validated on the real data
