"""A trained run: what ``evaluate``, ``predict``, ``segment`` and ``detect`` load.

A run is a folder written by ``visionattn train`` (or bundled with the package): its ``config.yaml`` (the
recipe it was trained by, with the class names the trainer found) and its weights. The folder is data,
not code: the config is validated by :func:`~visionattn.tasks.config.load_run_config` before anything is
built, and weights are read without unpickling code and checked against their checksum.

Weights precedence, the same for every command: a weights file named explicitly; otherwise, in the
folder, :data:`WEIGHTS_PRECEDENCE` in order: ``model.safetensors`` (the final weights, EMA if the run used
it), ``best.safetensors`` (the best validation score), ``last.pt`` (the trainer checkpoint).
"""
from __future__ import annotations

import copy
import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import torch

from visionattn.checkpoints import CheckpointError, one_line_error, read_checkpoint
from visionattn.tasks.config import ConfigError, apply_overrides, load_config, load_run_config
from visionattn.tasks.task import get_task

BUNDLED = Path(str(importlib.resources.files("visionattn") / "bundled"))  # trained models shipped in the wheel
WEIGHTS_PRECEDENCE = ("model.safetensors", "best.safetensors", "last.pt")
WEIGHTS_SUFFIXES = (".safetensors", ".pt", ".pth")


def bundled_runs() -> list[str]:
    """Names of the trained runs bundled with the package (``hippocampus_agunet``)."""
    if not BUNDLED.is_dir():
        return []
    return sorted(p.name for p in BUNDLED.iterdir() if (p / "config.yaml").is_file())


@dataclass(frozen=True)
class Run:
    """A trained run: validated ``config`` (its recipe), the ``weights`` file, and what the user named
    (``source``)."""

    config: dict
    weights: Path
    source: str

    @classmethod
    def load(cls, spec: str | Path) -> "Run":
        """``spec``: a bundled run name (:func:`bundled_runs`), a run folder, or a weights file beside its
        run's ``config.yaml``. Raises ``FileNotFoundError`` / :class:`ConfigError` naming what is missing."""
        path = Path(spec)
        if not path.exists() and str(spec) in bundled_runs():
            path = BUNDLED / str(spec)
        if path.is_dir():
            weights = next((path / n for n in WEIGHTS_PRECEDENCE if (path / n).is_file()), None)
            if weights is None:
                raise FileNotFoundError(f"{path} holds no weights ({', '.join(WEIGHTS_PRECEDENCE)}); "
                                        "is it a `visionattn train` output folder?")
        elif path.is_file():
            if not path.name.endswith(WEIGHTS_SUFFIXES):
                raise ConfigError(f"{path} is not a weights file ({', '.join(WEIGHTS_SUFFIXES)}) nor a run folder")
            weights = path
        else:
            raise FileNotFoundError(f"{spec!r} is neither a run folder, a weights file nor a bundled model "
                                    f"(bundled: {', '.join(bundled_runs()) or 'none'})")
        config_path = weights.parent / "config.yaml"
        if not config_path.is_file():
            raise FileNotFoundError(f"{weights}: no config.yaml beside it; a model needs the config.yaml its "
                                    "training run wrote")
        return cls(load_run_config(config_path), weights, str(spec))

    @classmethod
    def load_for(cls, spec: str | Path, task: str, purpose: str, error: type[Exception]) -> "Run":
        """:meth:`load`, for a command that handles ``task`` runs only: a missing run or a run of another task
        raises ``error`` (the command's own error type), the latter saying ``purpose``."""
        try:
            run = cls.load(spec)
        except FileNotFoundError as e:
            raise error(str(e)) from None
        if run.task != task:
            raise error(f"{spec}: a {run.task} run; {purpose}")
        return run

    @property
    def folder(self) -> Path:
        return self.weights.parent

    @property
    def task(self) -> str:
        return self.config.get("task", "classification")

    @property
    def classes(self) -> list[str]:
        """Class names in label order: recorded by the trainer (``classes``), or the recipe's
        ``data.labels`` (segmentation) / ``data.classes`` (detection)."""
        data = self.config.get("data") or {}
        names = self.config.get("classes") or data.get("labels") or data.get("classes")
        if not names:
            raise ConfigError(f"{self.folder / 'config.yaml'} records no class names (classes, data.labels or "
                              "data.classes)")
        return [str(n) for n in names]

    def build_model(self, meta: dict | None = None) -> torch.nn.Module:
        """The run's network with its weights, in eval mode, on the CPU. ``meta`` adds to the task's
        build information (``{"classes": ...}`` by default)."""
        return load_model_for_eval(self.config, str(self.weights), dict({"classes": self.classes}, **(meta or {})))


def recipe_and_weights(spec: str, checkpoint: str | None = None, overrides: list[str] | None = None
                       ) -> tuple[dict, str, str]:
    """What ``evaluate`` and ``predict`` run: ``(config, weights file, path the config's relative data paths
    are read from)``.

    ``spec`` is a run (folder, weights file or bundled name: :meth:`Run.load`; ``checkpoint`` then picks
    other weights than the precedence would) or a recipe ``.yaml`` with ``checkpoint`` naming the weights.
    With a recipe, class names come from the ``config.yaml`` beside the weights when there is one, so the
    model gets the classes it was trained with."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        if not checkpoint:
            raise ConfigError(f"{spec} is a recipe: pass --checkpoint WEIGHTS, or give the run folder instead")
        cfg = load_config(spec, overrides)
        beside = Path(checkpoint).parent / "config.yaml"
        if "classes" not in cfg and beside.is_file():
            recorded = load_run_config(beside).get("classes")
            if recorded:
                cfg["classes"] = recorded
        return cfg, str(checkpoint), str(spec)
    run = Run.load(spec)
    cfg = apply_overrides(copy.deepcopy(run.config), overrides, str(run.folder / "config.yaml"))
    return cfg, str(checkpoint or run.weights), str(run.folder / "config.yaml")


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
            raise ConfigError(f"{checkpoint} was trained for {task}, but the recipe is a "
                              f"{cfg.get('task', 'classification')} recipe")
        try:
            model.load_state_dict(state["model"])
        except (RuntimeError, TypeError, ValueError) as e:
            raise CheckpointError(f"{checkpoint}: does not fit the recipe's model ({one_line_error(e, 400)})") from e
    else:
        visionattn.load_checkpoint(model, checkpoint)
    return model.eval()
