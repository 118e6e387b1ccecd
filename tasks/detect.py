"""``visionattn detect``: image files in, detections out (COCO JSON and images with the boxes drawn).

A bad image (unreadable, truncated, a decompression bomb) is reported by name and the others complete;
every output is written atomically and never over an existing one unless asked.
"""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from visionattn.tasks.config import ConfigError
from visionattn.tasks.data import IMAGE_SUFFIXES
from visionattn.tasks.detection_data import image_to_tensor, read_rgb
from visionattn.tasks.detection_metrics import to_coco_json
from visionattn.tasks.errors import DataError
from visionattn.tasks.files import atomic_path, write_json_atomic
from visionattn.tasks.imageio import pixel_limit
from visionattn.tasks.run import Run, load_model_for_eval

BOX_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
               "#fabed4", "#469990", "#dcbeff", "#9a6324"]


# ---------------------------------------------------------------------------------------------------
# inputs and outputs


def collect_images(input_path: str | Path) -> list[Path]:
    """An image file, or the image files under a folder (recursively, sorted)."""
    src = Path(input_path)
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise FileNotFoundError(f"input not found: {src}")
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {src}")
    return files


def save_png_atomic(image: torch.Tensor, path: Path) -> None:
    """Save a ``[3, H, W]`` uint8 image as PNG through a temporary name in the same folder."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp, format="PNG")


# ---------------------------------------------------------------------------------------------------
# `visionattn detect`


def load_detection_model(spec: str, num_classes: int | None = None, classes: Sequence[str] | None = None,
                         input_size: int | None = None) -> tuple[nn.Module, list[str]]:
    """The detector for ``visionattn detect`` and its class names.

    ``spec`` is a registered detection model name (random weights; a warning is printed) or a trained run
    (:class:`~visionattn.tasks.run.Run`: its folder or a weights file in it, with the one weights
    precedence every command uses), rebuilt from its validated ``config.yaml`` with the class names it
    records. ``classes`` overrides the names; ``num_classes`` is passed to a model built by name,
    ``input_size`` (the side the detector resizes images to) to either.
    """
    import visionattn

    path = Path(spec)
    if path.exists():
        run = Run.load(path)
        if run.task != "detection":
            raise ConfigError(f"{run.weights} is a {run.task} model (see {run.folder / 'config.yaml'}); "
                              "`visionattn detect` needs a detection run")
        names = list(classes or (run.config.get("data") or {}).get("classes") or run.config.get("classes") or [])
        if not names:
            raise ConfigError(f"{run.folder / 'config.yaml'} records no class names; pass --classes a,b,c")
        cfg = copy.deepcopy(run.config)
        if input_size:
            cfg["model"].setdefault("kwargs", {})["input_size"] = input_size
        return load_model_for_eval(cfg, str(run.weights), {"classes": names}), names
    if path.suffix in (".safetensors", ".pt", ".pth") or os.sep in spec:
        raise FileNotFoundError(f"model not found: {spec}")
    entry = visionattn.get_entry(spec)
    if entry.task != "detection":
        raise ConfigError(f"{spec} is a {entry.task} model; detection models: "
                          f"{', '.join(visionattn.list_models(task='detection')) or 'none registered'}")
    if classes and num_classes and len(classes) != num_classes:
        raise ConfigError(f"--classes names {len(classes)} classes but --num-classes is {num_classes}")
    model = visionattn.create_model(spec, num_classes=num_classes or (len(classes) if classes else None),
                                    input_size=input_size)
    print(f"detect: warning: {spec} has random weights (no trained checkpoint given); its boxes are meaningless",
          file=sys.stderr)
    n = getattr(model, "num_classes", None) or num_classes or len(classes or [])
    return model.eval(), list(classes or [f"class_{i}" for i in range(n)])


def _relative_names(inputs: Sequence[Path]) -> tuple[list[str], list[str]]:
    """Each input's path relative to the inputs' common folder (``more/a.jpg``), and its output stem
    (``more__a``)."""
    parent = Path(os.path.commonpath([str(p.resolve().parent) for p in inputs]))
    relative = [p.resolve().relative_to(parent) for p in inputs]
    stems = ["__".join(r.with_suffix("").parts) for r in relative]
    duplicates = sorted({n for n in stems if stems.count(n) > 1})
    if duplicates:
        raise DataError(f"several inputs would be written as the same output: {', '.join(duplicates[:5])}")
    return [r.as_posix() for r in relative], stems


def _predict(model: nn.Module, images: list[np.ndarray], device: torch.device) -> list[dict | Exception]:
    """The model's predictions (CPU tensors) for each ``[H, W, 3]`` image; an image the model fails on (the
    batch is retried one image at a time) gets the exception instead."""
    tensors = [image_to_tensor(image).to(device) for image in images]
    try:
        outputs = model(tensors)
    except Exception as e:  # reported against the image by the caller; the other images go on
        if len(images) == 1:
            return [e]
        return [_predict(model, [im], device)[0] for im in images]
    return [{"boxes": o["boxes"].detach().float().cpu().reshape(-1, 4), "labels": o["labels"].detach().long().cpu(),
             "scores": o["scores"].detach().float().cpu()} for o in outputs]


@torch.no_grad()
def detect(model: nn.Module, inputs: Sequence[Path], out_dir: Path, score_threshold: float = 0.3,
           overwrite: bool = False, device: str = "cpu", batch_size: int = 4, draw: bool = True,
           classes: Sequence[str] | None = None, max_image_pixels: int | None = None) -> dict:
    """Run a detector on image files and write ``out_dir/detections.json`` and, with ``draw``,
    ``out_dir/images/<name>.png`` (boxes, class names and scores drawn; ``<name>`` is the path below the
    inputs' common folder with ``/`` written ``__``), each atomically.

    ``detections.json`` is a COCO dict (:func:`to_coco_json`): ``images`` (with each input's ``path``),
    ``categories``, ``annotations`` holding the detections scoring at least ``score_threshold`` (a COCO
    results list), plus ``failed`` (``{path, error}``) and ``score_threshold``. An image that cannot be read
    (unreadable, corrupt, truncated, or declaring more than ``max_image_pixels`` pixels, default
    :data:`~visionattn.tasks.imageio.DEFAULT_MAX_IMAGE_PIXELS`; see :func:`read_rgb`) or that the model fails
    on is reported by name, one line on stderr and an entry in ``failed``; the others are still processed.
    Existing outputs are refused (``FileExistsError``) unless ``overwrite``.

    Returns the summary ``{images, detections, failed: [{path, error}], output}``.
    """
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise DataError("detect: no input images")
    max_image_pixels = pixel_limit(max_image_pixels)
    out_dir = Path(out_dir)
    file_names, stems = _relative_names(inputs)
    json_path, image_dir = out_dir / "detections.json", out_dir / "images"
    outputs = [json_path] + ([image_dir / f"{stem}.png" for stem in stems] if draw else [])
    existing = [p for p in outputs if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir} already holds outputs ({', '.join(str(p) for p in existing[:3])}"
                              f"{', ...' if len(existing) > 3 else ''}); pass --overwrite to replace them")
    (image_dir if draw else out_dir).mkdir(parents=True, exist_ok=True)
    classes = list(classes or [])
    model = model.eval().to(device)
    infos, detections, failed = [], [], []

    def report(path: Path, error: Exception) -> None:
        # a DataError already names the file; anything else (a model failure) gets the name added
        message = str(error) if isinstance(error, DataError) else f"{path}: {type(error).__name__}: {error}"
        message = " ".join(message.split())  # one line per image
        failed.append({"path": str(path), "error": message})
        print(f"detect: {message}", file=sys.stderr)

    for start in range(0, len(inputs), batch_size):
        readable = []
        for k in range(start, min(start + batch_size, len(inputs))):
            try:
                readable.append((k, read_rgb(inputs[k], max_image_pixels)))
            except DataError as e:
                report(inputs[k], e)
        if not readable:
            continue
        predictions = _predict(model, [image for _, image in readable], torch.device(device))
        for (k, image), prediction in zip(readable, predictions):
            if isinstance(prediction, Exception):
                report(inputs[k], prediction)
                continue
            keep = prediction["scores"] >= score_threshold
            kept = {key: value[keep] for key, value in prediction.items()}
            height, width = image.shape[:2]
            infos.append({"file_name": file_names[k], "path": str(inputs[k]), "height": height, "width": width})
            detections.append(kept)
            if draw:
                save_png_atomic(draw_detections(image, kept, classes), image_dir / f"{stems[k]}.png")
    result = to_coco_json(infos, detections, _category_names(classes, detections))
    result.update(failed=failed, score_threshold=score_threshold)
    write_json_atomic(result, json_path)
    summary = {"images": len(infos), "detections": len(result["annotations"]), "failed": failed,
               "output": str(out_dir)}
    print(f"detect: {summary['images']} images, {summary['detections']} detections (score >= {score_threshold}), "
          f"{len(failed)} failed -> {out_dir}")
    return summary


def _category_names(classes: Sequence[str], detections: Sequence[dict]) -> list[str]:
    """``classes``, extended with ``class_<label>`` up to the largest label detected."""
    top = max((int(d["labels"].max()) for d in detections if len(d["labels"])), default=-1)
    return list(classes) + [f"class_{i}" for i in range(len(classes), top + 1)]


def draw_detections(image: np.ndarray, detection: dict, classes: Sequence[str]) -> torch.Tensor:
    """``[H, W, 3]`` uint8 image with the boxes, ``"<class> <score>"`` captions, one colour per class ->
    ``[3, H, W]`` uint8."""
    from torchvision.utils import draw_bounding_boxes

    canvas = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    labels = detection["labels"].tolist()
    if not labels:
        return canvas
    captions = [f"{classes[c] if c < len(classes) else f'class_{c}'} {s:.2f}"
                for c, s in zip(labels, detection["scores"].tolist())]
    colours = [BOX_COLOURS[c % len(BOX_COLOURS)] for c in labels]
    return draw_bounding_boxes(canvas, detection["boxes"], labels=captions, colors=colours, width=2)
