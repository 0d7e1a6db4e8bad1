"""Persisted address management: one subnet per space from a pool, one address per attached
namespace, on disk under `<state_dir>/ipam/` so that a restart never hands an address out
twice."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

from netns import entries
from netns.errors import AddressError, PoolExhaustedError, StateLockedError
from netns.names import check_id

DEFAULT_POOL = IPv4Network("172.20.0.0/14")
IPAM_DIR = "ipam"
SPACES_FILE = "spaces.json"
LOCK_FILE = "lock"
ANCHOR_FILE = "entry"  # every member file is a hard link to it (netns.entries)
_FORMAT_VERSION = 1
_SEP = "@"  # member file name: "<address>@<owner>"; owners never contain '@'


@dataclass(frozen=True)
class Overlay:
    """A space's tunnel on this host: VXLAN `vni` from the `underlay` address to UDP `port`;
    `mtu` None means the underlay link's MTU minus the encapsulation."""

    vni: int
    underlay: IPv4Address
    port: int = 4789
    mtu: int | None = None


@dataclass(frozen=True)
class Fleet:
    """What the firewall needs of the fleet: the pools of every space subnet, the underlay
    address of every host and the overlay's UDP port (None: no overlay)."""

    pools: tuple[IPv4Network, ...] = ()
    hosts: tuple[IPv4Address, ...] = ()
    port: int | None = None


@dataclass(frozen=True)
class SpaceLease:
    """A space's subnet. Without a `slice` (a local space) the first host address of the
    subnet is the gateway and namespaces get the rest; with one (a space spread over hosts)
    the gateway is the slice's first host address, namespaces get the slice's others, all
    with the subnet's prefix length."""

    space_id: str
    subnet: IPv4Network
    slice: IPv4Network | None = None
    overlay: Overlay | None = None

    @property
    def gateway(self) -> IPv4Interface:
        return _gateway(self.subnet, self.slice)


def _gateway(subnet: IPv4Network, slice_: IPv4Network | None) -> IPv4Interface:
    base = subnet if slice_ is None else slice_
    return IPv4Interface((int(base.network_address) + 1, subnet.prefixlen))


@dataclass
class _Space:
    subnet: IPv4Network
    members: dict[str, int]  # owner -> address as an integer
    taken: set[int]
    slice: IPv4Network | None = None
    overlay: Overlay | None = None

    def lease(self, space_id: str) -> SpaceLease:
        return SpaceLease(space_id, self.subnet, self.slice, self.overlay)


class AddressBook:
    """Subnets and addresses, written through to disk on every change.

    Layout: `ipam/spaces.json` maps space ids to subnets (replaced atomically by rename;
    it changes only when a space comes or goes), and each address is an empty file
    `ipam/<space>/<address>@<owner>`, created or removed in one system call, so the hot
    path (attach, detach) never rewrites a growing file and a crash leaves each record
    either whole or absent.

    `durable=True` (the default) fsyncs spaces.json and its directory after each change of
    the spaces, so a space keeps its subnet across a power loss. Address records are never
    fsynced: the namespaces that hold the addresses do not survive the reboot after a power
    loss, and the start-up sweep (`retain`) drops records whose namespace is gone, so a
    record lost or brought back by the crash changes nothing (an fsync of the directory
    cost 0.4 ms of every attach and detach on the development VM). `durable=False` keeps
    only crash-of-the-process safety for the spaces too, which suffices for tests.

    One process at a time owns a state directory (an exclusive `flock` held for the
    object's life). Thread-safe.
    """

    def __init__(self, state_dir: Path, pool: IPv4Network = DEFAULT_POOL, *,
                 subnet_prefix: int = 24, durable: bool = True) -> None:
        if subnet_prefix < pool.prefixlen or subnet_prefix > 30:
            raise AddressError(f"subnet /{subnet_prefix} does not fit pool {pool}",
                               operation="configure")
        self.root = state_dir / IPAM_DIR
        self.pool = pool
        self.subnet_prefix = subnet_prefix
        self.durable = durable
        self._lock = threading.Lock()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.root / LOCK_FILE,
                                    os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise AddressError("cannot open state directory", operation="open",
                               path=self.root, errno=exc.errno) from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            raise StateLockedError("state directory is in use by another process",
                                   operation="lock", path=self.root, errno=exc.errno) from exc
        try:
            self._spaces, self._fleet = self._load()
        except BaseException:
            os.close(self._lock_fd)
            raise

    def close(self) -> None:
        with self._lock:
            if self._lock_fd >= 0:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = -1

    # --- queries --------------------------------------------------------------------------

    def spaces(self) -> list[SpaceLease]:
        with self._lock:
            return [v.lease(k) for k, v in sorted(self._spaces.items())]

    def space(self, space_id: str) -> SpaceLease | None:
        with self._lock:
            entry = self._spaces.get(space_id)
            return None if entry is None else entry.lease(space_id)

    def members(self, space_id: str) -> dict[str, IPv4Interface]:
        with self._lock:
            entry = self._spaces.get(space_id)
            if entry is None:
                return {}
            return {o: _iface(a, entry.subnet) for o, a in sorted(entry.members.items())}

    def address_of(self, space_id: str, owner: str) -> IPv4Interface | None:
        with self._lock:
            entry = self._spaces.get(space_id)
            address = None if entry is None else entry.members.get(owner)
            return None if entry is None or address is None else _iface(address, entry.subnet)

    # --- changes --------------------------------------------------------------------------

    def fleet(self) -> Fleet:
        with self._lock:
            return self._fleet

    def set_fleet(self, fleet: Fleet) -> bool:
        """Record the fleet; False if it was already this."""
        with self._lock:
            if fleet == self._fleet:
                return False
            previous, self._fleet = self._fleet, fleet
            self._save_spaces_or_undo(lambda: setattr(self, "_fleet", previous))
            return True

    def configure_space(self, space_id: str, subnet: IPv4Network, slice_: IPv4Network,
                        overlay: Overlay | None) -> tuple[SpaceLease, bool]:
        """Give the space `subnet` with this host's `slice_` of it, and its overlay; returns
        the lease and whether the addressing (subnet or slice) changed. Idempotent. A changed
        addressing is refused while the space has members (their addresses would leave it)."""
        check_id("space id", space_id)
        if not slice_.subnet_of(subnet):
            raise AddressError(f"space {space_id}: slice {slice_} is not inside subnet {subnet}",
                               operation="configure-space")
        if slice_.prefixlen > 30:
            raise AddressError(f"space {space_id}: slice {slice_} has no room for addresses",
                               operation="configure-space")
        with self._lock:
            for other_id, other in self._spaces.items():
                if other_id != space_id and other.subnet.overlaps(subnet):
                    raise AddressError(f"space {space_id}: subnet {subnet} overlaps subnet "
                                       f"{other.subnet} of space {other_id}",
                                       operation="configure-space")
            entry = self._spaces.get(space_id)
            if entry is not None and (entry.subnet, entry.slice) == (subnet, slice_):
                if entry.overlay != overlay:
                    self._set_overlay(entry, overlay)
                return entry.lease(space_id), False
            if entry is not None and entry.members:
                raise AddressError(
                    f"space {space_id}: cannot move from {entry.slice or entry.subnet} of "
                    f"{entry.subnet} to {slice_} of {subnet} while {len(entry.members)} "
                    "namespace(s) hold addresses in it", operation="configure-space")
            self._mkdir(self.root / space_id)
            previous_entry = entry
            self._spaces[space_id] = _Space(subnet, {}, set(), slice_, overlay)
            try:
                self._save_spaces()
            except BaseException:
                if previous_entry is None:
                    del self._spaces[space_id]
                else:
                    self._spaces[space_id] = previous_entry
                raise
            return self._spaces[space_id].lease(space_id), True

    def clear_overlay(self, space_id: str) -> bool:
        """Forget the space's overlay (its addressing stays); False if it had none."""
        with self._lock:
            entry = self._spaces.get(space_id)
            if entry is None or entry.overlay is None:
                return False
            self._set_overlay(entry, None)
            return True

    def lease_space(self, space_id: str, *,
                    avoid: Sequence[IPv4Network] = ()) -> SpaceLease:
        """The space's subnet, allocating the lowest free one of the pool the first time
        (skipping any that overlaps `avoid`, e.g. the host's own networks)."""
        check_id("space id", space_id)
        with self._lock:
            entry = self._spaces.get(space_id)
            if entry is None:
                used = [s.subnet for s in self._spaces.values()] + list(avoid)
                subnet = next((s for s in self.pool.subnets(new_prefix=self.subnet_prefix)
                               if not any(s.overlaps(u) for u in used)), None)
                if subnet is None:
                    raise PoolExhaustedError(f"no free /{self.subnet_prefix} in {self.pool}",
                                             operation="lease-space")
                self._mkdir(self.root / space_id)
                entry = _Space(subnet, {}, set())
                self._spaces[space_id] = entry
                try:
                    self._save_spaces()
                except BaseException:
                    del self._spaces[space_id]
                    raise
            return entry.lease(space_id)

    def release_space(self, space_id: str) -> bool:
        """Forget a space and every address in it; False if it was unknown."""
        with self._lock:
            if self._spaces.pop(space_id, None) is None:
                return False
            self._save_spaces()
            shutil.rmtree(self.root / space_id, ignore_errors=True)
            return True

    def assign(self, space_id: str, owner: str) -> IPv4Interface:
        """The owner's address in the space: the one it already has, else the lowest free
        one (so released addresses are reused)."""
        check_id("owner", owner)
        with self._lock:
            entry = self._spaces.get(space_id)
            if entry is None:
                raise AddressError(f"space {space_id!r} has no subnet", operation="assign")
            address = entry.members.get(owner)
            if address is None:
                # Never the gateway (.1 of the range) nor the range's network or broadcast
                # address, so never the subnet's either.
                base = entry.subnet if entry.slice is None else entry.slice
                first = int(base.network_address) + 2
                last = int(base.broadcast_address) - 1
                address = next((a for a in range(first, last + 1) if a not in entry.taken),
                               None)
                if address is None:
                    raise PoolExhaustedError(f"no free address in {entry.subnet}",
                                             operation="assign")
                self._create(self._member_path(space_id, address, owner))
                entry.members[owner] = address
                entry.taken.add(address)
            return _iface(address, entry.subnet)

    def release(self, space_id: str, owner: str) -> bool:
        with self._lock:
            return self._release(space_id, owner)

    def retain(self, live_spaces: Iterable[str], live_owners: Iterable[str]) -> list[str]:
        """Drop every space and owner not named; returns what was dropped ("space" or
        "space/owner")."""
        spaces, owners = set(live_spaces), set(live_owners)
        dropped: list[str] = []
        with self._lock:
            for space_id in sorted(self._spaces):
                if space_id not in spaces:
                    dropped.append(space_id)
                    del self._spaces[space_id]
                    shutil.rmtree(self.root / space_id, ignore_errors=True)
                    continue
                for owner in sorted(self._spaces[space_id].members):
                    if owner not in owners:
                        dropped.append(f"{space_id}/{owner}")
                        self._release(space_id, owner)
            if dropped:
                self._save_spaces()
        return dropped

    def _release(self, space_id: str, owner: str) -> bool:
        entry = self._spaces.get(space_id)
        if entry is None or owner not in entry.members:
            return False
        address = entry.members[owner]
        path = self._member_path(space_id, address, owner)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise AddressError("cannot remove record", operation="release", path=path,
                               errno=exc.errno) from exc
        del entry.members[owner]
        entry.taken.discard(address)
        return True

    # --- disk -----------------------------------------------------------------------------

    def _member_path(self, space_id: str, address: int, owner: str) -> Path:
        return self.root / space_id / f"{IPv4Address(address)}{_SEP}{owner}"

    def _load(self) -> tuple[dict[str, _Space], Fleet]:
        path = self.root / SPACES_FILE
        try:
            doc: Any = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {}, Fleet()
        except (OSError, ValueError) as exc:
            raise AddressError(f"cannot read state: {exc}", operation="load", path=path,
                               errno=getattr(exc, "errno", None)) from exc
        spaces: dict[str, _Space] = {}
        try:
            if doc.get("version") != _FORMAT_VERSION:
                raise ValueError(f"unknown version {doc.get('version')!r}")
            fleet = _fleet_from(doc.get("fleet"))
            for space_id, value in doc["spaces"].items():
                entry = _space_from(value)
                subnet = entry.subnet
                directory = self.root / check_id("space id", space_id)
                directory.mkdir(exist_ok=True)
                for name in sorted(os.listdir(directory)):
                    address_text, sep, owner = name.partition(_SEP)
                    address = IPv4Address(address_text)
                    if not sep or address not in subnet:
                        raise ValueError(f"bad record {name!r} in space {space_id}")
                    if int(address) in entry.taken or owner in entry.members:
                        raise ValueError(f"record {name!r} clashes in space {space_id}")
                    entry.members[check_id("owner", owner)] = int(address)
                    entry.taken.add(int(address))
                spaces[space_id] = entry
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
            raise AddressError(f"corrupt state: {exc}", operation="load",
                               path=self.root) from exc
        return spaces, fleet

    def _save_spaces_or_undo(self, undo: Callable[[], object]) -> None:
        """Save the spaces after a change in memory; if that fails, `undo` the change and
        raise."""
        try:
            self._save_spaces()
        except BaseException:
            undo()
            raise

    def _set_overlay(self, entry: _Space, overlay: Overlay | None) -> None:
        previous, entry.overlay = entry.overlay, overlay
        self._save_spaces_or_undo(lambda: setattr(entry, "overlay", previous))

    def _save_spaces(self) -> None:
        doc: dict[str, Any] = {
            "version": _FORMAT_VERSION, "pool": str(self.pool),
            "spaces": {k: _space_doc(v) for k, v in sorted(self._spaces.items())}}
        if self._fleet != Fleet():
            doc["fleet"] = {"pools": [str(p) for p in self._fleet.pools],
                            "hosts": [str(h) for h in self._fleet.hosts],
                            "port": self._fleet.port}
        path = self.root / SPACES_FILE
        tmp = path.with_name(f".{SPACES_FILE}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                data = memoryview(json.dumps(doc, indent=1).encode())
                while data:
                    data = data[os.write(fd, data):]
                if self.durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            # rename(2) is atomic: a restarted agent reads the old file or the new one.
            os.replace(tmp, path)
        except OSError as exc:
            raise AddressError("cannot write state", operation="save", path=path,
                               errno=exc.errno or errno.EIO) from exc
        self._sync_dir(self.root)

    def _create(self, path: Path) -> None:
        try:
            entries.add(self.root / ANCHOR_FILE, path, exclusive=True)
        except OSError as exc:
            raise AddressError("cannot write record", operation="assign", path=path,
                               errno=exc.errno) from exc

    def _mkdir(self, path: Path) -> None:
        try:
            path.mkdir(exist_ok=True)
        except OSError as exc:
            raise AddressError("cannot create space directory", operation="lease-space",
                               path=path, errno=exc.errno) from exc

    def _sync_dir(self, path: Path) -> None:
        if not self.durable:
            return
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _space_doc(entry: _Space) -> str | dict[str, Any]:
    # A local space stays a bare subnet string: the format older agents wrote and read.
    if entry.slice is None:
        return str(entry.subnet)
    doc: dict[str, Any] = {"subnet": str(entry.subnet), "slice": str(entry.slice)}
    if entry.overlay is not None:
        doc.update(vni=entry.overlay.vni, underlay=str(entry.overlay.underlay),
                   port=entry.overlay.port, mtu=entry.overlay.mtu)
    return doc


def _space_from(value: Any) -> _Space:
    if isinstance(value, str):
        return _Space(IPv4Network(value), {}, set())
    subnet, slice_ = IPv4Network(value["subnet"]), IPv4Network(value["slice"])
    if not slice_.subnet_of(subnet):
        raise ValueError(f"slice {slice_} outside subnet {subnet}")
    overlay = None
    if value.get("vni") is not None:
        mtu = value.get("mtu")
        overlay = Overlay(int(value["vni"]), IPv4Address(value["underlay"]),
                          int(value.get("port", 4789)), None if mtu is None else int(mtu))
    return _Space(subnet, {}, set(), slice_, overlay)


def _fleet_from(value: Any) -> Fleet:
    if value is None:
        return Fleet()
    port = value.get("port")
    return Fleet(tuple(IPv4Network(p) for p in value.get("pools", ())),
                 tuple(IPv4Address(h) for h in value.get("hosts", ())),
                 None if port is None else int(port))


def _iface(address: int, subnet: IPv4Network) -> IPv4Interface:
    return IPv4Interface((address, subnet.prefixlen))
