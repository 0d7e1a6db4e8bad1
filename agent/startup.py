"""What a dyno's shell runs: Heroku's start-up (`/app/.profile.d/*.sh`, then `/app/.profile`,
sourced after the config vars are set, in the shell that then runs the command) and the
command, exec'd when it is a simple one. Formation, one-off, release and entered commands."""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence

SHELL = "/bin/sh"
APP_DIR = "/app"
# The loop's variable, unset before the command runs; a name no app's scripts would use.
_VARIABLE = "__dynoagent_profile"


def profile_prelude(app_dir: str = APP_DIR) -> str:
    """The start-up as POSIX shell lines (dash, busybox sh, bash), newline-terminated.

    As on Heroku every script is sourced, in the glob's (sorted) order, so what one exports
    the next and the command see. `command .` because a `.` that fails (a syntax error in the
    script, or one that cannot be read) makes a POSIX shell such as dash or busybox sh exit at
    once; through `command` it only prints its error on stderr (the dyno's log) and the
    start-up goes on, as bash's `source` does on Heroku. A script's own exit status is
    ignored. No .profile.d, or no match of the glob (which then stays as written), is
    skipped by the `-f` test.
    """
    directory = shlex.quote(app_dir)
    return (f"for {_VARIABLE} in {directory}/.profile.d/*.sh; do\n"
            f'  if [ -f "${_VARIABLE}" ]; then command . "${_VARIABLE}"; fi\n'
            f"done\n"
            f"unset {_VARIABLE}\n"
            f"if [ -f {directory}/.profile ]; then command . {directory}/.profile; fi\n")


def command_argv(command: str, app_dir: str = APP_DIR, *,
                 profile: bool = True) -> tuple[str, str, str]:
    """The argv of a dyno's process (`/bin/sh -c COMMAND`, DESIGN §5), the start-up first
    unless `profile` is false."""
    prelude = profile_prelude(app_dir) if profile else ""
    return (SHELL, "-c", prelude + shell_command(command))


def entered_argv(argv: Sequence[str], app_dir: str = APP_DIR) -> tuple[str, ...]:
    """`dynoctl exec`: `argv` exec'd (searched on PATH as the scripts left it) by a shell that
    ran the start-up first, so the command, an interactive shell included, inherits what the
    scripts export (like every process of the dyno; variables they only set are not
    exported, on Heroku either). The words are quoted into the script rather than passed as
    "$@", which a script's `set --` or `shift` would change."""
    return (SHELL, "-c", f"{profile_prelude(app_dir)}exec {shlex.join(argv)}")


def shell_command(command: str) -> str:
    """The command's part of the script given to `/bin/sh -c`: a simple command is exec'd so
    that the app itself, not a shell around it, is the reaper's child.

    bash does this on its own (as on Heroku); dash does not, and a waiting dash dies on the
    SIGTERM of a stop (or the SIGINT of a Ctrl-C) at once, its reaper with it, and the kernel
    then SIGKILLs the app in the middle of its graceful shutdown. Lists, pipelines,
    subshells, leading assignments and shell keywords (unquoted) keep the plain form.
    """
    text = command.strip()
    if not text or "\n" in text:
        return command
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:  # unbalanced quotes: let the shell report it
        return command
    if not tokens or any(token in _CONTROL for token in tokens):
        return command
    first = tokens[0]
    if first in _KEYWORDS or _ASSIGNMENT.match(first):
        return command
    return f"exec {text}"


_CONTROL = frozenset({";", "&", "&&", "||", "|", "|&", "(", ")", ";;", "{", "}", "$("})
_KEYWORDS = frozenset({"exec", "if", "then", "for", "while", "until", "case", "!", "function",
                       "select", "time", "trap", "cd", "export", "set", "unset", "eval",
                       "source", ".", "[", "[[", "{", "}"})
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
