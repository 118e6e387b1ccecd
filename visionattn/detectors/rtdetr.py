"""RT-DETR: a real-time DETR with a hybrid encoder, IoU-aware query selection and a deformable decoder.

Zhao et al., "DETRs Beat YOLOs on Real-time Object Detection", CVPR 2024, arXiv:2304.08069; official code
lyuwenyu/RT-DETR (``rtdetr_pytorch``), whose R18 configuration this follows. This file holds what is RT-DETR's own (its CCFM operators and the model); the parts DFIR-DETR
shares live in the toolkit :mod:`visionattn.detectors.detr`:

- backbone: ResNet-18-vd (timm ``resnet18d``: 3-conv stem 32-32-64, BasicBlocks [2, 2, 2, 2], avg-pool + 1x1
  shortcuts), C3-C5 = 128/256/512 channels at strides 8/16/32 (:class:`~visionattn.detectors.detr.TimmBackbone`);
- hybrid encoder (:class:`~visionattn.detectors.detr.HybridEncoder`): 1x1 conv + BN projections to 256; AIFI
  (one post-LN transformer layer, 8 heads, FFN 1024, GELU, 2-D sin-cos position embedding on q and k) on C5
  only; CCFM, a top-down + bottom-up pyramid with nearest upsampling, stride-2 conv downsampling and
  :class:`CSPRepLayer` fusion blocks (RepVGG blocks, expansion 0.5), defined here;
- IoU-aware query selection: the top-K (300) encoder tokens by class score become the decoder's content
  queries and reference boxes (both detached); the encoder's top-K boxes are supervised too;
- decoder: 3 post-LN layers of self-attention, multi-scale deformable cross-attention (8 heads, 3 levels,
  4 points, sampled with ``F.grid_sample``) and a ReLU FFN, with iterative box refinement;
- contrastive denoising queries in training (100 queries, label noise 0.5, box noise 1.0);
- Hungarian matching (2 focal class cost + 5 L1 + 2 GIoU) and losses varifocal (1) + L1 (5) + GIoU (2) on the
  last layer, every other decoder layer, the encoder's top-K and the denoising queries.

Detection follows torchvision's format: ``model(images, targets)`` with a list of ``[3, H, W]`` images in
0..1 (sizes may differ; a ``[B, 3, H, W]`` batch is accepted too) and targets ``dict(boxes=[N, 4] xyxy pixels,
labels=[N] int64 in [0, num_classes))``. Training returns the losses; eval returns per image
``dict(boxes [K, 4] xyxy pixels of that image, labels [K], scores [K])`` sorted by score, without NMS.
Images are resized to ``input_size`` x ``input_size`` and normalised inside the model
(:class:`~visionattn.detectors.detr.DETRDetector`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from visionattn.detectors.detr import ConvNormAct, DecoderConfig, DETRDetector, HybridEncoder, RepVGGBlock, TimmBackbone
from visionattn.registry import ReportedFigures, register_model

__all__ = ["CSPRepLayer", "RTDETR", "downsample_conv", "upsample_nearest"]

PAPER = "Zhao et al., DETRs Beat YOLOs on Real-time Object Detection (RT-DETR), CVPR 2024, arXiv:2304.08069"


# ---------------------------------------------------------------------------------------------------------
# CCFM operators (the hybrid encoder's up, down and fusion steps)


class CSPRepLayer(nn.Module):
    """RT-DETR's CCFM fusion block: ``conv3(RepVGG^n(conv1(x)) + conv2(x))``.

    ``[B, in_channels, H, W] -> [B, out_channels, H, W]``; conv1/conv2 are 1x1 to ``out * expansion``
    channels, conv3 a 1x1 back to ``out_channels`` (identity when the widths agree).
    """

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int = 3, expansion: float = 1.0):
        super().__init__()
        hidden = int(out_channels * expansion)
        self.conv1 = ConvNormAct(in_channels, hidden)
        self.conv2 = ConvNormAct(in_channels, hidden)
        self.blocks = nn.Sequential(*[RepVGGBlock(hidden) for _ in range(num_blocks)])
        self.conv3 = ConvNormAct(hidden, out_channels) if hidden != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.blocks(self.conv1(x)) + self.conv2(x))


def upsample_nearest(channels: int) -> nn.Module:
    """CCFM's top-down upsampling (nearest, x2). ``channels`` is not needed by it; the encoder's operator
    factories all take the width (DFIR-DETR's learnable upsampling does use it)."""
    return nn.Upsample(scale_factor=2, mode="nearest")


def downsample_conv(channels: int) -> nn.Module:
    """CCFM's bottom-up downsampling: 3x3 stride-2 conv + BN + SiLU."""
    return ConvNormAct(channels, channels, 3, stride=2)


# ---------------------------------------------------------------------------------------------------------
# model


class RTDETR(DETRDetector):
    """RT-DETR with a timm backbone (ResNet-18-vd by default), the hybrid encoder and the deformable decoder.

    Args:
        num_classes: object classes (no background class; labels are ``0..num_classes-1``).
        input_size: the square side images are resized to (640 in the paper).
        backbone: a timm model name with ``features_only`` support; its strides 8/16/32 maps are used.
        pretrained_backbone: load timm's ImageNet weights for the backbone (downloads them).
        hidden_dim, num_heads, ffn_dim: encoder and decoder width (AIFI and decoder layers share them;
            the decoder FFN is ``ffn_dim`` as well).
        expansion, num_fusion_blocks: the CSPRepLayers' width factor (0.5 for R18) and RepVGG blocks (3).
        num_queries, num_decoder_layers, num_points: decoder size (300, 3, 4 for R18).
        num_denoising, label_noise_ratio, box_noise_scale: contrastive denoising in training.
        max_detections: detections returned per image in eval.
        in_chans: image channels (3; timm adapts the backbone's stem to another count).
    Input/output: :class:`~visionattn.detectors.detr.DETRDetector`.
    """

    def __init__(
        self,
        num_classes: int = 80,
        input_size: int = 640,
        backbone: str = "resnet18d",
        pretrained_backbone: bool = False,
        hidden_dim: int = 256,
        num_heads: int = 8,
        ffn_dim: int = 1024,
        expansion: float = 0.5,
        num_fusion_blocks: int = 3,
        num_queries: int = 300,
        num_decoder_layers: int = 3,
        num_points: int = 4,
        num_denoising: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
        max_detections: int = 300,
        in_chans: int = 3,
    ):
        body = TimmBackbone(backbone, pretrained=pretrained_backbone, in_chans=in_chans)

        def fusion(c_in: int, c_out: int) -> nn.Module:
            return CSPRepLayer(c_in, c_out, num_blocks=num_fusion_blocks, expansion=expansion)

        encoder = HybridEncoder(body.out_channels, hidden_dim, num_heads, ffn_dim, fusion=fusion,
                                upsample=upsample_nearest, downsample=downsample_conv)
        decoder = DecoderConfig(hidden_dim=hidden_dim, num_heads=num_heads, ffn_dim=ffn_dim, num_queries=num_queries,
                                num_layers=num_decoder_layers, num_points=num_points, num_denoising=num_denoising,
                                label_noise_ratio=label_noise_ratio, box_noise_scale=box_noise_scale)
        super().__init__(body, encoder, num_classes, decoder, input_size, max_detections, in_chans=in_chans)


@register_model(task="detection", paper=PAPER, model_cls=RTDETR, timm=False, input_size=(3, 640, 640),
                notes="ResNet-18-vd (timm resnet18d), hidden 256, 3 decoder layers, 300 queries",
                reported=ReportedFigures(params_m=20, compute=60, compute_unit="GFLOPs", metric="AP", value=46.5,
                                         dataset="COCO"))
def rtdetr_r18(pretrained: bool = False, **kwargs: Any) -> RTDETR:
    """RT-DETR-R18 (COCO's 80 classes unless ``num_classes`` is given)."""
    if pretrained:
        raise ValueError("no RT-DETR weights are distributed here; "
                         "use pretrained_backbone=True for ImageNet backbone weights")
    return RTDETR(**kwargs)
