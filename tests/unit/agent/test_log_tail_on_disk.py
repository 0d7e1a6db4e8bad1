"""Each app's log tail on disk: kept across an agent restart, bounded at twice the tail length,
output the holder sends again published once, and the tails of apps gone from the host
removed after a while or beyond a total cap."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent.holder import HeldProcess, OutputEvent
from agent.observability.logs import LogHub, LogLine
from agent.observability.logtail import TailFile, TailStore, tails_to_remove
from tests.unit.agent.fakes import make_harness

T0 = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)


def out(app: str, n: int, dyno: str = "web.1") -> LogLine:
    return LogLine.output(T0 + timedelta(milliseconds=n), app, dyno, f"line {n}", "d-1")


def texts(hub: LogHub, app: str | None = None, n: int | None = None) -> list[str]:
    return [line.text for line in hub.tail(app, n=n)]


def restarted_hub(directory: Path, tail_lines: int = 10) -> LogHub:
    hub = LogHub(tail_lines=tail_lines)
    hub.keep_on_disk(TailStore(directory, tail_lines=tail_lines))
    return hub


def test_a_new_hub_shows_the_lines_an_earlier_one_published(tmp_path: Path) -> None:
    first = restarted_hub(tmp_path)
    for n in range(25):
        first.publish(out("shop", n), origin=("d-1", 1000, n))
    first.publish(LogLine.agent(T0 + timedelta(seconds=1), "blog", "web.1", "State changed "
                                "from starting to up", "d-2"))
    # No close: a SIGKILLed agent closes nothing.
    second = restarted_hub(tmp_path)
    assert texts(second, "shop") == [f"line {n}" for n in range(15, 25)]
    assert texts(second, "blog") == ["State changed from starting to up"]
    # Across apps in time order, as `logs` without -a shows them.
    assert texts(second, n=2) == ["line 24", "State changed from starting to up"]


def test_any_text_comes_back_as_it_was(tmp_path: Path) -> None:
    odd = ["tab\there", '"quoted" first', "ünïcode ✓", "back\\slash", "\x1b[31mred\x1b[0m",
           "lone \udcff surrogate", "", "  spaces  "]
    first = restarted_hub(tmp_path)
    for n, text in enumerate(odd):
        first.publish(LogLine.output(T0 + timedelta(microseconds=n), "shop", "web.1", text,
                                     "d-1"))
    back = restarted_hub(tmp_path).tail("shop")
    assert [line.text for line in back] == odd
    assert [line.at for line in back] == [T0 + timedelta(microseconds=n)
                                          for n in range(len(odd))]


def test_disk_use_is_at_most_twice_the_tail_length(tmp_path: Path) -> None:
    hub = restarted_hub(tmp_path)
    for n in range(1005):
        hub.publish(out("shop", n))
    kept = sum(len(p.read_bytes().splitlines()) for p in tmp_path.glob("shop.log*"))
    assert 10 <= kept <= 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shop.log", "shop.log.1"]


def test_a_new_hub_knows_how_far_each_process_output_was_kept(tmp_path: Path) -> None:
    first = restarted_hub(tmp_path)
    for n in range(5):
        first.publish(out("shop", n), origin=("d-1", 1000, n))
    first.publish(out("shop", 9), origin=("d-1", 2000, 0))
    second = restarted_hub(tmp_path)
    assert (second.output_seen("d-1", 1000), second.output_seen("d-1", 2000),
            second.output_seen("d-1", 3000)) == (5, 1, 0)


async def test_output_the_holder_sends_a_new_agent_again_is_published_once(
        tmp_path: Path) -> None:
    first = await make_harness(tmp_path)
    first.hub.keep_on_disk(TailStore(tmp_path / "logs"))
    try:
        dyno_id = await first.create("worker.1")
        await first.state(dyno_id, "up")
        pid = first.supervisor.dynos[dyno_id].record.pid
        assert pid is not None
        now = time.time()
        sent = [(now, f"line {n}\n".encode()) for n in range(6)]
        first.supervisor.on_holder_event(OutputEvent(dyno_id, pid, 0, 0, tuple(sent[:4])))
    finally:
        await first.supervisor.detach_all()  # as good as a SIGKILL: the process lives on

    second = await make_harness(tmp_path)
    second.hub.keep_on_disk(TailStore(tmp_path / "logs"))
    second.runtime.procs[dyno_id] = first.runtime.procs[dyno_id]
    try:
        second.supervisor.restore([HeldProcess(dyno_id, "launch", pid, 1, True, None, None,
                                               0, 0, 0, None)])
        # Lines 2 and 3 were never acknowledged: the holder sends them again, with 4 and 5.
        second.supervisor.on_holder_event(OutputEvent(dyno_id, pid, 2, 0, tuple(sent[2:])))
        app_lines = [line.text for line in second.hub.tail("demo") if line.source == "app"]
        assert app_lines == [f"line {n}" for n in range(6)]
    finally:
        await second.supervisor.detach_all()


def test_a_line_cut_short_by_a_full_disk_is_skipped_not_fatal(tmp_path: Path) -> None:
    first = restarted_hub(tmp_path)
    first.publish(out("shop", 1))
    with (tmp_path / "shop.log").open("ab") as f:
        f.write(b'{"at":"2026-11-26T10:00:00+00:00","s":"app","d":"web.1"')
    second = restarted_hub(tmp_path)
    assert texts(second, "shop") == ["line 1"]
    second.publish(out("shop", 2))  # appended after the torn line: still readable
    assert texts(restarted_hub(tmp_path), "shop") == ["line 1", "line 2"]


def test_files_that_are_not_app_tails_are_ignored(tmp_path: Path) -> None:
    (tmp_path / "..evil.log").write_text("x\n")
    (tmp_path / "Upper.log").write_text("x\n")
    hub = restarted_hub(tmp_path)
    assert texts(hub) == []
    hub.publish(LogLine.agent(T0, "../x", "web.1", "nope"))
    assert not (tmp_path.parent / "x.log").exists()


def test_an_app_with_dynos_keeps_its_tail_one_without_them_for_a_while() -> None:
    day = 86400.0
    tails = [TailFile("live", 0.0, 10), TailFile("fresh", 10 * day - 60, 10),
             TailFile("stale", 2 * day, 10)]
    assert tails_to_remove(tails, {"live"}, now=10 * day, keep_s=7 * day) == ["stale"]
    assert tails_to_remove(tails, {"live", "stale"}, now=10 * day, keep_s=7 * day) == []


def test_beyond_the_cap_the_oldest_tails_without_dynos_go_first() -> None:
    tails = [TailFile("a", 3.0, 100), TailFile("b", 1.0, 100), TailFile("c", 2.0, 100),
             TailFile("live", 0.0, 10_000)]
    assert tails_to_remove(tails, {"live"}, now=5.0, keep_s=100.0, cap_bytes=150) == ["b", "c"]


def test_sweep_removes_the_tail_on_disk_and_in_memory(tmp_path: Path) -> None:
    hub = restarted_hub(tmp_path)
    hub.publish(out("gone", 1))
    hub.publish(out("live", 2))
    assert hub.sweep_tails({"gone", "live"}, now=T0.timestamp()) == []
    far = datetime.now(UTC).timestamp() + 8 * 86400
    assert hub.sweep_tails({"live"}, now=far) == ["gone"]
    assert texts(hub, "gone") == []
    assert not (tmp_path / "gone.log").exists()
    assert texts(restarted_hub(tmp_path)) == ["line 2"]
