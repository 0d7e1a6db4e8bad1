"""The README tells the truth about the things the code defines."""

from __future__ import annotations

import ast
import re
from dataclasses import fields
from pathlib import Path

from agent import errors
from agent.config import Config
from agent.coordinator import frames as coordinator
from agent.errors import ERROR_CODES

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_error_table_matches_the_code() -> None:
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \|", README, re.M))
    assert rows == {code: str(status) for code, (status, _) in ERROR_CODES.items()}


def test_every_config_key_is_documented() -> None:
    for f in fields(Config):
        name = "[sizes.NAME]" if f.name == "sizes" else f.name
        assert f"| `{name}` |" in README, f"config key {f.name} missing from the README"


PROTOCOL = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
# The modules behind the coordinator link's answers: the codec and requests, the engine, the
# supervisor (and the dynos and signal parsing it calls); every module of agent/coordinator/.
AGENT_DIR = Path(errors.__file__).parent
COORDINATOR_SIDE = (*sorted((AGENT_DIR / "coordinator").glob("*.py")),
                    *(AGENT_DIR / "supervision" / name
                      for name in ("reconcile.py", "supervisor.py", "dyno.py")),
                    AGENT_DIR / "signals.py")


def _protocol_error_rows() -> list[str]:
    section = PROTOCOL.split("\n## 7. Errors\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([a-z_]+)` \|", section, re.M)


def test_protocol_error_table_matches_the_code() -> None:
    rows = _protocol_error_rows()
    assert len(rows) == len(set(rows)), "a code is listed twice in docs/protocol.md §7"
    assert set(rows) == set(coordinator.ERROR_CODES)


def _raised_codes(source: str) -> set[str]:
    """Codes a module can put in an error answer: literal FrameError and _reply_error codes,
    and the code of every errors.X it constructs."""
    codes: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        position = {"FrameError": 0, "_reply_error": 1}.get(name)
        if position is not None and len(node.args) > position:
            arg = node.args[position]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                codes.add(arg.value)
        if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                and func.value.id == "errors"):
            cls = getattr(errors, func.attr, None)
            if isinstance(cls, type) and issubclass(cls, errors.AgentError):
                codes.add(cls.code)
    return codes


def test_every_code_the_coordinator_side_can_send_is_documented() -> None:
    raised: set[str] = set()
    for path in COORDINATOR_SIDE:
        raised |= _raised_codes(path.read_text())
    assert "timeout" in raised and "malformed_frame" in raised  # the scan sees both kinds
    assert raised <= set(coordinator.ERROR_CODES), raised - set(coordinator.ERROR_CODES)
    assert raised <= set(_protocol_error_rows())
