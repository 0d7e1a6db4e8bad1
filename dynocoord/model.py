"""The records the coordinator keeps in etcd (apps, releases, formation, hosts, placements):
frozen dataclasses, each validated once by `from_dict` and stored as canonical JSON bytes.

The platform API bodies (DESIGN §9) are parsed here too, by the `parse_*` functions, so a
bad body and a corrupt etcd value fail the same way: `Invalid`, naming the offending field.

Limits, and why:
- app name: Heroku's rule, 3 to 30 of [a-z0-9-], starting with a letter, ending with a letter or
  digit; always a valid agent `app` (agent/spec.py), and one etcd key component.
- release: config vars ≤ 32 KiB (Heroku's, and the agent's `ENV_MAX_BYTES`); at most
  `PROCESS_TYPES_MAX` process types, each command ≤ 64 KiB (the agent's limit) and
  `COMMANDS_MAX_BYTES` for all together, so that a release record stays far below etcd's
  default request limit (1.5 MiB). The slug is a reference (path, or url + sha256), never its
  bytes: its size is bounded where it is fetched, by the agent (1 GiB download, 4 GiB
  unpacked by default, agent/slugs/store.py), which the coordinator cannot see in advance.
- formation: quantity 0…`QUANTITY_MAX` per process type; the size must be a known size.
- a host's network (hello `network`): at most `NETWORKS_MAX` networks, an MTU in 68…65535
  (RFC 791's minimum, and the largest an IPv4 packet may be).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Self

from agent.drainurl import DrainUrlError, parse_drain_list, parse_drain_url
from agent.errors import excerpt
from agent.sizes import DEFAULT_SIZE, DEFAULT_SIZES, Size
from agent.spec import (
    COMMAND_MAX_BYTES,
    ENV_KEY,
    ID,
    NAME,
    ONE_SHOT_TYPES,
    STACK,
    TYPE,
    Env,
    SlugSource,
    SpecError,
    parse_env,
    parse_slug_source,
)

# Heroku: "Name must start with a letter, end with a letter or digit and can only contain
# lowercase letters, digits, and dashes", 3 to 30 characters.
APP_NAME = re.compile(r"[a-z][a-z0-9-]{1,28}[a-z0-9]")
APP_SHAPE = ("3-30 lowercase letters, digits and dashes, starting with a letter and ending "
             "with a letter or digit")
# A host id is the agent's `agent_id` (a uuid4 hex by default, but read from a file an
# operator may write); it is one etcd key component, so no "/" and nothing exotic.
HOST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
HOST_NAME_MAX_CHARS = 253  # RFC 1035's limit on a full domain name
BOOT_ID_MAX_CHARS = 64
LABELS_MAX = 32
LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
LABEL_VALUE_MAX_CHARS = 256
VERSION_MAX = 2**63 - 1  # the agent's bound on release.version
GENERATION_MAX = 2**63 - 1  # the protocol's bound on dynos.sync generations
# Heroku documents no limit on process types; 32 is more than any Procfile needs and keeps
# a release record (32 x 64 KiB commands would be 2 MiB) bounded by COMMANDS_MAX_BYTES.
PROCESS_TYPES_MAX = 32
COMMANDS_MAX_BYTES = 256 * 1024
# A formation dyno count above the most dynos one dynos.sync may carry (docs/protocol.md §8)
# is a typo, not a plan; Heroku's own default cap is far lower (100 per type).
QUANTITY_MAX = 10_000
CPUS_MAX = 65_536
MEMORY_MAX_BYTES = 2**50  # 1 PiB: anything above is a bogus `hello`
NETWORKS_MAX = 1024  # a host's own networks (hello `network.networks`); more is a bogus hello
MTU_MIN, MTU_MAX = 68, 65_535
VNI_MAX = 2**24 - 1  # VXLAN's network identifier is 24 bits; 0 is not used
_FIELD_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# Types that are never part of a formation: one-off, release phase and build dynos.
FORMATION_EXCLUDED_TYPES = ONE_SHOT_TYPES


class Invalid(ValueError):
    """A record or API body does not validate; `field` is the dotted path of the bad value."""

    def __init__(self, message: str, field: str, value: Any = None) -> None:
        super().__init__(f"{field}: {message}")
        self.message = message
        self.field = field
        self.value = value


class HostState(StrEnum):
    READY = "ready"
    DRAINING = "draining"
    LOST = "lost"


# ---------------------------------------------------------------- field checks

def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _mapping(field: str, value: Any) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise Invalid(f"must be an object, got {_type_name(value)}", field, value)
    return value


def _where(field: str, key: Any) -> str:
    """The dotted path of `key` under `field`, when the key looks like a key at all (a
    megabyte of garbage must not become the error's field)."""
    if isinstance(key, str) and _FIELD_KEY.fullmatch(key):
        return f"{field}.{key}" if field else key
    return field or "body"


def _keys(field: str, data: Mapping[Any, Any], required: tuple[str, ...],
          optional: tuple[str, ...] = ()) -> None:
    known = required + optional
    for key in data:
        if key not in known:
            raise Invalid(f"unknown key {excerpt(key)}; known keys: {', '.join(known)}",
                          _where(field, key), key)
    for key in required:
        if key not in data:
            raise Invalid("is required", f"{field}.{key}" if field else key)


def _text(field: str, value: Any, pattern: re.Pattern[str] | None = None, shape: str = "",
          max_chars: int = 4096) -> str:
    if not isinstance(value, str):
        raise Invalid(f"must be a string, got {_type_name(value)}", field, value)
    if pattern is not None and not pattern.fullmatch(value):
        raise Invalid(f"must match {shape or pattern.pattern}, got {excerpt(value)}", field,
                      value)
    if len(value) > max_chars or "\x00" in value:
        raise Invalid(f"must be at most {max_chars} characters with no NUL, got "
                      f"{excerpt(value)}", field, value)
    return value


def _int(field: str, value: Any, low: int, high: int) -> int:
    # JSON true/false arrive as bool, which Python treats as an int; refuse them.
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"must be an integer, got {_type_name(value)}", field, value)
    if not low <= value <= high:
        raise Invalid(f"must be between {low} and {high}, got {excerpt(value)}", field, value)
    return value


def _time(field: str, value: Any) -> str:
    """An RFC 3339 time with its offset (docs/protocol.md §2), kept as the text given."""
    text = _text(field, value, max_chars=64)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise Invalid(f"must be an RFC 3339 time with an offset, got {excerpt(text)}", field,
                      value)
    return text


def _drain_list(field: str, value: Any) -> tuple[str, ...]:
    try:
        return tuple(d.url for d in parse_drain_list(value))
    except DrainUrlError as exc:
        raise Invalid(str(exc), field, exc.value) from None


def parse_drain_add(body: Any) -> str:
    """`POST /v1/apps/{app}/log-drains` body: `{"url"}`, a drain URL (agent/drainurl.py)."""
    data = _mapping("body", body)
    _keys("", data, ("url",))
    try:
        return parse_drain_url(data["url"]).url
    except DrainUrlError as exc:
        raise Invalid(str(exc), "url", exc.value) from None


def _env(field: str, value: Any) -> Env:
    try:
        return parse_env(value, field)
    except SpecError as exc:
        raise Invalid(exc.message, exc.field, exc.value) from None


def _slug(field: str, value: Any) -> SlugSource:
    try:
        return parse_slug_source(value, field)
    except SpecError as exc:
        raise Invalid(exc.message, exc.field, exc.value) from None


def _size(field: str, value: Any, sizes: Mapping[str, Size]) -> str:
    name = _text(field, value, max_chars=64)
    # Heroku's CLI spells sizes "Standard-2X"; accept that spelling for the same size.
    if name.lower() not in sizes:
        raise Invalid(f"unknown size {excerpt(name)}; known sizes: {', '.join(sizes)}", field,
                      value)
    return name.lower()


def _process_types(field: str, value: Any) -> Mapping[str, str]:
    data = _mapping(field, value)
    if len(data) > PROCESS_TYPES_MAX:
        raise Invalid(f"has {len(data)} process types; the limit is {PROCESS_TYPES_MAX}", field)
    total = 0
    out: dict[str, str] = {}
    for key, command in data.items():
        if not isinstance(key, str) or not TYPE.fullmatch(key):
            raise Invalid(f"process type {excerpt(key)} must match {TYPE.pattern}", field, key)
        if key in ("run", "build"):
            raise Invalid(f"{key!r} is reserved for one-off and build dynos", f"{field}.{key}",
                          key)
        where = f"{field}.{key}"
        if not isinstance(command, str):
            raise Invalid(f"must be a string, got {_type_name(command)}", where, command)
        if "\x00" in command or not command.strip():
            raise Invalid("must be a non-empty command with no NUL", where, command)
        try:
            size = len(command.encode("utf-8"))
        except UnicodeEncodeError:
            raise Invalid("must be valid Unicode", where, command) from None
        if size > COMMAND_MAX_BYTES:
            raise Invalid(f"is {size} bytes; the limit is {COMMAND_MAX_BYTES}", where)
        total += size
        out[key] = command
    if total > COMMANDS_MAX_BYTES:
        raise Invalid(f"commands total {total} bytes; the limit is {COMMANDS_MAX_BYTES}", field)
    return Env(dict(sorted(out.items())))


def _labels(field: str, value: Any) -> Mapping[str, str]:
    data = _mapping(field, value)
    if len(data) > LABELS_MAX:
        raise Invalid(f"has {len(data)} labels; the limit is {LABELS_MAX}", field)
    out: dict[str, str] = {}
    for key, item in data.items():
        if not isinstance(key, str) or not LABEL_KEY.fullmatch(key):
            raise Invalid(f"label {excerpt(key)} must match {LABEL_KEY.pattern}", field, key)
        out[key] = _text(f"{field}.{key}", item, max_chars=LABEL_VALUE_MAX_CHARS)
    return Env(dict(sorted(out.items())))


def _decode(data: bytes | str, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Invalid(f"is not JSON: {excerpt(str(exc))}", what) from None


def _encode(data: Mapping[str, Any]) -> bytes:
    # Canonical bytes (sorted keys, no spaces): the same record is the same etcd value, so
    # a transaction may compare values, and a rewrite of an unchanged record is visible.
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False
                      ).encode("utf-8")


class _Record:
    """JSON bytes in and out for a record with `to_dict` / `from_dict`."""

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_dict(cls, data: Any) -> Self:
        raise NotImplementedError

    def to_json(self) -> bytes:
        return _encode(self.to_dict())

    @classmethod
    def from_json(cls, data: bytes | str) -> Self:
        return cls.from_dict(_decode(data, cls.__name__.lower()))


# ---------------------------------------------------------------- records

@dataclass(frozen=True, slots=True)
class App(_Record):
    name: str
    created: str
    # The app's log drains (`drains:add`), sent to its hosts with `drains.sync`, never in its
    # dynos' specs: adding one restarts no dyno. Records from before drains have none.
    log_drains: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _text("name", self.name, APP_NAME, APP_SHAPE)
        _time("created", self.created)
        _drain_list("log_drains", self.log_drains)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "created": self.created}
        if self.log_drains:
            data["log_drains"] = list(self.log_drains)
        return data

    @classmethod
    def from_dict(cls, data: Any) -> Self:
        data = _mapping("app", data)
        _keys("", data, ("name", "created"), ("log_drains",))
        return cls(_text("name", data["name"], APP_NAME, APP_SHAPE),
                   _time("created", data["created"]),
                   _drain_list("log_drains", data.get("log_drains", [])))


@dataclass(frozen=True, slots=True)
class Release(_Record):
    app: str
    version: int
    slug: SlugSource
    stack: str
    process_types: Mapping[str, str]
    env: Env
    created: str

    def __post_init__(self) -> None:
        _text("app", self.app, APP_NAME, APP_SHAPE)
        _int("version", self.version, 1, VERSION_MAX)
        _text("stack", self.stack, STACK)
        _time("created", self.created)

    @property
    def slug_key(self) -> str:
        """What identifies the slug's content on a host: its digest, or its path."""
        return self.slug.sha256 if self.slug.sha256 is not None else f"path:{self.slug.path}"

    def to_dict(self) -> dict[str, Any]:
        return {"app": self.app, "version": self.version, "slug": self.slug.to_dict(),
                "stack": self.stack, "process_types": dict(self.process_types),
                "env": dict(self.env), "created": self.created}

    @classmethod
    def from_dict(cls, data: Any) -> Self:
        data = _mapping("release", data)
        _keys("", data, ("app", "version", "slug", "stack", "process_types", "env", "created"))
        return cls(app=_text("app", data["app"], APP_NAME, APP_SHAPE),
                   version=_int("version", data["version"], 1, VERSION_MAX),
                   slug=_slug("slug", data["slug"]),
                   stack=_text("stack", data["stack"], STACK),
                   process_types=_process_types("process_types", data["process_types"]),
                   env=_env("env", data["env"]),
                   created=_time("created", data["created"]))


@dataclass(frozen=True, slots=True)
class FormationEntry(_Record):
    """How many dynos of one process type of an app run, and of which size."""

    app: str
    type: str
    quantity: int
    size: str = DEFAULT_SIZE

    def __post_init__(self) -> None:
        _text("app", self.app, APP_NAME, APP_SHAPE)
        _formation_type("type", self.type)
        _int("quantity", self.quantity, 0, QUANTITY_MAX)
        _text("size", self.size, max_chars=64)

    def to_dict(self) -> dict[str, Any]:
        return {"app": self.app, "type": self.type, "quantity": self.quantity,
                "size": self.size}

    @classmethod
    def from_dict(cls, data: Any, sizes: Mapping[str, Size] = DEFAULT_SIZES) -> Self:
        data = _mapping("formation", data)
        _keys("", data, ("app", "type", "quantity", "size"))
        return cls(app=_text("app", data["app"], APP_NAME, APP_SHAPE),
                   type=_formation_type("type", data["type"]),
                   quantity=_int("quantity", data["quantity"], 0, QUANTITY_MAX),
                   size=_size("size", data["size"], sizes))


def _formation_type(field: str, value: Any) -> str:
    name = _text(field, value, TYPE)
    if name in FORMATION_EXCLUDED_TYPES:
        raise Invalid(f"{name!r} dynos are one-off, never part of a formation", field, value)
    return name


@dataclass(frozen=True, slots=True)
class Capacity:
    """What a host offers, as its agent's `hello` reports it (docs/protocol.md §3)."""

    cpus: int
    memory_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"cpus": self.cpus, "memory_bytes": self.memory_bytes}

    @classmethod
    def from_dict(cls, data: Any, field: str = "capacity") -> Self:
        data = _mapping(field, data)
        # The agent may report more in later versions (protocol §9: additive); a stored
        # record is ours and strict, so unknown keys are dropped by the hello parser only.
        _keys(field, data, ("cpus", "memory_bytes"))
        return cls(_int(f"{field}.cpus", data["cpus"], 1, CPUS_MAX),
                   _int(f"{field}.memory_bytes", data["memory_bytes"], 1, MEMORY_MAX_BYTES))


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _address(field: str, value: Any) -> IPAddress:
    text = _text(field, value, max_chars=64)
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise Invalid(f"must be an IP address, got {excerpt(text)}", field, value) from None


def _network(field: str, value: Any, *, strict: bool = False) -> IPNetwork:
    """A network as CIDR text; host bits are dropped (a host reports its addresses as
    `192.0.2.7/24`) unless `strict`."""
    text = _text(field, value, max_chars=64)
    try:
        return ipaddress.ip_network(text, strict=strict)
    except ValueError:
        raise Invalid(f"must be a network (CIDR), got {excerpt(text)}", field, value) from None


def _ipv4_network(field: str, value: Any) -> ipaddress.IPv4Network:
    network = _network(field, value, strict=True)
    if not isinstance(network, ipaddress.IPv4Network):
        raise Invalid(f"must be an IPv4 network, got {excerpt(value)}", field, value)
    return network


@dataclass(frozen=True, slots=True)
class HostNetwork:
    """What a host's agent reports of its network in `hello` (docs/protocol.md): its underlay
    address (the VXLAN endpoint other hosts send to; None when it knows none), that link's
    MTU, and the networks it has addresses or routes in, which no space subnet may overlap."""

    underlay: IPAddress | None = None
    mtu: int | None = None
    networks: tuple[IPNetwork, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"underlay": None if self.underlay is None else str(self.underlay),
                "mtu": self.mtu, "networks": [str(n) for n in self.networks]}

    @classmethod
    def from_dict(cls, data: Any, field: str = "network", strict: bool = True) -> Self:
        """`strict` for a stored record; a hello's map may carry keys of later versions."""
        data = _mapping(field, data)
        if strict:
            _keys(field, data, ("underlay", "mtu", "networks"))
        underlay = data.get("underlay")
        mtu = data.get("mtu")
        networks = data.get("networks")
        networks = [] if networks is None else networks
        if not isinstance(networks, list):
            raise Invalid(f"must be an array, got {_type_name(networks)}", f"{field}.networks",
                          networks)
        if len(networks) > NETWORKS_MAX:
            raise Invalid(f"has {len(networks)} networks; the limit is {NETWORKS_MAX}",
                          f"{field}.networks")
        parsed = {_network(f"{field}.networks", n): None for n in networks}
        return cls(None if underlay is None else _address(f"{field}.underlay", underlay),
                   None if mtu is None else _int(f"{field}.mtu", mtu, MTU_MIN, MTU_MAX),
                   tuple(parsed))


@dataclass(frozen=True, slots=True)
class Host(_Record):
    """A host as the coordinator knows it: its agent's `hello` and the state it is in.

    `last_seen` is written at `hello` and at every state change, not per heartbeat: liveness
    is the host's etcd lease (keys.Keys.alive), which costs no write per heartbeat.
    """

    id: str
    host: str
    state: HostState
    capacity: Capacity
    labels: Mapping[str, str]
    boot_id: str
    version: str
    last_seen: str
    # None: an agent older than private spaces (no `network` in its hello), or a record
    # written before them.
    network: HostNetwork | None = None

    def __post_init__(self) -> None:
        _text("id", self.id, HOST_ID)
        _text("host", self.host, max_chars=HOST_NAME_MAX_CHARS)
        _text("boot_id", self.boot_id, max_chars=BOOT_ID_MAX_CHARS)
        _text("version", self.version, max_chars=64)
        _time("last_seen", self.last_seen)
        if not isinstance(self.state, HostState):
            raise Invalid("must be a HostState", "state", self.state)

    def to_dict(self) -> dict[str, Any]:
        out = {"id": self.id, "host": self.host, "state": str(self.state),
               "capacity": self.capacity.to_dict(), "labels": dict(self.labels),
               "boot_id": self.boot_id, "version": self.version, "last_seen": self.last_seen}
        if self.network is not None:
            out["network"] = self.network.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Any) -> Self:
        data = _mapping("host", data)
        _keys("", data, ("id", "host", "state", "capacity", "labels", "boot_id", "version",
                         "last_seen"), ("network",))
        return cls(id=_text("id", data["id"], HOST_ID),
                   host=_text("host", data["host"], max_chars=HOST_NAME_MAX_CHARS),
                   state=_host_state("state", data["state"]),
                   capacity=Capacity.from_dict(data["capacity"]),
                   labels=_labels("labels", data["labels"]),
                   boot_id=_text("boot_id", data["boot_id"], max_chars=BOOT_ID_MAX_CHARS),
                   version=_text("version", data["version"], max_chars=64),
                   last_seen=_time("last_seen", data["last_seen"]),
                   network=None if data.get("network") is None
                   else HostNetwork.from_dict(data["network"]))

    @classmethod
    def from_hello(cls, params: Any, state: HostState, now: str) -> Self:
        """The host record from an agent's `hello` params. Unknown keys are ignored, as the
        protocol requires of coordinators (docs/protocol.md §9); known ones are strict."""
        data = _mapping("hello", params)
        for key in ("agent_id", "host", "boot_id", "version", "capacity"):
            if key not in data:
                raise Invalid("is required", key)
        capacity = _mapping("capacity", data["capacity"])
        for key in ("cpus", "memory_bytes"):
            if key not in capacity:
                raise Invalid("is required", f"capacity.{key}")
        return cls(id=_text("agent_id", data["agent_id"], HOST_ID),
                   host=_text("host", data["host"], max_chars=HOST_NAME_MAX_CHARS),
                   state=state,
                   capacity=Capacity.from_dict({"cpus": capacity["cpus"],
                                                "memory_bytes": capacity["memory_bytes"]}),
                   labels=_labels("labels", data.get("labels", {})),
                   boot_id=_text("boot_id", data["boot_id"], max_chars=BOOT_ID_MAX_CHARS),
                   version=_text("version", data["version"], max_chars=64),
                   last_seen=_time("last_seen", now),
                   network=None if data.get("network") is None
                   else HostNetwork.from_dict(data["network"], strict=False))


def _host_state(field: str, value: Any) -> HostState:
    text = _text(field, value, max_chars=16)
    try:
        return HostState(text)
    except ValueError:
        raise Invalid(f"must be one of {', '.join(HostState)}, got {excerpt(text)}", field,
                      value) from None


@dataclass(frozen=True, slots=True)
class Placement(_Record):
    """One dyno placed on one host: the unit of every host's desired set.

    `generation` is the planning round that created it (see placement.dyno_id); `type` is
    always the part of `name` before the dot. Unlike the other records, the constructor does
    not check its fields: the planner makes 10,000s of placements from parts that were
    checked already, and the checks were a third of its time; `from_dict` (etcd values) is
    the edge and checks everything.
    """

    id: str
    app: str
    name: str
    release: int
    size: str
    host: str
    generation: int

    @property
    def type(self) -> str:
        return self.name.partition(".")[0]

    @property
    def number(self) -> int:
        return int(self.name.partition(".")[2])

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "app": self.app, "name": self.name, "type": self.type,
                "release": self.release, "size": self.size, "host": self.host,
                "generation": self.generation}

    @classmethod
    def from_dict(cls, data: Any, sizes: Mapping[str, Size] = DEFAULT_SIZES) -> Self:
        data = _mapping("placement", data)
        _keys("", data, ("id", "app", "name", "type", "release", "size", "host",
                         "generation"))
        name = _text("name", data["name"], NAME, "<type>.<n>")
        if data["type"] != name.partition(".")[0]:
            raise Invalid(f"must be the type of name {name!r}, got {excerpt(data['type'])}",
                          "type", data["type"])
        return cls(id=_text("id", data["id"], ID, "[a-z0-9-]{1,64}"),
                   app=_text("app", data["app"], APP_NAME, APP_SHAPE),
                   name=name,
                   release=_int("release", data["release"], 1, VERSION_MAX),
                   size=_size("size", data["size"], sizes),
                   host=_text("host", data["host"], HOST_ID),
                   generation=_int("generation", data["generation"], 0, GENERATION_MAX))


@dataclass(frozen=True, slots=True)
class Space(_Record):
    """A private space's addressing (dynocoord/spaces.py): one subnet of the fleet's space
    pool and one VXLAN network identifier, for as long as the space exists. A space is an app
    for now: `space` is the app's name."""

    space: str
    subnet: ipaddress.IPv4Network
    vni: int

    def __post_init__(self) -> None:
        _text("space", self.space, APP_NAME, APP_SHAPE)
        _int("vni", self.vni, 1, VNI_MAX)

    def to_dict(self) -> dict[str, Any]:
        return {"space": self.space, "subnet": str(self.subnet), "vni": self.vni}

    @classmethod
    def from_dict(cls, data: Any) -> Self:
        data = _mapping("space", data)
        _keys("", data, ("space", "subnet", "vni"))
        return cls(_text("space", data["space"], APP_NAME, APP_SHAPE),
                   _ipv4_network("subnet", data["subnet"]), _int("vni", data["vni"], 1, VNI_MAX))


@dataclass(frozen=True, slots=True)
class SpaceSlice(_Record):
    """The part of a space's subnet one host gives addresses from (its gateway is the first
    address). A host keeps its slice while the space exists, so its dynos' addresses do not
    move when the coordinator restarts or the host comes back."""

    space: str
    host: str
    slice: ipaddress.IPv4Network

    def __post_init__(self) -> None:
        _text("space", self.space, APP_NAME, APP_SHAPE)
        _text("host", self.host, HOST_ID)

    def to_dict(self) -> dict[str, Any]:
        return {"space": self.space, "host": self.host, "slice": str(self.slice)}

    @classmethod
    def from_dict(cls, data: Any) -> Self:
        data = _mapping("slice", data)
        _keys("", data, ("space", "host", "slice"))
        return cls(_text("space", data["space"], APP_NAME, APP_SHAPE),
                   _text("host", data["host"], HOST_ID), _ipv4_network("slice", data["slice"]))


# ---------------------------------------------------------------- platform API bodies

def parse_app_create(body: Any, created: str) -> App:
    """`POST /v1/apps` body: `{"name"}`."""
    data = _mapping("body", body)
    _keys("", data, ("name",))
    return App(_text("name", data["name"], APP_NAME, APP_SHAPE), _time("created", created))


def parse_release_create(body: Any, app: str, version: int, created: str) -> Release:
    """`POST /v1/apps/{app}/releases` body: `{"slug", "stack"?, "process_types", "env"?}`."""
    data = _mapping("body", body)
    _keys("", data, ("slug", "process_types"), ("stack", "env"))
    return Release(app=app, version=version, slug=_slug("slug", data["slug"]),
                   stack=_text("stack", data.get("stack", "host"), STACK),
                   process_types=_process_types("process_types", data["process_types"]),
                   env=_env("env", data.get("env", {})), created=created)


def apply_config_patch(env: Mapping[str, str], body: Any) -> Env:
    """`PATCH /v1/apps/{app}/config` body `{KEY: value | null}` applied to `env` (null
    unsets); the result is checked as a whole (32 KiB)."""
    data = _mapping("body", body)
    merged = dict(env)
    for key, value in data.items():
        if not isinstance(key, str) or not ENV_KEY.fullmatch(key):
            raise Invalid(f"key {excerpt(key)} must match {ENV_KEY.pattern}", "body", key)
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return _env("body", merged)


def parse_formation_patch(app: str, body: Any, current: Mapping[str, FormationEntry],
                          process_types: Collection[str] | None = None,
                          sizes: Mapping[str, Size] = DEFAULT_SIZES) -> list[FormationEntry]:
    """`PATCH /v1/apps/{app}/formation` body `{type: {"quantity"?, "size"?}}`: the changed
    entries, each complete (an omitted key keeps its current value, or 0 / the default
    size for a new type). With `process_types` (the current release's), a type that is not
    one of them is refused, as Heroku does ("Couldn't find that process type")."""
    data = _mapping("body", body)
    if not data:
        raise Invalid("must name at least one process type", "body")
    out: list[FormationEntry] = []
    for key, change in data.items():
        kind = _formation_type(_where("", key), key)
        if process_types is not None and kind not in process_types:
            raise Invalid(f"no process type {kind!r} in the current release", kind, key)
        change = _mapping(kind, change)
        _keys(kind, change, (), ("quantity", "size"))
        if not change:
            raise Invalid("must give quantity, size or both", kind)
        old = current.get(kind)
        quantity = (_int(f"{kind}.quantity", change["quantity"], 0, QUANTITY_MAX)
                    if "quantity" in change else (old.quantity if old else 0))
        size = (_size(f"{kind}.size", change["size"], sizes) if "size" in change
                else (old.size if old else DEFAULT_SIZE))
        out.append(FormationEntry(app, kind, quantity, size))
    return out
