"""Detection metrics and export: COCO mAP (torchmetrics with the pycocotools backend) with AP@0.5 per class,
and COCO JSON (images, categories, results) for pycocotools and other COCO tools."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from visionattn.tasks.files import atomic_path

# ---------------------------------------------------------------------------------------------------
# metrics and export


def _undefined_to_nan(value: float) -> float:
    """pycocotools writes -1 where a value is undefined (no ground truth); report NaN instead."""
    return float("nan") if value < 0 else float(value)


def evaluate_detections(predictions: Sequence[dict], targets: Sequence[dict],
                        class_names: Sequence[str] | None = None) -> dict[str, float]:
    """mAP of ``predictions`` against ``targets`` (one dict per image, same order) with torchmetrics'
    ``MeanAveragePrecision`` on the pycocotools backend (COCO's 101-point interpolated AP over the 100
    highest-scoring detections of each image).

    Returns floats: ``map_50`` (AP at IoU 0.5, averaged over classes), ``map`` (averaged over IoU
    0.5:0.95), ``map_75``, and ``ap50_<class>`` for each class of ``class_names`` (or, without names, for
    each label in the targets). No predictions at all give 0.0; targets' ``difficult`` boxes are passed as
    ``iscrowd`` (a detection on them counts neither way). A value without ground truth behind it (a class
    absent from the targets, or no boxes at all) is NaN.
    """
    from torchmetrics.detection import MeanAveragePrecision

    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    preds = [{"boxes": torch.as_tensor(p["boxes"], dtype=torch.float32).reshape(-1, 4).cpu(),
              "scores": torch.as_tensor(p["scores"], dtype=torch.float32).reshape(-1).cpu(),
              "labels": torch.as_tensor(p["labels"], dtype=torch.int64).reshape(-1).cpu()} for p in predictions]
    gts = []
    for t in targets:
        labels = torch.as_tensor(t["labels"], dtype=torch.int64).reshape(-1).cpu()
        difficult = t.get("difficult", t.get("iscrowd"))
        crowd = torch.zeros_like(labels) if difficult is None else torch.as_tensor(difficult).reshape(-1).long().cpu()
        gts.append({"boxes": torch.as_tensor(t["boxes"], dtype=torch.float32).reshape(-1, 4).cpu(),
                    "labels": labels, "iscrowd": crowd})
    metric = MeanAveragePrecision(iou_type="bbox", backend="pycocotools", extended_summary=True)
    metric.warn_on_many_detections = False  # DETR-style models return 300; COCO's rule keeps the best 100
    metric.update(preds, gts)
    result = metric.compute()
    out = {key: _undefined_to_nan(float(result[key])) for key in ("map_50", "map", "map_75")}
    evaluated = result["classes"].reshape(-1).tolist()  # the labels along the precision's class axis
    precision_50 = result["precision"][0, :, :, 0, -1]  # [101 recall points, classes] at IoU 0.5, all areas, 100 dets
    if class_names is not None:
        report = list(enumerate(class_names))
    else:
        report = [(label, str(label)) for label in sorted({int(v) for g in gts for v in g["labels"]})]
    for label, name in report:
        column = precision_50[:, evaluated.index(label)] if label in evaluated else torch.empty(0)
        defined = column[column > -1]
        # float32 like torchmetrics' own values (pycocotools' precision carries a 1e-16 epsilon)
        out[f"ap50_{name}"] = float(defined.mean().float()) if len(defined) else float("nan")
    return out


def to_coco_json(image_infos: Sequence[dict], detections: Sequence[dict], categories: Sequence[str] | Sequence[dict]) -> dict:
    """A COCO dict ``{images, annotations, categories}`` for boxes on images.

    Args:
        image_infos: per image ``{file_name, height, width}`` and optionally ``id`` (default: position + 1);
            other keys are kept.
        detections: per image (same order) ``boxes [n, 4]`` xyxy pixels and ``labels [n]``; with ``scores``
            each annotation carries its ``score``, so ``annotations`` is also a COCO *results* list
            (``pycocotools.COCO.loadRes``); ``difficult`` becomes ``iscrowd``.
        categories: class names (label ``i`` -> category id ``i + 1``) or ``{id, name}`` dicts in label order.
    """
    if len(image_infos) != len(detections):
        raise ValueError(f"{len(image_infos)} images but {len(detections)} detection lists")
    cats = [{"id": int(c["id"]), "name": str(c["name"])} if isinstance(c, dict) else {"id": i + 1, "name": str(c)}
            for i, c in enumerate(categories)]
    cats = [dict(c, supercategory="none") for c in cats]
    images, annotations = [], []
    for i, (info, detection) in enumerate(zip(image_infos, detections)):
        image = {"id": int(info.get("id", i + 1)), **{k: v for k, v in info.items() if k != "id"}}
        images.append(image)
        boxes = torch.as_tensor(detection["boxes"], dtype=torch.float64).reshape(-1, 4)
        labels = torch.as_tensor(detection["labels"]).reshape(-1).tolist()
        scores = torch.as_tensor(detection["scores"]).reshape(-1).tolist() if "scores" in detection else None
        crowd = (torch.as_tensor(detection["difficult"]).reshape(-1).tolist() if "difficult" in detection
                 else [False] * len(labels))
        for k, ((x1, y1, x2, y2), label) in enumerate(zip(boxes.tolist(), labels)):
            w, h = x2 - x1, y2 - y1
            ann = {"id": len(annotations) + 1, "image_id": image["id"], "category_id": cats[int(label)]["id"],
                   "bbox": [round(x1, 3), round(y1, 3), round(w, 3), round(h, 3)], "area": round(w * h, 3),
                   "iscrowd": int(bool(crowd[k]))}
            if scores is not None:
                ann["score"] = round(float(scores[k]), 5)
            annotations.append(ann)
    return {"images": images, "annotations": annotations, "categories": cats}


def to_coco_results(image_infos: Sequence[dict], detections: Sequence[dict], categories: Sequence[str] | Sequence[dict],
                    info: dict | None = None) -> tuple[list[dict], dict]:
    """Detections as COCO tools take them: a *results* list and the *dataset* it refers to.

    ``results`` is ``[{image_id, category_id, bbox: [x, y, w, h], score}]`` (what ``COCO.loadRes`` and
    ``COCOeval`` read); ``dataset`` is ``{info, licenses, images, categories, annotations: []}``, a COCO
    dataset file without annotations that holds every image and category the results name (``COCO(file)``,
    then ``loadRes``). Arguments as :func:`to_coco_json`; every detection needs ``scores``.

    With no detection at all, ``results`` is ``[]``: valid COCO results, but pycocotools' ``COCO.loadRes``
    cannot load an empty list (it reads the first entry to tell boxes from captions or masks).
    """
    if any("scores" not in d for d in detections):
        raise ValueError("COCO results need a score for every detection")
    coco = to_coco_json(image_infos, detections, categories)
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": a["score"]}
               for a in coco["annotations"]]
    dataset = {"info": dict(info or {}), "licenses": [], "images": coco["images"], "categories": coco["categories"],
               "annotations": []}
    return results, dataset


def write_coco_results(results: list[dict], dataset: dict, results_path: str | Path, dataset_path: str | Path) -> None:
    """Write :func:`to_coco_results`' pair, each file atomically (a temporary name, then a rename), both
    written in full before either is renamed into place. Values must be finite (JSON has no NaN)."""
    import json

    texts = [json.dumps(results, allow_nan=False), json.dumps(dataset, indent=1, allow_nan=False)]
    with atomic_path(dataset_path) as dataset_tmp, atomic_path(results_path) as results_tmp:
        results_tmp.write_text(texts[0])
        dataset_tmp.write_text(texts[1])
