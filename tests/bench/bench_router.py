"""The router of `dynoagent up` (agent/standalone/proxy.py) against the same backend reached
directly: latency of a GET on a kept-alive connection and on a new connection each time,
median and p99, for an app that answers at once and one that works 2 ms per request. The
backend and the router each run in a process of their own; the client is http.client here.
"""

from __future__ import annotations

import http.client
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = 1000  # per series
BLOCK = 100  # series take turns every BLOCK requests, so drift hits them alike
WARMUP = 200

# A web dyno stand-in: aiohttp, HTTP/1.1 with keep-alive, a 1 KiB page.
BACKEND_PY = """\
import asyncio, sys
from aiohttp import web
PAGE = b"x" * 1024
async def now(request):
    return web.Response(body=PAGE, content_type="text/html")
async def work(request):
    await asyncio.sleep(0.002)
    return web.Response(body=PAGE, content_type="text/html")
async def main():
    app = web.Application()
    app.router.add_get("/", now)
    app.router.add_get("/work", work)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.to_thread(sys.stdin.read)
    await runner.cleanup()
asyncio.run(main())
"""

# The router on its own listener, in front of that backend, until stdin closes.
ROUTER_PY = """\
import asyncio, sys
from agent.standalone.proxy import Backend, Router, bind_listener
async def main():
    backend = Backend("web.1", "127.0.0.1", int(sys.argv[1]))
    router = Router(bind_listener("127.0.0.1", 0), lambda: [backend], lambda line: None)
    await router.start()
    print(router.address[1], flush=True)
    await asyncio.to_thread(sys.stdin.read)
    await router.close()
asyncio.run(main())
"""


@contextmanager
def _served(script: str, *args: str) -> Iterator[int]:
    """Run `script` in a child Python; yields the port it prints; closing stdin ends it."""
    proc = subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _kept_alive(port: int, path: str) -> Callable[[], float]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def once() -> float:
        start = time.perf_counter()
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        elapsed = time.perf_counter() - start
        assert response.status == 200, response.status
        return elapsed
    return once


def _new_connection(port: int, path: str) -> Callable[[], float]:
    def once() -> float:
        start = time.perf_counter()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", path, headers={"Connection": "close"})
        response = connection.getresponse()
        response.read()
        elapsed = time.perf_counter() - start
        connection.close()
        assert response.status == 200, response.status
        return elapsed
    return once


def _p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[-1]


def _measure(series: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    for once in series.values():
        for _ in range(WARMUP // 10):
            once()
    results: dict[str, list[float]] = {name: [] for name in series}
    for _ in range(SAMPLES // BLOCK):
        for name, once in series.items():
            results[name].extend(once() * 1000 for _ in range(BLOCK))
    return results


def main() -> None:
    with _served(BACKEND_PY) as backend, _served(ROUTER_PY, str(backend)) as router:
        series: dict[str, Callable[[], float]] = {}
        for path in ("/", "/work"):
            for mode, client in (("kept-alive", _kept_alive), ("new connection", _new_connection)):
                series[f"{path} {mode} direct"] = client(backend, path)
                series[f"{path} {mode} router"] = client(router, path)
        results = _measure(series)
    print(f"GET of a 1 KiB page, {SAMPLES} requests per line (goal: router p99 <= 1.2x direct "
          "on kept-alive connections)")
    for path, what in (("/", "app answers at once"), ("/work", "app works 2 ms")):
        for mode in ("kept-alive", "new connection"):
            direct = results[f"{path} {mode} direct"]
            routed = results[f"{path} {mode} router"]
            print(f"  {what}, {mode}:")
            print(f"    direct  median {statistics.median(direct):6.3f} ms  "
                  f"p99 {_p99(direct):6.3f} ms  max {max(direct):6.2f} ms")
            print(f"    router  median {statistics.median(routed):6.3f} ms  "
                  f"p99 {_p99(routed):6.3f} ms  max {max(routed):6.2f} ms   ratio median "
                  f"{statistics.median(routed) / statistics.median(direct):4.2f}x  "
                  f"p99 {_p99(routed) / _p99(direct):4.2f}x")


if __name__ == "__main__":
    main()
