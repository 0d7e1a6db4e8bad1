"""The real daemon in a test host: a dyno with a 64-character id (its namespace name is
bounded) starts, runs and leaves nothing behind; and a `dynos.sync` from many dynos to none
keeps the operator API answering and reports every removal truthfully."""

from __future__ import annotations

import contextlib
import http.client
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.agentproc import AgentProcess, UnixHTTPConnection
from tests.support.coordinator import CoordinatorThread
from tests.support.names import unique
from tests.support.testhost import new_test_host
from tests.support.wait import wait_for

MASS_DYNOS = 150
# Loose enough for a loaded 2-core CI machine; the agent before this fix stalled its loop
# for seconds (and failed deletes outright once past ~128 dynos: no inotify instances).
MAX_API_STALL_S = 1.5


@pytest.fixture
def coordinated(tmp_path: Path) -> Iterator[tuple[AgentProcess, CoordinatorThread, Path]]:
    with new_test_host() as host:
        coordinator = CoordinatorThread(host.name).start()
        token = tmp_path / "token"
        token.write_text("test-token\n")
        agent = AgentProcess(netns=host.name, extra={
            "coordinator_url": coordinator.url, "coordinator_token_file": str(token),
            "stop_timeout_s": 3, "log_level": "info"})
        slug = agent.base / "slug"
        slug.mkdir()
        try:
            agent.start()
            coordinator.wait(lambda c: c.current, 15, "agent connected")
            yield agent, coordinator, slug
        except BaseException:
            print(agent.log()[-20000:])
            raise
        finally:
            try:
                with contextlib.suppress(Exception):
                    coordinator.request("dynos.sync", {"generation": 2**62, "dynos": []},
                                        timeout_s=60)
                agent.stop()
            finally:
                coordinator.close()
                agent.cleanup()


def _spec(dyno_id: str, n: int, slug: Path) -> dict[str, object]:
    return {"id": dyno_id, "app": "names", "name": f"worker.{n}", "command": "sleep 1000",
            "size": "eco", "release": {"version": 1, "slug": {"path": str(slug)}}}


def _leftovers(agent: AgentProcess, netns_names: list[str], ids: list[str]) -> list[str]:
    found = [f"netns {n}" for n in netns_names if Path(f"/run/netns/{n}").exists()]
    root = agent.settings["cgroup_root"]
    found += [str(p) for i in ids for p in Path("/sys/fs/cgroup").glob(
        f"*/{root}/app-names.slice/dyno-{i}.scope")]
    found += [f"run dir {i}" for i in ids if (agent.base / "run" / "dynos" / i).exists()]
    found += [f"record {i}" for i in ids if (agent.base / "state" / "dynos" / f"{i}.json").exists()]
    mounts = Path("/proc/self/mountinfo").read_text()
    found += [f"mount {n}" for n in netns_names if f"/{n} " in mounts]
    return found


def test_a_64_character_id_starts_runs_and_leaves_nothing(
        coordinated: tuple[AgentProcess, CoordinatorThread, Path]) -> None:
    agent, coordinator, slug = coordinated
    dyno_id = (unique("l", 8) + "-" + "x" * 64)[:64]
    assert len(dyno_id) == 64
    answer = coordinator.request("dyno.start", _spec(dyno_id, 1, slug))
    assert "p" in answer, answer

    def up() -> dict[str, object] | None:
        status = agent.api("GET", f"/v1/dynos/{dyno_id}")
        return status if status["state"] == "up" else None  # type: ignore[no-any-return]
    status = wait_for(up, 30, what="the 64-character dyno up")
    netns = str(status["netns"])
    name = Path(netns).name
    assert len(name) <= 64 and Path(netns).exists()
    assert name.startswith("dyno-" + dyno_id[:30])
    assert f"dyno-{dyno_id}.scope" in str(status["cgroup"])
    result = coordinator.request("dynos.sync", {"generation": 1, "dynos": []})
    assert result["p"]["removed"] == [dyno_id] and result["p"]["failed"] == [], result
    wait_for(lambda: not _leftovers(agent, [name], [dyno_id]), 20,
             what=f"nothing left of {dyno_id}")


def _poll(socket: Path, stop: threading.Event, out: list[tuple[float, float]]) -> None:
    while not stop.is_set():
        began = time.monotonic()
        try:
            conn = UnixHTTPConnection(socket, 10)
            conn.request("GET", "/v1/info")
            conn.getresponse().read()
            conn.close()
            took = time.monotonic() - began
        except (OSError, http.client.HTTPException):
            took = float("inf")
        out.append((began, took))
        stop.wait(0.05)


def test_a_sync_to_zero_keeps_the_api_answering_and_reports_every_removal(
        coordinated: tuple[AgentProcess, CoordinatorThread, Path]) -> None:
    agent, coordinator, slug = coordinated
    prefix = unique("m", 6)
    specs = [_spec(f"{prefix}-{n}", n, slug) for n in range(1, MASS_DYNOS + 1)]
    ids = sorted(str(s["id"]) for s in specs)
    started = coordinator.request("dynos.sync", {"generation": 1, "dynos": specs},
                                  timeout_s=120)["p"]
    assert started["failed"] == [] and sorted(started["started"]) == ids

    def all_up() -> bool:
        return sum(d["state"] == "up" for d in agent.api("GET", "/v1/dynos")) == MASS_DYNOS
    wait_for(all_up, 120, interval_s=0.5, what=f"{MASS_DYNOS} dynos up")
    netns_names = [Path(str(agent.api("GET", f"/v1/dynos/{i}")["netns"])).name for i in ids]

    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    poller = threading.Thread(target=_poll, args=(agent.socket, stop, samples))
    poller.start()
    try:
        wait_for(lambda: len(samples) >= 3, 10, what="polls before the sync")
        began = time.monotonic()
        report = coordinator.request("dynos.sync", {"generation": 2, "dynos": []},
                                     timeout_s=120)["p"]
        answered = time.monotonic() - began
        count = len(samples)
        wait_for(lambda: len(samples) > count, 10, what="a poll after the answer")
    finally:
        stop.set()
        poller.join()
    during = sorted(took for at, took in samples if began - 0.05 <= at <= began + answered)
    p99 = during[min(len(during) - 1, int(len(during) * 0.99))] if during else 0.0
    print(f"sync to 0 of {MASS_DYNOS} dynos answered in {answered:.2f}s; "
          f"{len(during)} polls meanwhile: p50 {during[len(during) // 2] * 1e3:.1f} ms, "
          f"p99 {p99 * 1e3:.1f} ms, max {during[-1] * 1e3:.1f} ms")
    assert report["failed"] == [], report["failed"][:3]
    assert sorted(report["removed"]) == ids
    assert agent.api("GET", "/v1/dynos") == []
    assert during and during[-1] <= MAX_API_STALL_S, during[-5:]
    wait_for(lambda: not _leftovers(agent, netns_names, ids), 120, interval_s=0.5,
             what="nothing left of the removed dynos")
