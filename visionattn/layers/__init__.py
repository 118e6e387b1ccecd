"""Building blocks shared by several model families."""
from visionattn.layers.mlp import FeedForward
from visionattn.layers.neighborhood import NeighborhoodAttention1d, NeighborhoodAttention2d, NeighborhoodAttention3d
from visionattn.layers.shuffle import channel_shuffle

__all__ = ["FeedForward", "NeighborhoodAttention1d", "NeighborhoodAttention2d", "NeighborhoodAttention3d",
           "channel_shuffle"]
