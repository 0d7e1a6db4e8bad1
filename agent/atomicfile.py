"""Replace a file whole or not at all: durably (a temporary file beside it, fsynced,
renamed), or, for files rewritten often, by exchanging it with a spare copy."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
if _renameat2 is not None:
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_uint]
    _renameat2.restype = ctypes.c_int


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Make `path` hold `data`: written to `.<name>.tmp` beside it, fsynced (it survives a
    power loss), renamed over it. Raises OSError, the temporary file removed."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def exchange_in(path: str, spare: str, data: bytes, mode: int = 0o600) -> None:
    """Make `path` hold `data`, whole or not at all, without allocating or freeing an inode
    once `spare` exists: `data` is written over `spare` (the previous version), and the two
    names are exchanged (renameat2 RENAME_EXCHANGE), so `spare` then holds the version
    `path` had. A plain temporary file renamed over `path` frees an inode per write; on an
    ext4 without a journal each new inode is then checked against those freed in the last
    seconds, which made file creation ~40 % of the agent's kernel time in a burst of starts.
    No fsync. The first write, and a filesystem without the exchange, rename as before.
    Raises OSError."""
    fd = os.open(spare, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(spare), _AT_FDCWD, os.fsencode(path),
                      _RENAME_EXCHANGE) == 0:
            return
        code = ctypes.get_errno()
        # ENOENT: no `path` yet; EINVAL, ENOSYS: no exchange on this filesystem or kernel.
        if code not in (errno.ENOENT, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), path)
    os.replace(spare, path)
