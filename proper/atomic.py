"""Atomic files: written beside their target, fsynced, then renamed over it (os.replace is atomic)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

TMP_SUFFIX = ".tmp"


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Run write(tmp) on a temp file beside `path`, fsync it, then rename it over `path`. A crash at any point
    leaves either the old file or the new one at `path`, and at worst a ``.<name>.*.tmp`` file beside it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=str(path.parent))
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: Path, obj: Any, default: Callable[[Any], Any] = None) -> None:
    """JSON written atomically (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, default=default)

    atomic_write(path, write)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_leftovers(folder: Path, names: Iterable[str]) -> None:
    """Delete the temp files a killed atomic_write of any of ``names`` left in ``folder``."""
    folder = Path(folder)
    for name in names:
        for f in folder.glob(f".{name}.*{TMP_SUFFIX}"):
            try:
                f.unlink()
            except OSError:
                pass
