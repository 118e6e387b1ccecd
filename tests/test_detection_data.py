"""Detection data, metrics and `visionattn detect`: VOC/COCO readers on real NEU-DET files and on broken
copies of them, the fixed split, box-consistent augmentation, mAP on hand-computable cases, COCO export,
the detect command end to end and the trainer's DetectionTask, all with a stand-in detector."""
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from visionattn.cli import main
from visionattn.tasks import detection as det
from visionattn.tasks import detect as detect_cmd
from visionattn.tasks import detection_data as dd
from visionattn.tasks import detection_metrics as dm
from visionattn.tasks import files
from visionattn.tasks.data import DataError, SeededTransform

NEU_CLASSES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]
SAMPLE_IDS = ["crazing_1", "inclusion_136", "patches_2", "scratches_10"]  # inclusion_136 has difficult boxes
NO_AUGMENT = dict(hflip=0.0, vflip=0.0, scale=0.0, translate=0.0, brightness=0.0, contrast=0.0)


class BrightBoxDetector(nn.Module):
    """Stand-in with the torchvision detection interface. Eval: one box around the pixels brighter than 0.5
    (label 0, score 0.9), none if there are none. Training: losses from a single parameter."""

    def __init__(self, num_classes: int = 6):
        super().__init__()
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self, images, targets=None):
        if self.training:
            n_boxes = sum(len(t["boxes"]) for t in targets)
            loss_cls = (self.weight - 2.0) ** 2 * (1 + n_boxes)
            return {"loss": loss_cls, "loss_cls": loss_cls.detach()}
        outputs = []
        for image in images:
            ys, xs = torch.nonzero(image.mean(0) > 0.5, as_tuple=True)
            if len(xs):
                boxes = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
            else:
                boxes = torch.zeros(0, 4)
            outputs.append({"boxes": boxes, "labels": torch.zeros(len(boxes), dtype=torch.int64),
                            "scores": torch.full((len(boxes),), 0.9)})
        return outputs


@pytest.fixture
def neu(shared_data) -> Path:
    root = shared_data / "neu_det"
    if not root.is_dir():
        pytest.skip(f"NEU-DET not found at {root}")
    return root


def copy_voc(neu: Path, dest: Path, ids=SAMPLE_IDS) -> Path:
    """A small NEU-DET-layout copy with ``ids``, to break on purpose."""
    (dest / "ANNOTATIONS").mkdir(parents=True)
    (dest / "IMAGES").mkdir()
    for i in ids:
        shutil.copy(neu / "ANNOTATIONS" / f"{i}.xml", dest / "ANNOTATIONS")
        shutil.copy(neu / "IMAGES" / f"{i}.jpg", dest / "IMAGES")
    return dest


def box_target(boxes, labels, difficult=None) -> dict:
    labels = torch.tensor(labels, dtype=torch.int64)
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": labels,
            "difficult": torch.zeros_like(labels, dtype=torch.bool) if difficult is None else torch.tensor(difficult)}


def box_prediction(boxes, labels, scores) -> dict:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64), "scores": torch.tensor(scores, dtype=torch.float32)}


# ---------------------------------------------------------------------------------------------------
# readers


def test_voc_reads_neu_det(neu):
    ds = dd.VOCDetection(neu)
    assert len(ds) == 1500 and ds.classes == NEU_CLASSES
    assert sum(len(r.labels) for r in ds.records) == 3482
    crazing = ds.records[ds.ids.index("crazing_1")]  # <xmin>2 <ymin>2 <xmax>193 <ymax>194, 1-based inclusive
    assert np.array_equal(crazing.boxes, [[1, 1, 193, 194]]) and crazing.labels.tolist() == [0]
    assert any(r.difficult.any() for r in ds.records)
    image, target = ds[ds.ids.index("inclusion_136")]
    assert image.shape == (3, 200, 200) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert target["difficult"].any() and set(target["labels"].tolist()) == {1}
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64


def test_voc_bad_inputs_name_the_file(neu, tmp_path):
    with pytest.raises(DataError, match="not found: .*nowhere"):
        dd.VOCDetection(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty has no annotation folder"):
        dd.VOCDetection(tmp_path / "empty")
    (tmp_path / "bare" / "ANNOTATIONS").mkdir(parents=True)
    (tmp_path / "bare" / "IMAGES").mkdir()
    with pytest.raises(DataError, match="holds no .xml files"):
        dd.VOCDetection(tmp_path / "bare")

    root = copy_voc(neu, tmp_path / "corrupt")
    (root / "IMAGES" / "patches_2.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match="cannot read image .*patches_2.jpg"):
        dd.VOCDetection(root)

    root = copy_voc(neu, tmp_path / "truncated_jpeg")  # the header reads, decoding fails later
    jpg = root / "IMAGES" / "patches_2.jpg"
    jpg.write_bytes(jpg.read_bytes()[:3000])
    ds = dd.VOCDetection(root)
    with pytest.raises(DataError, match="cannot read image .*patches_2.jpg.*truncated"):
        ds[ds.ids.index("patches_2")]

    root = copy_voc(neu, tmp_path / "truncated_xml")
    xml = root / "ANNOTATIONS" / "scratches_10.xml"
    xml.write_text(xml.read_text()[:200])
    with pytest.raises(DataError, match="cannot parse annotation .*scratches_10.xml"):
        dd.VOCDetection(root)

    root = copy_voc(neu, tmp_path / "unknown_class")
    xml = root / "ANNOTATIONS" / "crazing_1.xml"
    xml.write_text(xml.read_text().replace("<name>crazing</name>", "<name>rust</name>"))
    with pytest.raises(DataError, match="crazing_1.xml: object 0 has class 'rust'"):
        dd.VOCDetection(root, classes=NEU_CLASSES)

    root = copy_voc(neu, tmp_path / "no_annotation")
    (root / "ANNOTATIONS" / "patches_2.xml").unlink()
    with pytest.raises(DataError, match="have no annotation .*patches_2"):
        dd.VOCDetection(root)

    root = copy_voc(neu, tmp_path / "no_image")
    (root / "IMAGES" / "patches_2.jpg").unlink()
    with pytest.raises(DataError, match="patches_2.xml has no image"):
        dd.VOCDetection(root)

    root = copy_voc(neu, tmp_path / "wrong_size")
    xml = root / "ANNOTATIONS" / "crazing_1.xml"
    xml.write_text(xml.read_text().replace("<width>200</width>", "<width>300</width>"))
    with pytest.raises(DataError, match="crazing_1.jpg is 200x200 but .*crazing_1.xml gives 300x200"):
        dd.VOCDetection(root)

    root = copy_voc(neu, tmp_path / "wrong_filename")
    xml = root / "ANNOTATIONS" / "crazing_1.xml"
    xml.write_text(xml.read_text().replace("crazing_1.jpg", "crazing_2.jpg"))
    with pytest.raises(DataError, match="crazing_1.xml describes image 'crazing_2.jpg'"):
        dd.VOCDetection(root)


def test_coco_round_trip(neu, tmp_path):
    voc = dd.VOCDetection(neu, SAMPLE_IDS)
    truth = [{"boxes": r.boxes, "labels": r.labels, "difficult": r.difficult} for r in voc.records]
    files.write_json_atomic(dm.to_coco_json(voc.image_infos(), truth, voc.classes), tmp_path / "gt.json")
    assert [p.name for p in tmp_path.iterdir()] == ["gt.json"]  # no temporary file left
    coco = dd.CocoDetection(voc.image_dir, tmp_path / "gt.json")
    assert coco.classes == voc.classes and coco.category_ids == [1, 2, 3, 4]
    assert coco.ids == voc.ids
    for a, b in zip(voc.records, coco.records):
        assert np.allclose(a.boxes, b.boxes) and np.array_equal(a.labels, b.labels)
        assert np.array_equal(a.difficult, b.difficult)


def test_coco_category_ids_and_errors(neu, tmp_path):
    images = [{"id": 7, "file_name": "crazing_1.jpg", "height": 200, "width": 200},
              {"id": 9, "file_name": "patches_2.jpg", "height": 200, "width": 200}]
    coco = {"images": images, "categories": [{"id": 30, "name": "b"}, {"id": 10, "name": "a"}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 30, "bbox": [10, 20, 30, 40], "iscrowd": 0}]}
    (tmp_path / "a.json").write_text(json.dumps(coco))
    ds = dd.CocoDetection(neu / "IMAGES", tmp_path / "a.json")
    assert ds.classes == ["a", "b"] and ds.category_ids == [10, 30]
    _, target = ds[0]
    assert target["boxes"].tolist() == [[10, 20, 40, 60]] and target["labels"].tolist() == [1]
    assert len(ds[1][1]["boxes"]) == 0  # an image without annotations has no boxes
    export = dm.to_coco_json(ds.image_infos(), [ds[0][1], ds[1][1]], ds.categories)
    assert export["annotations"][0]["category_id"] == 30 and export["annotations"][0]["bbox"] == [10, 20, 30, 40]

    coco["annotations"][0]["category_id"] = 99
    (tmp_path / "bad_cat.json").write_text(json.dumps(coco))
    with pytest.raises(DataError, match="bad_cat.json annotation 1: category_id 99"):
        dd.CocoDetection(neu / "IMAGES", tmp_path / "bad_cat.json")
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(DataError, match="cannot parse .*broken.json"):
        dd.CocoDetection(neu / "IMAGES", tmp_path / "broken.json")
    with pytest.raises(DataError, match="image 'crazing_1.jpg' not found"):
        dd.CocoDetection(tmp_path, tmp_path / "a.json")


# ---------------------------------------------------------------------------------------------------
# split and augmentation


def test_fixed_split_is_stratified_and_fixed(neu):
    ids = dd.VOCDetection(neu).ids
    train, val = dd.fixed_split(ids, 0.2, seed=0)
    assert Counter(map(dd.class_of_id, val)) == {c: 50 for c in NEU_CLASSES}
    assert Counter(map(dd.class_of_id, train)) == {c: 200 for c in NEU_CLASSES}
    assert not set(train) & set(val) and sorted(train + val) == sorted(ids)
    assert val[:5] == ["crazing_1", "crazing_4", "crazing_9", "crazing_16", "crazing_18"]  # pinned: the recipes' split
    assert dd.fixed_split(list(reversed(ids)), 0.2, seed=0) == (train, val)  # input order does not matter
    assert dd.fixed_split(ids, 0.2, seed=1)[1] != val


def test_fixed_split_small_groups():
    ids = [f"a_{i}" for i in range(1, 11)] + [f"b_{i}" for i in range(1, 4)] + ["lonely"]
    train, val = dd.fixed_split(ids, 0.2, seed=0)
    assert Counter(map(dd.class_of_id, val)) == {"a": 2, "b": 1}  # at least one per class of two or more
    assert "lonely" in train and dd.fixed_split(ids, 0.0)[1] == []
    with pytest.raises(ValueError, match="val_fraction"):
        dd.fixed_split(ids, 1.0)


def test_horizontal_flip_mirrors_boxes_exactly(neu):
    ds = dd.VOCDetection(neu, ["inclusion_136"])
    image = dd.read_rgb(ds.records[0].path)
    target = {"boxes": ds.records[0].boxes, "labels": ds.records[0].labels, "difficult": ds.records[0].difficult}
    plain, original = dd.build_detection_transforms(None, False)(image, target)
    flip = dd.build_detection_transforms(None, True, dict(NO_AUGMENT, hflip=1.0))
    flipped, mirrored = flip(image, target)
    assert torch.equal(flipped, plain.flip(-1))
    x1, y1, x2, y2 = original["boxes"].unbind(1)
    assert torch.allclose(mirrored["boxes"], torch.stack([200 - x2, y1, 200 - x1, y2], 1), atol=1e-3)
    assert torch.equal(mirrored["labels"], original["labels"]) and torch.equal(mirrored["difficult"], original["difficult"])

    resized, scaled = dd.build_detection_transforms(100, False)(image, target)  # the resize scales boxes
    assert resized.shape == (3, 100, 100) and torch.allclose(scaled["boxes"], original["boxes"] / 2, atol=1e-3)
    empty, none = dd.build_detection_transforms(64, True)(image, {"boxes": np.zeros((0, 4)), "labels": [], "difficult": []})
    assert empty.shape == (3, 64, 64) and none["boxes"].shape == (0, 4) and none["labels"].dtype == torch.int64
    with pytest.raises(ValueError, match="unknown data.augment keys \\['rotate'\\]"):
        dd.build_detection_transforms(64, True, {"rotate": 10})


def test_augmentation_is_seeded_per_epoch_and_index(neu):
    base = dd.VOCDetection(neu, SAMPLE_IDS, transform=dd.build_detection_transforms(64, True))
    seeded = SeededTransform(base, seed=5)
    first = [seeded[i] for i in range(len(seeded))]
    again = [seeded[i] for i in range(len(seeded))]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"]) for a, b in zip(first, again))
    seeded.set_epoch(1)
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, (seeded[i] for i in range(len(seeded)))))


# ---------------------------------------------------------------------------------------------------
# metrics and export


def test_map_perfect_partial_and_empty():
    truth = [box_target([[10, 10, 50, 50], [60, 60, 90, 90]], [0, 1]), box_target([[5, 5, 40, 40]], [0])]
    perfect = [box_prediction([[10, 10, 50, 50], [60, 60, 90, 90]], [0, 1], [0.9, 0.8]),
               box_prediction([[5, 5, 40, 40]], [0], [0.7])]
    m = dm.evaluate_detections(perfect, truth, ["a", "b"])
    assert m == pytest.approx({"map_50": 1.0, "map": 1.0, "map_75": 1.0, "ap50_a": 1.0, "ap50_b": 1.0})

    # class a: one of its two objects found, with the top score: precision 1 up to recall 0.5, so
    # 51 of COCO's 101 recall points -> AP 51/101; class b missed -> 0
    half = [box_prediction([[10, 10, 50, 50]], [0], [0.9]), box_prediction([], [], [])]
    m = dm.evaluate_detections(half, truth, ["a", "b"])
    assert m["ap50_a"] == pytest.approx(51 / 101) and m["ap50_b"] == 0.0
    assert m["map_50"] == pytest.approx(51 / 202) and m["map"] == pytest.approx(51 / 202)

    empty = [box_prediction([], [], []), box_prediction([], [], [])]
    assert dm.evaluate_detections(empty, truth, ["a", "b"]) == {"map_50": 0.0, "map": 0.0, "map_75": 0.0,
                                                                  "ap50_a": 0.0, "ap50_b": 0.0}


def test_map_images_without_truth_difficult_and_undefined():
    truth = [box_target([[10, 10, 50, 50], [60, 60, 90, 90]], [0, 0], [False, True]), box_target([], [])]
    # hitting the difficult box counts neither way; an image without boxes is fine
    preds = [box_prediction([[10, 10, 50, 50], [60, 60, 90, 90]], [0, 0], [0.9, 0.95]), box_prediction([], [], [])]
    m = dm.evaluate_detections(preds, truth, ["a", "b"])
    assert m["map_50"] == 1.0 and m["ap50_a"] == 1.0 and np.isnan(m["ap50_b"])  # no truth for b: undefined
    # a false positive on the image without truth, scored above the hit: precision 1/2 from the start
    preds[1] = box_prediction([[0, 0, 10, 10]], [0], [0.99])
    assert dm.evaluate_detections(preds, truth)["map_50"] == pytest.approx(0.5)
    assert list(dm.evaluate_detections(preds, truth)) == ["map_50", "map", "map_75", "ap50_0"]
    nothing = dm.evaluate_detections([box_prediction([], [], [])], [box_target([], [])])
    assert all(np.isnan(v) for v in nothing.values())


def test_coco_export_format_agrees_with_pycocotools(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    infos = [{"file_name": "a.jpg", "height": 100, "width": 100}, {"file_name": "b.jpg", "height": 100, "width": 100}]
    truth = [box_target([[10, 10, 50, 50], [60, 60, 90, 90]], [0, 1]), box_target([[5, 5, 40, 40]], [0])]
    preds = [box_prediction([[10, 10, 50, 50], [62, 60, 90, 90]], [0, 1], [0.9, 0.8]),
             box_prediction([[5, 5, 20, 40]], [0], [0.95])]
    gt = dm.to_coco_json(infos, truth, ["a", "b"])
    res = dm.to_coco_json(infos, preds, ["a", "b"])
    assert gt["categories"] == [{"id": 1, "name": "a", "supercategory": "none"}, {"id": 2, "name": "b", "supercategory": "none"}]
    assert [im["id"] for im in gt["images"]] == [1, 2]
    assert res["annotations"][1] == {"id": 2, "image_id": 1, "category_id": 2, "bbox": [62.0, 60.0, 28.0, 30.0],
                                     "area": 840.0, "iscrowd": 0, "score": 0.8}
    files.write_json_atomic(gt, tmp_path / "gt.json")
    coco_gt = COCO(str(tmp_path / "gt.json"))
    evaluator = COCOeval(coco_gt, coco_gt.loadRes(res["annotations"]), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    ours = dm.evaluate_detections(preds, truth)
    assert ours["map"] == pytest.approx(evaluator.stats[0]) and ours["map_50"] == pytest.approx(evaluator.stats[1])


# ---------------------------------------------------------------------------------------------------
# `visionattn detect`


@pytest.fixture
def detect_inputs(neu, tmp_path) -> Path:
    folder = tmp_path / "in"
    (folder / "more").mkdir(parents=True)
    for i in ("crazing_1", "patches_2"):
        shutil.copy(neu / "IMAGES" / f"{i}.jpg", folder)
    shutil.copy(neu / "IMAGES" / "scratches_10.jpg", folder / "more")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return folder


def test_detect_end_to_end(detect_inputs, tmp_path, capsys):
    out = tmp_path / "out"
    files = detect_cmd.collect_images(detect_inputs)
    summary = detect_cmd.detect(BrightBoxDetector(), files, out, classes=NEU_CLASSES)
    assert summary["images"] == 3 and summary["detections"] == 3 and summary["written"] == 3
    assert [Path(f["path"]).name for f in summary["failed"]] == ["broken.jpg"]
    assert "broken.jpg" in capsys.readouterr().err
    dataset = json.loads((out / "images.json").read_text())
    assert [im["file_name"] for im in dataset["images"]] == ["crazing_1.jpg", "more/scratches_10.jpg", "patches_2.jpg"]
    assert [im["id"] for im in dataset["images"]] == [1, 2, 3] and dataset["annotations"] == []
    assert dataset["categories"][0] == {"id": 1, "name": "crazing", "supercategory": "none"}
    assert [c["name"] for c in dataset["categories"]] == NEU_CLASSES
    results = json.loads((out / "results.json").read_text())
    assert set(results[0]) == {"image_id", "category_id", "bbox", "score"}
    assert results[0]["category_id"] == 1 and results[0]["score"] == 0.9 and len(results[0]["bbox"]) == 4
    assert results[0]["image_id"] == 1
    record = json.loads((out / "detections" / "more__scratches_10.json").read_text())
    assert record["image"] == "more/scratches_10.jpg" and record["path"] == str(detect_inputs / "more" / "scratches_10.jpg")
    assert record["detections"][0]["class"] == "crazing" and (record["width"], record["height"]) == (200, 200)
    drawn = sorted(p.name for p in (out / "images").iterdir())
    assert drawn == ["crazing_1.png", "more__scratches_10.png", "patches_2.png"]
    from PIL import Image

    with Image.open(out / "images" / "crazing_1.png") as im:
        assert im.size == (200, 200) and im.mode == "RGB"
    assert not [p for p in out.rglob(".*")]  # no temporary files left

    # a re-run skips the finished images (and says so), tries the broken one again, and writes the
    # combined files complete
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    summary = detect_cmd.detect(BrightBoxDetector(), files, out)
    captured = capsys.readouterr()
    assert summary["skipped"] == 3 and summary["written"] == 0 and summary["images"] == 3 and summary["detections"] == 3
    assert [Path(f["path"]).name for f in summary["failed"]] == ["broken.jpg"] and "broken.jpg" in captured.err
    assert "3 images skipped" in captured.out and "--overwrite to redo them" in captured.out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before
    assert json.loads((out / "results.json").read_text()) == results
    summary = detect_cmd.detect(BrightBoxDetector(), files, out, score_threshold=0.95, overwrite=True)
    assert summary["written"] == 3 and summary["detections"] == 0
    assert json.loads((out / "results.json").read_text()) == []


def test_detect_command(detect_inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(detect_cmd, "load_detection_model", lambda *a, **k: (BrightBoxDetector(), NEU_CLASSES))
    out = tmp_path / "out"
    assert main(["detect", "-i", str(detect_inputs), "-o", str(out), "--model", "stand_in"]) == 1  # one bad image
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.err and "results.json: 3 images, 3 detections" in captured.out
    assert (out / "results.json").is_file() and (out / "images.json").is_file()
    assert len(list((out / "images").iterdir())) == 3 and len(list((out / "detections").iterdir())) == 3
    assert main(["detect", "-i", str(detect_inputs / "more"), "-o", str(tmp_path / "more"), "--model", "stand_in"]) == 0
    # the same image again: skipped, which is no failure
    assert main(["detect", "-i", str(detect_inputs / "crazing_1.jpg"), "-o", str(out), "--model", "stand_in"]) == 0
    captured = capsys.readouterr()
    assert "1 images skipped (crazing_1.jpg)" in captured.out and "--overwrite" in captured.out
    assert main(["detect", "-i", str(detect_inputs / "crazing_1.jpg"), "-o", str(out), "--model", "stand_in",
                 "--overwrite", "--score-threshold", "0.5"]) == 0
    assert "1 of 1 images written" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())  # merged with the first run's
    assert {e["image"]: e["status"] for e in summary["images"]} == {
        "broken.jpg": "failed", "crazing_1.jpg": "ok", "more/scratches_10.jpg": "ok", "patches_2.jpg": "ok"}
    assert main(["detect", "-i", str(detect_inputs), "-o", str(detect_inputs), "--model", "stand_in"]) == 2
    assert "is the input folder" in capsys.readouterr().err


def test_detect_refuses_models_of_other_tasks(tmp_path, capsys):
    assert main(["detect", "-i", str(tmp_path), "-o", str(tmp_path / "o"), "--model", "convit_tiny"]) == 2
    assert "convit_tiny is a classification model" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("task: classification\nmodel: {name: convit_tiny}\n")
    (run / "model.safetensors").write_bytes(b"")
    assert main(["detect", "-i", str(tmp_path), "-o", str(tmp_path / "o"), "--model", str(run)]) == 2
    assert "is a classification model" in capsys.readouterr().err
    assert main(["detect", "-i", str(tmp_path), "-o", str(tmp_path / "o"), "--model", str(tmp_path / "missing.safetensors")]) == 2
    assert "model not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# the trainer's task


def detection_recipe(root: Path, **data) -> dict:
    return {"task": "detection", "model": {"name": "dfir_detr", "kwargs": {"input_size": 128}},
            "data": dict({"kind": "voc", "root": str(root), "val_fraction": 0.2, "img_size": 64}, **data)}


def test_detection_task_protocol(neu):
    task = det.DetectionTask()
    cfg = detection_recipe(neu)
    train, val, meta = task.build_datasets(cfg, seed=0)
    assert meta == {"classes": NEU_CLASSES} and cfg["data"]["classes"] == NEU_CLASSES  # recorded for config.yaml
    assert isinstance(train, SeededTransform) and (len(train), len(val)) == (1200, 300)
    train.set_epoch(0)
    hard = train.dataset.ids.index("inclusion_136")  # has difficult boxes: left out of training targets
    images, targets = task.load_batch(train, [0, hard], torch.device("cpu"))
    assert [im.shape for im in images] == [(3, 64, 64)] * 2 and set(targets[0]) == {"boxes", "labels"}
    assert len(targets[1]["boxes"]) < len(train[hard][1]["boxes"])
    net = BrightBoxDetector()
    loss = task.training_loss(net.train(), images, targets, None)
    loss.backward()
    assert loss.ndim == 0 and net.weight.grad is not None

    subset = val.subset(range(12), val.transform)
    metrics = task.evaluate(net.eval(), subset, 0, 1, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False), 5)
    assert set(metrics) == {"map_50", "map", "map_75"} | {f"ap50_{c}" for c in NEU_CLASSES}
    assert all(isinstance(v, float) for v in metrics.values()) and 0.0 <= metrics["map_50"] <= 1.0
    with pytest.raises(ValueError, match="own losses"):
        task.build_model(dict(cfg, loss={"_target_": "torch.nn.CrossEntropyLoss"}), meta)
    with pytest.raises(ValueError, match="data.kind must be 'voc' or 'coco'"):
        task.build_datasets(detection_recipe(neu, kind="yolo"), seed=0)


DDP_EVAL = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
out = {out!r}
from test_detection_data import BrightBoxDetector, box_target
from visionattn.tasks.detection import DetectionTask
from visionattn.tasks.runtime import dist_setup, leave

class Squares(torch.utils.data.Dataset):
    classes = ["a"]
    def __len__(self):
        return 7
    def __getitem__(self, i):  # a bright square the stand-in finds; images 0, 3, 6 add a dim one it misses
        image = torch.zeros(3, 32, 32)
        image[:, 4:8 + i, 4:8 + i] = 1.0
        boxes = [[4, 4, 8 + i, 8 + i]] + ([[24, 24, 30, 30]] if i % 3 == 0 else [])
        if i % 3 == 0:
            image[:, 24:30, 24:30] = 0.3
        return image, box_target(boxes, [0] * len(boxes))

def evaluate(rank, world):
    return DetectionTask().evaluate(BrightBoxDetector().eval(), Squares(), rank, world, torch.device("cpu"),
                                    lambda: torch.autocast("cpu", enabled=False), 2)

dist_setup("cpu")  # the trainer's set-up: gloo; leave() below tears the group down as the command does
# all images: 7 of 10 objects found, no false positive -> AP 71/101 (recall points 0.00..0.70); rank 0's
# share alone (images 0, 2, 4, 6) would give 67/101, rank 1's (1, 3, 5) 76/101
metrics = evaluate(dist.get_rank(), dist.get_world_size())
ok = abs(metrics["ap50_a"] - 71 / 101) < 1e-6 and metrics == evaluate(0, 1)
open(f"{out}/rank{{dist.get_rank()}}.txt", "w").write(str(ok))
leave(0)  # as the visionattn command ends a torchrun process (runtime.leave)
"""


def test_evaluate_gathers_across_two_processes(tmp_path):
    script = tmp_path / "ddp_eval.py"
    script.write_text(DDP_EVAL.format(tests=str(Path(__file__).parent), out=str(tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script)], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)] == ["True", "True"]


def test_real_detector_trains_and_evaluates_one_step(neu):
    import visionattn

    if "dfir_detr" not in visionattn.list_models():
        pytest.skip("dfir_detr is not registered yet")
    task = det.DetectionTask()
    cfg = detection_recipe(neu)
    train, val, meta = task.build_datasets(cfg, seed=0)
    model = task.build_model(cfg, meta)
    images, targets = task.load_batch(train, [0, 1], torch.device("cpu"))
    loss = task.training_loss(model.train(), images, targets, None)
    assert torch.isfinite(loss)
    loss.backward()
    metrics = task.evaluate(model.eval(), val.subset(range(2), val.transform), 0, 1, torch.device("cpu"),
                            lambda: torch.autocast("cpu", enabled=False), 2)
    assert 0.0 <= metrics["map_50"] <= 1.0
