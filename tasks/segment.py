"""``visionattn segment``: NIfTI volumes in, label maps out, on the input's own voxel grid.

For every case: load the channel files, preprocess as the model was trained (orientation, spacing,
intensity, from the model's saved recipe), sliding-window inference with stitching on the CPU, argmax,
invert the preprocessing exactly (MONAI's ``Invertd``, nearest-neighbour for labels), and write
``OUT/CASE.nii.gz`` with the input's affine and header (qform and sform both kept, with their codes).

Nothing is lost or left half-written: every output goes to a temporary name and is renamed into place;
an existing output is never replaced without ``overwrite``; a bad case is reported by name and the others
still run; the return code is non-zero when any case failed. ``OUT/summary.json`` lists every case (time,
volume per label in ml, Dice when reference labels are given, or the error).

Inputs: a ``.nii``/``.nii.gz`` file, or a folder of them. In a folder, files named ``CASE_0000.nii.gz``,
``CASE_0001.nii.gz``, ... are the channels of one case (nnU-Net's convention); other files are one case each.
"""
from __future__ import annotations

import importlib.resources
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import yaml

from visionattn.tasks.files import atomic_path, write_json_atomic

NIFTI_SUFFIXES = (".nii.gz", ".nii")
BUNDLED = Path(str(importlib.resources.files("visionattn") / "bundled"))  # bundled models and sample volumes
DEFAULT_MODEL = "hippocampus_agunet"
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


class SegmentError(ValueError):
    """A problem with one case (or the whole call); the message names what and how to fix it."""


def _stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


# ---------------------------------------------------------------------------------------------------
# the model


@dataclass
class SegmentationModel:
    """A trained network with the recipe it was trained by (preprocessing, labels, inference settings)."""

    network: torch.nn.Module
    config: dict
    source: str

    @property
    def data(self) -> dict:
        return self.config["data"]

    @property
    def labels(self) -> list[str]:
        return list(self.data["labels"])

    @property
    def in_channels(self) -> int:
        return int(self.data.get("in_channels", 1))


def bundled_models() -> list[str]:
    return sorted(p.name for p in BUNDLED.iterdir() if (p / "config.yaml").is_file()) if BUNDLED.is_dir() else []


def load_segmentation_model(spec: str) -> SegmentationModel:
    """``spec``: a bundled model name (``visionattn segment --list-models``), a trainer run folder
    (``config.yaml`` + ``model.safetensors``), or a weights file (``.safetensors``/``.pt``) beside its
    run's ``config.yaml``."""
    from visionattn.tasks.trainer import load_model_for_eval

    path = Path(spec)
    if not path.exists() and (BUNDLED / spec / "config.yaml").is_file():
        path = BUNDLED / spec
    if path.is_dir():
        weights = next((path / n for n in ("model.safetensors", "best.safetensors", "last.pt") if (path / n).is_file()), None)
        if weights is None:
            raise SegmentError(f"--model {spec}: no model.safetensors, best.safetensors or last.pt in {path}")
    elif path.is_file():
        weights = path
    else:
        import visionattn

        hint = (f"{spec!r} is an architecture without trained weights; train it with `visionattn train` and pass "
                f"the run folder") if spec in visionattn.list_models() else f"{spec!r} is neither a file nor a folder"
        raise SegmentError(f"--model: {hint} (bundled models: {', '.join(bundled_models()) or 'none'})")
    config_path = weights.parent / "config.yaml"
    if not config_path.is_file():
        raise SegmentError(f"--model {spec}: {config_path} not found; a model needs the config.yaml its training run wrote")
    config = yaml.safe_load(config_path.read_text()) or {}
    task = config.get("task", "classification")
    if task != "segmentation":
        raise SegmentError(f"--model {spec}: this is a {task} model ({config_path} says task: {task}); "
                           f"`segment` needs a segmentation model")
    data = config.get("data") or {}
    if int(data.get("spatial_dims", 3)) != 3:
        raise SegmentError(f"--model {spec}: a 2-D model; `segment` reads 3-D NIfTI volumes")
    network = load_model_for_eval(config, str(weights), {"classes": list(data["labels"]), "spatial_dims": 3})
    return SegmentationModel(network, config, str(weights))


# ---------------------------------------------------------------------------------------------------
# finding cases


@dataclass
class Case:
    name: str
    channels: list[Path]
    reference: Path | None = None
    problems: list[str] = field(default_factory=list)


def find_cases(input_path: str | Path, in_channels: int) -> list[Case]:
    """The cases under ``input_path`` (a file or a folder), sorted by name. Missing channel files are
    recorded as a problem of their case rather than raised, so the other cases still run."""
    src = Path(input_path)
    if src.is_file():
        if not src.name.endswith(NIFTI_SUFFIXES):
            raise SegmentError(f"input {src} is not a .nii or .nii.gz file")
        m = _CHANNEL.match(_stem(src))
        return [Case(m["case"] if m else _stem(src), [src])]
    if not src.is_dir():
        raise SegmentError(f"input not found: {src}")
    files = sorted(p for p in src.iterdir() if p.name.endswith(NIFTI_SUFFIXES) and not p.name.startswith("."))
    if not files:
        raise SegmentError(f"input folder {src} holds no .nii or .nii.gz files")
    grouped: dict[str, dict[int, Path]] = {}
    singles: dict[str, Path] = {}
    for f in files:
        m = _CHANNEL.match(_stem(f))
        if m:
            grouped.setdefault(m["case"], {})[int(m["channel"])] = f
        else:
            singles[_stem(f)] = f
    cases = [Case(name, [f]) for name, f in singles.items()]
    for name, chans in grouped.items():
        case = Case(name, [chans[i] for i in sorted(chans)])
        expected = list(range(in_channels))
        if sorted(chans) != expected:
            missing = [f"{name}_{i:04d}" for i in expected if i not in chans]
            extra = [f"{name}_{i:04d}" for i in sorted(chans) if i not in expected]
            case.problems.append(f"the model takes {in_channels} channel file(s) {name}_0000..{name}_{in_channels - 1:04d}; "
                                 + (f"missing {', '.join(missing)}" if missing else f"unexpected {', '.join(extra)}"))
        cases.append(case)
    return sorted(cases, key=lambda c: c.name)


def check_volume(case: Case, in_channels: int):
    """Read the channel headers and data once to check them; returns the first channel's nibabel image
    (whose grid and header the output takes). Raises :class:`SegmentError` naming the problem."""
    import nibabel as nib

    first = None
    for f in case.channels:
        try:
            img = nib.load(str(f))
            data = np.asanyarray(img.dataobj)
        except Exception as e:
            raise SegmentError(f"cannot read {f.name}: {type(e).__name__}: {e} (corrupt or truncated file?)") from e
        all_channels_in_one = len(case.channels) == 1 and data.ndim == 4 and data.shape[3] == in_channels
        one_channel = data.ndim == 3 or (data.ndim == 4 and data.shape[3] == 1)
        if not (all_channels_in_one or (one_channel and len(case.channels) == in_channels)):
            want = "a 3-D volume" if in_channels == 1 else \
                f"{in_channels} 3-D files {case.name}_0000 .. {case.name}_{in_channels - 1:04d}, or one 4-D file with {in_channels} channels last"
            raise SegmentError(f"{f.name} has shape {tuple(data.shape)}; the model needs {want}")
        if not np.isfinite(data).all():
            bad = int((~np.isfinite(data)).sum())
            raise SegmentError(f"{f.name} has {bad} NaN/Inf voxels; fix or mask them before segmenting")
        if first is None:
            first = img
        elif img.shape[:3] != first.shape[:3] or not np.allclose(img.affine, first.affine, atol=1e-4):
            raise SegmentError(f"{f.name} does not share the grid of {case.channels[0].name} (shape or affine differ)")
    return first


# ---------------------------------------------------------------------------------------------------
# writing


def write_like(reference, array: np.ndarray, path: Path) -> None:
    """Write ``array`` on ``reference``'s grid: its affine, its header with both qform and sform (and codes),
    no intensity scaling; atomically (temporary file, then rename)."""
    import nibabel as nib

    header = reference.header.copy()
    img = nib.Nifti1Image(array, reference.affine, header)
    img.set_data_dtype(array.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    qform, qcode = reference.header.get_qform(coded=True)
    sform, scode = reference.header.get_sform(coded=True)
    img.set_qform(qform if qform is not None else reference.affine, int(qcode))
    img.set_sform(sform if sform is not None else reference.affine, int(scode))
    with atomic_path(path, ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix) as tmp:
        nib.save(img, str(tmp))


def write_probabilities(probs: np.ndarray, path: Path, dtype=np.float16) -> None:
    with atomic_path(path, ".npz") as tmp:
        np.savez_compressed(tmp, probabilities=probs.astype(dtype))


def write_overlay(image: np.ndarray, labels: np.ndarray, path: Path, n_slices: int = 8, title: str = "") -> None:
    """A PNG montage of ``n_slices`` slices along the last axis (through the labelled region when there is
    one) with the labels drawn over the image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = np.nonzero(labels.reshape(-1, labels.shape[-1]).any(0))[0]
    lo, hi = (int(z.min()), int(z.max())) if len(z) else (0, labels.shape[-1] - 1)
    picks = np.unique(np.linspace(lo, hi, n_slices).round().astype(int))
    cols = min(4, len(picks))
    rows = -(-len(picks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    vmin, vmax = np.percentile(image, [1, 99])
    masked = np.ma.masked_equal(labels, 0)
    for ax in axes.flat:
        ax.axis("off")
    for ax, k in zip(axes.flat, picks):
        ax.imshow(image[..., k].T, cmap="gray", origin="lower", vmin=vmin, vmax=vmax)
        ax.imshow(masked[..., k].T, cmap="tab10", origin="lower", alpha=0.5, vmin=0, vmax=9, interpolation="nearest")
        ax.set_title(f"slice {k}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        with atomic_path(path, ".png") as tmp:
            fig.savefig(tmp, dpi=80)
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# one case


def dice_per_label(pred: np.ndarray, truth: np.ndarray, n_labels: int) -> list[float | None]:
    """Dice of labels ``1 .. n_labels-1`` (``None`` where the label is in neither volume)."""
    out = []
    for k in range(1, n_labels):
        p, t = pred == k, truth == k
        denom = int(p.sum()) + int(t.sum())
        out.append(None if denom == 0 else 2.0 * int((p & t).sum()) / denom)
    return out


def segment_case(model: SegmentationModel, case: Case, out_dir: Path, *, device: str = "cpu",
                 roi_size: Sequence[int] | None = None, overlap: float | None = None, mode: str | None = None,
                 tta: bool = False, save_probabilities: bool = False, overlay: bool = False,
                 overwrite: bool = False, sw_batch_size: int | None = None) -> dict:
    """Segment one case; returns its summary entry. Raises :class:`SegmentError` for a bad case."""
    import nibabel as nib
    from monai.data import MetaTensor
    from monai.transforms import Compose, Invertd

    from visionattn.tasks.segmentation import preprocessing, sliding_window_predict

    start = time.time()
    if case.problems:
        raise SegmentError("; ".join(case.problems))
    outputs = {"labels": out_dir / f"{case.name}.nii.gz"}
    if save_probabilities:
        outputs["probabilities"] = out_dir / f"{case.name}.npz"
    if overlay:
        outputs["overlay"] = out_dir / f"{case.name}.png"
    existing = [p.name for p in outputs.values() if p.exists()]
    if existing and not overwrite:
        raise SegmentError(f"{', '.join(existing)} already in {out_dir}; pass --overwrite to replace")
    reference = check_volume(case, model.in_channels)

    data = model.data
    inference = dict(model.config.get("inference") or {})
    pre = Compose(preprocessing(data, keys=("image",)))
    files = [str(f) for f in case.channels]
    item = pre({"image": files if len(files) > 1 else files[0]})
    image = item["image"]
    if image.shape[0] != model.in_channels:
        raise SegmentError(f"{case.channels[0].name}: {image.shape[0]} channel(s), the model takes {model.in_channels}")
    probs = sliding_window_predict(
        model.network, image.as_tensor()[None], list(roi_size or data["roi_size"]),
        float(overlap if overlap is not None else inference.get("overlap", 0.5)),
        mode or inference.get("mode", "gaussian"), int(sw_batch_size or inference.get("sw_batch_size", 4)),
        device, "cpu", tta=tta,
    )[0]
    n_labels = len(model.labels)
    label_dtype = np.uint8 if n_labels <= 255 else np.int16
    pred = MetaTensor(probs.argmax(0, keepdim=True).to(torch.int16), meta=image.meta,
                      applied_operations=image.applied_operations)
    keys = ["pred"] + (["probs"] if save_probabilities else [])
    bundle = {"image": image, "pred": pred}
    if save_probabilities:
        bundle["probs"] = MetaTensor(probs, meta=image.meta, applied_operations=image.applied_operations)
    del probs
    inverted = Invertd(keys=keys, transform=pre, orig_keys=["image"] * len(keys),
                       nearest_interp=[True] + [False] * (len(keys) - 1))(bundle)
    labels = np.asarray(inverted["pred"][0]).round().astype(label_dtype)
    if labels.shape != reference.shape[:3]:
        raise SegmentError(f"internal error: inverted prediction {labels.shape} != input grid {reference.shape[:3]}")

    out_dir.mkdir(parents=True, exist_ok=True)
    write_like(reference, labels, outputs["labels"])
    if save_probabilities:
        write_probabilities(np.asarray(inverted["probs"]), outputs["probabilities"])
    voxel_ml = float(np.prod(reference.header.get_zooms()[:3])) / 1000.0
    entry = {
        "case": case.name, "status": "ok", "inputs": [str(f) for f in case.channels],
        "outputs": {k: str(v) for k, v in outputs.items()},
        "volume_ml": {name: float((labels == k).sum()) * voxel_ml for k, name in enumerate(model.labels) if k > 0},
    }
    if case.reference is not None:
        truth = np.asarray(nib.load(str(case.reference)).dataobj).round().astype(np.int64)
        entry["dice"] = dict(zip(model.labels[1:], dice_per_label(labels, truth, n_labels)))
    if overlay:
        anatomy = np.asarray(reference.dataobj, dtype=np.float32)
        anatomy = anatomy[..., 0] if anatomy.ndim == 4 else anatomy
        write_overlay(anatomy, labels, outputs["overlay"], title=case.name)
    entry["seconds"] = round(time.time() - start, 3)
    return entry


# ---------------------------------------------------------------------------------------------------
# the command


def _writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise SegmentError(f"output folder {folder} is not writable: {e.strerror or e}") from e


def run_segment(input_path: str | None, output: str | None, model_spec: str | None = None, *, device: str = "cpu",
                roi_size: Sequence[int] | None = None, overlap: float | None = None, mode: str | None = None,
                tta: bool = False, save_probabilities: bool = False, overwrite: bool = False,
                progress: bool = True, overlay: bool = False, labels_dir: str | None = None) -> int:
    """The ``segment`` command. Without ``input_path`` it segments the bundled sample volumes with the
    bundled model and reports Dice against their reference labels. Returns the exit code."""
    from visionattn.tasks.trainer import dist_setup, progress as progress_bar

    demo = input_path is None
    if demo:
        input_path = str(BUNDLED / "samples" / "images")
        labels_dir = labels_dir or str(BUNDLED / "samples" / "labels")
        output = output or "visionattn-segment-demo"
        overlay = True
    if output is None:
        raise SegmentError("-o/--output is required with -i/--input")
    if mode is not None and mode not in ("gaussian", "constant"):
        raise SegmentError(f"--mode must be 'gaussian' or 'constant', got {mode!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SegmentError("--device cuda: no CUDA device is available here; use --device cpu")
    model = load_segmentation_model(model_spec or DEFAULT_MODEL)
    model.network.to(device)
    cases = find_cases(input_path, model.in_channels)
    if labels_dir:
        for case in cases:
            ref = next((Path(labels_dir) / f"{case.name}{s}" for s in NIFTI_SUFFIXES if (Path(labels_dir) / f"{case.name}{s}").is_file()), None)
            case.reference = ref
    out_dir = Path(output)
    _writable(out_dir)

    rank, world = dist_setup(device)  # (0, 1) outside torchrun
    mine = cases[rank::world]
    entries = []
    bar = progress_bar(mine, desc="segment", disable=not progress or None)
    for case in bar:
        try:
            entry = segment_case(model, case, out_dir, device=device, roi_size=roi_size, overlap=overlap, mode=mode,
                                 tta=tta, save_probabilities=save_probabilities, overlay=overlay, overwrite=overwrite)
        except Exception as e:  # one bad case must not stop the others
            msg = str(e) if isinstance(e, SegmentError) else f"{type(e).__name__}: {e}"
            print(f"segment: case {case.name}: {msg}", file=sys.stderr)
            entry = {"case": case.name, "status": "failed", "inputs": [str(f) for f in case.channels], "error": msg}
        entries.append(entry)
    entries = _gather(entries, world)
    failed = [e for e in entries if e["status"] != "ok"]
    if rank == 0:
        summary = {"model": model.source, "device": device, "cases": sorted(entries, key=lambda e: e["case"])}
        scored = [e["dice"] for e in entries if "dice" in e]
        if scored:
            summary["mean_dice"] = {name: float(np.mean([d[name] for d in scored if d[name] is not None]))
                                    for name in model.labels[1:]}
        write_json_atomic(summary, out_dir / "summary.json")
        for e in summary["cases"]:
            extra = ""
            if "dice" in e:
                extra = "  Dice " + ", ".join(f"{k} {v:.3f}" for k, v in e["dice"].items() if v is not None)
            print(f"{e['case']:24s} {e['status']:6s} {e.get('seconds', 0):6.2f} s{extra}" if e["status"] == "ok"
                  else f"{e['case']:24s} failed  {e['error']}")
        if "mean_dice" in summary:
            print("mean Dice: " + ", ".join(f"{k} {v:.3f}" for k, v in summary["mean_dice"].items()))
        print(f"segment: {len(entries) - len(failed)} of {len(entries)} cases written to {out_dir}"
              + (f"; {len(failed)} failed" if failed else ""))
    return 1 if failed else 0


def _gather(entries: list[dict], world: int) -> list[dict]:
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        return entries
    gathered: list = [None] * world
    dist.all_gather_object(gathered, entries)
    return [e for part in gathered for e in part]
