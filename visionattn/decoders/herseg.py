"""HER-Seg: a single-scale linear-attention encoder (CE-Encoder) and a SAM-style decoder (ME-Decoder).

Xu et al., arXiv:2504.06205 (v2 "HER-Seg", Jul 2025; v1 "HRMedSeg"). Official code: xq141839/HER-Seg, which
is still the v1 implementation (``SAM/LGViT.py``, ``SAM/ecm_decoder.py``, ``SAM/transformer.py``). Built
from the v1 code and the v2 paper's framework figure::

    image [B, in, H, W] -> patch embed 16x16 -> CE-Encoder [B, C, H/16, W/16] -> Neck [B, 256, H/16, W/16]
          -> ME-Decoder -> logits [B, out_channels, H, W]

- CE-Encoder (C = 96): 2 MBConv blocks, then 10 DLA blocks (depths 2, 6, 2; heads 6, 12, 24, i.e. head dims
  16, 8, 4, as the code has it), MLP ratio 2, drop path 0 -> 0.1, all on one H/16 x W/16 grid (no
  hierarchy, no absolute position embedding).
- DLA (dual-gated linear attention): ``G = SiLU(X W_g)``; ``Q, K = ELU(X W_qk) + 1``;
  ``V = up(SiLU(down(X)))`` through a C/4 bottleneck; 2-D RoPE on ``Q, K``; per head
  ``O = (Q~ S) z`` with ``S = K~^T V / N`` and ``z = 1 / (Q . mean K + 1e-6)`` from the UNrotated
  features (:func:`visionattn.kernels.linear_attention`, linear in N); ``O += DWConv3x3(V)`` (LePE);
  ``Y = (O * G) W_out``.
- Neck: Conv1x1 (C -> 256) -> LayerNorm2d -> Conv3x3 -> LayerNorm2d, SAM's embedding shape.
- ME-Decoder: SAM's two-way transformer (D = 256, depth 2, 8 heads, token MLP 256, cross-attention
  width D/2, random-Fourier dense PE, SAM's "no-mask" dense embedding) with meta-pooling
  (``Pool_k(x) = AvgPool_k(x) - x``, k in {5, 9, 13}) on the image side of both cross-attentions; then
  x4 upscaling (two stride-2 transposed convolutions), one hypernetwork MLP per task token and a bilinear
  resize to H x W.

Guessed parts (the v2 paper body is not public; each is labelled [guess] where it is built):

- Meta-pooling (not in the v1 code, where it is commented out): its combination
  ``x + sum_k Pool_k(x)`` and where the second group enters the image-to-token attention.
- Multi-class output: one task token (and hypernetwork) per class. v1 carries SAM's four output tokens
  (IoU + 3 mask tokens) and reads only token 0 (the IoU token) through hypernetwork 0.
- Everything else follows the v1 code, which v2 may have changed: e.g. the figure draws the x4 upscaling
  as one "4x4 TransConv" where v1 has two 2x2 stride-2 ones (kept).

Not guesses, but differences from v1: RoPE angles and the dense PE are computed for the input's grid
(v1 fixes them to ``img_size``), non-square inputs work, and the batch is decoded at once (v1 loops).

Sizes: 3,240,016 parameters with ``out_channels=1`` (encoder 957,648, neck 615,424, decoder 1,666,944).
Each further class adds a task token and a hypernetwork MLP (140,064), so 3 classes give 3,520,144: the
v1 code's 3,526,364 less its prompt encoder (6,220), as v1 always carries four output tokens and three
hypernetwork MLPs (two of which never reach its output). FLOPs at 1024 x 1024 (``visionattn.model_info``):
8.21 GMACs, i.e. 16.41 GFLOPs at 2 per multiply-add (encoder 3.94, neck 2.52, decoder 1.75 GMACs); the v1
code measures 8.23 GMACs and the paper reports 9.39 G "FLOPs" (12.6% above ours if those are
multiply-adds, as common counters report; what v2 changed is not public). One training step at
1024 x 1024, batch 1, peaks at 499 MiB of live tensors on the CPU (``visionattn.tasks.bench_herseg``),
against the paper's 0.59 GB of GPU memory.

MONAI conventions: ``spatial_dims, in_channels, out_channels`` first (``spatial_dims`` must be 2); logits
out, one tensor in training and in eval. HER-Seg has a single output head: ``deep_supervision=True`` makes
training return that one output as a one-element list, so code written for the other families'
deep-supervision lists (``monai.losses.DeepSupervisionLoss``) runs unchanged. Any input size works: sides
that are not multiples of ``size_divisible`` (16, the patch size) are zero-padded (bottom/right) and the
logits cropped back, with shape arithmetic only. Scripted (``torch.jit.script``), traced or exported
(``torch.export``, ONNX), the linear attention is computed by plain einsums (:func:`linear_attention_plain`,
the same formulas, still linear in N) instead of :func:`visionattn.kernels.linear_attention`.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, Mlp
from torch import nn

from visionattn.kernels.backends import check_backend
from visionattn.kernels.linear_attention import linear_attention
from visionattn.layers.classifier import init_vit_weights
from visionattn.layers.segmentation import crop_to, exporting, pad_to_multiple
from visionattn.registry import ReportedFigures, register_model

__all__ = ["CEEncoder", "DLABlock", "DualGatedLinearAttention", "HERSeg", "MEDecoder", "MBConv", "MetaPooling",
           "RoPE2d", "linear_attention_plain"]

PAPER = ("Xu et al., HER-Seg: Holistically Efficient Segmentation for High-Resolution Medical Images "
         "(v1: HRMedSeg), arXiv:2504.06205")

PATCH_SIZE = 16


def linear_attention_plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_rot: torch.Tensor, k_rot: torch.Tensor,
                           eps: float = 1e-6) -> torch.Tensor:
    """:func:`visionattn.kernels.linear_attention`'s formulas as three einsums (``S = k~^T v / N``,
    ``z = 1 / (q . mean k + eps)``, ``out = (q~ S) z``), accumulated in float32 (float64 for float64
    inputs): the form scripted and exported graphs hold. ``[B, N, heads, d]`` -> ``[B, N, heads, dv]``."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    n = q.shape[1]
    S = torch.einsum("bnhd,bnhe->bhde", k_rot.to(acc), v.to(acc)) / n
    kbar = k.to(acc).mean(1)
    z = 1.0 / (torch.einsum("bnhd,bhd->bnh", q.to(acc), kbar) + eps)
    return (torch.einsum("bnhd,bhde->bnhe", q_rot.to(acc), S) * z.unsqueeze(-1)).to(v.dtype)


class MBConv(nn.Module):
    """Inverted residual on ``[B, C, h, w]``: Conv1x1 (C -> eC) + BN -> GELU -> DW3x3 + BN -> GELU ->
    Conv1x1 (eC -> C) + BN (gamma starts at 0), residual add, then a GELU after the add (v1; v1's drop
    path here is always 0)."""

    def __init__(self, dim: int, expansion: float = 2.0):
        super().__init__()
        hidden = int(dim * expansion)
        self.expand = nn.Sequential(nn.Conv2d(dim, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.GELU())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
                                       nn.BatchNorm2d(hidden), nn.GELU())
        self.project = nn.Sequential(nn.Conv2d(hidden, dim, 1, bias=False), nn.BatchNorm2d(dim))
        nn.init.zeros_(self.project[1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x + self.project(self.depthwise(self.expand(x))))


class RoPE2d(nn.Module):
    """2-D rotary position embedding over the full channel width, as v1's ``RoPE``.

    Channels are taken as ``dim / 2`` adjacent pairs rotated as complex numbers. With ``k = dim / 4``
    frequencies ``theta_j = base^(-j / k)``, pair ``j < k`` turns by ``row * theta_j`` and pair ``k + j``
    by ``col * theta_j``. Heads are split after rotating, so with contiguous heads each head sees rows,
    columns or both depending on where its channels fall (v1 behaviour).
    """

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        if dim % 4:
            raise ValueError(f"RoPE2d needs a channel count divisible by 4, got {dim}")
        k = dim // 4
        self.register_buffer("inv_freq", base ** (-torch.arange(k, dtype=torch.float32) / k), persistent=False)

    def angles(self, grid: Tuple[int, int]) -> torch.Tensor:
        """``[h * w, dim / 2]`` rotation angles of the row-major grid positions."""
        h, w = grid
        rows, cols = torch.meshgrid([torch.arange(h, device=self.inv_freq.device, dtype=torch.float32),
                                     torch.arange(w, device=self.inv_freq.device, dtype=torch.float32)], indexing="ij")
        return torch.cat([rows.reshape(-1, 1) * self.inv_freq, cols.reshape(-1, 1) * self.inv_freq], dim=-1)

    def forward(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """``x [B, h * w, dim]`` (row-major tokens) -> rotated ``[B, h * w, dim]``."""
        angles = self.angles(grid)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        pairs = x.unflatten(-1, [-1, 2])
        re, im = pairs[..., 0], pairs[..., 1]
        return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2)


class DualGatedLinearAttention(nn.Module):
    """DLA on tokens ``[B, N, C]`` of an ``h x w`` grid (``N = h * w``, row-major) -> ``[B, N, C]``.

    Gate 1 builds the values through a bottleneck, ``V = up(SiLU(down(X)))`` (C -> C/4 -> C; v1 names the
    two projections the other way round); gate 2 filters the attention output, ``G = SiLU(X W_g)``.
    ``attention_backend`` is passed to :func:`visionattn.kernels.linear_attention`.
    """

    def __init__(self, dim: int, num_heads: int, attention_backend: str = "auto", eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"DLA: num_heads={num_heads} must divide dim={dim}")
        self.num_heads, self.eps = num_heads, eps
        self.attention_backend = check_backend("DualGatedLinearAttention", attention_backend)
        self.gate = nn.Linear(dim, dim)
        self.qk = nn.Linear(dim, 2 * dim)
        self.v_down = nn.Linear(dim, dim // 4)
        self.v_up = nn.Linear(dim // 4, dim)
        self.rope = RoPE2d(dim)
        self.lepe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape[0], x.shape[1], x.shape[2]
        gate = F.silu(self.gate(x))
        qk = self.qk(x).chunk(2, dim=-1)
        q, k = F.elu(qk[0]) + 1.0, F.elu(qk[1]) + 1.0
        v = self.v_up(F.silu(self.v_down(x)))
        heads = [B, N, self.num_heads, C // self.num_heads]
        q_rot, k_rot = self.rope(q, grid).view(heads), self.rope(k, grid).view(heads)
        q, k, v_heads = q.view(heads), k.view(heads), v.view(heads)
        if torch.jit.is_scripting():
            out = linear_attention_plain(q, k, v_heads, q_rot, k_rot, self.eps)
        elif exporting():
            out = linear_attention_plain(q, k, v_heads, q_rot, k_rot, self.eps)
        else:
            out = self._kernel(q, k, v_heads, q_rot, k_rot)
        lepe = self.lepe(v.transpose(1, 2).reshape(B, C, grid[0], grid[1])).flatten(2).transpose(1, 2)
        return self.proj((out.reshape(B, N, C) + lepe) * gate)

    @torch.jit.unused
    def _kernel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_rot: torch.Tensor,
                k_rot: torch.Tensor) -> torch.Tensor:
        return linear_attention(q, k, v, q_rot, k_rot, eps=self.eps, backend=self.attention_backend)


class DLABlock(nn.Module):
    """Pre-norm block on ``[B, N, C]``: ``x + DropPath(DLA(LN(x)))``, then ``x + DropPath(MLP(LN(x)))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 2.0, drop_path: float = 0.0,
                 attention_backend: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = DualGatedLinearAttention(dim, num_heads, attention_backend)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), grid))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CEEncoder(nn.Module):
    """Patch embedding (Conv 16x16, stride 16) -> MBConv blocks -> DLA blocks, all at one width on one grid.

    ``forward``: ``[B, in_channels, H, W] -> [B, embed_dim, H/16, W/16]``. Drop-path rates rise linearly
    from 0 to ``drop_path_rate`` over the MBConv and DLA blocks together; as in v1, only the DLA blocks
    apply theirs.
    """

    def __init__(self, in_channels: int = 3, embed_dim: int = 96, mbconv_depth: int = 2,
                 depths: Sequence[int] = (2, 6, 2), num_heads: Sequence[int] = (6, 12, 24), mlp_ratio: float = 2.0,
                 drop_path_rate: float = 0.1, attention_backend: str = "auto"):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} must have the same length")
        self.patch_embed = nn.Conv2d(in_channels, embed_dim, PATCH_SIZE, stride=PATCH_SIZE)
        self.mbconvs = nn.Sequential(*(MBConv(embed_dim, mlp_ratio) for _ in range(mbconv_depth)))
        rates = torch.linspace(0, drop_path_rate, mbconv_depth + sum(depths), device="cpu").tolist()[mbconv_depth:]
        stage_heads = [h for depth, h in zip(depths, num_heads) for _ in range(depth)]
        self.blocks = nn.ModuleList(DLABlock(embed_dim, h, mlp_ratio, rate, attention_backend)
                                    for h, rate in zip(stage_heads, rates))
        self.apply(init_vit_weights)


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mbconvs(self.patch_embed(x))
        B, C, h, w = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        tokens = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            tokens = block(tokens, (h, w))
        return tokens.transpose(1, 2).reshape(B, C, h, w)


class Neck(nn.Sequential):
    """``[B, C, h, w] -> [B, out_dim, h, w]``: Conv1x1 -> LayerNorm2d -> Conv3x3 -> LayerNorm2d, no biases."""

    def __init__(self, in_dim: int, out_dim: int = 256):
        super().__init__(nn.Conv2d(in_dim, out_dim, 1, bias=False), LayerNorm2d(out_dim),
                         nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=False), LayerNorm2d(out_dim))


class MetaPooling(nn.Module):
    """``[B, D, h, w] -> [B, D, h, w]``: ``x + sum_k Pool_k(x)`` with PoolFormer's
    ``Pool_k(x) = AvgPool(k, stride 1, pad k // 2, count_include_pad=False)(x) - x``.

    [guess] The v2 figure shows the group of kernels {5, 9, 13}; the sum with the identity is the line
    v1 left commented out (``keys + pool1(keys) + pool2(keys) + pool3(keys)``).
    """

    def __init__(self, pool_sizes: Sequence[int] = (5, 9, 13)):
        super().__init__()
        self.pools = nn.ModuleList(nn.AvgPool2d(k, stride=1, padding=k // 2, count_include_pad=False)
                                   for k in pool_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.jit.annotate(Optional[torch.Tensor], None)
        for pool in self.pools:
            y = pool(x) - x
            pooled = y if pooled is None else pooled + y
        return x if pooled is None else x + pooled


class RandomFourierPE(nn.Module):
    """SAM's dense positional encoding: pixel centres in ``[-1, 1]^2`` (x, y) times a fixed Gaussian matrix
    ``[2, dim / 2]``, times 2 pi, as ``[sin, cos]``. ``forward((h, w)) -> [h * w, dim]`` (row-major)."""

    def __init__(self, dim: int = 256, scale: float = 1.0):
        super().__init__()
        self.register_buffer("gaussian_matrix", scale * torch.randn(2, dim // 2))

    def forward(self, grid: Tuple[int, int]) -> torch.Tensor:
        h, w = grid
        device = self.gaussian_matrix.device
        ys, xs = torch.meshgrid([(torch.arange(h, device=device) + 0.5) / h, (torch.arange(w, device=device) + 0.5) / w],
                                indexing="ij")
        coords = torch.stack([xs, ys], dim=-1).reshape(-1, 2) * 2 - 1
        coords = 2 * math.pi * coords @ self.gaussian_matrix
        return torch.cat([coords.sin(), coords.cos()], dim=-1)


class DownsampledAttention(nn.Module):
    """SAM's attention with an internal width ``dim / downsample_rate``: ``q [B, Nq, dim]``,
    ``k, v [B, Nk, dim]`` -> ``[B, Nq, dim]``."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1):
        super().__init__()
        inner = dim // downsample_rate
        if inner % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the attention width {inner}")
        self.num_heads = num_heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, inner) for _ in range(3))
        self.out_proj = nn.Linear(inner, dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = self.q_proj(q).unflatten(-1, [self.num_heads, -1]).transpose(1, 2)
        k = self.k_proj(k).unflatten(-1, [self.num_heads, -1]).transpose(1, 2)
        v = self.v_proj(v).unflatten(-1, [self.num_heads, -1]).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class TwoWayBlock(nn.Module):
    """SAM's two-way block (post-norm) with meta-pooled image features.

    Tokens ``[B, T, D]`` and image tokens ``[B, N, D]`` of an ``h x w`` grid:

    1. token self-attention (the first block uses no PE and no residual, as SAM);
    2. task-multiscale cross-attention, tokens -> image: keys are the image (+ PE), values the meta-pooled
       image (v2 figure; the v1 code uses the raw image);
    3. token MLP (ReLU);
    4. multiscale-task cross-attention, image -> tokens: [guess] the queries are the meta-pooled image
       (+ PE), the figure's second pooling group on this path. The image is unchanged between 2 and 4, so
       both groups pool the same map and it is pooled once.
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int, pool_sizes: Sequence[int],
                 skip_first_layer_pe: bool):
        super().__init__()
        self.skip_first_layer_pe = skip_first_layer_pe
        self.self_attn = DownsampledAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.meta_pool = MetaPooling(pool_sizes)
        self.token_to_image = DownsampledAttention(dim, num_heads, downsample_rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_dim, act_layer=nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)
        self.image_to_token = DownsampledAttention(dim, num_heads, downsample_rate)
        self.norm4 = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor, token_pe: torch.Tensor, image_pe: torch.Tensor,
                grid: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.skip_first_layer_pe:
            tokens = self.self_attn(tokens, tokens, tokens)
        else:
            q = tokens + token_pe
            tokens = tokens + self.self_attn(q, q, tokens)
        tokens = self.norm1(tokens)
        B, D = image.shape[0], image.shape[2]
        pooled = self.meta_pool(image.transpose(1, 2).reshape(B, D, grid[0], grid[1])).flatten(2).transpose(1, 2)
        tokens = self.norm2(tokens + self.token_to_image(tokens + token_pe, image + image_pe, pooled))
        tokens = self.norm3(tokens + self.mlp(tokens))
        image = self.norm4(image + self.image_to_token(pooled + image_pe, tokens + token_pe, tokens))
        return tokens, image


class MEDecoder(nn.Module):
    """``[B, dim, h, w]`` image embedding -> ``[B, num_classes, out_h, out_w]`` logits.

    One learned task token per class [guess: multi-class reading of the figure] passes the two-way blocks,
    a final token -> image attention and LayerNorm; the image path is upscaled x4 (ConvT 2x2 s2 ->
    LayerNorm2d -> GELU -> ConvT 2x2 s2 -> GELU, to ``dim / 8`` channels, v1), each token goes through its
    own hypernetwork MLP (3 layers, ``dim -> dim -> dim -> dim / 8``), its dot product with the upscaled
    features gives the mask at ``4h x 4w``, resized bilinearly to ``out_size``. SAM's no-mask dense
    embedding is added to the image first (v1 runs SAM's prompt encoder with no prompts).
    """

    def __init__(self, num_classes: int, dim: int = 256, depth: int = 2, num_heads: int = 8, mlp_dim: int = 256,
                 downsample_rate: int = 2, pool_sizes: Sequence[int] = (5, 9, 13)):
        super().__init__()
        self.task_tokens = nn.Embedding(num_classes, dim)
        self.no_mask_embed = nn.Embedding(1, dim)
        self.pe = RandomFourierPE(dim)
        self.blocks = nn.ModuleList(TwoWayBlock(dim, num_heads, mlp_dim, downsample_rate, pool_sizes, i == 0)
                                    for i in range(depth))
        self.final_attn = DownsampledAttention(dim, num_heads, downsample_rate)
        self.final_norm = nn.LayerNorm(dim)
        self.upscale = nn.Sequential(nn.ConvTranspose2d(dim, dim // 4, 2, stride=2), LayerNorm2d(dim // 4), nn.GELU(),
                                     nn.ConvTranspose2d(dim // 4, dim // 8, 2, stride=2), nn.GELU())
        self.hypernets = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim // 8))
            for _ in range(num_classes))

    def forward(self, image_embedding: torch.Tensor, out_size: List[int]) -> torch.Tensor:
        B, D, h, w = image_embedding.shape[0], image_embedding.shape[1], image_embedding.shape[2], image_embedding.shape[3]
        image = (image_embedding + self.no_mask_embed.weight.view(1, D, 1, 1)).flatten(2).transpose(1, 2)
        image_pe = self.pe((h, w)).to(image.dtype)[None]
        token_pe = self.task_tokens.weight.repeat(B, 1, 1)  # a copy, not a view: hooks on module inputs need a grad_fn
        tokens = token_pe
        for block in self.blocks:
            tokens, image = block(tokens, image, token_pe, image_pe, (h, w))
        tokens = self.final_norm(tokens + self.final_attn(tokens + token_pe, image + image_pe, image))
        features = self.upscale(image.transpose(1, 2).reshape(B, D, h, w))  # [B, D/8, 4h, 4w]
        per_class: List[torch.Tensor] = []
        for i, mlp in enumerate(self.hypernets):
            per_class.append(mlp(tokens[:, i]))
        weights = torch.stack(per_class, dim=1)  # [B, K, D/8]
        masks = (weights @ features.flatten(2)).unflatten(-1, features.shape[-2:])
        return F.interpolate(masks, size=out_size, mode="bilinear", align_corners=False)


class HERSeg(nn.Module):
    """HER-Seg: CE-Encoder -> Neck -> ME-Decoder (see the module docstring for the architecture and the
    guessed parts).

    Args:
        spatial_dims: must be 2 (MONAI's first argument; HER-Seg is 2-D).
        in_channels, out_channels: image channels and classes (MONAI naming); one task token per class.
        img_size: the nominal input size (used for FLOP counts and as the registry's default input).
        embed_dim, mbconv_depth, depths, num_heads, mlp_ratio, drop_path_rate: the CE-Encoder.
        decoder_dim, decoder_depth, decoder_heads, decoder_mlp_dim, attention_downsample_rate, pool_sizes:
            the Neck's output width and the ME-Decoder.
        attention_backend: DLA's linear-attention backend, ``'auto'``, ``'torch'`` (chunked),
            ``'triton'`` or ``'reference'`` (quadratic; for tests and memory comparisons).
        deep_supervision: return the (single) output as a one-element list in training, like the other
            families' deep-supervision lists; off by default.

    ``forward``: ``[B, in_channels, H, W] -> [B, out_channels, H, W]`` logits for any ``H, W`` (zero-padded
    to multiples of :attr:`size_divisible`, the patch size 16, and cropped back).
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 3, out_channels: int = 1,
                 img_size: int | Sequence[int] = 1024, embed_dim: int = 96, mbconv_depth: int = 2,
                 depths: Sequence[int] = (2, 6, 2), num_heads: Sequence[int] = (6, 12, 24), mlp_ratio: float = 2.0,
                 drop_path_rate: float = 0.1, decoder_dim: int = 256, decoder_depth: int = 2, decoder_heads: int = 8,
                 decoder_mlp_dim: int = 256, attention_downsample_rate: int = 2, pool_sizes: Sequence[int] = (5, 9, 13),
                 attention_backend: str = "auto", deep_supervision: bool = False):
        super().__init__()
        if spatial_dims != 2:
            raise ValueError(f"HER-Seg is a 2-D network; got spatial_dims={spatial_dims}")
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if len(img_size) != 2 or any(s % PATCH_SIZE for s in img_size):
            raise ValueError(f"HERSeg: img_size must be two multiples of {PATCH_SIZE}, got {img_size}")
        self.spatial_dims, self.in_channels, self.out_channels, self.img_size = 2, in_channels, out_channels, img_size
        self.deep_supervision = bool(deep_supervision)
        self.size_divisible = PATCH_SIZE
        self.encoder = CEEncoder(in_channels, embed_dim, mbconv_depth, depths, num_heads, mlp_ratio, drop_path_rate,
                                 attention_backend)
        self.neck = Neck(embed_dim, decoder_dim)
        self.decoder = MEDecoder(out_channels, decoder_dim, decoder_depth, decoder_heads, decoder_mlp_dim,
                                 attention_downsample_rate, pool_sizes)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"HERSeg expects [B, {self.in_channels}, H, W], got {list(x.shape)}")
        size = x.shape[2:]
        x = pad_to_multiple(x, self.size_divisible)
        logits = crop_to(self.decoder(self.neck(self.encoder(x)), x.shape[2:]), size)
        if self.training and self.deep_supervision:
            return [logits]
        return logits


@register_model(task="segmentation", paper=PAPER, model_cls=HERSeg, timm=False, input_size=(3, 1024, 1024),
                notes="CE-Encoder (dim 96) + ME-Decoder",
                reported=(ReportedFigures(compute=9.39, compute_unit="G", metric="GB training memory per image",
                                          value=0.59),
                          ReportedFigures(source="v1 code", params_m=3.53, compute=8.23,
                                          setting="3 hypernetworks")))
def herseg(pretrained: bool = False, **kwargs: Any) -> HERSeg:
    """HER-Seg as the v1 code configures it (``--dim 96``), at 1024 x 1024."""
    if pretrained:
        raise ValueError("no HER-Seg weights are distributed here (the released PFD checkpoint is not in the "
                         "repository snapshot); train from scratch or load a state dict yourself")
    return HERSeg(**kwargs)
