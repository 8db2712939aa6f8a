"""Typed configs from YAML and `key.sub=value` overrides, checked against dataclasses.

`load_config(StageConfig, "configs/tiny/sft.yaml", ["train.max_steps=10"])` reads the YAML,
applies the overrides, and builds the (frozen) dataclass. A YAML may name `base:` files (relative
to it) that are deep-merged under it first (`read_yaml`). Unknown keys and wrong types fail with
a `ConfigError` naming the dotted key; nothing is guessed or silently dropped. A dataclass may
define `check(self) -> None` and raise `ConfigError("field", "why")` for cross-field rules,
`MOVED_KEYS` (a replaced key -> how to write it now), and a classmethod `variant(data)` that picks
the subclass to build from the data (a reward source's `kind`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import os
import types
import typing
from collections.abc import Callable
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
    """Build `cls` from a YAML file (optional, with its `base:` files) and `key.sub=value` overrides."""
    raw: dict[str, Any] = {}
    origins: dict[str, str] = {}
    source = None
    if path is not None:
        source = str(path)
        raw, origins = read_yaml(path)
    for item in overrides or []:
        key, value = parse_override(item)
        if key == "base":
            raise ConfigError("base", "names a YAML's bases inside the file; on the command line pass --config")
        set_dotted(raw, key, value)
        _forget(origins, key)  # set on the command line: an error names the config file, as before bases
    try:
        return from_dict(cls, raw, source=source)
    except ConfigError as e:
        origin = _origin(origins, e.key)
        if origin is None or origin == source:
            raise
        raise ConfigError(e.key, e.message, f"{origin} (a base of {source})") from None


def read_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The mapping in `path` merged over its `base:` files, and for each dotted key the file that
    set it (so an error names that file). `base:` is a path relative to this file, or a list of
    them merged in order; mappings merge key by key, anything else (a list too) is replaced; the
    later base wins, and this file's own keys win over all its bases."""
    return _read_with_bases(Path(path), ())


def _read_with_bases(path: Path, chain: tuple[Path, ...]) -> tuple[dict[str, Any], dict[str, str]]:
    raw = _read_mapping(path, chain)
    bases = raw.pop("base", None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError("base", f"must be a path or a list of paths, got {bases!r}", str(path))
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for base in bases:
        base_path = Path(os.path.normpath(path.parent / base))
        if base_path.resolve() in {p.resolve() for p in (*chain, path)}:
            cycle = " -> ".join(str(p) for p in (*chain, path, base_path))
            raise ConfigError("base", f"configs inherit in a cycle: {cycle}", str(path))
        if not base_path.is_file():
            raise ConfigError("base", f"base file {base_path} not found", str(path))
        base_raw, base_origins = _read_with_bases(base_path, (*chain, path))
        _merge(merged, base_raw)
        origins.update(base_origins)
    _merge(merged, raw)
    origins.update(_leaves(raw, "", str(path)))
    return merged, origins


def _read_mapping(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    # the file that named this one as its base is the one to blame for a broken base
    key = "base" if chain else "--config"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise ConfigError(key, f"cannot read {path}: {reason}", str(chain[-1]) if chain else None) from None
    try:
        # ConfigLoader: duplicate keys and aliases refused, numbers keep their text (below)
        raw = yaml.load(text, Loader=ConfigLoader) or {}
    except yaml.YAMLError as e:
        message = " ".join(str(e).split())
        raise ConfigError(key, f"{path} is not valid YAML: {message}", str(chain[-1]) if chain else None) from None
    if not isinstance(raw, dict):
        raise ConfigError(key, f"{path} must hold a mapping at the top level", str(chain[-1]) if chain else None)
    return raw


def _merge(into: dict, over: dict) -> None:
    """Deep merge `over` into `into`, in place: mappings key by key, anything else replaced."""
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def _leaves(tree: dict, prefix: str, source: str) -> dict[str, str]:
    """{dotted key: source} for every key in `tree`, sections and values alike."""
    out = {}
    for key, value in tree.items():
        dotted = _join(prefix, str(key))
        out[dotted] = source
        if isinstance(value, dict):
            out.update(_leaves(value, dotted, source))
    return out


def _forget(origins: dict[str, str], key: str) -> None:
    for k in [k for k in origins if k == key or k.startswith(key + ".")]:
        del origins[k]


def _origin(origins: dict[str, str], key: str) -> str | None:
    """The file that set `key` (`train.batchsize`, `pairs.kinds[1]`); None: a default or unknown."""
    return origins.get(key.split("[")[0])


class _Int(int):
    """An integer read from YAML, with the text it was written as (see ConfigLoader)."""

    text: str


class _Float(float):
    text: str


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, stricter where YAML 1.1 silently changes a config:
    - a key given twice is refused (the JSON loader refuses it; YAML kept the last one);
    - aliases (`*name`) are refused: the aliased node is one shared object, so one override
      (`a.x=1`) changed every key that referred to it;
    - a number keeps the text it was written as, so a string field gets that text (`name: 1.10`
      is "1.10", not "1.1"; `0755` is "0755", not 493), and an integer field refuses YAML 1.1's
      octal and base-60 forms instead of reading `0755` as 493."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"alias *{event.anchor} refused: write the value out", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # SafeLoader's own error names it
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)

    def _number(self, node, kind):
        value = kind(super().construct_yaml_int(node) if kind is _Int else super().construct_yaml_float(node))
        value.text = node.value
        return value


ConfigLoader.add_constructor("tag:yaml.org,2002:int", lambda loader, node: loader._number(node, _Int))
ConfigLoader.add_constructor("tag:yaml.org,2002:float", lambda loader, node: loader._number(node, _Float))


def _plain(value: Any) -> Any:
    """Plain int / float again (yaml.safe_dump refuses subclasses) throughout `value`."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=c` -> ("a.b", c), the value read as YAML (`1e-3`, `true`, `[2, 5]`, `null`)."""
    if "=" not in item or item.startswith("="):
        raise ConfigError(item, "an override must look like key.sub=value")
    key, text = item.split("=", 1)
    try:
        value = yaml.load(text, Loader=ConfigLoader) if text != "" else ""
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
    moved = getattr(cls, "MOVED_KEYS", {})  # a key a later version replaced -> how to write it now
    for key in data:
        if key in moved and key not in fields:
            raise ConfigError(_join(prefix, key), moved[key], source)
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


def config_hash(obj: Any, ignore: tuple[str, ...] = (), leaf: Callable[[str], str] | None = None) -> str:
    """A short, stable hash of what a config computes; `ignore` lists keys, dotted for nested
    ones (`train.log_every`), that don't change the result (output paths, tracking). `leaf`, if
    given, replaces every string value first (rlhf/checkpoint.py `content_hash`: a path by what
    it holds)."""
    data = to_dict(obj)
    for key in ignore:
        _drop(data, key.split("."))
    if leaf is not None:
        data = _map_strings(data, leaf)
    blob = json.dumps(data, sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _drop(node: Any, parts: list[str]) -> None:
    """Remove the dotted key `parts` from `node`; a `*` part stands for every key at that level
    (`reward.sources.*.timeout`: every reward source's timeout)."""
    if not isinstance(node, dict):
        return
    head, rest = parts[0], parts[1:]
    children = list(node) if head == "*" else [head]
    for child in children:
        if not rest:
            node.pop(child, None)
        else:
            _drop(node.get(child), rest)


def _map_strings(data: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(data, str):
        return fn(data)
    if isinstance(data, dict):
        return {k: _map_strings(v, fn) for k, v in data.items()}
    if isinstance(data, list):
        return [_map_strings(v, fn) for v in data]
    return data


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _variant(tp: type, value: Any, key: str, source: str | None) -> type:
    """The dataclass to build: `tp`, or the subclass its `variant(data)` picks (a reward source's kind)."""
    variant = getattr(tp, "variant", None)
    if variant is None or not isinstance(value, dict):
        return tp
    try:
        return variant(value)
    except ConfigError as e:
        raise ConfigError(_join(key, e.key), e.message, source) from None


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
        return _plain(value)
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
        return from_dict(_variant(tp, value, key, source), {} if value is None else value, key, source)
    if tp is Any:
        return _plain(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}", source)
        return value
    if tp is int:
        text = getattr(value, "text", "").lstrip("+-")
        if ":" in text or (len(text) > 1 and text[0] == "0" and text[1].isdigit()):
            raise ConfigError(key, f"write {value.text!r} in decimal (YAML 1.1 reads it as {int(value)})", source)
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(key, f"expected an integer, got {value!r}", source)
        return int(value)
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
            # e.g. `run_name=123` on the command line: as written (ConfigLoader keeps the text)
            return getattr(value, "text", None) or str(value)
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}", source)
        return value
    raise ConfigError(key, f"unsupported field type {tp!r}", source)
