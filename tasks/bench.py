"""Benchmarks behind ``visionattn bench ...``: each prints a table of ratios against alternatives
measured in the same run, so figures are comparable whatever the machine is doing."""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F


def time_fn(fn: Callable[[], object], warmup: int = 2, min_time: float = 2.0, max_iters: int = 200) -> list[float]:
    """Seconds per call of ``fn``: ``warmup`` untimed calls, then calls until ``min_time`` has passed."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while (time.perf_counter() - start < min_time or len(times) < 3) and len(times) < max_iters:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def interleaved_times(fns: dict[str, Callable[[], object]], rounds: int = 5, min_time: float = 1.0) -> dict[str, float]:
    """Median seconds per call for each function, measured in alternating rounds so that a change in the
    machine's load hits all of them alike."""
    for fn in fns.values():
        fn()  # warm-up (allocations, lazily built caches)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].extend(time_fn(fn, warmup=0, min_time=min_time / rounds))
    return {k: statistics.median(v) for k, v in samples.items()}


def _cell(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    """A plain-text table with right-aligned numeric columns."""
    cells = [[str(h) for h in headers]] + [[_cell(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class PeakTensorMemory:
    """Peak bytes of tensors created while active and still alive (activations, saved-for-backward tensors,
    gradients), counted per storage through a ``TorchDispatchMode``. Deterministic, unlike RSS: the
    allocator's caching does not enter. Tensors made before entering (weights, inputs) are not counted."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        tracker._track(t)
                return out

        self._mode = _Mode()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list[int]] = {}  # storage pointer -> [bytes, tensors alive]

    def _track(self, t: torch.Tensor) -> None:
        import weakref

        ptr = t.untyped_storage().data_ptr()
        if ptr == 0:
            return
        entry = self._refs.get(ptr)
        if entry is None:
            entry = self._refs[ptr] = [t.untyped_storage().nbytes(), 0]
            self.live += entry[0]
            self.peak = max(self.peak, self.live)
        entry[1] += 1
        weakref.finalize(t, self._release, ptr)

    def _release(self, ptr: int) -> None:
        entry = self._refs.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._refs[ptr]

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def peak_memory_mib(model: torch.nn.Module, x: torch.Tensor, train: bool) -> float:
    """Peak MiB of tensors alive during one forward (inference mode) or forward + backward."""
    model.train(train)
    import gc

    gc.collect()
    with PeakTensorMemory() as mem:
        if train:
            model(x).sum().backward()
        else:
            with torch.inference_mode():
                model(x)
    model.zero_grad(set_to_none=True)
    return mem.peak / 2**20


def bench_models(
    names: list[str],
    compare: str | None = None,
    batch_size: int = 8,
    img_size: int | None = None,
    threads: int | None = None,
    min_time: float = 5.0,
    report: Callable[[str], None] | None = None,
    breakdown: bool = False,
) -> tuple[str, list[dict]]:
    """Inference throughput (images/s, eval, ``torch.inference_mode``) of visionattn models, optionally
    beside timm's model of the same name with the same weights (the max abs logit difference is shown).
    ``breakdown`` (with ``compare='peer'``): also where each model's inference time goes by kind of operator
    (:func:`op_breakdown`), printed as a second table and kept in each row under ``breakdown``.

    ``report`` (e.g. ``print``) receives one line per model as soon as it is measured.
    Returns the printed table and the rows as dicts.
    """
    import timm

    import visionattn

    if threads:
        torch.set_num_threads(threads)
    if breakdown and compare != "peer":
        raise ValueError("--breakdown sets each model beside its peer: add --compare peer")
    results = []
    for name in names:
        entry = visionattn.get_entry(name)
        if entry.task == "segmentation":  # fully convolutional: the size is the input's, not a constructor's
            if compare != "peer":
                raise ValueError(f"{entry.name} is a segmentation network: compare it with --compare peer "
                                 f"(MONAI's nearest network)")
            spatial = entry.default_input_size[1:]
            size = tuple(spatial) if img_size is None else (img_size,) * len(spatial)
            x = torch.randn(batch_size, entry.default_input_size[0], *size)
            _bench_segmentation_against_peer(entry, x, min_time, results, report, breakdown)
            continue
        kwargs = {} if img_size is None else {"img_size": img_size}
        ours = visionattn.create_model(entry.name, **kwargs).eval()
        size = tuple(getattr(ours, "img_size", None) or ((img_size, img_size) if img_size else entry.default_input_size[1:]))
        x = torch.randn(batch_size, entry.default_input_size[0], *size)
        fns = {"visionattn": lambda m=ours: m(x)}
        theirs = None
        if compare == "gather":
            if not any(hasattr(m, "kv_chunk") for m in ours.modules()):
                raise ValueError(f"{entry.name} has no routed attention to compare with a full gather")
            theirs = visionattn.create_model(entry.name, kv_chunk=0, **kwargs).eval()
            theirs.load_state_dict(ours.state_dict())
            fns["gather"] = lambda m=theirs: m(x)
        if compare == "peer":
            _bench_against_peer(entry, ours, x, size, batch_size, min_time, results, report, breakdown)
            continue
        if compare == "timm":
            if not timm.is_model(entry.name):
                raise ValueError(f"timm has no model named {entry.name!r} to compare with")
            theirs = timm.create_model(entry.name, **kwargs).eval()
            theirs.load_state_dict(ours.state_dict())
            fns["timm"] = lambda m=theirs: m(x)
        with torch.inference_mode():
            secs = interleaved_times(fns, min_time=min_time)
            diff = (ours(x) - theirs(x)).abs().max().item() if theirs is not None else None
        row = {
            "model": entry.name,
            "batch": batch_size,
            "input": "x".join(map(str, size)),
            "threads": torch.get_num_threads(),
            "ours_img_s": batch_size / secs["visionattn"],
        }
        if theirs is not None:
            other = "timm" if compare == "timm" else "gather"
            row[f"{other}_img_s"] = batch_size / secs[other]
            row["speedup"] = secs[other] / secs["visionattn"]
            row["max_abs_diff"] = diff
        if compare == "gather":
            for train in (False, True):
                tag = "train" if train else "infer"
                row[f"{tag}_peak_mib"] = peak_memory_mib(ours, x, train)
                row[f"gather_{tag}_peak_mib"] = peak_memory_mib(theirs, x, train)
            ours.eval(), theirs.eval()
        results.append(row)
        _report_row(report, row)
    headers = [h for h in (results[0].keys() if results else []) if h not in ("breakdown", "per_gmac_bounds")]
    table = format_table(headers, [[r.get(h, "") for h in headers] for r in results])
    parts = [r["breakdown"] for r in results if "breakdown" in r]
    if parts:
        rows = [row for part in parts for row in part]
        table += ("\n\nWhere inference time goes (profiled self time per category, multiply-adds per image; GFLOP/s = "
                  "2 x GMACs x batch / that time):\n"
                  + format_table(list(rows[0]), [list(r.values()) for r in rows]))
        bounds = [format_bounds(r) for r in results if "per_gmac_bounds" in r]
        if bounds:
            table += "\n\nWhat the profile leaves room for (peer's time per multiply-add / ours):\n" + "\n".join(bounds)
    return table, results


# timm models that a visionattn model is measured against with ``--compare peer`` (random weights on both
# sides: throughput only), the nearest design in timm at a similar size: Gated-SwinRMT (shifted windows) beside
# Swin; BiFormer (hierarchical, sparse attention) beside PVTv2-B1 / Swin; NiNformer and Activator (isotropic
# patch-16 models that gate instead of attending) beside MLP-Mixer; ConViT beside timm's own ConViT. Every
# classifier with a 224x224 default has one (a test checks); the CIFAR-sized ones have none.
PEERS = {
    "gated_swinrmt_swat_tiny": "swin_tiny_patch4_window7_224",
    "gated_swinrmt_retention_tiny": "swin_tiny_patch4_window7_224",
    "gated_swinrmt_swat_small": "swin_small_patch4_window7_224",
    "gated_swinrmt_retention_small": "swin_small_patch4_window7_224",
    "gated_swinrmt_swat": "swin_base_patch4_window7_224",
    "gated_swinrmt_retention": "swin_base_patch4_window7_224",
    "biformer_tiny": "pvt_v2_b1",
    "biformer_small": "swin_tiny_patch4_window7_224",
    "biformer_stl": "swin_tiny_patch4_window7_224",
    "biformer_base": "swin_small_patch4_window7_224",
    "ninformer_s16_224": "mixer_s16_224",
    "ninformer_b16_224": "mixer_b16_224",
    "activator_s16_224": "mixer_s16_224",
    "convit_tiny": "convit_tiny",
    "convit_tiny_plus": "convit_tiny",
    "convit_small": "convit_small",
    "convit_small_plus": "convit_small",
    "convit_base": "convit_base",
    "convit_base_plus": "convit_base",
}


def _train_step(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> None:
    """One training step without the optimizer: forward in train mode, cross-entropy, backward."""
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), labels).backward()


def _bench_against_peer(entry, ours, x, size, batch_size, min_time, results, report, breakdown=False) -> None:
    """``--compare peer``: images/s of ``ours`` and of its timm peer (:data:`PEERS`) in inference and in a
    training step (forward + cross-entropy + backward), interleaved, and the same per GMAC (images/s times the
    forward GMACs of one image, counted by ``torch.utils.flop_counter``): a per-GMAC ratio of 1 means both
    models turn multiply-adds into images equally fast."""
    import timm

    from visionattn.registry import count_flops

    if entry.name not in PEERS:
        raise ValueError(f"{entry.name} has no timm peer; --compare peer knows {', '.join(sorted(PEERS))}")
    peer_name = PEERS[entry.name]
    peer = timm.create_model(peer_name, img_size=size, num_classes=getattr(ours, "num_classes", 1000))
    input_size = (x.shape[1], *size)
    ours_gmacs = count_flops(ours, input_size) / 2e9
    peer_gmacs = count_flops(peer, input_size) / 2e9
    row = {"model": entry.name, "peer": peer_name, "batch": batch_size, "input": "x".join(map(str, size)),
           "threads": torch.get_num_threads(), "gmacs": ours_gmacs, "peer_gmacs": peer_gmacs}
    labels = torch.randint(0, max(getattr(ours, "num_classes", 1), 1), (x.shape[0],))
    _time_beside_peer(row, ours, peer, x, lambda m: _train_step(m, x, labels), min_time)
    if breakdown:
        ours_ops, peer_ops = op_breakdown(ours, x, min_time), op_breakdown(peer, x, min_time)
        row["breakdown"] = breakdown_rows(entry.name, ours_ops, peer_ops, peer_name, batch_size)
        row["per_gmac_bounds"] = per_gmac_bounds(ours_ops, peer_ops)
    results.append(row)
    _report_row(report, row)


def _report_row(report, row: dict) -> None:
    """The line printed as a model is measured: its row's cells, without the breakdown list (its own table)."""
    if report is not None:
        report(f"{row['model']}: " + "  ".join(f"{k} {_cell(v)}" for k, v in row.items()
                                               if k not in ("model", "breakdown", "per_gmac_bounds")))


def _time_beside_peer(row: dict, ours, peer, x, train_step, min_time: float) -> None:
    """Into ``row``: images/s of ``ours`` and ``peer`` on ``x`` in inference and in ``train_step(model)``,
    interleaved, each ratio (peer's time / ours), the same per GMAC (``row['gmacs']``, ``row['peer_gmacs']``)
    and the achieved forward GFLOP/s (2 FLOPs per multiply-add)."""
    batch, ours_gmacs, peer_gmacs = x.shape[0], row["gmacs"], row["peer_gmacs"]
    ours.eval(), peer.eval()
    with torch.inference_mode():
        secs = interleaved_times({"ours": lambda: ours(x), "peer": lambda: peer(x)}, min_time=min_time)
    ours.train(), peer.train()
    train_secs = interleaved_times({"ours": lambda: train_step(ours), "peer": lambda: train_step(peer)},
                                   min_time=min_time)
    ours.eval(), peer.eval()
    for tag, t in (("infer", secs), ("train", train_secs)):
        row[f"{tag}_img_s"] = batch / t["ours"]
        row[f"{tag}_peer_img_s"] = batch / t["peer"]
        row[f"{tag}_ratio"] = t["peer"] / t["ours"]
        row[f"{tag}_per_gmac_ratio"] = row[f"{tag}_ratio"] * ours_gmacs / peer_gmacs
    row["infer_gflop_s"] = 2 * row["infer_img_s"] * ours_gmacs
    row["infer_peer_gflop_s"] = 2 * row["infer_peer_img_s"] * peer_gmacs


# ``--breakdown``: where a model's inference time goes, by kind of operator. A profiled op's self time and a
# counted op's multiply-adds fall into one of these by the aten name (what matches none is "other": elementwise
# ops, normalisations, copies, reductions); every counted op that is neither a linear layer nor a convolution
# is an attention product (bmm, baddbmm, SDPA, and our kernels' registered counts), and so is the self time of
# our kernels' custom ops (``visionattn::...``: their compiled loops call no aten op).
BREAKDOWN_CATEGORIES = ("linear", "convolution", "attention products", "other")
_LINEAR_OPS = {"addmm", "mm", "linear", "matmul", "_addmm_activation"}
_ATTENTION_OPS = {"bmm", "baddbmm"}


def _op_category(name: str, counted: bool = False) -> str:
    """The :data:`BREAKDOWN_CATEGORIES` entry of an op named ``aten::addmm``, ``aten.addmm.default`` or
    ``addmm``; ``counted``: the op has a multiply-add count (so it is at least an attention product)."""
    parts = name.replace("::", ".").split(".")
    if parts[0] == "visionattn":
        return "attention products"
    op = parts[1] if len(parts) > 1 and parts[0] == "aten" else parts[0]
    if op in _LINEAR_OPS:
        return "linear"
    if "conv" in op:
        return "convolution"
    if counted or op in _ATTENTION_OPS or "scaled_dot_product" in op:
        return "attention products"
    return "other"


def op_breakdown(model: torch.nn.Module, x: torch.Tensor, min_time: float = 1.0) -> dict[str, dict[str, float]]:
    """Inference (eval, ``torch.inference_mode``) of ``model`` on ``x`` under ``torch.profiler``, repeated for
    at least ``min_time`` seconds (at least 3 times): per category, ``seconds`` (profiled self time per call,
    profiler overhead included, which falls mostly on the many small ops of "other") and ``gmacs`` (multiply-adds
    per call, ``torch.utils.flop_counter``)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    from visionattn.registry import _register_cpu_sdpa_flops

    _register_cpu_sdpa_flops()
    model.eval()
    out = {c: {"seconds": 0.0, "gmacs": 0.0} for c in BREAKDOWN_CATEGORIES}
    with torch.inference_mode():
        model(x)  # warm-up: first-call allocations and compilations are not what the breakdown is about
        with FlopCounterMode(display=False) as counter:
            model(x)
        for op, flops in counter.get_flop_counts()["Global"].items():
            out[_op_category(str(op), counted=True)]["gmacs"] += flops / 2e9
        calls, start = 0, time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            while calls < 3 or time.perf_counter() - start < min_time:
                model(x)
                calls += 1
    for event in prof.key_averages():
        out[_op_category(event.key)]["seconds"] += event.self_cpu_time_total / 1e6 / calls
    return out


def breakdown_rows(model_name: str, ours: dict, peer: dict, peer_name: str, batch: int) -> list[dict]:
    """One row per category: time share, GMACs per image and GFLOP/s of ``ours`` beside ``peer`` (both
    :func:`op_breakdown` results for a batch of ``batch``)."""
    rows = []
    totals = {side: sum(v["seconds"] for v in b.values()) for side, b in (("ours", ours), ("peer", peer))}
    for c in BREAKDOWN_CATEGORIES:
        row = {"model": model_name, "peer": peer_name, "category": c}
        for side, b in (("ours", ours), ("peer", peer)):
            secs, gmacs = b[c]["seconds"], b[c]["gmacs"]
            row[f"{side}_time_share"] = secs / totals[side] if totals[side] else 0.0
            row[f"{side}_gmacs"] = gmacs / batch
            row[f"{side}_gflop_s"] = 2 * gmacs / secs if secs and gmacs else None
        rows.append(row)
    return rows


def per_gmac_bounds(ours: dict, peer: dict) -> dict[str, float]:
    """How far the per-GMAC ratio against the peer (peer's time per multiply-add / ours) can go, from two
    :func:`op_breakdown` results: ``measured`` (the profiled totals; with the profiler's overhead, near the
    timed ratio), ``rest_free`` (as if every operator without multiply-adds, "other", took no time and the
    rest ran as measured) and ``all_at_linear_rate`` (as if, in addition, our convolutions and attention
    products ran at our linear layers' GFLOP/s). A per-GMAC target above ``rest_free`` needs faster
    multiply-adds, not fewer passes over memory."""
    def total(b, categories=BREAKDOWN_CATEGORIES, key="seconds"):
        return sum(b[c][key] for c in categories)

    ours_gmacs, peer_gmacs = total(ours, key="gmacs"), total(peer, key="gmacs")
    peer_rate = peer_gmacs / total(peer)  # multiply-adds per second, all the peer's time
    linear = ours["linear"]
    return {
        "measured": ours_gmacs / total(ours) / peer_rate,
        "rest_free": ours_gmacs / total(ours, ("linear", "convolution", "attention products")) / peer_rate,
        # a network without linear layers (the convolutional U-Nets) has no such rate
        "all_at_linear_rate": linear["gmacs"] / linear["seconds"] / peer_rate if linear["seconds"] and linear["gmacs"] else None,
    }


def format_bounds(row: dict) -> str:
    """The line under the breakdown table for one model's :func:`per_gmac_bounds`."""
    b = row["per_gmac_bounds"]
    text = (f"{row['model']}: per-GMAC ratio against {row['peer']} in the profile {b['measured']:.2f}; if every "
            f"operator without multiply-adds took no time {b['rest_free']:.2f}")
    if b["all_at_linear_rate"] is None:
        return text + " (it has no linear layers)"
    return text + f"; if, as well, every multiply-add ran at our linear layers' rate {b['all_at_linear_rate']:.2f}"


# MONAI networks that a visionattn segmentation network is measured against with ``--compare peer`` (timm
# has no segmentation networks): the attention-gated U-Nets beside MONAI's AttentionUnet with the same channels
# per level (the same design, written by the field's library); EMCAD and HER-Seg, light encoder-decoders,
# beside MONAI's FlexibleUNet (a U-Net decoder on an EfficientNet-B0 or ResNet-34 encoder, no pretrained
# weights) of about their size. Each name maps to the peer's label and its constructor
# ``(spatial_dims, in_channels, out_channels) -> module``.
def _monai_attention_unet(spatial_dims: int, in_channels: int, out_channels: int) -> torch.nn.Module:
    from monai.networks.nets import AttentionUnet

    return AttentionUnet(spatial_dims, in_channels, out_channels, channels=(16, 32, 128, 256, 256),
                         strides=(2, 2, 2, 2))


def _monai_flexible_unet(backbone: str) -> Callable[[int, int, int], torch.nn.Module]:
    def build(spatial_dims: int, in_channels: int, out_channels: int) -> torch.nn.Module:
        from monai.networks.nets import FlexibleUNet

        return FlexibleUNet(in_channels, out_channels, backbone, pretrained=False, spatial_dims=spatial_dims)
    return build


SEGMENTATION_PEERS: dict[str, tuple[str, Callable[[int, int, int], torch.nn.Module]]] = {
    **{f"{variant}_{d}d": ("monai.AttentionUnet(16,32,128,256,256)", _monai_attention_unet)
       for variant in ("agunet", "daunet", "dagunet") for d in (2, 3)},
    "emcad_pvt_v2_b0": ("monai.FlexibleUNet(efficientnet-b0)", _monai_flexible_unet("efficientnet-b0")),
    "emcad_pvt_v2_b2": ("monai.FlexibleUNet(resnet34)", _monai_flexible_unet("resnet34")),
    "herseg": ("monai.FlexibleUNet(efficientnet-b0)", _monai_flexible_unet("efficientnet-b0")),
}


def _segmentation_train_step(model: torch.nn.Module, x: torch.Tensor) -> None:
    """One training step without the optimizer: forward in train mode, per-voxel cross-entropy on every output
    (deep-supervision lists included), backward."""
    model.zero_grad(set_to_none=True)
    out = model(x)
    outs = out if isinstance(out, (list, tuple)) else [out]
    loss = sum(F.cross_entropy(o, torch.zeros((o.shape[0], *o.shape[2:]), dtype=torch.long)) for o in outs)
    loss.backward()


def _bench_segmentation_against_peer(entry, x, min_time, results, report, breakdown=False) -> None:
    """``--compare peer`` for a segmentation network: as :func:`_bench_against_peer`, beside its MONAI peer
    (:data:`SEGMENTATION_PEERS`), built with the same input and output channels; images (volumes) per second."""
    import visionattn
    from visionattn.registry import count_flops

    if entry.name not in SEGMENTATION_PEERS:
        raise ValueError(f"{entry.name} has no peer; --compare peer knows {', '.join(sorted(SEGMENTATION_PEERS))}")
    ours = visionattn.create_model(entry.name).eval()
    with torch.inference_mode():
        out_channels = ours(x[:1]).shape[1]
    peer_label, build = SEGMENTATION_PEERS[entry.name]
    peer = build(x.dim() - 2, x.shape[1], out_channels).eval()
    input_size = tuple(x.shape[1:])
    ours_gmacs, peer_gmacs = count_flops(ours, input_size) / 2e9, count_flops(peer, input_size) / 2e9
    batch = x.shape[0]
    row = {"model": entry.name, "peer": peer_label, "batch": batch, "input": "x".join(map(str, x.shape[2:])),
           "threads": torch.get_num_threads(), "params_m": sum(p.numel() for p in ours.parameters()) / 1e6,
           "peer_params_m": sum(p.numel() for p in peer.parameters()) / 1e6, "gmacs": ours_gmacs,
           "peer_gmacs": peer_gmacs}
    _time_beside_peer(row, ours, peer, x, lambda m: _segmentation_train_step(m, x), min_time)
    if breakdown:
        ours_ops, peer_ops = op_breakdown(ours, x, min_time), op_breakdown(peer, x, min_time)
        row["breakdown"] = breakdown_rows(entry.name, ours_ops, peer_ops, peer_label, batch)
        row["per_gmac_bounds"] = per_gmac_bounds(ours_ops, peer_ops)
    results.append(row)
    _report_row(report, row)


# ---------------------------------------------------------------------------------------------------
# neighborhood-attention kernels

KERNEL_PROBLEMS = {
    # name: (spatial, kernel_size); 4 heads, head_dim 32, batch 1
    "1d-4096-k31": ((4096,), 31),
    "2d-56-k7": ((56, 56), 7),
    "2d-56-k3": ((56, 56), 3),
    "2d-128-k13": ((128, 128), 13),
    "3d-32-k5": ((32, 32, 32), 5),
    "2d-16-k5": ((16, 16), 5),  # small: used by the tests
}
# the other kernels: linear attention (HER-Seg's) over N tokens, top-K attention (DFIR-DETR's mixture of the
# ratios 1/2, 2/3, 3/4, 4/5) over N tokens; 4 heads, head_dim 32, batch 1
OTHER_KERNEL_PROBLEMS = {
    "linear-4096": ("linear", 4096),
    "linear-16384": ("linear", 16384),
    "topk-400": ("topk", 400),
    "topk-1600": ("topk", 1600),
    "linear-256": ("linear", 256),  # small: used by the tests
    "topk-64": ("topk", 64),  # small: used by the tests
}
DEFAULT_KERNEL_PROBLEMS = ["1d-4096-k31", "2d-56-k7", "2d-56-k3", "2d-128-k13", "3d-32-k5"]
DENSE_MAX_TOKENS = 8192  # masked dense SDPA needs an N x N mask; beyond this it is skipped


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _axis_neighbors(L: int, K: int) -> torch.Tensor:
    """``[L, K]`` key indices of each query's window (non-causal, no dilation/stride: every window has K)."""
    from visionattn.kernels.semantics import axis_window_table

    start, _ = axis_window_table(L, K, 1, 1, False)
    return start[:, None] + torch.arange(K)[None, :]


def naive_gather_na(q, k, v, kernel_size: int) -> torch.Tensor:
    """The straightforward implementation: gather each query's window of keys and values, multiply, sum.
    ``q, k, v [B, *spatial, h, D]``."""
    B, *spatial, h, D = q.shape
    n = len(spatial)
    idx = None
    for a, L in enumerate(spatial):
        nb = _axis_neighbors(L, kernel_size) * math.prod(spatial[a + 1:])
        shape = [1] * (2 * n)
        shape[a], shape[n + a] = L, kernel_size
        idx = nb.view(shape) if idx is None else idx + nb.view(shape)
    N = math.prod(spatial)
    idx = idx.reshape(N, -1).to(q.device)
    qf, kf, vf = (t.reshape(B, N, h, D) for t in (q, k, v))
    kg, vg = kf[:, idx], vf[:, idx]  # [B, N, K^n, h, D]
    logits = (qf[:, :, None] * kg).sum(-1) * D ** -0.5  # [B, N, K^n, h]
    p = logits.softmax(dim=2)
    return (p[..., None] * vg).sum(2).reshape(q.shape)


def _dense_mask(spatial, kernel_size, device):
    from visionattn.kernels.reference import dense_mask_and_bias_index

    n = len(spatial)
    mask, _ = dense_mask_and_bias_index(spatial, (kernel_size,) * n, (1,) * n, (1,) * n, (False,) * n, device)
    return mask


_FLEX_COMPILED = None


def _flex_fn():
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention

        # static shapes: a dynamic-shape recompile hits an inductor CPU codegen bug in this torch build
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED


FLEX_BLOCK = 128
# the tile of tokens one 128-query flex block covers in the tiled token order
FLEX_TILE = {1: (128,), 2: (8, 16), 3: (4, 4, 8)}


def flex_token_order(spatial, tiled: bool) -> torch.Tensor:
    """The token order flex_attention runs in, padded to a multiple of its 128-token block: ``order[i]`` is
    the token at position ``i`` (``N`` for padding). Row-major, or ``tiled``: the grid cut into tiles of
    ``FLEX_TILE`` (8 x 16 in 2-D, 4 x 4 x 8 in 3-D), tile after tile, so that a block of queries is a compact
    tile whose windows touch few key blocks; tiles overhanging the grid are padded."""
    n = len(spatial)
    N = math.prod(spatial)
    if not tiled or n == 1:
        padded = math.ceil(N / FLEX_BLOCK) * FLEX_BLOCK
        return torch.cat([torch.arange(N), torch.full((padded - N,), N)])
    tile = FLEX_TILE[n]
    counts = [math.ceil(L / t) for L, t in zip(spatial, tile)]
    # coordinates of every position, tile-major then within the tile, each axis row-major
    grids = torch.meshgrid(*[torch.arange(c) for c in counts], *[torch.arange(t) for t in tile], indexing="ij")
    coords = [(grids[a] * tile[a] + grids[n + a]).reshape(-1) for a in range(n)]
    inside = torch.stack([c < L for c, L in zip(coords, spatial)]).all(0)
    flat = sum(c * math.prod(spatial[a + 1:]) for a, c in enumerate(coords))
    return torch.where(inside, flat, N)


def _flex_block_mask(spatial, kernel_size, device, order: torch.Tensor):
    """Block mask for flex_attention over the tokens in ``order`` (see :func:`flex_token_order`; the padded
    length is a multiple of flex's block size: inductor's CPU flex template fails to compile for other
    lengths in this torch build); padded keys are masked out, padded queries see their nearest token's
    window."""
    from torch.nn.attention.flex_attention import create_block_mask

    from visionattn.kernels.semantics import axis_mask_and_offsets

    n = len(spatial)
    N = math.prod(spatial)
    masks = [axis_mask_and_offsets(L, kernel_size, 1, 1, False)[0].to(device) for L in spatial]
    strides = [math.prod(spatial[a + 1:]) for a in range(n)]
    token = order.to(device)
    real = token < N
    token = torch.clamp(token, max=N - 1)
    coords = [(token // strides[a]) % spatial[a] for a in range(n)]

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = real[kv_idx]
        for a in range(n):
            allowed = allowed & masks[a][coords[a][q_idx], coords[a][kv_idx]]
        return allowed

    padded = order.numel()
    return create_block_mask(mask_mod, None, None, padded, padded, device=device)


def matmul_gflops(device: str = "cpu", size: int = 1024) -> float:
    """The machine's fp32 matmul rate: the ceiling for any attention kernel."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)

    def run():
        torch.mm(a, b)
        _sync(device)

    secs = statistics.median(time_fn(run, warmup=2, min_time=1.0))
    return 2 * size**3 / secs / 1e9


def round_robin_times(fns: dict, min_time: float = 1.0, rounds: int = 5,
                      clock: Callable[[], float] = time.perf_counter) -> dict[object, list[float]]:
    """Seconds per call of every function, measured interleaved: in each of ``rounds`` rounds every function
    in turn runs for ``min_time / rounds`` seconds of ``clock`` (at least once), so that a change in the
    machine's load hits all of them alike. Returns every call's time, per function."""
    samples: dict = {name: [] for name in fns}
    budget = min_time / rounds
    for _ in range(rounds):
        for name, fn in fns.items():
            start = clock()
            while True:
                t0 = clock()
                fn()
                samples[name].append(clock() - t0)
                if t0 - start + samples[name][-1] >= budget:
                    break
    return samples


def _kernel_impls(pname, q, k, v, device, skip, ours_backends, heads, head_dim, note):
    """The implementations compared on a neighborhood-attention problem: ``name -> (fn(q, k, v), has CPU
    backward)``, ours first."""
    from visionattn.kernels import na1d, na2d, na3d

    spatial, K = KERNEL_PROBLEMS[pname]
    n = len(spatial)
    N = math.prod(spatial)
    fns = {1: na1d, 2: na2d, 3: na3d}
    impls: dict[str, tuple] = {}
    for be in ours_backends:
        impls[f"visionattn-{be}"] = (lambda q, k, v, be=be: fns[n](q, k, v, K, backend=be), True)
    if "naive" not in skip:
        impls["naive-gather"] = (lambda q, k, v: naive_gather_na(q, k, v, K), True)
    if "dense" not in skip:
        if N <= DENSE_MAX_TOKENS:
            mask = _dense_mask(spatial, K, device)

            def dense(q, k, v, mask=mask):
                t = [x.reshape(1, N, heads, head_dim).transpose(1, 2) for x in (q, k, v)]
                return F.scaled_dot_product_attention(*t, attn_mask=mask).transpose(1, 2).reshape(q.shape)

            impls["masked-dense-sdpa"] = (dense, True)
        else:
            note(f"{pname}: masked dense SDPA skipped (N^2 mask of {N * N / 2**30:.1f} Gi entries)")
    if "flex" not in skip:
        for tiled in ((False, True) if n > 1 else (False,)):
            order = flex_token_order(spatial, tiled).to(device)
            block_mask = _flex_block_mask(spatial, K, device, order)
            position = torch.empty(N, dtype=torch.long, device=device)  # where each token sits in the order
            real = order < N
            position[order[real]] = torch.nonzero(real).flatten()
            note(f"{pname}: flex_attention block mask ({'tiled' if tiled else 'row-major'} token order): "
                 f"{100 - block_mask.sparsity():.1f}% of the {FLEX_BLOCK}x{FLEX_BLOCK} blocks computed")

            def flex(q, k, v, bm=block_mask, order=order, position=position):
                # into flex's order (a zero row serves padding), attention, back to token order: all timed
                t = [torch.cat([x.reshape(N, heads, head_dim), x.new_zeros(1, heads, head_dim)])[order]
                     .transpose(0, 1)[None] for x in (q, k, v)]
                out = _flex_fn()(*t, block_mask=bm)[0].transpose(0, 1)
                return out[position].reshape(q.shape)

            impls["flex-attention-tiled" if tiled else "flex-attention-compiled"] = (flex, device == "cuda")
    return impls


def _other_impls(pname, device, heads, head_dim):
    """Linear or top-K attention problems: ``(inputs, {name: (fn(*inputs), has backward)})``, ours first."""
    from visionattn.decoders.herseg import linear_attention_plain
    from visionattn.kernels import linear_attention, topk_attention

    kind, N = OTHER_KERNEL_PROBLEMS[pname]
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (1, N, heads, head_dim)
    if kind == "linear":
        q, k = (F.elu(torch.randn(shape, generator=g)) + 1 for _ in range(2))
        v, q_rot, k_rot = (torch.randn(shape, generator=g) for _ in range(3))
        inputs = [t.to(device) for t in (q, k, v, q_rot, k_rot)]
        return inputs, {
            "visionattn-torch": (lambda *t: linear_attention(*t, backend="torch"), True),
            "one-contraction": (lambda *t: linear_attention_plain(*t), True),  # HER-Seg's einsums, autograd
            "chunked-1024": (lambda *t: linear_attention(*t, chunk_size=1024, backend="torch"), True),
        }
    q, k, v = (torch.randn(shape, generator=g).to(device) for _ in range(3))
    top_ks = [max(1, math.ceil(r * N)) for r in (1 / 2, 2 / 3, 3 / 4, 4 / 5)]
    mix = torch.softmax(torch.randn(1, len(top_ks), generator=g), -1).to(device)
    impls = {"visionattn-torch": (lambda *t: topk_attention(*t, top_ks, mix=mix, backend="torch"), True)}
    if N <= 4096:  # the oracle holds N x N scores
        impls["dense-masked-reference"] = (lambda *t: topk_attention(*t, top_ks, mix=mix, backend="reference"), True)
    return [q, k, v], impls


def bench_kernels(
    device: str = "cpu",
    problems: list[str] | None = None,
    skip: tuple[str, ...] = (),
    heads: int = 4,
    head_dim: int = 32,
    min_time: float = 1.0,
    threads: int | None = None,
    report: Callable[[str], None] | None = None,
    clock: str = "wall",
) -> tuple[str, list[dict]]:
    """Time visionattn's kernels against the alternatives: forward, backward and forward+backward, all
    measured interleaved (round-robin, best of the rounds) in the same run, together
    with the machine's fp32 matmul rate (a 1024^2 matmul, the ceiling), re-measured for every problem.

    Neighborhood attention (``KERNEL_PROBLEMS``) against ``naive`` (gather each query's window; backward
    through autograd), ``dense`` (masked dense SDPA over the N x N mask) and ``flex`` (``torch.compile``d
    flex_attention with a block mask, in row-major token order and in a tiled order where a 128-query block
    is a compact tile; the reordering is timed with it; no CPU backward). Linear attention
    (``linear-*``) against HER-Seg's one-contraction einsums and the 1024-token chunked form; top-K attention
    (``topk-*``) against the dense masked reference. Ratio columns are ``alternative time / visionattn
    time``: above 1 means we are faster. Our backward is timed alone (``autograd.grad`` on a graph kept
    across calls; rows say ``bwd_timing: alone``); an alternative's is its forward+backward minus its
    forward (``difference``: keeping its graph would hold gigabytes for the naive gather). Also checks that
    every alternative's output matches ours.
    ``report`` (e.g. ``print``) receives each line as soon as it is known: the machine's line, then one per
    implementation measured. ``clock``: ``'wall'`` (elapsed time), or ``'cpu'``, the CPU time of the calling
    thread (one thread only): on a machine shared with other jobs it leaves out the time the benchmark waits
    for a core, which otherwise weighs on long calls more than on short ones. Returns the printed text and
    the rows.
    """
    from visionattn.errors import InvalidInputError
    from visionattn.kernels import triton_available

    if threads:
        torch.set_num_threads(threads)
    if clock not in ("wall", "cpu"):
        raise InvalidInputError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    if clock == "cpu" and (device != "cpu" or torch.get_num_threads() != 1):
        raise InvalidInputError("clock='cpu' times the calling thread: it needs device cpu and one thread")
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("--device cuda asked for, but no CUDA device is available")
    ours_backends = ["torch"] if device == "cpu" else (["triton", "torch"] if triton_available() else ["torch"])
    problems = problems or DEFAULT_KERNEL_PROBLEMS
    for pname in problems:
        if pname not in KERNEL_PROBLEMS and pname not in OTHER_KERNEL_PROBLEMS:
            raise InvalidInputError(f"unknown problem {pname!r}; choose from "
                                    f"{', '.join([*KERNEL_PROBLEMS, *OTHER_KERNEL_PROBLEMS])}")
    from visionattn.tasks.runtime import memory_allocator

    # the allocator decides whether the alternatives' large temporaries page-fault in afresh on every call
    lines = [f"device {device}, {torch.get_num_threads()} threads, {memory_allocator()}; times are the best of "
             "interleaved rounds"
             + ("; CPU time of the calling thread" if clock == "cpu" else "")]
    rows: list[dict] = []

    def note(line: str) -> None:  # a line of the final text, reported now
        lines.append(line)
        if report is not None:
            report(line)

    if report is not None:
        report(lines[0])
    size = 1024
    ma, mb = torch.randn(size, size, device=device), torch.randn(size, size, device=device)

    def matmul():
        torch.mm(ma, mb)
        _sync(device)

    from torch._dynamo import config as dynamo_config

    with dynamo_config.patch(cache_size_limit=64):  # one compiled flex graph per problem and token order
        for pname in problems:
            g = torch.Generator(device="cpu").manual_seed(0)
            if pname in KERNEL_PROBLEMS:
                spatial, K = KERNEL_PROBLEMS[pname]
                N = math.prod(spatial)
                flops = 4 * heads * N * K ** len(spatial) * head_dim  # QK and AV products only, as NATTEN counts
                inputs = [torch.randn(1, *spatial, heads, head_dim, generator=g).to(device) for _ in range(3)]
                impls = _kernel_impls(pname, *inputs, device, skip, ours_backends, heads, head_dim, note)
                what = (f"spatial {'x'.join(map(str, spatial))}, kernel {K}, {heads} heads, head_dim {head_dim}, "
                        f"batch 1; {flops / 1e6:.1f} MFLOP useful")
            else:
                inputs, impls = _other_impls(pname, device, heads, head_dim)
                kind, N = OTHER_KERNEL_PROBLEMS[pname]
                flops = None
                what = f"{kind} attention, N {N}, {heads} heads, head_dim {head_dim}, batch 1"
            ours_name = next(iter(impls))
            ref, errors, fns = None, {}, {"matmul-1024": matmul}
            grad_inputs = [x.clone().requires_grad_() for x in inputs]
            for name, (fn, has_bwd) in impls.items():
                try:
                    with torch.no_grad():
                        out = fn(*inputs)  # also pays any compile cost outside the timing
                    if has_bwd:
                        y = fn(*grad_inputs)
                        torch.autograd.grad(y, grad_inputs, torch.ones_like(y))
                except Exception as e:  # an alternative that fails here (e.g. an inductor bug) is reported, not fatal
                    reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
                    note(f"{pname}: {name} failed: {type(e).__name__}: {reason}")
                    continue
                ref = out if ref is None else ref
                errors[name] = (out - ref).abs().max().item()
                dout = torch.randn(out.shape, generator=g).to(device)

                def fwd(fn=fn):
                    with torch.no_grad():
                        fn(*inputs)
                    _sync(device)

                fns[(name, "fwd")] = fwd
                if has_bwd:
                    def fwd_bwd(fn=fn, dout=dout):
                        torch.autograd.grad(fn(*grad_inputs), grad_inputs, dout)
                        _sync(device)

                    fns[(name, "fwd+bwd")] = fwd_bwd
                if has_bwd and name == ours_name:
                    # our backward alone, on a graph kept across calls: (fwd+bwd) - fwd, the difference of two
                    # best-of-rounds times, moved by 10-20% between runs; the alternatives' graphs (gigabytes for
                    # the naive gather) are not kept, their backward is that difference
                    kept = fn(*grad_inputs)

                    def bwd(kept=kept, dout=dout):
                        torch.autograd.grad(kept, grad_inputs, dout, retain_graph=True)
                        _sync(device)

                    fns[(name, "bwd")] = bwd
            samples = round_robin_times(fns, min_time=min_time,
                                        clock=time.thread_time if clock == "cpu" else time.perf_counter)
            best = {key: min(ts) for key, ts in samples.items()}
            ceiling = 2 * size**3 / best["matmul-1024"] / 1e9
            ours_fwd, ours_fb = best.get((ours_name, "fwd")), best.get((ours_name, "fwd+bwd"))
            ours_bwd = best.get((ours_name, "bwd")) or (ours_fb - ours_fwd if ours_fb and ours_fwd else None)
            table_rows = []
            for name in errors:
                t_fwd, t_fb = best[(name, "fwd")], best.get((name, "fwd+bwd"))
                t_bwd = best.get((name, "bwd")) or (t_fb - t_fwd if t_fb is not None else None)
                row = dict(
                    problem=pname, impl=name, fwd_ms=t_fwd * 1e3, bwd_ms=t_bwd * 1e3 if t_bwd is not None else None,
                    fwdbwd_ms=t_fb * 1e3 if t_fb is not None else None,
                    fwd_gflops=flops / t_fwd / 1e9 if flops else None,
                    fwd_ratio=t_fwd / ours_fwd,
                    bwd_ratio=t_bwd / ours_bwd if t_bwd and ours_bwd else None,
                    fwdbwd_ratio=t_fb / ours_fb if t_fb and ours_fb else None,
                    bwd_over_fwd=t_bwd / t_fwd if t_bwd is not None else None,
                    max_abs_diff=errors[name], matmul_ceiling_gflops=ceiling,
                    fwd_ceiling_fraction=flops / t_fwd / 1e9 / ceiling if flops else None,
                    rounds=len(samples[(name, "fwd")]),
                    bwd_timing="alone" if (name, "bwd") in best else "difference",
                )
                rows.append(row)
                if report is not None:
                    fwd_txt = f"fwd {row['fwd_ms']:.3g} ms ({row['fwd_ratio']:.2f}x)"
                    if t_fb is not None:
                        bwd_txt = (f"bwd {row['bwd_ms']:.3g} ms ({row['bwd_ratio']:.2f}x), "
                                   f"fwd+bwd {row['fwdbwd_ms']:.3g} ms ({row['fwdbwd_ratio']:.2f}x)")
                    else:
                        bwd_txt = "no backward"
                    report(f"{pname} {name}: {fwd_txt}, {bwd_txt}, max|diff| {row['max_abs_diff']:.1e}")
                table_rows.append([
                    name, row["fwd_ms"], f"{row['fwd_ratio']:.2f}x",
                    f"{row['bwd_ms']:.3g}" if t_bwd is not None else "n/a (no backward)",
                    f"{row['bwd_ratio']:.2f}x" if row["bwd_ratio"] else "-",
                    f"{row['fwdbwd_ms']:.3g}" if t_fb is not None else "n/a",
                    f"{row['fwdbwd_ratio']:.2f}x" if row["fwdbwd_ratio"] else "-",
                    f"{row['bwd_over_fwd']:.2f}" if row["bwd_over_fwd"] is not None else "-",
                    f"{row['fwd_gflops']:.3g} ({100 * row['fwd_ceiling_fraction']:.1f}%)" if flops else "-",
                    f"{row['max_abs_diff']:.1e}",
                ])
            lines.append("")
            lines.append(f"{pname}: {what}; matmul ceiling {ceiling:.0f} GFLOP/s (same rounds); "
                         f"ratio = time / {ours_name}'s")
            lines.append(format_table(
                ["impl", "fwd ms", "fwd ratio", "bwd ms", "bwd ratio", "fwd+bwd ms", "fwd+bwd ratio", "bwd/fwd",
                 "fwd GFLOP/s (of ceiling)", "max|diff|"], table_rows))
    return "\n".join(lines), rows
