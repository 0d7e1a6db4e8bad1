"""An asyncio client for etcd v3 over its gRPC-gateway JSON API: reads, writes, transactions,
leases and watches, across several endpoints with failover. Keys and values are bytes.

Why the gateway and not a library: the Python etcd v3 clients speak gRPC, which means grpcio
(a large native wheel with its own threads and its own event loop next to asyncio) and
generated protobuf modules pinned to old protobuf releases; the best known of them
(python-etcd3) has not been released in years, and its asyncio forks are thinly maintained.
Every RPC the coordinator needs — Range, Put, DeleteRange, Txn, Compact, LeaseGrant,
LeaseKeepAlive, LeaseRevoke and Watch — is served by etcd itself as HTTP/1.1 + JSON under
`/v3/` (stable since etcd 3.4), and aiohttp is already a dependency, so this module is the
whole client: no new dependency, one event loop, errors of our own. The price is small and
handled here: int64 fields are JSON strings, bytes are base64, a field equal to its default
is omitted, and the two bidirectional streams become one-way ones (a watch is one POST whose
answer is a stream of newline-delimited messages; a lease keep-alive is one POST per refresh).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import random
import ssl
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S: Final = 5.0
# A refused or unroutable endpoint must not eat the whole deadline of a call: the next one
# gets its turn after this long.
DEFAULT_CONNECT_TIMEOUT_S: Final = 1.0
DEFAULT_PAGE_SIZE: Final = 500
# etcd refuses requests over 1.5 MiB by default, but one watch message may carry many events.
MAX_WATCH_MESSAGE_BYTES: Final = 64 << 20
BACKOFF_MIN_S: Final = 0.1
BACKOFF_MAX_S: Final = 5.0
# A keep-alive after a failed one is retried this often at most (the lease's own deadline
# bounds the retries).
KEEPALIVE_RETRY_MAX_S: Final = 0.5

# The gRPC status codes the gateway puts in its error bodies (google.golang.org/grpc/codes).
GRPC_CANCELED: Final = 1
GRPC_DEADLINE_EXCEEDED: Final = 4
GRPC_NOT_FOUND: Final = 5
GRPC_OUT_OF_RANGE: Final = 11
GRPC_UNAVAILABLE: Final = 14
# An Unavailable write is retried on another member only when etcd says it was not applied:
# the same rule as etcd's clientv3 (retry.go, isSafeRetryMutableRPC).
_NOT_APPLIED_MESSAGES: Final = ("etcdserver: no leader",)


class EtcdError(Exception):
    """etcd refused a request or answered something this client cannot read; `code` is the
    gRPC status code when etcd gave one, `endpoint` the member that answered."""

    def __init__(self, message: str, *, code: int | None = None,
                 endpoint: str | None = None) -> None:
        super().__init__(f"{endpoint}: {message}" if endpoint else message)
        self.message = message
        self.code = code
        self.endpoint = endpoint


class EtcdUnavailable(EtcdError):
    """No endpoint answered within the call's deadline (refused, timed out, disconnected,
    or a member without a leader); the message lists what each one did."""


class EtcdOutcomeUnknown(EtcdUnavailable):
    """A write reached an endpoint but its answer was lost: it may or may not have been
    applied. Re-read before trying again (a compare-and-swap retried blindly fails against
    its own first attempt)."""


class EtcdCompacted(EtcdError):
    """The revision asked for has been compacted away: re-list, then watch from the new
    listing's revision + 1. `compact_revision` is the oldest revision still kept (0 if etcd
    did not say)."""

    def __init__(self, message: str, *, compact_revision: int = 0,
                 endpoint: str | None = None) -> None:
        super().__init__(message, code=GRPC_OUT_OF_RANGE, endpoint=endpoint)
        self.compact_revision = compact_revision


class LeaseNotFound(EtcdError):
    """The lease has expired or was revoked (and so have the keys attached to it)."""


# -- encoding (pure) ------------------------------------------------------------------------

def encode_bytes(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_bytes(text: Any) -> bytes:
    if not isinstance(text, str):
        raise EtcdError(f"expected base64 text, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise EtcdError(f"malformed base64 from etcd: {error}") from None


def decode_int(value: Any) -> int:
    """An int64 field: proto3 JSON writes them as strings and omits zeros."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise EtcdError(f"expected an integer, got {type(value).__name__}")
    if isinstance(value, int):
        return value
    try:
        return int(value)
    except ValueError:
        raise EtcdError(f"expected an integer, got {value[:40]!r}") from None


def prefix_range_end(prefix: bytes) -> bytes:
    """The range end that selects every key starting with `prefix` (clientv3's
    GetPrefixRangeEnd): the prefix up to its last byte below 0xff, that byte incremented;
    b"\\0" (every key) when there is none."""
    end = bytearray(prefix)
    for index in range(len(end) - 1, -1, -1):
        if end[index] < 0xFF:
            end[index] += 1
            return bytes(end[:index + 1])
    return b"\0"


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


def decode_kv(obj: Any) -> KeyValue:
    if not isinstance(obj, Mapping):
        raise EtcdError(f"expected a key-value object, got {type(obj).__name__}")
    return KeyValue(key=decode_bytes(obj.get("key", "")),
                    value=decode_bytes(obj.get("value", "")),
                    create_revision=decode_int(obj.get("create_revision")),
                    mod_revision=decode_int(obj.get("mod_revision")),
                    version=decode_int(obj.get("version")),
                    lease=decode_int(obj.get("lease")))


def header_revision(body: Mapping[str, Any]) -> int:
    header = body.get("header")
    return decode_int(header.get("revision")) if isinstance(header, Mapping) else 0


def _kvs(body: Mapping[str, Any]) -> tuple[KeyValue, ...]:
    items = body.get("kvs") or []
    if not isinstance(items, list):
        raise EtcdError("expected a list of key-values")
    return tuple(decode_kv(item) for item in items)


def decode_error(status: int, body: bytes, endpoint: str | None = None) -> EtcdError:
    """The exception for a non-200 answer (or an `error` message inside a stream): the
    gateway's body is `{"error", "message", "code"}`, or in streams
    `{"error": {"grpc_code", "message", ...}}`."""
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        obj = None
    return error_from_object(obj, status, endpoint)


def error_from_object(obj: Any, status: int, endpoint: str | None = None) -> EtcdError:
    code: int | None = None
    message = f"HTTP {status}"
    if isinstance(obj, Mapping):
        inner = obj.get("error")
        source = inner if isinstance(inner, Mapping) else obj
        raw_code = source.get("code", source.get("grpc_code"))
        code = raw_code if isinstance(raw_code, int) and not isinstance(raw_code, bool) else None
        text = source.get("message") or (inner if isinstance(inner, str) else None)
        if isinstance(text, str) and text:
            message = text[:500]
    if code == GRPC_OUT_OF_RANGE and "compacted" in message:
        return EtcdCompacted(message, endpoint=endpoint)
    if code == GRPC_NOT_FOUND and "lease" in message:
        return LeaseNotFound(message, code=code, endpoint=endpoint)
    # Canceled: never asked for by this client (the gateway cancels only when the caller
    # goes away); etcd's gateway answers it while the member shuts down ("grpc: the client
    # connection is closing"), so it means "this member is going", like Unavailable.
    # DeadlineExceeded ("etcdserver: request timed out"): the member could not commit in
    # time; a write may still be applied (so call() reports EtcdOutcomeUnknown for it).
    if (code in (GRPC_UNAVAILABLE, GRPC_CANCELED, GRPC_DEADLINE_EXCEEDED)
            or (code is None and status >= 500)):
        return EtcdUnavailable(message, code=code, endpoint=endpoint)
    return EtcdError(message, code=code, endpoint=endpoint)


def safe_to_retry_write(error: EtcdError) -> bool:
    """Whether a write that got `error` was certainly not applied (so another endpoint may
    be tried)."""
    return any(error.message.startswith(text) for text in _NOT_APPLIED_MESSAGES)


# -- endpoints and backoff (pure) -----------------------------------------------------------

def parse_endpoints(text: str | Sequence[str]) -> tuple[str, ...]:
    """`http://a:2379,http://b:2379` (or a list of URLs) as normalised base URLs."""
    items = text.split(",") if isinstance(text, str) else list(text)
    urls: list[str] = []
    for item in items:
        url = item.strip().rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an etcd endpoint URL (http[s]://HOST:PORT): {item[:100]!r}")
        if parts.path or parts.query or parts.fragment:
            raise ValueError(f"an etcd endpoint URL has no path: {item[:100]!r}")
        if url not in urls:
            urls.append(url)
    if not urls:
        raise ValueError("no etcd endpoint given")
    return tuple(urls)


class Endpoints:
    """The order in which to try the endpoints: the one that answered last first, then the
    others in their configured order; one that fails passes the turn to the next."""

    def __init__(self, urls: Sequence[str]) -> None:
        if not urls:
            raise ValueError("no etcd endpoint given")
        self.urls = tuple(urls)
        self._preferred = 0

    @property
    def preferred(self) -> str:
        return self.urls[self._preferred]

    def order(self) -> list[str]:
        return [*self.urls[self._preferred:], *self.urls[:self._preferred]]

    def succeeded(self, url: str) -> None:
        self._preferred = self.urls.index(url)

    def failed(self, url: str) -> None:
        if self.urls[self._preferred] == url:
            self._preferred = (self._preferred + 1) % len(self.urls)


def backoff_s(attempt: int, rng: random.Random, min_s: float = BACKOFF_MIN_S,
              max_s: float = BACKOFF_MAX_S) -> float:
    """Equal-jitter exponential backoff: half of min(max, min·2^attempt), plus a random
    half, so the coordinators of a fleet do not reconnect to a restarted etcd in step."""
    base = min(max_s, min_s * (2.0 ** min(attempt, 32)))
    return base / 2 + rng.uniform(0.0, base / 2)


def keepalive_retry_s(now: float, deadline: float, attempt: int,
                      rng: random.Random) -> float | None:
    """How long to wait before retrying a failed keep-alive, or None when the lease's
    deadline has passed (it must be presumed expired)."""
    left = deadline - now
    if left <= 0:
        return None
    return min(left, backoff_s(attempt, rng, max_s=KEEPALIVE_RETRY_MAX_S))


class LineSplitter:
    """Newline-delimited messages out of a byte stream fed in arbitrary chunks (aiohttp's own
    readline refuses lines beyond 128 KiB; a watch message can be larger)."""

    def __init__(self, max_bytes: int = MAX_WATCH_MESSAGE_BYTES) -> None:
        self._buffer = bytearray()
        self._max_bytes = max_bytes

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buffer += chunk
        lines: list[bytes] = []
        while (index := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:index]).strip()
            del self._buffer[:index + 1]
            if line:
                lines.append(line)
        if len(self._buffer) > self._max_bytes:
            raise EtcdError(f"a watch message exceeds {self._max_bytes} bytes")
        return lines


# -- requests (pure) ------------------------------------------------------------------------

class Target(StrEnum):
    VERSION = "VERSION"
    CREATE = "CREATE"
    MOD = "MOD"
    VALUE = "VALUE"
    LEASE = "LEASE"


class CompareResult(StrEnum):
    EQUAL = "EQUAL"
    GREATER = "GREATER"
    LESS = "LESS"
    NOT_EQUAL = "NOT_EQUAL"


_TARGET_FIELDS: Final = {Target.VERSION: "version", Target.CREATE: "create_revision",
                         Target.MOD: "mod_revision", Target.VALUE: "value",
                         Target.LEASE: "lease"}


@dataclass(frozen=True)
class Compare:
    """One condition of a transaction. A key that does not exist compares as revision,
    version and lease 0 (so `mod_revision(key, 0)` means "absent")."""

    key: bytes
    target: Target
    value: int | bytes
    result: CompareResult = CompareResult.EQUAL

    @classmethod
    def mod_revision(cls, key: bytes, revision: int,
                     result: CompareResult = CompareResult.EQUAL) -> Compare:
        return cls(key, Target.MOD, revision, result)

    @classmethod
    def create_revision(cls, key: bytes, revision: int,
                        result: CompareResult = CompareResult.EQUAL) -> Compare:
        return cls(key, Target.CREATE, revision, result)

    @classmethod
    def version(cls, key: bytes, version: int,
                result: CompareResult = CompareResult.EQUAL) -> Compare:
        return cls(key, Target.VERSION, version, result)

    @classmethod
    def value_is(cls, key: bytes, value: bytes,
                 result: CompareResult = CompareResult.EQUAL) -> Compare:
        return cls(key, Target.VALUE, value, result)

    @classmethod
    def lease(cls, key: bytes, lease_id: int,
              result: CompareResult = CompareResult.EQUAL) -> Compare:
        return cls(key, Target.LEASE, lease_id, result)

    def encode(self) -> dict[str, Any]:
        if isinstance(self.value, bytes) != (self.target is Target.VALUE):
            raise ValueError(f"compare on {self.target} needs "
                             f"{'bytes' if self.target is Target.VALUE else 'an int'}")
        value = encode_bytes(self.value) if isinstance(self.value, bytes) else str(self.value)
        return {"key": encode_bytes(self.key), "target": self.target.value,
                "result": self.result.value, _TARGET_FIELDS[self.target]: value}


@dataclass(frozen=True)
class Get:
    key: bytes
    prefix: bool = False
    limit: int = 0


@dataclass(frozen=True)
class Put:
    key: bytes
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: bytes
    prefix: bool = False


Op = Get | Put | Delete


def encode_range(key: bytes, range_end: bytes = b"", *, limit: int = 0, revision: int = 0,
                 keys_only: bool = False, serializable: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"key": encode_bytes(key)}
    if range_end:
        body["range_end"] = encode_bytes(range_end)
    if limit:
        body["limit"] = str(limit)
    if revision:
        body["revision"] = str(revision)
    if keys_only:
        body["keys_only"] = True
    if serializable:
        body["serializable"] = True
    return body


def encode_op(op: Op) -> dict[str, Any]:
    if isinstance(op, Get):
        end = prefix_range_end(op.key) if op.prefix else b""
        return {"request_range": encode_range(op.key, end, limit=op.limit)}
    if isinstance(op, Put):
        put: dict[str, Any] = {"key": encode_bytes(op.key), "value": encode_bytes(op.value)}
        if op.lease:
            put["lease"] = str(op.lease)
        return {"request_put": put}
    delete: dict[str, Any] = {"key": encode_bytes(op.key)}
    if op.prefix:
        delete["range_end"] = encode_bytes(prefix_range_end(op.key))
    return {"request_delete_range": delete}


@dataclass(frozen=True)
class Range:
    """What a range read found, at store revision `revision` (watch from revision + 1 to
    see every change after it); `more` when a limit cut it short."""

    kvs: tuple[KeyValue, ...]
    revision: int
    count: int
    more: bool = False


@dataclass(frozen=True)
class OpResult:
    """One operation's answer in a transaction: the key-values of a Get, the number of keys
    a Delete removed (nothing for a Put)."""

    kvs: tuple[KeyValue, ...] = ()
    deleted: int = 0


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int
    responses: tuple[OpResult, ...]


def decode_txn(body: Mapping[str, Any]) -> TxnResult:
    results: list[OpResult] = []
    for item in body.get("responses") or []:
        if not isinstance(item, Mapping):
            raise EtcdError("malformed transaction response")
        if isinstance(ranged := item.get("response_range"), Mapping):
            results.append(OpResult(kvs=_kvs(ranged)))
        elif isinstance(deleted := item.get("response_delete_range"), Mapping):
            results.append(OpResult(deleted=decode_int(deleted.get("deleted"))))
        else:
            results.append(OpResult())
    return TxnResult(succeeded=body.get("succeeded") is True, revision=header_revision(body),
                     responses=tuple(results))


class EventType(StrEnum):
    PUT = "PUT"
    DELETE = "DELETE"


@dataclass(frozen=True)
class WatchEvent:
    """A change: for a DELETE, `kv` holds only the key and the deleting revision."""

    type: EventType
    kv: KeyValue
    prev_kv: KeyValue | None = None


@dataclass(frozen=True)
class WatchMessage:
    revision: int
    events: tuple[WatchEvent, ...] = ()
    created: bool = False
    canceled: bool = False
    compact_revision: int = 0
    cancel_reason: str = ""


def decode_watch_message(obj: Any, endpoint: str | None = None) -> WatchMessage:
    """One line of the watch stream: `{"result": WatchResponse}` or `{"error": …}`."""
    if not isinstance(obj, Mapping):
        raise EtcdError("malformed watch message", endpoint=endpoint)
    if "error" in obj:
        raise error_from_object(obj, 200, endpoint)
    result = obj.get("result")
    if not isinstance(result, Mapping):
        raise EtcdError("malformed watch message: no result", endpoint=endpoint)
    events: list[WatchEvent] = []
    for item in result.get("events") or []:
        if not isinstance(item, Mapping):
            raise EtcdError("malformed watch event", endpoint=endpoint)
        kind = EventType.DELETE if item.get("type") == "DELETE" else EventType.PUT
        prev = item.get("prev_kv")
        events.append(WatchEvent(kind, decode_kv(item.get("kv")),
                                 decode_kv(prev) if prev is not None else None))
    reason = result.get("cancel_reason")
    return WatchMessage(revision=header_revision(result), events=tuple(events),
                        created=result.get("created") is True,
                        canceled=result.get("canceled") is True,
                        compact_revision=decode_int(result.get("compact_revision")),
                        cancel_reason=reason if isinstance(reason, str) else "")


@dataclass(frozen=True)
class Lease:
    id: int
    ttl_s: int


# -- the client -----------------------------------------------------------------------------

class _NotSent(Exception):
    """The request never reached the endpoint (connection refused or timed out)."""


class _AnswerLost(Exception):
    """The request may have reached the endpoint, but no complete answer came back."""


class EtcdClient:
    """A client of one etcd cluster. Every call has a deadline (`timeout_s`, per call
    unless given) within which each endpoint is tried in turn; reads and keep-alives move to
    the next endpoint on any transport failure, writes only when they were certainly not
    applied (otherwise `EtcdOutcomeUnknown`)."""

    def __init__(self, endpoints: str | Sequence[str], *,
                 timeout_s: float = DEFAULT_TIMEOUT_S,
                 connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.endpoints = Endpoints(parse_endpoints(endpoints))
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._ssl_context = ssl_context
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    def session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise EtcdError("the etcd client is closed")
        if self._session is None:
            # No connection limit: every watch holds a connection for its whole life, and
            # must not leave unary calls queueing for one.
            connector = aiohttp.TCPConnector(ssl=self._ssl_context or True, limit=0)
            self._session = aiohttp.ClientSession(
                connector=connector, headers={"Content-Type": "application/json"})
        return self._session

    # The one place every unary request goes through.
    async def call(self, path: str, body: Mapping[str, Any], *, mutating: bool,
                   timeout_s: float | None = None) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout_s if timeout_s is not None else self.timeout_s)
        payload = json.dumps(body).encode()
        failures: list[str] = []
        for url in self.endpoints.order():
            remaining = deadline - loop.time()
            if remaining <= 0:
                failures.append(f"{url}: not tried (deadline)")
                continue
            try:
                status, data = await self._post(url, path, payload, remaining)
            except _NotSent as error:
                self.endpoints.failed(url)
                failures.append(f"{url}: {error}")
                continue
            except _AnswerLost as error:
                self.endpoints.failed(url)
                if mutating:
                    raise EtcdOutcomeUnknown(f"{path}: {error}", endpoint=url) from None
                failures.append(f"{url}: {error}")
                continue
            if status == 200:
                self.endpoints.succeeded(url)
                return _decode_json(data, url)
            failure = decode_error(status, data, url)
            if isinstance(failure, EtcdUnavailable):
                self.endpoints.failed(url)
                if mutating and not safe_to_retry_write(failure):
                    raise EtcdOutcomeUnknown(f"{path}: {failure.message}", code=failure.code,
                                             endpoint=url)
                failures.append(f"{url}: {failure.message}")
                continue
            raise failure
        raise EtcdUnavailable(f"no etcd endpoint answered {path}: " + "; ".join(failures))

    async def _post(self, url: str, path: str, payload: bytes,
                    timeout_s: float) -> tuple[int, bytes]:
        timeout = aiohttp.ClientTimeout(total=timeout_s,
                                        connect=min(self.connect_timeout_s, timeout_s))
        try:
            async with self.session().post(url + path, data=payload, timeout=timeout) as resp:
                return resp.status, await resp.read()
        # Connecting failed: nothing was sent. (A connect timeout is a ServerTimeoutError,
        # so it must be caught before the read timeouts below.)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as error:
            raise _NotSent(_describe(error)) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            raise _AnswerLost(_describe(error)) from None

    # -- key-value ---------------------------------------------------------------------

    async def range(self, key: bytes, range_end: bytes = b"", *, limit: int = 0,
                    revision: int = 0, keys_only: bool = False, serializable: bool = False,
                    timeout_s: float | None = None) -> Range:
        body = await self.call("/v3/kv/range",
                               encode_range(key, range_end, limit=limit, revision=revision,
                                            keys_only=keys_only, serializable=serializable),
                               mutating=False, timeout_s=timeout_s)
        return Range(kvs=_kvs(body), revision=header_revision(body),
                     count=decode_int(body.get("count")), more=body.get("more") is True)

    async def get(self, key: bytes, *, revision: int = 0,
                  timeout_s: float | None = None) -> KeyValue | None:
        found = await self.range(key, revision=revision, timeout_s=timeout_s)
        return found.kvs[0] if found.kvs else None

    async def get_prefix(self, prefix: bytes, *, limit: int = 0,
                         page_size: int = DEFAULT_PAGE_SIZE, revision: int = 0,
                         keys_only: bool = False, timeout_s: float | None = None) -> Range:
        """Every key under `prefix` (at most `limit`, 0 for all), in key order, read in pages
        of `page_size` all at one revision (the first page's unless given), so the result is
        one consistent snapshot however many pages it took."""
        if page_size <= 0:
            raise ValueError("page_size must be positive")
        end = prefix_range_end(prefix)
        start = prefix
        kvs: list[KeyValue] = []
        total = -1
        while True:
            want = page_size if not limit else min(page_size, limit - len(kvs))
            page = await self.range(start, end, limit=want, revision=revision,
                                    keys_only=keys_only, timeout_s=timeout_s)
            if total < 0:
                # Later pages count only what is left from their start key.
                revision = revision or page.revision
                total = page.count
            kvs.extend(page.kvs)
            if not page.more or not page.kvs or (limit and len(kvs) >= limit):
                return Range(kvs=tuple(kvs), revision=revision, count=total,
                             more=len(kvs) < total)
            start = page.kvs[-1].key + b"\0"

    async def put(self, key: bytes, value: bytes, *, lease: int = 0,
                  timeout_s: float | None = None) -> int:
        """Write `key`; returns the revision of the write."""
        body: dict[str, Any] = {"key": encode_bytes(key), "value": encode_bytes(value)}
        if lease:
            body["lease"] = str(lease)
        answer = await self.call("/v3/kv/put", body, mutating=True, timeout_s=timeout_s)
        return header_revision(answer)

    async def delete(self, key: bytes, *, prefix: bool = False,
                     timeout_s: float | None = None) -> int:
        """Delete `key` (or every key under it with `prefix`); returns how many were."""
        body: dict[str, Any] = {"key": encode_bytes(key)}
        if prefix:
            body["range_end"] = encode_bytes(prefix_range_end(key))
        answer = await self.call("/v3/kv/deleterange", body, mutating=True, timeout_s=timeout_s)
        return decode_int(answer.get("deleted"))

    async def txn(self, compare: Sequence[Compare], success: Sequence[Op],
                  failure: Sequence[Op] = (), *, timeout_s: float | None = None) -> TxnResult:
        """If every `compare` holds, apply `success`, else `failure` — atomically, at one
        revision."""
        body = {"compare": [item.encode() for item in compare],
                "success": [encode_op(op) for op in success],
                "failure": [encode_op(op) for op in failure]}
        mutating = any(not isinstance(op, Get) for op in (*success, *failure))
        return decode_txn(await self.call("/v3/kv/txn", body, mutating=mutating,
                                          timeout_s=timeout_s))

    async def cas(self, key: bytes, value: bytes, *, mod_revision: int, lease: int = 0,
                  timeout_s: float | None = None) -> bool:
        """Write `key` only if its mod revision is still `mod_revision` (0: only if it does
        not exist); whether it was written."""
        result = await self.txn([Compare.mod_revision(key, mod_revision)],
                                [Put(key, value, lease)], timeout_s=timeout_s)
        return result.succeeded

    async def compact(self, revision: int, *, physical: bool = False,
                      timeout_s: float | None = None) -> None:
        """Forget the history before `revision` (watches and reads older than it fail with
        EtcdCompacted)."""
        await self.call("/v3/kv/compaction", {"revision": str(revision), "physical": physical},
                        mutating=True, timeout_s=timeout_s)

    # -- leases --------------------------------------------------------------------------

    async def grant(self, ttl_s: int, *, timeout_s: float | None = None) -> Lease:
        """A new lease of `ttl_s` seconds (etcd raises very short TTLs to its minimum, about
        1.5 times its election timeout)."""
        answer = await self.call("/v3/lease/grant", {"TTL": str(ttl_s)}, mutating=True,
                                 timeout_s=timeout_s)
        lease = Lease(id=decode_int(answer.get("ID")), ttl_s=decode_int(answer.get("TTL")))
        if not lease.id or lease.ttl_s <= 0:
            raise EtcdError(f"lease grant answered without id or TTL: {answer.get('error')}")
        return lease

    async def keepalive_once(self, lease_id: int, *, timeout_s: float | None = None) -> int:
        """Refresh a lease; returns its TTL from now. LeaseNotFound when it has expired."""
        answer = await self.call("/v3/lease/keepalive", {"ID": str(lease_id)}, mutating=False,
                                 timeout_s=timeout_s)
        # A streaming RPC: the answer is one stream message, `{"result": …}` or `{"error": …}`.
        if "error" in answer:
            raise error_from_object(answer, 200)
        result = answer.get("result")
        ttl = decode_int(result.get("TTL")) if isinstance(result, Mapping) else 0
        if ttl <= 0:
            raise LeaseNotFound(f"lease {lease_id:x} has expired or was revoked",
                                code=GRPC_NOT_FOUND)
        return ttl

    async def revoke(self, lease_id: int, *, timeout_s: float | None = None) -> None:
        """End a lease now, deleting its keys. LeaseNotFound if it had already ended."""
        await self.call("/v3/lease/revoke", {"ID": str(lease_id)}, mutating=True,
                        timeout_s=timeout_s)

    def keep_alive(self, lease: Lease, *, granted_at: float | None = None) -> LeaseKeeper:
        """Start refreshing `lease` from a task the returned keeper owns (stop it with
        `await keeper.stop()`)."""
        return LeaseKeeper(self, lease, granted_at=granted_at)

    # -- watches -------------------------------------------------------------------------

    def watch(self, key: bytes, *, prefix: bool = False, start_revision: int = 0,
              prev_kv: bool = False, reconnect_timeout_s: float | None = None) -> Watch:
        """The changes of `key` (or of every key under it) from `start_revision` (0: from
        now), as an async iterator of WatchEvents; see Watch."""
        return Watch(self, key, prefix_range_end(key) if prefix else b"",
                     start_revision=start_revision, prev_kv=prev_kv,
                     reconnect_timeout_s=reconnect_timeout_s)


def _decode_json(data: bytes, endpoint: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise EtcdError("answer is not JSON", endpoint=endpoint) from None
    if not isinstance(obj, dict):
        raise EtcdError("answer is not a JSON object", endpoint=endpoint)
    return obj


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


class LeaseKeeper:
    """Keeps one lease alive from a task of its own: a refresh every third of the TTL.
    `lost` is set (and the task ends) when etcd says the lease is gone, or when no refresh
    succeeded before the lease's own deadline — etcd unreachable that long means the lease
    must be presumed expired, and whatever it guarded may belong to someone else."""

    def __init__(self, client: EtcdClient, lease: Lease, *, granted_at: float | None = None,
                 rng: random.Random | None = None) -> None:
        self.client = client
        self.lease = lease
        self.lost = asyncio.Event()
        self.reason = ""
        self._rng = rng or random.Random()
        loop = asyncio.get_running_loop()
        start = granted_at if granted_at is not None else loop.time()
        self.deadline = start + lease.ttl_s
        self._task = asyncio.create_task(self._run(), name=f"etcd-keepalive-{lease.id:x}")

    async def stop(self) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            if not self._task.cancelled():
                raise

    def _lose(self, reason: str) -> None:
        self.reason = reason
        log.warning("etcd lease %x lost: %s", self.lease.id, reason,
                    extra={"ETCD_LEASE": f"{self.lease.id:x}"})
        self.lost.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        interval_s = max(self.lease.ttl_s / 3, 0.1)
        attempt = 0
        while True:
            sent = loop.time()
            try:
                ttl_s = await self.client.keepalive_once(
                    self.lease.id,
                    timeout_s=min(self.client.timeout_s, max(self.deadline - sent, 0.1)))
            except LeaseNotFound as error:
                self._lose(error.message)
                return
            except EtcdError as error:
                delay = keepalive_retry_s(loop.time(), self.deadline, attempt, self._rng)
                if delay is None:
                    self._lose(f"no keep-alive answered before the lease's deadline: {error}")
                    return
                attempt += 1
                log.debug("etcd lease %x keep-alive failed, retry in %.2fs: %s", self.lease.id,
                          delay, error)
                await asyncio.sleep(delay)
                continue
            attempt = 0
            self.deadline = sent + ttl_s
            await asyncio.sleep(interval_s)


class Watch:
    """The changes of a key or a prefix, as an async iterator of WatchEvents, in revision
    order, each exactly once, across dropped streams and restarted or failed-over members:
    a new stream resumes at the revision after the last one seen.

    Ends with EtcdCompacted when that revision is no longer kept (list again, then watch from
    the listing's revision + 1), with EtcdUnavailable when no endpoint took the watch for
    `reconnect_timeout_s` (None: keep trying), with EtcdError when etcd cancels it. Use it as
    an async context manager (which waits until etcd has created the watch), or call
    `aclose()`: it holds a connection. A stream that goes silent without closing (a
    partition, not a restart) is not detected here; etcd's own clients have the same limit
    without progress notifications.
    """

    def __init__(self, client: EtcdClient, key: bytes, range_end: bytes, *,
                 start_revision: int, prev_kv: bool,
                 reconnect_timeout_s: float | None) -> None:
        self.client = client
        self.key = key
        self.range_end = range_end
        self.next_revision = start_revision
        self.prev_kv = prev_kv
        self.reconnect_timeout_s = reconnect_timeout_s
        self._events: deque[WatchEvent] = deque()
        self._response: aiohttp.ClientResponse | None = None
        self._splitter = LineSplitter()
        self._lines: deque[bytes] = deque()
        self._endpoint = ""
        self._closed = False
        self._rng = random.Random()
        self._down_since: float | None = None
        self._attempt = 0
        self._created = False
        self.reconnects = 0

    async def __aenter__(self) -> Watch:
        try:
            await self.start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Open the stream and wait until etcd has created the watch, so a watch "from now"
        sees every change made after this returns (iterating starts it too, lazily)."""
        while self._response is None or not self._created:
            if self._closed:
                raise EtcdError("the watch is closed")
            await self._receive()

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> WatchEvent:
        while not self._events:
            if self._closed:
                raise StopAsyncIteration
            await self._receive()
        return self._events.popleft()

    async def aclose(self) -> None:
        self._closed = True
        self._disconnect()

    def _disconnect(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None
        self._created = False
        self._splitter = LineSplitter()
        self._lines.clear()

    def _body(self) -> dict[str, Any]:
        request: dict[str, Any] = {"key": encode_bytes(self.key)}
        if self.range_end:
            request["range_end"] = encode_bytes(self.range_end)
        if self.next_revision:
            request["start_revision"] = str(self.next_revision)
        if self.prev_kv:
            request["prev_kv"] = True
        return {"create_request": request}

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        client = self.client
        while True:
            failures: list[str] = []
            for url in client.endpoints.order():
                timeout = aiohttp.ClientTimeout(total=None, connect=client.connect_timeout_s,
                                                sock_connect=client.connect_timeout_s)
                try:
                    async with asyncio.timeout(client.timeout_s):
                        response = await client.session().post(
                            url + "/v3/watch", data=json.dumps(self._body()).encode(),
                            timeout=timeout)
                except (aiohttp.ClientError, TimeoutError, OSError) as error:
                    client.endpoints.failed(url)
                    failures.append(f"{url}: {_describe(error)}")
                    continue
                if response.status != 200:
                    data = await _read_quietly(response)
                    response.close()
                    failure = decode_error(response.status, data, url)
                    if not isinstance(failure, EtcdUnavailable):
                        raise failure
                    client.endpoints.failed(url)
                    failures.append(f"{url}: {failure.message}")
                    continue
                client.endpoints.succeeded(url)
                self._response = response
                self._endpoint = url
                return
            now = loop.time()
            if self._down_since is None:
                self._down_since = now
            if (self.reconnect_timeout_s is not None
                    and now - self._down_since >= self.reconnect_timeout_s):
                raise EtcdUnavailable("no etcd endpoint took the watch: " + "; ".join(failures))
            delay = backoff_s(self._attempt, self._rng)
            self._attempt += 1
            log.info("etcd watch: no endpoint answered, retrying in %.2fs: %s", delay,
                     "; ".join(failures))
            await asyncio.sleep(delay)

    async def _next_line(self) -> bytes | None:
        """The next message of the current stream; None when the stream ended or broke."""
        assert self._response is not None
        while not self._lines:
            try:
                chunk = await self._response.content.readany()
            except (aiohttp.ClientError, TimeoutError, OSError) as error:
                log.info("etcd watch stream from %s broke: %s", self._endpoint,
                         _describe(error), extra={"ETCD_ENDPOINT": self._endpoint})
                return None
            if not chunk:
                log.info("etcd watch stream from %s ended", self._endpoint,
                         extra={"ETCD_ENDPOINT": self._endpoint})
                return None
            self._lines.extend(self._splitter.feed(chunk))
        return self._lines.popleft()

    async def _receive(self) -> None:
        if self._response is None:
            await self._connect()
        line = await self._next_line()
        if line is None:
            # Stream dropped (member stopped, restarted, connection reset): the next call
            # reconnects, resuming at next_revision.
            self._disconnect()
            self.client.endpoints.failed(self._endpoint)
            self.reconnects += 1
            return
        try:
            obj = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            self._disconnect()
            raise EtcdError("malformed watch message (not JSON)",
                            endpoint=self._endpoint) from None
        try:
            message = decode_watch_message(obj, self._endpoint)
        except EtcdUnavailable:
            self._disconnect()
            return
        except EtcdError:
            self._disconnect()
            self._closed = True
            raise
        if message.canceled:
            self._disconnect()
            self._closed = True
            if message.compact_revision:
                raise EtcdCompacted(
                    f"watch from revision {self.next_revision} of {self.key!r}: history "
                    f"before revision {message.compact_revision} is compacted",
                    compact_revision=message.compact_revision, endpoint=self._endpoint)
            raise EtcdError(f"etcd canceled the watch of {self.key!r}: "
                            f"{message.cancel_reason or 'no reason given'}",
                            endpoint=self._endpoint)
        if message.created:
            self._created = True
            self._down_since = None
            self._attempt = 0
            if not self.next_revision:
                # "From now" is pinned on the first stream, so a later one resumes from it.
                self.next_revision = message.revision + 1
        for event in message.events:
            self._events.append(event)
            self.next_revision = max(self.next_revision, event.kv.mod_revision + 1)
        if not message.events and not message.created and message.revision:
            # A progress notification: nothing under the watch changed up to its revision.
            self.next_revision = max(self.next_revision, message.revision + 1)


async def _read_quietly(response: aiohttp.ClientResponse) -> bytes:
    try:
        async with asyncio.timeout(DEFAULT_CONNECT_TIMEOUT_S):
            return await response.read()
    except (aiohttp.ClientError, TimeoutError, OSError):
        return b""
