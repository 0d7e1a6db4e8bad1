"""The bounds decoders of outside input apply: nesting depth for every one (coordinator
msgpack, operator API and attach JSON, holder msgpack, the TOML config), refused as they
decode, before any other code walks the document; and, for the coordinator's frames of up to
16 MiB, how many values one frame may make.
"""

from __future__ import annotations

from agent import cjson

# dynoctl reads its control frames with json_loads: neither typing nor msgpack (a few ms to
# import) is needed for that. mypy takes any constant of this name as typing's.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Final

# Far above anything the protocols define (a coordinator frame holding a desired set is 6
# levels deep), far below Python's recursion limit (about 1,000 frames), which any repr,
# comparison or json.dumps of a deeper value would hit.
MAX_DEPTH: Final = 32
_NESTED: Final = frozenset({dict, list, tuple})


# One msgpack byte can become a 56-byte empty list: a 16 MiB frame of them took 1.2 GB and
# 5 s to decode. Every array and map counts, and so does each of its elements, keys and
# values; a desired set of 10,000 dynos with 50 config vars each needs about 1.2 M.
MAX_VALUES: Final = 2_000_000
# No one array or map of the protocols comes near (a desired set has at most 10,000 dynos,
# 32 KiB of config vars at most about 11,000 names).
MAX_CONTAINER_LEN: Final = 100_000


class TooMany(ValueError):
    """A msgpack document holds more values than the limit, or one array or map declares
    more entries than MAX_CONTAINER_LEN."""

    def __init__(self, limit: int = MAX_VALUES, what: str = "values") -> None:
        super().__init__(f"holds more than {limit} {what}")
        self.limit = limit


class TooDeep(ValueError):
    """A decoded document nests maps and arrays deeper than the limit."""

    def __init__(self, limit: int = MAX_DEPTH) -> None:
        super().__init__(f"nested deeper than {limit} levels of maps and arrays")
        self.limit = limit


def check_depth(value: Any, limit: int = MAX_DEPTH) -> Any:
    """`value` itself, or TooDeep when it nests more than `limit` maps and arrays (the
    outermost counts as 1). Iterative, level by level: never recurses, and skips scalar
    members at C speed, so a 16 MiB array of nils costs a fraction of its decoding."""
    if type(value) not in _NESTED:
        return value
    level = [value]
    depth = 1
    while level:
        if depth > limit:
            raise TooDeep(limit)
        nested: list[Any] = []
        for item in level:
            members = item.values() if type(item) is dict else item
            if not _NESTED.isdisjoint(map(type, members)):
                nested.extend(m for m in members if type(m) in _NESTED)
        level = nested
        depth += 1
    return value


def json_loads(raw: bytes | str, limit: int = MAX_DEPTH) -> Any:
    """json.loads (of UTF-8, through agent.cjson) with the nesting bound. Raises ValueError
    (TooDeep for depth; json's own decoder recurses and would raise RecursionError on a
    thousand brackets)."""
    try:
        value = cjson.loads(raw)
    except RecursionError:
        raise TooDeep(limit) from None
    return check_depth(value, limit)


def msgpack_loads(data: bytes, max_values: int = MAX_VALUES) -> Any:
    """One msgpack value (string keys only, UTF-8 strings) of at most `max_values` values.

    Raises TooMany while decoding, as soon as the arrays and maps completed so far count
    more, or one of them would hold more than MAX_CONTAINER_LEN (refused before it is
    allocated). Scalars inside containers not yet completed are bounded only by the size of
    `data`. TooDeep past msgpack's own stack of 1,024 levels (the caller checks MAX_DEPTH
    with check_depth once it has read what it needs to answer); else msgpack's errors
    (ValueError, TypeError, msgpack.UnpackException).
    """
    left = max_values

    def spend(count: int) -> None:
        nonlocal left
        left -= count
        if left < 0:
            raise TooMany(max_values)

    def on_list(items: list[Any]) -> list[Any]:
        spend(1 + len(items))
        return items

    def on_map(items: dict[str, Any]) -> dict[str, Any]:
        spend(1 + 2 * len(items))
        return items

    import msgpack

    try:
        # strict_map_key: only string (or binary) keys, so no map can hash an attacker's
        # nested structure; max_*_len: no one container is allocated past the budget.
        return msgpack.unpackb(data, raw=False, strict_map_key=True, list_hook=on_list,
                               object_hook=on_map, max_array_len=MAX_CONTAINER_LEN,
                               max_map_len=MAX_CONTAINER_LEN)
    except msgpack.StackError:
        raise TooDeep() from None
    except ValueError as exc:
        # msgpack says "N exceeds max_array_len(M)" before allocating such a container.
        if "exceeds max_" in str(exc):
            raise TooMany(MAX_CONTAINER_LEN, "entries in one array or map") from None
        raise
