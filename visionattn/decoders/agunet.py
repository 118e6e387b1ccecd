"""Attention-gated U-Nets (AGUNet), dual-attention U-Nets (DAUNet) and their guided variant (DAGUNet),
2-D and 3-D from one code path.

Bouget et al., Meningioma segmentation in T1-weighted MRI leveraging global context and attention
mechanisms, Front. Radiol. 2021, arXiv:2101.07715; code dbouget/mri_brain_tumor_segmentation (Keras,
inference only). Built as that code builds them (``shared/reference/decoders_detectors.md`` section 3):

- conv block: 2 x (conv 3 'same' -> BN -> ReLU -> spatial dropout); encoder levels max-pool by 2;
- multi-scale input: an average-pooled pyramid of the input, ``ReLU(conv3(s_i))`` (no BN) concatenated
  before every pooled encoder level i >= 1 (not the bottleneck, which matches the reference's size
  estimates: 18.7M / 25.8M / 31.0M for AGUNet / DAUNet / DAGUNet in 3-D);
- AGUNet decoder: transposed conv (stride 2) -> BN -> ReLU, an attention gate on the skip whose two
  1x1 projections are **concatenated** (not summed, unlike Oktay's), then a conv block on ``[up, gated]``;
- DAUNet: a dual-attention bottleneck (position attention, N x N, and channel attention, C x C, each with a
  zero-initialised residual scale), plain decoder ``[skip, up] -> BN -> ReLU -> conv block``;
- DAGUNet: DAUNet whose every decoder level also receives the bottleneck upsampled directly to it;
- deep supervision: a 1x1 head per decoder level, finest first.

MONAI conventions: ``spatial_dims, in_channels, out_channels``; logits out (no softmax); a list in training
(finest first, at 1, 1/2, 1/4, ... of the input size: use ``monai.losses.DeepSupervisionLoss``) and the
finest logits in eval. Inputs whose sides are not multiples of ``2 ** (len(filters) - 1)`` are zero-padded
(end of each axis) and the logits cropped back.

``bottleneck_attention='neighborhood'`` replaces the N x N position attention with neighborhood attention
from :mod:`visionattn.kernels` (memory linear in N), so large volumes fit.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from visionattn.registry import register_model

__all__ = ["AttentionGate", "DualAttention", "AttentionUNet"]

PAPER = "Bouget et al., Meningioma segmentation in T1-weighted MRI leveraging global context and attention mechanisms, Front. Radiol. 2021, arXiv:2101.07715"


def _nd(spatial_dims: int, name: str):
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return getattr(nn, f"{name}{spatial_dims}d")


class ConvBlock(nn.Sequential):
    """2 x (conv 3 -> BN -> ReLU -> spatial dropout)."""

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int, dropout: float = 0.0):
        Conv, BN, Drop = _nd(spatial_dims, "Conv"), _nd(spatial_dims, "BatchNorm"), _nd(spatial_dims, "Dropout")
        layers: list[nn.Module] = []
        for c_in in (in_ch, out_ch):
            layers += [Conv(c_in, out_ch, 3, padding=1), BN(out_ch), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(Drop(dropout))
        super().__init__(*layers)


class AttentionGate(nn.Module):
    """``x * sigmoid(BN(conv1(ReLU(cat[BN(conv1 g), BN(conv1 x)]))))``: a one-channel gate on the skip ``x``
    from the upsampled decoder feature ``g`` (same resolution)."""

    def __init__(self, spatial_dims: int, g_ch: int, x_ch: int, inter_ch: int):
        super().__init__()
        Conv, BN = _nd(spatial_dims, "Conv"), _nd(spatial_dims, "BatchNorm")
        self.w_g = nn.Sequential(Conv(g_ch, inter_ch, 1), BN(inter_ch))
        self.w_x = nn.Sequential(Conv(x_ch, inter_ch, 1), BN(inter_ch))
        self.psi = nn.Sequential(Conv(2 * inter_ch, 1, 1), BN(1), nn.Sigmoid())

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * self.psi(F.relu(torch.cat([self.w_g(g), self.w_x(x)], dim=1)))


class PositionAttention(nn.Module):
    """DANet's position attention: ``gamma * softmax(q^T k) v + x`` over all voxels (``'global'``) or over a
    neighborhood of ``kernel_size`` voxels (``'neighborhood'``, linear memory). ``[B, C, *S] -> [B, C, *S]``."""

    def __init__(self, spatial_dims: int, channels: int, mode: str = "global", kernel_size: int = 7):
        super().__init__()
        if mode not in ("global", "neighborhood"):
            raise ValueError(f"bottleneck_attention must be 'global' or 'neighborhood', got {mode!r}")
        Conv = _nd(spatial_dims, "Conv")
        self.mode, self.kernel_size, self.spatial_dims = mode, kernel_size, spatial_dims
        self.query = Conv(channels, max(1, channels // 8), 1, bias=False)
        self.key = Conv(channels, max(1, channels // 8), 1, bias=False)
        self.value = Conv(channels, channels, 1, bias=False)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, *S = x.shape
        q, k, v = self.query(x), self.key(x), self.value(x)
        if self.mode == "global":
            attn = torch.softmax(q.flatten(2).transpose(1, 2) @ k.flatten(2), dim=-1)  # [B, N, N]
            out = (v.flatten(2) @ attn.transpose(1, 2)).view(B, C, *S)
        else:
            from visionattn.kernels import neighborhood_attention

            def heads_last(t):  # [B, C, *S] -> [B, *S, 1, C]
                return t.movedim(1, -1).unsqueeze(-2)

            kernel = tuple(min(self.kernel_size, s) for s in S)
            out = neighborhood_attention(heads_last(q), heads_last(k), heads_last(v), kernel, scale=1.0)
            out = out.squeeze(-2).movedim(-1, 1)
        return self.gamma * out + x


class ChannelAttention(nn.Module):
    """DANet's channel attention without convs: ``gamma * (A softmax(A^T A)) + x`` with ``A = x`` as ``[N, C]``."""

    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, *S = x.shape
        a = x.flatten(2)  # [B, C, N]
        energy = torch.softmax(a @ a.transpose(1, 2), dim=-1)  # [B, C, C]
        return self.gamma * (energy @ a).view(B, C, *S) + x


class DualAttention(nn.Module):
    """Position and channel branches (attention -> conv3 -> BN -> ReLU -> dropout 0.5 -> conv3), summed,
    then dropout 0.5 -> conv1 -> BN. ``[B, C, *S] -> [B, C, *S]``."""

    def __init__(self, spatial_dims: int, channels: int, mode: str = "global", kernel_size: int = 7, dropout: float = 0.5):
        super().__init__()
        Conv, BN, Drop = _nd(spatial_dims, "Conv"), _nd(spatial_dims, "BatchNorm"), _nd(spatial_dims, "Dropout")

        def branch(att):
            return nn.Sequential(att, Conv(channels, channels, 3, padding=1), BN(channels), nn.ReLU(inplace=True),
                                 Drop(dropout), Conv(channels, channels, 3, padding=1))

        self.position = branch(PositionAttention(spatial_dims, channels, mode, kernel_size))
        self.channel = branch(ChannelAttention())
        self.fuse = nn.Sequential(Drop(dropout), Conv(channels, channels, 1), BN(channels))

    def forward(self, x):
        return self.fuse(self.position(x) + self.channel(x))


class AttentionUNet(nn.Module):
    """AGUNet / DAUNet / DAGUNet.

    Args:
        spatial_dims, in_channels, out_channels: MONAI's names.
        filters: per level, the last being the bottleneck (paper setting [guess]: 16, 32, 128, 256, 256).
        variant: ``'agunet'`` (attention gates), ``'daunet'`` (dual-attention bottleneck) or ``'dagunet'``
            (dual attention + the bottleneck fed to every decoder level).
        multiscale: the input pyramid; deep_supervision: one output per decoder level in training.
        dropout: spatial dropout in conv blocks (the code's default: none).
        bottleneck_attention: ``'global'`` (N x N) or ``'neighborhood'`` (kernel ``attention_kernel``).
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2,
                 filters: Sequence[int] = (16, 32, 128, 256, 256), variant: str = "agunet", multiscale: bool = True,
                 deep_supervision: bool = True, dropout: float = 0.0, bottleneck_attention: str = "global",
                 attention_kernel: int = 7):
        super().__init__()
        if variant not in ("agunet", "daunet", "dagunet"):
            raise ValueError(f"variant must be 'agunet', 'daunet' or 'dagunet', got {variant!r}")
        if len(filters) < 2:
            raise ValueError(f"filters needs at least two levels (encoder + bottleneck), got {list(filters)}")
        Conv, BN, ConvT = _nd(spatial_dims, "Conv"), _nd(spatial_dims, "BatchNorm"), _nd(spatial_dims, "ConvTranspose")
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        self.variant, self.multiscale, self.deep_supervision = variant, multiscale, deep_supervision
        self.filters = list(filters)
        L = len(filters) - 1  # pooled encoder levels
        self.levels = L
        self.encoders = nn.ModuleList()
        self.pyramid = nn.ModuleList()
        for i, f in enumerate(filters):
            pyramid_level = multiscale and 1 <= i < L  # encoder levels only, not the bottleneck
            extra = f if pyramid_level else 0
            c_in = in_channels if i == 0 else filters[i - 1]
            self.encoders.append(ConvBlock(spatial_dims, c_in + extra, f, dropout))
            if pyramid_level:
                self.pyramid.append(nn.Sequential(Conv(in_channels, f, 3, padding=1), nn.ReLU(inplace=True)))
        self.bottleneck_attention = (DualAttention(spatial_dims, filters[-1], bottleneck_attention, attention_kernel)
                                     if variant in ("daunet", "dagunet") else nn.Identity())
        self.ups = nn.ModuleList()
        self.gates = nn.ModuleList()
        self.guides = nn.ModuleList()
        self.decoders = nn.ModuleList()
        self.heads = nn.ModuleList()
        prev = filters[-1]
        for depth, i in enumerate(reversed(range(L))):  # decoder levels, deepest first
            f = filters[i]
            if variant == "agunet":
                self.ups.append(nn.Sequential(ConvT(prev, f, 3, stride=2, padding=1, output_padding=1), BN(f), nn.ReLU(inplace=True)))
                self.gates.append(AttentionGate(spatial_dims, f, f, max(1, f // 2)))
                self.decoders.append(ConvBlock(spatial_dims, 2 * f, f, dropout))
            else:
                self.ups.append(ConvT(prev, f, 3, stride=2, padding=1, output_padding=1))
                guide = 0
                if variant == "dagunet":
                    s = 2 ** (depth + 1)
                    self.guides.append(ConvT(filters[-1], f, 3, stride=s, padding=1, output_padding=s - 1))
                    guide = f
                self.decoders.append(nn.Sequential(BN(guide + 2 * f), nn.ReLU(inplace=True),
                                                   ConvBlock(spatial_dims, guide + 2 * f, f, dropout)))
            self.heads.append(Conv(f, out_channels, 1))
            prev = f
        self.pool = _nd(spatial_dims, "MaxPool")(2)
        self.avg = _nd(spatial_dims, "AvgPool")(2)

    def forward(self, x: torch.Tensor):
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"AttentionUNet({self.spatial_dims}-D) expects [B, {self.in_channels}, "
                f"{', '.join(['X'] * self.spatial_dims)}], got {tuple(x.shape)}"
            )
        size = x.shape[2:]
        m = 2 ** self.levels
        pad = [p for s in reversed(size) for p in (0, (-s) % m)]
        if any(pad):
            x = F.pad(x, pad)
        scaled = x
        skips = []
        h = x
        for i, enc in enumerate(self.encoders):
            if i >= 1:
                h = self.pool(h)
                if self.multiscale and i < self.levels:
                    scaled = self.avg(scaled)
                    h = torch.cat([h, self.pyramid[i - 1](scaled)], dim=1)
            h = enc(h)
            if i < self.levels:
                skips.append(h)
        bottom = self.bottleneck_attention(h)
        h = bottom
        outs = []
        for d in range(self.levels):
            skip = skips[self.levels - 1 - d]
            up = self.ups[d](h)
            if self.variant == "agunet":
                h = self.decoders[d](torch.cat([up, self.gates[d](up, skip)], dim=1))
            else:
                parts = ([self.guides[d](bottom)] if self.variant == "dagunet" else []) + [skip, up]
                h = self.decoders[d](torch.cat(parts, dim=1))
            outs.append(self.heads[d](h))
        crop = tuple(slice(None, s) for s in size)
        finest = outs[-1][(Ellipsis, *crop)]
        if self.training and self.deep_supervision:
            coarse = [o[(Ellipsis, *tuple(slice(None, -(-s // 2 ** (self.levels - 1 - d))) for s in size))]
                      for d, o in enumerate(outs[:-1])]
            return [finest] + coarse[::-1]  # finest first
        return finest


def _build(variant: str, spatial_dims: int, pretrained: bool, kwargs: dict[str, Any]) -> AttentionUNet:
    """The registered constructors' body: ``variant`` and ``spatial_dims`` fixed by the name, ``kwargs`` on top."""
    if pretrained:
        raise ValueError("no pretrained weights are distributed for this model; train it with `visionattn train`")
    return AttentionUNet(**dict(dict(spatial_dims=spatial_dims, variant=variant), **kwargs))


NOTES = "filters [16, 32, 128, 256, 256] ([guess]); multi-scale input and deep supervision on"
INPUT_2D = (1, 256, 256)
INPUT_3D = (1, 128, 128, 144)


@register_model(task="segmentation", paper=PAPER, model_cls=AttentionUNet, timm=False, input_size=INPUT_2D, notes=NOTES)
def agunet_2d(pretrained: bool = False, **kwargs: Any) -> AttentionUNet:
    """AGUNet (2-D), filters 16, 32, 128, 256, 256 by default."""
    return _build("agunet", 2, pretrained, kwargs)


@register_model(task="segmentation", paper=PAPER, model_cls=AttentionUNet, timm=False, input_size=INPUT_3D, notes=NOTES)
def agunet_3d(pretrained: bool = False, **kwargs: Any) -> AttentionUNet:
    """AGUNet (3-D), filters 16, 32, 128, 256, 256 by default."""
    return _build("agunet", 3, pretrained, kwargs)


@register_model(task="segmentation", paper=PAPER, model_cls=AttentionUNet, timm=False, input_size=INPUT_2D, notes=NOTES)
def daunet_2d(pretrained: bool = False, **kwargs: Any) -> AttentionUNet:
    """DAUNet (2-D), filters 16, 32, 128, 256, 256 by default."""
    return _build("daunet", 2, pretrained, kwargs)


@register_model(task="segmentation", paper=PAPER, model_cls=AttentionUNet, timm=False, input_size=INPUT_3D, notes=NOTES)
def daunet_3d(pretrained: bool = False, **kwargs: Any) -> AttentionUNet:
    """DAUNet (3-D), filters 16, 32, 128, 256, 256 by default."""
    return _build("daunet", 3, pretrained, kwargs)


@register_model(task="segmentation", paper=PAPER, model_cls=AttentionUNet, timm=False, input_size=INPUT_2D, notes=NOTES)
def dagunet_2d(pretrained: bool = False, **kwargs: Any) -> AttentionUNet:
    """DAGUNet (2-D), filters 16, 32, 128, 256, 256 by default."""
    return _build("dagunet", 2, pretrained, kwargs)


@register_model(task="segmentation", paper=PAPER, model_cls=AttentionUNet, timm=False, input_size=INPUT_3D, notes=NOTES)
def dagunet_3d(pretrained: bool = False, **kwargs: Any) -> AttentionUNet:
    """DAGUNet (3-D), filters 16, 32, 128, 256, 256 by default."""
    return _build("dagunet", 3, pretrained, kwargs)
