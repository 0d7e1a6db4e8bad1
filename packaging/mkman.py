"""Manual pages for the package, made from the commands' own argparse help (never out of date).

Usage: python3 -I mkman.py dynoagent|dynoctl|dynocoord VERSION > PAGE
(SOURCE_DATE_EPOCH sets the date.)
Every (sub)command's `--help` becomes a verbatim block under COMMANDS; the prose around it
(files, environment, exit status) is kept here, next to nothing else that could drift.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import sys
from collections.abc import Iterator

# Verbatim blocks are indented 7 columns under .SS; lintian renders at 80 (MANWIDTH=80).
os.environ["COLUMNS"] = "72"

PAGES = {
    "dynoagent": {
        "parser": "agent.cli.dynoagent:_parser",
        "section": "8",
        "manual": "System Administration",
        "summary": "per-host dyno manager daemon",
        "description": [
            "dynoagent runs each app process (a dyno) in its own Linux namespaces and cgroup, "
            "with the limits of its size, on a private network shared only with the dynos of "
            "the same space; it supervises dynos the way Heroku's dyno manager does, reports "
            "every state change to a central coordinator and keeps its dynos running while "
            "that coordinator, or the agent itself, is away.",
            "\\fBdynoagent serve\\fR is the daemon; the package runs it as the systemd "
            "service \\fBdynoagent.service\\fR. \\fBdynoagent up\\fR runs a Procfile app on "
            "one machine with the same isolation; \\fBbuild\\fR and \\fBstack\\fR make slugs "
            "and stacks.",
        ],
        "files": [
            ("/etc/dynoagent/agent.toml", "configuration (every key documented, commented out)"),
            ("/var/lib/dynoagent", "state: dyno records, slug cache, stacks"),
            ("/run/dynoagent/dynoagent.sock", "operator socket (mode 0660, group dynoagent)"),
            ("/usr/lib/systemd/system/dynoagent.service", "the systemd unit"),
        ],
        "environment": [
            ("DYNOAGENT_CONFIG", "configuration file when --config is not given"),
        ],
        "see_also": "\\fBdynoctl\\fR(1), \\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1)",
    },
    "dynoctl": {
        "parser": "agent.cli.dynoctl:_parser",
        "section": "1",
        "manual": "User Commands",
        "summary": "drive the local dynoagent",
        "description": [
            "dynoctl is the operator client of the local dynoagent's Unix socket: it lists, "
            "inspects, restarts and stops dynos, follows their logs, runs one-off dynos and "
            "commands inside running ones. Root and members of the \\fBdynoagent\\fR group "
            "may use it.",
        ],
        "files": [
            ("/run/dynoagent/dynoagent.sock", "default socket"),
        ],
        "environment": [
            ("DYNOAGENT_SOCKET", "socket when --socket is not given"),
        ],
        "exit_status": "0 ok; 1 the operation failed (one line on stderr); 2 usage error; "
                       "\\fBrun\\fR and \\fBexec\\fR exit with the command's status.",
        "see_also": "\\fBdynoagent\\fR(8)",
    },
    "dynocoord": {
        "parser": "dynocoord.cli:_parser",
        # `serve` is parsed by the server itself (dynocoord/cli.py passes its arguments on):
        # its block is the server's --help, not the placeholder the client's parser lists.
        "subparsers": {"dynocoord serve": "dynocoord.server:_parser"},
        "section": "1",
        "manual": "User Commands",
        "summary": "fleet coordinator and its command line",
        "description": [
            "dynocoord is the coordinator of a fleet of hosts that each run \\fBdynoagent\\fR: "
            "it places every app's dynos on the hosts, rolls releases out host by host and "
            "moves the dynos of a lost or drained host to the others. Its whole state (apps, "
            "releases, formations, hosts, placements) lives in etcd.",
            "\\fBdynocoord serve\\fR runs one replica of the coordinator. Any number may run "
            "against the same etcd cluster: one leads, elected through an etcd lease; the "
            "others answer 503 (not_leader), and one of them takes over when the leader "
            "resigns or its lease expires. Agents connect to it over a WebSocket.",
            "Every other command is a client of the platform API, with Heroku's verbs: "
            "\\fBapps:create\\fR, \\fBreleases:create\\fR, \\fBconfig:set\\fR, "
            "\\fBps:scale\\fR, \\fBrun\\fR, \\fBlogs\\fR, \\fBhosts:drain\\fR and the "
            "others below. Given several coordinator URLs, it tries the replicas in order.",
        ],
        "files": [
            ("/etc/dynocoord/token", "by convention, the platform API's bearer token on one "
             "line, given as --token-file; the package does not create it"),
        ],
        "environment": [
            ("DYNOCOORD_URL", "coordinator URL(s) when --coordinator is not given"),
            ("DYNOCOORD_TOKEN", "the API token itself when --token-file is not given"),
            ("DYNOCOORD_APP", "the app when -a is not given"),
        ],
        "exit_status": "0 ok; 1 the operation failed (one line on stderr); 2 usage error; "
                       "\\fBrun\\fR exits with the one-off dyno's status.",
        "see_also": "\\fBdynoagent\\fR(8), \\fBdynoctl\\fR(1), \\fBetcd\\fR(1)",
    },
}


def escape(text: str) -> str:
    """Text as roff: backslashes, minus signs, a leading control character, non-ASCII."""
    out = text.replace("\\", "\\e").replace("-", "\\-")
    out = "".join(ch if ord(ch) < 128 else f"\\[u{ord(ch):04X}]" for ch in out)
    return "\\&" + out if out.startswith((".", "'")) else out


def subcommands(parser: argparse.ArgumentParser, prefix: str) -> Iterator[tuple[str, str]]:
    """(full command name, its --help) for every subcommand, depth first, in declared order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                full = f"{prefix} {name}"
                yield full, sub.format_help()
                yield from subcommands(sub, full)


def verbatim(text: str) -> list[str]:
    lines = [".nf"]
    lines += [escape(line) if line.strip() else "" for line in text.rstrip().splitlines()]
    return [*lines, ".fi"]


def parser_of(ref: str) -> argparse.ArgumentParser:
    """The parser that `module:function` builds."""
    module, _, function = ref.partition(":")
    parser: argparse.ArgumentParser = getattr(importlib.import_module(module), function)()
    return parser


def page(command: str, version: str) -> str:
    meta = PAGES[command]
    parser = parser_of(meta["parser"])
    own = meta.get("subparsers", {})
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    date = datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%d")
    out = [f'.TH {command.upper()} {meta["section"]} "{date}" "dynoagent {version}" '
           f'"{meta["manual"]}"',
           ".SH NAME", f"{command} \\- {meta['summary']}",
           ".SH SYNOPSIS", f".B {command}", "\\fICOMMAND\\fR [\\fIOPTIONS\\fR]",
           ".SH DESCRIPTION"]
    for i, para in enumerate(meta["description"]):
        out += ([".PP"] if i else []) + [para]
    out += [".SH OPTIONS", *verbatim(parser.format_help()), ".SH COMMANDS"]
    for name, text in subcommands(parser, command):
        if name in own:
            text = parser_of(own[name]).format_help()
        out += [f'.SS "{escape(name)}"', *verbatim(text)]
    if "exit_status" in meta:
        out += [".SH EXIT STATUS", meta["exit_status"]]
    for title, key in (("ENVIRONMENT", "environment"), ("FILES", "files")):
        out.append(f".SH {title}")
        for name, what in meta[key]:
            out += [".TP", f"\\fI{escape(name)}\\fR" if key == "files" else f"\\fB{name}\\fR",
                    what]
    out += [".SH SEE ALSO", meta["see_also"],
            ".PP", "/usr/share/doc/dynoagent/README.md, the full documentation."]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(page(sys.argv[1], sys.argv[2]))
