"""The idmapped slug: only the slug directory's owner becomes the dyno user. A developer's app
directory (`dynoagent up`) owned by a user shows that user's files as the dyno's own; root's
files in it stay someone else's, so a root-only file is not readable from inside."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tests.privileged.launcher.harness import Holder, run

OWNER = 1234  # a developer's uid, not root, not a dyno uid
OVERFLOW = int(Path("/proc/sys/kernel/overflowuid").read_text())

PROBE = ("for f in /app /app/mine.txt /app/roots.txt /app/root-secret.txt; do "
         "stat -c '%u %n' $f; done; "
         "cat /app/root-secret.txt >/dev/null 2>&1 && echo secret-read || echo secret-refused; "
         "{ echo more >> /app/mine.txt; } 2>/dev/null && echo mine-written || echo mine-refused; "
         "{ echo more >> /app/roots.txt; } 2>/dev/null && echo roots-written || "
         "echo roots-refused")


def test_a_user_owned_slug_maps_that_user_and_nobody_else(holder: Holder,
                                                          make_dyno: Any) -> None:
    dyno = make_dyno(PROBE, slug_files={"mine.txt": "mine\n", "roots.txt": "public\n",
                                        "root-secret.txt": "SECRET\n"})
    slug = Path(dyno.req["slug_dir"])
    os.chown(slug, OWNER, OWNER)
    os.chown(slug / "mine.txt", OWNER, OWNER)
    (slug / "roots.txt").chmod(0o644)
    (slug / "root-secret.txt").chmod(0o600)  # root's, like anything in a host directory
    status, out = run(holder, dyno)
    assert status == 0, out
    uid = dyno.req["uid"]
    assert out.splitlines() == [
        f"{uid} /app", f"{uid} /app/mine.txt",
        f"{OVERFLOW} /app/roots.txt", f"{OVERFLOW} /app/root-secret.txt",
        "secret-refused", "mine-written", "roots-refused"], out
    # The host's copies are untouched (changes went to the dyno's upper layer).
    assert (slug / "mine.txt").read_text() == "mine\n"
    assert (slug / "roots.txt").stat().st_uid == 0


def test_a_root_owned_slug_is_mapped_as_before(holder: Holder, make_dyno: Any) -> None:
    # A slug extracted into the cache is root's: all of it is the dyno's, as it always was.
    dyno = make_dyno(PROBE, slug_files={"mine.txt": "mine\n", "roots.txt": "public\n",
                                        "root-secret.txt": "SECRET\n"})
    slug = Path(dyno.req["slug_dir"])
    (slug / "root-secret.txt").chmod(0o600)
    status, out = run(holder, dyno)
    assert status == 0, out
    uid = dyno.req["uid"]
    assert out.splitlines() == [
        f"{uid} /app", f"{uid} /app/mine.txt", f"{uid} /app/roots.txt",
        f"{uid} /app/root-secret.txt", "secret-read", "mine-written", "roots-written"], out
