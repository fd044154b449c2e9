"""The stage-2 generator: SD-Turbo + degradation-guided LoRA, one step (METHOD.md "Stage 2").

``SRModel`` is what training optimises and inference runs: the frozen base (VAE, UNet, the two
prompt embeddings), the modulated LoRA on the VAE encoder and the UNet, the UNet's ``conv_in``
(trained fully) and the modulation MLPs. Its **adapter** (``adapter.safetensors`` +
``adapter.json``) holds only what training changed; ``load_adapter`` puts it back on a base
folder.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from degsr.errors import UserError
from degsr.io import atomic_write_bytes
from degsr.sr.components import load_components
from degsr.sr.config import LoraConfig, ModelConfig
from degsr.sr.lora import fold, inject_modulated_lora, set_modulation, unfold
from degsr.sr.modulation import DegradationModulation, unet_block_id, vae_block_id
from degsr.sr.onestep import decode, denoise, encode_lr

ADAPTER_FORMAT = "degsr-adapter"
ADAPTER_VERSION = 1


class SRModel(nn.Module):
    def __init__(self, model: ModelConfig, lora: LoraConfig, device="cpu", dtype=torch.float32):
        super().__init__()
        self.model_cfg, self.lora_cfg = model, lora
        self.comp = load_components(model, device=device, dtype=dtype)
        vae_enc, unet = self.comp.vae.encoder, self.comp.unet
        kw = {"modulated": lora.modulated}
        self.vae_lora = inject_modulated_lora(vae_enc, lora.vae_targets, lora.vae_rank, lora.alpha,
                                              vae_block_id, **kw)
        self.unet_lora = inject_modulated_lora(unet, lora.unet_targets, lora.unet_rank, lora.alpha,
                                               unet_block_id, **kw)
        unet.conv_in.requires_grad_(True)
        self.modulation = DegradationModulation(lora, seed=model.seed) if lora.modulated else None
        self._folded: torch.Tensor | None = None  # the vector the LoRA is folded for (see fold)
        # the adapter's tensors, named once: a loaded (frozen) net saves the same ones
        self._adapter = {n for n, p in self.named_parameters() if p.requires_grad}
        self._adapter |= {n for n, _ in self.named_buffers() if n.startswith("modulation.")}
        self.to(device)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The adapter: every tensor training changes plus the (fixed, saved) Fourier W."""
        return {k: v for k, v in self.state_dict().items() if k in self._adapter}

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def set_degradation(self, d: torch.Tensor, cfg_batch: bool = False) -> None:
        """Modulate every LoRA layer for a batch of degradation vectors d (B, 2) [blur, noise].
        ``cfg_batch``: the UNet runs [positive; negative] halves, each sample twice."""
        self.unfold()
        if self.modulation is not None:
            c_vae, c_unet = self.modulation(d.float())
            set_modulation(self.comp.vae.encoder, c_vae)
            set_modulation(self.comp.unet, torch.cat([c_unet, c_unet]) if cfg_batch else c_unet)

    def fold(self, d: torch.Tensor) -> None:
        """Fold the LoRA, modulated by the one vector ``d[0]`` (1 or B, 2), into the base weights
        (inference's merge path: the LoRA layers then cost nothing). The fold stays until
        :meth:`unfold`, :meth:`set_degradation` or a fold for another vector; folding again for
        the same vector is free."""
        key = torch.zeros(0) if self.modulation is None else d[:1].detach().float().cpu()
        if self._folded is not None and torch.equal(self._folded, key):
            return
        c_vae, c_unet = (None, None) if self.modulation is None else self.modulation(d[:1].float())
        try:
            fold(self.comp.vae.encoder, c_vae)
            fold(self.comp.unet, c_unet)
        except BaseException:  # out of memory, Ctrl-C: no half-folded weights left behind
            self._folded = torch.zeros(0)
            self.unfold()
            raise
        self._folded = key

    def unfold(self) -> None:
        """The base weights back, bit-exactly (a no-op when nothing is folded)."""
        if self._folded is not None:
            unfold(self.comp.vae.encoder)
            unfold(self.comp.unet)
            self._folded = None

    def forward(self, lr_up: torch.Tensor, d: torch.Tensor, *, negative=None,
                guidance_scale=None, generator=None, posterior_mean: bool = False) -> torch.Tensor:
        """LR upsampled to the output size, in [-1, 1] -> SR in [-1, 1], one UNet step (the LR
        latent a posterior sample drawn from ``generator``, or its mean)."""
        self.set_degradation(d, cfg_batch=guidance_scale is not None and guidance_scale != 1)
        z = encode_lr(self.comp, lr_up, generator=generator, posterior_mean=posterior_mean)
        return decode(self.comp, denoise(self.comp, z, guidance_scale=guidance_scale,
                                         negative=negative))


def save_adapter(model: SRModel, path, extra: dict | None = None) -> Path:
    """Write ``adapter.safetensors`` + ``adapter.json`` into folder ``path`` (atomically)."""
    from safetensors.torch import save

    folder = Path(path).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.trainable_state().items()}
    pretrained = model.model_cfg.pretrained
    meta = {"format": ADAPTER_FORMAT, "format_version": ADAPTER_VERSION,
            "lora": dataclasses.asdict(model.lora_cfg),
            # pretrained is the user's to give; arch and seed build a random base, unused by one
            "model": {k: v for k, v in dataclasses.asdict(model.model_cfg).items()
                      if k not in (("pretrained", "arch", "seed") if pretrained else ("pretrained",))},
            # the base it was trained on: a folder (named, the path is the user's to give) or arch
            "base": Path(pretrained).expanduser().name if pretrained else None, **(extra or {})}
    atomic_write_bytes(folder / "adapter.safetensors", save(tensors))
    atomic_write_bytes(folder / "adapter.json", json.dumps(meta, indent=2).encode())
    return folder


def read_adapter_meta(path) -> tuple[Path, dict]:
    """The adapter's folder and ``adapter.json``, checked (:func:`adapter_configs`); every
    problem one line naming the file."""
    folder = Path(path).expanduser()
    folder = folder.parent if folder.suffix in (".json", ".safetensors") else folder
    meta_path = folder / "adapter.json"
    if not meta_path.is_file() or not (folder / "adapter.safetensors").is_file():
        raise UserError(f"{folder}: not an adapter export (needs adapter.json and adapter.safetensors)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{meta_path}: unreadable ({e})")
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise UserError(f"{meta_path}: format is {got!r}, expected {ADAPTER_FORMAT!r}")
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > ADAPTER_VERSION:
        raise UserError(f"{meta_path}: format_version {meta.get('format_version')!r}: this degsr "
                        f"reads up to {ADAPTER_VERSION} (a newer degsr wrote it?)")
    adapter_configs(meta_path, meta)
    return folder, meta


def adapter_configs(meta_path: Path, meta: dict) -> tuple[ModelConfig, LoraConfig]:
    """``adapter.json``'s ``model`` and ``lora`` sections as valid configs, or a UserError."""
    out = []
    for key, cls in (("model", ModelConfig), ("lora", LoraConfig)):
        try:
            cfg = cls(**meta.get(key))
        except TypeError as e:  # not a mapping, or a key this degsr does not know
            raise UserError(f"{meta_path}: '{key}' is not a valid {cls.__name__} ({e})") from None
        problems = cfg.problems()
        if problems:
            raise UserError(f"{meta_path}: {key}.{problems[0]}")
        out.append(cfg)
    return out[0], out[1]


def load_adapter(path, pretrained: str | None = None, device="cpu", dtype=torch.float32) -> tuple[SRModel, dict]:
    """An SRModel on the base ``pretrained`` folder (None: the adapter's random ``arch``) with the
    adapter's weights; returns it (eval, frozen) and the adapter's metadata."""
    from safetensors.torch import load_file

    folder, meta = read_adapter_meta(path)
    if pretrained is None and meta.get("base"):
        raise UserError(f"{folder}: this adapter was trained on the base folder "
                        f"'{meta['base']}': give that folder (--pretrained / model.pretrained)")
    model_cfg, lora_cfg = adapter_configs(folder / "adapter.json", meta)
    net = SRModel(dataclasses.replace(model_cfg, pretrained=pretrained), lora_cfg, device=device,
                  dtype=dtype)
    try:
        tensors = load_file(str(folder / "adapter.safetensors"), device=str(device))
    except Exception as e:  # noqa: BLE001 - any safetensors failure means a damaged file
        raise UserError(f"{folder / 'adapter.safetensors'}: unreadable ({type(e).__name__}: {e})")
    expected = set(net.trainable_state())
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    base = (f"; it was trained on the base folder '{meta['base']}', this is {pretrained}"
            if meta.get("base") and pretrained else "")
    if missing or unexpected:
        raise UserError(f"{folder / 'adapter.safetensors'}: does not match the base model "
                        f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}){base}")
    try:
        net.load_state_dict(tensors, strict=False)
    except RuntimeError as e:
        raise UserError(f"{folder / 'adapter.safetensors'}: shapes do not match the base model "
                        f"({str(e).splitlines()[-1].strip()}){base}")
    net.eval().requires_grad_(False)
    return net, meta
