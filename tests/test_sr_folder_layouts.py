"""Stage-2 base folders as users have them on disk: the Hugging Face hub's files and cache."""

import hashlib
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
