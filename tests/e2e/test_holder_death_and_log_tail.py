"""The real daemon when the holder dies or the agent is SIGKILLed: the API keeps answering, the
holder's death costs no dyno a crash or a cool-off (even with restarts at once, Heroku's
private-space setting), and `logs -n` after an agent SIGKILL still has what came before it,
once."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.e2e.test_supervision import (
    TICKER,
    _processes_mentioning,
    agent_in_host,
    dyno,
    spec,
    wait_state,
)
from tests.support.agentproc import AgentProcess
from tests.support.names import unique
from tests.support.poller import Poller
from tests.support.testhost import new_test_host
from tests.support.wait import wait_for

API_ANSWER_S = 1.0
UP_AGAIN_S = 5.0


class ApiWatch(Poller):
    """Polls the operator API on a thread: the slowest answer, and every state seen."""

    def __init__(self, agent: AgentProcess, app: str) -> None:
        self.agent = agent
        self.app = app
        self.slowest_s = 0.0
        self.failures: list[str] = []
        self.states: dict[str, set[str]] = {}
        self.start()

    def poll(self) -> None:
        started = time.monotonic()
        try:
            listed = self.agent.api("GET", f"/v1/dynos?app={self.app}",
                                    timeout_s=API_ANSWER_S * 5)
        except Exception as exc:  # recorded, asserted on below
            self.failures.append(repr(exc))
            listed = []
        self.slowest_s = max(self.slowest_s, time.monotonic() - started)
        for status in listed:
            self.states.setdefault(status["id"], set()).add(status["state"])


def _holder_pids(agent: AgentProcess) -> list[int]:
    return _processes_mentioning(f"{agent.base}/run/holder.sock")


def test_holder_killed_during_a_burst_of_launches_costs_no_crash_and_no_answer(
        slug: Path) -> None:
    app = unique("t", 8)
    with new_test_host() as host, agent_in_host(host, restart_schedule_s="none") as agent:
        running = [agent.api("POST", "/v1/dynos", spec(app, f"worker.{n}", TICKER, slug),
                             expect=201)["id"] for n in range(1, 4)]
        first_pids = {dyno_id: wait_state(agent, dyno_id, "up")["pid"] for dyno_id in running}
        holders = _holder_pids(agent)
        assert len(holders) == 1, holders
        watch = ApiWatch(agent, app)
        try:
            # A burst of launches, and the holder killed while they are in flight.
            burst = []
            for n in range(4, 12):
                burst.append(agent.api("POST", "/v1/dynos", spec(app, f"worker.{n}", TICKER,
                                                                   slug), expect=201)["id"])
                if n == 7:
                    os.kill(holders[0], signal.SIGKILL)
            wait_for(lambda: [p for p in _holder_pids(agent) if p != holders[0]], 15,
                     what="a new holder")
            back_at = time.monotonic()
            ids = running + burst

            def all_up() -> bool:
                listed = {s["id"]: s for s in agent.api("GET", f"/v1/dynos?app={app}")}
                return all(listed[i]["state"] == "up" and listed[i]["pid"] is not None
                           for i in ids)
            wait_for(all_up, UP_AGAIN_S + 10, what="every dyno up again")
            took_s = time.monotonic() - back_at
        finally:
            watch.close()
        print(f"slowest API answer {watch.slowest_s:.3f}s; every dyno up {took_s:.2f}s after "
              "the holder was back")
        assert not watch.failures, watch.failures[:3]
        assert watch.slowest_s < API_ANSWER_S, f"the API took {watch.slowest_s:.2f}s"
        assert took_s < UP_AGAIN_S, f"up again {took_s:.1f}s after the holder was back"
        for dyno_id in ids:
            status = dyno(agent, dyno_id)
            assert status["crashes"] == 0, status
            assert "crashed" not in watch.states.get(dyno_id, set()), watch.states[dyno_id]
        for dyno_id in running:
            # Their processes went with the holder: restarted under the new one, said so.
            status = dyno(agent, dyno_id)
            assert status["pid"] != first_pids[dyno_id]
        assert len(_holder_pids(agent)) == 1
        said = agent.ctl("logs", "-a", app, "-n", "1500").stdout
        # Launches found the holder gone, and waited for it rather than crash.
        assert "the host's process holder is gone" in said
        assert "the host's process holder died with the process" in said


def test_logs_after_an_agent_sigkill_keep_the_lines_from_before_it_once(slug: Path) -> None:
    app = unique("t", 8)
    with new_test_host() as host, agent_in_host(host, sample_interval_s=60) as agent:
        dyno_id = agent.api("POST", "/v1/dynos", spec(app, "worker.1", TICKER, slug),
                            expect=201)["id"]
        wait_state(agent, dyno_id, "up")

        def ticks(lines: list[str]) -> list[int]:
            return [int(line.rsplit(" ", 1)[1]) for line in lines
                    if "app[worker.1]: tick " in line]

        def logs() -> list[str]:
            return agent.ctl("logs", "-a", app, "-n", "1500").stdout.splitlines()

        wait_for(lambda: len(ticks(logs())) >= 20, 15, what="20 ticks")
        before = logs()
        assert agent.proc is not None
        agent.proc.kill()
        agent.wait(10)
        agent.start()
        wait_for(lambda: ticks(logs()) and ticks(logs())[-1] > ticks(before)[-1] + 10, 15,
                 what="ticks after the restart")
        after = logs()
        # Everything shown before the SIGKILL is still there, in order ...
        assert after[:len(before)] == before
        assert "Starting process with command" in "\n".join(after[:5])
        # ... and the output of the agent's absence and after it comes once, with no gap.
        seen = ticks(after)
        assert seen == list(range(seen[0], seen[-1] + 1)), "duplicate or missing ticks"
        assert seen[0] == 1
        assert len(after) == len(set(after)), "a line shown twice"



def test_an_agent_stopped_while_it_starts_a_new_holder_ends_that_holder_too() -> None:
    """An idle agent ends its holder when it stops. A SIGTERM that arrives while the agent is
    starting a new holder (the last one died) must end that new one as well, not leave it."""
    with new_test_host() as host, agent_in_host(host) as agent:
        holders = _holder_pids(agent)
        assert len(holders) == 1, holders
        os.kill(holders[0], signal.SIGKILL)
        # The agent says so just before it runs the new holder: stop it right then.
        wait_for(lambda: agent.log().count("starting holder") >= 2, 15, interval_s=0.002,
                 what="a new holder being started")
        assert agent.stop() == 0
        wait_for(lambda: not _holder_pids(agent), 10, what="no holder left")
