"""The shell shared by isotropic patch models (NiNformer, Activator): a convolutional patch embedding, a
stack of same-width blocks over a fixed token grid, mean pooling and a linear head, with timm's model API
(``forward_features`` / ``forward_head`` / ``forward_intermediates`` / classifier reset), buildable on any
device (``device='meta'`` included) and in any dtype, scriptable and FX-traceable."""
from __future__ import annotations

import torch
from timm.layers import to_2tuple
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from visionattn.layers.classifier import ClassifierMixin, check_image_input, factory_device


class IsotropicPatchClassifier(ClassifierMixin, nn.Module):
    """Base class. Subclasses build ``self.blocks`` (an ``nn.ModuleList`` of ``[B, N, dim] -> [B, N, dim]``
    blocks) after calling ``super().__init__``, inside ``factory_device(device)``, and end their ``__init__`` with
    ``apply_factory_dtype(self, dtype)``.

    Shapes: ``forward``: ``[B, in_chans, H, W] -> [B, num_classes]``; ``forward_features``:
    ``-> [B, N, embed_dim]`` with ``N = (H / patch_size) * (W / patch_size)``.
    """

    GLOBAL_POOLS = ("", "avg")

    def __init__(self, img_size, patch_size: int, in_chans: int, num_classes: int, global_pool: str,
                 embed_dim: int, depth: int, drop_rate: float = 0.0, device=None):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        if self.img_size[0] % patch_size or self.img_size[1] % patch_size:
            raise ValueError(f"img_size {self.img_size} must be divisible by patch_size {patch_size}")
        self._check_pool(global_pool)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.grad_checkpointing = False
        with factory_device(device):
            self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
            self.blocks = nn.ModuleList()  # filled by the subclass
            self.head_drop = nn.Dropout(drop_rate)
            self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}") for i in range(depth)
        ]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^patch_embed", blocks=[(r"^blocks\.(\d+)", None)])

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            x = check_image_input(x, type(self).__name__, self.in_chans, self.img_size, "its token count is fixed")
        return self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, embed_dim]

    def _forward_blocks(self, x: torch.Tensor, take: list[int], last: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Blocks ``0..last`` on tokens ``[B, N, embed_dim]``; returns the last output and those of ``take``."""
        intermediates: list[torch.Tensor] = []
        for i, blk in enumerate(self.blocks):
            if i <= last:
                if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                    x = checkpoint(blk, x, use_reentrant=False)
                else:
                    x = blk(x)
                if i in take:
                    intermediates.append(x)
        return x, intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, N, embed_dim]``."""
        x, _ = self._forward_blocks(self._embed(x), [], len(self.blocks) - 1)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``[B, N, embed_dim] -> [B, num_classes]`` (``[B, embed_dim]`` with ``pre_logits``)."""
        if self.global_pool == "avg":
            x = x.mean(dim=1)
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
    ):
        """Block outputs as ``[B, embed_dim, H/p, W/p]`` maps (or ``[B, N, embed_dim]`` with ``'NLC'``).
        ``norm`` is accepted for API compatibility: these models have no final norm."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        last = max_index if (stop_early or intermediates_only) else len(self.blocks) - 1
        B = x.shape[0]
        x, intermediates = self._forward_blocks(self._embed(x), list(take), last)
        if output_fmt == "NCHW":
            intermediates = [t.transpose(1, 2).reshape(B, self.embed_dim, *self.grid_size) for t in intermediates]
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True):
        take, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take
