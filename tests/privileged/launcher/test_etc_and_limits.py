"""A dyno's own /etc/hosts, /etc/hostname, /etc/resolv.conf, its resource limits and its
minimal /dev, on the real kernel."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.launcher import etc
from tests.privileged.launcher.harness import Holder, run
from tests.support.names import unique
from tests.support.wait import wait_for

ADDRESS = "10.213.7.9"


@pytest.fixture
def netns_with_address() -> Iterator[str]:
    """A netns whose only other links are a veth pair with ADDRESS/24 on one end: both ends
    are inside the namespace, so nothing sent there can leave it."""
    name = unique("dte")
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (["link", "set", "lo", "up"],
                    ["link", "add", "dtd0", "type", "veth", "peer", "name", "dtd1"],
                    ["addr", "add", f"{ADDRESS}/24", "dev", "dtd0"],
                    ["link", "set", "dtd0", "up"], ["link", "set", "dtd1", "up"]):
            subprocess.run(["ip", "-n", name, *cmd], check=True)
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


_PROBE = ("cat /etc/hostname; echo --; cat /etc/hosts; echo --; "
          "getent ahostsv4 {host} | head -n 1 || echo nohost; "
          "getent ahosts {dyno_id} | head -n 1 || echo noid; "
          "hostname -i 2>&1; "
          "python3 -c 'import socket, time; t = time.monotonic(); socket.getfqdn(); "
          "print(f\"fqdn_s={{time.monotonic() - t:.3f}}\")'; "
          "python3 -c 'import http.server as h, time; t = time.monotonic(); "
          "s = h.HTTPServer((\"0.0.0.0\", 0), h.BaseHTTPRequestHandler); "
          "print(f\"http_s={{time.monotonic() - t:.3f}} name={{s.server_name}}\")'; "
          "(echo x >> /etc/hosts) 2>/dev/null && echo WROTE || echo ro")


def test_hostname_resolves_to_the_private_address(holder: Holder, make_dyno: Any,
                                                 netns_with_address: str) -> None:
    # A default route to a gateway nobody answers ARP for (its veth peer has no address):
    # a DNS query would wait out the resolver's timeout, as on the 5 s stall this fixes,
    # yet no packet leaves the namespace.
    subprocess.run(["ip", "-n", Path(netns_with_address).name, "route", "add", "default",
                    "via", "10.213.7.1", "dev", "dtd0"], check=True)
    dyno = make_dyno("true", netns_path=netns_with_address, private_ip=ADDRESS)
    host, dyno_id = dyno.req["hostname"], dyno.req["dyno_id"]
    dyno.req["argv"] = ["/bin/sh", "-c", _PROBE.format(host=host, dyno_id=dyno_id)]
    status, out = run(holder, dyno)
    assert status == 0, out
    hostname_file, hosts_file, rest = out.split("--\n")
    assert hostname_file == f"{host}\n"
    assert hosts_file == etc.hosts_text(host, ADDRESS, (dyno_id,))
    lines = rest.splitlines()
    # getaddrinfo, as apps resolve: answered from /etc/hosts, DNS never asked.
    assert lines[0].split()[0] == ADDRESS and lines[1].split()[0] == ADDRESS, out
    assert lines[2].strip() == ADDRESS  # hostname -i
    match = re.fullmatch(r"fqdn_s=([0-9.]+)", lines[3])
    assert match, out
    # The bug this fixes: getfqdn() falling through to DNS and stalling ~5 s.
    assert float(match.group(1)) < 1.0, out
    match = re.fullmatch(r"http_s=([0-9.]+) name=(\S+)", lines[4])
    assert match, out
    assert float(match.group(1)) < 1.0 and match.group(2) == host, out
    assert lines[5] == "ro"


def test_private_ip_defaults_to_the_environment(holder: Holder, make_dyno: Any,
                                                netns_with_address: str) -> None:
    dyno = make_dyno("true", netns_path=netns_with_address)
    dyno.req["env"].append(["DYNOAGENT_PRIVATE_IP", ADDRESS])
    dyno.req["argv"] = ["/bin/sh", "-c", f"getent hosts {dyno.req['hostname']}; "
                        f"getent hosts {dyno.req['dyno_id']}"]
    status, out = run(holder, dyno)
    assert status == 0, out
    assert [line.split() for line in out.splitlines()] == [
        [ADDRESS, dyno.req["hostname"], dyno.req["dyno_id"]]] * 2


def test_without_an_address_the_hostname_maps_to_127_0_1_1(holder: Holder,
                                                            make_dyno: Any) -> None:
    dyno = make_dyno("true")
    dyno.req["argv"] = ["/bin/sh", "-c", f"getent hosts {dyno.req['hostname']}"]
    status, out = run(holder, dyno)
    assert status == 0, out
    assert out.split()[0] == "127.0.1.1"


def test_without_own_etc_the_hostname_does_not_resolve(holder: Holder, make_dyno: Any,
                                                       netns_with_address: str) -> None:
    # The control: the test above would catch a regression to the host's /etc.
    dyno = make_dyno("true", netns_path=netns_with_address, private_ip=ADDRESS, own_etc=False)
    dyno.req["argv"] = ["/bin/sh", "-c",
                        f"getent hosts {dyno.req['hostname']} || echo nohost; cat /etc/hostname"]
    status, out = run(holder, dyno)
    assert status == 0, out
    assert out.splitlines() == ["nohost", Path("/etc/hostname").read_text().strip()]


def test_resolv_conf_is_the_hosts_minus_loopback_resolvers(holder: Holder,
                                                           make_dyno: Any) -> None:
    status, out = run(holder, make_dyno("cat /etc/resolv.conf"))
    assert status == 0, out
    assert out == etc.resolv_conf_text(etc.read_host_resolv_conf())
    assert not any(etc.is_loopback(ns) for ns in etc.nameservers(out))


def test_stack_symlinks_resolve_inside_the_stack(holder: Holder, make_dyno: Any,
                                                 tmp_path: Path) -> None:
    busybox = shutil.which("busybox")
    if busybox is None or not os.path.exists("/usr/bin/tini-static"):
        pytest.skip("needs busybox-static and tini-static (Debian packages)")
    stack = tmp_path / "stack"
    for d in ("bin", "app", "dev", "proc", "sys", "tmp", "etc", "run"):
        (stack / d).mkdir(parents=True)
    shutil.copy(busybox, stack / "bin" / "busybox")
    for applet in ("sh", "cat"):
        (stack / "bin" / applet).symlink_to("busybox")
    # Ubuntu-style absolute link into /run: must land on the stack's /run, never the host's.
    decoy = Path("/run") / unique("dtresolv")
    (stack / "run" / decoy.name).write_text("# stack's own\n")
    (stack / "etc" / "resolv.conf").symlink_to(decoy)
    (stack / "etc" / "hostname").symlink_to("/nonexistent")  # dangling: left alone
    # No etc/hosts at all: nothing to cover, the launch still succeeds.
    dyno = make_dyno(f"cat /etc/resolv.conf; echo --; cat {decoy}; echo --; "
                     "cat /etc/hosts 2>&1 || echo nohosts",
                     stack_dir=str(stack), reaper="/usr/bin/tini-static",
                     env=[["PATH", "/bin"]])
    status, out = run(holder, dyno)
    assert status == 0, out
    resolv, via_link, hosts = out.split("--\n")
    generated = etc.resolv_conf_text(etc.read_host_resolv_conf())
    assert resolv == via_link == generated
    assert "nohosts" in hosts
    assert not decoy.exists()
    assert (stack / "run" / decoy.name).read_text() == "# stack's own\n"


def _limits(text: str) -> dict[str, tuple[str, str]]:
    out = {}
    for line in text.splitlines()[1:]:
        fields = re.split(r"\s{2,}", line.strip())
        out[fields[0]] = (fields[1], fields[2])
    return out


def test_open_files_and_core_limits(holder: Holder, make_dyno: Any) -> None:
    helper_pid = holder.call(op="info")["pid"]
    helper_limits = _limits(Path(f"/proc/{helper_pid}/limits").read_text())
    status, out = run(holder, make_dyno("cat /proc/self/limits"))
    assert status == 0, out
    limits = _limits(out)
    assert limits["Max open files"] == ("10000", "10000")
    assert limits["Max core file size"] == ("0", "0")
    # They were set, not inherited: the helper's differ.
    assert helper_limits["Max open files"] != ("10000", "10000")
    assert helper_limits["Max core file size"] != ("0", "0")
    status, out = run(holder, make_dyno("cat /proc/self/limits", nofile_limit=2048))
    assert status == 0, out
    assert _limits(out)["Max open files"] == ("2048", "2048")


def test_an_app_cannot_raise_its_limits(holder: Holder, make_dyno: Any) -> None:
    status, out = run(holder, make_dyno("ulimit -n 20000 2>/dev/null && echo RAISED; "
                                        "ulimit -c unlimited 2>/dev/null && echo CORE; "
                                        "ulimit -n"))
    assert status == 0, out
    assert out.split() == ["10000"]


def test_entered_commands_get_the_same_limits(holder: Holder, make_dyno: Any,
                                              tmp_path: Path) -> None:
    dyno = make_dyno("echo ready; exec sleep 60")
    started = holder.launch(dyno.req, dyno.out)
    assert "pid" in started, started
    wait_for(lambda: "ready" in dyno.output(), 10, what="dyno ready")
    out = tmp_path / "enter.txt"
    answer = holder.call(op="enter", pid=started["pid"], argv=["cat", "/proc/self/limits"],
                         env={"PATH": "/usr/bin:/bin"}, uid=dyno.req["uid"],
                         gid=dyno.req["gid"], cwd="/app", stdout=str(out),
                         cgroup_procs=dyno.req["cgroup_procs"])
    assert "pid" in answer, answer
    assert holder.wait(answer["pid"]) == 0, out.read_text()
    limits = _limits(out.read_text())
    assert limits["Max open files"] == ("10000", "10000")
    assert limits["Max core file size"] == ("0", "0")
    holder.call(op="kill", pid=started["pid"])
    holder.wait(started["pid"])


def test_dev_is_minimal(holder: Holder, make_dyno: Any) -> None:
    cmd = ("ls -A /dev | sort | tr '\\n' ' '; echo; ls -A /dev/pts | tr '\\n' ' '; echo; "
           "head -c 4 /dev/urandom | wc -c; head -c 4 /dev/zero | od -An -tx1; "
           "echo x > /dev/null && echo null-ok; "
           "dd if=/dev/zero of=/dev/full bs=1 count=1 2>&1 | grep -c 'No space'; "
           "touch /dev/new 2>/dev/null && echo DEVWRITE; "
           "(mknod /tmp/sda b 8 0 && cat /tmp/sda) 2>/dev/null | wc -c")
    status, out = run(holder, make_dyno(cmd))
    assert status == 0, out
    devs, pts, urandom, zero, null_ok, full, *rest = out.splitlines()
    assert devs.split() == sorted(["fd", "full", "null", "ptmx", "pts", "random", "shm",
                                   "stderr", "stdin", "stdout", "tty", "urandom", "zero"])
    assert pts.split() == ["ptmx"]  # a private devpts instance: no host terminals
    assert (urandom.strip(), zero.split(), null_ok, full) == ("4", ["00"] * 4, "null-ok", "1")
    assert rest == ["0"]  # no DEVWRITE; no block device could be made or read


def test_open_files_above_the_holders_hard_limit(holder: Holder, make_dyno: Any) -> None:
    helper_pid = holder.call(op="info")["pid"]
    hard = int(_limits(Path(f"/proc/{helper_pid}/limits").read_text())["Max open files"][1])
    status_text = Path(f"/proc/{helper_pid}/status").read_text()
    cap_eff = int(next(line.split()[1] for line in status_text.splitlines()
                       if line.startswith("CapEff:")), 16)
    cap_sys_resource = 24
    wanted = min(hard + 1000, 1 << 20)
    status, out = run(holder, make_dyno("cat /proc/self/limits", nofile_limit=wanted))
    assert status == 0, out
    # Raising a hard limit needs CAP_SYS_RESOURCE; without it the holder's hard limit is the
    # ceiling instead of a failed launch.
    expected = wanted if cap_eff & (1 << cap_sys_resource) else hard
    assert _limits(out)["Max open files"] == (str(expected), str(expected))
