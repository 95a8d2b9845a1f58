#!/usr/bin/env python3
"""Time one textual-inversion training step of diffusers on the CPU (the reference for
`benches/train_step.rs`).

    $REFENV/bin/python tests/reference/bench_diffusers_step.py --resolution 512 --steps 3 [--threads 2] [--config sd15|sdxl] [--ops]

The step is the loop body of diffusers' `examples/textual_inversion/textual_inversion.py`
(`with accelerator.accumulate(text_encoder): ...`), with accelerate left out (one process,
fp32, no gradient accumulation, so `accelerator.backward(loss)` is `loss.backward()`):

    latents = vae.encode(pixel_values).latent_dist.sample().detach() * scaling_factor
    noise = randn_like(latents); timesteps = randint(0, 1000, (bsz,))
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    encoder_hidden_states = text_encoder(input_ids)[0]
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
    loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
    loss.backward(); optimizer.step(); lr_scheduler.step(); optimizer.zero_grad()
    embeddings.weight[index_no_updates] = orig_embeds_params[index_no_updates]

As in the example: one placeholder token is added (`resize_token_embeddings`, 49409
rows), everything is frozen except the token-embedding table, AdamW (betas 0.9/0.999,
weight decay 1e-2, eps 1e-8; lr 5e-3, which does not change the timing) optimises the
whole table, and the rows other than the placeholder's are restored after every step.
The example's data loading (PIL decode, resize, flip, tokenizer) is not timed: the image
is one synthetic picture already in [-1, 1] and the prompt ids are fixed.

Weights are random, from the SD 1.5 configs in `sd15_architecture.py`, initialised as
the Rust bench does: N(0, 0.02) for weights, 1 for norm weights, 0 for biases.

`--config sdxl` times the loop body of `examples/textual_inversion/textual_inversion_sdxl.py`
instead, on SDXL base's architecture (`sdxl_architecture.py`), fp32:

    latents = vae.encode(pixel_values).latent_dist.sample().detach() * scaling_factor
    noise, timesteps, noisy_latents as above
    encoder_hidden_states_1 = text_encoder_1(input_ids_1, output_hidden_states=True).hidden_states[-2]
    encoder_output_2 = text_encoder_2(input_ids_2, output_hidden_states=True)
    encoder_hidden_states_2 = encoder_output_2.hidden_states[-2]
    add_time_ids = (original_size + crop_top_left + target_size)
    added_cond_kwargs = {"text_embeds": encoder_output_2[0], "time_ids": add_time_ids}
    model_pred = unet(noisy_latents, timesteps, cat([h1, h2], -1), added_cond_kwargs=...).sample
    loss = mse(model_pred, noise); loss.backward(); optimizer.step(); ...

As in that example since diffusers PR #9010 (2024-08-09, "Fix textual inversion SDXL and
add support for 2nd text encoder"), both encoders' token tables learn, as sdti's `clip_l`
and `clip_g` do: the placeholder is added to both tokenizers (one id, 49408, in both
vocabularies) with the initializer's row copied into each table; each encoder's
transformer layers, final norm and position table are frozen, which leaves its token
table (and text_encoder_2's `text_projection`, which the example does not freeze: autograd
computes its gradient, no optimizer updates it) trainable; AdamW optimises both tables
and the rows other than the placeholder's are restored in both after every step. So the
backward pass runs through both encoders, bigG included. (Until 2026-12-01 this script
timed the example as it was before that PR, with text_encoder_2 frozen and no gradient
through it: a shorter step than the example's today, and than sdti's.) The second
prompt pads with id 0, as SDXL's tokenizer_2 pads.

Prints one JSON line on stdout (everything else goes to stderr). Each step's time is
measured with its VAE encode timed apart, so the step without the encode (what sdti's
cached latents make of it) is per step, not a difference of means.

`--serve` lets the Rust bench interleave the two engines' steps, so that a machine whose
speed drifts within minutes slows both alike: after building the model and running the
warm-up step the script prints `{"ready": ...}`, then answers each `step` line on stdin
with one JSON line for that step, and `end` with the summary line (as without `--serve`,
over the served steps); `--steps` is then not used.
"""

import argparse
import json
import os
import resource
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
from diffusers.optimization import get_scheduler  # noqa: E402

import sd15_architecture  # noqa: E402
import sdxl_architecture  # noqa: E402

# "a photo of a <placeholder>" as CLIPTokenizer gives it once the placeholder is added
# (id 49408), padded with <|endoftext|> to 77, as the example's dataset does.
BOS, EOS, PLACEHOLDER_ID = 49406, 49407, 49408
PROMPT_IDS = [BOS, 320, 1125, 539, 320, PLACEHOLDER_ID, EOS]
INITIALIZER_ID = 5988  # "toy"


def rss_mib(field):
    """VmRSS / VmHWM of this process in MiB, from /proc/self/status (None elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def is_norm_weight(name, t):
    leaf = name.rsplit(".", 2)
    return t.dim() == 1 and name.endswith(".weight") and "norm" in leaf[-2]


@torch.no_grad()
def init_like_the_rust_bench(model):
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            p.zero_()
        elif is_norm_weight(name, p):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02)


def synthetic_image(res):
    """A smooth colour pattern in [-1, 1], `[1, 3, res, res]`."""
    y = torch.linspace(-1, 1, res).view(res, 1)
    x = torch.linspace(-1, 1, res).view(1, res)
    chans = [
        torch.sin(3.0 * x + 2.0 * y),
        torch.cos(2.0 * x - 3.0 * y),
        torch.sin(5.0 * x * y),
    ]
    return (torch.stack(chans) * 0.9).unsqueeze(0).contiguous()


def attention_summary(unet, text_encoder):
    procs = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    te = getattr(text_encoder.config, "_attn_implementation", None)
    return {"unet_attn_processor": procs, "text_encoder_attn_implementation": te}


def unet_profile(text_encoder, unet, res, input_ids):
    """ms of: the text encoder forward; the UNet forward without autograd, the forward
    with the context requiring grad, and the backward of mean(out^2) to that context
    (the same measurements as the Rust bench's --profile)."""
    lat = res // 8
    sample = torch.randn(1, 4, lat, lat)
    context = torch.randn(1, 77, 768)
    t = torch.tensor([500])

    def ms(f):
        s = time.perf_counter()
        r = f()
        return (time.perf_counter() - s) * 1000, r

    with torch.no_grad():
        te_ms, _ = ms(lambda: text_encoder(input_ids)[0])
        plain_ms, _ = ms(lambda: unet(sample, t, context).sample)
    ctx = context.clone().requires_grad_(True)
    tracked_ms, out = ms(lambda: unet(sample, t, ctx).sample)
    backward_ms, _ = ms(lambda: out.pow(2).mean().backward())
    assert ctx.grad is not None
    print(
        f"diffusers {res}px profile: text encoder {te_ms:.0f} ms, unet forward {plain_ms:.0f} ms (no grad) / "
        f"{tracked_ms:.0f} ms (context requires grad), backward {backward_ms:.0f} ms",
        file=sys.stderr,
    )
    return {
        "text_encoder_ms": te_ms,
        "unet_forward_no_grad_ms": plain_ms,
        "unet_forward_tracked_ms": tracked_ms,
        "unet_backward_ms": backward_ms,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after 1 warm-up step")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", choices=["sd15", "sdxl"], default="sd15", help="the architecture")
    ap.add_argument(
        "--serve",
        action="store_true",
        help="run steps when asked on stdin (for the Rust bench's interleaved rounds)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also time the text encoder and the UNet forward / backward alone",
    )
    ap.add_argument(
        "--ops",
        action="store_true",
        help="after the timed steps, run one more with the image's latents encoded before it "
        "(as sdti's latent cache holds them) under torch.profiler and print its op table, "
        "by self CPU time, to stderr",
    )
    args = ap.parse_args()
    if args.resolution < 64 or args.resolution % 8:
        ap.error("--resolution must be a multiple of 8, at least 64")
    if args.steps < 1 or args.threads < 1:
        ap.error("--steps and --threads must be at least 1")
    if args.profile and args.config == "sdxl":
        ap.error("--profile times the SD 1.5 UNet alone; not with --config sdxl")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    transformers.logging.set_verbosity_error()
    diffusers.logging.set_verbosity_error()
    rss_start = rss_mib("VmRSS")

    t0 = time.perf_counter()
    sdxl = args.config == "sdxl"
    arch = sdxl_architecture if sdxl else sd15_architecture
    if sdxl:
        text_encoder, text_encoder_2, unet, vae = arch.build_models("cpu")
        frozen = (text_encoder_2, unet, vae)
    else:
        text_encoder, unet, vae = arch.build_models("cpu")
        text_encoder_2 = None
        frozen = (unet, vae)
    for m in (text_encoder, *frozen):
        init_like_the_rust_bench(m)
    noise_scheduler = DDPMScheduler(**arch.SCHED_CONFIG)

    # Add the placeholder token and copy the initializer's row into it (into both
    # encoders' tables for SDXL: the same id in both vocabularies).
    learned = [text_encoder] if text_encoder_2 is None else [text_encoder, text_encoder_2]
    for te in learned:
        te.resize_token_embeddings(PLACEHOLDER_ID + 1)
        token_embeds = te.get_input_embeddings().weight.data
        token_embeds[PLACEHOLDER_ID] = token_embeds[INITIALIZER_ID].clone()

    # Freeze vae and unet, and in each learned encoder everything the example freezes: it
    # freezes `encoder`, `final_layer_norm` and `position_embedding` by name, which leaves
    # the token table trainable, and text_encoder_2's `text_projection` too. transformers
    # 5.x's CLIPTextModel has no `.text_model`, so freeze all, then unfreeze those: the
    # same set of trainable parameters.
    for m in frozen:
        m.requires_grad_(False)
    for te in learned:
        te.requires_grad_(False)
        te.get_input_embeddings().requires_grad_(True)
    if text_encoder_2 is not None:
        text_encoder_2.text_projection.requires_grad_(True)
    for te, want in zip(learned, [["token_embedding"], ["token_embedding", "text_projection"]]):
        trainable = [n for n, p in te.named_parameters() if p.requires_grad]
        assert len(trainable) == len(want) and all(w in n for w, n in zip(want, trainable)), trainable

    optimizer = torch.optim.AdamW(
        [te.get_input_embeddings().weight for te in learned],
        lr=5e-3,
        betas=(0.9, 0.999),
        weight_decay=1e-2,
        eps=1e-8,
    )
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=10**6)
    orig_embeds_params = [te.get_input_embeddings().weight.data.clone() for te in learned]
    index_no_updates = torch.ones((PLACEHOLDER_ID + 1,), dtype=torch.bool)
    index_no_updates[PLACEHOLDER_ID : PLACEHOLDER_ID + 1] = False

    pixel_values = synthetic_image(args.resolution)
    input_ids = torch.tensor([PROMPT_IDS + [EOS] * (77 - len(PROMPT_IDS))], dtype=torch.long)
    input_ids_2 = torch.tensor([PROMPT_IDS + [0] * (77 - len(PROMPT_IDS))], dtype=torch.long)
    # original_size + crop_top_left + target_size of a square picture at the resolution.
    add_time_ids = torch.tensor([[args.resolution, args.resolution, 0, 0, args.resolution, args.resolution]], dtype=torch.float32)
    for te in learned:
        te.train()
    build_s = time.perf_counter() - t0
    rss_loaded = rss_mib("VmRSS")

    def encode():
        return vae.encode(pixel_values).latent_dist.sample().detach()

    def step(cached=None):
        s = time.perf_counter()
        latents = encode() if cached is None else cached
        vae_ms = (time.perf_counter() - s) * 1000
        latents = latents * arch.SCALING_FACTOR
        noise = torch.randn_like(latents)
        bsz = latents.shape[0]
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device)
        timesteps = timesteps.long()
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        if sdxl:
            hidden_1 = text_encoder(input_ids, output_hidden_states=True).hidden_states[-2]
            output_2 = text_encoder_2(input_ids_2, output_hidden_states=True)
            hidden_2 = output_2.hidden_states[-2]
            added = {"text_embeds": output_2[0], "time_ids": add_time_ids}
            encoder_hidden_states = torch.cat([hidden_1, hidden_2], dim=-1)
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=added).sample
        else:
            encoder_hidden_states = text_encoder(input_ids)[0]
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        with torch.no_grad():
            for te, orig in zip(learned, orig_embeds_params):
                te.get_input_embeddings().weight[index_no_updates] = orig[index_no_updates]
        return loss.item(), vae_ms

    times, vae_times = [], []

    def timed_step(i):
        s = time.perf_counter()
        loss, vae_ms = step()
        dt = (time.perf_counter() - s) * 1000
        print(
            f"diffusers {args.resolution}px step {i} ({'warm-up' if i == 0 else 'timed'}): {dt:.0f} ms "
            f"({vae_ms:.0f} ms of it the VAE encode), loss {loss:.4f}",
            file=sys.stderr,
        )
        if i > 0:
            times.append(dt)
            vae_times.append(vae_ms)
        return {"index": i, "ms": dt, "vae_encode_ms": vae_ms, "loss": loss}

    if args.serve:
        warm = timed_step(0)
        print(json.dumps({"ready": True, "warmup": warm, "rss_after_load_mib": rss_loaded}), flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "step":
                print(json.dumps(timed_step(len(times) + 1)), flush=True)
            elif command == "end":
                break
            else:
                raise SystemExit(f"bench_diffusers_step.py --serve: unknown command {command!r} (want step or end)")
        if not times:
            raise SystemExit("bench_diffusers_step.py --serve: ended before any timed step")
    else:
        for i in range(args.steps + 1):
            timed_step(i)

    profile = unet_profile(text_encoder, unet, args.resolution, input_ids) if args.profile else None
    if args.ops:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        cached = encode()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            s = time.perf_counter()
            step(cached)
            ops_ms = (time.perf_counter() - s) * 1000
        print(f"diffusers {args.resolution}px step with cached latents, profiled: {ops_ms:.0f} ms", file=sys.stderr)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30), file=sys.stderr)

    for te, orig in zip(learned, orig_embeds_params):
        changed = (te.get_input_embeddings().weight.data != orig).any(dim=1)
        assert changed.nonzero().flatten().tolist() == [PLACEHOLDER_ID], "only the placeholder row may change"

    # ru_maxrss (KiB on Linux) survives exec: started from the Rust bench, it reports the
    # parent's peak when that was larger. VmHWM belongs to this process image alone.
    ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_rss = rss_mib("VmHWM")
    out = {
        "ms_per_step_mean": sum(times) / len(times),
        "ms_per_step_min": min(times),
        "peak_rss_mib": peak_rss if peak_rss is not None else ru_maxrss,
        "ru_maxrss_mib": ru_maxrss,
        "rss_start_mib": rss_start,
        "rss_after_load_mib": rss_loaded,
        # Per timed step; the example encodes the image in every step, sdti caches the
        # latent distribution once per image, so the bench also shows the step without it.
        "step_ms": times,
        "step_vae_encode_ms": vae_times,
        "vae_encode_ms": sum(vae_times) / len(vae_times),
        "build_s": build_s,
        "config": args.config,
        "resolution": args.resolution,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "mkldnn": torch.backends.mkldnn.is_available(),
        **attention_summary(unet, text_encoder),
    }
    if profile is not None:
        out["profile"] = profile
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
