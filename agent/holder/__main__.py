"""`python -m agent.holder`: run the dyno holder (fork server) on a Unix socket.

Exit status: 0 after SIGTERM/SIGINT, 3 if another holder owns the socket, 1 on any other
failure. With --detach the command returns once the socket is bound and a detached holder
(its own session, cwd /) serves it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

from agent.holder.backend import Backend, IsolatedBackend, PlainBackend
from agent.holder.errors import HolderAlreadyRunning
from agent.holder.output import BufferLimits
from agent.holder.server import Holder, HolderConfig
from agent.journal import KeyValueFormatter

EXIT_ALREADY_RUNNING = 3

log = logging.getLogger("agent.holder")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m agent.holder", description=__doc__)
    parser.add_argument("--socket", required=True, help="Unix socket to serve")
    parser.add_argument("--state-dir", required=True, help="pid file (and log) live here")
    parser.add_argument("--backend", choices=("isolated", "plain"), default="isolated",
                        help="isolated: agent.launcher (default); plain: fork/exec, no isolation")
    parser.add_argument("--buffer-lines", type=int, default=BufferLimits.max_lines,
                        help="lines kept per held process (a coarse guard; bytes bind)")
    parser.add_argument("--buffer-bytes", type=int, default=BufferLimits.max_bytes,
                        help="memory kept per held process: line data, a newline per line and "
                             "a small overhead per pipe read")
    parser.add_argument("--buffer-total-bytes", type=int, default=BufferLimits.total_bytes,
                        help="bound over every held process's buffer together")
    parser.add_argument("--log-file", help="append the holder's own log here (else stderr)")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--detach", action="store_true",
                        help="return once bound; the holder keeps running in the background")
    return parser.parse_args(argv)


def _setup_logging(path: str | None, level: str) -> None:
    if path is not None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        # stderr too, so a traceback that escapes logging still lands in the file.
        os.dup2(fd, 2, inheritable=False)
        os.close(fd)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    _setup_logging(args.log_file, args.log_level)
    backend: Backend = PlainBackend() if args.backend == "plain" else IsolatedBackend()
    config = HolderConfig(os.path.abspath(args.socket), os.path.abspath(args.state_dir),
                          BufferLimits(args.buffer_lines, args.buffer_bytes,
                                       args.buffer_total_bytes))
    holder = Holder(config, backend)
    try:
        holder.bind()
    except HolderAlreadyRunning as exc:
        log.error("refusing to start", extra={"REASON": exc.message})
        return EXIT_ALREADY_RUNNING
    # Nothing of the caller's terminal or session may reach the holder or the dynos.
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    if args.log_file is None and args.detach:
        os.dup2(devnull, 2)
    os.close(devnull)
    os.chdir("/")
    if args.detach and os.fork() != 0:
        # Parent of the detached holder: the socket is bound, which is what callers wait for.
        os._exit(0)
    with contextlib.suppress(PermissionError):
        os.setsid()  # EPERM when already a session leader (start_new_session)
    try:
        holder.run()
    except Exception:
        log.exception("holder failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
