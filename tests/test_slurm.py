"""The Slurm templates in slurm/: parsed, their argument handling with a stand-in srun/degsr, and
real jobs on the single-node cluster of .ci/slurm/up.sh (2-rank DDP on CPU, the allocation check,
SIGUSR1 -> checkpoint -> requeue -> resume)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "slurm"
UP, DOWN = ROOT / ".ci/slurm/up.sh", ROOT / ".ci/slurm/down.sh"
TINY = "configs/estimator_tiny.yaml"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE", "PREEMPTED"}
TEMPLATES = sorted(p.name for p in SLURM.glob("*.sh"))
# every template declares these #SBATCH options; one that trains also --signal and --requeue
REQUIRED = ["job-name", "nodes", "ntasks-per-node", "gres", "cpus-per-task", "time", "output",
            "error"]


def sbatch_options(path: Path) -> dict[str, str | None]:
    """The ``#SBATCH --key[=value]`` lines of the header (sbatch stops at the first command)."""
    opts = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            break
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?\s*$", line)
        if line.startswith("#SBATCH"):
            assert m, f"{path.name}: unparsed line {line!r}"
            opts[m.group(1)] = m.group(2)
    return opts


def test_the_templates_are_there():
    assert {"train.sh", "sweep.sh", "eval.sh"} <= set(TEMPLATES)


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_parses_and_declares_its_resources(name):
    path = SLURM / name
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    opts = sbatch_options(path)
    trains = re.search(r"degsr fit|wandb agent", path.read_text())
    missing = [k for k in REQUIRED + ["signal", "requeue"] * bool(trains) if k not in opts]
    assert not missing, f"{name}: no #SBATCH --{', --'.join(missing)}"
    assert "%j" in opts["output"] or "%A" in opts["output"]
    assert "%x" in opts["output"] and "%x" in opts["error"] and opts["output"] != opts["error"]
    assert re.fullmatch(r"gpu:\d+", opts["gres"])
    assert int(opts["gres"].split(":")[1]) == int(opts["ntasks-per-node"])  # one task per GPU
    assert "set -euo pipefail" in path.read_text()
    if "signal" in opts:
        assert re.fullmatch(r"(B:)?SIGUSR1@90", opts["signal"])


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_without_arguments_says_how_to_use_it(name):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "SWEEP_ID"}
    r = subprocess.run(["bash", str(SLURM / name)], capture_output=True, text=True, env=env,
                       timeout=30)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"{name}: error:"), r.stderr
    assert "usage: sbatch" in r.stderr


def stand_ins(tmp_path: Path, *names: str) -> dict[str, str]:
    """Executables that print their name and argv (one JSON line) instead of running."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in names:
        exe = bin_dir / name
        exe.write_text(f"#!{sys.executable}\nimport json, sys\n"
                       f"print(json.dumps([{name!r}, *sys.argv[1:]]))\n")
        exe.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DEGSR_"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


def run_train_sh(env: dict, *args: str, **slurm: str) -> list[str]:
    job = {"SLURM_JOB_ID": "41", "SLURM_JOB_NAME": "degsr-train", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_NTASKS_PER_NODE": "4", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_CPUS_PER_TASK": "8"}
    r = subprocess.run(["bash", str(SLURM / "train.sh"), *args], capture_output=True, text=True,
                       env={**env, **job, **slurm}, timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_train_sh_passes_the_allocation_first_and_names_the_run_after_the_job(tmp_path):
    env = stand_ins(tmp_path, "srun", "degsr")
    argv = run_train_sh(env, TINY, "data.batch_size=2")
    assert argv == ["srun", "--kill-on-bad-exit=1", "--cpus-per-task=8", "degsr", "fit",
                    "trainer.num_nodes=2", "trainer.devices=4", "run.name=degsr-train-41", TINY,
                    "data.batch_size=2"]
    # a user override comes later (so it wins, and degsr fit reports the mismatch)
    argv = run_train_sh(env, TINY, "trainer.devices=3")
    assert argv.index("trainer.devices=4") < argv.index("trainer.devices=3")
    # arrays: <array job id>_<task id>; the user's run.name and DEGSR_RUN_NAME win
    argv = run_train_sh(env, TINY, SLURM_ARRAY_JOB_ID="40", SLURM_ARRAY_TASK_ID="3")
    assert "run.name=degsr-train-40_3" in argv
    argv = run_train_sh(env, TINY, "run.name=mine")
    assert [a for a in argv if a.startswith("run.name=")] == ["run.name=mine"]
    argv = run_train_sh({**env, "DEGSR_RUN_NAME": "est-v1"}, TINY)
    assert "run.name=est-v1" in argv


def test_eval_sh_runs_sr_then_eval_with_their_own_options(tmp_path):
    env = stand_ins(tmp_path, "degsr")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter/adapter.json").write_text("{}")
    (tmp_path / "base").mkdir()
    (tmp_path / "gt").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run(["bash", str(SLURM / "eval.sh"), str(tmp_path / "adapter"),
                        str(tmp_path / "base"), "lr/*.png", str(tmp_path / "gt"), str(out),
                        "--guidance", "1.5", "--", "--crop-border", "4"],
                       capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 0, r.stderr
    sr = json.loads(r.stdout.splitlines()[1])
    assert sr == ["degsr", "sr", "--adapter", str(tmp_path / "adapter"), "--pretrained",
                  str(tmp_path / "base"), "lr/*.png", "--out", str(out), "--guidance", "1.5"]
    assert json.loads((out / "summary.json").read_text()) == [
        "degsr", "eval", "--pred", str(out), "--gt", str(tmp_path / "gt"), "--json",
        "--allow-missing", "--crop-border", "4"]
    r = subprocess.run(["bash", str(SLURM / "eval.sh"), str(tmp_path / "base"), *["x"] * 4],
                       capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 2 and "has no adapter.json" in r.stderr
    # degsr sr with some bad inputs (exit 1): the rest are still scored, the job reports 1;
    # with bad options (exit 2) nothing is scored
    degsr = Path(env["PATH"].split(os.pathsep)[0]) / "degsr"
    degsr.write_text(degsr.read_text() + "import os\nsys.exit(int(os.environ['SR_EXIT']) "
                                         "if sys.argv[1] == 'sr' else 0)\n")
    args = ["bash", str(SLURM / "eval.sh"), str(tmp_path / "adapter"), str(tmp_path / "base"),
            "lr", str(tmp_path / "gt"), str(out)]
    (out / "summary.json").unlink()
    r = subprocess.run(args, capture_output=True, text=True, env={**env, "SR_EXIT": "1"}, timeout=30)
    assert r.returncode == 1 and json.loads((out / "summary.json").read_text())[1] == "eval"
    (out / "summary.json").unlink()
    r = subprocess.run(args, capture_output=True, text=True, env={**env, "SR_EXIT": "2"}, timeout=30)
    assert r.returncode == 2 and not (out / "summary.json").exists()
    # degsr eval failing before it prints (bad --gt contents: exit 2, its line on stderr): no
    # summary, and no empty summary.json.tmp left in the output folder
    degsr.write_text(f"#!{sys.executable}\nimport sys\nsys.exit(2 if sys.argv[1] == 'eval' else 0)\n")
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 2 and sorted(p.name for p in out.iterdir()) == []


# --- the real cluster -------------------------------------------------------------------------

@pytest.fixture(scope="session")
def slurm_env():
    """The environment a job is submitted with: SLURM_CONF of the running cluster (.ci/slurm/up.sh
    starts it when it is not up, and then this fixture stops it again at the end)."""
    r = subprocess.run(["bash", str(UP)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f".ci/slurm/up.sh failed:\n{r.stdout}\n{r.stderr}"
    conf = re.search(r"export SLURM_CONF=(\S+)", r.stdout).group(1)
    # nothing of this test process's own distributed/Lightning/W&B state leaks into the jobs
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "DEGSR_", "WANDB_", "PL_", "TORCHELASTIC_")) and k not in
           ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK",
            "LOCAL_WORLD_SIZE", "GROUP_RANK")}
    env.update(SLURM_CONF=conf, WANDB_MODE="offline", WANDB_SILENT="true")
    if sys.prefix != sys.base_prefix:
        env["DEGSR_VENV"] = sys.prefix  # the template activates it (and the test runs through it)
    yield env
    if "already running" not in r.stdout:
        subprocess.run(["bash", str(DOWN)], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    import degsr.cli
    from degsr.data.photos import write_photos

    root = tmp_path_factory.mktemp("slurm-data")
    write_photos(root / "train", ("astronaut", "rocket", "coins"))
    write_photos(root / "val", ("chelsea",))
    assert degsr.cli.main(["shards", str(root / "train"), "--out", str(root / "shards"),
                           "--min-side", "64", "--min-bytes", "0"]) == 0
    return {"train": root / "shards", "val": root / "val"}


class Job:
    """A submitted job: its id, log files and ``scontrol show job`` fields."""

    def __init__(self, env: dict, logs: Path, name: str, script: str, *args: str,
                 sbatch: tuple[str, ...] = ()):
        self.env, self.name = env, name
        self.out, self.err = logs / f"{name}.out", logs / f"{name}.err"
        cmd = ["sbatch", "--parsable", f"--job-name={name}", f"--output={self.out}",
               f"--error={self.err}", *sbatch, script, *args]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"{shlex.join(cmd)}\n{r.stderr}"
        self.id = r.stdout.strip().split(";")[0]

    def info(self) -> dict[str, str]:
        r = subprocess.run(["scontrol", "show", "job", "-o", self.id], env=self.env,
                           capture_output=True, text=True, timeout=30)
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout))

    def logs(self, tail: int = 4000) -> str:
        text = ""
        for path in (self.out, self.err):
            body = path.read_text(errors="replace") if path.exists() else "(none)"
            text += f"--- {path}\n{body[-tail:]}\n"
        return text

    def fail(self, why: str):
        subprocess.run(["scancel", self.id], env=self.env, capture_output=True, timeout=30)
        pytest.fail(f"job {self.id} ({self.name}): {why}; scontrol: {self.info()}\n{self.logs()}")

    def wait(self, timeout: float) -> dict[str, str]:
        """Polls until the job reached a final state (a requeued job goes on); its fields."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            info = self.info()
            if info.get("JobState") in FINAL:
                return info
            time.sleep(0.5)
        self.fail(f"not finished after {timeout:.0f} s")

    def wait_for(self, what: str, ready, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if ready():
                return
            if self.info().get("JobState") in FINAL:
                self.fail(f"ended before {what}")
            time.sleep(0.5)
        self.fail(f"no {what} after {timeout:.0f} s")


def train_job(slurm_env, shards, tmp_path, name: str, *overrides: str) -> tuple[Job, Path]:
    """slurm/train.sh with 2 DDP ranks on CPU, on a tiny estimator run; (job, its run dir)."""
    args = [TINY, "trainer.accelerator=cpu", "trainer.strategy=ddp",
            f"data.train_shards={shards['train']}", f"data.val_folder={shards['val']}",
            f"run.dir={tmp_path / 'runs'}", "data.crop_size=64", "data.batch_size=4",
            "data.num_workers=0", "data.val_crops=8", "data.val_batch_size=8",
            "data.batches_per_epoch=3", "trainer.val_every_n_steps=3",
            "trainer.checkpoint_every_n_steps=3", *overrides]
    job = Job(slurm_env, tmp_path, name, "slurm/train.sh", *args,
              sbatch=("--gres=none", "--cpus-per-task=1", "--nodes=1", "--ntasks-per-node=2"))
    return job, tmp_path / "runs" / f"{name}-{job.id}"


def events(run: Path) -> list[dict]:
    """The complete lines of the run's events.jsonl (rank 0 may be writing the last one)."""
    path = run / "events.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [json.loads(line) for line in lines]


def test_cluster_runs_a_two_task_job(slurm_env, tmp_path):
    job = Job(slurm_env, tmp_path, "degsr-test-hostname", "--wrap",
              'srun bash -c \'echo "task $SLURM_PROCID of $SLURM_NTASKS"\'',
              sbatch=("--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"))
    info = job.wait(60)
    assert info["JobState"] == "COMPLETED", job.logs()
    assert sorted(job.out.read_text().split("\n")[:2]) == ["task 0 of 2", "task 1 of 2"]


@pytest.fixture(scope="module")
def mismatch_job(slurm_env, shards, tmp_path_factory) -> tuple[Job, Path]:
    """The user's trainer.devices=3 on a 2-task allocation. It only starts and exits: submitted
    with the first training job, it runs beside it (the node oversubscribes), saving its time."""
    return train_job(slurm_env, shards, tmp_path_factory.mktemp("mismatch"), "degsr-test-mismatch",
                     "trainer.max_steps=6", "trainer.devices=3")


@pytest.mark.usefixtures("mismatch_job")  # submitted first, runs beside this job
def test_train_sh_trains_two_ddp_ranks_and_exports(slurm_env, shards, tmp_path):
    job, run = train_job(slurm_env, shards, tmp_path, "degsr-test-train", "trainer.max_steps=6")
    info = job.wait(150)
    if info["JobState"] != "COMPLETED":
        job.fail(f"ended {info['JobState']} (exit {info.get('ExitCode')})")
    out = job.out.read_text()
    assert f"run.name=degsr-test-train-{job.id}" in out
    summaries = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(summaries) == 1, f"expected one summary (rank 0)\n{job.logs()}"
    assert summaries[0]["run_dir"] == str(run) and summaries[0]["global_step"] == 6
    starts = [e for e in events(run) if e["event"] == "start"]
    assert [s["world_size"] for s in starts] == [2], job.logs()  # 2 DDP ranks ran
    assert (run / "checkpoints/last.ckpt").is_file()
    assert any((run / "export").iterdir())
    final = json.loads((run / "final.json").read_text())
    assert final["global_step"] == 6 and final["status"] == "finished", final
    assert "Traceback" not in job.logs(tail=10**6), job.logs()


def test_train_sh_reports_a_devices_mismatch_in_one_line(mismatch_job):
    job, run = mismatch_job
    info = job.wait(90)
    # exit 2 from the first rank; srun --kill-on-bad-exit then ends the other (job exit 2 or 143)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", (info, job.logs())
    errors = [line for line in job.err.read_text().splitlines() if line.startswith("error:")]
    assert errors and all("trainer.devices" in line for line in errors), job.logs()
    assert "Traceback" not in job.logs(tail=10**6), job.logs()
    assert not (run / "checkpoints").exists()


def test_train_sh_preempted_by_sigusr1_requeues_and_resumes(slurm_env, shards, tmp_path):
    # long enough that the signal lands mid-run however fast the steps are (echo 1: every step
    # degrades its own batch; the tiny config's echo 8 finished 12 steps in 2 s)
    steps = 60
    job, run = train_job(slurm_env, shards, tmp_path, "degsr-test-preempt", "logger.wandb=false",
                         f"trainer.max_steps={steps}", "data.echo=1")
    job.wait_for("a step checkpoint",
                 lambda: events(run) and any((run / "checkpoints").glob("step*.ckpt")), 120)
    # what `#SBATCH --signal=SIGUSR1@90` does before the time limit: SIGUSR1 to every task
    sent = time.monotonic()
    r = subprocess.run(["scancel", "--signal=USR1", job.id], env=slurm_env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    job.wait_for("restart", lambda: job.info().get("Restarts") == "1", 60)
    requeued = time.monotonic() - sent
    info = job.wait(150)
    if info["JobState"] != "COMPLETED":
        job.fail(f"ended {info['JobState']} (exit {info.get('ExitCode')})")
    restarts = re.findall(r"train\.sh: job \d+ restart (\d+)", job.out.read_text())
    assert restarts == ["0", "1"], job.logs()
    ev = events(run)
    starts = [e for e in ev if e["event"] == "start"]
    preempts = [e for e in ev if e["event"] == "preempt"]
    ends = [e for e in ev if e["event"] == "end"]
    context = f"requeued {requeued:.1f} s after the signal; events:\n{json.dumps(ev, indent=1)}"
    assert [e["event"] for e in ev] == ["start", "preempt", "end", "requeue", "start", "end"], context
    assert [e["status"] for e in ends] == ["preempted", "finished"], context
    assert starts[0]["step"] == 0 and starts[0]["resumed_from"] is None, context
    k = preempts[0]["step"]
    assert 3 <= k < steps and preempts[0]["requeue"] is True and ev[3]["ok"] is True, context
    assert starts[1]["step"] == k and starts[1]["resumed_from"], context  # resumed, not restarted
    assert ends[1]["step"] == steps, context
    final = json.loads((run / "final.json").read_text())
    assert final["global_step"] == steps and final["status"] == "finished", final


def test_sweep_sh_passes_sigusr1_to_the_run_not_the_agent(slurm_env, tmp_path):
    """A stand-in `wandb agent` whose run (its child) waits for SIGUSR1: the batch shell gets the
    signal (B:SIGUSR1) and forwards it to the run only; the agent lives on and ends the job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    run_py = ("import signal, sys, time\n"
              "signal.signal(signal.SIGUSR1, lambda *a: (print('run: got SIGUSR1', flush=True), "
              "sys.exit(0)))\n"
              "print('run: started', flush=True)\n"
              "time.sleep(60); sys.exit(3)\n")
    (bin_dir / "wandb").write_text(
        f"#!{sys.executable}\nimport subprocess, sys\n"
        f"print('agent:', *sys.argv[1:], flush=True)\n"
        f"rc = subprocess.call([sys.executable, '-c', {run_py!r}])\n"
        f"print('agent: run exited', rc, flush=True)\nsys.exit(rc)\n")
    (bin_dir / "wandb").chmod(0o755)
    (bin_dir / "degsr").write_text("#!/bin/sh\nexit 1\n")  # sweep.sh wants it on the PATH
    (bin_dir / "degsr").chmod(0o755)
    env = {k: v for k, v in slurm_env.items() if k not in ("WANDB_MODE", "DEGSR_VENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    job = Job(env, tmp_path, "degsr-test-sweep", "slurm/sweep.sh", "me/degsr/abc123",
              sbatch=("--gres=none", "--cpus-per-task=1"))
    job.wait_for("run start", lambda: "run: started" in job.out.read_text()
                 if job.out.exists() else False, 60)
    r = subprocess.run(["scancel", "--batch", "--signal=USR1", job.id], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    info = job.wait(60)
    assert info["JobState"] == "COMPLETED", job.logs()
    out = job.out.read_text()
    assert "agent: agent --count 1 me/degsr/abc123" in out
    assert "run: got SIGUSR1" in out and "agent: run exited 0" in out, job.logs()
