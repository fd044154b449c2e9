"""One ``degsr fit`` at a time per run directory (:class:`RunLock`)."""

from __future__ import annotations

import os
from pathlib import Path

from degsr import console
from degsr.errors import UserError


def global_rank_zero() -> bool:
    """Whether this process is rank 0 of its run: the ranks a launcher or Slurm starts carry
    their rank in the environment (before any Trainer exists)."""
    return all(os.environ.get(k, "0") in ("0", "") for k in ("RANK", "LOCAL_RANK", "NODE_RANK",
                                                             "GROUP_RANK", "SLURM_PROCID"))


class RunLock:
    """One ``degsr fit`` at a time in a run directory: rank 0 holds an flock on ``.fit.lock``
    (the kernel drops it when the process ends, however it ends); a second fit of the same run
    (the same job submitted twice, a second terminal) is a one-line error instead of two
    trainings writing the same checkpoints, export and logs. Where the file system has no locks
    the run goes on unguarded. The file is removed when the lock is given back.

    A requeued Slurm job (``SLURM_RESTART_COUNT`` > 0) waits up to :attr:`REQUEUE_WAIT` seconds
    for the lock: on NFS or Lustre a crashed node's lock lasts until its lease ends, and the
    error would end the job for good. A lock file another user left (a shared run directory)
    is locked through a read-only handle."""

    REQUEUE_WAIT = 300.0
    POLL = 5.0  # seconds between tries while waiting

    def __init__(self, root: Path):
        self.path, self.file = root / ".fit.lock", None

    def __enter__(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # not a POSIX system
            return self
        if not global_rank_zero():
            return self
        import time

        requeued = int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
        deadline = time.monotonic() + (self.REQUEUE_WAIT if requeued else 0.0)
        while True:
            try:
                f, writable = open(self.path, "a+"), True
            except PermissionError:  # another user's file, in a folder shared with them
                f, writable = open(self.path), False
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                f.close()
                if time.monotonic() < deadline:
                    console.log.info(f"{self.path}: held ({holder}); a requeued job waits for it")
                    time.sleep(self.POLL)
                    continue
                raise UserError(f"run {self.path.parent} is being trained by another degsr fit "
                                f"({holder}): wait for it to end, or give another run.name "
                                f"(no such process left, e.g. its node crashed: remove "
                                f"{self.path})") from None
            except OSError:  # no locks on this file system: not guarded
                f.close()
                return self
            try:  # not the file a fit that just ended removed
                same = os.fstat(f.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            f.close()
        if writable:
            import socket

            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            f.flush()
        self.file = f
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            try:
                self.path.unlink(missing_ok=True)
            except OSError:  # a folder we may not change: the flock goes with the handle
                pass
            self.file.close()
            self.file = None
