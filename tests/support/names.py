"""Unique, short names for kernel objects that tests create (links allow 15 characters)."""

from __future__ import annotations

import secrets


def unique(prefix: str = "dt", length: int = 6) -> str:
    return f"{prefix}{secrets.token_hex(length // 2 + 1)[:length]}"
