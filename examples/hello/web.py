"""The hello app's web process: an HTML page naming the dyno that served it, with a counter."""

from __future__ import annotations

import contextlib
import html
import itertools
import os
import signal
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DYNO = os.environ.get("DYNO", "web.?")
PORT = int(os.environ.get("PORT", "5000"))
GREETING = os.environ.get("GREETING", "Hello from dynoagent")
_hits = itertools.count(1)
_lock = threading.Lock()

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{greeting}</title>
<style>body{{font-family:sans-serif;margin:3em}} .dyno{{font-size:2em;color:#6762a6}}</style>
</head><body>
<h1>{greeting}</h1>
<p class="dyno">served by <b id="dyno">{dyno}</b></p>
<p>request <b id="count">{count}</b> to this dyno &middot; host {host} &middot;
private IP {ip} &middot; pid {pid}</p>
<p>Reload to see the router take turns between web dynos; try <code>dynoctl scale web=3</code>.</p>
</body></html>
"""


class Handler(BaseHTTPRequestHandler):
    server_version = "hello/1"

    def do_GET(self) -> None:
        with _lock:
            count = next(_hits)
        body = PAGE.format(greeting=html.escape(GREETING), dyno=html.escape(DYNO), count=count,
                           host=html.escape(socket.gethostname()),
                           ip=html.escape(os.environ.get("DYNOAGENT_PRIVATE_IP", "?")),
                           pid=os.getpid()).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Dyno", DYNO)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        # One line per request on stdout, which the agent turns into the dyno's log.
        print(f'{self.address_string()} "{self.requestline}" {args[1] if len(args) > 1 else ""}')


def main() -> None:
    server = ThreadingHTTPServer(("0.0.0.0", PORT), Handler)
    server.daemon_threads = True
    print(f"{DYNO} listening on port {PORT}")
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


def _terminate(*_: object) -> None:
    # SIGTERM (the agent's graceful stop) ends the server the way Ctrl-C would.
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    main()
    print(f"{DYNO} stopped")
