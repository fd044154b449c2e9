"""Stage 1: losses against their formulas, pairs, anchors, training reduces the loss, degsr fit."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from degsr.config import load_config
from degsr.degradation.pipeline import Degrader
from degsr.degradation.scores import degradation_scores
from degsr.errors import ConfigError
from degsr.estimator.losses import anchor_loss, margin_ranking, within_crop_mse
from degsr.estimator.module import EstimatorModule
from degsr.estimator.pairs import clean_lr, ranking_batches, worst_draw

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/estimator_tiny.yaml"


def hr_batch(n=4, size=64, seed=0):
    from degsr.data.photos import load_photo
    img = torch.from_numpy(load_photo("astronaut")).permute(2, 0, 1).float() / 255
    g = torch.Generator().manual_seed(seed)
    ys, xs = (torch.randint(0, 512 - size, (n,), generator=g).tolist() for _ in range(2))
    return torch.stack([img[:, y:y + size, x:x + size] for y, x in zip(ys, xs)])


def test_margin_ranking_matches_formula_on_hand_built_pairs():
    pa, pb = torch.tensor([0.30, 0.50, 0.2]), torch.tensor([0.20, 0.52, 0.9])
    ta, tb = torch.tensor([0.9, 0.1, 0.40]), torch.tensor([0.1, 0.8, 0.42])  # third: gap < min_gap
    # pair 1: y=+1, max(0, 0.05 - 0.10) = 0;  pair 2: y=-1, max(0, 0.05 - 0.02) = 0.03
    loss = margin_ranking(pa, pb, ta, tb, margin=0.05, min_gap=0.05)
    assert loss.item() == pytest.approx((0.0 + 0.03) / 2, abs=1e-7)
    none = margin_ranking(pa[2:], pb[2:], ta[2:], tb[2:], 0.05, 0.05)
    assert none.item() == 0.0
    # a gap of exactly min_gap is ranked ("less than min_gap" is not); 0.75 - 0.5 is exact
    edge = margin_ranking(torch.tensor([0.4]), torch.tensor([0.5]), torch.tensor([0.75]),
                          torch.tensor([0.5]), margin=0.05, min_gap=0.25)
    assert edge.item() == pytest.approx(0.05 + 0.1, abs=1e-7)


def test_anchor_loss_formula():
    c, w = torch.tensor([[0.1, 0.2]]), torch.tensor([[0.7, 1.0]])
    assert anchor_loss(c, w).item() == pytest.approx((0.01 + 0.04) + (0.09 + 0))
    t = torch.tensor([[0.9, 0.4]])
    assert anchor_loss(c, w, t).item() == pytest.approx((0.01 + 0.04) + (0.04 + 0.36))


def test_anchor_loss_is_mm_realsr_per_score_mse_summed_over_scores():
    """MM-RealSR (mmrealsrnet_model.optimize_parameters): l_anchor_min = (mean((blur - 0)^2) +
    mean((noise - 0)^2)) * w, l_anchor_max the same toward 1; the ranking term likewise sums the
    blur and the noise pair. So with anchor_weight / ranking_weight = 1e-4 / 0.01 the anchors
    weigh what they weigh there only if each score's MSE counts in full (summed, not averaged
    over the two scores)."""
    g = torch.Generator().manual_seed(0)
    c, w, t = (torch.rand(5, 2, generator=g, dtype=torch.float64) for _ in range(3))
    mm_min = sum(float(((c[:, s] - 0.0) ** 2).mean()) for s in range(2))
    mm_max = sum(float(((w[:, s] - 1.0) ** 2).mean()) for s in range(2))
    assert anchor_loss(c, w).item() == pytest.approx(mm_min + mm_max, rel=1e-12)
    mm_max_t = sum(float(((w[:, s] - t[:, s]) ** 2).mean()) for s in range(2))
    assert anchor_loss(c, w, t).item() == pytest.approx(mm_min + mm_max_t, rel=1e-12)


@pytest.mark.parametrize("labels", ["params", "measured"])
def test_top_anchor_is_the_worst_draw_at_its_own_label(labels, monkeypatch):
    """Ranking pairs are ordered by the label in use; the top anchor must not contradict them:
    1 under the modelled labels, the worst render's measured value under the measured ones."""
    import degsr.estimator.module as mod

    seen = []
    monkeypatch.setattr(mod, "anchor_loss", lambda c, w, t=None: seen.append(t) or w.sum() * 0)
    cfg = load_config([TINY], ["estimator.objective=ranking", "estimator.within_crop_weight=0",
                               f"degradation.blur_label={labels}",
                               f"degradation.noise_label={labels}"])
    m = EstimatorModule(cfg.estimator, cfg.degradation)
    m.losses({"hr": hr_batch(3), "lr": torch.zeros(3, 3, 16, 16)})
    (target,) = seen
    assert target.shape == (3, 2) and 0 <= float(target.min()) and float(target.max()) <= 1
    if labels == "params":
        torch.testing.assert_close(target, torch.ones(3, 2))
    else:  # a noise field std over 16/255 is 1 only for the strongest draws on busy content
        assert float(target[:, 1].min()) < 1


def test_within_crop_mse_matches_a_loop_over_crops():
    g = torch.Generator().manual_seed(0)
    pred, true = torch.rand(9, 2, generator=g), torch.rand(9, 2, generator=g, dtype=torch.float64)
    crop = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 3])  # uneven groups and a singleton (adds 0)
    total = 0.0
    for i in range(9):
        same = [j for j in range(9) if crop[j] == crop[i]]
        for s in range(2):
            dp = float(pred[i, s]) - sum(float(pred[j, s]) for j in same) / len(same)
            dt = float(true[i, s]) - sum(float(true[j, s]) for j in same) / len(same)
            total += (dp - dt) ** 2
    assert within_crop_mse(pred, true, crop).item() == pytest.approx(total / 18, rel=1e-5)
    pairs = torch.arange(4).repeat_interleave(2)  # pairs: a quarter of the MSE of the differences
    d = (pred[0:8:2] - pred[1:8:2]) - (true[0:8:2] - true[1:8:2]).float()
    assert within_crop_mse(pred[:8], true[:8], pairs).item() == pytest.approx(
        (d ** 2).mean().item() / 4, rel=1e-5)


def test_within_crop_weight_needs_several_degradations_per_crop():
    with pytest.raises(ConfigError, match="estimator.within_crop_weight"):
        load_config([TINY], ["data.degradations_per_crop=1", "estimator.within_crop_weight=1"])
    with pytest.raises(ConfigError, match="data.degradations_per_crop"):
        load_config([TINY], ["data.batch_size=30", "data.degradations_per_crop=4"])


@pytest.mark.parametrize("label", ["params", "measured"])
def test_pairs_change_only_their_group(label):
    cfg = load_config([TINY], [f"degradation.noise_label={label}"]).degradation
    d = Degrader(cfg)
    pairs = ranking_batches(d, hr_batch(8), torch.Generator().manual_seed(1))
    (a, b), (_, c) = pairs["blur"], pairs["noise"]
    if label == "params":  # the modelled noise score reads no blur parameter; the measured one
        # sees the noise and JPEG on differently blurred content (each pair ranks its own score)
        assert torch.equal(a["scores"][:, 1], b["scores"][:, 1])  # blur pair: same noise score
    assert torch.equal(a["scores"][:, 0], c["scores"][:, 0])  # noise pair: same blur score
    assert (a["scores"][:, 0] != b["scores"][:, 0]).any() and (a["scores"][:, 1] != c["scores"][:, 1]).any()
    assert not a["clean"].any()


def test_worst_draw_scores_one_and_clean_lr_matches_engine():
    cfg = load_config([TINY]).degradation
    d = Degrader(cfg)
    draw = worst_draw(d, 3, torch.Generator().manual_seed(0))
    torch.testing.assert_close(degradation_scores(draw["params"], cfg), torch.ones(3, 2))
    hr = hr_batch(2)
    clean = Degrader(load_config([TINY], ["degradation.no_degradation_prob=1"]).degradation)(
        hr, torch.Generator().manual_seed(0))
    assert torch.equal(clean_lr(hr, 4), clean["lr"])


@pytest.mark.parametrize("objective,lr,steps,factor", [
    ("supervised", 3e-3, 20, 0.8), ("both", 3e-3, 20, 0.8), ("ranking", 1e-3, 40, 0.97)])
def test_a_few_steps_on_a_fixed_batch_reduce_the_loss(objective, lr, steps, factor, monkeypatch):
    import degsr.estimator.module as mod

    torch.manual_seed(0)
    cfg = load_config([TINY], [f"estimator.objective={objective}", f"estimator.lr={lr}"])
    module = EstimatorModule(cfg.estimator, cfg.degradation, seed=0)
    batch = Degrader(cfg.degradation)(hr_batch(8), torch.Generator().manual_seed(0))
    batch["crop"] = torch.arange(8) // 2  # as if each crop were degraded twice
    pairs = ranking_batches(module.degrader, batch["hr"], torch.Generator().manual_seed(1))
    monkeypatch.setattr(mod, "ranking_batches", lambda *a: pairs)  # a fixed batch: fixed pairs
    opt = module.configure_optimizers()["optimizer"]
    weights = {"supervised": 1.0, "ranking": 1.0, "anchor": 0.01, "within_crop": 1.0}

    def loss():
        return sum(weights[k] * v for k, v in module.losses(batch).items())

    first = loss().item()
    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < factor * first


def test_cosine_schedule_follows_its_closed_form():
    """The LR the optimizer applies at each step: warm-up 2 steps, cosine to 0 at max_steps 6,
    against values worked out by hand (0.5(1 + cos(pi t)) at t = 0, 1/4, 1/2, 3/4)."""
    import lightning as L

    cfg = load_config([TINY], ["estimator.lr=1e-3", "estimator.lr_schedule=cosine",
                               "estimator.warmup_steps=2"])
    module = EstimatorModule(cfg.estimator, cfg.degradation, seed=0)
    module.trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False)
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    half = 2 ** -0.5
    expect = [0.5e-3, 1e-3, 1e-3, 0.5e-3 * (1 + half), 0.5e-3, 0.5e-3 * (1 - half)]
    assert seen == pytest.approx(expect, rel=1e-9)
    const = load_config([TINY], ["estimator.lr=1e-3"])
    module = EstimatorModule(const.estimator, const.degradation, seed=0)
    module.trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False)
    conf = module.configure_optimizers()
    assert conf["optimizer"].param_groups[0]["lr"] == 1e-3


def test_degsr_fit_tiny_writes_checkpoint_export_and_resumes(tmp_path, degsr_cmd):
    from degsr.data.photos import write_photos

    write_photos(tmp_path / "train", ("astronaut", "rocket", "coins"))
    write_photos(tmp_path / "val", ("chelsea",))
    subprocess.run([*degsr_cmd, "shards", str(tmp_path / "train"), "--out", str(tmp_path / "shards"),
                    "--min-side", "64", "--min-bytes", "0"], check=True, capture_output=True)
    common = [str(TINY), f"data.train_shards={tmp_path}/shards", f"data.val_folder={tmp_path}/val",
              f"run.dir={tmp_path}/runs", "data.crop_size=64", "data.batch_size=4", "data.num_workers=0",
              "data.val_crops=8", "data.val_batch_size=8", "data.batches_per_epoch=3",
              "trainer.val_every_n_steps=2", "trainer.checkpoint_every_n_steps=2"]
    r = subprocess.run([*degsr_cmd, "fit", *common, "trainer.max_steps=4"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    run = Path(out["run_dir"])
    assert out["global_step"] == 4 and (run / "checkpoints/last.ckpt").is_file()
    assert (run / "config.yaml").is_file() and "val/spearman_blur" in out["metrics"]
    m = out["metrics"]  # the sweep target: the mean of the two scores' correlations
    assert m["val/spearman_mean"] == pytest.approx(
        (m["val/spearman_blur"] + m["val/spearman_noise"]) / 2, abs=1e-5)
    from degsr.estimator.export import load_estimator
    net = load_estimator(run / "export")
    assert net(torch.rand(1, 3, 16, 16)).shape == (1, 2)
    r2 = subprocess.run([*degsr_cmd, "fit", *common, "trainer.max_steps=6"], capture_output=True, text=True)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert json.loads(r2.stdout.strip().splitlines()[-1])["global_step"] == 6
    assert "resuming from" in r2.stderr
    # W&B offline: one run directory (the resumed job logs into the same run id), with the
    # validation scatter tables and example images
    runs = list((run / "wandb").glob("offline-run-*"))
    assert runs and all(r.name.endswith(runs[0].name.split("-")[-1]) for r in runs)
    media = [p.name for p in (run / "wandb").rglob("*") if p.is_file()]
    assert any("scatter_blur" in m for m in media) and any("examples" in m for m in media)


def test_ema_export_is_the_moving_average_of_the_weights_after_each_step(tmp_path, monkeypatch):
    """estimator.ema_decay: the export equals a float64 EMA of the weights recorded after every
    optimizer step (the first update copies them, then avg = d*avg + (1 - d)*w)."""
    from lightning.pytorch.callbacks import Callback
    from safetensors.torch import load_file

    import degsr.cli
    import degsr.training.fit as fitmod
    from degsr.data.photos import write_photos

    write_photos(tmp_path / "train", ("astronaut", "coins"))
    write_photos(tmp_path / "val", ("chelsea",))
    assert degsr.cli.main(["shards", str(tmp_path / "train"), "--out", str(tmp_path / "shards"),
                           "--min-side", "64", "--min-bytes", "0"]) == 0
    seen = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen.append({k: v.detach().double().clone() for k, v in module.net.state_dict().items()})

    real = fitmod.make_trainer
    monkeypatch.setattr(fitmod, "make_trainer",
                        lambda c, root, logger, extra=(): real(c, root, logger, [*extra, Record()]))
    decay = 0.6
    cfg = load_config([TINY], [f"data.train_shards={tmp_path}/shards",
                               f"data.val_folder={tmp_path}/val", f"run.dir={tmp_path}/runs",
                               "data.crop_size=64", "data.batch_size=4", "data.num_workers=0",
                               "data.val_crops=4", "data.val_batch_size=4", "logger.wandb=false",
                               "data.batches_per_epoch=3", "trainer.max_steps=5",
                               "trainer.val_every_n_steps=2", "estimator.lr=1e-2",
                               f"estimator.ema_decay={decay}"])
    out = fitmod.fit(cfg)
    assert out["status"] == "finished" and len(seen) == 5
    avg = dict(seen[0])
    for w in seen[1:]:
        avg = {k: decay * avg[k] + (1 - decay) * w[k] for k in avg}
    exported = load_file(Path(out["export"]) / "estimator.safetensors")
    assert exported.keys() == avg.keys()
    for k, v in exported.items():
        assert torch.allclose(v.double(), avg[k], atol=1e-6, rtol=0), k
    last = seen[-1]  # the average is not the last weights (the test can tell them apart)
    assert any(not torch.allclose(exported[k].double(), last[k], atol=1e-4) for k in last)


def test_mix_takes_the_group_and_its_kernels_from_the_other_draw():
    """mix(base, other, group, kernels): a parameter from ``other`` exactly when its name starts
    with a prefix of the group, a kernel from ``other`` exactly when named, the rest from base;
    checked name by name on two real draws."""
    from degsr.estimator.pairs import BLUR_GROUP, BLUR_KERNELS, NOISE_GROUP, mix

    d = Degrader(load_config([TINY]).degradation)
    g = torch.Generator().manual_seed(2)
    base, other = d.sample(3, g), d.sample(3, g)
    for group, kernels in ((BLUR_GROUP, BLUR_KERNELS), (NOISE_GROUP, ())):
        m = mix(base, other, group, kernels)
        assert set(m["params"]) == set(base["params"]) and set(m["kernels"]) == set(base["kernels"])
        for k, v in m["params"].items():
            src = other if any(k.startswith(p) for p in group) else base
            assert v is src["params"][k], k
        for k, v in m["kernels"].items():
            assert v is (other if k in kernels else base)["kernels"][k], k
    assert {"blur1", "blur2", "final"} <= set(base["kernels"])
    assert any(not torch.equal(base["kernels"][k], other["kernels"][k]) for k in BLUR_KERNELS)


def test_pair_members_are_rendered_with_the_same_noise():
    """Ranking pairs: both members of a pair start from the same generator state, so one draw
    rendered twice through the pair machinery gives the same LR twice, and that is what a plain
    apply from that state gives."""
    from degsr.estimator import pairs

    d = Degrader(load_config([TINY], ["degradation.no_degradation_prob=0"]).degradation)
    hr = hr_batch(4)
    g = torch.Generator().manual_seed(5)
    draw = d.sample(4, g)
    state = g.get_state()
    one, two = pairs._apply_same_noise(d, hr, [draw, draw], g)
    ref = d.apply(hr, draw, torch.Generator().set_state(state))
    assert torch.equal(one["lr"], ref["lr"]) and torch.equal(two["lr"], ref["lr"])
    again = d.apply(hr, draw, g)  # the generator has moved on: other noise (the check can fail)
    assert not torch.equal(again["lr"], ref["lr"])


def test_objective_terms_and_weights_by_hand(monkeypatch):
    """objective="both": supervised = MSE(net(lr), scores); ranking = the blur pair ranked on
    column 0 plus the noise pair on column 1 (formula written out); the clean anchor is the
    network on the engine's clean LR of the same HR; loss = the configured weighted sum."""
    import degsr.estimator.module as mod

    cfg = load_config([TINY], ["estimator.objective=both", "estimator.within_crop_weight=0",
                               "estimator.supervised_weight=0.3", "estimator.ranking_weight=0.7",
                               "estimator.anchor_weight=0.05", "estimator.margin=0.2",
                               "estimator.min_gap=0.01"])
    torch.manual_seed(0)
    m = EstimatorModule(cfg.estimator, cfg.degradation, seed=0)
    m.net.reset_parameters(residual_scale=1.0)  # outputs spread over (0, 1)
    hr = hr_batch(4)
    batch = Degrader(cfg.degradation)(hr, torch.Generator().manual_seed(0))
    pairs = ranking_batches(m.degrader, hr, torch.Generator().manual_seed(1))
    monkeypatch.setattr(mod, "ranking_batches", lambda *a: pairs)
    anchors = []
    monkeypatch.setattr(mod, "anchor_loss", lambda c, w, t=None: anchors.append((c, w, t)) or
                        anchor_loss(c, w, t))
    loss, terms = m.objective(batch)
    net = lambda x: m.net(x).detach().double()  # noqa: E731
    sup = ((net(batch["lr"]) - batch["scores"].double()) ** 2).mean()
    rank = 0.0
    for col, (a, b) in ((0, pairs["blur"]), (1, pairs["noise"])):
        pa, pb = net(a["lr"])[:, col], net(b["lr"])[:, col]
        ta, tb = a["scores"][:, col].double(), b["scores"][:, col].double()
        keep = [i for i in range(4) if abs(float(ta[i] - tb[i])) >= 0.01]
        assert keep
        rank += sum(max(0.0, 0.2 - float(torch.sign(ta[i] - tb[i]) * (pa[i] - pb[i])))
                    for i in keep) / len(keep)
    (clean_pred, worst_pred, worst_target), = anchors
    clean = Degrader(load_config([TINY], ["degradation.no_degradation_prob=1"]).degradation)(
        hr, torch.Generator().manual_seed(0))["lr"]
    torch.testing.assert_close(clean_pred.detach().double(), net(clean), rtol=0, atol=1e-6)
    anchor = (clean_pred.detach().double() ** 2).mean(0).sum() + (
        (worst_pred.detach().double() - worst_target.double()) ** 2).mean(0).sum()
    torch.testing.assert_close(terms["supervised"].detach().double(), sup, rtol=1e-5, atol=1e-7)
    assert float(terms["ranking"]) == pytest.approx(rank, rel=1e-5, abs=1e-7) and rank > 0
    torch.testing.assert_close(terms["anchor"].detach().double(), anchor, rtol=1e-5, atol=1e-7)
    want = 0.3 * sup + 0.7 * rank + 0.05 * anchor
    assert float(loss) == pytest.approx(float(want), rel=1e-5)


def test_validation_mse_and_correlations_over_the_kept_samples():
    """validation_step over two batches, padding repeats marked keep=False: val/mse is the mean
    over the kept samples of the per-sample mean squared error over the two scores, and the
    Spearman / Pearson correlations per score are scipy's / numpy's on the kept samples alone."""
    from scipy.stats import spearmanr

    cfg = load_config([TINY])
    torch.manual_seed(0)
    m = EstimatorModule(cfg.estimator, cfg.degradation, seed=0)
    m.net.reset_parameters(residual_scale=1.0)  # outputs spread over (0, 1)
    m.eval()
    g = torch.Generator().manual_seed(5)
    batches = []
    for n in (5, 4):
        lr = torch.rand(n, 3, 16, 16, generator=g)
        scores = torch.rand(n, 2, generator=g)
        batches.append({"lr": lr, "scores": scores})
    batches[1]["keep"] = torch.tensor([True, True, False, False])
    # the dropped rows are far from the rest: counting them would move every figure
    batches[1]["scores"][2:] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    with torch.no_grad():
        for i, b in enumerate(batches):
            m.validation_step(b, i)
        preds = [m.net(b["lr"]).double().numpy() for b in batches]
    pred = np.concatenate([preds[0], preds[1][:2]])
    true = np.concatenate([batches[0]["scores"].double().numpy(),
                           batches[1]["scores"][:2].double().numpy()])
    assert m.val_means.compute()["mse"] == pytest.approx(
        float(np.mean([np.mean((pred[i] - true[i]) ** 2) for i in range(7)])), rel=1e-5)
    for s, name in enumerate(("blur", "noise")):
        rho = spearmanr(pred[:, s], true[:, s]).statistic
        r = np.corrcoef(pred[:, s], true[:, s])[0, 1]
        assert float(m.val_metrics[f"spearman_{name}"].compute()) == pytest.approx(rho, abs=1e-5)
        assert float(m.val_metrics[f"pearson_{name}"].compute()) == pytest.approx(r, abs=1e-5)
