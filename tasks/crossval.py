"""``visionattn crossval``: k-fold cross-validation of a segmentation recipe, nnU-Net style.

``visionattn crossval RECIPE [key=value ...] --folds 5 -o DIR`` trains fold K of the recipe's case list
(``data.folds``/``data.fold``: every case is validated by exactly one fold) into ``DIR/foldK``, one fold after
the other. A fold whose ``summary.json`` exists is finished and kept; one with a ``last.pt`` is resumed
(resume is exact), so the command can be stopped and run again. Then each fold's final weights
(``model.safetensors``) are evaluated on that fold's validation cases (Dice and surface Dice per label) and the
report is written atomically to ``DIR/crossval.json``, with a table on stdout::

    fold  cases  steps  train min    dice  dice_anterior  ...
    0        44   2211       24.0  0.8861         0.8912  ...
    mean    220                    0.8850 +- 0.0031  ...

``--report-only`` trains nothing (folds still missing are listed). ``--only 1,3`` trains and reports those
folds only (its report: ``DIR/crossval_folds_1_3.json``): two commands with different folds can share one
``DIR`` and run at the same time (one per core or machine), and a later ``--report-only`` reports all.
``--tta`` evaluates with test-time mirroring along the axes the recipe flips in training (nnU-Net's
validation), into its own report (``DIR/crossval_tta.json``). ``--plot PNG DIR [DIR ...]`` draws the
validation Dice against training minutes of the folds of one or more crossval folders side by side (the
comparison of networks at the same budget), from each fold's ``metrics.csv``.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

from visionattn.tasks.config import ConfigError, load_config

REPORT = "crossval.json"


class CrossValError(Exception):
    """A cross-validation that cannot run as asked (message says what and how to fix it)."""


def fold_recipe(recipe: str, overrides: list[str], folds: int, fold: int, out: Path) -> dict:
    """The recipe of fold ``fold``: the user's recipe and overrides, then the fold settings and its folder.
    Only a segmentation recipe has folds (other tasks' data sections refuse the fold keys): said first."""
    task = load_config(recipe, overrides).get("task")
    if task != "segmentation":
        raise CrossValError(f"crossval runs segmentation recipes; {recipe} has task {task!r}")
    return load_config(recipe, [*overrides, f"data.folds={folds}", f"data.fold={fold}", f"output_dir={out}"])


def fold_state(out: Path) -> str:
    """``done`` (``summary.json`` written), ``partial`` (a checkpoint to resume) or ``new``."""
    if (out / "summary.json").is_file() and (out / "model.safetensors").is_file():
        return "done"
    if (out / "last.pt").is_file():
        return "partial"
    return "new"


def train_folds(recipe: str, overrides: list[str], folds: int, out_dir: Path, only: list[int] | None = None,
                say=print) -> None:
    """Train (or resume) every unfinished fold in turn."""
    from visionattn.tasks.trainer import Trainer

    for k in only if only is not None else range(folds):
        out = out_dir / f"fold{k}"
        state = fold_state(out)
        if state == "done":
            say(f"crossval: fold {k}: finished earlier ({out}), kept")
            continue
        cfg = fold_recipe(recipe, overrides, folds, k, out)
        say(f"crossval: fold {k}: {'resuming' if state == 'partial' else 'training'} in {out}")
        Trainer(cfg, resume=state == "partial", config_path=recipe).fit()


def evaluate_fold(out: Path, tta: bool = False) -> dict:
    """The fold's final weights on its validation cases: ``{metrics..., cases, steps, train_minutes, per_case}``
    (``per_case``: one row of metrics per validation case); with ``tta``, each prediction averaged over the
    mirrorings along the axes the recipe flipped in training."""
    from visionattn.tasks.run import Run, load_model_for_eval
    from visionattn.tasks.trainer import Trainer

    run = Run.load(out / "model.safetensors")
    cfg = run.config
    cfg.setdefault("train", {})["epochs"] = 0
    if tta:
        cfg["inference"] = dict(cfg.get("inference") or {}, tta=True)
    trainer = Trainer(cfg, write_outputs=False)
    model = load_model_for_eval(cfg, str(run.weights), trainer.meta).to(trainer.device)
    per_case: list = []
    metrics = trainer.evaluate(model, per_case=per_case)
    summary = json.loads((out / "summary.json").read_text())
    return dict(metrics, cases=len(trainer.meta["val_cases"]), steps=int(summary.get("steps", 0)),
                train_minutes=float(summary.get("train_seconds", 0.0)) / 60, per_case=per_case)


def summarise(per_fold: dict[int, dict]) -> dict:
    """Mean and standard deviation over folds of every metric, and the case-weighted mean (every case once)."""
    names = [k for k in next(iter(per_fold.values())) if k not in ("cases", "steps", "train_minutes")]
    mean, std, case_mean = {}, {}, {}
    total = sum(f["cases"] for f in per_fold.values())
    for name in names:
        values = [f[name] for f in per_fold.values() if not math.isnan(f[name])]
        mean[name] = statistics.fmean(values) if values else float("nan")
        std[name] = statistics.stdev(values) if len(values) > 1 else 0.0
        case_mean[name] = sum(f[name] * f["cases"] for f in per_fold.values()) / total
    return {"folds": {str(k): v for k, v in sorted(per_fold.items())}, "mean": mean, "std": std,
            "case_weighted_mean": case_mean, "cases": total,
            "train_minutes": sum(f["train_minutes"] for f in per_fold.values())}


def format_table(report: dict) -> str:
    folds = report["folds"]
    names = list(report["mean"])
    widths = [max(16, len(n) + 2) for n in names]  # a metric's name never runs into the one before it
    head = f"{'fold':<6}{'cases':>6}{'steps':>7}{'train min':>10}" + "".join(f"{n:>{w}}" for n, w in zip(names, widths))
    lines = [head]
    for k, f in folds.items():
        lines.append(f"{k:<6}{f['cases']:>6}{f['steps']:>7}{f['train_minutes']:>10.1f}"
                     + "".join(f"{f[n]:>{w}.4f}" for n, w in zip(names, widths)))
    lines.append(f"{'mean':<6}{report['cases']:>6}{'':>7}{report['train_minutes']:>10.1f}"
                 + "".join(f"{report['mean'][n]:.4f}+-{report['std'][n]:.3f}".rjust(w) for n, w in zip(names, widths)))
    return "\n".join(lines)


def plot_dice_versus_time(png: Path, cv_dirs: list[Path], metric: str = "dice") -> Path:
    """Validation ``metric`` against training minutes, one colour per crossval folder (its name), one line per
    fold; written atomically to ``png`` (:func:`visionattn.tasks.curves.plot_curves`)."""
    from visionattn.tasks.curves import CurveError, curve_groups, plot_curves

    try:
        plot_curves(png, curve_groups(cv_dirs), metric)
    except CurveError as e:
        raise CrossValError(str(e)) from None
    return png


def parse_only(text: str | None, folds: int) -> list[int] | None:
    """``--only 0,2`` -> ``[0, 2]`` (None: every fold)."""
    if text is None:
        return None
    try:
        chosen = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise CrossValError(f"--only takes fold numbers separated by commas, e.g. 0,2; got {text!r}") from None
    if not chosen or any(not 0 <= k < folds for k in chosen):
        raise CrossValError(f"--only: folds are numbered 0..{folds - 1} (--folds {folds}); got {text!r}")
    return chosen


def run_crossval(recipe: str | None, overrides: list[str], folds: int, out_dir: str | None, report_only: bool = False,
                 plot: str | None = None, plot_dirs: list[str] | None = None, only: str | None = None,
                 tta: bool = False) -> int:
    """The command; returns its exit status."""
    from visionattn.tasks.files import write_json_atomic

    if plot:
        dirs = [Path(d) for d in plot_dirs or []]
        missing = [str(d) for d in dirs if not d.is_dir()]
        if not dirs or missing:
            print(f"visionattn crossval: --plot needs crossval folders; missing: {missing or 'none given'}",
                  file=sys.stderr)
            return 2
        try:
            print(f"wrote {plot_dice_versus_time(Path(plot), dirs)}")
        except CrossValError as e:
            print(f"visionattn crossval: {e}", file=sys.stderr)
            return 2
        return 0
    if recipe is None or out_dir is None:
        print("visionattn crossval: give a RECIPE and -o DIR (or --plot PNG DIR ...)", file=sys.stderr)
        return 2
    if folds < 2:
        print(f"visionattn crossval: --folds must be 2 or more, got {folds}", file=sys.stderr)
        return 2
    out = Path(out_dir)
    try:
        chosen = parse_only(only, folds)
        cfg = fold_recipe(recipe, overrides, folds, 0, out / "fold0")  # the recipe and overrides are valid
        from visionattn.tasks.segmentation import mirror_axes

        axes = mirror_axes(cfg.get("data") or {}) if tta else []
        if tta and not axes:
            raise CrossValError(f"--tta: {recipe} trains without flips (data.augment.flip_axes), so there is no "
                                "axis to mirror; leave out --tta")
        if not report_only:
            train_folds(recipe, overrides, folds, out, only=chosen)
    except (ConfigError, CrossValError) as e:
        print(f"visionattn crossval: {e}", file=sys.stderr)
        return 2
    chosen = chosen if chosen is not None else list(range(folds))
    missing = [k for k in chosen if fold_state(out / f"fold{k}") != "done"]
    if missing:
        print(f"visionattn crossval: fold(s) {missing} not finished in {out}: run without --report-only to train "
              "them", file=sys.stderr)
        return 1
    per_fold = {}
    for k in chosen:
        print(f"crossval: evaluating fold {k} ({out / f'fold{k}'}){' with test-time mirroring' if tta else ''}",
              flush=True)
        per_fold[k] = evaluate_fold(out / f"fold{k}", tta=tta)
    # every validated case once, with its fold (nnU-Net's metric_per_case); the folds' entries keep the means
    per_case = [dict(row, fold=k) for k in chosen for row in per_fold[k].pop("per_case")]
    report = dict(summarise(per_fold), recipe=str(recipe), overrides=list(overrides), num_folds=folds,
                  tta_mirror_axes=axes, per_case=per_case)
    # a report of some folds only, or with TTA, is its own file: it never replaces the report of all of them
    stem = "crossval" if len(chosen) == folds else f"crossval_folds_{'_'.join(map(str, chosen))}"
    path = out / f"{stem}{'_tta' if tta else ''}.json"
    write_json_atomic(report, path)
    print(format_table(report))
    print(f"wrote {path}")
    return 0
