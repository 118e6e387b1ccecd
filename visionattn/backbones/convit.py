"""ConViT: Vision Transformers with soft convolutional inductive biases.

d'Ascoli et al., ICML 2021, arXiv:2103.10697. Official code: facebookresearch/convit.

The first ``local_up_to_layer`` blocks use gated positional self-attention (GPSA): each head mixes a
content attention ``softmax(q k^T * scale)`` with a positional attention ``softmax(pos_proj(r_ij))`` over
fixed relative offsets ``r_ij = (dx, dy, dx^2 + dy^2)``, through a learned per-head gate
``g = sigmoid(gating_param)``. The positional heads start as Gaussian-like local kernels ("local init"),
so the network starts convolution-like and can learn to become global. The class token is inserted just
before the first plain multi-head self-attention block.

The state-dict layout is identical to timm's ``convit_*`` and to the official checkpoints, so their weights
load unchanged.

Speed: the positional attention does not depend on the input, so in inference (no autograd) it is
computed once, pre-multiplied by the gate and cached until a parameter changes. Since both attentions are
row-stochastic, ``A @ v = (1 - g) * softmax(q k^T) @ v + (g * P) @ v``; the content term runs through fused
``scaled_dot_product_attention`` and the full ``B x heads x N x N`` mixed attention is never built.

Graph capture: the model scripts (``torch.jit.script``; the scripted model recomputes the positional
attention on every call instead of caching it) and traces with ``torch.fx`` (GPSA is an FX leaf, as in timm).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, PatchEmbed, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models._features import feature_take_indices
from timm.models._features_fx import register_notrace_module
from torch import nn
from torch.utils.checkpoint import checkpoint

from visionattn.layers.classifier import ClassifierMixin, apply_factory_dtype, check_image_input, factory_device
from visionattn.registry import ReportedFigures, register_model

__all__ = ["ConViT", "GatedPositionalSelfAttention", "MultiHeadSelfAttention", "relative_offsets"]

PAPER = "d'Ascoli et al., ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases, ICML 2021, arXiv:2103.10697"


def relative_offsets(
    grid_size: Tuple[int, int], device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Relative position features between all token pairs of a ``(rows, cols)`` grid.

    Returns ``[N, N, 3]`` with ``N = rows * cols`` (row-major tokens); entry ``[i, j]`` is
    ``(col_j - col_i, row_j - row_i, (col_j - col_i)^2 + (row_j - row_i)^2)``.
    """
    rows, cols = grid_size
    r = torch.arange(rows, device=device).repeat_interleave(cols)
    c = torch.arange(cols, device=device).repeat(rows)
    dx = (c[None, :] - c[:, None]).to(dtype)
    dy = (r[None, :] - r[:, None]).to(dtype)
    return torch.stack((dx, dy, dx * dx + dy * dy), dim=-1)


@register_notrace_module  # FX: the positional-attention cache is Python-side state
class GatedPositionalSelfAttention(nn.Module):
    """GPSA over ``N = rows * cols`` patch tokens.

    Input and output ``[B, N, dim]``. ``grid_size`` must be set (by the model) before the first forward.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        locality_strength: float = 1.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.locality_strength = locality_strength
        self.qk = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.attn_drop_rate = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.pos_proj = nn.Linear(3, num_heads)
        self.proj_drop = nn.Dropout(proj_drop)
        self.gating_param = nn.Parameter(torch.ones(num_heads))
        self.grid_size: tuple[int, int] | None = None
        # not buffers: the offsets are derived from the grid, and official checkpoints do not carry them
        self._offsets: torch.Tensor | None = None
        self._gated_pos_cache: tuple[tuple, torch.Tensor] | None = None

    def local_init(self) -> None:
        """Identity value projection and Gaussian-like positional heads centred on a k x k grid of offsets."""
        w = self.v.weight.data
        w.copy_(torch.eye(w.shape[0], device=w.device, dtype=w.dtype))
        k = int(math.sqrt(self.num_heads))
        center = (k - 1) / 2 if k % 2 == 0 else k // 2
        w = self.pos_proj.weight.data
        for h1 in range(k):
            for h2 in range(k):
                head = h1 + k * h2
                w[head, 2] = -1
                w[head, 1] = 2 * (h1 - center)
                w[head, 0] = 2 * (h2 - center)
        # heads beyond k*k (num_heads not a perfect square) keep their random init, as in the original
        w[: k * k] *= self.locality_strength

    def offsets(self, device: torch.device) -> torch.Tensor:
        """``[N, N, 3]`` relative offsets for the current grid (float32, cached per grid and device; computed
        on every call in a scripted model)."""
        grid_size = self.grid_size
        if grid_size is None:
            raise RuntimeError("GatedPositionalSelfAttention.grid_size is not set; the ConViT model sets it")
        if torch.jit.is_scripting():
            return relative_offsets(grid_size, device=device)
        n = self.grid_size[0] * self.grid_size[1]
        if self._offsets is None or self._offsets.shape[0] != n or self._offsets.device != device:
            self._offsets = relative_offsets(self.grid_size, device=device)
        return self._offsets

    def positional_attention(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``softmax(pos_proj(r_ij))`` per head: ``[heads, N, N]``."""
        scores = self.pos_proj(self.offsets(device).to(dtype))  # [N, N, heads]
        return scores.permute(2, 0, 1).softmax(dim=-1)

    def _gated_positional_attention(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``sigmoid(gate) * P``: ``[heads, N, N]``, cached when no gradient is needed.

        The cache key holds every parameter's version counter and storage, so an optimizer step,
        ``load_state_dict`` or a device/dtype move invalidates it.
        """
        if torch.jit.is_scripting():
            return self._compute_gated_positional_attention(device, dtype)
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._compute_gated_positional_attention(device, dtype)
        params = (self.pos_proj.weight, self.pos_proj.bias, self.gating_param)
        key = (self.grid_size, device, dtype) + tuple((p.data_ptr(), p._version) for p in params)
        if self._gated_pos_cache is None or self._gated_pos_cache[0] != key:
            self._gated_pos_cache = (key, self._compute_gated_positional_attention(device, dtype))
        return self._gated_pos_cache[1]

    def _compute_gated_positional_attention(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        gate = torch.sigmoid(self.gating_param).view(-1, 1, 1).to(dtype)
        gated = gate * self.positional_attention(device, dtype)
        # The local heads give far tokens weights like exp(-200) that are subnormal floats, and CPU
        # arithmetic on subnormals is ~15x slower (measured: the [N, N] @ [N, B*hd] product took 6.5 ms
        # instead of 0.4 ms). Weights below 1e-20 change no fp32 output and are dropped.
        return gated.masked_fill(gated < 1e-20, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qk = self.qk(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = qk.unbind(0)  # [B, heads, N, head_dim]
        v = self.v(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        gate = torch.sigmoid(self.gating_param).view(1, -1, 1, 1).to(x.dtype)
        if self.training and self.attn_drop_rate > 0:
            # dropout acts on the mixed attention matrix, so it has to be built explicitly
            content = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
            pos = self.positional_attention(x.device, x.dtype).unsqueeze(0)
            attn = (1.0 - gate) * content + gate * pos
            attn = attn / attn.sum(dim=-1, keepdim=True)
            out = self.attn_drop(attn) @ v
            x = out.transpose(1, 2).reshape(B, N, C)
        else:
            content = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # [B, heads, N, hd]
            gated_pos = self._gated_positional_attention(x.device, x.dtype)  # [heads, N, N]
            # one [N, N] @ [N, B*hd] product per head: the positional attention is shared by the whole
            # batch, and broadcasting it instead runs B*heads skinny products, several times slower
            v_by_head = v.permute(1, 2, 0, 3).reshape(self.num_heads, N, B * self.head_dim)
            pos_out = torch.bmm(gated_pos, v_by_head).view(self.num_heads, N, B, self.head_dim)
            x = (pos_out.permute(2, 1, 0, 3) + content.transpose(1, 2) * (1.0 - gate).transpose(1, 2)).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class MultiHeadSelfAttention(nn.Module):
    """Plain ViT attention (fused SDPA). Input and output ``[B, N, dim]``."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale
        )
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class Block(nn.Module):
    """Pre-norm transformer block; ``use_gpsa`` picks GPSA or plain MHSA. ``[B, N, dim] -> [B, N, dim]``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        use_gpsa: bool = True,
        locality_strength: float = 1.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.use_gpsa = use_gpsa
        if use_gpsa:
            self.attn = GatedPositionalSelfAttention(
                dim, num_heads, qkv_bias, attn_drop, proj_drop, locality_strength=locality_strength
            )
        else:
            self.attn = MultiHeadSelfAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConViT(ClassifierMixin, nn.Module):
    """ConViT image classifier.

    Args:
        img_size: input size (int or ``(H, W)``); fixed, because the absolute position embedding is.
        patch_size: patch size of the convolutional stem.
        in_chans: input channels.
        num_classes: classifier outputs (0 = no classifier, ``forward`` returns pooled features).
        global_pool: ``'token'`` (class token, the default), ``'avg'`` (mean of patch tokens) or ``''``.
        embed_dim: token width (the paper's variants use 48 or 64 per head).
        depth: number of blocks.
        num_heads: attention heads.
        local_up_to_layer: blocks ``[0, local_up_to_layer)`` use GPSA; the class token joins before the
            next block. Must be ``< depth``.
        locality_strength: sharpness of the local init of the positional heads.
        device, dtype: where and in which dtype parameters and buffers are created (timm's factory arguments;
            ``device='meta'`` allocates nothing).

    Shapes: ``forward``: ``[B, in_chans, H, W] -> [B, num_classes]``;
    ``forward_features``: ``-> [B, 1 + N, embed_dim]`` (class token first, ``N = H*W / patch_size^2``).
    """

    GLOBAL_POOLS = ("", "avg", "token")

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        local_up_to_layer: int = 10,
        locality_strength: float = 1.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self._check_pool(global_pool)
        if not 0 <= local_up_to_layer < depth:
            raise ValueError(
                f"local_up_to_layer must be in [0, depth={depth}) so that the class token is inserted; "
                f"got {local_up_to_layer}"
            )
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.img_size = to_2tuple(img_size)
        if self.img_size[0] % patch_size or self.img_size[1] % patch_size:
            raise ValueError(f"img_size {self.img_size} must be divisible by patch_size {patch_size}")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.local_up_to_layer = local_up_to_layer
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1  # the class token, inserted before block local_up_to_layer
        self.grad_checkpointing = False

        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        with factory_device(device):
            self.patch_embed = PatchEmbed(
                img_size=self.img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim
            )
            self.grid_size = self.patch_embed.grid_size
            num_patches = self.grid_size[0] * self.grid_size[1]
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim))
            self.pos_drop = nn.Dropout(pos_drop_rate)
            self.blocks = nn.ModuleList(
                Block(
                    embed_dim, num_heads, mlp_ratio, qkv_bias, proj_drop_rate, attn_drop_rate, dpr[i],
                    use_gpsa=i < local_up_to_layer, locality_strength=locality_strength,
                    norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6),
                )
                for i in range(depth)
            )
            for blk in self.blocks:
                if blk.use_gpsa:
                    blk.attn.grid_size = self.grid_size
            self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
            self.feature_info = [
                dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}") for i in range(depth)
            ]
            self.head_drop = nn.Dropout(drop_rate)
            self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

            trunc_normal_(self.pos_embed, std=0.02)
            trunc_normal_(self.cls_token, std=0.02)
            self.apply(self.init_vit_weights)
            for blk in self.blocks:
                if blk.use_gpsa:
                    blk.attn.local_init()
        apply_factory_dtype(self, dtype)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            x = check_image_input(
                x, type(self).__name__, self.in_chans, self.img_size, "its position embedding has a fixed size"
            )
        return self.pos_drop(self.patch_embed(x) + self.pos_embed)

    def _forward_blocks(self, x: torch.Tensor, take: list[int], last: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Blocks ``0..last`` on embedded tokens, inserting the class token before block ``local_up_to_layer``
        (unless pruned). Returns the last output and the outputs of the blocks in ``take``."""
        intermediates: list[torch.Tensor] = []
        for i, blk in enumerate(self.blocks):
            if i <= last:
                if i == self.local_up_to_layer and self.cls_token is not None:
                    x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
                if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                    x = checkpoint(blk, x, use_reentrant=False)
                else:
                    x = blk(x)
                if i in take:
                    intermediates.append(x)
        return x, intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, 1 + N, embed_dim]`` (normed tokens, class token first; ``[B, N, embed_dim]``
        once pruned before the class token joins)."""
        x, _ = self._forward_blocks(self._embed(x), [], len(self.blocks) - 1)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``[B, 1 + N, embed_dim] -> [B, num_classes]`` (or ``[B, embed_dim]`` with ``pre_logits``)."""
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        elif self.global_pool == "token":
            x = x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x):
        # unannotated, as timm's models: torch.fx copies the root forward's annotations into the code it
        # generates, where this module's string annotations (`from __future__ import annotations`) do not script
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Block outputs as feature maps (timm's API).

        Args:
            indices: last ``n`` blocks if an int, block indices if a list, all if None.
            norm: apply the final norm to each intermediate.
            output_fmt: ``'NCHW'`` (``[B, embed_dim, H/p, W/p]``) or ``'NLC'`` (``[B, N, embed_dim]``);
                the class token is left out of intermediates.
        Returns: ``(forward_features(x), intermediates)`` or only the intermediates.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        last = max_index if (stop_early or intermediates_only) else len(self.blocks) - 1
        B = x.shape[0]
        x, outputs = self._forward_blocks(self._embed(x), list(take), last)
        intermediates = []
        for i, tokens in zip(sorted(set(take)), outputs):  # outputs come in block order
            tokens = self.norm(tokens) if norm else tokens
            tokens = tokens[:, 1:] if (i >= self.local_up_to_layer and self.cls_token is not None) else tokens
            if output_fmt == "NCHW":
                tokens = tokens.transpose(1, 2).reshape(B, self.embed_dim, *self.grid_size)
            intermediates.append(tokens)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop blocks (and optionally norm/head) not needed for ``forward_intermediates(indices)``.

        Keeping only GPSA blocks (before the class token joins) drops the class token too, and with it a
        token-pooled head; ``global_pool='avg'`` then averages every token."""
        take, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if max_index < self.local_up_to_layer and self.cls_token is not None:
            self.cls_token = None
            self.num_prefix_tokens = 0
            prune_head = prune_head or self.global_pool == "token"
        if prune_norm:
            self.norm = self.new_module(nn.Identity())
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new ``head`` (see :meth:`ClassifierMixin.reset_classifier`); ``'token'`` pooling needs the class
        token, which pruning may have removed."""
        if global_pool == "token" and self.cls_token is None:
            raise ValueError("global_pool='token' needs the class token, which prune_intermediate_layers removed")
        super().reset_classifier(num_classes, global_pool)

    @staticmethod
    def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: "ConViT") -> dict[str, torch.Tensor]:
        """Official and timm ConViT checkpoints share our key layout; unwrap ``{'model': ...}`` and resample
        the position embedding when the model was built for another input size."""
        if "model" in state_dict and isinstance(state_dict["model"], dict):
            state_dict = state_dict["model"]
        out = {}
        for k, v in state_dict.items():
            if k.endswith("rel_indices"):
                continue
            if k == "pos_embed" and v.shape != model.pos_embed.shape:
                v = resample_abs_pos_embed(v, new_size=list(model.grid_size), num_prefix_tokens=0, verbose=False)
            out[k] = v
        return out


def _create_convit(variant: str, pretrained: bool = False, **kwargs: Any) -> ConViT:
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        ConViT,
        "va_" + variant,
        pretrained,
        pretrained_filter_fn=ConViT.checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "fixed_input_size": True,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2103.10697",
        "paper_name": "ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases",
        "origin_url": "https://github.com/facebookresearch/convit",
        **kwargs,
    }


# ImageNet-1k weights are timm's (identical to the official ones). They are fetched only when asked for
# with pretrained=True; pretrained_cfg_overlay=dict(file=...) or checkpoint_path= load a local copy.
default_cfgs = generate_default_cfgs({
    "va_convit_tiny.fb_in1k": _cfg(hf_hub_id="timm/convit_tiny.fb_in1k"),
    "va_convit_small.fb_in1k": _cfg(hf_hub_id="timm/convit_small.fb_in1k"),
    "va_convit_base.fb_in1k": _cfg(hf_hub_id="timm/convit_base.fb_in1k"),
    "va_convit_tiny_plus": _cfg(),
    "va_convit_small_plus": _cfg(),
    "va_convit_base_plus": _cfg(),
})


@register_model(task="classification", paper=PAPER, model_cls=ConViT, notes="4 heads x 48",
                reported=ReportedFigures(params_m=5.7, compute=1.0, metric="top-1", value=73.1, dataset="ImageNet-1k"))
def convit_tiny(pretrained: bool = False, **kwargs: Any) -> ConViT:
    """ConViT-Ti: 12 blocks (10 GPSA), 4 heads, width 192."""
    return _create_convit("convit_tiny", pretrained, **dict(dict(embed_dim=192, num_heads=4), **kwargs))


@register_model(task="classification", paper=PAPER, model_cls=ConViT, notes="9 heads x 48",
                reported=ReportedFigures(params_m=27.8, compute=5.4, metric="top-1", value=81.3, dataset="ImageNet-1k"))
def convit_small(pretrained: bool = False, **kwargs: Any) -> ConViT:
    """ConViT-S: 12 blocks (10 GPSA), 9 heads, width 432."""
    return _create_convit("convit_small", pretrained, **dict(dict(embed_dim=432, num_heads=9), **kwargs))


@register_model(task="classification", paper=PAPER, model_cls=ConViT, notes="16 heads x 48",
                reported=ReportedFigures(params_m=86.5, compute=17, metric="top-1", value=82.4, dataset="ImageNet-1k"))
def convit_base(pretrained: bool = False, **kwargs: Any) -> ConViT:
    """ConViT-B: 12 blocks (10 GPSA), 16 heads, width 768."""
    return _create_convit("convit_base", pretrained, **dict(dict(embed_dim=768, num_heads=16), **kwargs))


@register_model(task="classification", paper=PAPER, model_cls=ConViT, notes="4 heads x 64",
                reported=ReportedFigures(params_m=10, compute=2, metric="top-1", value=76.7, dataset="ImageNet-1k"))
def convit_tiny_plus(pretrained: bool = False, **kwargs: Any) -> ConViT:
    """ConViT-Ti+: 4 heads of 64 dims (width 256). No public weights."""
    return _create_convit("convit_tiny_plus", pretrained, **dict(dict(embed_dim=256, num_heads=4), **kwargs))


@register_model(task="classification", paper=PAPER, model_cls=ConViT, notes="9 heads x 64",
                reported=ReportedFigures(params_m=48, compute=10, metric="top-1", value=82.2, dataset="ImageNet-1k"))
def convit_small_plus(pretrained: bool = False, **kwargs: Any) -> ConViT:
    """ConViT-S+: 9 heads of 64 dims (width 576). No public weights."""
    return _create_convit("convit_small_plus", pretrained, **dict(dict(embed_dim=576, num_heads=9), **kwargs))


@register_model(task="classification", paper=PAPER, model_cls=ConViT, notes="16 heads x 64",
                reported=ReportedFigures(params_m=152, compute=30, metric="top-1", value=82.5, dataset="ImageNet-1k"))
def convit_base_plus(pretrained: bool = False, **kwargs: Any) -> ConViT:
    """ConViT-B+: 16 heads of 64 dims (width 1024). No public weights."""
    return _create_convit("convit_base_plus", pretrained, **dict(dict(embed_dim=1024, num_heads=16), **kwargs))
