"""The ``tiny`` architecture written as a real diffusers folder (``unet/ vae/ text_encoder/
tokenizer/ scheduler/ model_index.json``), with a CLIP tokenizer from a hand-written byte-level
vocab.json / merges.txt: what the tests and the quickstart load through the same path as SD-Turbo.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from degsr.sr.arch import arch_configs
from degsr.sr.components import (_seeded, build_scheduler, build_text_encoder, build_unet,
                                 build_vae, quiet_libraries)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character table."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tiny_tokenizer(folder: str | Path, max_length: int = 77) -> Path:
    """A CLIP tokenizer folder as SD 2.x ships it (vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json) with a byte-level vocabulary: ids 0-255 the bytes (GPT-2 table),
    256-511 their end-of-word forms, 512 ``<|startoftext|>``, 513 ``<|endoftext|>``, then the
    merged tokens. The merges are built left to right from the lower-case words of the two
    default prompts (BPE ranks split a few), so the prompts take 25 and 33 tokens, not ~100
    bytes, and fit in 77 untruncated; other text falls back to single bytes. Pads with ``"!"``
    (id 0) as SD 2.x does."""
    from degsr.sr.config import NEG_PROMPT, POS_PROMPT

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    merges: list[str] = []
    text = POS_PROMPT + " " + NEG_PROMPT
    for word in dict.fromkeys(re.findall(r"[a-z]+", text.lower())):
        if len(word) < 2:
            continue
        left = word[0]
        for i, c in enumerate(word[1:], start=1):
            right = c + ("</w>" if i == len(word) - 1 else "")
            merged = left + right
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append(f"{left} {right}")
            left = merged
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges),
                                       encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": "!"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        dict(special, tokenizer_class="CLIPTokenizer", model_max_length=max_length,
             do_lower_case=True, add_prefix_space=False, errors="replace"), indent=2))
    return folder



def save_tiny_pretrained(folder: str | Path, seed: int = 0, *, unet: dict | None = None,
                         vae: dict | None = None, scheduler: dict | None = None) -> Path:
    """Write the ``tiny`` architecture (random weights from ``seed``) as a diffusers folder:
    ``unet/ vae/ text_encoder/ tokenizer/ scheduler/ model_index.json``. ``unet``, ``vae``,
    ``scheduler``: config keys that replace the tiny ones. Returns the folder."""
    import diffusers
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = arch_configs("tiny")
    for part, changes in (("unet", unet), ("vae", vae), ("scheduler", scheduler)):
        cfg[part].update(changes or {})
    with _seeded(seed):
        unet, vae = build_unet(cfg["unet"]), build_vae(cfg["vae"])
        text_encoder = build_text_encoder(cfg["text"])
    with quiet_libraries():  # transformers' "Writing model shards" bar, even into a log file
        unet.save_pretrained(folder / "unet")
        vae.save_pretrained(folder / "vae")
        text_encoder.save_pretrained(folder / "text_encoder")
    write_tiny_tokenizer(folder / "tokenizer", cfg["text"]["max_position_embeddings"])
    build_scheduler(cfg["scheduler"]).save_pretrained(folder / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDPMScheduler"],
             "safety_checker": [None, None], "feature_extractor": [None, None],
             "requires_safety_checker": False}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
