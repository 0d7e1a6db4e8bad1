"""R15 ends the whole dyno whichever of its processes the kernel OOM-kills: the real daemon in
a test host runs a dyno whose PID 1 stays small while a child allocates past the kill point.

On a hybrid host the v1 memory controller kills only the child (there is no memory.oom.group);
the agent hears the kill from the cgroup's OOM eventfd and kills the rest, so the log reads
Heroku's R15 sequence and the exit is 137, never `Process exited with status 0` after R15.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.e2e.test_supervision import (
    METRICS_LINE,
    LineCollector,
    agent_in_host,
    app_texts,
    dyno,
    event_of,
    log_lines,
    spec,
)
from tests.support.agentproc import AgentProcess
from tests.support.testhost import TestHost

# PID 1's child (the shell exec's python, the reaper's child) stays small and waits; its own
# child allocates 256 MiB against the "tiny" size's 128 MiB kill point (64 MiB x 2).
PARENT_PY = """\
import subprocess, sys, time
hog = subprocess.Popen([sys.executable, "-c",
                        "import time; b = b'x' * (256 << 20); time.sleep(1000)"])
print("parent waiting for", hog.pid, flush=True)
status = hog.wait()
print("hog ended", status, flush=True)
time.sleep(1000)
"""


@pytest.fixture(scope="module")
def slug_files() -> Mapping[str, str]:
    return {"parent.py": PARENT_PY}


@pytest.fixture(scope="module")
def agent(host: TestHost, slug: Path) -> Iterator[AgentProcess]:
    with agent_in_host(host, slug_roots=[str(slug)]) as running:
        yield running


def test_child_past_the_kill_point_ends_the_whole_dyno_with_r15_then_137(
        agent: AgentProcess, app: str, slug: Path) -> None:
    events = LineCollector(agent.stream(f"/v1/events?app={app}&follow=1"))
    try:
        created = agent.api("POST", "/v1/dynos",
                            spec(app, "worker.1", "python3 parent.py", slug, size="tiny"),
                            expect=201)
        crashed = event_of(events, created["id"], "crashed")
    finally:
        events.close()
    assert (crashed["reason"], crashed["exit_status"]) == ("oom", 137)
    lines = [line["text"] for line in log_lines(agent, app, "worker.1")
             if line["source"] == "agent" and not METRICS_LINE.match(line["text"])]
    r15 = lines.index("Error R15 (Memory quota vastly exceeded)")
    assert re.fullmatch(r"Process running mem=\d+M\(\d+\.\d%\)", lines[r15 - 1]), lines
    assert lines[r15 + 1:r15 + 4] == ["Stopping process with SIGKILL",
                                      "Process exited with status 137",
                                      "State changed from up to crashed"], lines
    # Said once for this run, never followed by a plain exit of PID 1.
    first_run = lines[:r15 + 4]
    assert first_run.count("Error R15 (Memory quota vastly exceeded)") == 1, lines
    assert not any(re.fullmatch(r"Process exited with status (?!137$)\d+", text)
                   for text in first_run), lines
    # The parent was running when the hog died: it is the agent's kill that ended it.
    assert any(text.startswith("parent waiting for") for text in app_texts(agent, app,
                                                                          "worker.1"))
    status = dyno(agent, created["id"])
    assert status["exit_status"] == 137
