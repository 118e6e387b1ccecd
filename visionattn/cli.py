"""The ``visionattn`` command: ``list``, ``info``, ``bench``, ``train``, ``evaluate``, ``predict``, ``segment``, ``detect``.

Starting is cheap: this module imports only the standard library, and ``import visionattn`` (run first, as
the package of this module) imports nothing heavy (see :mod:`visionattn`). Each command imports what it
needs when it runs, so ``visionattn --help`` and ``visionattn list`` never import torch, timm, torchvision
or MONAI: ``list`` reads the static table :mod:`visionattn._model_index`, which
``tests/test_cli_startup.py`` keeps equal to the live registry (rewrite it with :func:`write_model_index`).

A mistyped subcommand or option is a usage error (exit 2) naming the closest known ones.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
from pathlib import Path

MODEL_INDEX = Path(__file__).with_name("_model_index.py")


def model_index_source() -> str:
    """The text of :data:`MODEL_INDEX` for the live registry (this imports every model family)."""
    import visionattn

    rows = [(name, visionattn.get_entry(name).task, visionattn.get_entry(name).timm_name)
            for name in visionattn.list_models()]
    return ('"""Every registered model: (name, task, timm name), in ``visionattn.list_models()`` order.\n\n'
            "Generated from the registry, so that ``visionattn list`` runs without importing torch; a test\n"
            "checks it is current. After adding or renaming a model, rewrite it with\n"
            "``python -c 'import visionattn.cli as c; c.write_model_index()'``.\n"
            '"""\n\nMODELS = (\n' + "".join(f"    {row!r},\n" for row in rows) + ")\n")


def write_model_index() -> None:
    MODEL_INDEX.write_text(model_index_source(), encoding="utf-8")


def columns(headers: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns as wide as their longest cell, under a header and a rule."""
    cells = [list(headers)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cmd_list(args: argparse.Namespace) -> int:
    from fnmatch import fnmatchcase

    from visionattn._model_index import MODELS

    pattern = args.pattern or "*"
    if pattern.startswith("va_"):  # as visionattn.list_models: timm's names match too
        pattern = pattern[len("va_"):]
    rows = [[name, task, timm_name or "-"] for name, task, timm_name in MODELS
            if fnmatchcase(name, pattern) and (args.task is None or task == args.task)]
    if not rows:
        print(f"no model matches {args.pattern!r}", file=sys.stderr)
        return 1
    print(columns(["name", "task", "timm name"], rows))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import visionattn

    info = visionattn.model_info(args.name)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    rows = [
        ("name", info["name"]),
        ("timm name", info["timm_name"] or "-"),
        ("task", info["task"]),
        ("params", f"{info['params']:,} ({info['params_m']:.2f} M)"),
        ("FLOPs", f"{info['gflops']:.2f} GFLOPs ({info['gmacs']:.2f} GMACs) at {'x'.join(map(str, info['input_size']))}"),
        ("input size", "x".join(map(str, info["input_size"]))),
        ("paper", info["paper"]),
        ("notes", info["notes"] or "-"),
        ("reported", "; ".join(info["reported"]) or "-"),
    ]
    for k, v in rows:
        print(f"{k:11s} {v}")
    return 0


def _check_bench_json(path: str | None, overwrite: bool) -> None:
    """Refuse ``--json PATH`` before any timing (a kernel benchmark takes minutes): an existing file is kept
    unless ``--overwrite``, and the folder must exist."""
    from visionattn.errors import UserError

    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise UserError(f"--json {path}: is a folder; give a file name, e.g. {target / 'bench.json'}")
    if not target.parent.is_dir():
        raise UserError(f"--json {path}: the folder {target.parent} does not exist; create it first")
    if target.exists() and not overwrite:
        raise UserError(f"--json {path}: the file exists (an earlier measurement?); pass --overwrite to replace it, "
                        "or name another file")


def _cmd_bench(args: argparse.Namespace) -> int:
    _check_bench_json(args.json, args.overwrite)
    if args.what == "models":
        from visionattn.tasks.bench import bench_models

        if not args.names:
            print("bench models: name at least one model, e.g. `visionattn bench models convit_tiny --compare timm`", file=sys.stderr)
            return 2
        table, rows = bench_models(
            args.names, compare=args.compare, batch_size=args.batch_size, img_size=args.img_size,
            threads=args.threads, min_time=args.min_time or 5.0, report=_print_now, breakdown=args.breakdown,
        )
    elif args.what == "kernels":
        from visionattn.tasks.bench import bench_kernels

        problems = args.problems.split(",") if args.problems else None
        skip = tuple(s for s in (args.skip or "").split(",") if s)
        table, rows = bench_kernels(
            device=args.device, problems=problems, skip=skip, min_time=args.min_time or 1.0, threads=args.threads,
            report=_print_now,
        )
    elif args.what == "herseg-memory":
        from visionattn.tasks.bench_herseg import bench_herseg_memory, format_table

        rows = bench_herseg_memory(size=args.img_size or 1024, batch=1, threads=args.threads)
        table = format_table(rows)
    elif args.what == "detectors":
        from visionattn.tasks.bench_detection import bench_detectors, format_table

        rows = bench_detectors(size=args.img_size or 640, threads=args.threads)
        table = format_table(rows)
    elif args.what == "segment":
        from visionattn.tasks.bench_segment import bench_segment_time

        table, rows = bench_segment_time(args.names[0] if args.names else "hippocampus_agunet", threads=args.threads)
    elif args.what == "segment-tta":
        from visionattn.tasks.bench_segment import bench_segment_tta

        table, rows = bench_segment_tta(args.names[0] if args.names else "hippocampus_agunet", threads=args.threads)
    elif args.what == "segment-memory":
        from visionattn.tasks.bench_segment import bench_segment_memory

        table, rows = bench_segment_memory(args.names[0] if args.names else "hippocampus_agunet",
                                           shape=args.shape, overlap=args.overlap, threads=args.threads)
    elif args.what == "train":
        from visionattn.tasks.bench_train import DEFAULT_RECIPES, bench_train, format_table

        rows = []
        for recipe in args.names or DEFAULT_RECIPES:
            _print_now(f"{recipe}:")
            rows.append(bench_train(recipe, steps=args.steps, threads=args.threads, report=_print_now))
        table = format_table(rows)
    else:
        print(f"unknown benchmark {args.what!r}", file=sys.stderr)
        return 2
    if args.what in ("models", "kernels", "train"):
        print(flush=True)  # the rows came as they were measured; the table follows
    print(table)
    if args.json:
        from visionattn.tasks.files import write_json_atomic
        from visionattn.tasks.runtime import machine_info

        # every row says where it was measured: this project's machines differ by about 2x in the same command
        machine = machine_info(getattr(args, "device", None) or "cpu")
        write_json_atomic([{**row, "machine": machine} for row in rows], args.json)
    return 0


def _print_now(line: str) -> None:
    print(line, flush=True)


def _cmd_train(args: argparse.Namespace) -> int:
    from visionattn.tasks.config import load_config
    from visionattn.tasks.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    summary = Trainer(cfg, resume=args.resume, config_path=args.config, overwrite=args.overwrite).fit()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from visionattn.tasks.run import load_model_for_eval, recipe_and_weights
    from visionattn.tasks.trainer import Trainer

    cfg, weights, config_path = recipe_and_weights(args.config, args.checkpoint, args.overrides)
    if args.per_case and cfg.get("task") != "segmentation":
        print(f"evaluate: --per-case reports segmentation recipes' metrics case by case; this recipe's task is "
              f"{cfg.get('task', 'classification')!r} (leave --per-case out)", file=sys.stderr)
        return 2
    cfg.setdefault("train", {})["epochs"] = 0
    trainer = Trainer(cfg, config_path=config_path, write_outputs=False)  # evaluating leaves the run folder as it is
    model = load_model_for_eval(cfg, weights, trainer.meta).to(trainer.device)
    per_case: list | None = [] if args.per_case else None
    metrics = trainer.evaluate(model, per_case=per_case)
    if not metrics:
        print("evaluate: the recipe defines no validation data (e.g. data.val_per_class, data.val_root, an npz val "
              "split, or data.val_fraction)", file=sys.stderr)
        return 2
    print(json.dumps(metrics if per_case is None else dict(metrics, per_case=per_case), indent=2))
    return 0


def _cmd_crossval(args: argparse.Namespace) -> int:
    from visionattn.tasks.crossval import run_crossval

    if args.plot:
        return run_crossval(None, [], args.folds, None, plot=args.plot, plot_dirs=[args.config, *args.overrides])
    return run_crossval(args.config, args.overrides, args.folds, args.output, report_only=args.report_only,
                        only=args.only, tta=args.tta)


def _cmd_curves(args: argparse.Namespace) -> int:
    from visionattn.tasks.curves import CurveError, curve_groups, format_curve_table, plot_curves, primary_metric

    try:
        groups = curve_groups([Path(f) for f in args.folders])
        metric = args.metric or primary_metric(groups[0][1][0])
        curves = plot_curves(Path(args.output), groups, metric)
    except CurveError as e:
        print(f"visionattn curves: {e}", file=sys.stderr)
        return 2
    print(format_curve_table(curves))
    print(f"wrote {args.output}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from visionattn.tasks.predict import predict_classification

    return predict_classification(args.config, args.checkpoint, args.input, args.output, args.overrides,
                                  overwrite=args.overwrite)


def _cmd_segment(args: argparse.Namespace) -> int:
    from visionattn.tasks.segment import SegmentError, bundled_models, run_segment

    if args.list_models:
        print("\n".join(bundled_models()))
        return 0
    if args.input is not None and args.output is None:
        print("visionattn segment: error: -i/--input needs -o/--output", file=sys.stderr)
        return 2
    try:
        model = args.model[0] if args.model and len(args.model) == 1 else args.model  # several: an ensemble
        return run_segment(args.input, args.output, model, device=args.device, roi_size=args.roi_size,
                           overlap=args.overlap, mode=args.mode, tta=args.tta, save_probabilities=args.save_probabilities,
                           overwrite=args.overwrite, progress=not args.no_progress, overlay=args.overlay,
                           labels_dir=args.labels, max_voxels=args.max_voxels, engine=args.engine,
                           onnx_path=args.onnx, threads=args.threads)
    except SegmentError as e:
        print(f"visionattn segment: error: {e}", file=sys.stderr)
        return 2


def _cmd_export(args: argparse.Namespace) -> int:
    from visionattn.tasks.export import run_export

    return run_export(args.model, args.format, args.output, overwrite=args.overwrite, sizes=args.sizes,
                      onnx_exporter=args.onnx_exporter, kwargs=args.kwarg, atol=args.atol, rtol=args.rtol)


def _cmd_detect(args: argparse.Namespace) -> int:
    from visionattn.tasks.detect import collect_images, detect, load_detection_model

    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    model, class_names = load_detection_model(args.model, num_classes=args.num_classes, classes=classes,
                                              input_size=args.img_size)
    # the output folder may sit inside the input folder: what it holds is never taken as input
    images = collect_images(args.input, exclude=args.output)
    summary = detect(model, images, args.output, score_threshold=args.score_threshold, overwrite=args.overwrite,
                     device=args.device, batch_size=args.batch_size, draw=not args.no_draw, classes=class_names,
                     max_image_pixels=args.max_image_pixels,
                     input_folder=args.input if os.path.isdir(args.input) else None, model_name=args.model)
    return 1 if summary["failed"] else 0


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that keeps its option strings and its subcommands, for :func:`check_spelling`.
    Subparsers are of the same class (argparse makes them with ``type(parser)``)."""

    def __init__(self, *args, **kwargs):
        self.option_names: list[str] = []
        self.subcommands: dict[str, Parser] = {}
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        self.option_names.extend(action.option_strings)
        return action

    def add_subparsers(self, **kwargs):
        action = super().add_subparsers(**kwargs)
        self.subcommands = action.choices  # filled in by add_parser
        return action


_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")  # a value, not an option (argparse's own test)


def _did_you_mean(word: str, known: list[str]) -> str:
    close = difflib.get_close_matches(word, known, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def check_spelling(parser: Parser, argv: list[str]) -> None:
    """Before argparse parses ``argv``: a subcommand or option that no parser knows is a usage error (exit 2)
    with the closest known names. Options are checked against the subcommand they follow; an unambiguous or
    ambiguous prefix (``--min`` for ``--min-time``) and a short option with its value attached (``-ifile``)
    are left to argparse, as is everything after ``--``."""
    target = parser
    for token in argv:
        if token == "--":
            return
        if not token.startswith("-") or token == "-" or _NEGATIVE_NUMBER.match(token):
            if target is parser and parser.subcommands:  # the first word is the subcommand
                if token not in parser.subcommands:
                    parser.error(f"argument command: invalid choice: {token!r}{_did_you_mean(token, list(parser.subcommands))}"
                                 f"; choose from {', '.join(parser.subcommands)}")
                target = parser.subcommands[token]
            continue
        name = token.split("=", 1)[0]
        known = target.option_names
        if name in known or (name.startswith("--") and any(k.startswith(name) for k in known)) or \
                (not name.startswith("--") and token[:2] in known):
            continue
        target.error(f"unrecognized arguments: {name}{_did_you_mean(name, known)}")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="visionattn", description="Attention-based vision and medical-imaging models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list registered models")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. 'convit*'")
    p.add_argument("--task", choices=["classification", "segmentation", "detection"])
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("info", help="task, params, FLOPs, input size and paper of a model")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "bench", help="benchmarks: `bench models NAME... [--compare timm]`, `bench kernels [--device cpu|cuda]`, "
                      "`bench herseg-memory`, `bench segment [MODEL]`, `bench segment-memory [MODEL] [--shape X Y Z]`, "
                      "`bench detectors [--img-size 640]`, `bench train [RECIPE...] [--steps N]`"
    )
    p.add_argument("what", choices=["models", "kernels", "herseg-memory", "segment", "segment-tta", "segment-memory",
                                      "detectors", "train"])
    p.add_argument("names", nargs="*")
    p.add_argument("--compare", choices=["timm", "gather", "peer"],
                   help="models: time timm's model of the same name (same weights), or for BiFormer the official "
                        "full-gather routed attention (time and peak memory), or (peer) the timm model of the same "
                        "design (Gated-SwinRMT: Swin-T) in inference and a training step, images/s and per GMAC")
    p.add_argument("--breakdown", action="store_true",
                   help="models, with --compare peer: also where each model's inference time goes (linear layers, "
                        "convolutions, attention products, the rest): time share, GMACs and GFLOP/s beside the peer's")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--min-time", type=float, default=None, help="seconds of timing per measurement (models 5, kernels 1)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="kernels: device to run on")
    p.add_argument("--problems", help="kernels: comma-separated problem names (default: the four standard ones)")
    p.add_argument("--skip", help="kernels: comma-separated alternatives to leave out: naive, dense, flex")
    p.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300], help="segment-memory: volume size")
    p.add_argument("--overlap", type=float, default=0.0, help="segment-memory: window overlap")
    p.add_argument("--steps", type=int, default=10, help="train: optimizer steps per round and side")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON (written whole, by a rename)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.set_defaults(func=_cmd_bench)
    p = sub.add_parser("train", help="train from a YAML recipe: `train CONFIG [key=value ...] [--resume]`")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of the recipe")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/last.pt")
    p.add_argument("--overwrite", action="store_true", help="start over in an OUTPUT_DIR that holds an earlier run")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="validation metrics of a trained run: `evaluate RUN_FOLDER` or "
                                        "`evaluate RECIPE --checkpoint WEIGHTS`")
    p.add_argument("config", metavar="RUN_OR_RECIPE", help="a run folder (or its weights file), or a recipe .yaml")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--checkpoint", help=".safetensors weights or a trainer last.pt (with a recipe: required)")
    p.add_argument("--per-case", action="store_true", help="segmentation: also each validation case's metrics "
                                                          "(a 'per_case' list in the JSON)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("crossval", help="k-fold cross-validation of a segmentation recipe: `crossval RECIPE "
                                        "[key=value ...] --folds 5 -o DIR` (resumable), or `crossval --plot PNG DIR ...`")
    p.add_argument("config", metavar="RECIPE", help="a segmentation recipe (.yaml); with --plot: a crossval folder")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of the recipe; with --plot: more folders")
    p.add_argument("--folds", type=int, default=5, help="number of folds (data.folds), default 5")
    p.add_argument("-o", "--output", help="folder of the folds (DIR/foldK) and the report (DIR/crossval.json)")
    p.add_argument("--report-only", action="store_true", help="train nothing; evaluate the finished folds")
    p.add_argument("--only", metavar="K,K", help="train and report these folds only (e.g. 1,3); commands with "
                                                "different folds may share -o DIR and run at the same time")
    p.add_argument("--tta", action="store_true", help="evaluate with test-time mirroring along the axes the recipe "
                                                     "flips in training (report: DIR/crossval_tta.json)")
    p.add_argument("--plot", metavar="PNG", help="draw validation Dice against training minutes of the given "
                                                 "crossval folders into PNG")
    p.set_defaults(func=_cmd_crossval)

    p = sub.add_parser("curves", help="validation metric against training time of run (or crossval) folders: "
                                      "`curves RUN [RUN ...] -o PNG [--metric NAME]`")
    p.add_argument("folders", nargs="+", metavar="RUN", help="run folders (metrics.csv) or crossval folders (fold*/)")
    p.add_argument("-o", "--output", required=True, metavar="PNG", help="the plot to write (atomically)")
    p.add_argument("--metric", help="a validation metric of metrics.csv (default: the first run's task metric: "
                                    "map_50, dice or acc)")
    p.set_defaults(func=_cmd_curves)

    p = sub.add_parser("predict", help="classify images: `predict RUN_FOLDER -i IMAGES -o OUT.csv` (or "
                                       "`predict RECIPE --checkpoint WEIGHTS ...`)")
    p.add_argument("config", metavar="RUN_OR_RECIPE", help="a run folder (or its weights file), or a recipe .yaml")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--checkpoint", help=".safetensors weights or a trainer last.pt (with a recipe: required)")
    p.add_argument("-i", "--input", required=True, help="an image or a folder of images")
    p.add_argument("-o", "--output", required=True, help="CSV file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("segment", help="segment NIfTI volumes: `segment -i IN -o OUT --model NAME|RUN_FOLDER`; "
                                       "with no arguments, the bundled demo")
    p.add_argument("-i", "--input", help="a .nii/.nii.gz file or a folder (CASE_0000.nii.gz, CASE_0001.nii.gz, ... are "
                                         "the channels of one case); default: the bundled sample volumes")
    p.add_argument("-o", "--output", help="output folder for CASE.nii.gz label maps and summary.json "
                                          "(default for the demo: ./visionattn-segment-demo)")
    p.add_argument("--model", action="append",
                   help="a bundled model name (see --list-models), a trainer run folder, or its weights file "
                        "(default: hippocampus_agunet); a crossval folder (DIR/fold0, DIR/fold1, ...) or --model "
                        "given again: an ensemble, the models' probabilities averaged (nnU-Net's ensemble of folds)")
    p.add_argument("--device", default="auto",
                   help="auto (default: CUDA when torch finds a GPU, else the CPU), cpu, cuda or cuda:N; windows are "
                        "stitched on the CPU either way")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads torch uses (torch.set_num_threads; default: torch's choice)")
    p.add_argument("--roi-size", type=int, nargs="+", help="sliding-window size (default: the model's)")
    p.add_argument("--overlap", type=float, help="window overlap fraction (default: the model's, 0.5)")
    p.add_argument("--mode", choices=["gaussian", "constant"], help="window blending (default: the model's)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average over mirrorings along the axes the model was trained to be invariant to (its "
                        "recipe's flip axes; 2x slower per axis); default: the model's inference.tta")
    p.add_argument("--save-probabilities", action="store_true", help="also write CASE.npz with float16 probabilities")
    p.add_argument("--overlay", action="store_true", help="also write CASE.png: slices with the labels drawn on them")
    p.add_argument("--labels", help="folder of reference label maps (CASE.nii.gz): report Dice per label")
    p.add_argument("--overwrite", action="store_true",
                   help="redo cases whose outputs exist (default: skip them); inputs are never written over")
    p.add_argument("--max-voxels", type=int, default=2**28,
                   help="refuse a volume with more voxels than this, in the file or once resampled to the model's "
                        "spacing, from its header before reading it (default: 2**28 = 268435456, 512x512x1024)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list-models", action="store_true", help="list the bundled models and exit")
    p.add_argument("--engine", choices=["torch", "onnx"], default="torch",
                   help="what runs the network: PyTorch, or onnxruntime on the run's network exported to ONNX "
                        "(a temporary file, or --onnx FILE); the rest of the pipeline is the same")
    p.add_argument("--onnx", metavar="FILE", help="with --engine onnx: this ONNX file of the model's network "
                                                  "(from `visionattn export RUN --format onnx`) instead of exporting it")
    p.set_defaults(func=_cmd_segment)

    p = sub.add_parser("export", help="export a segmentation network: `export MODEL_OR_RUN --format "
                                      "onnx|torchscript|exported-program -o FILE`, checked against PyTorch")
    p.add_argument("model", metavar="MODEL_OR_RUN", help="a trained run (folder, weights file or bundled name) or a "
                                                         "registered segmentation model (random weights)")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript", "exported-program", "monai-bundle"],
                   help="monai-bundle: a trained 3-D run as a MONAI bundle folder (configs, safetensors weights) "
                        "for `python -m monai.bundle run`")
    p.add_argument("-o", "--output", required=True, help="the file to write (.onnx, .pt, .pt2), or the folder of a "
                                                         "monai-bundle")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file (or bundle folder)")
    p.add_argument("--sizes", nargs="+", metavar="SIZE",
                   help="spatial sizes to check the export at, e.g. 40x56x40 41x57x43 (the first is also the "
                        "export example); default: the run's roi_size or 2x the network's size_divisible, then "
                        "two odd sizes")
    p.add_argument("--onnx-exporter", choices=["torchscript", "dynamo"], default="torchscript",
                   help="onnx: torch's TorchScript-based exporter (default) or the torch.export-based one "
                        "(needs onnxscript)")
    p.add_argument("--kwarg", action="append", metavar="KEY=VALUE",
                   help="a constructor argument of a model built by name (repeatable), e.g. out_channels=3")
    p.add_argument("--atol", type=float, default=1e-4, help="check tolerance: atol + rtol * max|logits|")
    p.add_argument("--rtol", type=float, default=1e-4, help="check tolerance: atol + rtol * max|logits|")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("detect", help="detect objects: `detect -i IMAGES -o OUT --model NAME|RUN_FOLDER|WEIGHTS`")
    p.add_argument("-i", "--input", required=True, help="an image or a folder of images")
    p.add_argument("-o", "--output", required=True,
                   help="folder for results.json (COCO results) with images.json (their COCO images and categories), "
                        "detections/NAME.json and images/NAME.png per image (boxes drawn), summary.json")
    p.add_argument("--model", required=True, help="a registered detection model (random weights) or a "
                   "`visionattn train` output: its folder or its best/model.safetensors (config.yaml beside it)")
    p.add_argument("--num-classes", type=int, default=None, help="classes of a model built by name")
    p.add_argument("--classes", help="comma-separated class names in label order (default: the run's)")
    p.add_argument("--score-threshold", type=float, default=0.3, help="keep detections scoring at least this")
    p.add_argument("--img-size", type=int, default=None, help="side the detector resizes images to (its input_size)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--no-draw", action="store_true", help="do not write images/NAME.png")
    p.add_argument("--overwrite", action="store_true",
                   help="redo images whose outputs exist (default: skip them); inputs are never written over")
    p.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                   help="refuse images whose header declares more than N pixels (decompression bombs); "
                        "default 100,000,000")
    p.set_defaults(func=_cmd_detect)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    check_spelling(parser, argv)
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may follow options (`train cfg.yaml --resume train.lr=0.1`)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from visionattn.errors import TrainingInterrupted, UserError

    try:
        return args.func(args)
    except (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        # a problem with what the user gave: one line and exit 2. Anything else is a bug: its traceback stays.
        print(f"visionattn {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:  # Ctrl-C / SIGTERM in train or crossval, after a checkpoint
        how = ("run the same command again (finished folds are kept; this fold resumes)" if args.command == "crossval"
               else "run the same command with --resume")
        world = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun every process says it, each with its rank
        who = f" [rank {os.environ.get('RANK', '0')}/{world}]" if world > 1 else ""
        print(f"visionattn {args.command}{who}: {e}: {how} to continue", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `visionattn list | head`: the reader has what it wanted
        try:  # what is left in stdout's buffer must not fail again at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1


def run():
    """The ``visionattn`` command (and ``python -m visionattn``): :func:`main`, then the exit status, which a
    torchrun worker gives by :func:`visionattn.tasks.runtime.leave` (see there why). Tests call :func:`main`."""
    code = main()
    if "torch.distributed" in sys.modules:  # only a command that used torch can have joined a group
        from visionattn.tasks.runtime import leave

        leave(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
