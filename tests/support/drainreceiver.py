"""A log drain receiver for tests, run as its own process (in a test host's namespace, so a
test can SIGKILL it mid-stream):

  python -m tests.support.drainreceiver http PORT OUT [--cert PEM --key PEM] [--fail-first N]
  python -m tests.support.drainreceiver syslog PORT OUT [--slow] [--mark TEXT]

`http`: an aiohttp server taking logplex POSTs; each request is one JSON line in OUT with its
headers and body (answered 503 for the first N). `syslog`: a TCP server appending what it reads
to OUT; `--slow` reads ~10 lines a second (a small receive buffer, 1 KiB a second) until
SIGUSR1, then everything at full speed; `--mark`: prints `first T` at the first bytes and
`mark T` once TEXT has come (T: CLOCK_MONOTONIC, the same in every process). Prints "ready"
once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import signal
import socket
import ssl
import sys
import time

from aiohttp import web


async def _http(args: argparse.Namespace) -> None:
    failures = args.fail_first
    out = open(args.out, "ab", buffering=0)  # noqa: SIM115, ASYNC230 - the process's life

    async def handle(request: web.Request) -> web.Response:
        nonlocal failures
        body = await request.read()
        status = 200
        if failures > 0:
            failures -= 1
            status = 503
        record = {"status": status, "headers": dict(request.headers),
                  "body": base64.b64encode(body).decode()}
        out.write(json.dumps(record).encode() + b"\n")
        return web.Response(status=status)

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/{tail:.*}", handle)
    context = None
    if args.cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port, ssl_context=context).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def _syslog(args: argparse.Namespace) -> None:
    out = open(args.out, "ab", buffering=0)  # noqa: SIM115, ASYNC230 - the process's life
    fast = asyncio.Event()
    if not args.slow:
        fast.set()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, fast.set)

    mark = args.mark.encode() if args.mark else None
    first = True
    tail = b""

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal first, tail, mark
        while True:
            if fast.is_set():
                data = await reader.read(1 << 20)
            else:
                data = await reader.read(100)
                if not fast.is_set():
                    await asyncio.sleep(0.1)
            if not data:
                break
            out.write(data)
            if mark is not None:
                if first:
                    first = False
                    print(f"first {time.monotonic()}", flush=True)
                if mark in tail + data:
                    print(f"mark {time.monotonic()}", flush=True)
                    mark = None
                tail = data[-len(mark):] if mark else b""
        writer.close()

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if args.slow:
        # Before listen(): accepted sockets inherit it, and a small window fills at once.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind(("127.0.0.1", args.port))
    server = await asyncio.start_server(client, sock=sock, limit=1 << 20)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=("http", "syslog"))
    parser.add_argument("port", type=int)
    parser.add_argument("out")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--fail-first", type=int, default=0)
    parser.add_argument("--slow", action="store_true")
    parser.add_argument("--mark")
    args = parser.parse_args()
    asyncio.run(_http(args) if args.kind == "http" else _syslog(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
