"""The trainer on a small synthetic image folder: a run killed mid-epoch and resumed equals an uninterrupted
one, two gloo processes equal one process with the same global batch, bad data is named, and the
evaluate/predict commands work on the result."""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from visionattn.cli import main

RECIPE = """
seed: 3
output_dir: {out}
model:
  name: ninformer_cifar
  kwargs: {{img_size: 16, patch_size: 4, embed_dim: 32, mlp_dim: 64, depth: 2, drop_rate: {drop}}}
data:
  kind: image_folder
  root: {data}
  val_per_class: 4
  img_size: 16
train:
  epochs: {epochs}
  batch_size: 4
  lr: 0.003
  warmup_epochs: 0.5
  log_every: 1
  checkpoint_every: 3
  ema_decay: 0.9
  clip_grad: 1.0
"""


@pytest.fixture(scope="module")
def image_folder(make_image_folder) -> Path:
    return make_image_folder(24)


def write_recipe(path: Path, data: Path, out: Path, epochs=4, drop=0.1) -> Path:
    path.write_text(RECIPE.format(out=out, data=data, epochs=epochs, drop=drop))
    return path


def run(args, **kw):
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "visionattn", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def rows(out: Path):
    """The metrics a run logged, without its timings (split ``time``: they differ between any two runs)."""
    return [(r["step"], r["split"], r["name"], r["value"]) for r in csv.DictReader((out / "metrics.csv").open())
            if r["split"] != "time"]


@pytest.fixture(scope="module")
def reference_run(image_folder, tmp_path_factory) -> Path:
    """The output folder of the 8-epoch recipe run without interruption (what resumed runs must equal)."""
    tmp = tmp_path_factory.mktemp("reference")
    p = run(["train", str(write_recipe(tmp / "ref.yaml", image_folder, tmp / "ref", epochs=8))])
    assert p.wait(timeout=300) == 0, p.stdout.read()
    return tmp / "ref"


def assert_same_run(a: Path, b: Path) -> None:
    assert rows(a) == rows(b)  # every logged loss, lr and val metric
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_killed_run_resumes_exactly(image_folder, reference_run, tmp_path):
    cfg = write_recipe(tmp_path / "cut.yaml", image_folder, tmp_path / "cut", epochs=8)
    p = run(["train", str(cfg)])
    marker = tmp_path / "cut" / "last.json"
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if marker.is_file() and '"step": 1' in marker.read_text() and '"batch_in_epoch": 0' not in marker.read_text():
            break  # a mid-epoch checkpoint at step >= 12 exists
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "cut" / "summary.json").exists(), "the run finished before it could be killed"
    p = run(["train", str(cfg), "--resume"])
    assert p.wait(timeout=300) == 0, p.stdout.read()
    assert_same_run(tmp_path / "cut", reference_run)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_signal_checkpoints_the_step_it_stopped_at(image_folder, reference_run, tmp_path, sig):
    """Ctrl-C or SIGTERM: the run finishes its step, checkpoints that step (the mid-epoch periodic
    checkpoints are off here: only the stop writes one inside an epoch), exits with 130 saying how to
    continue, and leaves no final weights or summary; --resume then equals the run never stopped."""
    cfg = write_recipe(tmp_path / "cut.yaml", image_folder, tmp_path / "cut", epochs=8)
    command = ["train", str(cfg), "train.checkpoint_every=0"]
    p = run(command)
    metrics = tmp_path / "cut" / "metrics.csv"
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if metrics.is_file() and any(r["split"] == "train" and int(r["step"]) >= 3
                                     for r in csv.DictReader(metrics.open())):
            break
        time.sleep(0.01)
    p.send_signal(sig)
    output = p.communicate(timeout=240)[0]
    assert p.returncode == 130, output
    stopped = re.search(r"visionattn train: stopped on (SIG\w+) at step (\d+) \(epoch \d+\); (\S+) holds that point: "
                        r"run the same command with --resume to continue", output)
    assert stopped, output
    assert stopped[1] == sig.name and Path(stopped[3]) == tmp_path / "cut" / "last.pt"
    assert json.loads((tmp_path / "cut" / "last.json").read_text())["step"] == int(stopped[2]) >= 3
    assert not (tmp_path / "cut" / "summary.json").exists() and not (tmp_path / "cut" / "model.safetensors").exists()
    assert "Traceback" not in output
    p = run([*command, "--resume"])
    assert p.wait(timeout=300) == 0, p.stdout.read()
    assert_same_run(tmp_path / "cut", reference_run)


@pytest.mark.parametrize("workers,accumulate", [(2, 1), (1, 5)])
def test_loader_workers_read_the_same_samples_and_leave_the_stop_to_the_trainer(image_folder, reference_run, tmp_path,
                                                                                workers, accumulate):
    """``train.num_workers``: worker processes read the samples ahead of the steps. Ctrl-C at a terminal
    reaches the whole process group, workers included: the trainer still finishes its step (with 5 micro-batches
    a step and one worker, most of them are read after the signal), checkpoints and exits 130 without a
    traceback. Resumed (with workers again), the run with a step per batch equals, number for number and weight
    for weight, the reference run that read every sample in the training process."""
    cfg = write_recipe(tmp_path / "w.yaml", image_folder, tmp_path / "w", epochs=8)
    command = ["train", str(cfg), f"train.num_workers={workers}", f"train.accumulate={accumulate}",
               "train.checkpoint_every=0", "train.log_every=1"]
    p = run(command, start_new_session=True)  # its own process group, as a shell gives a foreground job
    metrics = tmp_path / "w" / "metrics.csv"
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if metrics.is_file() and any(r["split"] == "train" and int(r["step"]) >= 3 for r in csv.DictReader(metrics.open())):
            break
        time.sleep(0.01)
    time.sleep(0.05 * accumulate)  # into the next step's micro-batches
    os.killpg(p.pid, signal.SIGINT)
    output = p.communicate(timeout=240)[0]
    assert p.returncode == 130 and "Traceback" not in output, output
    # one notice: the workers (forked with the trainer's handler in place) leave the signal to it
    assert output.count("SIGINT: stopping after this step") == 1 and "stopped on SIGINT" in output, output
    p = run([*command, "--resume"])
    assert p.wait(timeout=300) == 0, p.stdout.read()
    if accumulate == 1:
        assert_same_run(tmp_path / "w", reference_run)


def test_two_processes_match_one_with_the_same_global_batch(image_folder, tmp_path):
    one = write_recipe(tmp_path / "one.yaml", image_folder, tmp_path / "one", epochs=2, drop=0.0)
    two = write_recipe(tmp_path / "two.yaml", image_folder, tmp_path / "two", epochs=2, drop=0.0)
    p = run(["train", str(one)])
    assert p.wait(timeout=300) == 0, p.stdout.read()
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "visionattn", "train", str(two)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [x[:3] for x in a] == [x[:3] for x in b]
    for x, y in zip(a, b):  # same curve up to the order of floating-point sums across processes
        assert abs(float(x[3]) - float(y[3])) <= 1e-4 * max(1.0, abs(float(x[3]))), (x, y)
    wa, wb = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


def test_outputs_evaluate_and_predict(image_folder, tmp_path, capsys):
    cfg = write_recipe(tmp_path / "r.yaml", image_folder, tmp_path / "r", epochs=3)
    assert main(["train", str(cfg), "train.amp=bf16"]) == 0
    out = tmp_path / "r"
    for name in ("last.pt", "best.safetensors", "model.safetensors", "metrics.csv", "curves.png", "config.yaml", "summary.json"):
        assert (out / name).is_file(), name
    capsys.readouterr()
    assert main(["evaluate", str(cfg), "--checkpoint", str(out / "best.safetensors")]) == 0
    assert '"acc"' in capsys.readouterr().out
    assert main(["evaluate", str(cfg), "--checkpoint", str(out / "last.pt")]) == 0

    (image_folder.parent / "broken.png").write_bytes(b"not an image")
    images = tmp_path / "pred_in"
    images.mkdir()
    for f in sorted((image_folder / "dark").iterdir())[:3]:
        (images / f.name).write_bytes(f.read_bytes())
    (images / "zz_broken.png").write_bytes(b"\x89PNG truncated")
    csv_out = tmp_path / "pred.csv"
    rc = main(["predict", str(cfg), "--checkpoint", str(out / "model.safetensors"), "-i", str(images), "-o", str(csv_out)])
    assert rc == 1  # one file failed, the others were written
    err = capsys.readouterr().err
    assert "zz_broken.png" in err
    lines = csv_out.read_text().splitlines()
    assert lines[0].startswith("path,class_index") and len(lines) == 4
    assert main(["predict", str(cfg), "--checkpoint", str(out / "model.safetensors"), "-i", str(images), "-o", str(csv_out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_bad_data_is_named(tmp_path, capsys, image_folder):
    cfg = write_recipe(tmp_path / "a.yaml", tmp_path / "missing", tmp_path / "a")
    assert main(["train", str(cfg)]) == 2
    assert "data set folder not found" in capsys.readouterr().err
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    cfg = write_recipe(tmp_path / "b.yaml", empty, tmp_path / "b")
    assert main(["train", str(cfg)]) == 2
    assert "holds no images" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt"
    for c in ("a", "b"):
        (corrupt / c).mkdir(parents=True)
        for i in range(6):
            (corrupt / c / f"{i}.png").write_bytes((image_folder / "dark" / f"{i:02d}.png").read_bytes())
    (corrupt / "a" / "3.png").write_bytes(b"garbage")
    cfg = write_recipe(tmp_path / "c.yaml", corrupt, tmp_path / "c")
    assert main(["train", str(cfg)]) == 2
    assert "3.png" in capsys.readouterr().err
    assert main(["train", str(cfg), "train.bogus=1"]) == 2
    assert "unknown train option(s) 'bogus'" in capsys.readouterr().err
    # named when the recipe is read, with the nearest option, before any folder is made
    assert main(["train", str(cfg), "train.max_minutez=20", "output_dir=" + str(tmp_path / "typo")]) == 2
    assert "unknown train option(s) 'max_minutez' (did you mean 'max_minutes'?)" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()
    assert main(["train", str(cfg), "train.num_workers=-1"]) == 2
    assert "train.num_workers must be a whole number from 0" in capsys.readouterr().err
    good = write_recipe(tmp_path / "d.yaml", image_folder, tmp_path / "d")
    assert main(["train", str(good), "--resume", "output_dir=" + str(tmp_path / "nothing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_cpu_budget_clock_counts_work_not_waiting(image_folder, tmp_path, monkeypatch, capsys):
    """``train.budget_clock=cpu``: the budget is this process's CPU time, so time spent waiting for a core (here,
    sleeping inside every step) does not use it up, while the wall clock does."""
    import json

    from visionattn.tasks import trainer as trainer_mod

    real_step = trainer_mod.Trainer._optimizer_step

    def slow_step(self, accum):
        time.sleep(0.2)  # waiting, as a process does on a loaded machine
        return real_step(self, accum)

    monkeypatch.setattr(trainer_mod.Trainer, "_optimizer_step", slow_step)
    steps = {}
    for clock in ("wall", "cpu"):
        cfg = write_recipe(tmp_path / f"{clock}.yaml", image_folder, tmp_path / clock, epochs=3)
        # 1.2 s of budget: at most 7 sleeping steps on the wall clock; on the CPU clock the sleeps are free (with
        # 0.3 s and 0.05 s sleeps, the two clocks once gave the same count while a training loaded the machine)
        assert main(["train", str(cfg), f"train.budget_clock={clock}", "train.max_minutes=0.02"]) == 0
        summary = json.loads((tmp_path / clock / "summary.json").read_text())
        steps[clock] = summary["steps"]
        # a budget buys steps in proportion to the machine's speed: the summary says which machine it was
        assert summary["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    capsys.readouterr()
    assert steps["wall"] < steps["cpu"], steps
    cfg = write_recipe(tmp_path / "bad.yaml", image_folder, tmp_path / "bad")
    assert main(["train", str(cfg), "train.budget_clock=gpu"]) == 2
    assert "budget_clock must be 'wall' or 'cpu'" in capsys.readouterr().err


def test_eta_of_a_time_budget_is_on_the_wall_clock(image_folder, tmp_path, monkeypatch, capsys):
    """With ``budget_clock=cpu`` a step that waits (here: sleeps) uses the wall clock but not the budget, so what is
    left of the budget is not the time left: the progress line's ETA converts it at the run's rate so far. Before,
    it printed the budget left (about 0 s here) while the run went on for seconds."""
    from visionattn.tasks import trainer as trainer_mod

    real_step = trainer_mod.Trainer._optimizer_step

    def waiting_step(self, accum):
        time.sleep(0.25)
        return real_step(self, accum)

    monkeypatch.setattr(trainer_mod.Trainer, "_optimizer_step", waiting_step)
    cfg = write_recipe(tmp_path / "r.yaml", image_folder, tmp_path / "r", epochs=1000)
    assert main(["train", str(cfg), "train.budget_clock=cpu", "train.max_minutes=0.01",
                 "train.checkpoint_every=0", "train.eval_every=1000"]) == 0

    def seconds(hms: str) -> int:
        h, m, s = (int(p) for p in hms.split(":"))
        return 3600 * h + 60 * m + s

    lines = [(seconds(m[1]), seconds(m[2]))
             for m in re.finditer(r"elapsed (\d+:\d\d:\d\d) eta (\d+:\d\d:\d\d)", capsys.readouterr().out)]
    end = lines[-1][0]
    judged = [(eta, end - elapsed) for elapsed, eta in lines if end - elapsed >= 4]
    assert judged, lines  # the run lasted long enough to judge its ETAs
    for eta, actual in judged:
        assert 0.4 * actual <= eta <= 2.5 * actual + 2, (eta, actual, lines)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_autocast_falls_back_to_float32_on_cpus_that_emulate_it(image_folder, tmp_path, monkeypatch, capsys,
                                                                    native):
    """``train.amp=bf16`` on a CPU without hardware bfloat16 (AVX2 machines emulate it, 14x slower measured on a
    3-D U-Net step) trains in float32 and says so; on one with it, the forward runs under bf16 autocast."""
    from visionattn.tasks import trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "cpu_runs_bf16_natively", lambda: native)
    seen = []
    real_step = trainer_mod.Trainer._optimizer_step

    def spy(self, accum):
        seen.append((self.amp, torch.is_autocast_enabled("cpu")))
        with self.autocast():
            seen.append(("inside", torch.is_autocast_enabled("cpu")))
        return real_step(self, accum)

    monkeypatch.setattr(trainer_mod.Trainer, "_optimizer_step", spy)
    cfg = write_recipe(tmp_path / "r.yaml", image_folder, tmp_path / "out", epochs=1)
    assert main(["train", str(cfg), "train.amp=bf16"]) == 0
    err = capsys.readouterr().err
    assert seen[0][0] == ("bf16" if native else "none")
    assert seen[1] == ("inside", native)
    assert ("no native bfloat16" in err) is not native


def test_output_dir_blocked_by_a_file_or_a_dangling_link_is_named(image_folder, tmp_path, capsys):
    """``mkdir`` alone says "File exists" about a link to a missing folder; the error names what is in the way."""
    link = tmp_path / "runs"
    link.symlink_to(tmp_path / "moved_away", target_is_directory=True)
    recipe = write_recipe(tmp_path / "r.yaml", image_folder, link / "exp1", epochs=1)
    capsys.readouterr()
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"{link} is a symbolic link to {tmp_path / 'moved_away'}, which does not exist" in err, err
    (tmp_path / "blocker").write_text("not a folder")
    recipe = write_recipe(tmp_path / "r.yaml", image_folder, tmp_path / "blocker" / "exp1", epochs=1)
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "blocker is a file, not a folder" in err, err
    assert (tmp_path / "blocker").read_text() == "not a folder"


def test_a_stopped_crossval_says_to_run_it_again(monkeypatch, capsys):
    """crossval resumes by running again (no --resume flag): its stop message says that."""
    from visionattn.errors import TrainingInterrupted
    from visionattn.tasks import crossval

    def stopped(*args, **kwargs):
        raise TrainingInterrupted("stopped on SIGINT at step 5 (epoch 1); cv/fold0/last.pt holds that point",
                                  "cv/fold0/last.pt")

    monkeypatch.setattr(crossval, "run_crossval", stopped)
    assert main(["crossval", "recipe.yaml", "--folds", "5", "-o", "cv"]) == 130
    assert capsys.readouterr().err == (
        "visionattn crossval: stopped on SIGINT at step 5 (epoch 1); cv/fold0/last.pt holds that point: run the "
        "same command again (finished folds are kept; this fold resumes) to continue\n")


def test_a_stop_signal_to_torchrun_stops_every_process_at_one_step(image_folder, tmp_path):
    """Ctrl-C to torchrun (two gloo processes; torchrun passes the signal on to both): they agree on one
    step, checkpoint it and exit with 130, each saying so with its rank; a two-process --resume then equals a
    two-process run never stopped."""
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "visionattn", "train"]
    ref = write_recipe(tmp_path / "ref.yaml", image_folder, tmp_path / "ref", epochs=8)
    r = subprocess.run([*torchrun, str(ref)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    cfg = write_recipe(tmp_path / "cut.yaml", image_folder, tmp_path / "cut", epochs=8)
    command = [*torchrun, str(cfg), "train.checkpoint_every=0"]
    p = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "cut" / "metrics.csv"
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if metrics.is_file() and any(r["split"] == "train" and int(r["step"]) >= 3
                                     for r in csv.DictReader(metrics.open())):
            break
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    output = p.communicate(timeout=240)[0]
    assert p.returncode != 0, output  # (torchrun's own exit code and report of its signal)
    stopped = dict(re.findall(r"visionattn train \[rank (\d)/2\]: stopped on SIGINT at step (\d+) \(epoch \d+\); "
                              r"\S+ holds that point: run the same command with --resume to continue", output))
    assert stopped.keys() == {"0", "1"} and stopped["0"] == stopped["1"], output  # both processes, one step
    assert json.loads((tmp_path / "cut" / "last.json").read_text())["step"] == int(stopped["0"]) >= 3
    assert not (tmp_path / "cut" / "summary.json").exists() and not (tmp_path / "cut" / "model.safetensors").exists()
    r = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert_same_run(tmp_path / "cut", tmp_path / "ref")


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("recipe,overrides", [
    ("configs/segmentation/hippocampus_agunet_cv.yaml", ["data.max_train_cases=12"]),  # MONAI's 3-D augmentation
    ("configs/segmentation/drive_emcad.yaml", []),  # 2-D crops, zoom
    ("configs/detection/neu_det_dfir_detr.yaml", []),  # albumentations with boxes
], ids=["hippocampus", "drive", "neu-det"])
def test_loader_workers_read_each_task_s_augmented_samples_unchanged(shared_data, tmp_path, recipe, overrides):
    """The real recipes' augmentation pipelines (MONAI's, albumentations', with their own generators) give the
    same samples, bit for bit, read by two worker processes as read in the training process."""
    from visionattn.tasks.config import load_config
    from visionattn.tasks.trainer import Trainer

    trainer = Trainer(load_config(recipe, [*overrides, f"output_dir={tmp_path / 'run'}", "train.threads=1"]))
    trainer.train_set.set_epoch(3)
    batches = trainer.batches.batches(3)[:2]
    here = list(trainer._samples_of(batches))
    trainer.opts["num_workers"] = 2
    by_workers = list(trainer._samples_of(batches))
    assert len(here) == 2 and _same(here, by_workers)
