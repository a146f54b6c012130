"""Atomic file writing and run-folder locks: nothing a user made is ever left half-written.

Every file cocam writes goes to a temporary sibling first, is flushed and fsync'ed, and then
replaces the destination with :func:`os.replace` (atomic on POSIX and Windows). An interrupted
write leaves the previous file intact and at most a ``.tmp-*`` file behind (removed by the
next run in that folder, see :func:`remove_temp_files`). A full disk is a
:class:`DiskFullError` naming the file, not the storage library's own error.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from cocam.errors import CocamError

try:  # POSIX: the lock's inspect-and-create step is serialised with flock (see exclusive_lock)
    import fcntl
except ImportError:  # Windows: importable, with the plain exclusive-create lock
    fcntl = None  # type: ignore[assignment]

__all__ = ["DiskFullError", "LockedError", "atomic_folder", "atomic_write", "atomic_write_bytes", "atomic_write_text",
           "exclusive_lock", "pid_alive", "remove_temp_files"]

#: ``errno`` values that mean "the disk (or the user's quota) is full".
_NO_SPACE = {errno.ENOSPC} | ({errno.EDQUOT} if hasattr(errno, "EDQUOT") else set())


class DiskFullError(CocamError, OSError):
    """No space left on the device while writing a file; the previous version of the file is intact.

    An :class:`OSError` with ``errno`` ``ENOSPC``, whose message names the file and the fix.
    """

    def __init__(self, path: str | os.PathLike, cause: BaseException | None = None) -> None:
        path = Path(path)
        self.path = path
        kept = "the previous file is intact" if path.exists() else "nothing was written"
        message = (f"no space left on the device (ENOSPC) while writing {path}; {kept} and no temporary file is "
                   f"left. Free some space on {path.parent} (or write elsewhere) and run again.")
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _no_space(err: BaseException | None) -> bool:
    """Whether ``err`` or an error it was raised from is an ``ENOSPC``/``EDQUOT`` :class:`OSError`.

    torch reports a failed write as its own ``RuntimeError`` chained to the ``OSError``, so the
    whole chain is searched.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
            return True
        err = err.__cause__ or err.__context__
    return False


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, overwrite: bool = True) -> Iterator[IO]:
    """Open a temporary file next to ``path``; move it onto ``path`` only if the block succeeds.

    Args:
        path: destination file.
        mode: ``"wb"`` or ``"w"`` (text, UTF-8, newlines written as given).
        overwrite: if ``False`` and ``path`` exists, raise :class:`FileExistsError` before writing.

    Raises:
        DiskFullError: the device ran out of space (``path`` keeps its previous content).
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as err:
        if _no_space(err):
            raise DiskFullError(path, err) from err
        raise
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        kwargs = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if _no_space(err):
            raise DiskFullError(path, err) from err
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path, "wb", overwrite=overwrite) as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> None:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically."""
    with atomic_write(path, "w", overwrite=overwrite) as fh:
        fh.write(text)


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Build a folder in a temporary sibling and rename it to ``target`` when the block succeeds.

    The temporary folder gets an ordinary ``mkdir``'s permissions under the current umask (not
    ``mkdtemp``'s private 0700). An existing ``target`` is replaced only at the end (moved aside,
    the new one renamed in, the old one removed), so an interrupted build never leaves a folder
    that looks complete and never loses the old one half-way; on an error the temporary folder
    is removed and ``target`` is untouched. Whether ``target`` may be replaced is the caller's
    decision, made before the block.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_temp_files(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Delete the ``.<name>.tmp-*`` files that interrupted atomic writes of ``names`` left in ``folder``.

    Only call it while no other process can be writing these files (e.g. holding the folder's
    :func:`exclusive_lock`): a temporary file of a write in progress looks the same. Returns
    the files removed.
    """
    folder = Path(folder)
    removed = []
    for name in names:
        for tmp in folder.glob(f".{_glob_escape(name)}.tmp-*"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


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
    except OSError:  # e.g. Windows: an id that names no process
        return False
    return True


@contextlib.contextmanager
def _folder_guard(folder: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` (POSIX) for the block: one lock inspector at a time.

    The kernel drops it when the process dies, so it can never go stale. Where ``flock`` is
    unavailable (Windows, some network file systems) the block runs unguarded.
    """
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(folder, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            if fd is not None:
                os.close(fd)
            fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock


def _read_pid(path: Path) -> int | None:
    """The PID in lock file ``path``; ``0`` when it holds none (or cannot be read); ``None`` when it is gone."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return 0
    try:
        return int(text or 0)
    except ValueError:
        return 0


def _create_lock(path: Path) -> bool:
    """Make ``path`` a lock file holding our PID, only if it does not exist; whether we did.

    The PID is written to a temporary file first, which is then hard-linked into place, so the
    lock file never exists without its PID (a reader never sees an empty lock of a live process).
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        fd = None
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except (OSError, NotImplementedError):  # no hard links here: exclusive create (guarded on POSIX)
            try:
                lock_fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            os.write(lock_fd, str(os.getpid()).encode())
            os.close(lock_fd)
            return True
    finally:
        if fd is not None:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, *, wait: float = 0.0, what: str = "") -> Iterator[None]:
    """Hold ``path`` (a file holding our PID) for the duration of the block.

    A lock left by a process that no longer exists (or holding no PID) is taken over. If a live
    process holds it, wait up to ``wait`` seconds (polling each second, saying so once), then
    raise :class:`LockedError` naming the holder.

    Race-free on POSIX: inspecting the lock, taking over a stale one and creating ours happen
    under an ``flock`` of the folder, so two processes can never both decide that a stale lock
    is theirs; the lock file itself is created complete (PID included) by a hard link. On
    release the file is removed only if it still holds our PID.
    """
    import time

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    start, told = time.monotonic(), False
    while True:
        with _folder_guard(path.parent):
            if fcntl is not None:  # under the guard nobody is mid-create: these are leftovers of killed processes
                remove_temp_files(path.parent, [path.name])
            if _create_lock(path):
                break
            pid = _read_pid(path)
            if pid is None:  # released meanwhile
                continue
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
    try:
        yield
    finally:
        with _folder_guard(path.parent):
            if _read_pid(path) == os.getpid():
                path.unlink(missing_ok=True)
