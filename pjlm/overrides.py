"""Config serialisation and `--set section.field=value` overrides for frozen config dataclasses."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Literal, Sequence

from pjlm.config import ConfigError


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def from_dict(cls, data: dict):
    """Rebuild a (nested) config dataclass from `to_dict`'s output; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise ConfigError(f"unknown key {key!r} for {cls.__name__}")
        t = _dataclass_of(hints[key])
        kwargs[key] = from_dict(t, value) if t is not None and isinstance(value, dict) else _coerce(hints[key], value, key)
    return cls(**kwargs)


def _dataclass_of(t):
    """The dataclass type behind `t` or `Optional[t]`, else None."""
    if typing.get_origin(t) is typing.Union:
        t = next((a for a in typing.get_args(t) if a is not type(None)), None)
    return t if dataclasses.is_dataclass(t) else None


def _coerce(t, value, key: str):
    origin, args = typing.get_origin(t), typing.get_args(t)
    if value is None:
        if origin is typing.Union and type(None) in args:
            return None
        raise ConfigError(f"{key} cannot be None")
    if origin is typing.Union:
        return _coerce(next(a for a in args if a is not type(None)), value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r}; choose one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        items = _list_items(value, key) if isinstance(value, str) else list(value)
        return tuple(_coerce(args[0], v, key) for v in items if v != "")
    if t is bool:
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ConfigError(f"{key}={value!r} is not a boolean; use true or false")
            return value.lower() in ("true", "1", "yes")
        return bool(value)
    if t in (int, float, str):
        try:
            return t(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r} is not a valid {t.__name__}") from None
    return value


def _list_items(text: str, key: str) -> list:
    """A tuple field's `--set` value: comma-separated (a,b,c), or a JSON list when an item itself
    holds a comma (["regex:1.0:pattern=a,b", "vader:1.0"])."""
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{key}={text!r} starts like a JSON list but is not one ({e})") from None
        if not isinstance(items, list):
            raise ConfigError(f"{key}={text!r} must be a JSON list or comma-separated values")
        return items
    return text.split(",")


def apply_overrides(config, overrides: Sequence[str]):
    """Apply `section.field=value` strings (as given to `--set`); errors list the valid keys."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, value = item.split("=", 1)
        config = _set(config, key.strip().split("."), value, key)
    return config.validate()


def _set(obj, path: list[str], value: str, full_key: str):
    fields = {f.name for f in dataclasses.fields(obj)}
    name = path[0]
    if name not in fields:
        valid = ", ".join(sorted(_keys(obj)))
        raise ConfigError(f"unknown config key {full_key!r}; valid keys: {valid}")
    current = getattr(obj, name)
    section = _dataclass_of(typing.get_type_hints(type(obj))[name])
    if current is None and section is not None and len(path) > 1:  # an optional section switched on
        current = section()
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"config key {full_key!r}: {name} has no sub-fields")
        return dataclasses.replace(obj, **{name: _set(current, path[1:], value, full_key)})
    if section is not None and value.lower() in ("none", "null") and typing.get_origin(
            typing.get_type_hints(type(obj))[name]) is typing.Union:
        return dataclasses.replace(obj, **{name: None})  # an optional section switched off
    if dataclasses.is_dataclass(current):
        raise ConfigError(f"config key {full_key!r} is a section; set one of its fields, e.g. {full_key}."
                          f"{dataclasses.fields(current)[0].name}=...")
    t = typing.get_type_hints(type(obj))[name]
    parsed = None if value.lower() in ("none", "null") and not _a_choice(t, value) else value
    return dataclasses.replace(obj, **{name: _coerce(t, parsed, full_key)})


def _a_choice(t, text: str) -> bool:
    """Whether `text` is itself one of a Literal field's choices (model.remat=none means "none"), or of
    a tuple-of-Literal field's items (train.report_to=none means ("none",))."""
    if typing.get_origin(t) is typing.Union:
        return any(_a_choice(a, text) for a in typing.get_args(t) if a is not type(None))
    if typing.get_origin(t) is tuple:
        return _a_choice(typing.get_args(t)[0], text)
    return typing.get_origin(t) is Literal and text in typing.get_args(t)


def _keys(obj, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = prefix + f.name
        out += _keys(value, key + ".") if dataclasses.is_dataclass(value) else [key]
    return out
