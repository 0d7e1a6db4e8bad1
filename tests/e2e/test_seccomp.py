"""The dyno seccomp filter through the real agent: `dynoctl inspect` shows it on (Seccomp 2),
and the keyring attack of issue 11 fails at its first step — a dyno of one app cannot store a
key for a later dyno of another app to read, because add_key and keyctl are refused."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_supervision import (
    agent_in_host,
    make_slug,
    one_off_result,
    spec,
    wait_state,
)
from tests.support.agentproc import AgentProcess
from tests.support.testhost import new_test_host
from tests.support.wait import wait_for

KEY_DESCRIPTION = "dt-shared-secret"
KEY_SPEC_USER_KEYRING, KEY_SPEC_USER_SESSION_KEYRING = -4, -5
KEYCTL_GET_KEYRING_ID, KEYCTL_INVALIDATE = 0, 21

# Each script prints one line `RESULT {json}`; errno 0 means the call worked.
_CALL = """\
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def call(nr, *args):
    ctypes.set_errno(0)
    result = libc.syscall(nr, *args)
    return result, (ctypes.get_errno() if result == -1 else 0)
USER_KEYRING = -4
"""

# The attacker: a key in its user keyring, which the kernel keeps by uid after it exits.
STORE_PY = _CALL + f"""\
secret = os.environ["SECRET"].encode()
_, add_key = call(248, b"user", b"{KEY_DESCRIPTION}", secret, len(secret), USER_KEYRING)
_, keyctl = call(250, 0, USER_KEYRING, 1)  # KEYCTL_GET_KEYRING_ID, create
print("RESULT " + json.dumps({{"uid": os.getuid(), "add_key": add_key, "keyctl": keyctl}}),
      flush=True)
"""

# The victim's neighbour: looks for the key in its user keyring and in /proc/keys.
READ_PY = _CALL + f"""\
serial, search = call(250, 10, USER_KEYRING, b"user", b"{KEY_DESCRIPTION}", 0)  # KEYCTL_SEARCH
value = None
if search == 0:
    buf = ctypes.create_string_buffer(4096)
    size, _ = call(250, 11, serial, buf, 4096)  # KEYCTL_READ
    value = buf.raw[:max(size, 0)].decode(errors="replace")
_, request_key = call(249, b"user", b"{KEY_DESCRIPTION}", None, 0)
try:
    proc_keys = open("/proc/keys").read()
except OSError as e:
    proc_keys = os.strerror(e.errno)
print("RESULT " + json.dumps({{"uid": os.getuid(), "search": search, "value": value,
                              "request_key": request_key, "proc_keys": proc_keys}}), flush=True)
"""

EPERM = 1


@pytest.fixture(scope="module")
def slug() -> Iterator[Path]:
    path = make_slug({"store.py": STORE_PY, "read.py": READ_PY})
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentProcess]:
    with new_test_host() as host, agent_in_host(host) as running:
        yield running


def key_users() -> dict[int, str]:
    """/proc/key-users: every uid that owns a key anywhere on the host (root sees all)."""
    rows = Path("/proc/key-users").read_text().splitlines()
    return {int(row.split(":")[0]): row for row in rows if row.strip()}


def forget_user_keyrings(uid: int) -> None:
    """Remove what a dyno of `uid` stored, should the filter ever let it (a failing run): the
    kernel keeps a uid's keyrings after its last process, and the uid registry's quarantine
    waits for them to go."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            libc = ctypes.CDLL(None, use_errno=True)
            # Serials first: looking one special keyring up creates both again.
            serials = [libc.syscall(250, KEYCTL_GET_KEYRING_ID, spec, 0)
                       for spec in (KEY_SPEC_USER_KEYRING, KEY_SPEC_USER_SESSION_KEYRING)]
            results = [libc.syscall(250, KEYCTL_INVALIDATE, serial) for serial in serials]
            code = 0 if all(r == 0 for r in results) else 2
        finally:
            os._exit(code)
    os.waitpid(pid, 0)


def test_inspect_shows_the_filter_on_a_running_dyno(agent: AgentProcess, slug: Path,
                                                     apps: tuple[str, str]) -> None:
    app, _ = apps
    created = agent.api("POST", "/v1/dynos",
                        spec(app, "web.1", "python3 -u server.py", slug), expect=201)
    up = wait_state(agent, created["id"], "up", 30)
    assert up["seccomp"] == 2
    status = Path(f"/proc/{up['pid']}/status").read_text()
    assert re.search(r"^Seccomp:\s+2$", status, re.M), "the API tells what /proc says"
    shown = agent.ctl("inspect", created["id"]).stdout
    assert re.search(r"^Seccomp:\s+2 \(filter\)$", shown, re.M), shown
    agent.api("POST", f"/v1/dynos/{created['id']}/stop")
    down = wait_state(agent, created["id"], "down", 30)
    assert down["seccomp"] is None
    shown = agent.ctl("inspect", created["id"]).stdout
    assert re.search(r"^Seccomp:\s+-$", shown, re.M), shown


def test_a_key_stored_by_one_app_never_reaches_another(agent: AgentProcess, slug: Path,
                                                        apps: tuple[str, str]) -> None:
    alpha, beta = apps
    secret = f"s3cr3t-{secrets.token_hex(8)}"
    stored = one_off_result(agent, alpha, slug, "store.py", {"SECRET": secret})
    try:
        # The write is refused: nothing of the secret enters the kernel's keyrings.
        assert (stored["add_key"], stored["keyctl"]) == (EPERM, EPERM), stored
        assert stored["uid"] not in key_users(), "the dyno's uid owns keys on the host"
        found = one_off_result(agent, beta, slug, "read.py", {})
        assert found["uid"] != 0
        assert (found["search"], found["request_key"]) == (EPERM, EPERM), found
        assert found["value"] is None
        assert KEY_DESCRIPTION not in found["proc_keys"] and secret not in json.dumps(found)
    finally:
        if stored.get("add_key") == 0 or stored.get("keyctl") == 0:
            with contextlib.suppress(OSError):
                forget_user_keyrings(int(stored["uid"]))
            wait_for(lambda: stored["uid"] not in key_users(), 10, what="keys collected")
