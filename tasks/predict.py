"""``visionattn predict``: classify image files with a trained recipe; bad files (unreadable, corrupt,
truncated, over the recipe's ``data.max_image_pixels``) are reported by name, one line each, and the others
still processed; the CSV is written atomically and never overwritten unless asked."""
from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import torch

from visionattn.tasks.data import IMAGE_SUFFIXES, DataError, build_transforms
from visionattn.tasks.files import write_text_atomic
from visionattn.tasks.imageio import pixel_limit, read_image


def predict_classification(config: str, checkpoint: str | None, input_path: str, output: str,
                           overrides: list[str] | None = None, overwrite: bool = False) -> int:
    """``config``: a run folder (or its weights file), or a recipe with ``checkpoint`` (see
    :func:`~visionattn.tasks.run.recipe_and_weights`). Returns the exit code."""
    from PIL import Image

    from visionattn.tasks.classification import build_datasets
    from visionattn.tasks.run import load_model_for_eval, recipe_and_weights
    from visionattn.tasks.runtime import resolve_data_paths

    out = Path(output)
    if out.exists() and not overwrite:
        print(f"predict: {out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    if not out.parent.exists():
        print(f"predict: output folder {out.parent} does not exist", file=sys.stderr)
        return 2
    src = Path(input_path)
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    elif src.is_file():
        files = [src]
    else:
        print(f"predict: input not found: {src}", file=sys.stderr)
        return 2
    if not files:
        print(f"predict: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {src}", file=sys.stderr)
        return 2
    if any(out.resolve() == f.resolve() for f in files):
        print(f"predict: {out} is one of the input images; refusing to write over it", file=sys.stderr)
        return 2
    cfg, weights, config_path = recipe_and_weights(config, checkpoint, overrides)
    if cfg.get("task", "classification") != "classification":
        print(f"predict: {config} is a {cfg['task']} model; use `visionattn segment` or `visionattn detect`", file=sys.stderr)
        return 2
    resolve_data_paths(cfg, config_path)
    data = cfg["data"]
    # the class names the run recorded; only older runs need the training data to list them
    classes = list(cfg.get("classes") or build_datasets(cfg, 0)[2])
    model = load_model_for_eval(cfg, weights, {"classes": classes})
    tf = build_transforms(int(data.get("img_size", 32)), data.get("mean", (0.5,) * 3), data.get("std", (0.5,) * 3),
                          False, None, bool(data.get("grayscale_to_rgb", False)))
    max_pixels = pixel_limit(data.get("max_image_pixels"))
    mode = "L" if data.get("grayscale_to_rgb") else "RGB"
    rows, failed = [], 0
    for f in files:
        try:
            x = tf(Image.fromarray(read_image(f, mode, max_pixels)))[None]
            with torch.no_grad():
                prob = model(x).softmax(-1)[0]
            k = int(prob.argmax())
            rows.append([str(f), k, classes[k], f"{float(prob[k]):.6f}"])
        except Exception as e:  # one bad file must not stop the others
            failed += 1
            # a DataError (ImageError) already names the file
            message = str(e) if isinstance(e, DataError) else f"{f}: {type(e).__name__}: {e}"
            print(f"predict: {' '.join(message.split())}", file=sys.stderr)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "class_index", "class_name", "probability"])
    w.writerows(rows)
    write_text_atomic(buf.getvalue(), out)
    print(f"predict: {len(rows)} images classified, {failed} failed -> {out}")
    return 1 if failed else 0
