"""The etcd key layout: every key the coordinator reads or writes, under one prefix, made and
parsed here only.

| key (under the prefix, `/dynocoord`) | value                        | written when           |
|--------------------------------------|------------------------------|------------------------|
| `/apps/{app}`                        | model.App                    | app created            |
| `/releases/{app}/{version:020d}`     | model.Release                | release created        |
| `/formation/{app}/{type}`            | model.FormationEntry         | formation changed      |
| `/hosts/{host}`                      | model.Host                   | hello, state change    |
| `/alive/{host}`                      | boot id, on the leader's lease | hello (gone with it)   |
| `/placements/{host}/{dyno}`          | model.Placement              | placed, removed        |
| `/generations/{host}`                | the host's generation (text) | with its placements    |
| `/runs/{app}/{dyno}`                 | a one-off's command (JSON)   | one-off or release run |
| `/phases/{app}/{version:020d}`       | a release phase's outcome    | release with `release` |
| `/spaces/{space}`                    | model.Space (subnet, VNI)    | app created, or placed |
| `/slices/{space}/{host}`             | model.SpaceSlice             | space first on host    |
| `/leader`                            | leader id, on election lease | elected                |

Why these shapes:
- Versions are zero-padded to 20 digits (2**63-1 has 19) so that etcd's byte order is version
  order: the current release is one range read, descending, limit 1.
- Liveness is a key of its own on the host's lease, not the host record: a lease that expires
  deletes only `/alive/{host}`, and the record (capacity, labels, state) stays to say the host
  is `lost`. A watch on `/alive/` sees a host die as one delete event.
- Placements are indexed **by host only**. The per-host desired set (what `dynos.sync`
  sends) and a lost host's dynos are each one prefix read, and a placement costs one key: a
  second index by app would double the keys written per dyno and need a transaction to keep
  the two in step, for reads that the leader serves from the complete view it holds anyway
  (placement is global: spreading and capacity need every host's dynos, so the leader loads
  `/placements/` once and follows it with a watch).
- A space's slices are their own tree, `/slices/{space}/`, not under `/spaces/{space}/`:
  deleting a space is then one key and one prefix, and a prefix delete of `/spaces/shop`
  could not tell `shop` from `shop2` anyway. A space is an app for now (same name).
- The generation sits beside the placements, written in the same transaction as a host's
  placement changes, so a coordinator restarted at any moment sends the generation that goes
  with the set it reads.

App names, host ids, process types and dyno ids never contain "/" (model.py checks them), so
every key parses back unambiguously.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "/dynocoord"
VERSION_DIGITS = 20


class BadKey(ValueError):
    """A key is not one of this layout's (or not under this prefix)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key!r}: {message}")
        self.key = key


def range_end(prefix: str) -> str:
    """The end of etcd's range for every key starting with `prefix` (its last byte + 1)."""
    data = prefix.encode()
    while data and data[-1] == 0xFF:
        data = data[:-1]
    if not data:
        return "\x00"  # etcd: from the key to the end of the keyspace
    return (data[:-1] + bytes([data[-1] + 1])).decode("utf-8", "surrogateescape")


@dataclass(frozen=True, slots=True)
class Keys:
    """The key layout under `prefix` (no trailing slash; "" is the keyspace's root)."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if self.prefix.endswith("/") or (self.prefix and not self.prefix.startswith("/")):
            raise ValueError(f"a key prefix starts with / and does not end with one, "
                             f"got {self.prefix!r}")

    # ------------------------------------------------------------ apps
    def apps(self) -> str:
        return f"{self.prefix}/apps/"

    def app(self, app: str) -> str:
        return f"{self.prefix}/apps/{app}"

    def parse_app(self, key: str) -> str:
        (app,) = self._parse(key, "apps", 1)
        return app

    # ------------------------------------------------------------ releases
    def releases(self, app: str) -> str:
        return f"{self.prefix}/releases/{app}/"

    def release(self, app: str, version: int) -> str:
        if not 0 <= version < 10**VERSION_DIGITS:
            raise ValueError(f"release version out of range: {version}")
        return f"{self.prefix}/releases/{app}/{version:0{VERSION_DIGITS}d}"

    def parse_release(self, key: str) -> tuple[str, int]:
        app, version = self._parse(key, "releases", 2)
        if len(version) != VERSION_DIGITS or not version.isascii() or not version.isdigit():
            raise BadKey(key, f"a release version is {VERSION_DIGITS} decimal digits")
        return app, int(version)

    # ------------------------------------------------------------ formation
    def formations(self) -> str:
        return f"{self.prefix}/formation/"

    def formation(self, app: str) -> str:
        return f"{self.prefix}/formation/{app}/"

    def formation_entry(self, app: str, kind: str) -> str:
        return f"{self.prefix}/formation/{app}/{kind}"

    def parse_formation_entry(self, key: str) -> tuple[str, str]:
        app, kind = self._parse(key, "formation", 2)
        return app, kind

    # ------------------------------------------------------------ hosts
    def hosts(self) -> str:
        return f"{self.prefix}/hosts/"

    def host(self, host: str) -> str:
        return f"{self.prefix}/hosts/{host}"

    def parse_host(self, key: str) -> str:
        (host,) = self._parse(key, "hosts", 1)
        return host

    def alives(self) -> str:
        return f"{self.prefix}/alive/"

    def alive(self, host: str) -> str:
        return f"{self.prefix}/alive/{host}"

    def parse_alive(self, key: str) -> str:
        (host,) = self._parse(key, "alive", 1)
        return host

    # ------------------------------------------------------------ placements
    def placements(self) -> str:
        return f"{self.prefix}/placements/"

    def host_placements(self, host: str) -> str:
        return f"{self.prefix}/placements/{host}/"

    def placement(self, host: str, dyno: str) -> str:
        return f"{self.prefix}/placements/{host}/{dyno}"

    def parse_placement(self, key: str) -> tuple[str, str]:
        host, dyno = self._parse(key, "placements", 2)
        return host, dyno

    def generations(self) -> str:
        return f"{self.prefix}/generations/"

    def generation(self, host: str) -> str:
        return f"{self.prefix}/generations/{host}"

    def parse_generation(self, key: str) -> str:
        (host,) = self._parse(key, "generations", 1)
        return host

    # ------------------------------------------------------------ one-shot dynos
    def runs(self, app: str | None = None) -> str:
        return f"{self.prefix}/runs/" + (f"{app}/" if app else "")

    def run(self, app: str, dyno: str) -> str:
        return f"{self.prefix}/runs/{app}/{dyno}"

    def phases(self, app: str | None = None) -> str:
        return f"{self.prefix}/phases/" + (f"{app}/" if app else "")

    def phase(self, app: str, version: int) -> str:
        return f"{self.prefix}/phases/{app}/{version:0{VERSION_DIGITS}d}"

    # ------------------------------------------------------------ private spaces
    def spaces(self) -> str:
        return f"{self.prefix}/spaces/"

    def space(self, space: str) -> str:
        return f"{self.prefix}/spaces/{space}"

    def parse_space(self, key: str) -> str:
        (space,) = self._parse(key, "spaces", 1)
        return space

    def slices(self, space: str | None = None) -> str:
        return f"{self.prefix}/slices/" + (f"{space}/" if space else "")

    def slice(self, space: str, host: str) -> str:
        return f"{self.prefix}/slices/{space}/{host}"

    def parse_slice(self, key: str) -> tuple[str, str]:
        space, host = self._parse(key, "slices", 2)
        return space, host

    # ------------------------------------------------------------ election
    def leader(self) -> str:
        return f"{self.prefix}/leader"

    # ------------------------------------------------------------ parsing
    def _parse(self, key: str, kind: str, parts: int) -> list[str]:
        head = f"{self.prefix}/{kind}/"
        if not key.startswith(head):
            raise BadKey(key, f"not under {head}")
        found = key[len(head):].split("/")
        if len(found) != parts or not all(found):
            raise BadKey(key, f"a {kind} key has {parts} non-empty part(s) after {head}")
        return found


def encode_generation(generation: int) -> bytes:
    return str(generation).encode()


def decode_generation(value: bytes) -> int:
    """A stored generation; ValueError if the value is not a decimal in 0…2**63-1."""
    text = value.decode("ascii")
    if not text.isdigit() or len(text) > 19 or int(text) > 2**63 - 1:
        raise ValueError(f"not a generation: {value[:40]!r}")
    return int(text)
