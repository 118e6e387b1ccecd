"""Trainer overhead: visionattn's trainer step beside a bare PyTorch loop doing the same work, same run.

``bench_train(recipe)`` builds the recipe's :class:`~visionattn.tasks.trainer.Trainer` (in a temporary
output folder; nothing is written next to the recipe) and times, in alternating rounds so that a change in the
machine's load hits both alike:

- ``trainer``: one optimizer step as ``Trainer.fit`` takes it: ``Trainer._optimizer_step`` (batch loading,
  channels-last, autocast, the task's loss, backward, gradient clipping, optimizer, scheduler, EMA,
  the loss reduced over processes) and the progress bookkeeping ``fit`` does per step;
- ``bare``: the loop one writes by hand for the same recipe: load the same batch with the task's loader,
  forward and loss under the same autocast, backward, clip if the recipe clips, ``optimizer.step()``,
  ``zero_grad``, and the EMA update if the recipe keeps one, on the same model with a second optimizer of
  the same kind (timm's ``create_optimizer_v2`` with the recipe's settings).

Both load their batches with the task's own loader (the data pipeline is not trainer overhead, and a bare loop
needs one too). The overhead is ``trainer / bare - 1`` of the medians.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from typing import Callable, Sequence

import torch

from visionattn.tasks.bench import format_table as _format_table

DEFAULT_RECIPES = ("configs/classification/cifar10_ninformer.yaml", "configs/segmentation/hippocampus_agunet.yaml")


def _build_trainer(recipe: str, overrides: Sequence[str], out_dir: str):
    from visionattn.tasks.config import load_config
    from visionattn.tasks.trainer import Trainer

    cfg = load_config(recipe, [*overrides, f"output_dir={out_dir}", "train.max_minutes=null",
                               "train.schedule_by_time=false", "train.checkpoint_every=0"])
    return Trainer(cfg, config_path=recipe, overwrite=True)


def bench_train(recipe: str, steps: int = 10, rounds: int = 3, threads: int | None = None,
                overrides: Sequence[str] = (), report: Callable[[str], None] | None = None) -> dict:
    """Median seconds per optimizer step of the trainer and of a bare loop on ``recipe``'s model and batches.

    Args:
        recipe: a training recipe (``configs/...yaml``).
        steps: optimizer steps per round and per side (after one warm-up step each).
        rounds: alternating rounds (trainer, bare, trainer, bare, ...).
        threads: torch CPU threads (restored afterwards).
        overrides: recipe overrides (``train.batch_size=4``, ...).
        report: receives a line as each round is measured.
    Returns:
        ``dict(recipe, model, batch_size, trainer_ms, bare_ms, overhead)`` (``overhead`` = trainer / bare - 1).
    """
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="visionattn-bench-train-") as out_dir:
            trainer = _build_trainer(recipe, overrides, out_dir)
            return _measure(trainer, recipe, steps, rounds, report)
    finally:
        torch.set_num_threads(previous_threads)


def _measure(trainer, recipe: str, steps: int, rounds: int, report) -> dict:
    from timm.optim import create_optimizer_v2

    from visionattn.tasks.runtime import to_channels_last

    o = trainer.opts
    model, task = trainer.model, trainer.task
    model.train()
    bare_optimizer = create_optimizer_v2(model, opt=o["opt"], lr=o["lr"], weight_decay=o["weight_decay"])
    batches = trainer.batches.batches(0)
    if not batches:
        raise ValueError(f"{recipe}: no training batches")
    cursor = [0]

    def next_indices() -> list[int]:
        indices = batches[cursor[0] % len(batches)]
        cursor[0] += 1
        return indices

    trainer.say = lambda *args, **kwargs: None  # the progress lines are computed, not printed
    trainer._start_progress(time.time())

    def trainer_step() -> None:
        start = time.time()
        loss = trainer._optimizer_step([[trainer.train_set[i] for i in next_indices()]])  # read as fit reads them
        trainer.step += 1
        trainer._progress_step(loss, o["batch_size"], time.time() - start)

    def bare_step() -> None:
        x, y = task.load_batch(trainer.train_set, next_indices(), trainer.device)
        if o["channels_last"]:
            x = to_channels_last(x)
        with trainer.autocast():
            loss = task.training_loss(model, x, y, trainer.loss_fn)
        loss.backward()
        if o["clip_grad"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o["clip_grad"])
        bare_optimizer.step()
        bare_optimizer.zero_grad(set_to_none=True)
        if trainer.ema:
            trainer.ema.update(model)
        loss.item()  # as a hand-written loop logs its loss

    sides = {"trainer": trainer_step, "bare": bare_step}
    for step in sides.values():  # warm-up: first-call allocations, lazy inits
        step()
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(rounds):
        for name, step in sides.items():
            for _ in range(steps):
                start = time.perf_counter()
                step()
                seconds[name].append(time.perf_counter() - start)
        if report:
            report(f"round {r + 1}/{rounds}: trainer {1e3 * statistics.median(seconds['trainer'][-steps:]):.1f} ms/step, "
                   f"bare {1e3 * statistics.median(seconds['bare'][-steps:]):.1f} ms/step")
    trainer_ms = 1e3 * statistics.median(seconds["trainer"])
    bare_ms = 1e3 * statistics.median(seconds["bare"])
    return {"recipe": recipe, "model": trainer.cfg["model"]["name"], "batch_size": o["batch_size"],
            "trainer_ms": trainer_ms, "bare_ms": bare_ms, "overhead": trainer_ms / bare_ms - 1}


def format_table(rows: list[dict]) -> str:
    """Rows of :func:`bench_train` as a plain-text table."""
    headers = ["recipe", "model", "batch", "trainer ms/step", "bare loop ms/step", "trainer / bare", "overhead"]
    return _format_table(headers, [[r["recipe"], r["model"], r["batch_size"], r["trainer_ms"], r["bare_ms"],
                                    f"{r['trainer_ms'] / r['bare_ms']:.3f}x", f"{100 * r['overhead']:+.1f}%"]
                                   for r in rows])
