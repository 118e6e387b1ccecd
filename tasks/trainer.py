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
import hashlib
import math
import os
import pickle
import random
import re
import shutil
import sys
import time
import warnings
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
from visionattn.tasks.files import atomic_path, write_json_atomic, write_text_atomic

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
    """Write to a temporary name in the same folder, flush it to the disk, then rename: neither a crash nor
    a power cut leaves a partial file under ``path``."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())


def atomic_save_weights(model: torch.nn.Module, path: Path) -> None:
    """The model's weights as ``.safetensors``, with their :func:`state_digest` in the file's metadata."""
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
    metadata = {"format": "pt", SAFETENSORS_DIGEST_KEY: state_digest(tensors)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


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
# checkpoint integrity

CHECKSUM_KEY = "checksum"  # trainer checkpoints: {"sha256": state_digest of every other entry}
SAFETENSORS_DIGEST_KEY = "visionattn.sha256"  # metadata of the .safetensors files atomic_save_weights writes


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, refused by ``weights_only``, failing or lacking its
    checksum, or holding non-finite weights. The message is one line naming the file and the problem."""


def state_digest(obj: Any) -> str:
    """sha256 over a (nested) checkpoint: every tensor's key path, dtype, shape and bytes and every plain
    Python value, dict entries in sorted key order, so the same state always gives the same digest."""
    h = hashlib.sha256()
    _digest_into(h, "", obj)
    return h.hexdigest()


def _digest_into(h, path: str, obj: Any) -> None:
    def put(text: str) -> None:  # length-prefixed, so that no two different states give the same stream
        data = text.encode("utf-8", "backslashreplace")
        h.update(len(data).to_bytes(8, "little") + data)

    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        put(f"{path}:tensor:{t.dtype}:{tuple(t.shape)}")
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        put(f"{path}:dict:{len(obj)}")
        for key in sorted(obj, key=repr):
            _digest_into(h, f"{path}/{key!r}", obj[key])
    elif isinstance(obj, (list, tuple)):
        put(f"{path}:{type(obj).__name__}:{len(obj)}")
        for i, value in enumerate(obj):
            _digest_into(h, f"{path}[{i}]", value)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        put(f"{path}:{type(obj).__name__}:{obj!r}")
    else:  # other objects: only their type, since their repr may hold a memory address
        put(f"{path}:{type(obj).__qualname__}")


def _one_line(e: BaseException, limit: int = 240) -> str:
    """``Type: first sentence`` of an exception, on one line (torch's messages run over several)."""
    text = " ".join(str(e).split()).strip("'\"")
    text = text.split(". ")[0] if text else "empty or cut short"
    return f"{type(e).__name__}: {text[:limit]}"


def _refusal(e: BaseException) -> str:
    """What ``weights_only`` refused (``GLOBAL posix.system``, an unsupported opcode), from torch's message
    (several lines of advice, one of them to allow the global: not what a hostile file deserves)."""
    found = re.search(r"(Unsupported|Trying to load unsupported).*", str(e))
    return found.group(0).split(". ")[0].rstrip(".") if found else type(e).__name__


def read_checkpoint(path: str | Path, require_checksum: bool = False) -> Any:
    """A ``torch.save`` file read with ``weights_only=True`` and checked against its :data:`CHECKSUM_KEY`.

    Returns the loaded object without its checksum entry. Raises ``FileNotFoundError`` for a missing file,
    and :class:`CheckpointError` for a file that cannot be read (truncated, not a checkpoint), holds pickled
    code or other objects ``weights_only`` refuses, fails its checksum, or lacks one while
    ``require_checksum``. Files without a checksum (plain state dicts, checkpoints from before visionattn
    wrote them) are returned unchecked otherwise."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about unusual pickle protocols before refusing them
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused: it holds pickled objects that torch.load(weights_only=True) does not allow, such "
            f"as code ({_refusal(e)}); visionattn never unpickles code"
        ) from e
    except Exception as e:  # RuntimeError (zip), EOFError, KeyError (pickle magic), OSError, ...
        raise CheckpointError(f"{path}: unreadable: truncated, corrupted or not a PyTorch checkpoint ({_one_line(e)})") from e
    stored = obj.pop(CHECKSUM_KEY, None) if isinstance(obj, dict) else None
    if stored is None:
        if require_checksum:
            raise CheckpointError(f"{path}: has no checksum (not written by this trainer, or altered)")
        return obj
    expected = stored.get("sha256") if isinstance(stored, dict) else None
    actual = state_digest(obj)
    if expected != actual:
        raise CheckpointError(
            f"{path}: checksum mismatch: its contents changed after it was written (bit flip, partial copy or "
            f"edit); stored sha256 {str(expected)[:16]}, computed {actual[:16]}"
        )
    return obj


def verify_safetensors_digest(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Check ``tensors`` read from ``path`` against the digest in its metadata, when it has one (files from
    timm, Hugging Face or older visionattn versions have none and pass). Raises :class:`CheckpointError`."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        expected = (f.metadata() or {}).get(SAFETENSORS_DIGEST_KEY)
    if expected is None:
        return
    actual = state_digest(tensors)
    if expected != actual:
        raise CheckpointError(
            f"{path}: checksum mismatch: its tensors changed after it was written (bit flip, partial copy or "
            f"edit); stored sha256 {expected[:16]}, computed {actual[:16]}"
        )


def non_finite_weight(state: dict, param_names: set[str]) -> str | None:
    """The first model or EMA parameter in a checkpoint ``state`` holding NaN or infinity, or None.
    Only parameters are checked: a buffer may hold -inf on purpose (an attention mask)."""
    for part, prefix in (("model", ""), ("ema", "module.")):
        tensors = state.get(part)
        for name, t in (tensors.items() if isinstance(tensors, dict) else ()):
            if (name[len(prefix):] in param_names and isinstance(t, torch.Tensor) and t.is_floating_point()
                    and not torch.isfinite(t).all()):
                return f"{part} weight {name!r}"
    return None


def _keep_as_previous(last: Path, previous: Path) -> None:
    """Make ``previous`` a second name for (or, without hard links, a copy of) ``last``, replacing it
    atomically; ``last`` stays where it is."""
    with atomic_path(previous) as tmp:
        try:
            os.link(last, tmp)
        except OSError:  # file systems without hard links
            shutil.copyfile(last, tmp)


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


RUN_FILES = ("config.yaml", "metrics.csv", "last.pt", "previous.pt", "last.json", "best.safetensors",
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


class Trainer:
    """Trains the recipe's model. ``cfg`` is a loaded recipe (see ``configs/``).

    ``resume`` continues from ``OUTPUT_DIR/last.pt``, or from ``previous.pt`` when last.pt is damaged.
    ``write_outputs=False`` (``visionattn evaluate``) leaves ``output_dir`` untouched: no config.yaml, no
    metrics.csv reset; such a trainer is for :meth:`evaluate` only. A new run never writes over an earlier
    run's files unless ``overwrite`` (:func:`refuse_to_overwrite_run`).
    """

    def __init__(self, cfg: dict, resume: bool = False, config_path: str | None = None, write_outputs: bool = True,
                 overwrite: bool = False):
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
        # whether last.pt / previous.pt on disk are good checkpoints of this run (see save_checkpoint)
        self._last_is_ours = self._previous_is_ours = False
        if resume:
            self._resume()  # reads only: a run that cannot resume leaves the folder as it was
        self.tb = None
        if self.is_main and write_outputs:
            self.out.mkdir(parents=True, exist_ok=True)
            if resume:
                self._drop_metrics_after(self.step)
            else:
                (self.out / "metrics.csv").unlink(missing_ok=True)
            write_text_atomic(yaml.safe_dump(cfg, sort_keys=False), self.out / "config.yaml")
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
            raise CheckpointError(f"{path}: does not fit this recipe's model or training setup ({_one_line(e)})") from e
        # the file we resumed from is good; a damaged last.pt must not become previous.pt
        self._last_is_ours, self._previous_is_ours = path == last, True

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
    """The recipe's model with weights from a ``.safetensors`` file or a trainer checkpoint (``last.pt``).

    Both are read without unpickling code and checked against the checksum they carry; a file that cannot
    be used raises a one-line :class:`CheckpointError` (a ValueError) naming it."""
    import visionattn

    model = get_task(cfg).build_model(cfg, meta)
    if checkpoint.endswith(".pt"):
        state = read_checkpoint(checkpoint)
        if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
            raise CheckpointError(f"{checkpoint} is not a visionattn trainer checkpoint (no 'model' entry)")
        task = state.get("task", "classification")
        if task != cfg.get("task", "classification"):
            raise ConfigError(f"{checkpoint} was trained for {task}, but the recipe is a {cfg.get('task', 'classification')} recipe")
        try:
            model.load_state_dict(state["model"])
        except (RuntimeError, TypeError, ValueError) as e:
            raise CheckpointError(f"{checkpoint}: does not fit the recipe's model ({_one_line(e, 400)})") from e
    else:
        visionattn.load_checkpoint(model, checkpoint)
    return model.eval()
