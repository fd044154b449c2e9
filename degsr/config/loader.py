"""Load, merge and validate a run's config tree.

Merge order: schema defaults -> each YAML file given (in order) -> ``key=value`` overrides.
A value of ``???`` in a file marks a key the user must set (later files or the command line).
A YAML file may start with ``include: [other.yaml, ...]`` (paths relative to that file): the
included files are merged first, in order, and the including file's own keys win. That is the only
composition mechanism. Every problem is reported as one line naming its dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from pathlib import Path
from typing import Any, Iterable

import yaml
from omegaconf import DictConfig, ListConfig, Node, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from degsr.config.fields import problems_of, unexpandable
from degsr.config.schema import Config
from degsr.errors import ConfigError

INCLUDE_KEY = "include"


def _schema_keys(cls: type, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> field type for every leaf; sections map to their dataclass."""
    keys: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        tp = hints[f.name]
        keys[key] = tp
        if dataclasses.is_dataclass(tp):
            keys.update(_schema_keys(tp, key + "."))
    return keys


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (list, typing.List):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or null"
    return getattr(tp, "__name__", str(tp))


def _read_yaml(path: Path, stack: tuple[Path, ...] = ()) -> dict:
    """A YAML file as a dict, with its ``include`` list resolved (depth first)."""
    if os.path.expanduser(path) == str(path) and str(path).startswith("~"):  # Path's would raise
        raise ConfigError([f"config error: config file not found: {path} (there is no user "
                           f"'{path.parts[0][1:]}' for '~' to name; an override is key=value, "
                           "and a key cannot be removed, only set)"])
    path = path.expanduser().resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError([f"config error: include cycle: {chain}"])
    where = f" (included from {stack[-1]})" if stack else ""
    if path.is_dir():
        raise ConfigError([f"config error: {path} is a folder, not a config file{where}"])
    if not path.is_file():
        raise ConfigError([f"config error: config file not found: {path}{where}"])
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), _UniqueKeyLoader) or {}
    except UnicodeDecodeError:
        raise ConfigError([f"config error: {path} is not a text (UTF-8) YAML file{where}"]) from None
    except OSError as e:
        raise ConfigError([f"config error: {path}: cannot be read ({e.strerror or e}){where}"]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise ConfigError([f"config error: {path}:{at} is not valid YAML ({getattr(e, 'problem', e)})"])
    if not isinstance(data, dict):
        raise ConfigError([f"config error: {path} must hold a mapping of keys, got {type(data).__name__}"])
    includes = data.pop(INCLUDE_KEY, []) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict = {}
    if not isinstance(includes, list) or not all(isinstance(i, str) and i for i in includes):
        raise ConfigError([f"config error: {path}: '{INCLUDE_KEY}' must be a file name or a list "
                           f"of file names, got {includes!r}"])
    for inc in includes:
        merged = _deep_merge(merged, _read_yaml(path.parent / inc, (*stack, path)))
    return _deep_merge(merged, data)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error: PyYAML keeps the
    last silently, so a second ``trainer:`` block would drop every key of the first."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor': YAML's merge key,
                continue  # whose keys the mapping's own may override (flatten_mapping merges)
            key = self.construct_object(key_node, deep=deep)
            try:
                twice = key in seen
            except TypeError:  # a list or mapping as a key: the base class names it (one line)
                break
            if twice:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def flatten(d: dict) -> dict[str, Any]:
    """A nested mapping as ``{"dotted.key": leaf}`` (an empty mapping is a leaf)."""
    return dict(_flatten(d))


def _flatten(d: dict, prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def _check_keys(data: dict, schema: dict[str, Any], origin: str) -> list[str]:
    problems = []
    for key, value in _flatten(data):
        if key not in schema:
            near = difflib.get_close_matches(key, list(schema), n=1, cutoff=0.5)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            problems.append(f"config error: unknown key '{key}' in {origin}{hint}")
        elif dataclasses.is_dataclass(schema[key]) and not isinstance(value, dict):
            subkeys = [f.name for f in dataclasses.fields(schema[key])]
            problems.append(f"config error: '{key}' is a section (keys: {', '.join(subkeys)}), "
                            f"got {value!r} in {origin}")
    return problems


def _is_text(tp: Any) -> bool:
    """A ``str`` or ``Optional[str]`` key."""
    return tp is str or (typing.get_origin(tp) is typing.Union
                         and set(typing.get_args(tp)) == {str, type(None)})


def _item_type(tp: Any) -> Any:
    """The item type of a list-of-scalars key (``List[str]``, ``List[float]``, ...), else None."""
    args = typing.get_args(tp)
    return args[0] if typing.get_origin(tp) in (list, typing.List) and args[0] in (
        str, int, float, bool) else None


def _nested_items(data: dict, schema: dict[str, Any], origin: str) -> list[str]:
    """A list or mapping inside a list-of-scalars key: OmegaConf lets it in (``tags=[[a]]``),
    and then a field check throws or the run fails on it far from the key."""
    problems = []
    for key, value in _flatten(data):
        if key in schema and _item_type(schema[key]) and isinstance(value, list):
            bad = [v for v in value if isinstance(v, (list, dict))]
            if bad:  # the first one, as OmegaConf names the first item of a wrong type
                problems.append(f"config error: {key}: expected {_type_name(schema[key])}, got "
                                f"{bad[0]!r} ({_kind(bad[0])}) in {origin}")
    return problems


def _parse_overrides(overrides: list[str], schema: dict[str, Any]) -> dict:
    """``key=value`` items as a nested dict. Values are YAML (numbers, lists, null), except for
    text keys, which keep the text as typed (YAML would turn ``run.name=0123`` into 83, octal,
    ``12:30`` into 750 and ``on`` into True), and integers, which are decimal (``0012`` = 12)."""
    out: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or key != key.strip():
            raise ConfigError([f"config error: override '{item}' is not of the form key=value"])
        tp = schema.get(key.lstrip("+"))
        if tp is not None and _is_text(tp):
            value = None if raw in ("null", "~") and tp is not str else raw
        elif re.fullmatch(r"[-+]?[0-9]+", raw):  # decimal, also with leading zeros (YAML: octal)
            value = int(raw)
        else:
            try:
                value = yaml.safe_load(raw) if raw != "" else ""
            except yaml.YAMLError:
                value = raw
        node = out
        parts = key.lstrip("+").split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError([f"config error: override '{item}' conflicts with an earlier one"])
        if isinstance(node.get(parts[-1]), dict) and not isinstance(value, dict):
            # an earlier a.b.c=... under a.b: replacing it would drop what it set (a typo unseen)
            raise ConfigError([f"config error: override '{item}' conflicts with an earlier one"])
        node[parts[-1]] = value
    return out


def _merge(cfg: DictConfig, data: dict, schema: dict[str, Any], origin: str) -> DictConfig:
    problems = _check_keys(data, schema, origin)
    # YAML 1.1 reads name: 0123 as 83, 12:30 as 750, no as False: a text key must get text
    problems += [f"config error: {key}: YAML reads {value!r} ({type(value).__name__}) there, not "
                 f"text: quote the value in {origin}" for key, value in _flatten(data)
                 if key in schema and _is_text(schema[key]) and value is not None
                 and not isinstance(value, str)]
    problems += _nested_items(data, schema, origin)
    if problems:
        raise ConfigError(problems)
    try:
        return OmegaConf.merge(cfg, data)
    except (OmegaConfBaseException, TypeError):  # TypeError: a mapping where a list goes
        pass
    for leaf, value in _flatten(data):  # again one key at a time: every wrong type reported
        nested: Any = value
        for part in reversed(leaf.split(".")):
            nested = {part: nested}
        try:
            cfg = OmegaConf.merge(cfg, nested)
        except (OmegaConfBaseException, TypeError) as e:
            key = (getattr(e, "full_key", None) or leaf).split("[")[0]
            expected = _type_name(schema[key]) if key in schema else "another type"
            got = getattr(e, "value", value)
            problems.append(f"config error: {key}: expected {expected}, got {got!r} "
                            f"({_kind(got)}) in {origin}")
    if problems:
        raise ConfigError(problems)
    return cfg


def _kind(value) -> str:
    """The type of a value as the user wrote it (OmegaConf hands some back wrapped in nodes)."""
    if isinstance(value, (ListConfig, list)):
        return "list"
    if isinstance(value, (DictConfig, dict)):
        return "mapping"
    value = value._value() if isinstance(value, Node) else value
    return "null" if value is None else type(value).__name__


def validate(cfg: DictConfig, schema_cls: type = Config) -> None:
    """Raise one ConfigError listing every missing value and failed check, each by its key."""
    try:
        problems = [f"config error: missing required value '{k}' (set it in a YAML file or as "
                    f"{k}=...)" for k in sorted(OmegaConf.missing_keys(cfg))]
        if problems:
            raise ConfigError(problems)
        problems.extend(f"config error: {p}" for p in problems_of(OmegaConf.to_object(cfg)))
        problems.extend(f"config error: {p}" for p in unexpandable(
            flatten(OmegaConf.to_container(cfg, resolve=True)), problems))
    except OmegaConfBaseException as e:  # a ${...} interpolation that does not resolve
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError([f"config error: {e.full_key or 'a value'}: {first}"]) from None
    if problems:
        raise ConfigError(problems)


def load_config(files: Iterable[str | os.PathLike] = (), overrides: Iterable[str] = (),
                schema_cls: type = Config) -> DictConfig:
    """Schema defaults <- YAML files (with includes) <- ``key=value`` overrides, validated."""
    schema = _schema_keys(schema_cls)
    cfg = OmegaConf.structured(schema_cls)
    required: set[str] = set()  # keys a file marks '???' (the user must set them)
    sources = [(_read_yaml(Path(f)), str(f)) for f in files]
    for data, origin in [*sources, (_parse_overrides(list(overrides), schema), "the command line")]:
        for key, value in _flatten(data):
            (required.add if value == "???" else required.discard)(key)
        cfg = _merge(cfg, data, schema, origin)
    if required:
        raise ConfigError([f"config error: missing required value '{k}' (set it in a YAML file or "
                           f"as {k}=...)" for k in sorted(required)])
    validate(cfg, schema_cls)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_config(cfg: DictConfig, run_dir: str | os.PathLike) -> Path:
    """Write the resolved config to ``run_dir/config.yaml`` atomically."""
    from degsr.io import atomic_write_bytes

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / "config.yaml"
    atomic_write_bytes(target, to_yaml(cfg).encode())
    return target
