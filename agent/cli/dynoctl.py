"""`dynoctl`: the operator client of the agent's Unix socket (Heroku CLI vocabulary).

It imports no aiohttp and nothing of the daemon: a CLI that operators type all day must start
fast, so it speaks HTTP/1.1 with the standard library's http.client over AF_UNIX. What only some
commands need (http.client, which `run` and `exec` never use: they go straight to the attach
socket; urllib, datetime, shlex, termios, and the spec module, which brings dataclasses) is
imported when first used, and typing and os not at all (posix has what it needs); the usual
forms of `run` are read without argparse (`_quick_run_args`): `dynoctl run` is a start path
too. Run as a command, it leaves without the interpreter's teardown (`leave`).
"""

from __future__ import annotations

import _socket
import codecs
import posix
import select
import sys
import time

from agent import cjson
from agent.api import attachwire as wire

# Not typing.TYPE_CHECKING: typing alone takes a few ms to import, and nothing else `dynoctl
# run` needs imports it (mypy takes any constant of this name as typing's).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    import http.client
    import signal as _signal
    from collections.abc import Callable, Iterable, Iterator
    from datetime import datetime
    from typing import Any
else:
    # The C modules under signal and socket: the Python ones wrap their constants in enums,
    # some 10 ms of imports each at a `dynoctl run`'s start. `_socket` has stubs of its own.
    # Likewise posix for os, which would bring collections.abc and posixpath (~2.5 ms).
    import _signal

DEFAULT_SOCKET = "/run/dynoagent/dynoagent.sock"
TOP_INTERVAL_S = 2.0
STREAM_READ_BYTES = 256 * 1024
ONE_OFF_TYPES = ("run", "release")  # shown apart, as `heroku ps` shows one-off dynos
_CLEAR_SCREEN = "\x1b[H\x1b[2J"


def getenv(name: str) -> str | None:
    """os.environ.get(name) without os: posix.environ holds bytes, decoded as os decodes them."""
    value = posix.environ.get(name.encode())
    return None if value is None else value.decode(sys.getfilesystemencoding(), "surrogateescape")


class CtlError(Exception):
    """A failure to report as one line on stderr with exit status 1.

    `code` is the agent's error code (`not_found`, …) when the agent answered with one.
    """

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(" ".join(message.split()))  # one line, whatever the server said
        self.code = code


def _connection(path: str, timeout_s: float) -> http.client.HTTPConnection:
    import http.client
    import socket

    class UnixHTTPConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(path)
            except OSError:
                sock.close()
                raise
            self.sock = sock

    return UnixHTTPConnection("dynoagent", timeout=timeout_s)


def display_name(size: str) -> str:
    from agent.sizenames import display_name as spelled

    return spelled(size)


def _url(path: str, query: dict[str, Any] | None) -> str:
    from urllib.parse import urlencode

    params = {k: v for k, v in (query or {}).items() if v is not None and v is not False}
    params = {k: (1 if v is True else v) for k, v in params.items()}
    return f"{path}?{urlencode(params)}" if params else path


def _error_of(status: int, reason: str, raw: bytes) -> CtlError:
    try:
        data = cjson.loads(raw) if raw else None
    except ValueError:
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return CtlError(f"dynoagent answered {status} {reason}")
    code = str(error.get("code", status))
    return CtlError(f"{error.get('message', reason)} ({code})", code)


class Client:
    def __init__(self, socket_path: str, timeout_s: float = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout_s = timeout_s

    def _unreachable(self, exc: OSError) -> CtlError:
        reason = exc.strerror or str(exc) or type(exc).__name__
        return CtlError(f"cannot reach dynoagent at {self.socket_path}: {reason}")

    def request(self, method: str, path: str, body: Any = None,
                query: dict[str, Any] | None = None) -> Any:
        import http.client

        conn = _connection(self.socket_path, self.timeout_s)
        try:
            payload = None if body is None else cjson.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            try:
                conn.request(method, _url(path, query), body=payload, headers=headers)
                response = conn.getresponse()
                raw = response.read()
            except OSError as exc:
                raise self._unreachable(exc) from None
            except http.client.HTTPException as exc:
                raise CtlError(f"bad answer from dynoagent at {self.socket_path}: {exc}") from None
        finally:
            conn.close()
        if response.status >= 400:
            raise _error_of(response.status, response.reason, raw)
        try:
            return cjson.loads(raw) if raw else None
        except ValueError:
            raise CtlError(f"dynoagent answered {response.status} with non-JSON data") from None

    def chunks(self, path: str, query: dict[str, Any] | None = None,
               follow: bool = False) -> Iterator[bytes]:
        """The body of a GET, piece by piece as the agent writes it (a follow stream has no
        end until the agent closes it, so then there is no read timeout)."""
        import http.client

        conn = _connection(self.socket_path, self.timeout_s)
        try:
            try:
                conn.request("GET", _url(path, query))
                response = conn.getresponse()
                if response.status >= 400:
                    raise _error_of(response.status, response.reason, response.read())
                if follow and conn.sock is not None:
                    conn.sock.settimeout(None)
                # read1 returns what one chunk (one batch of the agent) holds, without waiting
                # for more: the caller can show it at once.
                while chunk := response.read1(STREAM_READ_BYTES):
                    yield chunk
            except OSError as exc:
                raise self._unreachable(exc) from None
            except http.client.HTTPException as exc:
                raise CtlError(f"stream from dynoagent broke off: {exc!r}") from None
        finally:
            conn.close()

    def lines(self, path: str, query: dict[str, Any] | None = None,
              follow: bool = False) -> Iterator[str]:
        """The body of a GET as text lines, each as soon as it is complete."""
        return text_lines(self.chunks(path, query, follow))


# -- formatting -------------------------------------------------------------------------------

def _print_json(data: Any) -> None:
    import json

    print(json.dumps(data, indent=2, sort_keys=True))


def _parse_time(value: Any) -> datetime | None:
    from datetime import UTC, datetime

    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def ago(elapsed_s: float) -> str:
    """`heroku ps`'s rough age: seconds up to a minute, then minutes, hours (to 25 h), days."""
    elapsed = max(0, int(elapsed_s))
    if elapsed < 60:
        return f"~ {elapsed}s ago"
    if elapsed < 3600:
        return f"~ {elapsed // 60}m ago"
    if elapsed < 25 * 3600:
        return f"~ {elapsed // 3600}h ago"
    return f"~ {elapsed // 86400}d ago"


def since_text(value: Any, now: datetime | None = None) -> str:
    """`2026/11/26 10:00:00 +0000 (~ 5m ago)` in the local time zone, as Heroku prints it."""
    from datetime import UTC, datetime

    since = _parse_time(value)
    if since is None:
        return ""
    now = now or datetime.now(UTC)
    stamp = since.astimezone().strftime("%Y/%m/%d %H:%M:%S %z")
    return f"{stamp} ({ago((now - since).total_seconds())})"


def _size(dyno: dict[str, Any]) -> str:
    size = dyno.get("size")
    return display_name(size) if isinstance(size, str) and size else "?"


def dyno_type(dyno: dict[str, Any]) -> str:
    kind = dyno.get("type")
    if isinstance(kind, str) and kind:
        return kind
    return str(dyno.get("name", "?")).split(".", 1)[0]


def dyno_order(dyno: dict[str, Any]) -> tuple[str, int, str]:
    name = str(dyno.get("name", ""))
    kind, _, number = name.partition(".")
    return (kind, int(number) if number.isdigit() else -1, name)


def _group_order(key: tuple[str, str, str, str]) -> tuple[str, int, str, str, str]:
    app, kind, size, command = key
    # Formation types first with web on top, one-off processes last, as `heroku ps` does.
    rank = 2 if kind in ONE_OFF_TYPES else (0 if kind == "web" else 1)
    return (app, rank, kind, size, command)


def format_ps(dynos: list[dict[str, Any]], now: datetime | None = None) -> list[str]:
    """`heroku ps`: one `=== type (Size): \\`command\\`` block per (type, size, command)."""
    apps = {str(d.get("app") or "?") for d in dynos}
    several_apps = len(apps) > 1
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for dyno in dynos:
        key = (str(dyno.get("app") or "?"), dyno_type(dyno), _size(dyno),
               str(dyno.get("command") or ""))
        groups.setdefault(key, []).append(dyno)
    out: list[str] = []
    for key in sorted(groups, key=_group_order):
        app, kind, size, command = key
        prefix = f"{app} " if several_apps else ""
        if out:
            out.append("")
        one_off = kind in ONE_OFF_TYPES
        shown = f": `{command}`" if command else ""
        out.append(f"=== {prefix}{kind}: one-off processes" if one_off
                   else f"=== {prefix}{kind} ({size}){shown}")
        for dyno in sorted(groups[key], key=dyno_order):
            state = str(dyno.get("state", "?"))
            since = since_text(dyno.get("since"), now)
            status = f"{state} {since}".rstrip()
            if one_off:
                out.append(f"{dyno.get('name', '?')} ({size}): {status}: {command}")
            else:
                out.append(f"{dyno.get('name', '?')}: {status}")
    return out


def _mib(value: Any) -> str:
    return f"{value / 2**20:.1f} MiB" if isinstance(value, (int, float)) else "-"


_SECCOMP_MODES = {0: "none", 1: "strict", 2: "filter"}


def _seccomp_text(mode: Any) -> str | None:
    """/proc's `Seccomp:` of the dyno's PID 1: 2 when the dyno filter is on."""
    if not isinstance(mode, int) or isinstance(mode, bool):
        return None
    return f"{mode} ({_SECCOMP_MODES.get(mode, 'unknown')})"


# The phases of a dyno's start in the order they happen (agent/supervision/dyno.py,
# runtime.py), then its exit; and those of its launch in the holder (agent/launcher/launch.py),
# which the agent reports as `launch.<phase>`.
START_PHASES = ("record", "queue", "slug", "uid", "dir", "cgroup", "netns", "prepare", "launch",
                "up", "run", "exit_event", "exit")
LAUNCH_PHASES = ("prepare", "fork", "cgroup", "namespaces", "netns", "mounts", "user", "exec",
                 "total")


def _number(value: Any) -> str:
    """A value as a person reads it: no `None`, floats rounded (at most 2 decimals)."""
    if value is None:
        return "none"
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        return f"{value:.2f}".rstrip("0").rstrip(".")
    return str(value)


def _duration_ms(value: Any) -> str:
    """`7.9 ms`; `0.42 ms` below a millisecond."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _number(value)
    return f"{value:.2f} ms" if abs(value) < 1 else f"{value:.1f} ms"


def format_timings(timings: Any, order: tuple[str, ...], prefix: str = "") -> str | None:
    """`slug 0.31 ms, uid 1.2 ms, cgroup 7.9 ms, …`: the phases named `prefix<phase>` (those
    without a dot when no prefix) in `order`, then any others by name."""
    if not isinstance(timings, dict):
        return None
    phases = {str(k)[len(prefix):]: v for k, v in timings.items()
              if str(k).startswith(prefix) and (prefix or "." not in str(k))}
    names = [p for p in order if p in phases] + sorted(p for p in phases if p not in order)
    return ", ".join(f"{name} {_duration_ms(phases[name])}" for name in names) or None


def _shown(value: Any) -> str:
    return "-" if value is None or value == "" else _number(value)


def format_inspect(dyno: dict[str, Any], now: datetime | None = None) -> list[str]:
    raw_stats = dyno.get("stats")
    stats: dict[str, Any] = raw_stats if isinstance(raw_stats, dict) else {}
    memory, quota = stats.get("memory_bytes"), stats.get("memory_quota_bytes")
    memory_text = _mib(memory)
    if isinstance(memory, (int, float)) and isinstance(quota, (int, float)) and quota > 0:
        memory_text += f" of {_mib(quota)} ({memory * 100 / quota:.1f}%)"
    state = str(dyno.get("state", "?"))
    since = since_text(dyno.get("since"), now)
    reason = dyno.get("reason")
    exit_status = dyno.get("exit_status")
    cpu = stats.get("cpu_seconds")

    def pairs(value: Any) -> str:
        if not isinstance(value, dict) or not value:
            return "-"
        return " ".join(f"{k}={_number(v)}" for k, v in sorted(value.items()))

    rows = [
        ("App", dyno.get("app")),
        ("Type", dyno_type(dyno)),
        ("State", f"{state} since {since}" if since else state),
        ("Reason", reason),
        ("Command", f"`{dyno['command']}`" if dyno.get("command") else None),
        ("Size", _size(dyno)),
        ("PID", dyno.get("pid")),
        ("IP", dyno.get("ip")),
        ("Restarts", dyno.get("restarts")),
        ("Last exit", exit_status),
        ("Cgroup", dyno.get("cgroup")),
        ("Netns", dyno.get("netns")),
        ("Seccomp", _seccomp_text(dyno.get("seccomp"))),
        ("Memory", memory_text if memory is not None else None),
        ("CPU time", f"{cpu:.2f}s" if isinstance(cpu, (int, float)) else None),
        ("Processes", stats.get("pids")),
        ("Limits", pairs(dyno.get("limits"))),
        ("Timings", format_timings(dyno.get("timings_ms"), START_PHASES)),
        ("Launch", format_timings(dyno.get("timings_ms"), LAUNCH_PHASES, "launch.")),
    ]
    width = max(len(k) for k, _ in rows) + 1
    out = [f"=== {dyno.get('name', '?')} ({dyno.get('id', '?')})"]
    for key, value in rows:
        out.append(f"{key + ':':<{width}} {_shown(value)}")
    return out


# -- commands ---------------------------------------------------------------------------------

def cmd_info(client: Client, args: argparse.Namespace) -> int:
    info = client.request("GET", "/v1/info")
    if args.json:
        _print_json(info)
        return 0
    dynos = info.get("dynos", {})
    by_state = ", ".join(f"{n} {s}" for s, n in sorted(dynos.get("by_state", {}).items()))
    coordinator = info.get("coordinator", {})
    rows = [
        ("Agent", f"dynoagent {info['version']} (pid {info['pid']}, {info['state']})"),
        ("Host", info["host"]),
        ("Agent ID", info.get("agent_id", "")),
        ("Cgroups", info["cgroup_mode"]),
        ("Capacity", f"{info['capacity']['cpus']} CPUs, "
                     f"{info['capacity']['memory_bytes'] / 2**30:.1f} GiB"),
        ("Coordinator", coordinator.get("state", "?")),
        ("Dynos", f"{dynos.get('total', 0)}" + (f" ({by_state})" if by_state else "")),
        ("Uptime", f"{info['uptime_s']:.0f}s"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key + ':':<{width + 1}} {value}")
    return 0


def _list(client: Client, app: str | None) -> list[dict[str, Any]]:
    dynos = client.request("GET", "/v1/dynos", query={"app": app})
    if not isinstance(dynos, list):
        raise CtlError("dynoagent answered a dyno listing that is not a list")
    return [d for d in dynos if isinstance(d, dict)]


def cmd_ps(client: Client, args: argparse.Namespace) -> int:
    dynos = _list(client, args.app)
    if args.json:
        _print_json(dynos)
    elif not dynos:
        print("No dynos" + (f" of {args.app}" if args.app else "") + ".")
    else:
        print("\n".join(format_ps(dynos)))
    return 0


def cmd_logs(client: Client, args: argparse.Namespace) -> int:
    query = {"tail": args.num, "app": args.app, "dyno": args.dyno, "follow": args.tail,
             "format": "json" if args.json else None}
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    try:
        # Passed through as it comes, one write and flush per batch of the agent: a flush
        # per line would make the terminal, not the agent, the bottleneck of `logs -t`.
        for chunk in client.chunks("/v1/logs", query, follow=args.tail):
            sys.stdout.write(decoder.decode(chunk))
            sys.stdout.flush()
        sys.stdout.write(decoder.decode(b"", final=True))
    except KeyboardInterrupt:
        if not args.tail:
            raise
    return 0  # Ctrl-C is how a followed log ends


def _dyno_path(ref: str, verb: str = "") -> str:
    from urllib.parse import quote

    return f"/v1/dynos/{quote(ref, safe='')}" + (f"/{verb}" if verb else "")


def cmd_inspect(client: Client, args: argparse.Namespace) -> int:
    dyno = client.request("GET", _dyno_path(args.dyno), query={"app": args.app})
    if args.json:
        _print_json(dyno)
    else:
        print("\n".join(format_inspect(dyno)))
    return 0


def _targets(client: Client, target: str | None, app: str | None) -> list[tuple[str, str]]:
    """(ref, label) of every dyno `target` means: all when None, every dyno of a process type
    when some dyno has that type, else the one dyno of that id or name."""
    if target is None or "." not in target:
        dynos = _list(client, app)
        if target is not None:
            dynos = [d for d in dynos if dyno_type(d) == target]
        if dynos or target is None:
            return [(str(d["id"]), f"{d.get('name', d['id'])}")
                    for d in sorted(dynos, key=dyno_order) if "id" in d]
    assert target is not None
    return [(target, target)]


def _lifecycle(client: Client, args: argparse.Namespace, verb: str, gerund: str) -> int:
    targets = _targets(client, args.target, args.app)
    if not targets:
        print("No dynos" + (f" of {args.app}" if args.app else "") + f" to {verb}.")
        return 0
    failed = 0
    # Each dyno is addressed by id when the listing gave one, so names shared by several apps
    # cannot make one of them ambiguous; `app` still narrows a bare name or id.
    for ref, label in targets:
        print(f"{gerund} {label}... ", end="", flush=True)
        try:
            status = client.request("POST", _dyno_path(ref, verb), query={"app": args.app})
        except CtlError as exc:
            print("failed")
            print(f"dynoctl: {verb} {label}: {exc}", file=sys.stderr)
            failed += 1
            continue
        state = status.get("state") if isinstance(status, dict) else None
        print(f"done ({state})" if state else "done")
    return 1 if failed else 0


def cmd_restart(client: Client, args: argparse.Namespace) -> int:
    return _lifecycle(client, args, "restart", "Restarting")


def cmd_stop(client: Client, args: argparse.Namespace) -> int:
    return _lifecycle(client, args, "stop", "Stopping")


class _TopSampler:
    """Rows of `dynoctl top`; CPU% comes from the change in CPU time between two frames."""

    def __init__(self, client: Client, app: str | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._client = client
        self._app = app
        self._clock = clock
        self._last: dict[str, tuple[float, float]] = {}  # id -> (clock, cpu_seconds)

    def _stats(self, dyno: dict[str, Any]) -> dict[str, Any] | None:
        stats = dyno.get("stats")
        if isinstance(stats, dict):
            return stats
        try:
            detail = self._client.request("GET", _dyno_path(str(dyno["id"])))
        except CtlError as exc:
            if exc.code == "not_found":
                return None  # deleted between the listing and now
            raise
        stats = detail.get("stats") if isinstance(detail, dict) else None
        return stats if isinstance(stats, dict) else {}

    def frame(self) -> list[dict[str, Any]]:
        rows = []
        for dyno in sorted(_list(self._client, self._app),
                           key=lambda d: (str(d.get("app", "")), dyno_order(d))):
            if "id" not in dyno:
                continue
            stats = self._stats(dyno)
            if stats is None:
                continue
            now, cpu = self._clock(), stats.get("cpu_seconds")
            cpu_percent = None
            if isinstance(cpu, (int, float)):
                previous = self._last.get(dyno["id"])
                if previous is not None and now > previous[0] and cpu >= previous[1]:
                    cpu_percent = round((cpu - previous[1]) * 100 / (now - previous[0]), 1)
                self._last[dyno["id"]] = (now, float(cpu))
            memory, quota = stats.get("memory_bytes"), stats.get("memory_quota_bytes")
            memory_percent = None
            if isinstance(memory, (int, float)) and isinstance(quota, (int, float)) and quota:
                memory_percent = round(memory * 100 / quota, 1)
            rows.append({"id": dyno["id"], "app": dyno.get("app"), "name": dyno.get("name"),
                         "state": dyno.get("state"), "memory_bytes": memory,
                         "memory_quota_bytes": quota, "memory_percent": memory_percent,
                         "cpu_seconds": cpu, "cpu_percent": cpu_percent,
                         "pids": stats.get("pids")})
        return rows


def format_top(rows: list[dict[str, Any]]) -> list[str]:
    def num(value: Any, fmt: str) -> str:
        return format(value, fmt) if isinstance(value, (int, float)) else "-"

    table = [("DYNO", "APP", "STATE", "MEM MiB", "QUOTA MiB", "MEM%", "CPU%", "CPU s", "PIDS")]
    for row in rows:
        memory, quota = row["memory_bytes"], row["memory_quota_bytes"]
        table.append((
            str(row["name"]), str(row["app"]), str(row["state"]),
            num(memory / 2**20 if isinstance(memory, (int, float)) else None, ".1f"),
            num(quota / 2**20 if isinstance(quota, (int, float)) else None, ".0f"),
            num(row["memory_percent"], ".1f"), num(row["cpu_percent"], ".1f"),
            num(row["cpu_seconds"], ".2f"), num(row["pids"], "d"),
        ))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    # Text columns left-aligned, numbers right-aligned.
    return ["  ".join(cell.ljust(w) if i < 3 else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(r, widths, strict=True))).rstrip()
            for r in table]


def cmd_top(client: Client, args: argparse.Namespace) -> int:
    sampler = _TopSampler(client, args.app)
    clear = sys.stdout.isatty() and not args.json and not args.once
    try:
        while True:
            rows = sampler.frame()
            if args.json:
                import json

                print(json.dumps(rows, sort_keys=True), flush=True)
            else:
                from datetime import datetime

                stamp = datetime.now().astimezone().strftime("%H:%M:%S")
                lines = [f"dynoctl top - {stamp} - {len(rows)} dynos", *format_top(rows)]
                print((_CLEAR_SCREEN if clear else "") + "\n".join(lines), flush=True)
            if args.once:
                return 0
            time.sleep(args.interval)  # the refresh period of an interactive display
            if not clear and not args.json:
                print(flush=True)
    except KeyboardInterrupt:
        return 0  # Ctrl-C is how top ends


# -- run, exec, scale --------------------------------------------------------------------------

TERMINAL_ENV = ("TERM", "COLORTERM")
# Ctrl-\\ in a TTY session (the terminal is raw, so it arrives as this byte): leave and end
# the session, as SIGQUIT does for a session on pipes.
LEAVE_BYTE = b"\x1c"
LEAVE_STATUS = 128 + _signal.SIGQUIT
SOCKET_READ_BYTES = 256 * 1024


def _terminal_env(tty_session: bool) -> dict[str, str]:
    env = {key: value for key in TERMINAL_ENV if (value := getenv(key)) is not None}
    if posix.isatty(1) and not tty_session:
        # A pty in the dyno knows its size (and follows the terminal's); fixed COLUMNS and
        # LINES would override it in most programs.
        size = posix.get_terminal_size(1)
        env.update(COLUMNS=str(size.columns), LINES=str(size.lines))
    return env


def _wants_tty() -> bool:
    """A pty in the dyno when we talk to a terminal both ways (as `docker exec -it`); with a
    pipe or file on either side, bytes pass unchanged through pipes."""
    return posix.isatty(0) and posix.isatty(1)


def _attach_socket(client: Client) -> str:
    info = client.request("GET", "/v1/info")
    path = info.get("attach_socket") if isinstance(info, dict) else None
    if not isinstance(path, str) or not path:
        raise CtlError("this dynoagent has no attach socket (too old for run/exec)")
    return path


def attach_path_of(socket_path: str) -> str:
    """Where the agent binds its attach socket: next to the operator socket, `x.sock` →
    `x.attach.sock` (agent.api.attach.attach_path, without pathlib or os.path, which are slow
    to import)."""
    directory, slash, name = socket_path.rpartition("/")
    dot = name.rfind(".")
    # The suffix as pathlib reads it: none for a name that starts with its only dot, nor for
    # one that ends with a dot.
    stem, suffix = (name[:dot], name[dot:]) if 0 < dot < len(name) - 1 else (name, "")
    return f"{directory}{slash}{stem}.attach{suffix or '.sock'}"


def _attach_connect(client: Client) -> tuple[_socket.socket, str]:
    """A connection to the agent's attach socket: the one next to the operator socket, with
    no request to the operator API first (`dynoctl run` is a start path). When that fails,
    the one GET /v1/info names, as before: every failure is then reported as it always was
    (the operator socket's, or the attach socket's)."""
    path = attach_path_of(client.socket_path)
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(path)
        return sock, path
    except OSError:
        sock.close()
    path = _attach_socket(client)
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise CtlError(f"cannot reach dynoagent at {path}: {exc.strerror or exc}") from None
    return sock, path


def attach(client: Client, request: dict[str, Any],
           on_started: Callable[[dict[str, Any]], None], *, detached: bool = False) -> int:
    """Send `request` over the agent's attach socket and relay our stdio to the command it
    starts (our own fds stay here); the command's exit status, or 0 once a detached one has
    started."""
    sock, path = _attach_connect(client)
    try:
        tty_session = not detached and _wants_tty()
        request = {**request, "v": wire.VERSION, "tty": tty_session, "detached": detached,
                   "env": _terminal_env(tty_session)}
        if tty_session:
            size = posix.get_terminal_size(1)
            request["window"] = [size.lines, size.columns]
        # Whatever we buffered must reach the terminal before the command's output.
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            sock.sendall((cjson.dumps(request) + "\n").encode())
        except OSError as exc:
            raise CtlError(f"cannot send the request to {path}: {exc.strerror or exc}") from None
        return _Session(sock, tty_session, detached).run(on_started)
    finally:
        sock.close()


def _ignore(_signum: int, _frame: object) -> None:
    """A handler only so that the wakeup fd hears of the signal (the loop acts on it)."""


def _stdin_open() -> bool:
    try:
        posix.fstat(0)
    except OSError:
        return False
    return True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[posix.write(fd, view):]
        except BlockingIOError:
            select.select([], [fd], [])  # a terminal someone left non-blocking


class _Session:
    """dynoctl's half of the relay: one select loop over the agent's socket, our stdin and
    the signals that matter (Ctrl-C and window changes become frames; SIGTERM and SIGHUP
    leave). In a TTY session our terminal is raw from the start of the command to the end,
    restored on every way out."""

    def __init__(self, sock: _socket.socket, tty_session: bool, detached: bool) -> None:
        self.sock = sock
        self.tty = tty_session
        self.detached = detached
        self.decoder = wire.FrameDecoder(wire.AGENT_KINDS)
        self.started = False
        self.credit = 0
        self.stdin_done = not _stdin_open()
        self.saved_terminal: list[Any] | None = None

    def run(self, on_started: Callable[[dict[str, Any]], None]) -> int:
        wake_r, wake_w = _socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        handled = () if self.detached else (_signal.SIGINT, _signal.SIGWINCH, _signal.SIGTERM,
                                            _signal.SIGHUP)
        previous = {signum: _signal.signal(signum, _ignore) for signum in handled}
        old_wakeup = _signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        try:
            while True:
                readers: list[Any] = [self.sock, wake_r]
                if self.started and self.credit > 0 and not self.stdin_done:
                    readers.append(0)
                ready, _, _ = select.select(readers, [], [])
                if wake_r in ready:
                    for signum in wake_r.recv(64):
                        status = self._on_signal(signum)
                        if status is not None:
                            return status
                if self.sock in ready:
                    status = self._on_socket(on_started)
                    if status is not None:
                        return status
                if 0 in ready:
                    status = self._on_stdin()
                    if status is not None:
                        return status
        finally:
            self._restore_terminal()
            _signal.set_wakeup_fd(old_wakeup)
            for signum, handler in previous.items():
                _signal.signal(signum, handler)
            wake_r.close()
            wake_w.close()

    def _send(self, frame: bytes) -> None:
        try:
            self.sock.sendall(frame)
        except OSError as exc:
            raise CtlError(f"the connection to dynoagent broke: {exc.strerror or exc}") from None

    def _on_signal(self, signum: int) -> int | None:
        if signum == _signal.SIGINT:
            self._send(wire.encode(wire.SIGNAL, b"INT"))
        elif signum == _signal.SIGWINCH and self.tty:
            try:
                size = posix.get_terminal_size(1)
            except OSError:
                return None
            self._send(wire.window(size.lines, size.columns))
        elif signum in (_signal.SIGTERM, _signal.SIGHUP):
            return 128 + signum  # we leave; the agent ends the command
        return None

    def _on_socket(self, on_started: Callable[[dict[str, Any]], None]) -> int | None:
        try:
            data = self.sock.recv(SOCKET_READ_BYTES)
        except OSError as exc:
            raise CtlError(f"the connection to dynoagent broke: {exc.strerror or exc}") from None
        if not data:
            raise CtlError("dynoagent closed the connection before the command finished")
        try:
            frames = self.decoder.feed(data)
        except wire.FrameError as exc:
            raise CtlError(f"dynoagent sent a malformed attach frame: {exc}") from None
        for kind, payload in frames:
            if kind == wire.STDOUT:
                _write_all(1, payload)
            elif kind == wire.STDERR:
                _write_all(2, payload)
            elif kind == wire.CREDIT:
                self.credit += wire.parse_credit(payload)
            else:
                status = self._on_control(wire.parse_control(payload), on_started)
                if status is not None:
                    return status
        return None

    def _on_control(self, message: dict[str, Any],
                    on_started: Callable[[dict[str, Any]], None]) -> int | None:
        error = message.get("error")
        if isinstance(error, dict):
            code = str(error.get("code", "error"))
            raise CtlError(f"{error.get('message', 'failed')} ({code})", code)
        event = message.get("event")
        if event == "started":
            on_started(message)
            if self.detached:
                return 0
            self.started = True
            if self.tty:
                import termios
                import tty

                self.saved_terminal = termios.tcgetattr(0)
                tty.setraw(0, termios.TCSADRAIN)
        elif event == "exit":
            self._restore_terminal()
            status = message.get("status")
            return int(status) if isinstance(status, int) else 1
        return None

    def _on_stdin(self) -> int | None:
        try:
            data = posix.read(0, min(self.credit, wire.MAX_PAYLOAD))
        except OSError:
            data = b""  # a terminal that hung up: as good as the end of input
        if self.tty and LEAVE_BYTE in data:
            before = data.partition(LEAVE_BYTE)[0]
            if before:
                self._send(wire.encode(wire.STDIN, before))
            return LEAVE_STATUS
        if not data:
            self.stdin_done = True
            self._send(wire.encode(wire.STDIN_EOF))
            return None
        self.credit -= len(data)
        self._send(wire.encode(wire.STDIN, data))
        return None

    def _restore_terminal(self) -> None:
        if self.saved_terminal is not None:
            import contextlib
            import termios

            with contextlib.suppress(termios.error):
                termios.tcsetattr(0, termios.TCSADRAIN, self.saved_terminal)
            self.saved_terminal = None


def _command_text(argv: list[str]) -> str:
    args = argv[1:] if argv[:1] == ["--"] else argv
    if not args:
        raise CtlError("no command given: dynoctl run [OPTIONS] -- COMMAND")
    # One argument is a shell command line as written (`run "python3 -V"`); several are
    # words, quoted so that the dyno's /bin/sh -c sees them as given.
    if len(args) == 1:
        return args[0]
    import shlex

    return shlex.join(args)


def cmd_run(client: Client, args: argparse.Namespace) -> int:
    command = _command_text(args.command)
    request: dict[str, Any] = {"op": "run", "command": command, "app": args.app,
                               "size": args.size}
    if args.env:
        request["config_vars"] = dict(args.env)

    def started(message: dict[str, Any]) -> None:
        size = display_name(str(message.get("size") or "standard-1x"))
        line = (f"Running `{command}` on {message.get('app')}... up, {message.get('name')} "
                f"({size})")
        if args.detached:
            print(line)
            print(f"Run dynoctl logs -t -d {message.get('name')} to view the output.")
        elif posix.isatty(2):
            print(line, file=sys.stderr, flush=True)

    return attach(client, request, started, detached=args.detached)


def cmd_exec(client: Client, args: argparse.Namespace) -> int:
    argv = args.command[1:] if args.command[:1] == ["--"] else list(args.command)
    request = {"op": "exec", "dyno": args.dyno, "app": args.app, "argv": argv or ["/bin/sh"]}

    def started(message: dict[str, Any]) -> None:
        if posix.isatty(2):
            print(f"Entering {message.get('name')}...", file=sys.stderr, flush=True)

    return attach(client, request, started)


def _formation_text(formation: Any) -> str:
    items = formation.get("formation") if isinstance(formation, dict) else None
    if not isinstance(items, list):
        return "?"
    return ", ".join(f"{i.get('type')} at {i.get('quantity')}:{display_name(str(i.get('size')))}"
                     for i in items if isinstance(i, dict))


def cmd_scale(client: Client, args: argparse.Namespace) -> int:
    if not args.items:
        formation = client.request("GET", "/v1/formation", query={"app": args.app})
        if args.json:
            _print_json(formation)
        else:
            print(" ".join(f"{i['type']}={i['quantity']}:{display_name(str(i['size']))}"
                           for i in formation.get("formation", [])))
        return 0
    if not args.json:
        print("Scaling dynos... ", end="", flush=True)
    try:
        result = client.request("POST", "/v1/formation",
                                body={"app": args.app, "formation": list(args.items)})
    except CtlError:
        if not args.json:
            print("failed", flush=True)
        raise
    if args.json:
        _print_json(result)
    else:
        print(f"done, now running {_formation_text(result)}")
    return 0


# -- the command line -------------------------------------------------------------------------

def _non_negative(text: str) -> int:
    import argparse

    # ASCII digits only, as the agent takes them: int() also reads other scripts' digits.
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise argparse.ArgumentTypeError(f"not a number of 0 or more: {text!r}")
    return int(text, 10)


def _config_var(text: str) -> tuple[str, str]:
    import argparse

    from agent.spec import ENV_KEY

    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    if not ENV_KEY.fullmatch(key):
        raise argparse.ArgumentTypeError(f"config var name {key!r} must match {ENV_KEY.pattern}")
    if "\x00" in value:
        raise argparse.ArgumentTypeError(f"the value of {key} contains a NUL character")
    return key, value


def _positive_s(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    import argparse

    parser = argparse.ArgumentParser(prog="dynoctl", description="Drive the local dynoagent.")
    parser.add_argument("--socket", default=None,
                        help=f"agent socket (default: $DYNOAGENT_SOCKET or {DEFAULT_SOCKET})")
    # prog given, as argparse would make it: else it builds a help formatter to make it, and
    # that imports shutil (and bz2, lzma) on every start.
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                prog=parser.prog)

    def command(name: str, func: Callable[[Client, argparse.Namespace], int], text: str,
                json_flag: bool = True, app_flag: bool = True) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=text, description=text)
        if json_flag:
            cmd.add_argument("--json", action="store_true", help="print JSON")
        if app_flag:
            cmd.add_argument("-a", "--app", default=None, help="only this app's dynos")
        cmd.set_defaults(func=func)
        return cmd

    command("info", cmd_info, "the agent: version, host, cgroup mode, capacity",
            app_flag=False)
    command("ps", cmd_ps, "list dynos, grouped by process type")
    logs = command("logs", cmd_logs, "show log lines (-t: follow them)")
    logs.add_argument("-t", "--tail", action="store_true", help="follow until Ctrl-C")
    logs.add_argument("-n", "--num", type=_non_negative, default=100,
                      help="how many recent lines (default 100)")
    logs.add_argument("-d", "--dyno", default=None, help="only this dyno (name or id)")
    inspect = command("inspect", cmd_inspect, "one dyno in detail: status, cgroup, limits, stats")
    inspect.add_argument("dyno", help="dyno name (web.1) or id")
    restart = command("restart", cmd_restart,
                      "restart a dyno, every dyno of a process type, or (no argument) all",
                      json_flag=False)
    restart.add_argument("target", nargs="?", default=None, metavar="DYNO|TYPE")
    stop = command("stop", cmd_stop, "stop a dyno (or every dyno of a process type)",
                   json_flag=False)
    stop.add_argument("target", metavar="DYNO|TYPE")
    top = command("top", cmd_top, "live memory and CPU per dyno")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.add_argument("--interval", type=_positive_s, default=TOP_INTERVAL_S,
                     help=f"seconds between frames (default {TOP_INTERVAL_S:g})")
    run = command("run", cmd_run, "run a one-off dyno (attached to this terminal unless "
                  "--detached); exits with its status", json_flag=False)
    run.add_argument("--detached", "-d", action="store_true",
                     help="output to the logs instead of this terminal")
    run.add_argument("-s", "--size", default=None, help="dyno size (default standard-1x)")
    run.add_argument("-e", "--env", type=_config_var, action="append", default=[],
                     metavar="KEY=VALUE", help="a config var for this one-off only, over the "
                     "app's (repeatable)")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND")
    exec_ = command("exec", cmd_exec, "run a command inside a running dyno (like heroku "
                    "ps:exec); exits with its status", json_flag=False)
    exec_.add_argument("dyno", help="dyno name (web.1) or id")
    exec_.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND")
    scale = command("scale", cmd_scale, "change the formation (standalone mode): "
                    "TYPE=N[:SIZE]...; without arguments, show it")
    scale.add_argument("items", nargs="*", metavar="TYPE=N[:SIZE]")
    return parser


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if argv is None:
        leave(code)
    return code


def leave(code: int) -> None:
    """As the process's own command (no argv given): flush our output and exit at once,
    without the interpreter's teardown (a few ms of freeing modules that `dynoctl run` would
    add to every command it runs). Returns only when the output cannot be flushed, so that
    Python's normal exit reports that as it always does."""
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:  # None: the fd was closed when we started
                stream.flush()
    except (OSError, ValueError):
        return
    posix._exit(code & 0xFF)  # as sys.exit(code) would


# `dynoctl run`'s options that take a value, read without argparse (_quick_run_args).
_RUN_VALUES = {"--app": "app", "-a": "app", "--size": "size", "-s": "size"}


def _quick_run_args(argv: list[str]) -> argparse.Namespace | None:
    """`[--socket PATH] run [-a APP] [-s SIZE] [-d] -- COMMAND...`, each option at most once,
    read without argparse (its import and the parser it builds take a few ms of every
    `dynoctl run`) into the namespace argparse would make of it; None for anything else,
    which argparse reads."""
    from types import SimpleNamespace

    def value(i: int) -> str | None:
        # argparse takes a word that starts with "-" for an option, not a value.
        return argv[i] if i < len(argv) and not argv[i].startswith("-") else None

    found: dict[str, str | bool | None] = {"socket": None, "app": None, "size": None,
                                           "detached": False}
    i = 0
    if argv[:1] == ["--socket"]:
        found["socket"] = value(1)
        if found["socket"] is None:
            return None
        i = 2
    if argv[i:i + 1] != ["run"]:
        return None
    i += 1
    seen = set()
    while i < len(argv) and argv[i] != "--":
        arg = argv[i]
        key = "detached" if arg in ("--detached", "-d") else _RUN_VALUES.get(arg)
        if key is None or key in seen:
            return None
        seen.add(key)
        if key == "detached":
            found[key] = True
            i += 1
            continue
        found[key] = value(i + 1)
        if found[key] is None:
            return None
        i += 2
    if i + 1 >= len(argv):  # no "--", or no command after it: argparse says what is wrong
        return None
    args = SimpleNamespace(**found, command=argv[i:], env=[], func=cmd_run)
    return args  # type: ignore[return-value]  # what cmd_run reads of a Namespace


def _main(argv: list[str] | None) -> int:
    args = _quick_run_args(sys.argv[1:] if argv is None else argv)
    if args is None:
        try:
            args = _parser().parse_args(argv)
        except SystemExit as exc:  # argparse: usage error (2) or --help (0)
            return exc.code if isinstance(exc.code, int) else 2
    path = args.socket or getenv("DYNOAGENT_SOCKET") or DEFAULT_SOCKET
    try:
        code: int = args.func(Client(path), args)
    except CtlError as exc:
        print(f"dynoctl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `dynoctl logs | head`: the reader is done; say nothing more.
        drop_stdout()
        return 0
    return code


def text_lines(chunks: Iterable[bytes]) -> Iterator[str]:
    """UTF-8 chunks as text lines, each as soon as it is complete (bad bytes replaced)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    partial = ""
    for chunk in chunks:
        *complete, partial = (partial + decoder.decode(chunk)).split("\n")
        yield from complete
    partial += decoder.decode(b"", final=True)
    if partial:
        yield partial


def drop_stdout() -> None:
    """Point stdout at /dev/null once its reader has gone, so that Python does not complain
    at exit about output it cannot flush."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
