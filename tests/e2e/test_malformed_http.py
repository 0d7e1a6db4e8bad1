"""Requests that are not HTTP/1.1 at all reach no handler: aiohttp's parser refuses them with
a 400 of its own. They are a client's mistake, so the agent's log gets a warning, not an
error line with a traceback (found by the fuzz tier: any member of the socket's group could
fill the journal with error-level tracebacks)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.e2e.test_supervision import agent_in_host
from tests.support.agentproc import AgentProcess
from tests.support.testhost import new_test_host
from tests.support.wait import wait_for

MALFORMED = {
    "header over 8190 bytes": b"GET /v1/info HTTP/1.1\r\nHost: x\r\nX: " + b"y" * 20_000
                              + b"\r\n\r\n",
    "request line over 8190 bytes": b"GET /v1/dynos/" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n",
    "bad Content-Length": b"POST /v1/dynos HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
    "two Content-Lengths": b"POST /v1/dynos HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                           b"Content-Length: 3\r\n\r\n{}",
    "bad chunk": b"POST /v1/dynos HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"zz\r\n{}\r\n0\r\n\r\n",
    "NUL in a header": b"GET /v1/info HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
    "unknown HTTP version": b"GET /v1/info HTTP/9.9\r\n\r\n",
}


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentProcess]:
    with new_test_host() as host, agent_in_host(host, log_level="info") as running:
        yield running


def status_of(agent: AgentProcess, raw: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(agent.socket))
        sock.sendall(raw)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer.split(b"\r\n", 1)[0]


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_http_gets_a_400_and_a_warning_not_an_error(agent: AgentProcess,
                                                              name: str) -> None:
    before = len(agent.log())
    assert status_of(agent, MALFORMED[name]).split(b" ")[1] == b"400"
    new = wait_for(lambda: agent.log()[before:], 10, what="the refusal logged")
    assert "level=error" not in new and "Traceback" not in new, new[:3000]
    assert "level=warning" in new and len(new) < 2000, new[:3000]
    agent.api("GET", "/v1/info")
