"""`dynocoord`'s client commands against a fake platform API (aiohttp on 127.0.0.1, served from
a thread, recording every request): what each verb sends, what it prints, that bad input sends
nothing, the error shapes, and log streaming."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import sys
import threading
import types
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web

from dynocoord import cli

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
TOKEN = "s3cret-token"


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    query: dict[str, str]
    body: Any
    auth: str | None


class FakeAPI:
    """Canned answers by (method, path); anything else is a 404 in the API's error shape."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.routes: dict[tuple[str, str], Handler] = {}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fake-api")
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def answer(self, method: str, path: str, body: Any = None, status: int = 200) -> None:
        async def handler(_request: web.Request) -> web.StreamResponse:
            if body is None:
                return web.Response(status=status)
            return web.json_response(body, status=status)
        self.routes[(method, path)] = handler

    def handle(self, method: str, path: str, handler: Handler) -> None:
        self.routes[(method, path)] = handler

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.seen.append(Seen(request.method, request.path, dict(request.query),
                              json.loads(raw) if raw else None,
                              request.headers.get("Authorization")))
        handler = self.routes.get((request.method, request.path))
        if handler is None:
            return web.json_response(
                {"error": {"code": "not_found", "message": f"no route {request.path}"}},
                status=404)
        return await handler(request)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.base_events.Server)
        self.port = server.sockets[0].getsockname()[1]

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def start(self) -> None:
        self.thread.start()
        self.run(self._start())

    def stop(self) -> None:
        try:
            if self.runner is not None:
                self.run(self.runner.cleanup())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()


def _start_api() -> FakeAPI:
    api = FakeAPI()
    api.start()
    return api


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAPI]:
    for name in ("DYNOCOORD_URL", "DYNOCOORD_TOKEN", "DYNOCOORD_APP"):
        monkeypatch.delenv(name, raising=False)
    server = _start_api()
    monkeypatch.setenv("DYNOCOORD_URL", server.url)
    monkeypatch.setenv("DYNOCOORD_TOKEN", TOKEN)
    try:
        yield server
    finally:
        server.stop()


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def only(api: FakeAPI) -> Seen:
    assert len(api.seen) == 1, api.seen
    return api.seen[0]


def _stamp(since: datetime) -> str:
    return since.astimezone().strftime("%Y/%m/%d %H:%M:%S %z")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- apps ---------------------------------------------------------------------------------------

def test_apps_lists_names_and_sends_the_token(api: FakeAPI,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    api.answer("GET", "/v1/apps", [{"name": "shop", "created": "2026-12-01T00:00:00+00:00"},
                                   {"name": "blog", "created": "2026-12-01T00:00:00+00:00"}])
    code, out, err = run_cli(capsys, "apps")
    assert (code, err) == (0, "")
    assert out.splitlines() == ["=== Apps", "blog", "shop"]
    seen = only(api)
    assert (seen.method, seen.path, seen.auth) == ("GET", "/v1/apps", f"Bearer {TOKEN}")


def test_apps_json(api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    apps = [{"name": "shop", "created": "2026-12-01T00:00:00+00:00"}]
    api.answer("GET", "/v1/apps", apps)
    code, out, _ = run_cli(capsys, "apps", "--json")
    assert code == 0
    assert json.loads(out) == apps


def test_token_file_wins_over_the_environment(api: FakeAPI, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    api.answer("GET", "/v1/apps", [])
    code, out, _ = run_cli(capsys, "apps", "--token-file", str(token_file))
    assert (code, out) == (0, "You have no apps.\n")
    assert only(api).auth == "Bearer from-file"


def test_unreadable_token_file_sends_nothing(api: FakeAPI, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "--token-file", str(tmp_path / "missing"), "apps")
    assert code == 1
    assert err.startswith(f"dynocoord: cannot read the token file {tmp_path / 'missing'}")
    assert api.seen == []


def test_apps_create(api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    api.answer("POST", "/v1/apps", {"name": "shop"}, status=201)
    code, out, err = run_cli(capsys, "apps:create", "shop")
    assert (code, out, err) == (0, "Creating shop... done\n", "")
    seen = only(api)
    assert (seen.method, seen.path, seen.body) == ("POST", "/v1/apps", {"name": "shop"})


@pytest.mark.parametrize("name", ["Shop", "ab", "1shop", "shop-", "a" * 31, "shop_1"])
def test_apps_create_refuses_a_bad_name(api: FakeAPI, capsys: pytest.CaptureFixture[str],
                                        name: str) -> None:
    code, _, err = run_cli(capsys, "apps:create", name)
    assert code == 2
    assert f"app name {name!r} must be 3-30 lowercase letters" in err
    assert api.seen == []


def test_apps_info(api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    created = datetime.now(UTC) - timedelta(hours=2, minutes=1)
    api.answer("GET", "/v1/apps/shop", {
        "name": "shop", "created": created.isoformat(), "release": 4, "stack": "heroku-24",
        "formation": [{"type": "worker", "quantity": 1, "size": "standard-1x"},
                      {"type": "web", "quantity": 2, "size": "standard-2x"}],
        "space": {"name": "shop", "subnet": "10.64.0.0/18", "vni": 3,
                  "slices": {"h1": "10.64.0.0/24", "h2": "10.64.1.0/24"}}})
    code, out, err = run_cli(capsys, "apps:info", "-a", "shop")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "=== shop",
        f"Created: {_stamp(created)} (~ 2h ago)",
        "Release: v4",
        "Stack:   heroku-24",
        "Dynos:   web: 2:Standard-2X, worker: 1:Standard-1X",
        "Space:   10.64.0.0/18 (VNI 3, 2 hosts)",
    ]
    assert only(api).path == "/v1/apps/shop"


def test_app_from_the_environment(api: FakeAPI, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DYNOCOORD_APP", "blog")
    api.answer("GET", "/v1/apps/blog", {"name": "blog", "release": None})
    code, out, _ = run_cli(capsys, "apps:info")
    assert code == 0
    assert out.splitlines() == ["=== blog", "Release: none yet"]


@pytest.mark.parametrize("app_args, message", [
    ([], "no app given: -a APP or $DYNOCOORD_APP"),
    (["-a", "Bad_App"], "app name 'Bad_App' must be 3-30 lowercase letters"),
])
def test_app_missing_or_bad_sends_nothing(api: FakeAPI, capsys: pytest.CaptureFixture[str],
                                          app_args: list[str], message: str) -> None:
    code, _, err = run_cli(capsys, "ps", *app_args)
    assert code == 1
    assert err.startswith(f"dynocoord: {message}")
    assert api.seen == []


@pytest.mark.parametrize("argv, message", [
    (["apps:destroy", "-a", "shop"], "to proceed, type dynocoord apps:destroy -a shop "
                                     "--confirm shop"),
    (["apps:destroy", "-a", "shop", "--confirm", "blog"],
     "--confirm blog does not match the app shop"),
    (["apps:destroy", "shop", "-a", "blog", "--confirm", "shop"],
     "two apps given: shop and -a blog"),
])
def test_apps_destroy_needs_a_matching_confirm(api: FakeAPI,
                                               capsys: pytest.CaptureFixture[str],
                                               argv: list[str], message: str) -> None:
    code, _, err = run_cli(capsys, *argv)
    assert code == 1
    assert message in err
    assert api.seen == []


def test_apps_destroy(api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    api.answer("DELETE", "/v1/apps/shop", None, status=204)
    code, out, _ = run_cli(capsys, "apps:destroy", "shop", "--confirm", "shop")
    assert (code, out) == (0, "Destroying shop... done\n")
    seen = only(api)
    assert (seen.method, seen.path) == ("DELETE", "/v1/apps/shop")


# -- releases and config --------------------------------------------------------------------------

def test_releases_newest_first_with_what_changed(api: FakeAPI,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    at = datetime.now(UTC) - timedelta(minutes=3, seconds=5)
    slug_a = {"path": "/srv/slugs/a.tgz"}
    slug_b = {"url": "https://slugs.example/b.tgz", "sha256": "ab" * 32}
    base = {"stack": "heroku-24", "process_types": {"web": "x"}, "created": at.isoformat()}
    api.answer("GET", "/v1/apps/shop/releases", [
        {**base, "version": 2, "slug": slug_a, "env": {"A": "1", "B": "2"}},
        {**base, "version": 1, "slug": slug_a, "env": {"A": "1"}},
        {**base, "version": 4, "slug": slug_b, "env": {"A": "1"}},
        {**base, "version": 3, "slug": slug_a, "env": {"A": "1"}},
        {**base, "version": 5, "slug": slug_b, "env": {"A": "1"}, "description": "Rollback"},
    ])
    code, out, _ = run_cli(capsys, "releases", "-a", "shop")
    assert code == 0
    since = f"{_stamp(at)} (~ 3m ago)"
    assert out.splitlines() == [
        "=== shop Releases - Current: v5",
        f"v5  Rollback              {since}",
        f"v4  Deploy abababababab   {since}",
        f"v3  Remove B config vars  {since}",
        f"v2  Set B config vars     {since}",
        f"v1  Deploy a.tgz          {since}",
    ]


def test_releases_create_from_a_relative_path(api: FakeAPI, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    api.answer("POST", "/v1/apps/shop/releases", {"version": 3}, status=201)
    code, out, err = run_cli(capsys, "releases:create", "-a", "shop", "--slug", "slug.tgz",
                             "--stack", "heroku-24", "--process", "web=python server.py",
                             "--process", "worker=python worker.py --queue=a",
                             "--env", "A=1", "--env", "B=x=y")
    assert (code, out, err) == (0, "Releasing shop... done, v3\n", "")
    seen = only(api)
    assert (seen.method, seen.path) == ("POST", "/v1/apps/shop/releases")
    assert seen.body == {"slug": {"path": str(tmp_path / "slug.tgz")}, "stack": "heroku-24",
                         "process_types": {"web": "python server.py",
                                           "worker": "python worker.py --queue=a"},
                         "env": {"A": "1", "B": "x=y"}}


def test_releases_create_from_a_url(api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    api.answer("POST", "/v1/apps/shop/releases", {"version": 1}, status=201)
    code, _, _ = run_cli(capsys, "releases:create", "-a", "shop", "--slug",
                         "https://slugs.example/s.tgz", "--sha256", "AB" * 32, "--stack",
                         "heroku-24", "--process", "release=./migrate", "--process", "web=w")
    assert code == 0
    assert only(api).body == {
        "slug": {"url": "https://slugs.example/s.tgz", "sha256": "ab" * 32},
        "stack": "heroku-24", "process_types": {"release": "./migrate", "web": "w"}, "env": {}}


@pytest.mark.parametrize("extra, code, message", [
    (["--slug", "https://s.example/s.tgz", "--stack", "s", "--process", "web=w"], 1,
     "a slug URL needs its digest: --sha256 HEX"),
    (["--slug", "/s.tgz", "--sha256", "ab" * 32, "--stack", "s", "--process", "web=w"], 1,
     "--sha256 goes with a slug URL"),
    (["--slug", "ftp://s.example/s", "--stack", "s", "--process", "web=w"], 1,
     "a slug URL must be http:// or https://, got 'ftp://s.example/s'"),
    (["--slug", "http://", "--sha256", "ab" * 32, "--stack", "s", "--process", "web=w"], 1,
     "--slug.url"),
    (["--slug", "https://s.example/s", "--sha256", "abc", "--stack", "s", "--process",
      "web=w"], 2, "a sha256 is 64 hex digits"),
    (["--slug", "/s.tgz", "--stack", "Bad/Stack", "--process", "web=w"], 2, "stack name"),
    (["--slug", "/s.tgz", "--stack", "s", "--process", "web"], 2, "expected TYPE=COMMAND"),
    (["--slug", "/s.tgz", "--stack", "s", "--process", "Web=w"], 2, "process type 'Web'"),
    (["--slug", "/s.tgz", "--stack", "s", "--process", "run=w"], 2, "reserved"),
    (["--slug", "/s.tgz", "--stack", "s", "--process", "web= "], 2, "must be non-empty"),
    (["--slug", "/s.tgz", "--stack", "s", "--process", "web=a", "--process", "web=b"], 1,
     "--process web=… is given twice"),
    (["--slug", "/s.tgz", "--stack", "s"], 2, "--process"),
    (["--slug", "/s.tgz", "--stack", "s", "--process", "web=w", "--env", "1A=x"], 2,
     "config var name '1A'"),
])
def test_releases_create_bad_input_sends_nothing(api: FakeAPI,
                                                 capsys: pytest.CaptureFixture[str],
                                                 extra: list[str], code: int,
                                                 message: str) -> None:
    got, out, err = run_cli(capsys, "releases:create", "-a", "shop", *extra)
    assert got == code
    assert message in err
    assert out == ""
    assert api.seen == []


def test_config_aligned_and_as_shell(api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    api.answer("GET", "/v1/apps/shop/config", {"DATABASE_URL": "postgres://db/x", "A": "it's"})
    code, out, _ = run_cli(capsys, "config", "-a", "shop")
    assert code == 0
    assert out.splitlines() == ["=== shop Config Vars",
                                "A:            it's",
                                "DATABASE_URL: postgres://db/x"]
    code, out, _ = run_cli(capsys, "config", "-a", "shop", "--shell")
    assert out.splitlines() == ["A='it'\"'\"'s'", "DATABASE_URL=postgres://db/x"]
    assert [(s.method, s.path) for s in api.seen] == [("GET", "/v1/apps/shop/config")] * 2


def test_config_set(api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    api.answer("PATCH", "/v1/apps/shop/config", {"version": 5})
    code, out, err = run_cli(capsys, "config:set", "-a", "shop", "FOO=bar", "LONG_NAME=a b=c")
    assert (code, err) == (0, "")
    assert out.splitlines() == ["Setting FOO, LONG_NAME and restarting shop... done, v5",
                                "FOO:       bar",
                                "LONG_NAME: a b=c"]
    seen = only(api)
    assert (seen.method, seen.path, seen.body) == (
        "PATCH", "/v1/apps/shop/config", {"FOO": "bar", "LONG_NAME": "a b=c"})


def test_config_unset(api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    api.answer("PATCH", "/v1/apps/shop/config", {"version": 6})
    code, out, _ = run_cli(capsys, "config:unset", "-a", "shop", "FOO", "BAR")
    assert (code, out) == (0, "Unsetting FOO, BAR and restarting shop... done, v6\n")
    assert only(api).body == {"FOO": None, "BAR": None}


@pytest.mark.parametrize("argv", [
    ["config:set", "-a", "shop", "FOO"],
    ["config:set", "-a", "shop", "FOO-BAR=1"],
    ["config:set", "-a", "shop", "=1"],
    ["config:set", "-a", "shop", "A=\x00"],
    ["config:unset", "-a", "shop", "A=1"],
    ["config:set", "-a", "shop"],
])
def test_config_bad_input_sends_nothing(api: FakeAPI, capsys: pytest.CaptureFixture[str],
                                        argv: list[str]) -> None:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert "error:" in err
    assert (out, api.seen) == ("", [])


# -- ps ---------------------------------------------------------------------------------------

def test_ps_groups_by_type_like_heroku(api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    since = datetime.now(UTC) - timedelta(minutes=3, seconds=10)
    at = since.isoformat()

    def dyno(name: str, size: str, command: str, state: str = "up", host: str | None = "host-a",
             ip: str | None = "10.1.0.3") -> dict[str, Any]:
        return {"id": f"id-{name}", "name": name, "type": name.split(".")[0], "state": state,
                "host": host, "ip": ip, "since": at, "release": 3, "size": size,
                "command": command}

    api.answer("GET", "/v1/apps/shop/dynos", [
        dyno("worker.1", "standard-1x", "python worker.py", host="host-b", ip="10.1.1.2"),
        dyno("web.10", "standard-1x", "python server.py", state="starting", ip=None),
        dyno("run.1", "standard-2x", "bash"),
        dyno("web.2", "standard-1x", "python server.py", host=None, ip=None),
        dyno("web.1", "standard-1x", "python server.py"),
    ])
    code, out, err = run_cli(capsys, "ps", "-a", "shop")
    assert (code, err) == (0, "")
    when = f"{_stamp(since)} (~ 3m ago)"
    assert out.splitlines() == [
        "=== web (Standard-1X): python server.py (3)",
        f"web.1: up {when} on host-a 10.1.0.3",
        f"web.2: up {when}",
        f"web.10: starting {when} on host-a",
        "",
        "=== worker (Standard-1X): python worker.py (1)",
        f"worker.1: up {when} on host-b 10.1.1.2",
        "",
        "=== run: one-off processes (1)",
        f"run.1 (Standard-2X): up {when} on host-a 10.1.0.3: bash",
    ]
    seen = only(api)
    assert (seen.method, seen.path) == ("GET", "/v1/apps/shop/dynos")


def test_ps_empty_and_json(api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    api.answer("GET", "/v1/apps/shop/dynos", [])
    assert run_cli(capsys, "ps", "-a", "shop") == (0, "No dynos on shop\n", "")
    code, out, _ = run_cli(capsys, "ps", "-a", "shop", "--json")
    assert (code, json.loads(out)) == (0, [])


def test_ps_scale(api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    api.answer("PATCH", "/v1/apps/shop/formation", [
        {"type": "worker", "quantity": 1, "size": "standard-1x"},
        {"type": "clock", "quantity": 1, "size": "standard-1x"},
        {"type": "web", "quantity": 3, "size": "standard-2x"}])
    code, out, err = run_cli(capsys, "ps:scale", "-a", "shop", "web=3:Standard-2X", "worker=1")
    assert (code, err) == (0, "")
    assert out == ("Scaling dynos... done, now running web at 3:Standard-2X, "
                   "worker at 1:Standard-1X\n")
    seen = only(api)
    assert (seen.method, seen.path, seen.body) == (
        "PATCH", "/v1/apps/shop/formation",
        {"web": {"quantity": 3, "size": "standard-2x"}, "worker": {"quantity": 1}})


def test_ps_scale_without_arguments_shows_the_formation(
        api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    api.answer("GET", "/v1/apps/shop/formation", [
        {"type": "worker", "quantity": 1, "size": "standard-1x"},
        {"type": "web", "quantity": 3, "size": "standard-2x"}])
    code, out, _ = run_cli(capsys, "ps:scale", "-a", "shop")
    assert (code, out) == (0, "web=3:Standard-2X worker=1:Standard-1X\n")
    assert only(api).method == "GET"


@pytest.mark.parametrize("items, code, message", [
    (["web"], 2, "expected TYPE=N[:SIZE], got 'web'"),
    (["web="], 2, "expected TYPE=N[:SIZE]"),
    (["web=x"], 2, "the quantity in web=x must be a number from 0 to 10000"),
    (["web=-1"], 2, "must be a number from 0"),
    (["web=10001"], 2, "must be a number from 0 to 10000"),
    (["web=٣"], 2, "must be a number"),
    (["web=3:huge"], 2, "unknown size 'huge' in web=3:huge; known sizes: eco, basic"),
    (["web=3:"], 2, "no size after ':'"),
    (["Web=1"], 2, "process type 'Web'"),
    (["run=1"], 2, "'run' dynos are one-off"),
    (["web=1", "web=2"], 1, "process type web is given twice"),
])
def test_ps_scale_bad_input_sends_nothing(api: FakeAPI, capsys: pytest.CaptureFixture[str],
                                          items: list[str], code: int, message: str) -> None:
    got, out, err = run_cli(capsys, "ps:scale", "-a", "shop", *items)
    assert got == code
    assert message in err
    assert (out, api.seen) == ("", [])


def test_ps_type(api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    api.answer("PATCH", "/v1/apps/shop/formation", [
        {"type": "web", "quantity": 2, "size": "performance-m"}])
    code, out, _ = run_cli(capsys, "ps:type", "-a", "shop", "web=performance-m")
    assert code == 0
    assert out.splitlines() == ["Scaling dynos on shop... done",
                                "=== Dyno Types",
                                "TYPE  SIZE           QTY",
                                "web   Performance-M  2"]
    assert only(api).body == {"web": {"size": "performance-m"}}
    code, _, err = run_cli(capsys, "ps:type", "-a", "shop", "web=3")
    assert (code, len(api.seen)) == (2, 1)
    assert "unknown size '3'" in err


# -- run ----------------------------------------------------------------------------------------

def _log(source: str, dyno: str, text: str) -> str:
    return f"2026-12-02T20:15:00.000000+00:00 {source}[{dyno}]: {text}\n"


def _one_off_logs(lines: list[str], hold_open: bool) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_type = "text/plain"
        await response.prepare(request)
        for line in lines:
            await response.write(line.encode())
        if hold_open:  # a coordinator that keeps following: the CLI must end on its own
            for _ in range(3000):  # until the client goes, at most 30 s
                if request.transport is None or request.transport.is_closing():
                    break
                await asyncio.sleep(0.01)
        await response.write_eof()
        return response
    return handler


def test_run_follows_the_output_and_exits_with_its_status(
        api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    api.answer("POST", "/v1/apps/shop/dynos", {"id": "d-7", "name": "run.1", "type": "run",
                                               "state": "starting", "size": "standard-2x"},
               status=201)
    api.handle("GET", "/v1/apps/shop/logs", _one_off_logs([
        _log("agent", "run.1", "Starting process with command `python -V`"),
        _log("app", "run.1", "Python 3.11.7"),
        _log("app", "run.2", "another dyno's line"),
        _log("app", "run.1", "done: [ok]"),
        _log("agent", "run.1", "Process exited with status 3"),
        _log("agent", "run.1", "State changed from up to complete"),
        _log("app", "run.1", "never shown"),
    ], hold_open=True))
    code, out, err = run_cli(capsys, "run", "-a", "shop", "-s", "standard-2x", "python", "-V")
    assert code == 3
    assert out == "Python 3.11.7\ndone: [ok]\n"
    assert err == "Running `python -V` on shop... starting, run.1 (Standard-2X)\n"
    post, logs = api.seen
    assert (post.method, post.path, post.body) == (
        "POST", "/v1/apps/shop/dynos", {"command": "python -V", "size": "standard-2x"})
    assert (logs.method, logs.path, logs.query) == (
        "GET", "/v1/apps/shop/logs", {"dyno": "d-7", "tail": "10000", "follow": "1"})


def test_run_whose_stream_ends_early_is_an_error(api: FakeAPI,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    api.answer("POST", "/v1/apps/shop/dynos", {"id": "d-8", "name": "run.2", "state": "up"},
               status=201)
    api.handle("GET", "/v1/apps/shop/logs", _one_off_logs(
        [_log("app", "run.2", "partial")], hold_open=False))
    code, out, err = run_cli(capsys, "run", "-a", "shop", "--", "sleep 100")
    assert code == 1
    assert out == "partial\n"
    assert err.splitlines()[-1] == ("dynocoord: the log stream of run.2 ended before run.2 "
                                    "did; see dynocoord ps -a shop")
    assert api.seen[0].body == {"command": "sleep 100"}


def test_run_detached_prints_the_dyno(api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    api.answer("POST", "/v1/apps/shop/dynos", {"id": "d-9", "name": "run.3", "state": "starting"},
               status=201)
    code, out, err = run_cli(capsys, "run", "-a", "shop", "-d", "echo", "a b")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "Running `echo 'a b'` on shop... starting, run.3 (Standard-1X)",
        "Run dynocoord logs -a shop --dyno run.3 to view the output."]
    assert only(api).body == {"command": "echo 'a b'"}


@pytest.mark.parametrize("argv, code, message", [
    (["run", "-a", "shop"], 1, "no command given"),
    (["run", "-a", "shop", "--"], 1, "no command given"),
    (["run", "-a", "shop", "-s", "huge", "bash"], 2, "unknown size 'huge' in --size"),
])
def test_run_bad_input_sends_nothing(api: FakeAPI, capsys: pytest.CaptureFixture[str],
                                     argv: list[str], code: int, message: str) -> None:
    got, _, err = run_cli(capsys, *argv)
    assert got == code
    assert message in err
    assert api.seen == []


# -- logs ---------------------------------------------------------------------------------------

def test_logs_query(api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    api.handle("GET", "/v1/apps/shop/logs", _one_off_logs(
        [_log("app", "web.1", "a"), _log("app", "web.2", "b")], hold_open=False))
    code, out, _ = run_cli(capsys, "logs", "-a", "shop")
    assert (code, out) == (0, _log("app", "web.1", "a") + _log("app", "web.2", "b"))
    code, _, _ = run_cli(capsys, "logs", "-a", "shop", "-t", "-n", "5", "--dyno", "web.1")
    assert code == 0
    assert [s.query for s in api.seen] == [{"tail": "100"},
                                           {"tail": "5", "follow": "1", "dyno": "web.1"}]


@pytest.mark.parametrize("argv", [["-n", "-1"], ["-n", "x"], ["--dyno", "web/1"]])
def test_logs_bad_input_sends_nothing(api: FakeAPI, capsys: pytest.CaptureFixture[str],
                                      argv: list[str]) -> None:
    code, _, _ = run_cli(capsys, "logs", "-a", "shop", *argv)
    assert (code, api.seen) == (2, [])


class _Watched(io.StringIO):
    """A stdout that tells when a given text has been written."""

    def __init__(self, wanted: str) -> None:
        super().__init__()
        self.wanted = wanted
        self.seen = threading.Event()

    def write(self, text: str) -> int:
        written = super().write(text)
        if self.wanted in self.getvalue():
            self.seen.set()
        return written


def test_logs_tail_shows_each_line_as_it_arrives(api: FakeAPI,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The second line is sent only once the first one is on stdout: a client that waited for
    more (or for the end) before printing would time out here."""
    first, second = _log("app", "web.1", "first"), _log("app", "web.1", "second")
    stdout = _Watched(first)

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(first.encode())
        shown = await asyncio.to_thread(stdout.seen.wait, 10)
        await response.write(second.encode() if shown else b"TIMED OUT\n")
        await response.write_eof()
        return response

    api.handle("GET", "/v1/apps/shop/logs", handler)
    monkeypatch.setattr(sys, "stdout", stdout)
    assert cli.main(["logs", "-a", "shop", "-t"]) == 0
    assert stdout.getvalue() == first + second


# -- hosts --------------------------------------------------------------------------------------

def test_hosts(api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    api.answer("GET", "/v1/hosts", [
        {"id": "h-2", "host": "node-b", "state": "lost", "dynos": 0,
         "capacity": {"cpus": 8, "memory_bytes": 16 * 2**30}, "labels": {}},
        {"id": "h-1", "host": "node-a", "state": "ready", "dynos": ["d-1", "d-2"],
         "capacity": {"cpus": 4, "memory_bytes": 8 * 2**30}, "labels": {"zone": "a", "x": "1"}},
    ])
    code, out, _ = run_cli(capsys, "hosts")
    assert code == 0
    assert out.splitlines() == [
        "ID   HOST    STATE  DYNOS  CPUS  MEMORY    LABELS",
        "h-1  node-a  ready  2      4     8.0 GiB   x=1,zone=a",
        "h-2  node-b  lost   0      8     16.0 GiB  -",
    ]
    assert only(api).path == "/v1/hosts"


def test_hosts_drain(api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    api.answer("POST", "/v1/hosts/h-1/drain", {"id": "h-1", "state": "draining"})
    code, out, _ = run_cli(capsys, "hosts:drain", "h-1")
    assert (code, out) == (0, "Draining host h-1... done (draining)\n")
    seen = only(api)
    assert (seen.method, seen.path, seen.body) == ("POST", "/v1/hosts/h-1/drain", None)
    code, _, _ = run_cli(capsys, "hosts:drain", "../apps")
    assert (code, len(api.seen)) == (2, 1)


# -- errors -------------------------------------------------------------------------------------

def test_api_error_is_one_line_on_stderr(api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    api.answer("GET", "/v1/apps/nope/dynos",
               {"error": {"code": "not_found", "message": "no app\nnamed nope"}}, status=404)
    assert run_cli(capsys, "ps", "-a", "nope") == (
        1, "", "dynocoord: no app named nope (not_found)\n")


def test_failed_change_says_failed(api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    api.answer("PATCH", "/v1/apps/shop/formation",
               {"error": {"code": "invalid", "message": "no process type 'clock'"}},
               status=422)
    assert run_cli(capsys, "ps:scale", "-a", "shop", "clock=1") == (
        1, "Scaling dynos... failed\n", "dynocoord: no process type 'clock' (invalid)\n")


def test_unauthorized_names_the_token_options(api: FakeAPI,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    api.answer("GET", "/v1/hosts", {"error": {"code": "unauthorized", "message": "no"}},
               status=401)
    assert run_cli(capsys, "hosts") == (
        1, "", "dynocoord: bad or missing token (--token-file or $DYNOCOORD_TOKEN)\n")


def test_an_answer_without_the_error_shape(api: FakeAPI,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    async def broken(_request: web.Request) -> web.StreamResponse:
        return web.Response(status=500, text="<html>oops</html>")
    api.handle("GET", "/v1/hosts", broken)
    assert run_cli(capsys, "hosts") == (
        1, "", f"dynocoord: the coordinator at {api.url} answered 500 Internal Server Error\n")


def test_connection_refused_names_the_url(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("DYNOCOORD_URL", url)
    code, _, err = run_cli(capsys, "apps")
    assert code == 1
    assert err == (f"dynocoord: cannot reach the coordinator at {url}: Connection refused (is "
                   "`dynocoord serve` running there? --coordinator or $DYNOCOORD_URL)\n")


def test_the_default_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DYNOCOORD_URL", raising=False)
    seen: list[str] = []

    def record(client: cli.Client, _args: Any) -> int:
        seen.extend(e.url for e in client.endpoints)
        return 0

    monkeypatch.setattr(cli, "cmd_hosts", record)
    assert cli.main(["hosts"]) == 0
    assert seen == ["http://127.0.0.1:7500"]


def test_the_next_replica_when_one_is_down_or_not_leading(
        api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    follower = _start_api()
    try:
        follower.answer("POST", "/v1/apps",
                        {"error": {"code": "unavailable", "message": "not the leader"}},
                        status=503)
        api.answer("POST", "/v1/apps", {"name": "shop"}, status=201)
        down = f"http://127.0.0.1:{_closed_port()}"
        code, out, _ = run_cli(capsys, "--coordinator", f"{down},{follower.url},{api.url}",
                               "apps:create", "shop")
        assert (code, out) == (0, "Creating shop... done\n")
        assert [s.path for s in follower.seen] == ["/v1/apps"]
        assert only(api).body == {"name": "shop"}
    finally:
        follower.stop()


def test_options_after_the_verb(api: FakeAPI, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYNOCOORD_URL", f"http://127.0.0.1:{_closed_port()}")
    api.answer("GET", "/v1/hosts", [])
    code, out, _ = run_cli(capsys, "hosts", "--coordinator", api.url)
    assert (code, out) == (0, "No hosts: no agent has connected yet.\n")


@pytest.mark.parametrize("url", ["ftp://x", "http://", "127.0.0.1:7500", "http://h:99999"])
def test_bad_coordinator_url(capsys: pytest.CaptureFixture[str], url: str) -> None:
    code, _, err = run_cli(capsys, "--coordinator", url, "hosts")
    assert code == 1
    assert err.startswith("dynocoord: bad coordinator URL")


# -- serve --------------------------------------------------------------------------------------

def test_serve_runs_the_server_module(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def main(argv: list[str]) -> int:
        calls.append(argv)
        return 7

    server = types.ModuleType(cli._SERVER_MODULE)
    server.main = main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, cli._SERVER_MODULE, server)
    assert cli.main(["serve", "--etcd", "http://e:2379", "--help"]) == 7
    assert calls == [["--etcd", "http://e:2379", "--help"]]


def test_serve_without_a_server_module(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "_SERVER_MODULE", "dynocoord.no_such_server")
    assert run_cli(capsys, "serve") == (
        1, "", "dynocoord: serve is not available: this installation has no "
        "dynocoord.no_such_server\n")
