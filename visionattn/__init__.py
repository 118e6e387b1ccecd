"""visionattn: attention-based vision and medical-imaging models sharing attention kernels and task heads.

    >>> import visionattn
    >>> model = visionattn.create_model("convit_tiny", num_classes=10)
    >>> visionattn.list_models("convit*")

Importing visionattn registers its 2-D classifiers in timm under the ``va_`` prefix, so
``timm.create_model("va_convit_tiny")`` works after ``import visionattn``.
"""
from visionattn.registry import (
    create_model,
    get_entry,
    list_models,
    load_checkpoint,
    load_state_dict_file,
    model_info,
    register_model,
)

# importing the families registers their models
from visionattn import backbones, decoders, detectors  # noqa: E402,F401

__version__ = "0.1.0"

__all__ = [
    "create_model",
    "get_entry",
    "list_models",
    "load_checkpoint",
    "load_state_dict_file",
    "model_info",
    "register_model",
    "__version__",
]
