"""Listening Unix sockets: probed before a stale one is replaced, bound with their mode from
the start, and removed only by their binder."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from agent.unixsocket import listen, live_peer


def test_a_new_socket_has_its_mode_and_nothing_else_is_left(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    bound = listen(path, mode=0o660, gid=os.getgid(), backlog=4)
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == os.getgid()
        assert (st.st_dev, st.st_ino) == bound.identity
        assert os.listdir(tmp_path) == ["api.sock"]  # no temporary name behind
        assert not bound.sock.getblocking()
        assert not bound.sock.get_inheritable()
    finally:
        bound.sock.close()


def test_live_peer_tells_a_live_socket_from_a_stale_one(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    assert live_peer(path) is None  # no file
    bound = listen(path, mode=0o600, backlog=4)
    cred = live_peer(path)
    assert cred is not None and cred.pid == os.getpid()
    bound.sock.close()
    assert live_peer(path) is None  # a stale socket file: nobody answers
    (tmp_path / "file").write_text("x")
    assert live_peer(tmp_path / "file") is None  # not a socket at all


def test_a_stale_socket_is_replaced_in_place(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    bound = listen(path, mode=0o600, backlog=4)
    try:
        assert live_peer(path) is not None
    finally:
        bound.sock.close()


def test_unlink_removes_only_its_own_socket(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    first = listen(path, mode=0o600, backlog=4)
    second = listen(path, mode=0o600, backlog=4)  # a successor took the path over
    first.sock.close()
    first.unlink()
    assert path.exists()
    second.sock.close()
    second.unlink()
    assert not path.exists()
    second.unlink()  # already gone: nothing to do


def test_a_failed_bind_leaves_nothing_behind(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "entry").write_text("x")
    with pytest.raises(OSError):
        listen(tmp_path / "taken", mode=0o600, backlog=4)  # a non-empty directory stays
    assert sorted(os.listdir(tmp_path)) == ["taken"]
