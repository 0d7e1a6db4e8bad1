"""Hostile values for the fuzz tier: boundary and adversarial strings, integers and nested
structures, and dyno specs (DESIGN §5) mutated one field at a time. Pure functions of a
`random.Random`, so a seed replays the same inputs; nothing here imports the agent."""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Any

import msgpack

# Lengths around every limit the specs and protocols state (ids 64, methods 128, names 30,
# urls 4096, env 32 KiB, command 64 KiB, operator body 1 MiB) and around the kernel's own
# (netns names 255, interface names 15, cgroup names 255).
BOUNDARY_LENGTHS = (0, 1, 2, 14, 15, 16, 29, 30, 31, 59, 60, 63, 64, 65, 127, 128, 129, 255,
                    256, 4095, 4096, 4097, 32 * 1024 - 1, 32 * 1024 + 1, 64 * 1024,
                    64 * 1024 + 1)
INT_EDGES = (0, 1, -1, 2, 9, 10, 15, 31, 64, 65, 255, 256, 2**31 - 1, 2**31, 2**32, 2**53 + 1,
             2**63 - 1, 2**63, 2**64 - 1, -(2**63), -(2**31))
# Integers only JSON can carry (msgpack stops at 64 bits).
JSON_ONLY_INTS = (2**64, -(2**63) - 1, 10**30, -(10**30))
# Digits and signs that Python's int() or str.isdigit() accept but that are not ASCII
# (issue 19 item 7: Arabic-Indic "10" was taken for signal 10).
UNICODE_NUMBERS = ("\u0661\u0660", "\u0663", "\uff11\uff15", "\u0967\u096b", "\xb2", "\u2079",
                   "\U0001d7d7", "\u09ef", "\u0660", "\u07c9", "\u0669", "15\u200b", "\u00a015",
                   "+15", "0x0f", "1e1", "15.0", "015", " 15 ", "-9", "1_5")
TRICKY_TEXT = ("", " ", "\t", "\n", "\r\n", "\x00", "a\x00b", "\x7f", "\u200b", "\u202e",
               "\ufeff", "\xe9", "\xdf", "\u0130", "\ufb03", "\U0001d51e", "\U0001f600",
               "\U0010ffff", "../..", "/", ".", "..",
               "-", "--", "a-", "-a", "web.0", "web.01", "web.1.1", "WEB.1", "web.",
               ".1", "run.1", "release.1", "a" * 31 + ".1", "%s%n", "${PATH}", "$(id)",
               "'; rm -rf /", "null", "true", "NaN", "SIGKILL", "KILL", "kill", "SIGSIGTERM",
               "SIGRTMIN+1", "RTMIN", "USR1", "sigusr1", "0", "9", "64", "65", "4294967296",
               "host", "heroku-22", "eco", "Standard-2X", "performance-l", "always", "never")
SIGNALS_OK = ("TERM", "SIGTERM", "USR1", "SIGUSR1", "HUP", "15", "10", 15, 10, 0)


@dataclass(frozen=True)
class Hostile:
    """One mutation of a value: what it is (for reports) and the value."""

    label: str
    value: Any


def boundary_text(rng: random.Random, alphabet: str = "a") -> str:
    length = rng.choice(BOUNDARY_LENGTHS)
    return (alphabet * (length // len(alphabet) + 1))[:length]


def text(rng: random.Random) -> Hostile:
    roll = rng.random()
    if roll < 0.35:
        return Hostile("tricky-text", rng.choice(TRICKY_TEXT))
    if roll < 0.55:
        return Hostile("unicode-number", rng.choice(UNICODE_NUMBERS))
    if roll < 0.8:
        value = boundary_text(rng, rng.choice(("a", "z9", "-", "\xe9", "\x00", "A", "\U0001f600")))
        return Hostile(f"boundary-text-{len(value)}", value)
    length = rng.randrange(1, 80)
    alphabet = string.printable + "\xe9\xdf\U0001f600\u202e"
    value = "".join(rng.choice(alphabet) for _ in range(length))
    return Hostile("random-text", value)


def integer(rng: random.Random, json_only: bool = False) -> Hostile:
    pool = INT_EDGES + (JSON_ONLY_INTS if json_only else ())
    value = rng.choice(pool) if rng.random() < 0.8 else rng.randrange(-(2**40), 2**40)
    return Hostile("int", value)


def deep_value(rng: random.Random, depth: int | None = None) -> Hostile:
    """Nested lists or maps deeper than any reasonable input (as Python objects: only JSON
    can encode them past msgpack's packer limit; see deep_msgpack for raw frames)."""
    depth = depth if depth is not None else rng.choice((64, 100, 500, 999, 1000, 1024, 1025,
                                                        3000))
    value: Any = rng.choice((None, 1, "x", []))
    as_map = rng.random() < 0.5
    for _ in range(depth):
        value = {"a": value} if as_map else [value]
    return Hostile(f"deep-{'map' if as_map else 'list'}-{depth}", value)


def any_value(rng: random.Random, msgpack_safe: bool = True, depth: int = 0) -> Hostile:
    """A value of a random type, for a field that expects another."""
    roll = rng.random()
    if roll < 0.15:
        return Hostile("nil", None)
    if roll < 0.25:
        return Hostile("bool", rng.random() < 0.5)
    if roll < 0.4:
        return integer(rng, json_only=not msgpack_safe)
    if roll < 0.5:
        return Hostile("float", rng.choice((0.0, -0.0, 1.5, 1e308, float("inf"), float("nan"),
                                            15.0)))
    if roll < 0.7:
        return text(rng)
    if roll < 0.75 and msgpack_safe:
        return Hostile("binary", rng.randbytes(rng.choice((0, 1, 16, 300))))
    if roll < 0.85 and depth < 3:
        items = [any_value(rng, msgpack_safe, depth + 1).value for _ in range(rng.randrange(4))]
        return Hostile("list", items)
    if roll < 0.95 and depth < 3:
        keys = [text(rng).value for _ in range(rng.randrange(4))]
        return Hostile("map", {k: any_value(rng, msgpack_safe, depth + 1).value for k in keys})
    return deep_value(rng, rng.choice((64, 200)))


# -- dyno specs ---------------------------------------------------------------------------------
SPEC_KEYS = ("id", "app", "name", "command", "env", "release", "size", "space", "restart",
             "boot_timeout_s", "stop_timeout_s")


@dataclass(frozen=True)
class SpecCase:
    """A spec and whether DESIGN §5 makes it valid (None: the generator does not know)."""

    label: str
    spec: dict[str, Any]
    valid: bool | None


def valid_spec(rng: random.Random, dyno_id: str, app: str, slug: str,
               dyno_type: str = "worker") -> dict[str, Any]:
    """A light valid spec: `sleep`, a short stop timeout."""
    return {"id": dyno_id, "app": app, "name": f"{dyno_type}.{rng.randrange(1, 10**6)}",
            "command": "sleep 600", "release": {"version": 1, "slug": {"path": slug}},
            "stop_timeout_s": 2}


def _set_path(spec: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    target = spec
    for key in path[:-1]:
        child = target.get(key)
        if not isinstance(child, dict):
            child = target[key] = {}
        target = child
    target[path[-1]] = value


def mutate_spec(rng: random.Random, base: dict[str, Any], msgpack_safe: bool) -> SpecCase:
    """`base` with one hostile change. Valid edge cases (a 64-character id, env at its limit)
    are marked valid so that the caller can check they really start."""
    spec = {**base, "release": {**base["release"], "slug": dict(base["release"]["slug"])}}
    roll = rng.randrange(16)
    if roll == 0:  # ids over the whole length domain, valid ones included (item 2)
        length = rng.choice((1, 2, 50, 59, 60, 61, 62, 63, 64, 65, 100))
        alphabet = rng.choice(("a", "z9", "0-", "-"))
        spec["id"] = (alphabet * 64)[:length] if length <= 64 else "a" * length
        return SpecCase(f"id-length-{length}", spec, length <= 64)
    if roll == 1:
        field = rng.choice(SPEC_KEYS)
        value = any_value(rng, msgpack_safe)
        spec[field] = value.value
        return SpecCase(f"{field}={value.label}", spec, None)
    if roll == 2:
        spec[text(rng).value or "x"] = any_value(rng, msgpack_safe).value
        return SpecCase("unknown-key", spec, False)
    if roll == 3:
        del spec[rng.choice(("app", "name", "command", "release"))]
        return SpecCase("missing-required", spec, False)
    if roll == 4:
        size = rng.choice((32 * 1024 - 16, 32 * 1024, 32 * 1024 + 1, 200 * 1024))
        spec["env"] = {"V": "x" * (size - 1)}
        return SpecCase(f"env-{size}", spec, size <= 32 * 1024)
    if roll == 5:
        size = rng.choice((64 * 1024, 64 * 1024 + 1, 300 * 1024))
        spec["command"] = "sleep 600 #" + "x" * (size - 11)
        return SpecCase(f"command-{size}", spec, size <= 64 * 1024)
    if roll == 6:
        spec["env"] = {text(rng).value: "v" for _ in range(rng.randrange(1, 4))}
        return SpecCase("env-keys", spec, None)
    if roll == 7:
        spec["release"]["version"] = integer(rng, json_only=not msgpack_safe).value
        return SpecCase("release-version", spec, None)
    if roll == 8:
        spec["release"]["slug"] = rng.choice((
            {"path": "relative/dir"}, {"path": "/etc"}, {"path": "/"}, {"path": "/proc/self"},
            {"url": "file:///etc/passwd", "sha256": "0" * 64},
            {"url": "http://127.0.0.1:1/x", "sha256": "g" * 64},
            {"url": "http://[::1", "sha256": "0" * 64},
            {"path": base["release"]["slug"]["path"], "url": "http://x/"},
            {"path": base["release"]["slug"]["path"] + "/../../etc"}, {}))
        return SpecCase("slug", spec, None)
    if roll == 9:
        spec["release"]["stack"] = text(rng).value
        return SpecCase("stack", spec, None)
    if roll == 10:
        field = rng.choice(("boot_timeout_s", "stop_timeout_s"))
        spec[field] = integer(rng, json_only=not msgpack_safe).value
        return SpecCase(field, spec, None)
    if roll == 11:
        field = rng.choice(("app", "space", "name", "size", "restart"))
        spec[field] = text(rng).value
        return SpecCase(f"{field}-text", spec, None)
    if roll == 12:
        field = rng.choice(("app", "name", "command"))
        spec[field] = rng.choice(("\x00" * 4096, "é" * 40000, "a" * 200_000))
        return SpecCase(f"{field}-huge", spec, False)
    if roll == 13:
        spec["env"] = {f"K{i}": "v" for i in range(rng.choice((1000, 5000)))}
        return SpecCase("env-many-keys", spec, None)
    if roll == 14:
        spec["name"] = f"{rng.choice(('web', 'run', 'release', 'worker'))}.{rng.randrange(1, 9)}"
        return SpecCase("type", spec, True)
    spec["env"] = deep_value(rng, rng.choice((100, 1000))).value
    return SpecCase("env-deep", spec, False)


# -- raw msgpack --------------------------------------------------------------------------------
def pack(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def packable(value: Any) -> bool:
    try:
        pack(value)
    except (ValueError, TypeError, OverflowError, UnicodeEncodeError):
        return False
    return True


def map_header(count: int) -> bytes:
    if count < 16:
        return bytes([0x80 | count])
    return b"\xde" + count.to_bytes(2, "big")


def raw_map(items: list[tuple[Any, bytes]]) -> bytes:
    """A msgpack map whose values are given already packed (e.g. nesting no packer makes)."""
    return map_header(len(items)) + b"".join(pack(k) + v for k, v in items)


def deep_msgpack(depth: int, as_map: bool) -> bytes:
    """`depth` nested one-element arrays or maps around nil, as raw bytes."""
    return (b"\x81\xa1a" if as_map else b"\x91") * depth + b"\xc0"


def garbage_bytes(rng: random.Random) -> bytes:
    roll = rng.randrange(6)
    if roll == 0:
        return rng.randbytes(rng.randrange(0, 64))
    if roll == 1:  # truncated container headers promising more than follows
        return rng.choice((b"\xdf\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff",
                           b"\xdb\xff\xff\xff\xff", b"\xc6\x7f\xff\xff\xff", b"\x82\xa1t",
                           b"\x85"))
    if roll == 2:  # reserved/extension types
        return rng.choice((b"\xc1", b"\xd4\x01\x00", b"\xc7\x00\x05", b"\xd6\xff\x00\x00\x00\x00",
                           b"\xc7\x0c\xff" + b"\x00" * 12))
    if roll == 3:  # two values in one frame
        return pack({"t": "req", "id": 1, "m": "agent.info"}) + pack(1)
    if roll == 4:
        return pack(any_value(rng).value) if packable(any_value(rng).value) else b"\xc0"
    # a map with non-string keys
    return rng.choice((b"\x81\x01\x02", b"\x81\xc0\xc0", b"\x81\x91\x01\x01",
                       b"\x81\xcb" + b"\x00" * 8 + b"\x01", b"\x81\xc3\xa3req"))

