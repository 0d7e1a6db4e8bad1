"""Errors carry operation, interface, path and errno, and render them readably."""

from __future__ import annotations

import errno
from pathlib import Path

from netns import FirewallError, LinkError, NamespaceError, NetnsError


def test_fields_and_message() -> None:
    exc = LinkError("kernel refused request", operation="add-veth", interface="dyv1",
                    errno=errno.EEXIST)
    assert isinstance(exc, NetnsError)
    assert (exc.operation, exc.interface, exc.errno) == ("add-veth", "dyv1", errno.EEXIST)
    assert "add-veth" in str(exc) and "dyv1" in str(exc) and "EEXIST" in str(exc)
    ns = NamespaceError("x", operation="create", path=Path("/run/netns/a"), errno=errno.EPERM)
    assert "path=/run/netns/a" in str(ns) and "EPERM" in str(ns)
    fw = FirewallError("nft exited with 1", operation="apply", stderr="Error: syntax\n")
    assert fw.stderr.startswith("Error") and "syntax" in str(fw)
