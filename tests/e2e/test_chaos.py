"""Issue 12 end to end: thirty rounds of random operator actions against the real daemon, with
the daemon SIGKILLed and the holder SIGKILLed at random moments (once during a burst of
launches with restarts at once). What must hold: no dyno lost, none running twice, no process
left outside a known dyno, no kernel object left once everything is deleted and the agent
stopped, every API answer within a second while the agent runs, and a holder's death costing
each dyno one uncounted restart within five seconds. The seed is printed; CHAOS_SEED=N replays
the same actions (the moments they meet inside the agent still vary)."""

from __future__ import annotations

import glob
import http.client
import json
import os
import random
import secrets
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.e2e.test_supervision import _processes_mentioning, agent_in_host, spec
from tests.support.agentproc import AgentProcess, ApiError, write_config
from tests.support.names import unique
from tests.support.testhost import TestHost, new_test_host
from tests.support.wait import wait_for

ROUNDS = 30
API_ANSWER_S = 1.0
UP_AGAIN_S = 5.0
CONVERGE_S = 15.0
MAX_WORKERS = 4
MAX_WEB = 2
BURST = 6
AGENT_KILL_CHANCE = 0.3
HOLDER_KILL_CHANCE = 0.2
# Where in a round (seconds after its actions begin) a kill may land: while they are in flight.
KILL_WINDOW_S = 0.2
# Not what is tested here: a loaded two-core host must not turn a slow boot into an R10 crash,
# and fewer runtime-metrics lines keep a round's log small.
CHAOS_CONFIG: dict[str, Any] = {"boot_timeout_s": 15, "sample_interval_s": 10}

WEB_COMMAND = "python3 /app/server.py"
WORKER_COMMAND = "echo ready; while :; do sleep 2; echo tick; done"
DYNO_ID_VAR = b"DYNOAGENT_DYNO_ID="
# Failures of a request to an agent that is being killed: its outcome is unknown.
CUT_OFF = (OSError, http.client.HTTPException)


@dataclass
class Wanted:
    """A dyno the test wants, and whether it wants it running (`up`) or stopped (`down`)."""

    id: str
    name: str
    running: bool = True

    @property
    def kind(self) -> str:
        return self.name.split(".")[0]

    @property
    def state(self) -> str:
        return "up" if self.running else "down"


@dataclass
class Op:
    """One operator action; `call` is safe to repeat (replayed when the agent died under it)."""

    label: str
    call: Callable[[], None]
    error: BaseException | None = None
    done: bool = False


@dataclass(frozen=True)
class DynoProcess:
    pid: int
    ppid: int
    dyno_id: str
    cgroup: str


def dyno_processes(id_prefix: str) -> list[DynoProcess]:
    """Every live process (zombies aside) whose environment names a dyno of this test: every
    dyno process inherits DYNOAGENT_DYNO_ID, whichever cgroup or parent it ended up with."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            stat = (entry / "stat").read_text()
            cgroup = (entry / "cgroup").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):
            continue
        for var in environ.split(b"\0"):
            if var.startswith(DYNO_ID_VAR + id_prefix.encode()):
                found.append(DynoProcess(int(entry.name), int(fields[1]),
                                         var[len(DYNO_ID_VAR):].decode(), cgroup))
    return found


def holder_pids(agent: AgentProcess) -> list[int]:
    """The agent's holder (two while one replaces another): a child it forks for a launch
    has the same command line until it execs, so only the topmost ones count."""
    mentioning = _processes_mentioning(f"{agent.base}/run/holder.sock")
    return [pid for pid in mentioning if parent_of(pid) not in mentioning]


class ApiProbe:
    """GETs the dyno list on a thread while the agent is meant to be running; the slowest
    answer, every failure, and every state seen. `pause()` before killing the agent and
    `resume()` once it is ready again: a request that overlaps a pause does not count."""

    def __init__(self, agent: AgentProcess, app: str) -> None:
        self.agent = agent
        self.app = app
        self.slowest_s = 0.0
        self.answers = 0
        self.failures: list[str] = []
        self.states: dict[str, set[str]] = {}
        self._lock = threading.Lock()
        self._live = True
        self._generation = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def pause(self) -> None:
        with self._lock:
            self._live = False
            self._generation += 1

    def resume(self) -> None:
        with self._lock:
            self._live = True
            self._generation += 1

    def _window(self) -> tuple[bool, int]:
        with self._lock:
            return self._live, self._generation

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            live, generation = self._window()
            if not live:
                continue
            started = time.monotonic()
            listed: list[dict[str, Any]] = []
            failure = None
            try:
                listed = self.agent.api("GET", f"/v1/dynos?app={self.app}",
                                        timeout_s=API_ANSWER_S * 5)
            except Exception as exc:  # recorded, asserted on by the test
                failure = repr(exc)
            took_s = time.monotonic() - started
            if self._window() != (True, generation):
                continue
            self.answers += 1
            self.slowest_s = max(self.slowest_s, took_s)
            if failure is not None:
                self.failures.append(failure)
            for status in listed:
                self.states.setdefault(status["id"], set()).add(status["state"])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


@dataclass
class Chaos:
    """The test's model of what it wants, the actions that change it, the kills, and the
    checks of what must hold."""

    agent: AgentProcess
    host: TestHost
    app: str
    slug: Path
    rng: random.Random
    probe: ApiProbe
    tag: str = field(default_factory=lambda: unique("c", 6))
    wanted: dict[str, Wanted] = field(default_factory=dict)
    created: list[str] = field(default_factory=list)
    agent_kills: int = 0
    holder_kills: int = 0
    holder_recoveries_s: list[float] = field(default_factory=list)
    replays: int = 0
    # Set while actions cut off by an agent kill are asked again: a delete may find it done.
    replaying: bool = False

    # -- actions -----------------------------------------------------------------------------
    def _new_id(self) -> str:
        dyno_id = f"{self.tag}-{len(self.created) + 1}"
        self.created.append(dyno_id)
        return dyno_id

    def create(self, name: str) -> Op:
        dyno_id = self._new_id()
        self.wanted[dyno_id] = Wanted(dyno_id, name)
        command = WEB_COMMAND if name.startswith("web.") else WORKER_COMMAND
        body = spec(self.app, name, command, self.slug, id=dyno_id)
        return Op(f"create {name} {dyno_id}",
                  lambda: self.agent.api("POST", "/v1/dynos", body, expect=201))

    def delete(self, dyno_id: str) -> Op:
        name = self.wanted.pop(dyno_id).name

        def call() -> None:
            try:
                self.agent.api("DELETE", f"/v1/dynos/{dyno_id}", expect=204, timeout_s=30)
            except ApiError as exc:
                if exc.status != 404 or not self.replaying:
                    raise
        return Op(f"delete {name} {dyno_id}", call)

    def command(self, dyno_id: str, verb: str) -> Op:
        self.wanted[dyno_id].running = verb == "restart"
        return Op(f"{verb} {self.wanted[dyno_id].name} {dyno_id}",
                  lambda: self.agent.api("POST", f"/v1/dynos/{dyno_id}/{verb}", timeout_s=30))

    def of_kind(self, kind: str) -> list[Wanted]:
        return sorted((w for w in self.wanted.values() if w.kind == kind),
                      key=lambda w: int(w.name.split(".")[1]))

    def scale(self, kind: str, count: int, touched: set[str]) -> list[Op]:
        """Heroku's scale as the coordinator does it: create the lowest free numbers, delete
        the highest. `touched`: ids and names that other actions of the round act on."""
        have = self.of_kind(kind)
        ops = []
        if count > len(have):
            used = {int(w.name.split(".")[1]) for w in have}
            free = (n for n in range(1, 100) if n not in used and f"{kind}.{n}" not in touched)
            ops = [self.create(f"{kind}.{next(free)}") for _ in range(count - len(have))]
        else:
            ops = [self.delete(w.id) for w in have[count:] if w.id not in touched]
        return ops

    def pick_ops(self) -> list[Op]:
        """One to three actions on distinct dynos, drawn from the seeded generator."""
        rng = self.rng
        ops: list[Op] = []
        touched: set[str] = set()
        scaled_types: set[str] = set()
        for kind in rng.choices(["scale-worker", "scale-web", "restart", "stop", "delete"],
                                weights=[3, 1, 3, 2, 1], k=rng.choice([1, 1, 2, 2, 3])):
            if kind.startswith("scale-"):
                process_type = kind.split("-")[1]
                top = MAX_WORKERS if process_type == "worker" else MAX_WEB
                if process_type in scaled_types:
                    continue
                scaled_types.add(process_type)
                scaled = self.scale(process_type, rng.randint(0, top), touched)
                for op in scaled:
                    touched.update(op.label.split()[1:])
                ops += scaled
                continue
            pool = sorted(i for i, w in self.wanted.items() if i not in touched
                          and (w.running or kind != "stop"))
            if not pool:
                continue
            target = rng.choice(pool)
            touched.update((target, self.wanted[target].name))
            ops.append(self.delete(target) if kind == "delete" else self.command(target, kind))
        return ops

    @staticmethod
    def run_op(op: Op) -> None:
        try:
            op.call()
            op.done = True
        except BaseException as exc:  # judged by the round: cut off by a kill, or a failure
            op.error = exc

    # -- kills -------------------------------------------------------------------------------
    def kill_agent(self) -> None:
        assert self.agent.proc is not None
        self.probe.pause()
        self.agent.proc.kill()
        self.agent.wait(10)
        self.agent_kills += 1

    def start_agent(self) -> float:
        self.agent.start()
        self.probe.resume()
        return time.monotonic()

    def kill_holder(self) -> int | None:
        holders = holder_pids(self.agent)
        if not holders:
            return None
        assert len(holders) == 1, f"several holders: {holders}"
        os.kill(holders[0], signal.SIGKILL)
        self.holder_kills += 1
        return holders[0]

    # -- a round -----------------------------------------------------------------------------
    def play(self, ops: list[Op], agent_kill_at_s: float | None,
             holder_kill_at_s: float | None) -> tuple[int | None, float, float | None]:
        """Run `ops` at once and the kills at their moments; restart the agent if it was
        killed and replay what it may not have done. Returns the killed holder's pid, when it
        was killed, and when the agent was ready again (monotonic)."""
        moments = sorted([(at, "agent") for at in [agent_kill_at_s] if at is not None]
                         + [(at, "holder") for at in [holder_kill_at_s] if at is not None])
        old_holder: int | None = None
        holder_killed_at = 0.0
        with ThreadPoolExecutor(max(1, len(ops))) as pool:
            begun = time.monotonic()
            futures = [pool.submit(self.run_op, op) for op in ops]
            for at, what in moments:
                time.sleep(max(0.0, begun + at - time.monotonic()))  # a moment, not a wait
                if what == "agent":
                    self.kill_agent()
                else:
                    old_holder = self.kill_holder()
                    holder_killed_at = time.monotonic()
            for future in futures:
                future.result()
        ready_at = None
        if agent_kill_at_s is not None:
            ready_at = self.start_agent()
            self.replaying = True
            try:
                for op in ops:
                    if not op.done:
                        # Cut off by the kill: its outcome is unknown, so it is asked again.
                        assert op.error is None or isinstance(op.error, CUT_OFF), \
                            f"{op.label}: {op.error!r}"
                        self.replays += 1
                        op.error = None
                        op.call()
            finally:
                self.replaying = False
        for op in ops:
            assert op.error is None, f"{op.label} failed with the agent running: {op.error!r}"
        return old_holder, holder_killed_at, ready_at

    def round(self, number: int) -> None:
        rng = self.rng
        ops = self.pick_ops()
        agent_kill = rng.uniform(0, KILL_WINDOW_S) if rng.random() < AGENT_KILL_CHANCE else None
        holder_kill = rng.uniform(0, KILL_WINDOW_S) if rng.random() < HOLDER_KILL_CHANCE \
            else None
        print(f"round {number}: {[op.label for op in ops]} agent kill {agent_kill} "
              f"holder kill {holder_kill}")
        old_holder, killed_at, ready_at = self.play(ops, agent_kill, holder_kill)
        if old_holder is not None:
            self.check_back_after_holder_loss(old_holder, max(killed_at, ready_at or 0.0))
        self.check_converged(f"round {number}")

    def burst_round(self, number: int) -> None:
        """Restarts at once from now on (Heroku's private spaces): the agent is SIGKILLed and
        started on that configuration, then a burst of launches meets the holder's death."""
        self.kill_agent()
        self.agent.settings["restart_schedule_s"] = "none"
        write_config(self.agent.config_path, self.agent.settings)
        self.start_agent()
        self.check_converged(f"round {number}, restarts at once")
        ops = self.scale("worker", len(self.of_kind("worker")) + BURST, set())
        holder_kill = self.rng.uniform(0.02, 0.3)
        print(f"round {number}: burst {[op.label for op in ops]} holder kill {holder_kill}")
        old_holder, killed_at, _ = self.play(ops, None, holder_kill)
        assert old_holder is not None
        self.check_back_after_holder_loss(old_holder, killed_at)
        self.check_converged(f"round {number}, burst")

    # -- what must hold ----------------------------------------------------------------------
    def listing(self) -> dict[str, dict[str, Any]]:
        return {s["id"]: s for s in self.agent.api("GET", "/v1/dynos", timeout_s=10)}

    def check_back_after_holder_loss(self, old_holder: int, since: float) -> None:
        """Every dyno that should run is `up` again under a new holder within UP_AGAIN_S of
        the holder's death (or of the agent's return, when it was dead too), uncounted."""
        deadline = since + UP_AGAIN_S
        new_holders: list[int] = []

        def all_back() -> bool:
            new_holders[:] = [p for p in holder_pids(self.agent) if p != old_holder]
            if len(new_holders) != 1:
                return False
            listed = self.listing()
            return all(
                w.id in listed and listed[w.id]["state"] == "up"
                and listed[w.id]["pid"] is not None
                and parent_of(listed[w.id]["pid"]) == new_holders[0]
                for w in self.wanted.values() if w.running)
        back = all_back()
        while not back and time.monotonic() < deadline:
            time.sleep(0.05)
            back = all_back()
        took_s = time.monotonic() - since
        listed = self.listing()
        assert back, (
            f"not every dyno up under a new holder {took_s:.1f}s after the holder's death: "
            f"holders {holder_pids(self.agent)} (killed {old_holder}); "
            + "; ".join(f"{w.name} {w.id}: {_brief(listed.get(w.id))} parent "
                        f"{parent_of(listed.get(w.id, {}).get('pid'))}"
                        for w in self.wanted.values() if w.running))
        self.holder_recoveries_s.append(took_s)
        self.check_no_crash("after the holder's death")

    def check_no_crash(self, when: str) -> None:
        for dyno_id in sorted(self.wanted):
            status = self.agent.api("GET", f"/v1/dynos/{dyno_id}", timeout_s=10)
            assert status["crashes"] == 0 and status["state"] != "crashed", \
                f"{when}: a crash counted against {dyno_id}: {_brief(status)}"
        crashed = [line["line"] for line in self.log_lines()
                   if line["source"] == "agent" and line["text"].endswith(" to crashed")]
        assert not crashed, f"{when}: {crashed[:5]}"

    def log_lines(self) -> list[dict[str, str]]:
        text = self.agent.api("GET", f"/v1/logs?app={self.app}&tail=1500&format=json") or ""
        return [json.loads(line) for line in text.splitlines() if line]

    def mismatch(self) -> str:
        """How the agent's dynos differ from the wanted ones ('' when they match)."""
        listed = self.listing()
        problems = [f"lost {w.name} {w.id}" for w in self.wanted.values() if w.id not in listed]
        problems += [f"unwanted {_brief(s)}" for i, s in listed.items() if i not in self.wanted]
        for w in self.wanted.values():
            status = listed.get(w.id)
            if status is not None and (status["state"] != w.state
                                       or (status["pid"] is not None) != w.running):
                problems.append(f"{w.name} {w.id} wanted {w.state}: {_brief(status)}")
        return "; ".join(problems)

    def describe(self) -> str:
        """What the agent says of each wanted dyno, with its last lines (for a failure)."""
        lines = self.log_lines()
        said = []
        for dyno_id in sorted(self.wanted):
            try:
                status = self.agent.api("GET", f"/v1/dynos/{dyno_id}", timeout_s=10)
            except (ApiError, *CUT_OFF) as exc:
                said.append(f"{dyno_id}: {exc!r}")
                continue
            said.append(_brief(status) + f" ip={status['ip']} cgroup={status['cgroup']}")
            said += [f"    {line['line']}" for line in lines if line["id"] == dyno_id][-12:]
        return "\n".join(said)

    def check_converged(self, when: str) -> None:
        """The agent's dynos are exactly the wanted ones, in their wanted states; each
        running one is one process tree (one PID 1, a child of the holder, in its own
        cgroup) and every other dyno has no process at all; no crash was counted."""
        try:
            wait_for(lambda: not self.mismatch(), CONVERGE_S, interval_s=0.05, what=when)
        except TimeoutError:
            raise AssertionError(f"{when}: {self.mismatch()}\n{self.describe()}") from None
        listed = self.listing()
        holders = holder_pids(self.agent)
        assert len(holders) == 1, f"{when}: holders {holders}"
        by_dyno: dict[str, list[DynoProcess]] = {}
        for process in dyno_processes(self.tag):
            by_dyno.setdefault(process.dyno_id, []).append(process)
        for dyno_id, processes in by_dyno.items():
            wanted = self.wanted.get(dyno_id)
            assert wanted is not None and wanted.running, \
                f"{when}: orphaned processes of {dyno_id}: {processes}"
            pids = {p.pid for p in processes}
            roots = [p for p in processes if p.ppid not in pids]
            assert [p.pid for p in roots] == [listed[dyno_id]["pid"]], \
                f"{when}: {wanted.name} {dyno_id} runs as {roots}, the agent says " \
                f"{listed[dyno_id]['pid']}"
            assert roots[0].ppid == holders[0], f"{when}: {roots[0]} not the holder's child"
            outside = [p for p in processes if f"/dyno-{dyno_id}.scope" not in p.cgroup]
            assert not outside, f"{when}: processes of {dyno_id} outside its cgroup: {outside}"
        running = {w.id for w in self.wanted.values() if w.running}
        assert set(by_dyno) == running, f"{when}: no process for {running - set(by_dyno)}"
        children = [int(p) for p in Path(f"/proc/{holders[0]}/task/{holders[0]}/children")
                    .read_text().split()]
        assert sorted(children) == sorted(listed[i]["pid"] for i in running), \
            f"{when}: the holder's children {children}"
        self.check_no_crash(when)

    def delete_all_and_stop(self) -> None:
        with ThreadPoolExecutor(8) as pool:
            ops = [self.delete(dyno_id) for dyno_id in sorted(self.wanted)]
            list(pool.map(lambda op: op.call(), ops))
        assert self.agent.api("GET", "/v1/dynos") == []
        try:
            wait_for(lambda: not dyno_processes(self.tag), 5, what="no dyno process")
        except TimeoutError:
            raise AssertionError(f"orphaned: {dyno_processes(self.tag)}") from None
        holders = holder_pids(self.agent)
        self.probe.pause()
        assert self.agent.stop(30) == 0
        for pid in holders:
            wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists(), 10,  # type: ignore[misc]
                     what=f"holder {pid} gone")

    def check_nothing_left(self) -> None:
        """After the last delete and the agent's stop: no process, cgroup, namespace, link,
        firewall table, mount or record of it remains."""
        base = str(self.agent.base)
        assert _processes_mentioning(base) == []
        assert dyno_processes(self.tag) == []
        root = self.agent.settings["cgroup_root"]
        assert glob.glob(f"/sys/fs/cgroup/*/{root}") + glob.glob(f"/sys/fs/cgroup/{root}") == []

        def netns_left() -> list[str]:
            return [i for i in self.created if Path(f"/run/netns/dyno-{i}").exists()]
        try:
            # Namespace deletion is deferred off the critical path; it still must happen.
            wait_for(lambda: not netns_left(), 10, what="dyno netns removed")
        except TimeoutError:
            raise AssertionError(f"netns left: {netns_left()}") from None
        # The test host was made for this agent alone: only its loopback is left.
        links = self.host.run("ip", "-o", "link").stdout.splitlines()
        assert [line.split(":")[1].strip() for line in links] == ["lo"], links
        tables = self.host.run("nft", "list", "tables").stdout
        assert tables.strip() == "", tables
        mounts = Path("/proc/self/mountinfo").read_text()
        assert base not in mounts
        assert not any(f"dyno-{i}" in mounts for i in self.created)
        assert not list((self.agent.base / "state" / "dynos").glob("*.json"))


def parent_of(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _brief(status: dict[str, Any] | None) -> str:
    if status is None:
        return "absent"
    return " ".join(f"{k}={status.get(k)}" for k in ("name", "id", "state", "reason", "pid",
                                                     "restarts", "crashes", "exit_status"))


def test_chaos_rounds_lose_double_orphan_and_leak_nothing(slug: Path) -> None:
    seed = int(os.environ.get("CHAOS_SEED") or secrets.randbelow(2**32))
    print(f"CHAOS_SEED={seed}")
    rng = random.Random(seed)
    burst_at = rng.randint(ROUNDS // 3, 2 * ROUNDS // 3)
    app = unique("t", 8)
    started = time.monotonic()
    with new_test_host() as host, agent_in_host(host, **CHAOS_CONFIG) as agent:
        probe = ApiProbe(agent, app)
        chaos = Chaos(agent, host, app, slug, rng, probe)
        try:
            for number in range(1, ROUNDS + 1):
                if number == burst_at:
                    chaos.burst_round(number)
                else:
                    chaos.round(number)
            chaos.delete_all_and_stop()
            chaos.check_nothing_left()
        except BaseException as exc:
            exc.add_note(f"CHAOS_SEED={seed}")
            raise
        finally:
            probe.close()
    recoveries = chaos.holder_recoveries_s
    print(f"CHAOS_SEED={seed}: {ROUNDS} rounds in {time.monotonic() - started:.1f}s, "
          f"{len(chaos.created)} dynos created, {chaos.agent_kills} agent kills "
          f"({chaos.replays} actions replayed), {chaos.holder_kills} holder kills (back in "
          f"{max(recoveries, default=0):.2f}s at most), {probe.answers} API answers, slowest "
          f"{probe.slowest_s:.3f}s")
    assert not probe.failures, f"CHAOS_SEED={seed}: {probe.failures[:3]}"
    assert probe.slowest_s < API_ANSWER_S, \
        f"CHAOS_SEED={seed}: the API took {probe.slowest_s:.2f}s"
    assert chaos.holder_kills >= 1 and chaos.agent_kills >= 2
    for dyno_id, states in probe.states.items():
        assert "crashed" not in states, f"CHAOS_SEED={seed}: {dyno_id} seen {states}"
