"""Segmentation decoders and networks; each module registers its constructors on import."""
from visionattn.decoders.agunet import AttentionGate, AttentionUNet, DualAttention
from visionattn.decoders.emcad import EMCADDecoder, EMCADNet, MutationLoss, mutation_loss
from visionattn.decoders.herseg import HERSeg

__all__ = ["AttentionGate", "AttentionUNet", "DualAttention", "EMCADDecoder", "EMCADNet", "HERSeg", "MutationLoss",
           "mutation_loss"]
