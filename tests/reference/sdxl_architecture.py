#!/usr/bin/env python3
"""The SDXL base 1.0 architecture (stabilityai/stable-diffusion-xl-base-1.0), from its configs.

Run from the repository root:

    $REFENV/bin/python tests/reference/sdxl_architecture.py

Writes `tests/reference/sdxl_shapes.json`: every tensor of the four networks with its
shape, under sdti's internal names (as `sd15_architecture.py` does for SD 1.5):

    unet.<diffusers key>                    UNet2DConditionModel state_dict keys
    vae.<diffusers key>                     AutoencoderKL state_dict keys
    text_encoder.text_model.<key>           CLIPTextModel (CLIP ViT-L), any `text_model.`
                                            prefix removed first
    text_encoder_2.text_model.<key>         CLIPTextModelWithProjection (OpenCLIP bigG),
    text_encoder_2.text_projection.weight   the same way

`benches/train_step.rs --config sdxl` checks the random SDXL it times
(`sdti::model::random` at `ModelConfig::sdxl()`) against that file, and
`tests/reference/bench_diffusers_step.py --config sdxl` imports the configs below to
build the same networks in torch.

No network access and no weights: the models are built on torch's `meta` device.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

HERE = Path(__file__).resolve().parent
SHAPES_JSON = HERE / "sdxl_shapes.json"
sys.path.insert(0, str(HERE))

from sd15_architecture import TE_CONFIG as CLIP_L_CONFIG, write_shapes  # noqa: E402

# --------------------------------------------------------------------------------------
# The configs, written out from the stabilityai/stable-diffusion-xl-base-1.0 repository:
# text_encoder/config.json (CLIP ViT-L/14's text model, as SD 1.5's), text_encoder_2/
# config.json, unet/config.json, vae/config.json and scheduler/scheduler_config.json,
# without the provenance keys.
# --------------------------------------------------------------------------------------

# text_encoder/config.json: SD 1.5's text encoder config (its `projection_dim` 768 is
# unused by CLIPTextModel).
TE_CONFIG = dict(CLIP_L_CONFIG)

# text_encoder_2/config.json (laion CLIP-ViT-bigG-14, CLIPTextModelWithProjection)
TE2_CONFIG = dict(
    attention_dropout=0.0,
    bos_token_id=0,
    dropout=0.0,
    eos_token_id=2,
    hidden_act="gelu",
    hidden_size=1280,
    initializer_factor=1.0,
    initializer_range=0.02,
    intermediate_size=5120,
    layer_norm_eps=1e-05,
    max_position_embeddings=77,
    num_attention_heads=20,
    num_hidden_layers=32,
    pad_token_id=1,
    projection_dim=1280,
    vocab_size=49408,
)

# unet/config.json
UNET_CONFIG = dict(
    act_fn="silu",
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280],
    center_input_sample=False,
    cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    downsample_padding=1,
    dual_cross_attention=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    mid_block_type="UNetMidBlock2DCrossAttn",
    norm_eps=1e-05,
    norm_num_groups=32,
    out_channels=4,
    projection_class_embeddings_input_dim=2816,
    resnet_time_scale_shift="default",
    sample_size=128,
    time_embedding_type="positional",
    transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True,
)

# vae/config.json
VAE_CONFIG = dict(
    act_fn="silu",
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    force_upcast=True,
    in_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    out_channels=3,
    sample_size=1024,
    scaling_factor=0.13025,
    up_block_types=["UpDecoderBlock2D"] * 4,
)
SCALING_FACTOR = 0.13025

# scheduler/scheduler_config.json is an EulerDiscreteScheduler; the SDXL textual
# inversion example loads it as a DDPMScheduler, which keeps these fields.
SCHED_CONFIG = dict(
    beta_end=0.012,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    clip_sample=False,
    num_train_timesteps=1000,
    prediction_type="epsilon",
    steps_offset=1,
    trained_betas=None,
)


def build_models(device="cpu"):
    """(text_encoder, text_encoder_2, unet, vae) of SDXL base with the libraries' init."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device(device):
        text_encoder = CLIPTextModel(CLIPTextConfig(**TE_CONFIG))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TE2_CONFIG))
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
    return text_encoder, text_encoder_2, unet, vae


def internal_names(text_encoder, text_encoder_2, unet, vae):
    """[(internal name, tensor)] for every floating-point tensor of the state dicts."""
    out = []
    for prefix, model in (("text_encoder.", text_encoder), ("text_encoder_2.", text_encoder_2)):
        for key, t in model.state_dict().items():
            if not t.is_floating_point():
                continue  # an int64 position_ids buffer: not a weight
            if key.startswith("text_projection."):
                out.append((prefix + key, t))
                continue
            bare = key[len("text_model.") :] if key.startswith("text_model.") else key
            out.append((prefix + "text_model." + bare, t))
    for prefix, model in (("unet.", unet), ("vae.", vae)):
        for key, t in model.state_dict().items():
            if t.is_floating_point():
                out.append((prefix + key, t))
    return out


def main():
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    diffusers.logging.set_verbosity_error()
    write_shapes(internal_names(*build_models("meta")), SHAPES_JSON)


if __name__ == "__main__":
    main()
