"""agent.cjson reads and writes what json does (the attach protocol's JSON, dynoctl's
requests and answers, the operator API's bodies through agent.decoding), without importing
json or re."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent import cjson

REPO = Path(__file__).resolve().parents[3]

DOCUMENTS = [
    '{"a": [1, 2.5, "x\\u00e9", null, true, false], "b": {"c": -1e3}}', " [1] ", "12",
    '"\\ud83d\\ude00"', ' "s" \n', '{"event":"exit","status":0}', "[[[]]]", '{"a":1,"a":2}',
    "-0", "1E400", "[NaN, Infinity, -Infinity]", '"caf\u00e9"',
]
NOT_JSON = ['{"a":1} x', "", " ", "[", '{"a":}', "[1,]", "nul", "'a'", '{"a" 1}',
            '"\\x"', "[1] [2]", '"\u0000"']


@pytest.mark.parametrize("document", DOCUMENTS)
def test_documents_read_as_json_reads_them(document: str) -> None:
    for form in (document, document.encode("utf-8", "surrogatepass"),
                 b"\xef\xbb\xbf" + document.encode()):
        got, want = cjson.loads(form), json.loads(form)
        assert repr(got) == repr(want)


@pytest.mark.parametrize("document", NOT_JSON)
def test_what_json_refuses_is_refused(document: str) -> None:
    with pytest.raises(ValueError):
        json.loads(document)
    with pytest.raises(ValueError):
        cjson.loads(document)


VALUES: list[Any] = [
    {"op": "run", "command": 'tr\u00fce "q" \\ \n', "env": {"A": "1"}, "v": 2, "tty": False,
     "window": [24, 80], "x": [1.5, None, True, -0.0, 10**20]},
    [], {}, "\U0001f600", 0, {"nested": {"deeper": [[{}]]}}, {"1": 1},
]


@pytest.mark.parametrize("value", VALUES)
def test_values_written_as_json_writes_them_compact(value: Any) -> None:
    assert cjson.dumps(value) == json.dumps(value, separators=(",", ":"))
    assert cjson.loads(cjson.dumps(value)) == value


def test_nan_and_what_json_cannot_write() -> None:
    assert cjson.dumps([math.inf, -math.inf]) == "[Infinity,-Infinity]"
    with pytest.raises(TypeError):
        cjson.dumps({"a": object()})
    with pytest.raises(TypeError):
        cjson.dumps({(1, 2): 1})


def test_deep_documents_end_in_recursion_error_as_with_json() -> None:
    # agent.decoding turns this into TooDeep.
    with pytest.raises(RecursionError):
        cjson.loads("[" * 100_000 + "]" * 100_000)


def test_neither_json_nor_re_is_imported() -> None:
    probe = ("import sys; sys.path.insert(0, '.'); from agent import cjson; "
             "cjson.dumps(cjson.loads(b'{\"a\": [1, \"b\"]}')); "
             "print(sorted({'json', 're'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-I", "-S", "-c", probe], capture_output=True,
                            text=True, check=True, cwd=REPO)
    assert result.stdout.strip() == "[]"
