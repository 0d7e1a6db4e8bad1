"""Each app's log tail on disk, so that `dynoctl logs -n` after an agent restart (a SIGKILL
included) still shows the lines from before it.

Files: `<state_dir>/logs/<app>.log` (the newest lines) and `<app>.log.1` (the ones before),
one line per log line: `time<TAB>source<TAB>dyno<TAB>dyno id<TAB>pid<TAB>seq<TAB>text as a
JSON string` (pid and seq empty for platform lines; cheap to write, ~1 µs a line). Lines are
appended with one `write(2)` per app at the end of the loop's turn, and at once at the end of
every holder output event (`flush`), before the holder's ack: a SIGKILL loses nothing the
holder does not send again (no fsync; a machine crash may lose the last lines). When the
newest file reaches the tail length it becomes `.log.1` (replacing the older one): an app
never keeps more than twice the tail length, and always at least the tail length once it
has printed that much.

App output lines carry their holder numbering (dyno id, pid, seq), so that what the holder
sends again after a reconnect (it re-sends what was not yet acknowledged) is recognised by the
next agent and published once.

Tails of apps with no dyno on this host are kept for `KEEP_S` after their last line (Heroku
keeps an app's logs around; a redeploy should find them), and removed oldest first beyond
`CAP_BYTES` together; apps with dynos are bounded by the tail length alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from agent.observability.logs import TAIL_LINES, LineBlock, LogLine, LogSource
from agent.spec import APP

log = logging.getLogger(__name__)

KEEP_S: Final = 7 * 86400.0  # an app gone from this host keeps its tail a week
CAP_BYTES: Final = 256 * 1024 * 1024  # the tails of apps gone from this host, together
SWEEP_INTERVAL_S: Final = 3600.0

# Where an app output line came from: (dyno id, holder pid, the holder's line number).
Origin = tuple[str, int, int]


@dataclass(frozen=True, slots=True)
class Kept:
    """One line read back from disk."""

    line: LogLine
    origin: Origin | None


@dataclass(frozen=True, slots=True)
class TailFile:
    """An app's tail as the sweep sees it."""

    app: str
    last_write: float  # wall clock, seconds
    size_bytes: int


def tails_to_remove(tails: Iterable[TailFile], live_apps: Collection[str], now: float,
                    keep_s: float = KEEP_S, cap_bytes: int = CAP_BYTES) -> list[str]:
    """The apps whose tails go: never one with a dyno on this host; one without, once its
    last line is `keep_s` old, or the oldest first while those without dynos together exceed
    `cap_bytes`."""
    idle = sorted((t for t in tails if t.app not in live_apps), key=lambda t: t.last_write)
    gone = [t for t in idle if now - t.last_write >= keep_s]
    left = [t for t in idle if now - t.last_write < keep_s]
    total = sum(t.size_bytes for t in left)
    for tail in left:
        if total <= cap_bytes:
            break
        gone.append(tail)
        total -= tail.size_bytes
    return [t.app for t in gone]


_dumps = json.dumps  # the default encoder is the cached C one: keep its arguments default


def encode_text(text: str) -> str:
    """Printable ASCII as it is (most lines: no cost), anything else as a JSON string (ASCII,
    so any text, surrogates included, fits); a JSON string begins with a quote."""
    if text.isascii() and text.isprintable() and not text.startswith('"'):
        return text
    return _dumps(text)


def decode_text(field: str) -> str:
    if not field.startswith('"'):
        return field
    value = json.loads(field)
    if not isinstance(value, str):
        raise ValueError("not a string")
    return value


def encode(line: LogLine, origin: Origin | None, stamp: str | None = None) -> bytes:
    """One line of the file. Dyno names and ids never hold a tab or a newline (validated
    specs). `stamp` is the time as written, when the caller has it already."""
    return _encode_str(line, origin, stamp).encode()


def _encode_str(line: LogLine, origin: Origin | None, stamp: str | None = None) -> str:
    """`encode`, not yet bytes (ASCII: `encode_text` escapes the rest)."""
    pid, seq = ("", "") if origin is None else (origin[1], origin[2])
    if stamp is None:
        stamp = repr(line.at.timestamp())
    return (f"{stamp}\t{line.source}\t{line.dyno}\t{line.dyno_id}\t{pid}\t{seq}\t"
            f"{encode_text(line.text)}\n")


def _plain(texts: list[str]) -> bool:
    """Whether every text is written as it is by `encode_text` (checked at C speed)."""
    joined = "\n".join(texts)
    return (joined.isascii() and not joined.startswith('"') and '\n"' not in joined
            and joined.replace("\n", "").isprintable())


def decode(app: str, raw: bytes) -> Kept | None:
    """A line read back, or None for one that is not (a write cut short by a full disk)."""
    try:
        stamp, source, dyno, dyno_id, pid, seq, text = raw.decode().split("\t", 6)
        at = datetime.fromtimestamp(float(stamp), UTC)
        line = LogLine(at, LogSource(source), dyno, app, decode_text(text), dyno_id)
        origin = None if pid == "" else (dyno_id, int(pid), int(seq))
    except (ValueError, OverflowError, OSError):
        return None
    return Kept(line, origin)


def _encoded(entries: list[str | tuple[str, int, list[str]]], skip: int) -> list[str]:
    """The file's lines of `entries`, one str each, without the first `skip` lines."""
    out: list[str] = []
    for entry in entries:
        if isinstance(entry, str):
            if skip:
                skip -= 1
            else:
                out.append(entry)
            continue
        prefix, seq, texts = entry
        if skip >= len(texts):
            skip -= len(texts)
            continue
        if skip:
            texts, seq, skip = texts[skip:], seq + skip, 0
        if not _plain(texts):
            texts = [encode_text(text) for text in texts]
        if seq < 0:  # platform lines: no pid, no seq
            out += [f"{prefix}\t{text}\n" for text in texts]
        else:
            out += [f"{prefix}{number}\t{text}\n" for number, text in enumerate(texts, seq)]
    return out


class TailStore:
    """Appends published lines to their app's file; reads them back at start. Used from the
    event loop: an append queues the encoded line, a flush is one write per app to the page
    cache."""

    def __init__(self, directory: Path, tail_lines: int = TAIL_LINES) -> None:
        self.directory = directory
        self.tail_lines = tail_lines
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._fds: dict[str, int] = {}
        self._counts: dict[str, int] = {}
        self._failing: set[str] = set()
        # Lines not yet written, per app, written at the end of the loop's turn: one line
        # encoded, or a block of lines (the prefix up to their seq, the first seq, the texts)
        # encoded only when written, and only the lines that stay (see `_write`).
        self._pending: dict[str, list[str | tuple[str, int, list[str]]]] = {}
        self._pending_lines: dict[str, int] = {}
        self._flush_soon = False
        # Lines of one pipe read share their time (the same object): written once per read.
        self._last_at: datetime | None = None
        self._last_stamp = ""
        self._valid: set[str] = set()  # app names checked already
        # Apps whose file ends in a line cut short (a full disk): the next write starts a new
        # line, so that what follows is readable.
        self._torn: set[str] = set()

    def _path(self, app: str, older: bool = False) -> Path:
        return self.directory / (f"{app}.log.1" if older else f"{app}.log")

    def load(self) -> dict[str, list[Kept]]:
        """Every app's kept lines, oldest first, at most the tail length each."""
        kept: dict[str, list[Kept]] = {}
        # An app whose newest file was just rotated has only its `.log.1` until its next line.
        names = {p.name.removesuffix(".1").removesuffix(".log")
                 for pattern in ("*.log", "*.log.1") for p in self.directory.glob(pattern)}
        for app in sorted(names):
            if not APP.fullmatch(app):
                continue
            path = self._path(app)
            lines: list[Kept] = []
            for part in (self._path(app, older=True), path):
                try:
                    data = part.read_bytes()
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    log.error("cannot read the log tail %s: %s", part, exc)
                    continue
                raws = data.split(b"\n")
                if part == path:
                    self._counts[app] = sum(1 for raw in raws if raw)
                    if data and not data.endswith(b"\n"):
                        self._torn.add(app)
                lines += [k for raw in raws if raw and (k := decode(app, raw)) is not None]
            kept[app] = lines[-self.tail_lines:]
        return kept

    def append(self, line: LogLine, origin: Origin | None = None) -> None:
        """Queue a line for its app's file: written by `flush`, at the latest at the end of
        the loop's turn (at once when no loop runs)."""
        app = line.app
        if app not in self._valid:
            if not APP.fullmatch(app):
                return  # never a path of our making: only validated app names get a file
            self._valid.add(app)
        pending = self._pending.get(app)
        if pending is None:
            pending = self._pending[app] = []
        if line.at is not self._last_at:
            self._last_at, self._last_stamp = line.at, repr(line.at.timestamp())
        pending.append(_encode_str(line, origin, self._last_stamp))
        self._pending_lines[app] = self._pending_lines.get(app, 0) + 1
        self._flush_later()

    def append_block(self, block: LineBlock, origin: Origin | None = None) -> None:
        """`append` for each line of the block; `origin` is the first line's, the next lines
        number on from it."""
        app = block.app
        if app not in self._valid:
            if not APP.fullmatch(app):
                return
            self._valid.add(app)
        pending = self._pending.get(app)
        if pending is None:
            pending = self._pending[app] = []
        if block.at is not self._last_at:
            self._last_at, self._last_stamp = block.at, repr(block.at.timestamp())
        pid, seq = ("", 0) if origin is None else (origin[1], origin[2])
        prefix = f"{self._last_stamp}\t{block.source}\t{block.dyno}\t{block.dyno_id}\t{pid}\t"
        pending.append((prefix, -1 if origin is None else seq, block.texts))
        self._pending_lines[app] = self._pending_lines.get(app, 0) + len(block.texts)
        self._flush_later()

    def _flush_later(self) -> None:
        if not self._flush_soon:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._flush_soon = True
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write every queued line (to the page cache: a process kill loses none of it)."""
        self._flush_soon = False
        pending, self._pending = self._pending, {}
        counts, self._pending_lines = self._pending_lines, {}
        for app, entries in pending.items():
            self._write(app, entries, counts.get(app, 0))

    def _write(self, app: str, entries: list[str | tuple[str, int, list[str]]],
               total: int) -> None:
        try:
            # Lines that would only land in a file replaced before this write ends are not
            # written at all: the files end as if they had been (a burst costs the tail
            # length, not its own length).
            count = self._counts.get(app, 0)
            keep_from = (count + total) // self.tail_lines - 1
            skip = keep_from * self.tail_lines - count if keep_from > 0 else 0
            if skip > 0:
                fd = self._fds.pop(app, None)
                if fd is not None:
                    os.close(fd)
                with contextlib.suppress(FileNotFoundError):
                    self._rotate(app)
                self._torn.discard(app)
                self._counts[app] = 0
            lines = _encoded(entries, skip)
            while lines:
                fd = self._fds.get(app)
                if fd is None:
                    fd = os.open(self._path(app), os.O_WRONLY | os.O_APPEND | os.O_CREAT |
                                 os.O_CLOEXEC, 0o600)
                    self._fds[app] = fd
                count = self._counts.get(app, 0)
                room = max(1, self.tail_lines - count)
                batch, lines = lines[:room], lines[room:]
                data = "".join(batch).encode()
                if app in self._torn:
                    data = b"\n" + data
                os.write(fd, data)
                self._torn.discard(app)
                count += len(batch)
                if count >= self.tail_lines:
                    self._rotate(app)
                    os.close(self._fds.pop(app))
                    count = 0
                self._counts[app] = count
        except OSError as exc:
            # The line stays in the memory tail; the disk one misses it. Said once per app
            # until writing works again, not once per line.
            if app not in self._failing:
                self._failing.add(app)
                log.error("cannot keep the log tail of %s on disk: %s", app, exc)
            return
        self._failing.discard(app)

    def _rotate(self, app: str) -> None:
        """The newest file (full) becomes the older one. The older one goes first: ext4
        (auto_da_alloc) writes a file renamed over another out at once, some 0.5 ms a
        rotation; a kill in between loses only lines the full newest file outnumbers."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(app, older=True))
        os.rename(self._path(app), self._path(app, older=True))

    def files(self) -> list[TailFile]:
        tails: dict[str, TailFile] = {}
        for path in self.directory.glob("*.log*"):
            app = path.name.split(".log", 1)[0]
            try:
                st = path.stat()
            except OSError:
                continue
            old = tails.get(app)
            tails[app] = TailFile(app, max(st.st_mtime, old.last_write if old else 0.0),
                                  st.st_size + (old.size_bytes if old else 0))
        return list(tails.values())

    def to_remove(self, live_apps: Collection[str], now: float) -> list[str]:
        return tails_to_remove(self.files(), live_apps, now)

    def remove(self, app: str) -> None:
        self._pending.pop(app, None)
        fd = self._fds.pop(app, None)
        if fd is not None:
            os.close(fd)
        self._counts.pop(app, None)
        for path in (self._path(app), self._path(app, older=True)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def close(self) -> None:
        self.flush()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
