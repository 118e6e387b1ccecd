"""Building blocks shared by several model families."""
from visionattn.layers.neighborhood import NeighborhoodAttention1d, NeighborhoodAttention2d, NeighborhoodAttention3d

__all__ = ["NeighborhoodAttention1d", "NeighborhoodAttention2d", "NeighborhoodAttention3d"]
