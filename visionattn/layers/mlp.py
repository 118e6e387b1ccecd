"""The token-wise feed-forward MLP of the isotropic patch models (NiNformer's blocks and token mixing,
Activator's FFN)."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["FeedForward"]


class FeedForward(nn.Module):
    """``Linear(dim -> hidden) -> GELU -> Dropout -> Linear(hidden -> dim) -> Dropout`` on the last axis:
    ``[..., dim] -> [..., dim]``."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))
