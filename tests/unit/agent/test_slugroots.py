"""Which local slug paths an agent accepts: under its slug_roots, symlinks resolved, and never
reaching its state, run_dir, socket or the directories every agent keeps state in."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from agent.config import Config
from agent.slugs.roots import SlugPathRefused, SlugRoots, real_path


@pytest.fixture
def config(tmp_path: Path) -> Config:
    (tmp_path / "state" / "slugs" / "myapp").mkdir(parents=True)
    (tmp_path / "run").mkdir()
    (tmp_path / "srv" / "app").mkdir(parents=True)
    (tmp_path / "srv" / "slug.tgz").write_bytes(b"")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "slug.tgz").write_bytes(b"")
    return Config(state_dir=tmp_path / "state", run_dir=tmp_path / "run",
                  slug_roots=(tmp_path / "state" / "slugs", tmp_path / "srv"))


def test_the_default_root_is_the_slugs_directory_of_the_state_dir(tmp_path: Path) -> None:
    config = Config(state_dir=tmp_path / "state")
    assert config.effective_slug_roots == (tmp_path / "state" / "slugs",)
    (tmp_path / "state" / "slugs" / "a").mkdir(parents=True)
    roots = SlugRoots.from_config(config)
    assert roots.resolve(str(tmp_path / "state" / "slugs" / "a")) == \
        str(tmp_path / "state" / "slugs" / "a")
    with pytest.raises(SlugPathRefused, match="not under any of the agent's slug_roots"):
        roots.resolve(str(tmp_path / "state-like"))


@pytest.mark.parametrize("rel", ["state/slugs/myapp", "srv/app", "srv/slug.tgz", "srv",
                                 "srv/app/not-there-yet"])
def test_allowed(config: Config, tmp_path: Path, rel: str) -> None:
    assert SlugRoots.from_config(config).resolve(str(tmp_path / rel)) == str(tmp_path / rel)


@pytest.mark.parametrize(("rel", "why"), [
    ("state", "would show the agent's state_dir"),
    ("state/dynos", "not under any"),
    ("state/stacks/heroku-24", "not under any"),
    ("state/slugs", "would show the slug cache"),
    ("state/slugs/slugs", "would show the slug cache"),
    ("state/slugs/slugs/0123abcd", "lies inside the slug cache"),
    ("state/slugs/tmp", "would show the slug cache"),
    ("run", "would show the agent's run_dir"),
    ("run/dynos", "not under any"),
    ("elsewhere/slug.tgz", "not under any"),
    ("", "would show the agent's state_dir"),
])
def test_refused(config: Config, tmp_path: Path, rel: str, why: str) -> None:
    with pytest.raises(SlugPathRefused, match=why):
        SlugRoots.from_config(config).resolve(str(tmp_path / rel))


def test_symlinks_are_resolved_before_judging(config: Config, tmp_path: Path) -> None:
    roots = SlugRoots.from_config(config)
    (tmp_path / "srv" / "to-state").symlink_to(tmp_path / "state")
    (tmp_path / "srv" / "to-records").symlink_to(tmp_path / "state" / "dynos")
    (tmp_path / "srv" / "to-outside.tgz").symlink_to(tmp_path / "elsewhere" / "slug.tgz")
    (tmp_path / "srv" / "to-app").symlink_to("app")
    with pytest.raises(SlugPathRefused, match="would show the agent's state_dir"):
        roots.resolve(str(tmp_path / "srv" / "to-state"))
    with pytest.raises(SlugPathRefused, match=r"to-records \(it resolves to .*state/dynos\) "
                                              "is not under"):
        roots.resolve(str(tmp_path / "srv" / "to-records"))
    with pytest.raises(SlugPathRefused, match=r"resolves to .*elsewhere/slug.tgz"):
        roots.resolve(str(tmp_path / "srv" / "to-outside.tgz"))
    assert roots.resolve(str(tmp_path / "srv" / "to-app")) == str(tmp_path / "srv" / "app")


def test_a_root_that_contains_the_state_dir_does_not_open_it(tmp_path: Path) -> None:
    config = Config(state_dir=tmp_path / "state", run_dir=tmp_path / "run",
                    slug_roots=(tmp_path,))
    roots = SlugRoots.from_config(config)
    (tmp_path / "app").mkdir()
    assert roots.resolve(str(tmp_path / "app")) == str(tmp_path / "app")
    for path, why in ((tmp_path, "would show the agent's state_dir"),
                      (tmp_path / "state", "would show"),
                      (tmp_path / "state" / "dynos", "lies inside the agent's state_dir"),
                      (tmp_path / "run" / "dynos", "lies inside the agent's run_dir")):
        with pytest.raises(SlugPathRefused, match=why):
            roots.resolve(str(path))


def test_nothing_of_any_agent_and_no_secret_is_reachable(tmp_path: Path) -> None:
    token = tmp_path / "etc" / "token"
    config = Config(state_dir=tmp_path / "state", run_dir=tmp_path / "run",
                    socket=tmp_path / "sock" / "agent.sock", coordinator_url="ws://x",
                    coordinator_token_file=token, slug_roots=(Path("/"),))
    roots = SlugRoots.from_config(config)
    for path, why in (("/", "would show"), ("/var/lib", "a directory dynoagents keep"),
                      ("/var/lib/dynoagent/dynos", "a directory dynoagents keep"),
                      ("/run/netns", "a directory dynoagents keep"),
                      ("/run/dynoagent-uids", "a directory dynoagents keep"),
                      (str(tmp_path / "sock"), "the operator socket"),
                      (str(tmp_path / "etc"), "coordinator_token_file")):
        with pytest.raises(SlugPathRefused, match=why):
            roots.resolve(path)
    assert roots.resolve("/usr/share") == "/usr/share"


def test_no_roots_means_no_local_slug(config: Config, tmp_path: Path) -> None:
    roots = SlugRoots.from_config(replace(config, slug_roots=()))
    with pytest.raises(SlugPathRefused, match=r"slug_roots \(none\)"):
        roots.resolve(str(tmp_path / "srv" / "app"))


# -- at every edge: operator API (create_dyno), coordinator (dyno.start, dynos.sync) ---------

def _body(dyno_id: str, path: Path) -> dict[str, object]:
    return {"id": dyno_id, "app": "demo", "name": "web.1", "command": "x",
            "release": {"version": 1, "slug": {"path": str(path)}}}


async def test_every_edge_refuses_and_changes_nothing(tmp_path: Path) -> None:
    from agent import errors
    from agent.supervision.reconcile import DesiredStore, Engine, InvalidDesiredSet, SupervisorFleet
    from tests.unit.agent.fakes import make_harness

    h = await make_harness(tmp_path, slug_roots=(tmp_path / "slugs",))
    try:
        (tmp_path / "slugs" / "ok").mkdir(parents=True)
        bad = tmp_path / "state"
        store = DesiredStore(tmp_path / "state")
        engine = Engine(SupervisorFleet(h.supervisor), store)
        with pytest.raises(errors.InvalidSpec, match=r"release\.slug\.path: .* would show"):
            await h.supervisor.create_dyno(_body("d1", bad))
        with pytest.raises(errors.InvalidSpec, match=r"release\.slug\.path: .* would show"):
            await engine.start(_body("d2", bad))
        with pytest.raises(InvalidDesiredSet, match=r"dynos\[1\].*release.slug.path"):
            await engine.apply(1, [_body("d3", tmp_path / "slugs" / "ok"), _body("d4", bad)])
        assert h.supervisor.dynos == {}
        assert list(h.records.load_all()) == []
        assert store.load() is None and engine.generation is None
        # The same spec with a slug under the root is accepted.
        await h.supervisor.create_dyno(_body("d5", tmp_path / "slugs" / "ok"))
        assert list(h.supervisor.dynos) == ["d5"]
    finally:
        await h.supervisor.detach_all()


def test_the_config_key_takes_a_list_of_absolute_paths() -> None:
    from agent.config import from_mapping
    from agent.errors import ConfigError

    assert from_mapping({"slug_roots": ["/srv/slugs", "/home/dev"]}).effective_slug_roots == \
        (Path("/srv/slugs"), Path("/home/dev"))
    assert from_mapping({"slug_roots": []}).effective_slug_roots == ()
    for bad, message in (("/srv", "must be a list"), (["srv"], r"slug_roots\[0\]: must be an "
                         "absolute path"), ([1], r"slug_roots\[0\]: must be a path string")):
        with pytest.raises(ConfigError, match=message):
            from_mapping({"slug_roots": bad})


def test_real_path_is_realpath(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel's resolution gives what os.path.realpath gives: symlinks (relative,
    absolute, chained, to directories and files), `..` after a symlink, trailing slashes,
    relative paths, and paths that exist only in part."""
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "e" / "f").write_text("")
    (tmp_path / "up").symlink_to("d/e")
    (tmp_path / "abs").symlink_to(tmp_path / "up")
    (tmp_path / "file").symlink_to(tmp_path / "d" / "e" / "f")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "x")
    monkeypatch.chdir(tmp_path / "d")
    cases = ["abs", "abs/", "abs/f", "up/..", "up/../..", "file", "dangling", "dangling/y",
             "missing/a/../b", "e/f", ".", "..", "/", "//", "abs/f/"]
    for case in cases:
        for path in (case, str(tmp_path / case)):
            assert real_path(path) == os.path.realpath(path), path


def test_real_path_walks_in_the_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                       ) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")

    def refuse(path: str) -> str:
        raise AssertionError("an existing path must not be walked in Python")

    monkeypatch.setattr(os.path, "realpath", refuse)
    assert real_path(str(tmp_path / "link")) == str(tmp_path / "a")
