"""`dynoctl`: the operator client of the agent's Unix socket (Heroku CLI vocabulary)."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
from typing import Any

DEFAULT_SOCKET = "/run/dynoagent/dynoagent.sock"


class CtlError(Exception):
    """A failure to report as one line on stderr with exit status 1."""


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout_s: float) -> None:
        super().__init__("dynoagent", timeout=timeout_s)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Client:
    def __init__(self, socket_path: str, timeout_s: float = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout_s = timeout_s

    def request(self, method: str, path: str, body: Any = None) -> Any:
        conn = UnixHTTPConnection(self.socket_path, self.timeout_s)
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            try:
                conn.request(method, path, body=payload, headers=headers)
                response = conn.getresponse()
                raw = response.read()
            except OSError as exc:
                reason = exc.strerror or str(exc)
                raise CtlError(f"cannot reach dynoagent at {self.socket_path}: {reason}") from None
            except http.client.HTTPException as exc:
                raise CtlError(f"bad answer from dynoagent at {self.socket_path}: {exc}") from None
        finally:
            conn.close()
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            raise CtlError(f"dynoagent answered {response.status} with non-JSON data") from None
        if response.status >= 400:
            error = (data or {}).get("error", {}) if isinstance(data, dict) else {}
            raise CtlError(f"{error.get('message', response.reason)} "
                           f"({error.get('code', response.status)})")
        return data


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynoctl", description="Drive the local dynoagent.")
    parser.add_argument("--socket", default=None,
                        help=f"agent socket (default: $DYNOAGENT_SOCKET or {DEFAULT_SOCKET})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="the agent: version, host, cgroup mode, capacity")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    path = args.socket or os.environ.get("DYNOAGENT_SOCKET") or DEFAULT_SOCKET
    try:
        code: int = args.func(Client(path), args)
    except CtlError as exc:
        print(f"dynoctl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
