"""``visionattn detect``: image files in, detections out, on the batch-inference skeleton ``segment`` uses
(:mod:`visionattn.tasks.batch`): every image is one item, named by its path below the inputs' common folder
(``more/a.jpg``); ``STEM`` is that name without its suffix, ``/`` written ``__`` (``more__a``).

Outputs, in the output folder ``OUT``:

- ``OUT/detections/STEM.json`` per image: its detections scoring at least the threshold (``box`` xyxy in
  the image's pixels, ``label``, ``class``, ``score``), its size, path and the threshold used;
- ``OUT/images/STEM.png`` per image (with ``draw``): the image with the boxes, class names and scores drawn;
- ``OUT/results.json``: the detections of every finished image of the call (written now, or skipped because
  an earlier run wrote them) as a COCO results list ``[{image_id, category_id, bbox [x, y, w, h], score}]``;
- ``OUT/images.json``: the COCO dataset file those ids refer to (``images`` with ``file_name``, ``height``,
  ``width``, ``path``; ``categories`` from the class names; no annotations): ``COCO("images.json")`` then
  ``.loadRes("results.json")``;
- ``OUT/summary.json``: one entry per image (``ok``, ``skipped`` or ``failed`` with the error; detections,
  size, time), merged with the one an earlier run left.

As with ``segment``: an output that would land on an input, or an output folder that is the input folder,
refuses the whole call before anything is written (``overwrite`` or not); an image whose outputs all exist is
skipped (said so; ``overwrite`` redoes it), one whose outputs exist only in part fails; a bad image
(unreadable, corrupt, truncated, a decompression bomb, one the model fails on) is reported by name on one
line and the others complete; under ``torchrun`` the images are shared across the processes. Images go
through the model ``batch_size`` at a time. Every file is written atomically.
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
from collections import defaultdict
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np
import torch
from torch import nn

from visionattn.errors import UserError
from visionattn.tasks import batch
from visionattn.tasks.config import ConfigError
from visionattn.tasks.data import IMAGE_SUFFIXES
from visionattn.tasks.detection_data import image_to_tensor, read_rgb
from visionattn.tasks.detection_metrics import to_coco_results, write_coco_results
from visionattn.tasks.errors import DataError
from visionattn.tasks.files import atomic_path, write_json_atomic
from visionattn.tasks.imageio import pixel_limit
from visionattn.tasks.run import Run, load_model_for_eval

BOX_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
               "#fabed4", "#469990", "#dcbeff", "#9a6324"]
RESULTS = "results.json"  # COCO results list
IMAGES_FILE = "images.json"  # the COCO dataset (images, categories) the results refer to
RECORDS = "detections"  # OUT/detections/STEM.json, one per image
DRAWN = "images"  # OUT/images/STEM.png, one per image
MAX_RECORD_BYTES = 64 * 2**20


# ---------------------------------------------------------------------------------------------------
# inputs and outputs


def _under(path: Path, folder: Path) -> bool:
    """Whether ``path`` lies inside ``folder`` (as written, or once symlinks are resolved)."""
    for a, b in ((os.path.abspath(path), os.path.abspath(folder)), (os.path.realpath(path), os.path.realpath(folder))):
        if os.path.commonpath([a, b]) == b:
            return True
    return False


def collect_images(input_path: str | Path, exclude: str | Path | None = None) -> list[Path]:
    """An image file, or the image files under a folder (recursively, sorted), leaving out those under
    ``exclude`` (the output folder, when it is inside the input folder: its drawn images are no inputs)."""
    src = Path(input_path)
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise FileNotFoundError(f"input not found: {src}")
    if exclude is not None and (batch.same_folder(src, exclude) or not _under(Path(exclude), src)):
        exclude = None  # only a folder strictly inside the input folder is left out
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not (exclude is not None and _under(p, Path(exclude))))
    if not files:
        raise DataError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {src}")
    return files


def common_folder(inputs: Sequence[Path]) -> Path:
    """The deepest folder holding every input (absolute; symlinks are not resolved)."""
    return Path(os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in inputs]))


def image_items(inputs: Sequence[Path], out_dir: Path, draw: bool = True) -> list[batch.Item]:
    """One :class:`~visionattn.tasks.batch.Item` per image: named by its path below the inputs' common
    folder; outputs ``detections`` (``OUT/detections/STEM.json``) and, with ``draw``, ``drawn``
    (``OUT/images/STEM.png``). Images whose outputs would share a name (``a.jpg`` and ``a.png``) fail."""
    parent = common_folder(inputs)
    names = [Path(os.path.abspath(p)).relative_to(parent).as_posix() for p in inputs]
    stems = ["__".join(PurePosixPath(name).with_suffix("").parts) for name in names]
    by_stem = defaultdict(list)
    for name, stem in zip(names, stems):
        by_stem[stem].append(name)
    items = []
    for path, name, stem in zip(inputs, names, stems):
        outputs = {"detections": out_dir / RECORDS / f"{stem}.json"}
        if draw:
            outputs["drawn"] = out_dir / DRAWN / f"{stem}.png"
        problems = []
        if len(by_stem[stem]) > 1:
            problems.append(f"{' and '.join(by_stem[stem])} would be written under the same name {stem} "
                            f"(in {out_dir / RECORDS}); rename one of them")
        items.append(batch.Item(name, [Path(path)], outputs, problems))
    return items


def save_png_atomic(image: torch.Tensor, path: Path) -> None:
    """Save a ``[3, H, W]`` uint8 image as PNG through a temporary name in the same folder."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp, format="PNG")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def read_record(path: Path, name: str) -> dict:
    """The per-image detections file ``path`` of image ``name``, checked (``ValueError`` saying what is
    wrong: not a regular file, too large, not JSON, another image's, a value out of place)."""
    if not path.is_file():
        raise ValueError("not a regular file")
    if path.stat().st_size > MAX_RECORD_BYTES:
        raise ValueError(f"over {MAX_RECORD_BYTES // 2**20} MiB")
    record = json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    if record.get("image") != name:
        raise ValueError(f"it holds the detections of {record.get('image')!r}, not of {name!r}")
    for key in ("width", "height"):
        if not (isinstance(record.get(key), int) and not isinstance(record[key], bool) and record[key] > 0):
            raise ValueError(f"{key!r} is not a positive whole number")
    if not isinstance(record.get("path"), str) or not _is_number(record.get("score_threshold")):
        raise ValueError("no 'path' or 'score_threshold'")
    if not isinstance(record.get("detections"), list):
        raise ValueError("no 'detections' list")
    for k, d in enumerate(record["detections"]):
        if not (isinstance(d, dict) and isinstance(d.get("label"), int) and not isinstance(d["label"], bool)
                and d["label"] >= 0 and _is_number(d.get("score")) and isinstance(d.get("box"), list)
                and len(d["box"]) == 4 and all(_is_number(v) for v in d["box"])):
            raise ValueError(f"detection {k} is not {{label >= 0, box [x1, y1, x2, y2], score}} with finite numbers")
    return record


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


def _predict(model: nn.Module, images: list[np.ndarray], device: torch.device) -> list[dict | Exception]:
    """The model's predictions (CPU tensors) for each ``[H, W, 3]`` image; an image the model fails on (the
    batch is retried one image at a time) gets the exception instead."""
    tensors = [image_to_tensor(image).to(device) for image in images]
    try:
        outputs = model(tensors)
        if len(outputs) != len(tensors):
            raise RuntimeError(f"the model returned {len(outputs)} predictions for {len(tensors)} images")
        return [{"boxes": o["boxes"].detach().float().cpu().reshape(-1, 4),
                 "labels": o["labels"].detach().long().cpu().reshape(-1),
                 "scores": o["scores"].detach().float().cpu().reshape(-1)} for o in outputs]
    except Exception as e:  # reported against the image by the caller; the other images go on
        if len(images) == 1:
            return [e]
        return [_predict(model, [im], device)[0] for im in images]


def _one_line(error: BaseException) -> DataError:
    """``error`` as the one-line message its image's summary entry and stderr line carry (a
    :class:`UserError` already names the file; anything else, a model failure, keeps its type name)."""
    message = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
    return DataError(" ".join(message.split()))


def _write_image_outputs(item: batch.Item, image: np.ndarray, prediction: dict, score_threshold: float,
                         classes: Sequence[str]) -> dict:
    """Keep the detections scoring at least ``score_threshold`` (with finite boxes and scores), draw them
    when ``item.outputs`` asks for it, then write the image's detections file; returns what its summary
    entry adds."""
    boxes, labels, scores = prediction["boxes"], prediction["labels"], prediction["scores"]
    if len(boxes) != len(labels) or len(boxes) != len(scores):
        raise DataError(f"the model returned {len(boxes)} boxes, {len(labels)} labels and {len(scores)} scores")
    keep = torch.isfinite(boxes).all(1) & torch.isfinite(scores) & (scores >= score_threshold)
    kept = {"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]}
    if len(kept["labels"]) and int(kept["labels"].min()) < 0:
        raise DataError(f"the model returned the class label {int(kept['labels'].min())}; labels start at 0")
    height, width = image.shape[:2]
    if "drawn" in item.outputs:
        item.outputs["drawn"].parent.mkdir(parents=True, exist_ok=True)
        save_png_atomic(draw_detections(image, kept, classes), item.outputs["drawn"])
    # float32 values, written without float32's noise in their last digits
    detections = [{"label": label, "class": _class_name(classes, label), "box": [round(v, 3) for v in box],
                   "score": round(score, 6)}
                  for label, box, score in zip(kept["labels"].tolist(), kept["boxes"].tolist(),
                                               kept["scores"].tolist())]
    record = {"image": item.name, "path": str(item.inputs[0]), "width": width, "height": height,
              "score_threshold": score_threshold, "detections": detections}
    item.outputs["detections"].parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record, item.outputs["detections"])
    return {"detections": len(detections), "width": width, "height": height}


def _class_name(classes: Sequence[str], label: int) -> str:
    return classes[label] if label < len(classes) else f"class_{label}"


def _check_call(items: list[batch.Item], out_dir: Path, input_folder: Path, draw: bool) -> None:
    """The whole call's refusals, before anything is written (:class:`~visionattn.tasks.batch.BatchError`)."""
    batch.refuse_outputs_on_inputs(items, out_dir, {"input": input_folder})
    shared = [out_dir / RESULTS, out_dir / IMAGES_FILE, out_dir / batch.SUMMARY]
    clashes = batch.outputs_that_are_inputs(shared, [f for item in items for f in item.inputs])
    if clashes:
        raise batch.BatchError(f"refusing to write over inputs, --overwrite or not: {clashes[0][0]} is the input "
                               f"{clashes[0][1]}; choose another output folder")
    for path in shared:
        if (path.exists() or path.is_symlink()) and not path.is_file():
            raise batch.BatchError(f"{path} exists and is not a regular file; move it away")
    for folder in [out_dir / RECORDS] + ([out_dir / DRAWN] if draw else []):
        if (folder.exists() or folder.is_symlink()) and not folder.is_dir():
            raise batch.BatchError(f"{folder} exists and is not a folder; move it away")


def _combine(items: list[batch.Item], entries: list[dict], score_threshold: float, classes: Sequence[str],
             model_name: str) -> tuple[list[dict], dict, list[dict], list[str]]:
    """Read the detections file of every finished image (``ok`` or ``skipped``) and build the COCO pair.
    Returns ``(results, dataset, entries, stale)``: an entry whose file cannot be read becomes ``failed`` (said on
    stderr); ``stale`` names the skipped images detected earlier with a higher threshold."""
    by_name = {item.name: item for item in items}
    records, checked, stale = [], [], []
    for entry in sorted(entries, key=lambda e: e["image"]):
        if entry["status"] in ("ok", "skipped"):
            item = by_name[entry["image"]]
            path = item.outputs["detections"]
            try:
                record = read_record(path, item.name)
            except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
                error = DataError(f"{path} cannot be read ({' '.join(str(e).split())}); --overwrite to redo the image")
                print(f"detect: image {item.name}: {error}", file=sys.stderr)
                entry = batch.failed_entry(item, "image", error)
            else:
                if record["score_threshold"] > score_threshold:
                    stale.append(item.name)
                records.append(record)
        checked.append(entry)
    infos, detections = [], []
    for record in records:
        kept = record["detections"]
        if record["score_threshold"] < score_threshold:  # detected earlier with a lower threshold
            kept = [d for d in kept if d["score"] >= score_threshold]
        infos.append({"file_name": record["image"], "height": record["height"], "width": record["width"],
                      "path": record["path"]})
        detections.append({"boxes": torch.tensor([d["box"] for d in kept], dtype=torch.float64).reshape(-1, 4),
                           "labels": torch.tensor([d["label"] for d in kept], dtype=torch.int64),
                           "scores": torch.tensor([d["score"] for d in kept], dtype=torch.float64)})
    names = _category_names(classes, detections)
    info = {"description": f"visionattn detect: {model_name}", "score_threshold": score_threshold}
    results, dataset = to_coco_results(infos, detections, names, info=info)
    return results, dataset, checked, stale


@torch.no_grad()
def detect(model: nn.Module, inputs: Sequence[Path], out_dir: Path, score_threshold: float = 0.3,
           overwrite: bool = False, device: str = "cpu", batch_size: int = 4, draw: bool = True,
           classes: Sequence[str] | None = None, max_image_pixels: int | None = None,
           input_folder: str | Path | None = None, model_name: str | None = None) -> dict:
    """Run a detector on image files and write, in ``out_dir``, each image's detections file and drawn
    image, then ``results.json`` (COCO results), ``images.json`` (the COCO images and categories they refer
    to) and ``summary.json`` (see the module's docstring), each atomically.

    ``classes`` names the labels (label ``i`` -> category id ``i + 1``; a label past them is
    ``class_<label>``). An image that cannot be read (unreadable, corrupt, truncated, or declaring more than
    ``max_image_pixels`` pixels, default :data:`~visionattn.tasks.imageio.DEFAULT_MAX_IMAGE_PIXELS`; see
    :func:`read_rgb`) or that the model fails on is reported by name on one stderr line and the others are
    still processed; one whose outputs all exist is skipped unless ``overwrite``. ``input_folder`` (default:
    the inputs' common folder) is never the output folder. Raises
    :class:`~visionattn.tasks.batch.BatchError` (a :class:`UserError`) for a problem with the whole call,
    before anything is written.

    Returns ``{images, detections, written, skipped, failed: [{image, path, error}], output}``: ``images``
    and ``detections`` count what ``results.json`` holds (``None`` on the processes of rank > 0 under
    ``torchrun``, which leave the combined files to rank 0).
    """
    from visionattn.tasks.runtime import dist_setup

    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise DataError("detect: no input images")
    max_image_pixels = pixel_limit(max_image_pixels)
    if not (isinstance(score_threshold, (int, float)) and math.isfinite(score_threshold)):
        raise DataError(f"--score-threshold must be a finite number, got {score_threshold}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise DataError(f"--batch-size must be a positive whole number, got {batch_size}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DataError("--device cuda: no CUDA device is available here; use --device cpu")
    out_dir = Path(out_dir)
    classes = list(classes or [])
    model_name = model_name or type(model).__name__
    items = image_items(inputs, out_dir, draw)
    _check_call(items, out_dir, Path(input_folder) if input_folder is not None else common_folder(inputs), draw)
    batch.prepare_output_folder(out_dir)

    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one GPU per process under torchrun
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    rank, world = dist_setup(device)  # (0, 1) outside torchrun
    earlier = batch.read_earlier_summary(out_dir, "detect", "images", "image") if rank == 0 else {}
    model = model.eval().to(device)
    torch_device = torch.device(device)

    def process(todo: list[batch.Item]) -> list[dict | BaseException]:
        results: list = [None] * len(todo)
        readable = []
        for k, item in enumerate(todo):
            try:
                readable.append((k, read_rgb(item.inputs[0], max_image_pixels)))
            except Exception as e:  # reported against the image; the others go on
                results[k] = _one_line(e)
        predictions = _predict(model, [image for _, image in readable], torch_device) if readable else []
        for (k, image), prediction in zip(readable, predictions):
            try:
                if isinstance(prediction, BaseException):
                    raise prediction
                results[k] = _write_image_outputs(todo[k], image, prediction, score_threshold, classes)
            except Exception as e:
                results[k] = _one_line(e)
        return [DataError("the model returned no prediction for it") if r is None else r for r in results]

    entries = batch.run_items_batched(items, process, batch_size=batch_size, overwrite=overwrite, command="detect",
                                      key="image", rank=rank, world=world)
    summary = {"images": None, "detections": None, "output": str(out_dir)}
    if rank == 0:
        results, dataset, entries, stale = _combine(items, entries, score_threshold, classes, model_name)
        write_coco_results(results, dataset, out_dir / RESULTS, out_dir / IMAGES_FILE)
        merged = batch.merge_summary(earlier, entries, "image")
        header = {"model": model_name, "device": device, "score_threshold": score_threshold,
                  "classes": [c["name"] for c in dataset["categories"]], "results": RESULTS, "images_file": IMAGES_FILE}
        batch.write_summary(out_dir, header, "images", merged)
        summary.update(images=len(dataset["images"]), detections=len(results))
        if stale:
            print(f"detect: warning: {len(stale)} skipped images ({_some(stale)}) were detected earlier with a higher "
                  f"--score-threshold; {RESULTS} holds only what that kept of them; --overwrite to redo them",
                  file=sys.stderr)
    failed = [{"image": e["image"], "path": e["inputs"][0] if e["inputs"] else None, "error": e["error"]}
              for e in entries if e["status"] == "failed"]
    skipped = [e["image"] for e in entries if e["status"] == "skipped"]
    summary.update(written=sum(e["status"] == "ok" for e in entries), skipped=len(skipped), failed=failed)
    if rank == 0:
        if skipped:
            print(f"detect: {len(skipped)} images skipped ({_some(skipped)}): their outputs are already in {out_dir}; "
                  f"--overwrite to redo them")
        print(f"detect: {summary['written']} of {len(entries)} images written to {out_dir}"
              + (f", {len(skipped)} skipped" if skipped else "") + (f", {len(failed)} failed" if failed else "")
              + f"; {RESULTS}: {summary['images']} images, {summary['detections']} detections "
              f"(score >= {score_threshold})")
    return summary


def _some(names: Sequence[str], n: int = 3) -> str:
    """The first ``n`` names, and ``...`` when there are more."""
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


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
