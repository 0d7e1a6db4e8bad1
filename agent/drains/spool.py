"""A drain's frames on disk, so that an agent SIGKILLed with lines still queued for a drain
sends them after its restart (at least once) instead of losing them silently.

`<state_dir>/drains/<token>/`: `meta.json` (app and URL), numbered segment files of frames
as they go on the wire (`00000001.spool`, …), and `cursor` (segment and byte offset of the
first frame not yet delivered). Frames are appended with one write(2) per loop turn (the
drain's `flush`), to the page cache: a process kill loses none of them, a machine crash may
lose the last ones (no fsync, like the log tail). A segment wholly delivered is removed; the
undelivered part is at most the drain's queue, so the disk taken is bounded by the queue's
bound plus one segment.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections import deque
from pathlib import Path
from typing import Final

from agent.drains.rfc5424 import FrameError, split_frames

log = logging.getLogger(__name__)

SEGMENT_BYTES: Final = 8 * 1024 * 1024
_CURSOR_WIDTH: Final = 42  # "<segment> <offset>\n", padded: one pwrite, never a torn record


class Spool:
    def __init__(self, directory: Path, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Segments not yet wholly delivered, oldest first: [number, bytes written].
        self._segments: deque[list[int]] = deque()
        self._offset = 0  # into the oldest segment: the first byte not yet delivered
        self._fd: int | None = None  # the newest segment, open for appending
        self._cursor_fd = os.open(directory / "cursor", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                  0o600)
        self._failing = False

    @staticmethod
    def write_meta(directory: Path, app: str | None, url: str) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = directory / "meta.json.tmp"
        tmp.write_text(json.dumps({"app": app, "url": url}))
        os.replace(tmp, directory / "meta.json")

    @staticmethod
    def read_meta(directory: Path) -> tuple[str | None, str] | None:
        try:
            data = json.loads((directory / "meta.json").read_text())
            app, url = data["app"], data["url"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if (app is not None and not isinstance(app, str)) or not isinstance(url, str):
            return None
        return app, url

    def _path(self, number: int) -> Path:
        return self.directory / f"{number:08d}.spool"

    def load(self) -> list[bytes]:
        """The frames not yet delivered (from before an agent restart), oldest first; new
        frames go to a new segment after them."""
        try:
            raw = os.pread(self._cursor_fd, _CURSOR_WIDTH, 0).split()
            first, offset = (int(raw[0]), int(raw[1])) if len(raw) == 2 else (0, 0)
        except (OSError, ValueError):
            first, offset = 0, 0
        numbers = sorted(int(p.stem) for p in self.directory.glob("*.spool")
                         if p.stem.isdigit())
        frames: list[bytes] = []
        for number in numbers:
            if number < first:
                with contextlib.suppress(OSError):
                    self._path(number).unlink()
                continue
            start = offset if number == first else 0
            try:
                data = self._path(number).read_bytes()
            except OSError as exc:
                log.error("cannot read the drain spool %s: %s", self._path(number), exc)
                continue
            try:
                found, used = split_frames(data[start:])
            except FrameError as exc:
                log.error("drain spool %s is damaged after byte %d: %s",
                          self._path(number), start, exc)
                found, used = [], 0
            if not self._segments:
                self._offset = start
            frames += found
            # A torn or damaged end is skipped: the segment ends where its frames end.
            self._segments.append([number, start + used])
        # New frames start a new segment: the old ones may end in a torn write.
        last = numbers[-1] if numbers else 0
        self._segments.append([last + 1, 0])
        if len(self._segments) == 1:
            self._offset = 0
        self._save_cursor()
        return frames

    def append(self, frames: list[bytes]) -> None:
        """One write of `frames` at the end of the newest segment."""
        if not self._segments:
            self._segments.append([1, 0])
        data = b"".join(frames)
        try:
            if self._fd is None:
                self._fd = os.open(self._path(self._segments[-1][0]),
                                   os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(f"short write ({written} of {len(data)} bytes)")
        except OSError as exc:
            if not self._failing:
                self._failing = True
                log.error("cannot keep drain frames on disk in %s: %s (they are still sent; "
                          "an agent restart would lose them)", self.directory, exc)
            # What was written counts; the rest is not on disk, so its bytes are not either.
            return
        self._failing = False
        segment = self._segments[-1]
        segment[1] += len(data)
        if segment[1] >= self.segment_bytes:
            os.close(self._fd)
            self._fd = None
            self._segments.append([segment[0] + 1, 0])

    def confirm(self, nbytes: int) -> None:
        """`nbytes` more at the head were delivered: move the cursor over them, removing
        segments left behind."""
        self._offset += nbytes
        while len(self._segments) > 1 and self._offset >= self._segments[0][1]:
            number, size = self._segments.popleft()
            self._offset -= size
            with contextlib.suppress(OSError):
                self._path(number).unlink()
        self._save_cursor()

    def _save_cursor(self) -> None:
        first = self._segments[0][0] if self._segments else 0
        record = f"{first} {self._offset}".ljust(_CURSOR_WIDTH - 1) + "\n"
        with contextlib.suppress(OSError):
            os.pwrite(self._cursor_fd, record.encode(), 0)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        os.close(self._cursor_fd)

    def remove(self) -> None:
        """The drain is gone and has nothing left to send: its directory goes too."""
        self.close()
        for path in self.directory.iterdir():
            with contextlib.suppress(OSError):
                path.unlink()
        with contextlib.suppress(OSError):
            self.directory.rmdir()
