"""Writing outputs so that a crash or a full disk never leaves a partial file behind."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; renamed onto ``path`` when the block succeeds, removed
    when it fails. ``suffix`` ends the temporary name for writers that pick a format from it (``.nii.gz``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(obj: Any, path: str | Path, indent: int = 2) -> None:
    write_text_atomic(json.dumps(obj, indent=indent), path)


def make_folder(path: str | Path, what: str = "output folder") -> Path:
    """Create the folder ``path`` (and its parents) or raise :class:`~visionattn.errors.UserError` naming what is
    in the way: ``mkdir`` alone says only "File exists" when a file, or a symbolic link to a folder that does
    not exist, stands where a folder must be."""
    from visionattn.errors import UserError

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        # the outermost part of the path that is a file or a dangling link
        blocker = next((p for p in reversed([path, *path.parents])
                        if p.is_symlink() and not p.exists() or p.exists() and not p.is_dir()), path)
        kind = (f"a symbolic link to {os.readlink(blocker)}, which does not exist" if blocker.is_symlink()
                else "a file, not a folder")
        raise UserError(f"{what} {path}: {blocker} is {kind}; remove it, create the folder it should be, or "
                        "choose another path") from None
    except OSError as e:
        raise UserError(f"cannot create {what} {path}: {e.strerror or e}") from None
    return path

