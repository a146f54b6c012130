"""Atomic file writing: nothing a user made is ever left half-written.

Every file cocam writes goes to a temporary sibling first, is flushed and fsync'ed, and then
replaces the destination with :func:`os.replace` (atomic on POSIX and Windows). An interrupted
write leaves the previous file intact and at most a ``.tmp-*`` file behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, overwrite: bool = True) -> Iterator[IO]:
    """Open a temporary file next to ``path``; move it onto ``path`` only if the block succeeds.

    Args:
        path: destination file.
        mode: ``"wb"`` or ``"w"`` (text, UTF-8, newlines written as given).
        overwrite: if ``False`` and ``path`` exists, raise :class:`FileExistsError` before writing.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
    try:
        kwargs = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path, "wb", overwrite=overwrite) as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> None:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically."""
    with atomic_write(path, "w", overwrite=overwrite) as fh:
        fh.write(text)
