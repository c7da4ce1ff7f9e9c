"""Strict dataclass loading for YAML/JSON params.

Every params file in this project is read through :func:`from_mapping`: unknown or misspelled
keys are errors that name the key, its dotted path and the file; values are type-checked against
the dataclass annotations (``int`` accepts only ints, ``float`` accepts ints, ``Literal`` lists its
choices, ``Optional`` allows ``null``); each dataclass may define ``validate(self)`` for ranges.
Dotted CLI overrides (``rl.lr=1e-5``) are applied to the raw mapping before typing, so they get
the same checks as the file.
"""
from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Union

import yaml


_SCI = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
MAX_SHOWN = 80  # characters of an offending value quoted in an error message


def shown(value: Any, limit: int = MAX_SHOWN) -> str:
    """A bounded ``repr`` of ``value`` (at most ``limit`` characters), so an error stays one short line.

    ``reprlib`` caps nesting depth and the entries shown per container, so even a value built from
    nested shared references (a YAML alias tree of billions of leaves) is never rendered in full.
    """
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 3, 6, 6, 6, 6
    r.maxstring, r.maxother, r.maxlong = limit, limit, 40
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ConfigError(ValueError):
    """A params file, key or value is wrong. The message names the file, key and expectation."""


class _Bad(ConfigError):
    """Type mismatch; the message (with the value shortened) is built only when raised and shown."""

    def __init__(self, value: Any, tp: Any, path: str, source: str):
        super().__init__()
        self._parts = (value, tp, path, source)

    def __str__(self) -> str:
        value, tp, path, source = self._parts
        return f"{source}: key '{path}' has value {shown(value)} ({type(value).__name__}); expected {_type_name(tp)}"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str, source: str) -> Any:
    """Check ``value`` against annotation ``tp`` and return the typed value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = _Bad(value, tp, path, source)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path, source)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value in args:
            return value
        raise bad
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise bad
        return from_mapping(tp, value, source=source, prefix=path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{source}: key '{path}' needs {len(args)} entries, got {len(value)}")
            return tuple(_coerce(v, a, f"{path}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{path}[{i}]", source) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad
        ktp, vtp = args if args else (Any, Any)
        return {
            _coerce(k, ktp, f"{path}.<key>", source): _coerce(v, vtp, f"{path}.{k}", source)
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        number = None
        try:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                number = float(value)
            # YAML 1.1 reads "1e-5" (no dot) as a string; accept plain scientific notation here.
            elif isinstance(value, str) and _SCI.fullmatch(value.strip()):
                number = float(value)
        except OverflowError:  # an integer beyond float range
            number = math.inf
        if number is None:
            raise bad
        if not math.isfinite(number):
            raise ConfigError(f"{source}: key '{path}' has value {shown(value)}; expected a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if isinstance(value, tp):
        return value
    raise bad


def from_mapping(cls: type, data: Mapping[str, Any], *, source: str = "<params>", prefix: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise :class:`ConfigError`."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: '{prefix or '<root>'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            where = f"{prefix}.{key}" if prefix else str(key)
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"{source}: unknown key '{where}'{hint} (valid keys here: {', '.join(sorted(fields))})"
            )
    kwargs = {}
    for name, field in fields.items():
        path = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], path, source)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: required key '{path}' is missing")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(f"{source}: {prefix + ': ' if prefix else ''}{exc}") from None
    return obj


def to_mapping(obj: Any) -> Any:
    """Dataclass -> plain dict/list tree (tuples become lists) suitable for YAML/JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_mapping(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_mapping(v) for k, v in obj.items()}
    return obj


def parse_override_value(text: str) -> Any:
    """Parse the right-hand side of ``key=value`` with YAML rules (1e-5, true, [1,2], null)."""
    try:
        return safe_load_strict(text) if text != "" else ""
    except yaml.YAMLError:
        return text  # not YAML: taken as a plain string
    except ConfigError as exc:
        if "alias" in str(exc) and "&" not in text:
            return text  # '*' without any anchor (e.g. a glob like *.png): a plain string, as before
        raise


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...], *, source: str = "<cli>") -> dict:
    """Apply ``a.b.c=value`` strings to a nested mapping (in place, returned for chaining).

    Intermediate keys must already exist as mappings; the leaf may be new only if its parent is
    a free-form dict (the typed load then rejects it if it is not a field).
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"{source}: override key {key!r} is empty or has an empty segment")
        node = data
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part) if isinstance(node, dict) else None
            if nxt is None:
                nxt = {}
                node[part] = nxt
            if not isinstance(nxt, dict):
                raise ConfigError(
                    f"{source}: override {item!r}: '{'.'.join(parts[: i + 1])}' is not a section"
                )
            node = nxt
        try:
            node[parts[-1]] = parse_override_value(raw)
        except ConfigError as exc:  # YAML alias or duplicate key in the value
            raise ConfigError(f"{source}: override '{key.strip()}': {exc}") from None
    return data


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate mapping keys and anchors/aliases.

    Aliases are refused outright (a params file never needs them, and a few hundred bytes of
    nested aliases expand to billions of nodes); duplicate keys would otherwise silently keep
    the last value.
    """

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"line {event.start_mark.line + 1}: YAML alias '*{event.anchor}' is not allowed "
                              "in params files (write the value out)")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                dup = key in seen
                seen.add(key)
            except TypeError:  # unhashable key: the base class reports it
                continue
            if dup:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: duplicate key {shown(key)}")
        return super().construct_mapping(node, deep=deep)


def safe_load_strict(text: str) -> Any:
    """Parse YAML text with :class:`StrictLoader` (no duplicate keys, no aliases)."""
    loader = StrictLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping (strict safe load: no duplicate keys, no aliases); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        data = safe_load_strict(path.read_text(encoding="utf-8"))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())[:300]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data
