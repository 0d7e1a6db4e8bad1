"""Typed errors of the cgroups library: every failure names the group path, file, value, errno."""

from __future__ import annotations

import errno as errno_mod


class CgroupError(Exception):
    """Base of every error this library raises.

    `path` is the cgroup directory (absolute), `file` the control file inside it (or None for
    directory operations), `value` what we tried to write (or None), `errno` the kernel's answer.
    """

    def __init__(self, message: str, *, path: str = "", file: str | None = None,
                 value: str | None = None, errno: int | None = None) -> None:
        self.path = path
        self.file = file
        self.value = value
        self.errno = errno
        where = f"{path}/{file}" if file else path
        detail = [message]
        if where:
            detail.append(f"path={where}")
        if value is not None:
            detail.append(f"value={value!r}")
        if errno is not None:
            detail.append(f"errno={errno_mod.errorcode.get(errno, str(errno))}")
        super().__init__(" ".join(detail))


class NotFound(CgroupError):
    """The group or control file does not exist (ENOENT)."""


class AlreadyExists(CgroupError):
    """A group we were asked to create is already there (EEXIST)."""


class Busy(CgroupError):
    """The kernel refused because the group is in use (EBUSY), e.g. rmdir of a populated group."""


class NotEmpty(Busy):
    """We refused to remove a group that still has processes in it."""


class InvalidValue(CgroupError):
    """The kernel rejected the value written (EINVAL, ERANGE, EOVERFLOW)."""


class PermissionDenied(CgroupError):
    """EACCES/EPERM: not root, or a subtree that was not delegated to us."""


class NoSpace(CgroupError):
    """ENOSPC: a limit (cgroup.max.descendants, pids) or a v2 rule (no internal processes)."""


class NotSupported(CgroupError):
    """EOPNOTSUPP: the kernel has the file but not the feature (e.g. PSI disabled at boot)."""


class ControllerMissing(CgroupError):
    """A controller the limits need is not available in this hierarchy or on this host."""

    def __init__(self, controller: str, message: str = "controller not available", *,
                 path: str = "", file: str | None = None, value: str | None = None,
                 errno: int | None = None) -> None:
        self.controller = controller
        super().__init__(f"{message}: {controller}", path=path, file=file, value=value,
                         errno=errno)


class DiscoveryError(CgroupError):
    """The cgroup mounts or our own membership could not be understood."""


class Timeout(CgroupError):
    """An operation with a deadline (freeze, remove) did not finish in time."""


_BY_ERRNO: dict[int, type[CgroupError]] = {
    errno_mod.ENOENT: NotFound,
    # A control file of a group removed under us answers ENODEV on read.
    errno_mod.ENODEV: NotFound,
    errno_mod.EEXIST: AlreadyExists,
    errno_mod.EBUSY: Busy,
    errno_mod.ENOTEMPTY: Busy,
    errno_mod.EINVAL: InvalidValue,
    errno_mod.ERANGE: InvalidValue,
    errno_mod.EOVERFLOW: InvalidValue,
    errno_mod.EACCES: PermissionDenied,
    errno_mod.EPERM: PermissionDenied,
    errno_mod.ENOSPC: NoSpace,
    errno_mod.EOPNOTSUPP: NotSupported,
}


def from_os_error(exc: OSError, action: str, *, path: str, file: str | None = None,
                  value: str | None = None) -> CgroupError:
    """Translate an OSError from a cgroupfs syscall into the matching typed error."""
    cls = _BY_ERRNO.get(exc.errno or 0, CgroupError)
    reason = exc.strerror or str(exc)
    return cls(f"{action} failed: {reason}", path=path, file=file, value=value, errno=exc.errno)
