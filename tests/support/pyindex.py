"""A Python package index for builds under test: the wheels `make setup-wheels` downloaded
once (keyed by a requirements file), laid out as a PEP 503 simple index and served by
`python -m http.server` inside a namespace the test created (its test host's upstream), so
that a build dyno's pip reaches it through its egress and never the internet."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.support.testhost import UPSTREAM_PEER_ADDRESS, Netns
from tests.support.wait import wait_for

WHEELS_BASE = Path("/var/cache/dynoagent-tests/wheels")
INDEX_PORT = 8765
INDEX_HOST = str(UPSTREAM_PEER_ADDRESS.ip)


class MissingWheels(Exception):
    """`make setup-wheels` has not run for these requirements."""


def wheels_dir(requirements: Path) -> Path:
    """Where `make setup-wheels` puts the wheels of `requirements` (same key as the Makefile)."""
    key = hashlib.sha256(requirements.read_bytes()).hexdigest()[:16]
    return WHEELS_BASE / key


def write_index(wheels: Path, root: Path) -> None:
    """A PEP 503 simple index of `wheels` under root/simple, the files under root/files."""
    files = root / "files"
    files.mkdir(parents=True)
    projects: dict[str, list[str]] = {}
    for wheel in sorted(wheels.glob("*.whl")):
        shutil.copy(wheel, files / wheel.name)
        name = wheel.name.split("-", 1)[0].lower().replace("_", "-").replace(".", "-")
        projects.setdefault(name, []).append(wheel.name)
    for name, wheel_names in projects.items():
        page = root / "simple" / name
        page.mkdir(parents=True)
        links = "".join(f'<a href="../../files/{w}">{w}</a>\n' for w in wheel_names)
        (page / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")


@contextlib.contextmanager
def served_index(requirements: Path, upstream: Netns) -> Iterator[str]:
    """The index of `requirements`' wheels, served in `upstream`; yields its simple URL."""
    wheels = wheels_dir(requirements)
    if not (wheels / ".complete").is_file():
        raise MissingWheels(f"no wheels for {requirements} in {wheels}: `make setup-wheels` "
                            "downloads them (make test does it first)")
    root = Path(tempfile.mkdtemp(prefix="dtindex", dir="/tmp"))
    try:
        write_index(wheels, root)
        server = upstream.popen([sys.executable, "-m", "http.server", str(INDEX_PORT),
                                 "--bind", INDEX_HOST, "--directory", str(root)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://{INDEX_HOST}:{INDEX_PORT}/simple/"
            probe = f"import urllib.request as u; u.urlopen('{url}', timeout=2)"
            wait_for(lambda: upstream.run(sys.executable, "-c", probe,
                                          check=False).returncode == 0, 15,
                     what="package index")
            yield url
        finally:
            server.terminate()
            server.wait(timeout=10)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def pip_config_vars(index_url: str) -> dict[str, str]:
    """Config vars that point a build's pip at the index (and at nothing this machine's own
    pip configuration names)."""
    return {"PIP_INDEX_URL": index_url, "PIP_TRUSTED_HOST": INDEX_HOST,
            "PIP_CONFIG_FILE": "/dev/null", "PIP_RETRIES": "0", "PIP_TIMEOUT": "10"}
