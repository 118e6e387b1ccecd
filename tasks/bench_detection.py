"""Detector benchmark: DFIR-DETR beside its RT-DETR-R18 baseline, same input, same run.

``bench_detectors()`` reports parameters, forward GFLOPs (``torch.utils.flop_counter``; FFTs and sorts are
not counted) and the CPU latency of one image, with each figure's ratio to RT-DETR-R18. The latencies are
measured in alternating rounds so that a change in the machine's load hits both models alike.
"""
from __future__ import annotations

import statistics
import time
from typing import Sequence

import torch

from visionattn.registry import count_flops, create_model
from visionattn.tasks.bench import format_table as _format_table

BASELINE = "rtdetr_r18"
DETECTORS = (BASELINE, "dfir_detr")


def bench_detectors(size: int = 640, threads: int | None = None, repeats: int = 3,
                    models: Sequence[str] = DETECTORS) -> list[dict]:
    """Parameters, GFLOPs and CPU latency of each detector on one ``size`` x ``size`` image.

    Args:
        size: the detectors' input size (and the test image's), a multiple of 32.
        threads: torch CPU threads during the run (restored afterwards); torch's current setting if None.
        repeats: timed forward passes per model (after one warm-up), taken in alternating rounds.
        models: registered detector names; ratios are relative to the first.
    Returns:
        one dict per model: ``model, params_m, gflops, latency_ms`` and ``params_ratio, gflops_ratio,
        latency_ratio`` (each divided by the first model's).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))
        built = {name: create_model(name, input_size=size).eval() for name in models}
        rows = {name: {"model": name,
                       "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                       "gflops": count_flops(model, (3, size, size)) / 1e9}
                for name, model in built.items()}
        seconds: dict[str, list[float]] = {name: [] for name in models}
        with torch.inference_mode():
            for model in built.values():
                model([image])  # warm-up
            for _ in range(repeats):
                for name, model in built.items():
                    start = time.perf_counter()
                    model([image])
                    seconds[name].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous_threads)
    for name in models:
        rows[name]["latency_ms"] = 1e3 * statistics.median(seconds[name])
    base = rows[models[0]]
    for row in rows.values():
        for key in ("params_m", "gflops", "latency_ms"):
            row[key.split("_")[0] + "_ratio"] = row[key] / base[key]
    return list(rows.values())


def format_table(rows: list[dict]) -> str:
    """The rows of :func:`bench_detectors` as a plain-text table."""
    headers = ["model", "params (M)", "GFLOPs", "latency (ms)", "params ratio", "GFLOPs ratio", "latency ratio"]
    keys = ["model", "params_m", "gflops", "latency_ms", "params_ratio", "gflops_ratio", "latency_ratio"]
    return _format_table(headers, [[row[k] for k in keys] for row in rows])
