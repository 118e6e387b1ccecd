"""DFIR-DETR: RT-DETR with dynamic K-sparse attention in the backbone, a dynamic feature pyramid and
frequency-domain refinement in the neck.

Gao, Tong, Chen, Yu & Li, "Frequency Domain Enhancement and Dynamic Feature Aggregation for Cross-Scene
Small Object Detection" (v1; v2 retitled "Frequency-Domain Iterative Refinement ..."), arXiv:2512.07078.
Reported: NEU-DET mAP50 92.9, VisDrone mAP50 51.6, 11.7M params, 41.2 GFLOPs at 640 (a v2 listing says 47.2).

**Only the DCFA equations are public** (quoted by a third-party review); there is no public code. Everything
else follows the most plausible reading of the paper's text and figures, and every
guessed part says so (``[guess]``) in its docstring. The RT-DETR parts are unchanged and come from the
DETR toolkit (:mod:`visionattn.detectors.detr`): the hybrid encoder's shell with AIFI, IoU-aware query
selection, the 3-layer deformable decoder, denoising, the Hungarian matcher and the varifocal/L1/GIoU losses.

- backbone [guess: widths and depths]: a YOLOv8-style CSP backbone (3x3 stride-2 convs, C2f stages with
  bottleneck blocks), whose two deepest stages (P4, P5) use DCFA, C2f with DAFB blocks [paper];
- DAFB [paper: ``H = X + DWSepConv(X); Z = SGLU(H + DKSA(H))``; guess: pre-norms and a residual around the
  SGLU]; DKSA keeps the top ``K = ceil(rho N)`` scores per query [paper]; ``rho`` adapts to the input by mixing
  the attention maps of the ratios 1/2, 2/3, 3/4, 4/5 with per-image weights from the pooled feature [guess];
- DFPN [guess]: RT-DETR's top-down/bottom-up topology with amplitude-normalised upsampling followed by a
  dual-path shuffle convolution, and a stride-2 dual-path shuffle convolution as the downsampling;
- FIRC3 [guess]: RepC3's shell whose blocks refine the features in the frequency domain
  (``torch.fft.rfft2``, an AFNO-style complex MLP with soft shrinkage, iterated) before a RepVGG block.

Sized to the paper: ``dfir_detr`` has 11.70M parameters (80 classes; 11.61M with NEU-DET's 6) and 40.2
GFLOPs at 640 as ``torch.utils.flop_counter`` counts them (the FFTs and the top-K selection are not
counted). On a CPU the per-row top-K selection is the largest cost: one 640x640 image takes about 1.2x
RT-DETR-R18's time on one thread (``visionattn bench detectors --threads 1``; the README's table), although
it needs 0.66x the FLOPs.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

from visionattn.detectors.detr import ConvNormAct, DecoderConfig, DETRDetector, HybridEncoder, RepVGGBlock
from visionattn.kernels import topk_attention
from visionattn.layers.shuffle import channel_shuffle
from visionattn.registry import ReportedFigures, register_model

__all__ = [
    "C2f", "DAFB", "DFIRBackbone", "DFIRDETR", "DKSA", "DualPathShuffleConv", "FIRC3", "AmplitudeNormUpsample",
    "SpatialGLU", "SpectralRefinement",
]

PAPER = ("Gao, Tong, Chen, Yu & Li, Frequency Domain Enhancement and Dynamic Feature Aggregation for Cross-Scene "
         "Small Object Detection (DFIR-DETR), arXiv:2512.07078")

SPARSITY_RATIOS = (1 / 2, 2 / 3, 3 / 4, 4 / 5)


# ---------------------------------------------------------------------------------------------------------
# DCFA: dynamic content-feature aggregation (backbone)


class DKSA(nn.Module):
    """Dynamic K-sparse multi-head self-attention over the ``H * W`` tokens: ``[B, C, H, W] -> [B, C, H, W]``.

    Each query keeps its top ``K`` scores of ``q k^T / sqrt(d)`` and takes the softmax over them [paper].
    ``K = ceil(rho * N)``, with ``rho`` input-adaptive [paper]; how it adapts is a guess: the attention maps
    of the fixed ratios ``ratios`` (DRSformer's 1/2, 2/3, 3/4, 4/5) are mixed with per-image softmax weights
    predicted by a linear layer from the global-average-pooled feature (zero-initialised: an even mix at
    first) [guess]. One shared ranking and one product with ``V`` serve all ratios
    (:func:`visionattn.kernels.topk_attention`), so the memory is bounded by query chunks, never ``N x N``.
    """

    def __init__(self, dim: int, num_heads: int, ratios: Sequence[float] = SPARSITY_RATIOS):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"DKSA: dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.ratios = num_heads, tuple(ratios)
        self.qkv = nn.Conv2d(dim, 3 * dim, 1, bias=False)
        self.ratio_gate = nn.Linear(dim, len(self.ratios))
        nn.init.zeros_(self.ratio_gate.weight)
        nn.init.zeros_(self.ratio_gate.bias)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        N = H * W
        q, k, v = self.qkv(x).flatten(2).transpose(1, 2).reshape(B, N, 3, self.num_heads, -1).unbind(2)
        top_ks = [max(1, math.ceil(ratio * N)) for ratio in self.ratios]
        mix = self.ratio_gate(x.mean((2, 3))).softmax(-1)  # [B, len(ratios)]
        out = topk_attention(q, k, v, top_ks, mix=mix)  # [B, N, heads, C / heads]
        return self.proj(out.reshape(B, N, C).transpose(1, 2).reshape(B, C, H, W))


class SpatialGLU(nn.Module):
    """Spatial gated linear unit [guess: TransNeXt's ConvGLU]: ``1x1 -> (a, b)``; ``b <- GELU(DWConv3x3(b))``;
    ``1x1(a * b)``. ``[B, dim, H, W] -> [B, dim, H, W]`` through ``hidden`` channels."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, 2 * hidden, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.fc1(x).chunk(2, dim=1)
        return self.fc2(value * self.act(self.dwconv(gate)))


class DAFB(nn.Module):
    """Dynamic attention fusion block: ``[B, dim, H, W] -> [B, dim, H, W]``.

    ``H = X + DWSepConv3x3(X)`` [paper]; ``H' = H + DKSA(LN(H))``; ``Z = H' + SGLU(LN(H'))`` [guess: the paper
    writes ``Z = SGLU(H + DKSA(H))``; the pre-norms (channel LayerNorm) and the residual around the SGLU are
    the notes' plausible reading]. The SGLU's hidden width is ``2/3 * mlp_ratio * dim`` [guess].
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, ratios: Sequence[float] = SPARSITY_RATIOS):
        super().__init__()
        self.local = nn.Sequential(ConvNormAct(dim, dim, 3, groups=dim), ConvNormAct(dim, dim, 1, act=None))
        self.norm1 = LayerNorm2d(dim)
        self.attn = DKSA(dim, num_heads, ratios)
        self.norm2 = LayerNorm2d(dim)
        self.glu = SpatialGLU(dim, int(2 / 3 * mlp_ratio * dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.local(x)
        x = x + self.attn(self.norm1(x))
        return x + self.glu(self.norm2(x))


class Bottleneck(nn.Module):
    """YOLOv8's C2f bottleneck: two 3x3 Conv-BN-SiLU with a residual. ``[B, dim, H, W]`` in and out."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = ConvNormAct(dim, dim, 3)
        self.conv2 = ConvNormAct(dim, dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.conv1(x))


class C2f(nn.Module):
    """The CSP shell of DCFA (ultralytics C2f) [paper]: ``[F1, F2] = split(cv1(X))``, ``G_i = block(G_{i-1})``
    with ``G_0 = F2``, ``Y = cv2(concat[F1, F2, G_1..G_n])``. ``[B, in, H, W] -> [B, out, H, W]``; the blocks run
    at ``out * expansion`` channels."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, block: Callable[[int], nn.Module],
                 expansion: float = 0.5):
        super().__init__()
        hidden = int(out_channels * expansion)
        self.cv1 = ConvNormAct(in_channels, 2 * hidden)
        self.blocks = nn.ModuleList(block(hidden) for _ in range(num_blocks))
        self.cv2 = ConvNormAct((2 + num_blocks) * hidden, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(self.cv1(x).chunk(2, dim=1))
        for block in self.blocks:
            parts.append(block(parts[-1]))
        return self.cv2(torch.cat(parts, dim=1))


class DFIRBackbone(nn.Module):
    """CSP backbone with DCFA in the deep stages [guess: YOLOv8-style layout; widths and depths chosen to
    meet the paper's 11.7M parameters and ~41 GFLOPs].

    A 3x3 stride-2 stem, then four stages of ``3x3 stride-2 conv -> C2f``; the stages listed in
    ``attention_stages`` (0-based; P4 and P5 by default) use DAFB blocks (DCFA), the others YOLOv8
    bottlenecks. ``[B, in_chans, H, W]`` -> the last three stages, ``[B, widths[l], H / s, W / s]`` at strides 8/16/32.
    """

    def __init__(self, widths: Sequence[int] = (32, 64, 128, 256, 512), depths: Sequence[int] = (1, 2, 3, 1),
                 attention_stages: Sequence[int] = (2, 3), head_dim: int = 32, mlp_ratio: float = 4.0,
                 ratios: Sequence[float] = SPARSITY_RATIOS, in_chans: int = 3):
        super().__init__()
        if len(widths) != len(depths) + 1:
            raise ValueError(f"DFIRBackbone: need one more width (the stem) than depths, got {widths} and {depths}")
        self.stem = ConvNormAct(in_chans, widths[0], 3, stride=2)
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            if i in attention_stages:
                def block(dim: int) -> nn.Module:
                    return DAFB(dim, max(1, dim // head_dim), mlp_ratio, ratios)
            else:
                block = Bottleneck
            self.stages.append(nn.Sequential(ConvNormAct(widths[i], widths[i + 1], 3, stride=2),
                                             C2f(widths[i + 1], widths[i + 1], depth, block)))
        self.out_channels = list(widths[-3:])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features[-3:]


# ---------------------------------------------------------------------------------------------------------
# DFPN: dynamic feature pyramid (neck up/down operators)


class AmplitudeNormUpsample(nn.Module):
    """x2 bilinear upsampling whose per-image, per-channel RMS amplitude is reset to the input's, times a
    learnable per-channel gain (initially 1) [guess: the abstract's amplitude-normalised upsampling against
    "feature inflation"; nearest upsampling would keep the RMS by itself]. ``[B, C, H, W] -> [B, C, 2H, 2W]``."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        rms_in = x.pow(2).mean((2, 3), keepdim=True).add(self.eps).sqrt()
        rms_up = up.pow(2).mean((2, 3), keepdim=True).add(self.eps).sqrt()
        return up * (rms_in / rms_up) * self.gain


class DualPathShuffleConv(nn.Module):
    """Dual-path shuffle convolution [guess]: half the channels through a depthwise 3x3 (spatial detail), the
    other half through a dilated (2) depthwise 3x3 (context), concatenated, channel-shuffled (2 groups) and
    fused by a 1x1 Conv-BN-SiLU. ``[B, C, H, W] -> [B, out_channels, H / stride, W / stride]``."""

    def __init__(self, channels: int, out_channels: int | None = None, stride: int = 1):
        super().__init__()
        if channels % 2:
            raise ValueError(f"DualPathShuffleConv needs an even channel count, got {channels}")
        half = channels // 2
        self.detail = ConvNormAct(half, half, 3, stride=stride, groups=half)
        self.context = nn.Sequential(
            nn.Conv2d(half, half, 3, stride, padding=2, dilation=2, groups=half, bias=False),
            nn.BatchNorm2d(half), nn.SiLU())
        self.fuse = ConvNormAct(channels, out_channels or channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        detail, context = x.chunk(2, dim=1)
        mixed = torch.cat([self.detail(detail), self.context(context)], dim=1)
        return self.fuse(channel_shuffle(mixed, 2))


def dfpn_upsample(channels: int) -> nn.Module:
    """DFPN's top-down step [guess]: amplitude-normalised x2 upsampling, then a dual-path shuffle conv."""
    return nn.Sequential(AmplitudeNormUpsample(channels), DualPathShuffleConv(channels))


def dfpn_downsample(channels: int) -> nn.Module:
    """DFPN's bottom-up step [guess]: a stride-2 dual-path shuffle conv."""
    return DualPathShuffleConv(channels, stride=2)


# ---------------------------------------------------------------------------------------------------------
# FIRC3: frequency-domain iterative refinement C3 (neck fusion)


class SpectralRefinement(nn.Module):
    """Frequency-domain iterative refinement [guess: AFNO/ISTA-like, the notes' placeholder settings].

    ``F = rfft2(x)`` (ortho); ``num_iterations`` times ``F <- softshrink(F + W2 ReLU(W1 F), shrink)`` with one
    block-diagonal complex MLP over the channels (``num_blocks`` blocks, weights shared by the iterations;
    ReLU and soft shrinkage on the real and imaginary parts separately); then ``x + irfft2(F)``.
    ``[B, C, H, W]`` in and out; computed in float32.
    """

    def __init__(self, channels: int, num_blocks: int = 8, num_iterations: int = 2, shrink: float = 0.01):
        super().__init__()
        if channels % num_blocks:
            raise ValueError(f"SpectralRefinement: channels {channels} must be divisible by num_blocks {num_blocks}")
        block = channels // num_blocks
        self.num_blocks, self.num_iterations, self.shrink = num_blocks, num_iterations, shrink
        # [real/imaginary, block, in, out] weights and [real/imaginary, block, out] biases
        self.w1 = nn.Parameter(0.02 * torch.randn(2, num_blocks, block, block))
        self.b1 = nn.Parameter(torch.zeros(2, num_blocks, block))
        self.w2 = nn.Parameter(0.02 * torch.randn(2, num_blocks, block, block))
        self.b2 = nn.Parameter(torch.zeros(2, num_blocks, block))

    @staticmethod
    def _complex_linear(real, imag, weight, bias):
        """``(real + i imag) @ (weight[0] + i weight[1]) + bias`` per block: ``[B, n, blk, H, W']`` parts."""
        def mm(x, w):
            return torch.einsum("bnihw,nio->bnohw", x, w)
        b_re, b_im = bias[0][None, :, :, None, None], bias[1][None, :, :, None, None]
        return mm(real, weight[0]) - mm(imag, weight[1]) + b_re, mm(real, weight[1]) + mm(imag, weight[0]) + b_im

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        spectrum = torch.fft.rfft2(x.float(), norm="ortho").reshape(B, self.num_blocks, C // self.num_blocks, H, -1)
        real, imag = spectrum.real, spectrum.imag
        for _ in range(self.num_iterations):
            h_re, h_im = self._complex_linear(real, imag, self.w1, self.b1)
            d_re, d_im = self._complex_linear(F.relu(h_re), F.relu(h_im), self.w2, self.b2)
            real, imag = F.softshrink(real + d_re, self.shrink), F.softshrink(imag + d_im, self.shrink)
        refined = torch.fft.irfft2(torch.complex(real, imag).reshape(B, C, H, -1), s=(H, W), norm="ortho")
        return x + refined.to(x.dtype)


class FrequencyBlock(nn.Sequential):
    """FIRC3's block [guess]: global spectral refinement, then a RepVGG block for local detail (the block
    FIRC3's RepC3 shell had)."""

    def __init__(self, channels: int, num_iterations: int = 2):
        super().__init__(SpectralRefinement(channels, num_iterations=num_iterations), RepVGGBlock(channels))


class FIRC3(nn.Module):
    """Frequency-domain iterative refinement C3 [guess: RepC3's shell, as the notes read it]:
    ``cv3(FrequencyBlock^n(cv1(x)) + cv2(x))``, cv1/cv2 1x1 to ``out * expansion`` channels, cv3 a 1x1 back to
    ``out_channels`` (identity when equal). ``[B, in, H, W] -> [B, out, H, W]``."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int = 2, expansion: float = 0.5,
                 num_iterations: int = 2):
        super().__init__()
        hidden = int(out_channels * expansion)
        self.cv1 = ConvNormAct(in_channels, hidden)
        self.cv2 = ConvNormAct(in_channels, hidden)
        self.blocks = nn.Sequential(*[FrequencyBlock(hidden, num_iterations) for _ in range(num_blocks)])
        self.cv3 = ConvNormAct(hidden, out_channels) if hidden != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(self.blocks(self.cv1(x)) + self.cv2(x))


# ---------------------------------------------------------------------------------------------------------
# detector


class DFIRDETR(DETRDetector):
    """DFIR-DETR: :class:`DFIRBackbone` (DCFA) -> hybrid encoder with AIFI, DFPN and FIRC3 -> RT-DETR's decoder.

    Args:
        num_classes: object classes (labels ``0..num_classes-1``; NEU-DET has 6, VisDrone 10).
        input_size: the square side images are resized to (640 in the paper).
        widths, depths, attention_stages, head_dim, mlp_ratio, ratios: the backbone (see :class:`DFIRBackbone`).
        hidden_dim, num_heads, ffn_dim: encoder/decoder width, as RT-DETR-R18 (256, 8, 1024).
        fusion_blocks, fusion_expansion, spectral_iterations: FIRC3 size.
        num_queries, num_decoder_layers, num_points, num_denoising, label_noise_ratio, box_noise_scale,
        max_detections, in_chans: as :class:`visionattn.detectors.rtdetr.RTDETR`.
    Input/output: :class:`~visionattn.detectors.detr.DETRDetector`.
    """

    def __init__(
        self,
        num_classes: int = 80,
        input_size: int = 640,
        widths: Sequence[int] = (32, 64, 128, 256, 512),
        depths: Sequence[int] = (1, 2, 3, 1),
        attention_stages: Sequence[int] = (2, 3),
        head_dim: int = 32,
        mlp_ratio: float = 4.0,
        ratios: Sequence[float] = SPARSITY_RATIOS,
        hidden_dim: int = 256,
        num_heads: int = 8,
        ffn_dim: int = 1024,
        fusion_blocks: int = 2,
        fusion_expansion: float = 0.5,
        spectral_iterations: int = 2,
        num_queries: int = 300,
        num_decoder_layers: int = 3,
        num_points: int = 4,
        num_denoising: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
        max_detections: int = 300,
        in_chans: int = 3,
    ):
        backbone = DFIRBackbone(widths, depths, attention_stages, head_dim, mlp_ratio, ratios, in_chans=in_chans)

        def fusion(c_in: int, c_out: int) -> nn.Module:
            return FIRC3(c_in, c_out, fusion_blocks, fusion_expansion, spectral_iterations)

        encoder = HybridEncoder(backbone.out_channels, hidden_dim, num_heads, ffn_dim, fusion=fusion,
                                upsample=dfpn_upsample, downsample=dfpn_downsample)
        decoder = DecoderConfig(hidden_dim=hidden_dim, num_heads=num_heads, ffn_dim=ffn_dim, num_queries=num_queries,
                                num_layers=num_decoder_layers, num_points=num_points, num_denoising=num_denoising,
                                label_noise_ratio=label_noise_ratio, box_noise_scale=box_noise_scale)
        super().__init__(backbone, encoder, num_classes, decoder, input_size, max_detections, in_chans=in_chans)


@register_model(task="detection", paper=PAPER, model_cls=DFIRDETR, timm=False, input_size=(3, 640, 640),
                notes="reconstruction beyond the DCFA equations (labelled [guess])",
                reported=ReportedFigures(params_m=11.7, compute=41.2, compute_unit="GFLOPs", metric="mAP@0.5",
                                         value=92.9, dataset="NEU-DET"))
def dfir_detr(pretrained: bool = False, **kwargs: Any) -> DFIRDETR:
    """DFIR-DETR sized to the paper (COCO's 80 classes unless ``num_classes`` is given)."""
    if pretrained:
        raise ValueError("no DFIR-DETR weights exist publicly; train it (visionattn train) or load a local checkpoint")
    return DFIRDETR(**kwargs)
