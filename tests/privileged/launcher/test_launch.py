"""launch() on the real kernel: what a process inside a dyno can and cannot see or do."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.privileged.launcher.harness import Holder, run
from tests.support.names import unique


def _status_field(text: str, name: str) -> str:
    for line in text.splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"{name} missing from {text!r}")


def test_unprivileged_user_without_capabilities(holder: Holder, make_dyno: Any) -> None:
    dyno = make_dyno("id -u; id -g; id -G; hostname; umask; cat /proc/self/oom_score_adj; "
                     "cat /proc/self/status")
    status, out = run(holder, dyno)
    assert status == 0, out
    uid, gid, groups, hostname, umask, oom_score_adj, *proc_status = out.splitlines()
    helper_pid = holder.call(op="info")["pid"]
    helper_oom = int(Path(f"/proc/{helper_pid}/oom_score_adj").read_text())
    assert umask == "0022"  # not the helper's 0077
    assert int(oom_score_adj) == max(helper_oom, 0)
    assert int(uid) == dyno.req["uid"] != 0
    assert int(gid) == dyno.req["gid"]
    assert groups.split() == [gid]  # setgroups([]): only the primary group remains
    assert hostname == dyno.req["hostname"]
    text = "\n".join(proc_status)
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(_status_field(text, caps), 16) == 0, caps
    assert _status_field(text, "NoNewPrivs") == "1"


def test_pid1_is_the_reaper_and_ps_shows_only_the_dyno(holder: Holder, make_dyno: Any) -> None:
    status, out = run(holder, make_dyno("ps -eo pid=,ppid=,comm="))
    assert status == 0, out
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["1", "0", "tini"]
    # tini, the shell it started, and ps itself: nothing of the host.
    assert sorted(r[2] for r in rows) == ["ps", "sh", "tini"], rows


def test_app_and_tmp_writable_and_gone_after_restart(holder: Holder, make_dyno: Any) -> None:
    dyno = make_dyno("echo a > /app/new && echo b > /tmp/new && echo c >> /app/Procfile "
                     "&& echo d > /dev/shm/new && cat /app/new /tmp/new /dev/shm/new && "
                     "stat -c %u /app")
    status, out = run(holder, dyno)
    assert status == 0, out
    assert out.split() == ["a", "b", "d", str(dyno.req["uid"])]
    # The slug on the host is the read-only lower layer: untouched.
    assert (Path(dyno.req["slug_dir"]) / "Procfile").read_text() == "web: true\n"
    assert not (Path(dyno.req["slug_dir"]) / "new").exists()
    assert os.listdir(dyno.req["dyno_dir"]) == []  # everything lived in the dyno's tmpfs
    dyno.out.unlink()
    again = dyno.__class__(req={**dyno.req, "argv": ["/bin/sh", "-c",
                                "ls -A /app /tmp /dev/shm; cat /app/Procfile"]},
                           out=dyno.out, base=dyno.base)
    status, out = run(holder, again)
    assert status == 0, out
    assert "new" not in out
    assert out.count("web: true") == 1 and "c\n" not in out


def test_slug_files_belong_to_the_dyno_user_only_inside(holder: Holder,
                                                         make_dyno: Any) -> None:
    files = {"Procfile": "web: true\n", "log/.keep": ""}
    dyno = make_dyno("stat -c '%u %n' /app/Procfile /app/log; echo x > /app/log/dev.log && "
                     "echo y >> /app/Procfile && echo ok", slug_files=files)
    (Path(dyno.req["slug_dir"]) / "log").mkdir(exist_ok=True)
    status, out = run(holder, dyno)
    assert status == 0, out
    uid = dyno.req["uid"]
    assert out.split("\n")[:3] == [f"{uid} /app/Procfile", f"{uid} /app/log", "ok"]
    slug = Path(dyno.req["slug_dir"])
    assert (slug / "Procfile").stat().st_uid == 0  # the host copy is untouched
    assert not (slug / "log" / "dev.log").exists()
    # Without the idmapped layer the slug stays root's and the dyno user cannot modify it.
    plain = make_dyno("stat -c %u /app/Procfile; echo y >> /app/Procfile || echo refused",
                      idmap_slug=False)
    status, out = run(holder, plain)
    assert out.split("\n")[0] == "0" and "refused" in out


def test_stack_is_read_only_and_mount_is_refused(holder: Holder, make_dyno: Any) -> None:
    cmd = ("for p in /usr/dtprobe /etc/dtprobe /dtprobe; do "
           "  if touch $p 2>/dev/null; then echo WROTE $p; else echo refused $p; fi; done; "
           "if mount -t tmpfs none /tmp 2>/dev/null; then echo MOUNTED; else echo nomount; fi; "
           "if (echo 1 > /proc/sys/kernel/printk) 2>/dev/null; then echo SYSCTL; "
           "else echo nosysctl; fi")
    status, out = run(holder, make_dyno(cmd))
    assert status == 0, out
    assert out.split("\n")[:-1] == ["refused /usr/dtprobe", "refused /etc/dtprobe",
                                   "refused /dtprobe", "nomount", "nosysctl"]
    for path in ("/usr/dtprobe", "/etc/dtprobe", "/dtprobe"):
        assert not os.path.exists(path)


def test_writable_layer_is_size_limited(holder: Holder, make_dyno: Any) -> None:
    dyno = make_dyno("dd if=/dev/zero of=/tmp/big bs=1M count=16 2>&1; echo rc=$?",
                     writable_limit_bytes=4 << 20)
    status, out = run(holder, dyno)
    assert status == 0, out
    assert "No space left on device" in out and "rc=1" in out


def test_second_dynos_files_and_processes_are_invisible(holder: Holder, make_dyno: Any,
                                                        tmp_path: Path) -> None:
    first = make_dyno("echo s3cret > /app/mine; echo s3cret > /tmp/mine; "
                      "echo ready; exec sleep 60", slug_files={"first-slug": "x"})
    started = holder.launch(first.req, first.out)
    assert "pid" in started, started
    from tests.support.wait import wait_for
    wait_for(lambda: "ready" in first.output(), 10, what="first dyno ready")
    probe = ("ls -A /app /tmp; grep -rl s3cret /app /tmp 2>/dev/null; "
             f"ls {first.req['slug_dir']} 2>&1; ls {tmp_path} | wc -l; "
             f"kill -0 {started['pid']} 2>&1 && echo SIGNALLED; ps -eo comm=")
    second = make_dyno(probe)
    status, out = run(holder, second)
    assert status == 0, out
    assert "mine" not in out and "s3cret" not in out and "first-slug" not in out
    assert "sleep" not in out and "SIGNALLED" not in out
    assert "0\n" in out  # the hidden test dir (state_dir stand-in) is an empty tmpfs
    holder.call(op="kill", pid=started["pid"])
    holder.wait(started["pid"])


def test_orphans_are_reaped(holder: Holder, make_dyno: Any) -> None:
    # 100 grandchildren are orphaned (their parent exits at once) and re-parented to PID 1.
    cmd = ("i=0; while [ $i -lt 100 ]; do sh -c 'sleep 0.01 & exit 0'; i=$((i+1)); done; "
           "n=0; while [ $n -lt 500 ]; do "
           "  z=$(ps -eo stat= | grep -c '^Z'); s=$(ps -eo comm= | grep -c '^sleep$'); "
           "  [ $z -eq 0 ] && [ $s -eq 0 ] && break; n=$((n+1)); sleep 0.01; done; "
           "echo zombies=$(ps -eo stat= | grep -c '^Z') sleepers=$s")
    status, out = run(holder, make_dyno(cmd))
    assert status == 0, out
    assert "zombies=0 sleepers=0" in out, out


def test_cgroup_is_joined_before_the_app_runs(holder: Holder, make_dyno: Any) -> None:
    dyno = make_dyno("cat /proc/self/cgroup")
    status, out = run(holder, dyno)
    assert status == 0, out
    # Inside its own cgroup namespace the dyno's cgroup is the root of every hierarchy.
    for line in out.splitlines():
        assert line.endswith(":/"), out
    started = holder.launch({**dyno.req, "argv": ["/bin/sh", "-c", "exec sleep 30"]}, dyno.out)
    host_view = Path(f"/proc/{started['pid']}/cgroup").read_text()
    name = Path(dyno.req["cgroup_procs"][0]).parent.name
    for hierarchy in ("memory", "pids", "cpu"):
        assert any(hierarchy in line.split(":")[1].split(",") and line.endswith("/" + name)
                   for line in host_view.splitlines()), host_view
    assert f"0::/{name}" in host_view
    holder.call(op="kill", pid=started["pid"])
    holder.wait(started["pid"])


def test_fresh_netns_has_only_loopback(holder: Holder, make_dyno: Any) -> None:
    status, out = run(holder, make_dyno("tail -n +3 /proc/net/dev | cut -d: -f1"))
    assert status == 0, out
    assert out.split() == ["lo"]


def test_joins_the_given_netns(holder: Holder, make_dyno: Any) -> None:
    name = unique("dtn")
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "dtv0", "type", "veth",
                        "peer", "name", "dtv1"],
                       check=True)
        status, out = run(holder, make_dyno("stat -L -c %i /proc/self/ns/net; "
                                            "tail -n +3 /proc/net/dev | cut -d: -f1",
                                            netns_path=f"/run/netns/{name}"))
        assert status == 0, out
        inode, *links = out.split()
        assert int(inode) == os.stat(f"/run/netns/{name}").st_ino
        assert sorted(links) == ["dtv0", "dtv1", "lo"]
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


def test_sensitive_proc_and_sys_paths_are_masked(holder: Holder, make_dyno: Any) -> None:
    cmd = ("wc -c < /proc/timer_list; wc -c < /proc/keys; ls -A /proc/acpi /sys/firmware | wc -l;"
           " grep -E ' /proc/sys | /sys ' /proc/self/mounts | cut -d' ' -f4 | cut -d, -f1")
    status, out = run(holder, make_dyno(cmd))
    assert status == 0, out
    timer_list, keys, listed, *modes = out.split()
    assert (timer_list, keys) == ("0", "0")
    assert int(listed) <= 3  # only the "dir:" headers, no entries
    assert modes == ["ro", "ro"]


def _mount_table(pid: int | str) -> list[str]:
    # Other suites on this machine add and remove netns bind mounts (nsfs) concurrently;
    # those are not ours to judge. Everything else must be byte-for-byte the same.
    return [line for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
            if " - nsfs " not in line]


def test_host_mount_table_unchanged_after_20_cycles(holder: Holder, make_dyno: Any,
                                                    tmp_path: Path) -> None:
    helper_pid = holder.call(op="info")["pid"]
    before_self, before_helper = _mount_table("self"), _mount_table(helper_pid)
    dyno = make_dyno("echo x > /app/x; echo y > /tmp/y; grep -c . /proc/self/mountinfo")
    for _ in range(20):
        status, out = run(holder, dyno)
        assert status == 0, out
    assert len(out.split()) == 20 and int(out.split()[-1]) > 5  # the dyno did mount things
    after_self, after_helper = _mount_table("self"), _mount_table(helper_pid)
    assert after_self == before_self
    assert after_helper == before_helper
    assert not any(str(tmp_path) in line for line in after_self + after_helper)


def test_named_stack_with_static_reaper(holder: Holder, make_dyno: Any, tmp_path: Path) -> None:
    busybox = shutil.which("busybox")
    if busybox is None or not os.path.exists("/usr/bin/tini-static"):
        pytest.skip("needs busybox-static and tini-static (Debian packages)")
    stack = tmp_path / "stack"
    for d in ("bin", "app", "dev", "proc", "sys", "tmp", "etc"):
        (stack / d).mkdir(parents=True)
    shutil.copy(busybox, stack / "bin" / "busybox")
    for applet in ("sh", "cat", "ls", "id", "touch", "echo"):
        (stack / "bin" / applet).symlink_to("busybox")
    dyno = make_dyno("ls /; id -u; touch /etc/x 2>/dev/null || echo ro; cat /app/Procfile",
                     stack_dir=str(stack), reaper="/usr/bin/tini-static",
                     env=[["PATH", "/bin"]])
    status, out = run(holder, dyno)
    assert status == 0, out
    lines = out.split()
    assert "usr" not in lines and "bin" in lines  # the stack, not the host
    assert str(dyno.req["uid"]) in lines and "ro" in lines and "web:" in lines


@pytest.mark.parametrize(("override", "phase", "errno"), [
    # The idmapped slug's owner is read before the fork; without idmapping, the mount fails.
    ({"slug_dir": "/nonexistent/dtslug"}, "prepare", 2),
    ({"slug_dir": "/nonexistent/dtslug", "idmap_slug": False}, "mounts", 2),
    ({"cgroup_procs": ["/sys/fs/cgroup/pids/dt-no-such-group/cgroup.procs"]}, "cgroup", 2),
    ({"netns_path": "/run/netns/dt-no-such-netns"}, "netns", 2),
    ({"reaper": "/nonexistent/tini"}, "exec", 2),
    # Opened fine on the host, refused by execve in the child: the report pipe carries it.
    ({"reaper": "/etc/os-release"}, "exec", 13),
    ({"argv": []}, "helper", 0),
])
def test_failures_name_their_phase(holder: Holder, make_dyno: Any, override: dict[str, Any],
                                   phase: str, errno: int) -> None:
    dyno = make_dyno("true", **override)
    answer = holder.launch(dyno.req, dyno.out)
    assert "error" in answer, answer
    assert answer["error"]["phase"] == phase, answer
    assert answer["error"]["errno"] == errno, answer
    if "reaper" in override:
        assert answer["error"]["path"] == override["reaper"]


def test_every_phase_is_timed(holder: Holder, make_dyno: Any) -> None:
    dyno = make_dyno("true", netns_path=None)
    answer = holder.launch(dyno.req, dyno.out)
    assert "pid" in answer, answer
    assert holder.wait(answer["pid"]) == 0
    timings = answer["timings"]
    phases = ("prepare", "fork", "cgroup", "namespaces", "netns", "mounts", "user", "exec")
    assert set(timings) == {*phases, "total"}
    assert all(timings[p] >= 0 for p in phases)
    assert abs(sum(timings[p] for p in phases) - timings["total"]) < 0.01
    assert answer["start_time"] > 0


def test_a_stuck_child_is_killed_at_the_deadline(holder: Holder, make_dyno: Any,
                                                 tmp_path: Path) -> None:
    # Opening a FIFO for writing blocks until a reader comes: a child that never reports.
    fifo = tmp_path / "stuck.fifo"
    os.mkfifo(fifo)
    dyno = make_dyno("true", cgroup_procs=[str(fifo)])
    answer = holder.call(op="launch", req=dyno.req, stdout=str(dyno.out), timeout_s=0.5)
    assert answer.get("error", {}).get("phase") == "timeout", answer
    # The killed child was reaped by launch(): the helper has no child left in another pid
    # namespace (a killed user-namespace helper, reaped lazily, may still be a zombie).
    helper_pid = holder.call(op="info")["pid"]
    children = Path(f"/proc/{helper_pid}/task/{helper_pid}/children").read_text().split()
    for child in children:
        nspid = _status_field(Path(f"/proc/{child}/status").read_text(), "NSpid")
        assert len(nspid.split()) == 1, f"child {child} left behind: NSpid {nspid}"
