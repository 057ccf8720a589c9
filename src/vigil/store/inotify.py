"""A minimal inotify watch on a directory, for the SQLite store's watchers.

Other processes' commits append to the database's ``-wal`` file (or rewrite the
database at a checkpoint); inotify tells us at once, so idle watchers need not
poll often. Linux only; ``DirWatch.open`` returns None where inotify is missing
and the caller falls back to polling.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct

IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


class DirWatch:
    """Readable ``fd`` whenever a file in ``directory`` whose name starts with
    ``prefix`` is written, created or renamed into place."""

    def __init__(self, fd: int, prefix: str) -> None:
        self.fd = fd
        self.prefix = prefix.encode()

    @classmethod
    def open(cls, directory: str, prefix: str) -> DirWatch | None:
        libc = _libc()
        if libc is None or not hasattr(libc, "inotify_init1"):
            return None
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            return None
        mask = IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE
        if libc.inotify_add_watch(fd, os.fsencode(directory), mask) < 0:
            os.close(fd)
            return None
        return cls(fd, prefix)

    def drain(self) -> bool:
        """Read every pending event; True if one concerned our files."""
        hit = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return hit
            if not data:
                return hit
            offset = 0
            while offset + _EVENT.size <= len(data):
                _wd, _mask, _cookie, length = _EVENT.unpack_from(data, offset)
                name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
                offset += _EVENT.size + length
                if name.startswith(self.prefix):
                    hit = True

    def close(self) -> None:
        os.close(self.fd)
