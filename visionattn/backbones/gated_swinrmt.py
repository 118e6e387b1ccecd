"""Gated-SwinRMT: shifted-window retention with Manhattan decay and input-dependent gating.

Maity, Mondal & Roy, arXiv:2604.06014 (2026). Only the abstract is public; this file builds the most
plausible reading of it, decoding its terms with RMT (Fan et al., CVPR 2024, arXiv:2309.11523), SWAT
(arXiv:2502.18845) and Gated Attention (Qiu et al., arXiv:2505.06708). What the abstract states:

- Swin-style shifted windows; inside each window, attention is decomposed into a **width-wise pass then a
  height-wise pass**, each with a **per-head exponential distance decay** (RMT's Manhattan decay) and no
  learned positional bias;
- **SWAT variant**: sigmoid scores, **balanced ALiBi** slopes, a **multiplicative post-activation** decay,
  values gated by **SwiGLU**, a normalised output;
- **Retention variant**: softmax retention with an **additive log-space** decay and a **G1 sigmoid gate**
  from the block input, applied **after LCE and before W_O**;
- about 77-79M parameters at 224x224 with 100 classes (Mini-ImageNet).

Everything else is a labelled guess ([guess] below): the RMT macro-architecture (conv stem, 3x3 stride-2
downsampling, conditional position encoding, FFN with a depthwise conv, 1024-wide projection head), RMT's
decay rates ``log gamma_h = log(1 - 2^(-init_value - heads_range * h / heads))``, RMT's rotary rotation of
q and k, window 7 with the shift alternating block by block, the window shrinking to the whole map (and
the shift dropping) when the map is no larger than the window (the collapse the abstract describes on
CIFAR-10), GroupNorm over heads as the SWAT "normalised output", and the stage sizes.

Both passes run on the shared neighborhood-attention kernel: a window row is a neighborhood of kernel
``(1, M)`` with stride ``(1, M)`` (blocked), a window column one of kernel ``(M, 1)``; the additive decay is
the kernel's relative positional bias and the SWAT decay its ``score_decay``. Shifted windows become
aligned blocks after padding the map by ``M - shift`` in front; padded keys are removed exactly by one
extra q/k channel that adds ``-3000`` to their logits.

Graph capture: the model scripts (``torch.jit.script``; the kernel call stays a Python call, so a scripted
model runs but cannot be saved) and traces with ``torch.fx`` (the windowed retention, whose windows depend
on the input size, is an FX leaf).
"""
# no `from __future__ import annotations`: TorchScript reads the signature of the ignored kernel call
# (_window_pass) from its live annotations
import math
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models._features import feature_take_indices
from timm.models._features_fx import register_notrace_module
from torch import nn
from torch.utils.checkpoint import checkpoint

from visionattn.kernels import check_backend, na2d
from visionattn.layers.classifier import ClassifierMixin, apply_factory_dtype, check_image_input, factory_device
from visionattn.registry import ReportedFigures, register_model

__all__ = ["GatedSwinRMT", "WindowedRetention", "retention_decay_rates", "balanced_alibi_slopes"]

PAPER = "Maity, Mondal & Roy, Gated-SwinRMT: Unifying Swin Windowed Attention with Retentive Manhattan Decay via Input-Dependent Gating, arXiv:2604.06014"
MASKED_LOGIT = 3000.0  # exp(-3000) and sigmoid(-3000) are exactly 0 in fp16, bf16 and fp32


def retention_decay_rates(num_heads: int, init_value: float = 2.0, heads_range: float = 4.0) -> torch.Tensor:
    """RMT's per-head ``log gamma_h = log(1 - 2^(-init_value - heads_range * h / heads))`` ([guess]: reused)."""
    h = torch.arange(num_heads, dtype=torch.float64)
    return torch.log(1 - 2 ** (-init_value - heads_range * h / num_heads)).float()


def balanced_alibi_slopes(num_heads: int) -> torch.Tensor:
    """Balanced ALiBi (SWAT): ALiBi's geometric slopes ``2^(-8k/n)`` for ``n = ceil(heads/2)``; the first half
    of the heads gets them negated (favour near keys), the second half positive (favour far keys)."""
    n_neg = math.ceil(num_heads / 2)
    n_pos = num_heads - n_neg
    neg = [-(2 ** (-8 * (k + 1) / n_neg)) for k in range(n_neg)]
    pos = [2 ** (-8 * (k + 1) / max(n_pos, 1)) for k in range(n_pos)]
    return torch.tensor(neg + pos)


def rotary(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of ``x [..., N, heads, hd]`` by ``angles [N, hd/2]`` (RMT's theta_shift): the pair
    ``(x1, x2)`` becomes ``(x1 cos - x2 sin, x1 sin + x2 cos)``."""
    if x.dtype in (torch.float32, torch.float64) and not torch.jit.is_scripting():
        # the same rotation as one complex product over the pairs (x1 + i x2) e^(i angle): one pass, where the
        # real form below makes six and a stacking copy (10% of the model's inference time on CPU)
        pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        turn = torch.polar(torch.ones_like(angles, dtype=x.dtype), angles.to(x.dtype))[:, None, :]
        return torch.view_as_real(pairs * turn).flatten(-2)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


@torch.jit.ignore  # TorchScript: a Python call (the kernels' Python API does not script)
def _window_pass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: Tuple[int, int], bias: torch.Tensor,
                 decay: Optional[torch.Tensor], scale: float, score: str, backend: str) -> torch.Tensor:
    """One retention pass over blocked windows of ``kernel`` (a row ``(1, M)`` or a column ``(M, 1)``)."""
    return na2d(q, k, v, kernel, stride=kernel, rpb=bias, scale=scale, score=score, score_decay=decay,
                backend=backend)


@register_notrace_module  # FX: the window size and padding depend on the input size
class WindowedRetention(nn.Module):
    """Decomposed (width then height) retention in (shifted) windows. ``[B, H, W, dim] -> [B, H, W, dim]``.

    Args:
        variant: ``'retention'`` (softmax, additive log decay, G1 output gate) or ``'swat'`` (sigmoid,
            balanced ALiBi, multiplicative decay, SwiGLU-gated values, normalised output).
        window_size: M; shift: offset the windows by M // 2 (alternate blocks).
        out_norm: SWAT's output normalisation: ``'group'`` (GroupNorm over heads, [guess]), ``'rowsum'``
            (divide by each query's total weight) or ``'none'``.
        rope: rotate q and k as RMT does ([guess]).
        attention_backend: neighborhood-attention kernel backend (``'auto'``, ``'reference'``, ``'torch'``,
            ``'triton'``; :mod:`visionattn.kernels.backends`).
    """

    def __init__(self, dim: int, num_heads: int, variant: str = "retention", window_size: int = 7, shift: bool = False,
                 init_value: float = 2.0, heads_range: float = 4.0, out_norm: str = "group", rope: bool = True,
                 side_dwconv: int = 5, attention_backend: str = "auto"):
        super().__init__()
        if variant not in ("retention", "swat"):
            raise ValueError(f"variant must be 'retention' or 'swat', got {variant!r}")
        if out_norm not in ("group", "rowsum", "none"):
            raise ValueError(f"out_norm must be 'group', 'rowsum' or 'none', got {out_norm!r}")
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"dim {dim} must split into {num_heads} heads of an even width")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.variant, self.window_size, self.shift, self.out_norm = variant, window_size, shift, out_norm
        self.rope, self.attention_backend = rope, check_backend("WindowedRetention", attention_backend)
        self.scale = self.head_dim ** -0.5
        self.masked_key_value = MASKED_LOGIT / self.scale  # the extra key channel of padded keys (times q's 1)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.lce = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
        self.out_proj = nn.Linear(dim, dim)
        self.register_buffer("log_gamma", retention_decay_rates(num_heads, init_value, heads_range), persistent=False)
        # each variant's modules; the other variant's are None (TorchScript skips the branches using them)
        self.gate: nn.Module | None = None
        self.value_gate: nn.Module | None = None
        self.norm: nn.Module | None = None
        if variant == "retention":
            self.gate = nn.Linear(dim, dim)  # G1: sigmoid(x W_g + b_g) after LCE, before W_O
            self.register_buffer("alibi", None, persistent=False)
        else:
            self.value_gate = nn.Linear(dim, dim)  # SwiGLU: v = (x W_v) * SiLU(x W_vg)
            self.register_buffer("alibi", balanced_alibi_slopes(num_heads), persistent=False)
            self.norm = nn.GroupNorm(num_heads, dim) if out_norm == "group" else None
        half = self.head_dim // 2
        self.register_buffer("rope_freq", 1.0 / 10000 ** torch.linspace(0, 1, half), persistent=False)

    def _window(self, H: int, W: int) -> Tuple[int, int]:
        """Window size and shift for an ``H x W`` map: the window collapses to the whole map (no shift) when
        the map is no larger than the window ([guess], the behaviour the abstract describes on CIFAR-10)."""
        M = self.window_size
        if min(H, W) <= M:
            return min(H, W), 0
        return M, (M // 2 if self.shift else 0)

    def _pass_tables(self, M: int, axis: int, dtype: torch.dtype,
                     device: torch.device) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Bias (and SWAT decay) tables for one pass: ``[heads, 1, 2M-1]`` (width) or ``[heads, 2M-1, 1]``."""
        dist = (torch.arange(2 * M - 1, device=device) - (M - 1)).abs().float()
        shape = [self.num_heads, 1, 2 * M - 1] if axis == 1 else [self.num_heads, 2 * M - 1, 1]
        log_decay = (self.log_gamma[:, None] * dist[None, :]).reshape(shape)
        if self.alibi is None:  # retention: the decay is the additive bias
            return log_decay.to(dtype), None
        bias = (self.alibi[:, None] * dist[None, :]).reshape(shape)
        return bias.to(dtype), log_decay.exp().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        hd, heads = self.head_dim, self.num_heads
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.value_gate is not None:  # SWAT
            v = v * F.silu(self.value_gate(x))
        lce = self.lce(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        q, k = q.view(B, H, W, heads, hd), k.view(B, H, W, heads, hd)
        if self.rope:
            pos = torch.arange(H * W, device=x.device, dtype=torch.float32)
            angles = (pos[:, None] * self.rope_freq[None, :]).to(x.dtype)
            q = rotary(q.reshape(B, H * W, heads, hd), angles).view(B, H, W, heads, hd)
            k = rotary(k.reshape(B, H * W, heads, hd), angles).view(B, H, W, heads, hd)

        M, shift = self._window(H, W)
        top = (M - shift) % M
        Hp, Wp = math.ceil((H + top) / M) * M, math.ceil((W + top) / M) * M
        v = v.view(B, H, W, heads, hd)
        valid = torch.ones(1, H, W, 1, 1, device=x.device, dtype=x.dtype)
        if (Hp, Wp) != (H, W):  # (unshifted windows that tile the map need neither padding nor the channel)
            pad = [0, 0, 0, 0, top, Wp - W - top, top, Hp - H - top]  # [B, H, W, heads, hd]: pad W then H
            # one extra q/k channel removes padded keys exactly: q gets 1, padded keys get -MASKED_LOGIT / scale
            valid = F.pad(valid, pad)
            q = torch.cat([F.pad(q, pad), torch.ones_like(valid).expand(B, -1, -1, heads, 1)], dim=-1)
            k = torch.cat([F.pad(k, pad), ((valid - 1) * self.masked_key_value).expand(B, -1, -1, heads, 1)], dim=-1)
            v = F.pad(v, pad)
        if self.variant == "swat" and self.out_norm == "rowsum":
            v = torch.cat([v, valid.expand(B, -1, -1, heads, 1)], dim=-1)  # carries each query's total weight

        score = "softmax" if self.variant == "retention" else "sigmoid"
        # width pass, then height pass on its output
        bias, decay = self._pass_tables(M, 1, x.dtype, x.device)
        out = _window_pass(q, k, v, (1, M), bias, decay, self.scale, score, self.attention_backend)
        bias, decay = self._pass_tables(M, 0, x.dtype, x.device)
        out = _window_pass(q, k, out, (M, 1), bias, decay, self.scale, score, self.attention_backend)
        out = out[:, top:top + H, top:top + W]
        if self.variant == "swat" and self.out_norm == "rowsum":
            out = out[..., :hd] / out[..., hd:].clamp_min(1e-6)
        out = out.reshape(B, H, W, C)
        if self.norm is not None:  # SWAT's normalised output
            out = self.norm(out.reshape(-1, C)).view(B, H, W, C)
        out = out + lce
        if self.gate is not None:  # retention's G1 gate
            out = out * torch.sigmoid(self.gate(x))
        return self.out_proj(out)


class FeedForward(nn.Module):
    """RMT's FFN: ``fc1 -> GELU -> (+ DWConv3x3) -> fc2`` on channels-last maps."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        x = self.act(self.fc1(x))
        x = x + self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.fc2(x)


class Block(nn.Module):
    """``x + DWConv3x3(x)``, then pre-norm windowed retention and FFN. ``[B, H, W, dim] -> [B, H, W, dim]``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, **retention_kwargs):
        super().__init__()
        self.cpe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.retention = WindowedRetention(dim, num_heads, **retention_kwargs)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = FeedForward(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        x = x + self.cpe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + self.drop_path(self.retention(self.norm1(x)))
        return x + self.drop_path(self.ffn(self.norm2(x)))


def _conv_bn(cin, cout, stride, act=True):
    layers = [nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout)]
    return layers + [nn.GELU()] if act else layers


class GatedSwinRMT(ClassifierMixin, nn.Module):
    """Gated-SwinRMT classifier (4 stages, output strides 4/8/16/32).

    Args:
        mixer: ``'retention'`` or ``'swat'`` (named so because timm's builder reserves ``variant``).
        depths, embed_dims, num_heads: per stage.
        window_size: window side (7 at 224x224). mlp_ratio: FFN expansion.
        init_value, heads_range: decay rates per stage follow RMT (heads_range 4, 4, 6, 6 by default).
        head_dim_proj: width of the projection before pooling (RMT: 1024).
        attention_backend: kernel backend of the windowed retention (``'auto'``, ``'reference'``, ``'torch'``,
            ``'triton'``).
        device, dtype: where and in which dtype parameters and buffers are created (timm's factory arguments;
            ``device='meta'`` allocates nothing).

    Shapes: ``forward`` ``[B, in_chans, H, W] -> [B, num_classes]``; ``forward_features``
    ``-> [B, C4, H/32, W/32]``.
    """

    GLOBAL_POOLS = ("", "avg")

    def __init__(
        self,
        img_size: int | Sequence[int] | None = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        mixer: str = "retention",
        depths: Sequence[int] = (2, 2, 8, 2),
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        window_size: int = 7,
        mlp_ratio: float = 3.0,
        init_value: float = 2.0,
        heads_ranges: Sequence[float] = (4, 4, 6, 6),
        out_norm: str = "group",
        rope: bool = True,
        head_dim_proj: int = 1024,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        attention_backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        self._check_pool(global_pool)
        if not (len(depths) == len(embed_dims) == len(num_heads) == len(heads_ranges) == 4):
            raise ValueError("depths, embed_dims, num_heads and heads_ranges need one entry per stage (4)")
        for d, h in zip(embed_dims, num_heads):
            if d % h or (d // h) % 2:
                raise ValueError(f"stage width {d} must split into {h} heads of an even width")
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        self.in_chans, self.num_classes, self.global_pool = in_chans, num_classes, global_pool
        self.num_features = embed_dims[-1]
        self.head_hidden_size = head_dim_proj
        self.grad_checkpointing = False
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        with factory_device(device):
            c0 = embed_dims[0]
            self.stem = nn.Sequential(
                *_conv_bn(in_chans, c0 // 2, 2), *_conv_bn(c0 // 2, c0 // 2, 1), *_conv_bn(c0 // 2, c0, 2),
                *_conv_bn(c0, c0, 1, act=False),
            )
            self.downsamples = nn.ModuleList(
                nn.Sequential(*_conv_bn(embed_dims[i], embed_dims[i + 1], 2, act=False)) for i in range(3)
            )
            stages, start = [], 0
            for i in range(4):
                stages.append(nn.ModuleList(
                    Block(embed_dims[i], num_heads[i], mlp_ratio, dpr[start + j], variant=mixer,
                          window_size=window_size, shift=bool(j % 2), init_value=init_value,
                          heads_range=heads_ranges[i], out_norm=out_norm, rope=rope,
                          attention_backend=attention_backend)
                    for j in range(depths[i])
                ))
                start += depths[i]
            self.stages = nn.ModuleList(stages)
            self.proj = nn.Linear(embed_dims[-1], head_dim_proj)
            self.proj_norm = nn.BatchNorm2d(head_dim_proj)
            self.proj_act = nn.SiLU()
            self.head_drop = nn.Dropout(drop_rate)
            self.head = nn.Linear(head_dim_proj, num_classes) if num_classes > 0 else nn.Identity()
            self.feature_info = [
                dict(num_chs=embed_dims[i], reduction=4 * 2**i, module=f"stages.{i}") for i in range(4)
            ]
            self.apply(self.init_vit_weights)
        apply_factory_dtype(self, dtype)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stem", blocks=[(r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)", None),
                                           (r"^downsamples\.(\d+)", (0,))])

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            x = check_image_input(x, type(self).__name__, self.in_chans, min_size=32)
        return x

    def _forward_stages(self, x: torch.Tensor, take: List[int], last: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Stages ``0..last`` (of those kept after pruning), each ``[B, C_{i-1}, H, W]`` (or the image) ->
        ``[B, C_i, H', W']``: the stem or downsampling, then the blocks on channels-last maps. Returns the last
        output and the outputs of the stages in ``take``."""
        intermediates: List[torch.Tensor] = []
        for i, stage in enumerate(self.stages):
            if i <= last:
                if i == 0:
                    x = self.stem(x)
                else:
                    for j, down in enumerate(self.downsamples):  # downsamples[i - 1], as TorchScript can index
                        if j == i - 1:
                            x = down(x)
                x = x.permute(0, 2, 3, 1)
                for blk in stage:
                    if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                        x = checkpoint(blk, x, use_reentrant=False)
                    else:
                        x = blk(x)
                x = x.permute(0, 3, 1, 2)
                if i in take:
                    intermediates.append(x)
        return x, intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, C4, H/32, W/32]`` (the last kept stage's output after pruning)."""
        x, _ = self._forward_stages(self._check_input(x), [], len(self.stages) - 1)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """RMT's head: Linear(C4 -> 1024) -> BatchNorm -> SiLU -> average pool -> classifier (after pruning,
        the projection is gone: pool -> classifier)."""
        if self.proj is not None:
            x = self.proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            x = self.proj_act(self.proj_norm(x))
        if self.global_pool == "avg":
            x = x.mean((2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x):
        # unannotated, as timm's models: torch.fx copies the root forward's annotations into the code it
        # generates, where this module's string annotations (`from __future__ import annotations`) do not script
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt="NCHW", intermediates_only=False):
        """Stage outputs ``[B, C_i, H/4/2^i, W/4/2^i]`` (timm's API; there is no final norm)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        x = self._check_input(x)
        x, intermediates, _ = self.run_stages(x, len(self.stages), indices, stop_early, intermediates_only)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices=1, prune_norm=False, prune_head=True):
        """Drop the stages after the last one ``indices`` selects and optionally the head. The head includes
        RMT's projection (Linear -> BatchNorm -> SiLU, built for the last stage's width), so pruning the head
        removes it, and dropping stages prunes the head: ``num_features`` / ``head_hidden_size`` become the
        kept stage's width, and ``reset_classifier`` builds a classifier for it. (There is no final norm.)"""
        take, max_index = feature_take_indices(len(self.stages), indices)
        if max_index < len(self.stages) - 1:
            prune_head = True
            self.num_features = self.feature_info[max_index]["num_chs"]
        self.stages = self.stages[: max_index + 1]
        self.downsamples = self.downsamples[:max_index]
        if prune_head:
            self.proj = self.proj_norm = None
            self.proj_act = self.new_module(nn.Identity())
            self.head_hidden_size = self.num_features
            self.reset_classifier(0, "")
        return take


def _create(model_name: str, pretrained: bool = False, **kwargs: Any) -> GatedSwinRMT:
    kwargs.pop("img_size", None)  # any size works; accepted for API symmetry
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(GatedSwinRMT, "va_" + model_name, pretrained,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)


def _cfg(input_size=(3, 224, 224), num_classes=100, pool_size=(7, 7), **kwargs: Any) -> dict:
    return {
        "url": "", "num_classes": num_classes, "input_size": input_size, "pool_size": pool_size, "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0", "classifier": "head", "license": "unknown", "paper_ids": "arXiv:2604.06014", **kwargs,
    }


_cifar = dict(input_size=(3, 32, 32), num_classes=10, pool_size=(1, 1), crop_pct=1.0,
              mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
default_cfgs = generate_default_cfgs({
    "va_gated_swinrmt_swat": _cfg(), "va_gated_swinrmt_retention": _cfg(),
    "va_gated_swinrmt_swat_cifar": _cfg(**_cifar), "va_gated_swinrmt_retention_cifar": _cfg(**_cifar),
    "va_gated_swinrmt_swat_tiny": _cfg(num_classes=1000), "va_gated_swinrmt_retention_tiny": _cfg(num_classes=1000),
    "va_gated_swinrmt_swat_small": _cfg(num_classes=1000), "va_gated_swinrmt_retention_small": _cfg(num_classes=1000),
})

_PAPER_SIZE = dict(depths=(2, 2, 16, 2), embed_dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32), num_classes=100)
_CIFAR = dict(depths=(2, 2, 4, 2), embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16), num_classes=10)
_TINY = dict(depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16))
_SMALL = dict(depths=(3, 4, 18, 4), embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16))


def _variant(name: str, mixer: str, size: dict, pretrained: bool, kwargs: dict) -> GatedSwinRMT:
    return _create(name, pretrained, **dict(dict(size, mixer=mixer), **kwargs))


@register_model(task="classification", paper=PAPER, model_cls=GatedSwinRMT, input_size=(3, 32, 32),
                notes="CIFAR-10 (ours): widths 64..512, depths 2,2,4,2, 32x32 input")
def gated_swinrmt_swat_cifar(pretrained: bool = False, **kwargs: Any) -> GatedSwinRMT:
    """SWAT variant sized for CIFAR-10 at 32x32 (ours)."""
    return _variant("gated_swinrmt_swat_cifar", "swat", _CIFAR, pretrained, kwargs)


@register_model(task="classification", paper=PAPER, model_cls=GatedSwinRMT, input_size=(3, 32, 32),
                notes="CIFAR-10 (ours): widths 64..512, depths 2,2,4,2, 32x32 input")
def gated_swinrmt_retention_cifar(pretrained: bool = False, **kwargs: Any) -> GatedSwinRMT:
    """Retention variant sized for CIFAR-10 at 32x32 (ours)."""
    return _variant("gated_swinrmt_retention_cifar", "retention", _CIFAR, pretrained, kwargs)


@register_model(task="classification", paper=PAPER, model_cls=GatedSwinRMT, notes="RMT-T layout (ours)")
def gated_swinrmt_swat_tiny(pretrained: bool = False, **kwargs: Any) -> GatedSwinRMT:
    """SWAT variant in RMT-T's layout (widths 64..512, depths 2,2,8,2)."""
    return _variant("gated_swinrmt_swat_tiny", "swat", _TINY, pretrained, kwargs)


@register_model(task="classification", paper=PAPER, model_cls=GatedSwinRMT, notes="RMT-T layout (ours)")
def gated_swinrmt_retention_tiny(pretrained: bool = False, **kwargs: Any) -> GatedSwinRMT:
    """Retention variant in RMT-T's layout (widths 64..512, depths 2,2,8,2)."""
    return _variant("gated_swinrmt_retention_tiny", "retention", _TINY, pretrained, kwargs)


@register_model(task="classification", paper=PAPER, model_cls=GatedSwinRMT, notes="RMT-S layout (ours)")
def gated_swinrmt_swat_small(pretrained: bool = False, **kwargs: Any) -> GatedSwinRMT:
    """SWAT variant in RMT-S's layout (widths 64..512, depths 3,4,18,4)."""
    return _variant("gated_swinrmt_swat_small", "swat", _SMALL, pretrained, kwargs)


@register_model(task="classification", paper=PAPER, model_cls=GatedSwinRMT, notes="RMT-S layout (ours)")
def gated_swinrmt_retention_small(pretrained: bool = False, **kwargs: Any) -> GatedSwinRMT:
    """Retention variant in RMT-S's layout (widths 64..512, depths 3,4,18,4)."""
    return _variant("gated_swinrmt_retention_small", "retention", _SMALL, pretrained, kwargs)


@register_model(task="classification", paper=PAPER, model_cls=GatedSwinRMT,
                notes="paper size (reconstruction), 100 classes",
                reported=ReportedFigures(source="abstract", params_m=(77, 79), metric="top-1", value=80.22,
                                         dataset="Mini-ImageNet"))
def gated_swinrmt_swat(pretrained: bool = False, **kwargs: Any) -> GatedSwinRMT:
    """SWAT variant at the paper's size: widths 128..1024, depths 2,2,16,2, 100 classes."""
    return _variant("gated_swinrmt_swat", "swat", _PAPER_SIZE, pretrained, kwargs)


@register_model(task="classification", paper=PAPER, model_cls=GatedSwinRMT,
                notes="paper size (reconstruction), 100 classes",
                reported=ReportedFigures(source="abstract", params_m=(77, 79), metric="top-1", value=78.20,
                                         dataset="Mini-ImageNet"))
def gated_swinrmt_retention(pretrained: bool = False, **kwargs: Any) -> GatedSwinRMT:
    """Retention variant at the paper's size: widths 128..1024, depths 2,2,16,2, 100 classes."""
    return _variant("gated_swinrmt_retention", "retention", _PAPER_SIZE, pretrained, kwargs)
