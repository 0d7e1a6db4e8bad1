"""Log throughput through the dyno holder alone: a dyno prints LINES lines (`seq`) as fast as it
can, a client takes the holder's events promptly; lines/s, drops and peak RSS of holder and client,
against a plain pipe read by Python in the same run (the ceiling); then a slow client, whose
loss must be counted and whose memory (and the holder's) must stay bounded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

LINES = 300_000
ROUNDS = 5


def _status_kib(pid: int | str, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(key)


async def _consume(socket_path: str, lines: int, slow_s: float) -> dict[str, Any]:
    """Client side (own process, so its VmHWM is its own): launch `seq`, take every event."""
    from agent.holder.client import ExitEvent, HolderClient, OutputEvent

    client = await HolderClient.connect(socket_path)
    await client.subscribe()
    received = dropped = 0
    next_seq = 0
    in_order = True
    started = time.monotonic()
    launched = await client.launch({"dyno_id": "bench", "argv": ["seq", "1", str(lines)],
                                    "env": [["PATH", "/usr/bin:/bin"]]})
    os.close(launched.pidfd)
    async for event in client.events():
        if isinstance(event, OutputEvent):
            # A drop moves seq on by the lines dropped; anything else out of order is a bug.
            in_order &= event.seq == next_seq + event.dropped
            next_seq = event.seq + len(event.lines)
            received += len(event.lines)
            dropped += event.dropped
            if slow_s:
                await asyncio.sleep(slow_s)
        elif isinstance(event, ExitEvent):
            break
    elapsed = time.monotonic() - started
    await client.release("bench")
    client.close()
    return {"received": received, "dropped": dropped, "in_order": in_order,
            "elapsed_s": elapsed, "client_peak_kib": _status_kib("self", "VmHWM")}


def _round(lines: int, slow_s: float = 0.0, holder_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """One fresh holder (plain backend), one client process; figures of that round."""
    base = tempfile.mkdtemp(prefix="dtbh", dir="/tmp")
    sock = os.path.join(base, "h.sock")
    holder = subprocess.Popen(
        [sys.executable, "-m", "agent.holder", "--socket", sock, "--state-dir", base,
         "--backend", "plain", "--log-file", os.path.join(base, "holder.log"), *holder_args],
        stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if time.monotonic() > deadline or holder.poll() is not None:
                raise RuntimeError("holder did not bind")
            time.sleep(0.01)
        done = subprocess.run(
            [sys.executable, "-c", "import asyncio, json, sys; "
             "from tests.bench.bench_holder import _consume; "
             "print(json.dumps(asyncio.run(_consume(sys.argv[1], int(sys.argv[2]), "
             "float(sys.argv[3])))))", sock, str(lines), str(slow_s)],
            capture_output=True, check=True, timeout=300, cwd=Path(__file__).parents[2])
        result: dict[str, Any] = json.loads(done.stdout)
        result["holder_peak_kib"] = _status_kib(holder.pid, "VmHWM")
        return result
    finally:
        holder.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            holder.wait(10)
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        shutil.rmtree(base, ignore_errors=True)


def _peer_pipe(lines: int) -> float:
    """The ceiling: the same `seq` read from a plain pipe in big chunks and split into lines."""
    started = time.monotonic()
    count = 0
    with subprocess.Popen(["seq", "1", str(lines)], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        carry = b""
        while chunk := proc.stdout.read1(1 << 16):
            parts = (carry + chunk).split(b"\n")
            carry = parts.pop()
            count += len(parts)
    assert count == lines
    return lines / (time.monotonic() - started)


def main() -> None:
    rounds = [_round(LINES) for _ in range(ROUNDS)]
    peers = [_peer_pipe(LINES) for _ in range(ROUNDS)]
    rate = statistics.median(r["received"] / r["elapsed_s"] for r in rounds)
    peer = statistics.median(peers)
    print(f"one dyno printing {LINES:,} lines (`seq`), a prompt client, {ROUNDS} rounds, medians:")
    print(f"  through the holder {rate:,.0f} lines/s; received "
          f"{[r['received'] for r in rounds]}, dropped {[r['dropped'] for r in rounds]}, "
          f"seq in order {all(r['in_order'] for r in rounds)}")
    print(f"  peer: plain pipe read by Python {peer:,.0f} lines/s; ratio peer/holder "
          f"{peer / rate:.2f}x")
    print(f"  peak RSS: holder {statistics.median(r['holder_peak_kib'] for r in rounds) / 1024:.1f}"
          f" MiB, client {statistics.median(r['client_peak_kib'] for r in rounds) / 1024:.1f} MiB")
    slow_lines = LINES * 10
    slow = _round(slow_lines, slow_s=0.005)
    print(f"slow client (5 ms per event), {slow_lines:,} lines (more than every buffer on the "
          f"way), 1 round: received {slow['received']:,}, dropped {slow['dropped']:,} (sum "
          f"{slow['received'] + slow['dropped']:,}), seq in order {slow['in_order']}; peak RSS "
          f"holder {slow['holder_peak_kib'] / 1024:.1f} MiB, client "
          f"{slow['client_peak_kib'] / 1024:.1f} MiB")

if __name__ == "__main__":
    main()
