"""Attention kernels (``import visionattn.kernels``)."""
