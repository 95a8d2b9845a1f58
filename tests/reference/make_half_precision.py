#!/usr/bin/env python3
"""torch's own half-precision error on the tiny model, for sdti's mixed-precision test.

    $REFENV/bin/python tests/reference/make_half_precision.py

Loads the committed tiny pipeline (tests/fixtures/tiny-sd) and the inputs of the f32
reference step (tests/fixtures/tiny-sd-expected.safetensors: vectors, ids, latents, noise,
timestep), then computes the textual-inversion loss and the gradient on the vectors with
sdti's mixed-precision placement: the text encoder in float32, the UNet's weights and
activations in float16 or bfloat16, the loss in float32. Writes
tests/fixtures/tiny-sd-half.safetensors:

  half.{f16,bf16}.loss      the loss (float32 scalar)
  half.{f16,bf16}.grad      the gradient on the vectors (float32)
  half.{f16,bf16}.unet_err  relative error of the UNet noise prediction vs float32
  half.{f16,bf16}.grad_err  relative error of that gradient vs float32 (norm-wise)

The Rust test holds sdti's half-precision gradient to a small multiple of torch's error.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextModel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tiny_sd import injected_text_encoder  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def main():
    torch.manual_seed(0)
    exp = load_file(FIX / "tiny-sd-expected.safetensors")
    pipe = FIX / "tiny-sd"
    te = CLIPTextModel.from_pretrained(pipe / "text_encoder", torch_dtype=torch.float32).eval()
    unet32 = UNet2DConditionModel.from_pretrained(pipe / "unet", torch_dtype=torch.float32).eval()
    sched = DDPMScheduler.from_pretrained(pipe / "scheduler")
    ids = exp["te.input_ids"].long()
    t = exp["loss.timestep"].long()
    latents, noise, vectors = exp["loss.latents"], exp["loss.noise"], exp["te.vectors"]

    out = {}
    for name, dtype in (("f16", torch.float16), ("bf16", torch.bfloat16)):
        unet = UNet2DConditionModel.from_pretrained(pipe / "unet", torch_dtype=torch.float32).eval().to(dtype)
        unet.requires_grad_(False)
        vec = vectors.clone().requires_grad_(True)
        te_i = injected_text_encoder(te, vec)
        ctx = te_i(input_ids=ids).last_hidden_state  # float32
        noisy = sched.add_noise(latents, noise, t)
        pred = unet(noisy.to(dtype), t, ctx.to(dtype)).sample
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        with torch.no_grad():
            pred32 = unet32(noisy, t, ctx.detach()).sample
        unet_err = rel(pred.float(), pred32)
        grad_err = rel(vec.grad, exp["loss.grad"])
        loss_err = abs(loss.item() - exp["loss.value"].item()) / exp["loss.value"].item()
        print(f"torch {name}: unet {unet_err:.2e}, loss {loss_err:.2e}, gradient {grad_err:.2e}")
        out[f"half.{name}.loss"] = loss.detach().reshape(())
        out[f"half.{name}.grad"] = vec.grad.detach().clone()
        out[f"half.{name}.unet_err"] = torch.tensor(unet_err, dtype=torch.float32)
        out[f"half.{name}.grad_err"] = torch.tensor(grad_err, dtype=torch.float32)
    save_file(out, FIX / "tiny-sd-half.safetensors", metadata={"torch": torch.__version__})


if __name__ == "__main__":
    main()
