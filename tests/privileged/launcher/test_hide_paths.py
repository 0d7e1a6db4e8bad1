"""hide_paths on the host stack: directories named directly, through a symlink, or nested in
one another are empty inside the dyno, whatever their modes, in whichever order they come."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.privileged.launcher.harness import Holder, run
from tests.support.tempdirs import readable_temp_dir


@pytest.fixture
def host_dir() -> Iterator[Path]:
    # Outside /tmp: a dyno's /tmp is its own and would hide the directory anyway.
    with readable_temp_dir("dthide", "/var/tmp") as path:
        yield path


@pytest.mark.parametrize("order", ["outer-first", "inner-first"])
def test_direct_symlinked_and_nested_paths_are_hidden(holder: Holder, make_dyno: Any,
                                                      host_dir: Path, order: str) -> None:
    outer, inner, other = host_dir / "outer", host_dir / "outer" / "inner", host_dir / "other"
    for path in (inner, other):
        path.mkdir(parents=True)
        (path / "secret.txt").write_text("SECRET\n")
        (path / "secret.txt").chmod(0o644)
    (outer / "secret.txt").write_text("SECRET\n")
    (outer / "secret.txt").chmod(0o644)
    for path in (outer, inner, other):
        path.chmod(0o755)
    (host_dir / "link").symlink_to(other)
    hide = [str(outer), str(inner), str(host_dir / "link")]
    if order == "inner-first":
        hide.reverse()
    probe = " ; ".join(f"echo \"{p}: $(ls -A {p} 2>&1)\"" for p in (outer, inner, other))
    dyno = make_dyno(f"{probe} ; cat {outer}/secret.txt {inner}/secret.txt "
                     f"{other}/secret.txt 2>/dev/null ; echo END", hide_paths=hide)
    status, out = run(holder, dyno)
    assert status == 0, out
    assert "SECRET" not in out, out
    assert out.splitlines()[-1] == "END", out
    assert f"{outer}: " in out.splitlines()
    assert f"{other}: " in out.splitlines()
    # The inner directory is empty, or gone under the outer mask.
    inner_line = next(line for line in out.splitlines() if line.startswith(f"{inner}:"))
    assert inner_line in (f"{inner}: ", f"{inner}: ls: cannot access '{inner}': "
                                        "No such file or directory"), out
    # And without hiding, the same dyno reads them: the test would notice a broken mask.
    plain = make_dyno(f"cat {outer}/secret.txt {inner}/secret.txt {other}/secret.txt")
    status, out = run(holder, plain)
    assert status == 0 and out.count("SECRET") == 3, out
