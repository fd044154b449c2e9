"""Checkpoints that survive preemption: written whole or not at all, checked before a resume.

- :class:`AtomicCheckpointIO` writes ``NAME.ckpt`` as ``.NAME.ckpt.<pid>.tmp`` in the same
  folder, fsyncs it and renames it over ``NAME.ckpt``: a job killed mid-save leaves the previous
  checkpoint as it was (Lightning's ModelCheckpoint removes an older checkpoint only after the new
  one is saved, so "keep last N" never drops below N complete files).
- :func:`find_resume` picks the checkpoint of the furthest step (then the newest) in the run's
  ``checkpoints/`` that is complete (torch's zip container, every member's CRC checked), and says
  which damaged ones it skipped.
- :class:`RunCheckpoint` is Lightning's ModelCheckpoint as ``degsr fit`` uses it (``step*.ckpt``
  every N steps, the newest ``keep_last_n`` kept, ``last.ckpt``), made safe to resume with another
  ``checkpoint_every_n_steps``/``keep_last_n``, in another place and saving the step a run ends on.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

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


def checkpoint_step(path: Path) -> float:
    """The ``global_step`` a checkpoint holds (its tensors mapped, not read); infinity when it
    has none or cannot be read, so that such a file is looked at first (and reported)."""
    try:
        return int(torch.load(path, map_location="cpu", mmap=True, weights_only=False)["global_step"])
    except Exception:  # noqa: BLE001 - damaged or foreign: damage() / is_lightning() say so
        return float("inf")


def find_resume(folder: Path) -> Path | None:
    """The newest complete ``*.ckpt`` in ``folder``: the furthest step, then the latest
    modification time (a copy made with ``cp -r`` or ``rsync`` without times has them in the
    order of the copy: resumed from an older step, the run trained again what it had), or None."""
    candidates = sorted((p for p in Path(folder).glob("*.ckpt") if p.is_file()),
                        key=lambda p: (checkpoint_step(p), p.name == "last.ckpt",  # at a
                                       p.stat().st_mtime_ns),  # step, saved after step*.ckpt
                        reverse=True)  # (a signal in that step's validation: saved there)
    foreign = None
    for path in candidates:
        problem = damage(path)
        if problem is None and is_lightning(path):
            return path
        if problem is None:  # a complete file that has no step sorts first: unless it is the
            foreign = foreign or path  # only one, it stops no resume (fit refuses it then)
            continue
        console.log.warning(f"skipping checkpoint {path}: truncated or damaged ({problem})")
    if foreign is not None and len(candidates) > 1:
        console.log.warning(f"skipping {foreign}: not a checkpoint degsr fit wrote")
    return foreign


def remove_stale_temps(folder: Path) -> None:
    """Remove the ``.NAME.ckpt.<pid>.tmp`` files of saves that were cut off (a job killed mid-save
    by SIGKILL or a node failure): nothing ever reads or removes them, and each is a whole
    checkpoint's size. Only while holding the run's lock: then no other fit is saving."""
    for path in Path(folder).glob(".*.ckpt.*.tmp"):
        console.log.info(f"removing {path}: a checkpoint save that was cut off")
        path.unlink(missing_ok=True)


def is_lightning(path: Path) -> bool:
    """Whether a complete torch checkpoint is one Lightning wrote (its pickle names the key
    ``pytorch-lightning_version``; the tensors are separate members, so this reads little)."""
    with zipfile.ZipFile(path) as z:
        pkl = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
        return pkl is not None and b"pytorch-lightning_version" in z.read(pkl)


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint(monitor="step", mode="max"): the newest ``save_top_k`` periodic checkpoints
    and ``last.ckpt``, with four changes that matter when a run is resumed:

    - a run directory moved or copied (``run.dir``/``run.name`` changed) keeps managing its
      checkpoints, found by name in the new place (Lightning forgot them with a warning).
    - its ``state_key`` does not name ``every_n_train_steps``: Lightning's key does, so a run
      resumed with another ``trainer.checkpoint_every_n_steps`` dropped the saved list of periodic
      checkpoints (with the warning "callbacks used to create the checkpoint need to be provided")
      and never removed the earlier attempt's ``step*.ckpt`` files. Checkpoints written under
      Lightning's key are still read (:meth:`on_load_checkpoint`).
    - resumed with a smaller ``save_top_k`` (``trainer.keep_last_n``), the oldest extra ones are
      removed at the start (Lightning removes one file per save, only when it holds exactly k).
    - the step a run ends on (``max_steps`` or the time limit, at a step boundary) is saved as
      ``last.ckpt``: Lightning saved ``last.ckpt`` at the end only when no checkpoint had been
      saved yet, and a periodic save on the last batch of a Lightning epoch was put off until a
      validation that, at the end of training, never came. ``last.ckpt`` was then up to
      ``checkpoint_every_n_steps - 1`` steps behind a finished run, which a rerun trained again.
    """

    def __init__(self, **kwargs):
        super().__init__(monitor="step", mode="max", **kwargs)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    def on_load_checkpoint(self, trainer, module, checkpoint) -> None:
        states = checkpoint.get("callbacks") or {}
        if self.state_key not in states:  # written under Lightning's key (any interval)
            old = [k for k in states if isinstance(k, str) and k.startswith(
                "ModelCheckpoint{'monitor': 'step', 'mode': 'max',")]
            if len(old) == 1:
                states[self.state_key] = states[old[0]]  # load_state_dict runs after this hook

    def load_state_dict(self, state_dict) -> None:
        old = state_dict.get("dirpath")
        if old and self.dirpath and old != self.dirpath:  # the run directory was moved or copied
            # (run.dir, run.name may change): Lightning then forgot the periodic checkpoints,
            # which were never removed; they are the files of the same names here
            def here(p):
                return os.path.join(self.dirpath, os.path.basename(p)) if p else p

            state_dict = {**state_dict, "dirpath": self.dirpath, "best_k_models": {
                here(p): v for p, v in (state_dict.get("best_k_models") or {}).items()}, **{
                k: here(state_dict.get(k)) for k in ("kth_best_model_path", "last_model_path",
                                                     "best_model_path")}}
        super().load_state_dict(state_dict)

    def on_train_start(self, trainer, module) -> None:
        super().on_train_start(trainer, module)
        k = self.save_top_k
        if k > 0 and len(self.best_k_models) > k:  # keep_last_n lowered since the checkpoint
            newest = sorted(self.best_k_models, key=lambda p: float(self.best_k_models[p]),
                            reverse=True)
            for path in newest[k:]:
                self.best_k_models.pop(path)
                self._remove_checkpoint(trainer, path)
            self.kth_best_model_path = newest[k - 1]
            self.kth_value = self.best_k_models[self.kth_best_model_path]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, module, outputs, batch, batch_idx)
        if self._should_skip_saving_checkpoint(trainer):  # saved at this step already, or not fit
            return
        from degsr.training.cluster import _at_step_boundary

        if not _at_step_boundary(trainer, module, batch_idx):
            return
        candidates = self._monitor_candidates(trainer)
        if getattr(self, "_defer_save_until_validation", False):  # (Lightning >= 2.5) the
            # monitored value, the step, is never stale: save now
            self._defer_save_until_validation = False
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        elif trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step:
            self._save_last_checkpoint(trainer, candidates)  # the step training ends on
