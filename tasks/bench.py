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


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    """A plain-text table with right-aligned numeric columns."""
    cells = [[str(h) for h in headers]] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
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
) -> tuple[str, list[dict]]:
    """Inference throughput (images/s, eval, ``torch.inference_mode``) of visionattn models, optionally
    beside timm's model of the same name with the same weights (the max abs logit difference is shown).

    Returns the printed table and the rows as dicts.
    """
    import timm

    import visionattn

    if threads:
        torch.set_num_threads(threads)
    results = []
    for name in names:
        entry = visionattn.get_entry(name)
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
    headers = list(results[0].keys()) if results else []
    table = format_table(headers, [[r.get(h, "") for h in headers] for r in results])
    return table, results


# ---------------------------------------------------------------------------------------------------
# neighborhood-attention kernels

KERNEL_PROBLEMS = {
    # name: (spatial, kernel_size); 4 heads, head_dim 32, batch 1
    "1d-4096-k31": ((4096,), 31),
    "2d-56-k7": ((56, 56), 7),
    "2d-128-k13": ((128, 128), 13),
    "3d-32-k5": ((32, 32, 32), 5),
    "2d-16-k5": ((16, 16), 5),  # small: used by the tests
}
DEFAULT_KERNEL_PROBLEMS = ["1d-4096-k31", "2d-56-k7", "2d-128-k13", "3d-32-k5"]
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


def _flex_block_mask(spatial, kernel_size, device):
    """Block mask over the tokens padded to a multiple of flex's block size (inductor's CPU flex template
    fails to compile for other lengths in this torch build); padded keys are masked out."""
    from torch.nn.attention.flex_attention import create_block_mask

    from visionattn.kernels.semantics import axis_mask_and_offsets

    n = len(spatial)
    N = math.prod(spatial)
    masks = [axis_mask_and_offsets(L, kernel_size, 1, 1, False)[0].to(device) for L in spatial]
    strides = [math.prod(spatial[a + 1:]) for a in range(n)]

    def mask_mod(b, h, q_idx, kv_idx):
        qc, kc = torch.clamp(q_idx, max=N - 1), torch.clamp(kv_idx, max=N - 1)
        allowed = kv_idx < N
        for a in range(n):
            allowed = allowed & masks[a][(qc // strides[a]) % spatial[a], (kc // strides[a]) % spatial[a]]
        return allowed

    padded = math.ceil(N / FLEX_BLOCK) * FLEX_BLOCK
    return create_block_mask(mask_mod, None, None, padded, padded, device=device), padded


def matmul_gflops(device: str = "cpu", size: int = 1024) -> float:
    """The machine's fp32 matmul rate: the ceiling for any attention kernel."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)

    def run():
        torch.mm(a, b)
        _sync(device)

    secs = statistics.median(time_fn(run, warmup=2, min_time=1.0))
    return 2 * size**3 / secs / 1e9


def bench_kernels(
    device: str = "cpu",
    problems: list[str] | None = None,
    skip: tuple[str, ...] = (),
    heads: int = 4,
    head_dim: int = 32,
    min_time: float = 1.0,
    threads: int | None = None,
) -> tuple[str, list[dict]]:
    """Time visionattn's neighborhood attention against the alternatives, forward and forward+backward.

    Alternatives: ``naive`` (gather each query's window; backward through autograd), ``dense`` (masked
    dense SDPA over the N x N mask), ``flex`` (``torch.compile``d flex_attention with a block mask; no CPU
    backward). The ratio columns are ``alternative time / visionattn time``: above 1 means we are faster.
    Also checks that every alternative's output matches ours. Returns the printed text and the rows.
    """
    from visionattn.errors import InvalidInputError
    from visionattn.kernels import na1d, na2d, na3d, triton_available

    if threads:
        torch.set_num_threads(threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("--device cuda asked for, but no CUDA device is available")
    fns = {1: na1d, 2: na2d, 3: na3d}
    ours_backends = ["torch"] if device == "cpu" else (["triton", "torch"] if triton_available() else ["torch"])
    problems = problems or DEFAULT_KERNEL_PROBLEMS
    ceiling = matmul_gflops(device)
    lines = [f"device {device}, {torch.get_num_threads()} threads; fp32 matmul ceiling {ceiling:.0f} GFLOP/s"]
    rows: list[dict] = []
    for pname in problems:
        if pname not in KERNEL_PROBLEMS:
            raise InvalidInputError(f"unknown problem {pname!r}; choose from {', '.join(KERNEL_PROBLEMS)}")
        spatial, K = KERNEL_PROBLEMS[pname]
        n = len(spatial)
        N = math.prod(spatial)
        flops = 4 * heads * N * K**n * head_dim  # QK and AV products only, as NATTEN counts
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(1, *spatial, heads, head_dim, generator=g).to(device) for _ in range(3))
        dout = torch.randn(1, *spatial, heads, head_dim, generator=g).to(device)
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
                lines.append(f"{pname}: masked dense SDPA skipped (N^2 mask of {N * N / 2**30:.1f} Gi entries)")
        if "flex" not in skip:
            bm, padded = _flex_block_mask(spatial, K, device)

            def flex(q, k, v, bm=bm, padded=padded):
                t = [F.pad(x.reshape(1, N, heads, head_dim), (0, 0, 0, 0, 0, padded - N)).transpose(1, 2) for x in (q, k, v)]
                return _flex_fn()(*t, block_mask=bm)[:, :, :N].transpose(1, 2).reshape(q.shape)

            impls["flex-attention-compiled"] = (flex, device == "cuda")

        ref = None
        results = {}
        for name, (fn, has_bwd) in impls.items():
            try:
                with torch.no_grad():
                    out = fn(q, k, v)  # also pays any compile cost outside the timing
            except Exception as e:  # an alternative that fails here (e.g. an inductor bug) is reported, not fatal
                reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
                lines.append(f"{pname}: {name} failed: {type(e).__name__}: {reason}")
                continue
            ref = out if ref is None else ref
            err = (out - ref).abs().max().item()

            def fwd(fn=fn):
                with torch.no_grad():
                    fn(q, k, v)
                _sync(device)

            t_fwd = statistics.median(time_fn(fwd, warmup=1, min_time=min_time))
            t_bwd = None
            if has_bwd:
                qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))

                def fwd_bwd(fn=fn):
                    torch.autograd.grad(fn(qg, kg, vg), (qg, kg, vg), dout)
                    _sync(device)

                t_bwd = statistics.median(time_fn(fwd_bwd, warmup=1, min_time=min_time))
            results[name] = (t_fwd, t_bwd, err)

        ours = results[f"visionattn-{ours_backends[0]}"]
        table_rows = []
        for name, (t_fwd, t_bwd, err) in results.items():
            row = dict(
                problem=pname, impl=name, fwd_ms=t_fwd * 1e3, fwd_gflops=flops / t_fwd / 1e9,
                fwd_ratio=t_fwd / ours[0], fwdbwd_ms=t_bwd * 1e3 if t_bwd else None,
                fwdbwd_ratio=(t_bwd / ours[1]) if t_bwd and ours[1] else None, max_abs_diff=err,
                matmul_ceiling_gflops=ceiling,
            )
            rows.append(row)
            table_rows.append([
                name, row["fwd_ms"], row["fwd_gflops"], f"{row['fwd_ratio']:.2f}x",
                f"{row['fwdbwd_ms']:.3g}" if t_bwd else "n/a (no backward)",
                f"{row['fwdbwd_ratio']:.2f}x" if row["fwdbwd_ratio"] else "-", f"{err:.1e}",
            ])
        lines.append("")
        lines.append(f"{pname}: spatial {'x'.join(map(str, spatial))}, kernel {K}, {heads} heads, head_dim {head_dim}, "
                     f"batch 1; {flops / 1e6:.1f} MFLOP useful; ratio = time / visionattn-{ours_backends[0]}'s")
        lines.append(format_table(
            ["impl", "fwd ms", "fwd GFLOP/s", "fwd ratio", "fwd+bwd ms", "fwd+bwd ratio", "max|diff|"], table_rows
        ))
    return "\n".join(lines), rows
