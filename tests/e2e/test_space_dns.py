"""DNS discovery inside one host, attacked from a real dyno: the agent answers its spaces'
names on each space's gateway (the dynos' only nameserver), a dyno sees its own space's names
and no other's, and cannot reach another space's resolver at all."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_isolation import CONNECT_PY
from tests.e2e.test_supervision import agent_in_host, make_slug, one_off_result, spec, wait_state
from tests.support.agentproc import AgentProcess
from tests.support.testhost import TestHost

RESOLVE_PY = """\
import json, os, socket
answers = {}
for name in os.environ["NAMES"].split():
    try:
        answers[name] = sorted(socket.gethostbyname_ex(name)[2])
    except OSError as e:
        answers[name] = type(e).__name__
servers = [line.split()[1] for line in open("/etc/resolv.conf") if line.startswith("nameserver")]
print("RESULT " + json.dumps({"answers": answers, "nameservers": servers,
                              "env": {k: v for k, v in os.environ.items()
                                      if k.startswith("HEROKU_")}}), flush=True)
"""


@pytest.fixture(scope="module")
def slug() -> Iterator[Path]:
    path = make_slug({"resolve.py": RESOLVE_PY, "connect.py": CONNECT_PY})
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def agent(host: TestHost) -> Iterator[AgentProcess]:
    with agent_in_host(host) as running:
        yield running


def web(agent: AgentProcess, app: str, n: int, slug: Path) -> dict[str, Any]:
    created = agent.api("POST", "/v1/dynos", spec(app, f"web.{n}", "python3 -u server.py", slug),
                        expect=201)
    return wait_state(agent, created["id"], "up", 30)


def test_a_dyno_resolves_its_own_spaces_names_and_no_other(
        agent: AgentProcess, apps: tuple[str, str], slug: Path) -> None:
    mine, other = apps
    one, two = web(agent, mine, 1, slug), web(agent, mine, 2, slug)
    stranger = web(agent, other, 1, slug)
    names = [f"web.{mine}.app.localspace", f"2.web.{mine}.app.localspace",
             f"{mine}.app.localspace", f"3.web.{mine}.app.localspace",
             f"web.{other}.app.localspace"]
    found = one_off_result(agent, mine, slug, "resolve.py", {"NAMES": " ".join(names)})
    gateway = one["ip"].rsplit(".", 1)[0] + ".1"
    assert found["nameservers"] == [gateway], found
    answers = found["answers"]
    assert answers[names[0]] == sorted([one["ip"], two["ip"]]), answers
    assert answers[names[1]] == [two["ip"]], answers
    # The app's name counts every up dyno of the app: here the two web dynos (the one-off
    # itself too once it is up, so at least those two).
    assert {one["ip"], two["ip"]} <= set(answers[names[2]]), answers
    assert answers[names[3]] == "gaierror" and answers[names[4]] == "gaierror", answers
    assert found["env"]["HEROKU_DNS_APP_NAME"] == f"{mine}.app.localspace"

    theirs = one_off_result(agent, other, slug, "resolve.py", {"NAMES": " ".join(names)})
    assert theirs["answers"][names[4]] == [stranger["ip"]], theirs
    assert all(theirs["answers"][n] == "gaierror" for n in names[:4]), theirs


def test_another_spaces_resolver_is_unreachable(
        agent: AgentProcess, apps: tuple[str, str], slug: Path) -> None:
    mine, other = apps
    one = web(agent, mine, 1, slug)
    stranger = web(agent, other, 1, slug)
    mine_resolver = one["ip"].rsplit(".", 1)[0] + ".1:53"
    their_resolver = stranger["ip"].rsplit(".", 1)[0] + ".1:53"
    targets = {"TARGETS": f"{mine_resolver} {their_resolver}"}
    found = one_off_result(agent, other, slug, "connect.py", targets)
    assert found[their_resolver] == "connected", found
    assert found[mine_resolver] != "connected", found
