"""The agent's packages are layered as docs/architecture.md lists them: each imports only the
root modules and the packages above it in that list, never one below (so the daemon never
imports standalone mode, and observability never imports supervision), and the root modules
import no package. Imports inside functions and under TYPE_CHECKING count too."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import agent

AGENT_DIR = Path(agent.__file__).parent
ARCHITECTURE = (AGENT_DIR.parent / "docs" / "architecture.md").read_text()


def _layers() -> list[str]:
    """The agent's packages in the order of the architecture page's package table."""
    table = ARCHITECTURE.split("\n## Packages\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `agent/(\w+)/` \|", table, re.M)


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _violations(layers: list[str]) -> set[str]:
    found: set[str] = set()
    for path in sorted(AGENT_DIR.rglob("*.py")):
        parts = path.relative_to(AGENT_DIR).parts
        own = parts[0] if len(parts) > 1 else None
        for name in _imported_modules(path):
            match = re.match(r"agent\.(\w+)", name)
            if match is None or match[1] not in layers or match[1] == own:
                continue
            if own is None or layers.index(match[1]) > layers.index(own):
                found.add(f"{path.relative_to(AGENT_DIR.parent)} imports {name}")
    return found


def test_the_table_names_every_package() -> None:
    packages = {p.parent.name for p in AGENT_DIR.glob("*/__init__.py")}
    assert set(_layers()) == packages


def test_no_package_imports_one_below_it() -> None:
    assert not _violations(_layers()), sorted(_violations(_layers()))


def test_the_check_sees_an_upward_import() -> None:
    # With supervision listed below the API, supervision's imports of nothing above it still
    # pass, but the API's imports of supervision are caught.
    layers = _layers()
    swapped = [name for name in layers if name != "supervision"] + ["supervision"]
    assert any("agent/api/" in v for v in _violations(swapped))
