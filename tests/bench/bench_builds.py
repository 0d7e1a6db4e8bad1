"""Builds and `up` of the Django test app (tests/e2e/apps/django) on the tests' bookworm stack,
its packages from a local index in the test host's upstream namespace:
- `dynoagent build`, cold (a fresh agent, no build cache) and cached (same inputs);
- `dynoagent up` to the first 200 through its router with the build cached, against the same
  slug's gunicorn started directly (host python, the slug's site-packages) to its first 200.
Needs `make setup-stack setup-wheels`; prints figures, asserts none."""

from __future__ import annotations

import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support.agentproc import BIN
from tests.support.pyindex import MissingWheels, pip_config_vars, served_index
from tests.support.stacks import TEST_STACK, TEST_STACKS_DIR, stack_agent_config
from tests.support.testhost import TestHost, new_test_host

APP = Path(__file__).resolve().parents[1] / "e2e" / "apps" / "django"
COLD_ROUNDS = 2
WARM_ROUNDS = 5
PROBE = """\
import sys, time, urllib.request
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen("http://127.0.0.1:5000/", timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        time.sleep(0.02)
sys.exit(1)
"""


def _config(base: Path) -> Path:
    return stack_agent_config(base, "bb", "172.31.236.0/22")


def _build(host: TestHost, app: Path, config: Path) -> tuple[float, dict[str, object]]:
    began = time.monotonic()
    result = subprocess.run(host.command(str(BIN / "dynoagent"), "build", str(app), "--json",
                                         "--config", str(config), "--stack", TEST_STACK),
                            capture_output=True, text=True, timeout=600)
    took = time.monotonic() - began
    if result.returncode != 0:
        raise RuntimeError(result.stdout + result.stderr)
    out: dict[str, object] = json.loads(result.stdout)
    return took, out


def _first_page(host: TestHost, argv: list[str], cwd: Path | None = None,
                env: dict[str, str] | None = None) -> float:
    """Start `argv` in the test host; seconds until 127.0.0.1:5000 answers 200; then SIGINT."""
    began = time.monotonic()
    proc = subprocess.Popen(host.command(*argv), cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        probe = host.run(sys.executable, "-c", PROBE, check=False, timeout_s=150)
        took = time.monotonic() - began
        if probe.returncode != 0:
            raise RuntimeError(f"no 200 from {argv[0]} within 120 s")
        return took
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    if not (TEST_STACKS_DIR / TEST_STACK / "usr/bin/python3").is_file():
        print("skipped: no test stack (make setup-stack)")
        return
    base = Path(tempfile.mkdtemp(prefix="dtbb", dir="/tmp"))
    try:
        with new_test_host("bb", uplink="upstream") as host:
            assert host.upstream is not None
            try:
                with served_index(APP / "requirements.txt", host.upstream) as index:
                    _run(host, base, index)
            except MissingWheels as exc:
                print(f"skipped: {exc}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _run(host: TestHost, base: Path, index: str) -> None:
    app = base / "app"
    shutil.copytree(APP, app)
    (app / ".env").write_text((APP / ".env").read_text() + "".join(
        f"{k}={v}\n" for k, v in pip_config_vars(index).items()))
    cold = []
    for round_ in range(COLD_ROUNDS):
        took, result = _build(host, app, _config(base / f"cold{round_}"))
        cold.append(took)
    config = _config(base / "warm")
    _build(host, app, config)
    cached = [_build(host, app, config)[0] for _ in range(WARM_ROUNDS)]
    slug = result["slug"]
    assert isinstance(slug, dict)
    print(f"build, cold (fresh agent and build cache): median {statistics.median(cold):6.2f} s"
          f"  ({', '.join(f'{t:.1f}' for t in cold)})")
    print(f"build, cached (same inputs):               median {statistics.median(cached):6.2f} s")
    up = [_first_page(host, [str(BIN / "dynoagent"), "up", str(app), "--config", str(config),
                             "--stack", TEST_STACK]) for _ in range(WARM_ROUNDS)]
    tree = Path(str(slug["dir"]))
    site = next((tree / ".heroku" / "python" / "lib").glob("python3*/site-packages"))
    direct = [_first_page(host, [sys.executable, "-m", "gunicorn", "--bind", "127.0.0.1:5000",
                                 "--workers", "2", "hello.wsgi"], cwd=tree,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site)})
              for _ in range(WARM_ROUNDS)]
    up_m, direct_m = statistics.median(up), statistics.median(direct)
    print(f"up to first 200, build cached:             median {up_m:6.2f} s")
    print(f"gunicorn started directly, to first 200:   median {direct_m:6.2f} s")
    print(f"up / direct: {up_m / direct_m:.2f}x")
