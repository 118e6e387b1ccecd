"""Object detectors (torchvision's detection I/O). The shared DETR parts are the toolkit package
:mod:`visionattn.detectors.detr`; each family module (``rtdetr``, ``dfir_detr``) registers its constructors
on import."""
from visionattn.detectors.detr import DETRDetector
from visionattn.detectors.dfir_detr import DFIRDETR
from visionattn.detectors.rtdetr import RTDETR

__all__ = ["DETRDetector", "DFIRDETR", "RTDETR"]
