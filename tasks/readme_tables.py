"""The README's model table, generated from the registry.

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
"""
from __future__ import annotations

import argparse
import difflib
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from visionattn import registry
from visionattn.registry import TASKS, ReportedFigures

START = "<!-- models-table:start -->"
END = "<!-- models-table:end -->"
COMMAND = "python -m visionattn.tasks.readme_tables --write"
README = Path(__file__).resolve().parent.parent / "README.md"

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


def _block_span(text: str) -> tuple[int, int]:
    """Offsets of the text between the two markers (the markers' own lines excluded)."""
    if text.count(START) != 1 or text.count(END) != 1:
        raise ValueError(f"README.md must hold {START} and {END} exactly once each")
    begin = text.index(START) + len(START)
    end = text.index(END)
    if end < begin:
        raise ValueError(f"{END} comes before {START} in README.md")
    if text[begin:begin + 1] == "\n":
        begin += 1
    return begin, end


def read_block(text: str) -> str:
    """What README text holds between the markers."""
    begin, end = _block_span(text)
    return text[begin:end]


def replace_block(text: str, table: str) -> str:
    """README text with ``table`` between the markers."""
    begin, end = _block_span(text)
    return text[:begin] + table + text[end:]


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
    seconds = time.perf_counter() - started
    on_cpu = [r["name"] for r in rows if r["counted_on"] == "cpu"]
    where = f"; counted on the CPU: {', '.join(on_cpu)}" if on_cpu else ""
    if not (args.write or args.check):
        sys.stdout.write(table)
        print(f"{len(rows)} models counted in {seconds:.1f} s{where}", file=sys.stderr)
        return 0
    text = args.readme.read_text(encoding="utf-8")
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
