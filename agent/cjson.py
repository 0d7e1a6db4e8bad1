"""JSON through the interpreter's own C codec (`_json`), without importing the `json` package.

`json` imports `re` (for its whitespace and number patterns) and with it some 15 ms of
modules on this kind of host, more than everything else `dynoctl run` needs. The C scanner
and encoder underneath are what `json.loads` and `json.dumps` use themselves; this module
makes them the same way `json.decoder` and `json.encoder` do, and reads the same documents
the same (a document is UTF-8 here, which is all the attach protocol sends). Where the
interpreter has no `_json`, it is `json` after all.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: importing typing is what this module avoids
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

_WHITESPACE = " \t\n\r"


def _constant(name: str) -> float:
    return {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}[name]


def _refuse(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


class _Context:
    """What the C scanner reads from `json.JSONDecoder`: its options, as json's defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_constant)


def _c_codec() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    try:
        import _json
    except ImportError:
        return None
    make_scanner = getattr(_json, "make_scanner", None)
    make_encoder = getattr(_json, "make_encoder", None)
    encode_string = getattr(_json, "encode_basestring_ascii", None)
    if make_scanner is None or make_encoder is None or encode_string is None:
        return None
    scanner = make_scanner(_Context())
    # (markers, default, string encoder, indent, key and item separators, sort_keys,
    # skipkeys, allow_nan): json.dumps's defaults but the compact separators.
    # No markers: nothing here encodes a value that contains itself.
    encoder = make_encoder(None, _refuse, encode_string, None, ":", ",", False, False, True)
    return scanner, encoder


_codec = _c_codec()


def loads(document: bytes | str) -> Any:
    """json.loads of a UTF-8 (or str) document; ValueError when it is not JSON."""
    if _codec is None:
        import json

        return json.loads(document)
    if isinstance(document, bytes):
        # As json.loads of bytes: a UTF-8 byte order mark is skipped.
        text = document.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "surrogatepass")
    else:
        text = document
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _codec[0](text, start)
    except StopIteration as exc:
        raise ValueError(f"Expecting value: char {exc.value}") from None
    if text[end:].strip(_WHITESPACE):
        raise ValueError(f"Extra data: char {end}")
    return value


def dumps(value: Any) -> str:
    """json.dumps(value, separators=(",", ":")): compact, ASCII, NaN allowed as json's."""
    if _codec is None:
        import json

        return json.dumps(value, separators=(",", ":"))
    return "".join(_codec[1](value, 0))
