"""dynocoord.etcd without an etcd: the wire encoding, error mapping, endpoint order, backoff,
the watch stream's framing, the failover rules of `call` (over a fake transport) and the
lease keeper's decisions (over a fake client)."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from typing import Any, cast

import pytest

from dynocoord import etcd
from dynocoord.etcd import (
    Compare,
    CompareResult,
    Delete,
    Endpoints,
    EtcdClient,
    EtcdCompacted,
    EtcdError,
    EtcdOutcomeUnknown,
    EtcdUnavailable,
    EventType,
    Get,
    Lease,
    LeaseKeeper,
    LeaseNotFound,
    LineSplitter,
    Put,
    backoff_s,
    decode_bytes,
    decode_error,
    decode_int,
    decode_kv,
    decode_txn,
    decode_watch_message,
    encode_bytes,
    encode_op,
    keepalive_retry_s,
    parse_endpoints,
    prefix_range_end,
    safe_to_retry_write,
)

# -- encoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"a", b"\x00\xff\n", bytes(range(256))])
def test_bytes_round_trip(data: bytes) -> None:
    assert decode_bytes(encode_bytes(data)) == data


@pytest.mark.parametrize("text", ["not base64!", "YWJ", 12, None])
def test_bad_base64_is_an_etcd_error(text: Any) -> None:
    with pytest.raises(EtcdError):
        decode_bytes(text)


@pytest.mark.parametrize(("value", "expected"), [(None, 0), ("0", 0), ("42", 42), (7, 7),
                                                 ("9223372036854775807", 2**63 - 1)])
def test_int64_fields(value: Any, expected: int) -> None:
    assert decode_int(value) == expected


@pytest.mark.parametrize("value", ["x", "1.5", True, 1.0, []])
def test_bad_int64_fields(value: Any) -> None:
    with pytest.raises(EtcdError):
        decode_int(value)


@pytest.mark.parametrize(("prefix", "end"), [
    (b"a", b"b"),
    (b"/apps/", b"/apps0"),
    (b"a\xff", b"b"),
    (b"a\xff\xff", b"b"),
    (b"\xff\xff", b"\0"),
    (b"", b"\0"),
])
def test_prefix_range_end(prefix: bytes, end: bytes) -> None:
    assert prefix_range_end(prefix) == end


def test_key_value_with_omitted_defaults() -> None:
    kv = decode_kv({"key": encode_bytes(b"/k"), "mod_revision": "9"})
    assert (kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease) == (
        b"/k", b"", 0, 9, 0, 0)


def test_compare_encoding() -> None:
    assert Compare.mod_revision(b"k", 0).encode() == {
        "key": "aw==", "target": "MOD", "result": "EQUAL", "mod_revision": "0"}
    assert Compare.version(b"k", 3, CompareResult.GREATER).encode()["version"] == "3"
    assert Compare.create_revision(b"k", 0).encode()["create_revision"] == "0"
    assert Compare.value_is(b"k", b"v").encode()["value"] == "dg=="
    assert Compare.lease(b"k", 255).encode()["lease"] == "255"
    with pytest.raises(ValueError):
        Compare(b"k", etcd.Target.VALUE, 1).encode()
    with pytest.raises(ValueError):
        Compare(b"k", etcd.Target.MOD, b"1").encode()


def test_op_encoding() -> None:
    assert encode_op(Put(b"k", b"v", lease=16)) == {
        "request_put": {"key": "aw==", "value": "dg==", "lease": "16"}}
    assert encode_op(Put(b"k", b"")) == {"request_put": {"key": "aw==", "value": ""}}
    assert encode_op(Delete(b"a", prefix=True)) == {
        "request_delete_range": {"key": "YQ==", "range_end": "Yg=="}}
    assert encode_op(Get(b"a", prefix=True, limit=2)) == {
        "request_range": {"key": "YQ==", "range_end": "Yg==", "limit": "2"}}


def test_txn_answer() -> None:
    kv = {"key": encode_bytes(b"k"), "value": encode_bytes(b"v"), "mod_revision": "4"}
    result = decode_txn({"header": {"revision": "7"}, "succeeded": True, "responses": [
        {"response_range": {"kvs": [kv], "count": "1"}},
        {"response_put": {"header": {}}},
        {"response_delete_range": {"deleted": "2"}}]})
    assert result.succeeded and result.revision == 7
    assert result.responses[0].kvs[0].value == b"v"
    assert result.responses[1] == etcd.OpResult()
    assert result.responses[2].deleted == 2
    # proto3 JSON omits false: a failed transaction has no "succeeded" at all.
    assert not decode_txn({"header": {"revision": "7"}}).succeeded


# -- errors -----------------------------------------------------------------------------------

def _body(code: int, message: str) -> bytes:
    return json.dumps({"error": message, "message": message, "code": code}).encode()


@pytest.mark.parametrize(("status", "body", "kind"), [
    (400, _body(11, "etcdserver: mvcc: required revision has been compacted"), EtcdCompacted),
    (400, _body(11, "etcdserver: mvcc: required revision is a future revision"), EtcdError),
    (404, _body(5, "etcdserver: requested lease not found"), LeaseNotFound),
    (503, _body(14, "etcdserver: no leader"), EtcdUnavailable),
    (500, _body(1, "grpc: the client connection is closing"), EtcdUnavailable),
    (504, _body(4, "etcdserver: request timed out"), EtcdUnavailable),
    (502, b"<html>bad gateway</html>", EtcdUnavailable),
    (400, _body(3, "invalid character"), EtcdError),
    (400, b"not json", EtcdError),
])
def test_error_mapping(status: int, body: bytes, kind: type[EtcdError]) -> None:
    error = decode_error(status, body, "http://e:2379")
    assert type(error) is kind
    assert error.endpoint == "http://e:2379"


def test_stream_error_shape() -> None:
    error = etcd.error_from_object(
        {"error": {"grpc_code": 14, "http_code": 503, "message": "unavailable"}}, 200)
    assert isinstance(error, EtcdUnavailable) and error.message == "unavailable"


def test_only_no_leader_writes_are_retried_elsewhere() -> None:
    assert safe_to_retry_write(EtcdUnavailable("etcdserver: no leader", code=14))
    assert not safe_to_retry_write(EtcdUnavailable("etcdserver: leader changed", code=14))
    assert not safe_to_retry_write(EtcdUnavailable("etcdserver: request timed out", code=4))


# -- endpoints and backoff --------------------------------------------------------------------

def test_parse_endpoints() -> None:
    assert parse_endpoints(" http://a:2379/ ,https://b:2379,http://a:2379") == (
        "http://a:2379", "https://b:2379")
    assert parse_endpoints(["http://[::1]:2379"]) == ("http://[::1]:2379",)


@pytest.mark.parametrize("text", ["", " , ", "a:2379", "ftp://a:2379", "http://a:2379/v3",
                                  "http://:2379"])
def test_bad_endpoints(text: str) -> None:
    with pytest.raises(ValueError):
        parse_endpoints(text)


def test_endpoint_order_moves_past_failures_and_sticks_to_success() -> None:
    endpoints = Endpoints(["a", "b", "c"])
    assert endpoints.order() == ["a", "b", "c"]
    endpoints.failed("a")
    assert endpoints.order() == ["b", "c", "a"]
    endpoints.failed("a")  # not the preferred one any more: nothing changes
    assert endpoints.order() == ["b", "c", "a"]
    endpoints.succeeded("c")
    assert endpoints.order() == ["c", "a", "b"]
    endpoints.failed("c")
    assert endpoints.preferred == "a"


def test_backoff_grows_with_jitter_and_caps() -> None:
    rng = random.Random(1)
    for attempt in range(40):
        base = min(etcd.BACKOFF_MAX_S, etcd.BACKOFF_MIN_S * 2 ** attempt)
        delay = backoff_s(attempt, rng)
        assert base / 2 <= delay <= base
    assert backoff_s(100, rng) <= etcd.BACKOFF_MAX_S


def test_keepalive_retry_stops_at_the_lease_deadline() -> None:
    rng = random.Random(1)
    assert keepalive_retry_s(now=10.0, deadline=10.0, attempt=0, rng=rng) is None
    assert keepalive_retry_s(now=11.0, deadline=10.0, attempt=0, rng=rng) is None
    assert keepalive_retry_s(now=9.99, deadline=10.0, attempt=5, rng=rng) == pytest.approx(0.01)
    delay = keepalive_retry_s(now=0.0, deadline=10.0, attempt=10, rng=rng)
    assert delay is not None and delay <= etcd.KEEPALIVE_RETRY_MAX_S


# -- the watch stream -------------------------------------------------------------------------

def test_line_splitter_reassembles_messages_across_chunks() -> None:
    splitter = LineSplitter(max_bytes=64)
    assert splitter.feed(b'{"a":') == []
    assert splitter.feed(b'1}\n\n{"b":2}\n{"c"') == [b'{"a":1}', b'{"b":2}']
    assert splitter.feed(b":3}\n") == [b'{"c":3}']
    with pytest.raises(EtcdError, match="exceeds"):
        splitter.feed(b"x" * 65)


def test_watch_messages() -> None:
    created = decode_watch_message({"result": {"header": {"revision": "5"}, "created": True}})
    assert created.created and created.revision == 5 and not created.events
    kv = {"key": encode_bytes(b"k"), "mod_revision": "6"}
    changed = decode_watch_message({"result": {"header": {"revision": "6"}, "events": [
        {"kv": {**kv, "value": encode_bytes(b"v")}},
        {"type": "DELETE", "kv": kv, "prev_kv": {**kv, "value": encode_bytes(b"old")}}]}})
    assert [e.type for e in changed.events] == [EventType.PUT, EventType.DELETE]
    assert changed.events[1].prev_kv is not None
    assert changed.events[1].prev_kv.value == b"old"
    canceled = decode_watch_message({"result": {"canceled": True, "compact_revision": "3"}})
    assert canceled.canceled and canceled.compact_revision == 3
    with pytest.raises(EtcdUnavailable):
        decode_watch_message({"error": {"grpc_code": 14, "message": "no leader"}})
    with pytest.raises(EtcdError):
        decode_watch_message({"result": {"events": ["x"]}})


# -- failover in call() -----------------------------------------------------------------------

Outcome = tuple[int, bytes] | type[Exception]
OK = (200, b'{"header": {"revision": "3"}}')


class FakeTransportClient(EtcdClient):
    """An EtcdClient whose transport answers from a script: endpoint -> outcome."""

    def __init__(self, script: dict[str, Outcome]) -> None:
        super().__init__(list(script), timeout_s=1.0)
        self.script = script
        self.tried: list[str] = []

    async def _post(self, url: str, path: str, payload: bytes,
                    timeout_s: float) -> tuple[int, bytes]:
        self.tried.append(url)
        outcome = self.script[url]
        if isinstance(outcome, tuple):
            return outcome
        raise outcome("scripted")


A, B = "http://a:1", "http://b:1"
NOT_SENT = etcd._NotSent
LOST = etcd._AnswerLost


@pytest.mark.parametrize(("script", "mutating", "tried", "preferred"), [
    ({A: NOT_SENT, B: OK}, True, [A, B], B),
    ({A: LOST, B: OK}, False, [A, B], B),
    ({A: (503, _body(14, "etcdserver: no leader")), B: OK}, True, [A, B], B),
    ({A: (503, _body(14, "etcdserver: leader changed")), B: OK}, False, [A, B], B),
    ({A: OK, B: NOT_SENT}, True, [A], A),
])
async def test_call_moves_to_the_next_endpoint(script: dict[str, Outcome], mutating: bool,
                                               tried: list[str], preferred: str) -> None:
    client = FakeTransportClient(script)
    answer = await client.call("/v3/kv/put", {}, mutating=mutating)
    assert answer["header"]["revision"] == "3"
    assert client.tried == tried
    assert client.endpoints.preferred == preferred


@pytest.mark.parametrize("outcome", [LOST, (503, _body(14, "etcdserver: leader changed")),
                                     (504, _body(4, "etcdserver: request timed out"))])
async def test_a_write_that_may_have_applied_is_not_retried(outcome: Outcome) -> None:
    client = FakeTransportClient({A: outcome, B: OK})
    with pytest.raises(EtcdOutcomeUnknown):
        await client.call("/v3/kv/put", {}, mutating=True)
    assert client.tried == [A]


async def test_no_endpoint_answering_names_each_failure() -> None:
    client = FakeTransportClient({A: NOT_SENT, B: (503, _body(14, "etcdserver: no leader"))})
    with pytest.raises(EtcdUnavailable) as caught:
        await client.call("/v3/kv/range", {}, mutating=False)
    assert not isinstance(caught.value, EtcdOutcomeUnknown)
    assert A in str(caught.value) and "no leader" in str(caught.value)


async def test_an_api_error_is_raised_without_trying_elsewhere() -> None:
    client = FakeTransportClient({A: (400, _body(3, "bad request")), B: OK})
    with pytest.raises(EtcdError, match="bad request") as caught:
        await client.call("/v3/kv/range", {}, mutating=False)
    assert not isinstance(caught.value, EtcdUnavailable)
    assert client.tried == [A]


async def test_keepalive_answers() -> None:
    client = FakeTransportClient({A: (200, b'{"result": {"ID": "16", "TTL": "4"}}')})
    assert await client.keepalive_once(16) == 4
    client.script[A] = (200, b'{"result": {"ID": "16"}}')  # no TTL: the lease is gone
    with pytest.raises(LeaseNotFound):
        await client.keepalive_once(16)
    client.script[A] = (200, b'{"error": {"grpc_code": 14, "message": "closing"}}')
    with pytest.raises(EtcdUnavailable):
        await client.keepalive_once(16)


# -- the lease keeper -------------------------------------------------------------------------

class FakeLeaseClient:
    """Answers keep-alives from a list of outcomes (an int TTL or an exception), then
    repeats the last one."""

    timeout_s = 1.0

    def __init__(self, *outcomes: int | EtcdError) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0

    async def keepalive_once(self, lease_id: int, *, timeout_s: float | None = None) -> int:
        self.calls += 1
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, EtcdError):
            raise outcome
        return outcome


@pytest.fixture
def keepers() -> Iterator[list[LeaseKeeper]]:
    made: list[LeaseKeeper] = []
    yield made
    for keeper in made:
        assert keeper._task.done(), "a keeper task outlived its test"


async def _keeper(fake: FakeLeaseClient, ttl_s: int, age_s: float,
                  made: list[LeaseKeeper]) -> LeaseKeeper:
    granted_at = asyncio.get_running_loop().time() - age_s
    keeper = LeaseKeeper(cast(EtcdClient, fake), Lease(id=16, ttl_s=ttl_s),
                         granted_at=granted_at, rng=random.Random(1))
    made.append(keeper)
    return keeper


async def test_keeper_loses_a_lease_etcd_says_is_gone(keepers: list[LeaseKeeper]) -> None:
    keeper = await _keeper(FakeLeaseClient(LeaseNotFound("gone")), 5, 0, keepers)
    await asyncio.wait_for(keeper.lost.wait(), timeout=1)
    assert keeper.reason == "gone"
    await keeper.stop()


async def test_keeper_loses_the_lease_when_etcd_is_away_past_its_deadline(
        keepers: list[LeaseKeeper]) -> None:
    fake = FakeLeaseClient(EtcdUnavailable("down"))
    keeper = await _keeper(fake, 1, 0.7, keepers)  # 0.3 s left
    await asyncio.wait_for(keeper.lost.wait(), timeout=1.5)
    assert "deadline" in keeper.reason and fake.calls >= 2  # it retried before giving up
    await keeper.stop()


async def test_keeper_survives_a_short_outage(keepers: list[LeaseKeeper]) -> None:
    fake = FakeLeaseClient(EtcdUnavailable("blip"), EtcdUnavailable("blip"), 1)
    keeper = await _keeper(fake, 1, 0.0, keepers)
    await asyncio.sleep(0.8)
    assert not keeper.lost.is_set() and fake.calls >= 3
    await keeper.stop()
