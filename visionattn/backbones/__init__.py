"""Backbone families; each module registers its constructors on import."""
from visionattn.backbones.convit import ConViT

__all__ = ["ConViT"]
