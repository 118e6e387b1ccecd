"""RT-DETR: a real-time DETR with a hybrid encoder, IoU-aware query selection and a deformable decoder.

Zhao et al., "DETRs Beat YOLOs on Real-time Object Detection", CVPR 2024, arXiv:2304.08069; official code
lyuwenyu/RT-DETR (``rtdetr_pytorch``). Built as ``shared/reference/decoders_detectors.md`` section 4 gives the
R18 model; the pieces are shared with DFIR-DETR (:mod:`visionattn.detectors.dfir_detr`), which swaps the
backbone, the neck's up/down operators and its fusion blocks:

- backbone: ResNet-18-vd (timm ``resnet18d``: 3-conv stem 32-32-64, BasicBlocks [2, 2, 2, 2], avg-pool + 1x1
  shortcuts), C3-C5 = 128/256/512 channels at strides 8/16/32;
- hybrid encoder: 1x1 conv + BN projections to 256; AIFI (one post-LN transformer layer, 8 heads, FFN 1024,
  GELU, 2-D sin-cos position embedding on q and k) on C5 only; CCFM, a top-down + bottom-up pyramid whose
  fusion blocks are CSPRepLayers (RepVGG blocks, expansion 0.5);
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
Images are resized to ``input_size`` x ``input_size`` and normalised inside the model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, box_iou, generalized_box_iou, generalized_box_iou_loss

from visionattn.registry import register_model

__all__ = [
    "AIFI", "CSPRepLayer", "ConvNormAct", "DETRDetector", "DenoisingQueries", "HungarianMatcher", "HybridEncoder",
    "MSDeformableAttention", "RTDETR", "RTDETRCriterion", "RTDETRDecoder", "RepVGGBlock", "TimmBackbone",
    "build_denoising_queries", "varifocal_loss",
]

PAPER = "Zhao et al., DETRs Beat YOLOs on Real-time Object Detection (RT-DETR), CVPR 2024, arXiv:2304.08069"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``log(x / (1 - x))`` with ``x`` clamped to ``[eps, 1 - eps]``."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(boxes, "cxcywh", "xyxy")


# ---------------------------------------------------------------------------------------------------------
# blocks


class ConvNormAct(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> activation (SiLU by default; ``act=None`` for none)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 groups: int = 1, act: type[nn.Module] | None = nn.SiLU):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=groups,
                      bias=False),
            nn.BatchNorm2d(out_channels),
            act() if act is not None else nn.Identity(),
        )


class RepVGGBlock(nn.Module):
    """``SiLU(BN(conv3x3(x)) + BN(conv1x1(x)))``, the training-time form of a RepVGG block."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv3 = ConvNormAct(channels, channels, 3, act=None)
        self.conv1 = ConvNormAct(channels, channels, 1, act=None)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv3(x) + self.conv1(x))


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


class MLP(nn.Sequential):
    """``num_layers`` linear layers with ReLU between them: ``[..., in_dim] -> [..., out_dim]``."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.ReLU())
        super().__init__(*layers)


def sincos_position_embedding_2d(height: int, width: int, dim: int, temperature: float = 10000.0,
                                 device=None) -> torch.Tensor:
    """2-D sin-cos position embedding ``[1, height * width, dim]`` for row-major (y, x) flattened tokens:
    ``[sin(x w), cos(x w), sin(y w), cos(y w)]`` with ``dim / 4`` frequencies ``w = temperature^(-i / (dim/4))``."""
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos embedding needs a dim divisible by 4, got {dim}")
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32, device=device),
                            torch.arange(width, dtype=torch.float32, device=device), indexing="ij")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter)
    x_angles = xs.reshape(-1, 1) * omega
    y_angles = ys.reshape(-1, 1) * omega
    return torch.cat([x_angles.sin(), x_angles.cos(), y_angles.sin(), y_angles.cos()], dim=1)[None]


class AIFI(nn.Module):
    """Attention-based intra-scale feature interaction: one post-LN transformer encoder layer.

    ``tokens [B, N, C]``, ``pos [1, N, C]`` (added to queries and keys only) -> ``[B, N, C]``.
    """

    def __init__(self, dim: int = 256, num_heads: int = 8, ffn_dim: int = 1024):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        query_key = tokens + pos
        tokens = self.norm1(tokens + self.attn(query_key, query_key, tokens, need_weights=False)[0])
        return self.norm2(tokens + self.ffn(tokens))


def upsample_nearest(channels: int) -> nn.Module:
    """CCFM's top-down upsampling (nearest, x2); ``channels`` is unused but kept for a uniform factory."""
    return nn.Upsample(scale_factor=2, mode="nearest")


def downsample_conv(channels: int) -> nn.Module:
    """CCFM's bottom-up downsampling: 3x3 stride-2 conv + BN + SiLU."""
    return ConvNormAct(channels, channels, 3, stride=2)


class HybridEncoder(nn.Module):
    """RT-DETR's hybrid encoder: per-level 1x1 projections, AIFI on the last level, then CCFM (top-down and
    bottom-up fusion).

    The neck operators are factories so that DFIR-DETR can replace them: ``upsample(channels)`` (x2),
    ``downsample(channels)`` (stride 2) and ``fusion(in_channels, out_channels)`` (the block after each
    concatenation; ``in_channels = 2 * hidden_dim``).

    ``features``: list of ``[B, in_channels[i], H_i, W_i]`` at strides 8/16/32 -> list of ``[B, hidden_dim, H_i, W_i]``.
    """

    def __init__(
        self,
        in_channels: Sequence[int] = (128, 256, 512),
        hidden_dim: int = 256,
        num_heads: int = 8,
        ffn_dim: int = 1024,
        fusion: Callable[[int, int], nn.Module] | None = None,
        upsample: Callable[[int], nn.Module] = upsample_nearest,
        downsample: Callable[[int], nn.Module] = downsample_conv,
    ):
        super().__init__()
        if fusion is None:
            def fusion(c_in: int, c_out: int) -> nn.Module:
                return CSPRepLayer(c_in, c_out, num_blocks=3, expansion=0.5)
        num_levels = len(in_channels)
        self.hidden_dim = hidden_dim
        self.input_proj = nn.ModuleList(ConvNormAct(c, hidden_dim, 1, act=None) for c in in_channels)
        self.aifi = AIFI(hidden_dim, num_heads, ffn_dim)
        # top-down, from the deepest level
        self.lateral_convs = nn.ModuleList(ConvNormAct(hidden_dim, hidden_dim, 1) for _ in range(num_levels - 1))
        self.upsamples = nn.ModuleList(upsample(hidden_dim) for _ in range(num_levels - 1))
        self.fpn_blocks = nn.ModuleList(fusion(2 * hidden_dim, hidden_dim) for _ in range(num_levels - 1))
        # bottom-up, from the finest level
        self.downsamples = nn.ModuleList(downsample(hidden_dim) for _ in range(num_levels - 1))
        self.pan_blocks = nn.ModuleList(fusion(2 * hidden_dim, hidden_dim) for _ in range(num_levels - 1))

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        projected = [proj(f) for proj, f in zip(self.input_proj, features)]
        deepest = projected[-1]
        B, C, H, W = deepest.shape
        pos = sincos_position_embedding_2d(H, W, C, device=deepest.device).to(deepest.dtype)
        tokens = self.aifi(deepest.flatten(2).transpose(1, 2), pos)
        projected[-1] = tokens.transpose(1, 2).reshape(B, C, H, W)

        top_down = [projected[-1]]  # finest first once complete
        for step, lower in enumerate(reversed(projected[:-1])):
            higher = self.lateral_convs[step](top_down[0])
            top_down[0] = higher
            upsampled = self.upsamples[step](higher)
            top_down.insert(0, self.fpn_blocks[step](torch.cat([upsampled, lower], dim=1)))

        outputs = [top_down[0]]
        for step, higher in enumerate(top_down[1:]):
            downsampled = self.downsamples[step](outputs[-1])
            outputs.append(self.pan_blocks[step](torch.cat([downsampled, higher], dim=1)))
        return outputs


# ---------------------------------------------------------------------------------------------------------
# decoder


def multi_scale_deformable_sampling(
    value: torch.Tensor, spatial_shapes: Sequence[tuple[int, int]], locations: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Weighted bilinear samples of multi-level values (the deformable-attention core, via ``F.grid_sample``).

    Args:
        value: ``[B, S, heads, Dh]``, the levels' ``H_l * W_l`` tokens concatenated (``S = sum``).
        spatial_shapes: ``(H_l, W_l)`` per level.
        locations: ``[B, Q, heads, levels, points, 2]`` sampling points ``(x, y)`` in ``[0, 1]``.
        weights: ``[B, Q, heads, levels, points]`` attention weights.
    Returns:
        ``[B, Q, heads * Dh]``.
    """
    B, _, heads, head_dim = value.shape
    _, Q, _, levels, points, _ = locations.shape
    grids = 2 * locations - 1  # grid_sample's [-1, 1] with align_corners=False
    sampled = []
    for level, value_level in enumerate(value.split([h * w for h, w in spatial_shapes], dim=1)):
        h, w = spatial_shapes[level]
        value_level = value_level.permute(0, 2, 3, 1).reshape(B * heads, head_dim, h, w)
        grid = grids[:, :, :, level].transpose(1, 2).reshape(B * heads, Q, points, 2)
        sampled.append(F.grid_sample(value_level, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    sampled = torch.stack(sampled, dim=-2).flatten(-2)  # [B*heads, Dh, Q, levels*points]
    weights = weights.transpose(1, 2).reshape(B * heads, 1, Q, levels * points)
    out = (sampled * weights).sum(-1)  # [B*heads, Dh, Q]
    return out.view(B, heads * head_dim, Q).transpose(1, 2)


class MSDeformableAttention(nn.Module):
    """Multi-scale deformable attention (Deformable DETR) with box references.

    Each query predicts ``points`` offsets per head and level around its reference box centre, scaled by
    the box size (``centre + offset / points * wh / 2``), and a softmax over the ``levels * points`` samples.
    ``query [B, Q, C]``, ``reference_boxes [B, Q, 4]`` (cxcywh in 0..1), ``value [B, S, C]`` -> ``[B, Q, C]``.
    """

    def __init__(self, dim: int = 256, num_heads: int = 8, num_levels: int = 3, num_points: int = 4):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Offsets start on rays in ``num_heads`` directions, 1..points steps out; uniform weights."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        steps = torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        grid = directions.view(self.num_heads, 1, 1, 2).expand(-1, self.num_levels, self.num_points, -1) * steps
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for linear in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, query: torch.Tensor, reference_boxes: torch.Tensor, value: torch.Tensor,
                spatial_shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        B, Q, _ = query.shape
        H, L, P = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value).view(B, value.shape[1], H, -1)
        offsets = self.sampling_offsets(query).view(B, Q, H, L, P, 2)
        weights = self.attention_weights(query).view(B, Q, H, L * P).softmax(-1).view(B, Q, H, L, P)
        centres = reference_boxes[:, :, None, None, None, :2]
        half_sizes = reference_boxes[:, :, None, None, None, 2:] * 0.5
        locations = centres + offsets / P * half_sizes
        return self.output_proj(multi_scale_deformable_sampling(value, spatial_shapes, locations, weights))


class DecoderLayer(nn.Module):
    """Post-LN decoder layer: self-attention (q = k = tgt + pos), deformable cross-attention, ReLU FFN.

    ``tgt [B, Q, C]``, ``reference_boxes [B, Q, 4]``, ``memory [B, S, C]``, ``attn_mask [Q, Q]`` (True =
    blocked) or None, ``query_pos [B, Q, C]`` -> ``[B, Q, C]``.
    """

    def __init__(self, dim: int = 256, num_heads: int = 8, ffn_dim: int = 1024, num_levels: int = 3,
                 num_points: int = 4):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = MSDeformableAttention(dim, num_heads, num_levels, num_points)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, dim))
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, tgt, reference_boxes, memory, spatial_shapes, attn_mask, query_pos):
        query_key = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(query_key, query_key, tgt, attn_mask=attn_mask, need_weights=False)[0])
        tgt = self.norm2(tgt + self.cross_attn(tgt + query_pos, reference_boxes, memory, spatial_shapes))
        return self.norm3(tgt + self.ffn(tgt))


@dataclass
class DenoisingQueries:
    """Contrastive denoising queries for one batch.

    Attributes:
        class_embeds: ``[B, num_dn, C]`` embeddings of the (noised) labels.
        boxes_unact: ``[B, num_dn, 4]`` noised boxes, cxcywh in logit space.
        attn_mask: ``[num_dn + num_queries, num_dn + num_queries]``, True where attention is blocked.
        positive_idx: per image, the indices (into ``num_dn``) of the positive queries, group-major, so
            that ``positive_idx[i][g * n_i + j]`` reconstructs ground-truth box ``j`` of image ``i``.
        num_groups: denoising groups (each a positive and a negative copy of every box).
    """

    class_embeds: torch.Tensor
    boxes_unact: torch.Tensor
    attn_mask: torch.Tensor
    positive_idx: list[torch.Tensor]
    num_groups: int

    @property
    def num_queries(self) -> int:
        return self.class_embeds.shape[1]


def build_denoising_queries(
    targets: Sequence[dict[str, torch.Tensor]],
    num_classes: int,
    num_queries: int,
    class_embed: nn.Embedding,
    num_denoising: int = 100,
    label_noise_ratio: float = 0.5,
    box_noise_scale: float = 1.0,
) -> DenoisingQueries | None:
    """RT-DETR's contrastive denoising groups (DINO-style), or None when no image has a box.

    Every ground-truth box is copied into ``num_groups = max(1, num_denoising // max_boxes)`` groups, each
    with a positive copy (corners moved by up to half the box size) and a negative copy (moved by 1-2x half
    the size), laid out per group as ``[positives (max_boxes), negatives (max_boxes)]``; images with fewer
    boxes are padded with the ``num_classes`` padding label. A quarter of the labels (``label_noise_ratio / 2``)
    are replaced by random classes. The attention mask keeps the matching queries from seeing the denoising
    queries, and the groups from seeing each other.

    Args:
        targets: per image ``labels [n_i]`` (int64) and ``boxes [n_i, 4]`` (cxcywh in 0..1).
        class_embed: ``nn.Embedding(num_classes + 1, C, padding_idx=num_classes)``.
    """
    counts = [len(t["labels"]) for t in targets]
    max_boxes = max(counts, default=0)
    if max_boxes == 0 or num_denoising <= 0:
        return None
    device = class_embed.weight.device
    num_groups = max(1, num_denoising // max_boxes)
    B = len(targets)
    labels = torch.full((B, max_boxes), num_classes, dtype=torch.long, device=device)
    boxes = torch.zeros(B, max_boxes, 4, device=device)
    is_box = torch.zeros(B, max_boxes, dtype=torch.bool, device=device)
    for i, (t, n) in enumerate(zip(targets, counts)):
        labels[i, :n] = t["labels"]
        boxes[i, :n] = t["boxes"]
        is_box[i, :n] = True
    # [B, num_groups * 2 * max_boxes]: per group, positives then negatives
    labels = labels.repeat(1, 2 * num_groups)
    boxes = boxes.repeat(1, 2 * num_groups, 1)
    is_box = is_box.repeat(1, 2 * num_groups)
    is_negative = torch.zeros(2 * max_boxes, dtype=torch.bool, device=device)
    is_negative[max_boxes:] = True
    is_negative = is_negative.repeat(num_groups)  # [num_dn]
    positive_idx = [torch.nonzero(is_box[i] & ~is_negative).flatten() for i in range(B)]

    if label_noise_ratio > 0:
        flip = (torch.rand(labels.shape, device=device) < label_noise_ratio * 0.5) & is_box
        labels = torch.where(flip, torch.randint_like(labels, 0, num_classes), labels)
    if box_noise_scale > 0:
        corners = cxcywh_to_xyxy(boxes)
        half_sizes = (boxes[..., 2:] * 0.5).repeat(1, 1, 2) * box_noise_scale
        signs = torch.randint(0, 2, boxes.shape, device=device).float() * 2 - 1
        # positives move by [0, 1), negatives by [1, 2) half sizes
        magnitudes = torch.rand(boxes.shape, device=device) + is_negative[:, None].float()
        corners = (corners + signs * magnitudes * half_sizes).clamp(0, 1)
        boxes = box_convert(corners, "xyxy", "cxcywh")

    num_dn = labels.shape[1]
    total = num_dn + num_queries
    attn_mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    attn_mask[num_dn:, :num_dn] = True
    group_size = 2 * max_boxes
    for g in range(num_groups):
        rows = slice(g * group_size, (g + 1) * group_size)
        attn_mask[rows, :g * group_size] = True
        attn_mask[rows, (g + 1) * group_size:num_dn] = True
    return DenoisingQueries(class_embed(labels), inverse_sigmoid(boxes), attn_mask, positive_idx, num_groups)


class RTDETRDecoder(nn.Module):
    """Query selection, denoising and the deformable transformer decoder with per-layer heads.

    Args:
        in_channels: channels of each encoder level.
        num_queries: queries taken from the encoder's top-scoring tokens (IoU-aware query selection).
        num_denoising, label_noise_ratio, box_noise_scale: contrastive denoising (training only).

    ``forward(features, targets)``: ``features`` list of ``[B, in_channels[l], H_l, W_l]``; ``targets`` the
    normalised targets (``labels``, ``boxes`` cxcywh 0..1) in training, for denoising. Returns a dict:
    ``logits`` / ``boxes``: per decoder layer ``[B, num_queries, num_classes]`` / ``[B, num_queries, 4]``
    (cxcywh 0..1); ``enc_logits`` / ``enc_boxes``: the encoder's top-K; ``dn_logits`` / ``dn_boxes`` per
    layer and ``dn`` (:class:`DenoisingQueries`) when denoising ran.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: Sequence[int] = (256, 256, 256),
        hidden_dim: int = 256,
        num_queries: int = 300,
        num_layers: int = 3,
        num_heads: int = 8,
        ffn_dim: int = 1024,
        num_points: int = 4,
        num_denoising: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
    ):
        super().__init__()
        self.num_classes, self.num_queries = num_classes, num_queries
        self.num_denoising = num_denoising
        self.label_noise_ratio, self.box_noise_scale = label_noise_ratio, box_noise_scale
        num_levels = len(in_channels)
        self.input_proj = nn.ModuleList(ConvNormAct(c, hidden_dim, 1, act=None) for c in in_channels)
        self.denoising_class_embed = nn.Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes)
        self.enc_output = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim))
        self.enc_score_head = nn.Linear(hidden_dim, num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, num_layers=3)
        self.query_pos_head = MLP(4, 2 * hidden_dim, hidden_dim, num_layers=2)
        self.layers = nn.ModuleList(
            DecoderLayer(hidden_dim, num_heads, ffn_dim, num_levels, num_points) for _ in range(num_layers))
        self.score_heads = nn.ModuleList(nn.Linear(hidden_dim, num_classes) for _ in range(num_layers))
        self.bbox_heads = nn.ModuleList(MLP(hidden_dim, hidden_dim, 4, num_layers=3) for _ in range(num_layers))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        prior_bias = -math.log((1 - 0.01) / 0.01)  # class prior 0.01
        for head in [self.enc_score_head, *self.score_heads]:
            nn.init.constant_(head.bias, prior_bias)
        for head in [self.enc_bbox_head, *self.bbox_heads]:
            nn.init.zeros_(head[-1].weight)
            nn.init.zeros_(head[-1].bias)
        nn.init.xavier_uniform_(self.enc_output[0].weight)
        for layer in self.query_pos_head:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)

    @staticmethod
    def anchors(spatial_shapes: Sequence[tuple[int, int]], device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Anchor boxes in logit space ``[1, S, 4]`` (cell centres, ``wh = 0.05 * 2^level``; invalid ones
        ``inf``) and the valid mask ``[1, S, 1]`` (all coordinates within 0.01..0.99)."""
        anchors = []
        for level, (h, w) in enumerate(spatial_shapes):
            ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=dtype),
                                    torch.arange(w, device=device, dtype=dtype), indexing="ij")
            centres = torch.stack([(xs + 0.5) / w, (ys + 0.5) / h], -1).reshape(-1, 2)
            sizes = torch.full_like(centres, 0.05 * 2.0 ** level)
            anchors.append(torch.cat([centres, sizes], -1))
        anchors = torch.cat(anchors)[None]
        valid = ((anchors > 0.01) & (anchors < 0.99)).all(-1, keepdim=True)
        logits = torch.log(anchors / (1 - anchors))
        return torch.where(valid, logits, torch.full_like(logits, float("inf"))), valid

    def forward(self, features: Sequence[torch.Tensor],
                targets: Sequence[dict[str, torch.Tensor]] | None = None) -> dict[str, Any]:
        projected = [proj(f) for proj, f in zip(self.input_proj, features)]
        spatial_shapes = [tuple(f.shape[-2:]) for f in projected]
        memory = torch.cat([f.flatten(2).transpose(1, 2) for f in projected], dim=1)  # [B, S, C]

        if memory.shape[1] < self.num_queries:
            raise ValueError(f"the encoder has {memory.shape[1]} tokens, fewer than num_queries={self.num_queries}: "
                             "use a larger input_size or fewer queries")

        # IoU-aware query selection: the top-K tokens by class score (border tokens masked out)
        anchors, valid = self.anchors(spatial_shapes, memory.device, memory.dtype)
        enc_memory = self.enc_output(memory * valid)
        enc_logits = self.enc_score_head(enc_memory)
        enc_boxes_unact = self.enc_bbox_head(enc_memory) + anchors
        top_idx = enc_logits.max(-1).values.topk(self.num_queries, dim=1).indices  # [B, Q]

        def take(x: torch.Tensor) -> torch.Tensor:
            return x.gather(1, top_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

        reference_unact = take(enc_boxes_unact)
        outputs: dict[str, Any] = {"enc_logits": take(enc_logits), "enc_boxes": reference_unact.sigmoid()}
        content = take(enc_memory).detach()
        reference_unact = reference_unact.detach()

        dn = None
        if self.training and targets is not None:
            dn = build_denoising_queries(targets, self.num_classes, self.num_queries, self.denoising_class_embed,
                                         self.num_denoising, self.label_noise_ratio, self.box_noise_scale)
        attn_mask = None
        if dn is not None:
            content = torch.cat([dn.class_embeds, content], dim=1)
            reference_unact = torch.cat([dn.boxes_unact, reference_unact], dim=1)
            attn_mask = dn.attn_mask

        # iterative refinement; a layer's loss boxes refine the previous layer's undetached boxes (DINO's
        # "look forward twice"), its next reference is detached
        tgt = content
        reference = reference_unact.sigmoid()
        previous_boxes = reference
        all_logits, all_boxes = [], []
        for layer, score_head, bbox_head in zip(self.layers, self.score_heads, self.bbox_heads):
            tgt = layer(tgt, reference, memory, spatial_shapes, attn_mask, self.query_pos_head(reference))
            delta = bbox_head(tgt)
            all_boxes.append(torch.sigmoid(delta + inverse_sigmoid(previous_boxes)))
            all_logits.append(score_head(tgt))
            previous_boxes = torch.sigmoid(delta + inverse_sigmoid(reference))
            reference = previous_boxes.detach()

        if dn is not None:
            n = dn.num_queries
            outputs.update(dn=dn, dn_logits=[x[:, :n] for x in all_logits], dn_boxes=[x[:, :n] for x in all_boxes])
            all_logits = [x[:, n:] for x in all_logits]
            all_boxes = [x[:, n:] for x in all_boxes]
        outputs.update(logits=all_logits, boxes=all_boxes)
        return outputs


# ---------------------------------------------------------------------------------------------------------
# matching and losses


class HungarianMatcher(nn.Module):
    """One-to-one assignment of predictions to targets per image (``scipy.optimize.linear_sum_assignment``).

    cost = ``cost_class`` * focal class cost + ``cost_bbox`` * L1 (cxcywh) + ``cost_giou`` * (-GIoU), with the
    focal cost ``alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))`` at each target's class.
    ``logits [B, Q, num_classes]``, ``boxes [B, Q, 4]`` cxcywh -> per image ``(pred_idx, target_idx)`` int64.
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 alpha: float = 0.25, gamma: float = 2.0):
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = alpha, gamma

    @torch.no_grad()
    def cost_matrices(self, logits: torch.Tensor, boxes: torch.Tensor,
                      targets: Sequence[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Per image, the ``[Q, n_i]`` assignment cost."""
        costs = []
        for logit, box, t in zip(logits, boxes, targets):
            prob = logit.sigmoid()[:, t["labels"]]
            positive = self.alpha * (1 - prob) ** self.gamma * -(prob + 1e-8).log()
            negative = (1 - self.alpha) * prob ** self.gamma * -(1 - prob + 1e-8).log()
            cost_l1 = torch.cdist(box, t["boxes"], p=1)
            cost_giou = -generalized_box_iou(cxcywh_to_xyxy(box), cxcywh_to_xyxy(t["boxes"]))
            costs.append(self.cost_class * (positive - negative) + self.cost_bbox * cost_l1
                         + self.cost_giou * cost_giou)
        return costs

    @torch.no_grad()
    def forward(self, logits, boxes, targets) -> list[tuple[torch.Tensor, torch.Tensor]]:
        indices = []
        for cost in self.cost_matrices(logits, boxes, targets):
            rows, cols = linear_sum_assignment(cost.float().cpu().numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.long, device=logits.device),
                            torch.as_tensor(cols, dtype=torch.long, device=logits.device)))
        return indices


def varifocal_loss(logits: torch.Tensor, target_scores: torch.Tensor, is_positive: torch.Tensor,
                   alpha: float = 0.75, gamma: float = 2.0) -> torch.Tensor:
    """Varifocal loss (VarifocalNet, as RT-DETR uses it), summed over all elements.

    ``BCE(logits, q)`` weighted by ``alpha * p^gamma`` on negatives and by the target score ``q`` on
    positives, where ``q`` is the IoU of the matched box at its class (0 elsewhere) and ``p = sigmoid``
    (detached). ``logits, target_scores, is_positive [..., num_classes]`` -> scalar.
    """
    prob = logits.detach().sigmoid()
    weight = alpha * prob.pow(gamma) * (~is_positive) + target_scores
    return F.binary_cross_entropy_with_logits(logits, target_scores, weight=weight, reduction="sum")


class RTDETRCriterion(nn.Module):
    """Hungarian-matched varifocal + L1 + GIoU losses over every supervised output.

    Supervised: each decoder layer, the encoder's top-K (both matched with :class:`HungarianMatcher`) and
    each layer's denoising queries (matched by construction). Each term is ``sum / num_boxes`` (``num_boxes``
    times the denoising groups for the denoising outputs).

    ``forward(outputs, targets)`` -> ``dict(loss, loss_vfl, loss_bbox, loss_giou)``: the three weighted terms
    summed over all outputs, and ``loss`` their total.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher | None = None, weight_vfl: float = 1.0,
                 weight_bbox: float = 5.0, weight_giou: float = 2.0, alpha: float = 0.75, gamma: float = 2.0):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        self.weights = {"loss_vfl": weight_vfl, "loss_bbox": weight_bbox, "loss_giou": weight_giou}
        self.alpha, self.gamma = alpha, gamma

    def output_losses(self, logits: torch.Tensor, boxes: torch.Tensor, targets: Sequence[dict[str, torch.Tensor]],
                      indices: Sequence[tuple[torch.Tensor, torch.Tensor]],
                      num_boxes: float) -> dict[str, torch.Tensor]:
        """Unweighted losses of one output: ``logits [B, Q, K]``, ``boxes [B, Q, 4]`` and the matches."""
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        pred_idx = torch.cat([src for src, _ in indices])
        matched_boxes = boxes[batch_idx, pred_idx]
        target_boxes = torch.cat([t["boxes"][tgt] for t, (_, tgt) in zip(targets, indices)])
        target_labels = torch.cat([t["labels"][tgt] for t, (_, tgt) in zip(targets, indices)])

        matched_xyxy, target_xyxy = cxcywh_to_xyxy(matched_boxes), cxcywh_to_xyxy(target_boxes)
        ious = box_iou(matched_xyxy.detach(), target_xyxy).diagonal()
        is_positive = torch.zeros_like(logits, dtype=torch.bool)
        is_positive[batch_idx, pred_idx, target_labels] = True
        target_scores = torch.zeros_like(logits)
        target_scores[batch_idx, pred_idx, target_labels] = ious.to(logits.dtype)
        return {
            "loss_vfl": varifocal_loss(logits, target_scores, is_positive, self.alpha, self.gamma) / num_boxes,
            "loss_bbox": F.l1_loss(matched_boxes, target_boxes, reduction="sum") / num_boxes,
            "loss_giou": generalized_box_iou_loss(matched_xyxy, target_xyxy, reduction="sum") / num_boxes,
        }

    def forward(self, outputs: dict[str, Any], targets: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        num_boxes = max(1.0, float(sum(len(t["labels"]) for t in targets)))
        totals = {name: outputs["logits"][-1].new_zeros(()) for name in self.weights}

        def add(losses: dict[str, torch.Tensor]) -> None:
            for name, value in losses.items():
                totals[name] = totals[name] + self.weights[name] * value

        matched = list(zip(outputs["logits"], outputs["boxes"])) + [(outputs["enc_logits"], outputs["enc_boxes"])]
        for logits, boxes in matched:
            add(self.output_losses(logits, boxes, targets, self.matcher(logits, boxes, targets), num_boxes))

        dn: DenoisingQueries | None = outputs.get("dn")
        if dn is not None:
            dn_indices = [(pos, torch.arange(len(t["labels"]), device=pos.device).repeat(dn.num_groups))
                          for pos, t in zip(dn.positive_idx, targets)]
            for logits, boxes in zip(outputs["dn_logits"], outputs["dn_boxes"]):
                add(self.output_losses(logits, boxes, targets, dn_indices, num_boxes * dn.num_groups))
        return dict(loss=sum(totals.values()), **totals)


# ---------------------------------------------------------------------------------------------------------
# detector


class TimmBackbone(nn.Module):
    """A timm model's ``features_only`` maps at strides 8/16/32: ``[B, 3, H, W]`` -> list of ``[B, C_l, H_l, W_l]``."""

    def __init__(self, model_name: str = "resnet18d", pretrained: bool = False, out_indices: Sequence[int] = (2, 3, 4)):
        super().__init__()
        import timm

        self.body = timm.create_model(model_name, pretrained=pretrained, features_only=True,
                                      out_indices=tuple(out_indices))
        self.out_channels = list(self.body.feature_info.channels())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.body(x)


class DETRDetector(nn.Module):
    """torchvision-style detection I/O around ``backbone -> encoder -> decoder`` (shared by RT-DETR and
    DFIR-DETR).

    ``forward(images, targets=None)``:
        images: list of ``[3, H_i, W_i]`` float images in 0..1 (sizes may differ) or a ``[B, 3, H, W]`` batch;
            each is resized to ``input_size`` x ``input_size`` and normalised with ImageNet's mean and std.
        targets (training): per image ``boxes [n_i, 4]`` (xyxy pixels of that image) and ``labels [n_i]``
            (int64 in ``[0, num_classes)``); images without boxes are allowed.
    Returns:
        training: ``dict(loss, loss_vfl, loss_bbox, loss_giou)`` (scalars; ``loss`` is the sum of the other
            three, each already weighted and summed over all decoder layers, the encoder and denoising);
        eval: per image ``dict(boxes [K, 4] xyxy pixels, labels [K] int64, scores [K])``, the top
            ``max_detections`` (query, class) pairs sorted by score.
    """

    def __init__(self, backbone: nn.Module, encoder: nn.Module, decoder: RTDETRDecoder, criterion: RTDETRCriterion,
                 input_size: int = 640, max_detections: int = 300):
        super().__init__()
        if input_size % 32:
            raise ValueError(f"input_size must be a multiple of 32 (the deepest stride), got {input_size}")
        self.backbone, self.encoder, self.decoder, self.criterion = backbone, encoder, decoder, criterion
        self.num_classes = decoder.num_classes
        self.input_size = input_size
        self.img_size = (input_size, input_size)  # read by visionattn.model_info for its FLOPs input
        self.max_detections = max_detections
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Resized, normalised batch ``[B, 3, S, S]`` and the original sizes ``[B, 2]`` as ``(H, W)``."""
        size = (self.input_size, self.input_size)
        batch, sizes = [], []
        for image in images:
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"expected images of shape [3, H, W], got {tuple(image.shape)}")
            sizes.append(image.shape[-2:])
            if tuple(image.shape[-2:]) != size:
                image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
            batch.append(image)
        batch = (torch.stack(batch) - self.pixel_mean) / self.pixel_std
        return batch, torch.tensor([list(s) for s in sizes], dtype=batch.dtype, device=batch.device)

    @staticmethod
    def normalize_targets(targets: Sequence[dict[str, torch.Tensor]],
                          sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Targets with boxes as cxcywh fractions of their image (so resizing leaves them unchanged)."""
        normalized = []
        for t, (h, w) in zip(targets, sizes):
            scale = torch.stack([w, h, w, h]).to(t["boxes"].device)
            boxes = box_convert(t["boxes"].to(scale.dtype).reshape(-1, 4) / scale, "xyxy", "cxcywh").clamp(0, 1)
            normalized.append({"boxes": boxes, "labels": t["labels"].long().reshape(-1)})
        return normalized

    def postprocess(self, logits: torch.Tensor, boxes: torch.Tensor,
                    sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Top ``max_detections`` (query, class) pairs per image; boxes scaled to, and clipped inside, each image."""
        B, Q, K = logits.shape
        scores, flat_idx = logits.sigmoid().flatten(1).topk(min(self.max_detections, Q * K), dim=1)
        labels, query_idx = flat_idx % K, flat_idx // K
        detections = []
        for i in range(B):
            h, w = sizes[i]
            image_corner = torch.stack([w, h, w, h])
            xyxy = torch.minimum((cxcywh_to_xyxy(boxes[i, query_idx[i]]) * image_corner).clamp(min=0), image_corner)
            detections.append({"boxes": xyxy, "labels": labels[i], "scores": scores[i]})
        return detections

    def forward(self, images: Sequence[torch.Tensor] | torch.Tensor,
                targets: Sequence[dict[str, torch.Tensor]] | None = None):
        batch, sizes = self.preprocess(list(images))
        if self.training:
            if targets is None or len(targets) != len(batch):
                raise ValueError("in training mode the detector needs one target dict per image")
            targets = self.normalize_targets(targets, sizes)
        features = self.encoder(self.backbone(batch))
        outputs = self.decoder(features, targets if self.training else None)
        if self.training:
            return self.criterion(outputs, targets)
        return self.postprocess(outputs["logits"][-1], outputs["boxes"][-1], sizes)


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
    ):
        body = TimmBackbone(backbone, pretrained=pretrained_backbone)

        def fusion(c_in: int, c_out: int) -> nn.Module:
            return CSPRepLayer(c_in, c_out, num_blocks=num_fusion_blocks, expansion=expansion)

        encoder = HybridEncoder(body.out_channels, hidden_dim, num_heads, ffn_dim, fusion=fusion)
        decoder = RTDETRDecoder(num_classes, [hidden_dim] * len(body.out_channels), hidden_dim, num_queries,
                                num_decoder_layers, num_heads, ffn_dim, num_points, num_denoising,
                                label_noise_ratio, box_noise_scale)
        super().__init__(body, encoder, decoder, RTDETRCriterion(num_classes), input_size, max_detections)


@register_model(task="detection", paper=PAPER, model_cls=RTDETR, timm=False, input_size=(3, 640, 640),
                notes="ResNet-18-vd (timm resnet18d), hidden 256, 3 decoder layers, 300 queries; "
                      "paper: 20M params, 60 GFLOPs at 640, COCO AP 46.5")
def rtdetr_r18(pretrained: bool = False, **kwargs: Any) -> RTDETR:
    """RT-DETR-R18 (COCO's 80 classes unless ``num_classes`` is given)."""
    if pretrained:
        raise ValueError("no RT-DETR weights are distributed here; "
                         "use pretrained_backbone=True for ImageNet backbone weights")
    return RTDETR(**kwargs)
