#!/usr/bin/env python3
"""The Stable Diffusion 1.5 architecture (runwayml/stable-diffusion-v1-5), from its configs.

Run from the repository root:

    $REFENV/bin/python tests/reference/sd15_architecture.py

Writes `tests/reference/sd15_shapes.json`: every tensor of the three networks with its
shape, under sdti's internal names:

    unet.<diffusers key>                    UNet2DConditionModel state_dict keys
    vae.<diffusers key>                     AutoencoderKL state_dict keys (encoder and decoder)
    text_encoder.text_model.<key>           CLIPTextModel keys, with any `text_model.` prefix
                                            removed first (transformers >= 5.6 has none,
                                            older versions and every SD 1.x checkpoint do)

`benches/train_step.rs` checks the random SD 1.5 it times (`sdti::model::random` at
`ModelConfig::sd1()`) against that file, name by name and shape by shape, and
`tests/reference/bench_diffusers_step.py` imports the configs below (`TE_CONFIG`,
`UNET_CONFIG`, `VAE_CONFIG`, `SCHED_CONFIG`) to build the same networks in torch.

No network access and no weights: the models are instantiated on torch's `meta` device
(shapes only), so the script runs in seconds.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

HERE = Path(__file__).resolve().parent
SHAPES_JSON = HERE / "sd15_shapes.json"

# --------------------------------------------------------------------------------------
# The configs, written out from the runwayml/stable-diffusion-v1-5 repository
# (https://huggingface.co/runwayml/stable-diffusion-v1-5, mirrored as
# stable-diffusion-v1-5/stable-diffusion-v1-5): text_encoder/config.json, unet/config.json,
# vae/config.json and scheduler/scheduler_config.json. Keys that only record provenance
# (`_class_name`, `_diffusers_version`, `_name_or_path`, `architectures`,
# `transformers_version`, `torch_dtype`) are left out.
# --------------------------------------------------------------------------------------

# text_encoder/config.json (= openai/clip-vit-large-patch14's text config)
TE_CONFIG = dict(
    attention_dropout=0.0,
    bos_token_id=0,
    dropout=0.0,
    eos_token_id=2,
    hidden_act="quick_gelu",
    hidden_size=768,
    initializer_factor=1.0,
    initializer_range=0.02,
    intermediate_size=3072,
    layer_norm_eps=1e-05,
    max_position_embeddings=77,
    num_attention_heads=12,
    num_hidden_layers=12,
    pad_token_id=1,
    projection_dim=768,
    vocab_size=49408,
)

# unet/config.json
UNET_CONFIG = dict(
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=[
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-05,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=[
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
)

# vae/config.json (scaling_factor is not written there; 0.18215 is AutoencoderKL's
# default and the value SD 1.x was trained with)
VAE_CONFIG = dict(
    act_fn="silu",
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    in_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    out_channels=3,
    sample_size=512,
    up_block_types=["UpDecoderBlock2D"] * 4,
)
SCALING_FACTOR = 0.18215

# scheduler/scheduler_config.json is a PNDMScheduler; the textual_inversion example loads
# the same file as a DDPMScheduler, which keeps the fields below (the PNDM-only ones,
# `skip_prk_steps` and `set_alpha_to_one`, are ignored by DDPMScheduler).
SCHED_CONFIG = dict(
    beta_end=0.012,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    clip_sample=False,
    num_train_timesteps=1000,
    steps_offset=1,
    trained_betas=None,
)


def build_models(device="cpu"):
    """(text_encoder, unet, vae) of the SD 1.5 architecture with the libraries' default init."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device):
        text_encoder = CLIPTextModel(CLIPTextConfig(**TE_CONFIG))
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
    return text_encoder, unet, vae


def internal_names(text_encoder, unet, vae):
    """[(internal name, tensor)] for every floating-point tensor of the state dicts."""
    out = []
    for key, t in text_encoder.state_dict().items():
        if not t.is_floating_point():
            continue  # e.g. an int64 position_ids buffer: not a weight
        bare = key[len("text_model.") :] if key.startswith("text_model.") else key
        out.append(("text_encoder.text_model." + bare, t))
    for prefix, model in (("unet.", unet), ("vae.", vae)):
        for key, t in model.state_dict().items():
            if t.is_floating_point():
                out.append((prefix + key, t))
    return out


def write_shapes(entries, path):
    """Writes `{internal name: shape}` of `entries` to `path`, one line per tensor, sorted
    (diffs stay readable), and prints the versions and each network's parameter count."""
    import diffusers
    import torch
    import transformers

    names = [n for n, _ in entries]
    assert len(names) == len(set(names)), "duplicate internal names"
    counts = {}
    for name, t in entries:
        net = name.split(".", 1)[0]
        counts[net] = counts.get(net, 0) + t.numel()
    # One line per tensor, sorted, so that diffs stay readable.
    lines = [
        f"{json.dumps(n)}: {json.dumps(list(t.shape), separators=(',', ':'))}"
        for n, t in sorted(entries, key=lambda e: e[0])
    ]
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    versions = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    print("versions:", json.dumps(versions))
    for net, n in sorted(counts.items()):
        print(f"{net}: {n:,} parameters ({n * 4 / 2**20:,.0f} MiB in f32)")
    print(f"wrote {path} ({len(entries)} tensors, {path.stat().st_size:,} bytes)")


def main():
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    diffusers.logging.set_verbosity_error()
    try:
        models = build_models("meta")
    except Exception as e:  # noqa: BLE001 - a library without meta-device support
        print(f"meta device failed ({e}); building on the cpu", file=sys.stderr)
        models = build_models("cpu")
    write_shapes(internal_names(*models), SHAPES_JSON)


if __name__ == "__main__":
    main()
