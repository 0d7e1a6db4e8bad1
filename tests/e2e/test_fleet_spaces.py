"""Private spaces across hosts, attacked and moved: three real agents on one LAN under
`dynocoord serve`. App alpha's two web dynos run on two hosts and reach each other on their
private addresses and by name (`web.alpha.app.localspace`, `1.web.alpha.app.localspace`)
through the space's VXLAN overlay; app beta (its own space) runs on every host and reaches
neither them nor their names; a web dyno moved by a drain is reachable at its new address
under the same name within seconds; a host that dies has its entries withdrawn from the
others.

Each dyno runs a small HTTP server that, asked by the test from the dyno's host, fetches a
URL or resolves a name *from inside the dyno*. The tests share one fleet and run in order."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from ipaddress import ip_address, ip_network
from typing import Any

import pytest

from tests.e2e.test_fleet import (
    PORTS,
    Fleet,
    Member,
    kill_processes,
    logs_on_failure,
    start_fleet,
)
from tests.e2e.test_supervision import make_slug
from tests.support.testhost import NetnsThread
from tests.support.wait import wait_for

ALPHA, BETA = "alpha", "beta"
PORT = 5000
PROBE_PY = r'''
import json, os, socket, urllib.parse, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Probe(BaseHTTPRequestHandler):
    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        status, body = 200, {"dyno": os.environ["DYNO"]}
        try:
            if url.path == "/fetch":
                with urllib.request.urlopen(query["url"], timeout=3) as answer:
                    body["answer"] = json.loads(answer.read())
            elif url.path == "/resolve":
                body["addresses"] = sorted(socket.gethostbyname_ex(query["name"])[2])
            elif url.path == "/env":
                body["env"] = {k: v for k, v in os.environ.items() if k.startswith("HEROKU_")}
        except Exception as exc:
            status, body = 502, {"dyno": os.environ["DYNO"], "error": repr(exc)}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), Probe).serve_forever()
'''


class Spaces:
    """The fleet, with a thread in each agent's test host to talk to its dynos from there."""

    def __init__(self, fleet: Fleet, threads: dict[str, NetnsThread]) -> None:
        self.fleet = fleet
        self.threads = threads
        self.c1 = fleet.replicas["c1"]

    def dynos(self, app: str) -> dict[str, dict[str, Any]]:
        found = self.fleet.call(self.c1, "GET", f"/v1/apps/{app}/dynos")
        return {d["name"]: d for d in found}

    def member(self, host_id: str) -> Member:
        return next(m for m in self.fleet.members if m.host_id == host_id)

    def ask(self, app: str, name: str, path: str) -> tuple[int, dict[str, Any]]:
        """GET `path` of a dyno's probe, from its own host (status 0: no answer)."""
        dyno = self.dynos(app)[name]
        url = f"http://{dyno['ip']}:{PORT}{path}"
        return self.threads[dyno["host_id"]].call(_get, url)

    def fetch(self, app: str, name: str, target: str) -> tuple[int, dict[str, Any]]:
        """From inside dyno `name`: GET http://TARGET:5000/ (an address or a name)."""
        query = urllib.parse.urlencode({"url": f"http://{target}:{PORT}/"})
        return self.ask(app, name, f"/fetch?{query}")

    def resolve(self, app: str, name: str, query: str) -> list[str] | str:
        status, body = self.ask(app, name, "/resolve?" + urllib.parse.urlencode({"name": query}))
        return body["addresses"] if status == 200 else str(body.get("error"))


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except OSError as exc:
        return 0, {"error": repr(exc)}


@pytest.fixture(scope="module")
def spaces(tmp_path_factory: pytest.TempPathFactory,
           request: pytest.FixtureRequest) -> Iterator[Spaces]:
    with contextlib.ExitStack() as stack:
        fleet = start_fleet(stack, tmp_path_factory.mktemp("spaces"),
                            make_slug({"probe.py": PROBE_PY}), "ds", ports=PORTS[:1])
        stack.callback(_delete_apps, fleet)
        threads = {m.host_id: stack.enter_context(NetnsThread(m.host)) for m in fleet.members}
        with logs_on_failure(fleet, request):
            yield Spaces(fleet, threads)


def _delete_apps(fleet: Fleet) -> None:
    leader = next((r for r in fleet.replicas.values() if fleet.leads(r)), None)
    if leader is None:
        return
    for app in (ALPHA, BETA):
        with contextlib.suppress(Exception):
            fleet.api(leader, "DELETE", f"/v1/apps/{app}")
    with contextlib.suppress(Exception):
        wait_for(lambda: not any(m.dynos() for m in fleet.members), 30, interval_s=0.2,
                 what="every dyno removed")


def deploy(spaces: Spaces, app: str, quantity: int) -> None:
    fleet, c1 = spaces.fleet, spaces.c1
    fleet.call(c1, "POST", "/v1/apps", {"name": app}, expect=201)
    fleet.call(c1, "POST", f"/v1/apps/{app}/releases",
               {"slug": {"path": str(fleet.slug)}, "stack": "host",
                "process_types": {"web": "python3 /app/probe.py"}}, expect=201)
    fleet.call(c1, "PATCH", f"/v1/apps/{app}/formation", {"web": {"quantity": quantity}})


def all_up(spaces: Spaces, app: str, count: int) -> dict[str, dict[str, Any]] | None:
    found = spaces.dynos(app)
    ok = len(found) == count and all(d["state"] == "up" and d["ip"] for d in found.values())
    return found if ok else None


def test_a_space_spans_two_hosts_by_address_and_by_name(spaces: Spaces) -> None:
    deploy(spaces, ALPHA, 2)
    deploy(spaces, BETA, 3)
    alpha = wait_for(lambda: all_up(spaces, ALPHA, 2), 60, interval_s=0.2,
                     what="alpha's two web dynos up")
    wait_for(lambda: all_up(spaces, BETA, 3), 60, interval_s=0.2, what="beta's three up")
    assert alpha is not None
    one, two = alpha["web.1"], alpha["web.2"]
    assert one["host_id"] != two["host_id"], alpha
    # One subnet for the space, a slice of it per host: each dyno's address is in its host's.
    space = spaces.fleet.call(spaces.c1, "GET", f"/v1/apps/{ALPHA}")["space"]
    subnet = ip_network(space["subnet"])
    for dyno in (one, two):
        assert ip_address(dyno["ip"]) in ip_network(space["slices"][dyno["host_id"]]), space
        assert ip_address(dyno["ip"]) in subnet

    # By address, both ways, across the overlay.
    for source, target in (("web.1", two), ("web.2", one)):
        def reached(source: str = source, ip: str = target["ip"]
                    ) -> tuple[int, dict[str, Any]] | None:
            return _ok(spaces.fetch(ALPHA, source, ip))
        answer = wait_for(reached, 15, interval_s=0.2,
                          what=f"{source} reaching {target['name']}")
        assert answer is not None and answer[1]["answer"]["dyno"] == target["name"], answer

    # By name: every web dyno of the app, then one of them.
    everyone = sorted([one["ip"], two["ip"]])
    assert wait_for(lambda: spaces.resolve(ALPHA, "web.1", "web.alpha.app.localspace")
                    == everyone or None, 15, interval_s=0.2,
                    what="web.alpha.app.localspace names both")
    assert spaces.resolve(ALPHA, "web.1", "2.web.alpha.app.localspace") == [two["ip"]]
    assert spaces.resolve(ALPHA, "web.2", "1.web.alpha.app.localspace") == [one["ip"]]
    status, body = spaces.fetch(ALPHA, "web.1", "2.web.alpha.app.localspace")
    assert status == 200 and body["answer"]["dyno"] == "web.2", body
    status, body = spaces.ask(ALPHA, "web.2", "/env")
    assert body["env"] == {"HEROKU_PRIVATE_IP": two["ip"],
                           "HEROKU_DNS_FORMATION_NAME": "web.alpha.app.localspace",
                           "HEROKU_DNS_DYNO_NAME": "2.web.alpha.app.localspace",
                           "HEROKU_DNS_APP_NAME": "alpha.app.localspace"}, body


def test_another_space_reaches_neither_the_dynos_nor_their_names(spaces: Spaces) -> None:
    alpha = spaces.dynos(ALPHA)
    beta = spaces.dynos(BETA)
    assert {d["host_id"] for d in beta.values()} == {m.host_id for m in spaces.fleet.members}
    for name in sorted(beta):
        for target in alpha.values():
            status, body = spaces.fetch(BETA, name, target["ip"])
            assert status == 502 and "answer" not in body, (name, target["name"], body)
        answer = spaces.resolve(BETA, name, "web.alpha.app.localspace")
        assert not isinstance(answer, list), (name, answer)
    # And beta's own dynos do reach each other across hosts.
    status, body = spaces.fetch(BETA, "web.1", beta["web.2"]["ip"])
    assert status == 200 and body["answer"]["dyno"] == "web.2", body


def test_no_dyno_reaches_another_fleet_host(spaces: Spaces) -> None:
    """A service on a host's LAN address (where its VXLAN tunnels end, too): the other hosts
    reach it; a dyno on another host, of either space, does not."""
    fleet = spaces.fleet
    beta = spaces.dynos(BETA)
    target = spaces.member(beta["web.1"]["host_id"])
    address = str(fleet.lan.address(target.host).ip)
    server = spaces.threads[target.host_id].call(_serve_json, address)
    try:
        url = f"http://{address}:{server.server_address[1]}/"
        others = [m for m in fleet.members if m is not target]
        assert spaces.threads[others[0].host_id].call(_get, url)[0] == 200
        for app in (ALPHA, BETA):
            for name, dyno in spaces.dynos(app).items():
                if dyno["host_id"] == target.host_id:
                    continue
                query = urllib.parse.urlencode({"url": url})
                status, body = spaces.ask(app, name, f"/fetch?{query}")
                assert status == 502 and "answer" not in body, (app, name, body)
    finally:
        spaces.threads[target.host_id].call(server.shutdown)
        server.server_close()


def _serve_json(address: str) -> http.server.ThreadingHTTPServer:
    """A JSON answer on `address` (in the calling thread's namespace), served by a thread."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = json.dumps({"dyno": "host"}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass
    server = http.server.ThreadingHTTPServer((address, 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_moved_dyno_is_reachable_at_its_new_address_under_the_same_name(
        spaces: Spaces) -> None:
    fleet, c1 = spaces.fleet, spaces.c1
    before = spaces.dynos(ALPHA)
    old = before["web.2"]
    started = time.monotonic()
    fleet.call(c1, "POST", f"/v1/hosts/{old['host_id']}/drain")

    def moved() -> dict[str, Any] | None:
        dyno = spaces.dynos(ALPHA).get("web.2")
        ok = dyno is not None and dyno["host_id"] != old["host_id"] and \
            dyno["state"] == "up" and dyno["ip"]
        return dyno if ok else None
    new = wait_for(moved, 60, interval_s=0.1, what="web.2 up on another host")
    assert new is not None and new["ip"] != old["ip"]
    wait_for(lambda: spaces.resolve(ALPHA, "web.1", "2.web.alpha.app.localspace")
             == [new["ip"]] or None, 15, interval_s=0.1, what="the name follows the dyno")
    wait_for(lambda: _ok(spaces.fetch(ALPHA, "web.1", "2.web.alpha.app.localspace")), 15,
             interval_s=0.1, what="web.1 reaching web.2 by name at its new address")
    print(f"\ndrain -> moved web.2 reachable by name in {time.monotonic() - started:.2f} s")
    assert sorted(spaces.resolve(ALPHA, "web.1", "web.alpha.app.localspace")) == \
        sorted([before["web.1"]["ip"], new["ip"]])


def test_a_lost_hosts_entries_are_withdrawn(spaces: Spaces) -> None:
    fleet = spaces.fleet
    alpha = spaces.dynos(ALPHA)
    victim = spaces.member(alpha["web.2"]["host_id"])
    survivor = spaces.member(alpha["web.1"]["host_id"])
    victim_address = str(fleet.lan.address(victim.host).ip)
    old_ip = alpha["web.2"]["ip"]
    assert victim_address in _fdb(survivor), _fdb(survivor)

    fleet.lan.set_link(victim.host, up=False)
    kill_processes(victim)
    try:
        wait_for(lambda: victim_address not in _fdb(survivor), 20, interval_s=0.1,
                 what="the lost host's forwarding entries withdrawn")
        moved = wait_for(lambda: (lambda d: d if d and d["host_id"] != victim.host_id
                                  and d["state"] == "up" else None)(
                                      spaces.dynos(ALPHA).get("web.2")),
                         30, interval_s=0.1, what="web.2 up again elsewhere")
        assert moved is not None
        wait_for(lambda: spaces.resolve(ALPHA, "web.1", "web.alpha.app.localspace")
                 == sorted([alpha["web.1"]["ip"], moved["ip"]]) or None, 15,
                 interval_s=0.1, what="the lost dyno's address gone from the name")
        assert old_ip not in str(spaces.resolve(ALPHA, "web.1", "web.alpha.app.localspace"))
    finally:
        fleet.lan.set_link(victim.host, up=True)
        victim.agent.start()


def _ok(answer: tuple[int, dict[str, Any]]) -> tuple[int, dict[str, Any]] | None:
    return answer if answer[0] == 200 and "answer" in answer[1] else None


def _fdb(member: Member) -> str:
    """The forwarding entries of every VXLAN device of the member's agent."""
    shown = member.host.run("bridge", "fdb", "show", check=False).stdout
    return "\n".join(line for line in shown.splitlines() if " dst " in line)

