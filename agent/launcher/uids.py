"""The host-wide uid registry: one unprivileged uid/gid per dyno, unique across every agent on
the host, and never handed out again until its quarantine has passed and nothing of it remains
(no process, no kernel key).

A unique uid per dyno keeps per-user kernel state (RLIMIT_NPROC, inotify, keyrings) and
signal/ptrace permission checks from crossing dynos; that holds only if the uid is unique on
the whole host, not per agent, and if a freed uid is not given to the next tenant while
something of the last one (a user keyring with its keys, a lingering process) still exists.

One file under /run, shared by every agent, rewritten atomically (temp file, rename) under an
flock; an agent parses it only when another agent changed it since its own last look. It
lives for one boot, as the processes and keys it accounts for do: /run is normally a tmpfs,
and a registry written under another boot id is ignored where it is not. Its path is fixed
(not a config key) in production: an agent pointed at a registry of its own would break the
guarantee for everyone; tests pass a path of their own.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

from agent.atomicfile import exchange_in
from agent.launcher.errors import UidAllocationError

log = logging.getLogger(__name__)

# The same range for every agent: uniqueness comes from the registry, not from the range.
DEFAULT_FIRST = 400000
DEFAULT_LAST = 465535
DEFAULT_QUARANTINE_S = 600.0
REGISTRY_PATH = "/run/dynoagent-uids/registry.json"
FORMAT_VERSION = 1
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
# What the per-agent allocator of earlier versions left in the state dir.
LEGACY_DIR_NAME = "uids"
LEGACY_FILES = ("uids.json", "uids.json.lock")

# How long one remnants probe may answer for an allocator's next allocations (see _Probe).
PROBE_REUSE_S = 2.0

# Which uids in [first, last] still own something on the host (a process, a kernel key).
Remnants = Callable[[int, int], frozenset[int]]


class Entry(NamedTuple):
    """One uid the registry knows: held by `owner`'s dyno `dyno`, or freed by it and kept out
    of use until `free_at` (seconds of CLOCK_BOOTTIME). A tuple, not a frozen dataclass: a
    registry of a few thousand is parsed on every allocation and release, and a dataclass's
    construction made that 25 ms."""

    owner: str  # the realpath of the owning agent's state_dir
    dyno: str
    free_at: float | None = None  # None: in use

    @property
    def in_use(self) -> bool:
        return self.free_at is None


@dataclass(frozen=True)
class Table:
    """The registry's content. `next_uid` makes allocation go round the range instead of
    taking the lowest free uid, so a uid comes back into use as late as possible."""

    boot_id: str
    next_uid: int
    entries: Mapping[int, Entry]


@dataclass
class _Probe:
    """A remnants probe, reused by the allocator's next allocations instead of one scan of
    every process on the host each: the scan is most of an allocation's cost.

    A uid comes to own a process or key only through a process it already owns (fork, exec,
    add_key) or through a privileged one handing it out: for a dyno's uid, the holder
    launching a dyno whose uid the registry has in use. So what the probe saw of a uid that
    was not in use then, and has not been in use since, still holds. `used` lists the uids
    in use at the probe or since, which only a new probe may clear. It is complete only while
    every write to the registry since the probe is the allocator's own: a load that finds
    the file changed by someone else drops the probe. Root, or a set-user-ID file of the uid,
    can give a uid a process at any moment, the registry or not: no probe sees more than its
    own instant, and PROBE_REUSE_S bounds how far back that lies."""

    at: float  # the allocator's clock when the probe began
    remnants: frozenset[int]
    used: set[int]


# -- the pure part: what a registry looks like after each operation ----------------------------

def parse(raw: bytes, first: int, last: int) -> Table:
    """The table in `raw`; ValueError says what is wrong with it."""
    data = json.loads(raw)
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
        raise ValueError(f"not a version {FORMAT_VERSION} uid registry")
    boot_id, next_uid, entries = data.get("boot_id"), data.get("next_uid"), data.get("uids")
    if not isinstance(boot_id, str) or not isinstance(next_uid, int) or \
            isinstance(next_uid, bool) or not isinstance(entries, dict):
        raise ValueError("boot_id, next_uid or uids missing or of the wrong type")
    table: dict[int, Entry] = {}
    for key, value in entries.items():
        # [owner, dyno, free_at]: a list, not an object, because the whole registry is read
        # and rewritten on every allocation.
        if not key.isdigit() or not isinstance(value, list) or len(value) != 3:
            raise ValueError(f"bad entry {key!r}: {value!r}")
        owner, dyno, free_at = value
        if not isinstance(owner, str) or not isinstance(dyno, str) or not (
                free_at is None or (isinstance(free_at, (int, float))
                                    and not isinstance(free_at, bool))):
            raise ValueError(f"bad entry {key!r}: {value!r}")
        table[int(key)] = Entry(owner, dyno, None if free_at is None else float(free_at))
    return Table(boot_id, next_uid if first <= next_uid <= last else first, table)


def dump(table: Table, writer: str = "",
         fragments: dict[int, tuple[Entry, bytes]] | None = None) -> bytes:
    """The registry's bytes. `writer` names this one write (parse ignores it): two writes
    never give the same bytes, so a reader that finds the bytes it last saw knows that no one
    wrote since, even a sequence of writes that put back the same entries.

    `fragments` (uid -> (entry, its JSON)), kept from one dump to the next, is updated in
    place: only entries new or changed since are encoded (a registry of thousands took 5 ms
    to encode whole, on every allocation)."""
    known = {} if fragments is None else fragments
    encoded: dict[int, tuple[Entry, bytes]] = {}
    for uid, entry in sorted(table.entries.items()):
        hit = known.get(uid)
        if hit is None or hit[0] != entry:
            # An Entry is a tuple: JSON writes it as the [owner, dyno, free_at] parse reads.
            hit = entry, b'"%d":%s' % (uid, json.dumps(entry, separators=(",", ":")).encode())
        encoded[uid] = hit
    if fragments is not None:
        fragments.clear()
        fragments.update(encoded)
    head = json.dumps({"version": FORMAT_VERSION, "boot_id": table.boot_id,
                       "next_uid": table.next_uid}, separators=(",", ":")).encode()
    return b'%s,"uids":{%s},"writer":%s}' % (head[:-1], b",".join(f for _e, f in
                                                                   encoded.values()),
                                             json.dumps(writer).encode())


def collect(table: Table, now: float, quarantine_s: float,
            owner_alive: Callable[[str], bool]) -> Table:
    """Free what no live agent owns (its state_dir is gone: a removed agent, a test's temp
    dir) — into quarantine, like any freed uid — and forget entries whose quarantine is over:
    from then on only the remnants probe decides, as for a uid never used. `table` itself
    when there is nothing to do (the common case, on every allocation)."""
    dead = {owner for owner in {e.owner for e in table.entries.values() if e.free_at is None}
            if not owner_alive(owner)}
    if not dead and all(e.free_at is None or e.free_at > now for e in table.entries.values()):
        return table
    entries: dict[int, Entry] = {}
    for uid, entry in table.entries.items():
        if entry.free_at is None:
            entries[uid] = entry._replace(free_at=now + quarantine_s) \
                if entry.owner in dead else entry
        elif entry.free_at > now:
            entries[uid] = entry
    return replace(table, entries=entries)


def held_by(table: Table, owner: str, dyno: str) -> int | None:
    for uid, (entry_owner, entry_dyno, free_at) in table.entries.items():
        if entry_dyno == dyno and free_at is None and entry_owner == owner:
            return uid
    return None


def choose(table: Table, first: int, last: int, remnants: Callable[[], frozenset[int]]) -> int:
    """The first uid from the cursor on (going round) that the registry does not hold or
    quarantine and that owns nothing on the host."""
    left: frozenset[int] = frozenset()
    probed = False
    size = last - first + 1
    start = table.next_uid - first
    for step in range(size):
        uid = first + (start + step) % size
        if uid in table.entries:
            continue
        if not probed:
            # One scan per allocation, and only once a candidate is found.
            left, probed = remnants(), True
        if uid not in left:
            return uid
    in_use = sum(1 for e in table.entries.values() if e.in_use)
    raise UidAllocationError(
        f"uid range {first}-{last} exhausted: {in_use} in use, "
        f"{len(table.entries) - in_use} in quarantine, {len(left)} still owning processes "
        f"or keys")


def take(table: Table, uid: int, owner: str, dyno: str, first: int, last: int) -> Table:
    entries = {**table.entries, uid: Entry(owner, dyno)}
    return replace(table, entries=entries, next_uid=uid + 1 if uid < last else first)


def free(table: Table, owner: str, dynos: Callable[[str, int], bool], now: float,
         quarantine_s: float) -> Table:
    """Put `owner`'s uids in use for which `dynos(dyno, uid)` holds into quarantine."""
    entries = {uid: e._replace(free_at=now + quarantine_s)
               if e.in_use and e.owner == owner and dynos(e.dyno, uid) else e
               for uid, e in table.entries.items()}
    return replace(table, entries=entries)


# -- what remains of a uid on the host --------------------------------------------------------

def host_remnants(first: int, last: int, proc: str = "/proc") -> frozenset[int]:
    """The uids in [first, last] that own a kernel key or a process.

    /proc/key-users lists every uid that owns a key (a user keyring outlives the user's last
    process; since Linux 5.3 it stays in the user namespace's keyring register until revoked
    or invalidated). A process counts under any of its real, effective, saved and fs uids —
    read from /proc/PID/status, not the owner of /proc/PID, which is root for a
    non-dumpable process. Threads share the process's uids unless one with CAP_SETUID changed
    its own, which no dyno process has.
    """
    found: set[int] = set()
    # A kernel without CONFIG_KEYS has no key-users file, and no keys at all.
    with suppress(FileNotFoundError), open(f"{proc}/key-users", "rb") as f:
        for line in f:
            head = line.split(b":", 1)[0].strip()
            if head.isdigit() and first <= int(head) <= last:
                found.add(int(head))
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        try:
            fd = os.open(f"{proc}/{name}/status", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # exited meanwhile
        try:
            data = os.read(fd, 4096)
        except OSError:
            continue
        finally:
            os.close(fd)
        at = data.find(b"\nUid:")
        if at < 0:
            continue
        end = data.find(b"\n", at + 5)
        for field in data[at + 5:end].split():
            uid = int(field)
            if first <= uid <= last:
                found.add(uid)
    return frozenset(found)


def boottime() -> float:
    """Seconds since boot, the same for every process on the host: the registry lives for one
    boot, and the wall clock may jump."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def current_boot_id() -> str:
    try:
        return Path(BOOT_ID_PATH).read_text().strip()
    except OSError:
        return ""


def forget_legacy_table(state_dir: str) -> None:
    """Remove the per-agent uids.json of earlier versions: the dyno records already say which
    uid each placed dyno has, and the registry now holds the host-wide fact."""
    legacy = os.path.join(state_dir, LEGACY_DIR_NAME)
    for name in LEGACY_FILES:
        with suppress(FileNotFoundError):
            os.unlink(os.path.join(legacy, name))
    with suppress(FileNotFoundError, OSError):
        os.rmdir(legacy)


# -- the registry file ------------------------------------------------------------------------

class _Ask:
    """One thread's allocation, served by whichever thread serves the batch it is in."""

    def __init__(self, dyno_id: str) -> None:
        self.dyno_id = dyno_id
        self.uid = -1
        self.error: Exception | None = None
        self.done = threading.Event()


class UidAllocator:
    """One agent's view of the host-wide registry: it allocates, looks up and frees the uids
    of its own dynos, and never touches an entry of another live agent."""

    def __init__(self, state_dir: str, *, quarantine_s: float = DEFAULT_QUARANTINE_S,
                 path: str = REGISTRY_PATH, first: int = DEFAULT_FIRST,
                 last: int = DEFAULT_LAST, clock: Callable[[], float] = boottime,
                 remnants: Remnants = host_remnants,
                 owner_alive: Callable[[str], bool] = os.path.isdir,
                 boot_id: str | None = None) -> None:
        if not 0 < first <= last:
            raise UidAllocationError(f"bad uid range {first}-{last}")
        if not quarantine_s >= 0:
            raise UidAllocationError(f"bad uid quarantine {quarantine_s!r}")
        self.first = first
        self.last = last
        self.quarantine_s = quarantine_s
        self.path = path
        self._lock_path = os.path.join(os.path.dirname(path), "registry.lock")
        self._clock = clock
        self._remnants = remnants
        self._owner_alive = owner_alive
        self.boot_id = current_boot_id() if boot_id is None else boot_id
        # Only touched under the registry's lock (an flock on a file opened per call, so it
        # keeps this process's threads apart too). The registry as last read or written here,
        # and its table: read back unchanged, it is not parsed again.
        self._known: tuple[bytes, Table] | None = None
        self._probe: _Probe | None = None
        self._fragments: dict[int, tuple[Entry, bytes]] = {}
        # Allocations asked for and not yet served, and whether a thread is serving them.
        self._asking = threading.Lock()
        self._asks: list[_Ask] = []
        self._serving = False
        self._writes = (f"{os.urandom(8).hex()}-{n}" for n in itertools.count())
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.owner = os.path.realpath(state_dir)
        self._check_dir()

    def _check_dir(self) -> None:
        """The registry's directory is root's alone: whoever could write there could hand
        every agent's uids to anyone."""
        directory = os.path.dirname(self.path)
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            st = os.lstat(directory)
        except OSError as e:
            raise UidAllocationError(f"cannot create the uid registry's directory: "
                                     f"{e.strerror}", directory, e.errno) from e
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise UidAllocationError("the uid registry's directory must be a directory of "
                                     "this user, writable by no one else", directory)

    def allocate(self, dyno_id: str) -> tuple[int, int]:
        """(uid, gid) of `dyno_id`: the one it holds, or a fresh one.

        Threads that ask at the same time are served together: the first reads and writes
        the registry once for all of them (a burst of starts would otherwise read, encode
        and write the whole registry once per dyno, one thread after another)."""
        ask = _Ask(dyno_id)
        with self._asking:
            self._asks.append(ask)
            lead = not self._serving
            self._serving = True
        if lead:
            self._serve_asks()
        ask.done.wait()
        if ask.error is not None:
            raise ask.error
        return ask.uid, ask.uid

    def _serve_asks(self) -> None:
        while True:
            with self._asking:
                batch, self._asks = self._asks, []
                if not batch:
                    self._serving = False
                    return
            try:
                self._allocate_batch(batch)
            except Exception as exc:  # the registry unreadable, unwritable or locked out
                for ask in batch:
                    if ask.error is None and ask.uid < 0:
                        ask.error = exc
            finally:
                for ask in batch:
                    ask.done.set()

    def _allocate_batch(self, batch: list[_Ask]) -> None:
        with self._locked():
            table = self._load()
            held: dict[str, int] = {}
            for number, (owner, dyno, free_at) in table.entries.items():
                if free_at is None and owner == self.owner:
                    held.setdefault(dyno, number)
            now = self._clock()
            collected = collect(table, now, self.quarantine_s, self._owner_alive)
            current, failed = collected, False
            for ask in batch:
                uid = held.get(ask.dyno_id)
                if uid is None:
                    try:
                        uid = self._choose(table, current, now)
                    except UidAllocationError as exc:
                        ask.error, failed = exc, True
                        continue
                    current = take(current, uid, self.owner, ask.dyno_id, self.first,
                                   self.last)
                    held[ask.dyno_id] = uid
                ask.uid = uid
            # Nothing new taken: the registry stays as read, except that what a failed
            # allocation collected stays so (a stale owner's quarantine starts once).
            if current is not collected or (failed and collected != table):
                self._store(current)

    def _choose(self, loaded: Table, table: Table, now: float) -> int:
        """choose() with the last probe while it may stand in for a new one (see _Probe), else
        with a new one, which later allocations may reuse. `loaded` is the registry as read,
        `table` after collect()."""
        probe = self._probe
        if probe is not None and 0 <= now - probe.at <= PROBE_REUSE_S:
            # A uid in use since the probe is passed over, not probed again: going round the
            # range, the next one will do. Only when none does is the host probed again.
            with suppress(UidAllocationError):
                return choose(table, self.first, self.last,
                              lambda: probe.remnants.union(probe.used))

        def fresh() -> frozenset[int]:
            remnants = self._remnants(self.first, self.last)
            self._probe = _Probe(now, remnants, {uid for uid, e in loaded.entries.items()
                                                 if e.in_use})
            return remnants

        self._probe = None
        return choose(table, self.first, self.last, fresh)

    def lookup(self, dyno_id: str) -> tuple[int, int] | None:
        with self._locked():
            uid = held_by(self._load(), self.owner, dyno_id)
        return None if uid is None else (uid, uid)

    def release(self, dyno_id: str) -> None:
        """Free the dyno's uid (no-op when it holds none): nobody gets it within the
        quarantine, nor while anything of it remains."""
        self.release_many((dyno_id,))

    def release_many(self, dyno_ids: Iterable[str]) -> None:
        """release() of several dynos in one pass over the registry: a mass delete would
        otherwise read and rewrite the whole registry once per dyno."""
        ids = frozenset(dyno_ids)
        with self._locked():
            table = self._load()
            if not any(e.in_use and e.owner == self.owner and e.dyno in ids
                       for e in table.entries.values()):
                return
            self._store(free(table, self.owner, lambda dyno, _uid: dyno in ids,
                             self._clock(), self.quarantine_s))

    def allocations(self) -> dict[str, int]:
        """This agent's dynos and the uids they hold."""
        with self._locked():
            table = self._load()
        return {e.dyno: uid for uid, e in table.entries.items()
                if e.in_use and e.owner == self.owner}

    def reconcile(self, held: Mapping[str, int]) -> dict[str, int]:
        """At agent start, square the registry with the dyno records: `held` maps each placed
        dyno to the uid its record names. This agent's other entries are freed (dynos it no
        longer has, or an allocation whose record was never written). A dyno keeps its uid
        when the registry has it for that dyno, or has no entry for it (after a reboot, or
        on the first start with a registry); a uid the registry gives to someone else is
        replaced by a fresh one. Returns {dyno: new uid} for the dynos whose uid changed."""
        with self._locked():
            now = self._clock()
            table = collect(self._load(), now, self.quarantine_s, self._owner_alive)
            table = free(table, self.owner, lambda dyno, uid: held.get(dyno) != uid, now,
                         self.quarantine_s)
            moved: dict[str, int] = {}
            left: frozenset[int] | None = None

            def probe() -> frozenset[int]:
                nonlocal left
                if left is None:
                    left = self._remnants(self.first, self.last)
                return left

            homeless = []
            for dyno, uid in sorted(held.items()):
                entry = table.entries.get(uid)
                mine = entry is not None and entry.owner == self.owner and entry.dyno == dyno
                if mine or (entry is None and self.first <= uid <= self.last):
                    # The record proves the uid was this dyno's; anything of it that remains
                    # is the dyno's own (its process runs on across an agent restart).
                    entries = {**table.entries, uid: Entry(self.owner, dyno)}
                    table = replace(table, entries=entries)
                else:
                    homeless.append(dyno)
            # Only once every recorded uid is claimed: a fresh one must not be one of them.
            for dyno in homeless:
                fresh = choose(table, self.first, self.last, probe)
                table = take(table, fresh, self.owner, dyno, self.first, self.last)
                moved[dyno] = fresh
            self._store(table)
            return moved

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise UidAllocationError(f"cannot open the uid registry's lock: {e.strerror}",
                                     self._lock_path, e.errno) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _load(self) -> Table:
        try:
            raw = _read(self.path)
        except FileNotFoundError:
            self._probe = None
            return Table(self.boot_id, self.first, {})
        except OSError as e:
            self._probe = None
            raise UidAllocationError(f"unreadable uid registry: {e.strerror}", self.path,
                                     e.errno) from e
        if self._known is not None and raw == self._known[0]:
            table = self._known[1]
        else:
            # Written by someone else since this allocator's last look: any uid may have been
            # in use meanwhile, and no longer be.
            self._probe = None
            try:
                table = parse(raw, self.first, self.last)
            except ValueError as e:
                # Never reset: every agent's uids are in it. A human removes it, knowing that.
                raise UidAllocationError(f"corrupt uid registry ({e}); remove it only when "
                                         f"no dyno runs on this host", self.path) from e
            self._known = raw, table
        if table.boot_id != self.boot_id:
            # A registry from an earlier boot (a /run that is not a tmpfs): nothing of its
            # uids survived the reboot.
            log.warning("uid registry %s is from an earlier boot; starting afresh", self.path)
            return Table(self.boot_id, self.first, {})
        return table

    def _store(self, table: Table) -> None:
        # One spare for every writer: only the holder of the registry's lock writes it, and
        # an agent killed mid-write leaves a spare the next writer truncates, not one file per
        # pid piling up in /run. Written over and exchanged with the registry, it holds the
        # previous version (atomicfile.exchange_in: no inode allocated or freed per write).
        # No fsync: the exchange keeps a crashed writer from leaving half a registry, and
        # after a power loss the registry is of an earlier boot, hence ignored.
        spare = f"{self.path}.tmp"
        # Kept as parse() would read it back: in the file's order.
        table = replace(table, entries=dict(sorted(table.entries.items())))
        data = dump(table, next(self._writes), self._fragments)
        try:
            exchange_in(self.path, spare, data)
        except OSError as e:
            raise UidAllocationError(f"cannot write the uid registry: {e.strerror}", self.path,
                                     e.errno) from e
        self._known = data, table
        if self._probe is not None:
            self._probe.used.update(
                uid for uid, e in table.entries.items() if e.free_at is None)


def _read(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)

