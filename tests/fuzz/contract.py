"""What the documents promise, read from the documents themselves so that the fuzzers follow
them: the operator API's error codes and HTTP statuses (README, "Operator API errors"), the
coordinator protocol's error codes (docs/protocol.md §7) and its frame limits (§2, §8)."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PROTOCOL = ROOT / "docs" / "protocol.md"

# docs/protocol.md §2: request ids are ints from 0 to 2**63-1, methods of 1 to 128
# characters.
ID_MAX = 2**63 - 1
METHOD_MAX_CHARS = 128
MiB = 1024 * 1024


def _section(text: str, heading: re.Pattern[str]) -> str:
    match = heading.search(text)
    assert match is not None, f"no section {heading.pattern!r}"
    rest = text[match.end():]
    end = re.search(r"^## ", rest, re.M)
    return rest if end is None else rest[:end.start()]


@cache
def api_error_statuses() -> dict[str, int]:
    """code -> HTTP status, from the README's operator API error table."""
    section = _section(README.read_text(), re.compile(r"^## Operator API errors$", re.M))
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \|", section, re.M))
    assert rows, "the README's operator API error table is empty"
    return {code: int(status) for code, status in rows.items()}


@cache
def coordinator_error_codes() -> frozenset[str]:
    """Every code of docs/protocol.md §7's table."""
    section = _section(PROTOCOL.read_text(), re.compile(r"^## 7\. Errors$", re.M))
    codes = frozenset(re.findall(r"^\| `([a-z_]+)` \|", section, re.M))
    assert codes, "docs/protocol.md §7 lists no codes"
    return codes


@cache
def frame_limits() -> tuple[int, int]:
    """(answered limit, hard limit) in bytes from §8: frames up to the first are read, up to
    the second answered with frame_too_large, beyond it the connection is closed."""
    section = _section(PROTOCOL.read_text(), re.compile(r"^## 8\. Limits$", re.M))
    row = re.search(r"^\| frame size[^|]*\|([^\n]*)", section, re.M)
    assert row is not None, "docs/protocol.md §8 gives no frame size"
    sizes = [int(n) * MiB for n in re.findall(r"(\d+) MiB", row.group(1))]
    assert len(sizes) >= 2, f"§8's frame size row names no two sizes: {row.group(1)}"
    return sizes[0], sizes[1]
