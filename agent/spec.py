"""The dyno spec (DESIGN §5): frozen dataclasses, the one validating parser used at every
edge (operator API, coordinator RPC, Procfile), and the environment a dyno starts with."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Literal
from urllib.parse import urlsplit

from agent.drainurl import DrainUrlError, parse_drain_list
from agent.errors import excerpt
from agent.sizes import DEFAULT_SIZE, DEFAULT_SIZES, Size

ID = re.compile(r"[a-z0-9-]{1,64}")
APP = re.compile(r"[a-z][a-z0-9-]{0,29}")
TYPE = re.compile(r"[a-z][a-z0-9_]{0,29}")
# The instance number is kept as text; no leading zero so that "web.01" and "web.1"
# cannot name two different dynos that log as the same source.
NAME = re.compile(r"(?P<type>[a-z][a-z0-9_]{0,29})\.(?P<n>[1-9][0-9]{0,9})")
ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SHA256 = re.compile(r"[0-9a-fA-F]{64}")
# A named stack is a directory under state_dir/stacks, so it must be one path component.
STACK = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")

ENV_MAX_BYTES = 32 * 1024  # Heroku: config vars are at most 32 kB per app in total.
COMMAND_MAX_BYTES = 64 * 1024
URL_MAX_CHARS = 4096
PATH_MAX_BYTES = 4096  # Linux's PATH_MAX: a longer slug path could not be opened anyway
# An unknown key is named in the error's `field` only when it looks like a key at all.
_FIELD_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")
TIMEOUT_MAX_S = 86_400
DEFAULT_PORT = 5000
HOST_STACK = "host"
# Types whose dynos run once: Heroku never restarts one-off (`run`) or release dynos.
# Build dynos (`build.<n>`) are one-shot too; only the agent's builder starts them.
BUILD_TYPE = "build"
ONE_SHOT_TYPES = frozenset({"run", "release", BUILD_TYPE})
WEB_TYPE = "web"
DEFAULT_PATH = "/app/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Heroku's DNS service discovery zone in a space: `<app>.app.localspace` and below.
DNS_APPS_ZONE = "app.localspace"

Restart = Literal["always", "never"]

_KEYS = ("id", "app", "name", "command", "env", "release", "size", "space", "restart",
         "boot_timeout_s", "stop_timeout_s", "log_drains")
_RELEASE_KEYS = ("version", "slug", "stack")


class SpecError(ValueError):
    """A dyno spec does not validate; `field` is the dotted path of the offending value."""

    def __init__(self, field: str, message: str, value: Any = None) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.value = value


class Env(Mapping[str, str]):
    """An immutable, hashable mapping of config vars (so a DynoSpec can be hashed and compared)."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str] | None = None) -> None:
        self._items: dict[str, str] = dict(items or {})

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self._items == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return f"Env({self._items!r})"


@dataclass(frozen=True, slots=True)
class SlugSource:
    """Where a release's slug comes from: a local `path` (directory or tarball), or a `url`
    whose content must have the digest `sha256` (lower-case hex)."""

    path: str | None = None
    url: str | None = None
    sha256: str | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.url is None):
            raise ValueError("a slug source has exactly one of path and url")
        if (self.url is None) != (self.sha256 is None):
            raise ValueError("a slug url comes with its sha256, and only a url does")

    def to_dict(self) -> dict[str, str]:
        if self.path is not None:
            return {"path": self.path}
        assert self.url is not None and self.sha256 is not None
        return {"url": self.url, "sha256": self.sha256}


@dataclass(frozen=True, slots=True)
class Release:
    version: int
    slug: SlugSource
    stack: str = HOST_STACK

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "slug": self.slug.to_dict(), "stack": self.stack}


@dataclass(frozen=True, slots=True)
class DynoSpec:
    id: str
    app: str
    name: str
    command: str
    env: Env
    release: Release
    size: Size
    space: str
    restart: Restart
    # None: the agent's configured default applies (`boot_timeout_s`, `stop_timeout_s`), read
    # when used, so the same body stays the same spec when the agent's defaults change.
    boot_timeout_s: int | None
    stop_timeout_s: int | None
    # The app's log drains (URLs as given, validated); a spec that names other drains is
    # another spec (the dyno is replaced, as for any field).
    log_drains: tuple[str, ...] = ()

    @property
    def type(self) -> str:
        return self.name.partition(".")[0]

    @property
    def is_web(self) -> bool:
        return self.type == WEB_TYPE

    @property
    def is_one_shot(self) -> bool:
        """A one-off or release dyno: it ends in `complete`, not a restart."""
        return self.type in ONE_SHOT_TYPES

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON-like data; `parse_spec(spec.to_dict(), sizes) == spec`."""
        data: dict[str, Any] = {
            "id": self.id,
            "app": self.app,
            "name": self.name,
            "command": self.command,
            "env": dict(self.env),
            "release": self.release.to_dict(),
            "size": self.size.name,
            "space": self.space,
            "restart": self.restart,
        }
        if self.boot_timeout_s is not None:
            data["boot_timeout_s"] = self.boot_timeout_s
        if self.stop_timeout_s is not None:
            data["stop_timeout_s"] = self.stop_timeout_s
        if self.log_drains:
            data["log_drains"] = list(self.log_drains)
        return data


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _reject_unknown(field: str, data: Mapping[Any, Any], known: tuple[str, ...]) -> None:
    for key in data:
        if key not in known:
            if isinstance(key, str) and _FIELD_KEY.fullmatch(key):
                where = f"{field}.{key}" if field else key
            else:
                where = field or "spec"
            raise SpecError(where, f"unknown key {excerpt(key)}; known keys: {', '.join(known)}",
                            key)


def _mapping(field: str, value: Any) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise SpecError(field, f"must be an object, got {_type_name(value)}", value)
    return value


def _text(field: str, value: Any, pattern: re.Pattern[str] | None = None,
          shape: str = "") -> str:
    if not isinstance(value, str):
        raise SpecError(field, f"must be a string, got {_type_name(value)}", value)
    if pattern is not None and not pattern.fullmatch(value):
        raise SpecError(field, f"must match {shape or pattern.pattern}, got {excerpt(value)}",
                        value)
    return value


def _int(field: str, value: Any, low: int, high: int) -> int:
    # JSON true/false arrive as bool, which Python treats as an int; refuse them.
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(field, f"must be an integer, got {_type_name(value)}", value)
    if not low <= value <= high:
        raise SpecError(field, f"must be between {low} and {high}, got {excerpt(value)}", value)
    return value


def _no_nul(field: str, value: str) -> str:
    # execve() takes NUL-terminated strings; a NUL would silently truncate the value.
    if "\x00" in value:
        raise SpecError(field, "must not contain a NUL character", value)
    _utf8_len(field, value)
    return value


def _utf8_len(field: str, value: str) -> int:
    # JSON can carry lone surrogates ("\ud800"), which no execve() argument can hold.
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise SpecError(field, "must be valid Unicode (no lone surrogates)", value) from None


def parse_env(value: Any, field: str = "env") -> Env:
    """Config vars (names like ENV_KEY, at most ENV_MAX_BYTES in all) found at `field`."""
    data = _mapping(field, value)
    total = 0
    for key, item in data.items():
        if not isinstance(key, str) or not ENV_KEY.fullmatch(key):
            where = (f"{field}.{key}" if isinstance(key, str) and _FIELD_KEY.fullmatch(key)
                     else field)
            raise SpecError(where, f"key {excerpt(key)} must match {ENV_KEY.pattern}", key)
        _no_nul(f"{field}.{key}", _text(f"{field}.{key}", item))
        # Encoded size: what execve copies, and how Heroku counts its 32 kB.
        total += len(key) + _utf8_len(f"{field}.{key}", item)
    if total > ENV_MAX_BYTES:
        raise SpecError(field, f"config vars total {total} bytes; the limit is {ENV_MAX_BYTES}")
    return Env(data)


def _url(value: Any, field: str) -> str:
    url = _no_nul(field, _text(field, value))
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as exc:
        raise SpecError(field, f"is not a URL: {excerpt(str(exc))}", value) from None
    if parts.scheme not in ("http", "https") or not host:
        raise SpecError(field, f"must be an http:// or https:// URL, got {excerpt(url)}", value)
    if len(url) > URL_MAX_CHARS or any(c.isspace() for c in url):
        raise SpecError(field, "must be at most 4096 characters with no spaces", value)
    return url


def parse_slug_source(value: Any, field: str = "release.slug") -> SlugSource:
    """A slug source found at `field`: {"path": ABSOLUTE} or {"url": HTTP(S), "sha256": HEX}
    (the path is checked against the slug roots elsewhere)."""
    data = _mapping(field, value)
    if "path" in data:
        _reject_unknown(field, data, ("path",))
        path = _no_nul(f"{field}.path", _text(f"{field}.path", data["path"]))
        # Relative to what? The agent's cwd is not part of any contract.
        if not PurePosixPath(path).is_absolute():
            raise SpecError(f"{field}.path", f"must be an absolute path, got {excerpt(path)}",
                            path)
        if _utf8_len(f"{field}.path", path) > PATH_MAX_BYTES:
            raise SpecError(f"{field}.path", f"must be at most {PATH_MAX_BYTES} bytes", path)
        return SlugSource(path=path)
    if "url" in data:
        _reject_unknown(field, data, ("url", "sha256"))
        url = _url(data["url"], f"{field}.url")
        if "sha256" not in data:
            raise SpecError(f"{field}.sha256", "is required with a slug url")
        digest = _text(f"{field}.sha256", data["sha256"], SHA256, "64 hex digits")
        return SlugSource(url=url, sha256=digest.lower())
    raise SpecError(field, "must have either path, or url and sha256")


def _release(value: Any) -> Release:
    data = _mapping("release", value)
    _reject_unknown("release", data, _RELEASE_KEYS)
    if "version" not in data:
        raise SpecError("release.version", "is required")
    version = _int("release.version", data["version"], 0, 2**63 - 1)
    if "slug" not in data:
        raise SpecError("release.slug", "is required")
    slug = parse_slug_source(data["slug"])
    stack = _text("release.stack", data.get("stack", HOST_STACK), STACK,
                  '"host" or a stack name matching ' + STACK.pattern)
    return Release(version, slug, stack)


def _size(value: Any, sizes: Mapping[str, Size]) -> Size:
    name = _text("size", value)
    # Heroku's CLI spells sizes "Standard-2X"; accept that spelling for the same size.
    size = sizes.get(name.lower())
    if size is None:
        raise SpecError("size", f"unknown size {excerpt(name)}; known sizes: "
                                f"{', '.join(sizes)}", value)
    return size


def parse_spec(data: Any, sizes: Mapping[str, Size] = DEFAULT_SIZES) -> DynoSpec:
    """Validate JSON-like `data` against DESIGN §5 and return the spec.

    Raises only SpecError, whose `field` names the offending value. A missing `id` is
    generated; `restart` defaults to "never" for run/release dynos, else "always".
    """
    data = _mapping("spec", data)
    _reject_unknown("", data, _KEYS)
    for required in ("app", "name", "command", "release"):
        if required not in data:
            raise SpecError(required, "is required")
    spec_id = (_text("id", data["id"], ID, "[a-z0-9-]{1,64}") if "id" in data
               else str(uuid.uuid4()))
    app = _text("app", data["app"], APP, APP.pattern)
    name = _text("name", data["name"], NAME, '"<type>.<n>" with type [a-z][a-z0-9_]{0,29}')
    command = _no_nul("command", _text("command", data["command"]))
    if not command.strip():
        raise SpecError("command", "must not be empty", command)
    if _utf8_len("command", command) > COMMAND_MAX_BYTES:
        raise SpecError("command", f"must be at most {COMMAND_MAX_BYTES} bytes")
    env = parse_env(data.get("env", {}))
    release = _release(data["release"])
    size = _size(data.get("size", DEFAULT_SIZE), sizes)
    space = _text("space", data.get("space", app), APP, APP.pattern)
    one_shot = name.partition(".")[0] in ONE_SHOT_TYPES
    restart = _text("restart", data.get("restart", "never" if one_shot else "always"))
    if restart not in ("always", "never"):
        raise SpecError("restart", f'must be "always" or "never", got {excerpt(restart)}',
                        restart)
    boot = (None if data.get("boot_timeout_s") is None
            else _int("boot_timeout_s", data["boot_timeout_s"], 1, TIMEOUT_MAX_S))
    stop = (None if data.get("stop_timeout_s") is None
            else _int("stop_timeout_s", data["stop_timeout_s"], 1, TIMEOUT_MAX_S))
    try:
        drains = tuple(d.url for d in parse_drain_list(data.get("log_drains", [])))
    except DrainUrlError as exc:
        raise SpecError("log_drains", str(exc), exc.value) from None
    return DynoSpec(id=spec_id, app=app, name=name, command=command, env=env,
                    release=release, size=size, space=space,
                    restart="always" if restart == "always" else "never",
                    boot_timeout_s=boot, stop_timeout_s=stop, log_drains=drains)


def dyno_env(spec: DynoSpec, private_ip: str, port: int = DEFAULT_PORT) -> dict[str, str]:
    """The environment a dyno's command starts with (DESIGN §5).

    Config vars first; the platform's own variables then win, except PATH, which apps
    (and buildpacks) commonly set as a config var on Heroku and expect to be honoured.
    """
    env = {"PATH": DEFAULT_PATH}
    env.update(spec.env)
    env.update({
        "DYNO": spec.name,
        "HOME": "/app",
        "DYNOAGENT_DYNO_ID": spec.id,
        "DYNOAGENT_PRIVATE_IP": private_ip,
        "HEROKU_PRIVATE_IP": private_ip,
    })
    formation, dyno, app = dns_names(spec.app, spec.name)
    env.update({"HEROKU_DNS_FORMATION_NAME": formation, "HEROKU_DNS_DYNO_NAME": dyno,
                "HEROKU_DNS_APP_NAME": app})
    if spec.is_web:
        env["PORT"] = str(port)
    else:
        # A config var named PORT must not make a worker look like it should bind.
        env.pop("PORT", None)
    return env


def dns_names(app: str, name: str) -> tuple[str, str, str]:
    """A dyno's names in its space's DNS (Heroku's service discovery), lowercase, no final
    dot: (formation `web.shop.app.localspace`, dyno `1.web.shop.app.localspace`, app
    `shop.app.localspace`) for dyno `web.1` of app `shop`."""
    process_type, _, number = name.lower().partition(".")
    app_name = f"{app.lower()}.{DNS_APPS_ZONE}"
    formation = f"{process_type}.{app_name}"
    return formation, f"{number}.{formation}", app_name
