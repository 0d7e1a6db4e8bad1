"""Create a network namespace and attach it to a space: netns.HostNetwork against the same
steps done with `ip` commands, medians of 100 each, measured in one run inside a test host."""

from __future__ import annotations

import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from netns import HostNetwork, HostNetworkConfig
from tests.support.testhost import TestHost, new_test_host

ROUNDS = 100
SPACE = "bench"


def _ms(samples: list[float]) -> str:
    return f"median {statistics.median(samples):6.2f} ms  p90 " \
           f"{statistics.quantiles(samples, n=10)[-1]:6.2f} ms"


def _library(host: TestHost, state_dir: Path) -> tuple[list[float], list[float]]:
    config = HostNetworkConfig(state_dir=state_dir, link_prefix="dtb", table="dt_bench",
                               host_netns=host.path)
    create: list[float] = []
    destroy: list[float] = []
    with HostNetwork(config) as net:
        net.ensure_space(SPACE)
        names = [f"dtbl{host.name[2:8]}{i:03d}" for i in range(ROUNDS)]
        try:
            for name in names:
                start = time.perf_counter()
                net.create_attached(SPACE, name)
                create.append((time.perf_counter() - start) * 1e3)
            for name in names[:20]:
                start = time.perf_counter()
                net.destroy(SPACE, name)
                destroy.append((time.perf_counter() - start) * 1e3)
        finally:
            net.sweep((), ())
    return create, destroy


def _ip_commands(host: TestHost) -> list[float]:
    """The same wiring as a shell script would do it, one `ip` process per step."""
    bridge, gateway = "dtbipbr0", "172.31.0.1"
    host.run("ip", "link", "add", bridge, "type", "bridge")
    host.run("ip", "addr", "add", f"{gateway}/24", "dev", bridge)
    host.run("ip", "link", "set", bridge, "up")
    samples: list[float] = []
    names = [f"dtbi{host.name[2:8]}{i:03d}" for i in range(ROUNDS)]
    nsenter = ["nsenter", f"--net={host.path}", "--"]
    try:
        for i, name in enumerate(names):
            veth = f"dtbiv{i}"
            steps = [
                ["ip", "netns", "add", name],
                [*nsenter, "ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0",
                 "netns", name],
                [*nsenter, "ip", "link", "set", veth, "master", bridge, "up"],
                [*nsenter, "ip", "link", "set", veth, "alias", f"bench:{name}"],
                ["ip", "-n", name, "link", "set", "lo", "up"],
                ["ip", "-n", name, "addr", "add", f"172.31.0.{i + 2}/24", "dev", "eth0"],
                ["ip", "-n", name, "link", "set", "eth0", "up"],
                ["ip", "-n", name, "route", "add", "default", "via", gateway],
            ]
            start = time.perf_counter()
            for step in steps:
                subprocess.run(step, check=True, capture_output=True)
            samples.append((time.perf_counter() - start) * 1e3)
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
        host.run("ip", "link", "del", bridge, check=False)
    return samples


def main() -> None:
    with new_test_host("dt") as host, tempfile.TemporaryDirectory() as tmp:
        lib, lib_destroy = _library(host, Path(tmp) / "state")  # durable, as deployed
        ip = _ip_commands(host)
    ratio = statistics.median(ip) / statistics.median(lib)
    print(f"create namespace + attach to space, {ROUNDS} rounds each (goal <= 5 ms):")
    print(f"  netns.HostNetwork                 {_ms(lib)}")
    print(f"  ip commands (8 processes)         {_ms(ip)}")
    print(f"  ratio ip / library                {ratio:6.1f}x")
    print(f"destroy (veth + namespace), 20 rounds: {_ms(lib_destroy)}")


if __name__ == "__main__":
    main()
