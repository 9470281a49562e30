"""Output folders (``--save``, ``--out``, ``--run-dir``) checked before any work starts, so that a path
under a file or in a read-only place is one clear line instead of a traceback at the first write.
Standard library only: the data and conversion tools use it without importing torch."""

from __future__ import annotations

import os
from pathlib import Path


class FolderError(ValueError):
    """An output folder cannot be created or written."""


def writable_folder(path: str | os.PathLike, flag: str) -> Path:
    """Create ``path`` (with parents) and check that files can be written in it."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FolderError(
            f"cannot create {flag} {folder} ({err.strerror or err}); choose a writable folder that is not "
            f"under a file"
        ) from None
    probe = folder / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise FolderError(
            f"cannot write to {flag} {folder} ({err.strerror or err}); choose a writable folder"
        ) from None
    return folder
