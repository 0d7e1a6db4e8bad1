"""DESIGN §11's isolation promises, each attacked from inside a real dyno run by the real agent:
a dyno cannot see or signal another dyno's processes, reach another space's dynos or the
host's services, or read the agent's state, another dyno's config vars or the operator socket.

(The other promises have attack tests of their own: the seccomp filter in test_seccomp.py, uids
in test_uid_registry.py, the operator's fds in test_attach_relay.py.)"""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_supervision import agent_in_host, make_slug, one_off_result, spec, wait_state
from tests.support.agentproc import AgentProcess
from tests.support.testhost import TestHost

# Each attack prints one JSON object on a line starting with "RESULT " and nothing after it.
PROCESSES_PY = """\
import json, os, signal
seen = {}
for entry in os.listdir("/proc"):
    if entry.isdigit():
        try:
            seen[entry] = open(f"/proc/{entry}/cmdline", "rb").read().replace(b"\\0", b" ").decode()
        except OSError:
            pass
probes = {}
for pid in os.environ["OTHER_PIDS"].split():
    try:
        os.kill(int(pid), 0)
        probes[pid] = "signalled"
    except OSError as e:
        probes[pid] = os.strerror(e.errno)
print("RESULT " + json.dumps({"seen": seen, "probes": probes, "me": os.getpid()}), flush=True)
# Every process this dyno may signal: in a pid namespace of its own, that is only its own.
os.kill(-1, signal.SIGKILL)
"""

CONNECT_PY = """\
import json, os, socket, struct
def gateway():
    for line in open("/proc/net/route").read().splitlines()[1:]:
        fields = line.split()
        if fields[1] == "00000000":
            return socket.inet_ntoa(struct.pack("<L", int(fields[2], 16)))
targets = os.environ["TARGETS"].split()
port = os.environ.get("GATEWAY_PORT")
if port:
    targets.append(f"{gateway()}:{port}")
result = {}
for target in targets:
    host, _, port = target.rpartition(":")
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect((host, int(port)))
        result[target] = "connected"
    except OSError as e:
        result[target] = type(e).__name__
    finally:
        s.close()
print("RESULT " + json.dumps(result), flush=True)
"""

SECRETS_PY = """\
import json, os, socket
needle = os.environ["NEEDLE"][::-1].encode()
found, reachable = [], {}
for top in os.environ["SEARCH"].split():
    try:
        reachable[top] = os.listdir(top)
    except OSError as e:
        reachable[top] = os.strerror(e.errno)
    for root, dirs, files in os.walk(top):
        for name in files:
            path = os.path.join(root, name)
            try:
                with open(path, "rb") as f:
                    if needle in f.read(1 << 20):
                        found.append(path)
            except OSError:
                pass
for entry in os.listdir("/proc"):
    if entry.isdigit():
        try:
            if needle in open(f"/proc/{entry}/environ", "rb").read():
                found.append(f"/proc/{entry}/environ")
        except OSError:
            pass
opened = {}
for path in os.environ["FILES"].split():
    try:
        open(path, "rb").close()
        opened[path] = "opened"
    except OSError as e:
        opened[path] = os.strerror(e.errno)
connected = {}
for path in os.environ["SOCKETS"].split():
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        connected[path] = "connected"
    except OSError as e:
        connected[path] = os.strerror(e.errno)
    finally:
        s.close()
print("RESULT " + json.dumps({"found": found, "reachable": reachable, "opened": opened,
                              "connected": connected}), flush=True)
"""


@pytest.fixture(scope="module")
def slug() -> Iterator[Path]:
    path = make_slug({"processes.py": PROCESSES_PY, "connect.py": CONNECT_PY,
                      "secrets.py": SECRETS_PY})
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def agent(host: TestHost) -> Iterator[AgentProcess]:
    # Outside /tmp: every dyno has a /tmp of its own, which would hide the agent's files from
    # it whatever the agent did.
    with agent_in_host(host, parent_dir="/var/tmp") as running:
        yield running


def start_victim(agent: AgentProcess, app: str, slug: Path,
                 env: dict[str, str] | None = None) -> dict[str, Any]:
    created = agent.api("POST", "/v1/dynos",
                        spec(app, "web.1", "python3 -u server.py", slug, env=env or {}),
                        expect=201)
    return wait_state(agent, created["id"], "up", 30)


def test_a_dyno_sees_and_signals_only_its_own_processes(
        agent: AgentProcess, apps: tuple[str, str], slug: Path) -> None:
    attacker, victim_app = apps
    victim = start_victim(agent, victim_app, slug)
    host_pids = [str(victim["pid"])]
    found = one_off_result(agent, attacker, slug, "processes.py",
                           {"OTHER_PIDS": " ".join(host_pids)})
    commands = list(found["seen"].values())
    assert not any("server.py" in command for command in commands), commands
    assert len(commands) <= 3, f"only tini, the shell and the attack itself: {commands}"
    assert found["probes"] == {host_pids[0]: "No such process"}, found["probes"]
    # kill(-1, SIGKILL) from inside the attacker left the victim running, same process.
    after = wait_state(agent, victim["id"], "up", 10)
    assert (after["pid"], after["restarts"]) == (victim["pid"], victim["restarts"])


def test_another_space_is_unreachable_while_the_same_space_is(
        agent: AgentProcess, apps: tuple[str, str], slug: Path) -> None:
    attacker, victim_app = apps
    victim = start_victim(agent, victim_app, slug)
    target = f"{victim['ip']}:5000"
    neighbour = one_off_result(agent, victim_app, slug, "connect.py", {"TARGETS": target})
    assert neighbour == {target: "connected"}, "a dyno of the same space must reach it"
    stranger = one_off_result(agent, attacker, slug, "connect.py", {"TARGETS": target})
    assert stranger[target] != "connected", stranger


def test_the_hosts_own_services_are_unreachable(
        agent: AgentProcess, host: TestHost, apps: tuple[str, str], slug: Path) -> None:
    attacker, _ = apps
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    listener = host.popen([sys.executable, "-c",
                           "import socket, sys\n"
                           "s = socket.socket()\n"
                           "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                           f"s.bind(('0.0.0.0', {port}))\n"
                           "s.listen(16)\n"
                           "print('listening', flush=True)\n"
                           "while True:\n"
                           "    s.accept()[0].close()\n"], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL)
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "listening"
        found = one_off_result(agent, attacker, slug, "connect.py",
                               {"TARGETS": f"127.0.0.1:{port}", "GATEWAY_PORT": str(port)})
        gateway = next(target for target in found if not target.startswith("127."))
        # The listener is there on the dyno's gateway address, for the host itself.
        reached = host.run(sys.executable, "-c",
                           "import socket, sys; socket.create_connection("
                           f"({gateway.rpartition(':')[0]!r}, {port}), 2); print('ok')")
        assert reached.stdout.strip() == "ok"
        assert all(outcome != "connected" for outcome in found.values()), found
    finally:
        listener.kill()
        listener.wait(10)
        if listener.stdout is not None:
            listener.stdout.close()


def test_neither_the_agents_state_nor_another_dynos_config_vars_nor_the_socket_are_reachable(
        agent: AgentProcess, apps: tuple[str, str], slug: Path) -> None:
    attacker, victim_app = apps
    secret = f"s3cr3t-{secrets.token_hex(8)}"
    victim = start_victim(agent, victim_app, slug, env={"SECRET_TOKEN": secret})
    state_dir, run_dir = agent.settings["state_dir"], agent.settings["run_dir"]
    record = f"{state_dir}/dynos/{victim['id']}.json"
    assert secret in Path(record).read_text(), "the secret is on disk, in the victim's record"
    # An operator's lax modes must not be all that stands between a dyno and these.
    for path in (agent.base, Path(state_dir), Path(run_dir), Path(state_dir) / "dynos"):
        path.chmod(0o755)
    sockets = [str(agent.socket), str(agent.socket.with_name("dynoagent.attach.sock")),
               f"{run_dir}/holder.sock"]
    found = one_off_result(agent, attacker, slug, "secrets.py", {
        "NEEDLE": secret[::-1], "SEARCH": f"{state_dir} {run_dir} {agent.base} /run /var/lib",
        "FILES": record, "SOCKETS": " ".join(sockets)})
    assert found["found"] == [], f"the victim's secret was read from {found['found']}"
    assert all(outcome != "opened" for outcome in found["opened"].values()), found["opened"]
    assert all(outcome != "connected" for outcome in found["connected"].values()), \
        found["connected"]
    # Hidden: not there, or an empty directory masking them.
    for hidden in (state_dir, run_dir):
        assert found["reachable"][hidden] in ([], "No such file or directory"), found["reachable"]
