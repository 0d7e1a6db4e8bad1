"""The child's report pipe format and the phase arithmetic."""

from __future__ import annotations

import os

import pytest

from agent.launcher import report as rep
from agent.launcher.launch import parse_start_time, read_start_time


def test_marks_then_error_round_trip() -> None:
    data = rep.encode_marks({"fork": 5, "cgroup": 9}) + rep.encode_error(
        "mounts", 2, "No such file or directory", b"/slugs/x")
    decoded = rep.decode(data)
    assert decoded.marks == {"fork": 5, "cgroup": 9}
    assert decoded.error is not None
    assert (decoded.error.phase, decoded.error.errno, decoded.error.path) == (
        "mounts", 2, "/slugs/x")
    assert "ENOENT" in str(decoded.error)


def test_marks_alone_mean_success() -> None:
    assert rep.decode(rep.encode_marks({"fork": 1})).error is None
    assert rep.decode(b"").error is None


def test_garbage_is_an_error_not_a_success() -> None:
    decoded = rep.decode(b"\x00not json\n")
    assert decoded.error is not None and decoded.error.phase == "report"


def test_error_messages_fit_one_atomic_pipe_write() -> None:
    assert len(rep.encode_error("exec", 1, "x" * 100_000, "/p" * 5000)) < 4096


def test_durations_follow_phase_order_and_end_at_eof() -> None:
    ms = 1_000_000
    out = rep.durations_ms(0, {"fork": 1 * ms, "cgroup": 3 * ms, "user": 6 * ms}, 10 * ms,
                           ("fork", "cgroup", "namespaces", "user"))
    assert out == {"fork": 1.0, "cgroup": 2.0, "user": 3.0, "exec": 4.0, "total": 10.0}


def test_read_until_eof_times_out_on_a_silent_writer() -> None:
    r, w = os.pipe()
    try:
        assert rep.read_until_eof(r, 0.05) is None
        os.write(w, rep.encode_marks({"fork": 1}))
        os.close(w)
        w = -1
        got = rep.read_until_eof(r, 1)
        assert got is not None and got.marks == {"fork": 1} and got.eof_ns > 0
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


@pytest.mark.parametrize("comm", ["sleep", "a b) c", "))"])
def test_start_time_parsing_survives_odd_comm_names(comm: str) -> None:
    fields = ["S"] + [str(i) for i in range(4, 22)] + ["777123"] + ["0"] * 30
    assert parse_start_time(f"42 ({comm}) {' '.join(fields)}".encode()) == 777123


def test_start_time_of_this_process_matches_proc() -> None:
    with open(f"/proc/{os.getpid()}/stat") as f:
        expected = int(f.read().rsplit(")", 1)[1].split()[19])
    assert read_start_time(os.getpid()) == expected
