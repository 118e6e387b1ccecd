"""Backbone families; each module registers its constructors on import."""
from visionattn.backbones.activator import Activator
from visionattn.backbones.biformer import BiFormer
from visionattn.backbones.convit import ConViT
from visionattn.backbones.gated_swinrmt import GatedSwinRMT
from visionattn.backbones.ninformer import NiNformer

__all__ = ["Activator", "BiFormer", "ConViT", "GatedSwinRMT", "NiNformer"]
