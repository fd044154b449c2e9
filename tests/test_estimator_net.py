"""Degradation-estimator network (DEResNet layout), its export format, and ``degsr estimate``."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from degsr.errors import UserError
from degsr.estimator import (SCORES, DegradationEstimator, EstimatorNetConfig, load_estimator,
                             save_estimator, tiny_net)


ROOT = Path(__file__).resolve().parents[1]


def conv(cin, cout, k=3):
    return k * k * cin * cout + cout


def linear(n_in, n_out):
    return n_in * n_out + n_out


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = DegradationEstimator(tiny_net())
    model.reset_parameters(residual_scale=1.0)  # outputs spread over (0, 1), not all near 0.5
    return model.eval()


def test_full_config_parameter_count():
    # Reference layout per branch (S3Diff's DEResNet defaults: widths [64, 64, 64, 128],
    # 2 blocks per stage, downscales [1, 1, 2, 1]), written out layer by layer:
    branch = (conv(3, 64)                        # conv_first
              + 3 * 2 * 2 * conv(64, 64)         # stages 0-2: 2 blocks x 2 convs each
              + conv(64, 128)                    # stride-2 conv after stage 2
              + 2 * 2 * conv(128, 128)           # stage 3
              + linear(128, 512) + linear(512, 1))
    by_hand = 2 * branch
    model = DegradationEstimator(EstimatorNetConfig())
    counted = sum(p.numel() for p in model.parameters())
    assert counted == by_hand == 2_351_362
    assert abs(counted - 2.35e6) / 2.35e6 < 0.02
    assert model.min_side == 2
    # exactly one stride-2 conv per branch
    strided = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == 2


@pytest.mark.parametrize("size", [(2, 2), (2, 9), (8, 8), (17, 31), (33, 64), (64, 48)])
def test_outputs_shape_and_range(size):
    model = tiny_model()
    x = torch.rand(3, 3, *size)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (3, 2)
    assert torch.isfinite(y).all() and (y >= 0).all() and (y <= 1).all()


def test_full_config_runs_on_odd_size():
    model = DegradationEstimator(EstimatorNetConfig()).eval()
    with torch.no_grad():
        y = model(torch.rand(1, 3, 23, 37))
    assert y.shape == (1, 2) and ((y >= 0) & (y <= 1)).all()


@pytest.mark.parametrize("size", [(1, 1), (1, 40), (40, 1)])
def test_too_small_input_is_a_user_error(size):
    model = tiny_model()
    with pytest.raises(UserError) as exc:
        model(torch.rand(1, 3, *size))
    msg = str(exc.value)
    assert f"{size[1]}x{size[0]}" in msg and "at least 2" in msg


def test_branches_are_independent():
    model = tiny_model()
    x = torch.rand(2, 3, 24, 20)
    with torch.no_grad():
        before = model(x).clone()
        for name, p in model.named_parameters():
            if name.split(".")[1] == str(SCORES.index("noise")):
                p.add_(torch.randn_like(p) * 0.5)
        after = model(x)
    blur, noise = SCORES.index("blur"), SCORES.index("noise")
    assert torch.equal(after[:, blur], before[:, blur])
    assert not torch.allclose(after[:, noise], before[:, noise])


def test_leaky_head_keeps_a_dead_head_learning():
    """Every hidden unit of both heads pushed negative: with ReLU (the reference) no gradient
    reaches the heads' first layers and the score is one constant; with head_leak the score is
    sigmoid(w2 . leak * (W1 f + b1) + b2), recomputed here by hand, and the gradient flows."""
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    grads = {}
    for leak in (0.0, 0.1):
        torch.manual_seed(0)
        net = DegradationEstimator(EstimatorNetConfig(widths=[8, 8], blocks_per_stage=1,
                                                      downscales=[2, 1], head_hidden=4,
                                                      head_leak=leak))
        with torch.no_grad():
            for head in net.fc_degree:
                head[0].bias.fill_(-1e3)
        out = net(x)
        out.sum().backward()
        grads[leak] = net.fc_degree[1][0].weight.grad.abs().sum().item()
        if leak == 0.0:
            assert torch.equal(out[:, 1], out[:1, 1].expand(3))  # one constant per score
        else:
            with torch.no_grad():
                f = net.body[1](net.conv_first[1](x)).mean(dim=(-2, -1)).double()
                lin1, lin2 = net.fc_degree[1][0], net.fc_degree[1][2]
                h = f @ lin1.weight.double().T + lin1.bias.double()
                h = torch.where(h > 0, h, leak * h)
                want = torch.sigmoid(h @ lin2.weight.double().T + lin2.bias.double())[:, 0]
            torch.testing.assert_close(out[:, 1].double(), want, rtol=0, atol=1e-6)
    assert grads[0.0] == 0.0 and grads[0.1] > 0.0


def test_export_roundtrip_is_bit_identical(tmp_path):
    model = tiny_model(seed=3)
    written = save_estimator(model, tmp_path / "exp")
    assert written == tmp_path / "exp" / "estimator.safetensors"
    doc = json.loads((tmp_path / "exp" / "estimator.json").read_text())
    assert doc["scores"] == ["blur", "noise"] and doc["net"]["widths"] == [8, 8, 16, 16]
    assert not list((tmp_path / "exp").glob("*.tmp"))
    x = torch.rand(2, 3, 19, 26)
    with torch.no_grad():
        ref = model(x)
    for where in ("exp", "exp/estimator.safetensors", "exp/estimator.json"):
        loaded = load_estimator(tmp_path / where)
        assert not loaded.training
        assert not any(p.requires_grad for p in loaded.parameters())
        with torch.no_grad():
            assert torch.equal(loaded(x), ref)
    # a file name gives its own pair
    save_estimator(model, tmp_path / "other" / "de.safetensors")
    assert (tmp_path / "other" / "de.json").is_file()
    with torch.no_grad():
        assert torch.equal(load_estimator(tmp_path / "other" / "de.json")(x), ref)


def test_load_errors_name_the_file(tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "exp"
    save_estimator(tiny_model(), d)
    weights = d / "estimator.safetensors"

    with pytest.raises(UserError, match="nowhere: no such file or folder"):
        load_estimator(tmp_path / "nowhere")

    # a tensor missing
    state = load_file(str(weights))
    dropped = sorted(state)[0]
    del state[dropped]
    bad = tmp_path / "missing"
    bad.mkdir()
    save_file(state, str(bad / "estimator.safetensors"))
    (bad / "estimator.json").write_text((d / "estimator.json").read_text())
    with pytest.raises(UserError) as exc:
        load_estimator(bad)
    msg = str(exc.value)
    assert str(bad / "estimator.safetensors") in msg and dropped in msg and "\n" not in msg

    # config says another shape than the weights
    doc = json.loads((d / "estimator.json").read_text())
    doc["net"]["head_hidden"] = 16
    shape_dir = tmp_path / "shape"
    shape_dir.mkdir()
    (shape_dir / "estimator.safetensors").write_bytes(weights.read_bytes())
    (shape_dir / "estimator.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match="shape mismatch") as exc:
        load_estimator(shape_dir)
    assert str(shape_dir / "estimator.safetensors") in str(exc.value)

    # corrupt weights: truncated file, then garbage
    data = weights.read_bytes()
    for blob in (data[: len(data) // 2], b"\x00garbage" * 10):
        weights.write_bytes(blob)
        with pytest.raises(UserError) as exc:
            load_estimator(d)
        assert str(weights) in str(exc.value) and "\n" not in str(exc.value)

    # corrupt config
    (d / "estimator.json").write_text("{not json")
    with pytest.raises(UserError) as exc:
        load_estimator(d / "estimator.safetensors")
    assert str(d / "estimator.json") in str(exc.value)


def estimate_cmd(degsr_cmd):
    return [*degsr_cmd, "estimate"]


@pytest.fixture
def photo_setup(tmp_path):
    from skimage import data

    photo = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).save(photo)
    small = tmp_path / "small.png"
    Image.fromarray(np.asarray(Image.open(photo).resize((96, 80)))).save(small)
    save_estimator(tiny_model(), tmp_path / "export")
    return tmp_path, photo, small


def run_cli(cmd, *args):
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_estimate_cli_on_a_photo(photo_setup, degsr_cmd):
    tmp_path, photo, _ = photo_setup
    res = run_cli(estimate_cmd(degsr_cmd), "--ckpt", tmp_path / "export", photo, "--device", "cpu")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["path"] == str(photo) and set(rec) == {"path", "blur", "noise"}
    assert all(0.0 <= rec[k] <= 1.0 and round(rec[k], 4) == rec[k] for k in ("blur", "noise"))
    # the same numbers as the model in-process
    img = torch.from_numpy(np.asarray(Image.open(photo).convert("RGB"), np.float32) / 255)
    with torch.no_grad():
        ref = load_estimator(tmp_path / "export")(img.permute(2, 0, 1)[None])[0]
    assert rec["blur"] == round(float(ref[0]), 4) and rec["noise"] == round(float(ref[1]), 4)


def test_estimate_cli_bad_image_among_good(photo_setup, degsr_cmd):
    tmp_path, photo, small = photo_setup
    bad = tmp_path / "broken.png"
    bad.write_text("this is not an image\n")
    res = run_cli(estimate_cmd(degsr_cmd), "--ckpt", tmp_path / "export", photo, bad, small)
    assert res.returncode == 1
    recs = [json.loads(line) for line in res.stdout.strip().splitlines()]
    assert [r["path"] for r in recs] == [str(photo), str(small)]
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0]


def test_estimate_takes_folders_and_globs_as_sr_does(photo_setup, capsys):
    """A folder (its images, sorted) and a glob are expanded as `degsr sr` expands them; one
    that finds no image is one error line, the rest are scored, exit 1. It read a folder as one
    unreadable image."""
    import degsr.cli

    tmp_path, photo, small = photo_setup
    (tmp_path / "empty").mkdir()
    rc = degsr.cli.main(["estimate", "--ckpt", str(tmp_path / "export"), str(tmp_path),
                         str(tmp_path / "sm*.png"), str(tmp_path / "empty"), "--device", "cpu"])
    out = capsys.readouterr()
    assert rc == 1
    assert [json.loads(line)["path"] for line in out.out.splitlines()] == [
        str(photo), str(small), str(small)]
    err = out.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'empty'}: folder holds no images")


def test_estimate_out_of_memory_is_one_line_for_the_image_that_does_not_fit(
        photo_setup, monkeypatch, capsys):
    import degsr.cli
    from degsr.estimator.network import DegradationEstimator

    tmp_path, photo, small = photo_setup
    twin = tmp_path / "twin.png"
    twin.write_bytes(small.read_bytes())
    real = DegradationEstimator.forward

    def tight(self, x):  # batches of two and the 512 x 512 photo do not fit
        if x.shape[0] > 1 or x.shape[-1] > 256:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: 1234 bytes")
        return real(self, x)

    monkeypatch.setattr(DegradationEstimator, "forward", tight)
    rc = degsr.cli.main(["estimate", "--ckpt", str(tmp_path / "export"), str(small), str(twin),
                         str(photo), "--device", "cpu"])
    out = capsys.readouterr()
    assert rc == 1
    assert [json.loads(line)["path"] for line in out.out.splitlines()] == [str(small), str(twin)]
    err = out.err.strip().splitlines()
    assert len(err) == 1 and str(photo) in err[0] and "out of memory" in err[0] and "512x512" in err[0]


def test_estimate_cli_bad_ckpt(tmp_path, degsr_cmd):
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(img)
    res = run_cli(estimate_cmd(degsr_cmd), "--ckpt", tmp_path / "none", img)
    assert res.returncode == 2
    assert res.stderr.startswith("error:") and str(tmp_path / "none") in res.stderr
    assert res.stdout == ""


def test_stage1_heldout_script_scores_degrade_pairs_with_estimate(photo_setup):
    """experiments/stage1_heldout.py: `degsr degrade` pairs scored by `degsr estimate`; its
    Spearman recomputed here from the files it wrote, by ranks done by hand."""
    tmp_path, photo, _ = photo_setup
    (tmp_path / "held").mkdir()
    photo.rename(tmp_path / "held" / photo.name)
    res = subprocess.run([sys.executable, str(ROOT / "experiments/stage1_heldout.py"),
                          str(tmp_path / "export"), "--photos", str(tmp_path / "held"),
                          "--seeds", "3", "--n-per-image", "6", "--crop", "128",
                          "--work", str(tmp_path / "work")], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["pairs"] == 6 and set(out["per_seed"]) == {"3"}
    pair_dir = tmp_path / "work" / "seed3-crop128-n6"
    truth = [json.loads(line) for line in open(pair_dir / "params.jsonl")]
    model = load_estimator(tmp_path / "export")
    for i, score in enumerate(("blur", "noise")):
        t = np.array([r["scores"][score] for r in truth])
        p = []
        for r in truth:
            lq = np.asarray(Image.open(pair_dir / f"{r['stem']}_lq.png").convert("RGB"), np.float32)
            with torch.no_grad():
                p.append(round(float(model(torch.from_numpy(lq / 255).permute(2, 0, 1)[None])[0, i]), 4))

        def ranks(v):  # average ranks of ties, as Spearman's definition
            return np.array([np.mean([j for j, w in enumerate(sorted(v)) if w == x]) for x in v])
        rt, rp = ranks(t), ranks(np.array(p))
        rho = np.corrcoef(rt, rp)[0, 1]
        assert out["pooled"][score] == pytest.approx(rho, abs=1e-3)


def test_forward_matches_the_tiny_layout_written_out_in_float64():
    """tiny_net (widths [8, 8, 16, 16], 1 block a stage, downscales [1, 1, 2, 1]) by hand from
    the state dict, per branch b (0 = blur, 1 = noise): conv_first; body.b.0, body.b.1 residual
    blocks h + conv2(ReLU(conv1 h)); body.b.2 conv 8->16 stride 1; body.b.3 residual block;
    body.b.4 conv 16->16 stride 2; body.b.5 residual block; mean over H, W; Linear-ReLU-Linear-
    sigmoid."""
    import torch.nn.functional as F

    model = tiny_model()
    sd = {k: v.double() for k, v in model.state_dict().items()}
    x = torch.rand(2, 3, 21, 26, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model(x).double()

    def conv(h, key, stride=1):
        return F.conv2d(h, sd[f"{key}.weight"], sd[f"{key}.bias"], stride=stride, padding=1)

    def res(h, key):
        return h + conv(torch.clamp(conv(h, f"{key}.conv1"), min=0), f"{key}.conv2")

    for b, name in enumerate(SCORES):
        h = conv(x.double(), f"conv_first.{b}")
        h = res(res(h, f"body.{b}.0"), f"body.{b}.1")
        h = res(conv(h, f"body.{b}.2"), f"body.{b}.3")
        h = res(conv(h, f"body.{b}.4", stride=2), f"body.{b}.5")
        assert h.shape == (2, 16, 11, 13)
        f = h.mean(dim=(2, 3))
        hidden = torch.clamp(f @ sd[f"fc_degree.{b}.0.weight"].T + sd[f"fc_degree.{b}.0.bias"],
                             min=0)
        want = torch.sigmoid(hidden @ sd[f"fc_degree.{b}.2.weight"].T
                             + sd[f"fc_degree.{b}.2.bias"])[:, 0]
        torch.testing.assert_close(got[:, b], want, rtol=0, atol=1e-6)
    assert SCORES == ("blur", "noise")
    assert (got[:, 0] - got[:, 1]).abs().min() > 1e-3  # a swap of the branches would show


def test_a_checkpoint_file_or_a_stage2_export_is_named_for_what_it_is(tmp_path):
    """`--ckpt last.ckpt` said 'estimator config not found: last.ckpt/estimator.json' (a file
    taken for a folder); a stage-2 export folder said its estimator.json was missing."""
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"\0" * 16)
    with pytest.raises(UserError, match=r"last\.ckpt: a file, not an estimator export \(a folder"):
        load_estimator(ckpt)
    sr = tmp_path / "sr_export"
    sr.mkdir()
    (sr / "adapter.safetensors").write_bytes(b"")
    (sr / "adapter.json").write_text(json.dumps({"estimator": "/runs/est/export"}))
    with pytest.raises(UserError) as exc:
        load_estimator(sr)
    assert str(exc.value) == (f"{sr}: a stage-2 (SR adapter) export, not a stage-1 estimator "
                              "export; its estimator: /runs/est/export")
    with pytest.raises(UserError, match=rf"^{tmp_path}/nope: no such file or folder \(an estimator"):
        load_estimator(tmp_path / "nope")  # said 'estimator config not found: .../nope/estimator.json'


def test_fresh_network_init_scales_and_zero_biases():
    """reset_parameters (docstring): Kaiming-normal (ReLU gain, fan-in) weights and zero biases;
    the convs inside residual blocks x 0.1, each head's last Linear x 0.01. Stds against
    sqrt(2 / fan_in) times those factors, on the full layout."""
    torch.manual_seed(0)
    model = DegradationEstimator(EstimatorNetConfig())
    in_block = {id(c) for m in model.modules() if type(m).__name__ == "ResBlock"
                for c in m.modules() if isinstance(c, torch.nn.Conv2d)}
    last = {id(head[-2]) for head in model.fc_degree}
    seen = set()
    for m in model.modules():
        if not isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            continue
        assert torch.count_nonzero(m.bias) == 0
        fan_in = m.weight[0].numel()
        factor = 0.1 if id(m) in in_block else 0.01 if id(m) in last else 1.0
        seen.add(factor)
        want = factor * (2.0 / fan_in) ** 0.5
        assert m.weight.double().std().item() == pytest.approx(want, rel=0.15), m
    assert seen == {0.1, 0.01, 1.0}
