"""Logging and progress conventions shared by every command.

Progress bars are shown when stderr is a terminal or with ``--verbose``; non-interactive runs
(CI, Slurm logs) stay quiet apart from warnings and the final results.
"""

from __future__ import annotations

import logging
import sys
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
log = logging.getLogger("degsr")
_verbose = False


def setup(verbose: bool = False) -> None:
    """Configure the ``degsr`` logger once per process."""
    global _verbose
    _verbose = verbose
    level = logging.DEBUG if verbose else logging.INFO
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    if not verbose:  # library chatter that says nothing actionable to a degsr user
        import warnings

        for pattern in (r".*will save all targets and predictions in the buffer.*",
                        r".*LeafSpec.*is deprecated.*", r".*does not have many workers.*",
                        r".*The number of training batches.*is smaller than the logging interval.*",
                        # stage 2 steps by hand and checkpoints after the step on purpose; its
                        # frozen parts (VAE decoder, DINO, VGG) are in eval mode on purpose
                        r"Using ModelCheckpoint with manual optimization.*",
                        r"Found \d+ module\(s\) in eval mode at the start of training.*",
                        # a rerun resumes from its run directory's checkpoints on purpose; a
                        # run without validation sets has an empty list of val loaders
                        r"Checkpoint directory .* exists and is not empty.*",
                        r"Total length of `list` across ranks is zero.*"):
            warnings.filterwarnings("ignore", message=pattern)
        quiet_lightning()


def quiet_lightning() -> None:
    """Lightning's info lines (GPU available, tips) only with --verbose. Lightning sets its
    logger levels when first imported, so callers run this again after importing it."""
    if not _verbose:
        for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
            logging.getLogger(name).setLevel(logging.WARNING)


def show_progress() -> bool:
    return _verbose or sys.stderr.isatty()


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Wrap long work in a progress bar (only where someone can watch it)."""
    return iter(tqdm(items, desc=desc, total=total, unit=unit, disable=not show_progress(),
                     dynamic_ncols=True, leave=False))
