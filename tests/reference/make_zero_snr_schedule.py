"""Write tests/fixtures/zero_snr_schedule.json: the noise schedule diffusers trains with
when a model folder's scheduler_config.json says "rescale_betas_zero_snr": true.

    "$REFENV/bin/python" tests/reference/make_zero_snr_schedule.py > tests/fixtures/zero_snr_schedule.json

It loads tests/fixtures/tiny-sd/scheduler/ (an SD 1.x DDPMScheduler config: scaled_linear
0.00085..0.012, 1000 steps) the way diffusers' textual_inversion example does,
`DDPMScheduler.from_pretrained(folder, subfolder="scheduler")`, once as it is and once
from a copy with the flag set, and records betas and alphas_cumprod at a few dozen
timesteps of each (the last ten, where zero-SNR differs most, all of them). The Rust test
(tests/suite/scheduler.rs) makes the same copy, loads it as a model and compares.
"""

import json
import pathlib
import shutil
import sys
import tempfile

import diffusers
import torch
from diffusers import DDPMScheduler

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY_SD = ROOT / "tests" / "fixtures" / "tiny-sd"
PROBES = [0, 1, 2] + list(range(25, 990, 25)) + list(range(990, 1000))


def f32_list(values):
    # float32 -> Python float is exact, so JSON keeps the f32 bit pattern.
    return [float(v) for v in values.to(torch.float32).tolist()]


def tables(scheduler):
    probes = torch.tensor(PROBES)
    return {
        "betas": f32_list(scheduler.betas[probes]),
        "alphas_cumprod": f32_list(scheduler.alphas_cumprod[probes]),
    }


def main():
    plain = DDPMScheduler.from_pretrained(TINY_SD, subfolder="scheduler")
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp) / "tiny-sd"
        shutil.copytree(TINY_SD / "scheduler", folder / "scheduler")
        path = folder / "scheduler" / "scheduler_config.json"
        config = json.loads(path.read_text())
        config["rescale_betas_zero_snr"] = True
        path.write_text(json.dumps(config, indent=2))
        zero_snr = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    assert zero_snr.config.rescale_betas_zero_snr and not plain.config.rescale_betas_zero_snr
    assert zero_snr.config.beta_schedule == "scaled_linear" and len(zero_snr.betas) == 1000
    # Zero terminal SNR: the last timestep keeps no signal at all.
    assert float(zero_snr.alphas_cumprod[-1]) == 0.0 and float(zero_snr.betas[-1]) == 1.0
    fixture = {
        "generator": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "script": "tests/reference/make_zero_snr_schedule.py",
        },
        "timesteps": PROBES,
        "scaled_linear": tables(plain),
        "scaled_linear_zero_snr": tables(zero_snr),
    }
    json.dump(fixture, sys.stdout, indent=None, separators=(",", ":"))
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
