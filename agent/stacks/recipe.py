"""What a stack is made of, as data: its name rules, the recipe (suite, packages, mirrors), the
key that identifies a build's inputs, and the mmdebstrap command line that makes it (pure).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.launcher.rootfs import MOUNT_POINTS
from agent.spec import HOST_STACK, STACK

# Bumped whenever the way a recipe becomes a stack changes (hooks, options), so that stacks
# built the old way are rebuilt.
RECIPE_FORMAT = 1
DEFAULT_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
# Debian 12's release date: the stack's reproducible timestamp unless SOURCE_DATE_EPOCH is set.
DEFAULT_SOURCE_DATE_EPOCH = 1_686_355_200
VARIANT = "minbase"
# A web app's runtime, kept lean: Python with venv and pip (apps install their own packages
# with pip; the manylinux wheels of lxml, Pillow or psycopg2-binary carry their own C
# libraries), TLS roots, time zones, /etc/services and /etc/protocols, ps/top, curl, and the
# cheap runtime libraries that sdist-free packages still load from the system (libpq for
# psycopg 3, libjpeg for Pillow's system builds). Not in: a compiler, -dev headers, git and
# perl (≈ 45 MB), libxml2 (it pulls libicu, ≈ 36 MB). libssl3, zlib1g, libffi8 and
# libsqlite3-0 come with python3.
DEFAULT_PACKAGES = ("ca-certificates", "curl", "libjpeg62-turbo", "libpq5", "netbase", "procps",
                    "python3", "python3-pip", "python3-venv", "tzdata")
# Like Debian's slim container images: no manuals, documentation (its copyright files stay)
# or translations, ≈ 50 MB less. dpkg applies the last path option that matches.
DPKG_OPTIONS = ("path-exclude=/usr/share/man/*", "path-exclude=/usr/share/info/*",
                "path-exclude=/usr/share/doc/*", "path-include=/usr/share/doc/*/copyright",
                "path-exclude=/usr/share/locale/*",
                "path-include=/usr/share/locale/locale.alias",
                "path-exclude=/usr/share/lintian/*")
# Bookworm's init-system-helpers would pull in usrmerge and with it perl; mmdebstrap's hook
# merges /usr itself where the suite has usr-is-merged (and does nothing where it has not).
HOOK_DIRS = ("/usr/share/mmdebstrap/hooks/maybe-merged-usr",)
# Run on the host with the new root as $1, after every package is installed. mmdebstrap copies
# the host's /etc/resolv.conf and /etc/hostname into the root (debootstrap compatibility): a
# stack must carry nothing of the machine that built it, and the agent binds each dyno's own
# files over these. The launcher needs its mount points to be real directories.
CUSTOMIZE = "\n".join([
    "set -eu",
    'rm -f "$1/etc/resolv.conf" "$1/etc/hostname"',
    ': > "$1/etc/resolv.conf"',
    'echo localhost > "$1/etc/hostname"',
    'chmod 0644 "$1/etc/resolv.conf" "$1/etc/hostname"',
    *(f'[ -d "$1/{name}" ] && [ ! -L "$1/{name}" ] || mkdir -m 0755 "$1/{name}"'
      for name in MOUNT_POINTS),
    'chmod 0755 "$1"',
])

# Debian package names (policy §5.6.1), with an optional :arch and =version.
PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?(=[A-Za-z0-9.+~:-]+)?")
SUITE = re.compile(r"[a-z][a-z0-9-]{0,63}")
MIRROR = re.compile(r"(https?|file)://[^\s\"'\\]{1,1000}")
# Suites that have no -updates or -security companions.
ROLLING_SUITES = frozenset({"sid", "unstable", "experimental"})


class StackUsageError(ValueError):
    """A stack name, suite, package list or mirror is not acceptable (a usage error)."""


def check_name(name: str) -> str:
    if name == HOST_STACK:
        raise StackUsageError(f"{name!r} is the host's own root, not a stack that can be built "
                              "or removed; choose another name")
    if not STACK.fullmatch(name):
        raise StackUsageError(f"stack name {name!r} must match {STACK.pattern}")
    return name


def parse_packages(text: str) -> tuple[str, ...]:
    """`a,b,c` (spaces allowed) as a sorted, de-duplicated tuple."""
    names = [part.strip() for part in text.replace(" ", ",").split(",") if part.strip()]
    if not names:
        raise StackUsageError("--packages names no package")
    for name in names:
        if not PACKAGE.fullmatch(name):
            raise StackUsageError(f"not a Debian package name: {name!r}")
    return tuple(sorted(set(names)))


@dataclass(frozen=True)
class Recipe:
    """A build's inputs besides the tools: equal recipes (and tools) make equal stacks."""

    suite: str = DEFAULT_SUITE
    packages: tuple[str, ...] = DEFAULT_PACKAGES
    mirror: str = DEFAULT_MIRROR
    # None: no security updates (a mirror of the main archive only, or a rolling suite).
    security_mirror: str | None = DEFAULT_SECURITY_MIRROR
    source_date_epoch: int = DEFAULT_SOURCE_DATE_EPOCH

    def __post_init__(self) -> None:
        if not SUITE.fullmatch(self.suite):
            raise StackUsageError(f"suite {self.suite!r} must match {SUITE.pattern}")
        for mirror in (self.mirror, self.security_mirror):
            if mirror is not None and not MIRROR.fullmatch(mirror):
                raise StackUsageError(f"mirror {mirror!r} must be an http(s):// or file:// URL")
        if tuple(sorted(set(self.packages))) != self.packages:
            raise ValueError("packages must be sorted and unique (see parse_packages)")

    def sources(self) -> tuple[str, ...]:
        """The chroot's sources.list lines, in order."""
        lines = [f"deb {self.mirror} {self.suite} main"]
        if self.suite not in ROLLING_SUITES:
            lines.append(f"deb {self.mirror} {self.suite}-updates main")
            if self.security_mirror is not None:
                lines.append(f"deb {self.security_mirror} {self.suite}-security main")
        return tuple(lines)


@dataclass(frozen=True)
class Tools:
    """What on the building machine shapes the result besides the recipe."""

    mmdebstrap: str  # its version
    architecture: str  # dpkg --print-architecture


def inputs(recipe: Recipe, tools: Tools) -> dict[str, Any]:
    """Everything a build depends on, as JSON data: what the metadata records and the key
    hashes. The archive's contents are not in it: the same inputs a month later may install
    newer versions (`stack build --rebuild` takes them)."""
    return {"format": RECIPE_FORMAT, "suite": recipe.suite, "variant": VARIANT,
            "packages": list(recipe.packages), "sources": list(recipe.sources()),
            "dpkg_options": list(DPKG_OPTIONS), "hook_dirs": list(HOOK_DIRS),
            "customize": CUSTOMIZE, "source_date_epoch": recipe.source_date_epoch,
            "architecture": tools.architecture, "mmdebstrap": tools.mmdebstrap}


def input_key(data: Mapping[str, Any]) -> str:
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def mmdebstrap_argv(recipe: Recipe, target: str, *, verbose: bool = False) -> list[str]:
    """The mmdebstrap command that makes `target` (an empty directory) from `recipe`, as root."""
    argv = ["mmdebstrap", "--mode=root", f"--variant={VARIANT}", "--format=directory",
            f"--include={','.join(recipe.packages)}",
            *(f"--dpkgopt={option}" for option in DPKG_OPTIONS),
            *(f"--hook-dir={hooks}" for hooks in HOOK_DIRS),
            f"--customize-hook={CUSTOMIZE}"]
    if verbose:
        argv.append("--verbose")
    return [*argv, recipe.suite, target, *recipe.sources()]


def build_env(recipe: Recipe, base: Mapping[str, str]) -> dict[str, str]:
    """The environment of mmdebstrap: the caller's, with the reproducible timestamp and a
    fixed locale (apt's and dpkg's messages end up in files of the stack)."""
    env = {key: value for key, value in base.items()
           if key not in ("LANG", "LANGUAGE") and not key.startswith("LC_")}
    env.update(SOURCE_DATE_EPOCH=str(recipe.source_date_epoch), LC_ALL="C.UTF-8",
               DEBIAN_FRONTEND="noninteractive")
    return env


def describe(packages: Sequence[str], suite: str) -> str:
    return f"{suite}, {len(packages)} package{'s' if len(packages) != 1 else ''}"

