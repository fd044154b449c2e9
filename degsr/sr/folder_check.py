"""Is a local folder one SD-Turbo-like diffusers model? Every problem a one-line
:class:`~degsr.errors.UserError` naming the file, the key and its value, before any library
loads it (their own errors name neither): :func:`check_pretrained_folder` for the configs,
:func:`check_weights` for the weights files a library will read (a git-lfs pointer, a truncated
download).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from degsr.errors import UserError

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
PREDICTION_TYPES = ("epsilon", "v_prediction")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"model.pretrained: {path} is missing (a diffusers model folder has a "
                        f"config file in every subfolder)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"model.pretrained: cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"model.pretrained: {path} is not a JSON object")
    return data


def _bad(path: Path, key: str, value: Any, want: str) -> UserError:
    return UserError(f"model.pretrained: {path}: {key} is {value!r}, expected {want} "
                     f"(is this an SD-Turbo / SD 2.1 folder?)")


def hub_cache_snapshot(root: Path) -> Path | None:
    """For a Hugging Face cache folder (``models--org--name/`` with ``snapshots/``, which users
    point at for the model it caches), the snapshot to use instead: the one ``refs/main`` names,
    else the only one (otherwise the ``snapshots/`` folder to pick from); None for other folders."""
    snaps = root / "snapshots"
    if not snaps.is_dir():
        return None
    ref = root / "refs" / "main"
    main = snaps / ref.read_text().strip() if ref.is_file() else None
    if main is not None and main.is_dir():
        return main
    found = sorted(p for p in snaps.iterdir() if p.is_dir())
    return found[0] if len(found) == 1 else snaps


def check_pretrained_folder(folder: str | Path, timestep: int = 999) -> dict[str, dict]:
    """Check that ``folder`` is one SD-Turbo-like diffusers model; return the subfolders' configs
    (``unet``, ``vae``, ``text_encoder``, ``scheduler``). Raises a one-line :class:`UserError`."""
    root = Path(folder).expanduser()
    if root.is_file():  # sd-turbo's hub repo also ships sd_turbo.safetensors, what UIs load
        raise UserError(f"model.pretrained: {folder} is a file, not a folder: give the diffusers "
                        f"folder (unet/ vae/ text_encoder/ ...), not a single-file checkpoint")
    if not root.is_dir():
        raise UserError(f"model.pretrained: folder not found: {folder}")
    snapshot = hub_cache_snapshot(root)
    if snapshot is not None and not (root / "unet").is_dir():
        use = (f"one of its snapshots in {snapshot}" if snapshot.name == "snapshots"
               else f"its snapshot {snapshot}")
        raise UserError(f"model.pretrained: {root} is a Hugging Face cache folder, not a model "
                        f"folder: use {use}")
    expected = ", ".join(s + "/" for s in SUBFOLDERS)
    for sub in SUBFOLDERS:
        if not (root / sub).is_dir():
            raise UserError(f"model.pretrained: {root} has no {sub}/ subfolder; a diffusers "
                            f"SD-Turbo folder holds {expected} and model_index.json")
    index_path = root / "model_index.json"
    if index_path.is_file():
        index = _read_json(index_path)
        extra = [k for k in ("text_encoder_2", "tokenizer_2") if k in index]
        if extra:
            raise UserError(f"model.pretrained: {index_path} lists {', '.join(extra)} "
                            f"({index.get('_class_name')}): an SDXL-style model with two text "
                            f"encoders, not SD-Turbo")

    unet_path, vae_path = root / "unet" / "config.json", root / "vae" / "config.json"
    text_path = root / "text_encoder" / "config.json"
    sched_path = root / "scheduler" / "scheduler_config.json"
    unet, vae = _read_json(unet_path), _read_json(vae_path)
    text, sched = _read_json(text_path), _read_json(sched_path)

    if unet.get("_class_name") != "UNet2DConditionModel":
        raise _bad(unet_path, "_class_name", unet.get("_class_name"), "'UNet2DConditionModel'")
    if vae.get("_class_name") != "AutoencoderKL":
        raise _bad(vae_path, "_class_name", vae.get("_class_name"), "'AutoencoderKL'")
    archs = text.get("architectures") or []
    if text.get("model_type") != "clip_text_model" or (archs and "CLIPTextModel" not in archs):
        got = archs[0] if archs else text.get("model_type")
        raise _bad(text_path, "architectures" if archs else "model_type", got,
                   "'CLIPTextModel' (model_type 'clip_text_model')")
    tok = root / "tokenizer"
    if not ((tok / "vocab.json").is_file() and (tok / "merges.txt").is_file()
            or (tok / "tokenizer.json").is_file()):
        raise UserError(f"model.pretrained: {tok} holds neither vocab.json + merges.txt nor "
                        f"tokenizer.json (a CLIP tokenizer)")

    if unet.get("addition_embed_type") is not None:
        raise _bad(unet_path, "addition_embed_type", unet["addition_embed_type"],
                   "None (SDXL-style added conditioning is not supported)")
    latent = vae.get("latent_channels", 4)  # SD-Turbo: 4
    for key in ("in_channels", "out_channels"):
        if unet.get(key, 4) != latent:
            raise _bad(unet_path, key, unet.get(key),
                       f"{latent} ({vae_path}: latent_channels {latent})")
    for key in ("in_channels", "out_channels"):
        if vae.get(key, 3) != 3:
            raise _bad(vae_path, key, vae.get(key), "3 (RGB)")
    cross = unet.get("cross_attention_dim", 1280)
    hidden = text.get("hidden_size")
    if cross != hidden:
        raise UserError(f"model.pretrained: {unet_path}: cross_attention_dim is {cross!r} but "
                        f"{text_path}: hidden_size is {hidden!r}; they must match (SD-Turbo: 1024)")
    pred = sched.get("prediction_type", "epsilon")
    if pred not in PREDICTION_TYPES:
        raise _bad(sched_path, "prediction_type", pred, "'epsilon' (SD-Turbo) or 'v_prediction'")
    n = sched.get("num_train_timesteps", 1000)
    if not 0 <= timestep < n:
        raise UserError(f"model.timestep: {timestep} is outside the scheduler's "
                        f"[0, {n - 1}] ({sched_path}: num_train_timesteps {n})")
    return {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": sched}


SD_UNET_WIDTHS = [320, 640, 1280, 1280]  # every full-size Stable Diffusion 1.x / 2.x UNet


def unlike_sd_turbo(configs: dict[str, dict]) -> str | None:
    """For a full-size Stable Diffusion UNet (block_out_channels 320-640-1280-1280), what in
    :func:`check_pretrained_folder`'s configs says it is not SD-Turbo (SD 1.x's 768-wide
    cross-attention, SD 2.x-768's v-prediction); None when nothing does, or for other sizes."""
    unet, sched = configs["unet"], configs["scheduler"]
    if list(unet.get("block_out_channels") or []) != SD_UNET_WIDTHS:
        return None
    cross = unet.get("cross_attention_dim", 1280)
    if cross != 1024:
        return f"unet cross_attention_dim is {cross} (SD 1.x: 768; SD-Turbo: 1024)"
    if sched.get("prediction_type", "epsilon") != "epsilon":
        return (f"scheduler prediction_type is {sched['prediction_type']!r} (SD 2.x 768-v; "
                f"SD-Turbo: 'epsilon')")
    return None


LFS_POINTER = b"version https://git-lfs"


def check_weights_file(path: Path, key: str = "model.pretrained") -> None:
    """A weights file that is a git-lfs pointer (a clone without git-lfs), or a safetensors file
    whose header does not parse or whose tensors run past its end (an interrupted download):
    one line naming the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if (head + f.read(len(LFS_POINTER) - 8)).startswith(LFS_POINTER):
                raise UserError(f"{key}: {path} is a git-lfs pointer, not the weights "
                                f"(cloned without git-lfs: run `git lfs pull` in the model folder)")
            if path.suffix != ".safetensors":
                return
            f.seek(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
    except OSError as e:
        raise UserError(f"{key}: cannot read {path}: {e.strerror or e}") from None
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise UserError(f"{key}: {path} is not a readable safetensors file (its header "
                        f"does not parse): a damaged or incomplete download")
    end = 8 + n + max((int(t["data_offsets"][1]) for k, t in header.items()
                       if k != "__metadata__" and isinstance(t, dict) and "data_offsets" in t),
                      default=0)
    if size < end:
        raise UserError(f"{key}: {path} is truncated ({size} of {end} bytes): an "
                        "incomplete download")


def is_lfs_pointer(path: Path) -> bool:
    """Whether ``path`` is a git-lfs pointer (unreadable: False, :func:`check_weights_file` says
    why)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(LFS_POINTER)) == LFS_POINTER
    except OSError:
        return False


def check_weights(folder: Path, key: str = "model.pretrained") -> bool:
    """Check the weights files a library will read from ``folder`` (:func:`check_weights_file`);
    return whether that is the fp16 variant: ``*.fp16.*`` files beside none or only git-lfs
    pointers (a hub download with ``variant="fp16"``, or a clone then ``git lfs pull --include
    "*fp16*"``). Safetensors are read when there are any: a ``.bin`` beside them may be a
    git-lfs pointer left by ``git lfs pull --include "*.safetensors"``."""
    files = sorted(p for p in folder.glob("*") if p.suffix in (".safetensors", ".bin"))
    if not files:
        raise UserError(f"{key}: {folder} has no weights file (*.safetensors or *.bin)")
    full = [p for p in files if ".fp16." not in p.name]
    fp16 = len(full) < len(files) and all(is_lfs_pointer(p) for p in full)
    variant = [p for p in files if (".fp16." in p.name) == fp16]
    for path in [p for p in variant if p.suffix == ".safetensors"] or variant:
        check_weights_file(path, key)
    return fp16
