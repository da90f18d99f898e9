"""Atomic file writes: readers see the old file or the new one, never half of either."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes, *, durable: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename it over ``path``.

    The temporary file's name is unique to this call (``mkstemp``), so writers in other threads or
    processes never share or remove it; with several writers at once the last rename wins.
    ``durable`` flushes the bytes to disk (``fsync``) before the rename, so a crash cannot leave an
    empty file under the final name. The temporary file is removed if the write fails.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
