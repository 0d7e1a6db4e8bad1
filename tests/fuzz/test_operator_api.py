"""A fuzzing client for the operator API against the real agent: every route with hostile
refs, query parameters and JSON bodies (specs mutated field by field, signals in other
scripts, deep and huge JSON), wrong methods and paths, interleaved create/stop/restart/
signal/delete of the same dynos, and raw HTTP garbage (bad request lines, Content-Length,
bodies). After every batch the agent must be alive and responsive with bounded RSS and a
clean log (tests/fuzz/health.py), and every error must be the README's shape,
`{"error": {"code", "message"}}`, with a code of its table and that code's HTTP status."""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import socket
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_supervision import agent_in_host
from tests.fuzz import generate as gen
from tests.fuzz import oracle
from tests.fuzz.contract import api_error_statuses
from tests.fuzz.health import AgentWatch
from tests.fuzz.settings import TEST_TIMEOUT_S
from tests.support.agentproc import AgentProcess
from tests.support.names import unique
from tests.support.testhost import TestHost, new_test_host

OK = oracle.OK
NO_ANSWER = "no-answer"  # the agent may close a connection whose request it cannot parse
STATUSES = api_error_statuses()
SUCCESS = frozenset({200, 201, 204})
ERROR_BODY_MAX_BYTES = 64 * 1024
HTTP_LAYER_BODY_MAX_BYTES = 16 * 1024
HTTP_LINE_MAX_BYTES = 8190 - len("DELETE  HTTP/1.1")
# The methods aiohttp's parser knows; any other token is refused before routing.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE",
                          "CONNECT"})
BODY_MAX_BYTES = 1024 * 1024  # aiohttp's client_max_size, the agent's default
LIVE_MAX = 6
QUICK_S = 5.0
LIFECYCLE_S = 60.0
LIFECYCLE = frozenset({OK, "not_found", "conflict", "timeout"})
# Which of the README's codes a well-formed request about an existing dyno may get.
TAIL_MAX = 100_000


@dataclass(frozen=True)
class Call:
    """One HTTP exchange: what to send and which outcomes (codes, OK) are acceptable."""

    label: str
    allowed: frozenset[str]
    method: str = "GET"
    path: str = "/v1/info"
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()
    raw: bytes | None = None  # sent as is instead of method/path/body
    timeout_s: float = QUICK_S
    # Not parseable as HTTP/1.1: aiohttp's parser answers before the agent's code runs, with
    # a plain-text 400 of its own (reported as a finding: the README promises its error
    # shape for every error on the socket). Accepted only here, only as a bounded 400.
    http_layer: bool = False


@dataclass(frozen=True)
class Answer:
    status: int | None  # None: closed without an answer
    body: bytes
    content_type: str


def follows(path: str) -> bool:
    """Whether the agent streams its answer to `path` until the client goes away: logs or
    events with a `follow` value it takes as true (api.py's `_Query.flag`)."""
    route, _, query = path.partition("?")
    if route not in ("/v1/logs", "/v1/events"):
        return False
    values = urllib.parse.parse_qs(query, keep_blank_values=True).get("follow", [])
    return bool(values) and values[-1].lower() in ("1", "true", "yes", "on")


def exchange(path: Path, call: Call) -> Answer:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(call.timeout_s)
    try:
        sock.connect(str(path))
        if call.raw is not None:
            data = call.raw
        else:
            headers = [("Host", "localhost"), *call.headers]
            if call.body is not None and not any(k.lower() == "content-length"
                                                 for k, _ in call.headers):
                headers.append(("Content-Length", str(len(call.body))))
            head = f"{call.method} {call.path} HTTP/1.1\r\n" + "".join(
                f"{k}: {v}\r\n" for k, v in headers) + "Connection: close\r\n\r\n"
            data = head.encode("latin-1", "replace") + (call.body or b"")
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        if call.raw is not None:
            # Garbage may leave the parser waiting for more; the end of input ends that.
            # (A well-formed request keeps its side open: aiohttp takes a half-close for
            # a client that went away.)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        response = http.client.HTTPResponse(sock, method=call.method)
        try:
            response.begin()
        except (http.client.RemoteDisconnected, ConnectionResetError):
            return Answer(None, b"", "")
        if call.method == "GET" and follows(call.path) and response.status == 200:
            return Answer(response.status, b"", response.getheader("Content-Type", ""))
        # A body still arriving after the call's time is an answer that never ends (a stream
        # the agent should not have opened), not one to wait out.
        deadline = time.monotonic() + call.timeout_s
        parts = []
        while part := response.read(65536):
            parts.append(part)
            if time.monotonic() > deadline:
                raise TimeoutError(f"a body still arriving after {call.timeout_s:g}s")
        return Answer(response.status, b"".join(parts), response.getheader("Content-Type", ""))
    finally:
        sock.close()


def check_answer(call: Call, answer: Answer) -> str | None:
    """None when the answer is one the README allows for this call, else why not."""
    if answer.status is None:
        return None if NO_ANSWER in call.allowed else "closed without an answer"
    if answer.status in SUCCESS:
        return None if OK in call.allowed else f"succeeded ({answer.status})"
    # A request line over aiohttp's 8190 bytes is refused by its parser too.
    http_layer = call.http_layer or len(call.path) > HTTP_LINE_MAX_BYTES
    if (http_layer and answer.status == 400 and answer.content_type.startswith("text/plain")
            and len(answer.body) <= HTTP_LAYER_BODY_MAX_BYTES):
        return None
    try:
        body = json.loads(answer.body)
        error = body["error"]
        code, message = error["code"], error["message"]
        assert set(body) == {"error"} and isinstance(message, str)
    except (ValueError, KeyError, TypeError, AssertionError):
        return (f"status {answer.status} with a body not of the README's error shape: "
                f"{answer.content_type} {answer.body[:300]!r}")
    if code not in STATUSES:
        return f"undocumented code {code!r}: {answer.body[:300]!r}"
    if STATUSES[code] != answer.status:
        return f"code {code} with status {answer.status}, the README says {STATUSES[code]}"
    if len(answer.body) > ERROR_BODY_MAX_BYTES:
        return f"an error body of {len(answer.body)} bytes ({answer.body[:200]!r}…)"
    if code not in call.allowed:
        return f"answered {code}: {message[:300]!r}"
    return None


def quote(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def tail_outcome(value: str) -> frozenset[str]:
    """`tail` is an ASCII decimal integer from 0 to 100,000 (api.py's docstring)."""
    if value == "":
        return frozenset({OK})
    if value.isascii() and value.isdigit():
        if 0 <= int(value) <= TAIL_MAX:
            return frozenset({OK} | ({"bad_request"} if len(value) > 1 and value[0] == "0"
                                     else set()))
        return frozenset({"bad_request"})
    if value.isascii() and value.strip().lstrip("+").isdigit():
        return frozenset({OK, "bad_request"})
    return frozenset({"bad_request"})


@dataclass
class ApiFuzzer:
    agent: AgentProcess
    rng: random.Random
    slug: str
    prefix: str
    known: set[str] = field(default_factory=set)  # ids of dynos that may exist
    names: dict[str, str] = field(default_factory=dict)  # id -> name
    outcomes: Counter[str] = field(default_factory=Counter)
    calls: int = 0
    timeouts: list[str] = field(default_factory=list)

    def new_id(self) -> str:
        return f"{self.prefix}-{self.rng.randrange(10**9)}"

    def run(self, calls: list[Call], parallel: bool = False) -> list[str]:
        """Make the calls (at once when `parallel`); the violations found."""
        found: list[str] = []

        def one(call: Call) -> None:
            started = time.monotonic()
            try:
                answer = exchange(self.agent.socket, call)
            except TimeoutError:
                found.append(f"{call.label}: no answer within {call.timeout_s:g}s")
                return
            self.calls += 1
            code = "ok" if answer.status in SUCCESS else str(answer.status)
            self.outcomes[f"{call.label.split()[0]}:{code}"] += 1
            if answer.status == 504:  # documented, but worth a look when it is frequent
                self.timeouts.append(f"{call.label} {call.method} {call.path[:80]} after "
                                     f"{time.monotonic() - started:.1f}s")
            problem = check_answer(call, answer)
            if problem is not None:
                found.append(f"{call.label} ({call.method} {call.path[:200]}"
                             f"{' raw' if call.raw else ''}, "
                             f"{time.monotonic() - started:.1f}s): {problem}")
            self.track(call, answer)

        if parallel:
            with ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(one, calls))
        else:
            for call in calls:
                one(call)
        return found

    def track(self, call: Call, answer: Answer) -> None:
        if call.method == "POST" and call.path == "/v1/dynos" and answer.status == 201:
            status = json.loads(answer.body)
            self.known.add(status["id"])
            self.names[status["id"]] = status["name"]

    # -- calls -------------------------------------------------------------------------------
    def ref(self) -> tuple[str, frozenset[str]]:
        """A path segment naming a dyno, and the outcomes it allows on its own."""
        roll = self.rng.random()
        if roll < 0.45 and self.known:
            dyno_id = self.rng.choice(sorted(self.known))
            if self.rng.random() < 0.3 and dyno_id in self.names:
                return self.names[dyno_id], LIFECYCLE
            return dyno_id, LIFECYCLE
        if roll < 0.65:
            return self.new_id(), frozenset({"not_found"})
        if roll < 0.75:
            return f"worker.{self.rng.randrange(1, 10**6)}", frozenset({"not_found"})
        text = self.rng.choice((gen.text(self.rng).value, "a" * self.rng.choice((99, 100, 101,
                                                                                 5000)),
                                "..", ".", "%00", "A", "-a", "web.01"))
        allowed = {"bad_request", "not_found", "method_not_allowed"}
        if len(text) <= 100 and all(c in "abcdefghijklmnopqrstuvwxyz0123456789_.-"
                                    for c in text) and text[:1].isalnum():
            allowed = {"not_found"}
        return quote(text) if text else "", frozenset(allowed)

    def query(self, keys: tuple[str, ...]) -> tuple[str, frozenset[str]]:
        """A query string for a route that accepts `keys`: mostly none or `app`, sometimes an
        unknown, repeated or hostile one."""
        roll = self.rng.random()
        if roll < 0.5 or not keys:
            return ("", frozenset()) if roll < 0.9 or not keys else (
                f"?{quote(gen.text(self.rng).value) or 'x'}=1", frozenset({"bad_request"}))
        if roll < 0.75 and "app" in keys:
            app = self.rng.choice(("fz", "nope", gen.text(self.rng).value))
            return f"?app={quote(app)}", frozenset()
        if roll < 0.85 and keys:
            key = self.rng.choice(keys)
            return f"?{key}=a&{key}=b", frozenset({"bad_request"})
        return f"?{quote(gen.text(self.rng).value) or 'zz'}=1", frozenset({"bad_request"})

    def spec_body(self) -> tuple[bytes, frozenset[str], str]:
        base = gen.valid_spec(self.rng, self.new_id(), "fz", self.slug)
        case = (gen.SpecCase("valid", base, True) if self.rng.random() < 0.3
                else gen.mutate_spec(self.rng, base, msgpack_safe=False))
        if case.valid is not False and len(self.known) >= LIVE_MAX:
            case = gen.SpecCase("refused", {**case.spec, "size": "nope"}, False)
        allowed = {"invalid_spec", "bad_request"}
        if case.valid is not False:
            allowed |= {OK, "conflict", "draining"}
        if case.valid is True:
            allowed -= {"invalid_spec", "bad_request"}
        if oracle.depth(case.spec) > oracle.DEPTH_LIMIT:
            allowed |= {"bad_request"}
        try:
            body = json.dumps(case.spec).encode()
        except (ValueError, RecursionError):
            body = b"{}"
            allowed = {"invalid_spec", "bad_request"}
        if len(body) > BODY_MAX_BYTES:
            allowed = {"bad_request"}
        return body, frozenset(allowed), case.label

    def structured(self) -> Call:
        roll = self.rng.randrange(12)
        if roll <= 2:
            body, allowed, label = self.spec_body()
            return Call(f"create {label}", allowed, "POST", "/v1/dynos", body,
                        (("Content-Type", "application/json"),), timeout_s=LIFECYCLE_S)
        if roll == 3:
            ref, allowed = self.ref()
            query, refused = self.query(("app",))
            # aiohttp's `{ref}` matches no segment with a brace in it: that request has no
            # route (not_found) before its query is read.
            routes = not any(c in urllib.parse.unquote(ref) for c in "{}")
            return Call("get", ((refused or allowed) if routes else allowed) - {"timeout"},
                        "GET", f"/v1/dynos/{ref}{query}")
        if roll == 4:
            ref, allowed = self.ref()
            action = self.rng.choice(("stop", "restart"))
            query, refused = self.query(("app",))
            return Call(action, refused | allowed if refused else allowed, "POST",
                        f"/v1/dynos/{ref}/{action}{query}", timeout_s=LIFECYCLE_S)
        if roll == 5:
            ref, allowed = self.ref()
            value = (self.rng.choice(gen.SIGNALS_OK) if self.rng.random() < 0.3 else
                     self.rng.choice((gen.text(self.rng).value, gen.integer(self.rng, True).value,
                                      self.rng.choice(gen.UNICODE_NUMBERS),
                                      gen.any_value(self.rng, msgpack_safe=False).value)))
            payload: Any = {"signal": value}
            sig = oracle.signal_outcome(value)
            if self.rng.random() < 0.15:
                payload["extra"] = 1
                sig = frozenset({"bad_request"})
            outcome = allowed | (sig - {OK}) if OK in sig else sig | (allowed & {"not_found"})
            with contextlib.suppress(ValueError):
                body = json.dumps(payload).encode()
            return Call(f"signal {str(value)[:20]!r}", outcome | {"bad_request"} - {OK}
                        if "bad_request" in allowed else outcome, "POST",
                        f"/v1/dynos/{ref}/signal", body, timeout_s=LIFECYCLE_S)
        if roll == 6:
            ref, allowed = self.ref()
            return Call("delete", allowed - {"conflict"} | ({"timeout"} & allowed), "DELETE",
                        f"/v1/dynos/{ref}", timeout_s=LIFECYCLE_S)
        if roll == 7:
            value = self.rng.choice(("", "0", "10", "100000", "100001", "-1", "+5", " 5",
                                     "99999999999999999999", "1e3", "0x10", "007",
                                     *gen.UNICODE_NUMBERS))
            query = f"?tail={quote(value)}&format={self.rng.choice(('text', 'json'))}"
            return Call(f"logs tail={value!r}", tail_outcome(value), "GET", f"/v1/logs{query}")
        if roll == 8:
            path = self.rng.choice(("/v1/logs", "/v1/events"))
            key, value = self.rng.choice((("follow", gen.text(self.rng).value),
                                          ("format", gen.text(self.rng).value),
                                          ("follow", "1"), ("format", "json")))
            accepted: set[str]
            if path == "/v1/events" and key == "format":
                accepted = {"bad_request"}
            elif key == "follow":
                accepted = ({OK} if value.lower() in ("1", "true", "yes", "on", "0", "false",
                                                        "no", "off", "") else {"bad_request"})
            else:
                accepted = {OK} if value in ("", "text", "json") else {"bad_request"}
            return Call(f"{path[4:]} {key}={value[:20]!r}", frozenset(accepted), "GET",
                        f"{path}?{key}={quote(value)}")
        if roll == 9:
            path, outcomes = self.rng.choice((
                ("/v1/info", {OK}), ("/v1/dynos", {OK}), ("/metrics", {OK}),
                ("/v1/formation", {"conflict"})))
            query, refused = self.query(("app",) if path in ("/v1/dynos", "/v1/formation")
                                        else ())
            return Call(f"get {path}", refused or frozenset(outcomes), "GET", path + query)
        if roll == 10:  # a wrong method on a route, or no such route
            method = self.rng.choice(("PUT", "PATCH", "OPTIONS", "FOO", "get", "TRACE"))
            path = self.rng.choice(("/v1/info", "/v1/dynos", "/v1/dynos/x/stop", "/metrics"))
            return Call(f"method {method}", frozenset({"method_not_allowed", "bad_request",
                                                       NO_ANSWER}), method, path,
                        http_layer=method not in HTTP_METHODS)
        path = self.rng.choice(("/", "/v1", "/v1/", "/v2/info", "/V1/INFO", "/v1/info/",
                                "//v1/info", "/v1/dynos/a/b/c", "/v1/dynos/x/kill",
                                "/v1/formation/x", "/" + "a" * 3000))
        return Call("no route", frozenset({"not_found", "method_not_allowed"}), "GET", path)

    def hostile_body(self) -> Call:
        """Bodies that are not JSON objects, deep JSON, huge JSON."""
        depth = self.rng.choice((33, 100, 1000, 100_000))
        body, allowed = self.rng.choice((
            (b"", {"bad_request"}), (b"{", {"bad_request"}), (b"\xff\xfe{}", {"bad_request"}),
            (b"[]", {"bad_request"}), (b"null", {"bad_request"}), (b"1e999999", {"bad_request"}),
            (b"9" * 5000, {"bad_request"}), (b'{"id": NaN}', {"bad_request", "invalid_spec"}),
            (b"\xef\xbb\xbf{}", {"bad_request", "invalid_spec"}),
            (b"[" * depth + b"]" * depth, {"bad_request"}),
            (b'{"a":' * depth + b"1" + b"}" * depth, {"bad_request", "invalid_spec"}),
            (b'{"app": "' + b"\\u0000" * 200_000 + b'"}', {"bad_request", "invalid_spec"}),
            (b'{"app": "' + b"a" * (BODY_MAX_BYTES + 1) + b'"}', {"bad_request"}),
            (b'{"signal": "' + b"\\u0661\\u0660" + b'"}', {"bad_request", "not_found"}),
        ))
        path = self.rng.choice(("/v1/dynos", "/v1/formation", "/v1/dynos/x/signal"))
        if path == "/v1/dynos" and body.startswith(b"{"):
            allowed = allowed | {"invalid_spec"}  # an object: a spec, however wrong
        if path != "/v1/dynos":
            allowed = allowed - {"invalid_spec"} | {"bad_request", "not_found", "conflict"}
        return Call(f"body {body[:16]!r}… ({len(body)} bytes) to {path}", frozenset(allowed),
                    "POST", path, body, (("Content-Type", "application/json"),))

    def garbage(self) -> Call:
        """HTTP that is not well-formed: the agent may answer 400 in its error shape, or
        close the connection."""
        refused = frozenset({"bad_request", NO_ANSWER})
        raw = self.rng.choice((
            b"GET\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"\x00\x01\x02\r\n\r\n",
            b"GET /v1/info HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
            b"POST /v1/dynos HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
            b"POST /v1/dynos HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3"
            b"\r\n\r\n{}",
            b"POST /v1/dynos HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"zz\r\n{}\r\n0\r\n\r\n",
            b"POST /v1/dynos HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Length: 2\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            b"GET /v1/info HTTP/1.1\r\nHost: x\r\n" + b"X: " + b"y" * 20_000 + b"\r\n\r\n",
            b"GET /v1/info HTTP/1.1\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(200))
            + b"\r\n",
            b"GET /v1/dynos/" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /v1/info?%ff%fe=%00 HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /v1/info HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
            b"GET /v1/info\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /v1/info HTTP/1.1\r\nHost: x\r\n folded: header\r\n\r\n",
        ))
        return Call(f"raw {raw[:24]!r}…", refused | {OK, "not_found"}, raw=raw, http_layer=True)

    def sequence(self) -> list[Call]:
        """create/stop/restart/signal/delete of one dyno, all in flight at once."""
        spec = gen.valid_spec(self.rng, self.new_id(), "fz", self.slug)
        self.known.add(spec["id"])
        body = json.dumps(spec).encode()
        other = json.dumps({**spec, "command": "sleep 700"}).encode()
        dyno_id = spec["id"]
        anything = LIFECYCLE | {"draining"}
        moves = [Call("create (sequence)", anything, "POST", "/v1/dynos", body,
                      timeout_s=LIFECYCLE_S),
                 Call("create other (sequence)", anything, "POST", "/v1/dynos", other,
                      timeout_s=LIFECYCLE_S),
                 Call("stop (sequence)", anything, "POST", f"/v1/dynos/{dyno_id}/stop",
                      timeout_s=LIFECYCLE_S),
                 Call("restart (sequence)", anything, "POST", f"/v1/dynos/{dyno_id}/restart",
                      timeout_s=LIFECYCLE_S),
                 Call("signal (sequence)", anything, "POST", f"/v1/dynos/{dyno_id}/signal",
                      json.dumps({"signal": self.rng.choice(("USR1", "KILL", "TERM"))}).encode(),
                      timeout_s=LIFECYCLE_S),
                 Call("delete (sequence)", anything, "DELETE", f"/v1/dynos/{dyno_id}",
                      timeout_s=LIFECYCLE_S),
                 Call("get (sequence)", anything, "GET", f"/v1/dynos/{dyno_id}")]
        return [moves[0], *(self.rng.choice(moves) for _ in range(self.rng.randrange(4, 14)))]

    def cleanup(self) -> list[str]:
        statuses = self.agent.api("GET", "/v1/dynos", timeout_s=10)
        calls = [Call("delete (clean-up)", frozenset({OK, "not_found"}), "DELETE",
                      f"/v1/dynos/{s['id']}", timeout_s=LIFECYCLE_S) for s in statuses]
        found = self.run(calls, parallel=True)
        self.known.clear()
        return found


pytestmark = pytest.mark.timeout(TEST_TIMEOUT_S)


@pytest.fixture(scope="module")
def host() -> Iterator[TestHost]:
    with new_test_host("fz") as test_host:
        yield test_host


def test_fuzzing_operator_api(host: TestHost, rng: random.Random, seed: int,
                              budget_s: float) -> None:
    def prepare(agent: AgentProcess) -> None:
        (agent.base / "slug").mkdir()
        (agent.base / "slug" / "Procfile").write_text("worker: sleep 600\n")

    with agent_in_host(host, prepare=prepare, log_level="info", boot_timeout_s=5) as agent:
        watch = AgentWatch(agent, seed)
        fuzzer = ApiFuzzer(agent, rng, str(agent.base / "slug"), unique("fz", 4))
        steps: list[tuple[str, Callable[[], list[str]]]] = [
            ("requests", lambda: fuzzer.run([fuzzer.structured()
                                             for _ in range(rng.randrange(1, 12))])),
            ("bodies", lambda: fuzzer.run([fuzzer.hostile_body()
                                           for _ in range(rng.randrange(1, 4))])),
            ("garbage", lambda: fuzzer.run([fuzzer.garbage() for _ in range(rng.randrange(1, 6))])),
            ("sequence", lambda: fuzzer.run(fuzzer.sequence(), parallel=True)),
            ("flood", lambda: fuzzer.run([Call("flood info", frozenset({OK}))] * 200,
                                         parallel=True)),
            ("clean-up", fuzzer.cleanup),
        ]
        weights = [6, 2, 2, 1, 1, 1]
        deadline = time.monotonic() + budget_s
        count = 0
        while time.monotonic() < deadline:
            name, step = rng.choices(steps, weights)[0]
            count += 1
            watch.found(*step())
            watch.check(name)
        watch.found(*fuzzer.cleanup())
        watch.check("clean-up")
        print(f"{count} steps, {fuzzer.calls} calls; outcomes "
              f"{dict(fuzzer.outcomes.most_common(40))}\n{watch.summary()}\n"
              f"{len(fuzzer.timeouts)} answered 504 timeout: {fuzzer.timeouts[:10]}")
        watch.verdict()
