"""The operator API's peer check on a real agent whose sockets were opened to everyone
(chmod 0666): only root and holders of the socket's group get in, on every route and on the
attach socket; everyone else gets 403 `forbidden` and changes nothing."""

from __future__ import annotations

import grp
import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from tests.support.agentproc import AgentProcess, running_agent

NOBODY = 65534
# An existing group the test user is not otherwise in (nobody's own group is nogroup).
SOCKET_GROUP = "users"

# Run as the peer under test: one request per argument, each printed as a JSON line.
CLIENT_PY = """\
import http.client, json, socket, sys
class Conn(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(sys.argv[1])
for spec in sys.argv[3:]:
    method, path = spec.split(" ", 1)
    conn = Conn("localhost", timeout=10)
    body = sys.argv[2] if method == "POST" else None
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        print(json.dumps({"request": spec, "status": resp.status,
                          "body": resp.read().decode("utf-8", "replace")}), flush=True)
    except OSError as e:
        print(json.dumps({"request": spec, "status": None, "body": str(e)}), flush=True)
    finally:
        conn.close()
"""

ATTACH_PY = """\
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
# No request is sent: the agent judges the peer before it reads one.
print(s.makefile("rb").readline().decode().strip(), flush=True)
"""

REQUESTS = ("GET /v1/dynos", "POST /v1/dynos", "GET /v1/logs", "GET /v1/events",
            "GET /v1/info", "GET /metrics", "DELETE /v1/dynos/web.1")


def users_gid() -> int:
    try:
        return grp.getgrnam(SOCKET_GROUP).gr_gid
    except KeyError:
        pytest.skip(f"this machine has no group {SOCKET_GROUP!r} to own the socket")


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentProcess]:
    if os.geteuid() != 0:
        pytest.skip("needs root: the agent creates cgroups and the client changes its uid")
    users_gid()
    with running_agent(extra={"socket_group": SOCKET_GROUP}) as running:
        # Everyone may reach the sockets: the directories are traversable, the sockets 0666.
        running.base.chmod(0o711)
        (running.base / "run").chmod(0o755)
        for sock in (running.socket, running.socket.with_name("dynoagent.attach.sock")):
            assert sock.exists(), sock
            os.chmod(sock, 0o666)
        yield running


def as_peer(agent: AgentProcess, uid: int, gid: int, groups: list[int],
            *requests: str) -> list[dict[str, Any]]:
    body = json.dumps({"app": "intruder", "name": "web.1", "command": "sleep 1000",
                       "release": {"version": 1, "slug": {"path": "/"}}})
    result = subprocess.run(["/usr/bin/python3", "-c", CLIENT_PY, str(agent.socket), body,
                             *requests], capture_output=True, text=True, timeout=60,
                            user=uid, group=gid, extra_groups=groups)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_a_user_outside_the_socket_group_is_refused_everywhere(agent: AgentProcess) -> None:
    answers = as_peer(agent, NOBODY, NOBODY, [], *REQUESTS)
    assert [a["request"] for a in answers] == list(REQUESTS)
    for answer in answers:
        assert answer["status"] == 403, answer
        error = json.loads(answer["body"])["error"]
        assert error["code"] == "forbidden", answer
        assert f"uid {NOBODY}" in error["message"]
    # Nothing was created by the refused POST.
    assert agent.api("GET", "/v1/dynos") == []


def test_root_and_a_member_of_the_socket_group_get_in(agent: AgentProcess) -> None:
    for uid, gid, groups in ((0, 0, []), (NOBODY, NOBODY, [users_gid()]),
                             (NOBODY, users_gid(), [])):
        answers = as_peer(agent, uid, gid, groups, "GET /v1/dynos", "GET /v1/logs",
                          "GET /metrics")
        assert [a["status"] for a in answers] == [200, 200, 200], (uid, gid, groups, answers)
        assert json.loads(answers[0]["body"]) == []


def test_the_attach_socket_refuses_a_user_outside_the_group(agent: AgentProcess) -> None:
    attach = str(agent.socket.with_name("dynoagent.attach.sock"))
    result = subprocess.run(["/usr/bin/python3", "-c", ATTACH_PY, attach], capture_output=True,
                            text=True, timeout=30, user=NOBODY, group=NOBODY, extra_groups=[])
    assert result.returncode == 0, result.stderr
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "forbidden", error
    assert agent.api("GET", "/v1/dynos") == []


HOLDER_PING_PY = """\
import socket, struct, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
frame = bytes.fromhex(sys.argv[2])
try:
    s.sendall(struct.pack(">I", len(frame)) + frame)
    print(len(s.recv(65536)), flush=True)
except OSError as e:
    print(0, flush=True)
"""


def test_the_holder_socket_answers_only_root(agent: AgentProcess) -> None:
    holder = agent.base / "run" / "holder.sock"
    os.chmod(holder, 0o666)
    ping = msgpack.packb({"t": "req", "id": 1, "m": "ping", "p": {}}).hex()
    argv = ["/usr/bin/python3", "-c", HOLDER_PING_PY, str(holder), ping]
    as_root = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert as_root.returncode == 0 and int(as_root.stdout) > 0, as_root
    as_nobody = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                               user=NOBODY, group=NOBODY, extra_groups=[users_gid()])
    assert as_nobody.returncode == 0, as_nobody.stderr
    assert int(as_nobody.stdout) == 0, "the holder answered a user that is not root"
