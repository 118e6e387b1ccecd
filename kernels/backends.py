"""The backend vocabulary shared by every op in :mod:`visionattn.kernels`, and its validation.

Every kernel (``na1d``/``na2d``/``na3d``, ``linear_attention``, ``topk_attention``) takes
``backend=`` with one of :data:`BACKENDS`:

- ``"auto"`` (the default): ``"triton"`` for CUDA tensors when Triton is usable, else ``"torch"``.
- ``"reference"``: brute force (dense masks or score matrices) differentiated by autograd; small inputs
  only. The test oracle.
- ``"torch"``: the fast pure-PyTorch path (tiled or chunked, explicit backward); runs on any device.
- ``"triton"``: fused Triton kernels; CUDA tensors (or any tensors under ``TRITON_INTERPRET=1``).

Models and modules choose it with one argument, ``attention_backend``, taking the same names. Names
that were used before this vocabulary (``"cpu"`` for the tiled neighborhood path) are rejected with a
message naming their replacement; there is no silent alias.
"""
from __future__ import annotations

import functools
import os

import torch

__all__ = ["BACKENDS", "check_backend", "resolve_backend", "triton_available"]

BACKENDS = ("auto", "reference", "torch", "triton")

# earlier names -> their name in BACKENDS; refused with a pointer, never aliased
_RENAMED = {"cpu": "torch"}


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when Triton kernels can run here: ``triton`` imports and there is a CUDA device or
    ``TRITON_INTERPRET=1`` (Triton's CPU interpreter) is set."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or _interpreting()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _valid_names() -> str:
    return ", ".join(repr(b) for b in BACKENDS)


def check_backend(op: str, backend: object) -> str:
    """``backend`` if it is one of :data:`BACKENDS`; otherwise a ``ValueError`` naming ``op`` and the valid
    names (and, for a former name, what it is called now)."""
    if isinstance(backend, str) and backend in BACKENDS:
        return backend
    if isinstance(backend, str) and backend in _RENAMED:
        new = _RENAMED[backend]
        raise ValueError(
            f"{op}: backend {backend!r} is now called {new!r} (the pure-PyTorch path, which runs on any device); "
            f"backend must be one of {_valid_names()}"
        )
    raise ValueError(f"{op}: backend must be one of {_valid_names()}, got {backend!r}")


def resolve_backend(op: str, backend: object, like: torch.Tensor) -> str:
    """The concrete backend (``"reference"``, ``"torch"`` or ``"triton"``) for a call on tensors on
    ``like``'s device: ``"auto"`` picks ``"triton"`` for CUDA tensors when Triton is usable, else ``"torch"``.
    An explicit ``"triton"`` that cannot run here is a ``ValueError`` saying why."""
    backend = check_backend(op, backend)
    if backend == "auto":
        return "triton" if like.is_cuda and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError(
                f"{op}: backend 'triton' needs the triton package and a CUDA device (or TRITON_INTERPRET=1 set "
                f"before the first Triton call); use 'torch' or 'auto'"
            )
        if not like.is_cuda and not _interpreting():
            raise ValueError(
                f"{op}: backend 'triton' runs on CUDA tensors, got tensors on {like.device}; move them to the GPU "
                f"or use 'torch' or 'auto'"
            )
    return backend
