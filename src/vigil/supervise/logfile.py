"""Package logs that rotate by size and never fail a package.

A package's log (``STATE_DIR/log/PACKAGE.log``) is written by every process of the
package through descriptors opened with ``O_APPEND`` (see the spawner, which also
creates the directory again if someone removed it). Those processes keep their
descriptors, so the log is rotated the way logrotate's ``copytruncate`` does it: the
file is copied to ``PACKAGE.log.1`` (older copies shift to ``.2`` ... ``.KEEP``) and
truncated to zero; writers append at the new end. Lines written between the copy and
the truncation are lost (at most a few, at the moment of rotation), which is the
price of never restarting a service for its log.

If someone removes the log (or its whole directory) while services run, they go on
writing to the removed file, which nobody can see and which would fill the disk: the
next spawn creates the log again, and :func:`truncate_removed` keeps such a removed
file (reached through ``/proc/PID/fd/1`` of the process writing to it) below the
size limit until the service restarts and writes to the new one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def needs_rotation(path: Path, max_size: int) -> bool:
    try:
        return path.stat().st_size > max_size
    except OSError:
        return False


def rotate(path: Path, keep: int) -> None:
    """Shift ``path.1 .. path.(keep-1)`` up by one (dropping ``path.keep``), copy
    ``path`` to ``path.1`` and truncate ``path``; ``keep`` 0 only truncates.
    Raises OSError (the caller logs it; the package goes on)."""
    if keep > 0:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}.{keep}")
        for n in range(keep - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{path}.{n}", f"{path}.{n + 1}")
        shutil.copyfile(path, f"{path}.1")
        os.chmod(f"{path}.1", path.stat().st_mode & 0o7777)  # as private as the log
    os.truncate(path, 0)


def rotate_if_needed(path: Path, max_size: int, keep: int) -> bool:
    """Rotate ``path`` if it is larger than ``max_size`` bytes. True if rotated."""
    if not needs_rotation(path, max_size):
        return False
    rotate(path, keep)
    return True


def truncate_removed(pid: int, max_size: int) -> bool:
    """If process ``pid``'s stdout is a regular file that was removed (no name left)
    and is larger than ``max_size`` bytes, truncate it. True if it did."""
    fd1 = f"/proc/{pid}/fd/1"
    try:
        st = os.stat(fd1)
    except OSError:
        return False
    if st.st_nlink != 0 or st.st_size <= max_size or (st.st_mode & 0o170000) != 0o100000:
        return False
    try:
        os.truncate(fd1, 0)
    except OSError:
        return False
    return True
