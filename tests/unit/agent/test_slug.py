"""Slugs: safe extraction (each malicious tarball kind refused), the digest cache, R17,
downloads shared between dynos of one release, and failures that leave nothing visible."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import io
import os
import stat
import tarfile
import tempfile
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.slugs.store import (
    AbsolutePathError,
    BadArchiveError,
    ChecksumError,
    DownloadError,
    LinkEscapeError,
    ParentTraversalError,
    SlugError,
    SlugNotFoundError,
    SlugStore,
    SlugTooLargeError,
    SpecialFileError,
    UnsafeMemberError,
    extract_tarball,
)
from agent.spec import SlugSource
from tests.support.wait import async_wait_for

LIMIT = 1024 * 1024


@dataclass
class Entry:
    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    linkname: str = ""
    mode: int = 0o644


def file(name: str, data: bytes = b"x", mode: int = 0o644) -> Entry:
    return Entry(name, tarfile.REGTYPE, data, mode=mode)


def directory(name: str) -> Entry:
    return Entry(name, tarfile.DIRTYPE, mode=0o755)


def symlink(name: str, target: str) -> Entry:
    return Entry(name, tarfile.SYMTYPE, linkname=target, mode=0o777)


def hardlink(name: str, target: str) -> Entry:
    return Entry(name, tarfile.LNKTYPE, linkname=target)


def tarball(entries: Iterable[Entry], compression: str = "gz") -> bytes:
    buffer = io.BytesIO()
    # typeshed only accepts literal modes; the compression is a test parameter.
    with tarfile.open(fileobj=buffer, mode=f"w:{compression}") as tar:  # type: ignore[call-overload]
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.type = entry.type
            info.mode = entry.mode
            info.linkname = entry.linkname
            info.mtime = 1_700_000_000
            if entry.type == tarfile.REGTYPE:
                info.size = len(entry.data)
                tar.addfile(info, io.BytesIO(entry.data))
            else:
                if entry.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                    info.devmajor, info.devminor = 1, 3
                tar.addfile(info)
    return buffer.getvalue()


def write_tarball(tmp_path: Path, entries: Iterable[Entry], name: str = "slug.tgz") -> Path:
    path = tmp_path / name
    path.write_bytes(tarball(entries))
    return path


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ---------------------------------------------------------------- extraction


GOOD = [
    directory("./bin"),
    file("./bin/web", b"#!/bin/sh\necho hi\n", mode=0o700),
    file("./Procfile", b"web: bin/web\n", mode=0o600),
    file("lib/deep/module.py", b"print(1)\n"),  # parents without their own entries
    symlink("./bin/sibling", "web"),
    symlink("lib/up", "../Procfile"),
    symlink("lib/abs", "/app/bin/web"),
    symlink("lib/root", "/app"),
    hardlink("./bin/web2", "./bin/web"),
    file("dup", b"first"),
    file("dup", b"second"),
]


def test_good_tarball_is_extracted(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    extract_tarball(write_tarball(tmp_path, GOOD), dest, LIMIT)
    assert listing(dest) == {"bin", "bin/web", "bin/sibling", "bin/web2", "Procfile", "lib",
                             "lib/deep", "lib/deep/module.py", "lib/up", "lib/abs", "lib/root",
                             "dup"}
    assert (dest / "bin/web").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (dest / "dup").read_bytes() == b"second"
    assert os.readlink(dest / "lib/abs") == "/app/bin/web"
    assert (dest / "lib/up").read_bytes() == b"web: bin/web\n"
    assert os.stat(dest / "bin/web2").st_ino == os.stat(dest / "bin/web").st_ino
    # Readable (and, if executable at all, executable) by every dyno's own uid.
    assert stat.S_IMODE(os.stat(dest / "bin/web").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(dest / "Procfile").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(dest / "lib/deep").st_mode) == 0o755
    assert os.stat(dest / "Procfile").st_mtime == 1_700_000_000


@pytest.mark.parametrize("compression", ["", "gz", "bz2", "xz"])
def test_every_compression_tar_makes(tmp_path: Path, compression: str) -> None:
    archive = tmp_path / "slug.tar"
    archive.write_bytes(tarball([file("a", b"alpha")], compression))
    dest = tmp_path / "out"
    dest.mkdir()
    extract_tarball(archive, dest, LIMIT)
    assert (dest / "a").read_bytes() == b"alpha"


MALICIOUS = [
    ("absolute path", [file("/etc/cron.d/evil")], AbsolutePathError, "/etc/cron.d/evil"),
    ("dot-dot path", [file("../../evil")], ParentTraversalError, "../../evil"),
    ("dot-dot inside", [directory("a"), file("a/../../evil")], ParentTraversalError,
     "a/../../evil"),
    ("symlink out, relative", [symlink("out", "../../etc")], LinkEscapeError, "out"),
    ("symlink out, absolute", [symlink("passwd", "/etc/passwd")], LinkEscapeError, "passwd"),
    ("symlink out of /app", [symlink("x", "/app/../etc")], LinkEscapeError, "x"),
    ("symlink chain out", [symlink("b", "a/.."), symlink("a", ".")], LinkEscapeError, "b"),
    ("write through symlink", [directory("d"), symlink("s", "d"), file("s/x")],
     LinkEscapeError, "s/x"),
    ("hardlink out, absolute", [hardlink("h", "/etc/shadow")], LinkEscapeError, "h"),
    ("hardlink out, relative", [hardlink("h", "../outside")], LinkEscapeError, "h"),
    ("hardlink to a symlink", [symlink("s", "/app/x"), hardlink("h", "s")], LinkEscapeError,
     "h"),
    ("hardlink to nothing", [hardlink("h", "missing")], LinkEscapeError, "h"),
    ("character device", [Entry("null", tarfile.CHRTYPE)], SpecialFileError, "null"),
    ("block device", [Entry("sda", tarfile.BLKTYPE)], SpecialFileError, "sda"),
    ("fifo", [Entry("pipe", tarfile.FIFOTYPE)], SpecialFileError, "pipe"),
]


@pytest.mark.parametrize(("entries", "error", "member"),
                         [m[1:] for m in MALICIOUS], ids=[m[0] for m in MALICIOUS])
def test_malicious_tarball_is_refused(tmp_path: Path, entries: list[Entry],
                                      error: type[UnsafeMemberError], member: str) -> None:
    outside = tmp_path / "outside"
    dest = tmp_path / "a" / "b" / "out"
    dest.mkdir(parents=True)
    with pytest.raises(error) as caught:
        extract_tarball(write_tarball(tmp_path, entries), dest, LIMIT)
    assert caught.value.member == member
    assert repr(member) in str(caught.value)
    assert "refused" in str(caught.value)
    assert not outside.exists()
    assert listing(tmp_path / "a") <= {"b", "b/out"} | {f"b/out/{p}" for p in listing(dest)}


def test_size_limit_names_the_member(tmp_path: Path) -> None:
    entries = [file("a", b"x" * 600), file("b", b"y" * 600)]
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(SlugTooLargeError) as caught:
        extract_tarball(write_tarball(tmp_path, entries), dest, 1000)
    assert caught.value.member == "b"
    assert "1000" in str(caught.value)
    assert not (dest / "b").exists()


def test_entry_count_limit(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(SlugTooLargeError):
        extract_tarball(write_tarball(tmp_path, [directory(f"d{i}") for i in range(10)]),
                        dest, LIMIT, max_entries=5)


def test_corrupt_tarball(tmp_path: Path) -> None:
    data = tarball([file("a", b"x" * 5000)])
    archive = tmp_path / "bad.tgz"
    archive.write_bytes(data[: len(data) // 2])
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(BadArchiveError):
        extract_tarball(archive, dest, LIMIT)
    archive.write_bytes(b"not a tarball at all" * 100)
    with pytest.raises(BadArchiveError):
        extract_tarball(archive, dest, LIMIT)


# ---------------------------------------------------------------- the store, local sources


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SlugStore]:
    async with SlugStore(tmp_path / "cache", LIMIT) as slug_store:
        yield slug_store


async def test_local_directory_is_used_in_place(tmp_path: Path, store: SlugStore) -> None:
    (tmp_path / "app").mkdir()
    assert await store.resolve(SlugSource(path=str(tmp_path / "app"))) == tmp_path / "app"
    assert not store.cached()


async def test_missing_local_path(tmp_path: Path, store: SlugStore) -> None:
    with pytest.raises(SlugNotFoundError) as caught:
        await store.resolve(SlugSource(path=str(tmp_path / "nope")))
    assert caught.value.path == str(tmp_path / "nope")


async def test_local_tarball_is_cached_by_digest(tmp_path: Path, store: SlugStore) -> None:
    archive = write_tarball(tmp_path, [file("./app/Procfile", b"web: x\n")])
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    slug = await store.materialize(SlugSource(path=str(archive)))
    # Heroku slugs are `tar czf slug.tgz ./app`: the root is that app directory.
    assert slug.path == store.slugs_dir / digest / "app"
    assert slug.digest == digest
    assert (slug.path / "Procfile").read_text() == "web: x\n"
    assert store.cached() == {digest}
    assert await store.resolve(SlugSource(path=str(archive))) == slug.path
    assert list(store.tmp_dir.iterdir()) == []


async def test_refused_tarball_leaves_nothing(tmp_path: Path, store: SlugStore) -> None:
    archive = write_tarball(tmp_path, [file("ok"), symlink("evil", "/etc")])
    with pytest.raises(LinkEscapeError):
        await store.resolve(SlugSource(path=str(archive)))
    assert store.cached() == set()
    assert list(store.tmp_dir.iterdir()) == []


async def test_prune_removes_only_unkept_digests(tmp_path: Path, store: SlugStore) -> None:
    first = write_tarball(tmp_path, [file("a", b"1")], "one.tgz")
    second = write_tarball(tmp_path, [file("a", b"2")], "two.tgz")
    keep = (await store.materialize(SlugSource(path=str(first)))).digest
    drop = (await store.materialize(SlugSource(path=str(second)))).digest
    assert keep is not None and drop is not None
    (store.tmp_dir / "deadbeef0000-stale").mkdir()
    assert await store.prune({keep}) == [drop]
    assert store.cached() == {keep}
    assert list(store.tmp_dir.iterdir()) == []
    assert await store.prune({keep}) == []


# ---------------------------------------------------------------- the store, URLs


@dataclass
class SlugServer:
    """A local HTTP server on 127.0.0.1 that serves slugs and counts requests per path."""

    base: str
    bodies: dict[str, bytes] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
    gate: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def count(self, path: str) -> int:
        return self.requests.get(path, 0)


@pytest.fixture
async def server() -> AsyncIterator[SlugServer]:
    state = SlugServer("")
    state.gate.set()

    async def handle(request: web.Request) -> web.StreamResponse:
        state.requests[request.path] = state.count(request.path) + 1
        await state.gate.wait()
        body = state.bodies.get(request.path)
        if body is None:
            raise web.HTTPNotFound()
        if request.path.startswith("/truncated"):
            # Promise the whole body, send half, then drop the connection.
            response = web.StreamResponse(headers={"Content-Length": str(len(body))})
            await response.prepare(request)
            await response.write(body[: len(body) // 2])
            assert request.transport is not None
            request.transport.close()
            return response
        return web.Response(body=body, content_type="application/gzip")

    app = web.Application()
    app.router.add_get("/{name:.*}", handle)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    state.base = f"http://{host}:{port}"
    try:
        yield state
    finally:
        await runner.cleanup()


def serve(server: SlugServer, path: str, data: bytes) -> SlugSource:
    server.bodies[path] = data
    return SlugSource(url=server.url(path), sha256=hashlib.sha256(data).hexdigest())


async def test_url_slug_is_downloaded_verified_and_cached(server: SlugServer,
                                                          store: SlugStore) -> None:
    source = serve(server, "/s1.tgz", tarball([file("Procfile", b"web: y\n")]))
    path = await store.resolve(source)
    assert path == store.slugs_dir / str(source.sha256)
    assert (path / "Procfile").read_text() == "web: y\n"
    assert await store.resolve(source) == path
    assert server.count("/s1.tgz") == 1
    # Once pruned, the next dyno of that release fetches it again.
    assert await store.prune(set()) == [source.sha256]
    assert not path.exists()
    assert (await store.resolve(source) / "Procfile").read_text() == "web: y\n"
    assert server.count("/s1.tgz") == 2


async def test_two_dynos_of_one_release_download_once(server: SlugServer,
                                                      store: SlugStore) -> None:
    source = serve(server, "/shared.tgz", tarball([file("a", b"shared")]))
    server.gate.clear()
    first = asyncio.create_task(store.resolve(source))
    second = asyncio.create_task(store.resolve(source))
    assert source.sha256 is not None
    await async_wait_for(lambda: _true(store.waiting(str(source.sha256)) == 2), 10,
                         what="both resolves waiting on one download")
    assert server.count("/shared.tgz") <= 1
    server.gate.set()
    paths = await asyncio.wait_for(asyncio.gather(first, second), 30)
    assert paths[0] == paths[1]
    assert (paths[0] / "a").read_bytes() == b"shared"
    assert server.count("/shared.tgz") == 1
    assert store.downloads_started == 1


async def test_a_cancelled_waiter_does_not_cancel_the_shared_download(
        server: SlugServer, store: SlugStore) -> None:
    source = serve(server, "/c.tgz", tarball([file("a", b"c")]))
    assert source.sha256 is not None
    server.gate.clear()
    quitter = asyncio.create_task(store.resolve(source))
    stayer = asyncio.create_task(store.resolve(source))
    await async_wait_for(lambda: _true(store.waiting(str(source.sha256)) == 2), 10,
                         what="both resolves waiting")
    quitter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await quitter
    server.gate.set()
    path = await asyncio.wait_for(stayer, 30)
    assert (path / "a").read_bytes() == b"c"


async def test_wrong_sha256_is_r17_and_leaves_nothing(server: SlugServer,
                                                      store: SlugStore) -> None:
    data = tarball([file("a")])
    server.bodies["/tampered.tgz"] = data
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as caught:
        await store.resolve(SlugSource(url=server.url("/tampered.tgz"), sha256=wrong))
    assert str(caught.value).startswith("Error R17 (Checksum error)")
    assert f"Expected: SHA256:{wrong}" in str(caught.value)
    assert f"Actual: SHA256:{hashlib.sha256(data).hexdigest()}" in str(caught.value)
    assert store.cached() == set()
    assert list(store.tmp_dir.iterdir()) == []


async def test_failed_download_leaves_nothing_half_visible(server: SlugServer,
                                                           store: SlugStore) -> None:
    source = serve(server, "/truncated.tgz", tarball([file("a", os.urandom(200_000))], ""))
    with pytest.raises(DownloadError) as caught:
        await store.resolve(source)
    assert "/truncated.tgz" in str(caught.value)
    assert store.cached() == set()
    assert list(store.tmp_dir.iterdir()) == []
    # Not cached as a failure: the next resolve tries again.
    with pytest.raises(DownloadError):
        await store.resolve(source)
    assert server.count("/truncated.tgz") == 2


async def test_http_error_status(server: SlugServer, store: SlugStore) -> None:
    with pytest.raises(DownloadError) as caught:
        await store.resolve(SlugSource(url=server.url("/missing.tgz"), sha256="1" * 64))
    assert "HTTP 404" in str(caught.value)
    assert store.cached() == set()


async def test_download_size_limit(server: SlugServer, tmp_path: Path) -> None:
    source = serve(server, "/big.tgz", os.urandom(5000))
    async with SlugStore(tmp_path / "c2", LIMIT, max_download_bytes=1000) as small:
        with pytest.raises(SlugTooLargeError):
            await small.resolve(source)
        assert small.cached() == set()


async def test_unreachable_host(tmp_path: Path) -> None:
    # A port on loopback that nothing listens on: bind, learn the port, close.
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    async with SlugStore(tmp_path / "c3", LIMIT) as unreachable:
        with pytest.raises(DownloadError):
            await unreachable.resolve(SlugSource(url=f"http://127.0.0.1:{port}/s.tgz",
                                                 sha256="2" * 64))


async def test_injected_session_factory_is_used(server: SlugServer, tmp_path: Path) -> None:
    made: list[aiohttp.ClientSession] = []

    def factory() -> aiohttp.ClientSession:
        session = aiohttp.ClientSession(headers={"X-Test": "1"})
        made.append(session)
        return session

    source = serve(server, "/f.tgz", tarball([file("a")]))
    async with SlugStore(tmp_path / "c4", LIMIT, session_factory=factory) as custom:
        await custom.resolve(source)
    assert len(made) == 1 and made[0].closed


async def _true(value: bool) -> bool:
    return value


# ---------------------------------------------------------------- property: nothing escapes

_components = st.sampled_from(["a", "b", "..", ".", ""])
_names = st.builds(lambda lead, parts: lead + "/".join(parts), st.sampled_from(["", "/", "./"]),
                   st.lists(_components, min_size=1, max_size=4))
# Absolute targets other than /app are outside by definition; /app ones are covered above.
_targets = _names | st.sampled_from(["/etc", "/", "/tmp/x"])
_entries = st.lists(st.one_of(
    st.builds(file, _names),
    st.builds(directory, _names),
    st.builds(symlink, _names, _targets),
    st.builds(hardlink, _names, _names),
), min_size=1, max_size=8)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=_entries)
def test_whatever_the_archive_nothing_lands_or_points_outside(tmp_path: Path,
                                                              entries: list[Entry]) -> None:
    case = Path(tempfile.mkdtemp(dir=tmp_path))
    dest = case / "jail" / "out"
    dest.mkdir(parents=True)
    archive = case / "slug.tgz"
    archive.write_bytes(tarball(entries))
    with contextlib.suppress(SlugError):
        extract_tarball(archive, dest, LIMIT)
    assert sorted(p.name for p in case.iterdir()) == ["jail", "slug.tgz"]
    assert [p.name for p in (case / "jail").iterdir()] == ["out"]
    real = os.path.realpath(dest)
    for directory_, dirnames, filenames in os.walk(dest):
        for name in dirnames + filenames:
            path = os.path.join(directory_, name)
            if os.path.islink(path):
                try:
                    resolved = os.path.realpath(path, strict=True)
                except OSError as exc:
                    if exc.errno != errno.ELOOP and exc.errno != errno.ENOENT:
                        raise
                    # A loop or a dangling link cannot be followed anywhere; what matters
                    # is that its target, read lexically, stays inside the slug.
                    resolved = os.path.normpath(
                        os.path.join(os.path.dirname(path), os.readlink(path)))
                assert resolved == real or resolved.startswith(real + os.sep), (
                    path, os.readlink(path))
