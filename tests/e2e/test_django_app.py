"""A Django app written for Heroku, built and served with no hand step: the built-in Python
buildpack installs requirements.txt from a package index served inside the test's own
network namespaces (never the internet), runs collectstatic, and `dynoagent up` serves the
page, the collected static file and the `.profile.d` variable through its router.

The index holds wheels that `make setup-wheels` downloaded once (keyed by requirements.txt);
the build reaches it through its dyno's egress, on the test host's upstream namespace."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.agentproc import BIN
from tests.support.pyindex import MissingWheels, pip_config_vars, served_index
from tests.support.stacks import TEST_STACK, built_test_stack, stack_agent_config
from tests.support.testhost import TestHost, new_test_host
from tests.support.wait import wait_for

APP = Path(__file__).with_name("apps") / "django"


@pytest.fixture(scope="module")
def host() -> Iterator[TestHost]:
    """A test host whose dynos' egress leads to an upstream namespace (the "internet")."""
    with new_test_host("dj", uplink="upstream") as test_host:
        yield test_host


@pytest.fixture(scope="module")
def index(host: TestHost) -> Iterator[str]:
    assert host.upstream is not None
    try:
        with served_index(APP / "requirements.txt", host.upstream) as url:
            yield url
    except MissingWheels as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="dtdj", dir="/tmp"))
    yield base
    shutil.rmtree(base, ignore_errors=True)


def agent_config(base: Path) -> Path:
    """A private agent whose stacks are the tests' (the app builds and runs on Debian's
    bookworm, not on this machine's files)."""
    built_test_stack()
    return stack_agent_config(base, "dj", "172.31.232.0/22")


def test_build_installs_requirements_from_the_local_index_and_collects_static(
        host: TestHost, index: str, workdir: Path) -> None:
    app = workdir / "app"
    shutil.copytree(APP, app)
    args = [f"-e{k}={v}" for k, v in pip_config_vars(index).items()]
    began = time.monotonic()
    result = subprocess.run(host.command(str(BIN / "dynoagent"), "build", str(app), "--json",
                                         "--config", str(agent_config(workdir / "b")),
                                         "--stack", TEST_STACK, *args),
                            capture_output=True, text=True, timeout=300)
    took = time.monotonic() - began
    assert result.returncode == 0, result.stdout + result.stderr
    log = result.stderr
    assert "-----> Python app detected" in log
    assert "Successfully installed" in log and "django-5.2" in log.lower()
    assert "$ python manage.py collectstatic --noinput" in log
    built = json.loads(result.stdout)
    tree = Path(built["slug"]["dir"])
    assert (tree / "staticfiles" / "site.css").is_file()
    assert (tree / ".heroku" / "python" / "bin" / "gunicorn").is_file()
    # The scripts' shebangs name /app, where the slug is at run time.
    shebang = (tree / ".heroku" / "python" / "bin" / "gunicorn").read_text().splitlines()[0]
    assert shebang == "#!/app/.heroku/python/bin/python3", shebang
    print(f"cold build of the Django app: {took:.1f} s")


# Runs in the test host: GET a path of the router, print status, headers and body as JSON.
GET_PY = """\
import json, sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=10) as r:
        print(json.dumps({"status": r.status, "body": r.read().decode()}))
except urllib.error.HTTPError as e:
    print(json.dumps({"status": e.code, "body": e.read().decode()}))
except OSError as e:
    print(json.dumps({"status": 0, "body": str(e)}))
"""


def get(host: TestHost, path: str) -> dict[str, Any]:
    result = host.run(sys.executable, "-c", GET_PY, f"http://127.0.0.1:5000{path}",
                      timeout_s=30)
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


def up_until_first_page(host: TestHost, app: Path, config: Path,
                        out: Path) -> tuple[subprocess.Popen[bytes], float]:
    began = time.monotonic()
    with open(out, "wb") as sink:
        proc = subprocess.Popen(host.command(str(BIN / "dynoagent"), "up", str(app),
                                             "--config", str(config), "--stack", TEST_STACK),
                                stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: proc.poll() is not None or get(host, "/")["status"] == 200, 240,
                 what="the Django app's first page", interval_s=0.1)
    except BaseException:
        stop(proc)
        raise
    assert proc.poll() is None, out.read_text()
    return proc, time.monotonic() - began


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=10)


def test_up_builds_then_serves_page_static_file_and_profile_d(host: TestHost, index: str,
                                                               workdir: Path) -> None:
    app = workdir / "served"
    shutil.copytree(APP, app)
    env = (APP / ".env").read_text() + "".join(
        f"{k}={v}\n" for k, v in pip_config_vars(index).items())
    (app / ".env").write_text(env)
    config = agent_config(workdir / "u")
    out = workdir / "up.out"
    proc, cold = up_until_first_page(host, app, config, out)
    try:
        page = get(host, "/")
        body = json.loads(page["body"])
        assert body["dyno"] == "web.1"
        assert body["profile_greeting"] == "hello from .profile.d, on web.1"
        assert body["python"] == "/app/.heroku/python/bin/python3"
        assert body["forwarded_for"] == "127.0.0.1" and body["request_id"]
        static = get(host, "/static/site.css")
        assert static["status"] == 200 and "collected by" in static["body"], static
        assert get(host, "/static/missing.css")["status"] == 404
        log = out.read_text()
        assert "-----> Python app detected" in log and "collectstatic" in log
        assert "Warning: the app asks for Python" not in log  # .python-version says 3.11
        assert re.search(r"release\.1 +\| .*Process exited with status 0", log), log
    finally:
        assert stop(proc) == 0, out.read_text()
    # Again, unchanged: the slug is found by its inputs, nothing is built.
    proc, cached = up_until_first_page(host, app, config, out)
    try:
        log = out.read_text()
        assert "Using the slug built from the same source" in log
        assert "Python app detected" not in log
    finally:
        assert stop(proc) == 0, out.read_text()
    mounts = [line for line in Path("/proc/self/mounts").read_text().splitlines()
              if str(workdir) in line]
    assert not mounts
    print(f"up to the first page: {cold:.1f} s with the build, {cached:.1f} s cached")
