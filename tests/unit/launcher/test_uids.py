"""The host-wide uid registry: unique across agents, stable per dyno, a freed uid kept out of
use for the quarantine and while anything of it remains, stale owners collected, a corrupt
registry refused without change, and parallel allocators that never collide."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.launcher import UidAllocationError, UidAllocator
from agent.launcher import uids as uid_registry
from agent.launcher.uids import PROBE_REUSE_S, forget_legacy_table, host_remnants
from tests.support.wait import wait_for


@dataclass
class Host:
    """A fake host: a clock, what remains of which uid, and a registry file of its own."""

    root: Path
    now: float = 1000.0
    left: set[int] = field(default_factory=set)
    probes: int = 0

    @property
    def registry(self) -> Path:
        return self.root / "reg" / "registry.json"

    def remnants(self, first: int, last: int) -> frozenset[int]:
        self.probes += 1
        return frozenset(u for u in self.left if first <= u <= last)

    def agent(self, name: str, quarantine_s: float = 60, first: int = 500,
              last: int = 509, boot_id: str = "boot-1") -> UidAllocator:
        return UidAllocator(str(self.root / name), quarantine_s=quarantine_s,
                            path=str(self.registry), first=first, last=last,
                            clock=lambda: self.now, remnants=self.remnants, boot_id=boot_id)


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def test_allocations_are_unique_stable_and_survive_an_agent_restart(host: Host) -> None:
    alloc = host.agent("a")
    a = alloc.allocate("web-1")
    b = alloc.allocate("web-2")
    assert a == (500, 500) and b == (501, 501)
    assert alloc.allocate("web-1") == a
    again = host.agent("a")  # a restarted agent finds its dynos' uids by owner and dyno id
    assert again.lookup("web-2") == b
    assert again.allocations() == {"web-1": 500, "web-2": 501}


def test_two_agents_never_share_a_uid_even_for_the_same_dyno_id(host: Host) -> None:
    one, two = host.agent("one"), host.agent("two")
    got = [one.allocate("web-1"), two.allocate("web-1"), one.allocate("web-2"),
           two.allocate("web-2")]
    assert len({uid for uid, _ in got}) == 4, got
    assert one.allocations() == {"web-1": got[0][0], "web-2": got[2][0]}
    assert two.lookup("web-1") == got[1]
    two.release("web-1")
    assert one.lookup("web-1") == got[0], "releasing one agent's dyno never frees another's"


def test_a_freed_uid_comes_back_only_after_the_quarantine(host: Host) -> None:
    alloc = host.agent("a", quarantine_s=60, last=501)
    assert alloc.allocate("x") == (500, 500)
    assert alloc.allocate("y") == (501, 501)
    alloc.release("x")
    other = host.agent("b", last=501)
    with pytest.raises(UidAllocationError) as info:
        other.allocate("z")
    assert "exhausted: 1 in use, 1 in quarantine" in str(info.value)
    host.now += 59.9
    with pytest.raises(UidAllocationError):
        other.allocate("z")
    host.now += 0.2
    assert other.allocate("z") == (500, 500)


def test_allocation_goes_round_the_range_rather_than_reusing_the_lowest(host: Host) -> None:
    alloc = host.agent("a", quarantine_s=0, last=503)
    assert alloc.allocate("x") == (500, 500)
    alloc.release("x")
    assert [alloc.allocate(d)[0] for d in ("p", "q", "r")] == [501, 502, 503]
    assert alloc.allocate("s") == (500, 500)


def test_a_uid_that_owns_a_process_or_key_is_never_handed_out(host: Host) -> None:
    alloc = host.agent("a", quarantine_s=10, last=502)
    for dyno in ("x", "y", "z"):
        alloc.allocate(dyno)
    alloc.release("x")
    alloc.release("y")
    host.left = {500, 501}  # a lingering process of one, a key of the other
    host.now += 3600
    with pytest.raises(UidAllocationError) as info:
        host.agent("b", last=502).allocate("w")
    assert "2 still owning processes or keys" in str(info.value)
    host.left = {500}
    assert host.agent("b", last=502).allocate("w") == (501, 501)


def test_the_remnants_are_probed_once_per_new_allocation_and_not_for_a_held_uid(
        host: Host) -> None:
    alloc = host.agent("a", last=599)
    host.left = set(range(500, 550))
    assert alloc.allocate("x") == (550, 550)
    assert host.probes == 1
    assert alloc.allocate("x") == (550, 550)
    assert host.probes == 1


# -- one probe for several allocations ---------------------------------------------------------

def test_one_probe_serves_the_allocations_that_follow_it_closely(host: Host) -> None:
    alloc = host.agent("a", last=599)
    host.left = {501}
    assert [alloc.allocate(d)[0] for d in ("x", "y", "z")] == [500, 502, 503]
    assert host.probes == 1
    host.now += PROBE_REUSE_S + 0.1
    host.left = {504}  # root gave it a process meanwhile: a probe this old is not taken
    assert alloc.allocate("w") == (505, 505)
    assert host.probes == 2


def test_a_uid_in_use_since_the_probe_is_probed_again_once_freed(host: Host) -> None:
    alloc = host.agent("a", quarantine_s=0, last=501)
    assert alloc.allocate("x") == (500, 500)
    assert alloc.allocate("y") == (501, 501)
    assert host.probes == 1
    alloc.release("x")
    alloc.release("y")
    host.left = {500}  # x's process, started after the probe, outlived its dyno
    assert alloc.allocate("z") == (501, 501)
    assert host.probes == 2


def test_a_uid_in_use_at_the_probe_is_probed_again_once_freed(host: Host) -> None:
    gone = host.agent("gone", last=501)
    assert gone.allocate("g") == (500, 500)
    shutil.rmtree(host.root / "gone")
    alloc = host.agent("a", quarantine_s=0, last=501)
    assert alloc.allocate("x") == (501, 501)  # probes while g holds 500, and frees it
    host.left = {500}  # g's process, started after the probe
    alloc.release("x")
    probes = host.probes
    assert alloc.allocate("y") == (501, 501)
    assert host.probes == probes + 1


def test_a_write_by_another_agent_makes_the_next_allocation_probe_again(host: Host) -> None:
    # b puts 501 in use and frees it, and no trace of that is left in the registry: a cannot
    # tell what b did between its own looks, so it must not trust its probe for any uid.
    a, b = host.agent("a", quarantine_s=0, last=501), host.agent("b", quarantine_s=0, last=501)
    assert a.allocate("x") == (500, 500)
    assert b.allocate("y") == (501, 501)
    b.release("y")
    host.left = {501}  # y's process outlived its dyno
    with pytest.raises(UidAllocationError):
        b.allocate("w")  # ... and this write forgets y's entry
    assert "501" not in json.loads(host.registry.read_text())["uids"]
    probes = host.probes
    with pytest.raises(UidAllocationError) as info:
        a.allocate("z")
    assert "1 still owning processes or keys" in str(info.value)
    assert host.probes == probes + 1


def test_the_registry_is_parsed_again_only_after_someone_else_wrote_it(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = host.agent("a"), host.agent("b")
    parsed: list[bytes] = []
    real = uid_registry.parse

    def parse(raw: bytes, first: int, last: int) -> uid_registry.Table:
        parsed.append(raw)
        return real(raw, first, last)

    monkeypatch.setattr(uid_registry, "parse", parse)
    a.allocate("x")
    a.allocate("y")
    a.release("x")
    assert a.allocations() == {"y": 501}
    assert parsed == []
    b.allocate("z")
    assert b.allocations() == {"z": 502}
    assert a.allocations() == {"y": 501}
    assert len(parsed) == 2  # b's first look, a's look after b's write


def test_a_dump_from_kept_fragments_is_the_whole_dump(host: Host) -> None:
    Entry, Table, dump = uid_registry.Entry, uid_registry.Table, uid_registry.dump
    fragments: dict[int, tuple[uid_registry.Entry, bytes]] = {}
    tables = [Table("b", 501, {500: Entry("/a", "x"), 502: Entry("/a", "y\u00e9\"", 70.5)}),
              Table("b", 503, {500: Entry("/a", "x", 80.0), 502: Entry("/a", "y\u00e9\"", 70.5),
                               501: Entry("/b", "z")}),
              Table("b", 500, {501: Entry("/b", "z")})]
    for table in tables:
        whole = dump(table, "w-1")
        assert dump(table, "w-1", fragments) == whole
        assert uid_registry.parse(whole, 500, 509) == table
        assert sorted(fragments) == sorted(table.entries)


def test_entries_of_a_removed_agent_are_quarantined_then_freed(host: Host) -> None:
    gone = host.agent("gone", last=501)
    assert gone.allocate("x") == (500, 500)
    assert gone.allocate("y") == (501, 501)
    live = host.agent("live", quarantine_s=30, last=501)
    with pytest.raises(UidAllocationError):
        live.allocate("z")
    (host.root / "gone").rmdir()  # its state_dir (a test's temp dir, a removed agent)
    with pytest.raises(UidAllocationError) as info:
        live.allocate("z")  # collected, but into quarantine: its dynos may have just ended
    assert "0 in use, 2 in quarantine" in str(info.value)
    host.now += 30
    assert live.allocate("z") == (500, 500)


def test_a_live_agents_entries_are_never_taken_however_old(host: Host) -> None:
    a = host.agent("a", last=500)
    assert a.allocate("x") == (500, 500)
    host.now += 10 ** 9
    with pytest.raises(UidAllocationError):
        host.agent("b", quarantine_s=0, last=500).allocate("y")
    assert a.lookup("x") == (500, 500)


@pytest.mark.parametrize("content", [
    b"{not json", b"[1, 2]", b'{"version": 1}',
    b'{"version": 1, "boot_id": "boot-1", "next_uid": 500, "uids": {"x": {}}}',
    b'{"version": 1, "boot_id": "boot-1", "next_uid": 500, "uids": {"500": ["/a", "x"]}}',
    b'{"version": 1, "boot_id": "boot-1", "next_uid": 500, '
    b'"uids": {"500": ["/a", "x", "soon"]}}',
    b'{"version": 2, "boot_id": "boot-1", "next_uid": 500, "uids": {}}',
])
def test_a_corrupt_registry_is_a_clear_error_and_changes_nothing(host: Host,
                                                                  content: bytes) -> None:
    alloc = host.agent("a")
    host.registry.write_bytes(content)
    calls: list[Callable[[], object]] = [
        lambda: alloc.allocate("x"), lambda: alloc.release("x"), lambda: alloc.lookup("x"),
        lambda: alloc.reconcile({"x": 500}), alloc.allocations]
    for call in calls:
        with pytest.raises(UidAllocationError) as info:
            call()
        assert "corrupt uid registry" in str(info.value)
        assert str(host.registry) in str(info.value)
        assert host.registry.read_bytes() == content
    assert sorted(os.listdir(host.registry.parent)) == ["registry.json", "registry.lock"]


def test_a_registry_of_an_earlier_boot_starts_afresh(host: Host) -> None:
    before = host.agent("a", boot_id="boot-1")
    before.allocate("x")
    after = host.agent("b", boot_id="boot-2")
    assert after.allocate("y") == (500, 500)
    assert after.allocations() == {"y": 500}


def test_writes_leave_one_private_spare_and_keep_the_registry_private(host: Host) -> None:
    """Each write goes over the spare and exchanges it with the registry: the same two
    inodes from the second write on, the spare holding the version before."""
    alloc = host.agent("a")
    alloc.allocate("d0")
    alloc.allocate("d1")
    spare = host.registry.with_name("registry.json.tmp")
    inodes = {host.registry.stat().st_ino, spare.stat().st_ino}
    before = host.registry.read_bytes()
    for i in range(2, 5):
        alloc.allocate(f"d{i}")
        assert {host.registry.stat().st_ino, spare.stat().st_ino} == inodes
        assert spare.read_bytes() == before
        before = host.registry.read_bytes()
    assert sorted(os.listdir(host.registry.parent)) == [
        "registry.json", "registry.json.tmp", "registry.lock"]
    assert alloc.allocations().keys() == {f"d{i}" for i in range(5)}
    assert host.registry.stat().st_mode & 0o777 == 0o600
    assert spare.stat().st_mode & 0o777 == 0o600
    assert host.registry.parent.stat().st_mode & 0o777 == 0o700


def test_a_writer_killed_mid_write_leaves_nothing_behind_the_next_write(host: Host) -> None:
    # Before its fix: each writer used a temp file named by its pid, and an agent SIGKILLed
    # between writing it and the rename left one more file in /run for good.
    alloc = host.agent("a")
    alloc.allocate("d0")
    (host.registry.parent / "registry.json.tmp").write_bytes(b'{"version": 1, "boot')
    alloc.allocate("d1")
    # The half-written spare was written over (it now holds the version before).
    assert sorted(os.listdir(host.registry.parent)) == [
        "registry.json", "registry.json.tmp", "registry.lock"]
    assert alloc.allocations().keys() == {"d0", "d1"}


def test_a_registry_directory_others_may_write_is_refused(host: Host) -> None:
    host.registry.parent.mkdir(mode=0o700)
    host.registry.parent.chmod(0o777)
    with pytest.raises(UidAllocationError) as info:
        host.agent("a")
    assert "writable by no one else" in str(info.value)


def test_bad_ranges_and_quarantines_are_refused(tmp_path: Path) -> None:
    reg = str(tmp_path / "reg" / "registry.json")
    for kwargs in ({"first": 0, "last": 10}, {"first": 20, "last": 10},
                   {"quarantine_s": -1.0}, {"quarantine_s": float("nan")}):
        with pytest.raises(UidAllocationError):
            UidAllocator(str(tmp_path / "a"), path=reg, **kwargs)


# -- an agent's start: the registry squared with its dyno records ------------------------------

def test_reconcile_frees_the_agents_entries_that_no_placed_record_names(host: Host) -> None:
    alloc = host.agent("a", quarantine_s=60)
    for dyno in ("kept", "gone", "unrecorded"):
        alloc.allocate(dyno)
    other = host.agent("b")
    other.allocate("theirs")
    assert alloc.reconcile({"kept": 500}) == {}
    assert alloc.allocations() == {"kept": 500}
    assert other.allocations() == {"theirs": 503}
    assert other.allocate("new") == (504, 504), "the freed ones are in quarantine"


def test_after_a_reboot_every_dyno_gets_its_recorded_uid_back(host: Host) -> None:
    alloc = host.agent("a", boot_id="boot-1")
    alloc.allocate("x")
    alloc.allocate("y")
    rebooted = host.agent("a", boot_id="boot-2")
    host.left = {500, 501}  # not probed: the record proves the uid was this dyno's
    assert rebooted.reconcile({"x": 500, "y": 501}) == {}
    assert rebooted.allocations() == {"x": 500, "y": 501}
    assert host.agent("b", boot_id="boot-2").allocate("z") == (502, 502)


def test_a_recorded_uid_another_agent_holds_or_quarantines_is_replaced(host: Host) -> None:
    a, b = host.agent("a"), host.agent("b")
    assert b.allocate("theirs") == (500, 500)
    b.allocate("freed")
    b.release("freed")  # 501, in quarantine
    moved = a.reconcile({"x": 500, "y": 501, "z": 9999, "dup": 502, "dup2": 502})
    assert moved == {"dup2": 503, "x": 504, "y": 505, "z": 506}
    assert a.allocations() == {"dup": 502, "dup2": 503, "x": 504, "y": 505, "z": 506}
    assert b.allocations() == {"theirs": 500}


def test_a_replacement_uid_is_never_one_that_another_record_names(host: Host) -> None:
    assert host.agent("b").allocate("theirs") == (500, 500)  # the cursor is now at 501
    a = host.agent("a")
    assert a.reconcile({"a-clash": 500, "b-kept": 501}) == {"a-clash": 502}
    assert a.allocations() == {"a-clash": 502, "b-kept": 501}


def test_the_legacy_per_agent_table_is_forgotten(tmp_path: Path) -> None:
    legacy = tmp_path / "uids"
    legacy.mkdir()
    (legacy / "uids.json").write_text('{"web-1": 400000}')
    (legacy / "uids.json.lock").write_text("")
    forget_legacy_table(str(tmp_path))
    assert not legacy.exists()
    forget_legacy_table(str(tmp_path))  # nothing left: a no-op


# -- parallel allocators ---------------------------------------------------------------------

def test_threads_of_two_allocators_on_one_registry_never_collide(host: Host) -> None:
    allocators = [host.agent("a", last=999), host.agent("b", last=999)]
    got: list[int] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        alloc = allocators[n % 2]
        for i in range(20):
            uid, _ = alloc.allocate(f"t{n}-{i}")
            with lock:
                got.append(uid)
            if i % 3 == 0:
                alloc.release(f"t{n}-{i}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(got) == 160 and len(set(got)) == 160, sorted(got)


def test_threads_asking_at_once_are_served_with_one_registry_write(host: Host) -> None:
    alloc = host.agent("a", first=500, last=507)  # 8 uids for 10 dynos
    writes: list[int] = []
    store = alloc._store

    def counting(table: Any) -> None:
        writes.append(len(table.entries))
        store(table)

    alloc._store = counting  # type: ignore[method-assign]
    results: dict[str, tuple[int, int] | Exception] = {}

    def ask(dyno: str) -> None:
        try:
            results[dyno] = alloc.allocate(dyno)
        except UidAllocationError as exc:
            results[dyno] = exc

    # The registry locked (as by another agent) while ten threads ask.
    lock_fd = os.open(alloc._lock_path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    threads = [threading.Thread(target=ask, args=(f"d{n}",)) for n in range(10)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(alloc._asks) == 9, 10, what="nine threads waiting behind the first")
    os.close(lock_fd)
    for thread in threads:
        thread.join(30)
    # The first thread's ask alone, then the nine others' together.
    assert writes == [1, 8]
    uids = [r[0] for r in results.values() if isinstance(r, tuple)]
    assert sorted(uids) == list(range(500, 508))
    refused = [r for r in results.values() if isinstance(r, UidAllocationError)]
    assert len(refused) == 2 and all("exhausted" in str(r) for r in refused)
    # Each held uid is the dyno's own: asked again, one by one, the same answers.
    for dyno, got in results.items():
        if isinstance(got, tuple):
            assert alloc.allocate(dyno) == got


ALLOCATE_PY = """\
import json, sys
from agent.launcher.uids import UidAllocator
owner, registry, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
alloc = UidAllocator(owner, path=registry, first=500, last=9999, boot_id="b",
                     remnants=lambda first, last: frozenset())
print(json.dumps([alloc.allocate(f"d{i}")[0] for i in range(count)]))
"""


def test_processes_allocating_in_parallel_never_collide(tmp_path: Path) -> None:
    registry = tmp_path / "reg" / "registry.json"
    procs = [subprocess.Popen([sys.executable, "-c", ALLOCATE_PY, str(tmp_path / f"agent{n}"),
                               str(registry), "40"], stdout=subprocess.PIPE,
                              cwd=Path(__file__).parents[3])
             for n in range(6)]
    got: list[int] = []
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        got += json.loads(out)
    assert len(got) == 240 and len(set(got)) == 240
    table = json.loads(registry.read_text())["uids"]
    assert len(table) == 240


# -- the real probe, on a fake /proc ---------------------------------------------------------

def test_host_remnants_reads_key_users_and_every_uid_of_every_process(tmp_path: Path) -> None:
    (tmp_path / "key-users").write_text(
        "    0:     9 8/8 3/1000000 40/25000000\n"
        "400007:     2 2/2 2/200 9/20000\n")
    status = "Name:\tx\nUmask:\t0022\nState:\tS\nUid:\t{}\nGid:\t0\t0\t0\t0\n"
    for pid, uids in ((1, "0\t0\t0\t0"), (20, "400001\t400001\t400001\t400001"),
                      (21, "0\t0\t400002\t0"), (22, "1000\t1000\t1000\t400003")):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "status").write_text(status.format(uids))
    (tmp_path / "33").mkdir()  # exited between listing and reading
    (tmp_path / "self").mkdir()
    assert host_remnants(400000, 465535, proc=str(tmp_path)) == {400001, 400002, 400003,
                                                                 400007}
