"""The dyno's own /etc/hosts, /etc/hostname and /etc/resolv.conf: their text (pure functions)
and reading the host's resolver configuration they derive from."""

from __future__ import annotations

import ipaddress

# Debian's convention for a host's own name when it has no fixed address.
FALLBACK_ADDRESS = "127.0.1.1"
HOST_RESOLV_CONF = "/etc/resolv.conf"
# systemd-resolved's list of real upstream servers, behind its 127.0.0.53 stub.
RESOLVED_UPSTREAM = "/run/systemd/resolve/resolv.conf"
FILE_NAMES = ("hosts", "hostname", "resolv.conf")


def hosts_text(hostname: str, private_ip: str | None, aliases: tuple[str, ...] = ()) -> str:
    """/etc/hosts: localhost lines and the dyno's hostname on its private address.

    Without the line for its own name a dyno's `socket.getfqdn()` (which Python's
    http.server calls on bind) falls through to DNS and stalls for the resolver's timeout.
    """
    names = " ".join(dict.fromkeys((hostname, *aliases)))
    return ("127.0.0.1\tlocalhost\n"
            "::1\tlocalhost ip6-localhost ip6-loopback\n"
            f"{private_ip or FALLBACK_ADDRESS}\t{names}\n")


def hostname_text(hostname: str) -> str:
    return hostname + "\n"


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def nameservers(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            out.append(fields[1])
    return out


def resolv_conf_text(host_text: str) -> str:
    """The host's resolv.conf minus nameservers on loopback.

    A loopback resolver (dnsmasq, systemd-resolved's stub) listens in the host's network
    namespace; from the dyno's namespace the same address is its own, empty loopback. Without
    any nameserver line glibc tries 127.0.0.1, where nothing listens in the dyno: the query is
    refused at once instead of hanging until a timeout.
    """
    kept: list[str] = []
    dropped: list[str] = []
    for line in host_text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver" and is_loopback(fields[1]):
            dropped.append(fields[1])
        else:
            kept.append(line)
    if dropped:
        kept.insert(0, f"# dynoagent: dropped loopback nameserver(s) {' '.join(dropped)}, "
                       "unreachable from the dyno's network namespace")
        if not nameservers("\n".join(kept)):
            kept.insert(1, "# dynoagent: no reachable nameserver; DNS lookups fail at once")
    return "\n".join(kept) + "\n"


def resolv_conf_for_space(gateway: str) -> str:
    """/etc/resolv.conf of a dyno in a space with DNS discovery: only the space's resolver,
    the agent listening on the bridge gateway, which answers the space's `.localspace` names
    and forwards every other name to the host's resolvers.

    No `search` line: the host's search domains are the host's business, and a dyno's
    `web.shop.app.localspace` must be looked up as written, not first under each of them.
    """
    return ("# dynoagent: the space's resolver (*.app.localspace; other names forwarded to "
            "the host's)\n"
            f"nameserver {gateway}\n")


def read_host_resolv_conf(path: str = HOST_RESOLV_CONF,
                          upstream_path: str = RESOLVED_UPSTREAM) -> str:
    """The host's resolver configuration ("" if it has none).

    When every nameserver of `path` is on loopback but systemd-resolved publishes its
    upstream servers, those are what a dyno can actually reach (Docker does the same).
    """
    text = _read(path)
    servers = nameservers(text)
    if servers and all(is_loopback(s) for s in servers):
        upstream = _read(upstream_path)
        if nameservers(upstream) and not any(is_loopback(s) for s in nameservers(upstream)):
            return upstream
    return text


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(64 * 1024)
    except OSError:
        return ""


def etc_files(hostname: str, private_ip: str | None, aliases: tuple[str, ...],
              host_resolv_conf: str, nameserver: str | None = None) -> dict[str, str]:
    """File name (under /etc) -> content, in FILE_NAMES order. With `nameserver` (the
    space's resolver) resolv.conf names only it, else it is derived from the host's."""
    return {"hosts": hosts_text(hostname, private_ip, aliases),
            "hostname": hostname_text(hostname),
            "resolv.conf": (resolv_conf_text(host_resolv_conf) if nameserver is None
                            else resolv_conf_for_space(nameserver))}
