"""Address management across a simulated agent restart: 250 namespaces in one space, set
up by two separate processes on the same state dir, never share an address."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from netns import HostNetwork, HostNetworkConfig, StateLockedError
from tests.support.testhost import Netns, TestHost

PHASE = str(Path(__file__).with_name("ipam_phase.py"))
TOTAL = 250


def _run_phase(host: TestHost, state_dir: Path, *, reattach: list[str], create: list[str],
               destroy: list[str]) -> dict[str, dict[str, object]]:
    spec = {"state_dir": str(state_dir), "host_netns": str(host.path), "space": "crowd",
            "reattach": reattach, "create": create, "destroy": destroy}
    done = subprocess.run([sys.executable, PHASE, json.dumps(spec)], capture_output=True,
                          text=True, timeout=110, check=False)
    assert done.returncode == 0, done.stderr
    result: dict[str, dict[str, object]] = json.loads(done.stdout)
    return result


def test_250_namespaces_across_restart(host: TestHost, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    names = [f"dtip{host.name[2:8]}{i:03d}" for i in range(TOTAL)]
    first, second = names[:150], names[150:]
    released = first[10:30]
    try:
        run1 = _run_phase(host, state_dir, reattach=[], create=first, destroy=released)
        before = run1["attached"]
        assert len(before) == 130
        # The second process: same state dir, new address book, same kernel objects.
        survivors = [n for n in first if n not in released]
        run2 = _run_phase(host, state_dir, reattach=survivors, create=second, destroy=[])
        after = run2["attached"]
        assert len(after) == TOTAL - len(released)
        for name in survivors:
            assert after[name] == before[name], "re-attach after restart changed an address"
        addresses = list(after.values())
        assert len(set(addresses)) == len(addresses), "an address was handed out twice"
        assert "172.20.0.1/24" not in addresses, "the gateway was handed out"
        # The 20 released addresses were the lowest free ones, so the new process reused them.
        first_run_all = {f"172.20.0.{i}/24" for i in range(2, 152)}
        reused = {after[n] for n in second} & first_run_all
        assert len(reused) == len(released)
        for name, address in after.items():
            assert run2["kernel"][name] == [address], f"kernel disagrees for {name}"
        spot = Netns(survivors[0]).run("ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
        assert str(after[survivors[0]]) in spot
    finally:
        with HostNetwork(HostNetworkConfig(state_dir=state_dir, link_prefix="dt",
                                           table="dt_agent", host_netns=host.path)) as net:
            report = net.sweep((), ())
        for name in names:
            assert not Netns(name).path.exists()
    assert report.table_removed


def test_state_dir_is_held_by_one_process(host: TestHost, tmp_path: Path) -> None:
    config = HostNetworkConfig(state_dir=tmp_path / "state", link_prefix="dt",
                               table="dt_agent", host_netns=host.path)
    with HostNetwork(config):
        try:
            HostNetwork(config).close()
        except StateLockedError as exc:
            assert exc.path == tmp_path / "state" / "ipam"
        else:
            raise AssertionError("two host networks shared one state dir")
