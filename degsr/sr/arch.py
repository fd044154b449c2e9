"""Architectures of the Stage-2 base model as plain config dicts (METHOD.md, "Stage 2").

``SD_TURBO_*`` copy the configs of ``stabilityai/sd-turbo`` (the SD 2.1 layout): a
``UNet2DConditionModel`` of 865.9 M parameters, an ``AutoencoderKL`` of 83.7 M, a
``DDPMScheduler`` (the reference S3Diff loads the folder's scheduler config as DDPM: epsilon
prediction, trailing spacing, scaled-linear betas) and the OpenCLIP-H text tower as a
``CLIPTextConfig`` (23 layers: SD 2.x drops the last of the 24, i.e. its "penultimate" layer is
the model's last hidden state). They are used only when no pretrained folder is given
(``model.arch``): random weights, for tests, smoke runs and sizing.

``TINY_*`` keep the same layout -- 4 UNet blocks (3 cross-attention down blocks + 1 plain,
mirrored up), a 4-block VAE whose downsampling factor is 8 like SD's, a CLIP text model -- at
widths of 32-64 (1.6 M + 1.0 M parameters), so that every code path and every LoRA block id
(down 0-3, mid, up 0-3) runs on a CPU in well under a second. Both UNets downsample latents 8x:
images in multiples of 64 (METHOD.md's padding) keep every level's size exact.

Code must never assume the factor 8: it is ``2 ** (len(vae.config.block_out_channels) - 1)``.
"""

from __future__ import annotations

import copy

_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]

SD_TURBO_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False,
    flip_sin_to_cos=True, freq_shift=0,
    down_block_types=list(_DOWN), mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=list(_UP),
    only_cross_attention=False, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
    downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32,
    norm_eps=1e-5, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
    dual_cross_attention=False, use_linear_projection=True, class_embed_type=None,
    num_class_embeds=None, upcast_attention=False, resnet_time_scale_shift="default",
)

SD_TURBO_VAE = dict(
    in_channels=3, out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, act_fn="silu", latent_channels=4,
    norm_num_groups=32, sample_size=768, scaling_factor=0.18215,
)

# set_alpha_to_one is in sd-turbo's scheduler config but not a DDPM argument: build it with
# DDPMScheduler.from_config (which ignores it), as from_pretrained does.
SD_TURBO_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", timestep_spacing="trailing", steps_offset=1, clip_sample=False,
    set_alpha_to_one=False,
)

SD_TURBO_TEXT = dict(
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, projection_dim=512,
    num_hidden_layers=23, num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
    layer_norm_eps=1e-5, attention_dropout=0.0, initializer_range=0.02, initializer_factor=1.0,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)

TINY_UNET = dict(
    SD_TURBO_UNET, sample_size=16, block_out_channels=[32, 32, 64, 64], layers_per_block=1,
    attention_head_dim=[2, 2, 4, 4], cross_attention_dim=32, norm_num_groups=8,
)

TINY_VAE = dict(
    SD_TURBO_VAE, block_out_channels=[32, 32, 64, 64], layers_per_block=1, norm_num_groups=8,
    sample_size=128,
)

TINY_SCHEDULER = dict(SD_TURBO_SCHEDULER)

# Token ids follow the tiny tokenizer that tiny_folder.save_tiny_pretrained writes:
# 256 byte symbols, their 256 end-of-word forms, then <|startoftext|> (512), <|endoftext|> (513).
TINY_TEXT = dict(
    SD_TURBO_TEXT, vocab_size=1000, hidden_size=32, intermediate_size=64, projection_dim=32,
    num_hidden_layers=2, num_attention_heads=4, bos_token_id=512, eos_token_id=513, pad_token_id=0,
)

ARCHS = {
    "sd-turbo": dict(unet=SD_TURBO_UNET, vae=SD_TURBO_VAE, scheduler=SD_TURBO_SCHEDULER,
                     text=SD_TURBO_TEXT),
    "tiny": dict(unet=TINY_UNET, vae=TINY_VAE, scheduler=TINY_SCHEDULER, text=TINY_TEXT),
}


def arch_configs(name: str) -> dict:
    """Deep copies of the four config dicts of ``name`` (``"tiny"`` or ``"sd-turbo"``)."""
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(ARCHS)}")
    return copy.deepcopy(ARCHS[name])
