"""Benchmarks behind ``visionattn bench ...``: each prints a table of ratios against alternatives
measured in the same run, so figures are comparable whatever the machine is doing."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def time_fn(fn: Callable[[], object], warmup: int = 2, min_time: float = 2.0, max_iters: int = 200) -> list[float]:
    """Seconds per call of ``fn``: ``warmup`` untimed calls, then calls until ``min_time`` has passed."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while (time.perf_counter() - start < min_time or len(times) < 3) and len(times) < max_iters:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def interleaved_times(fns: dict[str, Callable[[], object]], rounds: int = 5, min_time: float = 1.0) -> dict[str, float]:
    """Median seconds per call for each function, measured in alternating rounds so that a change in the
    machine's load hits all of them alike."""
    for fn in fns.values():
        fn()  # warm-up (allocations, lazily built caches)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].extend(time_fn(fn, warmup=0, min_time=min_time / rounds))
    return {k: statistics.median(v) for k, v in samples.items()}


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    """A plain-text table with right-aligned numeric columns."""
    cells = [[str(h) for h in headers]] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def bench_models(
    names: list[str],
    compare: str | None = None,
    batch_size: int = 8,
    img_size: int | None = None,
    threads: int | None = None,
    min_time: float = 5.0,
) -> tuple[str, list[dict]]:
    """Inference throughput (images/s, eval, ``torch.inference_mode``) of visionattn models, optionally
    beside timm's model of the same name with the same weights (the max abs logit difference is shown).

    Returns the printed table and the rows as dicts.
    """
    import timm

    import visionattn

    if threads:
        torch.set_num_threads(threads)
    results = []
    for name in names:
        entry = visionattn.get_entry(name)
        kwargs = {} if img_size is None else {"img_size": img_size}
        ours = visionattn.create_model(entry.name, **kwargs).eval()
        size = getattr(ours, "img_size", None) or entry.default_input_size[1:]
        x = torch.randn(batch_size, entry.default_input_size[0], *size)
        fns = {"visionattn": lambda m=ours: m(x)}
        theirs = None
        if compare == "timm":
            if not timm.is_model(entry.name):
                raise ValueError(f"timm has no model named {entry.name!r} to compare with")
            theirs = timm.create_model(entry.name, **kwargs).eval()
            theirs.load_state_dict(ours.state_dict())
            fns["timm"] = lambda m=theirs: m(x)
        with torch.inference_mode():
            secs = interleaved_times(fns, min_time=min_time)
            diff = (ours(x) - theirs(x)).abs().max().item() if theirs is not None else None
        row = {
            "model": entry.name,
            "batch": batch_size,
            "input": "x".join(map(str, size)),
            "threads": torch.get_num_threads(),
            "ours_img_s": batch_size / secs["visionattn"],
        }
        if theirs is not None:
            row["timm_img_s"] = batch_size / secs["timm"]
            row["speedup"] = secs["timm"] / secs["visionattn"]
            row["max_abs_diff"] = diff
        results.append(row)
    headers = list(results[0].keys()) if results else []
    table = format_table(headers, [[r.get(h, "") for h in headers] for r in results])
    return table, results
