"""A dyno's open files are bounded by its size: every process gets the size's RLIMIT_NOFILE
(`ulimit -n`), so a dyno that forks up to its process limit and opens files in every process
until the kernel refuses holds at most nofile x pids_max of the host's file table.

The real daemon in a test host; the files are counted from the host in /proc/PID/fd of every
process in the dyno's cgroup. Before issue 11 every process got 10,000, and one standard-1x
dyno could hold 256 x 10,000 = 2.56 M files, more than a 24 GiB host's whole table.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.e2e.test_supervision import (
    agent_in_host,
    app_texts,
    spec,
    wait_state,
)
from tests.support.agentproc import AgentProcess
from tests.support.testhost import TestHost
from tests.support.wait import wait_for

# A small size with a budget of its own, to show the [sizes.NAME] nofile key reaches dynos.
FDTEST = {"memory_mb": 256, "pids_max": 16, "nofile": 128}

# Forks until pids.max refuses, then every process (the parent too) opens /dev/null until
# EMFILE/ENFILE. It refuses to open anything if its limit is not the one the test expects:
# with a wrong (too high) limit it could fill the host's file table for everyone.
FDHOG_PY = """\
import gc, os, resource, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
print(f"nofile {soft} {hard}", flush=True)
expected = int(os.environ["EXPECT_NOFILE"])
if (soft, hard) != (expected, expected):
    print("not opening: unexpected limit", flush=True)
    time.sleep(1000)
    sys.exit(1)

def fill():
    held = []
    try:
        while True:
            held.append(os.open("/dev/null", os.O_RDONLY))
    except OSError as exc:
        return held, exc.errno

# Forked children share the parent's pages; keep the collector from dirtying them all.
gc.disable()
gc.freeze()
ready_r, ready_w = os.pipe()
children = 0
while True:
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        os.close(ready_r)
        held, _ = fill()
        os.write(ready_w, b"x")
        time.sleep(1000)
        os._exit(0)
    children += 1
os.close(ready_w)
for _ in range(children):
    os.read(ready_r, 1)
held, err = fill()
print(f"holding children={children} parent_files={len(held) + 3} errno={err}", flush=True)
time.sleep(1000)
"""


@pytest.fixture(scope="module")
def slug_files() -> Mapping[str, str]:
    return {"fdhog.py": FDHOG_PY}


@pytest.fixture(scope="module")
def agent(host: TestHost, slug: Path) -> Iterator[AgentProcess]:
    with agent_in_host(host, slug_roots=[str(slug)], sizes={"fdtest": FDTEST}) as running:
        yield running


def dyno_pids(agent: AgentProcess, app: str, dyno_id: str) -> list[int]:
    root = agent.settings["cgroup_root"]
    rel = f"app-{app}.slice/dyno-{dyno_id}.scope"
    pids: set[int] = set()
    for procs in glob.glob(f"/sys/fs/cgroup/*/{root}/{rel}/cgroup.procs"):
        pids.update(int(pid) for pid in Path(procs).read_text().split())
    return sorted(pids)


def open_files(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        return 0


def hold_files(agent: AgentProcess, app: str, slug: Path, size: str, nofile: int,
               pids_max: int) -> tuple[int, list[int]]:
    """Run the hog in a dyno of `size` until it holds all it can; the files it holds, counted
    from the host, and how many each of its processes holds."""
    created = agent.api("POST", "/v1/dynos", spec(
        app, "worker.1", "python3 fdhog.py", slug, size=size,
        env={"EXPECT_NOFILE": str(nofile)}), expect=201)
    wait_state(agent, created["id"], "up")
    wait_for(lambda: any(t.startswith(("holding", "not opening"))
                         for t in app_texts(agent, app, "worker.1")), 30, what="hog done")
    texts = app_texts(agent, app, "worker.1")
    assert f"nofile {nofile} {nofile}" in texts, texts
    holding = next(t for t in texts if t.startswith("holding"))
    match = re.fullmatch(r"holding children=(\d+) parent_files=(\d+) errno=(\d+)", holding)
    assert match, holding
    # It forked up to the size's process limit (less the reaper and itself), so this is
    # the worst case, and every process ran out of descriptors, not of the host's table.
    assert int(match.group(1)) == pids_max - 2, holding
    assert int(match.group(3)) == 24, "EMFILE (per process), not ENFILE (host table)"
    per_process = [open_files(pid) for pid in dyno_pids(agent, app, created["id"])]
    return sum(per_process), per_process


def test_standard_1x_holds_at_most_1024_files_per_process_and_262144_in_all(
        agent: AgentProcess, app: str, slug: Path) -> None:
    total, per_process = hold_files(agent, app, slug, "standard-1x", 1024, 256)
    print(f"standard-1x: {len(per_process)} processes hold {total} open files")
    assert len(per_process) == 256
    assert max(per_process) <= 1024
    assert total <= 1024 * 256


def test_a_configured_size_gives_its_own_nofile_and_budget(
        agent: AgentProcess, app: str, slug: Path) -> None:
    nofile, pids_max = FDTEST["nofile"], FDTEST["pids_max"]
    total, per_process = hold_files(agent, app, slug, "fdtest", nofile, pids_max)
    print(f"fdtest: {len(per_process)} processes hold {total} open files")
    assert len(per_process) == pids_max
    assert max(per_process) <= nofile
    assert total <= nofile * pids_max


def test_exec_and_run_get_the_sizes_nofile(agent: AgentProcess, app: str, slug: Path) -> None:
    """A command started in a dyno later (`dynoctl exec`) or a one-off (`dynoctl run`) has the
    same limit as the dyno's app: otherwise an exec'd process could hold 10,000."""
    created = agent.api("POST", "/v1/dynos", spec(app, "worker.1", "sleep 1000", slug,
                                                  size="fdtest"), expect=201)
    wait_state(agent, created["id"], "up")
    entered = agent.ctl("exec", "-a", app, "worker.1", "--", "sh", "-c", "ulimit -n; ulimit -Hn")
    assert entered.stdout.split() == ["128", "128"], entered
    one_off = agent.ctl("run", "-a", app, "-s", "fdtest", "--", "sh", "-c", "ulimit -n")
    assert one_off.stdout.split() == ["128"], one_off
    default = agent.ctl("run", "-a", app, "--", "sh", "-c", "ulimit -n")
    assert default.stdout.split() == ["1024"], default
