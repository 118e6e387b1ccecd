"""CPU passes compiled by ``torch.compile`` on first use, with an eager fallback.

Two kernels fuse their elementwise passes this way (top-K attention's per-row passes, small-window
neighborhood attention). Each keeps a cache ``{name: compiled function or None}``; ``None`` means switched
off (an environment variable set to ``0``) or a compilation that failed, after which the whole family is
switched off for the process and one ``RuntimeWarning`` says so: the caller then runs its eager code. A
missing C++ compiler must never make attention fail.
"""
from __future__ import annotations

import os
import warnings

import torch


def switched_off(env_var: str) -> bool:
    """Whether the environment sets ``env_var`` to 0 / false / no / off."""
    return os.environ.get(env_var, "1").strip().lower() in ("0", "false", "no", "off")


def run_compiled(cache: dict, family: tuple[str, ...], name: str, fn, args: tuple, *, env_var: str, what: str,
                 dynamic: bool):
    """``fn(*args)`` through ``torch.compile(fn)`` (compiled once per ``name`` into ``cache``), or None when
    the family is switched off or its compilation fails (``what`` names it in the warning, which points at
    the caller of the kernel's own wrapper: both callers reach this through one helper of theirs)."""
    if name not in cache:
        cache[name] = None if switched_off(env_var) else torch.compile(fn, dynamic=dynamic)
    compiled = cache[name]
    if compiled is None:
        return None
    try:
        return compiled(*args)
    except Exception as e:  # noqa: BLE001 - any compiler failure: fall back, never fail the attention
        first = str(e).splitlines()[0] if str(e) else ""
        warnings.warn(f"{what} could not be compiled ({type(e).__name__}: {first}); using the eager passes "
                      f"(slower). Set {env_var}=0 to skip the attempt.", RuntimeWarning, stacklevel=4)
        cache.update(dict.fromkeys(family, None))
        return None
