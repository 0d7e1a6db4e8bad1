"""`bin/release` output (YAML: `default_process_types`, `config_vars`, `addons`) read and
merged: a later buildpack's entries win over an earlier one's; the app's own Procfile and
config vars win over all of them (the caller applies those)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import yaml

from agent.spec import ENV_KEY, TYPE

# Keys of Heroku's release YAML we read; others (addons) are accepted and ignored, as on Heroku.
_KNOWN = ("default_process_types", "config_vars", "addons")


class ReleaseError(ValueError):
    """A buildpack's bin/release printed something that is not a release description."""


@dataclass(frozen=True)
class ReleaseInfo:
    process_types: dict[str, str] = field(default_factory=dict)
    config_vars: dict[str, str] = field(default_factory=dict)


def parse_release(text: str, origin: str = "bin/release") -> ReleaseInfo:
    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise ReleaseError(f"{origin}: not YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ReleaseError(f"{origin}: expected a mapping, got {type(data).__name__}")
    types = _mapping(data, "default_process_types", origin)
    config = _mapping(data, "config_vars", origin)
    for name in types:
        if not TYPE.fullmatch(name):
            raise ReleaseError(f"{origin}: process type {name!r} must match {TYPE.pattern}")
    for name in config:
        if not ENV_KEY.fullmatch(name):
            raise ReleaseError(f"{origin}: config var {name!r} must match {ENV_KEY.pattern}")
    return ReleaseInfo(types, config)


def _mapping(data: dict[object, object], key: str, origin: str) -> dict[str, str]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ReleaseError(f"{origin}: {key} must be a mapping")
    out: dict[str, str] = {}
    for name, item in value.items():
        if not isinstance(name, str) or isinstance(item, (dict, list)) or item is None:
            raise ReleaseError(f"{origin}: {key}.{name} must be a name and a scalar value")
        out[name] = _scalar(item)
    return out


def _scalar(item: object) -> str:
    if isinstance(item, bool):
        return "true" if item else "false"
    return str(item)


def merge_releases(infos: Iterable[ReleaseInfo]) -> ReleaseInfo:
    types: dict[str, str] = {}
    config: dict[str, str] = {}
    for info in infos:
        types.update(info.process_types)
        config.update(info.config_vars)
    return ReleaseInfo(types, config)
