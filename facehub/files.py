"""One atomic file writer for every file FaceHub replaces: status and stats files, stored faces.

A reader never sees half a file: the data goes to a temporary file in the same
folder, which then replaces the target in one rename. The temporary name is
unpredictable and the file is created 0600 (``mkstemp``), so another local user
can neither plant a symlink at it nor read a face while it is written. With
``durable`` the data and the rename are fsynced before this returns (a stored
face must survive a power cut once the saver acknowledges it); status files
skip that cost.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

# Errors of folders that cannot be fsynced (some FUSE filesystems, s3fs-fuse among them)
_NO_DIR_FSYNC = (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.ENOSYS)


def write_atomic(path: str | os.PathLike, data: bytes, durable: bool = False, sync_folder: bool = True) -> None:
    """Replace ``path`` with ``data``: absent or complete, never half-written.

    ``sync_folder=False`` (with ``durable``) leaves the folder's fsync to the caller, who makes
    several renames in one folder durable with one :func:`fsync_folder` after the last.
    """
    path = Path(path)
    try:
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except FileNotFoundError:  # a new folder (a new device or day): made on first use only
        make_folders(path.parent, durable)
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable and sync_folder:
        fsync_folder(path.parent)


def make_folders(folder: Path, durable: bool = False) -> None:
    """Make ``folder`` and its missing parents (0700); ``durable``: each new entry fsynced in its parent."""
    missing = []
    while not folder.exists() and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        try:
            new.mkdir(mode=0o700)
        except FileExistsError:  # another writer made it meanwhile
            pass
        if durable:
            fsync_folder(new.parent)


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable; a filesystem that cannot fsync a folder is let be."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in _NO_DIR_FSYNC:
            raise
    finally:
        os.close(fd)
