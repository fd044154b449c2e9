"""Degradation-modulated LoRA for ``nn.Linear`` and ``nn.Conv2d`` (METHOD.md, "Stage 2").

A target layer ``W0`` becomes :class:`ModulatedLoRA`::

    y = W0 x + s * B( C^T (A x) ),   s = alpha / r,   A ~ N(0, (1/r)^2),   B = 0,

with ``C (r x r)`` given per sample (one per block id, from :mod:`degsr.sr.modulation`). Linear:
``A: in -> r``, ``B: r -> out``. Conv: ``A`` is a conv ``in -> r`` with the base layer's kernel,
stride, padding and dilation; ``B`` a 1x1 conv ``r -> out``; ``C^T`` mixes the r channels of every
pixel of every sample in between. ``A`` is drawn as peft's ``init_lora_weights="gaussian"`` (std
1/r), which is what the reference S3Diff uses; ``B`` starts at zero, so a fresh model equals its
base exactly.

Why our own wrapper and not peft: the reference injects peft LoRA layers and then monkey-patches
their bound ``forward`` with a copy of peft's internal forward (private helpers, adapter dicts,
dropout, DoRA branches) to slip in ``C``. That copy breaks whenever peft's internals move, and
peft's merge machinery knows nothing of ``C`` (its merged weight would be ``W0 + s B A``, which is
wrong here), so the merge path, the per-call ``C`` and the exact weight restore would all be ours
anyway. What peft does give -- the target-matching rule (exact name or ``"." + suffix``; a string
is a full-match regex) and the gaussian/zero init -- is reproduced here in a few lines and checked
against peft itself in ``tests/test_lora.py``. Parameter names keep peft's spirit
(``<layer>.base_layer.weight``, ``<layer>.lora_A.weight``, ``<layer>.lora_B.weight``); a reference
checkpoint maps over by dropping its adapter-name segment (``lora_A.default.weight`` ->
``lora_A.weight``; ``vae_skip`` for the VAE).

Per-call modulation: :func:`set_modulation` (or the :func:`use_modulation` context) hands each layer
the ``C`` of its block id: ``(B, r, r)`` for a batch of B samples, or ``(1, r, r)`` shared by all.
The tensor stays attached until cleared; with gradient checkpointing keep it set until the
backward pass is done (recomputation reads it again).

Merge path: :func:`fold` folds ``s B C^T A`` into each base weight in place when the whole batch
shares one ``C`` (one degradation vector), so the layers run as plain layers; a later fold with
another ``C`` recomputes from the kept original, and :func:`unfold` restores it bit-exactly.
:func:`merged` is the two as a context.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence, Union

import torch
from torch import nn

Targets = Union[str, Sequence[str]]
CByBlock = Union[Mapping[int, torch.Tensor], torch.Tensor]


class ModulatedLoRA(nn.Module):
    """``base_layer(x) + s * B(C^T (A x))`` with a per-sample ``C``; see the module docstring."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, *, block_id: int = 0,
                 modulated: bool = True, dtype: torch.dtype | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        w = base.weight
        if dtype is None:  # train adapters in float32 on a half-precision base (as peft does)
            dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        kw = dict(device=w.device, dtype=dtype, bias=False)
        if isinstance(base, nn.Linear):
            self.lora_A = nn.Linear(base.in_features, rank, **kw)
            self.lora_B = nn.Linear(rank, base.out_features, **kw)
        elif isinstance(base, nn.Conv2d):
            if base.groups != 1:
                raise TypeError(f"grouped convolutions are not supported (groups={base.groups})")
            self.lora_A = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride,
                                    base.padding, base.dilation, padding_mode=base.padding_mode,
                                    **kw)
            self.lora_B = nn.Conv2d(rank, base.out_channels, 1, **kw)
        else:
            raise TypeError(f"LoRA supports nn.Linear and nn.Conv2d, got {type(base).__name__}")
        self.base_layer = base
        self.rank, self.alpha, self.scaling = rank, float(alpha), float(alpha) / rank
        self.block_id, self.modulated = int(block_id), bool(modulated)
        self.C: torch.Tensor | None = None
        self.is_merged = False
        self.pristine: torch.Tensor | None = None  # W0 while folded (see fold); not a buffer
        self.factors: tuple[torch.Tensor, torch.Tensor] | None = None  # (s B, A) while folded
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A ~ N(0, std 1/r) (peft's "gaussian"), B = 0."""
        nn.init.normal_(self.lora_A.weight, std=1.0 / self.rank)
        nn.init.zeros_(self.lora_B.weight)

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, alpha={self.alpha}, block_id={self.block_id}, "
                f"modulated={self.modulated}")

    def _mix(self, a: torch.Tensor) -> torch.Tensor:
        C = self.C
        if C is None:
            raise RuntimeError("modulated LoRA layer called without its C: call "
                               "set_modulation(model, C_by_block) before the forward pass")
        if C.dim() == 2:
            C = C[None]
        n = a.shape[0]
        if C.shape[1:] != (self.rank, self.rank) or C.shape[0] not in (1, n):
            raise ValueError(f"C must be (1 or {n}, {self.rank}, {self.rank}) for a batch of {n}, "
                             f"got {tuple(C.shape)}")
        C = C.to(a.dtype)
        if isinstance(self.lora_A, nn.Conv2d):                     # (n, r, H, W): C^T per pixel
            return torch.matmul(C.transpose(1, 2), a.flatten(2)).view_as(a)
        return torch.matmul(a.reshape(n, -1, self.rank), C).view_as(a)   # rows: a @ C

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.is_merged:
            return out
        a = self.lora_A(x.to(self.lora_A.weight.dtype))
        if self.modulated:
            a = self._mix(a)
        return out + (self.lora_B(a) * self.scaling).to(out.dtype)


# --------------------------------------------------------------------------- targets, injection

def _matches(name: str, targets: Targets) -> bool:
    """peft's rule: a string is a full-match regex; a list matches the name or a ``.suffix``."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith("." + t) for t in targets)


def _candidates(model: nn.Module, targets: Targets) -> list[tuple[str, nn.Module]]:
    inside: list[str] = []
    found = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue                                   # the insides of an existing adapter
        if isinstance(module, ModulatedLoRA):
            inside.append(name)
            continue
        if name and _matches(name, targets):
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                raise TypeError(f"LoRA target {name!r} is a {type(module).__name__}; only "
                                f"nn.Linear and nn.Conv2d are supported")
            found.append((name, module))
    return found


def lora_targets(model: nn.Module, targets: Targets) -> list[str]:
    """Names of the modules of ``model`` that :func:`inject_modulated_lora` would adapt."""
    return [name for name, _ in _candidates(model, targets)]


def inject_modulated_lora(model: nn.Module, targets: Targets, rank: int, alpha: float,
                          block_id_fn: Callable[[str], int] | None = None, *,
                          modulated: bool = True, dtype: torch.dtype | None = None
                          ) -> list[tuple[str, ModulatedLoRA]]:
    """Replace every target layer of ``model`` in place by a :class:`ModulatedLoRA`.

    ``block_id_fn(name)`` gives each layer's block id (names relative to ``model``; default 0).
    The base layers are frozen; the new A / B are trainable; nothing else changes
    ``requires_grad``. Layers that already are adapters are left alone. Returns
    ``[(name, layer)]`` in module order.
    """
    out = []
    for name, base in _candidates(model, targets):
        block_id = block_id_fn(name) if block_id_fn is not None else 0
        layer = ModulatedLoRA(base, rank, alpha, block_id=block_id, modulated=modulated,
                              dtype=dtype)
        base.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        out.append((name, layer))
    return out


def modulated_layers(model: nn.Module) -> list[tuple[str, ModulatedLoRA]]:
    """``[(name, layer)]`` of every :class:`ModulatedLoRA` in ``model`` (the layer's own name)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ModulatedLoRA)]


def lora_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The A and B weights of every adapter in ``model``."""
    for _, layer in modulated_layers(model):
        yield from layer.lora_A.parameters()
        yield from layer.lora_B.parameters()


# --------------------------------------------------------------------------- modulation per call

def _block_C(C_by_block: CByBlock, block_id: int) -> torch.Tensor:
    if isinstance(C_by_block, torch.Tensor):
        if C_by_block.dim() != 4:
            raise ValueError("a tensor of modulations must be (B, blocks, r, r), got shape "
                             f"{tuple(C_by_block.shape)}")
        return C_by_block[:, block_id]
    try:
        return C_by_block[block_id]
    except KeyError:
        raise KeyError(f"no modulation C given for block id {block_id}") from None


def set_modulation(model: nn.Module, C_by_block: CByBlock | None) -> None:
    """Give every modulated adapter of ``model`` the ``C`` of its block for the next forward calls.

    ``C_by_block``: ``{block_id: (B or 1, r, r)}`` or a tensor ``(B, blocks, r, r)`` as
    :class:`degsr.sr.modulation.DegradationModulation` returns; ``None`` clears.
    """
    for _, layer in modulated_layers(model):
        layer.C = None if C_by_block is None or not layer.modulated else _block_C(
            C_by_block, layer.block_id)


def clear_modulation(model: nn.Module) -> None:
    """Drop the ``C`` tensors (and the autograd graph they hold) from every adapter."""
    set_modulation(model, None)


@contextmanager
def use_modulation(model: nn.Module, C_by_block: CByBlock) -> Iterator[nn.Module]:
    """:func:`set_modulation` for the body of a ``with`` block, cleared on exit."""
    set_modulation(model, C_by_block)
    try:
        yield model
    finally:
        clear_modulation(model)


def _single_C(C: torch.Tensor, name: str) -> torch.Tensor:
    if C.dim() == 2:
        return C
    if C.dim() != 3:
        raise ValueError(f"{name}: C must be (n, r, r), got shape {tuple(C.shape)}")
    if C.shape[0] > 1 and not bool((C == C[:1]).all()):
        raise ValueError(f"{name}: merging needs one degradation vector for the whole batch, but "
                         f"the {C.shape[0]} rows of C differ; run unmerged instead")
    return C[0]


def fold(model: nn.Module, C_by_block: CByBlock | None = None, *, offload: bool = False) -> None:
    """Fold every adapter of ``model`` into its base weight: ``W = W0 + (s B C^T) A``.

    The first fold keeps a copy of each original weight ``W0`` (on the CPU with ``offload``);
    folding again with another ``C`` recomputes from that copy, so refolds never drift: one
    ``addmm`` per layer (the weight's dtype, float32 accumulation), reading ``W0`` and writing
    ``W``; ``s B`` and ``A`` are read at the first fold (unfold before changing them). For a conv, ``A`` (k x k, stride, padding) followed by 1x1 convs is one k x k conv with
    the same stride and padding whose kernel is ``(B C^T) @ A`` over the channel dimension.
    :func:`unfold` copies ``W0`` back bit-exactly. ``C_by_block`` as for
    :func:`set_modulation`, with one ``C`` for the whole batch (``(1, r, r)`` or identical rows);
    None for unmodulated adapters.
    """
    layers = []
    for name, layer in modulated_layers(model):  # check everything before touching any weight
        C = None
        if layer.modulated:
            if C_by_block is None:
                raise ValueError("merged() of modulated adapters needs C_by_block")
            C = _single_C(_block_C(C_by_block, layer.block_id), name)
        layers.append((layer, C))
    with torch.no_grad():
        cts: dict[tuple[int, torch.dtype], torch.Tensor] = {}  # C^T of each block, once per fold
        for layer, C in layers:
            w = layer.base_layer.weight
            if layer.pristine is None:  # first fold: keep W0, and s B and A in the fold's dtype
                layer.pristine = w.detach().to("cpu" if offload else w.device, copy=True)
                wide = torch.promote_types(layer.lora_A.weight.dtype, torch.float32)
                dt = w.dtype if w.dtype in (torch.float16, torch.bfloat16) else wide
                sB = layer.scaling * layer.lora_B.weight.to(wide)
                layer.factors = (sB.reshape(-1, layer.rank).to(dt),
                                 layer.lora_A.weight.reshape(layer.rank, -1).to(dt))
            B, A = layer.factors                                  # (out, r), (r, in * k * k)
            if C is not None:
                key = (layer.block_id, B.dtype)
                if key not in cts:
                    cts[key] = C.to(B.dtype).transpose(0, 1)
                B = B @ cts[key]
            w2 = w.view(w.shape[0], -1)
            if layer.pristine.device == w.device and A.dtype == w.dtype:
                torch.addmm(layer.pristine.view_as(w2), B, A, out=w2)
            else:
                w2.copy_(torch.addmm(layer.pristine.view_as(w2).to(w.device, A.dtype), B, A))
            layer.is_merged = True


def unfold(model: nn.Module) -> None:
    """Undo :func:`fold`: the original weights back, bit-exactly, and their copies released."""
    with torch.no_grad():
        for _, layer in modulated_layers(model):
            if layer.pristine is not None:
                layer.base_layer.weight.copy_(layer.pristine)
                layer.pristine = layer.factors = None
            layer.is_merged = False


@contextmanager
def merged(model: nn.Module, C_by_block: CByBlock | None = None, *,
           offload: bool = False) -> Iterator[nn.Module]:
    """:func:`fold` for the body of a ``with`` block, :func:`unfold` on exit (even after an
    exception). ``offload=True`` keeps the original weights on the CPU meanwhile (less
    accelerator memory, slower entry and exit)."""
    for name, layer in modulated_layers(model):
        if layer.is_merged:
            raise RuntimeError(f"{name} is already merged (nested merged() contexts)")
    try:
        fold(model, C_by_block, offload=offload)
        yield model
    finally:
        unfold(model)
