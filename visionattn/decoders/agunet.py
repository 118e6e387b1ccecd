"""Attention-gated U-Nets (AGUNet), dual-attention U-Nets (DAUNet) and their guided variant (DAGUNet),
2-D and 3-D from one code path.

Bouget et al., Meningioma segmentation in T1-weighted MRI leveraging global context and attention
mechanisms, Front. Radiol. 2021, arXiv:2101.07715; code dbouget/mri_brain_tumor_segmentation (Keras,
inference only). Built as that code builds them:

- conv block: 2 x (conv 3 'same' -> BN -> ReLU -> spatial dropout); encoder levels max-pool by 2;
- multi-scale input: an average-pooled pyramid of the input, ``ReLU(conv3(s_i))`` (no BN) concatenated
  before every pooled encoder level i >= 1 (not the bottleneck, which matches the reference's size
  estimates: 18.7M / 25.8M / 31.0M for AGUNet / DAUNet / DAGUNet in 3-D);
- AGUNet decoder: transposed conv (stride 2) -> BN -> ReLU, an attention gate on the skip whose two
  1x1 projections are **concatenated** (not summed, unlike Oktay's), then a conv block on ``[up, gated]``;
- DAUNet: a dual-attention bottleneck (position attention, N x N, and channel attention, C x C, each with a
  zero-initialised residual scale), plain decoder ``[skip, up] -> BN -> ReLU -> conv block``;
- DAGUNet: DAUNet whose every decoder level also receives the bottleneck upsampled directly to it;
- deep supervision (opt-in): a 1x1 head per decoder level, finest first.

MONAI conventions: ``spatial_dims, in_channels, out_channels`` first; logits out (no softmax), one tensor in
training and in eval. ``deep_supervision=True`` (off by default, as in MONAI's ``DynUNet``) returns in
training a list finest first (at 1, 1/2, 1/4, ... of the input size: use
``monai.losses.DeepSupervisionLoss``); weights saved with deep supervision load into a network without it
(the auxiliary heads are dropped). Any input size works: sides that are not multiples of
``size_divisible = 2 ** (len(filters) - 1)`` are zero-padded (end of each axis) and the logits cropped back,
with shape arithmetic only, so ``torch.jit.script``, ``torch.export`` and ONNX graphs take any size.

``bottleneck_attention='neighborhood'`` replaces the N x N position attention with neighborhood attention
from :mod:`visionattn.kernels` (memory linear in N), so large volumes fit.
"""
from __future__ import annotations

from typing import Any, List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from visionattn.layers.segmentation import crop_to, drop_deep_supervision_heads, exporting, pad_to_multiple
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


def _window_index(positions: torch.Tensor, kernel_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """One axis of NATTEN's non-causal windows (stride 1, dilation 1) as ``(index [L, K], valid [L, K])``:
    query ``i`` sees keys ``start_i .. start_i + K - 1`` with ``start_i = clamp(i - K // 2, 0, L - K)``; on an
    axis shorter than ``K`` it sees the whole axis (the rest of its ``K`` slots are invalid). Computed from
    ``positions = arange(L)`` with tensor ops only, so exported graphs stay valid for every ``L``."""
    last = positions[-1:]  # L - 1, as a tensor
    start = torch.minimum((positions - kernel_size // 2).clamp(min=0), (last + 1 - kernel_size).clamp(min=0))
    index = start[:, None] + torch.arange(kernel_size, device=positions.device)[None, :]
    valid = index <= last
    return torch.minimum(index, last), valid


class PositionAttention(nn.Module):
    """DANet's position attention: ``gamma * softmax(q^T k) v + x`` over all voxels (``'global'``) or over a
    neighborhood of ``kernel_size`` voxels (``'neighborhood'``, linear memory). ``[B, C, *S] -> [B, C, *S]``.

    The neighborhood form runs :func:`visionattn.kernels.neighborhood_attention` (with autocast switched
    off around it and ``q, k, v`` in one dtype, so it works under ``torch.autocast``); scripted, traced or
    exported it computes the same windows with plain gathers (:meth:`windowed`), which those graphs hold."""

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
        q, k, v = self.query(x), self.key(x), self.value(x)
        if self.mode == "global":
            attn = torch.softmax(q.flatten(2).transpose(1, 2) @ k.flatten(2), dim=-1)  # [B, N, N]
            out = (v.flatten(2) @ attn.transpose(1, 2)).reshape(v.shape)
        elif torch.jit.is_scripting():
            out = self.windowed(q, k, v)
        elif exporting():
            out = self.windowed(q, k, v)
        else:
            out = self._kernel(q, k, v)
        return self.gamma * out + x

    @torch.jit.unused
    def _kernel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from visionattn.kernels import neighborhood_attention

        # the CPU kernel mixes its own float32 buffers with autocast's bfloat16 results: run it outside
        # autocast, on q, k, v of one dtype (autocast's convolutions make them all bfloat16 already)
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
        kernel = tuple(min(self.kernel_size, s) for s in q.shape[2:])
        heads_last = [t.to(dtype).movedim(1, -1).unsqueeze(-2) for t in (q, k, v)]  # [B, *S, 1, C]
        with torch.autocast(q.device.type, enabled=False):
            out = neighborhood_attention(*heads_last, kernel, scale=1.0)
        return out.squeeze(-2).movedim(-1, 1)

    def windowed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The neighborhood form with gathers and masking: the same windows as the kernel (NATTEN's, kernel
        ``min(kernel_size, side)`` per axis), ``O(N K^d C)`` memory. ``q, k [B, Cq, *S]``, ``v [B, C, *S]``."""
        K = self.kernel_size
        flat = torch.zeros(1, 1, dtype=torch.long, device=q.device)  # key index per (query, window slot)
        valid = torch.ones(1, 1, dtype=torch.bool, device=q.device)
        slots = 1
        for length in q.shape[2:]:
            index, ok = _window_index(torch.arange(length, device=q.device), K)
            flat = (flat[:, None, :, None] * length + index[None, :, None, :]).reshape(-1, slots * K)
            valid = (valid[:, None, :, None] & ok[None, :, None, :]).reshape(-1, slots * K)
            slots = slots * K
        # products and sums rather than einsum, whose reshapes torch.export would specialise on the batch size
        scores = (q.flatten(2).unsqueeze(-1) * k.flatten(2)[:, :, flat]).sum(1)  # [B, N, slots]
        scores = scores.masked_fill(~valid, float("-inf"))
        weights = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        out = (weights.unsqueeze(1) * v.flatten(2)[:, :, flat]).sum(-1)  # [B, C, N]
        return out.reshape(v.shape)


class ChannelAttention(nn.Module):
    """DANet's channel attention without convs: ``gamma * (A softmax(A^T A)) + x`` with ``A = x`` as ``[N, C]``."""

    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.flatten(2)  # [B, C, N]
        energy = torch.softmax(a @ a.transpose(1, 2), dim=-1)  # [B, C, C]
        return self.gamma * (energy @ a).reshape(x.shape) + x


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.position(x) + self.channel(x))


class AttentionUNet(nn.Module):
    """AGUNet / DAUNet / DAGUNet.

    Args:
        spatial_dims, in_channels, out_channels: MONAI's names, in MONAI's order.
        filters: per level, the last being the bottleneck (paper setting [guess]: 16, 32, 128, 256, 256).
        variant: ``'agunet'`` (attention gates), ``'daunet'`` (dual-attention bottleneck) or ``'dagunet'``
            (dual attention + the bottleneck fed to every decoder level).
        multiscale: the input pyramid.
        deep_supervision: build a 1x1 head per decoder level and return, in training, the list of their
            logits finest first (full size, 1/2, 1/4, ...; ``monai.losses.DeepSupervisionLoss``). Off by
            default (MONAI's ``DynUNet`` default): one head, one tensor.
        dropout: spatial dropout in conv blocks (the code's default: none).
        bottleneck_attention: ``'global'`` (N x N) or ``'neighborhood'`` (kernel ``attention_kernel``).

    ``forward``: ``[B, in_channels, *S] -> [B, out_channels, *S]`` logits for any ``S``: sides are
    zero-padded at their end to a multiple of :attr:`size_divisible` (``2 ** (len(filters) - 1)``) and the
    logits cropped back.
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2,
                 filters: Sequence[int] = (16, 32, 128, 256, 256), variant: str = "agunet", multiscale: bool = True,
                 deep_supervision: bool = False, dropout: float = 0.0, bottleneck_attention: str = "global",
                 attention_kernel: int = 7):
        super().__init__()
        if variant not in ("agunet", "daunet", "dagunet"):
            raise ValueError(f"variant must be 'agunet', 'daunet' or 'dagunet', got {variant!r}")
        if len(filters) < 2:
            raise ValueError(f"filters needs at least two levels (encoder + bottleneck), got {list(filters)}")
        Conv, BN, ConvT = _nd(spatial_dims, "Conv"), _nd(spatial_dims, "BatchNorm"), _nd(spatial_dims, "ConvTranspose")
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        self.variant, self.multiscale, self.deep_supervision = variant, multiscale, bool(deep_supervision)
        self.filters = list(filters)
        L = len(filters) - 1  # pooled encoder levels
        self.levels = L
        self.size_divisible = 2 ** L
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
            # the finest head always; the coarser ones only with deep supervision (placeholders keep the
            # finest head's weights under the same key, heads.{L-1}, either way)
            self.heads.append(Conv(f, out_channels, 1) if deep_supervision or i == 0 else nn.Identity())
            prev = f
        self.pool = _nd(spatial_dims, "MaxPool")(2)
        self.avg = _nd(spatial_dims, "AvgPool")(2)
        self.register_load_state_dict_pre_hook(drop_deep_supervision_heads)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"AttentionUNet({self.spatial_dims}-D) expects [B, {self.in_channels}, "
                             f"{', '.join(['X'] * self.spatial_dims)}], got {list(x.shape)}")
        size = x.shape[2:]
        x = pad_to_multiple(x, self.size_divisible)
        pyramid: List[torch.Tensor] = []  # the input pyramid for encoder levels 1 .. L-1
        scaled = x
        for conv in self.pyramid:
            scaled = self.avg(scaled)
            pyramid.append(conv(scaled))
        skips: List[torch.Tensor] = []
        h = x
        for i, encoder in enumerate(self.encoders):
            if i >= 1:
                h = self.pool(h)
                if i - 1 < len(pyramid):
                    h = torch.cat([h, pyramid[i - 1]], dim=1)
            h = encoder(h)
            skips.append(h)
        bottom = self.bottleneck_attention(skips.pop())
        h = bottom
        decoded: List[torch.Tensor] = []  # decoder levels, deepest first
        if self.variant == "agunet":
            for d, (up, gate, decoder) in enumerate(zip(self.ups, self.gates, self.decoders)):
                u = up(h)
                h = decoder(torch.cat([u, gate(u, skips[self.levels - 1 - d])], dim=1))
                decoded.append(h)
        elif self.variant == "dagunet":
            for d, (up, guide, decoder) in enumerate(zip(self.ups, self.guides, self.decoders)):
                h = decoder(torch.cat([guide(bottom), skips[self.levels - 1 - d], up(h)], dim=1))
                decoded.append(h)
        else:
            for d, (up, decoder) in enumerate(zip(self.ups, self.decoders)):
                h = decoder(torch.cat([skips[self.levels - 1 - d], up(h)], dim=1))
                decoded.append(h)
        finest = crop_to(self.heads[-1](h), size)
        if self.training and self.deep_supervision:
            outs = [finest]
            for d, head in enumerate(self.heads):
                scale = 1 << (self.levels - 1 - d)
                if scale > 1:  # coarser levels, deepest first: each goes in right after the finest
                    outs.insert(1, crop_to(head(decoded[d]), [-(-s // scale) for s in size]))
            return outs
        return finest


def _build(variant: str, spatial_dims: int, pretrained: bool, kwargs: dict[str, Any]) -> AttentionUNet:
    """The registered constructors' body: ``variant`` and ``spatial_dims`` fixed by the name, ``kwargs`` on top."""
    if pretrained:
        raise ValueError("no pretrained weights are distributed for this model; train it with `visionattn train`")
    return AttentionUNet(**dict(dict(spatial_dims=spatial_dims, variant=variant), **kwargs))


NOTES = ("filters [16, 32, 128, 256, 256] ([guess]); multi-scale input on; deep supervision off by default "
         "(deep_supervision=True: one output per decoder level, finest first)")
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
