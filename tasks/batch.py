"""The batch-inference skeleton that ``segment`` and ``detect`` share.

A command turns its inputs into :class:`Item` objects (a unique name, the input files, the output files by
kind) and hands them with a function that processes one item to :func:`run_items` (or, to process
several at once, e.g. a model's batch, with a function that processes a list of items to
:func:`run_items_batched`), which:

- refuses, for the whole call and before anything is written, an output that is an input (whatever
  ``--overwrite`` says) and an output folder that is an input folder (:func:`refuse_outputs_on_inputs`);
- shares the items across ``torchrun`` processes (each rank every ``world``-th item) and gathers the entries;
- skips an item whose outputs all exist (nnU-Net's behaviour on re-runs; ``overwrite`` redoes it) and
  fails one whose outputs exist only in part (they may come from another model);
- catches the error of one item, prints it once naming the item, and goes on with the others;
- merges the entries into the earlier run's summary by name (:func:`read_earlier_summary`, which moves an
  unreadable summary aside rather than destroying it), for the command to write with :func:`write_summary`.

Outputs themselves are written by the item function through :mod:`visionattn.tasks.files` (a temporary
name, then a rename), so nothing is ever left half-written.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from visionattn.errors import InvalidInputError, UserError
from visionattn.tasks.files import write_json_atomic

SUMMARY = "summary.json"
MAX_SUMMARY_BYTES = 256 * 2**20


class BatchError(InvalidInputError):
    """A problem with the whole call (output folder, inputs and outputs that clash)."""


@dataclass
class Item:
    """One unit of work: ``name`` (unique; the summary's key), its ``inputs``, its ``outputs`` by kind, and
    ``problems`` known before it runs (a missing channel file, a name collision): it then fails with them."""

    name: str
    inputs: list[Path]
    outputs: dict[str, Path]
    problems: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------
# outputs never replace inputs


def same_folder(a: str | Path, b: str | Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # bind mounts, case-insensitive file systems
    except OSError:
        return False


def outputs_that_are_inputs(outputs: Sequence[Path], inputs: Sequence[Path]) -> list[tuple[Path, Path]]:
    """``(output, input)`` pairs naming the same file: the same path once symlinks, ``.`` and ``..`` are
    resolved, or, for an output that exists, the same file on disk (hard links, case-insensitive file systems)."""
    by_path = {os.path.realpath(p): p for p in inputs}
    by_inode = {}
    for p in inputs:
        try:
            st = os.stat(p)
            by_inode[st.st_dev, st.st_ino] = p
        except OSError:
            pass
    pairs = []
    for out in outputs:
        hit = by_path.get(os.path.realpath(out))
        if hit is None:
            try:
                st = os.stat(out)
                hit = by_inode.get((st.st_dev, st.st_ino))
            except OSError:
                pass
        if hit is not None:
            pairs.append((out, hit))
    return pairs


def refuse_outputs_on_inputs(items: Sequence[Item], out_dir: Path, input_folders: dict[str, str | Path]) -> None:
    """Raise :class:`BatchError` when the output folder is one of ``input_folders`` (``{"--labels": path}``)
    or any item's output would land on any item's input. ``--overwrite`` does not lift it."""
    for option, folder in input_folders.items():
        if folder is not None and Path(folder).is_dir() and same_folder(out_dir, folder):
            raise BatchError(f"-o {out_dir} is the {option} folder {folder}: outputs written there would replace or "
                             f"mix with the inputs and be read as inputs by the next run; choose another output folder")
    clashes = outputs_that_are_inputs([p for item in items for p in item.outputs.values()],
                                      [f for item in items for f in item.inputs])
    if clashes:
        listed = "; ".join(f"{out} is the input {inp}" for out, inp in clashes[:3])
        more = f" (and {len(clashes) - 3} more)" if len(clashes) > 3 else ""
        raise BatchError(f"refusing to write over inputs, --overwrite or not: {listed}{more}; "
                         f"choose another output folder")


def prepare_output_folder(folder: Path) -> None:
    """Create ``folder`` (a folder, writable) or raise :class:`BatchError` saying why it cannot be used."""
    if folder.exists() and not folder.is_dir():
        raise BatchError(f"output {folder} exists and is not a folder; -o takes a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise BatchError(f"output folder {folder} is not writable: {e.strerror or e}") from e


# ---------------------------------------------------------------------------------------------------
# running


def check_item(item: Item, *, overwrite: bool, key: str) -> dict | None:
    """The summary entry of an item that is not to run: ``skipped`` (its outputs all exist, and not
    ``overwrite``) or ``failed`` (an output on an input, a known problem, an output that is not a regular
    file, outputs that exist only in part); ``None`` when it is to run. Never raises for a problem of the item."""
    base = {key: item.name, "inputs": [str(f) for f in item.inputs]}
    try:
        clashes = outputs_that_are_inputs(list(item.outputs.values()), item.inputs)
        if clashes:
            raise BatchError("refusing to write over inputs, --overwrite or not: "
                             + "; ".join(f"{out} is the input {inp}" for out, inp in clashes))
        if item.problems:
            raise BatchError("; ".join(item.problems))
        odd = [p.name for p in item.outputs.values() if (p.exists() or p.is_symlink()) and not p.is_file()]
        if odd:
            raise BatchError(f"{', '.join(odd)} is not a regular file; move it away")
        existing = [p for p in item.outputs.values() if p.exists()]
        if existing and not overwrite:
            if len(existing) == len(item.outputs):
                return {**base, "status": "skipped", "outputs": {k: str(v) for k, v in item.outputs.items()}}
            missing = [p.name for p in item.outputs.values() if not p.exists()]
            raise BatchError(f"{', '.join(p.name for p in existing)} already in {existing[0].parent} but "
                             f"{', '.join(missing)} not; --overwrite to redo it")
        return None
    except Exception as e:  # one bad item must not stop the others
        return failed_entry(item, key, e)


def failed_entry(item: Item, key: str, error: BaseException) -> dict:
    """The ``failed`` summary entry of ``item``: a :class:`UserError`'s message as it is, anything else
    with its type name."""
    message = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
    return {key: item.name, "inputs": [str(f) for f in item.inputs], "status": "failed", "error": message}


def ok_entry(item: Item, key: str, added: dict, seconds: float) -> dict:
    """The ``ok`` summary entry of ``item``: its outputs, what its processing ``added``, and its time."""
    return {key: item.name, "inputs": [str(f) for f in item.inputs], "status": "ok",
            "outputs": {k: str(v) for k, v in item.outputs.items()}, **added, "seconds": round(seconds, 3)}


def run_one(item: Item, process: Callable[[Item], dict], *, overwrite: bool, key: str) -> dict:
    """The summary entry of one item: ``status`` ``ok`` (with what ``process`` returned), ``skipped`` (its
    outputs all exist) or ``failed`` (with ``error``). Never raises for a problem of the item."""
    entry = check_item(item, overwrite=overwrite, key=key)
    if entry is not None:
        return entry
    start = time.time()
    try:
        added = process(item)
    except Exception as e:  # one bad item must not stop the others
        return failed_entry(item, key, e)
    return ok_entry(item, key, added, time.time() - start)


def run_items(items: Sequence[Item], process: Callable[[Item], dict], *, overwrite: bool, command: str,
              key: str, rank: int = 0, world: int = 1, progress: Callable | None = None,
              report: Callable[[dict], None] | None = None) -> list[dict]:
    """This process's share of ``items`` (every ``world``-th from ``rank``) through :func:`run_one`, each
    failure printed once on stderr (``command: key NAME: error``) and each entry handed to ``report`` as
    soon as it is known (after the failure's line); returns every process's entries (gathered under
    ``torchrun``)."""
    mine = list(items[rank::world])
    entries = []
    for item in (progress(mine) if progress else mine):
        entry = run_one(item, process, overwrite=overwrite, key=key)
        if entry["status"] == "failed":
            print(f"{command}: {key} {item.name}: {entry['error']}", file=sys.stderr)
        if report is not None:
            report(entry)
        entries.append(entry)
    return gather(entries, world)


def run_items_batched(items: Sequence[Item], process_many: Callable[[list[Item]], Sequence[dict | BaseException]],
                      *, batch_size: int, overwrite: bool, command: str, key: str, rank: int = 0, world: int = 1,
                      progress: Callable | None = None) -> list[dict]:
    """:func:`run_items` for commands that process several items at once (a model's batch).

    This process's share of ``items`` is checked item by item (:func:`check_item`: skipped and failed
    items never reach ``process_many``); the items to run go to ``process_many`` in lists of up to
    ``batch_size``, in order. It returns, for each item of its list, what the item's entry adds (a dict)
    or the exception that failed that item alone. Should it raise (or return a list of another length),
    each item of that list is retried on its own, so one bad item fails only itself. An item's
    ``seconds`` is its list's time shared equally. Failures are printed once on stderr
    (``command: key NAME: error``); returns every process's entries in item order (gathered under
    ``torchrun``). ``progress`` wraps the iterable of items to run."""
    if batch_size < 1:
        raise BatchError(f"batch size must be at least 1, got {batch_size}")
    mine = list(items[rank::world])
    entries: list[dict | None] = [None] * len(mine)

    def settle(k: int, entry: dict) -> None:
        if entry["status"] == "failed":
            print(f"{command}: {key} {mine[k].name}: {entry['error']}", file=sys.stderr)
        entries[k] = entry

    def run_batch(batch: list[int]) -> None:
        start = time.time()
        try:
            results = list(process_many([mine[k] for k in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"{len(results)} results for {len(batch)} items")
        except Exception as e:  # retry one by one: only the item at fault fails
            if len(batch) > 1:
                for k in batch:
                    run_batch([k])
                return
            results = [e]
        seconds = (time.time() - start) / len(batch)
        for k, result in zip(batch, results):
            if isinstance(result, BaseException):
                settle(k, failed_entry(mine[k], key, result))
            elif isinstance(result, dict):
                settle(k, ok_entry(mine[k], key, result, seconds))
            else:  # a bug of process_many; the item is not done
                settle(k, failed_entry(mine[k], key, TypeError(f"no result for it ({type(result).__name__})")))

    todo = []
    for k, item in enumerate(mine):
        entry = check_item(item, overwrite=overwrite, key=key)
        if entry is None:
            todo.append(k)
        else:
            settle(k, entry)
    batch: list[int] = []
    for k in (progress(todo) if progress else todo):
        batch.append(k)
        if len(batch) == batch_size:
            run_batch(batch)
            batch = []
    if batch:
        run_batch(batch)
    return gather([e for e in entries if e is not None], world)


def gather(entries: list[dict], world: int) -> list[dict]:
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        return entries
    gathered: list = [None] * world
    dist.all_gather_object(gathered, entries)
    return [e for part in gathered for e in part]


# ---------------------------------------------------------------------------------------------------
# the summary


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def read_earlier_summary(out_dir: Path, command: str, list_name: str, key: str,
                         check_entry: Callable[[dict], None] | None = None) -> dict[str, dict]:
    """The entries (``summary[list_name]``, by ``entry[key]``) of ``OUT/summary.json`` from an earlier run.
    A summary that cannot be read (not JSON, NaN, wrong structure, ``check_entry`` raising ``ValueError``,
    not a regular file, too large) is not destroyed: it is renamed ``summary.json.unreadable-TIME``, said so
    on stderr, and an empty one starts."""
    path = out_dir / SUMMARY
    if not (path.exists() or path.is_symlink()):
        return {}
    try:
        if not path.is_file():
            raise ValueError("not a regular file")
        if path.stat().st_size > MAX_SUMMARY_BYTES:
            raise ValueError(f"over {MAX_SUMMARY_BYTES // 2**20} MiB")
        obj = json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
        if not isinstance(obj, dict) or not isinstance(obj.get(list_name), list):
            raise ValueError(f"no {list_name!r} list")
        entries = {}
        for e in obj[list_name]:
            if not (isinstance(e, dict) and isinstance(e.get(key), str) and isinstance(e.get("status"), str)):
                raise ValueError(f"an entry without a {key!r} name and a 'status'")
            if check_entry is not None:
                check_entry(e)
            entries[e[key]] = e
        return entries
    except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = out_dir / f"{SUMMARY}.unreadable-{stamp}"
        n = 1
        while aside.exists() or aside.is_symlink():
            aside, n = out_dir / f"{SUMMARY}.unreadable-{stamp}-{n}", n + 1
        try:
            os.rename(path, aside)
        except OSError as err:
            raise BatchError(f"{path} cannot be read ({e}) nor moved aside ({err.strerror or err}); "
                             f"move it away and run again") from err
        print(f"{command}: {path} cannot be read ({type(e).__name__}: {e}); kept it as {aside.name} "
              f"and started a new summary", file=sys.stderr)
        return {}


def merge_summary(earlier: dict[str, dict], entries: list[dict], key: str) -> list[dict]:
    """This run's entries merged into the earlier ones, by name. A skipped item keeps its earlier entry with
    status ``skipped``; items not run this time keep theirs unchanged."""
    merged = dict(earlier)
    for e in entries:
        merged[e[key]] = merged_entry(earlier, e, key)
    return [merged[name] for name in sorted(merged)]


def merged_entry(earlier: dict[str, dict], entry: dict, key: str) -> dict:
    """``entry`` as the summary keeps it: a skipped item's earlier ``ok``/``skipped`` entry (what it measured
    then), with status ``skipped``; any other entry as it is."""
    before = earlier.get(entry[key])
    if entry["status"] == "skipped" and before is not None and before["status"] in ("ok", "skipped"):
        return {**before, "status": "skipped"}
    return entry


def write_summary(out_dir: Path, header: dict, list_name: str, merged: list[dict]) -> dict:
    """``OUT/summary.json`` = ``header`` + ``{list_name: merged}`` + counts, written atomically; returned."""
    counts = {status: sum(e["status"] == status for e in merged) for status in ("ok", "skipped", "failed")}
    summary = {**header, "counts": counts, list_name: merged}
    write_json_atomic(summary, out_dir / SUMMARY)
    return summary
