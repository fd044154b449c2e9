"""``degsr quickstart``: the whole method on the tiny default, end to end, in minutes on a CPU.

Steps (each skipped when its output is complete, so a rerun reuses what exists):

1. ``photos``    the ``skimage.data`` photos as PNG: TRAIN for training, HELD_OUT for validation
                 and evaluation (:mod:`degsr.data.photos`)
2. ``shards``    ``degsr shards`` on the training photos
3. ``prior``     the tiny SD-Turbo stand-in (:mod:`degsr.quickstart.prior`); skipped when
                 ``--pretrained`` names a real SD-Turbo folder
4. ``stage1``    ``degsr fit configs/estimator_tiny.yaml``: the degradation estimator
5. ``stage2``    ``degsr fit configs/sr_tiny.yaml model.pretrained=<prior> sr.estimator=<stage 1>``
6. ``sr``        held-out photos cut to a multiple of 4, bicubic ×1/4 (the classic benchmark LR),
                 then ``degsr sr``; bicubic ×4 of the same LR is the baseline
7. ``eval``      ``degsr eval`` of both against the HR, plus sharpness (variance of the Laplacian)
8. ``report``    ``report.md``, ``comparison.png`` and ``results.json``

``--minutes`` sizes the run in steps, not seconds (:func:`budget`): each of the four fits makes
the steps it made in its share of the time on a quiet 2-core CPU (:data:`CALIBRATION`), so the
result does not depend on how fast the machine is that day, only the run's duration does. Each
fit also stops at :data:`CAP` times its calibrated time, so a much slower machine still ends
(with a warning and a weaker result). Timings of finished steps are kept in ``quickstart.json``
so a rerun's report still shows them.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

from degsr import console
from degsr.errors import UserError
from degsr.io import CONFIG_DIR, atomic_write_bytes

# Per fit, for the default ``--minutes 10``: (steps, seconds they took on CPU-2, quiet, 2 torch
# threads). The seconds are the fit's share of the 10 minutes (prior 40 %: VAE 60 % of it, UNet
# the rest; stage 1 15 %; stage 2 30 %; the other 15 % is start-up, validation, sr and eval); the
# steps are what each fit made in them on the days the quickstart met its targets (sessions 4-6,
# docs/quickstart.md): measured for the VAE (2174-2389) and stage 1 (961); for the UNet and stage
# 2, the counts of session 15's slower CPU-2 (784, 207-404) scaled up by the VAE's speed ratio and
# rounded up. ``--minutes M`` scales both by M / 10.
CALIBRATION = {"vae": (2300, 144.0), "unet": (1300, 96.0), "stage1": (960, 90.0),
               "stage2": (650, 180.0)}
CAP = 3.0        # a fit stops at CAP x its calibrated seconds even if its steps are not done
STATE = "quickstart.json"
DONE = "quickstart_done.json"   # written into a training run once its export exists
STEPS = ("photos", "shards", "prior", "stage1", "stage2", "sr", "eval", "report")


class Paths:
    """Where each step writes, under ``--out``."""

    def __init__(self, out: Path, pretrained: str | None):
        self.out = out
        self.train, self.heldout = out / "photos" / "train", out / "photos" / "heldout"
        self.shards = out / "shards"
        self.prior = out / "prior"
        self.base = Path(pretrained).expanduser().resolve() if pretrained else self.prior
        self.runs = out / "runs"
        self.stage1 = self.runs / "estimator"
        self.stage2 = self.runs / ("sr" if not pretrained else f"sr-{self.base.name}")
        self.eval = out / "eval"
        self.hr, self.lr = self.eval / "hr", self.eval / "lr"
        self.bicubic, self.sr = self.eval / "bicubic", self.eval / "degsr"


# --------------------------------------------------------------------------- checks, state

def prepare_out(out: str | os.PathLike) -> Path:
    """``--out`` as a writable folder (created), or a one-line UserError."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path}: exists and is not a folder; choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe."):
            pass
    except OSError as e:
        raise UserError(f"--out {path}: cannot write there ({e.strerror or e}); choose a folder "
                        f"you can write to") from None
    return path.resolve()


def check_minutes(minutes: float) -> float:
    if not 0 < minutes < math.inf:  # also NaN
        raise UserError(f"--minutes must be a finite number > 0, got {minutes}")
    return float(minutes)


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat's first line; None where unavailable."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
    return total - idle, total


def busy_cores(before: tuple[int, int], after: tuple[int, int], cpus: int) -> float:
    """Cores in use between two ``_cpu_times`` samples: the busy share of the elapsed jiffies."""
    d_busy, d_total = after[0] - before[0], after[1] - before[1]
    return cpus * d_busy / d_total if d_total > 0 else 0.0


def pick_threads(threads: int | None, window_s: float = 0.5) -> int:
    """Torch CPU threads for this process: ``threads``, or one per core left idle by the other
    processes (at least 1), measured over ``window_s`` from /proc/stat (the 1-minute load average
    where that is unavailable: it still counts a job that ended seconds ago). Oversubscribed
    OpenMP threads spin at their barriers: on the 2-core CI machine with other jobs running, one
    VAE step took 10 s with 2 threads, 0.36 s with 1."""
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be >= 1, got {threads}")
        return threads
    cpus = os.cpu_count() or 1
    before, after = _cpu_times(), None
    if before is not None:
        time.sleep(window_s)
        after = _cpu_times()
    busy = busy_cores(before, after, cpus) if after is not None else os.getloadavg()[0]
    return max(1, min(cpus, cpus - round(busy)))


def load_state(out: Path) -> dict:
    try:
        return json.loads((out / STATE).read_text())
    except (OSError, ValueError):
        return {}


def save_state(out: Path, state: dict) -> None:
    atomic_write_bytes(out / STATE, (json.dumps(state, indent=2) + "\n").encode())


# --------------------------------------------------------------------------- the quick steps

def make_photos(p: Paths) -> dict:
    from degsr.data.photos import HELD_OUT, TRAIN, write_photos

    for folder, names in ((p.train, TRAIN), (p.heldout, HELD_OUT)):
        if not folder.is_dir():  # written whole under a temporary name, then renamed
            tmp = folder.with_name(folder.name + ".tmp")
            write_photos(tmp, names)
            tmp.replace(folder)
    return {"train": len(TRAIN), "heldout": len(HELD_OUT)}


def make_shards(p: Paths) -> dict:
    from degsr.data.shards import write_shards

    s = write_shards([p.train], p.shards, min_side=64, min_bytes=0)
    return {"shards": len(s.shards), "samples": s.total, "skipped": len(s.skipped)}


def budget(minutes: float) -> dict[str, tuple[int, float]]:
    """Per fit: (steps, time cap in seconds) of a ``minutes``-long run (see :data:`CALIBRATION`)."""
    f = minutes / 10.0
    return {k: (max(1, round(n * f)), CAP * secs * f) for k, (n, secs) in CALIBRATION.items()}


def capped(name: str, steps: int, planned: int, cap: float) -> list[str]:
    """``["<name>: N of M steps"]`` (and a warning) for a fit its time cap stopped, else []."""
    if steps >= planned:
        return []
    console.log.warning(
        f"{name}: stopped at its time cap ({cap:.0f} s) after {steps} of {planned} steps: "
        f"this machine ran more than {CAP:g}x slower than the quiet 2-core CPU the quickstart "
        "is calibrated on, so expect a weaker result than docs/quickstart.md reports")
    return [f"{name}: {steps} of {planned} steps"]


def make_prior(p: Paths, b: dict, seed: int) -> dict:
    from degsr.quickstart.prior import PriorSettings, build_prior

    (vae_steps, vae_cap), (unet_steps, unet_cap) = b["vae"], b["unet"]
    stamp = build_prior(p.shards, p.prior, PriorSettings(
        vae_steps=vae_steps, vae_cap=vae_cap, unet_steps=unet_steps, unet_cap=unet_cap, seed=seed))
    cut = [line for fit in ("vae", "unet")
           for line in capped(f"prior/{fit}", stamp[fit]["steps"], *b[fit])]
    return {"vae_psnr": stamp["vae"]["train_psnr"], "vae_steps": stamp["vae"]["steps"],
            "unet_steps": stamp["unet"]["steps"], "unet_latent_mse": stamp["unet"]["latent_mse"],
            "capped": cut}


def _fit(name: str, config: str, run_dir: Path, steps_cap: tuple[int, float],
         overrides: list[str]) -> dict:
    from degsr.config import load_config
    from degsr.training.fit import fit

    steps, cap = steps_cap
    cfg = load_config([CONFIG_DIR / config],
                      [f"run.dir={run_dir.parent}", f"run.name={run_dir.name}",
                       f"trainer.max_steps={steps}", f"trainer.max_minutes={cap / 60:.4f}",
                       *overrides])
    result = fit(cfg)  # (fit closes its W&B run: the next stage gets its own)
    cut = (capped(name, result["global_step"], steps, cap)
           if result["status"] == "finished" else [])
    wandb = sorted(str(w) for w in (run_dir / "wandb").glob("offline-run-*"))
    return {"status": result["status"], "global_step": result["global_step"],
            "export": result["export"], "last_checkpoint": result["last_checkpoint"],
            "metrics": result["metrics"], "wandb": wandb, "capped": cut}


def _data(p: Paths) -> list[str]:
    return [f"data.train_shards={p.shards}", f"data.val_folder={p.heldout}"]


# Stage 1 pinned to the settings the quickstart's targets were measured with (session 5): one
# crop per decoded photo, one degradation per crop, no within-crop loss, no weight average, a
# constant learning rate (the tiny config's cosine ends at its 15-min step count). With
# estimator_tiny.yaml's 8 crops and average the 90-s estimator learns more, but in three fresh
# runs with them chelsea came within 0.01 dB of the 2-dB limit once and coffee fell below
# bicubic's sharpness once (docs/quickstart.md). The photos at their own scale: the tiny
# config's 0.5-1 resize (session 9) was measured on the 15-min stage 1 only.
STAGE1_PINNED = ["data.crops_per_image=1", "data.shuffle_buffer=64", "estimator.ema_decay=0",
                 "data.degradations_per_crop=1", "estimator.within_crop_weight=0",
                 "estimator.lr_schedule=constant", "data.scale_range=[1.0,1.0]"]
CLEAN_SHARE = 0.3  # stage 2's share of clean (bicubic-downsampled) LRs: what step 6 evaluates


def train_stage1(p: Paths, steps_cap: tuple[int, float], seed: int) -> dict:
    return _fit("stage1", "estimator_tiny.yaml", p.stage1, steps_cap, [
        *_data(p), f"run.seed={seed}", "trainer.val_every_n_steps=50",
        "trainer.checkpoint_every_n_steps=50", "data.val_crops=32", *STAGE1_PINNED])


def train_stage2(p: Paths, steps_cap: tuple[int, float], seed: int) -> dict:
    return _fit("stage2", "sr_tiny.yaml", p.stage2, steps_cap, [
        *_data(p), f"run.seed={seed}", f"model.pretrained={p.base}",
        f"sr.estimator={p.stage1 / 'export'}", f"degradation.no_degradation_prob={CLEAN_SHARE}"])


# --------------------------------------------------------------------------- orchestration

def quickstart(out: str | os.PathLike, minutes: float = 10.0, pretrained: str | None = None,
               seed: int = 0, threads: int | None = None) -> dict:
    """Run (or resume) the quickstart into ``out``; returns the results written to results.json."""
    import torch

    minutes = check_minutes(minutes)
    threads = pick_threads(threads)
    if pretrained:  # before --out is made: a failed start leaves no empty folder behind
        from degsr.sr.folder_check import check_pretrained_folder
        check_pretrained_folder(pretrained)
    p = _checked_paths(prepare_out(out), pretrained)
    state = load_state(p.out)
    if state.get("minutes") not in (None, minutes):
        console.log.info(f"note: finished steps of an earlier {state['minutes']}-minute run in "
                         f"{p.out} are reused; delete them to retrain")
    state.setdefault("minutes", minutes)
    state.setdefault("steps", {})
    state["threads"] = threads
    torch.set_num_threads(threads)
    console.log.info(f"quickstart -> {p.out}: --minutes {minutes}, {threads} torch thread(s)")
    t_all = time.monotonic()
    ran: set[str] = set()
    plan = _plan(p, bool(pretrained), budget(minutes), seed, ran, state)
    for i, name in enumerate(STEPS, 1):
        done, work, note = plan[name]
        tag = f"[{i}/{len(STEPS)}] {name}"
        if done():
            state["steps"].setdefault(name, {})["status"] = (
                "not needed (--pretrained)" if name == "prior" and pretrained else "reused")
            console.log.info(f"{tag}: already complete, reused")
            continue
        note = f" ({note})" if note else ""
        console.log.info(f"{tag}: running{note} ... [{time.monotonic() - t_all:.0f} s elapsed]")
        t0 = time.monotonic()
        detail = work()
        secs = time.monotonic() - t0
        ran.add(name)
        state["steps"][name] = {"status": "ran", "seconds": round(secs, 1), "detail": detail}
        save_state(p.out, state)
        console.log.info(f"{tag}: done in {secs:.0f} s")
    console.log.info(f"quickstart finished in {time.monotonic() - t_all:.0f} s -> "
                     f"{p.out / 'report.md'}")
    return json.loads((p.out / "results.json").read_text())


def _checked_paths(out: Path, pretrained: str | None) -> Paths:
    from degsr.quickstart.prior import STAMP, is_complete

    p = Paths(out, pretrained)
    if not pretrained and p.prior.exists() and not is_complete(p.prior):
        raise UserError(f"{p.prior} exists but is not a finished quickstart prior (no {STAMP}); "
                        f"move it away or choose another --out")
    return p


def _plan(p: Paths, pretrained: bool, b: dict, seed: int, ran: set, state: dict) -> dict:
    """Per step: (is its output complete?, do it, its training budget in words or None)."""
    from degsr.data.photos import HELD_OUT
    from degsr.quickstart.evaluate import run_eval, run_sr, sr_current
    from degsr.quickstart.prior import is_complete
    from degsr.quickstart.report import write_report

    def says(*fits: str) -> str:  # "2300 vae + 1300 unet steps, time cap 720 s"
        names = [f"{b[f][0]} {f}" if len(fits) > 1 else str(b[f][0]) for f in fits]
        return f"{' + '.join(names)} steps, time cap {sum(b[f][1] for f in fits):.0f} s"

    def sr_done() -> bool:
        return ("stage2" not in ran and sr_current(p)
                and all((p.sr / f"{n}.png").is_file() for n in HELD_OUT))
    return {
        "photos": (lambda: p.train.is_dir() and p.heldout.is_dir(), lambda: make_photos(p), None),
        "shards": (lambda: (p.shards / "index.json").is_file(), lambda: make_shards(p), None),
        "prior": (lambda: pretrained or is_complete(p.prior),
                  lambda: make_prior(p, b, seed), says("vae", "unet")),
        "stage1": (lambda: (p.stage1 / DONE).is_file(),
                   lambda: _stage(p.stage1, train_stage1(p, b["stage1"], seed)), says("stage1")),
        "stage2": (lambda: (p.stage2 / DONE).is_file(),
                   lambda: _stage(p.stage2, train_stage2(p, b["stage2"], seed)), says("stage2")),
        "sr": (sr_done, lambda: run_sr(p, overwrite="stage2" in ran), None),
        "eval": (lambda: False, lambda: run_eval(p), None),
        "report": (lambda: False, lambda: write_report(p, state), None),
    }


def _stage(run_dir: Path, result: dict) -> dict:
    """Mark a training stage finished (its export written) so a rerun reuses it; a stage that
    SIGUSR1 stopped (saved, not exported) ends the quickstart, and a rerun resumes it."""
    if result.get("status") != "finished":
        raise UserError(f"{run_dir.name}: stopped by SIGUSR1 at step {result.get('global_step')} "
                        f"({result.get('last_checkpoint')} saved); rerun the same degsr "
                        "quickstart command to resume it")
    atomic_write_bytes(run_dir / DONE, (json.dumps(result, indent=2) + "\n").encode())
    return result
