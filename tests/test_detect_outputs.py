"""`visionattn detect` on the batch-inference skeleton (issues 14 and 16): COCO outputs that pycocotools
reads and evaluates, re-runs that skip finished images and still write complete combined files, model
batches, outputs never on inputs, partly written or damaged outputs, colliding names, torchrun sharding.
Images are built here (a bright rectangle on black), so the stand-in detector's boxes are known exactly."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_detection_data import BrightBoxDetector
from visionattn.cli import main
from visionattn.tasks import batch
from visionattn.tasks import detect as detect_cmd

CLASSES = ["spot", "other"]
# name -> the bright rectangle (x1, y1, x2, y2), which BrightBoxDetector returns as the box; None: all black
BOXES = {"a.png": (4, 6, 30, 20), "b.png": (10, 2, 44, 40), "sub/c.png": (0, 0, 12, 9), "sub/deep/d.jpg": None}


def bright_image(path: Path, box, size=(48, 64)) -> Path:
    """A black ``size`` (H, W) image with the rectangle ``box`` (xyxy, end exclusive) white."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.zeros((*size, 3), np.uint8)
    if box is not None:
        x1, y1, x2, y2 = box
        image[y1:y2, x1:x2] = 255
    Image.fromarray(image).save(path)
    return path


def image_folder(folder: Path, boxes=BOXES) -> Path:
    for name, box in boxes.items():
        bright_image(folder / name, box)
    return folder


class CountingDetector(BrightBoxDetector):
    """BrightBoxDetector that records the size of every batch it is given and fails on images ``fail_width``
    pixels wide."""

    def __init__(self, fail_width: int | None = None):
        super().__init__(num_classes=len(CLASSES))
        self.batches: list[int] = []
        self.fail_width = fail_width

    def forward(self, images, targets=None):
        self.batches.append(len(images))
        if self.fail_width is not None and any(im.shape[-1] == self.fail_width for im in images):
            raise RuntimeError("the stand-in fails on this image")
        return super().forward(images, targets)


@pytest.fixture
def stand_in(monkeypatch):
    """``--model stand_in`` gives a CountingDetector (the last one built is ``stand_in.model``)."""

    class Holder:
        model = None
        fail_width = None

    def load(*args, **kwargs):
        Holder.model = CountingDetector(Holder.fail_width)
        return Holder.model, list(CLASSES)

    monkeypatch.setattr(detect_cmd, "load_detection_model", load)
    return Holder


def detect(*args) -> int:
    return main(["detect", *map(str, args), "--model", "stand_in"])


def read(path: Path):
    return json.loads(path.read_text())


def summary_images(out: Path) -> dict[str, dict]:
    return {e["image"]: e for e in read(out / "summary.json")["images"]}


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def xywh(box) -> list[float]:
    x1, y1, x2, y2 = box
    return [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]


# ---------------------------------------------------------------------------------------------------
# COCO outputs


def test_results_load_in_pycocotools_and_evaluate_to_ap_1(tmp_path, stand_in, capsys):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ins, out = image_folder(tmp_path / "in"), tmp_path / "out"
    assert detect("-i", ins, "-o", out, "--batch-size", "3") == 0
    assert "4 of 4 images written" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["detections", "images", "images.json", "results.json", "summary.json"]
    assert sorted(os.listdir(out / "detections")) == ["a.json", "b.json", "sub__c.json", "sub__deep__d.json"]
    assert sorted(os.listdir(out / "images")) == ["a.png", "b.png", "sub__c.png", "sub__deep__d.png"]

    dataset = read(out / "images.json")
    assert [im["file_name"] for im in dataset["images"]] == sorted(BOXES)
    assert [im["id"] for im in dataset["images"]] == [1, 2, 3, 4] and dataset["annotations"] == []
    assert all((im["height"], im["width"]) == (48, 64) for im in dataset["images"])
    assert [(c["id"], c["name"]) for c in dataset["categories"]] == [(1, "spot"), (2, "other")]
    results = read(out / "results.json")
    assert all(set(r) == {"image_id", "category_id", "bbox", "score"} for r in results)

    coco = COCO(str(out / "images.json"))
    loaded = coco.loadRes(str(out / "results.json"))
    file_of = {im["id"]: im["file_name"] for im in dataset["images"]}
    got = {file_of[a["image_id"]]: (a["bbox"], a["score"], a["category_id"]) for a in loaded.anns.values()}
    want = {name: (xywh(box), 0.9, 1) for name, box in BOXES.items() if box is not None}
    assert got == want and len(loaded.anns) == 3
    for name, box in BOXES.items():  # the per-image files hold the same boxes, xyxy
        record = read(out / "detections" / (name.rsplit(".", 1)[0].replace("/", "__") + ".json"))
        assert record["image"] == name and record["path"] == str(ins / name)
        assert [d["box"] for d in record["detections"]] == ([list(map(float, box))] if box else [])

    # a ground truth on the same images and categories, with the known boxes: the detections are perfect
    truth = dict(dataset, annotations=[
        {"id": k + 1, "image_id": image["id"], "category_id": 1, "bbox": xywh(BOXES[image["file_name"]]),
         "area": xywh(BOXES[image["file_name"]])[2] * xywh(BOXES[image["file_name"]])[3], "iscrowd": 0}
        for k, image in enumerate(im for im in dataset["images"] if BOXES[im["file_name"]] is not None)])
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    gt = COCO(str(tmp_path / "truth.json"))
    evaluator = COCOeval(gt, gt.loadRes(str(out / "results.json")), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0) and evaluator.stats[1] == pytest.approx(1.0)

    # one box moved off its object: that class's AP drops, as COCO computes it from our files
    moved = [dict(r, bbox=[r["bbox"][0] + 30, *r["bbox"][1:]]) if r["image_id"] == 2 else r for r in results]
    evaluator = COCOeval(gt, gt.loadRes(moved), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[1] < 0.7


def test_labels_past_the_class_names_and_no_detections(tmp_path, stand_in, monkeypatch, capsys):
    ins, out = image_folder(tmp_path / "in"), tmp_path / "out"
    files = detect_cmd.collect_images(ins)

    class LabelThree(BrightBoxDetector):
        def forward(self, images, targets=None):
            return [dict(o, labels=torch.full_like(o["labels"], 3)) for o in super().forward(images)]

    detect_cmd.detect(LabelThree(), files, out, classes=CLASSES)
    categories = read(out / "images.json")["categories"]
    assert [c["name"] for c in categories] == ["spot", "other", "class_2", "class_3"]
    assert {r["category_id"] for r in read(out / "results.json")} == {4}

    # above every score: an empty COCO results list (which pycocotools' loadRes cannot load: it reads the
    # first entry), and the image list still complete
    summary = detect_cmd.detect(BrightBoxDetector(), files, tmp_path / "none", classes=CLASSES, score_threshold=0.95)
    assert summary["detections"] == 0 and summary["images"] == 4
    assert read(tmp_path / "none" / "results.json") == []
    assert len(read(tmp_path / "none" / "images.json")["images"]) == 4


# ---------------------------------------------------------------------------------------------------
# re-runs, batches


def test_rerun_skips_finished_images_and_the_combined_files_stay_complete(tmp_path, stand_in, capsys):
    ins, out = image_folder(tmp_path / "in", {k: v for k, v in BOXES.items() if k != "b.png"}), tmp_path / "out"
    assert detect("-i", ins, "-o", out, "--batch-size", "2") == 0
    assert stand_in.model.batches == [2, 1]
    first = read(out / "results.json")
    drawn = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    capsys.readouterr()

    bright_image(ins / "b.png", BOXES["b.png"])  # one more image: only it goes through the model
    assert detect("-i", ins, "-o", out, "--batch-size", "2") == 0
    assert stand_in.model.batches == [1]
    printed = capsys.readouterr().out
    assert "3 images skipped" in printed and "--overwrite to redo them" in printed
    assert "1 of 4 images written" in printed and "results.json: 4 images, 3 detections" in printed
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir() if p.name != "b.png"} == drawn
    dataset, results = read(out / "images.json"), read(out / "results.json")
    assert [im["file_name"] for im in dataset["images"]] == sorted(BOXES)
    file_of = {im["id"]: im["file_name"] for im in dataset["images"]}
    assert {file_of[r["image_id"]]: r["bbox"] for r in results} == \
           {name: xywh(box) for name, box in BOXES.items() if box is not None}
    assert len(first) == 2 and all(r["score"] == 0.9 for r in results)
    entries = summary_images(out)
    assert {name: e["status"] for name, e in entries.items()} == {"a.png": "skipped", "b.png": "ok",
                                                                  "sub/c.png": "skipped", "sub/deep/d.jpg": "skipped"}
    assert entries["a.png"]["detections"] == 1 and entries["sub/deep/d.jpg"]["detections"] == 0
    assert read(out / "summary.json")["counts"] == {"ok": 1, "skipped": 3, "failed": 0}

    assert detect("-i", ins, "-o", out, "--batch-size", "2", "--overwrite") == 0  # redoes them all
    assert stand_in.model.batches == [2, 2]
    assert {e["status"] for e in summary_images(out).values()} == {"ok"}
    assert read(out / "results.json") == results


def test_a_higher_threshold_on_a_rerun_filters_skipped_images_a_lower_one_warns(tmp_path, stand_in, capsys):
    ins, out = image_folder(tmp_path / "in"), tmp_path / "out"
    assert detect("-i", ins, "-o", out) == 0
    assert detect("-i", ins, "-o", out, "--score-threshold", "0.95") == 0
    assert read(out / "results.json") == [] and stand_in.model.batches == []
    capsys.readouterr()
    assert detect("-i", ins, "-o", tmp_path / "high", "--score-threshold", "0.95") == 0
    assert detect("-i", ins, "-o", tmp_path / "high") == 0
    err = capsys.readouterr().err
    assert "4 skipped images" in err
    assert "higher --score-threshold" in err and "--overwrite" in err


def test_batches_of_batch_size_and_a_model_failure_fails_only_its_image(tmp_path, stand_in, capsys):
    ins = image_folder(tmp_path / "in")
    bright_image(ins / "odd.png", (1, 1, 5, 5), size=(20, 33))
    stand_in.fail_width = 33
    out = tmp_path / "out"
    assert detect("-i", ins, "-o", out, "--batch-size", "3") == 1
    # sorted: a, b, odd | sub/c, sub/deep/d; the first batch fails and is retried one image at a time
    assert stand_in.model.batches == [3, 1, 1, 1, 2]
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert lines == ["detect: image odd.png: RuntimeError: the stand-in fails on this image"]
    assert "4 of 5 images written" in captured.out and "1 failed" in captured.out
    assert {e["image"]: e["status"] for e in read(out / "summary.json")["images"]}["odd.png"] == "failed"
    assert len(read(out / "images.json")["images"]) == 4 and len(read(out / "results.json")) == 3
    assert not (out / "detections" / "odd.json").exists() and not (out / "images" / "odd.png").exists()
    assert detect("-i", ins, "-o", out, "--batch-size", "0") == 2
    assert "--batch-size must be a positive whole number" in capsys.readouterr().err


def test_no_draw_writes_only_the_detections(tmp_path, stand_in):
    ins, out = image_folder(tmp_path / "in"), tmp_path / "out"
    assert detect("-i", ins, "-o", out, "--no-draw") == 0
    assert not (out / "images").exists() and len(os.listdir(out / "detections")) == 4
    assert len(read(out / "results.json")) == 3


# ---------------------------------------------------------------------------------------------------
# outputs never on inputs, damaged outputs, colliding names


@pytest.mark.parametrize("how", ["same path", "./in vs in", "symlink to the input folder", "file in the folder"])
def test_output_folder_that_is_the_input_folder_is_refused_even_with_overwrite(tmp_path, stand_in, capsys,
                                                                                monkeypatch, how):
    ins = image_folder(tmp_path / "in")
    before = digests(ins)
    monkeypatch.chdir(tmp_path)
    os.symlink(ins, tmp_path / "link")
    inp, out = {"same path": (ins, ins), "./in vs in": ("./in", "in"), "symlink to the input folder": (ins, "link"),
                "file in the folder": (ins / "a.png", ins)}[how]
    assert detect("-i", inp, "-o", out, "--overwrite") == 2
    assert "is the input folder" in capsys.readouterr().err
    assert digests(ins) == before and stand_in.model.batches == []


def test_output_folder_inside_the_input_folder_is_not_read_as_input(tmp_path, stand_in, capsys):
    ins = image_folder(tmp_path / "in")
    out = ins / "out"
    assert detect("-i", ins, "-o", out) == 0
    assert detect("-i", ins, "-o", out) == 0  # out/images/*.png are not new inputs
    assert sorted(summary_images(out)) == sorted(BOXES) and stand_in.model.batches == []
    assert "4 images skipped" in capsys.readouterr().out


def test_partly_written_and_damaged_outputs_fail_their_image_only(tmp_path, stand_in, capsys):
    ins, out = image_folder(tmp_path / "in"), tmp_path / "out"
    assert detect("-i", ins, "-o", out) == 0
    (out / "images" / "a.png").unlink()  # a: the detections file without its drawing
    (out / "detections" / "b.json").write_text('{"image": "b.png", "detections": [')  # b: damaged
    c = read(out / "detections" / "sub__c.json")
    (out / "detections" / "sub__c.json").write_text(json.dumps(dict(c, image="other.png")))  # c: another image's
    capsys.readouterr()
    assert detect("-i", ins, "-o", out) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 3 and "Traceback" not in err
    assert "detect: image a.png: a.json already in" in lines[0] and "a.png not; --overwrite" in lines[0]
    assert any(line.startswith("detect: image b.png: ") and "b.json cannot be read" in line for line in lines)
    assert any(line.startswith("detect: image sub/c.png: ") and "holds the detections of 'other.png'" in line
               for line in lines)
    assert [im["file_name"] for im in read(out / "images.json")["images"]] == ["sub/deep/d.jpg"]
    assert {n: e["status"] for n, e in summary_images(out).items()} == {
        "a.png": "failed", "b.png": "failed", "sub/c.png": "failed", "sub/deep/d.jpg": "skipped"}
    assert detect("-i", ins, "-o", out, "--overwrite") == 0
    assert len(read(out / "images.json")["images"]) == 4 and len(read(out / "results.json")) == 3


def test_odd_things_in_the_output_folder_refuse_the_call(tmp_path, stand_in, capsys):
    ins = image_folder(tmp_path / "in")
    for name, make in (("results.json", Path.mkdir), ("detections", Path.touch)):
        out = tmp_path / f"out_{name}"
        out.mkdir()
        make(out / name)
        assert detect("-i", ins, "-o", out) == 2
        assert f"{out / name} exists and is not a" in capsys.readouterr().err
    out = tmp_path / "out_summary"
    out.mkdir()
    (out / "summary.json").write_text("{not json")  # kept aside, not destroyed; the run goes on
    assert detect("-i", ins, "-o", out) == 0
    assert [p.name.startswith("summary.json.unreadable-") for p in out.iterdir()].count(True) == 1


def test_colliding_output_names_fail_those_images_and_the_others_complete(tmp_path, stand_in, capsys):
    ins = image_folder(tmp_path / "in")
    bright_image(ins / "a.jpg", (1, 1, 9, 9))
    bright_image(ins / "sub__c.png", (1, 1, 9, 9))  # written as sub__c, like sub/c.png
    out = tmp_path / "out"
    assert detect("-i", ins, "-o", out) == 1
    err = capsys.readouterr().err
    pairs = (("a.png", "a.jpg"), ("a.jpg", "a.png"), ("sub/c.png", "sub__c.png"), ("sub__c.png", "sub/c.png"))
    for name, other in pairs:
        line = next(line for line in err.splitlines() if line.startswith(f"detect: image {name}: "))
        assert other in line and "rename one of them" in line
    assert [im["file_name"] for im in read(out / "images.json")["images"]] == ["b.png", "sub/deep/d.jpg"]
    assert sorted(os.listdir(out / "detections")) == ["b.json", "sub__deep__d.json"]


# ---------------------------------------------------------------------------------------------------
# the skeleton's batched runner


def test_run_items_batched(tmp_path, capsys):
    items = [batch.Item(n, [tmp_path / f"{n}.in"], {"out": tmp_path / f"{n}.out"}) for n in "abcdefg"]
    (tmp_path / "b.out").write_text("done")  # skipped, never processed
    items[3].problems.append("known problem")  # d fails before it runs
    seen = []

    def process_many(todo):
        seen.append([i.name for i in todo])
        if any(i.name == "f" for i in todo) and len(todo) > 1:
            raise RuntimeError("the whole batch")
        out = []
        for i in todo:
            if i.name == "f":
                out.append(ValueError("f alone"))
            elif i.name == "g":
                out.append(None)  # a bug: no result
            else:
                i.outputs["out"].write_text("x")
                out.append({"n": i.name})
        return out

    entries = batch.run_items_batched(items, process_many, batch_size=2, overwrite=False, command="t", key="item")
    assert seen == [["a", "c"], ["e", "f"], ["e"], ["f"], ["g"]]
    assert [(e["item"], e["status"]) for e in entries] == [("a", "ok"), ("b", "skipped"), ("c", "ok"), ("d", "failed"),
                                                          ("e", "ok"), ("f", "failed"), ("g", "failed")]
    assert entries[0]["n"] == "a" and entries[0]["outputs"] == {"out": str(tmp_path / "a.out")}
    assert entries[5]["error"] == "ValueError: f alone" and entries[3]["error"] == "known problem"
    err = capsys.readouterr().err.splitlines()
    assert err == ["t: item d: known problem", "t: item f: ValueError: f alone",
                   "t: item g: TypeError: no result for it (NoneType)"]
    with pytest.raises(batch.BatchError, match="batch size must be at least 1"):
        batch.run_items_batched(items, process_many, batch_size=0, overwrite=False, command="t", key="item")


# ---------------------------------------------------------------------------------------------------
# torchrun


TORCHRUN = """
import os, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_detection_data import BrightBoxDetector
from visionattn.tasks import detect

class Logging(BrightBoxDetector):
    def forward(self, images, targets=None):
        with open(Path({out!r}) / f"rank{{os.environ['RANK']}}.log", "a") as f:
            f.write(f"{{len(images)}}\\n")
        return super().forward(images, targets)

summary = detect.detect(Logging(), detect.collect_images({ins!r}), Path({out!r}) / "out", classes=["spot"],
                        batch_size=4)
sys.exit(1 if summary["failed"] else 0)
"""


def test_torchrun_shares_images_across_processes(tmp_path):
    ins = image_folder(tmp_path / "in")
    bright_image(ins / "e.png", (2, 2, 8, 8))
    script = tmp_path / "run_detect.py"
    script.write_text(TORCHRUN.format(tests=str(Path(__file__).parent), out=str(tmp_path), ins=str(ins)))
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # 5 images: rank 0 takes the 1st, 3rd and 5th (one batch of 3), rank 1 the others (one batch of 2)
    assert [(tmp_path / f"rank{k}.log").read_text().split() for k in (0, 1)] == [["3"], ["2"]]
    out = tmp_path / "out"
    assert sorted(summary_images(out)) == sorted([*BOXES, "e.png"])
    assert {e["status"] for e in summary_images(out).values()} == {"ok"}
    assert len(read(out / "images.json")["images"]) == 5 and len(read(out / "results.json")) == 4
