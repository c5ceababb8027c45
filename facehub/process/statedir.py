"""The supervisor's state folder: private to its user, or not used at all.

Status and stats files decide what ``facehub health`` reports, so another local
user must not be able to plant them, or a symlink that makes root's writer
overwrite some other file. The folder is created with mode 0700; an existing one
must be a real directory (not a symlink), owned by this user and not writable by
anyone else, or the supervisor refuses to start with a message naming it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class UnsafeStateDir(RuntimeError):
    pass


def ensure_private(path: str | os.PathLike) -> Path:
    """Create ``path`` (0700) or check that the existing one is safe; return it."""
    folder = Path(path)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = os.lstat(folder)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise UnsafeStateDir(f"state folder {folder} is not a plain directory (a symlink?): refusing to use it")
    if info.st_uid != os.geteuid():
        raise UnsafeStateDir(f"state folder {folder} belongs to uid {info.st_uid}, not to this user "
                             f"({os.geteuid()}): refusing to use it")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeStateDir(f"state folder {folder} is writable by others (mode {stat.S_IMODE(info.st_mode):o}): "
                             "refusing to use it")
    return folder
