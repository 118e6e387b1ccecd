"""Progress as users see it off a terminal (a SLURM or nohup log): the trainer's flushed progress lines on
stdout and in OUTPUT_DIR/train.log, benchmark rows printed as they are measured, and an evaluate run that
prints no scheduler warning."""
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

import visionattn.tasks.bench as bench
import visionattn.tasks.trainer as trainer
from visionattn.cli import main

RECIPE = """
seed: 0
output_dir: {out}
model:
  name: ninformer_cifar
  kwargs: {{img_size: 16, patch_size: 4, embed_dim: 16, mlp_dim: 32, depth: 1}}
data:
  kind: image_folder
  root: {data}
  val_per_class: 2
  img_size: 16
train:
  epochs: {epochs}
  batch_size: 4
  warmup_epochs: 0.5
  log_every: {log_every}
"""
PROGRESS = re.compile(r"^step +(\d+)/(\d+) epoch (\d+)/(\d+) loss (\d+\.\d+) lr (\S+) (\d+\.\d) img/s "
                      r"elapsed (\d+:\d\d:\d\d) eta (\d+:\d\d:\d\d)$")


@pytest.fixture(scope="module")
def images(make_image_folder) -> Path:
    return make_image_folder(10)  # 16 training images: 4 steps an epoch


def recipe(tmp_path: Path, images: Path, epochs: int = 2, log_every: int = 3) -> Path:
    path = tmp_path / f"recipe_{epochs}_{log_every}.yaml"
    path.write_text(RECIPE.format(out=tmp_path / "run", data=images, epochs=epochs, log_every=log_every))
    return path


def progress_lines(text: str) -> list[re.Match]:
    return [m for m in map(PROGRESS.match, text.splitlines()) if m]


def test_progress_lines_every_log_every_steps_to_stdout_and_train_log(images, tmp_path, capsys):
    assert main(["train", str(recipe(tmp_path, images, epochs=2, log_every=3))]) == 0
    out = capsys.readouterr().out
    lines = progress_lines(out)
    assert [int(m[1]) for m in lines] == [1, 3, 6, 8]  # the first step, every 3rd, and the last
    assert all(m[2] == "8" and m[4] == "2" and float(m[7]) > 0 for m in lines)
    assert [m[3] for m in lines] == ["1", "1", "2", "2"]
    assert lines[-1][9] == "0:00:00"  # nothing left
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.startswith("training 8 steps (2 epochs of 4)")
    assert [m[0] for m in progress_lines(log)] == [m[0] for m in lines]
    assert re.search(r"^epoch 2 step 8: \w+ \d", log, re.M)  # the validation lines go there too
    assert log in out  # stdout carries the same lines (then the summary)

    # a new run does not write over that one, train.log included (trainer.RUN_FILES)
    for p in (tmp_path / "run").iterdir():
        if p.name != "train.log":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    assert main(["train", str(recipe(tmp_path, images))]) == 2
    assert "train.log" in capsys.readouterr().err and (tmp_path / "run" / "train.log").read_text() == log


def test_a_line_at_least_every_log_seconds_and_resume_appends(images, tmp_path, capsys, monkeypatch, caplog):
    monkeypatch.setattr(trainer, "LOG_SECONDS", 0.0)  # the once-a-minute line, without waiting a minute
    cfg = recipe(tmp_path, images, epochs=1, log_every=1000)
    assert main(["train", str(cfg)]) == 0
    assert [int(m[1]) for m in progress_lines(capsys.readouterr().out)] == [1, 2, 3, 4]
    first = (tmp_path / "run" / "train.log").read_text()
    monkeypatch.setattr(trainer, "LOG_SECONDS", 60.0)
    assert main(["train", str(cfg), "--resume", "train.epochs=2"]) == 0
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.startswith(first) and "resuming from" in log[len(first):] and "at step 4 (epoch 2)" in log
    # log_every 1000: the resumed run's first step (it shows it trains at once) and the last step
    assert [int(m[1]) for m in progress_lines(log[len(first):])] == [5, 8]

    # evaluate reads the run and prints its metrics: no scheduler (or other) warning, train.log untouched
    capsys.readouterr()
    caplog.set_level(logging.WARNING)  # timm's schedulers warn through logging
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["evaluate", str(tmp_path / "run")]) == 0
    captured = capsys.readouterr()
    assert '"acc"' in captured.out and captured.err == ""
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert [str(w.message) for w in caught] == []
    assert (tmp_path / "run" / "train.log").read_text() == log


def test_progress_reaches_a_pipe_while_the_run_is_going(images, tmp_path):
    """The bug: off a terminal, a SLURM or nohup log stayed empty for whole epochs. Here stdout is a file;
    progress lines must be in it (and in train.log) while the run is still training."""
    cfg = recipe(tmp_path, images, epochs=1000, log_every=2)
    stdout = tmp_path / "stdout.txt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TQDM_DISABLE", None)  # the real setting: tqdm finds no terminal and stays quiet
    with stdout.open("w") as f:
        p = subprocess.Popen([sys.executable, "-m", "visionattn", "train", str(cfg)], stdout=f, stderr=subprocess.PIPE,
                             env=env)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and p.poll() is None and len(progress_lines(stdout.read_text())) < 3:
            time.sleep(0.2)
        assert p.poll() is None, p.stderr.read().decode()[-3000:]
        lines = progress_lines(stdout.read_text())
        assert len(lines) >= 3 and lines[0][2] == "4000", stdout.read_text()
        assert len(progress_lines((tmp_path / "run" / "train.log").read_text())) >= 3
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stderr.close()


@pytest.mark.slow  # a benchmark: first calls, warm-up and timed rounds
def test_bench_kernels_reports_each_row_as_it_is_measured(monkeypatch, capsys):
    """A problem's implementations are timed together (interleaved rounds); their rows are reported as soon
    as that problem is done, before the next one is timed."""
    measured = []  # problems timed so far
    round_robin_times = bench.round_robin_times

    def counting(*args, **kwargs):
        result = round_robin_times(*args, **kwargs)
        measured.append(1)
        return result

    monkeypatch.setattr(bench, "round_robin_times", counting)
    reported = []
    text, rows = bench.bench_kernels(problems=["2d-16-k5", "topk-64"], skip=("flex",), min_time=0.01,
                                     report=lambda line: reported.append((len(measured), line)))
    assert reported[0] == (0, text.splitlines()[0]) and reported[0][1].startswith("device cpu")
    by_problem = {}
    for n, line in reported[1:]:
        by_problem.setdefault(line.split()[0], set()).add(n)
    assert by_problem == {"2d-16-k5": {1}, "topk-64": {2}}, reported
    impl_lines = [line for _, line in reported[1:]]
    assert [line.split()[1].rstrip(":") for line in impl_lines] == [r["impl"] for r in rows]
    assert "fwd+bwd" in impl_lines[1] and "x)" in impl_lines[1]

    assert main(["bench", "kernels", "--problems", "2d-16-k5", "--skip", "flex,dense", "--min-time", "0.01"]) == 0
    out = capsys.readouterr().out
    assert out.index("2d-16-k5 naive-gather: fwd") < out.index("impl ")  # the rows, then the final table


@pytest.mark.slow  # a benchmark: first calls, warm-up and timed rounds
def test_bench_models_prints_each_row_before_the_table(capsys):
    assert main(["bench", "models", "activator_glu_cifar", "ninformer_cifar", "--batch-size", "1",
                 "--min-time", "0.05"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("activator_glu_cifar: batch 1") and out[1].startswith("ninformer_cifar: batch 1")
    assert "ours_img_s" in out[0] and out[2] == "" and out[3].split()[:2] == ["model", "batch"]
