"""Dataclass field helpers that attach a check to a config key.

Each helper returns a ``dataclasses.field`` whose metadata carries a function ``value -> problem or
None``; :func:`degsr.config.loader.validate` walks the schema and reports every problem as one line
naming the dotted key. Cross-field rules live in a ``check(self)`` method on the dataclass that
yields ``(key, problem)`` pairs relative to it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

Check = Callable[[Any], "str | None"]


def _not_finite(values) -> bool:
    """Any of ``values`` a float NaN or infinity (no config number means either)."""
    return any(isinstance(v, float) and not math.isfinite(v) for v in values)


def problems_of(obj: Any, prefix: str = "") -> list[str]:
    """Every failed field check and ``check()`` rule of a config dataclass, recursively, as
    ``"dotted.key: problem"`` lines."""
    out = []
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            out.extend(problems_of(value, key + "."))
        elif "check" in f.metadata:
            try:
                msg = f.metadata["check"](value)
            except (TypeError, ValueError):  # e.g. [[1], [2]] where numbers go (OmegaConf let it in)
                msg = f"not a value of this key's kind: {value!r}"
            if msg:
                out.append(f"{key}: {msg}")
    out.extend(f"{prefix}{sub}: {msg}" for sub, msg in getattr(obj, "check", lambda: ())())
    return out


# the config's path keys (where a leading ~ is a home folder); other text keys, the prompts
# above all, may start with ~ as any other character
PATH_KEYS = ("run.dir", "data.train_shards", "data.val_shards",
             "data.val_folder", "data.val_paired_lr", "data.val_paired_hr", "model.pretrained",
             "disc.backbone", "sr.estimator", "sr.lpips_vgg")


def unexpandable(flat: dict[str, Any], reported: list[str]) -> list[str]:
    """``"key: problem"`` for each path value (:data:`PATH_KEYS`) of a flattened config whose
    ``~user`` names no user (pathlib's expanduser, where the path is used, would raise); keys
    ``reported`` already (a path that does not exist) are left out."""
    import os

    return [f"{key}: cannot expand '{value.split('/', 1)[0]}' in {value!r} (no such user, or no "
            "home folder): write the path in full" for key, value in flat.items()
            if key in PATH_KEYS and isinstance(value, str) and value.startswith("~")
            and os.path.expanduser(value) == value
            and not any(f" {key}: " in f" {p}" for p in reported)]


def as_dataclass(cfg: Any, default: Any = None) -> Any:
    """A config section as its dataclass: an OmegaConf node is converted, a dataclass (or None,
    then ``default``) passes through."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_object(cfg)
    return default if cfg is None else cfg


class Checked:
    """Base of config dataclasses used outside the loader: ``problems()`` lists what is wrong."""

    def problems(self) -> list[str]:
        return problems_of(self)


def _field(default: Any, check: Check | None, doc: str) -> Any:
    meta = {"doc": doc}
    if check is not None:
        meta["check"] = check
    if isinstance(default, (list, dict)):
        frozen = default
        return dataclasses.field(default_factory=lambda: type(frozen)(frozen), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def plain(default: Any, doc: str = "") -> Any:
    return _field(default, None, doc)


def prob(default: float, doc: str = "") -> Any:
    def check(v):
        return None if 0.0 <= v <= 1.0 else f"must be a probability in [0, 1], got {v}"
    return _field(default, check, doc)


def number(default: Any, doc: str = "", *, lo: float = -math.inf, hi: float = math.inf,
           lo_open: bool = False) -> Any:
    def check(v):
        if v is None:
            return None
        if isinstance(v, float) and not math.isfinite(v):
            return f"must be a finite number, got {v}"
        bad_lo = v <= lo if lo_open else v < lo
        if bad_lo or v > hi:
            left = "(" if lo_open else "["
            return f"must be in {left}{lo}, {hi}], got {v}"
        return None
    return _field(default, check, doc)


def positive(default: Any, doc: str = "") -> Any:
    return number(default, doc, lo=0, lo_open=True)


def span(default: Sequence[float], doc: str = "", *, lo: float = -math.inf,
         hi: float = math.inf) -> Any:
    """A [low, high] range with low <= high, both inside [lo, hi]."""
    def check(v):
        if len(v) != 2:
            return f"must be a [low, high] pair, got {list(v)}"
        a, b = v
        if _not_finite(v):
            return f"must be finite numbers, got {list(v)}"
        if a > b:
            return f"low must not exceed high, got [{a}, {b}]"
        if a < lo or b > hi:
            return f"must lie within [{lo}, {hi}], got [{a}, {b}]"
        return None
    return _field(list(default), check, doc)


def distribution(default: Sequence[float], doc: str = "", *, size: int | None = None) -> Any:
    """Probabilities of mutually exclusive choices: non-negative, summing to 1."""
    def check(v):
        if size is not None and len(v) != size:
            return f"must list {size} probabilities, got {len(v)}"
        if _not_finite(v) or any(p < 0 for p in v) or abs(sum(v) - 1.0) > 1e-6:
            return f"must be non-negative and sum to 1, got {list(v)} (sum {sum(v):g})"
        return None
    return _field(list(default), check, doc)


def choice(default: Any, options: Sequence[Any], doc: str = "") -> Any:
    def check(v):
        return None if v in options else f"must be one of {list(options)}, got {v!r}"
    return _field(default, check, doc)


def subset(default: Sequence[Any], options: Sequence[Any], doc: str = "", *,
           empty_ok: bool = False) -> Any:
    def check(v):
        bad = [x for x in v if x not in options]
        if bad or not (v or empty_ok):
            return f"must be a {'' if empty_ok else 'non-empty '}list from {list(options)}, got {list(v)}"
        return None
    return _field(list(default), check, doc)


def odd_sizes(default: Sequence[int], doc: str = "", *, most: int = 21) -> Any:
    def check(v):
        if not v or any(k < 1 or k % 2 == 0 or k > most for k in v):
            return f"must be a non-empty list of odd sizes in [1, {most}], got {list(v)}"
        return None
    return _field(list(default), check, doc)


def existing_path(default: Any = None, doc: str = "") -> Any:
    """A filesystem path that must exist when set (None = not used)."""
    def check(v):
        import os
        if v is None or v == "":
            return None  # os.path's expanduser: Path's raises for a ~user that does not exist
        return None if os.path.exists(os.path.expanduser(v)) else f"path does not exist: {v}"
    return _field(default, check, doc)
