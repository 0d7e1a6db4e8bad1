"""A thread that calls `poll` every `interval_s` until `close`: the shape of the tests' API
probes."""

from __future__ import annotations

import threading


class Poller:
    interval_s = 0.02
    join_s = 10.0

    def start(self) -> None:
        """Start polling; a subclass calls it once its own attributes are set."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def poll(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.interval_s)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(self.join_s)
