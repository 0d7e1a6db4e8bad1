"""The packaged systemd files: the unit verifies, and keeps the keys dynos' survival depends on."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "systemd"


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / "dynoagent.service")
    return parser


def test_service_keys() -> None:
    service = _unit()["Service"]
    assert service["Type"] == "notify"
    assert service["Delegate"] == "yes"
    # Dynos survive a restart of the agent only if systemd does not kill the whole cgroup.
    assert service["KillMode"] == "process"
    assert int(service["WatchdogSec"]) > 0
    assert service["Restart"] == "always"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart exists; point it at this checkout's entry point.
    script = Path(sys.executable).parent / "dynoagent"
    unit = tmp_path / "dynoagent.service"
    unit.write_text((UNITS / "dynoagent.service").read_text()
                    .replace("/usr/bin/dynoagent", str(script)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_sysusers_and_tmpfiles() -> None:
    assert "g dynoagent" in (UNITS / "dynoagent.sysusers").read_text()
    tmpfiles = (UNITS / "dynoagent.tmpfiles").read_text()
    assert "d /run/dynoagent" in tmpfiles
    assert "d /var/lib/dynoagent" in tmpfiles


def _words(value: str) -> list[str]:
    return value.replace("\\", " ").split()


# Calls of systemd's groups that x86_64 does not have (32-bit and other architectures' ones).
NOT_ON_X86_64 = {"pciconfig_iobase", "pciconfig_read", "pciconfig_write", "s390_pci_mmio_read",
                 "s390_pci_mmio_write", "clock_settime64", "clock_adjtime64"}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_units_syscall_deny_list_is_refused_to_every_dyno_anyway() -> None:
    """The holder and the dynos inherit the unit's filter: it may only refuse what the dyno's
    own sandbox refuses unconditionally, so a dyno behaves the same with and without systemd."""
    from agent.launcher.seccomp import ALWAYS, DYNO_PLAN

    service = _unit()["Service"]
    value = service["SystemCallFilter"]
    assert value.startswith("~"), "a deny list"
    names = _words(value[1:])
    groups = [n for n in names if n.startswith("@")]
    listed = subprocess.run(["systemd-analyze", "syscall-filter", *groups], check=True,
                            capture_output=True, text=True).stdout
    calls = {n for n in names if not n.startswith("@")}
    calls |= {line.strip() for line in listed.splitlines()
              if line.startswith("    ") and not line.strip().startswith("#")}
    refused = {r.syscall for r in DYNO_PLAN.refusals if r.when == ALWAYS}
    assert calls - NOT_ON_X86_64 <= refused, sorted(calls - NOT_ON_X86_64 - refused)
    assert service["NoNewPrivileges"] == "yes"
    assert service["SystemCallErrorNumber"] == "EPERM"


def test_the_bounding_set_keeps_what_the_agent_and_the_launcher_use() -> None:
    service = _unit()["Service"]
    value = service["CapabilityBoundingSet"]
    assert value.startswith("~")
    dropped = set(_words(value[1:]))
    # Namespaces and mounts, links and firewall, the drop to a dyno's user, the bounding-set
    # drop itself, rlimits, entering a dyno's namespaces, and signalling dynos.
    needed = {"CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP",
              "CAP_SYS_RESOURCE", "CAP_SYS_PTRACE", "CAP_KILL", "CAP_CHOWN", "CAP_DAC_OVERRIDE",
              "CAP_FOWNER", "CAP_SYS_CHROOT", "CAP_MKNOD", "CAP_NET_BIND_SERVICE"}
    assert not dropped & needed, sorted(dropped & needed)
    assert {"CAP_SYS_MODULE", "CAP_SYS_BOOT", "CAP_SYS_RAWIO"} <= dropped
