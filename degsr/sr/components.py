"""The frozen base of Stage 2: SD-Turbo's UNet, VAE, scheduler and two prompt embeddings.

:func:`load_components` reads a **local diffusers folder** (``unet/ vae/ text_encoder/ tokenizer/
scheduler/ model_index.json``), after checking that it is one SD-Turbo-like model (every problem
is a one-line :class:`~degsr.errors.UserError` naming the file, key and value), or -- with no
folder -- builds the architecture ``model.arch`` of :mod:`degsr.sr.arch` with seeded random weights.

Prompts. The text encoder only ever sees the positive and the negative prompt, so both are encoded
once, exactly as diffusers' ``StableDiffusionPipeline.encode_prompt`` does with ``clip_skip=None``
(what S3Diff does too): tokenizer with ``padding="max_length"`` (77 tokens, SD 2.x pads with
``"!"``), ``truncation=True``, no attention mask (CLIP's causal mask only; a mask is passed only if
the text config sets ``use_attention_mask``), and the text model's ``last_hidden_state`` (after its
final layer norm). SD 2.x's "penultimate layer" is already built into the folder: its OpenCLIP-H
text tower has 23 of the 24 layers. The embeddings (``(1, 77, D)`` each) are computed on the CPU in
float32, then the text encoder and tokenizer are deleted (about 1.4 GB for OpenCLIP-H) -- the
components never hold them.

The random path (``model.pretrained`` unset) goes through the same :func:`encode_prompts` with a
tiny random CLIP text model whose width is the UNet's ``cross_attention_dim``: the embeddings are
meaningless, but the code path is the one users take.

:func:`degsr.sr.tiny_folder.save_tiny_pretrained` writes the ``tiny`` architecture in this layout.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from degsr import console
from degsr.errors import UserError
from degsr.sr.arch import arch_configs
from degsr.sr.config import ModelConfig
from degsr.sr.folder_check import (PREDICTION_TYPES, check_pretrained_folder, check_weights,
                                   unlike_sd_turbo)



class SRComponents(nn.Module):
    """UNet + VAE (submodules), scheduler, prompt embeddings (non-persistent buffers).

    ``pos_embeds`` / ``neg_embeds``: ``(1, L, D)``; they follow ``.to(device, dtype)`` with the
    networks but are not saved in a state dict (they come from the base folder). ``alpha_bar_t`` is
    a Python float (ᾱ at ``timestep``), so a half-precision ``.to()`` cannot round it.
    """

    def __init__(self, unet: nn.Module, vae: nn.Module, scheduler: Any, pos_embeds: torch.Tensor,
                 neg_embeds: torch.Tensor, *, timestep: int = 999):
        super().__init__()
        self.unet = unet
        self.vae = vae
        self.scheduler = scheduler
        self.register_buffer("pos_embeds", pos_embeds, persistent=False)
        self.register_buffer("neg_embeds", neg_embeds, persistent=False)
        self.timestep = int(timestep)
        from degsr.sr.onestep import alpha_bar
        self.alpha_bar_t = alpha_bar(scheduler, self.timestep)
        self.prediction_type = str(scheduler.config.get("prediction_type", "epsilon"))
        if self.prediction_type not in PREDICTION_TYPES:
            raise UserError(f"scheduler prediction_type {self.prediction_type!r} is not supported; "
                            f"use one of {', '.join(PREDICTION_TYPES)}")
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling_factor = float(vae.config.scaling_factor)

    def extra_repr(self) -> str:
        return (f"timestep={self.timestep}, alpha_bar_t={self.alpha_bar_t:.6g}, "
                f"vae_scale_factor={self.vae_scale_factor}, scaling_factor={self.scaling_factor}, "
                f"prompt_embeds={tuple(self.pos_embeds.shape)}")


# --------------------------------------------------------------------------- prompts

@torch.no_grad()
def encode_prompts(tokenizer: Any, text_encoder: nn.Module, prompts: Sequence[str]
                   ) -> torch.Tensor:
    """``(N, L, D)`` last hidden states of ``prompts``, as diffusers' ``encode_prompt``
    (``clip_skip=None``): padded to ``max_length``, truncated, no attention mask unless the text
    config asks for one."""
    max_len = min(int(tokenizer.model_max_length),
                  int(text_encoder.config.max_position_embeddings))
    tok = tokenizer(list(prompts), padding="max_length", max_length=max_len, truncation=True,
                    return_tensors="pt")
    device = next(text_encoder.parameters()).device
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = tok.attention_mask.to(device)
    return text_encoder(tok.input_ids.to(device), attention_mask=mask)[0]


# --------------------------------------------------------------------------- building

@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for the body, leaving the global RNG state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_unet(config: dict) -> nn.Module:
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(**config)


def build_vae(config: dict) -> nn.Module:
    from diffusers import AutoencoderKL
    return AutoencoderKL(**config)


def build_text_encoder(config: dict) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel
    return CLIPTextModel(CLIPTextConfig(**config))


def build_scheduler(config: dict) -> Any:
    """DDPM from a config dict; keys DDPM lacks (sd-turbo's ``set_alpha_to_one``) are ignored, as
    when diffusers loads a folder's scheduler config."""
    from diffusers import DDPMScheduler
    return DDPMScheduler.from_config(config)


# --------------------------------------------------------------------------- loading

@contextlib.contextmanager
def quiet_libraries():
    """transformers' and diffusers' loggers at error level and their progress bars off for the
    body (load reports, the "unsafe serialization" notes of .bin files, "Loading weights" bars)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    levels = tlog.get_verbosity(), dlog.get_verbosity()
    bars = tlog.is_progress_bar_enabled(), dlog.is_progress_bar_enabled()
    for lib in (tlog, dlog):
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, level, bar in zip((tlog, dlog), levels, bars):
            lib.set_verbosity(level)
            if bar:
                lib.enable_progress_bar()


def load_local(what: str, root: Path, fn, weights: bool = False, key: str = "model.pretrained",
               **kw):
    """``fn`` on ``root/what`` (local files only), any failure a one-line UserError naming the
    folder: a truncated or git-lfs-pointer weights file, a corrupt tokenizer, a bad config.
    ``weights``: a model whose weights file lacks tensors is an error too (diffusers and
    transformers load it anyway, the missing ones random or left on the meta device); a folder
    whose only weights are the fp16 variant (``*.fp16.safetensors``) loads that variant, one of
    only ``.bin`` files loads them without a safetensors look-up (whose miss diffusers logs as
    "An error occurred while trying to fetch")."""
    folder = root / what
    if weights:
        kw["output_loading_info"] = True
        fp16 = check_weights(folder, key)
        if fp16:
            kw["variant"] = "fp16"
        if not any((".fp16." in p.name) == fp16 for p in folder.glob("*.safetensors")):
            kw["use_safetensors"] = False  # .bin only: diffusers logs its safetensors miss as an error
    try:
        with quiet_libraries():  # their load reports and warnings: we say what matters once
            out = fn(str(root), subfolder=what, local_files_only=True, **kw)
    except Exception as e:  # noqa: BLE001 - safetensors, tokenizers and hub errors have own types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = f"{what}/ from {root}" if what else f"the model in {root}"
        raise UserError(f"{key}: cannot load {where}: {first}") from None
    if not weights:
        return out
    model, info = out
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.endswith("position_ids"))
    if missing:
        raise UserError(f"{key}: the weights in {folder} lack {len(missing)} tensor(s) "
                        f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): an "
                        "incomplete download, or weights of another model")
    return model


def _dtype_key() -> str:
    """transformers' ``from_pretrained`` keyword for the dtype (``torch_dtype`` before 4.56)."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def _load_pretrained(model: ModelConfig, dtype: torch.dtype):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(model.pretrained).expanduser()
    unlike = unlike_sd_turbo(check_pretrained_folder(root, model.timestep))
    if unlike:
        console.log.warning(f"model.pretrained: {root} is not SD-Turbo: {unlike}. It loads and "
                            "trains, but the method and the shipped settings are SD-Turbo's")
    tokenizer = load_local("tokenizer", root, CLIPTokenizer.from_pretrained)
    # float32 weights: SD 2.x configs say float16, which transformers >= 5 would load them as
    text_encoder = load_local("text_encoder", root, CLIPTextModel.from_pretrained, True,
                         **{_dtype_key(): torch.float32}).float().eval()
    embeds = encode_prompts(tokenizer, text_encoder, [model.pos_prompt, model.neg_prompt])
    del text_encoder, tokenizer                       # only the two embeddings are ever needed
    # DDPM from the folder's config whatever its class (sd-turbo ships Euler's): only the
    # training schedule (alphas_cumprod) is used.
    scheduler = load_local("scheduler", root, DDPMScheduler.from_pretrained)
    unet = load_local("unet", root, UNet2DConditionModel.from_pretrained, True, torch_dtype=dtype)
    vae = load_local("vae", root, AutoencoderKL.from_pretrained, True, torch_dtype=dtype)
    return unet, vae, scheduler, embeds


def _build_random(model: ModelConfig, device: torch.device):
    from transformers import CLIPTokenizer

    from degsr.sr.tiny_folder import write_tiny_tokenizer

    cfg = arch_configs(model.arch)
    with _seeded(model.seed):
        # a tiny text model as wide as the UNet's cross-attention: random embeddings through the
        # same encode path as a real folder
        text_cfg = arch_configs("tiny")["text"]
        width = cfg["unet"]["cross_attention_dim"]
        text_cfg.update(hidden_size=width, intermediate_size=2 * width, projection_dim=width)
        text_encoder = build_text_encoder(text_cfg).eval()
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = CLIPTokenizer.from_pretrained(
                str(write_tiny_tokenizer(tmp, text_cfg["max_position_embeddings"])))
        embeds = encode_prompts(tokenizer, text_encoder, [model.pos_prompt, model.neg_prompt])
        del text_encoder, tokenizer
        with torch.device(device) if device.type == "meta" else contextlib.nullcontext():
            unet, vae = build_unet(cfg["unet"]), build_vae(cfg["vae"])
    return unet, vae, build_scheduler(cfg["scheduler"]), embeds


def load_components(model: Optional[ModelConfig] = None, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> SRComponents:
    """SD-Turbo's frozen parts for Stage 2 (see the module docstring).

    ``model.pretrained`` set: check and load the local folder (``local_files_only``); otherwise
    build ``model.arch`` with random weights seeded by ``model.seed`` (``device="meta"`` builds it
    without memory). UNet and VAE are in eval mode with ``requires_grad=False``; the caller
    unfreezes what it trains.
    """
    model = model or ModelConfig()
    device = torch.device(device)
    if model.pretrained:
        unet, vae, scheduler, embeds = _load_pretrained(model, dtype)
    else:
        if model.arch not in ("tiny", "sd-turbo"):
            raise UserError(f"model.arch: must be 'tiny' or 'sd-turbo', got {model.arch!r}")
        n = build_scheduler(arch_configs(model.arch)["scheduler"]).config.num_train_timesteps
        if not 0 <= model.timestep < n:
            raise UserError(f"model.timestep: {model.timestep} is outside [0, {n - 1}]")
        unet, vae, scheduler, embeds = _build_random(model, device)
    embeds = embeds.detach()
    comp = SRComponents(unet, vae, scheduler, embeds[:1].clone(), embeds[1:].clone(),
                        timestep=model.timestep)
    comp.requires_grad_(False)
    comp.eval()
    return comp.to(device=device, dtype=dtype)
