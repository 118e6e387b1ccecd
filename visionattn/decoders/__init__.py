"""Segmentation decoders and networks; each module registers its constructors on import."""
from visionattn.decoders.emcad import EMCADDecoder, EMCADNet, MutationLoss, mutation_loss

__all__ = ["EMCADDecoder", "EMCADNet", "MutationLoss", "mutation_loss"]
