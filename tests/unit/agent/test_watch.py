"""The running dyno's supervision as a pure step, on a fake clock (plain floats): boot (R10),
stop (R12), restart, cycling, memory (R14/R15), OOM kills and holder loss."""

from __future__ import annotations

import signal

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.supervision import watch
from agent.supervision.policy import Intent
from agent.supervision.states import DynoState, Reason
from agent.supervision.watch import (
    Asked,
    Command,
    Desire,
    Exited,
    KillAll,
    MarkUp,
    OomKilled,
    Probe,
    Probed,
    Sample,
    Sampled,
    Say,
    SignalAll,
    Tick,
    Transition,
)
from cgroups import Stats

MIB = 1024 * 1024
LIMITS = watch.Limits(name="web.1", dyno_id="d1", process_type="web", quota_bytes=512 * MIB,
                      kill_at=2.0, boot_timeout_s=60.0, sample_period_s=20.0,
                      stop_timeout_s=30.0)
WORKER = watch.Limits(name="worker.1", dyno_id="d2", process_type="worker",
                      quota_bytes=512 * MIB, kill_at=2.0, boot_timeout_s=60.0,
                      sample_period_s=20.0, stop_timeout_s=30.0)
DAY = 86400.0


def begin(limits: watch.Limits = LIMITS, state: DynoState = DynoState.STARTING,
          oom_kills: int = 0) -> tuple[watch.Watch, list[watch.Action]]:
    return watch.begin(limits, now=0.0, started_at=0.0, cycle_at=DAY, oom_base=0,
                       oom_kills=oom_kills, state=state)


def up_web() -> watch.Watch:
    w, _ = begin()
    watch.step(w, Tick(), 0.0)
    assert watch.step(w, Probed(True), 0.0) == [MarkUp()]
    return w


def said(actions: list[watch.Action]) -> list[str]:
    return [line for action in actions if isinstance(action, Say) for line in action.lines]


def kinds(actions: list[watch.Action]) -> list[type]:
    return [type(action) for action in actions]


def test_a_worker_is_up_as_soon_as_it_runs_and_never_probed() -> None:
    w, actions = begin(WORKER)
    assert actions == [MarkUp()] and w.up
    assert Probe() not in watch.step(w, Tick(), 0.0)


def test_a_web_dyno_is_up_once_its_port_accepts() -> None:
    w, actions = begin()
    assert actions == [] and not w.up
    assert watch.step(w, Tick(), 0.0) == [Probe()]
    assert watch.step(w, Probed(False), 0.0) == []
    # The next probe is due after the probe interval, not at once: nothing spins.
    assert w.deadline() == watch.BOOT_PROBE_INTERVAL_S
    assert watch.step(w, Tick(), 0.01) == []
    assert watch.step(w, Tick(), w.deadline()) == [Probe()]
    assert watch.step(w, Probed(True), w.deadline()) == [MarkUp()]
    assert w.up and not w.boot_pending


def test_r10_a_web_dyno_that_never_binds_is_killed_at_the_boot_timeout() -> None:
    w, _ = begin()
    now = 0.0
    while not w.stop_started:
        now = w.deadline()
        for action in watch.step(w, Tick(), now):
            if isinstance(action, Probe):
                actions = watch.step(w, Probed(False), now)
    assert 60.0 <= now <= 60.0 + watch.BOOT_PROBE_INTERVAL_S
    assert said(actions)[0].startswith("Error R10 (Boot timeout)")
    assert actions[-1] == KillAll() and w.intent is Intent.BOOT_TIMEOUT
    # Everything was sent: only the exit ends the wait (no more stop steps).
    assert not any(isinstance(a, (SignalAll, KillAll)) for a in watch.step(w, Tick(), now + 200))


def test_a_port_accepting_after_the_deadline_is_too_late() -> None:
    w, _ = begin()
    actions = watch.step(w, Probed(True), 60.5)
    assert KillAll() in actions and w.intent is Intent.BOOT_TIMEOUT


def test_restart_of_an_up_dyno_terms_every_process_then_r12_and_sigkill() -> None:
    w = up_web()
    actions = watch.step(w, Asked(Command.RESTART), 5.0)
    assert Transition(DynoState.STARTING, Reason.RESTART) in actions
    assert said(actions) == ["Restarting"]
    actions = watch.step(w, Tick(), 5.0)
    assert SignalAll(signal.SIGTERM) in actions
    assert said(actions) == ["Stopping all processes with SIGTERM"]
    assert w.deadline() == 20.0  # the next memory sample comes first
    assert not any(isinstance(a, KillAll) for a in watch.step(w, Tick(), 34.9))
    actions = watch.step(w, Tick(), 35.0)
    assert actions[-1] == KillAll()
    assert said(actions)[0].startswith("Error R12 (Exit timeout)")
    watch.step(w, Exited(137), 35.1)
    assert w.exited and w.intent is Intent.RESTART


def test_a_stop_during_a_restart_wins_and_a_restart_during_a_stop_runs_again() -> None:
    w = up_web()
    watch.step(w, Asked(Command.RESTART), 1.0)
    assert watch.step(w, Asked(Command.STOP), 1.0) == [Desire(running=False)]
    assert w.intent is Intent.STOP
    assert watch.step(w, Asked(Command.RESTART), 2.0) == [Desire(running=True)]
    assert w.intent is Intent.RESTART


def test_a_restart_after_a_delete_does_not_bring_the_dyno_back() -> None:
    w = up_web()
    watch.step(w, Asked(Command.DELETE), 1.0)
    assert watch.step(w, Asked(Command.RESTART), 2.0) == []
    assert w.intent is Intent.STOP and w.deleting


def test_an_oom_kill_is_r15_once_and_kills_the_whole_dyno() -> None:
    w = up_web()
    actions = watch.step(w, OomKilled(1, peak_bytes=1024 * MIB), 3.0)
    assert said(actions)[1] == "Error R15 (Memory quota vastly exceeded)"
    assert actions[-1] == KillAll() and w.intent is Intent.OOM and w.r15
    assert watch.step(w, OomKilled(2, peak_bytes=1024 * MIB), 3.1) == []
    watch.step(w, Exited(0), 3.2)
    outcome = watch.conclude(w, 2, 1024 * MIB)
    assert outcome.exit_status == 137 and outcome.oom_killed and outcome.lines == ()


def test_an_oom_kill_during_a_stop_keeps_the_stop_and_ends_its_grace() -> None:
    w = up_web()
    watch.step(w, Asked(Command.STOP), 1.0)
    watch.step(w, Tick(), 1.0)
    actions = watch.step(w, OomKilled(1), 2.0)
    assert actions[-1] == KillAll() and w.intent is Intent.STOP
    assert w.stop_steps == len(w.plan)


def test_an_oom_kill_from_before_the_process_ran_is_not_counted() -> None:
    w, _ = watch.begin(LIMITS, now=0.0, started_at=0.0, cycle_at=DAY, oom_base=3,
                       oom_kills=3, state=DynoState.UP)
    assert watch.step(w, OomKilled(3), 1.0) == []
    assert KillAll() in watch.step(w, OomKilled(4), 1.0)


def test_memory_samples_say_r14_once_per_period_and_r15_kills() -> None:
    w = up_web()
    over = Stats(memory_rss_bytes=600 * MIB, memory_swap_bytes=0, memory_cache_bytes=0)
    assert watch.step(w, Tick(), 20.0) == [Sample()]
    actions = watch.step(w, Sampled(over), 20.0)
    assert said(actions)[0].startswith("source=web.1 dyno=d1 sample#memory_total=600.00MB")
    assert said(actions)[-1] == "Error R14 (Memory quota exceeded)"
    assert "Error R14 (Memory quota exceeded)" not in said(watch.step(w, Sampled(over), 30.0))
    assert said(watch.step(w, Sampled(over), 40.0))[-1] == "Error R14 (Memory quota exceeded)"
    vast = Stats(memory_rss_bytes=1100 * MIB, memory_swap_bytes=0, memory_cache_bytes=0)
    actions = watch.step(w, Sampled(vast), 41.0)
    assert actions[-1] == KillAll() and w.intent is Intent.OOM


def test_a_sample_catches_an_oom_kill_the_watch_missed() -> None:
    w = up_web()
    stats = Stats(memory_rss_bytes=MIB, oom_kill_events=1, memory_peak_bytes=1024 * MIB)
    actions = watch.step(w, Sampled(stats), 20.0)
    assert "Error R15 (Memory quota vastly exceeded)" in said(actions)
    assert actions[-1] == KillAll()


def test_a_dyno_up_for_a_day_is_cycled() -> None:
    w = up_web()
    now = 0.0
    cycled: list[watch.Action] = []
    while not cycled:
        now = w.deadline()
        cycled = [a for a in watch.step(w, Tick(), now) if isinstance(a, Transition)]
    assert now == DAY
    assert cycled == [Transition(DynoState.STARTING, Reason.CYCLING)]
    assert w.intent is Intent.CYCLE


def test_an_exit_with_the_holder_is_the_platforms_doing_unless_we_were_stopping() -> None:
    w = up_web()
    watch.step(w, Exited(137, lost=True), 1.0)
    assert w.intent is Intent.HOLDER_LOST
    w = up_web()
    watch.step(w, Asked(Command.STOP), 1.0)
    watch.step(w, Exited(137, lost=True), 1.5)
    assert w.intent is Intent.STOP


def test_pid_1_killed_by_the_oom_killer_before_its_event_is_still_r15() -> None:
    w = up_web()
    watch.step(w, Exited(137), 5.0)
    outcome = watch.conclude(w, 1, None)
    assert outcome.oom_killed and outcome.exit_status == 137
    assert outcome.lines[1] == "Error R15 (Memory quota vastly exceeded)"
    w = up_web()
    watch.step(w, Exited(0), 5.0)
    assert watch.conclude(w, 0, None) == watch.Outcome(0, Intent.NONE, False, ())


EVENTS = st.one_of(
    st.builds(Exited, st.integers(0, 255), st.booleans()),
    st.builds(Asked, st.sampled_from(list(Command))),
    st.builds(OomKilled, st.integers(0, 3), st.none() | st.integers(0, 2**33)),
    st.builds(Probed, st.booleans()),
    st.builds(Sampled, st.none() | st.builds(
        Stats, memory_rss_bytes=st.integers(0, 2**31), oom_kill_events=st.integers(0, 3))),
    st.just(Tick()),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(EVENTS, st.floats(0, 100)), max_size=40), st.booleans())
def test_after_a_tick_the_next_deadline_is_in_the_future(
        events: list[tuple[watch.Event, float]], web: bool) -> None:
    """The shell waits until `deadline()` after a tick: were it ever at or before `now`, the
    shell would spin without waiting."""
    w, _ = begin(LIMITS if web else WORKER)
    now = 0.0
    for event, gap in events:
        if w.exited:
            break
        now += gap
        watch.step(w, event, now)
        watch.step(w, Tick(), now)
        assert w.deadline() > now


def test_a_stop_the_last_agent_began_goes_on_with_its_deadline() -> None:
    w, actions = watch.begin(LIMITS, now=100.0, started_at=0.0, cycle_at=DAY, oom_base=0,
                             oom_kills=0, state=DynoState.UP, intent=Intent.STOP,
                             stop_started=90.0)
    assert actions == [] and w.intent is Intent.STOP
    assert SignalAll(signal.SIGTERM) in watch.step(w, Tick(), 100.0)
    assert w.deadline() == 120.0  # R12 30 s after the first agent's SIGTERM
    assert watch.step(w, Tick(), 120.0)[-1] == KillAll()


def test_a_kill_the_last_agent_began_is_sent_again_at_once() -> None:
    w, actions = watch.begin(LIMITS, now=5.0, started_at=0.0, cycle_at=DAY, oom_base=0,
                             oom_kills=1, state=DynoState.UP, intent=Intent.OOM,
                             stop_started=4.0)
    assert actions == [KillAll()] and w.r15
    assert watch.step(w, OomKilled(1), 5.0) == []  # R15 was said by the last agent
    watch.step(w, Exited(0), 5.1)
    assert watch.conclude(w, 1, None).exit_status == 137


def test_samples_fall_due_on_the_tick_grid() -> None:
    """Dynos started at any time are sampled on multiples of SAMPLE_TICK_S: those due in
    the same tick wake together, on one timer."""
    w, _ = watch.begin(WORKER, now=3.1, started_at=3.1, cycle_at=DAY, oom_base=0,
                       oom_kills=0, state=DynoState.UP)
    assert w.deadline() == 23.25
    assert watch.step(w, Tick(), 23.27) == [watch.Sample()]
    assert w.next_sample == 43.5
    assert w.next_sample % watch.SAMPLE_TICK_S == 0
