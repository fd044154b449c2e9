"""Fast unit checks of degsr/training: the non-finite guard, preemption at a step boundary, the
Slurm allocation check and requeue, checkpoint selection, run identity and RunLog's files.
Each fakes the few trainer/module attributes the code reads (no Lightning fit runs here)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from degsr.errors import UserError

NAN, INF = float("nan"), float("inf")


# ------------------------------------------------------------------------ NonFiniteGuard
class _Sum:
    """An all-reduce over ranks whose other flags are ``others`` (sum or mean)."""

    def __init__(self, *others: float):
        self.others = others

    def reduce(self, t, reduce_op):  # ``others``: numbers, or tuples as long as a vector ``t``
        vals = [t.float(), *(torch.tensor(o, dtype=torch.float) for o in self.others)]
        return sum(vals) if reduce_op == "sum" else sum(vals) / len(vals)


def _module(world_size: int = 1, others=(), step: int = 7):
    trainer = SimpleNamespace(world_size=world_size, strategy=_Sum(*others))
    return SimpleNamespace(_trainer=trainer, global_step=step)


def test_guard_skips_nan_and_inf_in_any_loss_and_counts():
    from degsr.training.guard import NonFiniteGuard

    g, m = NonFiniteGuard(limit=5), _module()
    assert g.skip(m, torch.tensor(1.0), torch.tensor([2.0, 3.0])) is False
    assert g.skip(m, torch.tensor(INF)) is True  # inf, not only NaN
    assert g.skip(m, torch.tensor(-INF)) is True
    assert g.skip(m, torch.tensor(1.0), torch.tensor([0.0, NAN])) is True  # the second loss
    assert (g.skipped, g.consecutive) == (3, 3)
    assert g.skip(m, torch.tensor(0.5)) is False  # a finite step ends the streak
    assert (g.skipped, g.consecutive) == (3, 0)
    g2 = NonFiniteGuard()
    g2.load_state_dict(g.state_dict())
    assert g2.state_dict() == {"skipped": 3, "consecutive": 0}
    g2.load_state_dict({"skipped": 4, "consecutive": 2})
    assert (g2.skipped, g2.consecutive) == (4, 2)


def test_guard_stops_at_exactly_the_limit_of_consecutive_skips():
    from degsr.training.guard import NonFiniteGuard

    g, m = NonFiniteGuard(limit=3), _module(step=41)
    bad = torch.tensor(NAN)
    assert g.skip(m, bad) and g.skip(m, bad)
    assert g.skip(m, torch.tensor(1.0)) is False  # the streak restarts
    assert g.skip(m, bad) and g.skip(m, bad)
    with pytest.raises(UserError, match=r"stopping at step 41: .* for 3 steps in a row"):
        g.skip(m, bad)


def test_guard_a_bad_loss_on_another_rank_skips_here_too():
    from degsr.training.guard import NonFiniteGuard

    g = NonFiniteGuard()
    assert g.skip(_module(world_size=2, others=(1.0,)), torch.tensor(1.0)) is True
    assert g.skip(_module(world_size=2, others=(0.0,)), torch.tensor(1.0)) is False
    assert g.skip(_module(world_size=3, others=(0.0, 0.0)), torch.tensor(NAN)) is True


# ------------------------------------------------------------------------ Preemption
class _FakeTrainer:
    def __init__(self, world_size=1, others=(), accumulate=1, step=10):
        self.world_size, self.accumulate_grad_batches, self.global_step = world_size, accumulate, step
        self.strategy = _Sum(*others)
        self.strategy.root_device = torch.device("cpu")
        self.saved, self.should_stop, self.is_global_zero = [], False, True
        self.checkpoint_callbacks = [SimpleNamespace(_last_global_step_saved=-1,
                                                     _last_checkpoint_saved="")]
        self.fit_loop = SimpleNamespace(epoch_loop=SimpleNamespace(_should_check_val_fx=None))
        self._signal_connector = SimpleNamespace(received_sigterm=False)  # Lightning's flag

    def save_checkpoint(self, path):
        self.saved.append(Path(path))


def _auto(accumulate_cfg=None):
    if accumulate_cfg is None:
        return SimpleNamespace(automatic_optimization=True)
    return SimpleNamespace(automatic_optimization=False, cfg=SimpleNamespace(accumulate=accumulate_cfg))


def test_preemption_saves_once_at_the_next_step_boundary(tmp_path):
    from degsr.training.cluster import Preemption

    calls = []
    p = Preemption(tmp_path / "last.ckpt", on_preempt=lambda t, requeue, *why: calls.append(requeue))
    t = _FakeTrainer(accumulate=2)
    p.on_train_batch_end(t, _auto(), None, None, 0)  # nothing requested
    assert t.saved == [] and not p.preempted
    p.requested = True
    p.on_train_batch_end(t, _auto(), None, None, 0)  # batch 0 of 2: gradients in flight
    assert t.saved == [] and not p.preempted and not t.should_stop
    p.on_train_batch_end(t, _auto(), None, None, 1)  # the step is complete
    assert t.saved == [tmp_path / "last.ckpt"] and p.preempted and t.should_stop
    assert calls == [False]  # (not under Slurm here)
    cb = t.checkpoint_callbacks[0]
    assert cb._last_global_step_saved == 10 and cb._last_checkpoint_saved == str(tmp_path / "last.ckpt")
    assert t.fit_loop.epoch_loop._should_check_val_fx() is False  # no validation after the save
    p.on_train_batch_end(t, _auto(), None, None, 3)
    assert len(t.saved) == 1  # saved once


def test_preemption_under_manual_optimisation_waits_for_sr_accumulate(tmp_path):
    from degsr.training.cluster import Preemption

    p = Preemption(tmp_path / "last.ckpt")
    p.requested = True
    t = _FakeTrainer(accumulate=1)  # Lightning's key does not apply to manual optimisation
    for batch_idx in (0, 1, 3, 4):
        p.on_train_batch_end(t, _auto(accumulate_cfg=3), None, None, batch_idx)
        assert t.saved == [], batch_idx
    p.on_train_batch_end(t, _auto(accumulate_cfg=3), None, None, 5)
    assert len(t.saved) == 1


def test_preemption_any_rank_asking_stops_every_rank(tmp_path):
    from degsr.training.cluster import Preemption

    p = Preemption(tmp_path / "last.ckpt")  # this rank saw no signal; one of 3 others did
    t = _FakeTrainer(world_size=4, others=(0.0, 1.0, 0.0))
    p.on_train_batch_end(t, _auto(), None, None, 0)
    assert p.preempted and len(t.saved) == 1
    q = Preemption(tmp_path / "last.ckpt")
    t = _FakeTrainer(world_size=2, others=(0.0,))
    q.on_train_batch_end(t, _auto(), None, None, 0)
    assert not q.preempted and t.saved == []


def test_every_rank_names_the_signal_any_rank_got(tmp_path, monkeypatch):
    """SIGUSR1 on one rank only (a signal sent to one task by hand): every rank saves, names
    SIGUSR1 and requeues under Slurm, not only that rank (the others had named SIGTERM)."""
    from degsr.training import cluster

    monkeypatch.setattr(cluster, "under_slurm", lambda: True)
    for others, name in (((1.0, 0.0),), "SIGUSR1"), (((0.0, 1.0),), "SIGTERM"), (((1.0, 1.0),), "SIGUSR1"):
        calls = []
        p = cluster.Preemption(tmp_path / "last.ckpt", on_preempt=lambda t, *why: calls.append(why))
        t = _FakeTrainer(world_size=2, others=others)  # this rank saw nothing
        p.on_train_batch_end(t, _auto(), None, None, 0)
        assert p.preempted and calls == [(name == "SIGUSR1", name)], others
        # SIGTERM: Lightning's own flag is set after the save, on every rank alike, so that it
        # stops the run (status 143) at the same point on each
        assert t._signal_connector.received_sigterm == (name == "SIGTERM")


def _validating(world_size=1, others=(), step=8, max_steps=20, val_batches=(4,), accumulate=1,
                batch_idx=7):
    """A _FakeTrainer in fit's validation pass after ``step`` (Lightning's own progress counts)."""
    from lightning.pytorch.loops.progress import _BatchProgress

    t = _FakeTrainer(world_size=world_size, others=others, accumulate=accumulate, step=step)
    t.state, t.sanity_checking, t.max_steps = SimpleNamespace(fn="fit"), False, max_steps
    t.num_val_batches = list(val_batches)
    val = SimpleNamespace(batch_progress=_BatchProgress())
    t.fit_loop.epoch_loop = SimpleNamespace(_should_check_val_fx=None, batch_idx=batch_idx,
                                            val_loop=val)
    return t


def _val_batch(p, t, module):
    """Lightning's counts for one validation batch up to on_validation_batch_end, then the hook;
    True when it ended the pass."""
    bp = t.fit_loop.epoch_loop.val_loop.batch_progress
    bp.increment_ready(), bp.increment_started(), bp.increment_processed()
    try:
        p.on_validation_batch_end(t, module, None, None, bp.current.ready - 1)
    except StopIteration:
        return True
    bp.increment_completed()
    return False


def test_preemption_during_validation_ends_the_pass_and_saves_at_its_end(tmp_path):
    from degsr.training.cluster import Preemption

    p = Preemption(tmp_path / "last.ckpt")
    t, discarded = _validating(), []
    module = SimpleNamespace(automatic_optimization=True,
                             discard_validation=lambda: discarded.append(1))
    bp = t.fit_loop.epoch_loop.val_loop.batch_progress
    bp.total.increment_by(4)  # an earlier pass of this epoch
    p.on_validation_start(t, module)
    assert not _val_batch(p, t, module)  # nothing asked
    p.requested = True
    assert _val_batch(p, t, module) and discarded == [1] and t.saved == []  # cut after batch 1
    p.on_validation_end(t, module)  # (after the pass's end hooks: the weight average is out)
    assert t.saved == [tmp_path / "last.ckpt"] and p.preempted and t.should_stop
    # saved as a pass stopped in its first step: Lightning runs it again, whole, at the resume
    def counts(c):
        return c.ready, c.started, c.processed, c.completed

    assert counts(bp.current) == (1, 1, 0, 0) and counts(bp.total) == (5, 5, 4, 4)
    # that pass, run again, starts with the epoch's totals evened out
    p.on_validation_start(t, module)
    assert counts(bp.total) == (4, 4, 4, 4)


@pytest.mark.parametrize("why", ["sanity_check", "last_step", "time_limit", "accumulating",
                                 "last_batch", "another_rank_has_fewer"])
def test_preemption_during_validation_leaves_some_passes_whole(why, tmp_path):
    """The final validation (its step is in last.ckpt already), one mid-accumulation, the sanity
    check: they run on (a signal is honoured at the next step, if any). Nor is a pass cut, or the
    flag all-reduced, at a batch that not every rank runs, or after which none remains: there
    the signal is acted on at the end of the pass, whole (a collective every rank reaches)."""
    from degsr.training.cluster import Preemption

    p = Preemption(tmp_path / "last.ckpt")
    p.requested = True
    t = _validating(**{"last_step": dict(step=20), "accumulating": dict(accumulate=3),
                       "last_batch": dict(val_batches=(1,)),
                       "another_rank_has_fewer": dict(world_size=2, val_batches=(3,))}.get(why, {}))
    t.sanity_checking = why == "sanity_check"
    t.should_stop = why == "time_limit"  # (Lightning's Timer)
    ended = why in ("last_batch", "another_rank_has_fewer")
    if why == "another_rank_has_fewer":
        reduced = []

        def reduce(tensor, reduce_op):
            reduced.append(reduce_op)
            if reduce_op == "min":  # the batch count over the ranks: rank 1's 1, not our 3
                return torch.tensor(1.0)
            assert len(reduced) == 2, "the flag all-reduced at a batch rank 1 never runs"
            return tensor  # (at the end of the pass: every rank is there)

        t.strategy.reduce = reduce
    module = SimpleNamespace(automatic_optimization=True)
    p.on_validation_start(t, module)
    assert not _val_batch(p, t, module)  # not cut
    assert t.saved == []
    p.on_validation_end(t, module)
    assert (t.saved == [tmp_path / "last.ckpt"]) == ended and p.preempted == ended


def test_preemption_arm_is_idempotent_and_disarm_leaves_a_newer_handler():
    from degsr.training.cluster import Preemption

    sig = signal.SIGUSR2  # the test's own signal: SIGUSR1 belongs to the real runs
    before = signal.getsignal(sig)
    try:
        p = Preemption("x.ckpt", signum=sig)
        p.arm()
        p.arm()  # twice: the handler found first is still the one handed back
        os.kill(os.getpid(), sig)
        assert p.requested
        p.disarm()
        assert signal.getsignal(sig) == before
        p.arm()
        p.on_exception(None, None, RuntimeError("boom"))  # a failed fit hands it back too
        assert signal.getsignal(sig) == before

        def other(signum, frame):
            pass

        p.arm()
        signal.signal(sig, other)  # someone installed their own after us: theirs stays
        p.disarm()
        assert signal.getsignal(sig) is other
    finally:
        signal.signal(sig, before)


# ------------------------------------------------------------------------ Slurm allocation
def _trainer_cfg(devices=1, num_nodes=1, accelerator="cpu"):
    return SimpleNamespace(trainer=SimpleNamespace(devices=devices, num_nodes=num_nodes,
                                                   accelerator=accelerator))


@pytest.fixture
def fake_slurm(monkeypatch):
    import degsr.training.cluster as cluster

    monkeypatch.setattr(cluster, "under_slurm", lambda: True)
    for k in ("SLURM_NTASKS_PER_NODE", "SLURM_JOB_NUM_NODES", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


@pytest.mark.parametrize("env, devices, nodes, match", [
    ({"SLURM_NTASKS_PER_NODE": "2(x3)"}, 1, 3, r"trainer.devices=1 .*--ntasks-per-node=2"),
    ({"SLURM_JOB_NUM_NODES": "2"}, 1, 1, r"trainer.num_nodes=1 .*--nodes=2"),
    ({"SLURM_NTASKS": "3"}, 2, 1, r"= 2 but Slurm started 3 tasks"),
    ({"SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "4"}, 2, 2, None),
])
def test_check_allocation_compares_the_config_with_slurms_counts(fake_slurm, env, devices,
                                                                 nodes, match):
    from degsr.training.cluster import check_allocation

    for k, v in env.items():
        fake_slurm.setenv(k, v)
    cfg = _trainer_cfg(devices, nodes)
    if match is None:
        check_allocation(cfg)
    else:
        with pytest.raises(UserError, match=match):
            check_allocation(cfg)


@pytest.mark.parametrize("accelerator", ["gpu", "cuda"])
def test_check_allocation_a_gpu_config_without_a_gpu(monkeypatch, accelerator):
    import degsr.training.cluster as cluster

    monkeypatch.setattr(cluster, "under_slurm", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(UserError, match=f"trainer.accelerator={accelerator} but this machine has no GPU"):
        cluster.check_allocation(_trainer_cfg(accelerator=accelerator))
    cluster.check_allocation(_trainer_cfg(accelerator="cpu"))


@pytest.fixture
def scontrol(monkeypatch):
    import subprocess

    import degsr.training.cluster as cluster

    calls, rc = [], {"code": 0}

    def fake_run(argv, **kwargs):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, rc["code"], "", "no such job")

    monkeypatch.setattr(cluster.subprocess, "run", fake_run)
    for k in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(k, raising=False)
    return calls, rc, monkeypatch


def test_requeue_names_the_array_task_and_reports_failure(scontrol):
    from degsr.training.cluster import requeue

    calls, rc, mp = scontrol
    assert requeue() is False and calls == []  # no job: nothing run
    mp.setenv("SLURM_JOB_ID", "101")
    assert requeue() is True and calls[-1] == ["scontrol", "requeue", "101"]
    mp.setenv("SLURM_ARRAY_JOB_ID", "100")
    mp.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert requeue() is True and calls[-1] == ["scontrol", "requeue", "100_3"]
    rc["code"] = 1
    assert requeue() is False


# ------------------------------------------------------------------------ checkpoints
def test_find_resume_takes_only_ckpt_files(tmp_path):
    from degsr.training.checkpoints import AtomicCheckpointIO, find_resume

    io = AtomicCheckpointIO()
    ckpt = tmp_path / "step0000002.ckpt"
    io.save_checkpoint({"step": 2}, ckpt)
    os.utime(ckpt, ns=(1, 1))
    io.save_checkpoint({"step": 4}, tmp_path / "stray.pt")  # a complete torch file, newer
    assert find_resume(tmp_path) == ckpt
    assert find_resume(tmp_path / "missing") is None


def test_find_resume_takes_the_furthest_step_whatever_the_file_times(tmp_path):
    """A run copied with `cp -r` (or rsync without -t) has its checkpoints' times in the order of
    the copy: the newest by time was step 15 of a run whose last.ckpt is at step 16, and the
    rerun trained (and exported) again from there."""
    from degsr.training.checkpoints import AtomicCheckpointIO, find_resume

    io = AtomicCheckpointIO()
    for i, (name, step) in enumerate((("step0000016.ckpt", 16), ("last.ckpt", 17),
                                      ("step0000015.ckpt", 15))):  # copied in this order
        io.save_checkpoint({"global_step": step, "pytorch-lightning_version": "2"}, tmp_path / name)
        os.utime(tmp_path / name, ns=(10 + i, 10 + i))
    assert find_resume(tmp_path) == tmp_path / "last.ckpt"
    (tmp_path / "last.ckpt").write_bytes((tmp_path / "last.ckpt").read_bytes()[:50])  # cut off
    assert find_resume(tmp_path) == tmp_path / "step0000016.ckpt"


def test_checkpoint_is_fsynced_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    """The rename must not reach the disk before the data (a node crash would leave an empty
    last.ckpt where a complete one was)."""
    import degsr.training.checkpoints as ck

    order, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(ck.os, "fsync", lambda fd: (order.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(ck.os, "replace", lambda a, b: (order.append("replace"), real_replace(a, b))[1])
    written, real_save = [], torch.save
    monkeypatch.setattr(ck.torch, "save", lambda obj, f: (written.append(Path(f.name)), real_save(obj, f))[1])
    ck.AtomicCheckpointIO().save_checkpoint({"w": torch.ones(3)}, tmp_path / "last.ckpt")
    assert order == ["fsync", "replace"]
    # the half-written file is one that neither find_resume nor ModelCheckpoint lists
    assert len(written) == 1 and written[0].parent == tmp_path
    assert written[0].name.startswith(".") and not written[0].name.endswith(".ckpt")
    assert torch.equal(torch.load(tmp_path / "last.ckpt")["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# ------------------------------------------------------------------------ run identity
def _run_cfg(name="exp", folder="runs"):
    return SimpleNamespace(run=SimpleNamespace(name=name, dir=folder))


def test_run_dir_and_wandb_id_outside_and_inside_a_sweep(tmp_path, monkeypatch):
    from degsr.training.tracking import run_dir, wandb_id

    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    monkeypatch.setenv("WANDB_RUN_ID", "stray")  # set without a sweep: not ours to use
    monkeypatch.setenv("HOME", str(tmp_path))
    assert run_dir(_run_cfg("exp", "~/runs")) == tmp_path / "runs" / "exp"
    a, b = wandb_id(_run_cfg("exp", str(tmp_path / "a"))), wandb_id(_run_cfg("exp", str(tmp_path / "b")))
    assert a.startswith("exp-") and b.startswith("exp-") and a != b  # one id per run directory
    assert wandb_id(_run_cfg("exp", str(tmp_path / "a"))) == a  # stable: a requeue logs into it
    assert wandb_id(_run_cfg("a b/c", str(tmp_path))).startswith("a-b-c-")
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw")
    monkeypatch.setenv("WANDB_RUN_ID", "r42")
    assert run_dir(_run_cfg("exp", str(tmp_path))) == tmp_path / "exp-r42"
    assert wandb_id(_run_cfg("exp", str(tmp_path))) == "r42"


def test_wandb_mode_from_the_environment_wins(tmp_path, monkeypatch):
    from degsr.config import load_config
    from degsr.training.tracking import make_logger

    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = load_config([], ["logger.mode=offline", f"run.dir={tmp_path}"])
    make_logger(cfg, tmp_path / "degsr")
    assert os.environ["WANDB_MODE"] == "disabled"


# ------------------------------------------------------------------------ fit's helpers
def test_a_run_directory_that_cannot_be_made_is_one_line_naming_run_dir(tmp_path, monkeypatch):
    """run.dir (or the run directory) a file: 'File exists: ...' / 'Not a directory: ...', an
    OSError that named neither key."""
    import degsr.training.fit as fitmod
    from degsr.config import load_config

    monkeypatch.setattr("degsr.data.module.SRDataModule.check_sources", lambda self: None)
    (tmp_path / "f").write_text("")
    for run_dir, name in ((tmp_path, "f"), (tmp_path / "f", "r")):
        cfg = load_config([], [f"run.dir={run_dir}", f"run.name={name}", "trainer.accelerator=cpu"])
        with pytest.raises(UserError, match=r"^run\.dir/run\.name: .* is a file, not a folder"):
            fitmod.fit(cfg)
    assert (tmp_path / "f").read_text() == ""


def test_a_save_that_was_cut_off_is_removed_by_the_next_fit_of_the_run(tmp_path, monkeypatch):
    """A job killed mid-save left ``.last.ckpt.<pid>.tmp`` (a whole checkpoint's size) in the run
    for good: the next fit, holding the run's lock, removes it."""
    import degsr.training.fit as fitmod
    from degsr.config import load_config

    for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    ckpts = tmp_path / "r" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / ".last.ckpt.4242.tmp").write_bytes(b"PK\x03\x04 cut off")
    (ckpts / "notes.tmp").write_text("not a save: left alone")
    cfg = load_config([], [f"run.dir={tmp_path}", "run.name=r", "trainer.accelerator=cpu",
                           "logger.wandb=false"])
    monkeypatch.setattr("degsr.data.module.SRDataModule.check_sources", lambda self: None)
    monkeypatch.setattr(fitmod, "_fit", lambda *a: {"stopped": True})  # no training
    assert fitmod.fit(cfg) == {"stopped": True}
    assert sorted(p.name for p in ckpts.iterdir()) == ["notes.tmp"]


def test_a_second_fit_of_a_run_being_trained_is_refused_and_writes_nothing(tmp_path, monkeypatch):
    """Two `degsr fit` of one run at once (the same job submitted twice) both trained, writing
    the same checkpoints, export, events and W&B run. The second is now one line; the lock is
    rank 0's only (a launcher's ranks 1.. run the same fit) and leaves no file behind."""
    import fcntl

    import degsr.training.fit as fitmod
    from degsr.config import load_config

    for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr("degsr.data.module.SRDataModule.check_sources", lambda self: None)
    cfg = load_config([], [f"run.dir={tmp_path}", "run.name=r", "trainer.accelerator=cpu"])
    root = tmp_path / "r"
    root.mkdir()
    with open(root / ".fit.lock", "w") as held:  # what the first fit holds
        held.write("pid 12345 on node7\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match=r"run .*r is being trained by another degsr fit "
                                            r"\(pid 12345 on node7\)"):
            fitmod.fit(cfg)
        assert sorted(p.name for p in root.iterdir()) == [".fit.lock"]
    from degsr.training.runlock import RunLock

    monkeypatch.setenv("LOCAL_RANK", "1")  # a rank the launcher started: takes no lock
    with RunLock(root) as a, RunLock(root) as b:
        assert a.file is None and b.file is None
    monkeypatch.delenv("LOCAL_RANK")
    with RunLock(root) as lock:
        assert lock.file is not None and f"pid {os.getpid()}" in (root / ".fit.lock").read_text()
        with pytest.raises(UserError, match="being trained by another degsr fit"):
            RunLock(root).__enter__()
    assert not (root / ".fit.lock").exists()
    with RunLock(root):  # given back: the next fit takes it
        pass


def test_a_requeued_job_waits_for_the_lock_and_another_users_lock_file_is_used(tmp_path,
                                                                                 monkeypatch):
    """A requeued job (SLURM_RESTART_COUNT > 0) waits for a lock that a crashed node's lease
    still holds on NFS, instead of ending the job for good; a lock file another user left in a
    shared run directory (not writable to us) is locked through a read-only handle."""
    import builtins
    import fcntl
    import threading

    from degsr.training import runlock

    for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(runlock.RunLock, "POLL", 0.05)
    held = open(tmp_path / ".fit.lock", "w")
    fcntl.flock(held, fcntl.LOCK_EX)
    threading.Timer(0.5, held.close).start()  # the old lease ends
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with runlock.RunLock(tmp_path) as lock:
        assert lock.file is not None
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # a first start does not wait
    with open(tmp_path / ".fit.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UserError, match="being trained by another degsr fit"):
            runlock.RunLock(tmp_path).__enter__()

    (tmp_path / ".fit.lock").write_text("pid 1 on elsewhere\n")
    real = builtins.open

    def no_write(path, mode="r", *a, **kw):  # (we run as root: a real chmod does not refuse)
        if "a" in mode or "w" in mode:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, mode, *a, **kw)

    monkeypatch.setattr(runlock, "open", no_write, raising=False)
    with runlock.RunLock(tmp_path) as lock:
        assert lock.file is not None and lock.file.mode == "r"
        with pytest.raises(UserError, match=r"\(pid 1 on elsewhere\)"):
            runlock.RunLock(tmp_path).__enter__()  # still exclusive through the read-only handle


def test_check_same_stage(tmp_path):
    import degsr.training.fit as fitmod
    from degsr.config import load_config, save_config

    check = getattr(fitmod, "_check_same_run", None) or (  # (renamed as it grew more rules)
        lambda root, cfg: fitmod._check_same_stage(root, cfg.stage))
    est = load_config([], [f"run.dir={tmp_path}"])
    check(tmp_path, est)  # no config.yaml: the checkpoint decides
    save_config(est, tmp_path)
    check(tmp_path, est)
    sr = load_config([], ["stage=sr", "sr.lpips_weight=0", f"run.dir={tmp_path}"])
    with pytest.raises(UserError, match="holds a stage-'estimator' run; this is stage 'sr'"):
        check(tmp_path, sr)


def test_a_resume_that_moves_a_cosine_schedules_end_says_the_rate_jumps(tmp_path, caplog):
    """The cosine decays to 0 at trainer.max_steps, which a resume may change: the rest of the
    run then follows the new cosine (an ended run's rate back from 0 to half of lr), unsaid."""
    import degsr.training.fit as fitmod
    from degsr.config import load_config, save_config

    base = [f"run.dir={tmp_path}", "estimator.lr_schedule=cosine"]
    save_config(load_config([], [*base, "trainer.max_steps=100"]), tmp_path)
    for steps, schedule, said in ((100, "cosine", False), (200, "cosine", True),
                                  (200, "constant", False)):
        caplog.clear()
        cfg = load_config([], [*base, f"trainer.max_steps={steps}",
                               f"estimator.lr_schedule={schedule}"])
        with caplog.at_level("WARNING", logger="degsr"):
            try:
                fitmod._check_same_run(tmp_path, cfg)
            except UserError:  # another schedule: refused, as any other training key
                assert schedule == "constant"
        assert ("trainer.max_steps 100 -> 200 with estimator.lr_schedule=cosine: the learning "
                "rate jumps" in caplog.text) == said, (steps, schedule)


def test_final_metrics_keeps_scalars_rounded():
    from degsr.training.runlog import final_metrics

    t = SimpleNamespace(callback_metrics={"a": torch.tensor(1.23456789), "v": torch.tensor([1.0, 2.0]),
                                          "n": 3, "f": 0.1234567, "s": "text"})
    assert final_metrics(t) == {"a": 1.234568, "n": 3.0, "f": 0.123457}


def test_append_event_appends_and_syncs(tmp_path, monkeypatch):
    import degsr.training.fit as fitmod

    synced = []
    real = os.fsync
    monkeypatch.setattr(fitmod.os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    fitmod.append_event(tmp_path, "start", step=0)
    fitmod.append_event(tmp_path, "end", step=5, status="finished")
    lines = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(e["event"], e["step"]) for e in lines] == [("start", 0), ("end", 5)]
    assert lines[1]["status"] == "finished" and len(synced) == 2


def test_seed_each_batch_draws_from_the_runs_batch_count_not_the_epochs(monkeypatch):
    """After a resume (or in a later epoch) batch_idx restarts; the draws must follow the run's
    batch count, so that a resumed run draws what an uninterrupted one did."""
    import random

    import numpy as np

    from degsr.seeding import derive_seed
    from degsr.training.fit import SeedEachBatch

    t = SimpleNamespace(global_rank=1, fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(
        total_batch_idx=17)))
    SeedEachBatch(5).on_train_batch_start(t, None, None, 2)
    got = (torch.rand(3), np.random.rand(), random.random())
    s = derive_seed(5, 5001, 17)
    assert torch.equal(got[0], torch.rand(3, generator=torch.Generator().manual_seed(s)))
    assert got[1] == np.random.RandomState(s % 2**32).rand()
    assert got[2] == random.Random(s).random()


def test_runlog_writes_final_json_and_exports_only_a_finished_run(tmp_path):
    from degsr.config import load_config
    from degsr.training.runlog import RunLog

    cfg = load_config([], [f"run.dir={tmp_path}", "trainer.max_steps=9"])
    exported = []
    module = SimpleNamespace(export=exported.append)
    trainer = SimpleNamespace(is_global_zero=True, global_step=9, logger=None,
                              callback_metrics={"val/mse": torch.tensor(0.5)})
    for preempted in (False, True):
        log = RunLog(tmp_path, cfg, None, SimpleNamespace(preempted=preempted))
        log.on_train_end(trainer, module)
        final = json.loads((tmp_path / "final.json").read_text())
        assert final["status"] == ("preempted" if preempted else "finished")
        assert final["export"] == (None if preempted else str(tmp_path / "export"))
        assert (final["global_step"], final["max_steps"], final["metrics"]) == (9, 9, {"val/mse": 0.5})
    assert exported == [tmp_path / "export"]  # once: the preempted end exported nothing
    ends = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(e["event"], e["status"]) for e in ends] == [("end", "finished"), ("end", "preempted")]


def test_make_trainer_passes_time_limit_clipping_and_multi_node_strategy(tmp_path):
    from degsr.config import load_config
    from degsr.training.fit import make_trainer

    cfg = load_config([], ["trainer.accelerator=cpu", "trainer.max_minutes=1.5",
                           "trainer.gradient_clip_val=0.25", "logger.wandb=false"])
    trainer = make_trainer(cfg, tmp_path, False)
    assert trainer.gradient_clip_val == 0.25
    from lightning.pytorch.callbacks import Timer

    timers = [c for c in trainer.callbacks if isinstance(c, Timer)]  # one: degsr's StepTimer
    assert len(timers) == 1 and timers[0]._duration == 90.0
    cfg = load_config([], ["stage=sr", "trainer.accelerator=cpu", "trainer.num_nodes=2",
                           "sr.lpips_weight=0", "logger.wandb=false"])
    kwargs = getattr(make_trainer(cfg, tmp_path, False).strategy, "_ddp_kwargs", {})
    assert kwargs.get("find_unused_parameters") is True


def test_data_quality_is_logged_every_n_steps():
    from degsr.training.fit import DataQualityLog

    logged = []
    module = SimpleNamespace(log_dict=logged.append)
    dm = SimpleNamespace(data_quality=lambda: {"read": 10, "corrupt": 1})
    cb = DataQualityLog(every=5)
    for step in range(11):
        cb.on_train_batch_end(SimpleNamespace(datamodule=dm, global_step=step), module, None, None, 0)
    assert logged == [{"data/read": 10.0, "data/corrupt": 1.0}] * 3  # steps 0, 5, 10
    cb.on_train_batch_end(SimpleNamespace(datamodule=None, global_step=0), module, None, None, 0)
    assert len(logged) == 3


def test_only_sigusr1_marks_a_wandb_run_preempting(tmp_path, monkeypatch):
    """A sweep re-queues a run marked preempting. SIGUSR1 (the time-limit warning) must mark
    it; SIGTERM must not: a sweep agent stops the runs its early termination drops with
    SIGTERM, and marked, they came back to be resumed."""
    from degsr.training import runlog

    marked = []
    monkeypatch.setattr(runlog, "is_wandb", lambda logger: True)
    logger = SimpleNamespace(experiment=SimpleNamespace(mark_preempting=lambda: marked.append(1)))
    trainer = SimpleNamespace(is_global_zero=True, global_step=7, logger=logger)
    log = runlog.RunLog.__new__(runlog.RunLog)
    log.root = tmp_path
    log.preempted(trainer, False, "SIGTERM")
    assert marked == []
    log.preempted(trainer, True, "SIGUSR1")
    assert marked == [1]
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(e["event"], e["signal"], e["step"]) for e in events] == [
        ("preempt", "SIGTERM", 7), ("preempt", "SIGUSR1", 7)]


def test_find_resume_passes_over_a_foreign_file_to_the_runs_checkpoint(tmp_path):
    """A file without a global_step sorted first (as if the furthest): an old foreign .ckpt in
    checkpoints/ (a state dict put there once), passed over while the newest was taken by time,
    then stopped the resume of the run's own last.ckpt ('not a checkpoint degsr fit wrote')."""
    import torch

    from degsr.training.checkpoints import AtomicCheckpointIO, find_resume

    torch.save({"state_dict": {}}, tmp_path / "init.ckpt")
    os.utime(tmp_path / "init.ckpt", ns=(1, 1))
    AtomicCheckpointIO().save_checkpoint({"global_step": 5, "pytorch-lightning_version": "2"},
                                         tmp_path / "last.ckpt")
    assert find_resume(tmp_path) == tmp_path / "last.ckpt"
    (tmp_path / "last.ckpt").unlink()
    assert find_resume(tmp_path) == tmp_path / "init.ckpt"  # alone: fit names it (one line)


def test_find_resume_takes_last_ckpt_over_a_step_ckpt_of_the_same_step(tmp_path):
    """last.ckpt is saved after the periodic checkpoint of its step (at a signal during that
    step's validation: there, with the validation's progress); a copy without times could put
    step*.ckpt later, and the tie went to it."""
    from degsr.training.checkpoints import AtomicCheckpointIO, find_resume

    io = AtomicCheckpointIO()
    for i, name in enumerate(("last.ckpt", "step0000005.ckpt")):  # copied in this order
        io.save_checkpoint({"global_step": 5, "pytorch-lightning_version": "2"}, tmp_path / name)
        os.utime(tmp_path / name, ns=(10 + i, 10 + i))
    assert find_resume(tmp_path) == tmp_path / "last.ckpt"


def test_a_typo_in_a_data_path_is_one_line_and_makes_no_run_directory(tmp_path):
    """data.train_shards / validation folders are checked before the run directory is made:
    the run directory (config.yaml, events.jsonl, an offline W&B run) of a run that never
    started was left behind, and the corrected rerun resumed it."""
    import degsr.training.fit as fitmod
    from degsr.config import load_config
    from degsr.data.module import SRDataModule

    (tmp_path / "shards").mkdir()
    import tarfile

    with tarfile.open(tmp_path / "shards" / "s-000000.tar", "w"):
        pass
    good = f"data.train_shards={tmp_path}/shards/s-000000.tar"
    cases = [([f"data.train_shards={tmp_path}/shard/s-000000.tar"],
              r"^data\.train_shards: no shard files match .*/shard/s-000000\.tar"),
             ([f"data.train_shards={tmp_path}/shards/s-{{000000..000001}}.tar"],
              r"^data\.train_shards: .* 1 of 2 shard files do not exist: .*s-000001\.tar"),
             ([good, f"data.val_shards={tmp_path}/val-*.tar"], r"^data\.val_shards: no shard files"),
             ([good, f"data.val_folder={tmp_path}/vall"], r"^data\.val_folder .*vall: no such folder"),
             ([good, f"data.val_paired_lr={tmp_path}/shards", f"data.val_paired_hr={tmp_path}/h"],
              r"^data\.val_paired_hr .*/h: no such folder")]
    cfg = load_config([], [f"run.dir={tmp_path}/runs", "run.name=r", "trainer.accelerator=cpu", good,
                           f"data.val_shards={tmp_path}/shards/s-000000.tar",
                           f"data.val_folder={tmp_path}/unused"])  # val_shards win: not read
    SRDataModule(cfg.data, cfg.degradation).check_sources()
    for extra, message in cases:
        cfg = load_config([], [f"run.dir={tmp_path}/runs", "run.name=r", "trainer.accelerator=cpu",
                               *extra])
        with pytest.raises(UserError, match=message):
            fitmod.fit(cfg)
        assert not (tmp_path / "runs").exists(), extra
