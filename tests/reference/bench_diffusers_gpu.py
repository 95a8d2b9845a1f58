#!/usr/bin/env python3
"""Time diffusers' textual-inversion step on a CUDA GPU (the reference for `sdti bench`
on CUDA; tests/reference/bench_gpu.py runs both and prints the table).

    python3 tests/reference/bench_diffusers_gpu.py --recipe default --batch-size 1

Recipes (SD 1.5 architecture, random weights initialised as in bench_diffusers_step.py):

* `default`: diffusers' examples/textual_inversion/textual_inversion.py as its README
  runs it with `--mixed_precision fp16`: the UNet and the VAE cast to fp16, the text
  encoder kept in fp32 and run under fp16 autocast (accelerate wraps the prepared model's
  forward that way), the VAE encoding the batch in every step, the loss in fp32, the
  gradient through a GradScaler, AdamW over the whole token table with the other rows
  restored after the step.
* `best`: the fastest variant we know for the same update: UNet and VAE in bf16, the text
  encoder under bf16 autocast, latents encoded once before the loop (sampled from the
  cached distribution in every step, as sdti does), no GradScaler (bf16 needs none).

Attention is diffusers' default processor (AttnProcessor2_0: torch's fused
scaled_dot_product_attention, flash/memory-efficient kernels on CUDA).

Prints one JSON line on stdout: ms/step (mean, min), images/s, peak CUDA memory
(torch.cuda.max_memory_allocated / _reserved over the timed steps), and with --profile the
stages of one step (text encoder forward, UNet forward, backward) timed alone.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import DDPMScheduler  # noqa: E402

from bench_diffusers_step import (  # noqa: E402
    EOS,
    INITIALIZER_ID,
    PLACEHOLDER_ID,
    PROMPT_IDS,
    attention_summary,
    init_like_the_rust_bench,
    synthetic_image,
)
from sd15_architecture import SCALING_FACTOR, SCHED_CONFIG, build_models  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", choices=["default", "best"], default="default")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--device", default="cuda", help="cuda (cpu only to check this script)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA is not available to torch")
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    diffusers.logging.set_verbosity_error()
    half = torch.float16 if args.recipe == "default" else torch.bfloat16
    b, res = args.batch_size, args.resolution

    # Built and initialised on the device (seconds instead of a minute on the CPU).
    text_encoder, unet, vae = build_models(dev)
    for m in (text_encoder, unet, vae):
        init_like_the_rust_bench(m)
    sched = DDPMScheduler(**SCHED_CONFIG)
    text_encoder.resize_token_embeddings(PLACEHOLDER_ID + 1)
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[PLACEHOLDER_ID] = table[INITIALIZER_ID].clone()
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    text_encoder.to(dev)  # fp32, as the example keeps the trained model
    unet.to(dev, dtype=half)
    vae.to(dev, dtype=half)
    text_encoder.train()
    emb = text_encoder.get_input_embeddings()

    emb.requires_grad_(True)
    params = list(emb.parameters())
    scaler = torch.amp.GradScaler(dev.type) if half == torch.float16 else None
    optimizer = torch.optim.AdamW(params, lr=5e-3, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    orig = emb.weight.data.clone()
    keep = torch.ones((PLACEHOLDER_ID + 1,), dtype=torch.bool, device=dev)
    keep[PLACEHOLDER_ID] = False

    pixels = synthetic_image(res).to(dev, dtype=half).repeat(b, 1, 1, 1)
    ids = torch.tensor([PROMPT_IDS + [EOS] * (77 - len(PROMPT_IDS))] * b, dtype=torch.long, device=dev)
    cached = None
    if args.recipe == "best":
        with torch.no_grad():
            cached = vae.encode(pixels).latent_dist

    def encode_text():
        with torch.autocast(dev.type, dtype=half):
            return text_encoder(ids)[0]

    def step():
        if cached is None:
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.sample()
        else:
            latents = cached.sample()
        latents = latents * SCALING_FACTOR
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), device=dev).long()
        noisy = sched.add_noise(latents, noise, t)
        ctx = encode_text()
        pred = unet(noisy, t, ctx.to(half)).sample
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            emb.weight[keep] = orig[keep]
        return loss

    for _ in range(args.warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        s = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - s) * 1000)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    reserved = torch.cuda.max_memory_reserved() / 2**20 if cuda else None

    profile = None
    if args.profile:
        stages = {"text_encoder_ms": 0.0, "unet_forward_ms": 0.0, "backward_ms": 0.0}
        rounds = 3
        noisy = torch.randn(b, 4, res // 8, res // 8, device=dev, dtype=half)
        t = torch.full((b,), 500, device=dev, dtype=torch.long)
        for _ in range(rounds):
            sync()
            t0 = time.perf_counter()
            ctx = encode_text()
            sync()
            t1 = time.perf_counter()
            loss = unet(noisy, t, ctx.to(half)).sample.float().pow(2).mean()
            sync()
            t2 = time.perf_counter()
            loss.backward()
            sync()
            t3 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            stages["text_encoder_ms"] += (t1 - t0) * 1000 / rounds
            stages["unet_forward_ms"] += (t2 - t1) * 1000 / rounds
            stages["backward_ms"] += (t3 - t2) * 1000 / rounds
        if cached is None:
            sync()
            s = time.perf_counter()
            with torch.no_grad():
                vae.encode(pixels).latent_dist.sample()
            sync()
            stages["vae_encode_ms"] = (time.perf_counter() - s) * 1000
        profile = stages

    mean = sum(times) / len(times)
    out = {
        "recipe": args.recipe,
        "dtype": str(half).replace("torch.", ""),
        "batch_size": b,
        "resolution": res,
        "steps": args.steps,
        "ms_per_step_mean": mean,
        "ms_per_step_min": min(times),
        "images_per_second": 1000.0 * b / mean,
        "peak_allocated_mib": peak,
        "peak_reserved_mib": reserved,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        **attention_summary(unet, text_encoder),
    }
    if profile is not None:
        out["profile"] = profile
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
