"""EMCAD: efficient multi-scale convolutional attention decoding, for any 4-level encoder.

Rahman, Munir & Marculescu, CVPR 2024, arXiv:2405.06880. Official code: SLDGroup/EMCAD
(``lib/decoders.py``, ``lib/networks.py``). Built as the official code builds it (``shared/reference/
decoders_detectors.md`` section 1):

- per stage, deepest first: ``d4 = MSCAM(x4)``; then ``up = EUCB(d)``, ``g = LGAG(up, skip)``,
  ``d = MSCAM(up + g)``;
- MSCAM = CAB (x <- CAB(x) * x) -> SAB (x <- SAB(x) * x) -> MSCB, with **one SAB shared by all stages**;
- MSCB: 1x1 expand (factor 2) -> parallel depthwise 1x1/3x3/5x5 (summed) -> channel shuffle -> 1x1 project,
  residual; EUCB: nearest x2 upsampling -> depthwise 3x3 -> 1x1; LGAG: grouped 3x3 gate, one channel;
- four 1x1 heads, each upsampled (bilinear) to the input size; outputs deepest first ``[p4, p3, p2, p1]``,
  ``p1`` (stride 4) being the prediction.

Decoder sizes (heads excluded): 506,507 parameters on PVTv2-B0 channels, 1,913,515 on PVTv2-B2 channels.
MONAI conventions: ``in_channels``, ``out_channels``; logits out; a list in training (deep supervision),
the final map in eval. Inputs whose sides are not multiples of 32 are zero-padded (bottom/right) and the
logits cropped back.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from visionattn.layers.shuffle import channel_shuffle
from visionattn.registry import register_model

__all__ = ["EMCADDecoder", "EMCADNet", "MutationLoss", "mutation_loss"]

PAPER = "Rahman, Munir & Marculescu, EMCAD: Efficient Multi-scale Convolutional Attention Decoding for Medical Image Segmentation, CVPR 2024, arXiv:2405.06880"


class MSDC(nn.Module):
    """Parallel depthwise convolutions (kernels ``kernel_sizes``), each -> BN -> ReLU6, summed."""

    def __init__(self, channels: int, kernel_sizes: Sequence[int] = (1, 3, 5)):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, k, 1, k // 2, groups=channels, bias=False),
                          nn.BatchNorm2d(channels), nn.ReLU6(inplace=True))
            for k in kernel_sizes
        )

    def forward(self, x):
        return sum(branch(x) for branch in self.branches)


class MSCB(nn.Module):
    """Multi-scale convolution block: expand (1x1) -> MSDC -> shuffle -> project (1x1), plus the input."""

    def __init__(self, in_channels: int, out_channels: int, expansion: int = 2, kernel_sizes: Sequence[int] = (1, 3, 5)):
        super().__init__()
        hidden = in_channels * expansion
        self.expand = nn.Sequential(nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True))
        self.msdc = MSDC(hidden, kernel_sizes)
        self.shuffle_groups = math.gcd(hidden, out_channels)
        self.project = nn.Sequential(nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels else nn.Identity()

    def forward(self, x):
        y = channel_shuffle(self.msdc(self.expand(x)), self.shuffle_groups)
        return self.skip(x) + self.project(y)


class CAB(nn.Module):
    """Channel attention map ``[B, C, 1, 1]`` from average- and max-pooled features through one shared MLP."""

    def __init__(self, channels: int, ratio: int = 16):
        super().__init__()
        ratio = channels if channels < ratio else ratio
        self.fc1 = nn.Conv2d(channels, channels // ratio, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // ratio, channels, 1, bias=False)

    def forward(self, x):
        mlp = lambda t: self.fc2(F.relu(self.fc1(t)))  # noqa: E731
        return torch.sigmoid(mlp(F.adaptive_avg_pool2d(x, 1)) + mlp(F.adaptive_max_pool2d(x, 1)))


class SAB(nn.Module):
    """Spatial attention map ``[B, 1, H, W]`` from the channel mean and max (7x7 conv)."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        if kernel_size not in (3, 7, 11):
            raise ValueError(f"SAB kernel_size must be 3, 7 or 11, got {kernel_size}")
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x):
        return torch.sigmoid(self.conv(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)))


class MSCAM(nn.Module):
    """CAB, then the (shared) SAB, then MSCB. ``[B, C, H, W] -> [B, C, H, W]``."""

    def __init__(self, channels: int, sab: SAB, expansion: int = 2, kernel_sizes: Sequence[int] = (1, 3, 5)):
        super().__init__()
        self.cab = CAB(channels)
        self.sab = sab
        self.mscb = MSCB(channels, channels, expansion, kernel_sizes)

    def forward(self, x):
        x = self.cab(x) * x
        x = self.sab(x) * x
        return self.mscb(x)


class EUCB(nn.Module):
    """Efficient up-convolution: nearest upsampling to ``size`` (the skip's, twice the input's) -> depthwise
    3x3 -> BN -> ReLU -> 1x1 (bias). ``[B, in, H, W] -> [B, out, *size]``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.dwconv = nn.Sequential(nn.Conv2d(in_channels, in_channels, 3, 1, 1, groups=in_channels, bias=False),
                                    nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True))
        self.pwconv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x, size: tuple[int, int]):
        x = F.interpolate(x, size=size, mode="nearest")
        return self.pwconv(self.dwconv(x))  # the shuffle with groups = channels is the identity


class LGAG(nn.Module):
    """Large-kernel grouped attention gate: ``x * sigmoid(BN(conv1x1(relu(W_g g + W_x x))))``."""

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        inter = channels // 2
        groups = inter if kernel_size > 1 else 1
        self.w_g = nn.Sequential(nn.Conv2d(channels, inter, kernel_size, 1, kernel_size // 2, groups=groups), nn.BatchNorm2d(inter))
        self.w_x = nn.Sequential(nn.Conv2d(channels, inter, kernel_size, 1, kernel_size // 2, groups=groups), nn.BatchNorm2d(inter))
        self.psi = nn.Sequential(nn.Conv2d(inter, 1, 1), nn.BatchNorm2d(1), nn.Sigmoid())

    def forward(self, g, x):
        return x * self.psi(F.relu(self.w_g(g) + self.w_x(x)))


class EMCADDecoder(nn.Module):
    """The EMCAD decoder. ``channels``: encoder widths deepest first (``[C4, C3, C2, C1]``).

    ``forward(x4, [x3, x2, x1]) -> [d4, d3, d2, d1]`` (strides 32, 16, 8, 4 for a standard encoder).
    """

    def __init__(self, channels: Sequence[int], expansion: int = 2, kernel_sizes: Sequence[int] = (1, 3, 5),
                 lgag_kernel: int = 3, sab_kernel: int = 7):
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"EMCAD needs 4 encoder levels, got channels {list(channels)}")
        self.sab = SAB(sab_kernel)
        self.mscams = nn.ModuleList(MSCAM(c, self.sab, expansion, kernel_sizes) for c in channels)
        self.eucbs = nn.ModuleList(EUCB(channels[i], channels[i + 1]) for i in range(3))
        self.lgags = nn.ModuleList(LGAG(channels[i + 1], lgag_kernel) for i in range(3))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:  # the official 'normal' scheme
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x4: torch.Tensor, skips: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        d = self.mscams[0](x4)
        outs = [d]
        for i in range(3):
            up = self.eucbs[i](d, size=tuple(skips[i].shape[-2:]))
            d = self.mscams[i + 1](up + self.lgags[i](up, skips[i]))
            outs.append(d)
        return outs


class EMCADNet(nn.Module):
    """A 4-level encoder + EMCAD + four segmentation heads.

    Args:
        in_channels, out_channels: image channels and classes (MONAI naming). One-channel images pass
            through Conv1x1 -> BN -> ReLU to three channels first, as the official code does.
        encoder: a timm model name with ``features_only`` support and 4 levels (``pvt_v2_b0``,
            ``pvt_v2_b2``, ``va_biformer_tiny``, ...).
        pretrained_encoder: load the encoder's pretrained weights (from the hub or timm's cache).
        deep_supervision: in training return all four outputs (deepest first); eval returns the last.

    ``forward``: ``[B, in_channels, H, W] -> [B, out_channels, H, W]`` logits (a list of four in training).
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 3, out_channels: int = 2, encoder: str = "pvt_v2_b2",
                 pretrained_encoder: bool = False, deep_supervision: bool = True, expansion: int = 2,
                 kernel_sizes: Sequence[int] = (1, 3, 5), encoder_out_indices: Sequence[int] | None = None):
        super().__init__()
        if spatial_dims != 2:
            raise ValueError(f"EMCAD is a 2-D network; got spatial_dims={spatial_dims}")
        import timm

        import visionattn  # noqa: F401  (registers the va_ encoders in timm)

        self.in_channels, self.out_channels, self.deep_supervision = in_channels, out_channels, deep_supervision
        self.stem = (nn.Sequential(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3), nn.ReLU(inplace=True)) if in_channels == 1
                     else nn.Identity())
        enc_in = 3 if in_channels == 1 else in_channels
        kwargs: dict[str, Any] = dict(features_only=True, pretrained=pretrained_encoder, in_chans=enc_in)
        if encoder_out_indices is not None:
            kwargs["out_indices"] = tuple(encoder_out_indices)
        self.encoder = timm.create_model(encoder, **kwargs)
        channels = self.encoder.feature_info.channels()
        if len(channels) != 4:
            raise ValueError(f"encoder {encoder!r} gives {len(channels)} feature levels; EMCAD needs 4 "
                             "(pass encoder_out_indices to pick them)")
        self.stride = max(self.encoder.feature_info.reduction())
        self.decoder = EMCADDecoder(channels[::-1], expansion, kernel_sizes)
        self.heads = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in channels[::-1])

    def forward(self, x: torch.Tensor):
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"EMCADNet expects [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        pad_h, pad_w = (-H) % self.stride, (-W) % self.stride
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        feats = self.encoder(self.stem(x))  # [x1, x2, x3, x4]
        decoded = self.decoder(feats[3], [feats[2], feats[1], feats[0]])
        size = x.shape[-2:]
        outs = [F.interpolate(head(d), size=size, mode="bilinear", align_corners=False)[..., :H, :W]
                for head, d in zip(self.heads, decoded)]
        if self.training and self.deep_supervision:
            return outs
        return outs[-1]


def _soft_dice(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Mean over classes (background included) of ``1 - (2I + s) / (sum p^2 + sum t^2 + s)``, sums over the batch."""
    probs = logits.softmax(1)
    onehot = F.one_hot(target, probs.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = (0, *range(2, probs.ndim))
    inter = (probs * onehot).sum(dims)
    return (1 - (2 * inter + smooth) / ((probs * probs).sum(dims) + (onehot * onehot).sum(dims) + smooth)).mean()


def mutation_loss(outputs: Sequence[torch.Tensor], target: torch.Tensor, ce_weight: float = 0.3,
                  dice_weight: float = 0.7) -> torch.Tensor:
    """MUTATION deep supervision (MERIT/EMCAD): for every non-empty subset of the head outputs, sum their
    logits and add ``ce_weight * CE + dice_weight * Dice``; the terms are summed, not averaged.

    ``outputs``: logits ``[B, K, *spatial]`` each; ``target``: ``[B, *spatial]`` or ``[B, 1, *spatial]`` labels.
    """
    if target.ndim == outputs[0].ndim:
        target = target[:, 0]
    target = target.long()
    total = outputs[0].new_zeros(())
    for r in range(1, len(outputs) + 1):
        for subset in itertools.combinations(outputs, r):
            logits = torch.stack(subset).sum(0)
            total = total + ce_weight * F.cross_entropy(logits, target) + dice_weight * _soft_dice(logits, target)
    return total


class MutationLoss(nn.Module):
    """:func:`mutation_loss` as a module (usable as a recipe's ``loss``); a single tensor is one output."""

    takes_output_list = True  # the trainer passes deep-supervision outputs to it as they are

    def __init__(self, ce_weight: float = 0.3, dice_weight: float = 0.7):
        super().__init__()
        self.ce_weight, self.dice_weight = ce_weight, dice_weight

    def forward(self, outputs, target):
        outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
        return mutation_loss(outputs, target, self.ce_weight, self.dice_weight)


@register_model(task="segmentation", paper=PAPER, model_cls=EMCADNet, timm=False,
                notes="PVTv2-B0 encoder: decoder 0.507M params; full model 3.92M, 0.84G MACs at 256 (paper)")
def emcad_pvt_v2_b0(pretrained: bool = False, **kwargs: Any) -> EMCADNet:
    """EMCAD on PVTv2-B0 (the paper's small model)."""
    if pretrained:
        raise ValueError("no EMCAD weights are distributed here; use pretrained_encoder=True for ImageNet encoder weights")
    return EMCADNet(**dict(dict(encoder="pvt_v2_b0"), **kwargs))


@register_model(task="segmentation", paper=PAPER, model_cls=EMCADNet, timm=False,
                notes="PVTv2-B2 encoder: decoder 1.91M params; full model 26.76M, 5.60G MACs at 256 (paper)")
def emcad_pvt_v2_b2(pretrained: bool = False, **kwargs: Any) -> EMCADNet:
    """EMCAD on PVTv2-B2 (the paper's main model)."""
    if pretrained:
        raise ValueError("no EMCAD weights are distributed here; use pretrained_encoder=True for ImageNet encoder weights")
    return EMCADNet(**dict(dict(encoder="pvt_v2_b2"), **kwargs))
