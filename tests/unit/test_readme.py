"""The README tells the truth about the things the code defines."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from agent.config import Config
from agent.errors import ERROR_CODES

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_error_table_matches_the_code() -> None:
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \|", README, re.M))
    assert rows == {code: str(status) for code, (status, _) in ERROR_CODES.items()}


def test_every_config_key_is_documented() -> None:
    for f in fields(Config):
        name = "[sizes.NAME]" if f.name == "sizes" else f.name
        assert f"| `{name}` |" in README, f"config key {f.name} missing from the README"
