"""What an answer may be, from the documents alone: docs/protocol.md §2 (the envelope), §4
(each method's parameters), §7 (codes) and §8 (frame sizes) for the coordinator link, and
DESIGN §5 (via the generator's own knowledge of what it broke) for specs.

An outcome is a §7 code, OK (a result), or IGNORED (no answer at all). When one input has
several faults the documents do not say which is reported first, so any of their codes is
accepted; input nested deeper than DEPTH_LIMIT may also be refused as a whole."""

from __future__ import annotations

import re
import signal
from collections.abc import Mapping
from typing import Any, Final

from tests.fuzz.contract import ID_MAX, METHOD_MAX_CHARS

OK: Final = "ok"
IGNORED: Final = "ignored"
# agent/decoding.py refuses documents nested deeper than this while decoding; the fuzzers
# accept that refusal for any deeper input, and nothing else.
DEPTH_LIMIT: Final = 32
METHODS: Final = ("dynos.sync", "dyno.start", "dyno.stop", "dyno.restart", "dyno.signal",
                  "agent.drain", "agent.info")
# What a well-formed request about dynos may get, whatever else happens concurrently.
STATEFUL: Final = frozenset({OK, "not_found", "conflict", "draining"})
DYNO_ID: Final = re.compile(r"[a-z0-9-]{1,64}")
SIGNAL_NUMBERS: Final = frozenset(int(s) for s in signal.Signals)
SIGNAL_NAMES: Final = frozenset(s.name for s in signal.Signals)


def depth(value: Any) -> int:
    """Nesting depth of maps and arrays (iterative: values here may be thousands deep)."""
    deepest, level, current = 0, [value], 0
    while level:
        nested = [v for v in level if isinstance(v, dict | list | tuple)]
        if not nested:
            break
        current += 1
        deepest = current
        level = [m for v in nested for m in (v.values() if isinstance(v, dict) else v)]
    return deepest


def valid_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= ID_MAX


def valid_method(value: Any) -> bool:
    return isinstance(value, str) and 1 <= len(value) <= METHOD_MAX_CHARS


def envelope(frame: Any) -> frozenset[str] | None:
    """The outcomes §2/§7 allow for a decoded frame, or None when it is a well-formed request
    (then its method decides)."""
    if not isinstance(frame, dict):
        return frozenset({"malformed_frame"})
    if not all(isinstance(k, str) for k in frame):
        # §2: map keys are strings. A bin key is not the key of that name.
        return frozenset({"malformed_frame", "unknown_type"})
    kind = frame.get("t")
    if kind not in ("req", "res", "evt"):
        return frozenset({"unknown_type", "malformed_frame"})
    if kind == "evt":
        if not valid_method(frame.get("m")) or not isinstance(frame.get("p", {}), dict):
            return frozenset({"malformed_frame"})
        return frozenset({IGNORED})
    if not valid_id(frame.get("id")):
        return frozenset({"malformed_frame"})
    if kind == "res":
        if ("p" in frame) == ("e" in frame):
            return frozenset({"malformed_frame"})
        error = frame.get("e")
        if "e" in frame and not (isinstance(error, dict) and isinstance(error.get("code"), str)
                                 and isinstance(error.get("message", ""), str)):
            return frozenset({"malformed_frame"})
        return frozenset({IGNORED})
    if not valid_method(frame.get("m")) or not isinstance(frame.get("p", {}), dict):
        return frozenset({"malformed_frame"})
    return None


def signal_outcome(value: Any) -> frozenset[str]:
    """§4 dyno.signal: a name such as "USR1"/"SIGUSR1" or an int; anything else, and any
    non-ASCII text (issue 19 item 7), is bad_request. Surrounding ASCII blanks and leading
    zeros are not specified either way."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return frozenset({"bad_request"})
    if isinstance(value, int):
        return frozenset({OK} if value in SIGNAL_NUMBERS else {"bad_request"})
    if not value.isascii():
        return frozenset({"bad_request"})
    text = value.strip()
    lenient = frozenset({OK, "bad_request"}) if text != value else None
    if text.isdigit():
        ok = int(text) in SIGNAL_NUMBERS
        if ok and (len(text) > 1 and text.startswith("0")):
            return frozenset({OK, "bad_request"})
    else:
        name = text.upper()
        ok = (name if name.startswith("SIG") else "SIG" + name) in SIGNAL_NAMES
    if lenient is not None and ok:
        return lenient
    return frozenset({OK} if ok else {"bad_request"})


def params_outcome(method: str, params: Mapping[str, Any], *, known_ids: set[str],
                   spec_valid: bool | None = None) -> frozenset[str]:
    """The outcomes §4 allows for a well-formed request (`known_ids`: dynos that may exist;
    `spec_valid`: what the generator knows of a spec it sent)."""
    faults: set[str] = set()

    def fields(required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
        if any(k not in (*required, *optional) for k in params):
            faults.add("bad_request")
        if any(k not in params for k in required):
            faults.add("bad_request")

    def dyno_id(value: Any) -> None:
        if not isinstance(value, str) or not DYNO_ID.fullmatch(value):
            faults.add("bad_request")
        elif value not in known_ids:
            faults.add("not_found")

    outcome: set[str] = set(STATEFUL)
    if method not in METHODS:
        outcome = {"unknown_method"}
    elif method == "agent.info":
        fields(())
        outcome = {OK}
    elif method in ("dyno.stop", "dyno.restart"):
        fields(("id",))
        dyno_id(params.get("id"))
        # §7: a stop that outlasts stop_timeout_s + 15 s is answered `timeout` and goes on.
        outcome.add("timeout")
    elif method == "dyno.signal":
        fields(("id", "signal"))
        dyno_id(params.get("id"))
        if "signal" in params:
            allowed = signal_outcome(params["signal"])
            if OK not in allowed:
                faults.add("bad_request")
            elif "bad_request" in allowed:
                outcome.add("bad_request")
    elif method == "agent.drain":
        fields((), ("stop", "cancel"))
        for key in ("stop", "cancel"):
            if key in params and not isinstance(params[key], bool):
                faults.add("bad_request")
        if params.get("stop") is True and params.get("cancel") is True:
            faults.add("bad_request")
        outcome = {OK}
    elif method == "dyno.start":
        if spec_valid is False:
            faults.add("invalid_spec")
            faults.add("bad_request")
        elif spec_valid is None:
            outcome |= {"invalid_spec", "bad_request"}
    elif method == "dynos.sync":
        fields(("generation", "dynos"))
        generation = params.get("generation")
        if not (isinstance(generation, int) and not isinstance(generation, bool)
                and 0 <= generation <= ID_MAX):
            faults.add("bad_request")
        if not isinstance(params.get("dynos"), list):
            faults.add("bad_request")
        if spec_valid is False:
            faults |= {"invalid_spec", "bad_request"}
        outcome = {OK} if spec_valid is not None else {OK, "invalid_spec", "bad_request"}
    if faults and method in ("dyno.stop", "dyno.restart", "dyno.signal") and isinstance(
            params.get("id"), str) and DYNO_ID.fullmatch(params["id"]):
        # Which is looked at first, the dyno or the other parameters, is not specified.
        faults.add("not_found")
    if depth(params) + 1 > DEPTH_LIMIT:
        # The frame around the params adds a level; the whole frame may be refused.
        return frozenset((faults or outcome) | {"malformed_frame"})
    return frozenset(faults or outcome)
