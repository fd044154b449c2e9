"""Stage-2 base folders as users have them on disk: the Hugging Face hub's files and cache."""

import hashlib
import logging
import os
import shutil

import pytest

from degsr.errors import UserError
from degsr.sr.components import load_components
from degsr.sr.config import ModelConfig
from degsr.sr.tiny_folder import save_tiny_pretrained


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_pretrained(tmp_path_factory.mktemp("sd") / "tiny-sd", seed=0)


def _as_hub_cache(folder, top, revision="abc123"):
    """``folder`` as huggingface_hub caches it: ``top/snapshots/<revision>/`` of symlinks into
    ``top/blobs/``, ``top/refs/main`` naming the revision."""
    snap, blobs = top / "snapshots" / revision, top / "blobs"
    blobs.mkdir(parents=True)
    (top / "refs").mkdir()
    (top / "refs" / "main").write_text(revision)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    return snap


def test_a_hub_cache_snapshot_loads_and_its_top_folder_names_it(tiny_folder, tmp_path):
    top = tmp_path / "models--stabilityai--sd-turbo"
    snap = _as_hub_cache(tiny_folder, top)
    assert load_components(ModelConfig(pretrained=str(snap))).unet is not None
    with pytest.raises(UserError) as err:
        load_components(ModelConfig(pretrained=str(top)))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"model.pretrained: {top} is a Hugging Face cache")
    assert msg.endswith(f"use its snapshot {snap}"), msg
    (top / "refs" / "main").unlink()
    shutil.copytree(snap, top / "snapshots" / "def456", symlinks=True)
    with pytest.raises(UserError, match="use one of its snapshots in .*snapshots$"):
        load_components(ModelConfig(pretrained=str(top)))


POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n"
WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
           "text_encoder": "model"}


def _add_fp16_variant(folder):
    """Beside each ``<name>.safetensors``, its half-precision ``<name>.fp16.safetensors`` (the
    hub's sd-turbo layout); returns the fp16 UNet tensors."""
    import torch
    from safetensors.torch import load_file, save_file

    for sub, stem in WEIGHTS.items():
        full = load_file(folder / sub / f"{stem}.safetensors")
        half = {k: v.to(torch.float16) for k, v in full.items()}
        save_file(half, folder / sub / f"{stem}.fp16.safetensors", metadata={"format": "pt"})
    return load_file(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors")


def test_fp16_variant_beside_git_lfs_pointers_loads_the_variant(tiny_folder, tmp_path):
    """A clone then `git lfs pull --include "*fp16*"`: the full-precision files are pointers,
    the fp16 ones real; the fp16 variant loads (as float32)."""
    import torch

    folder = tmp_path / "sd-turbo"
    shutil.copytree(tiny_folder, folder)
    half = _add_fp16_variant(folder)
    for sub, stem in WEIGHTS.items():
        (folder / sub / f"{stem}.safetensors").write_text(POINTER)
    comp = load_components(ModelConfig(pretrained=str(folder)))
    assert comp.unet.conv_in.weight.dtype == torch.float32
    assert torch.equal(comp.unet.conv_in.weight, half["conv_in.weight"].float())


@pytest.mark.parametrize("variant", ["", ".fp16"])
def test_legacy_bin_weights_load_without_error_lines(tiny_folder, tmp_path, variant):
    """Older downloads (SD 2.1's hub folder) hold ``diffusion_pytorch_model.bin`` /
    ``pytorch_model.bin`` (or their fp16 variants) only: they load, and nothing printed reads
    like a failure (diffusers logs a missing safetensors file as an error before the .bin)."""
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "sd-bin"
    shutil.copytree(tiny_folder, folder)
    bins = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
            "text_encoder": "pytorch_model"}
    for sub, stem in WEIGHTS.items():
        path = folder / sub / f"{stem}.safetensors"
        torch.save(load_file(path), folder / sub / f"{bins[sub]}{variant}.bin")
        path.unlink()
    said = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("diffusers").addHandler(handler)
    try:
        comp = load_components(ModelConfig(pretrained=str(folder)))
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert said == []
    saved = torch.load(folder / "unet" / f"diffusion_pytorch_model{variant}.bin")
    assert torch.equal(comp.unet.conv_in.weight, saved["conv_in.weight"])


def test_a_single_file_checkpoint_is_named_as_a_file(tmp_path):
    """sd-turbo's hub repo also holds sd_turbo.safetensors (what UIs load): given as
    model.pretrained it is a file, not a missing folder."""
    ckpt = tmp_path / "sd_turbo.safetensors"
    ckpt.write_bytes(b"\0" * 16)
    with pytest.raises(UserError) as err:
        load_components(ModelConfig(pretrained=str(ckpt)))
    assert str(err.value) == (f"model.pretrained: {ckpt} is a file, not a folder: give the "
                              "diffusers folder (unet/ vae/ text_encoder/ ...), not a single-file "
                              "checkpoint")
