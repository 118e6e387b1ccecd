"""``visionattn segment``: NIfTI volumes in, label maps out, on the input's own voxel grid.

For every case: load the channel files, preprocess as the model was trained (orientation, spacing,
intensity, from the model's saved recipe), sliding-window inference with stitching on the CPU, argmax,
invert the preprocessing exactly (MONAI's ``Invertd``, nearest-neighbour for labels), and write
``OUT/CASE.nii.gz`` with the input's affine and header (qform and sform both kept, with their codes).

Nothing is lost or left half-written, whatever the input:

- every output goes to a temporary name and is renamed into place;
- an output path that is an input (a channel file or a reference label file, compared after resolving
  symlinks) is refused, ``overwrite`` or not, and so is an output folder that is the input or labels folder;
- a case whose requested outputs all exist is skipped (nnU-Net's behaviour on re-runs) and keeps its earlier
  ``summary.json`` entry; ``overwrite`` redoes it. Outputs that only partly exist are never replaced
  without ``overwrite``;
- ``OUT/summary.json`` lists every case (time, volume per label in ml on the input's own grid, Dice when
  reference labels are given, or the error), rounded, with this run's totals, and is merged with the one an
  earlier run left; one that cannot be read is moved aside;
- headers are checked before any voxel data is read: voxel counts (``max_voxels``, also after resampling to
  the model's spacing), header extensions, intensity scaling; then the values are checked as the model sees
  them (float32 after scaling, and again after the intensity normalisation);
- a bad case is reported by name once and the others still run; the return code is non-zero when any case
  failed (skipped cases are not failures).

Inputs: a ``.nii``/``.nii.gz`` file, or a folder of them. In a folder, files named ``CASE_0000.nii.gz``,
``CASE_0001.nii.gz``, ... are the channels of one case (nnU-Net's convention); other files are one case each.
Two files that name the same case (``a.nii`` + ``a.nii.gz``, ``a.nii.gz`` + ``a_0000.nii.gz``) fail that case.

It prints a line per case as soon as it is done (:func:`case_line`), and writes with ``overlay`` a PNG per case
whose legend gives each label's name (the recipe's ``data.labels``), colour and volume (:func:`write_overlay`).
"""
from __future__ import annotations

import importlib.resources
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from visionattn.errors import InvalidInputError
from visionattn.tasks.errors import SegmentError
from visionattn.tasks.files import atomic_path
from visionattn.tasks.niftiio import DEFAULT_MAX_VOXELS, cannot_read, check_header, verify_gzip_stream

NIFTI_SUFFIXES = (".nii.gz", ".nii")
BUNDLED = Path(str(importlib.resources.files("visionattn") / "bundled"))  # bundled models and sample volumes
DEFAULT_MODEL = "hippocampus_agunet"
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


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
    from visionattn.tasks.run import bundled_runs

    return bundled_runs()


def load_segmentation_model(spec: str) -> SegmentationModel:
    """``spec``: a bundled model name (``visionattn segment --list-models``), a trainer run folder, or a
    weights file beside its run's ``config.yaml``: a :class:`~visionattn.tasks.run.Run`, loaded with the
    weights precedence every command shares."""
    from visionattn.tasks.run import Run

    path = Path(spec)
    if not path.exists() and spec not in bundled_models():
        import visionattn

        hint = (f"{spec!r} is an architecture without trained weights; train it with `visionattn train` and pass "
                f"the run folder") if spec in visionattn.list_models() else f"{spec!r} is neither a file nor a folder"
        raise SegmentError(f"--model: {hint} (bundled models: {', '.join(bundled_models()) or 'none'})")
    try:
        run = Run.load(spec)  # a run folder is data: its config is validated before anything is built
    except (InvalidInputError, FileNotFoundError) as e:
        raise SegmentError(f"--model {spec}: {e}") from None
    if run.task != "segmentation":
        raise SegmentError(f"--model {spec}: this is a {run.task} model ({run.folder / 'config.yaml'} says task: "
                           f"{run.task}); `segment` needs a segmentation model")
    data = run.config.get("data") or {}
    if int(data.get("spatial_dims", 3)) != 3:
        raise SegmentError(f"--model {spec}: a 2-D model; `segment` reads 3-D NIfTI volumes")
    if not data.get("labels"):
        raise SegmentError(f"--model {spec}: {run.folder / 'config.yaml'} records no data.labels")
    network = run.build_model({"classes": list(data["labels"]), "spatial_dims": 3})
    return SegmentationModel(network, run.config, str(run.weights))


# The recipe keys that decide what a network is shown and what its outputs mean: the members of an ensemble
# must agree on all of them, since their probabilities are averaged voxel by voxel on one preprocessed grid.
ENSEMBLE_DATA_KEYS = ("labels", "in_channels", "spatial_dims", "orientation", "spacing", "zoom", "intensity",
                      "grayscale", "channels", "clahe")


def crossval_folds(folder: Path) -> list[Path] | None:
    """The fold folders (``DIR/fold0``, ``DIR/fold1``, ...) of a ``visionattn crossval`` folder, in fold order;
    ``None`` when ``folder`` is not one (a run folder has its own ``config.yaml``)."""
    if not folder.is_dir() or (folder / "config.yaml").exists():
        return None
    folds = [p for p in folder.iterdir() if re.fullmatch(r"fold\d+", p.name) and (p / "config.yaml").is_file()]
    return sorted(folds, key=_fold_number) or None


def _fold_number(fold: Path) -> int:
    return int(fold.name[len("fold"):])


def load_segmentation_models(specs: str | Sequence[str]) -> list[SegmentationModel]:
    """The models ``specs`` name, for one prediction averaged over them (nnU-Net's ensemble of folds).

    Each spec is what :func:`load_segmentation_model` takes, or a ``visionattn crossval`` folder, which stands
    for all its folds (every fold its recipe's ``data.folds`` counts, each finished: its ``model.safetensors``
    written). :class:`Segmenter` checks that the members agree on the recipe's preprocessing and labels
    (:func:`check_ensemble`)."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise SegmentError("--model: no model given")
    models = []
    for spec in specs:
        folds = crossval_folds(Path(spec))
        if folds is None:
            models.append(load_segmentation_model(spec))
            continue
        unfinished = [f.name for f in folds if not (f / "model.safetensors").is_file()]
        if unfinished:
            raise SegmentError(f"--model {spec}: a crossval folder whose {', '.join(unfinished)} "
                               f"{'has' if len(unfinished) == 1 else 'have'} not finished (no model.safetensors); run "
                               f"its crossval command again to finish, or name finished folds one by one "
                               f"(--model {Path(spec) / folds[0].name} --model ...)")
        members = [load_segmentation_model(str(f)) for f in folds]
        expected = members[0].data.get("folds")  # the fold count the recipe was cross-validated with
        missing = sorted(set(range(expected)) - {_fold_number(f) for f in folds}) if isinstance(expected, int) else []
        if missing:
            raise SegmentError(f"--model {spec}: a crossval folder of {expected} folds without "
                               f"{', '.join(f'fold{k}' for k in missing)}; train {'it' if len(missing) == 1 else 'them'} "
                               f"with its crossval command, or name the folds to use one by one (--model "
                               f"{Path(spec) / folds[0].name} --model ...)")
        models.extend(members)
    sources = [Path(m.source).resolve() for m in models]
    repeated = sorted({str(s) for s in sources if sources.count(s) > 1})
    if repeated:
        raise SegmentError(f"--model: the same weights given twice ({', '.join(repeated)}); each member of an "
                           f"ensemble counts once")
    return models  # whether they can be ensembled is checked where every prediction starts: Segmenter


def check_ensemble(models: Sequence[SegmentationModel]) -> None:
    """Refuse members whose recipes preprocess or label differently from the first's (:data:`ENSEMBLE_DATA_KEYS`)."""
    first = models[0]
    for other in models[1:]:
        differ = [k for k in ENSEMBLE_DATA_KEYS if first.data.get(k) != other.data.get(k)]
        if differ:
            what = "; ".join(f"data.{k}: {first.data.get(k)!r} against {other.data.get(k)!r}" for k in differ)
            raise SegmentError(f"--model: {other.source} cannot join an ensemble with {first.source}: their recipes "
                               f"differ ({what}), and an ensemble averages probabilities of the same labels on the "
                               f"same preprocessed grid")


# ---------------------------------------------------------------------------------------------------
# finding cases


@dataclass
class Case:
    name: str
    channels: list[Path]
    reference: Path | None = None
    problems: list[str] = field(default_factory=list)

    def inputs(self) -> list[Path]:
        """Every file this case reads: its channel files and its reference labels."""
        return self.channels + ([self.reference] if self.reference is not None else [])


def find_cases(input_path: str | Path, in_channels: int) -> list[Case]:
    """The cases under ``input_path`` (a file or a folder), sorted by name. Missing channel files, two files
    that name the same case or channel, and files that are not regular files are recorded as problems of
    their case rather than raised, so the other cases still run."""
    src = Path(input_path)
    if src.exists() and not src.is_dir():
        if not src.name.endswith(NIFTI_SUFFIXES):
            raise SegmentError(f"input {src} is not a .nii or .nii.gz file")
        if not src.is_file():
            raise SegmentError(f"input {src} is not a regular file")
        m = _CHANNEL.match(_stem(src))
        return [Case(m["case"] if m else _stem(src), [src])]
    if not src.is_dir():
        raise SegmentError(f"input not found: {src}")
    files = sorted(p for p in src.iterdir() if p.name.endswith(NIFTI_SUFFIXES) and not p.name.startswith("."))
    if not files:
        raise SegmentError(f"input folder {src} holds no .nii or .nii.gz files")
    # case name -> channel number (None: a single-file case) -> the files claiming that slot
    slots: dict[str, dict[int | None, list[Path]]] = {}
    for f in files:
        m = _CHANNEL.match(_stem(f))
        name, channel = (m["case"], int(m["channel"])) if m else (_stem(f), None)
        slots.setdefault(name, {}).setdefault(channel, []).append(f)
    cases = []
    for name, by_channel in slots.items():
        channels = sorted(by_channel, key=lambda c: -1 if c is None else c)
        problems = [f"{' and '.join(f.name for f in fs)} are both "
                    + (f"case {name}" if c is None else f"channel {c:04d} of case {name}") + "; rename or remove one"
                    for c, fs in by_channel.items() if len(fs) > 1]
        if None in by_channel and len(by_channel) > 1:
            problems.append(f"{by_channel[None][0].name} and {by_channel[channels[1]][0].name} both name case {name} "
                            f"(a single-file case and a channel file); rename or remove one")
        if problems:  # the case fails, listing every file that claims it
            cases.append(Case(name, sorted(f for fs in by_channel.values() for f in fs), problems=problems))
            continue
        case = Case(name, [by_channel[c][0] for c in channels])
        expected = list(range(in_channels))
        if None not in by_channel and channels != expected:
            missing = [f"{name}_{i:04d}" for i in expected if i not in by_channel]
            extra = [f"{name}_{i:04d}" for i in channels if i not in expected]
            case.problems.append(f"the model takes {in_channels} channel file(s) {name}_0000..{name}_{in_channels - 1:04d}; "
                                 + (f"missing {', '.join(missing)}" if missing else f"unexpected {', '.join(extra)}"))
        case.problems += [f"{f.name} is not a regular file" for f in case.channels if not f.is_file()]
        cases.append(case)
    return sorted(cases, key=lambda c: c.name)


def find_references(cases: list[Case], labels_dir: str | Path) -> None:
    """Set each case's reference label file from ``labels_dir`` (``CASE.nii.gz`` or ``CASE.nii``); both
    present is a problem of the case, since either could be meant."""
    folder = Path(labels_dir)
    if not folder.is_dir():
        raise SegmentError(f"--labels {folder}: not a folder")
    for case in cases:
        found = [folder / f"{case.name}{s}" for s in NIFTI_SUFFIXES if (folder / f"{case.name}{s}").is_file()]
        if len(found) > 1:
            case.problems.append(f"reference labels {' and '.join(f.name for f in found)} are both in {folder}; "
                                 f"rename or remove one")
        case.reference = found[0] if found else None


# ---------------------------------------------------------------------------------------------------
# outputs


def case_outputs(name: str, out_dir: Path, save_probabilities: bool = False, overlay: bool = False) -> dict[str, Path]:
    """The files a case writes, by kind."""
    outputs = {"labels": out_dir / f"{name}.nii.gz"}
    if save_probabilities:
        outputs["probabilities"] = out_dir / f"{name}.npz"
    if overlay:
        outputs["overlay"] = out_dir / f"{name}.png"
    return outputs


# ---------------------------------------------------------------------------------------------------
# checking a case: headers first, then the values as the model sees them


def _voxel_sizes(img, path: Path) -> np.ndarray:
    import nibabel as nib

    affine = np.asarray(img.affine, dtype=np.float64)
    sizes = nib.affines.voxel_sizes(affine) if np.isfinite(affine).all() else np.full(3, np.nan)
    if not (np.isfinite(sizes).all() and (sizes[:3] > 0).all()):
        raise SegmentError(f"{path.name}: its affine gives voxel sizes {np.round(sizes[:3], 6).tolist()}; they must be "
                           f"finite and positive (check pixdim, qform and sform)")
    return sizes[:3]


def count_nonfinite_float32(data: np.ndarray, chunk: int = 2**22) -> int:
    """How many values of ``data`` are NaN/Inf once cast to float32, as the model's loader casts them (values
    beyond float32's range become Inf); chunk by chunk, so no float32 copy of the whole volume is made."""
    flat = data.reshape(-1, order="F" if data.flags.f_contiguous else "C")
    bad = 0
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, flat.size, chunk):
            bad += int((~np.isfinite(flat[start:start + chunk].astype(np.float32))).sum())
    return bad


def read_case(case: Case, in_channels: int, max_voxels: int = DEFAULT_MAX_VOXELS,
              spacing: Sequence[float] | float | None = None):
    """Check and read a case's files (each header once, each gzip stream checked to its end): returns the
    first channel's nibabel image (whose grid and header the output takes) and the volume as float32
    ``[C, X, Y, Z]`` in the files' voxel order, scaled as the header says. Raises :class:`SegmentError` naming the file and the problem.

    First every header (channels and reference labels), before any voxel data is read: readability, voxel
    count against ``max_voxels`` (and, with ``spacing``, the count after resampling to it), extensions,
    scaling, shape, data type, voxel sizes and a shared grid. Then every gzip stream is checked to its
    trailer (CRC-32 and length). Then the channels' values, as float32 after scaling, must all be finite."""
    import nibabel as nib

    images = []
    for f in case.channels:
        check_header(f, max_voxels)
        try:
            img = nib.load(str(f))
        except Exception as e:
            raise cannot_read(f, e) from e
        shape = tuple(img.shape)
        all_channels_in_one = len(case.channels) == 1 and len(shape) == 4 and shape[3] == in_channels
        one_channel = len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)
        if not (all_channels_in_one or (one_channel and len(case.channels) == in_channels)):
            want = "a 3-D volume" if in_channels == 1 else \
                f"{in_channels} 3-D files {case.name}_0000 .. {case.name}_{in_channels - 1:04d}, or one 4-D file with {in_channels} channels last"
            raise SegmentError(f"{f.name} has shape {shape}; the model needs {want}")
        if img.get_data_dtype().kind not in "iuf":
            raise SegmentError(f"{f.name}: voxel type {img.get_data_dtype()} is not a real number type")
        sizes = _voxel_sizes(img, f)
        if spacing is not None:
            target = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
            resampled = int(np.prod(np.ceil(np.asarray(shape[:3]) * sizes / target) + 1) * (shape[3] if len(shape) == 4 else 1))
            if resampled > max_voxels:
                raise SegmentError(f"{f.name}: resampled to the model's spacing {target.tolist()} mm (voxels of "
                                   f"{np.round(sizes, 3).tolist()} mm) it would have about {resampled:,} voxels, over the "
                                   f"limit of {max_voxels:,} (--max-voxels); refused before reading any voxel data")
        if images and (shape[:3] != images[0].shape[:3] or not np.allclose(img.affine, images[0].affine, atol=1e-4)):
            raise SegmentError(f"{f.name} does not share the grid of {case.channels[0].name} (shape or affine differ)")
        images.append(img)
    if case.reference is not None:
        ref = case.reference
        check_header(ref, max_voxels)
        try:
            ref_shape = tuple(nib.load(str(ref)).shape)
        except Exception as e:
            raise SegmentError(f"cannot read reference labels {ref}: {type(e).__name__}: {e}") from e
        if ref_shape[:3] != images[0].shape[:3] or any(d != 1 for d in ref_shape[3:]):
            raise SegmentError(f"reference labels {ref} have shape {ref_shape}, the case has {images[0].shape[:3]}")

    for f in [*case.channels, *([case.reference] if case.reference is not None else [])]:
        verify_gzip_stream(f)
    volume = []
    for f, img in zip(case.channels, images):
        try:
            data = np.asanyarray(img.dataobj)
        except Exception as e:
            raise cannot_read(f, e) from e
        bad = count_nonfinite_float32(data)
        if bad and bool(np.isfinite(data).all()):
            slope, inter = getattr(img.dataobj, "slope", 1.0), getattr(img.dataobj, "inter", 0.0)
            scaled = f" once scaled (scl_slope {slope:g}, scl_inter {inter:g})" if (slope, inter) != (1.0, 0.0) else ""
            raise SegmentError(f"{f.name}: {bad} voxel values overflow float32{scaled}, and the model reads float32; "
                               f"fix the file's intensity scaling or values")
        if bad:
            raise SegmentError(f"{f.name} has {bad} NaN/Inf voxels; fix or mask them before segmenting")
        data = data.astype(np.float32, copy=False)
        volume += [data] if data.ndim == 3 else [data[..., c] for c in range(data.shape[3])]  # channels last in 4-D
        img.uncache()
    return images[0], np.stack(volume)


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


# label 1, 2, ... take these colours in turn (matplotlib's tab10 without its grey, which a grey MRI hides);
# labels past them get hues spaced by the golden ratio
LABEL_COLOURS = ("#ff7f0e", "#2ca02c", "#1f77b4", "#d62728", "#9467bd", "#17becf", "#e377c2", "#bcbd22", "#8c564b")
OVERLAY_DPI = 80


def label_colours(n_labels: int) -> np.ndarray:
    """``[n_labels, 3]`` RGB in ``[0, 1]``: row ``k`` is the colour label ``k`` is drawn in (row 0, the
    background, is never drawn)."""
    import colorsys

    rows = [(0.0, 0.0, 0.0)]
    for k in range(1, n_labels):
        if k <= len(LABEL_COLOURS):
            hex_code = LABEL_COLOURS[k - 1]
            rows.append(tuple(int(hex_code[i:i + 2], 16) / 255 for i in (1, 3, 5)))
        else:
            rows.append(colorsys.hsv_to_rgb((0.13 + 0.618034 * k) % 1.0, 0.8, 0.95))
    return np.asarray(rows, dtype=np.float64).reshape(-1, 3)


def overlay_figure(image: np.ndarray, labels: np.ndarray, label_names: Sequence[str] | None = None,
                   n_slices: int = 8, title: str = "", volumes_ml: dict | None = None):
    """The overlay's matplotlib figure: ``n_slices`` slices along the last axis (through the labelled region
    when there is one), the labels drawn half-transparent over the image, and under the slices a legend with
    each label's name (``label_names[k]`` for label ``k``; default ``label k``), colour and, given
    ``volumes_ml`` (by name), its volume. Returns ``(figure, legend axes)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    n_labels = max(len(label_names) if label_names is not None else 0, int(labels.max(initial=0)) + 1, 2)
    names = [label_names[k] if label_names is not None and k < len(label_names) else f"label {k}"
             for k in range(n_labels)]
    colours = label_colours(n_labels)

    z = np.nonzero(labels.reshape(-1, labels.shape[-1]).any(0))[0]
    lo, hi = (int(z.min()), int(z.max())) if len(z) else (0, labels.shape[-1] - 1)
    picks = np.unique(np.linspace(lo, hi, n_slices).round().astype(int))
    cols = min(4, len(picks))
    rows = -(-len(picks) // cols)
    legend_cols = min(n_labels - 1, cols)  # as many as there are columns of slices: the legend fits their width
    legend_rows = -(-(n_labels - 1) // legend_cols)
    panel, title_h, legend_h = 3.0, 0.6, 0.25 + 0.3 * legend_rows  # inches
    height = rows * panel + title_h + legend_h
    fig = plt.figure(figsize=(panel * cols, height), dpi=OVERLAY_DPI)
    grid = fig.add_gridspec(rows, cols, left=0.02, right=0.98, top=1 - title_h / height, bottom=legend_h / height,
                            wspace=0.08, hspace=0.15)
    vmin, vmax = np.percentile(image, [1, 99])
    for i, k in enumerate(picks):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        ax.axis("off")
        ax.imshow(image[..., k].T, cmap="gray", origin="lower", vmin=vmin, vmax=vmax)
        lab = labels[..., k].T
        rgba = np.zeros((*lab.shape, 4))
        rgba[..., :3] = colours[np.clip(lab, 0, n_labels - 1)]
        rgba[..., 3] = np.where(lab > 0, 0.5, 0.0)
        ax.imshow(rgba, origin="lower", interpolation="nearest")
        ax.set_title(f"slice {k}", fontsize=8)
    fig.suptitle(title, fontsize=10, y=1 - 0.08 / height, va="top")

    def text(k: int) -> str:
        ml = (volumes_ml or {}).get(names[k])
        return names[k] if ml is None else f"{names[k]} ({format_ml(ml)} ml)"

    legend_ax = fig.add_axes((0.0, 0.0, 1.0, legend_h / height))
    legend_ax.axis("off")
    handles = [Patch(facecolor=colours[k], edgecolor="none", label=text(k)) for k in range(1, n_labels)]
    legend_ax.legend(handles=handles, loc="center", ncol=legend_cols, frameon=False, fontsize=9, handlelength=2.5,
                     handleheight=1.3)
    return fig, legend_ax


def write_overlay(image: np.ndarray, labels: np.ndarray, path: Path, n_slices: int = 8, title: str = "",
                  label_names: Sequence[str] | None = None,
                  volumes_ml: dict | None = None) -> tuple[int, int, int, int]:
    """Write :func:`overlay_figure` as a PNG (atomically). The PNG's ``Description`` text names each label
    and its colour. Returns the legend's box in the PNG's pixels, ``(left, top, right, bottom)``."""
    import matplotlib.pyplot as plt

    fig, legend_ax = overlay_figure(image, labels, label_names, n_slices, title, volumes_ml)
    try:
        colours = label_colours(len(legend_ax.get_legend().get_texts()) + 1)
        described = "; ".join(f"{k} {t.get_text()} #{''.join(f'{round(c * 255):02x}' for c in colours[k])}"
                              for k, t in enumerate(legend_ax.get_legend().get_texts(), start=1))
        width, height = (fig.get_size_inches() * OVERLAY_DPI).round().astype(int)
        box = legend_ax.get_position()  # figure fractions, from the bottom left
        pixels = (int(box.x0 * width), int((1 - box.y1) * height), int(box.x1 * width), int((1 - box.y0) * height))
        with atomic_path(path, ".png") as tmp:
            fig.savefig(tmp, dpi=OVERLAY_DPI, metadata={"Title": title, "Description": f"labels: {described}"})
    finally:
        plt.close(fig)
    return pixels


def format_ml(ml: float) -> str:
    """A volume in ml to a sensible number of digits: 1234, 123.4, 12.34, 1.234 (never float noise)."""
    ml = float(ml)
    return f"{ml:.0f}" if ml >= 1000 else f"{ml:.1f}" if ml >= 100 else f"{ml:.2f}" if ml >= 10 else f"{ml:.3f}"


# ---------------------------------------------------------------------------------------------------
# the predictor


class Segmenter:
    """A trained segmentation model ready to segment volumes, like nnU-Net's predictor: the network, the
    recipe's preprocessing (orientation, spacing, intensity) and inference settings (window size, overlap,
    blending, test-time mirroring), and the device.

    Example::

        seg = Segmenter.from_run("hippocampus_agunet")
        out = seg.predict(volume, affine)           # volume [C, X, Y, Z] or [X, Y, Z], affine 4x4 (voxel -> mm)
        out["labels"]                               # [X, Y, Z] uint8 on the input's grid

    ``device``: ``cpu`` (the default), ``auto``, ``cuda`` or ``cuda:N`` (:func:`resolve_device`).
    Settings left ``None`` come from the run's recipe (``inference:`` and ``data.roi_size``). ``engine="onnx"``
    runs the network in onnxruntime instead of PyTorch (the run's network exported to a temporary ONNX file,
    or ``onnx_path``, checked against PyTorch on one window first); everything around it is the same.

    ``model`` may be several models (:func:`load_segmentation_models`; ``from_run`` takes a crossval folder
    or a list): the class probabilities are averaged over them before the argmax, as nnU-Net ensembles its
    folds. The first member's recipe gives the preprocessing and the inference settings; test-time mirroring
    uses only the axes every member was trained to be invariant to.
    """

    def __init__(self, model: SegmentationModel | Sequence[SegmentationModel], *, device: str = "cpu",
                 roi_size: Sequence[int] | None = None, overlap: float | None = None, mode: str | None = None,
                 sw_batch_size: int | None = None, tta: bool | None = None, engine: str = "torch",
                 onnx_path: str | None = None):
        self.models = [model] if isinstance(model, SegmentationModel) else list(model)
        if not self.models:
            raise SegmentError("a Segmenter needs at least one model")
        check_ensemble(self.models)
        model = self.model = self.models[0]  # its recipe gives the preprocessing and the inference settings
        inference = dict(model.config.get("inference") or {})
        self.device = resolve_device(device)  # "auto" too
        if roi_size is None:
            sizes = list(dict.fromkeys(tuple(m.data["roi_size"]) for m in self.models))  # in the members' order
            if len(sizes) > 1:
                raise SegmentError(f"the ensemble's models were trained with different window sizes "
                                   f"({', '.join('x'.join(map(str, s)) for s in sizes)}); give one with --roi-size")
        self.roi_size = list(roi_size or model.data["roi_size"])
        self.overlap = float(overlap if overlap is not None else inference.get("overlap", 0.5))
        self.mode = mode or inference.get("mode", "gaussian")
        if self.mode not in ("gaussian", "constant"):
            raise SegmentError(f"mode must be 'gaussian' or 'constant', got {self.mode!r}")
        self.sw_batch_size = int(sw_batch_size or inference.get("sw_batch_size", 4))
        # test-time mirroring only along the axes the model was trained to be invariant to
        from visionattn.tasks.segmentation import mirror_axes

        if tta is None:
            tta = bool(inference.get("tta", False))
        shared_axes = set(mirror_axes(model.data)).intersection(*(mirror_axes(m.data) for m in self.models[1:]))
        self.mirror_axes = sorted(shared_axes) if tta else []
        if tta and not self.mirror_axes:
            print(f"segment: warning: {self.source} was trained without flips"
                  + (" along a common axis" if len(self.models) > 1 else "") + ", so --tta has no axis to mirror",
                  file=sys.stderr)
        for m in self.models:
            m.network.to(self.device)
        # the networks that run the windows: the PyTorch ones, or the same in onnxruntime (`engine="onnx"`)
        if engine not in ("torch", "onnx"):
            raise SegmentError(f"engine must be 'torch' or 'onnx', got {engine!r}")
        if onnx_path is not None and engine != "onnx":
            raise SegmentError("--onnx FILE needs --engine onnx")
        if onnx_path is not None and len(self.models) > 1:
            raise SegmentError(f"--onnx FILE holds one network, and the ensemble has {len(self.models)}: leave --onnx "
                               f"out, and each member is exported and checked in turn")
        self.engine = engine
        self.networks = ([self._onnx_network(m, onnx_path) for m in self.models] if engine == "onnx"
                         else [m.network for m in self.models])

    @property
    def source(self) -> str:
        """The weights file, or ``"ensemble of N: a, b, ..."``."""
        if len(self.models) == 1:
            return self.model.source
        return f"ensemble of {len(self.models)}: " + ", ".join(m.source for m in self.models)

    def _onnx_network(self, model: SegmentationModel, onnx_path: str | None):
        """``model``'s network in onnxruntime: ``onnx_path``, or the network exported to a temporary ONNX file
        (:func:`visionattn.tasks.export.export_onnx`, dynamic batch and sides), checked against PyTorch on one
        window first."""
        import tempfile

        from visionattn.tasks.export import ExportError, OnnxNetwork, compare, export_onnx

        try:
            if onnx_path is None:
                with tempfile.TemporaryDirectory(prefix="visionattn-onnx-") as folder:
                    path = Path(folder) / "network.onnx"
                    example = torch.zeros(1, self.in_channels, *self.roi_size)
                    export_onnx(model.network.eval().cpu(), path, example)
                    network = OnnxNetwork(path, self.device)  # the session holds the model: the file may go
            else:
                if not Path(onnx_path).is_file():
                    raise SegmentError(f"--onnx {onnx_path}: not a file")
                network = OnnxNetwork(onnx_path, self.device)
        except ExportError as e:
            raise SegmentError(str(e)) from None
        if network.in_channels not in (None, self.in_channels) or network.spatial_dims != len(self.roi_size):
            raise SegmentError(f"--onnx {onnx_path}: its input {network.input_shape} does not take the model's "
                               f"[B, {self.in_channels}, {', '.join(['X'] * len(self.roi_size))}] windows")
        network_cpu = model.network.cpu()
        rows = compare(network, network_cpu, [self.roi_size], self.in_channels, report=None, label="onnx")
        model.network.to(self.device)
        if not rows[0]["ok"]:
            raise SegmentError(f"the ONNX network {onnx_path or '(exported)'} does not match {model.source} on "
                               f"a {'x'.join(map(str, self.roi_size))} window: "
                               + (rows[0]["error"] or f"max abs difference {rows[0]['max_abs_diff']:.2e}"))
        return network

    @classmethod
    def from_run(cls, spec: str | Sequence[str] = DEFAULT_MODEL, **settings) -> "Segmenter":
        """A bundled model name, a run folder or a weights file (:func:`load_segmentation_model`); a crossval
        folder or several of these for an ensemble (:func:`load_segmentation_models`)."""
        return cls(load_segmentation_models(spec), **settings)

    @property
    def labels(self) -> list[str]:
        return self.model.labels

    @property
    def in_channels(self) -> int:
        return self.model.in_channels

    def predict(self, image, affine=None, probabilities: bool = False) -> dict:
        """Segment one volume held in memory.

        Args:
            image: ``[C, X, Y, Z]`` or (one channel) ``[X, Y, Z]`` array or tensor, in the voxel order of the
                file it came from; a MONAI ``MetaTensor`` brings its own affine.
            affine: ``4 x 4`` voxel-to-world (mm, RAS) matrix; default: the MetaTensor's, else identity.
            probabilities: also return the class probabilities.

        With ``tta``, the prediction is averaged over the mirrorings along :attr:`mirror_axes` (the axes the
        recipe flipped in training, :func:`~visionattn.tasks.segmentation.mirror_axes`); with several models,
        over the models too.

        Returns ``{"labels": [X, Y, Z] uint8 (int16 past 255 labels), "probabilities": [K, X, Y, Z] float32 or
        None}``, on the input's grid: the preprocessing is inverted exactly (MONAI's ``Invertd``, nearest
        neighbour for labels)."""
        from monai.data import MetaTensor
        from monai.transforms import Compose, Invertd

        from visionattn.tasks.segmentation import preprocessing, sliding_window_predict

        if isinstance(image, MetaTensor) and affine is None:
            affine = image.affine
        array = torch.as_tensor(np.asarray(image, dtype=np.float32))
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[0] != self.in_channels:
            raise SegmentError(f"the model takes [{self.in_channels}, X, Y, Z] volumes, got shape {tuple(array.shape)}")
        affine = torch.eye(4, dtype=torch.float64) if affine is None else torch.as_tensor(affine, dtype=torch.float64)
        if affine.shape != (4, 4) or not bool(torch.isfinite(affine).all()):
            raise SegmentError(f"affine must be a finite 4x4 matrix, got {tuple(affine.shape)}")
        data = self.model.data
        pre = Compose(preprocessing(data, keys=("image",), load=False))
        meta = {"affine": affine, "original_affine": affine.clone(), "spatial_shape": np.asarray(array.shape[1:]),
                "original_channel_dim": 0}
        image = pre({"image": MetaTensor(array, meta=meta)})["image"]
        if not bool(torch.isfinite(image.as_tensor()).all()):
            # finite float32 values whose mean or spread overflows float32 (e.g. values near 3e38)
            raise SegmentError(f"the values overflow float32 in the model's intensity normalisation "
                               f"({data.get('intensity', 'zscore')}); rescale the volume")
        probs = None
        for network in self.networks:  # an ensemble: the mean of its members' probabilities
            member = sliding_window_predict(network, image.as_tensor()[None], self.roi_size, self.overlap,
                                            self.mode, self.sw_batch_size, self.device, "cpu",
                                            tta=self.mirror_axes)[0]
            probs = member if probs is None else probs.add_(member)
            del member
        if len(self.networks) > 1:
            probs /= len(self.networks)
        label_dtype = np.uint8 if len(self.labels) <= 255 else np.int16
        bundle = {"image": image, "pred": MetaTensor(probs.argmax(0, keepdim=True).to(torch.int16), meta=image.meta,
                                                     applied_operations=image.applied_operations)}
        keys = ["pred"]
        if probabilities:
            bundle["probs"] = MetaTensor(probs, meta=image.meta, applied_operations=image.applied_operations)
            keys.append("probs")
        del probs
        inverted = Invertd(keys=keys, transform=pre, orig_keys=["image"] * len(keys),
                           nearest_interp=[True] + [False] * (len(keys) - 1))(bundle)
        labels = np.asarray(inverted["pred"][0]).round().astype(label_dtype)
        if labels.shape != tuple(array.shape[1:]):
            raise RuntimeError(f"inverted prediction {labels.shape} != input grid {tuple(array.shape[1:])}")
        return {"labels": labels, "probabilities": np.asarray(inverted["probs"]) if probabilities else None}


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


def segment_case(segmenter: Segmenter, case: Case, outputs: dict[str, Path], *,
                 max_voxels: int = DEFAULT_MAX_VOXELS) -> dict:
    """Read, check and segment one case and write its ``outputs`` (:func:`case_outputs`); returns what its
    summary entry adds (model, volume per label in ml, Dice against its reference). Raises
    :class:`SegmentError` for a bad case. Existing outputs, inputs and the summary are the caller's
    (:func:`visionattn.tasks.batch.run_one`)."""
    import nibabel as nib

    model = segmenter.model
    reference, volume = read_case(case, model.in_channels, max_voxels, model.data.get("spacing"))
    try:
        result = segmenter.predict(volume, reference.affine, probabilities="probabilities" in outputs)
    except SegmentError as e:
        raise SegmentError(f"{', '.join(f.name for f in case.channels)}: {e}") from None
    labels = result["labels"]
    outputs["labels"].parent.mkdir(parents=True, exist_ok=True)
    write_like(reference, labels, outputs["labels"])
    if "probabilities" in outputs:
        write_probabilities(result["probabilities"], outputs["probabilities"])
    # the labels are on the input's grid, so each voxel has the input's own volume
    voxel_ml = voxel_volume_ml(reference)
    counts = np.bincount(labels.reshape(-1).astype(np.int64), minlength=len(model.labels))
    entry = {"model": segmenter.source,
             "volume_ml": {name: round(float(counts[k]) * voxel_ml, 3)
                           for k, name in enumerate(model.labels) if k > 0}}
    if case.reference is not None:
        truth = np.asarray(nib.load(str(case.reference)).dataobj).round().astype(np.int64)
        dice = dice_per_label(labels, truth, len(model.labels))
        entry["dice"] = {name: None if d is None else round(d, 4) for name, d in zip(model.labels[1:], dice)}
    if "overlay" in outputs:
        write_overlay(volume[0], labels, outputs["overlay"], title=case.name, label_names=model.labels,
                      volumes_ml=entry["volume_ml"])
    return entry


def voxel_volume_ml(img) -> float:
    """The volume of one voxel of ``img`` in ml: the product of the header's voxel spacing (pixdim, mm), or,
    where that is not usable (zero, NaN), the determinant of the affine."""
    zooms = np.abs(np.asarray(img.header.get_zooms()[:3], dtype=np.float64))
    mm3 = float(np.prod(zooms)) if len(zooms) == 3 and np.isfinite(zooms).all() and (zooms > 0).all() else \
        abs(float(np.linalg.det(np.asarray(img.affine, dtype=np.float64)[:3, :3])))
    return mm3 / 1000.0


# ---------------------------------------------------------------------------------------------------
# the summary


def check_summary_entry(entry: dict) -> None:
    """An earlier summary's case entry must hold Dice and volumes as tables of numbers (``ValueError``
    otherwise), as they are averaged and printed again."""
    for key in ("dice", "volume_ml"):
        table = entry.get(key, {})
        numbers = isinstance(table, dict) and all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in table.values())
        if not numbers:
            raise ValueError(f"case {entry.get('case')}: {key!r} is not a table of numbers")


def mean_dice(entries: list[dict], label_names: Sequence[str]) -> dict[str, float]:
    """Mean Dice per label over the entries that have one (written or skipped), leaving out labels with none."""
    means = {}
    for name in label_names:
        values = [e["dice"][name] for e in entries if e["status"] in ("ok", "skipped")
                  and isinstance(e.get("dice"), dict) and e["dice"].get(name) is not None]
        if values:
            means[name] = round(float(np.mean(values)), 4)
    return means


# ---------------------------------------------------------------------------------------------------
# the command


def resolve_device(device: str | None = "auto") -> str:
    """The device ``--device`` names: ``auto`` (the default) is CUDA when ``torch.cuda.is_available()``, else
    the CPU; ``cpu``; ``cuda`` or ``cuda:N``, only where that GPU exists. Under ``torchrun``, ``cuda`` is each
    process's own GPU, ``cuda:LOCAL_RANK``, and ``auto`` takes the GPUs only when there is one for every
    process on the machine (``LOCAL_WORLD_SIZE``), so that all processes use the same kind of device.
    Raises :class:`SegmentError` saying what to use instead."""
    import os

    name = (device or "auto").strip().lower()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if name == "auto":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        needed = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if distributed else 1
        name = "cuda" if gpus >= max(needed, 1) else "cpu"
    if name == "cpu":
        return "cpu"
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if m is None:
        raise SegmentError(f"--device {device}: not a device; use auto (the default: a GPU when there is one), "
                           f"cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise SegmentError(f"--device {device}: no CUDA GPU is usable here (torch.cuda.is_available() is False); "
                           f"use --device cpu, or --device auto to take a GPU only where there is one")
    count = torch.cuda.device_count()
    index = m[1]
    if index is None and distributed:
        index = os.environ.get("LOCAL_RANK")
    if index is None:
        return "cuda"
    if int(index) >= count:
        raise SegmentError(f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0 .. cuda:{count - 1}"
                           + (f" (the process with LOCAL_RANK {index} has none)" if m[1] is None else "")
                           + "; use one of those, or --device cpu")
    return f"cuda:{int(index)}"


def case_line(entry: dict, out_dir: Path) -> str:
    """The line ``segment`` prints for a case: its status and time, its volume per label in ml and, against
    reference labels, its Dice per label."""
    name = f"{entry['case']:20s}"
    if entry["status"] == "failed":
        return f"{name} failed (error above)"
    if entry["status"] == "skipped":
        head = f"{name} skipped: already in {out_dir}; --overwrite to redo"
    else:
        head = f"{name} ok {entry.get('seconds', 0):6.2f} s"
    parts = [head]
    volumes = entry.get("volume_ml")
    if isinstance(volumes, dict) and volumes:
        parts.append(", ".join(f"{k} {format_ml(v)} ml" for k, v in volumes.items() if v is not None))
    dice = entry.get("dice")
    if isinstance(dice, dict) and any(v is not None for v in dice.values()):
        parts.append("Dice " + ", ".join(f"{k} {v:.3f}" for k, v in dice.items() if v is not None))
    return "  ".join(parts)


def _say(line: str) -> None:
    """Print a line now, above the progress bar when there is one."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def run_segment(input_path: str | None, output: str | None, model_spec: str | Sequence[str] | None = None, *,
                device: str = "auto",
                roi_size: Sequence[int] | None = None, overlap: float | None = None, mode: str | None = None,
                tta: bool | None = None, save_probabilities: bool = False, overwrite: bool = False,
                progress: bool = True, overlay: bool = False, labels_dir: str | None = None,
                max_voxels: int = DEFAULT_MAX_VOXELS, engine: str = "torch", onnx_path: str | None = None,
                threads: int | None = None) -> int:
    """The ``segment`` command. Without ``input_path`` it segments the bundled sample volumes with the
    bundled model and reports Dice against their reference labels. ``model_spec``: one model, or several (a
    crossval folder, a list) averaged as an ensemble (:func:`load_segmentation_models`). ``device``: see :func:`resolve_device`;
    ``threads``: the CPU threads torch uses (``torch.set_num_threads``; restored on return). Prints one line
    per case as it is done (:func:`case_line`) and the totals. Returns the exit code: 1 when a case failed,
    0 otherwise (cases skipped because their outputs exist are not failures)."""
    import time

    started = time.perf_counter()
    if threads is not None and threads < 1:
        raise SegmentError(f"--threads must be at least 1, got {threads}")
    device = resolve_device(device)
    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_segment(input_path, output, model_spec, device=device, roi_size=roi_size, overlap=overlap,
                            mode=mode, tta=tta, save_probabilities=save_probabilities, overwrite=overwrite,
                            progress=progress, overlay=overlay, labels_dir=labels_dir, max_voxels=max_voxels,
                            engine=engine, onnx_path=onnx_path, started=started)
    finally:
        torch.set_num_threads(threads_before)


def _run_segment(input_path, output, model_spec, *, device, roi_size, overlap, mode, tta, save_probabilities,
                 overwrite, progress, overlay, labels_dir, max_voxels, engine, onnx_path, started) -> int:
    import os
    import time

    from visionattn.tasks import batch
    from visionattn.tasks.runtime import dist_setup, progress as progress_bar

    demo = input_path is None
    if demo:
        input_path = str(BUNDLED / "samples" / "images")
        labels_dir = labels_dir or str(BUNDLED / "samples" / "labels")
        output = output or "visionattn-segment-demo"
        overlay = True
    if output is None:
        raise SegmentError("-o/--output is required with -i/--input")
    if max_voxels < 1:
        raise SegmentError(f"--max-voxels must be positive, got {max_voxels}")
    segmenter = Segmenter.from_run(model_spec or DEFAULT_MODEL, device=device, roi_size=roi_size, overlap=overlap,
                                   mode=mode, tta=tta, engine=engine, onnx_path=onnx_path)
    cases = find_cases(input_path, segmenter.in_channels)
    if labels_dir:
        find_references(cases, labels_dir)
    out_dir = Path(output)
    items = [batch.Item(c.name, c.inputs(), case_outputs(c.name, out_dir, save_probabilities, overlay), list(c.problems))
             for c in cases]
    batch.refuse_outputs_on_inputs(items, out_dir, {"input": input_path, "--labels": labels_dir})
    batch.prepare_output_folder(out_dir)

    if device.startswith("cuda:") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.cuda.set_device(device)  # NCCL's collectives run on the current device: each process its own
    rank, world = dist_setup(device)  # (0, 1) outside torchrun
    earlier = batch.read_earlier_summary(out_dir, "segment", "cases", "case", check_summary_entry) if rank == 0 else {}
    if rank == 0:
        named = model_spec or DEFAULT_MODEL
        named = named if isinstance(named, str) else " + ".join(named)
        if len(segmenter.models) > 1:
            named = f"an ensemble of {len(segmenter.models)} ({named})"
        _say(f"segment: {len(cases)} case(s) with {named} on {device}"
             + (f" ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''})"
                if device == "cpu" else "")
             + (f", {world} processes" if world > 1 else "") + f", into {out_dir}")
    # one process: each case's line as soon as it is done; under torchrun, rank 0 prints them all at the end
    report = (lambda e: _say(case_line(batch.merged_entry(earlier, e, "case"), out_dir))) if world == 1 else None
    by_name = {c.name: c for c in cases}
    entries = batch.run_items(
        items, lambda item: segment_case(segmenter, by_name[item.name], item.outputs, max_voxels=max_voxels),
        overwrite=overwrite, command="segment", key="case", rank=rank, world=world, report=report,
        progress=lambda xs: progress_bar(xs, desc="segment", disable=not progress or None))
    failed = [e for e in entries if e["status"] == "failed"]
    if rank == 0:
        merged = batch.merge_summary(earlier, entries, "case")
        cases_now = {e["case"] for e in entries}
        this_run = [e for e in merged if e["case"] in cases_now]
        if report is None:
            for e in this_run:
                _say(case_line(e, out_dir))
        skipped = sum(e["status"] == "skipped" for e in entries)
        run_means = mean_dice(this_run, segmenter.labels[1:])
        totals = {"cases": len(entries), "written": len(entries) - len(failed) - skipped, "skipped": skipped,
                  "failed": len(failed), "seconds": round(time.perf_counter() - started, 2)}
        if run_means:
            totals["mean_dice"] = run_means
        header = {"model": segmenter.source, "device": device, "threads": torch.get_num_threads(),
                  "labels": segmenter.labels}
        if engine != "torch":
            header["engine"] = engine
        header["totals"] = totals  # this run's
        means = mean_dice(merged, segmenter.labels[1:])  # every case the summary lists
        if means:
            header["mean_dice"] = means
        batch.write_summary(out_dir, header, "cases", merged)
        if run_means:
            _say(f"mean Dice ({sum('dice' in e for e in this_run if e['status'] != 'failed')} cases): "
                 + ", ".join(f"{k} {v:.3f}" for k, v in run_means.items()))
        _say(f"segment: {totals['written']} of {len(entries)} cases written to {out_dir}"
             + (f", {skipped} skipped (already there)" if skipped else "")
             + (f"; {len(failed)} failed" if failed else "") + f"; {totals['seconds']:.1f} s in all")
    return 1 if failed else 0
