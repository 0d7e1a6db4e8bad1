"""Procfile, .env, app-name and formation parsing for `dynoagent up`."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.standalone.procfile import (
    AppDirError,
    app_name,
    check_types,
    load_env_file,
    load_procfile,
    parse_env,
    parse_formation_items,
    parse_procfile,
)


def test_procfile_types_comments_and_blank_lines() -> None:
    procfile = parse_procfile(
        "# the app\n\nweb: python3 web.py --port $PORT\n  worker:bundle exec sidekiq  \n"
        "release: ./migrate.sh\nclock: sh -c 'echo a: b'\n")
    assert procfile.names == ("web", "worker", "release", "clock")
    assert procfile.command("web") == "python3 web.py --port $PORT"
    assert procfile.command("worker") == "bundle exec sidekiq"
    assert procfile.command("clock") == "sh -c 'echo a: b'"  # only the first colon splits
    assert procfile.release == "./migrate.sh"
    assert procfile.default_formation() == {"web": 1, "worker": 1, "clock": 1}
    assert [t.line for t in procfile.types] == [3, 4, 5, 6]


@pytest.mark.parametrize(("text", "line", "words"), [
    ("web: a\nthis line has no colon\n", 2, "malformed line"),
    ("web: a\nWeb: b\n", 2, "must match"),
    ("web: a\nweb-x: b\n", 2, "must match"),
    ("web: a\nworker:\n", 2, "has no command"),
    ("web: a\n\nweb: b\n", 3, "duplicate process type 'web' (first on line 1)"),
    ("run: a\n", 1, "reserved"),
])
def test_procfile_errors_name_the_line(text: str, line: int, words: str) -> None:
    with pytest.raises(AppDirError) as caught:
        parse_procfile(text, Path("/app/Procfile"))
    assert caught.value.line == line
    assert words in str(caught.value)
    assert str(caught.value).startswith(f"/app/Procfile:{line}: ")


def test_empty_procfile_is_an_error() -> None:
    with pytest.raises(AppDirError, match="declares no process types"):
        parse_procfile("# nothing\n\n")


def test_load_procfile_missing_directory_and_file(tmp_path: Path) -> None:
    with pytest.raises(AppDirError, match="does not exist"):
        load_procfile(tmp_path / "nope")
    with pytest.raises(AppDirError, match="needs a Procfile"):
        load_procfile(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(AppDirError, match="is not a directory"):
        load_procfile(tmp_path / "file")


def test_env_file_formats() -> None:
    env = parse_env(
        "# comment\n\nPLAIN=hello world\nexport EXPORTED=1\nSPACED = yes\n"
        "SINGLE='no $expansion \\n here'\nDOUBLE=\"line1\\nline2 \\\"q\\\"\"\n"
        "TRAILING=value # a comment\nHASH=a#b\nEMPTY=\nQUOTED_COMMENT='x' # ok\n")
    assert env == {"PLAIN": "hello world", "EXPORTED": "1", "SPACED": "yes",
                   "SINGLE": "no $expansion \\n here", "DOUBLE": 'line1\nline2 "q"',
                   "TRAILING": "value", "HASH": "a#b", "EMPTY": "", "QUOTED_COMMENT": "x"}


@pytest.mark.parametrize(("text", "words"), [
    ("JUST_A_WORD\n", "expected KEY=value"),
    ("1BAD=x\n", "must match"),
    ("A='unterminated\n", "unterminated"),
    ('A="x" trailing\n', "trailing text"),
])
def test_env_file_errors_name_the_line(text: str, words: str) -> None:
    with pytest.raises(AppDirError) as caught:
        parse_env("OK=1\n" + text, Path(".env"))
    assert caught.value.line == 2
    assert words in str(caught.value)


def test_env_file_optional_unless_named(tmp_path: Path) -> None:
    assert load_env_file(tmp_path / ".env", required=False) == {}
    with pytest.raises(AppDirError, match="does not exist"):
        load_env_file(tmp_path / "custom.env", required=True)


@pytest.mark.parametrize(("name", "app"), [
    ("hello", "hello"), ("My_App.v2", "my-app-v2"), ("2fast", "fast"),
    ("a" * 40, "a" * 30), ("x--y__", "x-y"), ("Ünïcode", "n-code"),
])
def test_app_name_from_directory(tmp_path: Path, name: str, app: str) -> None:
    directory = tmp_path / name
    directory.mkdir()
    assert app_name(directory) == app


def test_app_name_impossible(tmp_path: Path) -> None:
    directory = tmp_path / "1234"
    directory.mkdir()
    with pytest.raises(AppDirError, match="pass --app NAME"):
        app_name(directory)


def test_formation_items() -> None:
    items = parse_formation_items(["web=2,worker=1", "clock=0:Standard-2X"])
    assert [(i.type, i.quantity, i.size) for i in items] == [
        ("web", 2, None), ("worker", 1, None), ("clock", 0, "Standard-2X")]


@pytest.mark.parametrize(("item", "words"), [
    ("web", "TYPE=QUANTITY"), ("web=x", "TYPE=QUANTITY"), ("web=-1", "TYPE=QUANTITY"),
    ("Web=1", "must match"), ("web=101", "at most 100"), ("web=1,web=2", "given twice"),
])
def test_formation_item_errors(item: str, words: str) -> None:
    with pytest.raises(AppDirError, match=words):
        parse_formation_items([item])


def test_check_types_against_the_procfile() -> None:
    procfile = parse_procfile("web: a\nworker: b\nrelease: c\n")
    check_types(parse_formation_items(["web=2,worker=0"]), procfile)
    with pytest.raises(AppDirError, match=r"no process type 'clock' .*types: web, worker\)"):
        check_types(parse_formation_items(["clock=1"]), procfile)
    with pytest.raises(AppDirError, match="not part of the formation"):
        check_types(parse_formation_items(["release=1"]), procfile)


def test_a_byte_order_mark_from_a_windows_editor_is_not_part_of_the_first_type(
        tmp_path: Path) -> None:
    from agent.standalone.procfile import load_env_file, load_procfile

    (tmp_path / "Procfile").write_bytes(b"\xef\xbb\xbfweb: python3 web.py\n")
    (tmp_path / ".env").write_bytes(b"\xef\xbb\xbfGREETING=hi\n")
    assert "web" in load_procfile(tmp_path).names
    assert load_env_file(tmp_path / ".env", required=True) == {"GREETING": "hi"}
