"""Stage 2 of METHOD.md: degradation-guided LoRA on SD-Turbo.

- :mod:`degsr.sr.config` -- :class:`LoraConfig`, the ``lora.*`` keys (ranks, targets,
  modulation sizes).
- :mod:`degsr.sr.modulation` -- degradation scores ``d`` -> per-block r x r modulation
  matrices ``C``.
- :mod:`degsr.sr.lora` -- the modulated LoRA layer ``y = W0 x + s B(C^T(A x))``, its injection into
  a diffusers UNet / VAE encoder, and the merged (folded) inference path.
"""
