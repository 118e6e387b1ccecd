"""The trainer behind ``visionattn train / evaluate / predict``: one loop for every task.

What is specific to a problem (data sets, model, loss, metrics) lives in a task object chosen by the
recipe's ``task:`` key (:func:`get_task`): :class:`~visionattn.tasks.classification.ClassificationTask`,
:class:`~visionattn.tasks.segmentation.SegmentationTask`, :class:`~visionattn.tasks.detection.DetectionTask`.

One process or many (``torchrun``: DDP, gloo on CPU, NCCL on GPU). Mixed precision, gradient accumulation
and clipping, EMA of weights, warmup + cosine schedule (timm's), weight-decay exclusions from
``no_weight_decay()`` (timm's optimizer factory), checkpoints written atomically with everything needed to
resume exactly (model, optimizer, scheduler, EMA, scaler, RNG states, position inside the epoch), best-model
tracking, metrics to CSV (and TensorBoard when installed), a PNG of the curves at the end.
"""
from __future__ import annotations

import csv
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import yaml

from visionattn.checkpoints import (CHECKSUM_KEY, CheckpointError, non_finite_weight, one_line_error, read_checkpoint,
                                    state_digest)
from visionattn.errors import TrainingInterrupted
from visionattn.tasks.config import TRAIN_DEFAULTS, ConfigError, check_train_keys, instantiate
from visionattn.tasks.data import EpochBatches
from visionattn.tasks.files import atomic_path, make_folder, write_json_atomic, write_text_atomic
from visionattn.tasks.runtime import (all_reduce_sum, atomic_save_weights, atomic_torch_save, dist_setup,
                                      machine_info, progress, resolve_data_paths, rng_state, set_rng_state,
                                      to_channels_last)
from visionattn.tasks.task import get_task

SCHEDULE_UNITS = 10_000  # with schedule_by_time, the LR schedule runs over this many units of the time budget
LOG_SECONDS = 60.0  # a progress line at least this often (at the end of a step), whatever train.log_every says


def _hms(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _keep_as_previous(last: Path, previous: Path) -> None:
    """Make ``previous`` a second name for (or, without hard links, a copy of) ``last``, replacing it
    atomically; ``last`` stays where it is."""
    with atomic_path(previous) as tmp:
        try:
            os.link(last, tmp)
        except OSError:  # file systems without hard links
            shutil.copyfile(last, tmp)


# ---------------------------------------------------------------------------------------------------
# the trainer


RUN_FILES = ("config.yaml", "metrics.csv", "train.log", "last.pt", "previous.pt", "last.json", "best.safetensors",
             "model.safetensors", "summary.json", "curves.png", "tensorboard")


def refuse_to_overwrite_run(out: Path) -> None:
    """A new run may write into a missing or empty folder, or one holding none of the files a run writes
    (:data:`RUN_FILES`); anything else would be overwritten, which needs ``--resume`` or ``--overwrite``."""
    if not out.is_dir():
        if out.exists():
            raise ConfigError(f"output_dir {out} exists and is not a folder")
        return
    ours = [name for name in RUN_FILES if (out / name).exists()]
    if ours:
        raise ConfigError(f"output_dir {out} already holds {', '.join(ours[:4])}{' ...' if len(ours) > 4 else ''}; "
                          "pass --resume to continue that run, --overwrite to replace it, or choose another output_dir")


def cpu_runs_bf16_natively() -> bool:
    """Whether this CPU computes bfloat16 in hardware (oneDNN's own test: AVX-512 BW and up, or AMX).

    Elsewhere (AVX2 machines) PyTorch emulates bf16 convolutions and matmuls, many times slower than float32.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2", "NO AVX")


# signals that ask a run to stop after its current step, with a checkpoint: Ctrl-C, and what `kill`, SLURM
# (before its time limit) and container runtimes send
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _as_list(samples: list) -> list:
    """The loader workers' collate function: a batch stays a list of samples (the task collates it)."""
    return samples


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """In each loader worker: Ctrl-C reaches the whole process group and SLURM signals every process of a job,
    but a stop is the trainer's to make (it finishes the step, whose later micro-batches the workers may still
    be loading); the workers end when the trainer drops them, or when it dies."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class Trainer:
    """Trains the recipe's model. ``cfg`` is a loaded recipe (see ``configs/``).

    ``resume`` continues from ``OUTPUT_DIR/last.pt``, or from ``previous.pt`` when last.pt is damaged.
    Progress goes to stdout and ``OUTPUT_DIR/train.log`` (appended to on resume), one flushed line every
    ``train.log_every`` steps and at least every :data:`LOG_SECONDS`: step, epoch, loss (mean since the last
    line), learning rate, images/s, elapsed time and ETA.
    ``write_outputs=False`` (``visionattn evaluate``) leaves ``output_dir`` untouched: no config.yaml, no
    metrics.csv reset; such a trainer is for :meth:`evaluate` only. A new run never writes over an earlier
    run's files unless ``overwrite`` (:func:`refuse_to_overwrite_run`).

    Stopping: Ctrl-C (SIGINT) or SIGTERM lets the current step (or validation) finish, writes a checkpoint of
    that point and raises :class:`TrainingInterrupted`; ``--resume`` then continues exactly where it stopped,
    and nothing done is lost. Under ``torchrun`` the processes agree on the step to stop at (one small
    all-reduce a step), so a signal that reaches any of them (torchrun passes the one it gets on to all) stops
    all at the same step. A second signal to a process stops it at once.
    """

    def __init__(self, cfg: dict, resume: bool = False, config_path: str | None = None, write_outputs: bool = True,
                 overwrite: bool = False):
        self.cfg = cfg
        self.write_outputs = write_outputs
        check_train_keys(cfg, config_path or "the config")  # one built in code has not been through load_config
        self.opts = dict(TRAIN_DEFAULTS, **(cfg.get("train") or {}))
        workers = self.opts["num_workers"]
        if isinstance(workers, bool) or not isinstance(workers, int) or not 0 <= workers <= 256:
            raise ConfigError(f"train.num_workers must be a whole number from 0 (load in the training process) to "
                              f"256, got {workers!r}")
        self.device = torch.device(cfg.get("device", "cuda" if torch.cuda.is_available() else "cpu"))
        self.rank, self.world = dist_setup(self.device.type)
        self.is_main = self.rank == 0
        if self.opts["threads"]:
            torch.set_num_threads(int(self.opts["threads"]))
        self.seed = int(cfg.get("seed", 0))
        torch.manual_seed(self.seed)
        np.random.seed(self.seed)
        random.seed(self.seed)
        if self.opts["deterministic"]:
            torch.use_deterministic_algorithms(True, warn_only=True)
            if self.device.type == "cuda":
                torch.backends.cudnn.benchmark = False
        resolve_data_paths(cfg, config_path)
        self.task = get_task(cfg)
        self.out = Path(cfg.get("output_dir", "runs/default"))
        if write_outputs and not resume and not overwrite:
            # every process checks before any writes, and all agree, so that no rank is left waiting
            problem = None
            try:
                refuse_to_overwrite_run(self.out)
            except ConfigError as e:
                problem = e
            if all_reduce_sum([float(problem is not None)], self.device)[0] > 0:
                raise problem or ConfigError(f"output_dir {self.out}: refused on another process (see its error)")

        self.train_set, self.val_set, self.meta = self.task.build_datasets(cfg, self.seed)
        self.classes = list(self.meta.get("classes", []))
        self.model = self.task.build_model(cfg, self.meta).to(self.device)
        if self.opts["channels_last"]:
            self.model = self.model.to(memory_format=torch.channels_last_3d if self.meta.get("spatial_dims") == 3
                                       else torch.channels_last)
        self.net = self.model
        if self.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        from timm.optim import create_optimizer_v2
        from timm.scheduler import CosineLRScheduler

        o = self.opts
        self.optimizer = create_optimizer_v2(self.model, opt=o["opt"], lr=o["lr"], weight_decay=o["weight_decay"])
        self.batches = EpochBatches(len(self.train_set), o["batch_size"], self.seed, True, True, self.rank, self.world)
        if len(self.batches) == 0 and o["epochs"] > 0:
            raise ConfigError(f"batch size {o['batch_size']} is larger than the training set ({len(self.train_set)} samples)")
        self.steps_per_epoch = math.ceil(len(self.batches) / o["accumulate"])
        self.total_steps = self.steps_per_epoch * o["epochs"]
        if o["max_steps"]:
            self.total_steps = min(self.total_steps, int(o["max_steps"]))
        if o["schedule_by_time"] and not o["max_minutes"]:
            raise ConfigError("train.schedule_by_time needs train.max_minutes (the budget the schedule spans)")
        if o["budget_clock"] not in ("wall", "cpu"):
            raise ConfigError(f"train.budget_clock must be 'wall' or 'cpu', got {o['budget_clock']!r}")
        # by steps: warmup then cosine over the run's steps; by time: the same shape over the time budget,
        # warmup_epochs then being read as a fraction of the budget
        t_initial, warmup_t = (SCHEDULE_UNITS, int(o["warmup_epochs"] * SCHEDULE_UNITS)) if o["schedule_by_time"] else \
            (self.total_steps or 2, int(o["warmup_epochs"] * self.steps_per_epoch))  # 0 steps (evaluate): 1 would make timm warn
        self.scheduler = CosineLRScheduler(
            self.optimizer, t_initial=t_initial, lr_min=o["min_lr"],
            warmup_t=warmup_t, warmup_lr_init=o["lr"] * 1e-3, t_in_epochs=False,
        )
        self.ema = None
        if o["ema_decay"]:
            from timm.utils import ModelEmaV3

            # ema_warmup (timm's): the decay at step t is min(ema_decay, 1 - (1 + t)^(-2/3)), 0.95 at step 100, 0.99 at
            # 1,000, 0.998 at 10,000. Without it a short run's average keeps (ema_decay)^steps of the initial weights and
            # BatchNorm statistics: at 0.999 after 2,000 steps, 14% of running_var's initial 1.0, which made a
            # DRIVE EMCAD's EMA predict no vessel at all (its true variances are near 1e-3).
            self.ema = ModelEmaV3(self.model, decay=float(o["ema_decay"]), use_warmup=bool(o["ema_warmup"]))
        amp = o["amp"]
        if amp not in ("none", "bf16", "fp16"):
            raise ConfigError(f"train.amp must be 'none', 'bf16' or 'fp16', got {amp!r}")
        if amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("train.amp=fp16 needs a CUDA device; use bf16 on CPU")
        if amp == "bf16" and self.device.type == "cpu" and not cpu_runs_bf16_natively():
            # measured on an AVX2-only machine: a 3-D U-Net step took 14x longer under bf16 autocast than in float32
            if self.rank == 0:
                print("visionattn train: this CPU has no native bfloat16 (no AVX-512/AMX): bf16 autocast would be "
                      "emulated, several times slower than float32; training in float32 (train.amp ignored)",
                      file=sys.stderr, flush=True)
            amp = "none"
        self.amp = amp
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)) \
            if amp != "none" else nullcontext
        self.scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
        self.loss_fn = instantiate(cfg["loss"], where="loss") if cfg.get("loss") else None

        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best = None
        self.train_seconds = 0.0
        # whether last.pt / previous.pt on disk are good checkpoints of this run (see save_checkpoint)
        self._last_is_ours = self._previous_is_ours = False
        self._resumed_from: Path | None = None
        self._bar = None  # the epoch's progress bar while it runs (see say)
        if resume:
            self._resume()  # reads only: a run that cannot resume leaves the folder as it was
        self.tb = None
        if self.is_main and write_outputs:
            make_folder(self.out, "output_dir")
            if resume:
                self._drop_metrics_after(self.step)
            else:
                (self.out / "metrics.csv").unlink(missing_ok=True)
                (self.out / "train.log").unlink(missing_ok=True)
            # the run's config.yaml: the recipe as run, with the class names found in the data (what a Run reads)
            run_config = dict(cfg, classes=[str(c) for c in self.classes]) if self.classes else cfg
            write_text_atomic(yaml.safe_dump(run_config, sort_keys=False), self.out / "config.yaml")
            self.tb = self._tensorboard()

    # -- checkpoints -----------------------------------------------------------------------------

    def checkpoint_state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": rng_state(),
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "train_seconds": self.train_seconds,
            "best": self.best, "classes": list(self.classes), "task": self.task.name,
        }

    def save_checkpoint(self) -> None:
        """Write ``last.pt`` with its checksum, keeping the checkpoint it replaces as ``previous.pt``.

        last.pt is a complete file at every moment: previous.pt is made a second name for it first, then the
        new state is written under a temporary name and renamed onto last.pt. A last.pt that is not a good
        checkpoint of this run (a fresh run in an old folder, a damaged file resumed past) is not kept, and a
        previous.pt from another run is removed once this run has a checkpoint. Weights that went NaN or
        infinite are not written, so they never replace a finite checkpoint."""
        if not self.is_main:
            return
        last, previous = self.out / "last.pt", self.out / "previous.pt"
        state = self.checkpoint_state()
        bad = non_finite_weight(state, {n for n, _ in self.model.named_parameters()})
        if bad:
            print(f"visionattn train: step {self.step}: non-finite values in {bad}; {last} is not replaced",
                  file=sys.stderr, flush=True)
            return
        state[CHECKSUM_KEY] = {"sha256": state_digest(state)}
        if self._last_is_ours and last.is_file():
            _keep_as_previous(last, previous)
            self._previous_is_ours = True
        atomic_torch_save(state, last)
        self._last_is_ours = True
        if not self._previous_is_ours:
            previous.unlink(missing_ok=True)
            self._previous_is_ours = True
        write_json_atomic({"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch},
                          self.out / "last.json", indent=None)

    def _resume(self) -> None:
        """Load the state of ``last.pt``, or of ``previous.pt`` when last.pt is missing or damaged (said on
        stderr). Writes nothing; raises :class:`CheckpointError` (one line) when neither is usable."""
        last, previous = self.out / "last.pt", self.out / "previous.pt"
        if not last.exists() and not previous.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {last}")
        problems = []
        for path in (last, previous):
            try:
                state = self._read_resume_state(path)
                break
            except (FileNotFoundError, CheckpointError) as e:
                problems.append(str(e))
        else:
            raise CheckpointError(f"--resume: no usable checkpoint in {self.out}: " + "; ".join(problems))
        if path == previous and self.is_main:
            print(f"visionattn train: {problems[0]}", file=sys.stderr)
            print(f"visionattn train: resuming from {previous} (step {state['step']}) instead", file=sys.stderr, flush=True)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.ema and state.get("ema"):
                self.ema.load_state_dict(state["ema"])
            if self.scaler and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
            self.step, self.epoch, self.batch_in_epoch = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
            self.best = state.get("best")
            self.train_seconds = float(state.get("train_seconds", 0.0))
        except (RuntimeError, KeyError, IndexError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: does not fit this recipe's model or training setup ({one_line_error(e)})") from e
        # the file we resumed from is good; a damaged last.pt must not become previous.pt
        self._last_is_ours, self._previous_is_ours = path == last, True
        self._resumed_from = path

    def _read_resume_state(self, path: Path) -> dict:
        """A trainer checkpoint with a matching checksum and finite weights, or CheckpointError."""
        state = read_checkpoint(path, require_checksum=True)
        missing = [k for k in ("model", "optimizer", "scheduler", "rng", "step", "epoch", "batch_in_epoch")
                   if k not in state]
        if missing:
            raise CheckpointError(f"{path}: not a visionattn trainer checkpoint (no {', '.join(missing)})")
        bad = non_finite_weight(state, {n for n, _ in self.model.named_parameters()})
        if bad:
            raise CheckpointError(f"{path}: non-finite values (NaN or infinity) in {bad}")
        return state

    def _drop_metrics_after(self, step: int) -> None:
        """Remove metric rows logged after ``step`` (the run continues from there and logs them again)."""
        path = self.out / "metrics.csv"
        if not path.is_file():
            return
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        keep = [r for r in rows if int(r["step"]) <= step]
        if len(keep) < len(rows):
            with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=["step", "epoch", "split", "name", "value"])
                w.writeheader()
                w.writerows(keep)

    # -- metrics ---------------------------------------------------------------------------------

    def _tensorboard(self):
        if not self.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard is optional
            return None
        return SummaryWriter(str(self.out / "tensorboard"))

    def _write_rows(self, rows: list[dict], mode: str = "a") -> None:
        path = self.out / "metrics.csv"
        new = mode == "w" or not path.is_file()
        with path.open(mode, newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step", "epoch", "split", "name", "value"])
            if new:
                w.writeheader()
            w.writerows(rows)

    def log(self, split: str, values: dict[str, float]) -> None:
        if not self.is_main:
            return
        rows = [dict(step=self.step, epoch=self.epoch, split=split, name=k, value=f"{v:.8g}") for k, v in values.items()]
        self._write_rows(rows)
        if self.tb:
            for k, v in values.items():
                self.tb.add_scalar(f"{split}/{k}", v, self.step)

    # -- training --------------------------------------------------------------------------------

    @contextmanager
    def _stop_on_signal(self):
        """While training: the first of :data:`STOP_SIGNALS` sets ``self._stop_signal`` (the loop checks it
        between steps, :meth:`_stop_requested`), a second one acts as it would have without us. Main thread
        only (Python runs signal handlers there)."""
        self._stop_signal = None
        if threading.current_thread() is not threading.main_thread():  # (signal handlers live there only)
            yield
            return
        before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

        def request_stop(signum, frame):
            for sig, handler in before.items():  # a second signal stops at once
                signal.signal(sig, handler)
            self._stop_signal = signal.Signals(signum).name
            if self.is_main:  # os.write: a handler that printed could land inside a print of the loop's
                os.write(2, f"\nvisionattn: {self._stop_signal}: stopping after this step with a checkpoint "
                            "(again to stop at once)\n".encode())

        for sig in STOP_SIGNALS:
            signal.signal(sig, request_stop)
        try:
            yield
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)

    def _stop_requested(self) -> bool:
        """Whether to stop at this point: a stop signal reached this process or, under ``torchrun``, any of
        them (every process calls this at the same points, so all agree)."""
        if self.world == 1:
            return self._stop_signal is not None
        return all_reduce_sum([float(self._stop_signal is not None)], self.device)[0] > 0

    def _stop_here(self) -> None:
        """Write a checkpoint of this point and raise :class:`TrainingInterrupted` (every process, once the
        checkpoint is written)."""
        self.save_checkpoint()
        if self.world > 1:
            torch.distributed.barrier()  # no process leaves (and has torchrun stop the others) before the save
        last = self.out / "last.pt"
        by = self._stop_signal or "a signal to another process"
        what = f"stopped on {by} at step {self.step} (epoch {self.epoch + 1})"
        self.say(f"{what}, checkpoint {last}")
        raise TrainingInterrupted(f"{what}; {last} holds that point", str(last))

    def fit(self) -> dict:
        """Train to the end of the recipe (its epochs or its time budget) and return the run's summary;
        stopped by a signal, raise :class:`TrainingInterrupted` after a checkpoint (see the class)."""
        with self._stop_on_signal():
            return self._fit()

    def _fit(self) -> dict:
        o = self.opts
        start = time.time()
        done = self.step >= self.total_steps
        self._start_progress(start)
        while not done and self.epoch < o["epochs"]:
            self.train_set.set_epoch(self.epoch)
            self.model.train()
            epoch_batches = self.batches.batches(self.epoch)
            todo = epoch_batches[self.batch_in_epoch:]
            bar = progress(todo, desc=f"epoch {self.epoch}", leave=False) if self.is_main else todo
            self._bar = bar
            accum = []
            for indices, samples in zip(bar, self._samples_of(todo)):
                accum.append(samples)
                self.batch_in_epoch += 1
                last_of_epoch = self.batch_in_epoch == len(epoch_batches)
                if len(accum) < o["accumulate"] and not last_of_epoch:
                    continue
                step_start = self._budget_clock()
                loss = self._optimizer_step(accum)
                step_seconds = self._budget_clock() - step_start
                self.train_seconds += step_seconds  # kept in checkpoints, so a resumed run continues the budget
                images = sum(len(b) for b in accum) * self.world
                accum = []
                self.step += 1
                if self.step % o["log_every"] == 0 or self.step == 1:
                    self.log("train", {"loss": loss, "lr": self.optimizer.param_groups[0]["lr"]})
                if self.is_main and hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{loss:.3f}")
                if o["checkpoint_every"] and self.step % o["checkpoint_every"] == 0 and not last_of_epoch:
                    self.save_checkpoint()
                if self.step >= self.total_steps or self._out_of_time():
                    done = True
                self._progress_step(loss, images, step_seconds, force=done)
                if done:
                    break
                if not last_of_epoch and self._stop_requested():  # (an epoch's end stops after its validation)
                    self._stop_here()
            self._bar = None
            if self.batch_in_epoch >= len(epoch_batches):
                self.epoch += 1
                self.batch_in_epoch = 0
            last = done or self.epoch >= o["epochs"]
            metrics = self.evaluate_and_track() if (last or self.epoch % o["eval_every"] == 0) else {}
            if metrics:
                self.say(f"epoch {self.epoch} step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if not last and self._stop_requested():
                self._stop_here()
            self.save_checkpoint()
        if self.is_main:
            atomic_save_weights(self.ema.module if self.ema else self.model, self.out / "model.safetensors")
            self.plot()
        # the machine: a time budget buys a different number of steps on each
        summary = {"steps": self.step, "epochs": self.epoch, "best": self.best, "seconds": time.time() - start,
                   "train_seconds": self.train_seconds, "machine": machine_info(self.device.type)}
        if self.is_main:
            write_json_atomic(summary, self.out / "summary.json")
        return summary

    # -- progress lines ----------------------------------------------------------------------------

    def say(self, line: str) -> None:
        """Print ``line`` to stdout and append it to ``OUTPUT_DIR/train.log``, both flushed at once (so a log
        read off a terminal, under SLURM or nohup, shows it now); main process only."""
        if not self.is_main:
            return
        bar = self._bar
        if bar is not None and not getattr(bar, "disable", True):
            bar.write(line, file=sys.stdout)  # above the live progress bar, which stays at the bottom
            sys.stdout.flush()
        else:
            print(line, flush=True)
        if self.write_outputs:
            with (self.out / "train.log").open("a", encoding="utf-8") as f:
                f.write(line + "\n")

    def _start_progress(self, start: float) -> None:
        self._fit_start, self._fit_start_step, self._fit_start_budget = start, self.step, self.train_seconds
        self._last_line = start
        self._window = [0, 0.0, 0, 0.0]  # steps, summed loss, images, seconds in optimizer steps since the last line
        o = self.opts
        what = f"{self.total_steps} steps ({o['epochs']} epochs of {self.steps_per_epoch})"
        if o["max_minutes"]:
            what += f", at most {float(o['max_minutes']):g} minutes of training"
        if self._resumed_from is not None:
            self.say(f"resuming from {self._resumed_from} at step {self.step} (epoch {self.epoch + 1}), "
                     f"{_hms(self.train_seconds)} trained so far")
        self.say(f"training {what} on {len(self.train_set)} samples, batch {o['batch_size']} x {o['accumulate']} "
                 f"x {self.world} process(es), device {self.device}; output_dir {self.out}")

    def _progress_step(self, loss: float, images: int, step_seconds: float, force: bool = False) -> None:
        """Count one optimizer step; print a progress line after the first step of this process (a fresh or a
        resumed run: the user sees it train at once), every ``log_every`` steps, after :data:`LOG_SECONDS`
        without one, and at the last step (``force``)."""
        w = self._window
        w[0] += 1
        w[1] += loss
        w[2] += images
        w[3] += step_seconds
        now = time.time()
        first_here = self.step == self._fit_start_step + 1
        if not (force or first_here or self.step % self.opts["log_every"] == 0
                or now - self._last_line >= LOG_SECONDS):
            return
        elapsed = now - self._fit_start
        done_here = self.step - self._fit_start_step
        eta = (self.total_steps - self.step) * elapsed / max(done_here, 1)
        if self.opts["max_minutes"]:
            # what is left of the budget, on the wall clock at this sitting's rate so far: the budget's clock runs
            # slower than the wall's (validations are not counted; budget_clock=cpu counts CPU time divided by the
            # threads, which a process that keeps its threads half busy, or waits for a core, uses up slowly)
            left = max(0.0, 60 * float(self.opts["max_minutes"]) - self.train_seconds)
            used = self.train_seconds - self._fit_start_budget
            eta = min(eta, left * elapsed / used if used > 0 else left)
        width = len(str(self.total_steps))
        self.say(f"step {self.step:{width}d}/{self.total_steps} epoch {self.epoch + 1}/{self.opts['epochs']} "
                 f"loss {w[1] / w[0]:.4f} lr {self.optimizer.param_groups[0]['lr']:.3g} "
                 f"{w[2] / max(w[3], 1e-9):.1f} img/s elapsed {_hms(elapsed)} eta {_hms(eta)}")
        self._window = [0, 0.0, 0, 0.0]
        self._last_line = now

    def _budget_clock(self) -> float:
        """Seconds on the clock that ``train.max_minutes`` is counted in. ``wall``: elapsed time. ``cpu``: this
        process's CPU time divided by torch's thread count, i.e. about the elapsed time the same steps take on
        an otherwise idle machine; a run sharing its cores with other jobs then gets about the same budget of
        work (and the same schedule) as one that has them to itself, as long as the cores are not
        oversubscribed. They were, when a hippocampus fold (1 thread) ran beside another fold and the test
        suite on 2 cores: each step took 1.28 CPU-seconds instead of 0.41-0.43 with only the two folds (shared
        caches and SMT siblings slow the work, not just its share of the clock)."""
        if self.opts["budget_clock"] == "cpu":
            return time.process_time() / max(1, torch.get_num_threads())
        return time.time()

    def _out_of_time(self) -> bool:
        """``train.max_minutes`` of training (evaluation not counted) are used up, on any process."""
        limit = self.opts["max_minutes"]
        if not limit:
            return False
        return all_reduce_sum([float(self.train_seconds > 60 * float(limit))], self.device)[0] > 0

    def _samples_of(self, batches: list[list[int]]):
        """The training samples of each batch in ``batches`` (lists of indices), in order: read here, or with
        ``train.num_workers > 0`` by that many worker processes (torch's ``DataLoader``), which read ahead while
        the step before runs. The samples are the same either way: each one's augmentation is seeded by
        ``(seed, epoch, index)`` (:class:`~visionattn.tasks.data.SeededTransform`), so neither the numbers of a
        run nor ``--resume`` depend on the workers. The workers' CPU time is not in ``budget_clock=cpu``'s count
        (this process's)."""
        if not self.opts["num_workers"] or not batches:
            return ([self.train_set[i] for i in indices] for indices in batches)
        from torch.utils.data import DataLoader

        # a generator of its own: a loader seeds its workers from the global one, which dropout and the
        # rest of the run draw from (and the samples are seeded per index anyway)
        return iter(DataLoader(self.train_set, batch_sampler=batches, num_workers=self.opts["num_workers"],
                               collate_fn=_as_list, worker_init_fn=_leave_stop_signals_to_the_trainer,
                               generator=torch.Generator().manual_seed(self.seed)))

    def _optimizer_step(self, accum: list[list]) -> float:
        """One optimizer step over ``accum``: batches of samples (``dataset[i]`` each), gradients accumulated."""
        o = self.opts
        n_total = sum(len(b) for b in accum)
        total = 0.0
        for i, samples in enumerate(accum):
            x, y = self.task.collate(samples, self.device)
            if self.opts["channels_last"]:
                x = to_channels_last(x)
            sync = nullcontext() if (self.world == 1 or i == len(accum) - 1) else self.net.no_sync()
            with sync:
                with self.autocast():
                    loss = self.task.training_loss(self.net, x, y, self.loss_fn) * (len(samples) / n_total)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.item()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if o["clip_grad"]:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), o["clip_grad"])
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if o["schedule_by_time"]:
            self.scheduler.step_update(min(SCHEDULE_UNITS, int(SCHEDULE_UNITS * self.train_seconds / (60 * float(o["max_minutes"])))))
        else:
            self.scheduler.step_update(self.step + 1)
        if self.ema:
            self.ema.update(self.model, step=self.step)
        return all_reduce_sum([total], self.device)[0] / self.world

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module | None = None, dataset=None, per_case: list | None = None
                 ) -> dict[str, float]:
        """The task's validation metrics (the same on every process); ``per_case`` (segmentation only): a list
        that receives this process's rows of metrics per case."""
        model = model or (self.ema.module if self.ema else self.model)
        dataset = dataset if dataset is not None else self.val_set
        if dataset is None:
            return {}
        model.eval()
        extra = {} if per_case is None else {"per_case": per_case}
        return self.task.evaluate(model, dataset, self.rank, self.world, self.device, self.autocast,
                                  self.opts["eval_batch_size"], **extra)

    def evaluate_and_track(self) -> dict[str, float]:
        metrics = self.evaluate()
        if metrics:
            self.log("val", metrics)
            self.log("time", {"train_seconds": self.train_seconds})  # for metric-versus-training-time curves
            key, sign = self.task.primary_metric, (1 if self.task.greater_is_better else -1)
            if self.best is None or sign * metrics[key] > sign * self.best[key]:
                self.best = dict(metrics, step=self.step, epoch=self.epoch)
                if self.is_main:
                    atomic_save_weights(self.ema.module if self.ema else self.model, self.out / "best.safetensors")
        return metrics

    def plot(self) -> Path | None:
        """Training loss and the validation metric against steps, as ``curves.png`` (needs matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except Exception:
            return None
        rows = list(csv.DictReader((self.out / "metrics.csv").open())) if (self.out / "metrics.csv").is_file() else []
        series: dict[tuple[str, str], list[tuple[int, float]]] = {}
        for r in rows:
            series.setdefault((r["split"], r["name"]), []).append((int(r["step"]), float(r["value"])))
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        metric = self.task.primary_metric
        panels = {0: [("train", "loss"), ("val", "loss")], 1: [("val", metric)]}
        for i, keys in panels.items():
            for key in keys:
                if key in series:
                    xs, ys = zip(*series[key])
                    axes[i].plot(xs, ys, label=f"{key[0]} {key[1]}", marker="o" if key[0] == "val" else None)
            axes[i].set_xlabel("optimizer step")
            axes[i].legend()
            axes[i].grid(alpha=0.3)
        axes[0].set_title("loss")
        axes[1].set_title(f"validation {metric}")
        fig.tight_layout()
        path = self.out / "curves.png"
        try:
            with atomic_path(path, ".png") as tmp:
                fig.savefig(tmp, dpi=100)
        finally:
            plt.close(fig)
        return path
