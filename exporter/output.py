"""Atomic output folders: OUT is at every moment the old complete folder or the new one.

Everything is written into `.OUT.tmp-<pid>` beside OUT (`make_temp_folder`, created first, so an
unwritable OUT fails before minutes of work), flushed to disk (`sync_folder`), and renamed into
place at the end (`replace`): a failed or killed export never leaves a half-written OUT. An
existing OUT is swapped with the new one in one `renameat2(RENAME_EXCHANGE)` where the
filesystem has it; elsewhere the old OUT is renamed aside first (a kill between the two renames
leaves no OUT and the old one in `.OUT.old-<pid>`). Leftover `.OUT.tmp-<pid>` / `.OUT.old-<pid>`
folders of processes that no longer run are removed by the next export to the same OUT. Write
failures (disk full, file size limit, read-only folder) are one OutputError line (`reason` names
the cause and the file).

Both writers of OUT (the single-device and the sharded export) go through `staged(out)`: it
creates the temp folder, removes it whatever happens, and its `Stage.writing` block turns the
write into one OutputError line and publishes the finished folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

from dscompile.errors import DscompileError


class OutputError(DscompileError):
    """OUT cannot be written: read-only or missing parent, disk full, file size limit."""


def reason(err: OSError, writing: str | None = None) -> str:
    """'File too large: weights.bin' from an OSError: the cause and the file, no temp paths."""
    name = Path(err.filename).name if err.filename else writing
    text = err.strerror or str(err)
    return f"{text}: {name}" if name and name not in text else text


def _temp_names(out: Path) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)$")


def make_temp_folder(out: Path) -> Path:
    """Create OUT's private temp folder beside it, after removing those of dead exports."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        pattern = _temp_names(out)
        for path in out.parent.iterdir():
            m = pattern.match(path.name)
            if m and not _alive(int(m.group(2))):
                remove(path)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        remove(tmp)  # a previous export of this process, killed by an exception we did not see
        tmp.mkdir()
    except OSError as err:
        raise OutputError(f"{out}: cannot create the output folder beside it ({reason(err)})") from None
    return tmp


class Stage:
    """OUT's temp folder while an export fills it; `what` names the file being written (for an OSError
    without a file name)."""

    def __init__(self, out: Path, folder: Path):
        self.out, self.folder, self.what = out, folder, "OUT"

    @contextlib.contextmanager
    def writing(self, what: str) -> Iterator[Path]:
        """The block that writes OUT's files into the temp folder (yielded); at its end the folder is
        synced and replaces OUT. An OSError inside is one OutputError line, and OUT is left as it was."""
        self.what = what
        try:
            yield self.folder
            self.what = "the finished folder"
            sync_folder(self.folder)
            replace(self.folder, self.out)
        except OSError as err:  # disk full, file size limit, folder removed under us
            raise OutputError(f"{self.out}: cannot write the export ({reason(err, self.what)}); "
                              "OUT was left as it was") from None


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Stage]:
    """OUT's temp folder, created now (an unwritable OUT fails before the work) and removed on leaving
    (after a success it is gone already, or holds the replaced OUT)."""
    stage = Stage(out, make_temp_folder(out))
    try:
        yield stage
    finally:
        remove(stage.folder)


def _alive(pid: int) -> bool:
    """Whether a process with this id runs (on this host: temp folders carry the writer's pid)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def sync_folder(folder: Path) -> None:
    """fsync every file and the folder, so the rename below never publishes data still in page cache
    (after a power cut, a renamed folder could otherwise hold empty or short files)."""
    for path in sorted(folder.iterdir()):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on a directory; the files are synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_RENAME_EXCHANGE = 2


_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not glibc >= 2.28, or not Linux
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # the filesystem has no exchange: fall back to two renames
    raise OSError(code, os.strerror(code), str(b))


def replace(tmp: Path, out: Path) -> None:
    """Put the finished folder in place of OUT (see the module docstring); the old OUT is deleted after."""
    if not out.exists() and not out.is_symlink():
        tmp.rename(out)
    elif exchange(tmp, out):
        remove(tmp)  # now the old OUT
    else:
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        remove(old)
        out.rename(old)
        tmp.rename(out)
        remove(old)
    _fsync_dir(out.parent)
