"""What W&B's x axis (``trainer/global_step``) holds: the trainer's global step, for every key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import degsr.cli
from degsr.config import load_config
from degsr.data.photos import write_photos

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("wandb-steps")
    write_photos(d / "photos", ("astronaut", "rocket", "coins", "camera"))
    write_photos(d / "val", ("chelsea",))
    assert degsr.cli.main(["shards", str(d / "photos"), "--out", str(d / "shards"),
                           "--per-shard", "2", "--min-side", "16", "--min-bytes", "0"]) == 0
    return d


STAGES = {  # 2 training batches a step: max_steps 4 is 8 batches (2 epochs)
    "estimator": ("estimator_tiny.yaml", ["data.crop_size=64", "data.val_crop_size=64",
                                          "data.batch_size=4", "data.echo=1", "data.echo_window=1",
                                          "trainer.accumulate_grad_batches=2"]),
    "sr": ("sr_tiny.yaml", ["data.crop_size=32", "data.batch_size=2", "sr.accumulate=2",
                            "logger.images_every_n_steps=1"]),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_wandb_row_is_at_the_trainers_global_step(stage, shards, tmp_path, monkeypatch):
    """Validation scalars at the step their images (and the checkpoint) carry, not one before;
    stage 2's scalars in generator steps, not in training batches (sr.accumulate x as many);
    validation and training scalars every N optimizer steps, as the keys say, in both stages."""
    from lightning.pytorch.loggers import WandbLogger

    from degsr.training.fit import fit

    rows, images = [], {}  # (keys, step) of every row the logger hands W&B; its images by key
    monkeypatch.setattr(WandbLogger, "log_metrics",
                        lambda self, metrics, step=None: (rows.append((set(metrics), step)),
                                                          images.update(metrics)))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config, extra = STAGES[stage]
    cfg = load_config([ROOT / "configs" / config], [
        f"data.train_shards={shards}/shards", f"data.val_folder={shards}/val", "data.val_crops=4",
        "data.val_batch_size=4", "data.num_workers=0", "data.shuffle_buffer=4",
        "data.batches_per_epoch=4", "trainer.max_steps=4", "trainer.val_every_n_steps=2",
        "trainer.log_every_n_steps=2", "logger.wandb=true", f"run.dir={tmp_path}", *extra])
    out = fit(cfg)
    assert out["global_step"] == 4
    steps = [s for _, s in rows]
    assert steps and max(steps) == 4 and min(steps) >= 0, steps
    val = sorted({s for keys, s in rows if any(k.startswith("val/") for k in keys)})
    scalars = sorted({s for keys, s in rows if keys & {"val/spearman_mean", "val/psnr_y"}})
    assert scalars == val == [2, 4], rows  # one step per validation pass, every 2 steps
    train = [s for keys, s in rows if "train/loss" in keys]
    assert train == [2, 4], rows  # logged every 2 optimizer steps, once each
    if stage == "sr":  # each panel captioned with the degradation vector the model was given
        for key in ("train/panel", "val/panel"):
            caps = [im._caption for im in images[key]]
            assert caps and all(re.fullmatch(r"LR up \| SR \| HR; blur (\S+) noise (\S+)(; negative)?", c)
                                for c in caps), caps
            values = [float(v) for c in caps for v in re.findall(r"(?:blur|noise) (\S+)", c)]
            assert all(0 <= v <= 1 for v in values), caps


def test_the_last_step_is_validated_when_val_every_does_not_divide_max_steps(shards, tmp_path,
                                                                              monkeypatch):
    """max_steps 3, validation every 2: validated at 2 and at 3, the step exported; final.json
    held the metrics of step 2 (README: "the final validation (at trainer.max_steps ...)")."""
    import json

    from lightning.pytorch.loggers import WandbLogger

    from degsr.training.fit import fit

    rows = []
    monkeypatch.setattr(WandbLogger, "log_metrics",
                        lambda self, metrics, step=None: rows.append((set(metrics), step)))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config, extra = STAGES["estimator"]
    cfg = load_config([ROOT / "configs" / config], [
        f"data.train_shards={shards}/shards", f"data.val_folder={shards}/val", "data.val_crops=4",
        "data.val_batch_size=4", "data.num_workers=0", "data.shuffle_buffer=4",
        "data.batches_per_epoch=4", "trainer.max_steps=3", "trainer.val_every_n_steps=2",
        "logger.wandb=true", f"run.dir={tmp_path}", *extra[:-1]])
    out = fit(cfg)
    assert out["global_step"] == 3
    assert sorted({s for keys, s in rows if "val/spearman_mean" in keys}) == [2, 3], rows
    final = json.loads((Path(out["run_dir"]) / "final.json").read_text())
    last = [s for keys, s in rows if "val/spearman_mean" in keys][-1]
    assert final["global_step"] == last == 3 and "val/spearman_mean" in final["metrics"]
