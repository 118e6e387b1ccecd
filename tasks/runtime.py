"""What the trainer, the task plug-ins and the commands share: processes (torchrun), reductions, progress
bars, atomic saving, RNG state, data paths and building the recipe's model.

This module sits below every task and command in ``visionattn.tasks`` and imports none of them.
"""
from __future__ import annotations

import atexit
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from visionattn.checkpoints import SAFETENSORS_DIGEST_KEY, state_digest
from visionattn.errors import UserError
from visionattn.tasks.config import ConfigError, instantiate
from visionattn.tasks.files import atomic_path



def dist_setup(device: str) -> tuple[int, int]:
    """Initialise torch.distributed from torchrun's environment (gloo on CPU, NCCL on CUDA). A process group
    made here is destroyed when the interpreter exits (``atexit``), before its threads would be torn down
    at exit, which can abort a process that has finished its work ("terminate called without an active
    exception")."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        atexit.register(_destroy_process_group)
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _destroy_process_group() -> None:
    """All processes leave together (a barrier first: a process tearing the group down while a peer still
    holds a connection can abort that peer); a peer that never arrives (it failed) is given up on after
    30 s (gloo's monitored barrier), so an error does not turn into a hang."""
    if not dist.is_initialized():
        return
    from datetime import timedelta

    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timedelta(seconds=30))
        else:
            dist.barrier()
    except Exception:  # a peer failed or left: nothing to wait for
        pass
    dist.destroy_process_group()


def leave(code: int):
    """End the process with exit status ``code``. In a process that joined a torchrun group (:func:`dist_setup`),
    the group is destroyed (all processes together), stdout, stderr and the logging handlers are flushed, and
    the process ends with ``os._exit``, without finalizing the interpreter: there, gloo's worker threads can still
    release tensors and so take the GIL, and the interpreter ends such a thread in a way that aborts the whole
    process ("terminate called without an active exception", SIGABRT), which torchrun reports as a failure
    of a run that had finished its work (seen in this project's CI after ``segment`` had written every case;
    pytorch/pytorch#179291 describes the mechanism). Outside torchrun this is ``sys.exit(code)``."""
    import sys

    if not dist.is_initialized():
        sys.exit(code)
    import logging

    _destroy_process_group()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more to say there
            pass
    os._exit(code)


def all_reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_gather_lists(items: list) -> list:
    """Every process's ``items`` (picklable), concatenated in rank order; ``items`` itself outside
    ``torch.distributed``."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return items
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


# glibc told to keep freed memory (large blocks from its heap, none handed back under 1 GiB): the setting
# the README's second kernel table was measured with
KEEP_MEMORY_TUNABLES = "glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=1073741824"


def memory_allocator() -> str:
    """The C allocator behind PyTorch's CPU tensors, as timings depend on it: a jemalloc, tcmalloc or mimalloc
    mapped into the process (``LD_PRELOAD``), else glibc's malloc with the thresholds the environment sets.
    With glibc's defaults a freed block of more than a few MiB goes back to the system and the next one
    page-faults in afresh, which can dominate code that allocates large temporaries (the naive gather's
    forward+backward at 56x56, K=7, one thread: 552 ms with the defaults, 143 ms with
    ``GLIBC_TUNABLES=`` :data:`KEEP_MEMORY_TUNABLES`)."""
    import platform

    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            maps = f.read()
    except OSError:
        maps = ""
    for name in ("jemalloc", "tcmalloc", "mimalloc"):
        if f"lib{name}" in maps:
            return name
    libc, version = platform.libc_ver()
    if libc != "glibc":
        return "the platform's malloc"
    settings = []  # "glibc.malloc.mmap_threshold=N" in GLIBC_TUNABLES, or the older MALLOC_MMAP_THRESHOLD_=N
    for part in os.environ.get("GLIBC_TUNABLES", "").split(":"):
        key, _, value = part.partition("=")
        if key.startswith("glibc.malloc.") and value:
            settings.append(f"{key[len('glibc.malloc.'):]}={value}")
    for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
        if key in os.environ:
            settings.append(f"{key[len('MALLOC_'):-1].lower()}={os.environ[key]}")
    return f"glibc {version} malloc ({', '.join(settings) if settings else 'default thresholds'})"


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What a timing depends on, recorded beside it: the CPU's model name (``/proc/cpuinfo`` where there is
    one, else the platform's processor string), the vector instruction set PyTorch's CPU kernels dispatch to
    (``AVX2``, ``AVX512``, ...), the logical CPUs, torch's thread count and version, the memory allocator
    (:func:`memory_allocator`); on ``cuda``, the GPU's name too."""
    import platform

    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": model or platform.processor() or platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "allocator": memory_allocator()}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def describe_machine(info: dict[str, Any]) -> str:
    """One line for a :func:`machine_info` record: ``AMD EPYC (AVX2), 2 logical CPUs, 1 torch thread, torch
    2.14.1``."""
    threads = info.get("torch_threads")
    text = (f"{info.get('cpu', '?')} ({info.get('cpu_capability', '?')}), {info.get('logical_cpus', '?')} logical "
            f"CPUs, {threads} torch thread{'' if threads == 1 else 's'}, torch {info.get('torch', '?')}")
    if info.get("allocator"):
        text += f", {info['allocator']}"
    return f"{info['gpu']}; {text}" if info.get("gpu") else text


def progress(iterable, **kwargs):
    """tqdm that is quiet off a terminal and honours TQDM_DISABLE (tqdm reads it only if disable is unset)."""
    if "TQDM_DISABLE" not in os.environ:
        kwargs.setdefault("disable", None)
    return tqdm(iterable, **kwargs)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temporary name in the same folder, flush it to the disk, then rename: neither a crash nor
    a power cut leaves a partial file under ``path``."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())


def atomic_save_weights(model: torch.nn.Module, path: Path) -> None:
    """The model's weights as ``.safetensors``, with their :func:`state_digest` in the file's metadata."""
    from safetensors.torch import save_file

    # tensors shared between modules (EMCAD's one spatial-attention block) are stored once per name, so the
    # file loads with a strict load_state_dict
    seen: set[int] = set()
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        ptr = v.untyped_storage().data_ptr()
        tensors[k] = v.clone().contiguous() if ptr in seen else v.contiguous()
        seen.add(ptr)
    metadata = {"format": "pt", SAFETENSORS_DIGEST_KEY: state_digest(tensors)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def to_channels_last(x):
    """Channels-last memory format for 4-D/5-D tensors (faster convolutions on CPU); others unchanged."""
    if isinstance(x, torch.Tensor) and x.ndim in (4, 5):
        return x.contiguous(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)
    return x


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def resolve_data_paths(cfg: dict, config_path: str | None) -> None:
    """Make the recipe's data paths usable from here (see :func:`resolve_path`), in place."""
    base = Path(config_path).parent if config_path else Path(".")
    data = cfg.setdefault("data", {})
    for key in ("root", "val_root", "path", "images", "annotations"):
        if isinstance(data.get(key), str):
            data[key] = resolve_path(data[key], base)


def resolve_path(value: str | None, base: Path) -> str | None:
    """Relative data paths in a recipe are taken from the current folder, or else from the recipe's."""
    if not value or os.path.isabs(value) or os.path.exists(value):
        return value
    candidate = base / value
    return str(candidate) if candidate.exists() else value


def build_model_from_recipe(cfg: dict, **defaults) -> torch.nn.Module:
    """The recipe's ``model``: a ``_target_`` entry, or ``{name, kwargs}`` for :func:`visionattn.create_model`
    with ``defaults`` (e.g. ``num_classes``) filled in where the recipe does not set them."""
    import visionattn

    spec = cfg.get("model")
    if not spec:
        raise ConfigError("the recipe has no 'model' section")
    if "_target_" in spec:
        return instantiate(spec, where="model")
    kwargs = dict(spec.get("kwargs") or {})
    for key, value in defaults.items():
        kwargs.setdefault(key, value)
    try:
        return visionattn.create_model(spec["name"], **kwargs)
    except UserError:
        raise
    except (TypeError, ValueError) as e:  # the model refused the recipe's arguments
        raise ConfigError(f"model: building {spec['name']} with {kwargs} failed: {type(e).__name__}: {e}") from e
