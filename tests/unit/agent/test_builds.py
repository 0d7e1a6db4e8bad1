"""The pure parts of builds: release YAML, buildpack references, cache keys, slug packing."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from aiohttp import web

from agent import errors
from agent.builds import buildpacks as bp
from agent.builds.builder import BuildFailed, BuildRequest, cache_key, check_tree, pack
from agent.builds.release import ReleaseError, ReleaseInfo, merge_releases, parse_release
from tests.support.httpserve import start_local


def test_release_yaml_gives_process_types_and_config_vars() -> None:
    info = parse_release("---\nconfig_vars:\n  A: 1\n  DEBUG: false\n"
                         "default_process_types:\n  web: gunicorn app:wsgi\naddons: []\n")
    assert info == ReleaseInfo({"web": "gunicorn app:wsgi"}, {"A": "1", "DEBUG": "false"})
    assert parse_release("") == ReleaseInfo() == parse_release("--- {}\n")


@pytest.mark.parametrize("text", [
    "- a list\n", "default_process_types: [web]\n", "config_vars:\n  A: {b: c}\n",
    "default_process_types:\n  Web-1: x\n", "config_vars:\n  1BAD: x\n", "a: [unclosed\n",
    "config_vars:\n  A:\n",
])
def test_bad_release_yaml_is_refused(text: str) -> None:
    with pytest.raises(ReleaseError):
        parse_release(text, "00.release.yml")


def test_later_buildpacks_win_when_merging() -> None:
    merged = merge_releases([ReleaseInfo({"web": "a"}, {"X": "1", "Y": "1"}),
                             ReleaseInfo({"web": "b", "worker": "w"}, {"Y": "2"})])
    assert merged == ReleaseInfo({"web": "b", "worker": "w"}, {"X": "1", "Y": "2"})


def _buildpack(path: Path) -> Path:
    (path / "bin").mkdir(parents=True)
    for script in ("detect", "compile"):
        (path / "bin" / script).write_text("#!/bin/sh\n")
        os.chmod(path / "bin" / script, 0o755)
    return path


def test_buildpack_references(tmp_path: Path) -> None:
    assert bp.resolve_local("python").path == bp.BUILTIN_DIR / "python"
    assert bp.resolve_local("heroku/nodejs").name == "nodejs"
    local = bp.resolve_local(str(_buildpack(tmp_path / "heroku-buildpack-Ruby_x")))
    assert local.name == "ruby-x"
    (tmp_path / "half" / "bin").mkdir(parents=True)
    with pytest.raises(errors.BadRequest, match="has no bin/detect"):
        bp.resolve_local(str(tmp_path / "half"))
    with pytest.raises(errors.BadRequest, match="neither a built-in one"):
        bp.resolve_local(str(tmp_path / "missing"))


async def test_buildpack_urls_need_a_sha256_and_are_checked(tmp_path: Path) -> None:
    for ref in ("https://example.invalid/bp.tgz", "git://example.invalid/bp",
                "https://example.invalid/bp.tgz#sha256=abc"):
        with pytest.raises(errors.BadRequest):
            await bp.resolve(ref, tmp_path / "cache")
    # A tarball with one top directory, as GitHub's archives are, served over HTTP.
    tree = _buildpack(tmp_path / "src" / "heroku-buildpack-fixture-main")
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        tar.add(tree, arcname="heroku-buildpack-fixture-main")
    body = archive.getvalue()
    async def serve(_request: web.Request) -> web.Response:
        return web.Response(body=body)

    app = web.Application()
    app.router.add_get("/bp.tgz", serve)
    runner, port = await start_local(app)
    try:
        url = f"http://127.0.0.1:{port}/bp.tgz"
        digest = hashlib.sha256(body).hexdigest()
        with pytest.raises(errors.BadRequest, match="has sha256"):
            await bp.resolve(f"{url}#sha256={'0' * 64}", tmp_path / "cache")
        pack_ = await bp.resolve(f"{url}#sha256={digest}", tmp_path / "cache")
        assert pack_.path.name == "heroku-buildpack-fixture-main"
        assert (pack_.path / "bin" / "compile").is_file() and pack_.name == "bp"
        assert [p.name for p in (tmp_path / "cache").iterdir()] == [digest]
    finally:
        await runner.cleanup()


def test_cache_key_follows_every_input(tmp_path: Path) -> None:
    source = tmp_path / "app"
    source.mkdir()
    (source / "a.txt").write_text("a")
    packs = [bp.resolve_local("python")]
    request = BuildRequest(app="demo", source=source)
    key = cache_key(request, packs)
    assert cache_key(request, packs) == key
    (source / ".git").mkdir()
    (source / ".git" / "HEAD").write_text("x")  # never part of a slug
    assert cache_key(request, packs) == key
    changes = [BuildRequest(app="demo", source=source, env={"A": "1"}),
               BuildRequest(app="demo", source=source, stack="heroku-24")]
    assert all(cache_key(r, packs) != key for r in changes)
    assert cache_key(request, [bp.resolve_local("nodejs")]) != key
    os.chmod(source / "a.txt", 0o755)
    assert cache_key(request, packs) != key


def test_packed_slugs_are_root_owned_without_special_bits_or_git(tmp_path: Path) -> None:
    tree = tmp_path / "app"
    (tree / ".git").mkdir(parents=True)
    (tree / ".git" / "config").write_text("x")
    (tree / "bin").mkdir()
    (tree / "bin" / "tool").write_text("#!/bin/sh\n")
    os.chmod(tree / "bin" / "tool", 0o6755)
    (tree / "link").symlink_to("bin/tool")
    pack(tree, tmp_path / "slug.tgz")
    with tarfile.open(tmp_path / "slug.tgz") as tar:
        infos = {m.name: m for m in tar.getmembers()}
    assert set(infos) == {"./app", "./app/bin", "./app/bin/tool", "./app/link"}
    assert infos["./app/bin/tool"].mode == 0o755
    assert all(m.uid == 0 and m.gid == 0 for m in infos.values())
    assert infos["./app/link"].issym()
    with pytest.raises(BuildFailed, match="setuid or setgid file at bin/tool"):
        check_tree(tree, "the source has")


@pytest.mark.parametrize("name", bp.BUILTINS)
def test_builtin_markers_agree_with_the_builtin_detect_scripts(tmp_path: Path,
                                                               name: str) -> None:
    detect = bp.BUILTIN_DIR / name / "bin" / "detect"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert subprocess.run([detect, empty], capture_output=True).returncode == 1
    assert not bp.builtins_may_detect(empty)
    for marker in bp.BUILTIN_MARKERS[name]:
        app = tmp_path / marker
        app.mkdir()
        (app / marker).write_text("")
        assert subprocess.run([detect, app], capture_output=True).returncode == 0, marker
        assert bp.builtins_may_detect(app)
