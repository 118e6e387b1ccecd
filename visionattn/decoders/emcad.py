"""EMCAD: efficient multi-scale convolutional attention decoding, for any 4-level encoder.

Rahman, Munir & Marculescu, CVPR 2024, arXiv:2405.06880. Official code: SLDGroup/EMCAD
(``lib/decoders.py``, ``lib/networks.py``). Built as the official code builds it:

- per stage, deepest first: ``d4 = MSCAM(x4)``; then ``up = EUCB(d)``, ``g = LGAG(up, skip)``,
  ``d = MSCAM(up + g)``;
- MSCAM = CAB (x <- CAB(x) * x) -> SAB (x <- SAB(x) * x) -> MSCB, with **one SAB shared by all stages**;
- MSCB: 1x1 expand (factor 2) -> parallel depthwise 1x1/3x3/5x5 (summed) -> channel shuffle -> 1x1 project,
  residual; EUCB: nearest x2 upsampling -> depthwise 3x3 -> 1x1; LGAG: grouped 3x3 gate, one channel;
- four 1x1 heads, each upsampled (bilinear) to the input size; ``p1`` (stride 4) is the prediction. The
  official code returns ``[p4, p3, p2, p1]``; with ``deep_supervision=True`` this one returns them finest
  first, ``[p1, p2, p3, p4]``, the order ``monai.losses.DeepSupervisionLoss`` weights (1, 1/2, 1/4, 1/8);
  the MUTATION loss sums every subset, so the order does not matter to it.

Decoder sizes (heads excluded): 506,507 parameters on PVTv2-B0 channels, 1,913,515 on PVTv2-B2 channels.
MONAI conventions: ``spatial_dims, in_channels, out_channels`` first; logits out, one tensor in training and
in eval by default; deep supervision is opt-in (``deep_supervision=True``: the list above in training; only
then are the three auxiliary heads built, and weights saved with them load into a network without them).
Any input size works: sides that are not multiples of ``size_divisible`` (the encoder's stride, 32) are
zero-padded (bottom/right) and the logits cropped back, with shape arithmetic only, so ``torch.jit.script``,
``torch.export`` and ONNX graphs take any size.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from visionattn.layers.segmentation import crop_to, drop_deep_supervision_heads, pad_to_multiple
from visionattn.layers.shuffle import channel_shuffle
from visionattn.registry import ReportedFigures, register_model

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.jit.annotate(Optional[torch.Tensor], None)
        for branch in self.branches:
            y = branch(x)
            out = y if out is None else out + y
        assert out is not None
        return out


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

    def mlp(self, t: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(t)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.mlp(F.adaptive_avg_pool2d(x, 1)) + self.mlp(F.adaptive_max_pool2d(x, 1)))


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

    def forward(self, x: torch.Tensor, size: List[int]) -> torch.Tensor:
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

    def forward(self, x4: torch.Tensor, skips: List[torch.Tensor]) -> List[torch.Tensor]:
        d4 = self.mscams[0](x4)
        up = self.eucbs[0](d4, skips[0].shape[-2:])
        d3 = self.mscams[1](up + self.lgags[0](up, skips[0]))
        up = self.eucbs[1](d3, skips[1].shape[-2:])
        d2 = self.mscams[2](up + self.lgags[1](up, skips[1]))
        up = self.eucbs[2](d2, skips[2].shape[-2:])
        d1 = self.mscams[3](up + self.lgags[2](up, skips[2]))
        return [d4, d3, d2, d1]


class EMCADNet(nn.Module):
    """A 4-level encoder + EMCAD + its segmentation head(s).

    Args:
        spatial_dims: must be 2 (MONAI's first argument; EMCAD is 2-D).
        in_channels, out_channels: image channels and classes (MONAI naming). One-channel images pass
            through Conv1x1 -> BN -> ReLU to three channels first, as the official code does.
        encoder: a timm model name with ``features_only`` support and 4 levels (``pvt_v2_b0``,
            ``pvt_v2_b2``, ``va_biformer_tiny``, ...).
        pretrained_encoder: load the encoder's pretrained weights (from the hub or timm's cache).
        deep_supervision: build all four heads and return, in training, their four outputs finest first
            (``[p1, p2, p3, p4]``, all at the input size); off by default (one head, one tensor). Eval
            always returns ``p1``.

    ``forward``: ``[B, in_channels, H, W] -> [B, out_channels, H, W]`` logits for any ``H, W`` (zero-padded
    to multiples of :attr:`size_divisible`, the encoder's stride, and cropped back).
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 3, out_channels: int = 2, encoder: str = "pvt_v2_b2",
                 pretrained_encoder: bool = False, deep_supervision: bool = False, expansion: int = 2,
                 kernel_sizes: Sequence[int] = (1, 3, 5), encoder_out_indices: Sequence[int] | None = None):
        super().__init__()
        if spatial_dims != 2:
            raise ValueError(f"EMCAD is a 2-D network; got spatial_dims={spatial_dims}")
        import timm

        import visionattn  # noqa: F401  (registers the va_ encoders in timm)

        self.spatial_dims, self.in_channels, self.out_channels = 2, in_channels, out_channels
        self.deep_supervision = bool(deep_supervision)
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
        self.stride = self.size_divisible = int(max(self.encoder.feature_info.reduction()))
        self.decoder = EMCADDecoder(channels[::-1], expansion, kernel_sizes)
        # deepest first, as the decoder's stages (heads.3 is the prediction's under either setting); the
        # auxiliary heads are placeholders without deep supervision
        self.heads = nn.ModuleList(nn.Conv2d(c, out_channels, 1) if deep_supervision or i == 3 else nn.Identity()
                                   for i, c in enumerate(channels[::-1]))
        self.register_load_state_dict_pre_hook(drop_deep_supervision_heads)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"EMCADNet expects [B, {self.in_channels}, H, W], got {list(x.shape)}")
        size = x.shape[2:]
        x = pad_to_multiple(x, self.size_divisible)
        padded = x.shape[2:]
        feats = self.encoder(self.stem(x))  # [x1, x2, x3, x4]
        decoded = self.decoder(feats[3], [feats[2], feats[1], feats[0]])  # [d4, d3, d2, d1]
        finest = crop_to(F.interpolate(self.heads[-1](decoded[3]), size=padded, mode="bilinear",
                                        align_corners=False), size)
        if self.training and self.deep_supervision:
            outs = [finest]
            for i, head in enumerate(self.heads):  # deepest first: each goes in right after the finest
                if i < 3:
                    outs.insert(1, crop_to(F.interpolate(head(decoded[i]), size=padded, mode="bilinear",
                                                          align_corners=False), size))
            return outs
        return finest


def _soft_dice(logits: torch.Tensor, onehot: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Mean over classes (background included) of ``1 - (2I + s) / (sum p^2 + sum t^2 + s)``, sums over the
    batch; ``onehot``: ``[B, K, *spatial]`` (one-hot or class probabilities)."""
    probs = logits.softmax(1)
    dims = (0, *range(2, probs.ndim))
    inter = (probs * onehot).sum(dims)
    return (1 - (2 * inter + smooth) / ((probs * probs).sum(dims) + (onehot * onehot).sum(dims) + smooth)).mean()


def _mutation_target(target: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ce_target, onehot)`` for ``logits [B, K, *S]`` from class indices ``[B, 1, *S]`` / ``[B, *S]`` or
    one-hot (or class-probability) labels ``[B, K, *S]``; any other shape is refused by name."""
    B, K, spatial = logits.shape[0], logits.shape[1], tuple(logits.shape[2:])
    shape = tuple(target.shape)
    expected = (f"class indices [B, 1, *S] = {[B, 1, *spatial]} or [B, *S] = {[B, *spatial]}, or one-hot "
                f"[B, K, *S] = {[B, K, *spatial]}")
    if K < 2:
        raise ValueError(f"MutationLoss needs logits of at least 2 classes (softmax cross-entropy and Dice); got "
                         f"{K} channel(s) in {list(logits.shape)}")
    if shape == (B, *spatial):
        indices = target
    elif shape == (B, 1, *spatial):
        indices = target[:, 0]
    elif shape == (B, K, *spatial):
        onehot = target.to(logits.dtype)
        return onehot, onehot
    else:
        raise ValueError(f"MutationLoss: target {list(shape)} fits neither {expected}")
    if indices.is_floating_point():
        if not bool((indices == indices.round()).all()):
            raise ValueError(f"MutationLoss: a target of shape {list(shape)} holds class indices, but it has "
                             f"non-integer values; one-hot or probability targets need K = {K} channels")
    indices = indices.long()
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= K):
        raise ValueError(f"MutationLoss: class indices must lie in 0..{K - 1} for {K} output channels, got "
                         f"{int(indices.min())}..{int(indices.max())}")
    return indices, F.one_hot(indices, K).movedim(-1, 1).to(logits.dtype)


def mutation_loss(outputs: Sequence[torch.Tensor], target: torch.Tensor, ce_weight: float = 0.3,
                  dice_weight: float = 0.7) -> torch.Tensor:
    """MUTATION deep supervision (MERIT/EMCAD): for every non-empty subset of the head outputs, sum their
    logits and add ``ce_weight * CE + dice_weight * Dice``; the terms are summed, not averaged.

    ``outputs``: logits ``[B, K, *spatial]`` each, all the same shape (their order does not matter);
    ``target``: class indices ``[B, 1, *spatial]`` or ``[B, *spatial]``, or one-hot (or class-probability)
    labels ``[B, K, *spatial]``. With ``K = 1`` one-hot and index labels would look alike: refused, as is
    any other shape.
    """
    outputs = list(outputs)
    if not outputs:
        raise ValueError("MutationLoss: no outputs")
    for o in outputs[1:]:
        if o.shape != outputs[0].shape:
            raise ValueError(f"MutationLoss sums the head outputs, so they must have one shape; got "
                             f"{[list(t.shape) for t in outputs]}")
    ce_target, onehot = _mutation_target(target, outputs[0])
    total = outputs[0].new_zeros(())
    for r in range(1, len(outputs) + 1):
        for subset in itertools.combinations(outputs, r):
            logits = torch.stack(subset).sum(0)
            total = total + ce_weight * F.cross_entropy(logits, ce_target) + dice_weight * _soft_dice(logits, onehot)
    return total


class MutationLoss(nn.Module):
    """:func:`mutation_loss` as a module (usable as a recipe's ``loss``); a single tensor is one output.

    Targets: class indices ``[B, 1, *S]`` / ``[B, *S]`` or one-hot ``[B, K, *S]``. For the MUTATION
    terms the network must return its deep-supervision list (``deep_supervision=True``)."""

    takes_output_list = True  # the trainer passes deep-supervision outputs to it as they are

    def __init__(self, ce_weight: float = 0.3, dice_weight: float = 0.7):
        super().__init__()
        self.ce_weight, self.dice_weight = ce_weight, dice_weight

    def forward(self, outputs, target):
        outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
        return mutation_loss(outputs, target, self.ce_weight, self.dice_weight)


@register_model(task="segmentation", paper=PAPER, model_cls=EMCADNet, timm=False,
                notes="PVTv2-B0 encoder",
                reported=(ReportedFigures(params_m=3.92, compute=0.84, setting="256x256, 9 classes"),
                          ReportedFigures(params_m=0.507, setting="decoder alone")))
def emcad_pvt_v2_b0(pretrained: bool = False, **kwargs: Any) -> EMCADNet:
    """EMCAD on PVTv2-B0 (the paper's small model)."""
    if pretrained:
        raise ValueError("no EMCAD weights are distributed here; use pretrained_encoder=True for ImageNet encoder weights")
    return EMCADNet(**dict(dict(encoder="pvt_v2_b0"), **kwargs))


@register_model(task="segmentation", paper=PAPER, model_cls=EMCADNet, timm=False,
                notes="PVTv2-B2 encoder",
                reported=(ReportedFigures(params_m=26.76, compute=5.60, setting="256x256, 9 classes"),
                          ReportedFigures(params_m=1.91, setting="decoder alone")))
def emcad_pvt_v2_b2(pretrained: bool = False, **kwargs: Any) -> EMCADNet:
    """EMCAD on PVTv2-B2 (the paper's main model)."""
    if pretrained:
        raise ValueError("no EMCAD weights are distributed here; use pretrained_encoder=True for ImageNet encoder weights")
    return EMCADNet(**dict(dict(encoder="pvt_v2_b2"), **kwargs))
