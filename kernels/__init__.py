"""Attention kernels (``import visionattn.kernels``).

Neighborhood attention with NATTEN's exact semantics and argument order in 1-D, 2-D and 3-D (stride,
dilation, causal, even kernels, relative positional bias, sigmoid scores), linear attention (HER-Seg's)
and top-K sparse attention (DFIR-DETR's), forward and backward. Every op takes its tensors positionally
and everything else by keyword, and one backend vocabulary, :data:`BACKENDS` (``'auto'``, ``'reference'``,
``'torch'``, ``'triton'``; see :mod:`visionattn.kernels.backends`).
"""
from visionattn.kernels.backends import BACKENDS, check_backend, resolve_backend, triton_available
from visionattn.kernels.linear_attention import linear_attention, linear_attention_reference
from visionattn.kernels.neighborhood import na1d, na2d, na3d, neighborhood_attention
from visionattn.kernels.reference import na_reference
from visionattn.kernels.semantics import NAParams
from visionattn.kernels.sparse_attention import topk_attention, topk_attention_reference

__all__ = ["BACKENDS", "NAParams", "check_backend", "linear_attention", "linear_attention_reference", "na1d", "na2d",
           "na3d", "na_reference", "neighborhood_attention", "resolve_backend", "topk_attention",
           "topk_attention_reference", "triton_available"]
