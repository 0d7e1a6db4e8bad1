"""Typed errors of the netns library: every failure names its operation and the object involved."""

from __future__ import annotations

import errno as errno_codes
import os
from pathlib import Path


class NetnsError(Exception):
    """Base of every error raised by `netns`; carries what was attempted and on what."""

    def __init__(self, message: str, *, operation: str, interface: str | None = None,
                 path: Path | None = None, errno: int | None = None) -> None:
        self.operation = operation
        self.interface = interface
        self.path = path
        self.errno = errno
        parts = [f"{operation}: {message}"]
        if interface is not None:
            parts.append(f"interface={interface}")
        if path is not None:
            parts.append(f"path={path}")
        if errno is not None:
            parts.append(f"errno={errno_codes.errorcode.get(errno, errno)} ({os.strerror(errno)})")
        super().__init__(" ".join(parts))


class NamespaceError(NetnsError):
    """Creating, entering or deleting a network namespace failed."""


class NamespaceExistsError(NamespaceError):
    """A namespace of that name is already mounted under the root directory."""


class NamespaceNotFoundError(NamespaceError):
    """No namespace of that name exists under the root directory."""


class LinkError(NetnsError):
    """A netlink request (link, address, route) was refused by the kernel."""


class AddressError(NetnsError):
    """Address management failed: bad pool, unknown space, unreadable state."""


class PoolExhaustedError(AddressError):
    """No free subnet in the pool, or no free address in a space's subnet."""


class StateLockedError(AddressError):
    """Another live process holds the address state directory."""


class FirewallError(NetnsError):
    """`nft` rejected the ruleset or could not be run."""

    def __init__(self, message: str, *, operation: str, stderr: str = "",
                 errno: int | None = None) -> None:
        self.stderr = stderr
        detail = f"{message}: {stderr.strip()}" if stderr.strip() else message
        super().__init__(detail, operation=operation, errno=errno)
