"""NiNformer: a network-in-network transformer with token-mixing-generated gating.

Abdullah & Aydin, arXiv:2403.02411 (Neural Computing & Applications, 2025). Official code:
Abdullah-88/NiNformer (``ninformer.py``), reproduced here block for block:

- no class token and no position embedding (the token-mixing MLP sees token order directly);
- each block uses **one LayerNorm module for both pre-norm positions** (the same weights twice);
- the Mixer Gating Unit multiplies a linear projection of its input by the output of a whole MLP-Mixer
  block computed on the same input (no squashing of the gate);
- the token-mixing MLP has a fixed number of tokens, so the input size is fixed at construction.

Sizes: the released CIFAR configuration (32x32, patch 4, width 256, FFN 512, 4 blocks, dropout 0.5) has
2.65M parameters at 10 classes. ``ninformer_s16_224`` / ``ninformer_b16_224`` are larger 224x224 variants
for timm users (ours, not from the paper; sizes in their docstrings).
"""
from __future__ import annotations

from typing import Any

import torch
from timm.layers import DropPath
from timm.models import build_model_with_cfg, generate_default_cfgs
from torch import nn

from visionattn.layers.classifier import apply_factory_dtype, factory_device
from visionattn.layers.isotropic import IsotropicPatchClassifier
from visionattn.layers.mlp import FeedForward
from visionattn.registry import ReportedFigures, register_model

__all__ = ["NiNformer", "MixerGatingUnit"]

PAPER = "Abdullah & Aydin, NiNformer: A Network in Network Transformer with Token Mixing Generated Gating Function, arXiv:2403.02411"


class MixerGatingUnit(nn.Module):
    """``t -> proj(t) * mixer(t)`` where ``mixer`` is a full MLP-Mixer block. ``[B, N, dim] -> [B, N, dim]``."""

    def __init__(self, dim: int, num_tokens: int, hidden: int, dropout: float):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.token_norm = nn.LayerNorm(dim)
        self.token_mix = FeedForward(num_tokens, hidden, dropout)
        self.channel_norm = nn.LayerNorm(dim)
        self.channel_mix = FeedForward(dim, hidden, dropout)

    def forward(self, t):
        gate = t + self.token_mix(self.token_norm(t).transpose(1, 2)).transpose(1, 2)
        gate = gate + self.channel_mix(self.channel_norm(gate))
        return self.proj(t) * gate


class NiNBlock(nn.Module):
    """``x + MGU(LN(x))`` then ``x + FFN(LN(x))`` with one shared LayerNorm. ``[B, N, dim] -> [B, N, dim]``."""

    def __init__(self, dim: int, num_tokens: int, hidden: int, dropout: float, drop_path: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)  # used at both pre-norm positions, as the official code does
        self.mgu = MixerGatingUnit(dim, num_tokens, hidden, dropout)
        self.ffn = FeedForward(dim, hidden, dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        x = x + self.drop_path(self.mgu(self.norm(x)))
        return x + self.drop_path(self.ffn(self.norm(x)))


class NiNformer(IsotropicPatchClassifier):
    """NiNformer classifier.

    Args:
        img_size: fixed input size (int or ``(H, W)``); patch_size: patch size of the conv embedding.
        embed_dim: token width; mlp_dim: hidden size of every MLP (token mixing, channel mixing, FFN).
        depth: number of NiN blocks; drop_rate: dropout inside every MLP (0.5 in the released config).
        drop_path_rate: stochastic depth (ours, off by default; the official code has none).
        device, dtype: where and in which dtype parameters and buffers are created (timm's factory arguments;
            ``device='meta'`` allocates nothing).
    """

    def __init__(self, img_size=32, patch_size: int = 4, in_chans: int = 3, num_classes: int = 10,
                 global_pool: str = "avg", embed_dim: int = 256, mlp_dim: int = 512, depth: int = 4,
                 drop_rate: float = 0.5, drop_path_rate: float = 0.0, device=None, dtype=None):
        super().__init__(img_size, patch_size, in_chans, num_classes, global_pool, embed_dim, depth, device=device)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        with factory_device(device):
            self.blocks = nn.ModuleList(
                NiNBlock(embed_dim, self.num_patches, mlp_dim, drop_rate, dpr[i]) for i in range(depth)
            )
        apply_factory_dtype(self, dtype)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> NiNformer:
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        NiNformer, "va_" + variant, pretrained, feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs
    )


def _cfg(input_size=(3, 32, 32), num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), **kwargs: Any) -> dict:
    return {
        "url": "", "num_classes": num_classes, "input_size": input_size, "pool_size": None, "fixed_input_size": True,
        "crop_pct": 1.0, "interpolation": "bicubic", "mean": mean, "std": std, "first_conv": "patch_embed",
        "classifier": "head", "license": "mit", "paper_ids": "arXiv:2403.02411",
        "origin_url": "https://github.com/Abdullah-88/NiNformer", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "va_ninformer_cifar": _cfg(),
    "va_ninformer_s16_224": _cfg(input_size=(3, 224, 224), num_classes=1000, crop_pct=0.875,
                                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    "va_ninformer_b16_224": _cfg(input_size=(3, 224, 224), num_classes=1000, crop_pct=0.875,
                                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
})


@register_model(task="classification", paper=PAPER, model_cls=NiNformer, input_size=(3, 32, 32),
                notes="released CIFAR config: 32x32, patch 4, width 256, MLP 512, 4 blocks",
                reported=ReportedFigures(source="official code", params_m=2.65))
def ninformer_cifar(pretrained: bool = False, **kwargs: Any) -> NiNformer:
    """The released CIFAR-10 configuration (10 classes)."""
    return _create("ninformer_cifar", pretrained, **kwargs)


@register_model(task="classification", paper=PAPER, model_cls=NiNformer,
                notes="ours: 224x224, patch 16, width 384, MLP 1536, 12 blocks, dropout 0")
def ninformer_s16_224(pretrained: bool = False, **kwargs: Any) -> NiNformer:
    """224x224 variant (ours): patch 16, width 384, MLP 1536, 12 blocks, no dropout."""
    args = dict(img_size=224, patch_size=16, embed_dim=384, mlp_dim=1536, depth=12, drop_rate=0.0, num_classes=1000)
    return _create("ninformer_s16_224", pretrained, **dict(args, **kwargs))


@register_model(task="classification", paper=PAPER, model_cls=NiNformer,
                notes="ours: 224x224, patch 16, width 768, MLP 3072, 12 blocks, dropout 0")
def ninformer_b16_224(pretrained: bool = False, **kwargs: Any) -> NiNformer:
    """224x224 variant (ours): patch 16, width 768, MLP 3072, 12 blocks, no dropout."""
    args = dict(img_size=224, patch_size=16, embed_dim=768, mlp_dim=3072, depth=12, drop_rate=0.0, num_classes=1000)
    return _create("ninformer_b16_224", pretrained, **dict(args, **kwargs))
