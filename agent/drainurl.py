"""Log drain URLs (DESIGN §5 `log_drains`): `syslog://H:P`, `syslog+tls://H:P`, `https://…`
and `http://…` (local use), validated once at the edge (spec, config) into a DrainUrl."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

from agent.errors import excerpt

MAX_DRAINS: Final = 5  # Heroku: at most 5 drains per app
URL_MAX_CHARS: Final = 4096
# uuid5 namespace of drain tokens (`d.<uuid>`): stable for one app and URL across restarts.
_TOKEN_NAMESPACE: Final = uuid.UUID("5c1d7a52-9d3e-4b8e-a1f3-0b6a2f1e9c40")


class DrainUrlError(ValueError):
    """A drain URL (or list of them) is not usable; `value` is the offending one."""

    def __init__(self, message: str, value: Any) -> None:
        super().__init__(message)
        self.value = value


class Transport(StrEnum):
    SYSLOG = "syslog"  # RFC 5424 + RFC 6587 octet counting over TCP
    SYSLOG_TLS = "syslog+tls"
    HTTP = "http"  # application/logplex-1 POSTs
    HTTPS = "https"

    @property
    def is_syslog(self) -> bool:
        return self in (Transport.SYSLOG, Transport.SYSLOG_TLS)

    @property
    def uses_tls(self) -> bool:
        return self in (Transport.SYSLOG_TLS, Transport.HTTPS)


@dataclass(frozen=True, slots=True)
class DrainUrl:
    url: str  # as given
    transport: Transport
    host: str
    port: int

    @property
    def redacted(self) -> str:
        """The URL without credentials, query or fragment (tokens often live there): what
        logs and metrics show."""
        parts = urlsplit(self.url)
        host = f"[{self.host}]" if ":" in self.host else self.host
        return urlunsplit((parts.scheme, f"{host}:{self.port}", parts.path, "", ""))

    def token(self, app: str | None) -> str:
        """Heroku's drain token, `d.<uuid>`, the same for one app (None: host-wide) and URL."""
        return "d." + str(uuid.uuid5(_TOKEN_NAMESPACE, f"{app or '*'}\n{self.url}"))


def parse_drain_url(value: Any) -> DrainUrl:
    if not isinstance(value, str):
        raise DrainUrlError(f"must be a string, got {type(value).__name__}", value)
    if len(value) > URL_MAX_CHARS or any(c.isspace() or ord(c) < 32 for c in value):
        raise DrainUrlError(f"must be at most {URL_MAX_CHARS} characters with no spaces or "
                            f"control characters", value)
    try:
        parts = urlsplit(value)
        host = parts.hostname
        port = parts.port
    except ValueError as exc:
        raise DrainUrlError(f"is not a URL ({exc}): {excerpt(value)}", value) from None
    try:
        transport = Transport(parts.scheme)
    except ValueError:
        raise DrainUrlError("must be a syslog://HOST:PORT, syslog+tls://HOST:PORT, https:// "
                            f"or http:// URL, got {excerpt(value)}", value) from None
    if not host:
        raise DrainUrlError(f"has no host: {excerpt(value)}", value)
    if transport.is_syslog:
        if port is None:
            raise DrainUrlError(f"a syslog drain needs a port (syslog://HOST:PORT), got "
                                f"{excerpt(value)}", value)
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise DrainUrlError(f"a syslog drain is HOST:PORT only, got {excerpt(value)}",
                                value)
    if port == 0:
        raise DrainUrlError(f"port must be 1-65535, got {excerpt(value)}", value)
    if port is None:
        port = 443 if transport is Transport.HTTPS else 80
    return DrainUrl(value, transport, host, port)


def parse_drain_list(value: Any) -> tuple[DrainUrl, ...]:
    """A list of at most MAX_DRAINS distinct drain URLs."""
    if not isinstance(value, list | tuple):
        raise DrainUrlError(f"must be a list of URLs, got {type(value).__name__}", value)
    if len(value) > MAX_DRAINS:
        raise DrainUrlError(f"at most {MAX_DRAINS} drains, got {len(value)}", value)
    drains: list[DrainUrl] = []
    for index, item in enumerate(value):
        try:
            drain = parse_drain_url(item)
        except DrainUrlError as exc:
            raise DrainUrlError(f"[{index}]: {exc}", exc.value) from None
        if any(d.url == drain.url for d in drains):
            raise DrainUrlError(f"[{index}]: {excerpt(drain.url)} is listed twice", item)
        drains.append(drain)
    return tuple(drains)
