"""The real holder process (plain backend): launch, output order, exits, buffering, reconnects."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

import psutil
import pytest

from agent.holder import PROTOCOL_VERSION
from agent.holder.client import ExitEvent, HolderClient, HolderEvent, OutputEvent, Superseded
from agent.holder.errors import (
    BadRequest,
    Conflict,
    ConnectionLost,
    HolderTimeout,
    LaunchFailed,
    NotFound,
)
from tests.support.wait import async_wait_for
from tests.unit.holder.harness import (
    ENV,
    HolderProc,
    collect,
    exits_of,
    lines_of,
    start_holder,
    stop_holder,
)


def launch_params(dyno_id: str, script: str) -> dict[str, object]:
    return {"dyno_id": dyno_id, "argv": ["sh", "-c", script], "env": ENV}


async def held(client: HolderClient, dyno_id: str) -> dict[str, object]:
    for proc in await client.list_processes():
        if proc.dyno_id == dyno_id:
            return vars(proc)
    return {}


async def test_ping_reports_protocol_and_backend(client: HolderClient) -> None:
    info = await client.ping()
    assert info["version"] == PROTOCOL_VERSION == 3
    assert info["backend"] == "plain"
    assert info["pid"] != os.getpid()


async def test_output_in_order_then_exit_status(client: HolderClient) -> None:
    script = "i=0; while [ $i -lt 300 ]; do echo out$i; echo err$i >&2; i=$((i+1)); done; exit 7"
    launched = await client.launch(launch_params("d-order", script))
    try:
        assert launched.pid > 0 and launched.start_time > 0
        events = await collect(client, lambda ev: bool(exits_of(ev)))
    finally:
        os.close(launched.pidfd)
    expected = [f"{s}{i}".encode() for i in range(300) for s in ("out", "err")]
    assert lines_of(events) == expected
    [exit_event] = exits_of(events)
    assert (exit_event.pid, exit_event.status, exit_event.signal) == (launched.pid, 7, None)
    assert isinstance(events[-1], ExitEvent), "exit must follow the last line"
    stamps = [ts for e in events if isinstance(e, OutputEvent) for ts, _ in e.lines]
    assert stamps == sorted(stamps) and abs(stamps[0] - time.time()) < 60


async def test_signal_death_is_128_plus_signal(client: HolderClient) -> None:
    launched = await client.launch(launch_params("d-sig", "echo up; exec sleep 60"))
    await collect(client, lambda ev: lines_of(ev) == [b"up"])
    signal.pidfd_send_signal(launched.pidfd, signal.SIGKILL)
    os.close(launched.pidfd)
    [exit_event] = exits_of(await collect(client, lambda ev: bool(exits_of(ev))))
    assert (exit_event.status, exit_event.signal) == (137, 9)


async def test_partial_last_line_and_long_lines(client: HolderClient) -> None:
    script = "head -c 25000 /dev/zero | tr '\\0' x; echo; printf 'no newline'"
    launched = await client.launch(launch_params("d-long", script))
    os.close(launched.pidfd)
    events = await collect(client, lambda ev: bool(exits_of(ev)))
    assert [len(x) for x in lines_of(events)] == [10_000, 10_000, 5_000, len("no newline")]
    assert lines_of(events)[-1] == b"no newline"


async def test_output_is_buffered_while_no_client_and_delivered_first(
        holder: HolderProc) -> None:
    first = await HolderClient.connect(holder.socket)
    await first.subscribe()
    r, w = os.pipe()
    try:
        launched = await first.launch(
            {"dyno_id": "d-buf", "argv": ["cat"], "env": ENV}, stdin=r)
        os.close(r)
        os.close(launched.pidfd)
        os.write(w, b"a1\na2\n")
        assert lines_of(await collect(first, lambda ev: len(lines_of(ev)) == 2)) == [b"a1",
                                                                                    b"a2"]
        first.close()
        # The dyno keeps running and writing while nobody is connected.
        os.write(w, b"".join(b"b%d\n" % i for i in range(5)))
        probe = await HolderClient.connect(holder.socket)
        await async_wait_for(
            lambda: _buffered(probe, "d-buf", 5), 10, what="5 lines buffered")
        info = await held(probe, "d-buf")
        assert info["running"] is True
        probe.close()
        second = await HolderClient.connect(holder.socket)
        await second.subscribe()
        later = asyncio.get_running_loop().call_later(0.05, os.write, w, b"c1\n")
        events = await collect(second, lambda ev: b"c1" in lines_of(ev))
        later.cancel()
        got = lines_of(events)
        # a1/a2 come again: `first` closed before asking for more, so it never acked them.
        assert got[:2] == [b"a1", b"a2"]
        assert got[2:] == [b"b0", b"b1", b"b2", b"b3", b"b4", b"c1"]
        os.close(w)
        w = -1
        [exit_event] = exits_of(await collect(second, lambda ev: bool(exits_of(ev))))
        assert exit_event.status == 0
        second.close()
    finally:
        if w >= 0:
            os.close(w)


async def _buffered(client: HolderClient, dyno_id: str, lines: int) -> bool:
    info = await held(client, dyno_id)
    return bool(info) and int(info["buffered_lines"]) >= lines  # type: ignore[call-overload]


async def test_bounded_buffer_keeps_newest_and_reports_drops(
        holder_factory: Callable[..., HolderProc]) -> None:
    h = holder_factory("--buffer-lines", "10")
    probe = await HolderClient.connect(h.socket)
    launched = await probe.launch(launch_params(
        "d-drop", "i=1; while [ $i -le 25 ]; do echo n$i; i=$((i+1)); done; exec sleep 60"))
    await async_wait_for(lambda: _dropped(probe, "d-drop", 15), 10, what="15 drops")
    sink = await HolderClient.connect(h.socket)
    await sink.subscribe()
    events = await collect(sink, lambda ev: len(lines_of(ev)) >= 10)
    outputs = [e for e in events if isinstance(e, OutputEvent)]
    assert outputs[0].dropped == 15 and outputs[0].seq == 15
    assert lines_of(events) == [b"n%d" % i for i in range(16, 26)]
    signal.pidfd_send_signal(launched.pidfd, signal.SIGTERM)
    os.close(launched.pidfd)
    [exit_event] = exits_of(await collect(sink, lambda ev: bool(exits_of(ev))))
    assert exit_event.status == 143
    probe.close()
    sink.close()


async def test_total_bound_over_all_buffers(holder_factory: Callable[..., HolderProc]) -> None:
    h = holder_factory("--buffer-total-bytes", "5000")
    probe = await HolderClient.connect(h.socket)
    try:
        script = "i=0; while [ $i -lt 100 ]; do printf '%099d\\n' $i; i=$((i+1)); done"
        for name in ("d-tot1", "d-tot2"):
            os.close((await probe.launch(launch_params(name, script))).pidfd)
        await async_wait_for(lambda: _all_exited(probe, 2), 10, what="both exited")
        procs = await probe.list_processes()
        assert sum(p.buffered_bytes for p in procs) <= 5000
        assert sum(p.dropped + p.buffered_lines for p in procs) == 200
        assert all(p.dropped > 0 for p in procs), "the biggest buffer gives way, in turn"
    finally:
        probe.close()


async def _all_exited(client: HolderClient, n: int) -> bool:
    procs = await client.list_processes()
    return len(procs) == n and not any(p.running for p in procs)


async def _dropped(client: HolderClient, dyno_id: str, n: int) -> bool:
    info = await held(client, dyno_id)
    return bool(info) and info["dropped"] == n


async def test_unacked_output_goes_to_the_next_subscriber(holder: HolderProc) -> None:
    a = await HolderClient.connect(holder.socket)
    await a.subscribe()
    # One write, so both lines come in one event: reading a second event would ack the first.
    launched = await a.launch(launch_params("d-ack", "printf 'x1\\nx2\\n'; exec sleep 60"))
    events = await collect(a, lambda ev: len(lines_of(ev)) == 2)
    assert lines_of(events) == [b"x1", b"x2"]
    a.close()  # never asked for the next event, so never acked
    b = await HolderClient.connect(holder.socket)
    await b.subscribe()
    again = await collect(b, lambda ev: len(lines_of(ev)) == 2)
    assert lines_of(again) == [b"x1", b"x2"]
    assert isinstance(again[0], OutputEvent) and again[0].seq == 0
    # Asking for the next event acks what came before: nothing is left buffered.
    signal.pidfd_send_signal(launched.pidfd, signal.SIGKILL)
    os.close(launched.pidfd)
    await collect(b, lambda ev: bool(exits_of(ev)))
    await asyncio.sleep(0)
    info = await held(b, "d-ack")
    assert info["buffered_lines"] == 0
    b.close()


async def test_exit_status_survives_until_release(holder: HolderProc) -> None:
    a = await HolderClient.connect(holder.socket)
    launched = await a.launch(launch_params("d-rel", "exit 3"))
    os.close(launched.pidfd)
    await async_wait_for(lambda: _exited(a, "d-rel"), 10, what="exit recorded")
    a.close()
    for _ in range(2):  # every subscriber learns the status until it is released
        b = await HolderClient.connect(holder.socket)
        await b.subscribe()
        [exit_event] = exits_of(await collect(b, lambda ev: bool(exits_of(ev))))
        assert (exit_event.dyno_id, exit_event.status) == ("d-rel", 3)
        b.close()
    c = await HolderClient.connect(holder.socket)
    assert await c.release("d-rel") == 1
    assert await held(c, "d-rel") == {}
    with pytest.raises(NotFound):
        await c.release("d-rel")
    c.close()


async def _exited(client: HolderClient, dyno_id: str) -> bool:
    info = await held(client, dyno_id)
    return bool(info) and info["running"] is False


async def test_requests_are_checked(client: HolderClient) -> None:
    launched = await client.launch(launch_params("d-chk", "exec sleep 60"))
    try:
        with pytest.raises(Conflict):
            await client.launch(launch_params("d-chk", "true"))
        with pytest.raises(Conflict):
            await client.release("d-chk", launched.pid)
        with pytest.raises(BadRequest):
            await client.launch({"argv": ["true"]})
        with pytest.raises(LaunchFailed) as err:
            await client.launch({"dyno_id": "d-nx", "argv": ["/nonexistent/cmd"], "env": ENV})
        assert err.value.errno == 2
        with pytest.raises(NotFound):
            await client.enter("d-none", ["true"], [], 0, 0, "/", [], (0, 1, 2))
        with pytest.raises(BadRequest):
            await client.request("nope", {})
        assert (await client.ping())["held"] == 1
    finally:
        signal.pidfd_send_signal(launched.pidfd, signal.SIGKILL)
        os.close(launched.pidfd)


async def test_enter_runs_with_the_callers_stdio(client: HolderClient) -> None:
    launched = await client.launch(launch_params("d-ent", "exec sleep 60"))
    r, w = os.pipe()
    try:
        entered = await client.enter("d-ent", ["sh", "-c", "echo inside; exit 5"], ENV, 0, 0,
                                     "/", [], (0, w, w))
        os.close(w)
        w = -1
        assert os.read(r, 100) == b"inside\n"
        exits = exits_of(await collect(client, lambda ev: bool(exits_of(ev))))
        assert [(e.kind, e.pid, e.status) for e in exits] == [("enter", entered.pid, 5)]
        os.close(entered.pidfd)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
        signal.pidfd_send_signal(launched.pidfd, signal.SIGKILL)
        os.close(launched.pidfd)


async def test_list_hands_out_pidfds_of_running_processes(client: HolderClient) -> None:
    launched = await client.launch(launch_params("d-list", "exec sleep 60"))
    os.close(launched.pidfd)
    [proc] = [p for p in await client.list_processes(pidfds=True) if p.dyno_id == "d-list"]
    assert proc.running and proc.pid == launched.pid and proc.pidfd is not None
    signal.pidfd_send_signal(proc.pidfd, signal.SIGKILL)
    os.close(proc.pidfd)
    [exit_event] = exits_of(await collect(client, lambda ev: bool(exits_of(ev))))
    assert exit_event.pid == launched.pid and exit_event.signal == 9


async def test_list_passes_more_pidfds_than_one_sendmsg_can(client: HolderClient) -> None:
    pidfds: list[int] = []
    try:
        for i in range(260):
            pidfds.append((await client.launch(launch_params(f"d-many{i}", "exec sleep 60"))).pidfd)
        procs = await client.list_processes(pidfds=True)
        assert len(procs) == 260 and all(p.pidfd is not None for p in procs)
        for p in procs:
            assert p.pidfd is not None
            # Each pidfd names its own process: signal 0 through it proves the pairing.
            signal.pidfd_send_signal(p.pidfd, 0)
            pidfds.append(p.pidfd)
        assert len({p.pid for p in procs}) == 260
    finally:
        for fd in pidfds:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            os.close(fd)


async def test_newest_subscriber_supersedes(holder: HolderProc) -> None:
    a = await HolderClient.connect(holder.socket)
    await a.subscribe()
    b = await HolderClient.connect(holder.socket)
    assert await b.subscribe() is True
    events = await collect(a, lambda ev: bool(ev))
    assert isinstance(events[0], Superseded)
    launched = await b.launch(launch_params("d-sup", "echo hi"))
    os.close(launched.pidfd)
    assert lines_of(await collect(b, lambda ev: bool(exits_of(ev)))) == [b"hi"]
    a.close()
    b.close()


async def test_request_deadline(holder: HolderProc) -> None:
    c = await HolderClient.connect(holder.socket)
    holder_pid = (await c.ping())["pid"]
    os.kill(holder_pid, signal.SIGSTOP)
    try:
        with pytest.raises(HolderTimeout):
            await c.ping(timeout_s=0.2)
    finally:
        os.kill(holder_pid, signal.SIGCONT)
    assert (await c.ping())["pid"] == holder_pid
    c.close()


async def test_sigkilled_client_does_not_affect_holder_or_dynos(holder: HolderProc) -> None:
    script = textwrap.dedent(f"""
        import asyncio, sys
        from agent.holder.client import HolderClient
        async def main():
            c = await HolderClient.connect({holder.socket!r})
            await c.subscribe()
            await c.launch({{"dyno_id": "d-orphan", "env": [["PATH", "/usr/bin:/bin"]],
                            "argv": ["sh", "-c", "echo before; read x; echo after $x"]}},
                           stdin=0)
            print("launched", flush=True)
            await asyncio.sleep(3600)
        asyncio.run(main())
    """)
    r, w = os.pipe()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, stdin=r,
                                                stdout=asyncio.subprocess.PIPE)
    os.close(r)
    try:
        assert proc.stdout is not None
        assert await proc.stdout.readline() == b"launched\n"
        proc.kill()
        assert await proc.wait() == -signal.SIGKILL
        c = await HolderClient.connect(holder.socket)
        info = await held(c, "d-orphan")
        assert info["running"] is True
        await c.subscribe()
        os.write(w, b"later\n")
        events = await collect(c, lambda ev: bool(exits_of(ev)))
        assert [x for x in lines_of(events) if x != b"before"] == [b"after later"]
        assert exits_of(events)[0].status == 0
        c.close()
    finally:
        os.close(w)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_second_holder_on_the_same_socket_is_refused(holder: HolderProc) -> None:
    done = subprocess.run(holder.argv(), capture_output=True, timeout=30, check=False)
    assert done.returncode == 3, done.stderr
    assert "another holder owns" in holder.log()
    assert holder.proc is not None and holder.proc.poll() is None


def test_stale_socket_is_replaced(short_dir: str) -> None:
    import socket as socketmod

    path = os.path.join(short_dir, "stale.sock")
    dead = socketmod.socket(socketmod.AF_UNIX)
    dead.bind(path)
    dead.close()  # the file stays, nobody listens: what a SIGKILLed holder leaves
    h = HolderProc(path, os.path.join(short_dir, "stale-state"))
    try:
        start_holder(h)
        assert "removing stale holder socket" in h.log()
    finally:
        stop_holder(h)
    assert not os.path.exists(path), "a holder stopped by SIGTERM removes its socket"


async def test_ensure_running_starts_a_detached_holder_once(short_dir: str) -> None:
    path = os.path.join(short_dir, "ens.sock")
    state = os.path.join(short_dir, "ens-state")
    c = await HolderClient.ensure_running(path, state, backend="plain", timeout_s=20)
    holder_pid = int((await c.ping())["pid"])
    try:
        assert os.getsid(holder_pid) == holder_pid, "holder leads its own session"
        assert psutil.Process(holder_pid).ppid() != os.getpid(), "not the caller's child"
        again = await HolderClient.ensure_running(path, state, backend="plain", timeout_s=20)
        assert (await again.ping())["pid"] == holder_pid
        again.close()
        assert await asyncio.to_thread(os.path.exists, os.path.join(state, "holder.log"))
    finally:
        c.close()
        os.kill(holder_pid, signal.SIGTERM)
        await async_wait_for(lambda: _gone(holder_pid), 10, what="holder exit")


async def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_dispatch_events_calls_sync_and_async_handlers(client: HolderClient) -> None:
    seen: list[HolderEvent] = []
    done = asyncio.Event()

    async def handler(event: HolderEvent) -> None:
        seen.append(event)
        if isinstance(event, ExitEvent):
            done.set()

    task = asyncio.create_task(client.dispatch_events(handler), name="holder-events-test")
    try:
        os.close((await client.launch(launch_params("d-cb", "echo cb; exit 2"))).pidfd)
        async with asyncio.timeout(10):
            await done.wait()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert lines_of(seen) == [b"cb"]
    assert [e.status for e in exits_of(seen)] == [2]


async def test_losing_the_holder_fails_requests_and_events_then_a_new_one_takes_over(
        holder_factory: Callable[..., HolderProc]) -> None:
    h = holder_factory()
    c = await HolderClient.connect(h.socket)
    await c.subscribe()
    holder_pid = int((await c.ping())["pid"])
    events = c.events()
    pending = asyncio.create_task(anext(events), name="holder-event-wait")
    os.kill(holder_pid, signal.SIGSTOP)
    ping = asyncio.create_task(c.ping(timeout_s=30), name="holder-ping")
    await asyncio.sleep(0.05)
    os.kill(holder_pid, signal.SIGKILL)  # leaves its socket file behind
    async with asyncio.timeout(10):
        with pytest.raises(ConnectionLost):
            await ping
        with pytest.raises(ConnectionLost):
            await pending
    assert c.closed
    with pytest.raises(ConnectionLost):
        await c.ping()
    assert h.proc is not None
    await asyncio.to_thread(h.proc.wait, 10)
    assert await asyncio.to_thread(os.path.exists, h.socket), "SIGKILL leaves the socket"
    successor = HolderProc(h.socket, h.state_dir)
    await asyncio.to_thread(start_holder, successor)
    try:
        async with await HolderClient.connect(h.socket) as again:
            assert (await again.ping())["pid"] == successor.proc.pid  # type: ignore[union-attr]
    finally:
        await asyncio.to_thread(stop_holder, successor)
