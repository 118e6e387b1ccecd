"""The README's generated tables: the model table from the registry, performance tables from benchmark results.

Every registered model gets one row: its task, family (the class the constructor builds), timm name, default
input size, the parameters and multiply-adds counted from the built model, and the figures its paper or
released code reports (:class:`visionattn.registry.ReportedFigures` on the registration). Nothing in the
table is typed by hand, so it cannot drift from the code. The table sits in ``README.md`` between
``<!-- models-table:start -->`` and ``<!-- models-table:end -->``::

    python -m visionattn.tasks.readme_tables            # print the table
    python -m visionattn.tasks.readme_tables --write    # rewrite it in README.md
    python -m visionattn.tasks.readme_tables --check    # exit 1 (with a diff) when README.md is out of date

Counting is fast: models are built on the ``meta`` device (shapes only, no memory, no initialisation) and
run there under ``torch.utils.flop_counter`` (the registry's counter, multiply-add = 2 FLOPs). A forward
that reads a tensor's value (``.item()``, ``bool(t)``; DFIR-DETR's tie check in its top-K selection) reads
zero on ``meta``; such reads only pick between paths of equal matmul cost in our models (DFIR-DETR's
count is equal to the one on real data). A model that cannot be built or run on ``meta`` falls back to the
CPU, with real tensors.

Performance tables are rendered from the JSON a benchmark writes (``visionattn bench kernels --json
docs/bench/kernels-cpu.json``), checked into ``docs/bench/``; the README block between
``<!-- bench-table:NAME:start -->`` and ``<!-- bench-table:NAME:end -->`` is that rendering, so a figure in the
README is always one the benchmark printed, and the command that measured it is written under the table.
Re-measure with the command, then ``--write``.
"""
from __future__ import annotations

import argparse
import difflib
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from visionattn import registry
from visionattn.registry import TASKS, ReportedFigures
from visionattn.tasks.runtime import KEEP_MEMORY_TUNABLES

START = "<!-- models-table:start -->"
END = "<!-- models-table:end -->"
COMMAND = "python -m visionattn.tasks.readme_tables --write"
README = Path(__file__).resolve().parent.parent / "README.md"
BENCH_DIR = README.parent / "docs" / "bench"
# benchmark tables: name -> (the JSON under docs/bench/, the command that wrote it); renderers below
BENCH_TABLES = {
    "kernels-cpu": ("kernels-cpu.json",
                    "visionattn bench kernels --threads 1 --json docs/bench/kernels-cpu.json --overwrite"),
    "kernels-cpu-malloc": ("kernels-cpu-malloc.json", f"GLIBC_TUNABLES={KEEP_MEMORY_TUNABLES} visionattn bench kernels "
                                                      "--threads 1 --json docs/bench/kernels-cpu-malloc.json --overwrite"),
    "linear-cpu": ("linear-cpu.json", "visionattn bench kernels --threads 1 --problems linear-4096,linear-16384 "
                                      "--json docs/bench/linear-cpu.json --overwrite"),
    "detectors-cpu": ("detectors-cpu.json",
                      "visionattn bench detectors --threads 1 --json docs/bench/detectors-cpu.json --overwrite"),
}
RESULTS_DIR = README.parent / "docs" / "results"
# cross-validation tables: name -> (renderer, what it reads under docs/results/); renderers below. A vessel
# table reads one report and its --tta report; a labels table one row per (network, batch, report[, fold]), in
# order (with a fold: that fold of the report alone).
RESULT_TABLES = {
    "drive-cv-emcad60": ("vessel", ("drive_cv_emcad60.json", "drive_cv_emcad60_tta.json")),
    "drive-cv-emcad20": ("vessel", ("drive_cv_emcad20.json", "drive_cv_emcad20_tta.json")),
    "hippocampus-cv": ("labels", (
        ("3-D AGUNet (ours)", 4, "hippocampus_cv_agunet_tta.json"),
        ("3-D AGUNet (ours)", 4, "hippocampus_cv_agunet.json"),
        ("MONAI `UNet`", 4, "hippocampus_cv_monai_unet_tta.json"),
        ("MONAI `UNet`", 4, "hippocampus_cv_monai_unet.json"),
        ("MONAI `SegResNet`", 4, "hippocampus_cv_monai_segresnet_tta.json"),
        ("MONAI `SegResNet`", 4, "hippocampus_cv_monai_segresnet.json"),
        ("3-D AGUNet (ours)", 8, "hippocampus_cv_agunet_batch8_tta.json"),
        ("3-D AGUNet (ours)", 8, "hippocampus_cv_agunet_batch8.json"),
        ("3-D AGUNet (ours)", 8, "hippocampus_cv_agunet_batch8.json", "0"),
        ("MONAI `UNet`", 8, "hippocampus_cv_monai_unet_fold0.json"),
        ("MONAI `UNet`", 8, "hippocampus_cv_monai_unet_fold0_tta.json"),
        ("3-D AGUNet (ours)", 8, "hippocampus_cv_agunet_batch8.json", "1"),
        ("3-D AGUNet (ours)", 8, "hippocampus_cv_agunet_batch8_tta.json", "1"),
        ("MONAI `UNet`", 8, "hippocampus_cv_monai_unet_fold1.json"),
        ("MONAI `UNet`", 8, "hippocampus_cv_monai_unet_fold1_tta.json"),
        ("MONAI `SegResNet`", 8, "hippocampus_cv_monai_segresnet_fold0.json"),
        ("MONAI `SegResNet`", 8, "hippocampus_cv_monai_segresnet_fold0_tta.json"),
    )),
}
KERNEL_PROBLEM_TITLES = {"1d-4096-k31": "1-D L=4096, K=31", "2d-56-k7": "2-D 56x56, K=7", "2d-56-k3": "2-D 56x56, K=3",
                         "2d-128-k13": "2-D 128x128, K=13", "3d-32-k5": "3-D 32^3, K=5"}

HEADER = ("model", "task", "family", "timm name", "input", "params", "GMACs",
          "params (reported)", "compute (reported)", "result (reported)")


class _ValuesReadAsZero(TorchDispatchMode):
    """On ``meta`` tensors, reading a value (``.item()``, ``bool(t)``) gives 0 / False instead of an error."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            dtype = args[0].dtype
            return False if dtype == torch.bool else (0.0 if dtype.is_floating_point else 0)
        return func(*args, **(kwargs or {}))


def _forward_flops(model: torch.nn.Module, input_size: tuple[int, ...], device: str) -> int:
    registry._register_cpu_sdpa_flops()
    model.eval()
    x = torch.zeros(1, *input_size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        if device == "meta":
            with _ValuesReadAsZero():
                model(x)
        else:
            model(x)
    return counter.get_total_flops()


def count_model(name: str) -> dict[str, Any]:
    """Parameters and forward FLOPs of ``name`` as registered (default arguments, default input size).

    Returns ``name, task, family, timm_name, input_size, params, flops, gmacs, counted_on`` (``meta`` or
    ``cpu``) and ``reported`` (the registration's :class:`ReportedFigures`)."""
    entry = registry.get_entry(name)
    counted_on = "meta"
    try:
        with torch.device("meta"):
            model = registry.create_model(name)
    except Exception:  # a constructor that needs real values: build on the CPU, count on meta from there
        model = registry.create_model(name).to("meta")
    input_size = registry._model_input_size(model, entry)
    params = sum(p.numel() for p in model.parameters())
    try:
        flops = _forward_flops(model, input_size, "meta")
    except Exception:  # a forward meta cannot run (an output whose size depends on values): real tensors
        counted_on = "cpu"
        model = registry.create_model(name)
        flops = _forward_flops(model, input_size, "cpu")
    family = entry.model_cls.__name__ if entry.model_cls is not None else entry.fn.__module__.rsplit(".", 1)[-1]
    return {
        "name": entry.name, "task": entry.task, "family": family, "timm_name": entry.timm_name,
        "input_size": tuple(input_size), "params": params, "flops": flops, "gmacs": flops / 2e9,
        "counted_on": counted_on, "reported": entry.reported,
    }


def _task_order(name: str) -> tuple:
    return (TASKS.index(registry.get_entry(name).task), registry._natural_key(name))


def model_rows(names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """:func:`count_model` for ``names`` (default: every registered model), by task then name."""
    names = registry.list_models() if names is None else list(names)
    return [count_model(n) for n in sorted(names, key=_task_order)]


def _figure_cell(figures: Sequence[ReportedFigures], text_of) -> str:
    """One quantity across a model's reported figures: ``"2.651M (official code); 73.2 top-1 (paper v4)"``."""
    parts = []
    for figure in figures:
        text = text_of(figure)
        if text is None:
            continue
        qualifiers = [q for q in (figure.source if figure.source != "paper" else "", figure.setting) if q]
        parts.append(text + (f" ({', '.join(qualifiers)})" if qualifiers else ""))
    return "; ".join(parts) if parts else "-"


def table_row(row: dict[str, Any]) -> list[str]:
    figures = row["reported"]
    return [
        row["name"], row["task"], row["family"], row["timm_name"] or "-", "x".join(map(str, row["input_size"])),
        f"{row['params'] / 1e6:.2f}M", f"{row['gmacs']:.2f}",
        _figure_cell(figures, ReportedFigures.params_text),
        _figure_cell(figures, ReportedFigures.compute_text),
        _figure_cell(figures, ReportedFigures.result_text),
    ]


def render_table(rows: Sequence[dict[str, Any]]) -> str:
    """The Markdown table (ending in a newline)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in rows:
        cells = [c.replace("|", "\\|") for c in table_row(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _block_span(text: str, start: str = START, stop: str = END) -> tuple[int, int]:
    """Offsets of the text between the two markers (the markers' own lines excluded)."""
    if text.count(start) != 1 or text.count(stop) != 1:
        raise ValueError(f"README.md must hold {start} and {stop} exactly once each")
    begin = text.index(start) + len(start)
    end = text.index(stop)
    if end < begin:
        raise ValueError(f"{stop} comes before {start} in README.md")
    if text[begin:begin + 1] == "\n":
        begin += 1
    return begin, end


def read_block(text: str, start: str = START, stop: str = END) -> str:
    """What README text holds between the markers."""
    begin, end = _block_span(text, start, stop)
    return text[begin:end]


def replace_block(text: str, table: str, start: str = START, stop: str = END) -> str:
    """README text with ``table`` between the markers."""
    begin, end = _block_span(text, start, stop)
    return text[:begin] + table + text[end:]


def bench_markers(name: str) -> tuple[str, str]:
    return f"<!-- bench-table:{name}:start -->", f"<!-- bench-table:{name}:end -->"


def _ratio(x: float | None) -> str:
    return "-" if x is None else (f"{x:.1f}x" if x < 10 else f"{x:.0f}x")


def _ms(x: float) -> str:
    return f"{x:.3g} ms" if x < 100 else f"{x:.0f} ms"


def render_kernels_table(rows: Sequence[dict[str, Any]], command: str) -> str:
    """The neighborhood-attention rows of ``visionattn bench kernels --json`` as a Markdown table: our forward and
    forward+backward times, each alternative's time over ours, backward over forward, and our forward's
    share of the matmul rate measured in the same rounds; then the command."""
    by_problem: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_problem.setdefault(row["problem"], {})[row["impl"]] = row
    header = ["problem", "ours fwd", "vs naive gather", "vs masked dense SDPA", "vs compiled flex_attention (faster token order)",
              "ours fwd+bwd", "vs naive gather (autograd)", "ours bwd / fwd", "ours fwd, of matmul rate"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for problem, impls in by_problem.items():
        if problem not in KERNEL_PROBLEM_TITLES:
            continue
        ours = impls.get("visionattn-torch") or impls.get("visionattn-triton")
        naive, dense = impls.get("naive-gather"), impls.get("masked-dense-sdpa")
        # flex_attention in row-major and in tiled token order: the faster one
        flex = min((r for name, r in impls.items() if name.startswith("flex")), key=lambda r: r["fwd_ratio"],
                   default=None)
        lines.append("| " + " | ".join([
            KERNEL_PROBLEM_TITLES[problem], _ms(ours["fwd_ms"]),
            _ratio(naive and naive["fwd_ratio"]), _ratio(dense and dense["fwd_ratio"]), _ratio(flex and flex["fwd_ratio"]),
            _ms(ours["fwdbwd_ms"]), _ratio(naive and naive.get("fwdbwd_ratio")), f"{ours['bwd_over_fwd']:.2f}",
            f"{100 * ours['fwd_ceiling_fraction']:.1f}%"]) + " |")
    lines.append("")
    lines.append(f"Measured by `{command}`; ratio = alternative's time / ours (above 1: ours is faster).")
    return "\n".join(lines) + "\n"


def render_linear_table(rows: Sequence[dict[str, Any]], command: str) -> str:
    """The linear-attention rows of ``visionattn bench kernels --json``: each implementation's forward,
    backward and forward+backward time, and each as the ratio of its time to ours."""
    header = ["problem", "implementation", "fwd", "bwd", "fwd+bwd", "fwd ratio", "bwd ratio", "fwd+bwd ratio"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if not row["problem"].startswith("linear-"):
            continue
        lines.append("| " + " | ".join([
            f"N = {row['problem'].split('-', 1)[1]}", row["impl"], _ms(row["fwd_ms"]), _ms(row["bwd_ms"]),
            _ms(row["fwdbwd_ms"]), f"{row['fwd_ratio']:.2f}", f"{row['bwd_ratio']:.2f}",
            f"{row['fwdbwd_ratio']:.2f}"]) + " |")
    lines.append("")
    lines.append(f"Measured by `{command}`; ratio = its time / ours (above 1: ours is faster).")
    return "\n".join(lines) + "\n"


def render_detectors_table(rows: Sequence[dict[str, Any]], command: str) -> str:
    """``visionattn bench detectors --json``: parameters, GFLOPs and CPU latency, each beside its ratio to the
    first model's (RT-DETR-R18)."""
    header = ["model", "params", "GFLOPs", "CPU latency at 640", "params ratio", "GFLOPs ratio", "latency ratio"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join([
            row["model"], f"{row['params_m']:.1f}M", f"{row['gflops']:.1f}", _ms(row["latency_ms"]),
            f"{row['params_ratio']:.2f}", f"{row['gflops_ratio']:.2f}", f"{row['latency_ratio']:.2f}"]) + " |")
    lines.append("")
    lines.append(f"Measured by `{command}`; ratio = the model's figure / the first row's.")
    return "\n".join(lines) + "\n"


RENDERERS = {"kernels-cpu": render_kernels_table, "kernels-cpu-malloc": render_kernels_table,
             "linear-cpu": render_linear_table, "detectors-cpu": render_detectors_table}


def bench_tables() -> dict[str, str]:
    """Each benchmark table, rendered from its JSON under ``docs/bench/``."""
    tables = {}
    for name, (filename, command) in BENCH_TABLES.items():
        path = BENCH_DIR / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; measure it with `{command}`")
        rows = json.loads(path.read_text(encoding="utf-8"))
        tables[name] = RENDERERS[name](rows, command) + machine_line(rows)
    return tables


def results_markers(name: str) -> tuple[str, str]:
    return f"<!-- results-table:{name}:start -->", f"<!-- results-table:{name}:end -->"


def render_vessel_crossval_table(plain: dict[str, Any], tta: dict[str, Any]) -> str:
    """A ``visionattn crossval`` report of a one-label (vessel) recipe and its ``--tta`` report: per fold its
    validation cases, steps, vessel Dice without and with mirroring and NSD; then every case once (the
    case-weighted mean, +- the standard deviation over folds). Fold 0 is the recipe's fixed split."""
    header = ["fold", "validation images", "steps", "vessel Dice", "with mirroring (TTA)", "NSD (1 px)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for k, fold in plain["folds"].items():
        cases = sorted((c["case"] for c in plain["per_case"] if str(c["fold"]) == k), key=lambda c: (len(c), c))
        lines.append("| " + " | ".join([
            k + (" (the fixed split)" if k == "0" else ""), ", ".join(cases), f"{fold['steps']:,}",
            f"{fold['dice_vessel']:.3f}", f"{tta['folds'][k]['dice_vessel']:.3f}", f"{fold['nsd_vessel']:.3f}"]) + " |")
    both = [f"**{r['case_weighted_mean']['dice_vessel']:.3f}** +- {r['std']['dice_vessel']:.3f}" for r in (plain, tta)]
    lines.append(f"| all {plain['cases']} images | | | {both[0]} | {both[1]} | "
                 f"{plain['case_weighted_mean']['nsd_vessel']:.3f} |")
    return "\n".join(lines) + "\n"


def _fold_span(keys: Sequence[str]) -> str:
    """``['0', '1', '2']`` -> ``0-2``; other sets as a list."""
    ks = sorted(int(k) for k in keys)
    if len(ks) > 1 and ks == list(range(ks[0], ks[-1] + 1)):
        return f"{ks[0]}-{ks[-1]}"
    return ", ".join(map(str, ks))


def render_labels_crossval_table(rows: Sequence[tuple[str, int, dict[str, Any]]]) -> str:
    """``visionattn crossval`` reports of multi-label recipes, one row each ``(network, batch, report)``: the
    folds, steps per fold, whether the report mirrored (``--tta``), Dice per label and their mean (+- the
    standard deviation over folds where there are several), NSD per label. Labels are the first report's."""
    labels = [k[len("dice_"):] for k in rows[0][2]["mean"] if k.startswith("dice_") and not k.startswith("dice_pooled")]
    header = ["network", "batch", "folds", "steps per fold", "TTA", *(f"Dice {lab}" for lab in labels), "mean Dice",
              *(f"NSD {lab}" for lab in labels)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for network, batch, report in rows:
        folds = report["folds"]
        several = len(folds) > 1
        summary = report["mean"]
        what = f"{network}, {len(folds)}-fold CV, {report['cases']} cases" if several else f"{network}, fold {next(iter(folds))}"
        steps = sorted(f["steps"] for f in folds.values())
        steps_text = f"{steps[0]:,}-{steps[-1]:,}" if steps[0] != steps[-1] else f"{steps[0]:,}"

        def dice(key: str) -> str:
            return f"{summary[key]:.3f}" + (f" +- {report['std'][key]:.3f}" if several else "")

        lines.append("| " + " | ".join([
            what, str(batch), _fold_span(list(folds)), steps_text, "mirroring" if report.get("tta_mirror_axes") else "none",
            *(dice(f"dice_{lab}") for lab in labels), dice("dice"),
            *(f"{summary[f'nsd_{lab}']:.3f}" for lab in labels)]) + " |")
    return "\n".join(lines) + "\n"


def _read_report(filename: str) -> dict[str, Any]:
    return json.loads((RESULTS_DIR / filename).read_text(encoding="utf-8"))


def _one_fold(report: dict[str, Any], fold: str | None = None) -> dict[str, Any]:
    """``report`` as if it held only ``fold`` (its figures as the mean; None: the report itself)."""
    if fold is None:
        return report
    return {**report, "folds": {fold: report["folds"][fold]}, "mean": report["folds"][fold],
            "cases": report["folds"][fold]["cases"]}


def result_files(name: str) -> list[str]:
    """The reports under ``docs/results/`` that the table ``name`` of :data:`RESULT_TABLES` reads."""
    kind, spec = RESULT_TABLES[name]
    return list(spec) if kind == "vessel" else list(dict.fromkeys(row[2] for row in spec))


def results_tables() -> dict[str, str]:
    """Each cross-validation table, rendered from its reports under ``docs/results/``."""
    tables = {}
    for name, (kind, spec) in RESULT_TABLES.items():
        if kind == "vessel":
            tables[name] = render_vessel_crossval_table(*(_read_report(f) for f in spec))
        else:
            tables[name] = render_labels_crossval_table([(row[0], row[1], _one_fold(_read_report(row[2]), *row[3:]))
                                                         for row in spec])
    return tables


def machine_line(rows: Sequence[dict[str, Any]]) -> str:
    """Where the rows were measured (the ``machine`` record ``--json`` writes into each row), as one line;
    empty for rows measured before the record existed."""
    from visionattn.tasks.runtime import describe_machine

    machines = []
    for row in rows:
        if isinstance(row.get("machine"), dict):
            text = describe_machine(row["machine"])
            if text not in machines:
                machines.append(text)
    return f"Machine: {'; '.join(machines)}.\n" if machines else ""


def table_names(block: str) -> list[str]:
    """Model names in the first column of a generated table."""
    names = []
    for line in block.splitlines()[2:]:
        if line.startswith("| "):
            names.append(line[2:].split(" |", 1)[0].strip())
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m visionattn.tasks.readme_tables",
                                     description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the table in README.md")
    mode.add_argument("--check", action="store_true", help="exit 1, printing a diff, when README.md is out of date")
    parser.add_argument("--readme", type=Path, default=README, help=f"the README to read or write (default: {README})")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    rows = model_rows()
    table = render_table(rows)
    benches = bench_tables()
    seconds = time.perf_counter() - started
    on_cpu = [r["name"] for r in rows if r["counted_on"] == "cpu"]
    where = f"; counted on the CPU: {', '.join(on_cpu)}" if on_cpu else ""
    if not (args.write or args.check):
        sys.stdout.write(table)
        for block in [*benches.values(), *results_tables().values()]:
            sys.stdout.write("\n" + block)
        print(f"{len(rows)} models counted in {seconds:.1f} s{where}", file=sys.stderr)
        return 0
    text = args.readme.read_text(encoding="utf-8")
    blocks = [(name, bench, bench_markers(name), f"docs/bench/{BENCH_TABLES[name][0]}") for name, bench in benches.items()]
    blocks += [(name, block, results_markers(name), ", ".join(f"docs/results/{f}" for f in result_files(name)))
               for name, block in results_tables().items()]
    for name, block, markers, source in blocks:
        current_block = read_block(text, *markers)
        if current_block != block:
            if args.check:
                sys.stdout.writelines(difflib.unified_diff(current_block.splitlines(True), block.splitlines(True),
                                                           "README.md (current)", "README.md (generated)"))
                print(f"{args.readme}: the {name} table is out of date; run `{COMMAND}`", file=sys.stderr)
                return 1
            text = replace_block(text, block, *markers)
            args.readme.write_text(text, encoding="utf-8")
            print(f"{args.readme}: {name} table rewritten from {source}")
    current = read_block(text)
    if args.check:
        if current == table:
            print(f"{args.readme}: the model table is up to date ({len(rows)} models, {seconds:.1f} s)")
            return 0
        sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), table.splitlines(True),
                                                   "README.md (current)", "README.md (generated)"))
        print(f"{args.readme}: the model table is out of date; run `{COMMAND}`", file=sys.stderr)
        return 1
    if current != table:
        args.readme.write_text(replace_block(text, table), encoding="utf-8")
        print(f"{args.readme}: model table rewritten ({len(rows)} models, {seconds:.1f} s{where})")
    else:
        print(f"{args.readme}: the model table was already up to date ({len(rows)} models, {seconds:.1f} s{where})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
