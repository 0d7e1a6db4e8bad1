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
