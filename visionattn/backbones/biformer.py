"""BiFormer: vision transformer with bi-level routing attention.

Zhu et al., CVPR 2023, arXiv:2303.08810. Official code: rayleizhu/BiFormer (``models/biformer.py``,
``ops/bra_legacy.py``). Module names follow the official checkpoints (``downsample_layers``, ``stages``,
``attn.qkv.qkv``, ``attn.wo``, ``attn.lepe``, ``pos_embed``, ``mlp.0``/``mlp.3``, ``norm``, ``head``), so the
released weights load after unwrapping ``{'model': ...}``. Numerics follow the released models:

- bi-level routing attention scales logits by ``qk_dim ** -0.5`` (the full width, not the head width);
- stage 4 is global attention with 8 heads whatever the width, its qkv has no bias, and its LePE
  (5x5 depthwise conv) is applied to the attention input, not to V;
- routing runs on detached region means and uses only the top-k indices.

Bi-level routing attention (BRA): split the map into ``n_win x n_win`` regions, route each query region to
the ``topk`` regions whose mean key best matches its mean query, and attend within those. The official
code gathers the K/V of all ``topk`` regions at once (``topk`` copies of K/V per query region); here the
routed regions are visited ``kv_chunk`` at a time with an online softmax, so only ``kv_chunk`` copies exist
at once, in inference and, by regathering each chunk in backward, in training too (``kv_chunk=0``
reproduces the full gather; ``visionattn bench models biformer_tiny --compare gather`` measures both).

Graph capture: the model scripts (``torch.jit.script``) and traces with ``torch.fx`` (bi-level routing
attention, whose padding and chunking depend on the input size, is an FX leaf).
"""
from __future__ import annotations

from typing import Any, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models._features import feature_take_indices
from timm.models._features_fx import register_notrace_module
from torch import nn
from torch.utils.checkpoint import checkpoint

from visionattn.layers.classifier import ClassifierMixin, apply_factory_dtype, check_image_input, factory_device
from visionattn.registry import ReportedFigures, register_model

__all__ = ["BiFormer", "BiLevelRoutingAttention", "AttentionLePE", "routed_attention"]

PAPER = "Zhu et al., BiFormer: Vision Transformer with Bi-Level Routing Attention, CVPR 2023, arXiv:2303.08810"


def _gather_regions(
    kh: torch.Tensor, vh: torch.Tensor, batch: torch.Tensor, sel: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """K and V of the routed regions ``sel [B, R, c]``, from ``kh``/``vh [B, R, h, T, hd]``:
    ``[B, R, h, c*T, hd]`` each (regions side by side along the key axis)."""
    B, R, heads, T, hd = kh.shape
    c = sel.shape[-1]
    kg = kh[batch, sel].permute(0, 1, 3, 2, 4, 5).reshape(B, R, heads, c * T, hd)
    vg = vh[batch, sel].permute(0, 1, 3, 2, 4, 5).reshape(B, R, heads, c * T, hd)
    return kg, vg


def _chunk_attention(
    qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, batch: torch.Tensor, sel: torch.Tensor, scale: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query region over the routed regions ``sel``, normalised within them: the output
    and the log-sum-exp of the logits (``[B, R, h, T, hd]``, ``[B, R, h, T, 1]``) for the online softmax."""
    kg, vg = _gather_regions(kh, vh, batch, sel)
    logits = torch.matmul(qh, kg.transpose(-1, -2)) * scale
    chunk_lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    return torch.matmul(torch.exp(logits - chunk_lse), vg), chunk_lse


def _run_chunk(
    qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, batch: torch.Tensor, sel: torch.Tensor, scale: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    if torch.is_grad_enabled() and not torch.jit.is_scripting():
        # keep only this chunk's inputs for backward and regather there, so training, too, never holds
        # more than one chunk of gathered K/V and scores
        return checkpoint(_chunk_attention, qh, kh, vh, batch, sel, scale, use_reentrant=False)
    return _chunk_attention(qh, kh, vh, batch, sel, scale)


def routed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, num_heads: int, scale: float,
    kv_chunk: int = 0,
) -> torch.Tensor:
    """Attention of each query region over its routed key regions.

    Args:
        q, k, v: ``[B, R, T, C]`` (R regions of T tokens; heads are contiguous channel groups).
        index: ``[B, R, topk]`` routed key-region indices per query region.
        kv_chunk: routed regions gathered per step (online softmax across steps); 0 gathers all at once.
    Returns: ``[B, R, T, C]``.
    """
    B, R, T, C = q.shape
    hd = C // num_heads
    topk = index.shape[-1]
    if kv_chunk < 0:
        raise ValueError(f"kv_chunk must be >= 0 (0 = gather every routed region at once), got {kv_chunk}")
    kv_chunk = topk if kv_chunk == 0 else min(kv_chunk, topk)
    qh = q.view(B, R, T, num_heads, hd).transpose(2, 3)  # [B, R, h, T, hd]
    kh = k.view(B, R, T, num_heads, hd).transpose(2, 3)
    vh = v.view(B, R, T, num_heads, hd).transpose(2, 3)
    batch = torch.arange(B, device=q.device)[:, None, None]

    if kv_chunk == topk:  # everything in one step: the plain softmax, as the official code computes it
        kg, vg = _gather_regions(kh, vh, batch, index)
        logits = torch.matmul(qh, kg.transpose(-1, -2)) * scale  # [B, R, h, T, topk*T]
        return torch.matmul(logits.softmax(-1), vg).transpose(2, 3).reshape(B, R, T, C)

    out, lse = _run_chunk(qh, kh, vh, batch, index[:, :, 0:kv_chunk], scale)
    for c0 in range(kv_chunk, topk, kv_chunk):
        chunk_out, chunk_lse = _run_chunk(qh, kh, vh, batch, index[:, :, c0:c0 + kv_chunk], scale)
        new_lse = torch.logaddexp(lse, chunk_lse)
        out = out * torch.exp(lse - new_lse) + chunk_out * torch.exp(chunk_lse - new_lse)
        lse = new_lse
    return out.transpose(2, 3).reshape(B, R, T, C)


def _to_regions(t: torch.Tensor, S: int, rh: int, rw: int) -> torch.Tensor:
    """``[B, S*rh, S*rw, C] -> [B, S*S, rh*rw, C]``: the map cut into ``S x S`` regions of ``rh x rw`` tokens."""
    B, C = t.shape[0], t.shape[-1]
    return t.reshape(B, S, rh, S, rw, C).transpose(2, 3).reshape(B, S * S, rh * rw, C)


class QKVLinear(nn.Module):
    """One linear for ``[q | k | v]`` (kept as a submodule so checkpoint keys read ``attn.qkv.qkv``)."""

    def __init__(self, dim: int, qk_dim: int, bias: bool = True):
        super().__init__()
        self.qk_dim = qk_dim
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim, bias=bias)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv(x).split([self.qk_dim, self.qk_dim, x.shape[-1]], dim=-1)
        return q, k, v


@register_notrace_module  # FX: padding and routing depend on the input size
class BiLevelRoutingAttention(nn.Module):
    """BRA on channels-last maps: ``[B, H, W, dim] -> [B, H, W, dim]``.

    ``auto_pad`` zero-pads H and W to multiples of ``n_win`` (bottom/right, before the qkv projection, as
    the official code does) and crops after; without it, indivisible sizes raise ``ValueError``.
    """

    def __init__(self, dim: int, num_heads: int = 8, n_win: int = 7, topk: int = 4, qk_scale: float | None = None,
                 side_dwconv: int = 5, auto_pad: bool = True, kv_chunk: int = 4):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        if topk > n_win * n_win:
            raise ValueError(f"topk {topk} exceeds the number of regions n_win^2 = {n_win * n_win}")
        self.dim, self.num_heads, self.n_win, self.topk = dim, num_heads, n_win, topk
        self.scale = qk_scale or dim ** -0.5  # the full width: the released weights depend on it
        self.auto_pad, self.kv_chunk = auto_pad, kv_chunk
        self.qkv = QKVLinear(dim, dim)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
        self.wo = nn.Linear(dim, dim)

    def route(self, q_regions: torch.Tensor, k_regions: torch.Tensor) -> torch.Tensor:
        """Top-k key regions per query region from the region means (no gradient). ``-> [B, R, topk]``."""
        with torch.no_grad():
            q_win, k_win = q_regions.mean(2), k_regions.mean(2)  # [B, R, dim]
            logits = (q_win * self.scale) @ k_win.transpose(-1, -2)
            return torch.topk(logits, k=self.topk, dim=-1)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        S = self.n_win
        pad_h, pad_w = (-H) % S, (-W) % S
        padded = pad_h > 0 or pad_w > 0
        if padded:
            if not self.auto_pad:
                raise ValueError(
                    f"BiLevelRoutingAttention: H={H}, W={W} must be multiples of n_win={S} (or use auto_pad=True)"
                )
            x = F.pad(x, [0, 0, 0, pad_w, 0, pad_h])
        Hp, Wp = H + pad_h, W + pad_w
        rh, rw = Hp // S, Wp // S
        q, k, v = self.qkv(x)
        qr, kr, vr = _to_regions(q, S, rh, rw), _to_regions(k, S, rh, rw), _to_regions(v, S, rh, rw)
        index = self.route(qr, kr)
        out = routed_attention(qr, kr, vr, index, self.num_heads, self.scale, self.kv_chunk)
        out = out.reshape(B, S, S, rh, rw, C).transpose(2, 3).reshape(B, Hp, Wp, C)
        out = out + self.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        out = self.wo(out)
        return out[:, :H, :W].contiguous() if padded else out


class AttentionLePE(nn.Module):
    """Global multi-head attention plus a locally-enhanced positional term (5x5 depthwise conv of the input).
    ``[B, H, W, dim] -> [B, H, W, dim]``."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, side_dwconv: int = 5):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        q, k, v = self.qkv(x).reshape(B, H * W, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale).transpose(1, 2).reshape(B, H, W, C)
        return self.proj(out + self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class Block(nn.Module):
    """``x + DWConv3x3(x)`` (if ``cpe``), then pre-norm attention and MLP on channels-last tokens.
    ``[B, dim, H, W] -> [B, dim, H, W]``. ``topk == -2`` selects global attention with LePE."""

    def __init__(self, dim: int, num_heads: int, topk: int, n_win: int, mlp_ratio: float, drop_path: float,
                 cpe: bool = True, auto_pad: bool = True, kv_chunk: int = 4):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim) if cpe else None
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)  # eps 1e-6: the official comment says it avoids attention collapse
        if topk == -2:
            self.attn = AttentionLePE(dim, num_heads=8)
        elif topk > 0:
            self.attn = BiLevelRoutingAttention(dim, num_heads, n_win, topk, auto_pad=auto_pad, kv_chunk=kv_chunk)
        else:
            raise ValueError(f"topk must be positive (routed attention) or -2 (global attention), got {topk}")
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(mlp_ratio * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.Identity(), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            x = x + self.pos_embed(x)
        x = x.permute(0, 2, 3, 1)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.permute(0, 3, 1, 2)


class BiFormer(ClassifierMixin, nn.Module):
    """BiFormer classifier (4 stages, output strides 4/8/16/32).

    Args:
        depths, embed_dims: blocks and widths per stage.
        topks: routed regions per stage (``-2`` = global attention with LePE, the released stage 4).
        n_win: regions per side (7 for ImageNet classification).
        head_dim: BRA head width (heads = width / head_dim); stage 4 always uses 8 heads.
        mlp_ratio: MLP expansion. stem: ``'conv'`` (two 3x3 stride-2 convs, the released models) or
            ``'patch'`` (4x4 patchify + BN, with BN + 2x2 conv downsampling: the Swin-layout ablation, STL).
        cpe: the 3x3 depthwise conditional position encoding at the start of every block.
        auto_pad: pad maps whose size is not a multiple of n_win (no effect at 224x224).
        kv_chunk: routed regions gathered at once (see module docstring); 0 = the official full gather.
        device, dtype: where and in which dtype parameters and buffers are created (timm's factory arguments;
            ``device='meta'`` allocates nothing).

    Shapes: ``forward`` ``[B, in_chans, H, W] -> [B, num_classes]``; ``forward_features`` ``-> [B, C4, H/32, W/32]``.
    """

    GLOBAL_POOLS = ("", "avg")

    def __init__(
        self,
        img_size: int | Sequence[int] | None = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        depths: Sequence[int] = (2, 2, 8, 2),
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        topks: Sequence[int] = (1, 4, 16, -2),
        n_win: int = 7,
        head_dim: int = 32,
        mlp_ratio: float = 3.0,
        stem: str = "conv",
        cpe: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        auto_pad: bool = True,
        kv_chunk: int = 4,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self._check_pool(global_pool)
        if not (len(depths) == len(embed_dims) == len(topks) == 4):
            raise ValueError("depths, embed_dims and topks need one entry per stage (4)")
        for d in embed_dims[:3]:
            if d % head_dim:
                raise ValueError(f"embed_dims {tuple(embed_dims)} must be multiples of head_dim {head_dim}")
        if embed_dims[3] % 8:
            raise ValueError(f"the last width {embed_dims[3]} must be divisible by 8 (stage-4 heads)")
        if stem not in ("conv", "patch"):
            raise ValueError(f"stem must be 'conv' or 'patch', got {stem!r}")
        self.in_chans, self.num_classes, self.global_pool = in_chans, num_classes, global_pool
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.grad_checkpointing = False

        c0 = embed_dims[0]
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        with factory_device(device):
            if stem == "conv":
                first = nn.Sequential(
                    nn.Conv2d(in_chans, c0 // 2, 3, 2, 1), nn.BatchNorm2d(c0 // 2), nn.GELU(),
                    nn.Conv2d(c0 // 2, c0, 3, 2, 1), nn.BatchNorm2d(c0),
                )
                downs = [nn.Sequential(nn.Conv2d(embed_dims[i], embed_dims[i + 1], 3, 2, 1),
                                       nn.BatchNorm2d(embed_dims[i + 1]))
                         for i in range(3)]
            else:
                first = nn.Sequential(nn.Conv2d(in_chans, c0, 4, 4), nn.BatchNorm2d(c0))
                downs = [nn.Sequential(nn.BatchNorm2d(embed_dims[i]), nn.Conv2d(embed_dims[i], embed_dims[i + 1], 2, 2))
                         for i in range(3)]
            self.downsample_layers = nn.ModuleList([first, *downs])

            stages, start = [], 0
            for i in range(4):
                stages.append(nn.Sequential(*[
                    Block(embed_dims[i], embed_dims[i] // head_dim, topks[i], n_win, mlp_ratio, dpr[start + j],
                          cpe=cpe, auto_pad=auto_pad, kv_chunk=kv_chunk)
                    for j in range(depths[i])
                ]))
                start += depths[i]
            self.stages = nn.ModuleList(stages)
            self.norm = nn.BatchNorm2d(embed_dims[-1])
            self.head_drop = nn.Dropout(drop_rate)
            self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
            self.feature_info = [
                dict(num_chs=embed_dims[i], reduction=4 * 2**i, module=f"stages.{i}") for i in range(4)
            ]
            self.apply(self.init_vit_weights)
        apply_factory_dtype(self, dtype)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^downsample_layers\.0", blocks=[(r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)", None),
                                                            (r"^downsample_layers\.(\d+)", (0,)), (r"^norm", (99999,))])

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            x = check_image_input(x, type(self).__name__, self.in_chans, min_size=32)
        return x

    def _forward_stages(self, x: torch.Tensor, take: List[int], last: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Downsampling and blocks of stages ``0..last`` (of those kept after pruning); returns the last output
        and the outputs of the stages in ``take``."""
        intermediates: List[torch.Tensor] = []
        for i, (down, stage) in enumerate(zip(self.downsample_layers, self.stages)):
            if i <= last:
                x = down(x)
                for blk in stage:
                    if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                        x = checkpoint(blk, x, use_reentrant=False)
                    else:
                        x = blk(x)
                if i in take:
                    intermediates.append(x)
        return x, intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, C4, H/32, W/32]`` (after the final BatchNorm; the last kept stage's width and
        stride, without norm, after pruning)."""
        x, _ = self._forward_stages(self._check_input(x), [], len(self.stages) - 1)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean((2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x):
        # unannotated, as timm's models: torch.fx copies the root forward's annotations into the code it
        # generates, where this module's string annotations (`from __future__ import annotations`) do not script
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt="NCHW", intermediates_only=False):
        """Stage outputs ``[B, C_i, H/4/2^i, W/4/2^i]`` (timm's API); the last one gets the final norm when
        ``norm`` is set."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        num_stages = len(self.stages)
        x, intermediates, take = self.run_stages(self._check_input(x), num_stages, indices, stop_early, intermediates_only)
        if norm and num_stages - 1 in take:  # the final norm follows the last stage (an Identity once pruned)
            intermediates[-1] = self.norm(intermediates[-1])
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices=1, prune_norm=False, prune_head=True):
        """Drop the stages after the last one ``indices`` selects and optionally the final norm and the head;
        ``forward_features`` then ends at that stage. Dropping stages drops the final norm (it follows the last
        stage only) and the head (built for the last stage's width): ``num_features`` / ``head_hidden_size``
        become the kept stage's width, and ``reset_classifier`` builds a head for it."""
        take, max_index = feature_take_indices(len(self.stages), indices)
        if max_index < len(self.stages) - 1:
            prune_norm = prune_head = True
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_norm:
            self.norm = self.new_module(nn.Identity())
        self.stages = self.stages[: max_index + 1]
        self.downsample_layers = self.downsample_layers[: max_index + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take

    @staticmethod
    def checkpoint_filter_fn(state_dict: dict, model: "BiFormer") -> dict:
        """Official checkpoints are ``{'model': state_dict}`` with our key layout."""
        if "model" in state_dict and isinstance(state_dict["model"], dict):
            state_dict = state_dict["model"]
        return dict(state_dict)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> BiFormer:
    kwargs.pop("img_size", None)  # any size works (auto_pad); accepted for API symmetry
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        BiFormer, "va_" + variant, pretrained, pretrained_filter_fn=BiFormer.checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs,
    )


def _cfg(**kwargs: Any) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "downsample_layers.0.0", "classifier": "head", "license": "mit",
        "paper_ids": "arXiv:2303.08810", "origin_url": "https://github.com/rayleizhu/BiFormer", **kwargs,
    }


# The official ImageNet-1k weights are distributed outside any hub; load a downloaded copy with
# create_model(name, checkpoint_path=...) or pretrained_cfg_overlay=dict(file=...).
default_cfgs = generate_default_cfgs({
    "va_biformer_tiny": _cfg(), "va_biformer_small": _cfg(), "va_biformer_base": _cfg(), "va_biformer_stl": _cfg(),
})


@register_model(task="classification", paper=PAPER, model_cls=BiFormer,
                reported=ReportedFigures(params_m=13.1, compute=2.2, metric="top-1", value=81.4, dataset="ImageNet-1k"))
def biformer_tiny(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    """BiFormer-T: depths 2,2,8,2; widths 64..512; MLP ratio 3."""
    args = dict(depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512), mlp_ratio=3.0)
    return _create("biformer_tiny", pretrained, **dict(args, **kwargs))


@register_model(task="classification", paper=PAPER, model_cls=BiFormer,
                reported=ReportedFigures(params_m=25.5, compute=4.5, metric="top-1", value=83.8, dataset="ImageNet-1k"))
def biformer_small(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    """BiFormer-S: depths 4,4,18,4; widths 64..512; MLP ratio 3."""
    args = dict(depths=(4, 4, 18, 4), embed_dims=(64, 128, 256, 512), mlp_ratio=3.0)
    return _create("biformer_small", pretrained, **dict(args, **kwargs))


@register_model(task="classification", paper=PAPER, model_cls=BiFormer,
                reported=ReportedFigures(params_m=56.8, compute=9.8, metric="top-1", value=84.3, dataset="ImageNet-1k"))
def biformer_base(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    """BiFormer-B: depths 4,4,18,4; widths 96..768; MLP ratio 3."""
    args = dict(depths=(4, 4, 18, 4), embed_dims=(96, 192, 384, 768), mlp_ratio=3.0)
    return _create("biformer_base", pretrained, **dict(args, **kwargs))


@register_model(task="classification", paper=PAPER, model_cls=BiFormer, notes="Swin-T layout ablation",
                reported=ReportedFigures(params_m=28.4, compute=4.6, metric="top-1", value=82.7, dataset="ImageNet-1k"))
def biformer_stl(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    """BiFormer-STL, the paper's ablation in Swin-T's layout: 4x4 patchify stem, BN + 2x2-conv downsampling,
    no conditional position encoding, depths 2,2,6,2, widths 96..768, MLP ratio 4."""
    args = dict(depths=(2, 2, 6, 2), embed_dims=(96, 192, 384, 768), mlp_ratio=4.0, stem="patch", cpe=False)
    return _create("biformer_stl", pretrained, **dict(args, **kwargs))
