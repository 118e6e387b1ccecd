"""Pieces every segmentation network here shares (EMCAD, HER-Seg, the attention-gated U-Nets): padding the
input up to the network's stride and cropping the prediction back, telling an export from eager execution,
and loading a deep-supervised run's weights into a network without the auxiliary heads."""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

__all__ = ["crop_to", "drop_deep_supervision_heads", "exporting", "pad_to_multiple"]


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """``x [B, C, *S]`` zero-padded at the end of every spatial axis up to a multiple of ``multiple``; always
    applied (zero where a side fits), so traced and exported graphs have no size-dependent branch."""
    pad: List[int] = []
    spatial = x.shape[2:]
    for i in range(len(spatial) - 1, -1, -1):  # F.pad lists the last axis first
        pad.append(0)
        pad.append((multiple - spatial[i] % multiple) % multiple)
    return F.pad(x, pad)


def crop_to(x: torch.Tensor, size: List[int]) -> torch.Tensor:
    """The first ``size[i]`` entries of every spatial axis ``i`` of ``x [B, C, *S]`` (by ``index_select``: a
    slice that may span the whole axis would let ``torch.export`` specialise on the padding)."""
    for i in range(len(size)):
        x = x.index_select(2 + i, torch.arange(size[i], device=x.device))
    return x


@torch.jit.unused
def exporting() -> bool:
    """True while ``torch.jit.trace``, an ONNX export or ``torch.export`` captures the model: attention then
    takes its plain-PyTorch path instead of a custom kernel, which those graphs cannot hold."""
    is_exporting = getattr(getattr(torch, "compiler", None), "is_exporting", None)
    return bool(torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or (is_exporting is not None and is_exporting()))


def drop_deep_supervision_heads(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                error_msgs) -> None:
    """``load_state_dict`` pre-hook for a network with ``deep_supervision`` and output ``heads`` (finest
    last): built without deep supervision, it drops the auxiliary heads' weights (every ``heads.i`` but the
    last) of a run trained with it; they take no part in its output."""
    if module.deep_supervision:
        return
    head_prefix, keep = prefix + "heads.", str(len(module.heads) - 1)
    for key in [k for k in state_dict if k.startswith(head_prefix)]:
        if key[len(head_prefix):].split(".", 1)[0] != keep:
            del state_dict[key]
