"""Object detectors (torchvision's detection I/O); each module registers its constructors on import."""
from visionattn.detectors.dfir_detr import DFIRDETR
from visionattn.detectors.rtdetr import RTDETR, DETRDetector

__all__ = ["DETRDetector", "DFIRDETR", "RTDETR"]
