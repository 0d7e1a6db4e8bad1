"""App log drains in dynocoord: the app record's `log_drains` (old records load without it),
the `POST /v1/apps/{app}/log-drains` body, the CLI's `drains`, `drains:add` and
`drains:remove`, and when the leader sends `drains.sync`."""

from __future__ import annotations

import json

import pytest

from dynocoord.etcd import EtcdClient
from dynocoord.model import App, Invalid, Placement, parse_drain_add
from dynocoord.server import ApiError
from tests.unit.dynocoord.test_cli import FakeAPI, api, only, run_cli  # noqa: F401
from tests.unit.dynocoord.test_server import _leader, _Session

CREATED = "2026-12-03T00:00:00+00:00"
SYSLOG = "syslog+tls://logs.example:6514"
HTTPS = "https://user:pass@collector.example/heroku?token=t"


# -- the model -----------------------------------------------------------------------------------

def test_an_app_keeps_its_drains_and_an_old_record_loads_without_them() -> None:
    app = App("shop", CREATED, (SYSLOG, HTTPS))
    assert App.from_json(app.to_json()) == app
    assert json.loads(app.to_json())["log_drains"] == [SYSLOG, HTTPS]
    old = App.from_json(json.dumps({"name": "shop", "created": CREATED}))
    assert old.log_drains == () and "log_drains" not in json.loads(old.to_json())


@pytest.mark.parametrize(("drains", "says"), [
    (["ftp://x"], "must be a syslog://"),
    ([SYSLOG, SYSLOG], "listed twice"),
    ([f"syslog://h:{n}" for n in range(1, 7)], "at most 5 drains"),
    ("syslog://h:1", "must be a list"),
])
def test_a_bad_drain_list_in_a_record_is_refused(drains: object, says: str) -> None:
    with pytest.raises(Invalid) as refused:
        App.from_dict({"name": "shop", "created": CREATED, "log_drains": drains})
    assert refused.value.field == "log_drains" and says in refused.value.message


@pytest.mark.parametrize("url", ["syslog://logs.example:514", SYSLOG, HTTPS,
                                 "http://127.0.0.1:8080/drain"])
def test_drain_add_takes_the_four_kinds(url: str) -> None:
    assert parse_drain_add({"url": url}) == url


@pytest.mark.parametrize(("body", "field", "says"), [
    ({"url": "ftp://logs.example"}, "url", "must be a syslog://HOST:PORT"),
    ({"url": "syslog://logs.example"}, "url", "needs a port"),
    ({"url": "https://"}, "url", "has no host"),
    ({"url": 5}, "url", "must be a string"),
    ({}, "url", "is required"),
    ({"url": SYSLOG, "x": 1}, "x", "unknown key"),
    ([SYSLOG], "body", "must be an object"),
])
def test_a_bad_drain_add_body_is_refused_naming_the_field(body: object, field: str,
                                                          says: str) -> None:
    with pytest.raises(Invalid) as refused:
        parse_drain_add(body)
    assert refused.value.field == field and says in str(refused.value)


# -- the leader's drains.sync --------------------------------------------------------------------

def _placed(leader_apps: dict[str, App], host: str, app: str) -> Placement:
    return Placement.from_dict({"id": f"{app}-1", "app": app, "name": "web.1", "type": "web",
                                "host": host, "release": 1, "size": "standard-1x",
                                "generation": 1})


async def test_drains_sync_carries_the_apps_of_the_host_and_is_sent_only_on_change() -> None:
    client = EtcdClient(["http://127.0.0.1:1"])
    try:
        leader = _leader(client)
        leader.fleet.apps = {"shop": App("shop", CREATED, (SYSLOG,)),
                             "blog": App("blog", CREATED, (HTTPS,)),
                             "wiki": App("wiki", CREATED)}
        for app in ("shop", "wiki"):
            p = _placed(leader.fleet.apps, "h1", app)
            leader.fleet.placements.setdefault("h1", {})[p.id] = p
        session = _Session("h1", {"apps": ["shop"], "changed": ["shop"]})
        # blog's last dyno still runs there: its drains stay until it has stopped.
        session.dynos["d9"] = {"id": "d9", "app": "blog", "state": "up"}
        await leader.send_drains(session)
        assert session.asked == [("drains.sync", {"apps": {"blog": [HTTPS], "shop": [SYSLOG]}})]
        await leader.send_drains(session)
        assert len(session.asked) == 1  # the same map is not sent again
        session.dynos["d9"]["state"] = "down"
        leader.fleet.apps["shop"] = App("shop", CREATED, (SYSLOG, HTTPS))
        leader.sessions["h1"] = session
        leader.drains_changed()
        assert session.drains_wanted.is_set()
        await leader.send_drains(session)
        assert session.asked[-1] == ("drains.sync", {"apps": {"shop": [SYSLOG, HTTPS]}})
    finally:
        await client.close()


async def test_an_agent_without_drains_sync_is_asked_once() -> None:
    client = EtcdClient(["http://127.0.0.1:1"])
    try:
        leader = _leader(client)
        leader.fleet.apps = {"shop": App("shop", CREATED, (SYSLOG,))}
        p = _placed(leader.fleet.apps, "h1", "shop")
        leader.fleet.placements["h1"] = {p.id: p}
        session = _Session("h1", ApiError(502, "unknown_method", "'drains.sync'"))
        await leader.send_drains(session)
        leader.fleet.apps["shop"] = App("shop", CREATED, (SYSLOG, HTTPS))
        await leader.send_drains(session)
        assert len(session.asked) == 1 and not session.drains_supported
        other = _Session("h1", ApiError(502, "internal", "disk full"))
        with pytest.raises(ApiError):
            await leader.send_drains(other)
        assert other.drains_supported and other.drains_sent is None
    finally:
        await client.close()


# -- the CLI --------------------------------------------------------------------------------------

def test_drains_lists_them(api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    api.answer("GET", "/v1/apps/shop/log-drains", [{"url": SYSLOG}, {"url": HTTPS}])
    code, out, err = run_cli(capsys, "drains", "-a", "shop")
    assert (code, err) == (0, "")
    assert out.splitlines() == ["=== Drains", SYSLOG, HTTPS]
    api.answer("GET", "/v1/apps/blog/log-drains", [])
    assert run_cli(capsys, "drains", "-a", "blog")[1] == "blog has no drains.\n"


def test_drains_add_and_remove(api: FakeAPI, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    api.answer("POST", "/v1/apps/shop/log-drains", {"url": HTTPS}, status=201)
    code, out, err = run_cli(capsys, "drains:add", HTTPS, "-a", "shop")
    assert (code, out, err) == (0, f"Successfully added drain {HTTPS}\n", "")
    seen = only(api)
    assert (seen.method, seen.path, seen.body) == ("POST", "/v1/apps/shop/log-drains",
                                                   {"url": HTTPS})
    api.seen.clear()
    api.answer("DELETE", "/v1/apps/shop/log-drains", {"url": HTTPS, "removed": True})
    code, out, err = run_cli(capsys, "drains:remove", HTTPS, "-a", "shop")
    assert (code, out, err) == (0, f"Successfully removed drain {HTTPS}\n", "")
    seen = only(api)
    assert (seen.method, seen.path, seen.query) == ("DELETE", "/v1/apps/shop/log-drains",
                                                    {"url": HTTPS})


@pytest.mark.parametrize("url", ["ftp://logs.example", "syslog://logs.example", "nope"])
def test_drains_add_checks_the_url_and_sends_nothing(api: FakeAPI,  # noqa: F811
                                                     capsys: pytest.CaptureFixture[str],
                                                     url: str) -> None:
    code, out, err = run_cli(capsys, "drains:add", url, "-a", "shop")
    assert code == 2 and "drain URL" in err
    assert (out, api.seen) == ("", [])


def test_drains_remove_of_an_unknown_drain_fails(api: FakeAPI,  # noqa: F811
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "drains:remove", SYSLOG, "-a", "shop")
    assert code == 1 and err.startswith("dynocoord: ")
