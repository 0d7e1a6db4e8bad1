"""A fuzzing coordinator against the real agent: structured requests with hostile values,
envelope garbage, frames around the 16 and 32 MiB limits, floods and interleaved
start/stop/restart/signal/sync/drain sequences, then a mass removal. After every batch the
agent must be alive and responsive with bounded RSS and a clean log (tests/fuzz/health.py),
every answer must be one docs/protocol.md allows (tests/fuzz/oracle.py), no bad frame may
close the connection (§7) except one over the hard limit (§8), and `dyno.state` events must
come without gap or duplicate within a connection (§5)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest

from tests.e2e.test_supervision import agent_in_host
from tests.fuzz import generate as gen
from tests.fuzz import oracle
from tests.fuzz.contract import ID_MAX, coordinator_error_codes, frame_limits
from tests.fuzz.health import AgentWatch, Violation
from tests.fuzz.settings import MASS_DYNOS, TEST_TIMEOUT_S
from tests.support.agentproc import AgentProcess
from tests.support.coordinator import CoordinatorThread, TestCoordinator
from tests.support.names import unique
from tests.support.testhost import TestHost, new_test_host

LIVE_MAX = 6  # valid dynos the fuzzer keeps at most (they run `sleep`)
# An error answer quotes a bounded excerpt of what it refuses (item 3).
ERROR_ANSWER_MAX_BYTES = 64 * 1024
SENTINEL_DEADLINE_S = 10.0
REQUEST_DEADLINE_S = 60.0  # §2: at least stop_timeout_s + 15 s for methods that stop dynos
RECONNECT_DEADLINE_S = 30.0
SEND_DEADLINE_S = 30.0
# A removal a sync reports as failed (`timeout`) must have happened by then.
UNREMOVABLE_S = 60.0
STEP_DEADLINE_S = 240.0
MASS_PROBE_DEADLINE_S = 1.0
DOCUMENTED = coordinator_error_codes()


@dataclass(frozen=True)
class Send:
    """One message to send: a well-formed request (`request_id` and `allowed` outcomes for
    its answer), or anything else (`allowed` outcomes of the frame itself)."""

    label: str
    data: bytes | str
    allowed: frozenset[str]
    request_id: int | None = None
    readable_id: int | None = None  # the id a bad frame's answer may echo
    # A frame the depth bound may refuse while decoding, before its id is read: answered
    # inline (id nil), or else handled as a request or ignored. Sent alone (see exchange).
    refusable: bool = False

    @property
    def is_request(self) -> bool:
        return self.request_id is not None


@dataclass
class Pending:
    label: str
    allowed: frozenset[str]
    sent_at: float
    connection: int  # a request in flight when its connection closes is never answered (§4)
    expected: int = 1


@dataclass
class Fuzzer:
    """The fuzzing coordinator's state; its async methods run on the coordinator's loop."""

    thread: CoordinatorThread
    agent: AgentProcess
    rng: random.Random
    slug: str
    prefix: str
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(10**6))
    pending: dict[int, Pending] = field(default_factory=dict)
    request_ids: set[int] = field(default_factory=set)
    known: set[str] = field(default_factory=set)  # every id a valid start or sync sent
    live: set[str] = field(default_factory=set)
    generation: int = 0
    scanned: int = 0
    last_seq: dict[int, int] = field(default_factory=dict)
    seqs: set[int] = field(default_factory=set)
    allowed_connections: int = 1
    outcomes: Counter[str] = field(default_factory=Counter)
    frames_sent: int = 0
    violations: list[str] = field(default_factory=list)
    # dyno id -> (first seen, failure) for removals that syncs keep reporting as failed
    unremovable: dict[str, tuple[float, dict[str, Any]]] = field(default_factory=dict)

    @property
    def co(self) -> TestCoordinator:
        assert self.thread.coordinator is not None
        return self.thread.coordinator

    # -- building messages -------------------------------------------------------------------
    def new_id(self) -> str:
        return f"{self.prefix}-{next(self.ids)}"

    def request(self, label: str, method: str, params: Any, *, spec_valid: bool | None = None,
                extra: frozenset[str] = frozenset()) -> Send:
        rid = next(self.ids)
        allowed = oracle.params_outcome(method, params, known_ids=self.known,
                                        spec_valid=spec_valid) | {"busy"} | extra
        data = gen.pack({"t": "req", "id": rid, "m": method, "p": params})
        return Send(label, data, allowed, request_id=rid,
                    refusable="malformed_frame" in allowed)

    def raw(self, label: str, data: bytes | str, readable_id: int | None = None) -> Send:
        """A message whose outcome the oracle derives from what it decodes to."""
        if isinstance(data, str):
            return Send(label, data, frozenset({"malformed_frame"}))
        answered, hard = frame_limits()
        if len(data) > hard:
            return Send(label, data, frozenset({"closed"}))
        if len(data) > answered:
            return Send(label, data, frozenset({"frame_too_large"}))
        try:
            value = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except (ValueError, TypeError, msgpack.UnpackException):
            # Not one msgpack value; a header that promises more values than a frame can
            # hold may be refused as too large before it is read.
            return Send(label, data, frozenset({"malformed_frame", "frame_too_large"}),
                        readable_id=readable_id)
        if readable_id is None and isinstance(value, dict) and oracle.valid_id(value.get("id")):
            readable_id = value["id"]
        allowed = oracle.envelope(value)
        if allowed is None:
            raise AssertionError(f"{label}: raw() is for frames that are not requests")
        if oracle.depth(value) > oracle.DEPTH_LIMIT:
            return Send(label, data, allowed | {"malformed_frame"}, readable_id=readable_id,
                        refusable=oracle.IGNORED in allowed)
        return Send(label, data, allowed, readable_id=readable_id)

    def spec_case(self, dyno_id: str | None = None) -> gen.SpecCase:
        base = gen.valid_spec(self.rng, dyno_id or self.new_id(), "fz", self.slug)
        if self.rng.random() < 0.3:
            return gen.SpecCase("valid", base, True)
        return gen.mutate_spec(self.rng, base, msgpack_safe=True)

    def target_id(self) -> Any:
        roll = self.rng.random()
        if roll < 0.5 and self.known:
            return self.rng.choice(sorted(self.known))
        if roll < 0.7:
            return self.new_id()
        return self.rng.choice((gen.text(self.rng).value, gen.any_value(self.rng).value,
                                "web.1", "a" * 65, "Web-1"))

    def structured(self) -> Send:
        method = self.rng.choice((*oracle.METHODS, "dyno.delete", "agent.shutdown",
                                  gen.text(self.rng).value[:128] or "x"))
        if method == "dyno.start":
            case = self.spec_case()
            if case.valid is not False and len(self.live) >= LIVE_MAX:
                case = gen.SpecCase("invalid", {**case.spec, "size": "nope"}, False)
            if case.valid is not False and isinstance(case.spec.get("id"), str):
                self.known.add(case.spec["id"])
            return self.request(f"dyno.start {case.label}", method, case.spec,
                                spec_valid=case.valid)
        if method in ("dyno.stop", "dyno.restart"):
            params: dict[str, Any] = {"id": self.target_id()}
        elif method == "dyno.signal":
            sig = (self.rng.choice(gen.SIGNALS_OK) if self.rng.random() < 0.3
                   else self.rng.choice((gen.text(self.rng).value, gen.integer(self.rng).value,
                                         self.rng.choice(gen.UNICODE_NUMBERS),
                                         gen.any_value(self.rng).value)))
            params = {"id": self.target_id(), "signal": sig}
        elif method == "agent.drain":
            params = self.rng.choice(({}, {"cancel": True}, {"stop": True, "cancel": True},
                                      {"cancel": gen.any_value(self.rng).value}))
        elif method == "dynos.sync":
            return self.sync_request()
        else:
            params = {}
        if self.rng.random() < 0.2:  # an unknown or a wrongly typed key
            params[gen.text(self.rng).value] = gen.any_value(self.rng).value
        if self.rng.random() < 0.1 and params:
            del params[self.rng.choice(sorted(params, key=repr))]
        label = method if method in oracle.METHODS else f"unknown-method {method[:40]!r}"
        return self.request(label, method, params)

    def next_generation(self) -> int:
        return min(self.generation + 1, ID_MAX)

    def sync_request(self) -> Send:
        generation: Any = self.next_generation()
        roll = self.rng.random()
        if roll < 0.3:
            generation = self.rng.choice((0, self.generation, ID_MAX, ID_MAX + 1, 2**64 - 1, -1,
                                          gen.any_value(self.rng).value))
        specs: list[Any] = [gen.valid_spec(self.rng, i, "fz", self.slug)
                            for i in self.rng.sample(sorted(self.live), min(len(self.live), 2))]
        valid: bool | None = True
        if self.rng.random() < 0.5:
            case = self.spec_case()
            specs.append(case.spec)
            valid = case.valid
        elif self.rng.random() < 0.2 and specs:
            specs.append(dict(specs[0]))  # a duplicate id
            valid = False
        for spec in specs:
            if valid is not False and isinstance(spec.get("id"), str):
                self.known.add(spec["id"])
        dynos: Any = specs
        if self.rng.random() < 0.1:
            dynos, valid = gen.any_value(self.rng).value, None
        return self.request(f"dynos.sync generation={str(generation)[:30]}", "dynos.sync",
                            {"generation": generation, "dynos": dynos}, spec_valid=valid)

    def garbage(self) -> Send:
        roll = self.rng.randrange(9)
        rid = next(self.ids)
        base: dict[str, Any] = {"t": "req", "id": rid, "m": "agent.info", "p": {}}
        if roll == 0:
            return self.raw("text frame", gen.text(self.rng).value or "{}")
        if roll == 1:
            data = gen.garbage_bytes(self.rng)
            with contextlib.suppress(ValueError, TypeError, msgpack.UnpackException):
                if oracle.envelope(msgpack.unpackb(data, raw=False,
                                                   strict_map_key=False)) is None:
                    data = b"\xc1"  # random bytes that happen to be a request: skip them
            return self.raw("garbage bytes", data)
        if roll in (2, 3):  # one envelope field replaced by a hostile value
            key = self.rng.choice(("t", "id", "m", "p"))
            value = gen.any_value(self.rng)
            frame = {**base, key: value.value}
            readable = rid if key != "id" else None
            if oracle.envelope(frame) is None:  # still a request (e.g. m another method)
                frame["t"] = "evt"
            return self.raw(f"envelope {key}={value.label}", gen.pack(frame), readable)
        if roll == 4:  # a field nested far deeper than any frame needs (item 1)
            key = self.rng.choice(("t", "id", "m", "p", "e", "x"))
            nested = gen.deep_msgpack(self.rng.choice((33, 100, 999, 1000, 1024, 5000, 50_000)),
                                      self.rng.random() < 0.5)
            kind = self.rng.choice(("req", "res", "evt"))
            fields = {**base, "t": kind}
            if kind == "res":
                fields = {"t": kind, "id": rid, "e": {"code": "x"}}
            items = [(k, gen.pack(v)) for k, v in fields.items() if k != key]
            data = gen.raw_map([*items, (key, nested)])
            if kind == "req" and key in ("p", "x", "e"):
                # Deep params or an unknown deep key: a request unless the bound refuses it.
                return Send(f"deep {key} in req", data,
                            frozenset({oracle.OK, "bad_request", "malformed_frame", "busy"}),
                            request_id=rid, refusable=True)
            return self.raw(f"deep {key} in {kind}", data, rid if key != "id" else None)
        if roll == 5:  # well-formed frames the agent must ignore
            frame = self.rng.choice((
                {"t": "evt", "m": gen.text(self.rng).value[:128] or "x",
                 "p": {"k": gen.any_value(self.rng).value}},
                {"t": "res", "id": rid, "p": gen.any_value(self.rng).value},
                {"t": "res", "id": rid, "e": {"code": "nope", "message": "x"}}))
            return self.raw("ignored frame", gen.pack(frame))
        if roll == 6:  # exactly one of p and e, ids out of range, bool ids
            frame = self.rng.choice(({"t": "res", "id": rid}, {"t": "res", "id": rid, "p": 1,
                                                               "e": {"code": "x"}},
                                     {**base, "id": True}, {**base, "id": ID_MAX + 1},
                                     {**base, "id": -1}, {**base, "m": ""},
                                     {**base, "m": "a" * 129}, {**base, "t": "REQ"}))
            return self.raw("envelope edge", gen.pack(frame),
                            rid if frame.get("id") == rid else None)
        if roll == 7:  # unknown envelope keys are ignored: still a request
            frame = {**base, gen.text(self.rng).value or "z": gen.any_value(self.rng).value}
            deep = oracle.depth(frame) > oracle.DEPTH_LIMIT
            allowed = {oracle.OK, "busy"} | ({"malformed_frame"} if deep else set())
            return Send("unknown envelope key", gen.pack(frame), frozenset(allowed),
                        request_id=rid, refusable=deep)
        return self.raw("non-map", gen.pack(gen.any_value(self.rng).value)
                        if gen.packable(gen.any_value(self.rng).value) else b"\x93\x01\x02\x03")

    # -- exchanging ----------------------------------------------------------------------------
    async def exchange(self, sends: list[Send], label: str) -> None:
        """Send everything, then an `agent.info` sentinel: bad frames are answered inline as
        they are read, so their answers all come before the sentinel's. Refusable requests
        go alone, so that an inline answer can only be theirs."""
        batch = [s for s in sends if not s.refusable]
        if batch:
            await self._exchange(batch, label)
        for send in sends:
            if send.refusable:
                await self._exchange([send], label)

    async def _exchange(self, sends: list[Send], label: str) -> None:
        co = self.co
        conn = await co.wait_connected(RECONNECT_DEADLINE_S)
        number = co.connections.index(conn) + 1
        start = len(co.received)
        now = time.monotonic()
        for send in sends:
            if send.request_id is not None:
                entry = self.pending.get(send.request_id)
                if entry is None:
                    self.pending[send.request_id] = Pending(send.label, send.allowed, now,
                                                            number)
                else:
                    entry.expected += 1
                self.request_ids.add(send.request_id)
            try:
                # An agent that stops reading without closing would block the write for good.
                async with asyncio.timeout(SEND_DEADLINE_S):
                    if isinstance(send.data, str):
                        await conn.ws.send_str(send.data)
                    else:
                        await conn.ws.send_bytes(send.data)
            except TimeoutError:
                self.violations.append(f"{label}: the agent read nothing of {send.label} for "
                                       f"{SEND_DEADLINE_S:g}s")
                await conn.ws.close()
                return
            except ConnectionError as exc:
                if "closed" in send.allowed:
                    break  # the agent closed while this frame was being written: as §8 says
                self.violations.append(f"{label}: the connection was closed while sending "
                                       f"{send.label} ({exc})")
                return
            self.frames_sent += 1
        if any("closed" in s.allowed for s in sends):
            self.allowed_connections += 1
            await co.wait_until(lambda: len(co.connections) >= self.allowed_connections
                                and co.current, RECONNECT_DEADLINE_S, "reconnect after 1009")
            return
        end = await self.sentinel(conn)
        if end is None:
            self.violations.append(f"{label}: the agent closed the connection (code "
                                   f"{conn.ws.close_code}) after "
                                   f"{[s.label for s in sends][:10]}")
            return
        window = [r.frame for r in co.received[start:end]
                  if r.connection == number and r.frame.get("t") == "res"
                  and r.frame.get("id") not in self.request_ids]
        if len(sends) == 1 and sends[0].refusable:
            if not window:
                return  # handled as a request (answered by id) or ignored
            # Refused while decoding: its answer is this one, not a response by id.
            self.pending.pop(sends[0].request_id or -1, None)
            sends = [dataclasses.replace(sends[0], request_id=None, refusable=False,
                                         allowed=sends[0].allowed - {oracle.IGNORED})]
        expected = [s for s in sends if not s.is_request and oracle.IGNORED not in s.allowed]
        if len(window) != len(expected):
            self.violations.append(
                f"{label}: {len(expected)} bad frames should have been answered, got "
                f"{len(window)} answers: {[_short(f) for f in window][:5]} for "
                f"{[s.label for s in expected][:10]}")
            return
        for send, answer in zip(expected, window, strict=True):
            code = (answer.get("e") or {}).get("code")
            self.outcomes[f"frame:{code}"] += 1
            if code not in send.allowed or code not in DOCUMENTED:
                self.violations.append(f"{label}: {send.label} answered {_short(answer)}; "
                                       f"allowed {sorted(send.allowed)}")
            if answer.get("id") not in (None, send.readable_id):
                self.violations.append(f"{label}: {send.label} answered with id "
                                       f"{answer.get('id')}, not {send.readable_id} or nil")
            self.check_size(send.label, answer)

    async def sentinel(self, conn: Any) -> int | None:
        """The index after the sentinel's answer; None when the connection closed."""
        co = self.co
        while True:
            sid = next(self.ids)
            self.request_ids.add(sid)
            start = len(co.received)
            try:
                async with asyncio.timeout(SEND_DEADLINE_S):
                    await conn.ws.send_bytes(gen.pack({"t": "req", "id": sid,
                                                       "m": "agent.info"}))
            except (ConnectionError, TimeoutError):
                return None

            def answered(sid: int = sid, start: int = start) -> int:
                for index in range(start, len(co.received)):
                    frame = co.received[index].frame
                    if frame.get("t") == "res" and frame.get("id") == sid:
                        return index + 1
                return -1 if conn.closed else 0
            try:
                end = await co.wait_until(answered, SENTINEL_DEADLINE_S, "sentinel answer")
            except TimeoutError:
                raise Violation(f"agent.info got no answer within {SENTINEL_DEADLINE_S}s on "
                                f"the coordinator link") from None
            if end < 0:
                return None
            if (co.received[end - 1].frame.get("e") or {}).get("code") != "busy":
                return end
            await asyncio.sleep(0.05)

    def check_size(self, label: str, answer: dict[str, Any]) -> None:
        if "e" in answer:
            size = len(gen.pack(answer))
            if size > ERROR_ANSWER_MAX_BYTES:
                self.violations.append(f"{label}: an error answer of {size} bytes "
                                       f"({_short(answer)})")

    def collect(self) -> list[str]:
        """Check every frame received since the last call (on the coordinator's loop)."""
        co = self.co
        now = time.monotonic()
        for received in co.received[self.scanned:]:
            frame = received.frame
            if frame.get("t") == "evt" and frame.get("m") == "dyno.state":
                seq = frame["p"]["seq"]
                last = self.last_seq.get(received.connection)
                if last is not None and seq != last + 1:
                    self.violations.append(f"dyno.state seq {seq} after {last} on connection "
                                           f"{received.connection}")
                self.last_seq[received.connection] = seq
                self.seqs.add(seq)
            elif frame.get("t") == "evt" and frame.get("m") == "agent.events_lost":
                self.violations.append(f"events lost: {frame.get('p')}")
            elif frame.get("t") == "res" and frame.get("id") in self.pending:
                entry = self.pending[frame["id"]]
                code = (frame.get("e") or {}).get("code") if "e" in frame else oracle.OK
                self.outcomes[f"{(entry.label.split() or ['?'])[0]}:{code}"] += 1
                if code not in entry.allowed or (code != oracle.OK and code not in DOCUMENTED):
                    self.violations.append(f"{entry.label}: answered {_short(frame)}; allowed "
                                           f"{sorted(entry.allowed)}")
                self.check_size(entry.label, frame)
                self.track(entry, frame)
                entry.expected -= 1
                if entry.expected <= 0:
                    del self.pending[frame["id"]]
        self.scanned = len(co.received)
        for rid, entry in list(self.pending.items()):
            if co.connections[entry.connection - 1].closed:
                del self.pending[rid]  # the close itself is a finding, unless §8 allows it
                continue
            if now - entry.sent_at > REQUEST_DEADLINE_S:
                self.violations.append(f"{entry.label} (id {rid}) has had no answer for "
                                       f"{REQUEST_DEADLINE_S:g}s")
        for dyno_id, (since, failure) in self.unremovable.items():
            if now - since > UNREMOVABLE_S:
                self.violations.append(f"dyno {dyno_id!r} has not been removed by syncs for "
                                       f"over {UNREMOVABLE_S:g}s: {_short(failure)}")
        if len(co.connections) > self.allowed_connections:
            self.violations.append(f"the connection was closed: {len(co.connections)} "
                                   f"connections, {self.allowed_connections} expected")
            self.allowed_connections = len(co.connections)
        found, self.violations = self.violations, []
        return found

    def track(self, entry: Pending, frame: dict[str, Any]) -> None:
        """Follow what exists, to keep the fuzzer's own dynos few."""
        result = frame.get("p")
        if not isinstance(result, dict):
            return
        if entry.label.startswith("dyno.start") and isinstance(result.get("id"), str):
            self.live.add(result["id"])
        elif entry.label.startswith("dynos.sync") and not result.get("ignored"):
            self.generation = max(self.generation, int(result.get("applied_generation", 0)))
            now = time.monotonic()
            failing = {f.get("id"): f for f in result.get("failed", [])
                       if f.get("action") in ("remove", "replace")}
            for dyno_id, failure in failing.items():
                since, _ = self.unremovable.get(dyno_id, (now, failure))
                self.unremovable[dyno_id] = (since, failure)
            for dyno_id in set(self.unremovable) - set(failing):
                del self.unremovable[dyno_id]
            self.live = set(result.get("started", [])) | set(result.get("unchanged", [])) | set(
                result.get("replaced", [])) | set(result.get("resumed", []))

    # -- steps ----------------------------------------------------------------------------------
    async def step_requests(self) -> str:
        sends = [self.structured() for _ in range(self.rng.randrange(1, 12))]
        await self.exchange(sends, "requests")
        return f"requests {[s.label for s in sends]}"

    async def step_garbage(self) -> str:
        sends = [self.garbage() for _ in range(self.rng.randrange(1, 16))]
        await self.exchange(sends, "garbage")
        return f"garbage {[s.label for s in sends]}"

    async def step_flood(self) -> str:
        kind = self.rng.choice(("info", "garbage", "signal"))
        count = self.rng.choice((100, 300, 1000))
        if kind == "info":
            sends = [self.request("flood agent.info", "agent.info", {}) for _ in range(count)]
        elif kind == "garbage":
            sends = [self.raw("flood garbage", b"\xc1") for _ in range(count)]
        else:
            target = self.rng.choice(sorted(self.live)) if self.live else self.new_id()
            sends = [self.request("flood dyno.signal", "dyno.signal",
                                  {"id": target, "signal": "USR1"}) for _ in range(count // 3)]
        await self.exchange(sends, f"flood of {count} {kind}")
        return f"flood of {len(sends)} {kind}"

    async def step_sequence(self) -> str:
        """start/stop/restart/signal/sync/drain of one dyno, all in flight at once."""
        case = gen.SpecCase("valid", gen.valid_spec(self.rng, self.new_id(), "fz", self.slug),
                            True)
        spec = case.spec
        self.known.add(spec["id"])
        other = {**spec, "command": "sleep 700"}
        dyno_id = spec["id"]
        # A desired set names each dyno once (app and name): the live dynos' new specs get
        # names of their own (random ones can clash: CI met a set refused for it).
        synced = [gen.valid_spec(self.rng, i, "fz", self.slug) for i in sorted(self.live)[:2]]
        taken = {spec["name"]}
        for body in synced:
            while body["name"] in taken:
                body["name"] = gen.valid_spec(self.rng, body["id"], "fz", self.slug)["name"]
            taken.add(body["name"])
        moves = [("dyno.start", spec), ("dyno.start", other), ("dyno.stop", {"id": dyno_id}),
                 ("dyno.restart", {"id": dyno_id}),
                 ("dyno.signal", {"id": dyno_id, "signal": self.rng.choice(
                     ("USR1", "KILL", "TERM", *gen.UNICODE_NUMBERS))}),
                 ("dynos.sync", {"generation": self.next_generation(),
                                 "dynos": [*synced, spec]}),
                 ("dynos.sync", {"generation": self.next_generation(), "dynos": []}),
                 ("agent.drain", {}), ("agent.drain", {"stop": True}), ("agent.info", {})]
        chosen = [self.rng.choice(moves) for _ in range(self.rng.randrange(4, 14))]
        sends = [self.request(f"{method} (sequence)", method, params, spec_valid=True,
                              extra=frozenset(oracle.STATEFUL))
                 for method, params in [("dyno.start", spec), *chosen]]
        await self.exchange(sends, "sequence")
        # Accept dynos again once everything above has been dispatched.
        await self.exchange([self.request("agent.drain cancel", "agent.drain",
                                          {"cancel": True})], "drain cancel")
        return f"sequence {[s.label for s in sends]}"

    async def step_big(self, size: int) -> str:
        """One frame of exactly `size` bytes: a dyno.start whose app is NULs (item 3),
        refused as a spec below the answered limit, as too large above it."""
        rid = next(self.ids)
        frame: dict[str, Any] = {"t": "req", "id": rid, "m": "dyno.start",
                                 "p": {**gen.valid_spec(self.rng, self.new_id(), "fz",
                                                        self.slug), "app": ""}}
        overhead = len(gen.pack({**frame, "p": {**frame["p"], "app": "\x00" * 70_000}})) - 70_000
        frame["p"]["app"] = "\x00" * (size - overhead)
        data = gen.pack(frame)
        assert len(data) == size, (len(data), size)
        answered, _hard = frame_limits()
        if size <= answered:
            send = Send(f"frame of {size} bytes", data, frozenset({"invalid_spec",
                                                                   "bad_request", "busy"}),
                        request_id=rid)
        else:
            send = self.raw(f"frame of {size} bytes", data, rid)
        await self.exchange([send], f"frame of {size} bytes")
        return f"frame of {size} bytes"

    async def sync(self, dynos: list[dict[str, Any]]) -> dict[str, Any]:
        """A sync the agent applies: a fuzzed frame may have raised the agent's generation
        without the fuzzer seeing the answer, and docs/protocol.md §4's recovery is to send
        again with the generation the agent reports (the same generation is always taken)."""
        answer: dict[str, Any] = await self.co.request(
            "dynos.sync", {"generation": self.next_generation(), "dynos": dynos},
            REQUEST_DEADLINE_S)
        report = answer.get("p") or {}
        if report.get("ignored") and isinstance(report.get("applied_generation"), int):
            self.generation = report["applied_generation"]
            answer = await self.co.request(
                "dynos.sync", {"generation": self.generation, "dynos": dynos},
                REQUEST_DEADLINE_S)
        return answer

    async def step_mass(self, count: int) -> str:
        """Start `count` dynos with one sync, then remove them all with the next while the
        operator API and agent.info are probed (issue 19 item 5)."""
        await self.exchange([self.request("agent.drain cancel", "agent.drain",
                                          {"cancel": True})], "drain cancel")
        specs = [gen.valid_spec(self.rng, self.new_id(), "fz", self.slug) for _ in range(count)]
        ids = sorted(s["id"] for s in specs)
        self.known |= set(ids)
        started = await self.sync(specs)
        report = started.get("p") or {}
        if sorted(report.get("started", [])) != ids:
            self.violations.append(f"mass start: {_short(started)}")
        self.generation = max(self.generation, report.get("applied_generation", 0))

        async def all_up() -> bool:
            statuses = await asyncio.to_thread(self.agent.api, "GET", "/v1/dynos",
                                               None, None, 10)
            return sum(1 for s in statuses if s["id"] in ids and s["state"] == "up") == count
        deadline = time.monotonic() + 60 + 3 * count
        while not await all_up():
            if time.monotonic() > deadline:
                self.violations.append(f"mass start: not all {count} dynos up")
                break
            await asyncio.sleep(0.2)

        probes: list[float] = []
        stop = asyncio.Event()

        async def probe() -> None:
            watch = AgentWatch(self.agent, 0)
            while not stop.is_set():
                try:
                    taken, _ = await asyncio.to_thread(watch.info, 5.0)
                except (TimeoutError, OSError):
                    taken = 5.0
                probes.append(taken)
                await asyncio.sleep(0.05)
        prober = asyncio.create_task(probe())
        began = time.monotonic()
        try:
            removed = await self.sync([])
        finally:
            stop.set()
            await prober
        took = time.monotonic() - began
        report = removed.get("p") or {}
        self.generation = max(self.generation, report.get("applied_generation", 0))
        statuses = await asyncio.to_thread(self.agent.api, "GET", "/v1/dynos", None, None, 10)
        present = {s["id"] for s in statuses}
        gone_but_failed = [f["id"] for f in report.get("failed", []) if f["id"] not in present]
        if gone_but_failed or set(report.get("removed", [])) & present:
            self.violations.append(f"mass removal reported untruthfully: {_short(removed)}; "
                                   f"still present {sorted(present)[:5]}")
        slow = [p for p in probes if p > MASS_PROBE_DEADLINE_S]
        if slow:
            self.violations.append(f"mass removal of {count} dynos ({took:.1f}s): "
                                   f"{len(slow)} of {len(probes)} GET /v1/info probes took "
                                   f"over {MASS_PROBE_DEADLINE_S:g}s (max {max(slow):.1f}s)")
        self.live.clear()
        probes.sort()
        return (f"mass removal of {count} dynos in {took:.1f}s, GET /v1/info max "
                f"{(probes or [0])[-1] * 1000:.0f} ms over {len(probes)} probes")

    async def cleanup(self) -> None:
        await self.exchange([self.request("agent.drain cancel", "agent.drain",
                                          {"cancel": True})], "drain cancel")
        response = await self.co.request("dynos.sync", {"generation": self.generation,
                                                        "dynos": []}, REQUEST_DEADLINE_S)
        if (response.get("p") or {}).get("ignored"):
            await self.co.request("dynos.sync", {"generation": ID_MAX, "dynos": []},
                                  REQUEST_DEADLINE_S)


def _short(frame: Any) -> str:
    text = repr(frame)
    return text if len(text) < 300 else f"{text[:300]}… ({len(text)} characters)"


pytestmark = pytest.mark.timeout(TEST_TIMEOUT_S)


@pytest.fixture(scope="module")
def host() -> Iterator[TestHost]:
    with new_test_host("fz") as test_host:
        yield test_host


def test_fuzzing_coordinator(host: TestHost, rng: random.Random, seed: int, budget_s: float,
                             tmp_path: Path) -> None:
    coordinator = CoordinatorThread(host.name).start()
    token = tmp_path / "token"
    token.write_text("test-token\n")

    def prepare(agent: AgentProcess) -> None:
        (agent.base / "slug").mkdir()
        (agent.base / "slug" / "Procfile").write_text("worker: sleep 600\n")

    try:
        with agent_in_host(host, prepare=prepare, log_level="info", boot_timeout_s=5,
                           coordinator_url=coordinator.url,
                           coordinator_token_file=str(token)) as agent:
            watch = AgentWatch(agent, seed)
            fuzzer = Fuzzer(coordinator, agent, rng, str(agent.base / "slug"), unique("fz", 4))
            coordinator.wait(lambda co: co.current, 15, "agent connected")
            run_fuzz(fuzzer, watch, budget_s)
            print(watch.summary())
            watch.verdict()
    finally:
        coordinator.close()


def run_fuzz(fuzzer: Fuzzer, watch: AgentWatch, budget_s: float) -> None:
    answered, hard = frame_limits()
    required: list[Any] = [
        lambda: fuzzer.step_big(answered), lambda: fuzzer.step_big(answered + 1),
        lambda: fuzzer.step_big(hard), lambda: fuzzer.step_big(hard + 1),
        lambda: fuzzer.step_mass(MASS_DYNOS), fuzzer.step_sequence, fuzzer.step_flood]
    fuzzer.rng.shuffle(required)
    random_steps = [fuzzer.step_requests] * 5 + [fuzzer.step_garbage] * 4 + [
        fuzzer.step_sequence, fuzzer.step_flood]
    deadline = time.monotonic() + budget_s
    steps = 0
    log: list[str] = []
    while time.monotonic() < deadline or required:
        # The required steps are spread over the first half of the budget.
        is_required = bool(required) and (fuzzer.rng.random() < 0.15
                                          or time.monotonic() > deadline - budget_s / 2)
        make = required.pop() if is_required else fuzzer.rng.choice(random_steps)
        try:
            label = fuzzer.thread.run(make(), STEP_DEADLINE_S)
        except TimeoutError:
            print("\n".join(log[-10:]))
            raise watch.fail(f"step {steps + 1} did not finish within {STEP_DEADLINE_S:g}s") \
                from None
        steps += 1
        log.append(label)
        if is_required:
            print(f"step {steps}: {label[:300]}")
        found = fuzzer.thread.snapshot(lambda _co: fuzzer.collect())
        watch.found(*(f"{problem}\n(step {steps}: {label[:300]})" for problem in found))
        try:
            watch.check(label[:500])
        except Violation:
            print("\n".join(log[-10:]))
            raise
    try:
        fuzzer.thread.run(fuzzer.cleanup(), 3 * REQUEST_DEADLINE_S)
    except TimeoutError:
        watch.found(f"the clean-up sync got no answer within {REQUEST_DEADLINE_S:g}s")
    late: list[str] = []

    def settled(_co: TestCoordinator) -> bool:
        late.extend(fuzzer.collect())
        return bool(late) or not fuzzer.pending
    fuzzer.thread.wait(settled, REQUEST_DEADLINE_S + 5, "every request answered")
    watch.found(*late)
    if fuzzer.seqs and fuzzer.seqs != set(range(1, max(fuzzer.seqs) + 1)):
        missing = sorted(set(range(1, max(fuzzer.seqs) + 1)) - fuzzer.seqs)
        watch.found(f"dyno.state seqs missing: {missing[:20]}")
    watch.check("clean-up")
    print(f"{steps} steps, {fuzzer.frames_sent} frames, {len(fuzzer.seqs)} dyno.state events; "
          f"outcomes {dict(fuzzer.outcomes.most_common())}")
