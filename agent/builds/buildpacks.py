"""Buildpacks named for a build: built-in names, directories, or tarball URLs pinned by
sha256 (`https://…/bp.tgz#sha256=HEX`), each resolved to a local directory holding bin/detect
and bin/compile (bin/release optional)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from agent import errors
from agent.slugs.store import SlugError, extract_tarball

BUILTIN_DIR = Path(__file__).with_name("buildpacks")
# In the order they are tried on an app that names none (as Heroku's detection order).
BUILTINS = ("python", "nodejs")
# The files each built-in bin/detect looks for: an app with none of them is known to be
# undetected without starting a build dyno (`up` of an app that needs no build stays fast).
BUILTIN_MARKERS = {"python": ("requirements.txt", "pyproject.toml", "setup.py"),
                   "nodejs": ("package.json",)}
# Heroku's names for its official buildpacks, mapped to the built-in ones of the same language.
ALIASES = {"heroku/python": "python", "heroku/nodejs": "nodejs"}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NAME_CHARS = re.compile(r"[^a-z0-9-]+")
MAX_BUILDPACK_BYTES = 256 * 1024 * 1024
DOWNLOAD_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Buildpack:
    name: str  # [a-z0-9-], for logs and the directory it runs from
    path: Path
    origin: str  # what was asked for


def _name(text: str) -> str:
    base = text.rstrip("/").rsplit("/", 1)[-1].split("#", 1)[0]
    for suffix in (".tar.gz", ".tgz", ".tar"):
        base = base.removesuffix(suffix)
    base = base.lower().removeprefix("heroku-buildpack-")
    return _NAME_CHARS.sub("-", base).strip("-")[:32] or "buildpack"


def check_layout(path: Path, origin: str) -> None:
    for script in ("detect", "compile"):
        candidate = path / "bin" / script
        if not candidate.is_file():
            raise errors.BadRequest(f"buildpack {errors.excerpt(origin)} has no bin/{script}")


def resolve_local(ref: str) -> Buildpack:
    """A built-in name or a directory (no network)."""
    name = ALIASES.get(ref, ref)
    if name in BUILTINS:
        return Buildpack(name, BUILTIN_DIR / name, ref)
    if "://" in ref:
        raise errors.BadRequest(f"buildpack {errors.excerpt(ref)} is a URL; use resolve()")
    path = Path(ref).resolve()
    if not path.is_dir():
        raise errors.BadRequest(f"buildpack {errors.excerpt(ref)} is neither a built-in one "
                                f"({', '.join(BUILTINS)}), a directory, nor a tarball URL "
                                "with #sha256=HEX")
    check_layout(path, ref)
    return Buildpack(_name(str(path)), path, ref)


async def resolve(ref: str, cache: Path) -> Buildpack:
    if "://" not in ref:
        return await asyncio.to_thread(resolve_local, ref)
    url, _, fragment = ref.partition("#")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise errors.BadRequest(f"buildpack URL {errors.excerpt(ref)}: only http(s) tarballs "
                                "are supported (git URLs are not)")
    digest = fragment.removeprefix("sha256=").lower()
    if not fragment.startswith("sha256=") or not _SHA256.fullmatch(digest):
        raise errors.BadRequest(f"buildpack URL {errors.excerpt(ref)} needs its tarball's "
                                "sha256 as #sha256=HEX")
    entry = cache / digest
    if not await asyncio.to_thread((entry / "ok").is_file):
        await _download(url, digest, cache)
    root = await asyncio.to_thread(_single_top, entry / "tree")
    await asyncio.to_thread(check_layout, root, ref)
    return Buildpack(_name(url), root, ref)


async def resolve_all(refs: Sequence[str], cache: Path) -> list[Buildpack]:
    if not refs:
        return [resolve_local(name) for name in BUILTINS]
    packs = [await resolve(ref, cache) for ref in refs]
    names = [p.name for p in packs]
    for index, pack in enumerate(packs):
        if names.count(pack.name) > 1:
            packs[index] = Buildpack(f"{pack.name}-{index + 1}", pack.path, pack.origin)
    return packs


def builtins_may_detect(source: Path) -> bool:
    return any((source / name).is_file() for names in BUILTIN_MARKERS.values()
               for name in names)


def _single_top(tree: Path) -> Path:
    """GitHub's archives put everything under one directory: the buildpack is that one."""
    entries = list(tree.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return tree


async def _download(url: str, digest: str, cache: Path) -> None:
    await asyncio.to_thread(cache.mkdir, parents=True, exist_ok=True)
    staging = cache / f".{digest}.{secrets.token_hex(4)}"
    await asyncio.to_thread(staging.mkdir)
    try:
        archive = staging / "buildpack.tar"
        hasher = hashlib.sha256()
        size = 0
        timeout = aiohttp.ClientTimeout(total=DOWNLOAD_TIMEOUT_S)
        try:
            fd = await asyncio.to_thread(os.open, archive, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                                         0o600)
            try:
                async with (aiohttp.ClientSession(timeout=timeout,
                                                  auto_decompress=False) as session,
                            session.get(url) as response):
                    if response.status != 200:
                        raise errors.BadRequest(f"buildpack {errors.excerpt(url)}: HTTP "
                                                f"{response.status}")
                    async for chunk in response.content.iter_chunked(1 << 20):
                        size += len(chunk)
                        if size > MAX_BUILDPACK_BYTES:
                            raise errors.BadRequest(f"buildpack {errors.excerpt(url)} is "
                                                    f"over {MAX_BUILDPACK_BYTES} bytes")
                        hasher.update(chunk)
                        await asyncio.to_thread(os.write, fd, chunk)
            finally:
                os.close(fd)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise errors.BadRequest(f"buildpack {errors.excerpt(url)} cannot be downloaded: "
                                    f"{exc or type(exc).__name__}") from None
        if hasher.hexdigest() != digest:
            raise errors.BadRequest(f"buildpack {errors.excerpt(url)} has sha256 "
                                    f"{hasher.hexdigest()}, not {digest}")
        (staging / "tree").mkdir()
        try:
            await asyncio.to_thread(extract_tarball, archive, staging / "tree",
                                    MAX_BUILDPACK_BYTES)
        except SlugError as exc:
            raise errors.BadRequest(f"buildpack {errors.excerpt(url)}: {exc}") from None
        archive.unlink()
        (staging / "ok").write_text(url + "\n")
        final = cache / digest
        if final.exists():
            await asyncio.to_thread(shutil.rmtree, staging, True)
            return
        os.rename(staging, final)
    except BaseException:
        await asyncio.to_thread(shutil.rmtree, staging, True)
        raise
