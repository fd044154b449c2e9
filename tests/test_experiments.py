"""experiments/: ablation override files, W&B sweep specs, slurm/ablations.sh, `degsr collect`.

Expected values are written out here (not read back from the code under test): what each
ablation sets, which metrics each stage logs, the fake runs' configs and final metrics.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from degsr.cli import build_parser
from degsr.cli.config_cmd import split_items
from degsr.config import load_config, save_config
from degsr.errors import ConfigError, UserError
from degsr.experiments import collect
from degsr.training.fit import run_dir

ROOT = Path(__file__).resolve().parents[1]
ABL = ROOT / "experiments" / "ablations"
SWEEPS = sorted((ROOT / "experiments" / "sweeps").glob("*.yaml"))
SR_BASES = ["configs/sr.yaml", "configs/sr_tiny.yaml"]
EST_BASES = ["configs/estimator.yaml", "configs/estimator_tiny.yaml"]
BOOKKEEPING = {"run.name", "logger.group", "logger.tags"}

# file stem -> (bases it applies to, {dotted key: value it must set})
ABLATIONS = {
    "baseline": (SR_BASES + EST_BASES, {}),
    "plain_lora": (SR_BASES, {"lora.modulated": False}),
    "no_negatives": (SR_BASES, {"sr.neg_prob": 0.0}),
    "no_gan": (SR_BASES, {"sr.gan_weight": 0.0}),
    "preset_realesrgan": (SR_BASES + EST_BASES, {"degradation.first.blur_sigma": [0.2, 3.0],
                                                 "degradation.second.blur_prob": 0.8,
                                                 "degradation.usm_sharpen": True}),
    "estimator_supervised": (EST_BASES, {"estimator.objective": "supervised"}),
    "estimator_ranking": (EST_BASES, {"estimator.objective": "ranking"}),
    "estimator_both": (EST_BASES, {"estimator.objective": "both"}),
}
# what each stage logs at validation (degsr/sr/module.py, degsr/estimator/module.py)
LOGGED = {"sr": {"val/psnr_y", "val/ssim_y", "val/lpips"},
          "estimator": {"val/mse", "val/spearman_blur", "val/spearman_noise", "val/spearman_mean",
                        "val/pearson_blur", "val/pearson_noise"}}
PATH_KEYS = {"model.pretrained", "sr.estimator", "sr.lpips_vgg", "disc.backbone"}


def required_overrides(files, tmp_path) -> list[str]:
    """key=<existing tmp path> for every key the files mark '???' (the user's local paths)."""
    try:
        load_config(files)
        return []
    except ConfigError as e:
        keys = [re.fullmatch(r"config error: missing required value '([\w.]+)' .*", p)
                for p in e.problems]
        assert all(keys), e.problems
        return [f"{m.group(1)}={tmp_path}" for m in keys]


def flat(cfg) -> dict:
    return dict(_walk(OmegaConf.to_container(cfg, resolve=True)))


def _walk(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


# ---------------------------------------------------------------------------------- ablations
def test_every_ablation_file_has_an_expectation_and_a_suite():
    files = {p.stem for p in ABL.glob("*.yaml")}
    assert files == set(ABLATIONS)
    listed = set()
    for suite in ("sr", "estimator"):
        names = [ln.split("#")[0].strip() for ln in (ABL / f"{suite}.txt").read_text().splitlines()]
        names = [n for n in names if n]
        assert len(names) == len(set(names)) and set(names) <= files, names
        bases = SR_BASES if suite == "sr" else EST_BASES
        assert all(bases[0] in ABLATIONS[n][0] for n in names), names
        listed |= set(names)
    assert listed | {"baseline"} == files


@pytest.fixture(scope="module")
def base_configs(tmp_path_factory):
    """base -> (overrides for its '???' paths, its resolved config, flattened); loaded once."""
    paths = tmp_path_factory.mktemp("paths")
    out = {}
    for base in SR_BASES + EST_BASES:
        req = required_overrides([ROOT / base], paths)
        out[base] = req, flat(load_config([ROOT / base], req))
    return out


@pytest.mark.parametrize("stem,base", [(s, b) for s, (bs, _) in ABLATIONS.items() for b in bs])
def test_ablation_validates_on_its_base_and_changes_what_it_claims(stem, base, base_configs):
    req, before = base_configs[base]
    after = flat(load_config([ROOT / base, ABL / f"{stem}.yaml"], req))
    claims = ABLATIONS[stem][1]
    for key, value in claims.items():
        assert after[key] == value, key
    if claims and stem != "estimator_supervised":  # that one spells out the base's default
        assert any(before[k] != v for k, v in claims.items())
    changed = {k for k in after if after[k] != before[k]}
    name = "ablation-" + stem.replace("_", "-")
    if stem in ("baseline", "preset_realesrgan"):  # files for both stages: one run dir each
        name += "-" + after["stage"]
    assert after["run.name"] == name
    assert after["logger.group"] == "ablation" and after["logger.tags"][0] == "ablation"
    if stem == "preset_realesrgan":
        preset = flat(load_config([ROOT / "configs/degradation/realesrgan.yaml"]))
        assert all(after[k] == preset[k] for k in after if k.startswith("degradation."))
        assert changed - BOOKKEEPING and all(k.startswith("degradation.")
                                             for k in changed - BOOKKEEPING)
    else:
        assert changed - BOOKKEEPING <= set(claims)


def test_ablation_run_names_are_distinct():
    names = [yaml.safe_load((ABL / f"{s}.yaml").read_text())["run"]["name"] for s in ABLATIONS]
    assert len(set(names)) == len(names)


def _fake_exe(folder: Path, name: str) -> Path:
    """An executable ``name`` that writes its argv (JSON) to $ARGV_OUT."""
    folder.mkdir(exist_ok=True)
    exe = folder / name
    exe.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                   "open(os.environ['ARGV_OUT'], 'w').write(json.dumps(sys.argv[1:]))\n")
    exe.chmod(0o755)
    return exe


def test_slurm_ablations_script_runs_each_line_of_a_suite(tmp_path):
    script = ROOT / "slurm" / "ablations.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "#SBATCH --signal=SIGUSR1@90" in script.read_text()
    _fake_exe(tmp_path / "bin", "srun")
    _fake_exe(tmp_path / "bin", "degsr")  # the script wants it on the PATH (srun runs it)
    out = tmp_path / "argv.json"
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "ARGV_OUT": str(out),
           "SLURM_JOB_ID": "78", "SLURM_ARRAY_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_NTASKS_PER_NODE": "2"}
    names = ["baseline", "plain_lora", "no_negatives", "no_gan", "preset_realesrgan"]
    cmd = ["bash", str(script), "experiments/ablations/sr.txt", "configs/sr_tiny.yaml",
           "data.train_shards=/x"]
    for i, stem in enumerate(names):
        r = subprocess.run(cmd, cwd=ROOT, env={**env, "SLURM_ARRAY_TASK_ID": str(i)},
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        argv = json.loads(out.read_text())
        assert argv[:2] == ["--kill-on-bad-exit=1", "--cpus-per-task=1"]
        argv = argv[2:]
        assert argv[:2] == ["degsr", "fit"]
        args = build_parser().parse_args(argv[1:])
        files, overrides = split_items(args.items)
        assert files == ["configs/sr_tiny.yaml", f"experiments/ablations/{stem}.yaml"]
        cfg = load_config([ROOT / f for f in files], overrides)
        assert cfg.run.name == f"ablation-sr-{stem}-77"
        assert (cfg.trainer.devices, cfg.trainer.num_nodes, cfg.data.train_shards) == (2, 1, "/x")
        for key, value in ABLATIONS[stem][1].items():
            assert OmegaConf.select(cfg, key) == value
    r = subprocess.run(cmd, cwd=ROOT, env={**env, "SLURM_ARRAY_TASK_ID": "5"},
                       capture_output=True, text=True)
    assert r.returncode == 2 and "lists 5 ablations" in r.stderr


# ---------------------------------------------------------------------------------- sweeps
def _candidates(spec: dict) -> list:
    """The values W&B can give a parameter: its list, its constant, or the ends and a middle
    point of its range (printed as W&B prints them: str(), e.g. '2.23606797749979e-05')."""
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    lo, hi = spec["min"], spec["max"]
    if isinstance(lo, int) and isinstance(hi, int):  # W&B infers int_uniform
        return [lo, (lo + hi) // 2, hi]
    mid = math.sqrt(lo * hi) if "log" in spec.get("distribution", "") else (lo + hi) / 2
    return [float(lo), mid, float(hi)]


def _expand(sweep: dict, params: dict, tmp_path: Path) -> list[str]:
    """The agent's command line for one run (wandb/wandb_agent.py: whole-chunk ${macros})."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    variables = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    variables.update(interpreter=["python"], program=[sweep["program"]], env=["/usr/bin/env"],
                     args_json_file=[str(tmp_path / "args.json")])
    out = []
    for chunk in map(str, sweep["command"]):
        out += variables[chunk[2:-1]] if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    return out


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_sweep_spec_expands_to_a_valid_degsr_fit(path, tmp_path, monkeypatch):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["program"] == "degsr" and sweep["method"] in ("grid", "random", "bayes")
    assert sweep["command"][:3] == ["${env}", "${program}", "fit"]
    assert sweep["command"][-1] == "${args_no_hyphens}"
    for p in PATH_KEYS:
        (tmp_path / p).mkdir()
    params = {k: (str(tmp_path / k) if k in PATH_KEYS else _candidates(v)[0])
              for k, v in sweep["parameters"].items()}
    assert sum(len(_candidates(v)) > 1 for v in sweep["parameters"].values()) >= 1

    _fake_exe(tmp_path / "bin", "degsr")
    argv_file = tmp_path / "argv.json"
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
           "ARGV_OUT": str(argv_file), "WANDB_SWEEP_ID": "swp1", "WANDB_RUN_ID": "run9"}
    r = subprocess.run(_expand(sweep, params, tmp_path), cwd=ROOT, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    argv = json.loads(argv_file.read_text())
    args = build_parser().parse_args(argv)
    assert args.command == "fit"
    files, overrides = split_items(args.items)
    cfg = load_config([ROOT / f for f in files], overrides)
    assert cfg.logger.mode == "online" and cfg.logger.group == cfg.run.name
    monkeypatch.setenv("WANDB_SWEEP_ID", "swp1")
    monkeypatch.setenv("WANDB_RUN_ID", "run9")
    assert run_dir(cfg).name == f"{cfg.run.name}-run9"  # one run directory per sweep run
    assert sweep["metric"]["name"] in LOGGED[cfg.stage]
    if sweep["metric"]["name"] == "val/lpips":
        assert cfg.sr.lpips_weight > 0  # otherwise stage 2 does not log it
    for key, value in params.items():
        assert OmegaConf.select(cfg, key) == value, key

    # every value each parameter can take validates (the others at their first value)
    for key, spec in sweep["parameters"].items():
        for value in _candidates(spec)[1:]:
            items = _expand(sweep, {**params, key: value}, tmp_path)
            over = [i for i in items if i.startswith(f"{key}=")]
            assert over == [f"{key}={value}"]
            got = OmegaConf.select(load_config([ROOT / f for f in files], overrides + over), key)
            assert got == pytest.approx(value) if isinstance(value, float) else got == value


# ---------------------------------------------------------------------------------- collector
def _run(parent: Path, name: str, overrides=(), final=None, base="configs/sr_tiny.yaml") -> Path:
    cfg = load_config([ROOT / base], [f"run.name={name}", *overrides])
    folder = save_config(cfg, parent / name).parent
    (folder / "checkpoints").mkdir()
    if final is not None:
        (folder / "final.json").write_text(json.dumps(final))
    return folder


def _final(name, step, metrics, status="finished"):
    return {"run_name": name, "stage": "sr", "global_step": step, "status": status,
            "metrics": metrics}


def _parse(table: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    lines = table.strip().splitlines()
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    header, rule, rows = cells[0], cells[1], cells[2:]
    assert all(set(c) == {"-"} for c in rule) and len(rule) == len(header)
    assert all(len(r) == len(header) for r in rows)
    return header, {r[0]: dict(zip(header, r)) for r in rows}


@pytest.fixture
def runs(tmp_path):
    parent = tmp_path / "runs"
    _run(parent / "group1", "run-a", ["sr.gan_weight=0.5"],
         _final("run-a", 200, {"val/psnr_y": 27.5, "val/lpips": 0.25, "train/loss": 1.5}))
    _run(parent / "group2", "run-b", ["sr.gan_weight=0.0"],
         _final("run-b", 180, {"val/psnr_y": 28.0, "val/lpips": 0.3125}, status="preempted"))
    c = _run(parent, "run-c", ["sr.gan_weight=0.5"])  # unfinished: no final.json
    w = c / "wandb" / "offline-run-20260101_000000-x" / "files"  # W&B's own config.yaml inside
    w.mkdir(parents=True)
    (w / "config.yaml").write_text("wandb_version: 1\nstage: {value: sr}\nrun: {value: 1}\n")
    return parent


def test_collect_table_rows_columns_and_values(runs):
    table, found = collect([runs])
    header, rows = _parse(table)
    assert len(found) == 3 and set(rows) == {"run-a", "run-b", "run-c"}
    assert header[:4] == ["name", "stage", "status", "step"]
    assert "sr.gan_weight" in header
    assert not {"sr.lr", "sr.mse_weight", "run.name", "model.arch", "train/loss"} & set(header)
    assert header[-2:] == ["val/lpips", "val/psnr_y"]
    a, b, c = rows["run-a"], rows["run-b"], rows["run-c"]
    assert (a["stage"], a["status"], a["step"]) == ("sr", "finished", "200")
    assert (b["status"], b["step"]) == ("preempted", "180")
    assert (c["status"], c["step"]) == ("unfinished", "–")
    assert float(a["sr.gan_weight"]) == 0.5 and float(b["sr.gan_weight"]) == 0.0
    assert float(c["sr.gan_weight"]) == 0.5
    assert (float(a["val/psnr_y"]), float(a["val/lpips"])) == (27.5, 0.25)
    assert (float(b["val/psnr_y"]), float(b["val/lpips"])) == (28.0, 0.3125)
    assert c["val/psnr_y"] == c["val/lpips"] == "–"

    table, _ = collect([runs], sort="val/psnr_y", descending=True, metrics=["*"])
    header, _ = _parse(table)
    order = [ln.split("|")[1].strip() for ln in table.splitlines()[2:]]
    assert order == ["run-b", "run-a", "run-c"] and "train/loss" in header
    with pytest.raises(UserError, match="--sort nope: not a column"):
        collect([runs], sort="nope")


def test_collect_reads_a_wandb_summary_when_final_json_is_missing(runs):
    files = next((runs / "run-c" / "wandb").glob("offline-run-*")) / "files"
    (files / "wandb-summary.json").write_text(json.dumps(
        {"val/psnr_y": 20.25, "trainer/global_step": 49, "_step": 50, "_runtime": 3.0}))
    _, rows = _parse(collect([runs / "run-c", runs / "group1"])[0])
    c = rows["run-c"]
    assert (c["status"], c["step"], float(c["val/psnr_y"])) == ("unfinished", "49", 20.25)


def test_collect_takes_step_and_failure_of_an_unfinished_run_from_its_events(runs):
    events = [{"event": "start", "step": 0}, {"event": "preempt", "step": 40},
              {"event": "start", "step": 40}, {"event": "error", "step": 57}]
    lines = [json.dumps(e) for e in events]
    (runs / "run-c" / "events.jsonl").write_text("\n".join(lines[:2]) + "\n")
    _, rows = _parse(collect([runs])[0])
    assert (rows["run-c"]["status"], rows["run-c"]["step"]) == ("unfinished", "40")
    (runs / "run-c" / "events.jsonl").write_text("\n".join(lines) + "\n{half a line")
    _, rows = _parse(collect([runs])[0])
    assert (rows["run-c"]["status"], rows["run-c"]["step"]) == ("failed", "57")


def test_collect_folds_a_whole_preset_into_one_column(tmp_path):
    _run(tmp_path, "s3", final=_final("s3", 1, {}))
    _run(tmp_path, "re", ["sr.gan_weight=0.0"], final=_final("re", 1, {}))
    cfg = load_config([ROOT / "configs/sr_tiny.yaml", ABL / "preset_realesrgan.yaml"],
                      ["run.name=re2"])
    save_config(cfg, tmp_path / "re2")
    header, rows = _parse(collect([tmp_path])[0])
    deg = [h for h in header if h.startswith("degradation.*")]
    assert len(deg) == 1 and not any(h.startswith("degradation.first") for h in header)
    assert rows["s3"][deg[0]] == rows["re"][deg[0]] != rows["re2"][deg[0]]


def test_collect_makes_one_table_per_stage(runs):
    _run(runs, "est-a", ["estimator.objective=ranking"], base="configs/estimator_tiny.yaml",
         final={**_final("est-a", 7, {"val/spearman_blur": 0.5}), "stage": "estimator"})
    text, _ = collect([runs], sort="val/spearman_blur")
    assert text.startswith("## estimator\n\n| name |") and "\n## sr\n\n| name |" in text
    est, sr = text.split("## sr")
    header, rows = _parse(est.split("\n\n", 1)[1])
    assert set(rows) == {"est-a"} and float(rows["est-a"]["val/spearman_blur"]) == 0.5
    assert "sr.gan_weight" not in header and "val/psnr_y" not in header
    header, rows = _parse(sr)
    assert set(rows) == {"run-a", "run-b", "run-c"} and "sr.gan_weight" in header


def test_degsr_collect_command(runs, tmp_path, degsr_cmd, capsys):
    from degsr.cli import main

    out = tmp_path / "tables" / "t.md"
    r = subprocess.run([*degsr_cmd, "collect", str(runs), "--out", str(out), "--sort", "step"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == r.stdout
    _, rows = _parse(r.stdout)
    assert set(rows) == {"run-a", "run-b", "run-c"}
    order = [ln.split("|")[1].strip() for ln in r.stdout.splitlines()[2:]]
    assert order == ["run-b", "run-a", "run-c"]

    r = subprocess.run([*degsr_cmd, "collect", str(tmp_path / "nope")], capture_output=True,
                       text=True)
    expected = f"error: {tmp_path / 'nope'}: no such folder\n"
    assert (r.returncode, r.stdout, r.stderr) == (2, "", expected)
    capsys.readouterr()
    for bad in (out, tmp_path / "tables"):  # a file; a folder without runs
        assert main(["collect", str(bad)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and str(bad) in err
    for bad in (tmp_path / "tables", out / "under-a-file.md"):  # --out a folder; not creatable
        assert main(["collect", str(runs), "--out", str(bad)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith(f"error: --out {bad}")


def _mini(parent: Path, name: str, final=None, stage="sr", **sections) -> Path:
    """A run directory with a small hand-written config.yaml (collect reads any degsr config)."""
    import yaml

    folder = parent / name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"stage": stage, "run": {"name": name},
                                                        **sections}))
    if final is not None:
        (folder / "final.json").write_text(json.dumps(final))
    return folder


def test_collect_finds_runs_but_not_look_alikes(tmp_path):
    """Only folders whose config.yaml is a degsr run config (stage and run keys) are runs;
    hidden and wandb folders are not searched; a run given twice is one row."""
    _mini(tmp_path, "real", _final("real", 1, {}))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.yaml").write_text("lr: 0.1\nbatch: 4\n")  # another tool's
    _mini(tmp_path / ".trash", "hidden", _final("hidden", 1, {}))
    w = tmp_path / "wandb" / "offline-run-1" / "files"  # W&B's own config.yaml, outside a run
    w.mkdir(parents=True)
    (w / "config.yaml").write_text("wandb_version: 1\nstage: {value: sr}\nrun: {value: 1}\n")
    table, found = collect([tmp_path, tmp_path / "real"])
    assert [r.path.name for r in found] == ["real"]
    with pytest.raises(UserError, match="no such folder"):
        collect([tmp_path / "nope"])
    with pytest.raises(UserError, match="not a folder"):
        collect([tmp_path / "real" / "config.yaml"])


def test_collect_reads_final_json_fields_and_wandb_summaries(tmp_path, caplog):
    """final.json's run_name wins; a missing status means finished; a sweep's folder
    (<run.name>-<id>) names its row; the newest W&B summary counts; flags and '_' keys are not
    metrics; a final.json that is not an object leaves the run unfinished."""
    _mini(tmp_path, "a", {"run_name": "renamed", "global_step": 3, "metrics": {"val/x": 1.0}})
    sweep = _mini(tmp_path, "s")
    sweep.rename(tmp_path / "s-abc123")
    c = _mini(tmp_path, "c")
    (c / "final.json").write_text("[1, 2]")
    for i, (when, value) in enumerate([(2_000_000_000, 9.0), (1_000_000_000, 5.0)]):
        f = c / "wandb" / f"run-{i}" / "files" / "wandb-summary.json"
        f.parent.mkdir(parents=True)
        f.write_text(json.dumps({"val/x": value, "val/flag": True, "_runtime": 7.0, "_step": 4}))
        os.utime(f, (when, when))
    with caplog.at_level("WARNING", logger="degsr"):
        _, runs = collect([tmp_path])
    assert f"{c / 'final.json'}: not a JSON object" in caplog.text
    by = {r.name: r for r in runs}
    assert set(by) == {"renamed", "s-abc123", "c"}
    assert (by["renamed"].status, by["renamed"].step) == ("finished", 3)
    assert by["c"].status == "unfinished" and by["c"].step == 4
    assert by["c"].metrics == {"val/x": 9.0}  # the newest summary; no bool, no '_runtime'


def test_collect_cells_format_and_escape(tmp_path):
    _mini(tmp_path, "r1", _final("r1", 1, {"val/a": 1 / 3}),
          sr={"flag": True, "note": "a|b", "lst": [1, 2], "gone": None})
    _mini(tmp_path, "r2", _final("r2", 1, {"val/a": 2.0, "val/b": 123456.789}),
          sr={"flag": False, "note": "c", "lst": [1, 3]})
    table, _ = collect([tmp_path], metrics=["val/a", "val/b"])
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["name", "stage", "status", "step", "sr.flag", "sr.gone", "sr.lst", "sr.note",
                      "val/a", "val/b"]
    row1 = lines[2]
    assert "| true |" in row1 and "| null |" in row1 and "| [1, 2] |" in row1
    assert "| a\\|b |" in row1 and "| 0.33333 |" in row1 and row1.endswith("| – |")
    row2 = lines[3]
    assert "| false |" in row2 and "| 1.2346e+05 |" in row2 and "| – | [1, 3] |" in row2


def test_collect_folds_a_section_only_beyond_max_keys(tmp_path):
    six = {f"k{i}": 0 for i in range(6)}
    _mini(tmp_path, "x", _final("x", 1, {}), sr=six)
    _mini(tmp_path, "y", _final("y", 1, {}), sr={k: 1 for k in six})
    _mini(tmp_path, "z", _final("z", 1, {}), sr={k: 1 for k in six})
    header, rows = _parse(collect([tmp_path])[0])
    assert [h for h in header if h.startswith("sr.")] == [f"sr.k{i}" for i in range(6)]
    header, rows = _parse(collect([tmp_path], max_keys_per_section=5)[0])
    assert [h for h in header if h.startswith("sr.")] == ["sr.* (6 keys)"]
    assert [rows[n]["sr.* (6 keys)"] for n in "xyz"] == ["A", "B", "B"]


def test_collect_sorts_numbers_as_numbers_and_missing_last(tmp_path):
    for name, psnr in [("p", 9.5), ("q", None), ("r", 10.25), ("s", 100.0)]:
        _mini(tmp_path, name, _final(name, 1, {} if psnr is None else {"val/psnr": psnr}))
    for descending, want in [(False, ["p", "r", "s", "q"]), (True, ["s", "r", "p", "q"])]:
        table, _ = collect([tmp_path], sort="val/psnr", descending=descending)
        assert [ln.split("|")[1].strip() for ln in table.splitlines()[2:]] == want, descending


def test_collect_same_name_twice_shows_paths_and_stages_in_order(tmp_path):
    _mini(tmp_path / "g1", "same", _final("same", 1, {}))
    _mini(tmp_path / "g2", "same", _final("same", 2, {}))
    _, rows = _parse(collect([tmp_path])[0])
    assert set(rows) == {str(tmp_path / "g1" / "same"), str(tmp_path / "g2" / "same")}
    _mini(tmp_path, "e", {**_final("e", 1, {}), "stage": "estimator"}, stage="estimator")
    _mini(tmp_path, "a-sr", _final("a-sr", 1, {}))
    text, _ = collect([tmp_path])
    assert text.index("## estimator") < text.index("## sr")


def test_collect_sort_with_a_nan_metric_keeps_the_others_in_order(tmp_path):
    """A 'nan' cell (a W&B summary, an older final.json) scrambled the other rows; it sorts
    last now, with the missing ones, either way round."""
    for name, psnr in [("a", 27.5), ("b", math.nan), ("c", 26.0), ("d", 28.1)]:
        _mini(tmp_path, name, _final(name, 1, {"val/psnr": psnr}))
    for descending, want in ((False, ["c", "a", "d", "b"]), (True, ["d", "a", "c", "b"])):
        table, _ = collect([tmp_path], sort="val/psnr", descending=descending)
        assert [ln.split("|")[1].strip() for ln in table.splitlines()[2:]] == want, table


def test_collect_lists_runs_whose_files_are_not_utf8_or_odd(tmp_path, caplog):
    """A final.json overwritten with binary garbage, an events.jsonl cut inside a multi-byte
    character and a final.json whose metrics are not a mapping were tracebacks that lost the
    whole table; each is now one row (unfinished, or finished without metrics)."""
    bad = _mini(tmp_path, "garbage")
    (bad / "final.json").write_bytes(b'{"run_name": "\xff\xfe')
    cut = _mini(tmp_path, "cut")
    (cut / "events.jsonl").write_bytes(b'{"event": "start", "step": 4}\n{"event": "error", "m": "caf\xc3')
    _mini(tmp_path, "odd", {"run_name": "odd", "global_step": 2, "metrics": [1, 2]})
    with caplog.at_level("WARNING", logger="degsr"):
        _, found = collect([tmp_path])
    by = {r.name: r for r in found}
    assert (by["garbage"].status, by["cut"].status, by["cut"].step) == ("unfinished",) * 2 + (4,)
    assert (by["odd"].status, by["odd"].metrics) == ("finished", {})
    assert f"{bad / 'final.json'}: not a JSON object" in caplog.text


def test_collect_follows_symlinked_run_dirs_once(tmp_path):
    """A folder of symlinks to run directories elsewhere listed no run ('no run directories'):
    os.walk does not follow links unless told. A link back up does not loop."""
    real = _mini(tmp_path / "scratch", "linked", _final("linked", 9, {"val/a": 5.0}))
    runs = tmp_path / "runs"
    _mini(runs, "local", _final("local", 1, {}))
    (runs / "linked").symlink_to(real, target_is_directory=True)
    (runs / "loop").symlink_to(runs, target_is_directory=True)
    _, found = collect([runs])
    assert sorted(r.name for r in found) == ["linked", "local"]


def test_collect_cells_keep_a_carriage_return_off_the_table(tmp_path):
    """A '\\r' (a run_name, a config string written on Windows) ended the markdown row there."""
    _mini(tmp_path, "r1", _final("a\rb", 1, {}), sr={"note": "dos\r\nline"})
    _mini(tmp_path, "r2", _final("r2", 1, {}), sr={"note": "n"})
    table, _ = collect([tmp_path])
    assert "\r" not in table and "| a b |" in table and "| dos line |" in table
    _parse(table)


def test_collect_sorts_by_a_metric_whose_name_holds_a_pipe(tmp_path):
    """The header is escaped for markdown ('val/x\\|y'); --sort val/x|y was 'not a column'."""
    for name, v in (("p", 2.0), ("q", 1.0)):
        _mini(tmp_path, name, _final(name, 1, {"val/x|y": v}))
    table, _ = collect([tmp_path], sort="val/x|y")
    assert [ln.split(" | ")[0].strip("| ") for ln in table.splitlines()[2:]] == ["q", "p"]
