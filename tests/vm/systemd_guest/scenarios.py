"""Guest side of the systemd tier, run by Debian's python3 (standard library only) from the
payload disk once the guest reached multi-user: installs the package, drives the
systemd-managed agent through systemctl, journalctl and its operator socket, and writes one
result entry per scenario to <payload>/out/result.json (after each, so a crash keeps what ran).

Every deadline is a base figure times the guest's measured slowness (a calibration loop at
start against the same loop on a native core), so a loaded host makes waits longer, not red.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

UNIT = "dynoagent.service"
UNIT_FILE = "/usr/lib/systemd/system/dynoagent.service"
SOCKET = "/run/dynoagent/dynoagent.sock"
CONFIG = Path("/etc/dynoagent/agent.toml")
DROPIN_DIR = Path("/etc/systemd/system/dynoagent.service.d")
STATE = Path("/var/lib/dynoagent-test/state.json")
SLUG = Path("/var/lib/dynoagent/slugs/vmtest")
APP = "vmtest"
# The calibration loop (best of 3) took 0.058 s with Python 3.11 on one core of the
# development machine, natively; the guest's time for it over this is its slowness (>= 1).
CALIBRATION_LOOPS = 500_000
CALIBRATION_NATIVE_S = 0.058
# The test size: 64 MiB quota (memory.high), killed at 2x (memory.max), as in the e2e tier.
TEST_CONFIG = """\
# Written by the systemd VM tier (tests/vm/systemd_guest/scenarios.py).
sample_interval_s = 2
stop_timeout_s = 10

[sizes.tiny]
memory_mb = 64
pids_max = 64
cpu_weight = 50
kill_at = 2
"""
# PID 1's child waits; its child allocates 256 MiB against the 128 MiB kill point.
HOG_PY = """\
import subprocess, sys, time
hog = subprocess.Popen([sys.executable, "-c",
                        "import time; b = b'x' * (256 << 20); time.sleep(100000)"])
print("parent waiting for", hog.pid, flush=True)
print("hog ended", hog.wait(), flush=True)
time.sleep(100000)
"""


# Run in a one-off dyno: what its sandbox holds and which of TARGETS it can connect to.
PROBE_PY = """\
import ctypes, json, os, socket
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines()
              if ":" in line)
result = {"status": {k: status[k].strip() for k in
                     ("NoNewPrivs", "Seccomp", "Seccomp_filters", "CapEff", "CapBnd")
                     if k in status}}
libc = ctypes.CDLL(None, use_errno=True)
def attempt(name, call):
    result[name] = "done" if call() == 0 else os.strerror(ctypes.get_errno())
attempt("unshare_user", lambda: libc.unshare(0x10000000))
attempt("mount_tmpfs", lambda: libc.mount(b"none", b"/tmp", b"tmpfs", 0, None))
result["connect"] = {}
for target in os.environ["TARGETS"].split():
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        result["connect"][target] = "connected"
    except OSError as e:
        result["connect"][target] = e.strerror or type(e).__name__
print("RESULT " + json.dumps(result), flush=True)
"""
OTHER_APP = "vmother"


class ScenarioFailed(Exception):
    pass


class Guest:
    def __init__(self, payload: Path) -> None:
        self.payload = payload
        self.out = payload / "out"
        self.config: dict[str, Any] = json.loads((payload / "config.json").read_text())
        self.state: dict[str, Any] = json.loads(STATE.read_text()) if STATE.is_file() else {}
        self.state["boot"] = self.state.get("boot", 0) + 1
        self.result: dict[str, Any] = self.state.setdefault("result", {"scenarios": []})
        self.result.update(boot=self.state["boot"], next_boot=False, error=None)
        self.slowness = 1.0

    # -- bookkeeping ------------------------------------------------------------------------
    def save(self) -> None:
        STATE.parent.mkdir(parents=True, exist_ok=True)
        STATE.write_text(json.dumps(self.state))
        self.out.mkdir(exist_ok=True)
        tmp = self.out / "result.json.tmp"
        tmp.write_text(json.dumps(self.result, indent=2))
        os.replace(tmp, self.out / "result.json")
        os.sync()

    def say(self, text: str) -> None:
        print(f"dynoagent-test: {text}", flush=True)

    def scenario(self, name: str, body: Callable[[], dict[str, Any]]) -> bool:
        self.say(f"scenario {name} ...")
        started = time.monotonic()
        entry: dict[str, Any] = {"name": name, "boot": self.state["boot"]}
        try:
            entry["detail"] = body()
            entry["ok"] = True
        except Exception as exc:
            entry["ok"] = False
            entry["detail"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc()[-4000:]
        entry["seconds"] = round(time.monotonic() - started, 1)
        self.result["scenarios"].append(entry)
        self.save()
        self.say(f"scenario {name}: {'PASS' if entry['ok'] else 'FAIL'} "
                 f"({entry['seconds']}s) {str(entry['detail'])[:800]}")
        return bool(entry["ok"])

    # -- time -------------------------------------------------------------------------------
    def calibrate(self) -> None:
        runs = []
        for _ in range(3):
            started = time.perf_counter()
            total = 0
            for i in range(CALIBRATION_LOOPS):
                total += i * i
            runs.append(time.perf_counter() - started)
        self.slowness = max(1.0, min(runs) / CALIBRATION_NATIVE_S)
        self.result["slowness"] = round(self.slowness, 2)
        self.result.setdefault("calibration_s", []).append(round(min(runs), 3))

    def s(self, base_s: float) -> float:
        """A deadline of `base_s` on a native core, scaled to this guest."""
        return base_s * self.slowness

    def wait(self, what: str, check: Callable[[], Any], base_s: float,
             interval_s: float = 0.2) -> Any:
        deadline = time.monotonic() + self.s(base_s)
        last: Any = None
        while True:
            try:
                last = check()
            except (OSError, ScenarioFailed, http.client.HTTPException, ValueError) as exc:
                last = exc
            else:
                if last and not isinstance(last, Exception):
                    return last
            if time.monotonic() > deadline:
                raise ScenarioFailed(f"{what}: not within {self.s(base_s):.0f}s "
                                     f"(x{self.slowness:.1f}); last: {last!r}"[:1500])
            time.sleep(interval_s)

    # -- tools ------------------------------------------------------------------------------
    def run(self, *argv: str, check: bool = True,
            base_s: float = 30) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=self.s(base_s))
        if check and done.returncode != 0:
            raise ScenarioFailed(f"{' '.join(argv)} exited {done.returncode}: "
                                 f"{(done.stdout + done.stderr)[-1500:]}")
        return done

    def systemctl(self, verb: str, base_s: float = 120) -> None:
        """`systemctl VERB dynoagent`; a failure says why, from the unit's journal."""
        done = self.run("systemctl", verb, UNIT, check=False, base_s=base_s)
        if done.returncode != 0:
            tail = self.run("journalctl", "-u", UNIT, "--no-pager", "-o", "cat", "-n", "12",
                            check=False).stdout
            raise ScenarioFailed(f"systemctl {verb} {UNIT} exited {done.returncode}; the "
                                 f"unit's journal ends with:\n{tail}")

    def ensure_running(self) -> None:
        """A scenario starts from a running agent even when the one before left it down."""
        if self.run("systemctl", "is-active", UNIT, check=False).stdout.strip() != "active":
            self.systemctl("start")
        self.wait_active()

    def show(self, *props: str) -> dict[str, str]:
        done = self.run("systemctl", "show", UNIT, *(f"--property={p}" for p in props))
        return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)

    def api(self, method: str, path: str, body: Any = None, *,
            expect: int | tuple[int, ...] = 200, base_s: float = 15) -> Any:
        conn = UnixHTTPConnection(SOCKET, timeout=self.s(base_s))
        try:
            payload = None if body is None else json.dumps(body)
            headers = {"Content-Type": "application/json"} if payload else {}
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            data = response.read().decode()
        finally:
            conn.close()
        if response.status not in (expect if isinstance(expect, tuple) else (expect,)):
            raise ScenarioFailed(f"{method} {path}: {response.status} {data[:600]}")
        if response.getheader("Content-Type", "").startswith("application/json"):
            return json.loads(data)
        return data

    def wait_api(self, base_s: float = 60) -> None:
        self.wait("the agent's socket answering GET /v1/info",
                  lambda: self.api("GET", "/v1/info", base_s=5), base_s)

    def dyno(self, ref: str) -> dict[str, Any]:
        result: dict[str, Any] = self.api("GET", f"/v1/dynos/{ref}")
        return result

    def wait_state(self, ref: str, state: str, base_s: float = 60) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            status = self.dyno(ref)
            return status if status["state"] == state and status.get("pid") else None
        result: dict[str, Any] = self.wait(f"dyno {ref} {state}", check, base_s)
        return result

    def logs(self, dyno_name: str | None = None, app: str = APP) -> list[dict[str, Any]]:
        query = f"/v1/logs?app={app}&tail=1500&format=json"
        if dyno_name:
            query += f"&dyno={dyno_name}"
        text = self.api("GET", query) or ""
        return [json.loads(line) for line in str(text).splitlines() if line.strip()]

    def main_pid(self) -> int:
        return int(self.show("MainPID")["MainPID"])

    def wait_active(self, base_s: float = 90, *, other_than: int | None = None) -> int:
        def check() -> int | None:
            props = self.show("ActiveState", "SubState", "MainPID")
            pid = int(props["MainPID"])
            if props["ActiveState"] == "active" and props["SubState"] == "running" and pid \
                    and pid != other_than:
                return pid
            return None
        pid: int = self.wait(f"{UNIT} active (running)" +
                             (f" with a MainPID other than {other_than}" if other_than else ""),
                             check, base_s)
        self.wait_api()
        return pid

    # -- dynos ------------------------------------------------------------------------------
    def spec(self, name: str, command: str, size: str = "tiny",
             app: str = APP) -> dict[str, Any]:
        return {"app": app, "name": name, "command": command, "size": size,
                "release": {"version": 1, "slug": {"path": str(SLUG)}, "stack": "host"}}

    def dyno_pids(self) -> dict[str, int]:
        return {d["name"]: d["pid"] for d in self.api("GET", f"/v1/dynos?app={APP}")}

    def check_readopted(self, before: dict[str, int], what: str) -> dict[str, Any]:
        """Every dyno of `before` is up again with the same pid, and that pid is alive in
        the same cgroup as before."""
        def all_up() -> dict[str, Any] | None:
            listed = {d["name"]: d for d in self.api("GET", f"/v1/dynos?app={APP}")}
            if all(listed.get(n, {}).get("state") == "up" for n in before):
                return listed
            return None
        listed = self.wait(f"dynos {sorted(before)} up after {what}", all_up, 60)
        after = {n: listed[n]["pid"] for n in before}
        if after != before:
            raise ScenarioFailed(f"pids changed across {what}: before {before}, after {after}")
        for name, pid in before.items():
            if not Path(f"/proc/{pid}").exists():
                raise ScenarioFailed(f"{name}'s pid {pid} is gone after {what}")
        return {"pids": after}


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


def cgroup_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise ScenarioFailed(f"pid {pid} has no cgroup v2 line")


def cgroup_layout() -> str:
    mounts = [line.split(" - ")[1].split()[0] for line in
              Path("/proc/self/mountinfo").read_text().splitlines()
              if " - cgroup" in line]
    if mounts == ["cgroup2"]:
        return "v2"
    return "hybrid" if "cgroup2" in mounts else ("v1" if mounts else "none")


# -- scenarios ----------------------------------------------------------------------------
def install(g: Guest) -> dict[str, Any]:
    done = g.run("dpkg", "-i", str(g.payload / "install.deb"), base_s=120, check=False)
    if done.returncode != 0:
        raise ScenarioFailed(f"dpkg -i exited {done.returncode}: "
                             f"{(done.stdout + done.stderr)[-2500:]}")
    version = g.run("dpkg-query", "-W", "-f=${Version}", "dynoagent").stdout
    enabled = g.run("systemctl", "is-enabled", UNIT, check=False).stdout.strip()
    active = g.run("systemctl", "is-active", UNIT, check=False).stdout.strip()
    if version != g.config["deb_version"]:
        raise ScenarioFailed(f"installed version {version}, wanted {g.config['deb_version']}")
    # The test's sizes and quicker sampling; kept over the upgrade (--force-confold).
    CONFIG.parent.mkdir(parents=True, exist_ok=True)
    CONFIG.write_text(TEST_CONFIG)
    # A variant of the package's unit the host asked for (a candidate fix, tried by hand).
    if g.config.get("unit_dropin"):
        DROPIN_DIR.mkdir(parents=True, exist_ok=True)
        (DROPIN_DIR / "10-vmtest-variant.conf").write_text(g.config["unit_dropin"])
        g.run("systemctl", "daemon-reload", base_s=60)
    SLUG.mkdir(parents=True, exist_ok=True)
    (SLUG / "hog.py").write_text(HOG_PY)
    (SLUG / "probe.py").write_text(PROBE_PY)
    if enabled != "enabled":
        raise ScenarioFailed(f"the package left {UNIT} {enabled!r}, not enabled")
    return {"version": version, "is_enabled": enabled, "is_active_after_install": active,
            "dpkg_output": (done.stdout + done.stderr)[-1500:]}


def start(g: Guest) -> dict[str, Any]:
    # The package enables but does not start the unit; a start after our config is written.
    if g.run("systemctl", "is-active", UNIT, check=False).stdout.strip() == "active":
        g.systemctl("restart", base_s=90)
    else:
        g.systemctl("start", base_s=90)
    # Type=notify: `systemctl start` returned, so READY=1 arrived.
    props = g.show("ActiveState", "SubState", "Type", "StatusText", "MainPID", "NotifyAccess",
                   "ControlGroup", "Delegate", "WatchdogUSec", "KillMode")
    if (props["ActiveState"], props["SubState"]) != ("active", "running"):
        raise ScenarioFailed(f"after systemctl start: {props}")
    if props["Type"] != "notify" or not props["StatusText"]:
        raise ScenarioFailed(f"no STATUS= text from a Type=notify unit: {props}")
    status = g.run("systemctl", "status", "--no-pager", "--lines=0", UNIT, check=False).stdout
    if props["StatusText"] not in status:
        raise ScenarioFailed(f"systemctl status does not show {props['StatusText']!r}:\n{status}")
    verify = g.run("systemd-analyze", "verify", UNIT_FILE, check=False, base_s=60)
    verify_text = (verify.stdout + verify.stderr).strip()
    if verify.returncode != 0 or verify_text:
        raise ScenarioFailed(f"systemd-analyze verify exited {verify.returncode}: {verify_text}")
    g.wait_api()
    g.state["control_group"] = props["ControlGroup"]
    # Delegated (the package's unit): dynos in the unit's scope beside it (`dynoagent.service`
    # -> `dynoagent-dynos.scope`, agent/daemon/dynoscope.py), whose own cgroup keeps no
    # controllers; otherwise below the agent's configured cgroup_root (default `dynoagent`).
    parent, _, base = props["ControlGroup"].rpartition("/")
    g.state["dyno_cgroup_base"] = (
        f"{parent}/{base.removesuffix('.service')}-dynos.scope" if props["Delegate"] == "yes"
        else "/dynoagent")
    return {"props": props, "status": status.strip()[-1200:]}


def security(g: Guest) -> dict[str, Any]:
    done = g.run("systemd-analyze", "security", "--no-pager", UNIT, check=False, base_s=60)
    match = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", done.stdout)
    if not match:
        raise ScenarioFailed(f"no exposure score in: {(done.stdout + done.stderr)[-1500:]}")
    g.result["security_exposure"] = f"{match.group(1)} {match.group(2)}"
    return {"exposure": float(match.group(1)), "verdict": match.group(2),
            "report": done.stdout[-6000:]}


def dynos(g: Guest) -> dict[str, Any]:
    control_group = g.state["dyno_cgroup_base"]
    created = {}
    for name in ("worker.1", "worker.2"):
        created[name] = g.api("POST", "/v1/dynos", g.spec(name, "sleep 100000"), expect=201)
    checked = {}
    for name, body in created.items():
        status = g.wait_state(body["id"], "up")
        full = g.dyno(body["id"])
        limits = full["limits"]
        rel = cgroup_of(status["pid"])
        if not rel.startswith(control_group + "/"):
            raise ScenarioFailed(f"{name}'s cgroup {rel} is not under the unit's "
                                 f"delegated {control_group}")
        # The dyno's pid may be the cgroup's leaf below the dyno's own group: walk up to the
        # group that carries the limits.
        directory = Path("/sys/fs/cgroup" + rel)
        while not (directory / "memory.max").is_file() or \
                (directory / "memory.max").read_text().strip() == "max":
            if str(directory) == "/sys/fs/cgroup" + control_group:
                raise ScenarioFailed(f"no memory.max set above {rel}")
            directory = directory.parent
        files = {f: (directory / f).read_text().strip()
                 for f in ("memory.max", "memory.high", "memory.oom.group", "pids.max",
                           "cpu.weight", "cpu.max")}
        # On v2 the quota is the agent's (R14 from its samples), not memory.high: that would
        # throttle a dyno without swap short of the kill point (agent/supervision/runtime.py).
        want = {"memory.max": str(limits["memory_kill_bytes"]), "memory.high": "max",
                "memory.oom.group": "1", "pids.max": str(limits["pids_max"]),
                "cpu.weight": str(limits["cpu_weight"]),
                "cpu.max": "max 100000" if limits["cpu_max_cpus"] is None else files["cpu.max"]}
        wrong = {k: (files[k], v) for k, v in want.items() if files[k] != v}
        if wrong or limits["memory_kill_bytes"] != 128 << 20:
            raise ScenarioFailed(f"{name} in {directory}: (read, wanted) {wrong}; "
                                 f"limits {limits}")
        checked[name] = {"id": body["id"], "pid": status["pid"], "cgroup": str(directory),
                         "files": files}
    g.state["dynos"] = {n: c["id"] for n, c in checked.items()}
    g.state["cgroups"] = {n: c["cgroup"] for n, c in checked.items()}
    return checked


def r15(g: Guest) -> dict[str, Any]:
    body = g.api("POST", "/v1/dynos", g.spec("worker.3", "python3 hog.py"), expect=201)

    def exited() -> list[str] | None:
        texts = [line["text"] for line in g.logs("worker.3") if line.get("source") == "agent"]
        return texts if "Process exited with status 137" in texts else None
    texts = g.wait("`Process exited with status 137` for worker.3", exited, 120, interval_s=1)
    status = g.dyno(body["id"])
    g.api("DELETE", f"/v1/dynos/{body['id']}", expect=204, base_s=60)
    if "Error R15 (Memory quota vastly exceeded)" not in texts:
        raise ScenarioFailed(f"137 without R15: {texts}")
    return {"agent_lines": [t for t in texts if not t.startswith("source=")][-12:],
            "r14_seen": any(t.startswith("Error R14") for t in texts),
            "exit_status": status.get("exit_status"), "reason": status.get("reason")}


def one_off(g: Guest, app: str, name: str, env: dict[str, str]) -> dict[str, Any]:
    """Run probe.py in a one-off dyno of `app`; its RESULT, the dyno deleted after."""
    body = g.api("POST", "/v1/dynos", {**g.spec(name, "python3 -u probe.py", app=app),
                                       "env": env}, expect=201)

    def result() -> dict[str, Any] | None:
        for line in g.logs(name, app=app):
            text = str(line.get("text", ""))
            if line.get("source") == "app" and text.startswith("RESULT "):
                parsed: dict[str, Any] = json.loads(text[len("RESULT "):])
                return parsed
        return None
    try:
        found: dict[str, Any] = g.wait(f"the probe's result from {app} {name}", result, 60,
                                       interval_s=0.5)
    finally:
        g.api("DELETE", f"/v1/dynos/{body['id']}", expect=204, base_s=60)
    return found


def spaces_and_sandbox(g: Guest) -> dict[str, Any]:
    """Under the hardened unit, as in the e2e tier: a dyno reaches its own space's dynos and
    not another's, and holds no privilege; the agent itself runs with the unit's hardening."""
    web = g.api("POST", "/v1/dynos", g.spec("web.1", "python3 -m http.server $PORT"),
                expect=201)
    try:
        status = g.wait_state(web["id"], "up", 90)
        target = f"{status['ip']}:5000"
        same = one_off(g, APP, "run.1", {"TARGETS": target})
        other = one_off(g, OTHER_APP, "run.2", {"TARGETS": target})
    finally:
        g.api("DELETE", f"/v1/dynos/{web['id']}", expect=204, base_s=60)
    problems = []
    if same["connect"].get(target) != "connected":
        problems.append(f"same space: {same['connect']}")
    if other["connect"].get(target) == "connected":
        problems.append(f"another space reached {target}")
    for who, found in (("same", same), ("other", other)):
        held = found["status"]
        if (held.get("NoNewPrivs"), held.get("Seccomp"), held.get("CapEff")) != \
                ("1", "2", "0000000000000000"):
            problems.append(f"{who}: dyno holds {held}")
        if found["unshare_user"] == "done" or found["mount_tmpfs"] == "done":
            problems.append(f"{who}: unshare {found['unshare_user']}, "
                            f"mount {found['mount_tmpfs']}")
    status_lines = Path(f"/proc/{g.main_pid()}/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in status_lines if ":" in line)
    agent = {k: fields.get(k, "").strip()
             for k in ("NoNewPrivs", "Seccomp", "Seccomp_filters", "CapBnd")}
    # The unit's CapabilityBoundingSet= leaves out CAP_SYS_MODULE (16) and CAP_SYS_BOOT (22).
    bounding = int(agent["CapBnd"] or "0", 16)
    if agent["NoNewPrivs"] != "1" or agent["Seccomp"] != "2" or bounding & (1 << 16 | 1 << 22):
        problems.append(f"the agent runs without the unit's hardening: {agent}")
    if problems:
        raise ScenarioFailed("; ".join(problems))
    return {"target": target, "same_space": same, "other_space": other, "agent": agent}


def restart_and_kill(g: Guest) -> dict[str, Any]:
    g.ensure_running()
    before = g.dyno_pids()
    detail: dict[str, Any] = {"before": before}
    old = g.main_pid()
    g.systemctl("restart", base_s=120)
    new = g.wait_active(other_than=old)
    detail["restart"] = g.check_readopted(before, "systemctl restart")
    os.kill(new, signal.SIGKILL)
    killed_at = time.monotonic()
    newer = g.wait_active(other_than=new)
    detail["kill9"] = {"agent": [new, newer],
                       "back_after_s": round(time.monotonic() - killed_at, 1),
                       **g.check_readopted(before, "kill -9 of the agent")}
    # Documented behaviour (systemd/dynoagent.service, KillMode=process): a stop ends the
    # agent alone; the dynos keep running in their cgroups and the next start adopts them.
    g.systemctl("stop", base_s=120)
    state = g.run("systemctl", "is-active", UNIT, check=False).stdout.strip()
    alive = {n: Path(f"/proc/{p}").exists() for n, p in before.items()}
    if state != "inactive" or not all(alive.values()):
        raise ScenarioFailed(f"after systemctl stop: unit {state}, dynos alive {alive}")
    g.systemctl("start", base_s=120)
    g.wait_active()
    detail["stop_start"] = {"alive_while_stopped": alive,
                            **g.check_readopted(before, "systemctl stop + start")}
    return detail


def watchdog(g: Guest) -> dict[str, Any]:
    g.ensure_running()
    before = g.dyno_pids()
    # A short WatchdogSec for the test, still scaled: the agent pings at half of it.
    watchdog_s = max(10, round(g.s(4)))
    DROPIN_DIR.mkdir(parents=True, exist_ok=True)
    dropin = DROPIN_DIR / "zz-vmtest-watchdog.conf"
    dropin.write_text(f"[Service]\nWatchdogSec={watchdog_s}\n")
    try:
        g.run("systemctl", "daemon-reload", base_s=60)
        old = g.main_pid()
        g.systemctl("restart", base_s=120)
        agent = g.wait_active(other_than=old)
        restarts = int(g.show("NRestarts")["NRestarts"])
        os.kill(agent, signal.SIGSTOP)
        stopped_at = time.monotonic()
        back = g.wait_active(base_s=watchdog_s + 120, other_than=agent)
        elapsed = time.monotonic() - stopped_at
        after_restarts = int(g.show("NRestarts")["NRestarts"])
        journal = g.run("journalctl", "-u", UNIT, "--no-pager", "-o", "cat", "-n", "200").stdout
        if "Watchdog timeout" not in journal:
            raise ScenarioFailed("no `Watchdog timeout` in the unit's journal:\n"
                                 + journal[-2000:])
        if elapsed < watchdog_s * 0.9 or after_restarts <= restarts:
            raise ScenarioFailed(f"restarted after {elapsed:.1f}s (WatchdogSec={watchdog_s}), "
                                 f"NRestarts {restarts} -> {after_restarts}")
        readopted = g.check_readopted(before, "the watchdog restart")
    finally:
        dropin.unlink(missing_ok=True)
        g.run("systemctl", "daemon-reload", base_s=60)
    # Back to the package's own WatchdogSec.
    g.systemctl("restart", base_s=120)
    g.wait_active()
    return {"watchdog_s": watchdog_s, "frozen": agent, "new": back,
            "restarted_after_s": round(elapsed, 1),
            "n_restarts": [restarts, after_restarts], **readopted}


def journal(g: Guest) -> dict[str, Any]:
    # Judged from what the agent logged so far: no running agent needed.
    done = g.run("journalctl", "-u", UNIT, "-o", "json", "--no-pager", "-b")
    entries = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    ids = set(g.state["dynos"].values())
    about = [e for e in entries if e.get("DYNO_ID") in ids]
    if not about:
        raise ScenarioFailed(f"no journal entry of {UNIT} carries DYNO_ID of {sorted(ids)} "
                             f"({len(entries)} entries)")
    with_app = [e for e in about if e.get("APP") == APP]
    if not with_app:
        raise ScenarioFailed(f"entries with DYNO_ID but none with APP={APP}: {about[:3]}")
    standard = {"MESSAGE", "PRIORITY", "_PID", "_COMM", "SYSLOG_IDENTIFIER", "CODE_FILE",
                "CODE_LINE", "CODE_FUNC", "_SYSTEMD_UNIT"}
    sample = with_app[-1]
    fields = sorted(k for k in sample if not k.startswith(("_", "__")))
    missing = [k for k in ("MESSAGE", "PRIORITY") if k not in sample]
    if missing:
        raise ScenarioFailed(f"agent entry lacks {missing}: {sample}")
    return {"entries": len(entries), "with_dyno_id": len(about), "with_app": len(with_app),
            "fields": fields, "sample": {k: sample[k] for k in fields if k in standard
                                         or k.isupper()}}


def upgrade(g: Guest) -> dict[str, Any]:
    g.ensure_running()
    before = g.dyno_pids()
    old = g.main_pid()
    done = g.run("dpkg", "-i", "--force-confold", str(g.payload / "upgrade.deb"), base_s=180,
                 check=False)
    if done.returncode != 0:
        raise ScenarioFailed(f"dpkg -i (upgrade) exited {done.returncode}: "
                             f"{(done.stdout + done.stderr)[-2500:]}")
    version = g.run("dpkg-query", "-W", "-f=${Version}", "dynoagent").stdout
    if version != g.config["upgrade_version"]:
        raise ScenarioFailed(f"version {version} after the upgrade")
    new = g.wait_active(other_than=old)
    return {"version": version, "agent": [old, new],
            **g.check_readopted(before, "the package upgrade"),
            "dpkg_output": (done.stdout + done.stderr)[-1500:]}


def before_reboot(g: Guest) -> dict[str, Any]:
    # The reboot is tested even when an earlier scenario left the agent unable to start:
    # then the dynos are the ones scenario 2 made, their pids as /proc tells.
    try:
        g.ensure_running()
        listed = g.api("GET", f"/v1/dynos?app={APP}")
    except (ScenarioFailed, OSError) as exc:
        g.say(f"reboot scenario without a running agent: {exc}"[:300])
        listed = [{"name": n, "id": i, "pid": None} for n, i in g.state["dynos"].items()]
    netns = sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else []
    g.state["before_reboot"] = {"dynos": {d["name"]: {"id": d["id"], "pid": d["pid"]}
                                          for d in listed},
                                "netns": netns, "boot_id": boot_id()}
    g.result["next_boot"] = True
    Path("/run/dynoagent-test.reboot").write_text("")
    return g.state["before_reboot"]


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def after_reboot(g: Guest) -> dict[str, Any]:
    before = g.state["before_reboot"]
    if boot_id() == before["boot_id"]:
        raise ScenarioFailed("same boot id: the guest did not reboot")
    # Enabled by the package: systemd started it at boot.
    g.wait_active(base_s=120)
    listed = {d["name"]: d for d in g.api("GET", f"/v1/dynos?app={APP}")}
    # A dyno said to be up must be a live process in the agent's delegated subtree, not a
    # pid remembered from the last boot (which may now be anything else).
    stale = {name: d for name, d in listed.items()
             if d["state"] == "up" and not _live_in(d.get("pid"), g.state["dyno_cgroup_base"])}
    if stale:
        raise ScenarioFailed(f"dynos reported up with no such process after reboot: {stale}")
    # Cgroups and netns from the last boot cannot exist (fresh cgroupfs and /run); records
    # on disk may, and must not stop the same dynos from being asked for again.
    netns = sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else []
    leftovers = [str(p) for p in Path("/sys/fs/cgroup" + g.state["dyno_cgroup_base"]).rglob("*")
                 if p.is_dir() and any(i in p.name for i in
                                       (d["id"] for d in before["dynos"].values()))
                 and not _populated(p)]
    again = {}
    for name, old in before["dynos"].items():
        # As a coordinator would: the same spec with the same id (idempotent by id), then a
        # restart for a dyno the agent keeps down or crashed.
        g.api("POST", "/v1/dynos", {**g.spec(name, "sleep 100000"), "id": old["id"]},
              expect=(200, 201))
        if g.dyno(old["id"])["state"] not in ("up", "starting"):
            g.api("POST", f"/v1/dynos/{old['id']}/restart", expect=(200, 202, 204))
        try:
            status = g.wait_state(old["id"], "up")
        except ScenarioFailed as exc:
            lines = [f"{line.get('source')}: {line.get('text')}" for line in g.logs(name)
                     if not str(line.get("text", "")).startswith("source=")]
            raise ScenarioFailed(f"{exc}; states after the boot: "
                                 f"{ {n: d['state'] for n, d in listed.items()} }; "
                                 f"{name}'s last log lines: {lines[-12:]}") from None
        if not _live_in(status["pid"], g.state["dyno_cgroup_base"]):
            raise ScenarioFailed(f"{name} is up with pid {status['pid']}, which is not a "
                                 "process of the agent's subtree")
        again[name] = {"id": status["id"], "pid": status["pid"],
                       "cgroup": cgroup_of(status["pid"])}
    return {"listed_after_boot": {n: {"state": d["state"], "pid": d.get("pid")}
                                  for n, d in listed.items()},
            "netns_after_boot": netns, "empty_cgroups_of_old_dynos": leftovers,
            "asked_again": again}


def _live_in(pid: int | None, control_group: str) -> bool:
    try:
        return bool(pid) and cgroup_of(int(pid)).startswith(control_group + "/")
    except OSError:
        return False


def _populated(path: Path) -> bool:
    with contextlib.suppress(OSError):
        return "populated 1" in (path / "cgroup.events").read_text()
    return False


def describe_guest(g: Guest) -> None:
    g.result["kernel"] = platform.release()
    g.result["cgroup_layout"] = cgroup_layout()
    g.result["cgroup_controllers"] = Path("/sys/fs/cgroup/cgroup.controllers").read_text().split()
    g.result["pid1"] = Path("/proc/1/comm").read_text().strip()
    first = subprocess.run(["systemctl", "--version"], capture_output=True, text=True)
    g.result["systemd_version"] = first.stdout.split("\n", 1)[0]
    g.result.setdefault("uptime_at_start_s", []).append(
        float(Path("/proc/uptime").read_text().split()[0]))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--payload", type=Path, required=True)
    args = parser.parse_args()
    g = Guest(args.payload)
    try:
        g.calibrate()
        describe_guest(g)
        g.save()
        g.say(f"boot {g.state['boot']}, slowness x{g.slowness:.1f}, "
              f"cgroups {g.result['cgroup_layout']}")
        if g.state["boot"] == 1:
            if g.scenario("install", lambda: install(g)):
                started = g.scenario("1-start-ready-status-verify", lambda: start(g))
                g.scenario("security-exposure", lambda: security(g))
                if started and g.scenario("2-dynos-delegated-limits", lambda: dynos(g)):
                    g.scenario("2-r15-exit-137", lambda: r15(g))
                    g.scenario("2-spaces-and-sandbox", lambda: spaces_and_sandbox(g))
                    g.scenario("3-restart-kill9-stop", lambda: restart_and_kill(g))
                    g.scenario("4-watchdog", lambda: watchdog(g))
                    g.scenario("5-journal-fields", lambda: journal(g))
                    g.scenario("6-upgrade", lambda: upgrade(g))
                    g.scenario("7-reboot-prepare", lambda: before_reboot(g))
        elif g.state["boot"] == 2:
            g.scenario("7-reboot", lambda: after_reboot(g))
    except Exception:
        g.result["error"] = traceback.format_exc()[-4000:]
    g.result.setdefault("uptime_at_end_s", []).append(
        float(Path("/proc/uptime").read_text().split()[0]))
    with contextlib.suppress(Exception):
        out = g.out
        out.mkdir(exist_ok=True)
        for unit in (UNIT, "dynoagent-test.service"):
            done = subprocess.run(["journalctl", "-u", unit, "--no-pager", "-b", "-o",
                                   "short-monotonic"], capture_output=True, text=True)
            (out / f"journal-{unit}-boot{g.state['boot']}.log").write_text(done.stdout)
    g.save()
    g.say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
