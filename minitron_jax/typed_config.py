"""Typed configs from YAML: one builder, one override syntax, one error style for every config of the package.

Each config is a (frozen) dataclass tree; :func:`build` turns parsed YAML into it, checking every value against its
annotation (``int``, ``float``, ``bool``, ``str``, ``Any``, ``X | None``, unions, ``list[X]``, ``tuple[X, ...]``,
``tuple[X, Y]``, ``dict[K, V]``, ``Literal[...]`` and nested dataclasses). The run config of the trainer
(:mod:`minitron_jax.train.config`), the pipeline config (:mod:`minitron_jax.pipeline.config`) and the options of
``prune --config`` all read their files and overrides through here, so they fail the same way::

    unknown config key train.stpes (did you mean train.steps?); valid keys here: steps, grad_accum, ...
    train.steps: expected an integer, got str 'ten'
    missing required config key run_dir
    override 'train.steps' is not of the form section.key=value
    c.yaml is not valid YAML: line 2, column 1: expected ',' or ']', but got '<stream end>'

Rules worth knowing:

* ``null`` for a section (a nested dataclass) means its defaults, for a mapping or a list an empty one; for any
  other field it is refused unless the annotation allows ``None``.
* A section given in YAML is applied on top of the field's default: a field declared as
  ``optim: OptimSection = field(default_factory=lambda: OptimSection(warmup_steps=4))`` keeps ``warmup_steps=4``
  when the YAML sets only ``optim: {peak_lr: 3e-4}``.
* Floats may be written the C way (``3e-4``), which YAML 1.1 reads as a string; ints stay ints in ``int | float``.
* Checks of values (ranges, choices between fields) belong to each config's own validation; this module checks
  shapes and types only.

Every function takes ``error``, the exception class to raise (each config has its own ``ValueError`` subclass);
the message is the same whichever class carries it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, Union

import yaml

__all__ = ["TypedConfigError", "build", "coerce", "parse_override", "apply_overrides", "yaml_problem",
           "read_yaml_sections", "load", "nondefault", "float_fields"]


class TypedConfigError(ValueError):
    """A config value of the wrong shape or type (the default ``error`` of this module's functions)."""


# ----------------------------------------------------------------------------------------------------------------
# Building dataclasses from plain data
# ----------------------------------------------------------------------------------------------------------------
def build(cls: type, data: Any, where: str = "", *, error: type[Exception] = TypedConfigError):
    """An instance of the dataclass ``cls`` from nested plain data (parsed YAML), every value type-checked.

    ``where`` prefixes the dotted keys in messages (``"distill."`` for a section); unknown and missing keys and
    wrong types raise ``error`` naming the dotted key."""
    try:
        if not isinstance(data, Mapping):
            raise TypedConfigError(f"{where.rstrip('.') or 'a config'}: expected a mapping of keys, got "
                                   f"{type(data).__name__} {data!r}")
        return _build(cls, data, where)
    except TypedConfigError as e:
        if error is TypedConfigError:
            raise
        raise error(str(e)) from None


def coerce(value: Any, tp: Any, where: str, *, error: type[Exception] = TypedConfigError):
    """``value`` checked against the annotation ``tp`` (and converted in the few lossless cases YAML needs)."""
    try:
        return _coerce(value, tp, where)
    except TypedConfigError as e:
        if error is TypedConfigError:
            raise
        raise error(str(e)) from None


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _build(cls, data: Mapping[str, Any], where: str, base: Any = None):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" (did you mean {where}{close[0]}?)" if close else ""
        raise TypedConfigError(f"unknown config key {where}{key}{hint}; valid keys here: {', '.join(fields)}")
    if base is None:
        missing = [n for n, f in fields.items() if n not in data and _field_default(f) is dataclasses.MISSING]
        if missing:
            raise TypedConfigError(f"missing required config key {where}{missing[0]}")
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
            # A section is applied on top of the field's default (which may differ from the section's own defaults).
            default = getattr(base, key) if base is not None else _field_default(fields[key])
            section_base = default if dataclasses.is_dataclass(default) else None
            kwargs[key] = _build(tp, value, f"{where}{key}.", section_base)
        else:
            kwargs[key] = _coerce(value, tp, f"{where}{key}", fields[key])
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, where: str, field: dataclasses.Field | None = None):
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise TypedConfigError(f"{where}: may not be null (expected {_type_name(tp)})")
        real = [o for o in options if o is not type(None)]
        if len(real) == 1:  # X | None: X's own message
            return _coerce(value, real[0], where, field)
        # Prefer the exact type (so `int | float` keeps an int an int), then conversions.
        for option in sorted(real, key=lambda o: not (isinstance(o, type) and type(value) is o)):
            try:
                return _coerce(value, option, where, field)
            except TypedConfigError:
                continue
        raise TypedConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if dataclasses.is_dataclass(tp):
        if value is None:
            default = _field_default(field) if field is not None else dataclasses.MISSING
            return default if dataclasses.is_dataclass(default) else tp()
        if not isinstance(value, Mapping):
            raise TypedConfigError(f"{where}: expected a mapping (section), got {type(value).__name__} {value!r}")
        return _build(tp, value, f"{where}.")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) in {type(c) for c in choices}:
            return value
        raise TypedConfigError(f"{where}: must be one of {', '.join(map(repr, choices))}, got {value!r}")
    if origin in (list, tuple):
        args = typing.get_args(tp)
        homogeneous = origin is list or (len(args) == 2 and args[1] is Ellipsis)
        item = args[0] if args else Any
        if value is None:
            return [] if origin is list else ()
        if homogeneous and isinstance(value, (str, Path)) and item is str:
            value = [str(value)]  # a single source is a one-element list
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise TypedConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        if homogeneous:
            items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        else:
            if len(value) != len(args):
                raise TypedConfigError(f"{where}: expected a list of {len(args)} items, got {len(value)}: {value!r}")
            items = [_coerce(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, args))]
        return items if origin is list else tuple(items)
    if origin is dict:
        key_t, val_t = typing.get_args(tp) or (Any, Any)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise TypedConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return {(str(k) if key_t is str else _coerce(k, key_t, where)): _coerce(v, val_t, f"{where}.{k}")
                for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypedConfigError(f"{where}: expected true/false, got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypedConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string; accept any float literal
            try:
                return float(value)
            except ValueError:
                pass
        raise TypedConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypedConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
    raise TypedConfigError(f"{where}: unsupported config type {tp}")  # a bug in the config's dataclasses


# ----------------------------------------------------------------------------------------------------------------
# YAML files and dotted overrides
# ----------------------------------------------------------------------------------------------------------------
def parse_override(text: str, *, error: type[Exception] = TypedConfigError) -> tuple[list[str], Any]:
    """``"optim.peak_lr=3e-4"`` → (["optim", "peak_lr"], 3e-4 as YAML would read it)."""
    if "=" not in text:
        raise error(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise error(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise error(f"override {text!r}: value is not valid YAML ({yaml_problem(e)})") from None
    return parts, value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str], *,
                    error: type[Exception] = TypedConfigError) -> dict[str, Any]:
    """Set each dotted ``key=value`` in a copy of the nested dict (sections are created as needed; keys are checked
    later, when the dataclasses are built, so a misspelled override fails like a misspelled YAML key)."""
    data = copy.deepcopy(dict(data))
    for text in overrides:
        parts, value = parse_override(text, error=error)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise error(f"override {text!r}: {'.'.join(parts[:i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def yaml_problem(e: Exception) -> str:
    """PyYAML's multi-line error as one line: the problem and where (``line 2, column 1: expected ',' or ']'``)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or " ".join(str(e).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def read_yaml_sections(path: str | Path | None, error: type[Exception] = TypedConfigError) -> dict[str, Any]:
    """The top-level mapping of a YAML config file ({} when ``path`` is None); ``error`` names what is wrong."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise error(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise error(f"{path} is not UTF-8 text (byte offset {e.start})") from None
    except yaml.YAMLError as e:
        raise error(f"{path} is not valid YAML: {yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping of sections at the top level")
    return data


def load(cls: type, path: str | Path | None, overrides: Sequence[str] = (), *,
         error: type[Exception] = TypedConfigError, prepare=None):
    """Read a YAML config (defaults only when ``path`` is None), apply the dotted overrides and build ``cls``.

    ``prepare`` (optional) rewrites the merged plain data before it is built (e.g. to map a legacy key onto its
    new place). A problem with the file's contents or the overrides is prefixed with the file name."""
    data = read_yaml_sections(path, error)
    try:
        data = apply_overrides(data, overrides, error=TypedConfigError)
        if prepare is not None:
            data = prepare(data)
        return build(cls, data)
    except error as e:  # the config's own validation (its __post_init__) raises its own class
        raise error(f"{path or 'config'}: {e}") from None
    except TypedConfigError as e:
        raise error(f"{path or 'config'}: {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# Walking built configs
# ----------------------------------------------------------------------------------------------------------------
def nondefault(obj: Any) -> Any:
    """The settings of a (nested) config dataclass that differ from their defaults, as plain data.

    Keys hashed from this rather than from every field stay the same when a new field is added with a default. A
    nested section that differs from its field's default is listed by what differs from its own class's defaults."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            default = _field_default(f)
            if default is not dataclasses.MISSING and value == default:
                continue
            out[f.name] = nondefault(value)
        return out
    if isinstance(obj, Mapping):
        return {str(k): nondefault(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nondefault(v) for v in obj]
    return obj


def float_fields(section: Any, where: str = "") -> list[tuple[str, float]]:
    """(dotted key, value) of every float value in a config's sections (free-form dicts are not walked)."""
    out = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            out += float_fields(value, f"{where}{f.name}.")
        elif isinstance(value, float):
            out.append((f"{where}{f.name}", value))
    return out
