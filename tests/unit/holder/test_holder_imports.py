"""The holder forks every dyno, and each fork copies the page tables of everything the holder
has imported, then faults in what either side touches. So the holder loads only what it uses."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Modules the daemon needs and the holder process must not load.
DAEMON_ONLY = ("asyncio", "ssl", "concurrent.futures", "agent.holder.client",
               "agent.launcher.uids")


def test_the_holder_process_imports_none_of_the_daemons_modules() -> None:
    probe = ("import sys, agent.holder.__main__, agent.launcher; "
             f"print(sorted(set({DAEMON_ONLY!r}) & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_the_daemons_names_are_still_exported() -> None:
    from agent.holder import HolderClient, OutputEvent
    from agent.holder.client import HolderClient as FromClient
    from agent.holder.client import OutputEvent as OutputFromClient
    from agent.launcher import UidAllocator
    from agent.launcher.uids import UidAllocator as FromUids

    assert (HolderClient, OutputEvent, UidAllocator) == (FromClient, OutputFromClient, FromUids)


@pytest.mark.parametrize("package", ["agent.holder", "agent.launcher"])
def test_an_unknown_name_is_still_an_attribute_error(package: str) -> None:
    module = __import__(package, fromlist=["_"])
    with pytest.raises(AttributeError, match="no_such_name"):
        module.no_such_name  # noqa: B018
