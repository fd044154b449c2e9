"""Checkpoints that survive preemption: written whole or not at all, checked before a resume.

- :class:`AtomicCheckpointIO` writes ``NAME.ckpt`` as ``.NAME.ckpt.<pid>.tmp`` in the same
  folder, fsyncs it and renames it over ``NAME.ckpt``: a job killed mid-save leaves the previous
  checkpoint as it was (Lightning's ModelCheckpoint removes an older checkpoint only after the new
  one is saved, so "keep last N" never drops below N complete files).
- :func:`find_resume` picks the newest checkpoint in the run's ``checkpoints/`` that is complete
  (torch's zip container, every member's CRC checked), and says which damaged ones it skipped.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from degsr import console


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def damage(path: Path) -> str | None:
    """None when ``path`` is a complete torch checkpoint, else what is wrong with it."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
        return None if bad is None else f"member {bad} fails its CRC"
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
        return f"{type(e).__name__}: {e}"


def find_resume(folder: Path) -> Path | None:
    """The newest complete ``*.ckpt`` in ``folder`` (by modification time), or None."""
    candidates = sorted((p for p in Path(folder).glob("*.ckpt") if p.is_file()),
                        key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for path in candidates:
        problem = damage(path)
        if problem is None:
            return path
        console.log.warning(f"skipping checkpoint {path}: truncated or damaged ({problem})")
    return None


def is_lightning(path: Path) -> bool:
    """Whether a complete torch checkpoint is one Lightning wrote (its pickle names the key
    ``pytorch-lightning_version``; the tensors are separate members, so this reads little)."""
    with zipfile.ZipFile(path) as z:
        pkl = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
        return pkl is not None and b"pytorch-lightning_version" in z.read(pkl)
