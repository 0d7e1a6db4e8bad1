"""A freed dyno uid is not handed out while anything of it remains, even past its quarantine:
a process of a real dyno (or one made non-dumpable, so the files under /proc/PID are root's),
or a key in the uid's kernel user keyring (the issue's attack: alpha stores a key and exits,
the next dyno with the same uid reads it). The uids lie above the agents' range, so no
agent's dyno has them."""

from __future__ import annotations

import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.launcher import UidAllocationError, UidAllocator
from agent.launcher.uids import DEFAULT_LAST, host_remnants
from tests.privileged.launcher.harness import Holder
from tests.support.wait import wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: runs processes and "
                                                          "keys as other uids")

# Not the venv's interpreter: it lies under /root, which other uids cannot enter.
SYSTEM_PYTHON = "/usr/bin/python3"

KEYCTL_PY = """\
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
SYS_ADD_KEY, SYS_KEYCTL = 248, 250
KEY_SPEC_USER_KEYRING, KEY_SPEC_USER_SESSION_KEYRING = -4, -5
KEYCTL_GET_KEYRING_ID, KEYCTL_READ, KEYCTL_INVALIDATE = 0, 11, 21
def check(result):
    if result < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return result
def keyctl(*args):
    return check(libc.syscall(SYS_KEYCTL, *(ctypes.c_long(a) for a in args)))
if sys.argv[1] == "add":
    data = sys.argv[2].encode()
    print(check(libc.syscall(SYS_ADD_KEY, b"user", b"alpha-secret", data,
                             ctypes.c_size_t(len(data)), ctypes.c_int(KEY_SPEC_USER_KEYRING))))
elif sys.argv[1] == "read":
    buf = ctypes.create_string_buffer(256)
    size = keyctl(KEYCTL_READ, int(sys.argv[2]), ctypes.addressof(buf), 256)
    print(buf.raw[:size].decode())
else:
    # By serial, not by the special ids: looking those up creates the keyrings anew.
    keyrings = [keyctl(KEYCTL_GET_KEYRING_ID, spec, 0)
                for spec in (KEY_SPEC_USER_KEYRING, KEY_SPEC_USER_SESSION_KEYRING)]
    for serial in (int(sys.argv[2]), *keyrings):
        keyctl(KEYCTL_INVALIDATE, serial)
"""


def spare_uid() -> int:
    """A uid above every agent's range that owns nothing now."""
    while True:
        uid = DEFAULT_LAST + 1000 + secrets.randbelow(50000)
        if uid not in host_remnants(uid, uid):
            return uid


@dataclass
class Clock:
    now: float = 100.0


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    return tmp_path / "reg" / "registry.json"


def allocator(registry: Path, owner: Path, uid: int, clock: Clock) -> UidAllocator:
    """A one-uid range, so the only question is whether `uid` is handed out."""
    return UidAllocator(str(owner), quarantine_s=60, path=str(registry), first=uid, last=uid,
                        clock=lambda: clock.now)


def as_uid(uid: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SYSTEM_PYTHON, "-I", "-c", KEYCTL_PY, *args], user=uid, group=uid,
                          extra_groups=[], cwd="/", capture_output=True, text=True, timeout=30)


def key_users() -> set[int]:
    return {int(line.split(":")[0]) for line in Path("/proc/key-users").read_text().splitlines()}


def test_a_key_left_in_a_freed_uids_keyring_keeps_the_uid_out_of_use_until_it_is_gone(
        registry: Path, tmp_path: Path, clock: Clock) -> None:
    if not Path(SYSTEM_PYTHON).exists():
        pytest.skip(f"needs {SYSTEM_PYTHON}, an interpreter every uid may run")
    uid = spare_uid()
    alpha = allocator(registry, tmp_path / "alpha", uid, clock)
    assert alpha.allocate("alpha.1") == (uid, uid)
    secret = secrets.token_hex(8)
    added = as_uid(uid, "add", secret)  # alpha stores a key in its user keyring ...
    assert added.returncode == 0, added.stderr
    try:
        alpha.release("alpha.1")  # ... and exits
        # The attack the registry prevents: whoever gets the uid next reads alpha's key.
        assert as_uid(uid, "read", added.stdout.strip()).stdout.strip() == secret
        assert uid in key_users()
        beta = allocator(registry, tmp_path / "beta", uid, clock)
        clock.now += 3600  # far past the quarantine
        with pytest.raises(UidAllocationError) as info:
            beta.allocate("beta.1")
        assert "1 still owning processes or keys" in str(info.value)
    finally:
        # Every key of the uid (the secret and both user keyrings) goes, on any outcome.
        cleaned = as_uid(uid, "invalidate", added.stdout.strip())
        assert cleaned.returncode == 0, cleaned.stderr
        wait_for(lambda: uid not in key_users(), 30, what=f"the keys of uid {uid} gone")
    assert beta.allocate("beta.1") == (uid, uid)


def test_a_process_of_a_freed_uid_keeps_it_out_of_use(
        registry: Path, tmp_path: Path, clock: Clock, holder: Holder, make_dyno: Any) -> None:
    uid = spare_uid()
    alpha = allocator(registry, tmp_path / "alpha", uid, clock)
    alpha.allocate("alpha.1")
    lingering = make_dyno("echo ready; exec sleep 600", uid=uid, gid=uid)
    started = holder.launch(lingering.req, lingering.out)
    assert "pid" in started, started
    wait_for(lambda: "ready" in lingering.output(), 20, what="the dyno started")
    alpha.release("alpha.1")
    clock.now += 3600
    beta = allocator(registry, tmp_path / "beta", uid, clock)
    try:
        with pytest.raises(UidAllocationError) as info:
            beta.allocate("beta.1")
        assert "1 still owning processes or keys" in str(info.value)
    finally:
        holder.call(op="kill", pid=started["pid"], sig=9)
        holder.wait(started["pid"])
    wait_for(lambda: uid not in host_remnants(uid, uid), 10, what=f"no process of {uid}")
    assert beta.allocate("beta.1") == (uid, uid)


def test_a_process_started_after_the_last_probe_keeps_its_freed_uid_out_of_use(
        registry: Path, tmp_path: Path, clock: Clock) -> None:
    # One allocator, no quarantine, the clock standing still: the allocation after the
    # release may reuse the probe made before the process existed, but not for its uid.
    uid = spare_uid()
    alloc = UidAllocator(str(tmp_path / "alpha"), quarantine_s=0, path=str(registry),
                         first=uid, last=uid, clock=lambda: clock.now)
    assert alloc.allocate("alpha.1") == (uid, uid)
    lingering = subprocess.Popen(["sleep", "600"], user=uid, group=uid, extra_groups=[],
                                 cwd="/")
    try:
        wait_for(lambda: uid in host_remnants(uid, uid), 10, what=f"a process of {uid}")
        alloc.release("alpha.1")
        with pytest.raises(UidAllocationError) as info:
            alloc.allocate("alpha.2")
        assert "1 still owning processes or keys" in str(info.value)
    finally:
        lingering.kill()
        lingering.wait(10)
    assert alloc.allocate("alpha.2") == (uid, uid)


HIDE_PY = """\
import ctypes, sys
ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0
print("hidden", flush=True)
sys.stdin.read()
"""


def test_the_probe_sees_a_process_that_made_itself_non_dumpable() -> None:
    if not Path(SYSTEM_PYTHON).exists():
        pytest.skip(f"needs {SYSTEM_PYTHON}, an interpreter every uid may run")
    uid = spare_uid()
    proc = subprocess.Popen([SYSTEM_PYTHON, "-I", "-c", HIDE_PY], user=uid, group=uid,
                            extra_groups=[], cwd="/", stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "hidden"
        # The files under its /proc/PID are root's now: a probe by their owner would miss it.
        assert Path(f"/proc/{proc.pid}/status").stat().st_uid == 0
        assert uid in host_remnants(uid, uid)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert uid not in host_remnants(uid, uid)
