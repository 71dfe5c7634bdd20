"""Publishing a file: written in full under a temporary name beside it, then renamed over it.

Every file plmscope publishes (an atlas from build, merge or analyze; an SAE's weights and cfg; a
training checkpoint; build-state manifests) goes through ``writing``/``publish``, so that

* a reader sees the old file or the new one, never a part: the temporary file is in the same
  directory (same file system), ``os.replace`` swaps it in; a server holding the old atlas open
  keeps reading it (the old inode lives until it is closed);
* the new file has the mode a plain ``open(path, "w")`` would give under the user's umask (a
  temporary file made by ``mkstemp`` is 0600, which would lock out a server running as another user);
* it survives a power cut once ``publish`` returns: the file is fsynced before the rename and the
  directory after it;
* a process killed half-way leaves only ``NAME.tmp-<pid>`` files, which the next writer of ``NAME``
  removes (``remove_stale``) once that process is gone.
"""

from __future__ import annotations

import glob
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from . import faults

TEMP_INFIX = ".tmp-"


def temp_path(path: Path, pid: int | None = None) -> Path:
    """The temporary name ``path`` is written under by this process: ``NAME.tmp-<pid>``."""
    return path.with_name(f"{path.name}{TEMP_INFIX}{os.getpid() if pid is None else pid}")


def umask() -> int:
    """The process' umask, read without changing it where Linux shows it (``/proc/self/status``);
    elsewhere set and restored at once."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0666 less the umask."""
    return 0o666 & ~umask()


def fsync_path(path: Path) -> None:
    """Flush ``path`` (a file or a directory: its entries) to the disk."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if Path(path).is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, path: Path) -> None:
    """Move the finished temporary file ``tmp`` over ``path``: plain mode, fsync, rename, fsync of
    the directory."""
    os.chmod(tmp, plain_mode())
    fsync_path(tmp)
    faults.point("publish:before-rename")
    os.replace(tmp, path)
    faults.point("publish:renamed")
    fsync_path(path.parent)


@contextmanager
def writing(path: str | Path) -> Iterator[Path]:
    """``with writing(path) as tmp:`` write ``tmp``; on normal exit it is published as ``path``,
    on an exception removed (``path`` left as it was)."""
    path = Path(path)
    tmp = temp_path(path)
    remove(tmp)
    try:
        yield tmp
        publish(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def remove(path: Path) -> None:
    """Remove the file or directory ``path`` (and a DuckDB ``.wal`` beside it), if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    Path(f"{path}.wal").unlink(missing_ok=True)


def remove_stale(path: str | Path) -> list[Path]:
    """Remove the temporary files of ``path`` (``NAME.tmp-<pid>`` and what hangs off that name)
    left by processes that are no longer running; returns them.  A live process' files are left alone."""
    path = Path(path)
    gone = []
    prefix = path.name + TEMP_INFIX
    for p in sorted(path.parent.glob(glob.escape(prefix) + "*")):
        pid = p.name[len(prefix):].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            remove(p)
            gone.append(p)
    return gone


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a file of our own pid left from an earlier process: we are not writing it yet
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
