"""Benchmarks of ``visionattn segment`` (behind ``visionattn bench segment``):

- ``time``: seconds per volume on real cases, ``segment`` (preprocess, sliding windows, inversion, NIfTI
  written with the input's header) beside a plain MONAI script doing the same steps with MONAI's stock
  pieces (``LoadImaged`` ... ``sliding_window_inference`` ... ``Invertd`` ... ``SaveImage``), same network,
  window, overlap and blending; the ratio is plain / ours (above 1: ours is faster).
- ``memory``: peak RSS of a ``segment`` call on one large synthetic volume (512 x 512 x 300 by default),
  measured in a fresh process (``ru_maxrss`` of the child).
"""
from __future__ import annotations

import multiprocessing
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from visionattn.tasks.bench import format_table


def plain_monai_segment(network: torch.nn.Module, config: dict, image_path: str, out_dir: str) -> None:
    """What a MONAI user would write: the same preprocessing, ``sliding_window_inference``, argmax,
    ``Invertd`` back to the input grid and ``SaveImage``."""
    from monai.inferers import sliding_window_inference
    from monai.transforms import AsDiscreted, Compose, Invertd, SaveImage

    from visionattn.tasks.segmentation import preprocessing

    data, inference = config["data"], config.get("inference") or {}
    pre = Compose(preprocessing(data, keys=("image",)))
    item = pre({"image": image_path})
    with torch.no_grad():
        logits = sliding_window_inference(item["image"][None], list(data["roi_size"]), int(inference.get("sw_batch_size", 4)),
                                          network, overlap=float(inference.get("overlap", 0.5)),
                                          mode=inference.get("mode", "gaussian"))
    item["pred"] = logits[0]
    post = Compose([AsDiscreted(keys="pred", argmax=True),
                    Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True)])
    item = post(item)
    SaveImage(output_dir=out_dir, output_postfix="seg", output_dtype=np.uint8, separate_folder=False,
              print_log=False)(item["pred"])


def bench_segment_time(model: str = "hippocampus_agunet", images: Sequence[str] | None = None, repeats: int = 2,
                       threads: int | None = None) -> tuple[str, list[dict]]:
    """Seconds per volume, ``segment`` vs the plain MONAI script, on ``images`` (default: the bundled
    samples); the best of ``repeats`` passes over the cases for each."""
    from visionattn.tasks.segment import BUNDLED, Segmenter, case_outputs, find_cases, segment_case

    if threads:
        torch.set_num_threads(threads)
    segmenter = Segmenter.from_run(model)
    seg_model = segmenter.model
    paths = list(images) if images else sorted(str(p) for p in (BUNDLED / "samples" / "images").glob("*.nii.gz"))
    cases = [c for p in paths for c in find_cases(p, seg_model.in_channels)]
    timings = {"visionattn segment": [], "plain MONAI script": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            start = time.perf_counter()
            for case in cases:
                segment_case(segmenter, case, case_outputs(case.name, Path(tmp) / f"ours{r}"))
            timings["visionattn segment"].append((time.perf_counter() - start) / len(cases))
            start = time.perf_counter()
            for case in cases:
                plain_monai_segment(seg_model.network, seg_model.config, str(case.channels[0]), str(Path(tmp) / f"plain{r}"))
            timings["plain MONAI script"].append((time.perf_counter() - start) / len(cases))
    plain = min(timings["plain MONAI script"])
    rows = [{"method": k, "cases": len(cases), "seconds_per_volume": min(v), "ratio_vs_plain": plain / min(v)}
            for k, v in timings.items()]
    table = format_table(["method", "cases", "s / volume", "plain / this"],
                         [[r["method"], r["cases"], f"{r['seconds_per_volume']:.3f}", f"{r['ratio_vs_plain']:.2f}x"]
                          for r in rows])
    return table, rows


def _segment_peak_rss(model: str, shape: tuple[int, int, int], overlap: float, threads: int | None) -> dict:
    """In a fresh process: write a synthetic volume of ``shape`` (1 mm, smooth random intensities), segment
    it, report the peak RSS and the time."""
    import nibabel as nib

    from visionattn.tasks.segment import Segmenter, case_outputs, find_cases, segment_case

    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        coarse = rng.normal(size=tuple(max(2, s // 16) for s in shape)).astype(np.float32)
        volume = np.kron(coarse, np.ones((16, 16, 16), np.float32))[: shape[0], : shape[1], : shape[2]]
        volume = np.pad(volume, [(0, s - v) for s, v in zip(shape, volume.shape)])
        path = Path(tmp) / "large.nii.gz"
        nib.save(nib.Nifti1Image(volume, np.eye(4)), str(path))
        del volume, coarse
        segmenter = Segmenter.from_run(model, overlap=overlap)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        start = time.perf_counter()
        case = find_cases(path, 1)[0]
        segment_case(segmenter, case, case_outputs(case.name, Path(tmp) / "out"))
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"shape": "x".join(map(str, shape)), "overlap": overlap, "seconds": seconds, "peak_rss_mib": peak,
            "rss_before_mib": rss_before, "status": "ok"}


def bench_segment_memory(model: str = "hippocampus_agunet", shape: Sequence[int] = (512, 512, 300), overlap: float = 0.0,
                         threads: int | None = None) -> tuple[str, list[dict]]:
    """Peak RSS of segmenting one ``shape`` volume, in a fresh process."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        row = pool.submit(_segment_peak_rss, model, tuple(int(s) for s in shape), overlap, threads).result()
    table = format_table(["volume", "overlap", "seconds", "peak RSS MiB", "RSS before MiB"],
                         [[row["shape"], row["overlap"], f"{row['seconds']:.1f}", round(row["peak_rss_mib"]),
                           round(row["rss_before_mib"])]])
    return table, [row]


def bench_segment_tta(model: str = "hippocampus_agunet", data_root: str | None = None,
                      threads: int | None = None) -> tuple[str, list[dict]]:
    """Dice of a trained segmentation run on its recipe's validation cases without test-time mirroring, with
    mirroring along the recipe's flip axes (what ``--tta`` does), and along every axis (what it must not
    do), with the seconds per case of each."""
    import nibabel as nib

    from visionattn.tasks.segment import Segmenter, dice_per_label
    from visionattn.tasks.segmentation import find_msd_cases, fixed_case_split

    if threads:
        torch.set_num_threads(threads)
    base = Segmenter.from_run(model, tta=False)
    data = base.model.data
    root = data_root or data.get("root")
    if not root or not Path(root).is_dir():
        raise FileNotFoundError(f"data folder {root!r} not found; pass the MSD folder the run was trained on")
    _, val = fixed_case_split(find_msd_cases(root), float(data.get("val_fraction", 0.2)), int(data.get("split_seed", 0)),
                              folds=data.get("folds"), fold=data.get("fold"))  # a cross-validation fold's own cases
    rows = []
    every_axis = list(range(int(data.get("spatial_dims", 3))))
    for name, axes in (("no mirroring", []), ("recipe's flip axes", None), ("every axis", every_axis)):
        seg = Segmenter(base.model, tta=axes is None or bool(axes))
        if axes is not None:
            seg.mirror_axes = axes
        scores, start = [], time.perf_counter()
        for case in val:
            image = nib.load(str(case["image"]))
            truth = np.asarray(nib.load(str(case["label"])).dataobj)
            labels = seg.predict(np.asarray(image.dataobj, np.float32), image.affine)["labels"]
            scores.append(dice_per_label(labels, truth, len(seg.labels)))
        d = np.asarray(scores, dtype=float)
        row = {"mirroring": name, "axes": seg.mirror_axes, "cases": len(val), "mean_dice": float(np.nanmean(d)),
               "seconds_per_case": (time.perf_counter() - start) / len(val)}
        row.update({f"dice_{label}": float(np.nanmean(d[:, k])) for k, label in enumerate(seg.labels[1:])})
        print(f"{name:20s} mean Dice {row['mean_dice']:.4f}  {row['seconds_per_case']:.2f} s/case", flush=True)
        rows.append(row)
    table = format_table(["mirroring", "axes", "cases", "mean Dice", "s / case"],
                         [[r["mirroring"], r["axes"], r["cases"], f"{r['mean_dice']:.4f}", f"{r['seconds_per_case']:.2f}"]
                          for r in rows])
    return table, rows
