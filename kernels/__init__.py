"""Attention kernels (``import visionattn.kernels``).

Neighborhood attention with NATTEN's exact semantics in 1-D, 2-D and 3-D (dilation, stride, causal,
even kernels, relative positional bias, sigmoid scores), forward and backward, with a brute-force
reference, a tiled CPU path and fused Triton kernels for CUDA.
"""
from visionattn.kernels.linear_attention import linear_attention, linear_attention_reference
from visionattn.kernels.neighborhood import BACKENDS, na1d, na2d, na3d, neighborhood_attention, triton_available
from visionattn.kernels.reference import na_reference
from visionattn.kernels.sparse_attention import topk_attention, topk_attention_reference

__all__ = ["BACKENDS", "linear_attention", "linear_attention_reference", "na1d", "na2d", "na3d", "na_reference",
           "neighborhood_attention", "topk_attention", "topk_attention_reference", "triton_available"]
