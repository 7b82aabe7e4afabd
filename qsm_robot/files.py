"""Writing files so that nothing is ever half-written (no torch, no numpy: used on every path).

Every file the project writes for a reader (configs, checkpoints' JSON, reports, profiles,
calibration records, models, figures) goes through :func:`atomic_write`: the content goes to a
temporary file beside the target, is flushed to disk, and replaces the target in one rename, so
a reader (or a crash) sees the old file or the new one, never a part.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def temporary_path(path: Path) -> Path:
    """A hidden name beside ``path`` for this process, with the same suffix (writers such as
    matplotlib choose the format from it). ``remove_temporaries`` finds these."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to produce the file at a temporary path, then rename it to ``path``.

    The parent folder is created. If ``write`` raises, the temporary file is removed and the
    target is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files (``.NAME.tmp-PID...``) that killed writers left directly in
    ``folder``; return what went. Only call it when no other process writes there."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    leftovers = sorted(p for p in folder.glob(".*.tmp-*") if p.is_file())
    for p in leftovers:
        p.unlink(missing_ok=True)
    return leftovers
