"""``visionattn export RUN --format monai-bundle -o DIR``: a trained 3-D segmentation run as a MONAI bundle.

The folder written is a bundle that ``python -m monai.bundle run`` infers and trains with::

    DIR/
      configs/metadata.json    MONAI's bundle metadata (versions, network_data_format, labels, ...)
      configs/inference.json   SupervisedEvaluator: the run's preprocessing, sliding windows, Invertd, SaveImaged
      configs/train.json       SupervisedTrainer + validation SupervisedEvaluator (DiceMetric) on an MSD folder
      configs/logging.conf     Python logging for the MONAI workflows (INFO to the console)
      configs/recipe.yaml      the visionattn recipe the configs were written from (provenance; not read by MONAI)
      models/model.safetensors the run's weights (safetensors: nothing is ever unpickled)
      docs/README.md           what the bundle is and the commands

Every MONAI config builds the network with :func:`visionattn.create_model` and the run's model name and
arguments; ``inference.json`` loads the weights through :func:`load_weights` (visionattn's loader, refusing
anything but ``.safetensors``), and ``train.json`` saves them with :class:`SafetensorsSaver` (no pickled
checkpoint). Preprocessing is written from the recipe's ``data`` section with the same MONAI dictionary
transforms :func:`visionattn.tasks.segmentation.preprocessing` builds, so the bundle's inference gives the
label maps ``visionattn segment`` gives for the same volumes: softmax per window, Gaussian blending
(MONAI's ``SlidingWindowInferer`` with the recipe's ``roi_size``/``overlap``/``mode``), test-time mirroring
along the recipe's flip axes when its ``inference.tta`` is on (:class:`MirroredInferer`), argmax, then
``Invertd`` with nearest-neighbour interpolation back to the input grid.

The MONAI engines (``monai.engines``) need ``pytorch-ignite``; writing the bundle does not.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from visionattn.tasks.errors import ExportError

BUNDLE_VERSION = "0.1.0"
WEIGHTS_NAME = "model.safetensors"
METADATA_SCHEMA = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                   "meta_schema_20220324.json")
# the keys MONAI's bundle specification calls mandatory in configs/metadata.json, and those of a tensor format
# (``optional_packages_version``, mandatory in the specification's text, is ``required_packages_version`` since
# MONAI 1.2, which renames the former and warns; the bundle writes the latter)
REQUIRED_METADATA_KEYS = ("version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version",
                          "task", "description", "authors", "copyright", "network_data_format")
REQUIRED_TENSOR_KEYS = ("type", "format", "modality", "num_channels", "spatial_shape", "dtype", "value_range",
                        "is_patch_data", "channel_def")


# ---------------------------------------------------------------------------------------------------
# what the bundle's configs call at run time


def load_weights(network: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """``network`` with the weights of the ``.safetensors`` file ``path`` (visionattn's loader: strict, the
    digest the file carries checked), returned so a config can chain it. Any other kind of file is refused:
    a bundle written by visionattn never unpickles anything."""
    import visionattn

    if not str(path).endswith(".safetensors"):
        raise ValueError(f"{path}: a visionattn MONAI bundle loads weights from .safetensors files only")
    visionattn.load_checkpoint(network, str(path))
    return network


def first_output(out):
    """A network's prediction: the first (finest) output of a deep-supervision list, or the tensor itself."""
    return out[0] if isinstance(out, (list, tuple)) else out


class MirroredInferer:
    """A MONAI inferer (``inferer(inputs, network)``) that runs ``inferer`` on the network's class
    probabilities (softmax of its finest output per window, as ``visionattn segment`` blends them) and, with
    ``spatial_axes``, averages over every mirroring along those axes (0-based spatial axes; nnU-Net's
    test-time mirroring). The whole image is mirrored, inferred and mirrored back, as
    :func:`visionattn.tasks.segmentation.sliding_window_predict` does, so the windows and their sums are
    the same. Returns float32 probabilities ``[B, K, *S]``."""

    def __init__(self, inferer: Callable, spatial_axes: Sequence[int] = (), softmax: bool = True):
        self.inferer = inferer
        self.spatial_axes = sorted(int(a) for a in spatial_axes)
        self.softmax = softmax

    def mirrorings(self) -> list[tuple[int, ...]]:
        """The axis tuples to flip (tensor dimensions), the identity first, in ``segment``'s order."""
        dims = [2 + a for a in self.spatial_axes]
        return [()] + [tuple(d for j, d in enumerate(dims) if mask >> j & 1) for mask in range(1, 2 ** len(dims))]

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        image = inputs.as_tensor() if hasattr(inputs, "as_tensor") else inputs

        def probabilities(window: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
            out = first_output(network(window, *a, **k)).float()
            return out.softmax(1) if self.softmax else out

        total = None
        flips = self.mirrorings()
        for dims in flips:
            out = self.inferer(image.flip(dims) if dims else image, probabilities, *args, **kwargs)
            out = out.as_tensor() if hasattr(out, "as_tensor") else torch.as_tensor(out)
            out = out.flip(dims) if dims else out
            total = out if total is None else total.add_(out)
        return total / len(flips)


class SafetensorsSaver:
    """An ignite/MONAI handler that writes ``network``'s weights as ``.safetensors`` (visionattn's
    :func:`~visionattn.tasks.runtime.atomic_save_weights`, with the digest visionattn checks) into
    ``save_dir``: on an evaluator, ``filename`` whenever its key metric improves (``best=True``, MONAI's
    ``CheckpointSaver(save_key_metric=True)``); on a trainer, ``filename`` when the run completes."""

    def __init__(self, save_dir: str, network: torch.nn.Module, filename: str = WEIGHTS_NAME, best: bool = False):
        self.save_dir, self.network, self.filename, self.best = Path(save_dir), network, filename, best

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED if self.best else Events.COMPLETED, self)

    def __call__(self, engine) -> None:
        from visionattn.tasks.runtime import atomic_save_weights

        if self.best and getattr(engine.state, "best_metric_epoch", None) != engine.state.epoch:
            return  # the key metric did not improve at this validation
        self.save_dir.mkdir(parents=True, exist_ok=True)
        network = self.network.module if hasattr(self.network, "module") else self.network  # DDP
        atomic_save_weights(network, self.save_dir / self.filename)


# ---------------------------------------------------------------------------------------------------
# the configs, written from the recipe


def _network_def(config: dict, labels: list[str]) -> dict:
    """``network_def``: :func:`visionattn.create_model` with the run's model name and arguments, with the
    defaults the segmentation task fills in (``in_channels``, ``out_channels``)."""
    spec = config.get("model") or {}
    if "_target_" in spec or not spec.get("name"):
        raise ExportError("monai-bundle: the run's model is not a registered visionattn model "
                          "(model.name + model.kwargs); only those are written as visionattn.create_model")
    kwargs = dict(spec.get("kwargs") or {})
    kwargs.setdefault("in_channels", int((config.get("data") or {}).get("in_channels", 1)))
    kwargs.setdefault("out_channels", len(labels))
    return {"_target_": "visionattn.create_model", "name": spec["name"], **kwargs}


def _deterministic(data: dict, keys: Sequence[str]) -> list[dict]:
    """The recipe's deterministic preprocessing as MONAI config entries, step for step what
    :func:`visionattn.tasks.segmentation.preprocessing` builds for 3-D NIfTI volumes."""
    from visionattn.tasks.segmentation import INTENSITY_MODES, data_zoom

    keys = list(keys)
    ops: list[dict] = [
        {"_target_": "LoadImaged", "keys": keys, "image_only": True, "reader": "NibabelReader"},
        {"_target_": "EnsureChannelFirstd", "keys": keys},
    ]
    if data.get("orientation"):
        ops.append({"_target_": "Orientationd", "keys": keys, "axcodes": data["orientation"],
                    "labels": [["L", "R"], ["P", "A"], ["I", "S"]]})
    if data.get("spacing"):
        ops.append({"_target_": "Spacingd", "keys": keys, "pixdim": list(data["spacing"]),
                    "mode": ["bilinear" if k == "image" else "nearest" for k in keys]})
    zoom = data_zoom(data)
    if zoom is not None:
        ops.append({"_target_": "Zoomd", "keys": keys, "zoom": zoom, "keep_size": False,
                    "mode": ["trilinear" if k == "image" else "nearest" for k in keys]})
    ops.append({"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32", "track_meta": True})
    intensity = data.get("intensity", "zscore")
    if intensity not in INTENSITY_MODES:
        raise ExportError(f"monai-bundle: data.intensity {intensity!r} is not one of {list(INTENSITY_MODES)}")
    if intensity in ("zscore", "zscore_nonzero"):
        ops.append({"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": intensity == "zscore_nonzero",
                    "channel_wise": True})
    elif intensity == "scale01":
        ops.append({"_target_": "ScaleIntensityd", "keys": "image", "minv": 0.0, "maxv": 1.0, "channel_wise": True})
    if "label" in keys and data.get("label_values"):
        values = list(data["label_values"])
        ops.append({"_target_": "MapLabelValued", "keys": "label", "orig_labels": values,
                    "target_labels": list(range(len(values)))})
    return ops


def _augmentation(data: dict) -> list[dict]:
    """The recipe's per-sample augmentation (:func:`visionattn.tasks.segmentation.augmentation`) as config
    entries, in its order: pad to ``roi_size``, random crop, rotation and scaling, flips, gamma, 90-degree
    rotations, intensity jitter."""
    import math

    from visionattn.tasks.segmentation import augment_settings

    roi = list(data["roi_size"])
    aug = augment_settings(data)  # the recipe's defaults and checks
    keys = ["image", "label"]
    ops: list[dict] = [{"_target_": "SpatialPadd", "keys": keys, "spatial_size": roi}]
    if aug.get("foreground_crop", True):
        ops.append({"_target_": "RandCropByPosNegLabeld", "keys": keys, "label_key": "label", "spatial_size": roi,
                    "pos": float(aug.get("pos", 1.0)), "neg": float(aug.get("neg", 1.0)), "num_samples": 1})
    else:
        ops.append({"_target_": "RandSpatialCropd", "keys": keys, "roi_size": roi, "random_size": False})
    rotate, scale = float(aug["rotate"]), float(aug["scale"])
    if rotate or scale:
        ops.append({"_target_": "RandAffined", "keys": keys, "prob": float(aug["spatial_prob"]),
                    "mode": ["bilinear", "nearest"], "rotate_range": [math.radians(rotate)] * (1 if len(roi) == 2 else 3),
                    "scale_range": [scale] * len(roi), "padding_mode": "zeros"})
    for axis in aug["flip_axes"] or []:
        ops.append({"_target_": "RandFlipd", "keys": keys, "prob": 0.5, "spatial_axis": int(axis)})
    if aug["gamma"]:
        ops.append({"_target_": "RandAdjustContrastd", "keys": "image", "prob": float(aug["gamma_prob"]),
                    "gamma": [float(g) for g in aug["gamma"]]})
    if aug["rotate90"]:
        ops.append({"_target_": "RandRotate90d", "keys": keys, "prob": 0.5, "spatial_axes": [0, 1]})
    if aug["intensity"]:
        ops += [{"_target_": "RandScaleIntensityd", "keys": "image", "factors": aug["intensity"], "prob": 0.5},
                {"_target_": "RandShiftIntensityd", "keys": "image", "offsets": aug["intensity"], "prob": 0.5}]
    return ops


_IMPORTS = ["$import glob", "$import os", "$import numpy", "$import torch", "$import monai", "$import visionattn",
            "$import visionattn.tasks.monai_bundle", "$import visionattn.tasks.segmentation"]
_DEVICE = "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')"


def _window_inferer(data: dict, inference: dict) -> dict:
    return {"_target_": "SlidingWindowInferer", "roi_size": list(data["roi_size"]),
            "sw_batch_size": int(inference.get("sw_batch_size", 4)), "overlap": float(inference.get("overlap", 0.5)),
            "mode": inference.get("mode", "gaussian")}


def inference_config(config: dict, labels: list[str]) -> dict:
    """``configs/inference.json``: every NIfTI volume of ``dataset_dir`` segmented into ``output_dir`` as
    ``CASE_seg.nii.gz`` on its own grid."""
    from visionattn.tasks.segmentation import mirror_axes

    data, inference = config["data"], dict(config.get("inference") or {})
    axes = mirror_axes(data) if inference.get("tta", False) else []
    return {
        "imports": _IMPORTS,
        "bundle_root": ".",
        "dataset_dir": "$@bundle_root + '/data'",
        "output_dir": "$@bundle_root + '/eval'",
        "ckpt_path": f"$@bundle_root + '/models/{WEIGHTS_NAME}'",
        "device": _DEVICE,
        "network_def": _network_def(config, labels),
        "network": "$visionattn.tasks.monai_bundle.load_weights(@network_def, @ckpt_path).to(@device)",
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, '*.nii.gz')) "
                    "+ glob.glob(os.path.join(@dataset_dir, '*.nii')))",
        "preprocessing": {"_target_": "Compose", "transforms": _deterministic(data, ["image"])},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': f} for f in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "window_inferer": _window_inferer(data, inference),
        "mirror_axes": axes,
        "inferer": {"_target_": "visionattn.tasks.monai_bundle.MirroredInferer", "inferer": "@window_inferer",
                    "spatial_axes": "@mirror_axes", "softmax": True},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": True, "to_tensor": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "output_dtype": "$numpy.uint8" if len(labels) <= 255 else "$numpy.int16", "resample": False,
             "separate_folder": False, "print_log": False},
        ]},
        "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
        "finalize": [],
    }


def train_config(config: dict, labels: list[str]) -> dict:
    """``configs/train.json``: the recipe's training as MONAI engines, on the MSD folder ``dataset_dir``
    split as visionattn splits it (:func:`~visionattn.tasks.segmentation.fixed_case_split`)."""
    data, inference, train = config["data"], dict(config.get("inference") or {}), dict(config.get("train") or {})
    if data.get("kind", "msd") != "msd":
        raise ExportError("monai-bundle: train.json reads MSD folders; the run's data.kind is "
                          f"{data.get('kind')!r}")
    model_kwargs = (config.get("model") or {}).get("kwargs") or {}
    loss = dict(config.get("loss") or {"_target_": "monai.losses.DiceCELoss", "to_onehot_y": True, "softmax": True})
    if "_target_" not in loss:
        raise ExportError("monai-bundle: the recipe's loss has no _target_")
    if model_kwargs.get("deep_supervision") and not loss["_target_"].endswith("DeepSupervisionLoss"):
        # as the visionattn trainer does: each output of the list weighted 1, 1/2, 1/4, ... (finest first)
        loss = {"_target_": "monai.losses.DeepSupervisionLoss", "loss": loss}
    n = len(labels)
    split = ("$visionattn.tasks.segmentation.fixed_case_split("
             "visionattn.tasks.segmentation.find_msd_cases(@dataset_dir), @val_fraction, @split_seed, "
             "folds=@folds, fold=@fold)")
    return {
        "imports": _IMPORTS,
        "bundle_root": ".",
        "ckpt_dir": "$@bundle_root + '/models'",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data/Task04_Hippocampus",
        "device": _DEVICE,
        "seed": int(config.get("seed", 0)),
        "val_fraction": float(data.get("val_fraction", 0.2)),
        "split_seed": int(data.get("split_seed", 0)),
        "folds": data.get("folds"),  # a cross-validation fold's run: its fold replaces val_fraction
        "fold": data.get("fold"),
        "num_train_cases": data.get("max_train_cases"),
        "num_val_cases": None,
        "epochs": int(train.get("epochs", 100)),
        "val_interval": int(train.get("eval_every", 1)),
        "batch_size": int(train.get("batch_size", 2)),
        "num_workers": 0,
        "learning_rate": float(train.get("lr", 1e-3)),
        "weight_decay": float(train.get("weight_decay", 0.05)),
        "min_lr": float(train.get("min_lr", 0.0)),
        "network_def": _network_def(config, labels),
        "network": "$@network_def.to(@device)",
        "loss": loss,
        "optimizer": {"_target_": "timm.optim.create_optimizer_v2", "model_or_params": "@network",
                      "opt": train.get("opt", "adamw"), "lr": "@learning_rate", "weight_decay": "@weight_decay"},
        "lr_scheduler": {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "optimizer": "@optimizer",
                         "T_max": "@epochs", "eta_min": "@min_lr"},
        "split": split,
        "train_datalist": "$[{'image': str(c['image']), 'label': str(c['label'])} for c in @split[0]][:@num_train_cases]",
        "val_datalist": "$[{'image': str(c['image']), 'label': str(c['label'])} for c in @split[1]][:@num_val_cases]",
        "train": {
            "preprocessing": {"_target_": "Compose",
                              "transforms": _deterministic(data, ["image", "label"]) + _augmentation(data)},
            "dataset": {"_target_": "CacheDataset", "data": "@train_datalist", "transform": "@train#preprocessing",
                        "cache_rate": 1.0, "num_workers": 0, "progress": False},
            "dataloader": {"_target_": "DataLoader", "dataset": "@train#dataset", "batch_size": "@batch_size",
                           "shuffle": True, "num_workers": "@num_workers"},
            "inferer": {"_target_": "SimpleInferer"},
            "handlers": [
                {"_target_": "LrScheduleHandler", "lr_scheduler": "@lr_scheduler", "print_lr": True},
                {"_target_": "ValidationHandler", "validator": "@validate#evaluator", "epoch_level": True,
                 "interval": "@val_interval"},
                {"_target_": "StatsHandler", "tag_name": "train_loss",
                 "output_transform": "$lambda output: output['loss'].item()"},
                {"_target_": "visionattn.tasks.monai_bundle.SafetensorsSaver", "save_dir": "@ckpt_dir",
                 "network": "@network", "filename": "model_final.safetensors"},
            ],
            "trainer": {"_target_": "SupervisedTrainer", "max_epochs": "@epochs", "device": "@device",
                        "train_data_loader": "@train#dataloader", "network": "@network",
                        "optimizer": "@optimizer", "loss_function": "@loss", "inferer": "@train#inferer",
                        "decollate": False, "amp": False, "train_handlers": "@train#handlers"},
        },
        "validate": {
            "preprocessing": {"_target_": "Compose", "transforms": _deterministic(data, ["image", "label"])},
            "dataset": {"_target_": "CacheDataset", "data": "@val_datalist", "transform": "@validate#preprocessing",
                        "cache_rate": 1.0, "num_workers": 0, "progress": False},
            "dataloader": {"_target_": "DataLoader", "dataset": "@validate#dataset", "batch_size": 1,
                           "shuffle": False, "num_workers": "@num_workers"},
            "inferer": _window_inferer(data, inference),
            "postprocessing": {"_target_": "Compose", "transforms": [
                {"_target_": "AsDiscreted", "keys": ["pred", "label"], "argmax": [True, False], "to_onehot": n},
            ]},
            "key_metric": {"val_mean_dice": {"_target_": "MeanDice", "include_background": False,
                                             "output_transform": "$monai.handlers.from_engine(['pred', 'label'])"}},
            "handlers": [
                {"_target_": "StatsHandler", "iteration_log": False},
                {"_target_": "MetricsSaver", "save_dir": "@output_dir", "metrics": ["val_mean_dice"],
                 "delimiter": ","},
                {"_target_": "visionattn.tasks.monai_bundle.SafetensorsSaver", "save_dir": "@ckpt_dir",
                 "network": "@network", "filename": WEIGHTS_NAME, "best": True},
            ],
            "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device",
                          "val_data_loader": "@validate#dataloader", "network": "@network",
                          "inferer": "@validate#inferer", "postprocessing": "@validate#postprocessing",
                          "key_val_metric": "@validate#key_metric", "val_handlers": "@validate#handlers",
                          "amp": False},
        },
        "initialize": ["$monai.utils.set_determinism(seed=@seed)"],
        "run": ["$@train#trainer.run()"],
        "finalize": [],
    }


def metadata(config: dict, labels: list[str], name: str, n_params: int) -> dict:
    """``configs/metadata.json`` with the keys MONAI's bundle specification asks for."""
    import monai
    import numpy

    import visionattn

    def version(package: str) -> str:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as v

        try:
            return v(package)
        except PackageNotFoundError:
            return "unknown"

    data = config["data"]
    roi = [int(s) for s in data["roi_size"]]
    channels = {str(i): label for i, label in enumerate(labels)}
    model = config["model"]
    return {
        "schema": METADATA_SCHEMA,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by visionattn {visionattn.__version__} from the run {name}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {"visionattn": visionattn.__version__, "nibabel": version("nibabel"),
                                      "safetensors": version("safetensors"), "pytorch-ignite": version("pytorch-ignite"),
                                      "timm": version("timm")},
        "name": name,
        "task": f"3-D segmentation of {', '.join(labels[1:])} ({name})",
        "description": (f"visionattn's {model['name']} ({n_params:,} parameters) trained by the visionattn recipe in "
                        f"configs/recipe.yaml; preprocessing: orientation {data.get('orientation')}, spacing "
                        f"{data.get('spacing')} mm, intensity {data.get('intensity', 'zscore')}; sliding windows "
                        f"of {'x'.join(map(str, roi))}. Built with visionattn.create_model, weights in safetensors."),
        "authors": "visionattn",
        "copyright": "the visionattn authors",
        "data_source": str(data.get("root", "")),
        "data_type": "nibabel",
        "image_classes": f"{int(data.get('in_channels', 1))} channel(s), NIfTI volumes",
        "label_classes": ", ".join(f"{i} {label}" for i, label in enumerate(labels)),
        "pred_classes": f"{len(labels)} channels of logits, one per label: "
                        + ", ".join(f"{i} {label}" for i, label in enumerate(labels)),
        "intended_use": "A demonstration, not a clinical tool.",
        "references": [],
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "MR",
                                 "num_channels": int(data.get("in_channels", 1)), "spatial_shape": roi,
                                 "dtype": "float32", "value_range": [], "is_patch_data": True,
                                 "channel_def": {str(i): "image" for i in range(int(data.get("in_channels", 1)))}}},
            "outputs": {"pred": {"type": "image", "format": "labels", "modality": "n/a", "num_channels": len(labels),
                                 "spatial_shape": roi, "dtype": "float32", "value_range": [], "is_patch_data": True,
                                 "channel_def": channels}},
        },
    }


# what ConfigWorkflow reads from configs/logging.conf (logging.config.fileConfig): INFO lines to the console
LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=console

[formatters]
keys=plain

[logger_root]
level=INFO
handlers=console

[handler_console]
class=StreamHandler
level=INFO
formatter=plain
args=(sys.stdout,)

[formatter_plain]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def check_metadata(meta: dict) -> list[str]:
    """The mandatory keys (bundle specification) missing from ``meta`` and from each of its tensor formats."""
    missing = [k for k in REQUIRED_METADATA_KEYS if k not in meta]
    formats = meta.get("network_data_format") or {}
    for side in ("inputs", "outputs"):
        if not formats.get(side):
            missing.append(f"network_data_format.{side}")
        for tensor, spec in (formats.get(side) or {}).items():
            missing += [f"network_data_format.{side}.{tensor}.{k}" for k in REQUIRED_TENSOR_KEYS if k not in spec]
    return missing


def readme(name: str, config: dict, labels: list[str]) -> str:
    data = config["data"]
    return f"""# {name}: a MONAI bundle exported by visionattn

{metadata_line(config, labels)}

Written by `visionattn export {name} --format monai-bundle -o DIR`. The configs need `visionattn` (the network
is `visionattn.create_model`), MONAI and `pytorch-ignite` (MONAI's engines). Weights are
`models/{WEIGHTS_NAME}`, loaded by `visionattn.tasks.monai_bundle.load_weights` (safetensors only; nothing
is unpickled); `configs/recipe.yaml` is the visionattn recipe the configs were written from.

Segment every NIfTI volume of a folder (label maps `OUT/CASE_seg.nii.gz` on each input's own grid, the same
labels `visionattn segment` writes):

```bash
python -m monai.bundle run --config_file configs/inference.json --bundle_root . \\
    --dataset_dir /path/to/images --output_dir /path/to/out
```

Train (the recipe's loss, optimizer and augmentation; validation Dice with MONAI's `MeanDice` every
`val_interval` epochs; the best weights to `models/{WEIGHTS_NAME}`, the last to
`models/model_final.safetensors`, metrics to `eval/metrics.csv`) on an MSD folder with `dataset.json`:

```bash
python -m monai.bundle run --config_file configs/train.json --bundle_root . \\
    --dataset_dir /path/to/{Path(str(data.get('root', 'Task'))).name} --epochs 100
```

`--num_train_cases N` / `--num_val_cases N` take the first N cases of visionattn's fixed split (validation
fraction {data.get('val_fraction', 0.2)}, seed {data.get('split_seed', 0)}). The original run's schedule
was bounded by time (`train.max_minutes` in the recipe); here `epochs` bounds it.
"""


def metadata_line(config: dict, labels: list[str]) -> str:
    model = config["model"]
    return (f"Network `{model['name']}` ({', '.join(f'{k}={v}' for k, v in (model.get('kwargs') or {}).items())}); "
            f"labels {', '.join(f'{i} {label}' for i, label in enumerate(labels))}.")


# ---------------------------------------------------------------------------------------------------
# the command


def export_bundle(spec: str, output: str, *, overwrite: bool = False, atol: float = 1e-4, rtol: float = 1e-4) -> int:
    """Write the MONAI bundle of the trained run ``spec`` (folder, weights file or bundled name) into the
    folder ``output``; returns the exit code. The network the bundle's ``inference.json`` builds (with its
    weights) is checked against the run's own on one window before the folder is moved into place."""
    from monai.bundle import ConfigParser
    from visionattn.tasks.run import Run, bundled_runs
    from visionattn.tasks.runtime import atomic_save_weights

    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ExportError(f"-o {out}: a file; a MONAI bundle is a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    if not (Path(spec).exists() or spec in bundled_runs()):
        raise ExportError(f"monai-bundle: {spec!r} is not a trained run (a run folder, a weights file or a bundled "
                          f"name: {', '.join(bundled_runs()) or 'none'})")
    run = Run.load_for(spec, "segmentation", "a MONAI bundle is written for segmentation runs", ExportError)
    config = run.config
    data = config.get("data") or {}
    if int(data.get("spatial_dims", 3)) != 3:
        raise ExportError(f"{spec}: a 2-D run; the MONAI bundle reads 3-D NIfTI volumes")
    labels = run.classes
    name = spec if spec in bundled_runs() else run.folder.resolve().name
    reference = run.build_model({"classes": labels, "spatial_dims": 3})
    n_params = sum(p.numel() for p in reference.parameters())
    print(f"export: {spec} (trained run, weights {run.weights}) -> {out} (MONAI bundle)")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's folder is private; the bundle is an ordinary folder
    try:
        (staging / "configs").mkdir()
        (staging / "models").mkdir()
        (staging / "docs").mkdir()
        weights = staging / "models" / WEIGHTS_NAME
        if run.weights.suffix == ".safetensors":
            shutil.copyfile(run.weights, weights)
        else:  # a trainer checkpoint: its model entry, read without unpickling, rewritten as safetensors
            atomic_save_weights(reference, weights)
        files = {"metadata.json": metadata(config, labels, name, n_params),
                 "inference.json": inference_config(config, labels), "train.json": train_config(config, labels)}
        for filename, content in files.items():
            (staging / "configs" / filename).write_text(json.dumps(content, indent=2) + "\n")
        (staging / "configs" / "logging.conf").write_text(LOGGING_CONF)
        shutil.copyfile(run.folder / "config.yaml", staging / "configs" / "recipe.yaml")
        (staging / "docs" / "README.md").write_text(readme(name, config, labels))
        missing = check_metadata(files["metadata.json"])
        if missing:
            raise ExportError(f"monai-bundle: metadata.json lacks {missing}")

        # the network as the bundle builds it, against the run's own, on one window of the recipe's size
        parser = ConfigParser()
        parser.read_config(str(staging / "configs" / "inference.json"))
        parser["bundle_root"] = str(staging)
        parser["device"] = "$torch.device('cpu')"
        bundled = parser.get_parsed_content("network").eval()
        x = torch.randn(1, int(data.get("in_channels", 1)), *data["roi_size"], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want, got = first_output(reference(x)).float(), first_output(bundled(x)).float()
        diff = float((want - got).abs().max())
        if diff > atol + rtol * float(want.abs().max()):
            print(f"export: the bundle's network differs from the run's (max abs difference {diff:.2e}); "
                  f"nothing written to {out}", file=sys.stderr)
            return 1
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    print(f"export: wrote {out}: configs/metadata.json, inference.json, train.json, logging.conf, recipe.yaml, "
          f"models/{WEIGHTS_NAME} ({weights_size(out):.1f} MiB), docs/README.md; the bundle's network matches the "
          f"run's (max abs difference {diff:.1e})")
    print(f"run it: python -m monai.bundle run --config_file {out}/configs/inference.json --bundle_root {out} "
          f"--dataset_dir IMAGES --output_dir OUT")
    return 0


def weights_size(bundle: Path) -> float:
    return (bundle / "models" / WEIGHTS_NAME).stat().st_size / 2**20
