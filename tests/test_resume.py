"""Exact resume, checkpoint safety and non-finite steps (issue #8).

Parity: a run trained N steps straight and the same run stopped by SIGUSR1 after step k and
resumed (the same command again) log identical per-step losses -- model, optimiser, step
counters, data stream position (2 DataLoader workers, resumed mid-epoch) and every random draw.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import types
import zipfile
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

import degsr.cli
import degsr.training.fit as fitmod
from degsr.config import load_config
from degsr.errors import UserError
from degsr.data.photos import write_photos
from degsr.training.checkpoints import AtomicCheckpointIO, damage, find_resume

ROOT = Path(__file__).resolve().parents[1]
EST = ROOT / "configs" / "estimator_tiny.yaml"
SR = ROOT / "configs" / "sr_tiny.yaml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("resume")
    write_photos(d / "photos", ("astronaut", "rocket", "coins", "camera"))
    write_photos(d / "val", ("chelsea",))
    rc = degsr.cli.main(["shards", str(d / "photos"), "--out", str(d / "shards"),
                         "--per-shard", "2", "--min-side", "16", "--min-bytes", "0"])
    assert rc == 0
    return d


class Recorder(Callback):
    """Every training step's loss, and SIGUSR1 to this process after batch ``kill_after``."""

    def __init__(self, kill_after: int | None = None):
        self.losses, self.kill_after, self.validated = {}, kill_after, []

    def on_validation_end(self, trainer, module):
        if not trainer.sanity_checking:
            self.validated.append(trainer.global_step)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.fit_loop.epoch_loop.total_batch_idx
        self.losses[step] = float(trainer.callback_metrics["train/loss"])
        if step == self.kill_after:
            os.kill(os.getpid(), signal.SIGUSR1)


REAL_MAKE_TRAINER = fitmod.make_trainer


def run(cfg, monkeypatch, recorder: Recorder) -> dict:
    real = REAL_MAKE_TRAINER
    monkeypatch.setattr(fitmod, "make_trainer",
                        lambda c, root, logger, extra=(): real(c, root, logger, [*extra, recorder]))
    return fitmod.fit(cfg)


def events(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "events.jsonl").read_text().splitlines()]


STAGES = {
    # 2 workers, 5 batches per epoch: the stop lands mid-epoch at an odd batch (worker hand-over)
    "estimator": (EST, ["estimator.objective=both", "data.crop_size=64", "data.batch_size=4",
                        "data.echo=1",
                        "data.num_workers=2", "data.batches_per_epoch=5", "data.shuffle_buffer=8",
                        "trainer.max_steps=12", "trainer.val_every_n_steps=4"], 5),
    # data echoing: 3 uses of each degraded batch, interleaved over windows of 2 HR batches, 4
    # HR batches (12 steps) per epoch; the stop lands mid-epoch inside a window (step 20 = epoch
    # 1, window 1, second use of its first batch), so the resumed run skips a window, re-reads
    # and re-degrades the next and skips the uses already made
    "estimator-echo": (EST, ["data.crop_size=64", "data.batch_size=4", "data.num_workers=2",
                             "data.echo=3", "data.echo_window=2", "data.batches_per_epoch=4",
                             "data.shuffle_buffer=8",
                             "trainer.max_steps=24", "trainer.val_every_n_steps=8"], 18),
    # the same with a moving average of the weights (estimator.ema_decay) and 2 crops per image
    "estimator-echo-ema": (EST, ["data.crop_size=64", "data.batch_size=4", "data.num_workers=2",
                                 "data.echo=3", "data.echo_window=2", "data.batches_per_epoch=4",
                                 "data.shuffle_buffer=8", "data.crops_per_image=2",
                                 "estimator.ema_decay=0.9",  # the average travels too
                                 "trainer.max_steps=24", "trainer.val_every_n_steps=8"], 18),
    # GAN on (tiny ViT critic, DiffAugment draws), online negatives drawn often
    "sr": (SR, ["data.crop_size=32", "data.batch_size=2", "data.num_workers=0",
                "data.batches_per_epoch=4", "data.shuffle_buffer=4", "sr.neg_prob=0.5",
                "trainer.max_steps=6", "trainer.val_every_n_steps=3"], 2),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_stop_and_resume_continue_the_loss_curve_exactly(stage, shards, tmp_path, monkeypatch):
    config, extra, kill_after = STAGES[stage]
    common = [f"data.train_shards={shards}/shards", f"data.val_folder={shards}/val",
              "data.val_crops=4", "data.val_batch_size=4", "logger.wandb=false",
              "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=100", *extra]
    straight = Recorder()
    out = run(load_config([config], [*common, f"run.dir={tmp_path}/a"]), monkeypatch, straight)
    n = out["global_step"]
    assert out["status"] == "finished" and sorted(straight.losses) == list(range(n))

    first, second = Recorder(kill_after=kill_after), Recorder()
    cfg = load_config([config], [*common, f"run.dir={tmp_path}/b"])
    out1 = run(cfg, monkeypatch, first)
    k = out1["global_step"]
    # saved after the next step, or at the end of a validation pass before it (whole, logged)
    val_every = int(next(a.split("=")[1] for a in extra if "val_every_n_steps=" in a))
    want = kill_after + 1 if (kill_after + 1) % val_every == 0 else kill_after + 2
    assert out1["status"] == "preempted" and k == want, (k, want)
    assert not (Path(out1["run_dir"]) / "export").exists()  # no export from a stopped run
    assert out1["export"] is None  # nor one in its summary
    out2 = run(cfg, monkeypatch, second)
    assert out2["status"] == "finished" and out2["global_step"] == n
    assert sorted(first.losses) == list(range(k)) and sorted(second.losses) == list(range(k, n))
    resumed = {**first.losses, **second.losses}
    for step in range(n):
        assert resumed[step] == pytest.approx(straight.losses[step], abs=1e-6, rel=0), step
    # the validation passes are those of the straight run: none after the save (the job must
    # exit within Slurm's warning window), none repeated at the resume
    assert straight.validated and first.validated + second.validated == straight.validated
    ev = events(out2["run_dir"])
    assert [e["event"] for e in ev] == ["start", "preempt", "end", "start", "end"]
    assert ev[2]["status"] == "preempted" and ev[4]["status"] == "finished"
    assert ev[3]["step"] == k and ev[3]["resumed_from"].endswith("last.ckpt")
    final = json.loads((Path(out2["run_dir"]) / "final.json").read_text())
    assert final["status"] == "finished" and final["global_step"] == n
    if config == EST:  # the exports (the weight average, where on) agree too
        from safetensors.torch import load_file

        a, b = (load_file(Path(o["export"]) / "estimator.safetensors") for o in (out, out2))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key


class ValRecorder(Recorder):
    """Also: each validation pass's metrics (none for a pass that logged nothing), and a signal
    while validation batch ``kill_batch`` of the pass after step ``kill_at`` is validated."""

    def __init__(self, kill_at=None, kill_batch=1, sig=signal.SIGUSR1):
        super().__init__()
        self.kill_at, self.kill_batch, self.sig, self.val_metrics = kill_at, kill_batch, sig, {}
        self.val_batches, self.log_steps = [], {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, module, outputs, batch, batch_idx)
        # the step the loggers are given (Lightning counts it apart from global_step)
        self.log_steps[trainer.global_step] = trainer.fit_loop.epoch_loop._batches_that_stepped

    def on_validation_start(self, trainer, module):
        for k in [k for k in trainer.callback_metrics if k.startswith("val/")]:
            del trainer.callback_metrics[k]  # what this pass logs, not an earlier pass's

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        if trainer.sanity_checking:
            return
        self.val_batches.append((trainer.global_step, batch_idx))
        if (trainer.global_step, batch_idx) == (self.kill_at, self.kill_batch):
            os.kill(os.getpid(), self.sig)  # as if it came during this batch's validation_step

    def on_validation_end(self, trainer, module):
        super().on_validation_end(trainer, module)
        got = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if got and not trainer.sanity_checking:
            assert trainer.global_step not in self.val_metrics
            self.val_metrics[trainer.global_step] = got


VAL_STOPS = {  # stage of STAGES: the validation pass the signal comes in (after that step)
    "estimator": 8,  # 5 batches an epoch: mid-epoch
    "estimator-echo-ema": 16,  # the weight average (swapped in during validation) moves faster
    "sr": 3,
}


@pytest.mark.parametrize("stage, sig", [("estimator", "SIGTERM"), ("estimator-echo-ema", "SIGUSR1"),
                                        ("sr", "SIGUSR1")])
def test_a_signal_during_validation_saves_there_and_the_resume_validates_that_step_again(
        stage, sig, shards, tmp_path, monkeypatch):
    """A signal during a validation pass was only acted on after the pass and the next training
    step: a long pass outlasted Slurm's 90 s warning (SIGUSR1), and a SIGTERM there ended the
    run with nothing saved. Now the pass ends at the next validation batch, logs nothing, and
    last.ckpt holds the step it came after; the resumed run validates that step again, whole,
    first: the same losses and the same validation metrics at the same steps as a run never
    stopped (the weight average, swapped in during validation, is not saved as the weights)."""
    step = VAL_STOPS[stage]
    config, extra, _ = STAGES[stage]
    common = [f"data.train_shards={shards}/shards", f"data.val_folder={shards}/val",
              "data.val_crops=8", "data.val_batch_size=2", "logger.wandb=false",  # 4 batches
              "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=100", *extra]
    straight = ValRecorder()
    out = run(load_config([config], [*common, f"run.dir={tmp_path}/a"]), monkeypatch, straight)
    n = out["global_step"]
    assert out["status"] == "finished" and step in straight.val_metrics
    assert len(straight.val_metrics) == len(straight.validated)  # every pass logged

    first, second = ValRecorder(kill_at=step, sig=getattr(signal, sig)), ValRecorder()
    cfg = load_config([config], [*common, f"run.dir={tmp_path}/b"])
    root = tmp_path / "b" / cfg.run.name
    if sig == "SIGUSR1":
        out1 = run(cfg, monkeypatch, first)
        assert (out1["status"], out1["global_step"], out1["export"]) == ("preempted", step, None)
    else:
        with pytest.raises(degsr.cli.Terminated):  # status 143, as at a step boundary
            run(cfg, monkeypatch, first)
    # the pass ended at the batch the signal came in, and logged nothing
    assert first.val_batches[-1] == (step, 1) and step not in first.val_metrics
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == step
    ev = events(root)
    assert [(e["event"], e["step"]) for e in ev][1:] == [
        ("preempt", step), ("end" if sig == "SIGUSR1" else "error", step)]
    assert ev[1]["signal"] == sig
    assert sorted(first.losses) == list(range(step))

    out2 = run(cfg, monkeypatch, second)
    assert out2["status"] == "finished" and out2["global_step"] == n
    assert second.val_batches[:4] == [(step, b) for b in range(4)]  # that pass first, whole
    assert sorted(second.losses) == list(range(step, n))
    resumed = {**first.losses, **second.losses}
    for s in range(n):
        assert resumed[s] == pytest.approx(straight.losses[s], abs=1e-6, rel=0), s
    both = {**first.val_metrics, **second.val_metrics}
    assert sorted(both) == sorted(straight.val_metrics)
    for s, metrics in straight.val_metrics.items():
        assert both[s].keys() == metrics.keys(), s
        for k, v in metrics.items():
            assert both[s][k] == pytest.approx(v, abs=1e-5, rel=0), (s, k)
    assert {**first.log_steps, **second.log_steps} == straight.log_steps


def test_after_a_validation_run_again_a_later_resume_is_as_usual(shards, tmp_path, monkeypatch):
    """The pass run again at the resume is begun as Lightning's 'restarted mid-evaluation', which
    left the epoch's count of validation batches begun one ahead: a later checkpoint at a
    validation step (step 8 here: checkpoint_every_n_steps = val_every_n_steps) then looked
    saved mid-validation too, and the run resumed from it validated step 8 again and gave the
    loggers every later step one off."""
    args = _est_args(shards, tmp_path, f"data.val_folder={shards}/val", "data.val_crops=8",
                     "data.val_batch_size=2", "data.batches_per_epoch=50",  # one epoch
                     "trainer.val_every_n_steps=4", "trainer.checkpoint_every_n_steps=4",
                     "trainer.log_every_n_steps=1", "trainer.max_steps=12")
    straight = ValRecorder()
    run(load_config([EST], [*args, "run.name=straight"]), monkeypatch, straight)
    attempts = [ValRecorder(kill_at=4), ValRecorder(), ValRecorder()]
    for rec, steps in zip(attempts, (12, 8, 12)):  # stopped in step 4's pass; ended at 8; on
        run(load_config([EST], [*args, f"trainer.max_steps={steps}"]), monkeypatch, rec)
    assert [sorted(a.val_metrics) for a in attempts] == [[], [4, 8], [12]]
    assert {k: v for a in attempts for k, v in a.log_steps.items()} == straight.log_steps


# ------------------------------------------------------------------------ checkpoint safety
def test_interrupted_save_leaves_the_previous_checkpoint_intact(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.arange(10.0)}, path)
    before = path.read_bytes()

    class Boom:
        def __reduce__(self):
            raise RuntimeError("killed mid-save")

    with pytest.raises(RuntimeError, match="mid-save"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000), "x": Boom()}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temp file left
    assert torch.load(path)["step"] == 1


def test_truncated_checkpoint_is_skipped_at_resume(tmp_path, caplog):
    io = AtomicCheckpointIO()
    older, newer = tmp_path / "step0000002.ckpt", tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 2, "w": torch.rand(4096)}, older)
    io.save_checkpoint({"step": 4, "w": torch.rand(4096)}, newer)
    os.utime(older, ns=(1, 1))  # the newer one by modification time is last.ckpt
    assert find_resume(tmp_path) == newer and damage(newer) is None
    data = newer.read_bytes()
    newer.write_bytes(data[: len(data) // 2])  # cut short: no central directory
    assert damage(newer) is not None
    with caplog.at_level("WARNING", logger="degsr"):
        assert find_resume(tmp_path) == older
    assert "last.ckpt" in caplog.text and "truncated" in caplog.text
    # a flipped byte inside a tensor's data fails its CRC
    blob = bytearray(older.read_bytes())
    with zipfile.ZipFile(older) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    name_len, extra_len = struct.unpack_from("<HH", blob, info.header_offset + 26)  # local header
    blob[info.header_offset + 30 + name_len + extra_len + 100] ^= 0xFF  # inside the tensor's bytes
    older.write_bytes(bytes(blob))
    assert "fails its CRC" in damage(older)
    assert find_resume(tmp_path) is None


def test_a_rerun_with_another_network_is_one_line_and_changes_nothing(shards, tmp_path,
                                                                       monkeypatch, caplog):
    """A finished run rerun under its name: with another network, a one-line error, and the
    run's config.yaml and final.json stay those of its checkpoints; with more steps, the new
    attempt drops the old final.json at its start (collect must not show the old end). A failed
    run closes its W&B run with a non-zero exit code (sweeps count it as failed)."""
    codes = []
    monkeypatch.setattr(fitmod, "finish_wandb", codes.append)
    base = [f"data.train_shards={shards}/shards", "logger.wandb=false", "data.crop_size=64",
            "data.batch_size=4", "data.num_workers=0", "data.batches_per_epoch=3",
            "trainer.val_every_n_steps=100", f"run.dir={tmp_path}", "run.name=r"]
    out = fitmod.fit(load_config([EST], [*base, "trainer.max_steps=2"]))
    root = Path(out["run_dir"])
    config, final = (root / "config.yaml").read_text(), (root / "final.json").read_text()
    with pytest.raises(UserError, match=r"trained with another config .*estimator\.net\.head_hidden"):
        fitmod.fit(load_config([EST], [*base, "trainer.max_steps=2", "estimator.net.head_hidden=8"]))
    assert (root / "config.yaml").read_text() == config and (root / "final.json").read_text() == final
    assert codes == [0]  # refused before any W&B run was started
    (root / "config.yaml").rename(root / "config.keep")  # no config to compare: the load decides
    with caplog.at_level("WARNING", logger="degsr"), pytest.raises(
            UserError, match=r"does not fit this config .*size mismatch") as e:
        fitmod.fit(load_config([EST], [*base, "trainer.max_steps=2", "estimator.net.head_hidden=8"]))
    assert "its config.yaml is missing or unreadable, so this config cannot be checked" in caplog.text
    assert "config.yaml is unchanged" not in str(e.value)  # there is none
    (root / "config.keep").rename(root / "config.yaml")
    assert (root / "config.yaml").read_text() == config and (root / "final.json").read_text() == final
    assert codes == [0, 1]

    class StopAtStart(Callback):  # the longer rerun fails right after it started
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            raise ValueError("stop")

    real = REAL_MAKE_TRAINER
    monkeypatch.setattr(fitmod, "make_trainer", lambda c, r, logger, extra=(): real(
        c, r, logger, [*extra, StopAtStart()]))
    with pytest.raises(ValueError, match="stop"):
        fitmod.fit(load_config([EST], [*base, "trainer.max_steps=4"]))
    assert not (root / "final.json").exists() and "max_steps: 4" in (root / "config.yaml").read_text()
    assert events(root)[-1]["event"] == "error" and codes == [0, 1, 1]
    with pytest.raises(UserError, match="holds a stage-'estimator' run; this is stage 'sr'"):
        fitmod.fit(load_config([SR], base))  # one ablation file run as stage 1, then stage 2


def test_a_rerun_with_another_learning_rate_is_refused_and_writes_nothing(shards, tmp_path):
    """The tiny configs fix run.name: `degsr fit configs/estimator_tiny.yaml estimator.lr=...` a
    second time resumed the first run. With the same trainer.max_steps it 'finished' at once
    (exit 0, the old export reported, nothing trained with the new value); with more steps it
    trained on under the new values and replaced the run's config.yaml, the only record of what
    its checkpoints were trained with. Changing how long it runs stays allowed."""
    base = [f"data.train_shards={shards}/shards", "logger.wandb=false", "data.crop_size=64",
            "data.batch_size=4", "data.num_workers=0", "data.batches_per_epoch=3",
            "trainer.val_every_n_steps=100", f"run.dir={tmp_path}", "run.name=r"]
    root = Path(fitmod.fit(load_config([EST], [*base, "trainer.max_steps=2"]))["run_dir"])
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    for steps in (2, 3):
        with pytest.raises(UserError, match=r"trained with another config .*estimator\.lr: "
                                            r"0\.001 -> 0\.5.*another run\.name"):
            fitmod.fit(load_config([EST], [*base, f"trainer.max_steps={steps}", "estimator.lr=0.5"]))
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    with pytest.raises(UserError, match=r"trained with another config .*run\.seed: 0 -> 1"):
        fitmod.fit(load_config([EST], [*base, "trainer.max_steps=2", "run.seed=1"]))  # another run
    out = fitmod.fit(load_config([EST], [*base, "trainer.max_steps=3", "data.num_workers=1"]))
    assert out["global_step"] == 3 and "max_steps: 3" in (root / "config.yaml").read_text()
    # the same run once more: nothing to train, and the summary gives the metrics it ended with
    ended = json.loads((root / "final.json").read_text())["metrics"]
    again = fitmod.fit(load_config([EST], [*base, "trainer.max_steps=3"]))
    assert again["global_step"] == 3 and again["metrics"] == ended and ended
    # its checkpoints pruned (or all damaged): not trained again from scratch over its export
    for ckpt in (root / "checkpoints").iterdir():
        ckpt.unlink()
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=r"has ended \(final\.json\) but checkpoints/ holds no "
                                        r"usable checkpoint"):
        fitmod.fit(load_config([EST], [*base, "trainer.max_steps=3"]))
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_final_metrics_are_json_numbers():
    """A statistic of one validation sample is NaN: final.json and the summary said NaN, which
    JSON has not; such a value is null now. The others are rounded to 6 decimals."""
    trainer = types.SimpleNamespace(callback_metrics={
        "val/psnr": torch.tensor(31.1234567), "val/srcc": torch.tensor(float("nan")),
        "train/loss": torch.tensor(float("inf")), "step": 5, "image": torch.zeros(2)})
    got = fitmod.final_metrics(trainer)
    assert got == {"val/psnr": 31.123457, "val/srcc": None, "train/loss": None, "step": 5.0}
    json.loads(json.dumps(got, allow_nan=False))


def test_sigusr1_while_the_models_load_is_honoured_at_the_first_step(shards, tmp_path,
                                                                     monkeypatch):
    """SIGUSR1 can come while degsr fit still builds its models (a hand-sent scancel, a short
    --time): it used to end the process (the handler came with the trainer). Now the run saves
    after its first step and ends preempted, to be resumed."""
    real = fitmod.build_module

    def build_then_signal(cfg):
        module = real(cfg)
        os.kill(os.getpid(), signal.SIGUSR1)
        return module

    monkeypatch.setattr(fitmod, "build_module", build_then_signal)
    cfg = load_config([EST], [f"data.train_shards={shards}/shards", "logger.wandb=false",
                              "data.crop_size=64", "data.batch_size=4", "data.num_workers=0",
                              "data.batches_per_epoch=3", "trainer.max_steps=8",
                              "trainer.val_every_n_steps=100", f"run.dir={tmp_path}"])
    out = fitmod.fit(cfg)
    assert out["status"] == "preempted" and out["global_step"] == 1
    assert out["export"] is None and not (Path(out["run_dir"]) / "export").exists()
    assert Path(out["last_checkpoint"]).is_file()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # handed back


def test_keep_last_n_checkpoints(shards, tmp_path):
    cfg = load_config([EST], [f"data.train_shards={shards}/shards", "logger.wandb=false",
                              "data.crop_size=64", "data.batch_size=4", "data.num_workers=0",
                              "data.batches_per_epoch=3", "trainer.max_steps=8",
                              "trainer.checkpoint_every_n_steps=2", "trainer.keep_last_n=2",
                              "trainer.val_every_n_steps=100", f"run.dir={tmp_path}"])
    out = fitmod.fit(cfg)
    names = sorted(p.name for p in (Path(out["run_dir"]) / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step0000006.ckpt", "step0000008.ckpt"]


# ------------------------------------------------------------------------ non-finite losses
NAN_SCRIPT = textwrap.dedent("""
    import sys
    import degsr.cli, degsr.training.fit as fitmod
    from degsr.estimator.module import EstimatorModule

    class NaNAtRank1(EstimatorModule):
        def losses(self, batch):
            out = super().losses(batch)
            t = self.trainer.fit_loop.epoch_loop.total_batch_idx
            if self.global_rank == 1 and (t == 2 or ALWAYS):
                out = {k: v * float("nan") for k, v in out.items()}
            return out

    real = fitmod.build_module
    def build(cfg):
        m = real(cfg)
        m.__class__ = NaNAtRank1
        return m
    fitmod.build_module = build

    if __name__ == "__main__":
        sys.exit(degsr.cli.main(["fit", *sys.argv[1:]]))
""")


def _ddp_fit(script: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("SLURM_")}
    return subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True,
                          text=True, timeout=300)


def _ddp_args(shards, tmp_path, *extra) -> list[str]:
    return [str(EST), f"data.train_shards={shards}/shards", "logger.wandb=false",
            "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
            "data.crop_size=64", "data.batch_size=4", "data.num_workers=0",
            "data.batches_per_epoch=4", "trainer.max_steps=5", "trainer.val_every_n_steps=100",
            "trainer.checkpoint_every_n_steps=100", f"run.dir={tmp_path}/runs", *extra]


def test_nan_on_one_rank_skips_the_step_on_all_ranks(shards, tmp_path):
    script = tmp_path / "nan_fit.py"
    script.write_text(NAN_SCRIPT.replace("ALWAYS", "False"))
    r = _ddp_fit(script, _ddp_args(shards, tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "runs" / "estimator-tiny"  # (both ranks print their JSON summary)
    final = json.loads((run_dir / "final.json").read_text())
    assert final["metrics"]["train/skipped_steps"] == 1.0
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["nonfinite"] == {"skipped": 1, "consecutive": 0}
    weights = torch.cat([v.flatten().float() for v in ckpt["state_dict"].values()])
    assert torch.isfinite(weights).all()  # rank 1's NaN never reached the shared weights
    # the step was dropped on rank 0 too (its own loss was finite): AdamW updated every
    # parameter 4 times in 5 counted steps
    assert final["global_step"] == 5
    adam_steps = {float(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()}
    assert adam_steps == {4.0}


def test_consecutive_nan_steps_stop_training_with_a_clear_message(shards, tmp_path):
    script = tmp_path / "nan_fit.py"
    script.write_text(NAN_SCRIPT.replace("ALWAYS", "True"))
    r = _ddp_fit(script, _ddp_args(shards, tmp_path, "trainer.max_nonfinite_skips=3"))
    assert r.returncode == 2, r.stderr[-3000:]
    assert "NaN/inf on some rank for 3 steps in a row" in r.stderr
    assert "trainer.max_nonfinite_skips=3" in r.stderr


def test_validation_metrics_do_not_depend_on_the_number_of_ranks(shards, tmp_path):
    """5 validation crops on 1 and on 2 DDP ranks (the second rank's last batch is padding that
    must not count twice), the same weights (learning rate ~0): the same metrics."""
    script = tmp_path / "fit.py"
    script.write_text("import sys, degsr.cli\nsys.exit(degsr.cli.main(['fit', *sys.argv[1:]]))\n")
    metrics = []
    for devices, strategy in ((1, "auto"), (2, "ddp")):
        args = [a for a in _ddp_args(shards, tmp_path) if not a.startswith("trainer.")]
        r = _ddp_fit(script, [*args, f"data.val_folder={shards}/val", "data.val_crops=5",
                              "data.val_batch_size=2", "estimator.lr=1e-30", "trainer.max_steps=1",
                              "trainer.val_every_n_steps=1", "trainer.accelerator=cpu",
                              f"trainer.devices={devices}", f"trainer.strategy={strategy}",
                              f"run.name=d{devices}"])
        assert r.returncode == 0, r.stderr[-3000:]
        final = json.loads((tmp_path / "runs" / f"d{devices}" / "final.json").read_text())
        metrics.append({k: v for k, v in final["metrics"].items() if k.startswith("val/")})
    assert set(metrics[0]) >= {"val/mse", "val/spearman_blur", "val/spearman_noise"}
    assert metrics[1].keys() == metrics[0].keys()
    for k in metrics[0]:
        assert metrics[1][k] == pytest.approx(metrics[0][k], abs=1e-4), k


VAL_SIGNAL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    import degsr.cli, degsr.training.fit as fitmod
    from lightning.pytorch.callbacks import Callback

    class OneRankSignal(Callback):
        \"\"\"SIGUSR1 to one rank alone while it validates (rank, step, batch) SIGNAL_AT; each
        rank prints the validation batches it ran, rank 0 the metrics each pass logged.\"\"\"
        def on_validation_start(self, trainer, module):
            for k in [k for k in trainer.callback_metrics if k.startswith("val/")]:
                del trainer.callback_metrics[k]  # what this pass logs, not an earlier pass's

        def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
            if trainer.sanity_checking:
                return
            os.write(1, f"VAL {trainer.global_rank} {trainer.global_step} {batch_idx}\\n".encode())
            if (trainer.global_rank, trainer.global_step, batch_idx) == SIGNAL_AT and STOP:
                time.sleep(DELAY)  # the other rank is then waiting in a collective
                os.kill(os.getpid(), signal.SIGNAL)

        def on_validation_end(self, trainer, module):
            if not trainer.sanity_checking and trainer.global_rank == 0:
                got = sorted((k, round(float(v), 5)) for k, v in trainer.callback_metrics.items()
                             if k.startswith("val/"))
                if got:  # (one write: both ranks write to this pipe)
                    os.write(1, f"METRICS {trainer.global_step} {got}\\n".encode())

    real = fitmod.make_trainer
    fitmod.make_trainer = lambda c, root, logger, extra=(): real(c, root, logger,
                                                                [*extra, OneRankSignal()])

    if UNEVEN:  # rank 1 validates one batch fewer than rank 0 (EvenSplit never does that)
        from torch.utils.data import DataLoader
        from degsr.data.module import SRDataModule
        from degsr.data.validation import EvenSplit

        class Short(EvenSplit):
            def __iter__(self):
                return iter(list(super().__iter__())[:-1])

            def __len__(self):
                return super().__len__() - 1

        real_val = SRDataModule.val_dataloader

        def val_dataloader(self):
            loaders = real_val(self)
            if self.trainer.global_rank == 1:
                dl = loaders[0]
                loaders[0] = DataLoader(dl.dataset, batch_size=dl.batch_size,
                                        sampler=Short(dl.sampler.dataset, 2, 1))
            return loaders
        SRDataModule.val_dataloader = val_dataloader

    if __name__ == "__main__":
        sys.exit(degsr.cli.main(["fit", *sys.argv[1:]]))
""")


def _val_signal_script(stop: bool, at=(1, 4, 1), uneven: bool = False,
                       sig: str = "SIGUSR1", delay: float = 0.0) -> str:
    return (VAL_SIGNAL_SCRIPT.replace("SIGNAL_AT", repr(tuple(at))).replace("STOP", str(stop))
            .replace("UNEVEN", str(uneven)).replace("signal.SIGNAL", f"signal.{sig}")
            .replace("DELAY", repr(delay)))


def _val_batches_ran(stdout: str) -> list[tuple[int, int, int]]:
    """(rank, step, batch) of each validation batch begun, from the VAL lines."""
    return [tuple(map(int, line.split()[1:])) for line in stdout.splitlines()
            if line.startswith("VAL ")]


def _val_signal_args(shards, tmp_path) -> list[str]:
    # 7 validation crops, 1 a batch: 4 batches a rank (the 8th crop is EvenSplit's padding)
    return _ddp_args(shards, tmp_path, f"data.val_folder={shards}/val", "data.val_crops=7",
                     "data.val_batch_size=1", "trainer.val_every_n_steps=4", "trainer.max_steps=8")


def test_a_signal_on_one_rank_during_validation_stops_every_rank_at_the_same_batch(shards,
                                                                                    tmp_path):
    """DDP, 2 ranks: SIGUSR1 on rank 1 alone while it validates: both ranks end the pass after
    the same batch (the flag is all-reduced per validation batch), save last.ckpt at the step
    before the pass and stop (status 3); the resumed run validates that step again, with the
    metrics a run never stopped logs, and finishes."""
    script = tmp_path / "val_signal.py"
    args = _val_signal_args(shards, tmp_path)
    script.write_text(_val_signal_script(stop=False))
    straight = _ddp_fit(script, [*args, "run.name=straight"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    script.write_text(_val_signal_script(stop=True, at=(1, 4, 1)))
    r = _ddp_fit(script, [*args, "run.name=cut"])
    assert r.returncode == 3, (r.returncode, r.stderr[-3000:])
    ran = _val_batches_ran(r.stdout)
    assert sorted(b for rank, step, b in ran if step == 4 and rank == 0) == [0, 1]
    assert sorted(b for rank, step, b in ran if step == 4 and rank == 1) == [0, 1]
    assert "METRICS 4" not in r.stdout  # the pass cut short logged nothing
    run = tmp_path / "runs" / "cut"
    assert _ckpt_steps(run) == {"last.ckpt": 4}
    script.write_text(_val_signal_script(stop=False))
    r = _ddp_fit(script, [*args, "run.name=cut"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert [line for line in r.stdout.splitlines() if line.startswith("VAL 0 ")][0] == "VAL 0 4 0"
    metrics = [line for line in straight.stdout.splitlines() if line.startswith("METRICS")]
    assert [line for line in r.stdout.splitlines() if line.startswith("METRICS")] == metrics
    assert len(metrics) == 2  # steps 4 and 8
    assert json.loads((run / "final.json").read_text())["global_step"] == 8


def test_sigterm_to_the_launcher_alone_during_validation_saves_on_every_rank(shards, tmp_path):
    """DDP, 2 ranks: SIGTERM to rank 0 alone (the launching process: `kill PID`, `docker stop`,
    a Kubernetes pod ending) while it validates. Lightning's handler broadcast inside the signal
    handler and raised on one rank: the run crashed with nothing saved. Now the pass ends after
    the same batch on both ranks, last.ckpt holds the step before it, status 143; the rerun
    validates that step again and finishes."""
    script = tmp_path / "val_signal.py"
    args = _val_signal_args(shards, tmp_path)
    script.write_text(_val_signal_script(stop=True, at=(0, 4, 1), sig="SIGTERM", delay=3.0))
    r = _ddp_fit(script, [*args, "run.name=term"])
    assert r.returncode == 128 + signal.SIGTERM, (r.returncode, r.stderr[-3000:])
    ran = _val_batches_ran(r.stdout)
    for rank in (0, 1):
        assert sorted(b for k, step, b in ran if step == 4 and k == rank) == [0, 1], ran
    assert "METRICS 4" not in r.stdout
    run = tmp_path / "runs" / "term"
    assert _ckpt_steps(run) == {"last.ckpt": 4}
    assert "SIGTERM: saved" in r.stderr
    script.write_text(_val_signal_script(stop=False))
    r = _ddp_fit(script, [*args, "run.name=term"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert [line for line in r.stdout.splitlines() if line.startswith("VAL 0 ")][0] == "VAL 0 4 0"
    assert json.loads((run / "final.json").read_text())["global_step"] == 8


def test_validation_is_cut_only_where_every_rank_still_validates(shards, tmp_path):
    """The flag is all-reduced after a validation batch only when every rank runs that batch
    and a later one: with 4 batches on rank 0 and 3 on rank 1, a signal on rank 0 in its third
    batch must not make it wait in a collective rank 1 never joins (rank 1 is in its end-of-pass
    metrics by then); the pass ends whole, and the run saves at its end (every rank is there)."""
    script = tmp_path / "val_signal.py"
    script.write_text(_val_signal_script(stop=True, at=(0, 4, 2), uneven=True))
    r = _ddp_fit(script, [*_val_signal_args(shards, tmp_path), "run.name=uneven"])
    assert r.returncode == 3, (r.returncode, r.stderr[-3000:])
    ran = _val_batches_ran(r.stdout)
    assert sorted(b for rank, step, b in ran if step == 4 and rank == 0) == [0, 1, 2, 3]
    assert sorted(b for rank, step, b in ran if step == 4 and rank == 1) == [0, 1, 2]
    assert _ckpt_steps(tmp_path / "runs" / "uneven") == {"last.ckpt": 4}
    assert "METRICS 4" in r.stdout  # the whole pass logged its metrics


@pytest.mark.parametrize("val_batch_size, kill_batch", [(2, 3), (8, 0)])
def test_a_signal_in_the_last_validation_batch_saves_at_the_end_of_the_pass(
        val_batch_size, kill_batch, shards, tmp_path, monkeypatch):
    """SIGTERM in the last batch of a validation pass (which is not cut), or in a pass of one
    batch, had saved nothing: Lightning raised after the pass. Now the pass ends whole and logs,
    last.ckpt holds its step, and the resumed run goes on exactly (not validating it again)."""
    config, extra, _ = STAGES["estimator"]
    step = 8
    common = [f"data.train_shards={shards}/shards", f"data.val_folder={shards}/val",
              "data.val_crops=8", f"data.val_batch_size={val_batch_size}", "logger.wandb=false",
              "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=100", *extra]
    straight = ValRecorder()
    out = run(load_config([config], [*common, f"run.dir={tmp_path}/a"]), monkeypatch, straight)
    n = out["global_step"]
    cfg = load_config([config], [*common, f"run.dir={tmp_path}/b"])
    root = tmp_path / "b" / cfg.run.name
    first = ValRecorder(kill_at=step, kill_batch=kill_batch, sig=signal.SIGTERM)
    with pytest.raises(degsr.cli.Terminated):
        run(cfg, monkeypatch, first)
    assert step in first.val_metrics  # the pass was whole and logged
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == step
    second = ValRecorder()
    out2 = run(cfg, monkeypatch, second)
    assert out2["status"] == "finished" and out2["global_step"] == n
    assert step not in second.val_metrics and sorted(second.losses) == list(range(step, n))
    resumed = {**first.losses, **second.losses}
    for s in range(n):
        assert resumed[s] == pytest.approx(straight.losses[s], abs=1e-6, rel=0), s
    both = {**first.val_metrics, **second.val_metrics}
    assert sorted(both) == sorted(straight.val_metrics)
    assert {**first.log_steps, **second.log_steps} == straight.log_steps


CTRL_C_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import degsr.cli, degsr.training.fit as fitmod
    from lightning.pytorch.callbacks import Callback

    class CtrlC(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if batch_idx == 1:
                os.kill(os.getpid(), signal.SIGINT)

    real = fitmod.make_trainer
    fitmod.make_trainer = lambda c, root, logger, extra=(): real(c, root, logger, [*extra, CtrlC()])
    # as at a terminal: a job started in the background by a script inherits SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)

    if __name__ == "__main__":
        sys.exit(degsr.cli.main(["fit", *sys.argv[1:]]))
""")


def _fit_in_a_process(script, shards, tmp_path) -> subprocess.CompletedProcess:
    """``script`` (CTRL_C_SCRIPT or a variant) runs 8 steps of the tiny stage 1."""
    return subprocess.run([sys.executable, str(script), str(EST), f"data.train_shards={shards}/shards",
                           "logger.wandb=false", "data.crop_size=64", "data.batch_size=4",
                           "data.num_workers=0", "data.batches_per_epoch=4", "trainer.max_steps=8",
                           "trainer.val_every_n_steps=100", f"run.dir={tmp_path}/runs"],
                          capture_output=True, text=True, timeout=300)


def test_ctrl_c_during_fit_says_interrupted(shards, tmp_path):
    """Lightning turns Ctrl-C into exit(1); the CLI's promise is 'interrupted' and status 130."""
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C_SCRIPT)
    r = _fit_in_a_process(script, shards, tmp_path)
    assert r.returncode == 130 and r.stderr.rstrip().endswith("interrupted"), r.stderr[-2000:]
    assert events(tmp_path / "runs" / "estimator-tiny")[-1]["event"] == "error"


def test_a_foreign_checkpoint_in_the_run_is_one_line(tmp_path, monkeypatch):
    """A complete torch file that Lightning did not write (a state dict copied in as last.ckpt)
    passed the CRC check and ended in KeyError: 'pytorch-lightning_version' (a traceback)."""
    monkeypatch.setattr("degsr.data.module.SRDataModule.check_sources", lambda self: None)
    ckpts = tmp_path / "r" / "checkpoints"
    ckpts.mkdir(parents=True)
    torch.save({"state_dict": {}}, ckpts / "last.ckpt")
    cfg = load_config([EST], [f"run.dir={tmp_path}", "run.name=r", "logger.wandb=false"])
    with pytest.raises(UserError, match=r"last\.ckpt is not a checkpoint degsr fit wrote"):
        fitmod.fit(cfg)
    assert sorted(p.name for p in (tmp_path / "r").rglob("*")) == ["checkpoints", "last.ckpt"]


# ------------------------------------------------------------------------ ModelCheckpoint on resume
def _ckpt_steps(run_dir) -> dict[str, int]:
    return {p.name: torch.load(p, weights_only=False, map_location="cpu")["global_step"]
            for p in sorted((Path(run_dir) / "checkpoints").glob("*.ckpt"))}


def _est_args(shards, tmp_path, *extra) -> list[str]:
    return [f"data.train_shards={shards}/shards", "logger.wandb=false", "data.crop_size=64",
            "data.batch_size=4", "data.num_workers=0", "data.echo=1", "data.batches_per_epoch=3",
            "trainer.val_every_n_steps=100", f"run.dir={tmp_path}", "run.name=r", *extra]


def test_resumed_with_another_checkpoint_interval_the_old_checkpoints_are_still_managed(
        shards, tmp_path, recwarn):
    """trainer.checkpoint_every_n_steps was part of Lightning's ModelCheckpoint state key: resumed
    with another value, the checkpoint's list of step*.ckpt was dropped (Lightning's "callbacks
    used to create the checkpoint" warning) and the earlier attempt's files were never removed."""
    out = fitmod.fit(load_config([EST], _est_args(shards, tmp_path, "trainer.max_steps=4",
                                                  "trainer.checkpoint_every_n_steps=2")))
    assert _ckpt_steps(out["run_dir"]) == {"last.ckpt": 4, "step0000002.ckpt": 2,
                                           "step0000004.ckpt": 4}
    recwarn.clear()
    out = fitmod.fit(load_config([EST], _est_args(shards, tmp_path, "trainer.max_steps=8",
                                                  "trainer.checkpoint_every_n_steps=3")))
    assert not [w for w in recwarn if "callbacks used to create the checkpoint" in str(w.message)]
    # keep_last_n=2 over both attempts: step 6 replaced step 2; the run ended at step 8
    assert _ckpt_steps(out["run_dir"]) == {"last.ckpt": 8, "step0000004.ckpt": 4,
                                           "step0000006.ckpt": 6}
    # keep_last_n lowered on resume: the oldest extra one goes at the start
    out = fitmod.fit(load_config([EST], _est_args(shards, tmp_path, "trainer.max_steps=9",
                                                  "trainer.checkpoint_every_n_steps=3",
                                                  "trainer.keep_last_n=1")))
    assert _ckpt_steps(out["run_dir"]) == {"last.ckpt": 9, "step0000009.ckpt": 9}


class StopAt(Callback):
    """trainer.should_stop at a step, as Lightning's Timer does for trainer.max_minutes."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.should_stop = True


@pytest.mark.parametrize("ending", ["max_steps", "epoch_end", "time_limit"])
def test_last_ckpt_holds_the_step_a_run_ends_on(ending, shards, tmp_path, monkeypatch):
    """A finished run's last.ckpt used to be the last periodic checkpoint: up to
    checkpoint_every_n_steps - 1 steps behind when the run ended between two (max_steps or
    max_minutes), and one interval behind when the final periodic save fell on the last batch of
    a Lightning epoch (put off until a validation that never came). A rerun trained them again."""
    steps, every, stop = {"max_steps": (7, 2, None), "epoch_end": (6, 3, None),
                          "time_limit": (9, 2, 5)}[ending]
    # epoch_end: 3 steps an epoch, validated every 4 steps (Lightning put the save off only when
    # there is a validation set)
    val = [f"data.val_folder={shards}/val", "data.val_crops=4", "data.val_batch_size=4",
           "trainer.val_every_n_steps=4"] if ending == "epoch_end" else []
    if stop is not None:
        monkeypatch.setattr(fitmod, "make_trainer", lambda c, r, logger, extra=(): REAL_MAKE_TRAINER(
            c, r, logger, [*extra, StopAt(stop)]))
    out = fitmod.fit(load_config([EST], _est_args(shards, tmp_path, f"trainer.max_steps={steps}",
                                                  f"trainer.checkpoint_every_n_steps={every}", *val)))
    end = stop or steps
    assert out["status"] == "finished" and out["global_step"] == end
    found = _ckpt_steps(out["run_dir"])
    assert found["last.ckpt"] == end, found
    if end % every == 0:
        assert found[f"step{end:07d}.ckpt"] == end, found


@pytest.mark.parametrize("when", ["during_the_step", "after_its_hooks"])
def test_sigterm_during_fit_saves_the_step_and_says_terminated(shards, tmp_path, when):
    """Lightning stops at the end of the batch on SIGTERM (kill, timeout, a Slurm preemption
    without --signal) by raising SIGTERMException, a SystemExit without a code: degsr fit
    exited with status 0, said nothing and saved nothing. Now: 'terminated', status 143, as the
    other commands; a SIGTERM that comes during a step (where a step's time goes) saves
    last.ckpt at its end first, as SIGUSR1 does. One that comes after the step's hooks ran
    saved nothing while Lightning's handler raised at the end of that batch; since degsr owns
    SIGTERM in training, it saves at the end of the next step instead."""
    script = tmp_path / "sigterm.py"
    text = CTRL_C_SCRIPT.replace("signal.SIGINT)", "signal.SIGTERM)")
    if when == "during_the_step":
        text = text.replace("on_train_batch_end(self, trainer, module, outputs, batch, batch_idx)",
                            "on_train_batch_start(self, trainer, module, batch, batch_idx)")
    script.write_text(text)
    r = _fit_in_a_process(script, shards, tmp_path)
    assert r.returncode == 128 + signal.SIGTERM, (r.returncode, r.stderr[-2000:])
    assert r.stderr.rstrip().endswith("terminated"), r.stderr[-2000:]
    run = tmp_path / "runs" / "estimator-tiny"
    ev = events(run)
    step = 2 if when == "during_the_step" else 3
    assert ev[-1]["event"] == "error" and ev[-1]["step"] == step
    assert [(e["event"], e["step"], e["signal"]) for e in ev if e["event"] == "preempt"] == [
        ("preempt", step, "SIGTERM")]
    assert _ckpt_steps(run) == {"last.ckpt": step}
    assert "SIGTERM: saved" in r.stderr


@pytest.mark.parametrize("every", [100, 3])
def test_a_run_that_died_after_its_last_step_is_exported_by_the_rerun(every, shards, tmp_path,
                                                                      monkeypatch):
    """last.ckpt holds the step a run ends on (RunCheckpoint, at the last batch); a run that died
    after that save but before its export and final.json (killed during the final validation or
    the export, disk full) was 'resumed' by a rerun that trained nothing and never exported: the
    summary said finished and named an export that did not exist, for good."""
    from degsr.estimator.module import EstimatorModule

    real_export = EstimatorModule.export

    def failing_export(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(EstimatorModule, "export", failing_export)
    args = _est_args(shards, tmp_path, "trainer.max_steps=3",
                     f"trainer.checkpoint_every_n_steps={every}")
    with pytest.raises(OSError, match="No space"):
        fitmod.fit(load_config([EST], args))
    monkeypatch.setattr(EstimatorModule, "export", real_export)
    out = fitmod.fit(load_config([EST], args))
    root = Path(out["run_dir"])
    assert out["status"] == "finished" and out["global_step"] == 3
    assert (root / "export" / "estimator.safetensors").is_file(), sorted(
        p.name for p in root.iterdir())
    assert json.loads((root / "final.json").read_text())["status"] == "finished"
    # the export holds the weight average (estimator_tiny.yaml: estimator.ema_decay), as a
    # normal end's does: the checkpoint's state_dict is the average
    from safetensors.torch import load_file

    exported = load_file(root / "export" / "estimator.safetensors")
    state = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)
    assert "current_model_state" in state
    for k, v in exported.items():
        assert torch.equal(v, state["state_dict"][f"net.{k}"]), k


def test_a_resume_may_lower_the_validation_batch(shards, tmp_path):
    """data.val_batch_size changes only memory (degsr.data.validation: the metrics do not depend
    on it): a run whose validation ran out of memory on the GPU it was requeued to must be
    resumable with a smaller one, as with fewer data.num_workers."""
    val = [f"data.val_folder={shards}/val", "data.val_crops=4", "trainer.val_every_n_steps=2"]
    fitmod.fit(load_config([EST], _est_args(shards, tmp_path, "trainer.max_steps=2", *val,
                                            "data.val_batch_size=4")))
    out = fitmod.fit(load_config([EST], _est_args(shards, tmp_path, "trainer.max_steps=4", *val,
                                                  "data.val_batch_size=2")))
    assert out["status"] == "finished" and out["global_step"] == 4


def test_memory_only_keys_may_change_on_resume_and_training_keys_may_not(tmp_path):
    """Requeued onto a smaller GPU, a run may recompute more (sr.gradient_checkpointing) and
    validate in smaller batches (data.val_batch_size): the same numbers, less memory."""
    from degsr.config import save_config

    save_config(load_config([SR], []), tmp_path)
    fitmod._check_same_run(tmp_path, load_config([SR], ["sr.gradient_checkpointing=[unet]",
                                                        "data.val_batch_size=1"]))
    with pytest.raises(UserError, match=r"sr\.lr: "):
        fitmod._check_same_run(tmp_path, load_config([SR], ["sr.lr=0.5"]))


def test_a_rerun_with_fewer_steps_than_its_checkpoint_says_so(shards, tmp_path, caplog):
    """trainer.max_steps below the step of the run's checkpoint 'finished' at once, silently,
    reporting the checkpoint's step: it now says that nothing was trained, and why."""
    args = _est_args(shards, tmp_path, "data.val_crops=2", "data.val_batch_size=2")
    fitmod.fit(load_config([EST], [*args, "trainer.max_steps=2"]))
    with caplog.at_level("WARNING", logger="degsr"):
        out = fitmod.fit(load_config([EST], [*args, "trainer.max_steps=1"]))
    assert out["global_step"] == 2 and out["status"] == "finished"
    assert "at step 2, past trainer.max_steps=1: nothing trained" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="degsr"):
        fitmod.fit(load_config([EST], [*args, "trainer.max_steps=2"]))  # the same run: quiet
    assert "nothing trained" not in caplog.text
    # trainer.max_minutes is counted over a run's attempts: a rerun of a run that used them up
    # 'finished' at once, silently too
    args = _est_args(shards, tmp_path, "run.name=timed", "trainer.max_steps=4",
                     "trainer.max_minutes=0.000001")
    assert fitmod.fit(load_config([EST], args))["global_step"] == 1  # stopped after its 1st step
    caplog.clear()
    with caplog.at_level("WARNING", logger="degsr"):
        assert fitmod.fit(load_config([EST], args))["global_step"] == 1
    assert ("nothing trained: earlier attempts used up its trainer.max_minutes=1e-06 (the clock "
            "counts over every attempt of a run) at step 1 of 4") in caplog.text


def test_a_moved_run_keeps_only_its_last_n_checkpoints(shards, tmp_path):
    """run.dir may change on resume (a run moved from scratch space): Lightning then dropped the
    list of periodic checkpoints ("The dirpath has changed ...") and never removed those."""
    import shutil

    args = _est_args(shards, tmp_path, "trainer.checkpoint_every_n_steps=1", "trainer.keep_last_n=2")
    fitmod.fit(load_config([EST], [*args, "trainer.max_steps=3"]))
    (tmp_path / "moved").mkdir()
    shutil.move(tmp_path / "r", tmp_path / "moved" / "r")
    out = fitmod.fit(load_config([EST], [*args, "trainer.max_steps=5", f"run.dir={tmp_path / 'moved'}"]))
    assert out["global_step"] == 5 and Path(out["run_dir"]) == tmp_path / "moved" / "r"
    assert events(out["run_dir"])[-2]["resumed_from"].endswith("moved/r/checkpoints/last.ckpt")
    assert _ckpt_steps(out["run_dir"]) == {"last.ckpt": 5, "step0000004.ckpt": 4,
                                           "step0000005.ckpt": 5}


def test_a_resume_shows_no_lightning_warning_about_its_own_checkpoints(shards, tmp_path):
    """Every rerun of a run printed Lightning's 'Checkpoint directory ... exists and is not
    empty': a resume reads that folder on purpose (degsr fit's filters, as the CLI sets them)."""
    import warnings

    from degsr import console

    args = _est_args(shards, tmp_path, "trainer.max_steps=1")
    fitmod.fit(load_config([EST], args))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        console.setup(False)
        out = fitmod.fit(load_config([EST], [*args, "trainer.max_steps=2"]))
    assert out["global_step"] == 2 and events(out["run_dir"])[-2]["resumed_from"]
    assert not [w for w in seen if "exists and is not empty" in str(w.message)], \
        [str(w.message) for w in seen]


def test_a_resumed_attempt_that_trained_then_ran_out_of_minutes_is_not_called_empty(shards, tmp_path,
                                                                                    caplog, monkeypatch):
    """The 'nothing trained ... max_minutes' warning compared the end step with the step of the
    checkpoint it resumed from, read after training: last.ckpt, which the attempt itself had
    rewritten at its end step. An attempt that trained and then met trainer.max_minutes was
    told that it trained nothing."""
    from lightning.pytorch.callbacks import Timer

    # time is up after step 3, whatever the machine's speed (a real 3-s budget trained nothing
    # on a loaded machine: the resumed validation alone took longer)
    monkeypatch.setattr(Timer, "_check_time_remaining", lambda self, trainer: setattr(
        trainer, "should_stop", trainer.should_stop or trainer.global_step >= 3))
    args = _est_args(shards, tmp_path, "run.name=timed2")
    assert fitmod.fit(load_config([EST], [*args, "trainer.max_steps=1"]))["global_step"] == 1
    with caplog.at_level("WARNING", logger="degsr"):  # resumed at 1, steps trained, time's up
        out = fitmod.fit(load_config([EST], [*args, "trainer.max_steps=100000",
                                             "trainer.max_minutes=60"]))
    assert out["global_step"] == 3
    assert "nothing trained" not in caplog.text


def test_the_time_limit_stops_a_run_at_a_step_boundary(shards, tmp_path):
    """trainer.max_minutes under gradient accumulation: Lightning's Timer stopped training after
    any batch, mid-accumulation, where no checkpoint is saved: the run 'finished' and exported
    at a step its last.ckpt did not hold (a rerun with more minutes went back to the last
    periodic checkpoint). The limit is now checked only after an optimizer step."""
    args = _est_args(shards, tmp_path, "trainer.accumulate_grad_batches=2",
                     "data.batches_per_epoch=4", "trainer.max_steps=10",
                     "trainer.max_minutes=0.000001", "trainer.checkpoint_every_n_steps=100")
    out = fitmod.fit(load_config([EST], args))
    assert out["status"] == "finished" and out["global_step"] == 1  # the first step, whole
    assert _ckpt_steps(out["run_dir"]) == {"last.ckpt": 1}
