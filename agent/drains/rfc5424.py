"""Lines as drains carry them: RFC 5424 messages the way Heroku's Logplex writes them, in RFC
6587 octet-counted frames (`<length> <message>`, the same framing for syslog over TCP and TLS
and for the body of an `application/logplex-1` POST).

`<190>1 2026-11-26T10:00:00.123456+00:00 host app web.1 - Hello`: PRI local7.info for app
output, local3.info (158) with app-name `heroku` for platform lines; hostname `host`; procid
the dyno's name; msgid `-`; no STRUCTURED-DATA field (Heroku writes none, and rsyslog 8.2302
reads these messages as they are).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Final

from agent.observability.logs import LogLine, LogSource, format_timestamp

PRI_APP: Final = 190  # facility local7 (23) * 8 + severity info (6)
PRI_PLATFORM: Final = 158  # facility local3 (19) * 8 + info
HOSTNAME: Final = "host"
L10_PROCID: Final = "logplex"


class Formatter:
    """Formats lines into frames; remembers the last timestamp, since the lines of one pipe
    read share their time (one object), so a batch formats it once."""

    __slots__ = ("_app_head", "_last_at", "_last_stamp", "_platform_head")

    def __init__(self) -> None:
        # What comes before and after the procid.
        self._app_head = f"{HOSTNAME} app ", " - "
        self._platform_head = f"{HOSTNAME} heroku ", " - "
        self._last_at: datetime | None = None
        self._last_stamp = ""

    def message(self, line: LogLine) -> bytes:
        """The RFC 5424 message of `line` (UTF-8, no trailing newline)."""
        at = line.at
        if at is not self._last_at:
            self._last_at, self._last_stamp = at, format_timestamp(at)
        if line.source is LogSource.APP:
            pri, (head, tail) = PRI_APP, self._app_head
        else:
            pri, (head, tail) = PRI_PLATFORM, self._platform_head
        return (f"<{pri}>1 {self._last_stamp} {head}{line.dyno}{tail}{line.text}"
                .encode("utf-8", "surrogateescape"))

    def frames(self, at: datetime, source: LogSource, dyno: str, texts: Iterable[str]
               ) -> list[bytes]:
        """The frames of consecutive lines of one dyno with one time (one pipe read)."""
        if at is not self._last_at:
            self._last_at, self._last_stamp = at, format_timestamp(at)
        pri, (head, tail) = ((PRI_APP, self._app_head) if source is LogSource.APP
                             else (PRI_PLATFORM, self._platform_head))
        prefix = f"<{pri}>1 {self._last_stamp} {head}{dyno}{tail}".encode()
        size = len(prefix)
        encoded = [text.encode("utf-8", "surrogateescape") for text in texts]
        return [b"%d %s%s" % (size + len(data), prefix, data) for data in encoded]

    def frame(self, line: LogLine) -> bytes:
        """`<octets> <message>` (RFC 6587 §3.4.1)."""
        message = self.message(line)
        return b"%d %s" % (len(message), message)

    def notice(self, at: datetime, text: str) -> bytes:
        """A frame of the drain's own (Heroku's `heroku logplex - Error L10 …`)."""
        message = (f"<{PRI_PLATFORM}>1 {format_timestamp(at)} {self._platform_head[0]}"
                   f"{L10_PROCID}{self._platform_head[1]}{text}").encode()
        return b"%d %s" % (len(message), message)


def frame(message: bytes) -> bytes:
    return b"%d %s" % (len(message), message)


def l10_text(dropped: int, since: datetime) -> str:
    """Heroku's wording: `Error L10 (output buffer overflow): N messages dropped since T`."""
    return (f"Error L10 (output buffer overflow): {dropped} messages dropped since "
            f"{format_timestamp(since)}")


class FrameError(ValueError):
    pass


def split_frames(data: bytes) -> tuple[list[bytes], int]:
    """The whole frames at the start of `data` and how many bytes they take (a frame cut
    short at the end is left). Raises FrameError on bytes that are not a frame."""
    frames: list[bytes] = []
    pos = 0
    end = len(data)
    while pos < end:
        space = data.find(b" ", pos, pos + 12)
        if space < 0:
            if end - pos >= 12:
                raise FrameError(f"no frame length at byte {pos}")
            break
        digits = data[pos:space]
        if not digits.isdigit():
            raise FrameError(f"bad frame length {digits[:12]!r} at byte {pos}")
        stop = space + 1 + int(digits)
        if stop > end:
            break
        frames.append(data[pos:stop])
        pos = stop
    return frames, pos
