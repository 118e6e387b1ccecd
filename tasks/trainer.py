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
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from visionattn.tasks.config import ConfigError, instantiate
from visionattn.tasks.data import EpochBatches
from visionattn.tasks.files import atomic_path, write_json_atomic

TRAIN_DEFAULTS = dict(
    epochs=10, batch_size=64, accumulate=1, opt="adamw", lr=1e-3, weight_decay=0.05, warmup_epochs=1.0,
    min_lr=1e-5, clip_grad=None, amp="none", ema_decay=0.0, label_smoothing=0.0, deterministic=True,
    checkpoint_every=0, max_steps=None, max_minutes=None, schedule_by_time=False, eval_batch_size=256, eval_every=1,
    num_workers=0, log_every=10, threads=None, channels_last=False,
)
SCHEDULE_UNITS = 10_000  # with schedule_by_time, the LR schedule runs over this many units of the time budget
TASKS = ("classification", "segmentation", "detection")


# ---------------------------------------------------------------------------------------------------
# processes


def dist_setup(device: str) -> tuple[int, int]:
    """Initialise torch.distributed from torchrun's environment (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def progress(iterable, **kwargs):
    """tqdm that is quiet off a terminal and honours TQDM_DISABLE (tqdm reads it only if disable is unset)."""
    if "TQDM_DISABLE" not in os.environ:
        kwargs.setdefault("disable", None)
    return tqdm(iterable, **kwargs)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temporary name in the same folder, then rename: a crash never leaves a partial file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_save_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    # tensors shared between modules (EMCAD's one spatial-attention block) are stored once per name, so the
    # file loads with a strict load_state_dict
    seen: set[int] = set()
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        ptr = v.untyped_storage().data_ptr()
        tensors[k] = v.clone().contiguous() if ptr in seen else v.contiguous()
        seen.add(ptr)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def to_channels_last(x):
    """Channels-last memory format for 4-D/5-D tensors (faster convolutions on CPU); others unchanged."""
    if isinstance(x, torch.Tensor) and x.ndim in (4, 5):
        return x.contiguous(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)
    return x


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


# ---------------------------------------------------------------------------------------------------
# building from the recipe


def get_task(cfg: dict):
    """The task object named by the recipe's ``task:`` (default ``classification``)."""
    name = cfg.get("task", "classification")
    if name == "classification":
        from visionattn.tasks.classification import ClassificationTask

        return ClassificationTask(label_smoothing=float((cfg.get("train") or {}).get("label_smoothing", 0.0)))
    if name == "segmentation":
        from visionattn.tasks.segmentation import SegmentationTask

        return SegmentationTask()
    if name == "detection":
        from visionattn.tasks.detection import DetectionTask

        return DetectionTask()
    raise ConfigError(f"task must be one of {list(TASKS)}, got {name!r}")


def resolve_data_paths(cfg: dict, config_path: str | None) -> None:
    """Make the recipe's data paths usable from here (see :func:`resolve_path`), in place."""
    base = Path(config_path).parent if config_path else Path(".")
    data = cfg.setdefault("data", {})
    for key in ("root", "val_root", "path", "images", "annotations"):
        if isinstance(data.get(key), str):
            data[key] = resolve_path(data[key], base)


def resolve_path(value: str | None, base: Path) -> str | None:
    """Relative data paths in a recipe are taken from the current folder, or else from the recipe's."""
    if not value or os.path.isabs(value) or os.path.exists(value):
        return value
    candidate = base / value
    return str(candidate) if candidate.exists() else value


# ---------------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    """Trains the recipe's model. ``cfg`` is a loaded recipe (see ``configs/``)."""

    def __init__(self, cfg: dict, resume: bool = False, config_path: str | None = None):
        self.cfg = cfg
        self.opts = dict(TRAIN_DEFAULTS, **(cfg.get("train") or {}))
        unknown = set(self.opts) - set(TRAIN_DEFAULTS)
        if unknown:
            raise ConfigError(f"unknown train options {sorted(unknown)}; known: {sorted(TRAIN_DEFAULTS)}")
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
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)

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
        # by steps: warmup then cosine over the run's steps; by time: the same shape over the time budget,
        # warmup_epochs then being read as a fraction of the budget
        t_initial, warmup_t = (SCHEDULE_UNITS, int(o["warmup_epochs"] * SCHEDULE_UNITS)) if o["schedule_by_time"] else \
            (max(1, self.total_steps), int(o["warmup_epochs"] * self.steps_per_epoch))
        self.scheduler = CosineLRScheduler(
            self.optimizer, t_initial=t_initial, lr_min=o["min_lr"],
            warmup_t=warmup_t, warmup_lr_init=o["lr"] * 1e-3, t_in_epochs=False,
        )
        self.ema = None
        if o["ema_decay"]:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=o["ema_decay"])
        amp = o["amp"]
        if amp not in ("none", "bf16", "fp16"):
            raise ConfigError(f"train.amp must be 'none', 'bf16' or 'fp16', got {amp!r}")
        if amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("train.amp=fp16 needs a CUDA device; use bf16 on CPU")
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)) \
            if amp != "none" else nullcontext
        self.scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
        self.loss_fn = instantiate(cfg["loss"], where="loss") if cfg.get("loss") else None

        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best = None
        self.train_seconds = 0.0
        if resume:
            self._resume()
        elif self.is_main:
            (self.out / "metrics.csv").unlink(missing_ok=True)
        if self.is_main:
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
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
        if not self.is_main:
            return
        atomic_torch_save(self.checkpoint_state(), self.out / "last.pt")
        write_json_atomic({"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch},
                          self.out / "last.json", indent=None)

    def _resume(self) -> None:
        path = self.out / "last.pt"
        if not path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.best = state.get("best")
        self.train_seconds = float(state.get("train_seconds", 0.0))
        if self.is_main:  # drop metric rows written after the checkpoint
            path = self.out / "metrics.csv"
            if path.is_file():
                rows = [r for r in csv.DictReader(path.open()) if int(r["step"]) <= self.step]
                self._write_rows(rows, mode="w")

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

    def fit(self) -> dict:
        o = self.opts
        start = time.time()
        done = self.step >= self.total_steps
        while not done and self.epoch < o["epochs"]:
            self.train_set.set_epoch(self.epoch)
            self.model.train()
            epoch_batches = self.batches.batches(self.epoch)
            todo = epoch_batches[self.batch_in_epoch:]
            bar = progress(todo, desc=f"epoch {self.epoch}", leave=False) if self.is_main else todo
            accum = []
            for indices in bar:
                accum.append(indices)
                self.batch_in_epoch += 1
                last_of_epoch = self.batch_in_epoch == len(epoch_batches)
                if len(accum) < o["accumulate"] and not last_of_epoch:
                    continue
                step_start = time.time()
                loss = self._optimizer_step(accum)
                self.train_seconds += time.time() - step_start  # kept in checkpoints, so a resumed run continues the budget
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
                    break
            if self.batch_in_epoch >= len(epoch_batches):
                self.epoch += 1
                self.batch_in_epoch = 0
            last = done or self.epoch >= o["epochs"]
            metrics = self.evaluate_and_track() if (last or self.epoch % o["eval_every"] == 0) else {}
            self.save_checkpoint()
            if self.is_main and metrics:
                print(f"epoch {self.epoch} step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
        if self.is_main:
            atomic_save_weights(self.ema.module if self.ema else self.model, self.out / "model.safetensors")
            self.plot()
        summary = {"steps": self.step, "epochs": self.epoch, "best": self.best, "seconds": time.time() - start,
                   "train_seconds": self.train_seconds}
        if self.is_main:
            write_json_atomic(summary, self.out / "summary.json")
        return summary

    def _out_of_time(self) -> bool:
        """``train.max_minutes`` of training (evaluation not counted) are used up, on any process."""
        limit = self.opts["max_minutes"]
        if not limit:
            return False
        return all_reduce_sum([float(self.train_seconds > 60 * float(limit))], self.device)[0] > 0

    def _optimizer_step(self, accum: list[list[int]]) -> float:
        o = self.opts
        n_total = sum(len(b) for b in accum)
        total = 0.0
        for i, indices in enumerate(accum):
            x, y = self.task.load_batch(self.train_set, indices, self.device)
            if self.opts["channels_last"]:
                x = to_channels_last(x)
            sync = nullcontext() if (self.world == 1 or i == len(accum) - 1) else self.net.no_sync()
            with sync:
                with self.autocast():
                    loss = self.task.training_loss(self.net, x, y, self.loss_fn) * (len(indices) / n_total)
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
    def evaluate(self, model: torch.nn.Module | None = None, dataset=None) -> dict[str, float]:
        """The task's validation metrics (the same on every process)."""
        model = model or (self.ema.module if self.ema else self.model)
        dataset = dataset if dataset is not None else self.val_set
        if dataset is None:
            return {}
        model.eval()
        return self.task.evaluate(model, dataset, self.rank, self.world, self.device, self.autocast,
                                  self.opts["eval_batch_size"])

    def evaluate_and_track(self) -> dict[str, float]:
        metrics = self.evaluate()
        if metrics:
            self.log("val", metrics)
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


def load_model_for_eval(cfg: dict, checkpoint: str, meta: dict) -> torch.nn.Module:
    """The recipe's model with weights from a ``.safetensors`` file or a trainer checkpoint (``last.pt``)."""
    import visionattn

    model = get_task(cfg).build_model(cfg, meta)
    if checkpoint.endswith(".pt"):
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "model" not in state:
            raise ConfigError(f"{checkpoint} is not a visionattn trainer checkpoint (no 'model' entry)")
        task = state.get("task", "classification")
        if task != cfg.get("task", "classification"):
            raise ConfigError(f"{checkpoint} was trained for {task}, but the recipe is a {cfg.get('task', 'classification')} recipe")
        model.load_state_dict(state["model"])
    else:
        visionattn.load_checkpoint(model, checkpoint)
    return model.eval()
