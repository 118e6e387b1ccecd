"""Damaged and hostile checkpoints: a tiny run is trained once, then its ``last.pt`` (and ``previous.pt``,
``model.safetensors``) are bit-flipped, truncated, replaced by pickle payloads, stripped of their checksum
or filled with NaN. ``train --resume`` must fall back to ``previous.pt`` and continue exactly as the
uninterrupted run did, or stop with one line and leave the folder byte-identical; ``evaluate`` and
``visionattn.load_checkpoint`` must name the file and the problem in one line, never run the payload.

Hostile inputs tried: 7 damaged ``last.pt`` files on resume (:data:`LAST_PT_ATTACKS`), 2 pairs of damaged
``last.pt`` + ``previous.pt``, the same 7 given to ``evaluate``, 5 damaged ``.safetensors`` files
(:data:`SAFETENSORS_ATTACKS`) given to ``evaluate``, 3 files given to ``visionattn.load_checkpoint``,
and NaN weights reaching ``save_checkpoint``: 25 in all.
"""
import csv
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import visionattn
from visionattn.cli import main
from visionattn.tasks.config import load_config
from visionattn.checkpoints import CHECKSUM_KEY, CheckpointError, read_checkpoint, state_digest
from visionattn.tasks.trainer import Trainer

RECIPE = """
seed: 5
output_dir: {out}
model:
  name: ninformer_cifar
  kwargs: {{img_size: 16, patch_size: 4, embed_dim: 32, mlp_dim: 64, depth: 2, drop_rate: 0.1}}
data:
  kind: image_folder
  root: {data}
  val_per_class: 4
  img_size: 16
train:
  epochs: 2
  batch_size: 4
  lr: 0.003
  warmup_epochs: 0.5
  log_every: 1
  checkpoint_every: 3
  ema_decay: 0.9
  clip_grad: 1.0
"""
# 40 training images in batches of 4: 10 steps an epoch, checkpoints at steps 3, 6, 9, 10, 12, 15, 18, 20,
# so the finished run holds last.pt (step 20) and previous.pt (step 18)


class Payload:
    """Unpickling this object calls ``open(marker, "w")``, which creates the marker file: code in a pickle."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """A finished tiny run: (recipe, output folder). Tests work on copies of the folder."""
    from PIL import Image

    root = tmp_path_factory.mktemp("integrity")
    rng = np.random.default_rng(1)
    for name, base in (("dark", 70), ("bright", 180)):
        (root / "data" / name).mkdir(parents=True)
        for i in range(24):
            pixels = np.clip(rng.normal(base, 45, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "data" / name / f"{i:02d}.png")
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE.format(out=root / "ref", data=root / "data"))
    assert main(["train", str(recipe)]) == 0
    return recipe, root / "ref"


def copy_run(run, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run[1], out)
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def metric_rows(out: Path) -> list[tuple]:
    """The metrics a run logged, without its timings (split ``time``: they differ between any two runs)."""
    with (out / "metrics.csv").open() as f:
        return [(r["step"], r["split"], r["name"], r["value"]) for r in csv.DictReader(f) if r["split"] != "time"]


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# -- the attacks ------------------------------------------------------------------------------------


def flip_one_bit(path: Path) -> None:
    """Flip the lowest mantissa bit of one float of a model weight inside the zip archive. The member is
    rewritten with a correct CRC, so the file still loads: only the checksum can tell."""
    before = torch.load(path, map_location="cpu", weights_only=True)
    name = next(k for k, v in before["model"].items() if v.is_floating_point() and v.numel() >= 64)
    raw = before["model"][name].contiguous().numpy().tobytes()
    with zipfile.ZipFile(path) as z:
        members = [(info, z.read(info.filename)) for info in z.infolist()]
    tmp = path.with_suffix(".flipping")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
        flipped = False
        for info, data in members:
            at = data.find(raw)
            if not flipped and "/data/" in info.filename and at >= 0:
                data = bytearray(data)
                data[at + 4 * 10] ^= 1  # float 10 of the weight, little-endian: its lowest bit
                data, flipped = bytes(data), True
            z.writestr(info, data)
    assert flipped
    os.replace(tmp, path)

    after = torch.load(path, map_location="cpu", weights_only=True)  # a naive loader takes it
    changed = [k for k in before["model"] if not torch.equal(before["model"][k], after["model"][k])]
    assert changed == [name]
    assert int((before["model"][name] != after["model"][name]).sum()) == 1
    assert all(torch.isfinite(v).all() for v in after["model"].values() if v.is_floating_point())
    assert after[CHECKSUM_KEY] == before[CHECKSUM_KEY]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def pickle_in_zip(path: Path) -> None:
    """A real torch.save archive whose model entry runs code when unpickled."""
    torch.save({"model": Payload(path.parent.parent / "PWNED"), "step": 0}, path)


def raw_pickle(path: Path) -> None:
    """A bare pickle (not a zip archive) that runs code when unpickled."""
    path.write_bytes(pickle.dumps(Payload(path.parent.parent / "PWNED"), protocol=2))


def drop_checksum(path: Path) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    del state[CHECKSUM_KEY]
    torch.save(state, path)


def nan_weights(path: Path) -> None:
    """NaN in a weight, with a checksum recomputed to match: what a diverged run would have written."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    del state[CHECKSUM_KEY]
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][name].view(-1)[0] = float("nan")
    state[CHECKSUM_KEY] = {"sha256": state_digest(state)}
    torch.save(state, path)


def empty(path: Path) -> None:
    path.write_bytes(b"")


LAST_PT_ATTACKS = {  # attack: (how, what the error line must say)
    "bit_flip": (flip_one_bit, "checksum mismatch"),
    "truncated": (truncate, "unreadable"),
    "empty": (empty, "unreadable"),
    "pickle_in_zip": (pickle_in_zip, "refused"),
    "raw_pickle": (raw_pickle, "refused"),
    "no_checksum": (drop_checksum, "no checksum"),
    "nan_weights": (nan_weights, "non-finite"),
}


def test_payloads_are_real(tmp_path):
    """Without weights_only, both payloads do create their marker: the attacks below are not toothless."""
    for attack in (pickle_in_zip, raw_pickle):
        (tmp_path / "run").mkdir(exist_ok=True)
        path = tmp_path / "run" / "x.pt"
        attack(path)
        try:
            torch.load(path, weights_only=False)
        except RuntimeError:  # "invalid magic number": the bare pickle has already run by then
            pass
        assert (tmp_path / "PWNED").exists()
        (tmp_path / "PWNED").unlink()


def test_a_run_keeps_two_verified_checkpoints(run):
    out = run[1]
    last = read_checkpoint(out / "last.pt", require_checksum=True)
    previous = read_checkpoint(out / "previous.pt", require_checksum=True)
    assert (last["step"], previous["step"]) == (20, 18)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "visionattn.sha256" in f.metadata()


# -- train --resume ---------------------------------------------------------------------------------


@pytest.mark.parametrize("attack", LAST_PT_ATTACKS)
def test_resume_falls_back_to_previous_and_continues_exactly(run, tmp_path, capsys, attack):
    recipe, ref = run
    out = copy_run(run, tmp_path)
    how, problem = LAST_PT_ATTACKS[attack]
    how(out / "last.pt")
    capsys.readouterr()

    assert main(["train", str(recipe), "--resume", f"output_dir={out}"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert str(out / "last.pt") in lines[0] and problem in lines[0], err
    assert f"resuming from {out / 'previous.pt'} (step 18)" in lines[1], err
    assert not (tmp_path / "PWNED").exists()

    # steps 19 and 20 again: the same losses, learning rates, validation metrics and weights
    assert metric_rows(out) == metric_rows(ref)
    for name in ("model.safetensors", "best.safetensors"):
        a, b = load_file(str(out / name)), load_file(str(ref / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # the damaged last.pt was replaced and not kept: both checkpoints are good again
    assert read_checkpoint(out / "last.pt", require_checksum=True)["step"] == 20
    assert read_checkpoint(out / "previous.pt", require_checksum=True)["step"] == 18


@pytest.mark.parametrize("attacks", [("bit_flip", "truncated"), ("pickle_in_zip", "no_checksum")])
def test_resume_without_a_good_checkpoint_stops_and_changes_nothing(run, tmp_path, capsys, attacks):
    recipe, _ = run
    out = copy_run(run, tmp_path)
    for name, attack in zip(("last.pt", "previous.pt"), attacks):
        LAST_PT_ATTACKS[attack][0](out / name)
    before = snapshot(out)
    capsys.readouterr()

    assert main(["train", str(recipe), "--resume", f"output_dir={out}"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("visionattn train: error: --resume: no usable checkpoint")
    for name, attack in zip(("last.pt", "previous.pt"), attacks):
        assert str(out / name) in line and LAST_PT_ATTACKS[attack][1] in line, line
    assert snapshot(out) == before  # metrics.csv, config.yaml, last.pt, ... byte for byte
    assert not (tmp_path / "PWNED").exists()


def test_non_finite_weights_never_replace_a_checkpoint(run, tmp_path, capsys):
    recipe, _ = run
    out = copy_run(run, tmp_path)
    trainer = Trainer(load_config(str(recipe), [f"output_dir={out}"]), resume=True, config_path=str(recipe))
    before = snapshot(out)
    with torch.no_grad():
        next(trainer.model.parameters()).view(-1)[0] = float("inf")
    trainer.save_checkpoint()
    assert "non-finite values" in capsys.readouterr().err
    assert snapshot(out) == before


# -- evaluate and load_checkpoint -------------------------------------------------------------------


def corrupt_safetensors_bit(path: Path) -> None:
    """Flip one bit in the last tensor's bytes; the header (and its digest) is untouched."""
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(bytes(data))
    load_file(str(path))  # a naive loader takes it


SAFETENSORS_ATTACKS = {
    "bit_flip": (corrupt_safetensors_bit, "checksum mismatch"),
    "truncated": (truncate, "cannot read checkpoint"),
    "empty": (empty, "cannot read checkpoint"),
    "raw_pickle": (raw_pickle, "cannot read checkpoint"),
    "forged_digest": (lambda p: save_file(load_file(str(p)), str(p), metadata={"visionattn.sha256": "0" * 64}),
                      "checksum mismatch"),
}


@pytest.mark.parametrize("attack", LAST_PT_ATTACKS)
def test_evaluate_names_a_damaged_trainer_checkpoint(run, tmp_path, capsys, attack):
    recipe, _ = run
    out = copy_run(run, tmp_path)
    how, problem = LAST_PT_ATTACKS[attack]
    how(out / "last.pt")
    before = snapshot(out)
    capsys.readouterr()
    rc = main(["evaluate", str(recipe), "--checkpoint", str(out / "last.pt"), f"output_dir={out}"])
    err = capsys.readouterr().err
    if attack in ("no_checksum", "nan_weights"):
        # evaluating older checkpoints (no checksum) or a diverged run's weights is allowed
        assert rc == 0 and "Traceback" not in err
    else:
        assert rc != 0
        line = one_line(err)
        assert str(out / "last.pt") in line and problem in line, line
    assert snapshot(out) == before
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("attack", SAFETENSORS_ATTACKS)
def test_evaluate_names_damaged_safetensors(run, tmp_path, capsys, attack):
    recipe, _ = run
    out = copy_run(run, tmp_path)
    how, problem = SAFETENSORS_ATTACKS[attack]
    how(out / "model.safetensors")
    before = snapshot(out)
    capsys.readouterr()
    assert main(["evaluate", str(recipe), "--checkpoint", str(out / "model.safetensors"), f"output_dir={out}"]) != 0
    line = one_line(capsys.readouterr().err)
    assert str(out / "model.safetensors") in line and problem in line, line
    assert snapshot(out) == before
    assert not (tmp_path / "PWNED").exists()


def test_load_checkpoint_verifies_digests(run, tmp_path):
    out = copy_run(run, tmp_path)
    model = visionattn.create_model("ninformer_cifar", num_classes=2, img_size=16, patch_size=4, embed_dim=32,
                                    mlp_dim=64, depth=2)
    visionattn.load_checkpoint(model, str(out / "model.safetensors"))
    visionattn.load_checkpoint(model, str(out / "last.pt"))
    plain = tmp_path / "plain.safetensors"  # other tools' files carry no digest and still load
    save_file(load_file(str(out / "model.safetensors")), str(plain))
    visionattn.load_checkpoint(model, str(plain))

    for name, how, problem in (("model.safetensors", corrupt_safetensors_bit, "checksum mismatch"),
                               ("last.pt", flip_one_bit, "checksum mismatch"),
                               ("previous.pt", pickle_in_zip, "refused")):
        how(out / name)
        with pytest.raises(CheckpointError, match="checksum mismatch|refused") as e:
            visionattn.load_checkpoint(model, str(out / name))
        message = str(e.value)
        assert "\n" not in message and str(out / name) in message and problem in message
    assert not (tmp_path / "PWNED").exists()
