"""Config merging, validation errors (each naming its key), and every shipped YAML."""

import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from degsr.config import load_config, save_config
from degsr.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted([*ROOT.glob("configs/**/*.yaml"), *ROOT.glob("experiments/ablations/*.yaml")])


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def problems(files=(), overrides=()):
    with pytest.raises(ConfigError) as exc:
        load_config(files, overrides)
    return exc.value.problems


def test_defaults_then_file_then_cli(tmp_path):
    f = write(tmp_path / "a.yaml", "run:\n  seed: 5\n  name: from-file\n")
    assert load_config().run.seed == 0
    cfg = load_config([f])
    assert (cfg.run.seed, cfg.run.name) == (5, "from-file")
    cfg = load_config([f], ["run.seed=9"])
    assert (cfg.run.seed, cfg.run.name) == (9, "from-file")


def test_later_files_win_and_includes_merge_first(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "base.yaml", "run:\n  seed: 1\n  name: base\n  dir: basedir\n")
    child = write(tmp_path / "child.yaml", "include: sub/base.yaml\nrun:\n  seed: 2\n")
    over = write(tmp_path / "over.yaml", "run:\n  name: over\n")
    cfg = load_config([child, over])
    assert (cfg.run.seed, cfg.run.name, cfg.run.dir) == (2, "over", "basedir")


def test_include_cycle_and_missing_include(tmp_path):
    a = write(tmp_path / "a.yaml", "include: b.yaml\n")
    write(tmp_path / "b.yaml", "include: a.yaml\n")
    assert "include cycle" in problems([a])[0]
    c = write(tmp_path / "c.yaml", "include: nope.yaml\n")
    msg = problems([c])[0]
    assert "nope.yaml" in msg and "c.yaml" in msg


def test_unknown_key_suggests_closest():
    msg = problems(overrides=["degradation.first.blur_prb=0.5"])
    assert len(msg) == 1
    assert "'degradation.first.blur_prb'" in msg[0] and "did you mean 'degradation.first.blur_prob'" in msg[0]
    assert "'no.such.key'" in problems(overrides=["no.such.key=1"])[0]


def test_unknown_key_in_file_names_file(tmp_path):
    f = write(tmp_path / "bad.yaml", "degradation:\n  secnd:\n    blur_prob: 0.1\n")
    msg = problems([f])[0]
    assert "degradation.secnd.blur_prob" in msg and "bad.yaml" in msg


@pytest.mark.parametrize("override,key,words", [
    ("degradation.scale=abc", "degradation.scale", ["expected", "int", "'abc'"]),
    ("run.seed=1.5", "run.seed", ["expected int", "1.5"]),
    ("degradation.first.blur_sigma=[a,b]", "degradation.first.blur_sigma", ["list of float"]),
    ("degradation.usm_sharpen=maybe", "degradation.usm_sharpen", ["bool"]),
    ("degradation=3", "degradation", ["section"]),
    ("logger.tags=foo", "logger.tags", ["expected list of str, got 'foo' (str)"]),
    ("run.seed=[1]", "run.seed", ["expected int, got [1] (list)"]),
    ("run.seed=null", "run.seed", ["expected int, got None (null)"]),
    ("trainer.max_minutes=abc", "trainer.max_minutes",  # an optional key names null too
     ["expected float or null, got 'abc' (str)"]),
    ("logger.tags={}", "logger.tags", ["expected list of str, got {} (mapping)"]),  # a TypeError
    # a list or mapping inside a list of scalars: OmegaConf lets it in (a check then threw, or
    # the run failed far from the key)
    ("degradation.first.blur_sigma=[[1],[2]]", "degradation.first.blur_sigma",
     ["expected list of float, got [1] (list) in the command line"]),
    ("logger.tags=[[a]]", "logger.tags", ["expected list of str, got ['a'] (list)"]),
    ("logger.tags=[b, {a: 1}]", "logger.tags", ["expected list of str, got {'a': 1} (mapping)"]),
    ("sr.betas=[[0.9],0.99]", "sr.betas", ["expected list of float, got [0.9] (list)"]),
    ("disc.levels=[[1]]", "disc.levels", ["expected list of int, got [1] (list)"]),
])
def test_wrong_type_names_key_and_types(override, key, words):
    msg = problems(overrides=[override])[0]
    assert key in msg
    for w in words:
        assert w in msg


@pytest.mark.parametrize("override,key", [
    ("degradation.first.blur_prob=1.5", "degradation.first.blur_prob"),
    ("degradation.no_degradation_prob=-0.1", "degradation.no_degradation_prob"),
    ("degradation.first.blur_sigma=[2.0,1.0]", "degradation.first.blur_sigma"),
    ("degradation.second.resize_probs=[0.5,0.5,0.5]", "degradation.second.resize_probs"),
    ("degradation.first.kernel_sizes=[7,8]", "degradation.first.kernel_sizes"),
    ("degradation.first.jpeg_quality=[0,101]", "degradation.first.jpeg_quality"),
    ("degradation.usm_radius=-3", "degradation.usm_radius"),
    ("degradation.usm_radius=50", "degradation.usm_radius"),
    ("degradation.scale=5", "degradation.scale"),
    ("degradation.first.kernel_probs=[0.5,0.5]", "degradation.first.kernel_probs"),
    ("trainer.max_minutes=.nan", "trainer.max_minutes"),
    ("run.name=", "run.name"),
    ("run.name=a/b", "run.name"),
    ("trainer.precision=bf16-true", "trainer.precision"),  # weights cast, the LR is not
    # NaN / infinity: a range check alone lets inf through and every comparison with NaN is False
    ("estimator.lr=.inf", "estimator.lr"),  # diverges at once, skipped steps, then a stop
    ("trainer.max_minutes=.inf", "trainer.max_minutes"),  # timedelta(minutes=inf): a traceback
    ("degradation.first.kernel_probs=[.nan,0,0,0,0,1]", "degradation.first.kernel_probs"),
    ("degradation.first.blur_sigma=[.nan,1.0]", "degradation.first.blur_sigma"),
    ("degradation.first.noise_sigma=[1.0,.inf]", "degradation.first.noise_sigma"),
    ("data.scale_range=[.nan,.nan]", "data.scale_range"),
    ("run.seed=4294967296", "run.seed"),  # Lightning's seed_everything: ValueError at fit
    # 1x1 LR crops; the default estimator's one stride-2 stage needs 2x2 (an error at fit naming
    # no key)
    ("data.crop_size=4", "data.crop_size"),
    ("data.val_crop_size=4", "data.val_crop_size"),
    # the export goes inside the run directory: '' and '.' wrote it over the run folder itself,
    # an absolute path or '..' let two runs write one export
    ("run.export_dir=", "run.export_dir"),
    ("run.export_dir=.", "run.export_dir"),
    ("run.export_dir=/models/est", "run.export_dir"),
    ("run.export_dir=../shared", "run.export_dir"),
    ("run.export_dir=~/est", "run.export_dir"),
])
def test_out_of_range_names_key(override, key):
    msg = problems(overrides=[override])
    assert len(msg) == 1 and msg[0].startswith(f"config error: {key}:"), msg


def test_text_keys_keep_the_text_typed():
    """YAML would read run.name=0123 as 83 (octal), 12:30 as 750 (sexagesimal), on as true."""
    from degsr.config import load_config

    cfg = load_config([], ["run.name=0123", "logger.group=12:30", "data.train_shards=on",
                           "model.pretrained=null", "run.seed=0012"])
    assert (cfg.run.name, cfg.logger.group, cfg.data.train_shards) == ("0123", "12:30", "on")
    assert cfg.model.pretrained is None and cfg.run.seed == 12  # numbers stay numbers


@pytest.mark.parametrize("override,key", [
    ("trainer.accumulate_grad_batches=2", "trainer.accumulate_grad_batches"),
    ("trainer.gradient_clip_val=1.0", "trainer.gradient_clip_val"),
    ("sr.accumulate=3", "sr.accumulate"),  # 3 does not divide data.batches_per_epoch=1000
    ("trainer.strategy=ddp", "trainer.strategy"),  # G and D steps leave parameters unused
])
def test_stage_sr_rejects_lightnings_own_accumulation_and_clipping(override, key):
    msg = [m for m in problems(overrides=["stage=sr", override]) if key in m]
    assert len(msg) == 1 and msg[0].startswith(f"config error: {key}:"), msg


@pytest.mark.parametrize("overrides,key", [
    (["data.crop_size=130"], "data.crop_size"),  # 130 % 4
    (["data.val_crop_size=66"], "data.val_crop_size"),
    (["degradation.scale=3"], "data.crop_size"),  # the default 512 % 3
])
def test_crop_sizes_must_be_multiples_of_the_scale(overrides, key):
    msg = [m for m in problems(overrides=overrides) if key + ":" in m]
    assert len(msg) == 1 and "multiple of degradation.scale" in msg[0], msg


def test_all_problems_reported_together():
    msg = problems(overrides=["degradation.first.blur_prob=2", "degradation.second.sinc_prob=-1"])
    assert len(msg) == 2
    msg = problems(overrides=["run.seed=x", "trainer.max_steps=y", "run.name=ok"])  # two types
    assert [m.split(":")[1].strip() for m in msg] == ["run.seed", "trainer.max_steps"]


def test_missing_required_and_paths(tmp_path):
    from dataclasses import dataclass, field

    from omegaconf import MISSING

    from degsr.config.fields import existing_path

    @dataclass
    class Inner:
        data: str = existing_path(MISSING, "must exist")

    @dataclass
    class Schema:
        inner: Inner = field(default_factory=Inner)

    with pytest.raises(ConfigError) as exc:
        load_config(schema_cls=Schema)
    assert "missing required value 'inner.data'" in exc.value.problems[0]
    with pytest.raises(ConfigError) as exc:
        load_config(overrides=[f"inner.data={tmp_path}/nope"], schema_cls=Schema)
    assert exc.value.problems[0].startswith("config error: inner.data: path does not exist")
    assert load_config(overrides=[f"inner.data={tmp_path}"], schema_cls=Schema).inner.data == str(tmp_path)


def test_bad_override_syntax_and_bad_yaml(tmp_path):
    assert "key=value" in problems(overrides=["justakey="[:-1] + " =1"])[0]
    f = write(tmp_path / "broken.yaml", "run: [1, 2\n")
    assert "broken.yaml" in problems([f])[0]


@pytest.mark.parametrize("name,content,words", [
    ("photo.png", b"\x89PNG\r\n\x1a\n\x00\xff", ["photo.png", "not a text"]),  # a file given
    ("twice.yaml", b"trainer:\n  max_steps: 5\nrun:\n  seed: 1\ntrainer:\n  max_steps: 7\n",
     ["twice.yaml", "line 5", "'trainer' appears twice"]),  # PyYAML: the first block vanished
    ("inc.yaml", b"include: [5]\n", ["inc.yaml", "include"]),
    ("listkey.yaml", b"trainer:\n  ? [a, b]\n  : 1\n", ["listkey.yaml", "line 2"]),  # unhashable
    ("mergetwice.yaml", b"a: &a {blur_prob: 0.5}\ndegradation:\n  first:\n    <<: *a\n"
     b"    sinc_prob: 0.1\n    sinc_prob: 0.2\n", ["mergetwice.yaml", "'sinc_prob' appears twice"]),
    ("interp.yaml", b"trainer:\n  max_steps: ${nope}\n", ["trainer.max_steps", "nope"]),
    ("dir.yaml", None, ["dir.yaml", "is a folder"]),
])
def test_a_bad_config_file_is_one_line_naming_it(tmp_path, name, content, words):
    path = tmp_path / name
    path.mkdir() if content is None else path.write_bytes(content)
    msg = problems([path])
    assert len(msg) == 1 and "\n" not in msg[0], msg
    for w in words:
        assert w in msg[0], msg


def test_yaml_merge_keys_still_work(tmp_path):
    """A config file may share settings with an anchor and YAML's merge key (degradation.second
    as degradation.first with one change): the duplicate-key check read '<<' as a key and turned
    every such file into 'not valid YAML'. A key the merge brings in and the mapping sets again
    is no duplicate: the mapping's own value wins, as in YAML."""
    f = write(tmp_path / "merge.yaml", "degradation:\n  first: &first\n    blur_prob: 0.9\n"
              "    sinc_prob: 0.2\n  second:\n    <<: *first\n    blur_prob: 0.5\n")
    cfg = load_config([f])
    assert cfg.degradation.first.blur_prob == 0.9 and cfg.degradation.second.sinc_prob == 0.2
    assert cfg.degradation.second.blur_prob == 0.5


def test_a_bad_interpolation_in_an_override_is_one_line():
    msg = problems(overrides=["model.pos_prompt=a photo ${5}"])
    assert len(msg) == 1 and msg[0].startswith("config error: model.pos_prompt:"), msg


def test_resolved_config_written_to_run_dir(tmp_path):
    cfg = load_config(overrides=["run.seed=7"])
    path = save_config(cfg, tmp_path / "run")
    assert OmegaConf.load(path).run.seed == 7
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.yaml"]


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_every_shipped_yaml_validates(path, tmp_path):
    """Each file validates; the keys it marks '???' (user paths) are its only problems."""
    import re

    try:
        load_config([path])
    except ConfigError as e:
        keys = [re.fullmatch(r"config error: missing required value '([\w.]+)' .*", p) for p in e.problems]
        assert all(keys), e.problems
        load_config([path], [f"{m.group(1)}={tmp_path}" for m in keys])


def test_required_marker_in_file_and_its_override(tmp_path):
    f = write(tmp_path / "req.yaml", "model:\n  pretrained: ???\n")
    assert "missing required value 'model.pretrained'" in problems([f])[0]
    later = write(tmp_path / "later.yaml", f"model:\n  pretrained: {tmp_path}\n")
    assert load_config([f, later]).model.pretrained == str(tmp_path)
    assert load_config([f], [f"model.pretrained={tmp_path}"]).model.pretrained == str(tmp_path)


def test_presets_match_method_table():
    s3 = load_config([ROOT / "configs/degradation/s3diff.yaml"]).degradation
    re = load_config([ROOT / "configs/degradation/realesrgan.yaml"]).degradation
    assert list(s3.first.blur_sigma) == [0.2, 1.5] and list(s3.second.blur_sigma) == [0.2, 1.0]
    assert list(re.first.blur_sigma) == [0.2, 3.0] and list(re.second.blur_sigma) == [0.2, 1.5]
    assert (s3.second.blur_prob, re.second.blur_prob) == (0.5, 0.8)
    assert list(re.first.noise_sigma) == [1.0, 30.0] and list(re.second.jpeg_quality) == [30.0, 95.0]
    assert list(s3.second.jpeg_quality) == [60.0, 100.0] and list(s3.first.resize_range) == [0.3, 1.5]
    assert (s3.usm_sharpen, re.usm_sharpen) == (False, True)


def test_cli_config_and_errors(degsr_cmd):
    out = subprocess.run([*degsr_cmd, "config", str(ROOT / "configs/degradation/s3diff.yaml"),
                          "run.seed=4"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert OmegaConf.create(out.stdout).run.seed == 4
    bad = subprocess.run([*degsr_cmd, "config", str(ROOT / "configs/degradation/s3diff.yaml"),
                          "no.such.key=1"], capture_output=True, text=True)
    assert bad.returncode != 0
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "no.such.key" in lines[0] and "Traceback" not in bad.stderr


def test_cli_help_lists_subcommands(degsr_cmd):
    from degsr.cli import SUBCOMMANDS

    out = subprocess.run([*degsr_cmd, "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in SUBCOMMANDS:
        assert name in out.stdout
        sub = subprocess.run([*degsr_cmd, name, "--help"], capture_output=True, text=True)
        assert sub.returncode == 0 and "usage: degsr " + name in sub.stdout


@pytest.mark.parametrize("stage,devices,want", [
    ("sr", 2, True), ("sr", 1, None), ("estimator", 2, False)])
def test_auto_strategy_of_stage_sr_finds_unused_parameters(stage, devices, want, tmp_path):
    from degsr.training.fit import make_trainer

    cfg = load_config([], [f"stage={stage}", "trainer.accelerator=cpu", f"trainer.devices={devices}",
                           "sr.lpips_weight=0"])
    kwargs = getattr(make_trainer(cfg, tmp_path, False).strategy, "_ddp_kwargs", None)
    assert (None if kwargs is None else bool(kwargs.get("find_unused_parameters"))) == want


def test_a_gpu_config_on_a_machine_without_one_is_one_line(tmp_path, monkeypatch, capsys):
    """configs/estimator.yaml says accelerator gpu: on a CPU machine that is a one-line error
    before anything is written (Lightning's own is a traceback)."""
    import torch

    import degsr.cli
    import degsr.training.cluster as cluster

    monkeypatch.setattr(cluster, "under_slurm", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    rc = degsr.cli.main(["fit", str(ROOT / "configs" / "estimator.yaml"), f"run.dir={tmp_path}",
                         f"data.train_shards={tmp_path}", f"data.val_folder={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "trainer.accelerator=gpu" in err[0], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("first, second", [("trainer.max_steps.x=6", "trainer.max_steps=5"),
                                           ("trainer.max_steps=5", "trainer.max_steps.x=6")])
def test_an_override_below_a_key_then_the_key_is_a_conflict_either_way(first, second):
    """A later trainer.max_steps=5 silently dropped an earlier typo trainer.max_steps.x=6 (the
    other order was already an error)."""
    assert problems(overrides=[first, second]) == [
        f"config error: override '{second}' conflicts with an earlier one"]


def test_a_text_key_that_yaml_reads_as_a_number_or_bool_in_a_file_is_named(tmp_path):
    """In a file YAML 1.1 read run.name: 0123 as 83 (octal), 12:30 as 750 and no as False, and
    the config took '83', '750', 'False' for the name. Quoted, the text stays as typed."""
    f = write(tmp_path / "a.yaml", "run:\n  name: 0123\nlogger:\n  group: 12:30\n"
                                   "data:\n  train_shards: no\n")
    assert sorted(problems([f])) == [
        f"config error: data.train_shards: YAML reads False (bool) there, not text: quote the "
        f"value in {f}",
        f"config error: logger.group: YAML reads 750 (int) there, not text: quote the value in {f}",
        f"config error: run.name: YAML reads 83 (int) there, not text: quote the value in {f}"]
    q = write(tmp_path / "q.yaml", "run:\n  name: '0123'\nlogger:\n  group: \"12:30\"\n"
                                   "model:\n  pretrained: null\n")
    cfg = load_config([q])
    assert (cfg.run.name, cfg.logger.group, cfg.model.pretrained) == ("0123", "12:30", None)


def test_a_list_or_mapping_inside_a_list_of_scalars_in_a_file_is_named(tmp_path):
    """OmegaConf took logger.tags: [[a]] for a list of str (W&B then got a list as a tag)."""
    f = write(tmp_path / "a.yaml", "logger:\n  tags:\n    - ok\n    - [a]\n"
                                   "data:\n  scale_range: [{x: 1}, 2]\n")
    assert sorted(problems([f])) == [
        f"config error: data.scale_range: expected list of float, got {{'x': 1}} (mapping) in {f}",
        f"config error: logger.tags: expected list of str, got ['a'] (list) in {f}"]


# ------------------------------------------------------------------ boundaries of the checks
@pytest.mark.parametrize("overrides", [
    ["degradation.first.blur_prob=0", "degradation.second.blur_prob=1"],  # [0, 1] closed
    ["degradation.usm_weight=0", "trainer.gradient_clip_val=0"],  # lo=0 closed
    ["degradation.first.blur_sigma=[0.5,0.5]"],  # low == high
    ["degradation.first.jpeg_quality=[1,100]", "degradation.first.noise_sigma=[0,0]"],
    ["degradation.first.kernel_sizes=[1,21]", "degradation.final_kernel_sizes=[21]"],
    ["degradation.second.resize_probs=[0.1,0.2,0.7]"],  # sums to 1 up to rounding
    ["degradation.blur_label_probe=8"],
    ["estimator.within_crop_weight=1", "data.degradations_per_crop=2"],
    ["stage=sr", "sr.lpips_weight=0", "estimator.within_crop_weight=1"],  # a stage-1 rule
    ["stage=sr", "sr.lpips_weight=0", "trainer.precision=bf16-mixed"],
    ["run.name=.hidden", "run.seed=0"],
])
def test_values_on_the_edge_of_their_range_are_accepted(overrides):
    load_config([], overrides)


@pytest.mark.parametrize("overrides,key", [
    (["trainer.max_minutes=0"], "trainer.max_minutes"),  # (0, inf): 0 is not a time limit
    (["degradation.first.blur_sigma=[0.5]"], "degradation.first.blur_sigma"),
    (["degradation.first.blur_sigma=[0.001,1.0]"], "degradation.first.blur_sigma"),  # lo=0.01
    (["degradation.first.jpeg_quality=[50,101]"], "degradation.first.jpeg_quality"),  # hi only
    (["degradation.first.jpeg_quality=[0,90]"], "degradation.first.jpeg_quality"),  # lo only
    (["degradation.second.resize_probs=[0.5,0.5]"], "degradation.second.resize_probs"),  # size 3
    (["degradation.second.resize_probs=[1.2,-0.2,0.0]"], "degradation.second.resize_probs"),
    (["degradation.second.resize_probs=[0.5,0.5,0.005]"], "degradation.second.resize_probs"),
    (["degradation.first.resize_modes=[]"], "degradation.first.resize_modes"),
    (["degradation.first.resize_modes=[area,lanczos]"], "degradation.first.resize_modes"),
    (["degradation.first.kernel_sizes=[7,23]"], "degradation.first.kernel_sizes"),
    (["degradation.first.kernel_sizes=[]"], "degradation.first.kernel_sizes"),
    (["degradation.first.kernel_sizes=[-1,7]"], "degradation.first.kernel_sizes"),
    (["degradation.blur_label_probe=7"], "degradation.blur_label_probe"),
    (["run.name=.."], "run.name"),
    (["run.name=a\\b"], "run.name"),
    (["run.seed=-1"], "run.seed"),
    (["estimator.within_crop_weight=1"], "estimator.within_crop_weight"),  # 1 degradation/crop
    (["stage=sr", "sr.lpips_weight=0", "trainer.precision=16-mixed"], "trainer.precision"),
    (["stage=sr", "sr.lpips_weight=1"], "sr.lpips_vgg"),
])
def test_values_just_outside_their_range_are_one_problem(overrides, key):
    msg = problems(overrides=overrides)
    assert len(msg) == 1 and msg[0].startswith(f"config error: {key}:"), msg


def test_number_field_bounds():
    """fields.number's [lo, hi] and (lo, hi] on a schema of its own (no shipped key has a hi)."""
    from dataclasses import dataclass

    from degsr.config.fields import Checked, number

    @dataclass
    class S(Checked):
        closed: float = number(0.0, lo=0, hi=1)
        open_lo: float = number(1.0, lo=0, hi=1, lo_open=True)

    assert S(0.0, 1.0).problems() == [] and S(1.0, 0.5).problems() == []
    assert S(1.01, 1.0).problems() == ["closed: must be in [0, 1], got 1.01"]
    assert S(-0.01, 1.0).problems() == ["closed: must be in [0, 1], got -0.01"]
    assert S(0.5, 0.0).problems() == ["open_lo: must be in (0, 1], got 0.0"]


def test_list_defaults_are_not_shared_and_as_dataclass_defaults():
    from degsr.config.fields import as_dataclass
    from degsr.config.schema import ODD_7_21, RoundConfig

    a = RoundConfig()
    a.kernel_sizes.append(99)
    assert RoundConfig().kernel_sizes == ODD_7_21 and 99 not in ODD_7_21
    default = RoundConfig(blur_prob=0.25)
    assert as_dataclass(None, default) is default
    node = OmegaConf.structured(RoundConfig(blur_prob=0.75))
    assert as_dataclass(node, default).blur_prob == 0.75


def test_existing_path_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "vgg.pth").write_bytes(b"")
    cfg = load_config([], ["sr.lpips_vgg=~/vgg.pth"])
    assert cfg.sr.lpips_vgg == "~/vgg.pth"
    assert problems(overrides=["sr.lpips_vgg=~/nope.pth"])[0].startswith("config error: sr.lpips_vgg:")


def test_a_tilde_that_names_no_user_is_one_line_naming_the_key_or_file():
    """``~nouser/x`` (or Hydra's ``~key`` deletion, read as a file): pathlib's expanduser raised
    RuntimeError, a traceback from the loader or later from fit."""
    got = problems(overrides=["run.dir=~nosuchuser_degsr/runs", "sr.estimator=~nosuchuser_degsr/e",
                              "data.val_folder=~nosuchuser_degsr/val"])
    assert got[0].startswith("config error: sr.estimator: path does not exist")
    assert sorted(p.split(":")[1].strip() for p in got[1:]) == ["data.val_folder", "run.dir"]
    assert all("~nosuchuser_degsr" in p for p in got)
    got = problems(["~trainer.max_steps"])
    assert len(got) == 1 and "config file not found: ~trainer.max_steps" in got[0]


def test_override_forms_and_conflicts(tmp_path):
    assert load_config([], ["+run.seed=3"]).run.seed == 3
    # null is None only for an optional text key; a plain text key keeps the word
    cfg = load_config([], ["run.name=null", "logger.group=null", "model.pretrained=~"])
    assert (cfg.run.name, cfg.logger.group, cfg.model.pretrained) == ("null", None, None)
    assert load_config([], ["+run.name=0123"]).run.name == "0123"  # '+' typed: still text
    msg = problems(overrides=["trainer.max_minutes="])  # empty is not "no limit" (null is)
    assert len(msg) == 1 and "trainer.max_minutes" in msg[0], msg
    with pytest.raises(ConfigError, match="conflicts with an earlier one"):
        load_config([], ["run=1", "run.seed=2"])
    f = write(tmp_path / "e.yaml", "nosuch: {}\n")  # an empty section is a key too
    assert "unknown key 'nosuch'" in problems([f])[0]


def test_loaded_config_is_read_only_and_saved_resolved(tmp_path):
    from omegaconf.errors import ReadonlyConfigError

    f = write(tmp_path / "i.yaml", "run:\n  name: ${stage}-run\n")
    cfg = load_config([f])
    with pytest.raises(ReadonlyConfigError):
        cfg.run.seed = 3
    text = save_config(cfg, tmp_path / "run").read_text()
    assert "name: estimator-run" in text and "${" not in text


def test_degsr_config_checks_the_pretrained_folder_as_fit_would(tmp_path, capsys):
    """`degsr config` printed a stage-2 config whose model.pretrained lacks text_encoder/; fit
    found it minutes later (after the data and the other weights). Now config says it, one
    line, and prints a good folder's config."""
    import shutil

    import degsr.cli
    from degsr.sr.tiny_folder import save_tiny_pretrained

    good = save_tiny_pretrained(tmp_path / "base")
    args = ["config", str(ROOT / "configs/sr_tiny.yaml")]
    assert degsr.cli.main([*args, f"model.pretrained={good}"]) == 0
    assert f"pretrained: {good}" in capsys.readouterr().out
    shutil.rmtree(good / "text_encoder")
    assert degsr.cli.main([*args, f"model.pretrained={good}"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert captured.out == "" and len(err) == 1 and "has no text_encoder/ subfolder" in err[0], err


def test_a_prompt_may_start_with_a_tilde():
    """Only path keys expand ~: a prompt (or any other text) starting with one was refused as a
    path whose ~user names no user."""
    cfg = load_config([ROOT / "configs" / "sr_tiny.yaml"], ["model.neg_prompt=~blurry, lowres",
                                                             "model.pos_prompt=~sharp"])
    assert (cfg.model.neg_prompt, cfg.model.pos_prompt) == ("~blurry, lowres", "~sharp")


@pytest.mark.parametrize("overrides,bad", [
    (["trainer.accumulate_grad_batches=3"], True),  # 3 does not divide data.batches_per_epoch=1000
    (["trainer.accumulate_grad_batches=4"], False),
    (["trainer.accumulate_grad_batches=2", "data.batches_per_epoch=5", "data.echo=2"], False),
    (["trainer.accumulate_grad_batches=2", "data.batches_per_epoch=5"], True),
])
def test_stage_estimator_accumulation_must_divide_an_epochs_batches(overrides, bad):
    """Lightning steps at an epoch's last batch whatever is accumulated: with 3 batches an epoch
    and accumulate 2, trainer.val_every_n_steps=2 validated at steps 2 and 5 (not 4, nor the
    last step 6), and a validation could land mid-accumulation."""
    key = "trainer.accumulate_grad_batches"
    overrides = ["stage=estimator", *overrides]
    if not bad:
        assert load_config([], overrides).trainer.accumulate_grad_batches > 1
        return
    msg = [m for m in problems(overrides=overrides) if key in m]
    assert len(msg) == 1 and msg[0].startswith(f"config error: {key}: must divide"), msg
