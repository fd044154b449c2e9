"""The command line as the README writes it: positionals after options."""

import re

import pytest

from conftest import ROOT


def test_positionals_may_follow_options():
    """README: `degsr degrade IMAGE... --preset ... --out DIR [--device cpu|cuda] [key=value ...]`:
    the overrides come after the options (argparse's plain parse called them unrecognized)."""
    from degsr.cli import parse_args

    a = parse_args(["degrade", "x.png", "--crop", "64", "--out", "o",
                    "degradation.final_sinc_prob=0", "y.png"])
    assert a.items == ["x.png", "degradation.final_sinc_prob=0", "y.png"]
    assert a.crop == 64 and a.out == "o"
    a = parse_args(["fit", "a.yaml", "-v", "trainer.max_steps=5"])
    assert a.items == ["a.yaml", "trainer.max_steps=5"] and a.verbose is True
    a = parse_args(["-v", "sr", "in1", "--out", "o", "--adapter", "ad", "in2"])
    assert a.inputs == ["in1", "in2"] and a.adapter == "ad" and a.verbose is True
    assert parse_args(["config", "a.yaml"]).verbose is False
    a = parse_args(["bench", "degradation", "--size", "64", "-v"])  # README: -v before or after
    assert a.verbose is True and a.size == 64 and not parse_args(["bench", "loader", "--shards",
                                                                  "s", "--folder", "f"]).verbose
    with pytest.raises(SystemExit):  # a real unknown option is still argparse's error
        parse_args(["degrade", "x.png", "--out", "o", "--bogus"])
    with pytest.raises(SystemExit):  # bench has no positionals
        parse_args(["bench", "infer", "extra"])


def test_main_takes_overrides_after_an_option(capsys):
    from degsr.cli import main

    rc = main(["config", str(ROOT / "configs" / "sr_tiny.yaml"), "-v", "run.seed=3"])
    assert rc == 0
    assert "  seed: 3\n" in capsys.readouterr().out


def test_quickstart_bad_pretrained_leaves_no_out_folder(tmp_path, capsys):
    """docs/quickstart.md: a bad `--pretrained` is one line, exit 2; the check runs before `--out`
    is created (it left an empty folder)."""
    from degsr.cli import main

    out = tmp_path / "qs"
    rc = main(["quickstart", "--out", str(out), "--threads", "1",
               "--pretrained", str(tmp_path / "missing")])
    assert rc == 2
    assert "model.pretrained" in capsys.readouterr().err
    assert not out.exists()


def test_help_gives_the_defaults_the_readme_relies_on():
    """README: `degsr COMMAND --help` documents every option; degrade's and sr's defaults were
    missing (--crop 512, --scale 4, --guidance 1.07, --tile 96 --tile-overlap 32, ...)."""
    from degsr.cli import build_parser

    subs = next(a for a in build_parser()._actions if hasattr(a, "choices") and
                isinstance(a.choices, dict))
    degrade = " ".join(subs.choices["degrade"].format_help().split())
    for text in ("default: s3diff", "(default: 0)", "(default: 1)", "default: 512)",
                 "(default: 4)", "default: cpu)"):
        assert text in degrade, text
    sr = " ".join(subs.choices["sr"].format_help().split())
    for text in ("default: 1.07)", "(default: wavelet)", "default: 96)", "(default: 32)"):
        assert text in sr, text


def test_every_option_with_a_default_states_it_in_its_help():
    """Each option of each command (bench's five included) whose default is a value (not None,
    not off) names it in --help: bench's --batch/--size/--iters/... said nothing."""
    import argparse

    from degsr.cli import build_parser

    def parsers(p, path):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, q in a.choices.items():
                    yield from parsers(q, f"{path} {name}")
        yield path, p

    missing = []
    for path, p in parsers(build_parser(), "degsr"):
        for a in p._actions:
            if (a.option_strings and not (a.default is None or a.default is False
                                          or a.default is argparse.SUPPRESS)):
                shown = " ".join(p._get_formatter()._format_action(a).split())  # as --help shows it
                if "default" not in shown or str(a.default) not in shown:
                    missing.append(f"{path} {a.option_strings[-1]}: {shown!r}")
                if re.search(r"default: ?(\[\]|\(\)|'')?\)", shown):  # "(default: )"
                    missing.append(f"{path} {a.option_strings[-1]}: {shown!r} (an empty value)")
    assert not missing, missing


def test_eval_vgg_that_is_not_a_torch_file_says_so(tmp_path):
    """`degsr eval --vgg junk.pth` said `not a readable VGG16 weights file (174812789)`: torch.load's
    KeyError, whose text is a bare number."""
    from degsr.errors import UserError
    from degsr.metrics.lpips import _load_state_dict

    junk = tmp_path / "junk.pth"
    junk.write_text("junk\n")
    with pytest.raises(UserError) as e:
        _load_state_dict(junk, "VGG16 weights")
    assert "not one torch.save wrote" in str(e.value) and "Error" in str(e.value)
