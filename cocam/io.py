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

from cocam.errors import CocamError

__all__ = ["LockedError", "atomic_write", "atomic_write_bytes", "atomic_write_text", "exclusive_lock", "pid_alive"]


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


class LockedError(CocamError, RuntimeError):
    """Another live process holds the lock."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, *, wait: float = 0.0, what: str = "") -> Iterator[None]:
    """Hold ``path`` (a file created exclusively, holding our PID) for the duration of the block.

    A lock left by a process that no longer exists (or holding no PID) is taken over. If a live process holds it,
    wait up to ``wait`` seconds (polling each second, saying so once), then raise
    :class:`LockedError` naming the holder.
    """
    import time

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    start, told = time.monotonic(), False
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if not pid or not pid_alive(pid):
                path.unlink(missing_ok=True)  # stale: its process is gone (or it holds no PID)
                continue
            if time.monotonic() - start >= wait:
                raise LockedError(f"{path.parent} is in use by process {pid}{' ' + what if what else ''}. "
                                  f"Wait for it, or use another folder.") from None
            if not told:
                print(f"waiting for process {pid}{' ' + what if what else ''}...", flush=True)
                told = True
            time.sleep(1.0)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
