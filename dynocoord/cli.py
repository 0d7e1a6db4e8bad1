"""`dynocoord`: the people's command line of the fleet coordinator — Heroku's verbs against the
platform API of DESIGN §9 — and `serve`, which runs the coordinator itself (dynocoord.server).

The client half imports no aiohttp and nothing of the coordinator: people type it all day, so,
like dynoctl, it speaks HTTP/1.1 with the standard library's http.client (Python starts and
parses the command in about a tenth of a second; importing aiohttp alone takes half a second).
Every argument is checked before the first request, so bad input never reaches the coordinator.
"""

from __future__ import annotations

import argparse
import codecs
import http.client
import importlib
import json
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from agent.cli.dynoctl import drop_stdout, dyno_order, dyno_type, since_text, text_lines
from agent.drainurl import DrainUrlError, parse_drain_url
from agent.sizes import DEFAULT_SIZE, DEFAULT_SIZES, display_name
from agent.spec import (
    ENV_KEY,
    ID,
    NAME,
    ONE_SHOT_TYPES,
    SHA256,
    STACK,
    TYPE,
    SpecError,
    parse_slug_source,
)
from dynocoord.model import APP_NAME, APP_SHAPE, HOST_ID, QUANTITY_MAX

# Loopback by default, so a token is never sent across a network unless someone names a host;
# 7500 is clear of etcd (2379/2380), the agent's router and dynos' $PORT (5000 and up), and
# `dynocoord serve` listens there unless told otherwise.
DEFAULT_PORT = 7500
DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_PORT}"
REQUEST_TIMEOUT_S = 30.0
LOGS_TAIL_DEFAULT = 100  # `heroku logs` shows the last 100 lines unless told -n
# `run` attaches after the dyno was created; its first lines may be out already. A new
# dyno's whole history is far below this.
RUN_TAIL = 10_000
STREAM_READ_BYTES = 256 * 1024
ONE_OFF_TYPES = ("run", "release")  # shown apart, as `heroku ps` shows one-off dynos
TOKEN_HINT = "bad or missing token (--token-file or $DYNOCOORD_TOKEN)"
# A log line of DESIGN §6: `<time> <source>[<dyno>]: <text>`.
_LOG_LINE = re.compile(r"\S+ (?P<source>[a-z]+)\[(?P<dyno>[^\]]+)\]: (?P<text>.*)")
_EXITED = re.compile(r"Process exited with status (?P<status>-?[0-9]+)")
_ENDED = re.compile(r"State changed from \S+ to (?:complete|crashed|down)")
_SERVER_MODULE = "dynocoord.server"


class CliError(Exception):
    """A failure to report as one line on stderr with exit status 1.

    `code` is the coordinator's error code (`not_found`, …) when it answered with one.
    """

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(" ".join(message.split()))  # one line, whatever the server said
        self.code = code


# -- the HTTP client ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Endpoint:
    """One coordinator URL, taken apart once."""

    url: str
    https: bool
    host: str
    port: int
    base_path: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise CliError(f"bad coordinator URL {url!r}: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CliError(f"bad coordinator URL {url!r}: expected http://HOST[:PORT] or "
                           "https://HOST[:PORT]")
        if parts.query or parts.fragment:
            raise CliError(f"bad coordinator URL {url!r}: no query or fragment, please")
        https = parts.scheme == "https"
        return cls(url.rstrip("/"), https, parts.hostname,
                   port if port is not None else (443 if https else 80),
                   parts.path.rstrip("/"))


def parse_coordinators(text: str) -> list[Endpoint]:
    """`URL[,URL…]`: the replicas of an HA coordinator, tried in order."""
    urls = [u.strip() for u in text.split(",") if u.strip()]
    if not urls:
        raise CliError("no coordinator URL given (--coordinator or $DYNOCOORD_URL)")
    return [Endpoint.parse(u) for u in urls]


def _url(path: str, query: Mapping[str, Any] | None) -> str:
    params = {k: (1 if v is True else v) for k, v in (query or {}).items()
              if v is not None and v is not False}
    return f"{path}?{urlencode(params)}" if params else path


def _error_of(status: int, reason: str, raw: bytes, url: str) -> CliError:
    if status == 401:
        return CliError(TOKEN_HINT, "unauthorized")
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return CliError(f"the coordinator at {url} answered {status} {reason}")
    code = str(error.get("code") or status)
    return CliError(f"{error['message']} ({code})", code)


class Client:
    """The platform API: one connection per request, over the first endpoint that answers.

    A replica that cannot be reached, or answers 503 (not the leader, or no etcd), passes the
    request to the next. Nothing else is retried: a request that may have been acted on is
    never sent twice.
    """

    def __init__(self, endpoints: list[Endpoint], token: str | None,
                 ca_file: str | None = None, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.endpoints = endpoints
        self.token = token
        self.ca_file = ca_file
        self.timeout_s = timeout_s

    def _connection(self, endpoint: Endpoint) -> http.client.HTTPConnection:
        if not endpoint.https:
            return http.client.HTTPConnection(endpoint.host, endpoint.port,
                                              timeout=self.timeout_s)
        import ssl  # only for https: it costs start-up time that http:// need not pay

        context = ssl.create_default_context(cafile=self.ca_file)
        return http.client.HTTPSConnection(endpoint.host, endpoint.port,
                                           timeout=self.timeout_s, context=context)

    def _headers(self, has_body: bool) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if has_body:
            headers["Content-Type"] = "application/json"
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _open(self, method: str, path: str, body: Any, query: Mapping[str, Any] | None
              ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse, Endpoint]:
        """Send one request; the caller reads the response and closes the connection."""
        payload = None if body is None else json.dumps(body).encode()
        failures: list[str] = []
        for index, endpoint in enumerate(self.endpoints):
            last = index == len(self.endpoints) - 1
            conn = self._connection(endpoint)
            try:
                conn.connect()
            except OSError as exc:
                conn.close()
                failures.append(f"{endpoint.url}: {exc.strerror or exc or type(exc).__name__}")
                continue
            try:
                conn.request(method, endpoint.base_path + _url(path, query), body=payload,
                             headers=self._headers(payload is not None))
                response = conn.getresponse()
            except OSError as exc:
                conn.close()
                raise CliError(f"the connection to the coordinator at {endpoint.url} broke: "
                               f"{exc.strerror or exc}") from None
            except http.client.HTTPException as exc:
                conn.close()
                raise CliError(f"bad answer from the coordinator at {endpoint.url}: "
                               f"{exc!r}") from None
            if response.status == 503 and not last:
                failures.append(f"{endpoint.url}: 503 {response.reason}")
                conn.close()
                continue
            return conn, response, endpoint
        if len(failures) == 1:
            url, _, reason = failures[0].partition(": ")
            raise CliError(f"cannot reach the coordinator at {url}: {reason} (is `dynocoord "
                           "serve` running there? --coordinator or $DYNOCOORD_URL)")
        raise CliError(f"cannot reach a coordinator: {'; '.join(failures)}")

    def request(self, method: str, path: str, body: Any = None,
                query: Mapping[str, Any] | None = None) -> Any:
        conn, response, endpoint = self._open(method, path, body, query)
        try:
            try:
                raw = response.read()
            except (OSError, http.client.HTTPException) as exc:
                raise CliError(f"the answer of the coordinator at {endpoint.url} broke off: "
                               f"{exc!r}") from None
        finally:
            conn.close()
        if response.status >= 400:
            raise _error_of(response.status, response.reason, raw, endpoint.url)
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise CliError(f"the coordinator at {endpoint.url} answered {response.status} "
                           "with non-JSON data") from None

    def chunks(self, path: str, query: Mapping[str, Any] | None = None,
               follow: bool = False) -> Iterator[bytes]:
        """The body of a GET, piece by piece as the coordinator writes it (a followed stream
        has no end until the coordinator closes it, so then there is no read timeout)."""
        conn, response, endpoint = self._open("GET", path, None, query)
        try:
            if response.status >= 400:
                raise _error_of(response.status, response.reason, response.read(),
                                endpoint.url)
            if follow and conn.sock is not None:
                conn.sock.settimeout(None)
            # read1 returns what one chunk holds without waiting for more: shown at once.
            while chunk := response.read1(STREAM_READ_BYTES):
                yield chunk
        except (OSError, http.client.HTTPException) as exc:
            raise CliError(f"the stream from the coordinator at {endpoint.url} broke off: "
                           f"{exc!r}") from None
        finally:
            conn.close()

    def lines(self, path: str, query: Mapping[str, Any] | None = None,
              follow: bool = False) -> Iterator[str]:
        """The body of a GET as text lines, each as soon as it is complete."""
        return text_lines(self.chunks(path, query, follow))


# -- input, checked before any request ---------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ScaleItem:
    """One `TYPE=N[:SIZE]` (ps:scale) or `TYPE=SIZE` (ps:type)."""

    type: str
    quantity: int | None
    size: str | None

    def body(self) -> dict[str, Any]:
        change: dict[str, Any] = {}
        if self.quantity is not None:
            change["quantity"] = self.quantity
        if self.size is not None:
            change["size"] = self.size
        return change


def _process_type(text: str, what: str) -> str:
    if not TYPE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"process type {text!r} in {what} must match "
                                         f"{TYPE.pattern}")
    return text


def _formation_type(text: str, what: str) -> str:
    _process_type(text, what)
    if text in ONE_SHOT_TYPES:
        raise argparse.ArgumentTypeError(f"{text!r} dynos are one-off, never part of a "
                                         f"formation ({what})")
    return text


def _size_name(text: str, what: str) -> str:
    # Heroku's CLI spells sizes "Standard-2X"; the API's names are lower case.
    if text.lower() not in DEFAULT_SIZES:
        raise argparse.ArgumentTypeError(f"unknown size {text!r} in {what}; known sizes: "
                                         f"{', '.join(DEFAULT_SIZES)}")
    return text.lower()


def _quantity(text: str, what: str) -> int:
    # ASCII digits only: int() also reads other scripts' digits and "1_000".
    if not (text.isascii() and text.isdigit()) or len(text) > 6 or int(text) > QUANTITY_MAX:
        raise argparse.ArgumentTypeError(f"the quantity in {what} must be a number from 0 to "
                                         f"{QUANTITY_MAX}")
    return int(text, 10)


def scale_item(text: str) -> ScaleItem:
    """`web=3`, `web=3:standard-2x` (ps:scale)."""
    kind, sep, rest = text.partition("=")
    if not sep or not rest:
        raise argparse.ArgumentTypeError(f"expected TYPE=N[:SIZE], got {text!r}")
    quantity, colon, size = rest.partition(":")
    if colon and not size:
        raise argparse.ArgumentTypeError(f"no size after ':' in {text!r}")
    return ScaleItem(_formation_type(kind, text), _quantity(quantity, text),
                     _size_name(size, text) if colon else None)


def type_item(text: str) -> ScaleItem:
    """`web=standard-2x` (ps:type)."""
    kind, sep, size = text.partition("=")
    if not sep or not size:
        raise argparse.ArgumentTypeError(f"expected TYPE=SIZE, got {text!r}")
    return ScaleItem(_formation_type(kind, text), None, _size_name(size, text))


def config_var(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    config_key(key)
    if "\x00" in value:
        raise argparse.ArgumentTypeError(f"the value of {key} contains a NUL character")
    return key, value


def config_key(text: str) -> str:
    if not ENV_KEY.fullmatch(text):
        raise argparse.ArgumentTypeError(f"config var name {text!r} must match "
                                         f"{ENV_KEY.pattern}")
    return text


def process_entry(text: str) -> tuple[str, str]:
    """`--process web='python server.py'`: a process type and its command."""
    kind, sep, command = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected TYPE=COMMAND, got {text!r}")
    _process_type(kind, text)
    if kind in ("run", "build"):
        raise argparse.ArgumentTypeError(f"{kind!r} is reserved for one-off and build dynos")
    if not command.strip() or "\x00" in command:
        raise argparse.ArgumentTypeError(f"the command of {kind} must be non-empty, with no "
                                         "NUL character")
    return kind, command


def stack_name(text: str) -> str:
    if not STACK.fullmatch(text):
        raise argparse.ArgumentTypeError(f"stack name {text!r} must match {STACK.pattern}")
    return text


def size_option(text: str) -> str:
    return _size_name(text, "--size")


def host_id(text: str) -> str:
    if not HOST_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(f"host id {text!r} must match {HOST_ID.pattern}")
    return text


def dyno_ref(text: str) -> str:
    """`--dyno`: a dyno name (web.1), a process type (web: all of them) or a dyno id."""
    if not (NAME.fullmatch(text) or TYPE.fullmatch(text) or ID.fullmatch(text)):
        raise argparse.ArgumentTypeError(f"not a dyno name, process type or id: {text!r}")
    return text


def non_negative(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 9:
        raise argparse.ArgumentTypeError(f"not a number of 0 or more: {text!r}")
    return int(text, 10)


def slug_body(slug: str, sha256: str | None) -> dict[str, str]:
    """`--slug PATH|URL [--sha256 HEX]` as the API's slug source. A path is where the agents
    find the slug on their hosts; a relative one is taken from here, made absolute."""
    scheme, sep, _ = slug.partition("://")
    if sep and scheme.lower() not in ("http", "https"):
        raise CliError(f"a slug URL must be http:// or https://, got {slug!r}")
    if sep:
        if sha256 is None:
            raise CliError("a slug URL needs its digest: --sha256 HEX")
        data = {"url": slug, "sha256": sha256}
    else:
        if sha256 is not None:
            raise CliError("--sha256 goes with a slug URL; a slug path has none")
        data = {"path": os.path.abspath(slug)}
    try:
        return parse_slug_source(data, "--slug").to_dict()
    except SpecError as exc:
        raise CliError(f"{exc.field}: {exc.message}") from None


def _command_text(argv: list[str]) -> str:
    args = argv[1:] if argv[:1] == ["--"] else argv
    if not args:
        raise CliError("no command given: dynocoord run [OPTIONS] -- COMMAND")
    # One argument is a shell command line as written (`run "python3 -V"`); several are
    # words, quoted so that the dyno's /bin/sh -c sees them as given.
    return args[0] if len(args) == 1 else shlex.join(args)


def _app_name(args: argparse.Namespace) -> str:
    app = args.app or os.environ.get("DYNOCOORD_APP")
    if not app:
        raise CliError("no app given: -a APP or $DYNOCOORD_APP")
    if not APP_NAME.fullmatch(app):
        raise CliError(f"app name {app!r} must be {APP_SHAPE}")
    return str(app)


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise CliError(f"cannot read the token file {args.token_file}: {reason}") from None
        if not token:
            raise CliError(f"the token file {args.token_file} is empty")
        return token
    return os.environ.get("DYNOCOORD_TOKEN") or None


# -- formatting ---------------------------------------------------------------------------------

def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _dicts(data: Any, what: str) -> list[dict[str, Any]]:
    if not isinstance(data, list):
        raise CliError(f"the coordinator answered {what} that is not a list")
    return [item for item in data if isinstance(item, dict)]


def _size_text(value: Any) -> str:
    return display_name(value) if isinstance(value, str) and value else "?"


def _type_rank(kind: str) -> tuple[int, str]:
    # Formation types first with web on top, one-off processes last, as `heroku ps` does.
    return (2 if kind in ONE_OFF_TYPES else (0 if kind == "web" else 1), kind)


def format_ps(dynos: list[dict[str, Any]]) -> list[str]:
    """`heroku ps`: a `=== type (Size): command (N)` block per (type, size, command), each
    dyno with where it runs: `web.1: up 2026/12/02 20:15:00 +0000 (~ 3m ago) on HOST IP`."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for dyno in dynos:
        key = (dyno_type(dyno), _size_text(dyno.get("size")), str(dyno.get("command") or ""))
        groups.setdefault(key, []).append(dyno)
    out: list[str] = []
    for key in sorted(groups, key=lambda k: (*_type_rank(k[0]), k[1], k[2])):
        kind, size, command = key
        members = sorted(groups[key], key=dyno_order)
        if out:
            out.append("")
        one_off = kind in ONE_OFF_TYPES
        if one_off:
            out.append(f"=== {kind}: one-off processes ({len(members)})")
        else:
            out.append(f"=== {kind} ({size})" + (f": {command}" if command else "")
                       + f" ({len(members)})")
        for dyno in members:
            status = " ".join(part for part in (
                str(dyno.get("state", "?")), since_text(dyno.get("since")),
                _where(dyno)) if part)
            name = dyno.get("name", "?")
            if one_off:
                out.append(f"{name} ({size}): {status}" + (f": {command}" if command else ""))
            else:
                out.append(f"{name}: {status}")
    return out


def _where(dyno: dict[str, Any]) -> str:
    host, ip = dyno.get("host"), dyno.get("ip")
    if not host:
        return ""
    return f"on {host}" + (f" {ip}" if ip else "")


def _formation(data: Any) -> list[dict[str, Any]]:
    return sorted(_dicts(data, "a formation"), key=lambda e: _type_rank(str(e.get("type"))))


def _formation_line(entries: list[dict[str, Any]], sep: str, joiner: str) -> str:
    return joiner.join(f"{e.get('type')}{sep}{e.get('quantity')}:{_size_text(e.get('size'))}"
                       for e in entries)


def format_table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    """dynoctl's tables: upper-case headers, columns two spaces apart."""
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in table]


def format_key_values(pairs: list[tuple[str, str]]) -> list[str]:
    """`KEY: value` with the values aligned, as `heroku config` and `apps:info` print them."""
    width = max((len(k) for k, _ in pairs), default=0) + 1
    return [f"{key + ':':<{width}} {value}" for key, value in pairs]


def _gib(value: Any) -> str:
    return f"{value / 2**30:.1f} GiB" if isinstance(value, int | float) else "-"


def format_hosts(hosts: list[dict[str, Any]]) -> list[str]:
    rows = []
    for host in sorted(hosts, key=lambda h: str(h.get("id"))):
        dynos = host.get("dynos")
        count = len(dynos) if isinstance(dynos, list) else dynos
        raw_capacity = host.get("capacity")
        capacity: dict[str, Any] = raw_capacity if isinstance(raw_capacity, dict) else {}
        raw_labels = host.get("labels")
        labels = (",".join(f"{k}={v}" for k, v in sorted(raw_labels.items()))
                  if isinstance(raw_labels, dict) else "")
        rows.append((str(host.get("id", "?")), str(host.get("host", "?")),
                     str(host.get("state", "?")), "-" if count is None else str(count),
                     str(capacity.get("cpus", "-")), _gib(capacity.get("memory_bytes")),
                     labels or "-"))
    return format_table(("ID", "HOST", "STATE", "DYNOS", "CPUS", "MEMORY", "LABELS"), rows)


def _names(keys: list[str]) -> str:
    return ", ".join(keys)


def _release_description(release: dict[str, Any], previous: dict[str, Any] | None) -> str:
    """What a release changed, as `heroku releases` says it, when the coordinator does not
    say it itself: a new slug is a deploy, the same slug with other config vars a config
    change."""
    given = release.get("description")
    if isinstance(given, str) and given:
        return given
    slug = release.get("slug")
    slug_text = ""
    if isinstance(slug, dict):
        digest, path = slug.get("sha256"), slug.get("path")
        slug_text = str(digest)[:12] if digest else os.path.basename(str(path or ""))
    if previous is None or previous.get("slug") != slug:
        return f"Deploy {slug_text}".rstrip()
    env, before = release.get("env"), previous.get("env")
    if isinstance(env, dict) and isinstance(before, dict):
        changed = sorted(k for k in env if before.get(k) != env[k])
        removed = sorted(k for k in before if k not in env)
        parts = ([f"Set {_names(changed)} config vars"] if changed else []) + (
            [f"Remove {_names(removed)} config vars"] if removed else [])
        if parts:
            return ", ".join(parts)
    return "Release"


def format_releases(app: str, releases: list[dict[str, Any]]) -> list[str]:
    ordered = sorted((r for r in releases if isinstance(r.get("version"), int)),
                     key=lambda r: int(r["version"]))
    if not ordered:
        return [f"=== {app} Releases", "No releases yet."]
    rows = []
    for index, release in enumerate(ordered):
        previous = ordered[index - 1] if index else None
        rows.append((f"v{release['version']}", _release_description(release, previous),
                     since_text(release.get("created"))))
    lines = [f"=== {app} Releases - Current: v{ordered[-1]['version']}"]
    return lines + format_table(("", "", ""), rows[::-1])[1:]


# -- commands ----------------------------------------------------------------------------------

def _app_path(app: str, *rest: str) -> str:
    return "/".join([f"/v1/apps/{quote(app, safe='')}", *rest])


def _progress(text: str, args: argparse.Namespace) -> None:
    if not getattr(args, "json", False):
        print(f"{text}... ", end="", flush=True)


def _request_with_progress(client: Client, args: argparse.Namespace, text: str, method: str,
                           path: str, body: Any = None) -> Any:
    """Heroku's `Doing it... done`: the first half before the request, `failed` if it fails."""
    _progress(text, args)
    try:
        return client.request(method, path, body=body)
    except CliError:
        if not getattr(args, "json", False):
            print("failed", flush=True)
        raise


def cmd_apps(client: Client, args: argparse.Namespace) -> int:
    apps = _dicts(client.request("GET", "/v1/apps"), "an app listing")
    if args.json:
        _print_json(apps)
    elif not apps:
        print("You have no apps.")
    else:
        print("\n".join(["=== Apps", *sorted(str(a.get("name", "?")) for a in apps)]))
    return 0


def cmd_apps_create(client: Client, args: argparse.Namespace) -> int:
    result = _request_with_progress(client, args, f"Creating {args.name}", "POST", "/v1/apps",
                                    {"name": args.name})
    if args.json:
        _print_json(result)
    else:
        print("done")
    return 0


def cmd_apps_info(client: Client, args: argparse.Namespace) -> int:
    app = client.request("GET", _app_path(args.app_name))
    if args.json:
        _print_json(app)
        return 0
    info: dict[str, Any] = app if isinstance(app, dict) else {}
    rows: list[tuple[str, str]] = [("Name", str(info.get("name", args.app_name)))]
    if info.get("created"):
        rows.append(("Created", since_text(info["created"]) or str(info["created"])))
    release = info.get("release")
    if isinstance(release, dict):
        release = release.get("version")
    rows.append(("Release", f"v{release}" if release is not None else "none yet"))
    if info.get("stack"):
        rows.append(("Stack", str(info["stack"])))
    if "formation" in info:
        entries = _formation(info["formation"])
        rows.append(("Dynos", _formation_line(entries, ": ", ", ") or "none"))
    space = info.get("space")
    if isinstance(space, dict) and space.get("subnet"):
        rows.append(("Space", f"{space['subnet']} (VNI {space.get('vni')}, "
                              f"{len(space.get('slices') or {})} hosts)"))
    print("\n".join([f"=== {rows[0][1]}", *format_key_values(rows[1:])]))
    return 0


def cmd_apps_destroy(client: Client, args: argparse.Namespace) -> int:
    app = args.app_name
    if args.confirm is None:
        raise CliError(f"this destroys {app} and every dyno it runs; to proceed, type "
                       f"dynocoord apps:destroy -a {app} --confirm {app}")
    if args.confirm != app:
        raise CliError(f"--confirm {args.confirm} does not match the app {app}")
    _request_with_progress(client, args, f"Destroying {app}", "DELETE", _app_path(app))
    print("done")
    return 0


def cmd_releases(client: Client, args: argparse.Namespace) -> int:
    releases = _dicts(client.request("GET", _app_path(args.app_name, "releases")),
                      "a release listing")
    if args.json:
        _print_json(releases)
    else:
        print("\n".join(format_releases(args.app_name, releases)))
    return 0


def cmd_releases_create(client: Client, args: argparse.Namespace) -> int:
    process_types: dict[str, str] = {}
    for kind, command in args.process:
        if kind in process_types:
            raise CliError(f"--process {kind}=… is given twice")
        process_types[kind] = command
    body = {"slug": slug_body(args.slug, args.sha256), "stack": args.stack,
            "process_types": process_types, "env": dict(args.env)}
    result = _request_with_progress(client, args, f"Releasing {args.app_name}", "POST",
                                    _app_path(args.app_name, "releases"), body)
    if args.json:
        _print_json(result)
    else:
        version = result.get("version") if isinstance(result, dict) else None
        print("done" + (f", v{version}" if version is not None else ""))
    return 0


def cmd_config(client: Client, args: argparse.Namespace) -> int:
    config = client.request("GET", _app_path(args.app_name, "config"))
    if not isinstance(config, dict):
        raise CliError("the coordinator answered config vars that are not an object")
    if args.json:
        _print_json(config)
    elif args.shell:
        for key in sorted(config):
            print(f"{key}={shlex.quote(str(config[key]))}")
    else:
        pairs = [(str(k), str(config[k])) for k in sorted(config)]
        print("\n".join([f"=== {args.app_name} Config Vars", *format_key_values(pairs)]))
    return 0


def _patch_config(client: Client, args: argparse.Namespace, body: dict[str, str | None],
                  verb: str) -> Any:
    text = f"{verb} {_names(list(body))} and restarting {args.app_name}"
    result = _request_with_progress(client, args, text, "PATCH",
                                    _app_path(args.app_name, "config"), body)
    version = result.get("version") if isinstance(result, dict) else None
    print("done" + (f", v{version}" if version is not None else ""))
    return result


def cmd_config_set(client: Client, args: argparse.Namespace) -> int:
    body: dict[str, str | None] = dict(args.vars)
    _patch_config(client, args, body, "Setting")
    print("\n".join(format_key_values([(k, str(v)) for k, v in body.items()])))
    return 0


def cmd_config_unset(client: Client, args: argparse.Namespace) -> int:
    _patch_config(client, args, dict.fromkeys(args.keys), "Unsetting")
    return 0


def cmd_ps(client: Client, args: argparse.Namespace) -> int:
    dynos = _dicts(client.request("GET", _app_path(args.app_name, "dynos")), "a dyno listing")
    if args.json:
        _print_json(dynos)
    elif not dynos:
        print(f"No dynos on {args.app_name}")
    else:
        print("\n".join(format_ps(dynos)))
    return 0


def _items_body(items: list[ScaleItem]) -> dict[str, dict[str, Any]]:
    body: dict[str, dict[str, Any]] = {}
    for item in items:
        if item.type in body:
            raise CliError(f"process type {item.type} is given twice")
        body[item.type] = item.body()
    return body


def cmd_ps_scale(client: Client, args: argparse.Namespace) -> int:
    path = _app_path(args.app_name, "formation")
    if not args.items:
        entries = _formation(client.request("GET", path))
        if args.json:
            _print_json(entries)
        else:
            print(_formation_line(entries, "=", " ") or "No process types.")
        return 0
    body = _items_body(args.items)
    result = _request_with_progress(client, args, "Scaling dynos", "PATCH", path, body)
    if args.json:
        _print_json(result)
    else:
        changed = [e for e in _formation(result) if e.get("type") in body]
        print(f"done, now running {_formation_line(changed, ' at ', ', ')}")
    return 0


def cmd_ps_type(client: Client, args: argparse.Namespace) -> int:
    path = _app_path(args.app_name, "formation")
    if args.items:
        result = _request_with_progress(client, args, f"Scaling dynos on {args.app_name}",
                                        "PATCH", path, _items_body(args.items))
        if not args.json:
            print("done")
    else:
        result = client.request("GET", path)
    entries = _formation(result)
    if args.json:
        _print_json(entries)
    else:
        rows = [(str(e.get("type")), _size_text(e.get("size")), str(e.get("quantity")))
                for e in entries]
        print("\n".join(["=== Dyno Types", *format_table(("TYPE", "SIZE", "QTY"), rows)]))
    return 0


def cmd_run(client: Client, args: argparse.Namespace) -> int:
    command = _command_text(args.command)
    body: dict[str, Any] = {"command": command}
    if args.size is not None:
        body["size"] = args.size
    announce = sys.stdout if args.detached else sys.stderr
    print(f"Running `{command}` on {args.app_name}... ", end="", file=announce, flush=True)
    try:
        dyno = client.request("POST", _app_path(args.app_name, "dynos"), body=body)
    except CliError:
        print("failed", file=announce, flush=True)
        raise
    if not isinstance(dyno, dict) or not isinstance(dyno.get("name"), str):
        print("failed", file=announce, flush=True)
        raise CliError("the coordinator answered a one-off dyno without a name")
    name = dyno["name"]
    size = _size_text(dyno.get("size") or DEFAULT_SIZE)
    print(f"{dyno.get('state', 'starting')}, {name} ({size})", file=announce, flush=True)
    if args.detached:
        print(f"Run dynocoord logs -a {args.app_name} --dyno {name} to view the output.")
        return 0
    # By id where the coordinator gave one: a name like run.1 comes back for later one-offs.
    ref = dyno.get("id") if isinstance(dyno.get("id"), str) else name
    try:
        return follow_one_off(client, args.app_name, name, str(ref))
    except KeyboardInterrupt:
        # The API has no way to signal the dyno: say that it goes on without us.
        print(f"\ndynocoord: stopped following {name}; it keeps running (dynocoord ps -a "
              f"{args.app_name})", file=sys.stderr)
        return 130


def follow_one_off(client: Client, app: str, name: str, ref: str) -> int:
    """Relay the output of a one-off dyno until it has ended; its exit status.

    The dyno's own lines (`app[run.1]: …`) go to stdout without their prefix, as `heroku
    run` shows them; platform lines are only read, for `Process exited with status N` and
    the state change that ends the dyno. A stream that ends first is an error: the dyno
    may still be running.
    """
    status: int | None = None
    query = {"dyno": ref, "tail": RUN_TAIL, "follow": True}
    for line in client.lines(_app_path(app, "logs"), query, follow=True):
        match = _LOG_LINE.fullmatch(line)
        if match is None or match["dyno"] not in (name, ref):
            continue
        if match["source"] == "app":
            print(match["text"], flush=True)
            continue
        exited = _EXITED.fullmatch(match["text"])
        if exited is not None:
            status = int(exited["status"])
        elif _ENDED.fullmatch(match["text"]):
            break
    else:
        if status is None:
            raise CliError(f"the log stream of {name} ended before {name} did; see "
                           f"dynocoord ps -a {app}")
    if status is None:
        return 1
    if 0 <= status <= 255:
        return status
    # A signal given as a negative number becomes the shell's 128+N.
    return 128 + min(-status, 127) if status < 0 else 1


def cmd_logs(client: Client, args: argparse.Namespace) -> int:
    query = {"tail": args.num, "follow": args.tail, "dyno": args.dyno}
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    try:
        # Passed through as it comes, one write and flush per chunk of the coordinator: a
        # flush per line would make the terminal, not the coordinator, the bottleneck.
        for chunk in client.chunks(_app_path(args.app_name, "logs"), query, follow=args.tail):
            sys.stdout.write(decoder.decode(chunk))
            sys.stdout.flush()
        sys.stdout.write(decoder.decode(b"", final=True))
    except KeyboardInterrupt:
        if not args.tail:
            raise
    return 0  # Ctrl-C is how a followed log ends


def cmd_drains(client: Client, args: argparse.Namespace) -> int:
    drains = _dicts(client.request("GET", _app_path(args.app_name, "log-drains")),
                    "a drain listing")
    if args.json:
        _print_json(drains)
    elif not drains:
        print(f"{args.app_name} has no drains.")
    else:
        print("\n".join(["=== Drains", *(str(d.get("url", "?")) for d in drains)]))
    return 0


def cmd_drains_add(client: Client, args: argparse.Namespace) -> int:
    result = client.request("POST", _app_path(args.app_name, "log-drains"), {"url": args.url})
    if args.json:
        _print_json(result)
    else:
        print(f"Successfully added drain {args.url}")
    return 0


def cmd_drains_remove(client: Client, args: argparse.Namespace) -> int:
    result = client.request("DELETE", _app_path(args.app_name, "log-drains"),
                            query={"url": args.url})
    if args.json:
        _print_json(result)
    else:
        print(f"Successfully removed drain {args.url}")
    return 0


def drain_url(text: str) -> str:
    """A log drain URL (syslog://, syslog+tls://, https://, http://), checked here first."""
    try:
        return parse_drain_url(text).url
    except DrainUrlError as exc:
        raise argparse.ArgumentTypeError(f"drain URL {exc}") from None


def cmd_hosts(client: Client, args: argparse.Namespace) -> int:
    hosts = _dicts(client.request("GET", "/v1/hosts"), "a host listing")
    if args.json:
        _print_json(hosts)
    elif not hosts:
        print("No hosts: no agent has connected yet.")
    else:
        print("\n".join(format_hosts(hosts)))
    return 0


def cmd_hosts_drain(client: Client, args: argparse.Namespace) -> int:
    result = _request_with_progress(client, args, f"Draining host {args.host}", "POST",
                                    f"/v1/hosts/{quote(args.host, safe='')}/drain")
    state = result.get("state") if isinstance(result, dict) else None
    print(f"done ({state})" if state else "done")
    return 0


# -- serve ------------------------------------------------------------------------------------

def serve(argv: list[str]) -> int:
    """`dynocoord serve …`: the coordinator itself, `dynocoord.server.main(argv) -> int`,
    imported only here so that the client commands never load aiohttp or etcd code."""
    try:
        server = importlib.import_module(_SERVER_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != _SERVER_MODULE:
            raise  # the server is there but lacks a dependency: show which
        print(f"dynocoord: serve is not available: this installation has no {_SERVER_MODULE}",
              file=sys.stderr)
        return 1
    code: int = server.main(argv)
    return code


# -- the command line -------------------------------------------------------------------------

Command = Callable[[Client, argparse.Namespace], int]


def _connection_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    # The same options before and after the verb (`dynocoord --coordinator URL ps -a shop` and
    # `dynocoord ps -a shop --coordinator URL`); after the verb they must not reset the value
    # given before it, hence SUPPRESS there.
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--coordinator", default=default, metavar="URL[,URL...]",
                        help=f"platform API (default: $DYNOCOORD_URL or {DEFAULT_URL}); "
                        "several replicas are tried in order")
    parser.add_argument("--token-file", default=default, metavar="PATH",
                        help="file holding the API token (default: $DYNOCOORD_TOKEN, the token "
                        "itself)")
    parser.add_argument("--ca-file", default=default, metavar="PATH",
                        help="CA certificates for an https:// coordinator (default: the "
                        "system's)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynocoord", description="The fleet coordinator: drive it with Heroku's verbs, or "
        "run it (serve).")
    _connection_options(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _connection_options(common, suppress=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Handled by main() before parsing, so that its options are the server's own; listed here
    # for --help.
    sub.add_parser("serve", help="run the coordinator (dynocoord serve --help)",
                   add_help=False).set_defaults(func=_serve_misplaced, needs_app=False)

    def command(name: str, func: Command, text: str, json_flag: bool = True,
                app_flag: bool = True) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=text, description=text, parents=[common])
        if json_flag:
            cmd.add_argument("--json", action="store_true", help="print JSON")
        if app_flag:
            cmd.add_argument("-a", "--app", default=None,
                             help="the app (default: $DYNOCOORD_APP)")
        cmd.set_defaults(func=func, needs_app=app_flag)
        return cmd

    command("apps", cmd_apps, "list the apps", app_flag=False)
    create = command("apps:create", cmd_apps_create, "create an app", app_flag=False)
    create.add_argument("name", type=_new_app_name, metavar="NAME")
    command("apps:info", cmd_apps_info, "an app: its release and formation")
    destroy = command("apps:destroy", cmd_apps_destroy,
                      "destroy an app, its releases and every dyno it runs", json_flag=False)
    destroy.add_argument("positional_app", nargs="?", default=None, metavar="APP",
                         help="the app (or -a APP)")
    destroy.add_argument("--confirm", default=None, metavar="APP",
                         help="the app's name again, to say you mean it")
    command("releases", cmd_releases, "list an app's releases, newest first")
    release = command("releases:create", cmd_releases_create,
                      "make a release from a slug; the app's dynos roll to it")
    release.add_argument("--slug", required=True, metavar="PATH|URL",
                         help="the slug: a path on the hosts, or an http(s) URL")
    release.add_argument("--sha256", type=_sha256, default=None, metavar="HEX",
                         help="the slug's digest (required with a URL)")
    release.add_argument("--stack", required=True, type=stack_name, metavar="NAME",
                         help="the stack the dynos run on")
    release.add_argument("--process", type=process_entry, action="append", required=True,
                         metavar="TYPE=COMMAND", help="a process type (repeatable)")
    release.add_argument("--env", type=config_var, action="append", default=[],
                         metavar="KEY=VALUE", help="a config var (repeatable)")
    config = command("config", cmd_config, "show an app's config vars")
    config.add_argument("-s", "--shell", action="store_true", help="print KEY=value lines")
    config_set = command("config:set", cmd_config_set,
                         "set config vars (a new release; the dynos restart)", json_flag=False)
    config_set.add_argument("vars", type=config_var, nargs="+", metavar="KEY=VALUE")
    config_unset = command("config:unset", cmd_config_unset,
                           "unset config vars (a new release; the dynos restart)",
                           json_flag=False)
    config_unset.add_argument("keys", type=config_key, nargs="+", metavar="KEY")
    command("ps", cmd_ps, "list an app's dynos, grouped by process type")
    scale = command("ps:scale", cmd_ps_scale,
                    "change the formation: TYPE=N[:SIZE]...; without arguments, show it")
    scale.add_argument("items", type=scale_item, nargs="*", metavar="TYPE=N[:SIZE]")
    ps_type = command("ps:type", cmd_ps_type,
                      "change dyno sizes: TYPE=SIZE...; without arguments, show them")
    ps_type.add_argument("items", type=type_item, nargs="*", metavar="TYPE=SIZE")
    run = command("run", cmd_run, "run a one-off dyno and show its output until it exits; "
                  "exits with its status", json_flag=False)
    run.add_argument("-s", "--size", type=size_option, default=None,
                     help="dyno size (default: the coordinator's, standard-1x)")
    run.add_argument("-d", "--detached", action="store_true",
                     help="start it and return; its output goes to the logs")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND")
    logs = command("logs", cmd_logs, "show an app's log lines from every host (-t: follow)",
                   json_flag=False)
    logs.add_argument("-t", "--tail", action="store_true", help="follow until Ctrl-C")
    logs.add_argument("-n", "--num", type=non_negative, default=LOGS_TAIL_DEFAULT,
                      help=f"how many recent lines (default {LOGS_TAIL_DEFAULT})")
    logs.add_argument("-d", "--dyno", type=dyno_ref, default=None,
                      help="only this dyno (web.1), process type (web) or dyno id")
    command("drains", cmd_drains, "list an app's log drains")
    drains_add = command("drains:add", cmd_drains_add,
                         "add a log drain to an app (no dyno restarts)")
    drains_add.add_argument("url", type=drain_url, metavar="URL",
                            help="syslog://HOST:PORT, syslog+tls://HOST:PORT or https://…")
    drains_remove = command("drains:remove", cmd_drains_remove,
                            "remove a log drain from an app")
    drains_remove.add_argument("url", metavar="URL", help="the drain's URL, as listed")
    command("hosts", cmd_hosts, "list the hosts and their state", app_flag=False)
    drain = command("hosts:drain", cmd_hosts_drain,
                    "move a host's dynos elsewhere and place nothing new there",
                    json_flag=False, app_flag=False)
    drain.add_argument("host", type=host_id, metavar="ID")
    return parser


def _serve_misplaced(_client: Client, _args: argparse.Namespace) -> int:
    raise CliError("serve comes first and takes the server's own options: dynocoord serve "
                   "--help")


def _new_app_name(text: str) -> str:
    if not APP_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"app name {text!r} must be {APP_SHAPE}")
    return text


def _sha256(text: str) -> str:
    if not SHA256.fullmatch(text):
        raise argparse.ArgumentTypeError(f"a sha256 is 64 hex digits, got {text!r}")
    return text.lower()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        return serve(argv[1:])
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse: usage error (2) or --help (0)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        if args.needs_app:
            if getattr(args, "positional_app", None):
                if args.app and args.app != args.positional_app:
                    raise CliError(f"two apps given: {args.positional_app} and -a {args.app}")
                args.app = args.positional_app
            args.app_name = _app_name(args)
        url = args.coordinator or os.environ.get("DYNOCOORD_URL") or DEFAULT_URL
        client = Client(parse_coordinators(url), _token(args), args.ca_file)
        code: int = args.func(client, args)
    except CliError as exc:
        print(f"dynocoord: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `dynocoord logs | head`: the reader is done; say nothing more.
        drop_stdout()
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
