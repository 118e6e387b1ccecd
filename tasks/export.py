"""``visionattn export``: a segmentation network as ONNX, TorchScript or a ``torch.export`` program, with
dynamic batch and spatial sizes, checked against PyTorch before it is kept.

What is exported: a registered segmentation model by name (random weights: a warning says so; ``--kwarg
key=value`` passes constructor arguments) or a trained run (a run folder, its weights file or a bundled
name, loaded with :meth:`visionattn.tasks.run.Run.load` and :meth:`~visionattn.tasks.run.Run.build_model`),
always in eval mode, on the CPU, in float32. The artefact takes ``image [B, in_channels, *S]`` and returns
``logits [B, out_channels, *S]``; ``B`` and every side of ``S`` are dynamic. The networks pad odd sizes
inside with shape arithmetic only (no branch on a size), so the graphs hold for sizes other than the
example's.

Formats:

- ``onnx``: ``torch.onnx.export`` with dynamic axes. ``--onnx-exporter torchscript`` (the default: fast, no
  further dependency) uses torch's TorchScript-based exporter, ``dynamo`` the ``torch.export``-based one
  (needs ``onnxscript``). Checked in onnxruntime.
- ``torchscript``: ``torch.jit.script`` (what MONAI's ``ckpt_export`` does), saved with ``torch.jit.save``.
- ``exported-program``: ``torch.export.export`` with ``Dim.DYNAMIC`` batch and sides, saved with
  ``torch.export.save`` (``.pt2``). ``torch.export`` specialises dimensions of size 1, so such a program
  needs every side larger than the network's ``size_divisible`` (its deepest feature map larger than one
  voxel); the example and the check sizes respect that.

- ``monai-bundle``: a trained 3-D run as a MONAI bundle folder (configs/metadata.json, inference.json,
  train.json, models/model.safetensors, docs/README.md) that ``python -m monai.bundle run`` infers and trains
  with; see :mod:`visionattn.tasks.monai_bundle` (``-o`` is then a folder).

Before the file is kept, the artefact is loaded back from its temporary file and run at several sizes
(``--sizes``; default: the run's ``roi_size`` or twice the network's ``size_divisible``, then two odd sizes,
the first with a batch of 2), each compared with the PyTorch network: the largest absolute difference is
printed per size and must stay within ``atol + rtol * max|logits|``. On a mismatch nothing is written and
the exit code is 1. The file is written under a temporary name and renamed into place; an existing file is
replaced only with ``--overwrite``.
"""
from __future__ import annotations

import contextlib
import io
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from visionattn.tasks.errors import ExportError
from visionattn.tasks.files import atomic_path

FORMATS = ("onnx", "torchscript", "exported-program")
ONNX_EXPORTERS = ("torchscript", "dynamo")
ONNX_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "image", "logits"
_AXIS_NAMES = {1: ("x",), 2: ("height", "width"), 3: ("x", "y", "z")}


@dataclass
class ExportNetwork:
    """The network to export and what the checks need to know about it."""

    module: torch.nn.Module
    spatial_dims: int
    in_channels: int
    base_size: list[int]
    size_divisible: int
    source: str
    trained: bool


# ---------------------------------------------------------------------------------------------------
# what to export


def parse_kwargs(items: Sequence[str] | None) -> dict:
    """``['filters=[8,16,32]', 'out_channels=3']`` -> keyword arguments, values read as YAML scalars/lists."""
    import yaml

    kwargs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ExportError(f"--kwarg {item!r}: expected KEY=VALUE, e.g. out_channels=3")
        try:
            kwargs[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ExportError(f"--kwarg {item!r}: the value is not valid YAML ({e})") from None
    return kwargs


def load_network(spec: str, kwargs: dict | None = None) -> ExportNetwork:
    """A trained run (folder, weights file or bundled name) or a registered segmentation model's name."""
    import visionattn
    from visionattn.tasks.run import Run, bundled_runs

    if Path(spec).exists() or spec in bundled_runs():
        if kwargs:
            raise ExportError("--kwarg applies to a model built by name; a trained run is built from its config.yaml")
        run = Run.load_for(spec, "segmentation", "`export` handles segmentation networks", ExportError)
        data = run.config.get("data") or {}
        dims = int(data.get("spatial_dims", 3))
        module = run.build_model({"classes": run.classes, "spatial_dims": dims})
        divisible = int(getattr(module, "size_divisible", 1))
        base = [int(s) for s in data.get("roi_size") or [2 * max(divisible, 8)] * dims]
        return ExportNetwork(module.eval(), dims, int(data.get("in_channels", 1)), base, divisible,
                             f"{spec} (trained run, weights {run.weights})", True)
    if spec not in visionattn.list_models():
        raise ExportError(f"{spec!r} is neither a run folder, a weights file, a bundled run "
                          f"({', '.join(bundled_runs()) or 'none'}) nor a registered model (`visionattn list "
                          f"--task segmentation`)")
    entry = visionattn.get_entry(spec)
    if entry.task != "segmentation":
        raise ExportError(f"{spec} is a {entry.task} model; `export` handles segmentation networks "
                          f"({', '.join(visionattn.list_models(task='segmentation'))})")
    module = visionattn.create_model(spec, **(kwargs or {})).eval()
    dims = int(getattr(module, "spatial_dims", len(entry.default_input_size) - 1))
    divisible = int(getattr(module, "size_divisible", 16))
    in_channels = int(getattr(module, "in_channels", entry.default_input_size[0]))
    return ExportNetwork(module, dims, in_channels, [2 * divisible] * dims, divisible,
                         f"{spec} (registered architecture, random weights)", False)


def parse_size(text: str, spatial_dims: int) -> list[int]:
    """``'40x56x40'`` -> ``[40, 56, 40]`` (one side per spatial axis, each >= 1)."""
    try:
        size = [int(t) for t in text.lower().split("x")]
    except ValueError:
        size = []
    if len(size) != spatial_dims or any(s < 1 for s in size):
        raise ExportError(f"--sizes {text!r}: expected {spatial_dims} positive sides joined by 'x', e.g. "
                          f"{'x'.join(['48'] * spatial_dims)}")
    return size


def default_sizes(base: Sequence[int]) -> list[list[int]]:
    """The example size ``base`` and two odd sizes above it (no side a multiple of 2)."""
    odd = [b + 1 + 2 * i for i, b in enumerate(base)]
    larger = [(b + b // 2 + 2 * i) | 1 for i, b in enumerate(base)]
    return [list(base), odd, larger]


# ---------------------------------------------------------------------------------------------------
# exporting


def _dynamic_shapes(spatial_dims: int) -> tuple:
    from torch.export import Dim

    return ({0: Dim.DYNAMIC, **{2 + i: Dim.DYNAMIC for i in range(spatial_dims)}},)


@contextlib.contextmanager
def _quiet():
    """Exporters warn about tracing and deprecations and the dynamo exporter prints its progress: keep the
    command's output to what it reports itself."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def export_onnx(module: torch.nn.Module, path: str | Path, example: torch.Tensor, exporter: str = "torchscript",
                opset: int = ONNX_OPSET) -> None:
    """``module`` as an ONNX file with input ``image`` and output ``logits``, batch and sides dynamic."""
    if exporter not in ONNX_EXPORTERS:
        raise ExportError(f"ONNX exporter must be one of {list(ONNX_EXPORTERS)}, got {exporter!r}")
    spatial_dims = example.ndim - 2
    axes = {0: "batch", **{2 + i: name for i, name in enumerate(_AXIS_NAMES[spatial_dims])}}
    with torch.no_grad(), _quiet():
        if exporter == "torchscript":
            torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
                              opset_version=opset)
        else:
            try:
                import onnxscript  # noqa: F401
            except ImportError:
                raise ExportError("--onnx-exporter dynamo needs onnxscript (`pip install onnxscript`); "
                                  "`--onnx-exporter torchscript` needs nothing more") from None
            program = torch.onnx.export(module, (example,), dynamo=True, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], dynamic_shapes=_dynamic_shapes(spatial_dims),
                                        opset_version=opset)
            program.save(str(path))


def export_torchscript(module: torch.nn.Module, path: str | Path) -> None:
    with _quiet():
        torch.jit.save(torch.jit.script(module), str(path))


def export_program(module: torch.nn.Module, path: str | Path, example: torch.Tensor) -> None:
    with torch.no_grad(), _quiet():
        program = torch.export.export(module, (example,), dynamic_shapes=_dynamic_shapes(example.ndim - 2))
        torch.export.save(program, str(path))


# ---------------------------------------------------------------------------------------------------
# running what was exported


class OnnxNetwork:
    """An ONNX segmentation network run by onnxruntime, called like the PyTorch one: ``net(x)`` with
    ``x [B, C, *S]`` (a tensor on any device) returns float32 logits on ``x``'s device."""

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ExportError(f"device {device}: this onnxruntime has no CUDAExecutionProvider "
                                  f"(install onnxruntime-gpu, or use --device cpu)")
            providers = ["CUDAExecutionProvider"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.log_severity_level = 3
        self.path = Path(path)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for unreadable models
            raise ExportError(f"{path}: onnxruntime cannot load it ({type(e).__name__}: {e})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise ExportError(f"{path}: expected one input and one output, got {len(inputs)} and {len(outputs)}")
        self.input_name, self.input_shape = inputs[0].name, list(inputs[0].shape)
        channels = self.input_shape[1] if len(self.input_shape) > 1 else None
        self.in_channels = channels if isinstance(channels, int) else None
        self.spatial_dims = len(self.input_shape) - 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().to("cpu", torch.float32).contiguous().numpy()})[0]
        return torch.from_numpy(np.ascontiguousarray(out)).to(x.device)

    def eval(self) -> "OnnxNetwork":
        return self


def load_exported(path: str | Path, fmt: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The artefact at ``path`` as a callable ``x -> logits``."""
    if fmt == "onnx":
        return OnnxNetwork(path)
    with _quiet():
        module = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()
    return module


# ---------------------------------------------------------------------------------------------------
# checking


def compare(run: Callable[[torch.Tensor], torch.Tensor], module: torch.nn.Module, sizes: Sequence[Sequence[int]],
            in_channels: int, atol: float = 1e-4, rtol: float = 1e-4, seed: int = 0,
            report: Callable[[str], None] | None = print, label: str = "exported") -> list[dict]:
    """Run ``run`` and ``module`` on the same random inputs, one per size (the first with a batch of 2); one
    row per size: ``{size, batch, max_abs_diff, tolerance, ok, error}``."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i, size in enumerate(sizes):
        batch = 2 if i == 0 else 1
        x = torch.randn(batch, in_channels, *size, generator=generator)
        shape = "x".join(map(str, (batch, in_channels, *size)))
        row = {"size": list(size), "batch": batch, "max_abs_diff": None, "tolerance": None, "ok": False, "error": None}
        with torch.no_grad():
            try:
                want = module(x).float()
            except Exception as e:  # the network itself fails at this size: nothing to compare with
                row["error"] = f"PyTorch: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            else:
                try:
                    got = run(x).float()
                except Exception as e:
                    row["error"] = f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                else:
                    row["tolerance"] = atol + rtol * float(want.abs().max())
                    if got.shape != want.shape:
                        row["error"] = f"{label} output {list(got.shape)} != PyTorch output {list(want.shape)}"
                    else:
                        row["max_abs_diff"] = float((got - want).abs().max())
                        row["ok"] = bool(row["max_abs_diff"] <= row["tolerance"])
        rows.append(row)
        if report is not None:
            if row["error"]:
                report(f"  {shape:>22s}  FAILED: {row['error']}")
            else:
                report(f"  {shape:>22s}  max |{label} - PyTorch| = {row['max_abs_diff']:.2e} "
                       f"(tolerance {row['tolerance']:.1e})  {'ok' if row['ok'] else 'MISMATCH'}")
    return rows


# ---------------------------------------------------------------------------------------------------
# the command


def run_export(spec: str, fmt: str, output: str, *, overwrite: bool = False, sizes: Sequence[str] | None = None,
               onnx_exporter: str = "torchscript", kwargs: Sequence[str] | None = None, atol: float = 1e-4,
               rtol: float = 1e-4) -> int:
    """The ``export`` command; returns the exit code (0 written and verified, 1 verification failed: nothing
    written). Problems with the arguments raise :class:`ExportError` (exit 2)."""
    if fmt == "monai-bundle":  # a folder of MONAI configs and weights (visionattn.tasks.monai_bundle)
        from visionattn.tasks.monai_bundle import export_bundle

        if sizes or kwargs:
            raise ExportError("--format monai-bundle exports a trained run; --sizes and --kwarg do not apply")
        return export_bundle(spec, output, overwrite=overwrite, atol=atol, rtol=rtol)
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {list(FORMATS) + ['monai-bundle']}, got {fmt!r}")
    out = Path(output)
    if out.is_dir():
        raise ExportError(f"-o {out}: a folder; give the file to write, e.g. {out / 'model.onnx'}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    net = load_network(spec, parse_kwargs(kwargs))
    if not net.trained:
        print(f"visionattn export: warning: {spec} is exported with random weights (a registered architecture, "
              f"not a trained run); pass a run folder for trained weights", file=sys.stderr)
    check_sizes = [parse_size(s, net.spatial_dims) for s in sizes] if sizes else default_sizes(net.base_size)
    example = torch.randn(2, net.in_channels, *check_sizes[0], generator=torch.Generator().manual_seed(1))
    how = f"{fmt}, {onnx_exporter} exporter, opset {ONNX_OPSET}" if fmt == "onnx" else fmt
    print(f"export: {net.source} -> {out} ({how}); batch and {net.spatial_dims} spatial sides dynamic")
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = {"onnx": ".onnx", "torchscript": ".pt", "exported-program": ".pt2"}[fmt]
    try:
        with atomic_path(out, suffix) as tmp:  # renamed onto `out` only when the block ends without an error
            if fmt == "onnx":
                export_onnx(net.module, tmp, example, onnx_exporter)
            elif fmt == "torchscript":
                export_torchscript(net.module, tmp)
            else:
                export_program(net.module, tmp, example)
            print(f"checking the exported file against PyTorch at {len(check_sizes)} sizes:")
            rows = compare(load_exported(tmp, fmt), net.module, check_sizes, net.in_channels, atol, rtol, label=fmt)
            bad = [r for r in rows if not r["ok"]]
            if bad:
                raise _Mismatch(f"export: the exported {fmt} differs from PyTorch at {len(bad)} of {len(rows)} "
                                f"sizes; nothing written to {out}")
            if out.exists() and not overwrite:  # it appeared while exporting: still never replaced silently
                raise FileExistsError(f"{out} appeared while exporting; pass --overwrite to replace it")
    except _Mismatch as e:
        print(e, file=sys.stderr)
        return 1
    print(f"export: wrote {out} ({out.stat().st_size / 2**20:.1f} MiB), verified at {len(rows)} sizes")
    return 0


class _Mismatch(Exception):
    """The exported artefact failed its check (the temporary file is then removed)."""
