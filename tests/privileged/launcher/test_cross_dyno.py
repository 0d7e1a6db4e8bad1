"""One dyno cannot signal another or use up a per-user kernel limit on its behalf."""

from __future__ import annotations

import os
from typing import Any

from tests.privileged.launcher.harness import Holder, run
from tests.support.wait import wait_for

# Holds inotify instances until none is left for its uid (fs.inotify.max_user_instances is
# counted per uid), reports how many it got, then keeps them open.
_HOG = ("python3 -c '\n"
        "import ctypes, os, sys, time\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "fds = []\n"
        "while len(fds) < 100000:\n"
        "    fd = libc.inotify_init()\n"
        "    if fd < 0:\n"
        "        print(\"exhausted\", len(fds), os.strerror(ctypes.get_errno()), flush=True)\n"
        "        break\n"
        "    fds.append(fd)\n"
        "time.sleep(60)\n'")

_ONE_MORE = ("python3 -c '\n"
             "import ctypes, os\n"
             "libc = ctypes.CDLL(None, use_errno=True)\n"
             "fd = libc.inotify_init()\n"
             "print(\"got\" if fd >= 0 else \"refused \" + os.strerror(ctypes.get_errno()))\n'")


def test_a_dyno_exhausting_its_inotify_instances_leaves_others_theirs(
        holder: Holder, make_dyno: Any) -> None:
    hog = make_dyno(_HOG)
    started = holder.launch(hog.req, hog.out)
    assert "pid" in started, started
    wait_for(lambda: "exhausted" in hog.output(), 20, what="hog exhausted its instances")
    _, count, *reason = hog.output().split()
    assert int(count) > 0 and "Too many open files" in " ".join(reason), hog.output()
    try:
        other = make_dyno(_ONE_MORE)
        assert other.req["uid"] != hog.req["uid"]
        status, out = run(holder, other)
        assert status == 0, out
        assert out.strip() == "got"
        # The control: the same probe as the hog's uid is refused, so the limit was reached.
        same_uid = make_dyno(_ONE_MORE, uid=hog.req["uid"], gid=hog.req["gid"])
        status, out = run(holder, same_uid)
        assert status == 0, out
        assert out.strip().startswith("refused"), out
    finally:
        holder.call(op="kill", pid=started["pid"])
        holder.wait(started["pid"])


def test_kill_minus_one_in_a_dyno_spares_other_dynos(holder: Holder, make_dyno: Any) -> None:
    victim = make_dyno("echo ready; exec sleep 60")
    started = holder.launch(victim.req, victim.out)
    assert "pid" in started, started
    wait_for(lambda: "ready" in victim.output(), 10, what="victim ready")
    try:
        # kill(-1) reaches every process the caller may signal: only its own dyno's.
        status, out = run(holder, make_dyno("sleep 30 & kill -KILL -1; wait $!; echo done $?"))
        assert status == 0, out
        assert out.split("\n")[-2] == "done 137"  # its own sleep was killed
        os.kill(started["pid"], 0)  # still there
        assert holder.call(op="wait", pid=started["pid"], timeout_s=0.2).get("timeout"), \
            "the other dyno was killed"
    finally:
        holder.call(op="kill", pid=started["pid"])
        holder.wait(started["pid"])
