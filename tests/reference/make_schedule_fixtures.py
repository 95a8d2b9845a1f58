"""Regenerate tests/fixtures/schedule_reference.json from diffusers itself.

Run with a Python that has torch + diffusers (the numbers were made with
torch 2.15 / diffusers 0.42.1, CPU):

    python tests/reference/make_schedule_fixtures.py > tests/fixtures/schedule_reference.json

The Rust tests in src/model/scheduler/ddpm.rs and src/train/lr_schedule.rs
compare against this file, so the DDPM tables and LR curves are checked against
the reference implementation rather than against our own reading of it.
"""

import json
import sys

import diffusers
import torch
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler


def f32_list(t):
    # float32 -> Python float is exact, so JSON keeps the f32 bit pattern.
    return [float(x) for x in t.to(torch.float32).tolist()]


def ddpm(**kw):
    s = DDPMScheduler(**kw)
    ts = torch.tensor([0, 1, 250, 500, 998, 999][: len(s.alphas_cumprod)])
    ts = ts[ts < len(s.alphas_cumprod)]
    sample = torch.ones(len(ts))
    noise = torch.ones(len(ts))
    zeros = torch.zeros(len(ts))
    # add_noise(x=1, n=0) = sqrt(ac); add_noise(x=0, n=1) = sqrt(1-ac)
    sqrt_ac = s.add_noise(sample, zeros, ts)
    sqrt_1m = s.add_noise(zeros, noise, ts)
    # velocity(x=0, n=1) = sqrt(ac); velocity(x=1, n=0) = -sqrt(1-ac)
    v_noise = s.get_velocity(zeros, noise, ts)
    v_sample = s.get_velocity(sample, zeros, ts)
    return {
        "config": {k: v for k, v in kw.items()},
        "betas": f32_list(s.betas),
        "alphas_cumprod": f32_list(s.alphas_cumprod),
        "probe_timesteps": [int(t) for t in ts],
        "add_noise_sample_coef": f32_list(sqrt_ac),
        "add_noise_noise_coef": f32_list(sqrt_1m),
        "velocity_noise_coef": f32_list(v_noise),
        "velocity_sample_coef": f32_list(v_sample),
    }


def lr_curve(name, base_lr, warmup, total, steps):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=base_lr)
    sched = get_scheduler(name, optimizer=opt, num_warmup_steps=warmup, num_training_steps=total)
    out = []
    # lr used by optimizer step i (0-based) is the lr before the i-th sched.step().
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return {"name": name, "base_lr": base_lr, "warmup": warmup, "total": total, "lrs": out}


def main():
    fixture = {
        "generator": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "script": "tests/reference/make_schedule_fixtures.py",
        },
        "ddpm": {
            "sd15_scaled_linear": ddpm(
                num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
            ),
            "linear_default": ddpm(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear"),
            "squaredcos_cap_v2": ddpm(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),
            "scaled_linear_odd": ddpm(
                num_train_timesteps=37, beta_start=0.0001, beta_end=0.03, beta_schedule="scaled_linear"
            ),
            "sd_zero_terminal_snr": ddpm(
                num_train_timesteps=1000,
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                rescale_betas_zero_snr=True,
            ),
            "trained_betas": ddpm(num_train_timesteps=5, trained_betas=[0.01, 0.02, 0.05, 0.1, 0.2]),
        },
        "lr": [
            lr_curve("constant", 5e-3, 10, 100, 120),
            lr_curve("constant_with_warmup", 5e-3, 10, 100, 120),
            lr_curve("linear", 5e-3, 10, 100, 120),
            lr_curve("cosine", 5e-3, 10, 100, 120),
            lr_curve("linear", 1e-4, 0, 50, 60),
            lr_curve("cosine", 1e-4, 0, 50, 60),
        ],
    }
    json.dump(fixture, sys.stdout, indent=None, separators=(",", ":"))
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
