"""Typed configs from YAML files and `dotted.key=value` overrides.

Configs are plain (possibly nested) dataclasses. Loading is strict, so a typo in a
config file or on the command line fails at once with a one-line `ConfigError` that
names the dotted key and what it allows, instead of silently training the wrong thing.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from saelab.atomic import atomic_write_text
from saelab.errors import ConfigError

T = TypeVar("T")

_SCALAR_NAMES = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
}
_MAX_SHOWN = 60


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `2e5` as a float (as YAML 1.2 does)."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes the string '2e5', so `_Loader` reads back a string."""


for _yaml_class in (_Loader, _Dumper):
    _yaml_class.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )


def config_from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build `cls` from `data`, checking every value against the field's annotation.

    Unknown keys are errors, missing keys take the dataclass default, nested sections
    are mappings. Then each config's `validate()` (if defined) is called, inner sections
    first; a nested section's message gets its dotted path prepended, so `validate()`
    should say `key: problem`. `prefix` is this section's dotted path in a larger
    config, used only in messages.
    """
    config = _build(cls, data, prefix)
    _validate(config, prefix)
    return config


def load_config(cls: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Read `path` (YAML; None: all defaults), apply `key=value` overrides, build `cls`.

    Override values are YAML, so `n_tokens=1000` is an int, `hooks=[a,b]` a list and
    `corpus.path=null` is None; later overrides win.
    """
    data = _read_yaml(Path(path)) if path is not None else {}
    for override in overrides:
        _apply_override(cls, data, override)
    return config_from_dict(cls, data)


def read_config_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML config file's top-level mapping, unbuilt (for a caller that adapts it first)."""
    return _read_yaml(Path(path))


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as plain nested dicts and lists, for manifests and `save_config`; a section that names its
    own keys (`own_keys`: an SAE's, by its variant) holds only those."""
    own = config.own_keys() if hasattr(config, "own_keys") else None
    fields = [f for f in dataclasses.fields(config) if f.init and (own is None or f.name in own)]
    return {f.name: _to_plain(getattr(config, f.name)) for f in fields}


def config_identity(config: Any, ignore: Sequence[str]) -> dict[str, Any]:
    """The config as a dict without the keys that do not change a job's output (paths, devices, logging).

    Two runs with equal identities produce the same result, so a resumed job must match its start.
    """
    plain = config_to_dict(config)
    return {key: value for key, value in plain.items() if key not in ignore}


def config_changes(before: Mapping[str, Any], after: Mapping[str, Any], prefix: str = "") -> list[str]:
    """`key: old → new` for each key of `after` whose value differs in `before`; inside nested sections and
    equally long lists, the innermost differing entry (`saes[1].k: 32 → 64`)."""
    return [change for key, value in after.items() for change in _changes(f"{prefix}{key}", before.get(key), value)]


def _changes(name: str, old: Any, new: Any) -> list[str]:
    if old == new:
        return []
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        return config_changes(old, new, prefix=f"{name}.")
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        pairs = enumerate(zip(old, new, strict=True))
        return [change for i, (before, after) in pairs for change in _changes(f"{name}[{i}]", before, after)]
    return [f"{name}: {old!r} → {new!r}"]


def save_config(config: Any, path: str | Path) -> None:
    """Write the config as YAML atomically: a crash never leaves a half-written file, a full disk is a
    SaelabError naming the file."""
    atomic_write_text(path, yaml.dump(config_to_dict(config), Dumper=_Dumper, sort_keys=False))


# --- building ------------------------------------------------------------------------


def _build(cls: type[T], data: Any, prefix: str) -> T:
    """Construct `cls` from a mapping, unvalidated; nested sections recurse here."""
    if not isinstance(data, Mapping):
        where = prefix or "config"
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise _unknown_key(key, prefix, list(fields))
    if hasattr(cls, "check_keys"):  # a section whose keys depend on a value in it (an SAE's on its variant)
        cls.check_keys(data, prefix)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], _join(prefix, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(prefix, name)}: required key is missing")
    return cls(**kwargs)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and return it in that type."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Union or origin is types.UnionType:
        return _convert_union(value, tp, key)
    if origin is Literal:
        return _convert_literal(value, tp, key)
    if tp is list or origin is list:
        return _convert_list(value, tp, key)
    if origin is dict:
        return _convert_dict(value, tp, key)
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else _build(tp, value, key)
    if tp in _SCALAR_NAMES:
        return _convert_scalar(value, tp, key)
    raise TypeError(f"config field {key} has an unsupported annotation: {tp!r}")


def _convert_scalar(value: Any, tp: type, key: str) -> Any:
    """int, float, bool, str; a bool is never a number, an integral float is an int."""
    if tp is str and isinstance(value, str) and "\x00" in value:
        raise ConfigError(f"{key}: {_show(value)} contains a NUL character, which no path or name can hold")
    if tp in (bool, str) and isinstance(value, tp):
        return value
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if tp is int and (is_int or isinstance(value, float) and value.is_integer()):
        return int(value)
    if tp is float and (is_int or isinstance(value, float)):
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{key}: {_show(value)} is too large for a float") from None
    raise ConfigError(f"{key}: expected {_describe(tp)}, got {_show(value)}")


def _convert_dict(value: Any, tp: Any, key: str) -> dict[Any, Any]:
    """A mapping whose keys and values are each checked against `dict[K, V]`'s K and V."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a mapping of names to values, got {_show(value)}")
    key_type, value_type = get_args(tp)
    return {_convert(k, key_type, key): _convert(v, value_type, f"{key}.{k}") for k, v in value.items()}


def _convert_union(value: Any, tp: Any, key: str) -> Any:
    """`X | None` and friends; a lone section or list option reports its own errors."""
    options = [a for a in get_args(tp) if a is not type(None)]
    if value is None and len(options) < len(get_args(tp)):
        return None
    if len(options) == 1 and not _is_scalar_type(options[0]):
        return _convert(value, options[0], key)
    for option in options:
        try:
            return _convert(value, option, key)
        except ConfigError:
            pass
    raise ConfigError(f"{key}: expected {_describe(tp)}, got {_show(value)}")


def _convert_literal(value: Any, tp: Any, key: str) -> Any:
    # Compare types too: `True == 1`, but `true` is not an allowed value of Literal[1].
    allowed = get_args(tp)
    if any(type(value) is type(a) and value == a for a in allowed):
        return value
    raise ConfigError(f"{key}: {_show(value)} is not one of: {_allowed(allowed)}")


def _convert_list(value: Any, tp: Any, key: str) -> list[Any]:
    """A list, or one scalar taken as a one-element list (handy on the command line)."""
    (item_tp,) = get_args(tp) or (Any,)
    if value is None or isinstance(value, Mapping | set):
        raise ConfigError(f"{key}: expected a list, got {_show(value)}")
    items = list(value) if isinstance(value, list | tuple) else [value]
    return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(items)]


def _validate(config: Any, prefix: str) -> None:
    """Call `validate()` on nested sections, then on `config`; prefix section errors."""
    for f in dataclasses.fields(config):
        child = getattr(config, f.name)
        if dataclasses.is_dataclass(child) and not isinstance(child, type):
            _validate(child, _join(prefix, f.name))
    validate = getattr(config, "validate", None)
    if not callable(validate):
        return
    try:
        validate()
    except ConfigError as e:
        if not prefix:
            raise
        raise ConfigError(f"{prefix}.{e}") from e


# --- files and overrides -------------------------------------------------------------


def _read_yaml(path: Path) -> dict[str, Any]:
    """The file's top-level mapping; an empty file is an empty mapping."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or _one_line(e)
        raise ConfigError(f"{path}: cannot read config file ({reason})") from None
    data = _parse_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys to values, got {_show(data)}")
    return data


def _parse_yaml(text: str, where: str) -> Any:
    """Parse YAML; errors become one line naming `where` and the line number."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or e
        raise ConfigError(f"{where}{line}: invalid YAML: {_one_line(problem)}") from None
    except ValueError as e:  # e.g. a date like 2024-13-45
        raise ConfigError(f"{where}: invalid YAML value: {_one_line(e)}") from None


def _apply_override(cls: type, data: dict[str, Any], override: str) -> None:
    """Set `data[a][b] = value` for `a.b=value`, checking each key part on `cls`."""
    key, sep, text = override.partition("=")
    key = key.strip()
    where = f"override {override!r}"
    if not sep or not key:
        raise ConfigError(f"{where}: expected dotted.key=value, e.g. n_tokens=1000")
    parts = key.split(".")
    section, section_cls = data, cls
    for depth, part in enumerate(parts[:-1]):
        path = ".".join(parts[: depth + 1])
        section_cls = _field_type(section_cls, part, ".".join(parts[:depth]), where)
        if not dataclasses.is_dataclass(section_cls):
            raise ConfigError(f"{where}: {path} is a value, not a section")
        if section.get(part) is None:
            section[part] = {}
        if not isinstance(section[part], dict):
            raise ConfigError(f"{path}: expected a mapping, got {_show(section[part])}")
        section = section[part]
    _field_type(section_cls, parts[-1], ".".join(parts[:-1]), where)
    section[parts[-1]] = _parse_yaml(text, where)


def _field_type(cls: type, name: str, prefix: str, where: str) -> Any:
    """The annotation of field `name` of `cls`, unwrapping `X | None`."""
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    if name not in names:
        raise ConfigError(f"{where}: {_unknown_key(name, prefix, names)}")
    tp = get_type_hints(cls)[name]
    if get_origin(tp) in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        tp = options[0] if len(options) == 1 else tp
    return tp


# --- messages ------------------------------------------------------------------------


def _unknown_key(key: Any, prefix: str, allowed: list[str]) -> ConfigError:
    dotted = _join(prefix, str(key))
    close = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f" (did you mean {_join(prefix, close[0])!r}?)" if close else ""
    return ConfigError(f"unknown key {dotted!r}{hint}; allowed keys: {', '.join(allowed)}")


def _describe(tp: Any) -> str:
    """What a value of annotation `tp` looks like, in the user's (YAML) words."""
    origin = get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Union or origin is types.UnionType:
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin is Literal:
        return f"one of: {_allowed(get_args(tp))}"
    if tp is list or origin is list:
        return "a list"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return _SCALAR_NAMES.get(tp, repr(tp))


def _allowed(values: Sequence[Any]) -> str:
    return ", ".join(yaml.safe_dump(v, default_flow_style=True).split("\n")[0] for v in values)


def _show(value: Any) -> str:
    """A short one-line repr of a user's value."""
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _one_line(obj: object) -> str:
    return " ".join(str(obj).split())


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_scalar_type(tp: Any) -> bool:
    return tp in _SCALAR_NAMES or get_origin(tp) is Literal


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value
