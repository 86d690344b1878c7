"""The one atomic file writer: a temporary file beside the target, fsynced, renamed over it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_directory(path: Path) -> None:
    """Flush a directory's entries (creations, renames) to disk."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def atomic_path(target: Path, prefix: str | None = None) -> Iterator[Path]:
    """A temporary path beside `target`, renamed over it when the block succeeds.

    Readers see the old file or the new one, never a partial one; on failure the
    temporary file is removed and `target` is untouched.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(
        dir=target.parent, prefix=prefix or f".{target.name}.", suffix=".tmp"
    )
    os.close(descriptor)
    temporary = Path(name)
    try:
        yield temporary
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)


def write_atomically(target: Path, data: bytes, prefix: str | None = None) -> Path:
    """Write `data` to `target` atomically; returns `target`."""
    with atomic_path(target, prefix) as temporary:
        temporary.write_bytes(data)
    return target
