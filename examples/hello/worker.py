"""The hello app's worker process: a line every few seconds until SIGTERM."""

from __future__ import annotations

import os
import signal
import threading

DYNO = os.environ.get("DYNO", "worker.?")
INTERVAL_S = float(os.environ.get("WORKER_INTERVAL_S", "3"))
stop = threading.Event()


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    jobs = 0
    print(f"{DYNO} started; working every {INTERVAL_S:g}s")
    while not stop.wait(INTERVAL_S):
        jobs += 1
        print(f"{DYNO} did job {jobs}")
    print(f"{DYNO} got SIGTERM after {jobs} jobs; bye")


if __name__ == "__main__":
    main()
