"""RT-DETR's decoder: IoU-aware query selection from the encoder's tokens, then a post-LN transformer
decoder whose cross-attention is multi-scale deformable attention, with a box refinement at every layer.

Shapes: ``B`` images, ``L`` levels of ``H_l x W_l`` tokens (``S = sum H_l W_l``), ``C`` = ``hidden_dim``,
``Q`` = ``num_queries`` (plus ``num_dn`` denoising queries in training), boxes cxcywh in 0..1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from visionattn.detectors.detr.blocks import MLP, ConvNormAct
from visionattn.detectors.detr.boxes import inverse_sigmoid
from visionattn.detectors.detr.denoising import build_denoising_queries

__all__ = ["DecoderConfig", "DecoderLayer", "MSDeformableAttention", "RTDETRDecoder",
           "multi_scale_deformable_sampling"]


@dataclass(frozen=True)
class DecoderConfig:
    """The decoder's sizes and its training-time denoising, one object for every detector family
    (RT-DETR-R18's values by default).

    Attributes:
        hidden_dim, num_heads, ffn_dim: width, attention heads and ReLU-FFN width of each layer.
        num_queries: queries taken from the encoder's top-scoring tokens (IoU-aware query selection).
        num_layers: decoder layers (each one refines the boxes and is supervised).
        num_points: deformable sampling points per head and level.
        num_denoising, label_noise_ratio, box_noise_scale: contrastive denoising in training
            (:func:`~visionattn.detectors.detr.denoising.build_denoising_queries`).
    """

    hidden_dim: int = 256
    num_heads: int = 8
    ffn_dim: int = 1024
    num_queries: int = 300
    num_layers: int = 3
    num_points: int = 4
    num_denoising: int = 100
    label_noise_ratio: float = 0.5
    box_noise_scale: float = 1.0


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


class RTDETRDecoder(nn.Module):
    """Query selection, denoising and the deformable transformer decoder with per-layer heads.

    Args:
        num_classes: object classes (no background class).
        in_channels: channels of each encoder level (projected to ``config.hidden_dim`` first).
        config: sizes and denoising (:class:`DecoderConfig`).

    ``forward(features, targets)``: ``features`` list of ``[B, in_channels[l], H_l, W_l]``; ``targets`` the
    normalised targets (``labels``, ``boxes`` cxcywh 0..1) in training, for denoising. Returns a dict:
    ``logits`` / ``boxes``: per decoder layer ``[B, Q, num_classes]`` / ``[B, Q, 4]`` (cxcywh 0..1);
    ``enc_logits`` / ``enc_boxes``: the encoder's top-K; ``dn_logits`` / ``dn_boxes`` per layer and ``dn``
    (:class:`~visionattn.detectors.detr.denoising.DenoisingQueries`) when denoising ran.
    """

    def __init__(self, num_classes: int, in_channels: Sequence[int] = (256, 256, 256),
                 config: DecoderConfig = DecoderConfig()):
        super().__init__()
        hidden_dim, num_layers = config.hidden_dim, config.num_layers
        self.config = config
        self.num_classes, self.num_queries = num_classes, config.num_queries
        num_levels = len(in_channels)
        self.input_proj = nn.ModuleList(ConvNormAct(c, hidden_dim, 1, act=None) for c in in_channels)
        self.denoising_class_embed = nn.Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes)
        self.enc_output = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim))
        self.enc_score_head = nn.Linear(hidden_dim, num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, num_layers=3)
        self.query_pos_head = MLP(4, 2 * hidden_dim, hidden_dim, num_layers=2)
        self.layers = nn.ModuleList(
            DecoderLayer(hidden_dim, config.num_heads, config.ffn_dim, num_levels, config.num_points)
            for _ in range(num_layers))
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
                                         self.config.num_denoising, self.config.label_noise_ratio,
                                         self.config.box_noise_scale)
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
