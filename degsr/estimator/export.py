"""Exported estimator: ``<stem>.safetensors`` (weights) + ``<stem>.json`` (network config).

A directory holds ``estimator.safetensors`` + ``estimator.json``. The JSON reads::

    {"format": "degsr-estimator", "format_version": 1, "scores": ["blur", "noise"], "net": {...}}

where ``net`` is :class:`EstimatorNetConfig` as a dict. Both files are written to a temporary name
in the target folder and renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from degsr.errors import UserError, one_line
from degsr.io import atomic_write
from degsr.estimator.config import EstimatorNetConfig
from degsr.estimator.network import SCORES, DegradationEstimator

FORMAT = "degsr-estimator"
FORMAT_VERSION = 1
STEM = "estimator"


def _pair(path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights, config) paths for a directory or either file of the pair."""
    p = Path(path).expanduser()
    if p.suffix in (".safetensors", ".json"):
        return p.with_suffix(".safetensors"), p.with_suffix(".json")
    return p / f"{STEM}.safetensors", p / f"{STEM}.json"


def save_estimator(model: DegradationEstimator, path: str | os.PathLike) -> Path:
    """Write the weights and config; ``path`` is a directory or a ``.safetensors``/``.json`` name.

    Returns the weights file's path.
    """
    from safetensors.torch import save_file

    weights, config = _pair(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "scores": list(SCORES),
           "net": dataclasses.asdict(model.cfg)}
    atomic_write(weights, lambda tmp: save_file(tensors, tmp, metadata=meta))
    atomic_write(config, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=2) + "\n"))
    return weights


def _read_config(config: Path) -> EstimatorNetConfig:
    if not config.is_file():
        raise UserError(f"estimator config not found: {config}")
    try:
        doc = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{config}: not a readable estimator config ({one_line(e)})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UserError(f"{config}: not a degsr estimator config (no \"format\": \"{FORMAT}\")")
    if doc.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{config}: unsupported estimator format_version "
                        f"{doc.get('format_version')!r} (this degsr reads {FORMAT_VERSION})")
    if doc.get("scores") != list(SCORES):
        raise UserError(f"{config}: scores must be {list(SCORES)}, got {doc.get('scores')!r}")
    net = doc.get("net")
    known = {f.name for f in dataclasses.fields(EstimatorNetConfig)}
    if not isinstance(net, dict) or set(net) - known:
        extra = sorted(set(net) - known) if isinstance(net, dict) else net
        raise UserError(f"{config}: \"net\" must map {sorted(known)}; unexpected {extra!r}")
    try:
        cfg = EstimatorNetConfig(**net)
        problems = cfg.problems()
    except (TypeError, ValueError) as e:
        raise UserError(f"{config}: invalid network config ({one_line(e)})") from None
    if problems:
        raise UserError(f"{config}: invalid network config: " + "; ".join(problems))
    return cfg


def _check_kind(path: str | os.PathLike) -> None:
    """A one-line UserError for a path that is not there and the two likely mix-ups, which read
    'estimator config not found: <path>/estimator.json' before, a path that names a file as if it
    were a folder: a file that is no export (a Lightning ``.ckpt``), and a stage-2 (SR adapter)
    export."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{path}: no such file or folder (an estimator export: a folder with "
                        f"{STEM}.safetensors + {STEM}.json, as `degsr fit` writes into <run>/export)")
    if p.is_file() and p.suffix not in (".safetensors", ".json"):
        raise UserError(f"{path}: a file, not an estimator export (a folder with "
                        f"{STEM}.safetensors + {STEM}.json, or either file)")
    if p.is_dir() and not (p / f"{STEM}.json").exists() and (p / "adapter.json").is_file():
        try:
            used = json.loads((p / "adapter.json").read_text()).get("estimator")
        except (OSError, ValueError, AttributeError):
            used = None
        raise UserError(f"{path}: a stage-2 (SR adapter) export, not a stage-1 estimator export"
                        + (f"; its estimator: {used}" if isinstance(used, str) else ""))


def load_estimator(path: str | os.PathLike, device: str | torch.device = "cpu") -> DegradationEstimator:
    """The exported estimator at ``path`` (directory or either file), frozen, in eval mode."""
    from safetensors.torch import load_file

    _check_kind(path)
    weights, config = _pair(path)
    cfg = _read_config(config)
    if not weights.is_file():
        raise UserError(f"estimator weights not found: {weights}")
    try:
        state = load_file(str(weights), device="cpu")
    except Exception as e:  # safetensors raises its own error type (and OSError) on bad files
        raise UserError(f"{weights}: not a readable safetensors file ({one_line(e)})") from None
    model = DegradationEstimator(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing tensor(s) (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected tensor(s) (e.g. {unexpected[0]})" if unexpected else "",
                 f"shape mismatch: {shapes[0]} expected" if shapes else ""]
        raise UserError(f"{weights}: weights do not match {config.name}: "
                        + "; ".join(p for p in parts if p))
    model.load_state_dict(state)
    try:
        model.to(device)
    except (RuntimeError, AssertionError) as e:
        raise UserError(f"cannot move the estimator to device {device!r} ({one_line(e)})") from None
    model.eval().requires_grad_(False)
    return model
