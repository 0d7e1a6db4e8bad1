"""What the holder asks the launcher for (LaunchRequest) and what it gets back (LaunchResult)."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from agent.launcher.errors import RequestError

# The kernel limits a hostname to 64 bytes; keep to the alphabet dyno ids are made of.
_HOSTNAME = re.compile(r"^[A-Za-z0-9.-]{1,64}$")
_BIND_NAME = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
_DYNO_ID = re.compile(r"^[a-z0-9-]{1,64}$")
# Overlay options are a comma-separated string and lowerdir a colon-separated list; the
# kernel's escaping rules differ between versions, so such paths are refused outright.
_OVERLAY_UNSAFE = frozenset(",:\\\n")
# Below 64 even a shell and its dynamic loader run short; above fs.nr_open's default
# (1048576) setrlimit fails.
MIN_NOFILE = 64
DEFAULT_NOFILE = 10000
MAX_NOFILE = 1 << 20


@dataclass(frozen=True)
class LaunchRequest:
    dyno_id: str
    hostname: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    uid: int
    gid: int
    stack_dir: str
    slug_dir: str
    dyno_dir: str
    writable_limit_bytes: int
    cgroup_procs: tuple[str, ...]
    netns_path: str | None
    hide_paths: tuple[str, ...] = ()
    reaper: str = "/usr/bin/tini"
    # Show the files of the slug directory's owner as owned by the dyno user (idmapped mount,
    # Linux 5.19+ and a slug filesystem that supports idmapping: ext4, xfs, btrfs, tmpfs 6.3+).
    idmap_slug: bool = True
    # The dyno's address on its space's bridge, for its own /etc/hosts; None: taken from env's
    # DYNOAGENT_PRIVATE_IP when that is an address, else the hostname maps to 127.0.1.1.
    private_ip: str | None = None
    # Bind the dyno's own /etc/hosts, /etc/hostname, /etc/resolv.conf over the stack's.
    own_etc: bool = True
    # The space's resolver (its bridge gateway, where the agent answers `.localspace` names):
    # the only nameserver of the dyno's resolv.conf. None: the host's nameservers.
    nameserver: str | None = None
    # RLIMIT_NOFILE (soft = hard) of the app, Heroku's figure; RLIMIT_CORE is always 0.
    nofile_limit: int = DEFAULT_NOFILE
    # The dyno seccomp filter (agent.launcher.seccomp) on the app and all it starts. Always on
    # in production; off only for the benchmark's with/without comparison and its tests.
    seccomp: bool = True
    # A build dyno: this host directory is bound read-write at /app instead of the slug's
    # overlay (the build's output stays on the host), and `binds` add host directories under
    # /tmp, each (source, name, writable): /tmp/<name>. Both only ever come from the agent.
    app_dir: str | None = None
    binds: tuple[tuple[str, str, bool], ...] = ()

    def validate(self) -> None:
        """Refuse what the child could only fail on later, with a clearer message now."""
        if not _DYNO_ID.match(self.dyno_id):
            raise RequestError("dyno_id", self.dyno_id, "must match [a-z0-9-]{1,64}")
        if not _HOSTNAME.match(self.hostname):
            raise RequestError("hostname", self.hostname, "not a valid hostname")
        if not self.argv:
            raise RequestError("argv", self.argv, "empty command")
        if self.uid <= 0 or self.gid <= 0:
            raise RequestError("uid/gid", (self.uid, self.gid), "a dyno never runs as root")
        if self.writable_limit_bytes < 4096:
            raise RequestError("writable_limit_bytes", self.writable_limit_bytes,
                               "below one page")
        for key, value in self.env:
            if not key or "=" in key or "\0" in key or "\0" in value:
                raise RequestError("env", key, "names need no '=' or NUL, values no NUL")
        for field in ("stack_dir", "slug_dir", "dyno_dir", "reaper"):
            path = getattr(self, field)
            if not os.path.isabs(path):
                raise RequestError(field, path, "must be absolute")
        for field in ("stack_dir", "slug_dir", "dyno_dir"):
            path = getattr(self, field)
            if _OVERLAY_UNSAFE.intersection(path):
                raise RequestError(field, path, "',', ':', '\\' and newlines cannot be "
                                   "passed to overlayfs")
        for path in (*self.cgroup_procs, *self.hide_paths):
            if not os.path.isabs(path):
                raise RequestError("path", path, "must be absolute")
        if self.netns_path is not None and not os.path.isabs(self.netns_path):
            raise RequestError("netns_path", self.netns_path, "must be absolute")
        if self.private_ip is not None and not is_address(self.private_ip):
            raise RequestError("private_ip", self.private_ip, "not an IP address")
        if self.nameserver is not None and not is_address(self.nameserver):
            raise RequestError("nameserver", self.nameserver, "not an IP address")
        if not MIN_NOFILE <= self.nofile_limit <= MAX_NOFILE:
            raise RequestError("nofile_limit", self.nofile_limit,
                               f"must be within {MIN_NOFILE}..{MAX_NOFILE}")
        if self.app_dir is not None and not os.path.isabs(self.app_dir):
            raise RequestError("app_dir", self.app_dir, "must be absolute")
        for bind in self.binds:
            if (len(bind) != 3 or not os.path.isabs(bind[0]) or not _BIND_NAME.match(bind[1])
                    or not isinstance(bind[2], bool)):
                raise RequestError("binds", bind, "each is (absolute source, name under /tmp "
                                   "matching [a-z][a-z0-9-]*, writable as a bool)")
        # A security switch: only a real bool turns it off (0 or "" from JSON must not).
        if not isinstance(self.seccomp, bool):
            raise RequestError("seccomp", self.seccomp, "must be true or false")

    def effective_private_ip(self) -> str | None:
        """`private_ip`, else a valid DYNOAGENT_PRIVATE_IP from env (what the daemon sets)."""
        if self.private_ip is not None:
            return self.private_ip
        from_env = dict(self.env).get("DYNOAGENT_PRIVATE_IP")
        return from_env if from_env and is_address(from_env) else None


def is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class LaunchResult:
    pid: int
    start_time: int
    timings_ms: Mapping[str, float]
    # The master of the pty launched with a PtyRequest (owned by the caller), else None.
    pty_master: int | None = None
