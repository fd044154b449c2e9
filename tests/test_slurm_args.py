"""The Slurm templates' argument handling, run by bash with fake SLURM_* variables and a stand-in
srun/degsr (no cluster): what makes two array tasks share a run directory, suites found from
another directory, one-line errors before anything is started."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.test_slurm import ROOT, SLURM, stand_ins


def run(script: str, env: dict, *args: str, cwd: Path = ROOT, **slurm: str):
    job = {"SLURM_JOB_ID": "41", "SLURM_JOB_NAME": f"degsr-{script[:-3]}", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "n1", "SLURM_CPUS_PER_TASK": "4"}
    return subprocess.run(["bash", str(SLURM / script), *args], capture_output=True, text=True,
                          env={**env, **job, **slurm}, cwd=cwd, timeout=30)


def argv_of(r) -> list[str]:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def one_error(r, script: str) -> str:
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"{script}: error:"), r.stderr
    return r.stderr


# ---------------------------------------------------------------------------- ablations.sh
def test_ablations_sh_refuses_a_suite_listing_an_ablation_twice(tmp_path):
    """Task i and task j of the same name would get the same run.name, train in one run
    directory at once and resume each other's checkpoints."""
    env = stand_ins(tmp_path, "srun", "degsr")
    suite = tmp_path / "dup.txt"
    suite.write_text("no_gan\nbaseline  # the reference\n no_gan\r\n")
    for task in ("0", "1", "2"):
        r = run("ablations.sh", env, str(suite), "configs/sr_tiny.yaml",
                SLURM_ARRAY_JOB_ID="40", SLURM_ARRAY_TASK_ID=task)
        assert "no_gan" in one_error(r, "ablations.sh") and "twice" in r.stderr
    suite.write_text("# nothing yet\n\n")
    r = run("ablations.sh", env, str(suite), "configs/sr_tiny.yaml", SLURM_ARRAY_TASK_ID="0")
    assert "lists no ablations" in one_error(r, "ablations.sh")


# ---------------------------------------------------------------------------- train.sh
def test_train_sh_array_refuses_a_run_name_shared_by_its_tasks(tmp_path):
    """In an array every task gets the same arguments and environment: a fixed name (run.name=,
    +run.name=, DEGSR_RUN_NAME) would be one run directory for all of them at once."""
    env = stand_ins(tmp_path, "srun", "degsr")
    array = {"SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "3"}
    for args, extra in [(["run.name=mine"], {}), (["+run.name=mine"], {}),
                        ([], {"DEGSR_RUN_NAME": "est-v1"})]:
        r = run("train.sh", {**env, **extra}, "configs/estimator_tiny.yaml", *args, **array)
        assert "SLURM_ARRAY_TASK_ID" in one_error(r, "train.sh"), (args, extra)
    # a name with the task id in it (resolved by degsr fit per task), or the job's own name
    task = "run.name=mine-${oc.env:SLURM_ARRAY_TASK_ID}"
    assert task in argv_of(run("train.sh", env, "configs/estimator_tiny.yaml", task, **array))
    argv = argv_of(run("train.sh", {**env, "DEGSR_RUN_NAME": "degsr-train-40_${oc.env:"
                                    "SLURM_ARRAY_TASK_ID}"}, "configs/estimator_tiny.yaml", **array))
    assert "run.name=degsr-train-40_${oc.env:SLURM_ARRAY_TASK_ID}" in argv
    assert "run.name=degsr-train-40_3" in argv_of(run("train.sh", env, "configs/estimator_tiny.yaml",
                                                      **array))
    # not an array: a fixed name is the way to continue an earlier run
    assert "run.name=mine" in argv_of(run("train.sh", env, "configs/estimator_tiny.yaml",
                                          "run.name=mine"))


def test_ablations_sh_submitted_from_another_folder_finds_the_files_next_to_its_suite(tmp_path):
    """`cd /scratch && sbatch /repo/slurm/ablations.sh /repo/experiments/ablations/sr.txt ...`:
    the ablation files are those next to the suite (their include: paths are relative to them)."""
    env = stand_ins(tmp_path, "srun", "degsr")
    work = tmp_path / "scratch"
    work.mkdir()
    argv = argv_of(run("ablations.sh", env, str(ROOT / "experiments/ablations/sr.txt"),
                       str(ROOT / "configs/sr.yaml"), cwd=work, SLURM_ARRAY_JOB_ID="40",
                       SLURM_ARRAY_TASK_ID="3"))
    assert argv[-2:] == [str(ROOT / "experiments/ablations/no_gan.yaml"), "run.name=ablation-sr-no_gan-40"]
    # a suite of one's own elsewhere may list the shipped files (from the repository root)
    (tmp_path / "mine.txt").write_text("no_gan\n")
    argv = argv_of(run("ablations.sh", env, str(tmp_path / "mine.txt"), "configs/sr_tiny.yaml",
                       SLURM_ARRAY_TASK_ID="0"))
    assert argv[-2:] == ["experiments/ablations/no_gan.yaml", "run.name=ablation-mine-no_gan-41"]
    r = run("ablations.sh", env, str(tmp_path / "mine.txt"), "configs/sr.yaml", cwd=work,
            SLURM_ARRAY_TASK_ID="0")
    assert "no_gan.yaml" in one_error(r, "ablations.sh")


def test_ablations_sh_without_degsr_on_the_path_is_one_error_line(tmp_path):
    """As train.sh: said once by the batch shell, not by every task srun starts (execve failed)."""
    env = stand_ins(tmp_path, "srun")
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep)
                                  if not (Path(p) / "degsr").exists())
    r = run("ablations.sh", env, "experiments/ablations/sr.txt", "configs/sr.yaml",
            SLURM_ARRAY_TASK_ID="0")
    assert "degsr is not on the PATH" in one_error(r, "ablations.sh")


def test_a_master_addr_of_the_submitting_shell_does_not_reach_the_tasks(tmp_path):
    """sbatch passes on the submitting shell's environment: a MASTER_ADDR left there (by torchrun,
    or `export`ed for an earlier job) would be where Lightning's SLURMEnvironment rendezvouses,
    instead of the job's first node. DEGSR_MASTER_ADDR/PORT set them on purpose."""
    env = stand_ins(tmp_path, "degsr")
    srun = tmp_path / "bin/srun"  # prints what the tasks would see
    srun.write_text("#!/bin/sh\necho \"[\\\"${MASTER_ADDR-unset}\\\", \\\"${MASTER_PORT-unset}\\\"]\"\n")
    srun.chmod(0o755)
    leaked = {**env, "MASTER_ADDR": "login-node.invalid", "MASTER_PORT": "29500"}
    for script, args in (("train.sh", ["configs/estimator_tiny.yaml"]),
                         ("ablations.sh", ["experiments/ablations/sr.txt", "configs/sr.yaml"])):
        r = run(script, leaked, *args, SLURM_ARRAY_TASK_ID="0")
        assert argv_of(r) == ["unset", "unset"], r.stdout
        assert f"{script}: ignoring MASTER_ADDR=login-node.invalid from the submitting shell" in r.stdout
        r = run(script, {**leaked, "DEGSR_MASTER_ADDR": "10.0.0.7", "DEGSR_MASTER_PORT": "12345"},
                *args, SLURM_ARRAY_TASK_ID="0")
        assert argv_of(r) == ["10.0.0.7", "12345"] and "ignoring" not in r.stdout
