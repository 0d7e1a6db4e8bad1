"""The agent's configuration: TOML keys, their defaults, and validation at start.

Every key is optional. Unknown keys, wrong types and impossible values are refused with a
`ConfigError` naming the key, before the agent touches anything.
"""

from __future__ import annotations

import ipaddress
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from agent.decoding import TooDeep, check_depth
from agent.drainurl import DrainUrl, DrainUrlError, parse_drain_list
from agent.errors import ConfigError, excerpt
from agent.heroku import (
    BOOT_TIMEOUT_S,
    CYCLE_BASE_S,
    HEROKU_SCHEDULE_S,
    SAMPLE_PERIOD_S,
    STOP_TIMEOUT_S,
)
from agent.sizes import DEFAULT_SIZES, Size, SizeError, apply_overrides

DEFAULT_CONFIG_PATH = Path("/etc/dynoagent/agent.toml")
# sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_COORDINATOR_URLS = 16
# Where dynoagents keep state and sockets whatever this one's config says (another agent with
# the defaults, standalone agents, the host-wide uid registry, every dyno's netns, the
# config): no slug may reach them, and dynos on the host stack do not see them.
HOST_WIDE_PATHS = (Path("/var/lib/dynoagent"), Path("/run/dynoagent"),
                   Path("/run/dynoagent-uids"), Path("/run/dynoagent-up"), Path("/run/netns"),
                   Path("/etc/dynoagent"), Path("/var/cache/dynoagent"))


@dataclass(frozen=True)
class Config:
    state_dir: Path = Path("/var/lib/dynoagent")
    run_dir: Path = Path("/run/dynoagent")
    socket: Path | None = None  # default: <run_dir>/dynoagent.sock
    socket_group: str = "dynoagent"
    cgroup_root: str = "dynoagent"
    address_pool: str = "172.20.0.0/14"
    # One URL or several (replicas of the coordinator): the agent tries them in turn.
    coordinator_url: tuple[str, ...] | None = None
    coordinator_token_file: Path | None = None
    coordinator_ca_file: Path | None = None
    # A client certificate (PEM) and its key for wss:// coordinators that require mutual TLS.
    coordinator_client_cert_file: Path | None = None
    coordinator_client_key_file: Path | None = None
    # The host's address on the network between hosts: private spaces' VXLAN tunnels end
    # there. None: the local address of the connection to the coordinator.
    overlay_address: str | None = None
    # Host-wide log drains: every app's lines (DESIGN §5 `log_drains`); their TLS is verified
    # against `log_drains_ca_file`, or the system's CAs.
    log_drains: tuple[DrainUrl, ...] = ()
    log_drains_ca_file: Path | None = None
    # Empty tuple means "none": every restart is immediate (private spaces).
    # Heroku's timings by default (agent/supervision/policy.py).
    restart_schedule_s: tuple[float, ...] = HEROKU_SCHEDULE_S
    boot_timeout_s: float = BOOT_TIMEOUT_S
    stop_timeout_s: float = STOP_TIMEOUT_S
    cycle_after_s: float = CYCLE_BASE_S
    log_level: str = "info"
    # How often memory is sampled (R14/R15) and runtime-metrics lines are logged.
    sample_interval_s: float = SAMPLE_PERIOD_S
    # How long a freed dyno uid stays out of use (it also waits until no process or key of
    # it remains); uids are unique across every agent on the host.
    uid_quarantine_s: float = 600.0
    # The default size table with the config's [sizes.NAME] tables applied.
    sizes: Mapping[str, Size] = field(default_factory=lambda: dict(DEFAULT_SIZES))
    # Directories a release's slug.path may lie under (agent/slugs/roots.py); None: the
    # default, <state_dir>/slugs.
    slug_roots: tuple[Path, ...] | None = None

    @property
    def socket_path(self) -> Path:
        return self.socket if self.socket is not None else self.run_dir / "dynoagent.sock"

    @property
    def effective_slug_roots(self) -> tuple[Path, ...]:
        if self.slug_roots is not None:
            return self.slug_roots
        return (self.state_dir / "slugs",)

    # Keys that SIGHUP may change on a running agent; the rest need a restart.
    RELOADABLE = frozenset({"log_level", "restart_schedule_s", "boot_timeout_s",
                            "stop_timeout_s", "cycle_after_s", "sizes", "sample_interval_s",
                            "coordinator_token_file"})


def _require(key: str, value: Any, kind: type | tuple[type, ...], what: str) -> None:
    # bool is an int in Python; a TOML `true` is never a valid number here.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ConfigError(key, f"must be {what}, got {excerpt(value)}")
    if not isinstance(value, kind):
        raise ConfigError(key, f"must be {what}, got {type(value).__name__} {excerpt(value)}")


def _path(key: str, value: Any) -> Path:
    _require(key, value, str, "a path string")
    if not value:
        raise ConfigError(key, "must not be empty")
    if not os.path.isabs(value):
        raise ConfigError(key, f"must be an absolute path, got {excerpt(value)}")
    return Path(value)


def _seconds(key: str, value: Any, allow_zero: bool = False) -> float:
    _require(key, value, (int, float), "a number of seconds")
    number = float(value)
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        raise ConfigError(key, f"must be a {'non-negative' if allow_zero else 'positive'} "
                               f"number of seconds, got {excerpt(value)}")
    return number


def _quarantine(key: str, value: Any) -> float:
    return _seconds(key, value, allow_zero=True)


def _schedule(key: str, value: Any) -> tuple[float, ...]:
    if value == "none":
        return ()
    if not isinstance(value, list):
        raise ConfigError(key, f'must be a list of seconds or "none", got {excerpt(value)}')
    return tuple(_seconds(f"{key}[{i}]", v, allow_zero=True) for i, v in enumerate(value))


def _identifier(key: str, value: Any) -> str:
    _require(key, value, str, "a string")
    if not value or "/" in value or value in (".", "..") or "\0" in value:
        raise ConfigError(key, f"must be a single path component, got {excerpt(value)}")
    return str(value)


def _address_pool(key: str, value: Any) -> str:
    _require(key, value, str, "a CIDR string")
    try:
        net = ipaddress.IPv4Network(value, strict=True)
    except ValueError as exc:
        raise ConfigError(key, f"must be an IPv4 CIDR such as 172.20.0.0/14: {exc}") from None
    if net.prefixlen > 24:
        raise ConfigError(key, f"must hold at least one /24 (one per space), got /{net.prefixlen}")
    return str(net)


def _coordinator_url(key: str, value: Any) -> tuple[str, ...]:
    """One ws:// or wss:// URL, or several: an array, or one string with commas between."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",")]
    _require(key, value, list, "a ws:// or wss:// URL, or an array of them")
    if not value or len(value) > MAX_COORDINATOR_URLS:
        raise ConfigError(key, f"must hold 1 to {MAX_COORDINATOR_URLS} URLs, got {len(value)}")
    for url in value:
        _require(key, url, str, "a ws:// or wss:// URL")
        if not url.startswith(("ws://", "wss://")):
            raise ConfigError(key, f"must start with ws:// or wss://, got {excerpt(url)}")
    return tuple(value)


def _overlay_address(key: str, value: Any) -> str:
    _require(key, value, str, "an IPv4 address")
    try:
        address = ipaddress.IPv4Address(value)
    except ValueError:
        raise ConfigError(key, f"must be an IPv4 address, got {excerpt(value)}") from None
    if address.is_loopback or address.is_multicast or address.is_unspecified:
        raise ConfigError(key, f"must be a unicast address other hosts can reach, got {address}")
    return str(address)


def _log_drains(key: str, value: Any) -> tuple[DrainUrl, ...]:
    try:
        return parse_drain_list(value)
    except DrainUrlError as exc:
        raise ConfigError(key, str(exc)) from None


def _sizes(key: str, value: Any) -> Mapping[str, Size]:
    _require(key, value, dict, "a table of [sizes.NAME] tables")
    try:
        return apply_overrides(DEFAULT_SIZES, value)
    except SizeError as exc:
        raise ConfigError(exc.key, exc.message) from None


def _socket(key: str, value: Any) -> Path:
    path = _path(key, value)
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(key, f"is {len(os.fsencode(path))} bytes; a Unix socket path may "
                               f"have at most {MAX_SOCKET_PATH_BYTES}")
    return path


def _path_list(key: str, value: Any) -> tuple[Path, ...]:
    if not isinstance(value, list):
        raise ConfigError(key, f"must be a list of absolute paths, got {excerpt(value)}")
    return tuple(_path(f"{key}[{i}]", item) for i, item in enumerate(value))


def _log_level(key: str, value: Any) -> str:
    _require(key, value, str, "a string")
    if value.lower() not in LOG_LEVELS:
        raise ConfigError(key, f"must be one of {', '.join(LOG_LEVELS)}, got {excerpt(value)}")
    return str(value.lower())


_PARSERS: dict[str, Any] = {
    "state_dir": _path,
    "run_dir": _path,
    "socket": _socket,
    "socket_group": _identifier,
    "cgroup_root": _identifier,
    "address_pool": _address_pool,
    "coordinator_url": _coordinator_url,
    "coordinator_token_file": _path,
    "coordinator_ca_file": _path,
    "coordinator_client_cert_file": _path,
    "overlay_address": _overlay_address,
    "log_drains": _log_drains,
    "log_drains_ca_file": _path,
    "coordinator_client_key_file": _path,
    "restart_schedule_s": _schedule,
    "boot_timeout_s": _seconds,
    "stop_timeout_s": _seconds,
    "cycle_after_s": _seconds,
    "log_level": _log_level,
    "sample_interval_s": _seconds,
    "uid_quarantine_s": _quarantine,
    "sizes": _sizes,
    "slug_roots": _path_list,
}
assert set(_PARSERS) == {f.name for f in fields(Config)}


def from_mapping(data: Mapping[str, Any]) -> Config:
    """Validate a parsed TOML document into a Config; the first bad key raises ConfigError."""
    values: dict[str, Any] = {}
    for key, value in data.items():
        parser = _PARSERS.get(key)
        if parser is None:
            known = ", ".join(sorted(_PARSERS))
            raise ConfigError(key, f"unknown key (known keys: {known})")
        values[key] = parser(key, value)
    config = replace(Config(), **values)
    if config.socket is None and len(os.fsencode(config.socket_path)) > MAX_SOCKET_PATH_BYTES:
        raise ConfigError("run_dir", f"is too long for the default socket {config.socket_path}")
    if config.coordinator_url is not None and config.coordinator_token_file is None:
        raise ConfigError("coordinator_token_file", "is required when coordinator_url is set")
    if (config.coordinator_client_key_file is not None
            and config.coordinator_client_cert_file is None):
        raise ConfigError("coordinator_client_key_file",
                          "needs coordinator_client_cert_file (the certificate it belongs to)")
    return config


def load(path: Path | None) -> Config:
    """Read the config file; a missing default file means built-in defaults."""
    explicit = path is not None or "DYNOAGENT_CONFIG" in os.environ
    chosen = path or Path(os.environ.get("DYNOAGENT_CONFIG", DEFAULT_CONFIG_PATH))
    try:
        raw = chosen.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise ConfigError("--config", f"{chosen} does not exist") from None
        return Config()
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {chosen}: {exc.strerror}") from None
    try:
        # tomllib recurses into inline arrays and tables: a deep one is a RecursionError.
        data = check_depth(tomllib.loads(raw.decode("utf-8")))
    except (TooDeep, RecursionError):
        raise ConfigError("--config", f"{chosen} is not a usable config: {TooDeep()}") \
            from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError("--config", f"{chosen} is not valid TOML: {exc}") from None
    return from_mapping(data)


def reload_changes(old: Config, new: Config) -> tuple[Config, list[str]]:
    """What SIGHUP applies: reloadable keys from `new`; the names of keys it had to ignore."""
    ignored = [f.name for f in fields(Config)
               if f.name not in Config.RELOADABLE and getattr(old, f.name) != getattr(new, f.name)]
    applied = {name: getattr(new, name) for name in Config.RELOADABLE}
    return replace(old, **applied), ignored
