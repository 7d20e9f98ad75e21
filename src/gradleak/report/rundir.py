"""Run directories that cannot be corrupted, and output files checked before the work.

A :class:`RunDirectory` is reserved BEFORE any work: the path is checked (not a file, not a previous run unless
``overwrite``, its parent writable), and a lock file beside it (``.NAME.lock`` in the same parent, holding the
writer's pid) is taken, so a second run with the same output fails at once. The files are written into a
temporary directory in the same parent (``.NAME.tmp-*``) and renamed into place when complete: a reader sees
either the previous run or the new one, never a mix, and an interrupted or failed write leaves nothing behind.
"""

from __future__ import annotations

import os
import time
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ..errors import OutputError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: an exclusive-create lock file instead
    fcntl = None

# files whose presence marks a directory as a gradleak run (what --overwrite may replace)
RUN_MARKERS = ("config.json", "comparison.json")


def _parent_writable(parent: Path, what: str) -> None:
    """Create ``parent`` if needed and prove it writable by creating (and removing) a temporary folder."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"cannot write {what}: {parent} exists and is not a directory") from None
    except OSError as e:
        raise OutputError(f"cannot write {what}: cannot create {parent} ({e.strerror or type(e).__name__})") from None
    if not parent.is_dir():
        raise OutputError(f"cannot write {what}: {parent} is not a directory")
    try:
        probe = tempfile.mkdtemp(prefix=".gradleak-probe-", dir=parent)
        os.rmdir(probe)
    except OSError as e:
        raise OutputError(f"cannot write {what}: {parent} is not writable ({e.strerror or type(e).__name__})") from None


def check_output_file(path: str | Path, *, overwrite: bool = True, what: str = "the output file") -> Path:
    """Check, before any work, that a single output file (a checkpoint) can be written at ``path``: not a
    directory or a device, its folder writable, and (unless ``overwrite``) not already there. Returns the path."""
    p = Path(path).expanduser()
    if p.exists() or p.is_symlink():
        if p.is_dir():
            raise OutputError(f"cannot write {what} {p}: it is a directory (expected a file path such as model.pt)")
        if not p.is_file():
            raise OutputError(f"cannot write {what} {p}: it exists and is not a regular file (a device or pipe)")
        if not overwrite:
            raise OutputError(f"{p} already exists: pass --overwrite (overwrite=True) to replace it, or choose "
                              "another path")
        if not os.access(p, os.W_OK):
            raise OutputError(f"cannot write {what} {p}: the file is not writable")
    _parent_writable(p.parent, f"{what} {p}")
    return p


class RunDirectory:
    """A run directory reserved for one writer.

    path: the directory. overwrite: replace a previous gradleak run there (a directory holding one of
    :data:`RUN_MARKERS`); any other non-empty directory is never replaced. Raises :class:`OutputError` with
    one sentence when the path cannot be used. Use as a context manager (the lock is released on exit), write
    with :meth:`write`.
    """

    def __init__(self, path: str | Path, *, overwrite: bool = False):
        self.path = Path(path).expanduser()
        self.overwrite = bool(overwrite)
        self._fd: int | None = None
        self._check()
        _parent_writable(self.path.parent, f"the run directory {self.path}")
        self._lock()
        try:
            self._check()  # again, now that no one else can write it
        except BaseException:
            self.release()
            raise

    # ---- checks -------------------------------------------------------------------------------------
    def _check(self) -> None:
        p = self.path
        if p.name in ("", ".", ".."):
            raise OutputError(f"cannot use {p} as a run directory: give a directory name (e.g. runs/demo)")
        if p.is_symlink() and not p.exists():
            raise OutputError(f"cannot use {p} as a run directory: it is a broken symbolic link")
        if not p.exists():
            return
        if not p.is_dir():
            kind = "a regular file" if p.is_file() else "not a regular file or directory (a device or pipe)"
            raise OutputError(f"cannot use {p} as a run directory: it exists and is {kind}")
        entries = sorted(e.name for e in p.iterdir())
        if not entries:
            return
        if not any(m in entries for m in RUN_MARKERS):
            raise OutputError(f"{p} is a non-empty directory that holds no gradleak run (no {' or '.join(RUN_MARKERS)}"
                              f"; {len(entries)} entries): refusing to write into or replace it; choose another "
                              "output directory")
        if not self.overwrite:
            shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
            raise OutputError(f"{p} already holds a run ({shown}): pass --overwrite (overwrite=True) to replace it, "
                              "or choose another output directory")

    # ---- lock -------------------------------------------------------------------------------------------
    @property
    def lock_path(self) -> Path:
        return self.path.parent / f".{self.path.name}.lock"

    def _lock(self) -> None:
        lp = self.lock_path
        for _ in range(3):
            try:
                if fcntl is None:  # pragma: no cover
                    fd = os.open(lp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                else:
                    fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
            except FileExistsError:  # pragma: no cover - Windows fallback
                raise OutputError(self._busy_message()) from None
            except OSError as e:
                raise OutputError(f"cannot lock the run directory {self.path} ({e.strerror})") from None
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    raise OutputError(self._busy_message()) from None
                try:  # the holder before us may have removed the file after we opened it: lock the live one
                    same = os.fstat(fd).st_ino == os.stat(lp).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd
            return
        raise OutputError(self._busy_message())

    def _busy_message(self) -> str:
        try:
            pid = self.lock_path.read_text().strip()
        except OSError:
            pid = ""
        who = f" (pid {pid})" if pid else ""
        return (f"{self.path} is being written by another gradleak run{who}: wait for it to finish or choose "
                "another output directory")

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.lock_path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunDirectory":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):  # pragma: no cover - a forgotten release
        try:
            self.release()
        except Exception:
            pass

    # ---- writing ------------------------------------------------------------------------------------
    def write(self, fill: Callable[[Path], None]) -> Path:
        """Call ``fill(tmp)`` to write every file into a fresh temporary directory, then put it in place of
        :attr:`path` (replacing a previous run when ``overwrite``). On any exception (Ctrl-C included) the
        temporary directory is removed and the previous content is left as it was. Returns :attr:`path`."""
        if self._fd is None:
            raise OutputError(f"the run directory {self.path} is not reserved (released already)")
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        try:
            fill(tmp)
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a run directory is not
            self._commit(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.path

    def _commit(self, tmp: Path) -> None:
        p = self.path
        if not p.exists():
            os.rename(tmp, p)
            return
        self._check()
        if not any(p.iterdir()):
            os.rmdir(p)
            os.rename(tmp, p)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{p.name}.old-", dir=p.parent))
        os.rmdir(old)
        os.rename(p, old)
        try:
            os.rename(tmp, p)
        except BaseException:
            os.rename(old, p)  # put the previous run back
            raise
        shutil.rmtree(old, ignore_errors=True)


def fresh_run_path(name: str, root: str | Path = "runs") -> Path:
    """``root/NAME-TIME``, with a ``-2``, ``-3``, ... suffix when that directory exists already (the default
    run directory of every command)."""
    base = Path(root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, k = base, 1
    while out.exists():
        k += 1
        out = base.with_name(f"{base.name}-{k}")
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


__all__ = ["RunDirectory", "check_output_file", "RUN_MARKERS"]
