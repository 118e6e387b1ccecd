"""Activator: GLU activation functions as the core of a vision transformer (no attention).

Abdullah & Aydin, arXiv:2405.15953. Official code: Abdullah-88/Activator (``activator.py`` and
``activator_only_GEGLU.py``), reproduced here:

- the Activator gating unit is a GLU-MLP, ``W3 (LN(GELU(W1 x)) * LN(W2 x))``, whose two branches pass
  through **one shared LayerNorm** (GEGLU; ``act_layer`` swaps GELU for SiLU / ReLU as in the paper's
  SwiGLU / ReGLU ablations);
- the block is ``x + GU(LN(x))`` then, in the variant with FFN, ``x + FFN(LN(x))``, with one LayerNorm shared
  by both pre-norm positions;
- as the official code does, **every operation after the patch embedding is per token**: no token mixing
  happens before the final mean pool. This is reproduced, not "fixed".

Sizes (CIFAR configuration: 32x32, patch 4, width 256, MLP 512, 4 blocks, dropout 0.5): 2.651M parameters
with FFN, 1.599M GLU-only, at 10 classes. ``activator_s16_224`` is a larger 224x224 variant (ours).
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

__all__ = ["Activator", "ActivatorGatingUnit"]

PAPER = "Abdullah & Aydin, Activator: GLU Activation Function as the Core Component of a Vision Transformer, arXiv:2405.15953"
ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU}


class ActivatorGatingUnit(nn.Module):
    """``W3 (LN(act(W1 x)) * LN(W2 x))`` with one LayerNorm shared by both branches. ``[..., dim] -> [..., dim]``."""

    def __init__(self, dim: int, hidden: int, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        self.fc_gate = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.fc_value = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc_out = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc_out(self.norm(self.act(self.fc_gate(x))) * self.norm(self.fc_value(x)))


class ActivatorBlock(nn.Module):
    """``x + GU(LN(x))`` and, with ``use_ffn``, ``x + FFN(LN(x))`` (one shared LayerNorm)."""

    def __init__(self, dim: int, hidden: int, dropout: float, use_ffn: bool, act_layer: type[nn.Module],
                 drop_path: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.gating = ActivatorGatingUnit(dim, hidden, act_layer)
        self.ffn = FeedForward(dim, hidden, dropout) if use_ffn else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        x = x + self.drop_path(self.gating(self.norm(x)))
        if self.ffn is not None:
            x = x + self.drop_path(self.ffn(self.norm(x)))
        return x


class Activator(IsotropicPatchClassifier):
    """Activator classifier.

    Args:
        img_size: input size (int or ``(H, W)``), checked on every input. Activator mixes no tokens, so its
            weights would fit any size; the shell fixes it as for NiNformer: ``forward_intermediates`` reshapes
            tokens to its grid, timm's config says ``fixed_input_size`` and ``model_info`` counts FLOPs at it.
        patch_size: patch size of the conv embedding.
        embed_dim: token width; mlp_dim: hidden size of the gating unit and the FFN.
        use_ffn: keep the second MLP in each block (``False`` = the GLU-only variant).
        act: ``'gelu'`` (GEGLU, the default), ``'silu'`` (SwiGLU) or ``'relu'`` (ReGLU).
        drop_rate: dropout inside the FFN (0.5 in the released config).
        drop_path_rate: stochastic depth (ours, off by default; the official code has none).
        device, dtype: where and in which dtype parameters and buffers are created (timm's factory arguments;
            ``device='meta'`` allocates nothing).
    """

    def __init__(self, img_size=32, patch_size: int = 4, in_chans: int = 3, num_classes: int = 10,
                 global_pool: str = "avg", embed_dim: int = 256, mlp_dim: int = 512, depth: int = 4,
                 drop_rate: float = 0.5, use_ffn: bool = True, act: str = "gelu", drop_path_rate: float = 0.0,
                 device=None, dtype=None):
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
        super().__init__(img_size, patch_size, in_chans, num_classes, global_pool, embed_dim, depth, device=device)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        with factory_device(device):
            self.blocks = nn.ModuleList(
                ActivatorBlock(embed_dim, mlp_dim, drop_rate, use_ffn, ACTIVATIONS[act], dpr[i]) for i in range(depth)
            )
        apply_factory_dtype(self, dtype)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> Activator:
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        Activator, "va_" + variant, pretrained, feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs
    )


def _cfg(input_size=(3, 32, 32), num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), **kwargs: Any) -> dict:
    """timm's pretrained config of an Activator model (no weights are distributed: ``url`` is empty)."""
    return {
        "url": "", "num_classes": num_classes, "input_size": input_size, "pool_size": None, "fixed_input_size": True,
        "crop_pct": 1.0, "interpolation": "bicubic", "mean": mean, "std": std, "first_conv": "patch_embed",
        "classifier": "head", "license": "mit", "paper_ids": "arXiv:2405.15953",
        "origin_url": "https://github.com/Abdullah-88/Activator", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "va_activator_cifar": _cfg(),
    "va_activator_glu_cifar": _cfg(),
    "va_activator_s16_224": _cfg(input_size=(3, 224, 224), num_classes=1000, crop_pct=0.875,
                                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
})


@register_model(task="classification", paper=PAPER, model_cls=Activator, input_size=(3, 32, 32),
                notes="released CIFAR config with FFN: 32x32, patch 4, width 256, MLP 512, 4 blocks",
                reported=ReportedFigures(source="official code", params_m=2.651))
def activator_cifar(pretrained: bool = False, **kwargs: Any) -> Activator:
    """The released CIFAR-10 configuration with the FFN (10 classes)."""
    return _create("activator_cifar", pretrained, **kwargs)


@register_model(task="classification", paper=PAPER, model_cls=Activator, input_size=(3, 32, 32),
                notes="released GEGLU-only CIFAR config (no FFN)",
                reported=(ReportedFigures(source="official code", params_m=1.599),
                          ReportedFigures(source="paper v4", metric="top-1", value=73.2, dataset="CIFAR-10",
                                          setting="variant not stated")))
def activator_glu_cifar(pretrained: bool = False, **kwargs: Any) -> Activator:
    """The GLU-only configuration (``activator_only_GEGLU.py``; 10 classes)."""
    return _create("activator_glu_cifar", pretrained, **dict(dict(use_ffn=False), **kwargs))


@register_model(task="classification", paper=PAPER, model_cls=Activator,
                notes="ours: 224x224, patch 16, width 384, MLP 1536, 12 blocks, with FFN, dropout 0")
def activator_s16_224(pretrained: bool = False, **kwargs: Any) -> Activator:
    """224x224 variant (ours): patch 16, width 384, MLP 1536, 12 blocks, with FFN, no dropout."""
    args = dict(img_size=224, patch_size=16, embed_dim=384, mlp_dim=1536, depth=12, drop_rate=0.0, num_classes=1000)
    return _create("activator_s16_224", pretrained, **dict(args, **kwargs))
