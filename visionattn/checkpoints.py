"""Weights and trainer checkpoints on disk: read without unpickling code, checked against the sha256 they
carry.

A trainer checkpoint (``last.pt``) stores :func:`state_digest` of its content under :data:`CHECKSUM_KEY`;
a ``.safetensors`` file written by visionattn stores the digest of its tensors in its metadata under
:data:`SAFETENSORS_DIGEST_KEY`. Files from other tools carry neither and load unchecked. Every failure is a
:class:`CheckpointError` (a ``ValueError``) whose message is one line naming the file and the problem.
"""
from __future__ import annotations

import hashlib
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from visionattn.errors import InvalidInputError


CHECKSUM_KEY = "checksum"  # trainer checkpoints: {"sha256": state_digest of every other entry}
SAFETENSORS_DIGEST_KEY = "visionattn.sha256"  # metadata of the .safetensors files atomic_save_weights writes


class CheckpointError(InvalidInputError):
    """A checkpoint that cannot be used: unreadable, refused by ``weights_only``, failing or lacking its
    checksum, or holding non-finite weights. The message is one line naming the file and the problem."""


def state_digest(obj: Any) -> str:
    """sha256 over a (nested) checkpoint: every tensor's key path, dtype, shape and bytes and every plain
    Python value, dict entries in sorted key order, so the same state always gives the same digest."""
    h = hashlib.sha256()
    _digest_into(h, "", obj)
    return h.hexdigest()


def _digest_into(h, path: str, obj: Any) -> None:
    def put(text: str) -> None:  # length-prefixed, so that no two different states give the same stream
        data = text.encode("utf-8", "backslashreplace")
        h.update(len(data).to_bytes(8, "little") + data)

    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        put(f"{path}:tensor:{t.dtype}:{tuple(t.shape)}")
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        put(f"{path}:dict:{len(obj)}")
        for key in sorted(obj, key=repr):
            _digest_into(h, f"{path}/{key!r}", obj[key])
    elif isinstance(obj, (list, tuple)):
        put(f"{path}:{type(obj).__name__}:{len(obj)}")
        for i, value in enumerate(obj):
            _digest_into(h, f"{path}[{i}]", value)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        put(f"{path}:{type(obj).__name__}:{obj!r}")
    else:  # other objects: only their type, since their repr may hold a memory address
        put(f"{path}:{type(obj).__qualname__}")


def one_line_error(e: BaseException, limit: int = 240) -> str:
    """``Type: first sentence`` of an exception, on one line (torch's messages run over several)."""
    text = " ".join(str(e).split()).strip("'\"")
    text = text.split(". ")[0] if text else "empty or cut short"
    return f"{type(e).__name__}: {text[:limit]}"


def _weights_only_refusal(e: BaseException) -> str:
    """What ``weights_only`` refused (``GLOBAL posix.system``, an unsupported opcode), from torch's message
    (several lines of advice, one of them to allow the global: not what a hostile file deserves)."""
    found = re.search(r"(Unsupported|Trying to load unsupported).*", str(e))
    return found.group(0).split(". ")[0].rstrip(".") if found else type(e).__name__


def read_checkpoint(path: str | Path, require_checksum: bool = False) -> Any:
    """A ``torch.save`` file read with ``weights_only=True`` and checked against its :data:`CHECKSUM_KEY`.

    Returns the loaded object without its checksum entry. Raises ``FileNotFoundError`` for a missing file,
    and :class:`CheckpointError` for a file that cannot be read (truncated, not a checkpoint), holds pickled
    code or other objects ``weights_only`` refuses, fails its checksum, or lacks one while
    ``require_checksum``. Files without a checksum (plain state dicts, checkpoints from before visionattn
    wrote them) are returned unchecked otherwise."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about unusual pickle protocols before refusing them
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused: it holds pickled objects that torch.load(weights_only=True) does not allow, such "
            f"as code ({_weights_only_refusal(e)}); visionattn never unpickles code"
        ) from e
    except Exception as e:  # RuntimeError (zip), EOFError, KeyError (pickle magic), OSError, ...
        raise CheckpointError(f"{path}: unreadable: truncated, corrupted or not a PyTorch checkpoint ({one_line_error(e)})") from e
    stored = obj.pop(CHECKSUM_KEY, None) if isinstance(obj, dict) else None
    if stored is None:
        if require_checksum:
            raise CheckpointError(f"{path}: has no checksum (not written by this trainer, or altered)")
        return obj
    expected = stored.get("sha256") if isinstance(stored, dict) else None
    actual = state_digest(obj)
    if expected != actual:
        raise CheckpointError(
            f"{path}: checksum mismatch: its contents changed after it was written (bit flip, partial copy or "
            f"edit); stored sha256 {str(expected)[:16]}, computed {actual[:16]}"
        )
    return obj


def verify_safetensors_digest(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Check ``tensors`` read from ``path`` against the digest in its metadata, when it has one (files from
    timm, Hugging Face or older visionattn versions have none and pass). Raises :class:`CheckpointError`."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        expected = (f.metadata() or {}).get(SAFETENSORS_DIGEST_KEY)
    if expected is None:
        return
    actual = state_digest(tensors)
    if expected != actual:
        raise CheckpointError(
            f"{path}: checksum mismatch: its tensors changed after it was written (bit flip, partial copy or "
            f"edit); stored sha256 {expected[:16]}, computed {actual[:16]}"
        )


def non_finite_weight(state: dict, param_names: set[str]) -> str | None:
    """The first model or EMA parameter in a checkpoint ``state`` holding NaN or infinity, or None.
    Only parameters are checked: a buffer may hold -inf on purpose (an attention mask)."""
    for part, prefix in (("model", ""), ("ema", "module.")):
        tensors = state.get(part)
        for name, t in (tensors.items() if isinstance(tensors, dict) else ()):
            if (name[len(prefix):] in param_names and isinstance(t, torch.Tensor) and t.is_floating_point()
                    and not torch.isfinite(t).all()):
                return f"{part} weight {name!r}"
    return None
