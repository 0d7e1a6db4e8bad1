"""What `dynoagent up` reads from an app directory: the Procfile (Heroku's format), the .env
file (`heroku local`'s format), the app name derived from the directory, and formation
arguments such as `web=2,worker=1` or `web=3:standard-2x`."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.errors import excerpt
from agent.spec import APP, ENV_KEY, ONE_SHOT_TYPES, TYPE

# `type: command`; the type is checked against the spec's TYPE afterwards so that the error
# can say what is wrong with it rather than only "malformed".
_PROCFILE_LINE = re.compile(r"(?P<type>[^:\s]+)\s*:\s*(?P<command>.*)")
_ENV_LINE = re.compile(r"(?:export\s+)?(?P<key>[^=\s]+)\s*=\s*(?P<value>.*)")
_FORMATION_ITEM = re.compile(r"(?P<type>[^=\s]+)=(?P<quantity>[^:\s]*)(?::(?P<size>\S+))?")
_QUANTITY = re.compile(r"[0-9]{1,6}")
MAX_QUANTITY = 100  # more dynos of one type than a single host should ever be asked for
RELEASE_TYPE = "release"


class AppDirError(Exception):
    """Something in the app directory (or a formation argument) is unusable. `path` is the
    file at fault, `line` its 1-based line number when the fault is on one line."""

    def __init__(self, message: str, path: Path | None = None, line: int | None = None,
                 value: str | None = None) -> None:
        where = "" if path is None else f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.message = message
        self.path = path
        self.line = line
        self.value = value


@dataclass(frozen=True)
class ProcessType:
    name: str
    command: str
    line: int


@dataclass(frozen=True)
class Procfile:
    types: tuple[ProcessType, ...]

    def command(self, name: str) -> str | None:
        return next((t.command for t in self.types if t.name == name), None)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.types)

    @property
    def release(self) -> str | None:
        return self.command(RELEASE_TYPE)

    def default_formation(self) -> dict[str, int]:
        """One dyno of every type; the release type runs once before, never as a formation."""
        return {t.name: 1 for t in self.types if t.name not in (RELEASE_TYPE, *ONE_SHOT_TYPES)}


def parse_procfile(text: str, path: Path = Path("Procfile")) -> Procfile:
    """Parse Procfile text; a malformed line or a duplicate type raises AppDirError."""
    types: list[ProcessType] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _PROCFILE_LINE.fullmatch(line)
        if match is None:
            raise AppDirError(f"malformed line {raw.strip()!r}: expected 'type: command'",
                              path, number, raw)
        name, command = match["type"], match["command"].strip()
        if not TYPE.fullmatch(name):
            raise AppDirError(f"process type {name!r} must match {TYPE.pattern} (lower case "
                              "letters, digits and underscores, at most 30)", path, number, name)
        if name == "run":
            raise AppDirError("process type 'run' is reserved for one-off dynos", path, number,
                              name)
        if not command:
            raise AppDirError(f"process type {name!r} has no command", path, number, raw)
        if name in seen:
            raise AppDirError(f"duplicate process type {name!r} (first on line {seen[name]})",
                              path, number, name)
        seen[name] = number
        types.append(ProcessType(name, command, number))
    if not types:
        raise AppDirError("declares no process types", path)
    return Procfile(tuple(types))


def _unquote_double(value: str, path: Path, number: int) -> str:
    out: list[str] = []
    escapes = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "$": "$"}
    chars = iter(value)
    for char in chars:
        if char == "\\":
            nxt = next(chars, "")
            out.append(escapes.get(nxt, "\\" + nxt))
        else:
            out.append(char)
    text = "".join(out)
    if "\x00" in text:
        raise AppDirError("value contains a NUL character", path, number)
    return text


def parse_env(text: str, path: Path = Path(".env")) -> dict[str, str]:
    """`KEY=value` lines as `heroku local` reads them: comments, blank lines, an optional
    `export `, single quotes (literal), double quotes (with \\n escapes) or a bare value whose
    trailing ` # comment` is dropped. A line that is none of these raises AppDirError."""
    env: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _ENV_LINE.fullmatch(line)
        if match is None:
            raise AppDirError(f"malformed line {line!r}: expected KEY=value", path, number, raw)
        key, value = match["key"], match["value"]
        if not ENV_KEY.fullmatch(key):
            raise AppDirError(f"variable name {key!r} must match {ENV_KEY.pattern}", path,
                              number, key)
        if value[:1] in ("'", '"'):
            quote = value[0]
            end = value.rfind(quote)
            rest = value[end + 1:].strip()
            if end == 0 or (rest and not rest.startswith("#")):
                raise AppDirError(f"unterminated or trailing text after {quote}-quoted value "
                                  f"of {key}", path, number, raw)
            inner = value[1:end]
            value = inner if quote == "'" else _unquote_double(inner, path, number)
        else:
            value = re.split(r"\s+#", value, maxsplit=1)[0].rstrip()
        env[key] = value
    return env


def app_name(directory: Path) -> str:
    """The app name from a directory name, folded into [a-z][a-z0-9-]{0,29}
    (`My_App.v2` → `my-app-v2`); AppDirError when nothing usable is left."""
    base = directory.resolve().name
    name = re.sub(r"[^a-z0-9]+", "-", base.lower())
    name = re.sub(r"^[^a-z]+", "", name)[:30].rstrip("-")
    if not APP.fullmatch(name):
        raise AppDirError(f"cannot make an app name (matching {APP.pattern}) from the directory "
                          f"name {base!r}; pass --app NAME", directory, value=base)
    return name


@dataclass(frozen=True)
class FormationItem:
    type: str
    quantity: int
    size: str | None = None


def parse_formation_items(items: Iterable[str]) -> list[FormationItem]:
    """`TYPE=N[:SIZE]` items (also comma-separated within one item). Sizes are checked by
    the caller, which knows the configured size table."""
    out: list[FormationItem] = []
    seen: set[str] = set()
    for chunk in items:
        for item in chunk.split(","):
            item = item.strip()
            if not item:
                continue
            match = _FORMATION_ITEM.fullmatch(item)
            # ASCII digits only: isdigit() and int() also take other scripts' digits.
            if match is None or not _QUANTITY.fullmatch(match["quantity"]):
                raise AppDirError(f"{excerpt(item)} is not TYPE=QUANTITY[:SIZE] (e.g. web=2 or "
                                  "web=2:standard-2x)", value=item)
            kind, quantity = match["type"], int(match["quantity"])
            if not TYPE.fullmatch(kind):
                raise AppDirError(f"process type {excerpt(kind)} must match {TYPE.pattern}",
                                  value=kind)
            if quantity > MAX_QUANTITY:
                raise AppDirError(f"{kind}={quantity}: at most {MAX_QUANTITY} dynos per type",
                                  value=item)
            if kind in seen:
                raise AppDirError(f"process type {kind!r} is given twice", value=kind)
            seen.add(kind)
            out.append(FormationItem(kind, quantity, match["size"]))
    return out


def check_types(items: Iterable[FormationItem], procfile: Procfile,
                path: Path | None = None) -> None:
    """Every item names a formation type of the Procfile (not `release`, not `run`)."""
    for item in items:
        if item.type in (RELEASE_TYPE, *ONE_SHOT_TYPES):
            raise AppDirError(f"{item.type} dynos are not part of the formation", value=item.type)
        if procfile.command(item.type) is None:
            known = ", ".join(n for n in procfile.names if n != RELEASE_TYPE) or "none"
            raise AppDirError(f"no process type {item.type!r} in the Procfile (types: {known})",
                              path, value=item.type)


def load_env_file(path: Path, required: bool) -> Mapping[str, str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        if required:
            raise AppDirError("does not exist", path) from None
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise AppDirError(f"cannot read: {exc}", path) from None
    return parse_env(text, path)


def load_procfile(directory: Path) -> Procfile:
    if not directory.is_dir():
        raise AppDirError("is not a directory" if directory.exists() else "does not exist",
                          directory)
    path = directory / "Procfile"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise AppDirError("does not exist (an app directory needs a Procfile)", path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AppDirError(f"cannot read: {exc}", path) from None
    return parse_procfile(text, path)
