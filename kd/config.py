"""Typed configs: nested dataclasses loaded from YAML, with dotted `key=value` overrides.

Every script owns one dataclass tree. Defaults live only in the dataclass; unknown keys, wrong types and
impossible values raise KDError before any work starts. Field docs are the dataclass docstrings'
`field: text` lines, so `--help` and the manual can point at one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from kd.errors import KDError
from kd.paths import absolute_path, resolve_config

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(v) for v in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(t) for t in get_args(tp))
    if get_origin(tp) is not None:
        return str(tp).replace("typing.", "")
    return "None" if tp is type(None) else getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp` and return it (ints accepted for floats, lists for tuples)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Union or origin is types.UnionType:
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise KDError(f"config key '{key}' must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except KDError as e:
                errors.append(str(e))
        raise KDError(
            errors[0]
            if len(errors) == 1
            else f"config key '{key}' has the wrong type: {value!r} is none of {_type_name(tp)}"
        )
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool):
            # YAML 1.1 reads no/yes/off/on as booleans: map back to the spelling this field accepts
            spelled = [
                c
                for c in choices
                if isinstance(c, str) and c.lower() in (("yes", "on", "true") if value else ("no", "off", "false"))
            ]
            value = spelled[0] if len(spelled) == 1 else value
        if value not in choices:
            raise KDError(f"config key '{key}' must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise KDError(f"config key '{key}' must be a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise KDError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise KDError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise KDError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads 1e-3 as a string; it needs 1.0e-3. Accept what people write.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise KDError(f"config key '{key}' must be a number, got {value!r}")
        check_finite(float(value), key)  # "nan" and "inf" as strings too
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise KDError(f"config key '{key}' must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for '{key}'")


def _build(cls: type[T], data: Any, prefix: str = "") -> T:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise KDError(f"config section '{prefix or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        raise KDError(
            f"unknown config key(s) {', '.join(prefix + '.' + k if prefix else k for k in unknown)} in {where}; "
            f"allowed: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], key)
        elif dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], {}, key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise KDError(f"config key '{key}' is required")
    # __post_init__ checks raise KDError with messages that name their full dotted keys
    return cls(**kwargs)


def apply_override(data: dict, dotted: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (so 3e-4, true, [1, 2] work)."""
    if "=" not in dotted:
        raise KDError(f"override '{dotted}' must look like key=value (for example train.lr=3e-4)")
    key, raw = dotted.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise KDError(f"override key '{key}' is malformed")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise KDError(f"cannot parse the value of override '{dotted}': {e}") from None
    node = data
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise KDError(f"override '{dotted}': '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Read YAML `path` (or start empty), apply `overrides`, and build a checked `cls`."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise KDError(f"config file {p} does not exist")
        try:
            data = yaml.load(p.read_text(), Loader=UniqueKeyLoader) or {}
        except DuplicateKey as e:
            raise KDError(f"config file {p}: {e}; say it once (YAML would keep only the last)") from None
        except yaml.YAMLError as e:
            raise KDError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise KDError(f"config file {p} must hold a mapping at the top level")
    for o in overrides:
        apply_override(data, o)
    check_finite(data)
    return _build(cls, data)


def from_dict(cls: type[T], data: dict) -> T:
    """Rebuild a config saved with `to_dict` (used to read configs stored inside artifacts)."""
    check_finite(data)
    return _build(cls, data)


class DuplicateKey(Exception):
    pass


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (a section or a key written twice: plain YAML
    keeps the last one silently, so a config would say one thing and do another)."""

    def construct_mapping(self, node, deep=False):
        lines: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key == "<<":  # a merge key may repeat
                continue
            if key in lines:
                raise DuplicateKey(
                    f"key '{key}' is given twice (lines {lines[key]} and {key_node.start_mark.line + 1})"
                )
            lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def check_finite(data: Any, key: str = "") -> None:
    """No NaN or infinity anywhere in a config, free-form mappings (student.config, loss terms) included: a
    non-finite rate, norm or temperature trains to NaN weights, or skips every step, without an error."""
    if isinstance(data, float) and not math.isfinite(data):
        raise KDError(f"config key '{key}' is {data}: every number in a config must be finite")
    if isinstance(data, dict):
        for k, v in data.items():
            check_finite(v, f"{key}.{k}" if key else str(k))
    elif isinstance(data, (list, tuple)):
        for i, v in enumerate(data):
            check_finite(v, f"{key}[{i}]")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# Field metadata (dataclasses.field(metadata=...)) that says what a key means beyond its value (markers combine:
# dict(RESUME_FREE, **PATH)):
#   NOT_CONTENT  (cache config) changes nothing a cache stores: a re-run may differ in it and resume the same cache
#   RESUME_FREE  (training config) may differ when a run is resumed
#   PATH         a file or folder, or a list of them (globs too): a run records it resolved (kd.paths.absolute_path)
#                and a resume compares it resolved, so `./x`, `/abs/x` and a symlink to x are one value
NOT_CONTENT = {"content": False}
RESUME_FREE = {"resume_free": True}
PATH = {"path": True}


def marked_keys(cls: type, marker: dict, prefix: str = "") -> tuple[str, ...]:
    """The dotted keys of config tree `cls` whose field metadata holds `marker` (NOT_CONTENT, RESUME_FREE)."""
    keys: list[str] = []
    hints = typing.get_type_hints(cls)  # the annotations as types (they are strings under postponed evaluation)
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        inner = [t for t in get_args(tp) if t is not type(None)] if get_origin(tp) in (Union, types.UnionType) else []
        if len(inner) == 1:  # an optional section (X | None): its keys, when it is given
            tp = inner[0]
        if all(f.metadata.get(k) == v for k, v in marker.items()):
            keys.append(key)
        elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
            keys.extend(marked_keys(tp, marker, key + "."))
    return tuple(keys)


def resolved_paths(cfg_dict: dict, cls: type) -> dict[str, Any]:
    """Every PATH key of a config (`cls`'s dict form) with its value resolved (kd.paths.absolute_path; a list
    element by element; None kept): what a run records beside the config as typed."""
    flat = flatten(cfg_dict)
    out: dict[str, Any] = {}
    for key in marked_keys(cls, PATH):
        value = flat.get(key)
        out[key] = [absolute_path(v) for v in value] if isinstance(value, list) else value and absolute_path(value)
    return out


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def diff_keys(a: dict, b: dict, cls: type | None = None) -> list[str]:
    """Dotted keys whose values differ between two nested dicts. A key missing on one side differs, unless the
    config dataclass `cls` is given and the other side holds its default: a config saved by an older kd, before
    a key existed, equals today's config with that key at its default."""
    fa, fb = flatten(a), flatten(b)
    fd = flatten(defaults(cls)) if cls is not None else {}
    fa, fb = {**fd, **fa}, {**fd, **fb}
    return sorted(k for k in set(fa) | set(fb) if fa.get(k, "<missing>") != fb.get(k, "<missing>"))


def defaults(cls: type) -> dict:
    """The defaults of a config dataclass as a nested dict, built without constructing it (a config of defaults
    alone may be invalid, e.g. one naming no data)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out[f.name] = defaults(hints[f.name])
        elif f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def field_docs(cls: type) -> dict[str, str]:
    """Each field's text from the dataclass docstring's `field: text` lines (continuation lines indented deeper)."""
    docs: dict[str, str] = {}
    current = None
    for line in (cls.__doc__ or "").splitlines():
        stripped = line.strip()
        head, sep, text = stripped.partition(": ")
        if sep and head.isidentifier() and head in {f.name for f in dataclasses.fields(cls)} and head not in docs:
            current, docs[head] = head, text
        elif current and stripped and line.startswith("        "):
            docs[current] += " " + stripped
        else:
            current = None
    return docs


def config_help(cls: type, prefix: str = "") -> list[str]:
    """One line per config key: dotted name, type, default, and its doc (what `--help` prints)."""
    hints, docs, given, lines = typing.get_type_hints(cls), field_docs(cls), defaults(cls), []
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{key}: {(tp.__doc__ or '').strip().splitlines()[0]}")
            lines += config_help(tp, key + ".")
            continue
        default = f"default {given[f.name]!r}" if f.name in given else "required"
        lines.append(f"  {key} ({_type_name(tp)}, {default}): {docs.get(f.name, '(undocumented)')}")
        inner = [t for t in get_args(tp) if dataclasses.is_dataclass(t)]
        if inner:  # an optional section (null = off): its keys too, as set when it is given
            lines += ["  " + line for line in config_help(inner[0], key + ".") if line.startswith("  ")]
    return lines


def at_least(minimum: int):
    """An argparse type: an integer >= minimum (a command's counts and sizes), else argparse's one-line error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum, {minimum}")
        return value

    return parse


@dataclasses.dataclass(frozen=True)
class Invocation:
    """A pass's command line: its config, and whether to print the plan instead of running (`--dry-run`)."""

    cfg: Any
    dry_run: bool = False


def parse_cli(cls: type[T], argv: list[str] | None, description: str, prog: str | None = None) -> Invocation:
    """`--config FILE|NAME` (a path, or a shipped config's name: kd.paths.resolve_config) plus any number of
    `key=value` overrides, and `--dry-run`; `--help` lists every key with its doc."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="config keys (set in the YAML file or as key=value overrides):\n" + "\n".join(config_help(cls)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", help="YAML config file, or a shipped config's name (`kd configs`); defaults come from the dataclass"
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. cache.top_k=128")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the plan (sizes, counts, memory) without running: no weights load"
    )
    args = parser.parse_args(argv)
    cfg = load_config(cls, None if args.config is None else resolve_config(args.config), args.overrides)
    return Invocation(cfg, args.dry_run)
