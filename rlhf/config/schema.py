"""Typed configs from YAML and `key.sub=value` overrides, checked against dataclasses.

`load_config(StageConfig, "configs/tiny/sft.yaml", ["train.max_steps=10"])` reads the YAML,
applies the overrides, and builds the (frozen) dataclass. Unknown keys and wrong types fail with
a `ConfigError` naming the dotted key; nothing is guessed or silently dropped. A dataclass may
define `check(self) -> None` and raise `ConfigError("field", "why")` for cross-field rules.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A bad config value; `key` is the dotted path (e.g. `train.max_steps`)."""

    def __init__(self, key: str, message: str, source: str | None = None):
        self.key, self.message, self.source = key, message, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}config key '{key}': {message}")


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None):
    """Build `cls` from a YAML file (optional) and `key.sub=value` overrides."""
    raw: dict[str, Any] = {}
    source = None
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError("--config", f"cannot read {path}: {e.strerror}") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError("--config", f"{path} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError("--config", f"{path} must hold a mapping at the top level")
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    return from_dict(cls, raw, source=source)


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=c` -> ("a.b", c), the value read as YAML (`1e-3`, `true`, `[2, 5]`, `null`)."""
    if "=" not in item or item.startswith("="):
        raise ConfigError(item, "an override must look like key.sub=value")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    if text.count("#") > _count_hash(value):
        # YAML read ` #...` as a comment: `name=exp #2` would silently become "exp".
        raise ConfigError(
            key.strip(),
            f"the value {text!r} holds ' #', which YAML drops as a comment; quote it: {key.strip()}='\"{text}\"'",
        )
    return key.strip(), value


def format_override(key: str, value: str) -> str:
    """The inverse of `parse_override` for a string: `key="..."`, double-quoted YAML that reads
    back as exactly `value` whatever it holds (' #', ': ', a leading '!', 'null', '123')."""
    quoted = yaml.safe_dump(value, default_style='"', width=math.inf, allow_unicode=True).rstrip("\n")
    return f"{key}={quoted}"


def _count_hash(value: Any) -> int:
    if isinstance(value, str):
        return value.count("#")
    if isinstance(value, dict):
        return sum(_count_hash(k) + _count_hash(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(_count_hash(v) for v in value)
    return 0


def set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), "is a value, not a section; cannot set a sub-key")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type, data: Any, prefix: str = "", source: str | None = None):
    """Recursively build dataclass `cls` from plain data, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(prefix or "<root>", f"expected a mapping for {cls.__name__}, got {data!r}", source)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean '{_join(prefix, close[0])}'?" if close else ""
            known = ", ".join(sorted(fields))
            raise ConfigError(_join(prefix, key), f"unknown key{hint} (known here: {known})", source)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, _join(prefix, name), source)
    try:
        obj = cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(_join(prefix, e.key), e.message, source) from None
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()
        except ConfigError as e:
            raise ConfigError(_join(prefix, e.key), e.message, source) from None
    return obj


def to_dict(obj: Any) -> Any:
    """A config as plain data (for YAML, JSON and hashing)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, allow_unicode=True)


def config_hash(obj: Any, ignore: tuple[str, ...] = ()) -> str:
    """A short, stable hash of what a config computes; `ignore` lists keys, dotted for nested
    ones (`train.log_every`), that don't change the result (output paths, tracking)."""
    data = to_dict(obj)
    for key in ignore:
        *parents, last = key.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    blob = json.dumps(data, sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _coerce(tp: Any, value: Any, key: str, source: str | None) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:  # `X | None`: X's own error, naming the list item or sub-key at fault
            return _coerce(arms[0], value, key, source)
        errors = []
        for arm in arms:
            try:
                return _coerce(arm, value, key, source)
            except ConfigError as e:
                errors.append(e.message)
        raise ConfigError(key, " or ".join(errors), source)
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"must be one of {list(args)}, got {value!r}", source)
        return value
    if origin in (list, tuple, typing.Sequence):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}", source)
        if origin is tuple and args and Ellipsis not in args:  # tuple[float, float]: exactly that many
            if len(value) != len(args):
                raise ConfigError(key, f"expected a list of {len(args)} values, got {value!r}", source)
            return tuple(_coerce(t, v, f"{key}[{i}]", source) for i, (t, v) in enumerate(zip(args, value, strict=True)))
        (inner,) = args[:1] or (Any,)
        return tuple(_coerce(inner, v, f"{key}[{i}]", source) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}", source)
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(vt, v, f"{key}.{k}", source) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, {} if value is None else value, key, source)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}", source)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(key, f"expected an integer, got {value!r}", source)
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}", source)
        # Every float field is finite: a NaN lr or coefficient trains without an error and
        # silently gives NaN weights or no update (NaN comparisons are all false, so range checks
        # in check() would let it through). No field needs inf or NaN: "off" is null.
        if not math.isfinite(value):
            raise ConfigError(key, f"must be a finite number, got {value!r}", source)
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. `run_name=123` on the command line
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}", source)
        return value
    raise ConfigError(key, f"unsupported field type {tp!r}", source)
