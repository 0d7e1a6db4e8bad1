"""The real daemon in a test host: a dyno with a 64-character id (its namespace name is
bounded) starts, runs and leaves nothing behind; and a `dynos.sync` from many dynos to none
keeps the operator API answering and reports every removal truthfully."""

from __future__ import annotations

import http.client
import os
import threading
import time
from pathlib import Path

from tests.e2e.conftest import Coordinated
from tests.support.agentproc import AgentProcess, UnixHTTPConnection
from tests.support.names import unique
from tests.support.wait import wait_for

# 150 in `make test`; MASS_DYNOS=1000 for the full scale (give pytest `-o timeout=1500`).
MASS_DYNOS = int(os.environ.get("MASS_DYNOS", "150"))
# A space is a /24: a few hundred dynos each, so a thousand need several.
DYNOS_PER_SPACE = 200
# Waits that grow with the count: starting a thousand dynos takes minutes on this machine.
SCALE_WAIT_S = max(120.0, MASS_DYNOS * 0.6)
# The operator API's answers from the sync until nothing of the dynos is left. Issue 19 asks
# for a p99 of at most 100 ms: with the exit handling bounded to a few dynos at a time
# (agent.supervision.dyno.MAX_CONCURRENT_EXITS) and the teardown after the answer, it
# measured well under that on this 2-core machine (the README's performance table has the
# figures, at 150 and at 1,000 dynos). The bound leaves room for a loaded CI machine.
MAX_API_P99_S = 0.25
MAX_API_STALL_S = 1.0
# Pollers of `GET /v1/info` and their pause between requests: enough answers in a deletion of
# a second or two for a p99 that means something.
POLLERS = 3
POLL_PAUSE_S = 0.01


def _spec(dyno_id: str, n: int, slug: Path) -> dict[str, object]:
    return {"id": dyno_id, "app": "names", "space": f"names-{n // DYNOS_PER_SPACE}",
            "name": f"worker.{n}", "command": "sleep 1000",
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
        coordinated: Coordinated) -> None:
    agent, coordinator, slug = coordinated.agent, coordinated.coordinator, coordinated.slug
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
        stop.wait(POLL_PAUSE_S)


def _distribution(label: str, took: list[float]) -> str:
    took = sorted(took)
    if not took:
        return f"{label}: no polls"

    def at(q: float) -> float:
        return took[min(len(took) - 1, int(len(took) * q))] * 1e3
    return (f"{label}: {len(took)} polls, p50 {at(0.5):.1f} ms, p90 {at(0.9):.1f} ms, "
            f"p99 {at(0.99):.1f} ms, max {took[-1] * 1e3:.1f} ms")


def test_a_sync_to_zero_keeps_the_api_answering_and_reports_every_removal(
        coordinated: Coordinated) -> None:
    agent, coordinator, slug = coordinated.agent, coordinated.coordinator, coordinated.slug
    prefix = unique("m", 6)
    specs = [_spec(f"{prefix}-{n}", n, slug) for n in range(1, MASS_DYNOS + 1)]
    ids = sorted(str(s["id"]) for s in specs)
    started = coordinator.request("dynos.sync", {"generation": 1, "dynos": specs},
                                  timeout_s=SCALE_WAIT_S)["p"]
    assert started["failed"] == [] and sorted(started["started"]) == ids

    def all_up() -> bool:
        return sum(d["state"] == "up" for d in agent.api("GET", "/v1/dynos")) == MASS_DYNOS
    wait_for(all_up, SCALE_WAIT_S, interval_s=0.5, what=f"{MASS_DYNOS} dynos up")
    netns_names = [Path(str(agent.api("GET", f"/v1/dynos/{i}")["netns"])).name for i in ids]

    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    pollers = [threading.Thread(target=_poll, args=(agent.socket, stop, samples))
               for _ in range(POLLERS)]
    for poller in pollers:
        poller.start()
    try:
        wait_for(lambda: len(samples) >= 3, 10, what="polls before the sync")
        began = time.monotonic()
        report = coordinator.request("dynos.sync", {"generation": 2, "dynos": []},
                                     timeout_s=SCALE_WAIT_S)["p"]
        answered = time.monotonic() - began
        # The namespaces go after the answer, off the critical path: still a mass delete.
        wait_for(lambda: not _leftovers(agent, netns_names, ids), SCALE_WAIT_S, interval_s=0.2,
                 what="nothing left of the removed dynos")
        cleaned = time.monotonic() - began
        count = len(samples)
        wait_for(lambda: len(samples) > count, 10, what="a poll after the clean-up")
    finally:
        stop.set()
        for poller in pollers:
            poller.join()
    sync = [took for at, took in samples if began <= at <= began + answered]
    during = [took for at, took in samples if began <= at <= began + cleaned]
    print(f"\nsync to 0 of {MASS_DYNOS} dynos answered in {answered:.2f}s, nothing left after "
          f"{cleaned:.2f}s\n" + _distribution("  until the answer", sync) + "\n"
          + _distribution("  until nothing left", during))
    assert report["failed"] == [], report["failed"][:3]
    assert sorted(report["removed"]) == ids
    assert agent.api("GET", "/v1/dynos") == []
    during.sort()
    assert len(during) >= 20, len(during)
    p99 = during[min(len(during) - 1, int(len(during) * 0.99))]
    assert p99 <= MAX_API_P99_S and during[-1] <= MAX_API_STALL_S, during[-5:]
