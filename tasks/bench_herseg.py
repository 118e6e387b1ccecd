"""Peak memory of one HER-Seg training step (behind ``visionattn bench herseg-memory``): DLA's chunked linear
attention (``attention_backend='torch'``) beside the quadratic reference, which forms every
``[B, heads, N, N]`` attention matrix.

A step is forward, a BCE-with-logits loss against a random mask and backward, on the CPU, no optimizer
step. Each measurement runs in a fresh process so that its peak RSS is its own. Two figures per row:

- ``peak tensors``: the peak of tensors alive during the step (activations, saved tensors, gradients;
  not weights or inputs), from :class:`visionattn.tasks.bench.PeakTensorMemory`; deterministic.
- ``peak RSS`` of the process (imports, weights and the step) and ``step RSS``, its rise over the RSS
  just before the step.

The reference path needs ``4 * heads * N^2`` bytes per DLA block for the saved attention matrices alone
(about 8.8 GB at 1024 x 1024, N = 4096), so it is measured at ``reference_size`` (512 by default) only,
beside the chunked path at the same size.
"""
from __future__ import annotations

import multiprocessing
import os
import resource
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F

from visionattn.tasks.bench import PeakTensorMemory
from visionattn.tasks.bench import format_table as _format_table


def _rss_mib() -> float:
    """Current resident set size of this process (Linux ``/proc``)."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_training_step(attention: str, size: int, batch: int, threads: int | None) -> dict:
    """One HER-Seg training step at ``size x size`` in this process; the row :func:`bench_herseg_memory`
    reports."""
    import gc

    from visionattn.decoders.herseg import HERSeg

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = HERSeg(img_size=size, attention_backend=attention).train()
    x = torch.randn(batch, 3, size, size)
    target = (torch.rand(batch, 1, size, size) > 0.5).float()
    gc.collect()
    rss_before = _rss_mib()
    with PeakTensorMemory() as tracker:
        F.binary_cross_entropy_with_logits(model(x), target).backward()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"attention": attention, "size": size, "batch": batch, "peak_tensors_mib": tracker.peak / 2**20,
            "peak_rss_mib": peak_rss, "step_rss_mib": peak_rss - rss_before}


def bench_herseg_memory(size: int = 1024, batch: int = 1, threads: int | None = None,
                        reference_size: int = 512) -> list[dict]:
    """Peak training-step memory of HER-Seg: the chunked attention at ``size`` and, at
    ``min(size, reference_size)``, the chunked attention beside the quadratic reference.

    Returns one dict per measurement: ``attention`` (``'torch'`` chunked or ``'reference'``), ``size``,
    ``batch``, ``peak_tensors_mib``, ``peak_rss_mib``, ``step_rss_mib``.
    """
    small = min(size, reference_size)
    runs = [("torch", size)] + ([("torch", small)] if small != size else []) + [("reference", small)]
    rows = []
    for attention, s in runs:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows.append(pool.submit(measure_training_step, attention, s, batch, threads).result())
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows of :func:`bench_herseg_memory` as a plain-text table (MiB)."""
    headers = ["attention", "input", "peak tensors MiB", "peak RSS MiB", "step RSS MiB"]
    names = {"torch": "chunked linear", "reference": "quadratic reference"}
    return _format_table(headers, [[names.get(r["attention"], r["attention"]), f"{r['batch']}x{r['size']}x{r['size']}",
                                     round(r["peak_tensors_mib"]), round(r["peak_rss_mib"]), round(r["step_rss_mib"])]
                                    for r in rows])
