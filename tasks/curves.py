"""Validation metric against training time, read from run folders' ``metrics.csv``: the data behind
``visionattn curves`` (any task: mAP for detection, Dice for segmentation, accuracy for classification) and
``visionattn crossval --plot``.

The trainer logs, at every validation, the metrics (rows ``split == "val"``) and the training seconds spent so
far on the run's budget clock (``split == "time"``, same step), so a run resumed over several sessions still
draws one curve over its own training time. Run folders are read as untrusted input: the file's size is
bounded, every row must parse, and a bad row is an error naming the file and line.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

from visionattn.tasks.config import ConfigError, read_yaml_file

__all__ = ["Curve", "CurveError", "MAX_METRICS_BYTES", "curve_groups", "format_curve_table", "plot_curves",
           "primary_metric", "read_curve"]

MAX_METRICS_BYTES = 64 * 1024 * 1024


class CurveError(ValueError):
    """A run folder whose curve cannot be read or drawn (the message names the folder and the fix)."""


@dataclass(frozen=True)
class Curve:
    """One run's validation ``metric`` at ``minutes`` of training (budget clock), in step order."""

    run: Path
    metric: str
    minutes: tuple[float, ...]
    values: tuple[float, ...]
    steps: tuple[int, ...]


def read_curve(run: Path, metric: str) -> Curve:
    """The curve of ``metric`` in ``run/metrics.csv`` (validations without a time row are left out)."""
    path = run / "metrics.csv"
    try:
        size = path.stat().st_size
        if size > MAX_METRICS_BYTES:
            raise CurveError(f"{path}: {size} bytes, more than {MAX_METRICS_BYTES // 2**20} MiB; not a metrics "
                             "file this trainer writes")
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise CurveError(f"{run}: no metrics.csv; give a run folder written by `visionattn train` "
                         "(or a crossval folder holding fold*/)") from None
    except UnicodeDecodeError:
        raise CurveError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise CurveError(f"cannot read {path}: {e.strerror or e}") from None
    seconds: dict[int, float] = {}
    values: dict[int, float] = {}
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None or not {"step", "split", "name", "value"} <= set(reader.fieldnames):
        raise CurveError(f"{path}: expected the columns step, split, name, value; got {reader.fieldnames}")
    for row in reader:
        if row["split"] not in ("time", "val") or (row["split"] == "val" and row["name"] != metric):
            continue
        try:
            step, value = int(row["step"]), float(row["value"])
        except (TypeError, ValueError):
            raise CurveError(f"{path}, line {reader.line_num}: step {row['step']!r} / value {row['value']!r} "
                             "are not numbers") from None
        (seconds if row["split"] == "time" else values)[step] = value  # a resumed run re-logs a step: last wins
    steps = sorted(s for s in values if s in seconds and math.isfinite(seconds[s]))
    return Curve(run, metric, tuple(seconds[s] / 60 for s in steps), tuple(values[s] for s in steps), tuple(steps))


def curve_groups(folders: list[Path]) -> list[tuple[str, list[Path]]]:
    """Each folder as ``(label, runs)``: a run folder (it has metrics.csv) is one run; a crossval folder, its
    ``fold*`` runs (one colour, one line per fold)."""
    groups = []
    for folder in folders:
        if not folder.is_dir():
            raise CurveError(f"{folder}: no such folder; give run folders or crossval folders")
        if (folder / "metrics.csv").is_file():
            groups.append((folder.name, [folder]))
            continue
        folds = sorted(p for p in folder.glob("fold*") if (p / "metrics.csv").is_file())
        if not folds:
            raise CurveError(f"{folder}: neither a run folder (no metrics.csv) nor a crossval folder (no "
                             "fold*/metrics.csv)")
        groups.append((folder.name, folds))
    return groups


def primary_metric(run: Path) -> str:
    """The metric that picks a run's best checkpoint (its task's), from the run's ``config.yaml``."""
    from visionattn.tasks.task import get_task

    try:
        cfg = read_yaml_file(run / "config.yaml")
        if not isinstance(cfg, dict):
            raise ConfigError(f"{run / 'config.yaml'}: not a mapping")
        return get_task(cfg).primary_metric
    except ConfigError as e:
        raise CurveError(f"{e}; name the metric with --metric") from None


def plot_curves(png: Path, groups: list[tuple[str, list[Path]]], metric: str) -> list[Curve]:
    """Draw validation ``metric`` against training minutes: one colour per group, one line per run; the PNG
    is written atomically. Returns the curves drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from visionattn.tasks.files import atomic_path, make_folder

    curves = [(i, label, read_curve(run, metric)) for i, (label, runs) in enumerate(groups) for run in runs]
    drawn = [(i, label, c) for i, label, c in curves if c.values]
    if not drawn:
        raise CurveError(f"no run in {', '.join(label for label, _ in groups)} has validation {metric!r} with "
                         "training times in its metrics.csv (runs from before the trainer logged times have none)")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labelled = set()
    for i, label, c in drawn:
        ax.plot(c.minutes, c.values, color=colours[i % len(colours)], alpha=0.8, lw=1.2, marker="." if
                len(c.values) < 40 else None, label=None if label in labelled else label)
        labelled.add(label)
    ax.set_xlabel("training time (minutes, budget clock)")
    ax.set_ylabel(f"validation {metric}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    make_folder(png.parent, "folder of the plot")
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return [c for _, _, c in drawn]


def format_curve_table(curves: list[Curve]) -> str:
    """A Markdown table: per run, minutes trained, steps, the last and the highest value."""
    lines = [f"| run | minutes | steps | last {curves[0].metric} | highest (at minutes) |", "|---|---|---|---|---|"]
    for c in curves:
        best = max(range(len(c.values)), key=c.values.__getitem__)
        lines.append(f"| {c.run} | {c.minutes[-1]:.1f} | {c.steps[-1]} | {c.values[-1]:.4f} | "
                     f"{c.values[best]:.4f} ({c.minutes[best]:.1f}) |")
    return "\n".join(lines)
