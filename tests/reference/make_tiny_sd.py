#!/usr/bin/env python3
"""Build the tiny Stable Diffusion 1.x reference fixtures for sdti.

Run from the repository root:

    $REFENV/bin/python tests/reference/make_tiny_sd.py

Writes (see tests/reference/README.md for details):

  tests/fixtures/tiny-sd/                    diffusers-format SD 1.x pipeline folder (fp16 weights)
  tests/fixtures/tiny-sd.safetensors         same weights, A1111/ComfyUI single-file (LDM) layout, fp16
  tests/fixtures/tiny-sd-expected.safetensors expected outputs (float32 unless noted)
  tests/fixtures/tiny-sd-expected.json       metadata: versions, prompts, ids, hyperparameters, key map

Everything is built from configs (no hub access) and is deterministic for a fixed
(torch, diffusers, transformers) triple. All reference outputs are computed in
float32 (and one gradient in float64) from the fp16-rounded weights, *after*
reloading the written fixture files, so the numbers belong to exactly the bytes
on disk.
"""

import copy
import gzip
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import diffusers  # noqa: E402
import safetensors  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
torch.use_deterministic_algorithms(True)
transformers.logging.set_verbosity_error()
diffusers.logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
PIPE = FIX / "tiny-sd"
SINGLE = FIX / "tiny-sd.safetensors"
EXPECTED = FIX / "tiny-sd-expected.safetensors"
EXPECTED_JSON = FIX / "tiny-sd-expected.json"
# the repo's copy of CLIP's vocabulary (checked against BPE_SHA256 below)
BPE_GZ = ROOT / "assets" / "bpe_simple_vocab_16e6.txt.gz"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"

VERSIONS = {
    "python": sys.version.split()[0],
    "torch": torch.__version__,
    "diffusers": diffusers.__version__,
    "transformers": transformers.__version__,
    "safetensors": safetensors.__version__,
    "numpy": np.__version__,
}
print("versions:", json.dumps(VERSIONS))

# --------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------
TE_CONFIG = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
    projection_dim=32,
)
UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=2,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
    use_linear_projection=False,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=64,
    scaling_factor=0.18215,
)
SCHED_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
    clip_sample=False,
)
SCALING_FACTOR = 0.18215

PROMPT = "a photo of a sks toy"
PLACEHOLDER_WORD = "sks"
PLACEHOLDER_TOKENS = ["<sks-0>", "<sks-1>"]
PROMPT_WITH_PLACEHOLDERS = "a photo of a <sks-0> <sks-1> toy"


def ids_list(t):
    return [int(x) for x in t.reshape(-1).tolist()]


# --------------------------------------------------------------------------------------
# 1. Tokenizer files (vocab.json + merges.txt) from the CLIP BPE list
# --------------------------------------------------------------------------------------
def bytes_to_unicode():
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_tokenizer(dst: Path):
    dst.mkdir(parents=True, exist_ok=True)
    import hashlib

    assert hashlib.sha256(BPE_GZ.read_bytes()).hexdigest() == BPE_SHA256, BPE_GZ
    lines = gzip.open(BPE_GZ).read().decode("utf-8").split("\n")
    merge_lines = lines[1 : 49152 - 256 - 2 + 1]  # 48,894 merges, header skipped
    assert len(merge_lines) == 48894
    merges = [tuple(m.split()) for m in merge_lines]
    assert all(len(m) == 2 for m in merges)
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408 and len(set(vocab)) == 49408
    encoder = {tok: i for i, tok in enumerate(vocab)}
    with open(dst / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(encoder, f, ensure_ascii=False)
    with open(dst / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")  # as transformers' save_vocabulary writes it: header, then one merge per line
        for m in merges:
            f.write(" ".join(m) + "\n")
    # Same content as openai/clip-vit-large-patch14 (SD 1.x tokenizer/ folder), model_max_length 77.
    def added(content):
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

    special = {
        "bos_token": added("<|startoftext|>"),
        "eos_token": added("<|endoftext|>"),
        "pad_token": "<|endoftext|>",
        "unk_token": added("<|endoftext|>"),
    }
    with open(dst / "special_tokens_map.json", "w") as f:
        json.dump({k: ({kk: vv for kk, vv in v.items() if kk != "__type"} if isinstance(v, dict) else v) for k, v in special.items()}, f, indent=2)
    tok_cfg = {
        "add_prefix_space": False,
        "bos_token": special["bos_token"],
        "do_lower_case": True,
        "eos_token": special["eos_token"],
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": special["unk_token"],
    }
    with open(dst / "tokenizer_config.json", "w") as f:
        json.dump(tok_cfg, f, indent=2)


# --------------------------------------------------------------------------------------
# 2. Models: random init, perturbed, fp16-rounded
# --------------------------------------------------------------------------------------
def build_models():
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(**TE_CONFIG))
    unet = UNet2DConditionModel(**UNET_CONFIG)
    vae = AutoencoderKL(**VAE_CONFIG)
    with torch.no_grad():
        for model in (te, unet, vae):
            for p in model.parameters():
                p.data = (p.data + 0.02 * torch.randn_like(p)).half().float()
    for m in (te, unet, vae):
        m.eval()
    return te, unet, vae


def fp16_state(model, prefix=""):
    out = {}
    for k, v in model.state_dict().items():
        out[prefix + k] = v.detach().to(torch.float16).contiguous()
    return out


def write_pipeline(te, unet, vae):
    PIPE.mkdir(parents=True, exist_ok=True)
    # --- text encoder: config via transformers, weights written by hand with `text_model.` prefix
    ted = PIPE / "text_encoder"
    ted.mkdir(exist_ok=True)
    te_half = copy.deepcopy(te).half()
    te_half.save_pretrained(ted, safe_serialization=True)
    native = list(safe_open(ted / "model.safetensors", "pt").keys())
    native_prefixed = all(k.startswith("text_model.") for k in native)
    te_sd = fp16_state(te)
    if not all(k.startswith("text_model.") for k in te_sd):
        te_sd = {"text_model." + k: v for k, v in te_sd.items()}
    save_file(te_sd, ted / "model.safetensors", metadata={"format": "pt"})
    # --- unet / vae: diffusers writes the real key names itself
    copy.deepcopy(unet).half().save_pretrained(PIPE / "unet", safe_serialization=True)
    copy.deepcopy(vae).half().save_pretrained(PIPE / "vae", safe_serialization=True)
    # --- scheduler
    DDPMScheduler(**SCHED_CONFIG).save_pretrained(PIPE / "scheduler")
    # --- tokenizer
    write_tokenizer(PIPE / "tokenizer")
    # --- model_index.json
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    with open(PIPE / "model_index.json", "w") as f:
        json.dump(model_index, f, indent=2)
    return {
        "transformers_save_pretrained_keys_have_text_model_prefix": native_prefixed,
        "written_keys_have_text_model_prefix": True,
        "example_native_key": native[0],
    }


def load_pipeline_fp32():
    """Reload the written folder exactly as a consumer would, as float32."""
    te = CLIPTextModel.from_pretrained(PIPE / "text_encoder", torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(PIPE / "unet", torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(PIPE / "vae", torch_dtype=torch.float32)
    for m in (te, unet, vae):
        m.eval()
        m.requires_grad_(False)
    return te, unet, vae


def assert_same_params(a, b, what):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb), (what, set(sa) ^ set(sb))
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), (what, k)


# --------------------------------------------------------------------------------------
# 3. Single-file (LDM) layout: reverse mapping diffusers -> LDM
# --------------------------------------------------------------------------------------
UNET_RESNET_RENAMES = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]
VAE_ATTN_RENAMES = [
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
]


def _rename_tail(tail, renames):
    # tail is e.g. "norm1.weight"; rename the module part only
    mod, _, param = tail.rpartition(".")
    for a, b in renames:
        if mod == a:
            return f"{b}.{param}"
    raise KeyError(tail)


def unet_diffusers_to_ldm_key(k, cfg):
    n = cfg["layers_per_block"]
    up_has_attn = ["CrossAttn" in t for t in cfg["up_block_types"]]
    p = k.split(".")
    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    mod, _, param = k.rpartition(".")
    if mod in fixed:
        return f"{fixed[mod]}.{param}"
    if p[0] == "down_blocks":
        b = int(p[1])
        if p[2] == "resnets":
            j = int(p[3])
            return f"input_blocks.{b * (n + 1) + j + 1}.0." + _rename_tail(".".join(p[4:]), UNET_RESNET_RENAMES)
        if p[2] == "attentions":
            j = int(p[3])
            return f"input_blocks.{b * (n + 1) + j + 1}.1." + ".".join(p[4:])
        if p[2] == "downsamplers":
            assert p[3] == "0" and p[4] == "conv"
            return f"input_blocks.{b * (n + 1) + n + 1}.0.op." + ".".join(p[5:])
    if p[0] == "mid_block":
        if p[1] == "resnets":
            idx = {0: 0, 1: 2}[int(p[2])]
            return f"middle_block.{idx}." + _rename_tail(".".join(p[3:]), UNET_RESNET_RENAMES)
        if p[1] == "attentions":
            assert p[2] == "0"
            return "middle_block.1." + ".".join(p[3:])
    if p[0] == "up_blocks":
        b = int(p[1])
        if p[2] == "resnets":
            j = int(p[3])
            return f"output_blocks.{b * (n + 1) + j}.0." + _rename_tail(".".join(p[4:]), UNET_RESNET_RENAMES)
        if p[2] == "attentions":
            j = int(p[3])
            return f"output_blocks.{b * (n + 1) + j}.1." + ".".join(p[4:])
        if p[2] == "upsamplers":
            assert p[3] == "0" and p[4] == "conv"
            sub = 2 if up_has_attn[b] else 1
            return f"output_blocks.{b * (n + 1) + n}.{sub}.conv." + ".".join(p[5:])
    raise KeyError(k)


def vae_diffusers_to_ldm_key(k, cfg):
    nblocks = len(cfg["up_block_types"])
    p = k.split(".")
    if p[0] in ("quant_conv", "post_quant_conv"):
        return k
    side = p[0]  # encoder / decoder
    rest = p[1:]
    mod = ".".join(rest[:-1])
    param = rest[-1]
    if mod in ("conv_in", "conv_out"):
        return f"{side}.{mod}.{param}"
    if mod == "conv_norm_out":
        return f"{side}.norm_out.{param}"
    if rest[0] == "down_blocks":
        i = int(rest[1])
        if rest[2] == "resnets":
            sub = ".".join(rest[4:])
            sub = sub.replace("conv_shortcut", "nin_shortcut")
            return f"{side}.down.{i}.block.{rest[3]}.{sub}"
        if rest[2] == "downsamplers":
            return f"{side}.down.{i}.downsample.conv.{param}"
    if rest[0] == "up_blocks":
        i = nblocks - 1 - int(rest[1])  # LDM decoder up.* indices run the other way
        if rest[2] == "resnets":
            sub = ".".join(rest[4:]).replace("conv_shortcut", "nin_shortcut")
            return f"{side}.up.{i}.block.{rest[3]}.{sub}"
        if rest[2] == "upsamplers":
            return f"{side}.up.{i}.upsample.conv.{param}"
    if rest[0] == "mid_block":
        if rest[1] == "resnets":
            return f"{side}.mid.block_{int(rest[2]) + 1}.{'.'.join(rest[3:])}"
        if rest[1] == "attentions":
            return f"{side}.mid.attn_1." + _rename_tail(".".join(rest[3:]), VAE_ATTN_RENAMES)
    raise KeyError(k)


def build_single_file(te, unet, vae):
    te_sd = fp16_state(te)
    if not all(k.startswith("text_model.") for k in te_sd):
        te_sd = {"text_model." + k: v for k, v in te_sd.items()}
    unet_sd = fp16_state(unet)
    vae_sd = fp16_state(vae)
    out = {}
    key_map = {"unet": {}, "vae": {}, "text_encoder": {}}
    for k, v in unet_sd.items():
        lk = "model.diffusion_model." + unet_diffusers_to_ldm_key(k, UNET_CONFIG)
        assert lk not in out, lk
        out[lk] = v
        key_map["unet"][lk] = k
    for k, v in vae_sd.items():
        lk = "first_stage_model." + vae_diffusers_to_ldm_key(k, VAE_CONFIG)
        assert lk not in out, lk
        if ".mid.attn_1." in lk and v.ndim == 2:
            v = v[:, :, None, None].contiguous()  # linear [c,c] -> 1x1 conv [c,c,1,1]
        out[lk] = v
        key_map["vae"][lk] = k
    for k, v in te_sd.items():
        lk = "cond_stage_model.transformer." + k
        out[lk] = v
        key_map["text_encoder"][lk] = k
    # Real SD 1.x checkpoints carry this int64 buffer; loaders must ignore it.
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    return out, key_map, (te_sd, unet_sd, vae_sd)


def validate_single_file(path, originals):
    te_sd, unet_sd, vae_sd = originals
    ckpt = load_file(path)
    unet_conv = convert_ldm_unet_checkpoint(ckpt, dict(UNET_CONFIG))
    vae_conv = convert_ldm_vae_checkpoint(ckpt, dict(VAE_CONFIG))
    clip_conv = convert_ldm_clip_checkpoint(ckpt)
    report = {}
    for name, conv, orig in (("unet", unet_conv, unet_sd), ("vae", vae_conv, vae_sd), ("text_encoder", clip_conv, te_sd)):
        extra = sorted(set(conv) - set(orig))
        missing = sorted(set(orig) - set(conv))
        if name == "text_encoder":
            assert extra == ["text_model.embeddings.position_ids"], extra
        else:
            assert not extra, (name, extra[:10])
        assert not missing, (name, missing[:10])
        for k, v in orig.items():
            c = conv[k]
            assert c.shape == v.shape, (name, k, c.shape, v.shape)
            assert c.dtype == v.dtype and torch.equal(c, v), (name, k)
        report[name] = {"tensors_checked": len(orig), "ignored_extra": extra}
        print(f"single-file -> diffusers via diffusers.loaders.single_file_utils: {name}: {len(orig)} tensors identical")
    # and load the converted dicts into fresh models (strict)
    UNet2DConditionModel(**UNET_CONFIG).load_state_dict({k: v.float() for k, v in unet_conv.items()}, strict=True)
    AutoencoderKL(**VAE_CONFIG).load_state_dict({k: v.float() for k, v in vae_conv.items()}, strict=True)
    # end to end: diffusers' own single-file loader (configs from the local folder, no hub)
    from diffusers import StableDiffusionPipeline

    sfp = StableDiffusionPipeline.from_single_file(str(path), config=str(PIPE), safety_checker=None, torch_dtype=torch.float32)
    ref = StableDiffusionPipeline.from_pretrained(PIPE, safety_checker=None, torch_dtype=torch.float32)
    for name in ("text_encoder", "unet", "vae"):
        assert_same_params(getattr(ref, name), getattr(sfp, name), "from_single_file." + name)
    report["StableDiffusionPipeline.from_single_file"] = "text_encoder, unet, vae identical to from_pretrained(tiny-sd/)"
    print("StableDiffusionPipeline.from_single_file(tiny-sd.safetensors, config=tiny-sd/) == from_pretrained(tiny-sd/)")
    return report


# --------------------------------------------------------------------------------------
# 4. Reference computations
# --------------------------------------------------------------------------------------
class InjectedTokenEmbedding(torch.nn.Module):
    """Token embedding = frozen base table ++ learnable new rows (a leaf Parameter)."""

    def __init__(self, base_weight, new_rows):
        super().__init__()
        self.register_buffer("base", base_weight.detach().clone())
        self.new_rows = new_rows  # leaf tensor with requires_grad, NOT registered (so model.to() can't copy it)

    def forward(self, ids):
        table = torch.cat([self.base, self.new_rows], dim=0)
        return F.embedding(ids, table)


def injected_text_encoder(te, vectors):
    te = copy.deepcopy(te)
    te.requires_grad_(False)
    emb = te.embeddings.token_embedding
    te.embeddings.token_embedding = InjectedTokenEmbedding(emb.weight, vectors)
    return te


def clip_skip2(te, ids):
    out = te(input_ids=ids, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == TE_CONFIG["num_hidden_layers"] + 1  # embeddings + every layer
    assert torch.equal(te.final_layer_norm(hs[-1]), out.last_hidden_state)
    return te.final_layer_norm(hs[-2]), out.last_hidden_state


def smooth_image(gen):
    h = w = 64
    y = torch.linspace(0.0, 1.0, h, dtype=torch.float64)[:, None]
    x = torch.linspace(0.0, 1.0, w, dtype=torch.float64)[None, :]
    chans = []
    for c in range(3):
        fx, fy = (1.0 + 2.0 * torch.rand(2, generator=gen, dtype=torch.float64)).tolist()
        px, py = (2 * math.pi * torch.rand(2, generator=gen, dtype=torch.float64)).tolist()
        img = 0.6 * torch.sin(2 * math.pi * fx * x + px) * torch.cos(2 * math.pi * fy * y + py)
        img = img + 0.3 * torch.cos(2 * math.pi * (fx * x + fy * y) + c)
        chans.append(img)
    img = torch.stack(chans)[None].float()
    assert img.abs().max() <= 0.9 + 1e-6
    return img


def training_loss(te, unet, sched, ids, vectors, latents, noise, t, prediction_type, dtype):
    """One textual-inversion step as diffusers' textual_inversion example does it."""
    vec = vectors.detach().to(dtype).clone().requires_grad_(True)
    te_i = injected_text_encoder(te, vec).to(dtype)
    unet_i = copy.deepcopy(unet).to(dtype)
    unet_i.requires_grad_(False)
    lat = latents.to(dtype)
    nz = noise.to(dtype)
    noisy = sched.add_noise(lat, nz, t)
    ctx = te_i(input_ids=ids).last_hidden_state
    pred = unet_i(noisy, t, ctx).sample
    if prediction_type == "epsilon":
        target = nz
    else:
        target = sched.get_velocity(lat, nz, t)
    loss = F.mse_loss(pred.float() if dtype == torch.float32 else pred, target.float() if dtype == torch.float32 else target, reduction="mean")
    loss.backward()
    for m in (te_i, unet_i):
        for name, p in m.named_parameters():
            assert p.grad is None, f"unexpected gradient on {name}"
    assert te_i.embeddings.token_embedding.base.grad is None
    return loss.detach(), vec.grad.detach(), dict(noisy=noisy.detach(), pred=pred.detach(), target=target.detach(), context=ctx.detach())


def main():
    FIX.mkdir(parents=True, exist_ok=True)
    te0, unet0, vae0 = build_models()
    te_note = write_pipeline(te0, unet0, vae0)
    print("text encoder key prefix:", te_note)

    # Reload everything from disk (float32) and prove it is what we built.
    te, unet, vae = load_pipeline_fp32()
    assert_same_params(te0, te, "text_encoder")
    assert_same_params(unet0, unet, "unet")
    assert_same_params(vae0, vae, "vae")
    sched = DDPMScheduler.from_pretrained(PIPE / "scheduler")
    tok = CLIPTokenizer.from_pretrained(PIPE / "tokenizer")
    print("reloaded pipeline folder: weights identical; tokenizer class", type(tok).__name__)
    # The whole folder must load as a diffusers pipeline too.
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(PIPE, safety_checker=None, feature_extractor=None, torch_dtype=torch.float32)
    assert_same_params(te0, pipe.text_encoder, "pipeline.text_encoder")
    assert_same_params(unet0, pipe.unet, "pipeline.unet")
    assert_same_params(vae0, pipe.vae, "pipeline.vae")
    del pipe

    # ---------------- single file
    single, key_map, originals = build_single_file(te0, unet0, vae0)
    save_file(single, SINGLE, metadata={"format": "pt"})
    sf_report = validate_single_file(SINGLE, originals)

    # ---------------- tokenizer checks
    cat_ids = tok("a photo of a cat").input_ids
    assert cat_ids == [49406, 320, 1125, 539, 320, 2368, 49407], cat_ids
    star_ids = tok("*").input_ids
    assert star_ids == [49406, 265, 49407], star_ids
    enc = tok(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    raw_ids = enc.input_ids
    raw_list = ids_list(raw_ids)
    sks = tok(PLACEHOLDER_WORD, add_special_tokens=False).input_ids
    assert len(sks) == 1, sks
    n_real = raw_list.index(49407) + 1
    assert raw_list.count(sks[0]) == 1
    slot = raw_list.index(sks[0])
    assert slot == 5
    pad_id = raw_list[-1]
    assert all(i == pad_id for i in raw_list[n_real:])
    ids_list_inj = raw_list[:slot] + [49408, 49409] + raw_list[slot + 1 :]
    ids_list_inj = ids_list_inj[:77]
    assert ids_list_inj[76] == pad_id
    ids = torch.tensor([ids_list_inj], dtype=torch.int64)
    slot_positions = [slot, slot + 1]
    # as diffusers' textual_inversion example: add_tokens + resize_token_embeddings
    tok2 = CLIPTokenizer.from_pretrained(PIPE / "tokenizer")
    n_added = tok2.add_tokens(PLACEHOLDER_TOKENS)
    assert n_added == 2
    new_ids = tok2.convert_tokens_to_ids(PLACEHOLDER_TOKENS)
    assert new_ids == [49408, 49409], new_ids
    via_tok = tok2(PROMPT_WITH_PLACEHOLDERS, padding="max_length", max_length=77, truncation=True).input_ids
    assert via_tok == ids_list_inj, (via_tok, ids_list_inj)

    g1 = torch.Generator().manual_seed(1)
    vectors = torch.randn(2, 32, generator=g1) * 0.3

    # ---------------- text encoder
    with torch.no_grad():
        te_resized = copy.deepcopy(te)
        te_resized.resize_token_embeddings(len(tok2))
        assert te_resized.embeddings.token_embedding.weight.shape == (49410, 32)
        te_resized.embeddings.token_embedding.weight[49408:] = vectors
        assert torch.equal(te_resized.embeddings.token_embedding.weight[:49408], te.embeddings.token_embedding.weight)
        skip2, last = clip_skip2(te_resized, ids)
        te_inj = injected_text_encoder(te, vectors)
        last_inj = te_inj(input_ids=ids).last_hidden_state
        max_diff_inj = (last_inj - last).abs().max().item()
        assert max_diff_inj == 0.0, max_diff_inj
        # eager attention must agree with the default (sdpa) one
        te_eager = copy.deepcopy(te_resized)
        te_eager.config._attn_implementation = "eager"
        last_eager = te_eager(input_ids=ids).last_hidden_state
        eager_vs_default = (last_eager - last).abs().max().item()
        assert eager_vs_default < 1e-5, eager_vs_default
        te_plain_last = te(input_ids=raw_ids).last_hidden_state
    print(f"te: |last| max {last.abs().max():.4f}; injected==resized; eager vs {te.config._attn_implementation}: {eager_vs_default:.2e}")

    # ---------------- vae
    g2 = torch.Generator().manual_seed(2)
    image = smooth_image(g2)
    with torch.no_grad():
        dist = vae.encode(image).latent_dist
        latent_mean, latent_logvar = dist.mean.clone(), dist.logvar.clone()
        # logvar is clamped to [-30, 20] inside DiagonalGaussianDistribution
        h = vae.quant_conv(vae.encoder(image))
        raw_logvar = h[:, 4:]
        assert torch.equal(raw_logvar.clamp(-30, 20), latent_logvar)
        logvar_clamped = bool((raw_logvar != latent_logvar).any())
    print(f"vae: mean range [{latent_mean.min():.3f},{latent_mean.max():.3f}] logvar range [{latent_logvar.min():.3f},{latent_logvar.max():.3f}] clamp active: {logvar_clamped}")

    # ---------------- unet
    g3 = torch.Generator().manual_seed(3)
    u_sample = torch.randn(2, 4, 32, 32, generator=g3)  # 32x32: the 1x1 lowest level of an 8x8 latent normalises 2 values per group, which amplifies f32 rounding far past 1e-4
    u_context = torch.randn(2, 77, 32, generator=g3)
    u_t = torch.tensor([10, 700], dtype=torch.int64)
    with torch.no_grad():
        u_pred = unet(u_sample, u_t, u_context).sample
        t_emb = unet.time_proj(u_t)  # sinusoidal, before time_embedding MLP
        temb = unet.time_embedding(t_emb)
    # A latent side that is not a multiple of 8 (an image side that is a multiple of 8
    # but not of 64): diffusers upsamples to the skip connections' sizes.
    g3b = torch.Generator().manual_seed(31)
    u_sample_odd = torch.randn(1, 4, 20, 28, generator=g3b)
    u_context_odd = torch.randn(1, 77, 32, generator=g3b)
    with torch.no_grad():
        u_pred_odd = unet(u_sample_odd, torch.tensor([300]), u_context_odd).sample
    print(f"unet: |noise_pred| max {u_pred.abs().max():.4f}, std {u_pred.std():.4f}")

    # ---------------- loss + grad
    latents = (latent_mean * SCALING_FACTOR).contiguous()
    g4 = torch.Generator().manual_seed(4)
    noise = torch.randn(1, 4, 8, 8, generator=g4)
    t = torch.tensor([500], dtype=torch.int64)
    loss, grad, inter = training_loss(te, unet, sched, ids, vectors, latents, noise, t, "epsilon", torch.float32)
    assert torch.equal(inter["context"], last), "loss context must equal te.last_hidden_state"
    loss64, grad64, inter64 = training_loss(te, unet, sched, ids, vectors, latents, noise, t, "epsilon", torch.float64)
    sched_v = DDPMScheduler.from_config(sched.config, prediction_type="v_prediction")
    loss_v, grad_v, inter_v = training_loss(te, unet, sched_v, ids, vectors, latents, noise, t, "v_prediction", torch.float32)
    loss_v64, grad_v64, _ = training_loss(te, unet, sched_v, ids, vectors, latents, noise, t, "v_prediction", torch.float64)
    rel32 = ((grad.double() - grad64).norm() / grad64.norm()).item()
    rel32v = ((grad_v.double() - grad_v64).norm() / grad_v64.norm()).item()
    print(f"loss eps: f32 {loss.item():.8f} f64 {loss64.item():.10f}; |grad| {grad.norm():.6e}; grad f32 vs f64 rel err {rel32:.2e}")
    print(f"loss v:   f32 {loss_v.item():.8f} f64 {loss_v64.item():.10f}; |grad| {grad_v.norm():.6e}; grad f32 vs f64 rel err {rel32v:.2e}")

    # ---------------- finite differences (float64, sanity only)
    te64 = copy.deepcopy(te).double()
    unet64 = copy.deepcopy(unet).double()
    lat64, nz64 = latents.double(), noise.double()
    noisy64 = sched.add_noise(lat64, nz64, t)

    def loss_at(v):
        with torch.no_grad():
            ctx = injected_text_encoder(te64, v)(input_ids=ids).last_hidden_state
            pred = unet64(noisy64, t, ctx).sample
            return F.mse_loss(pred, nz64).item()

    fd_report = []
    eps_fd = 1e-6
    for (r, c) in [(0, 0), (1, 7), (0, 31)]:
        vp = vectors.double().clone()
        vm = vectors.double().clone()
        vp[r, c] += eps_fd
        vm[r, c] -= eps_fd
        fd = (loss_at(vp) - loss_at(vm)) / (2 * eps_fd)
        ag = grad64[r, c].item()
        fd_report.append({"coord": [r, c], "finite_difference": fd, "autograd_f64": ag, "autograd_f32": grad[r, c].item(), "abs_diff": abs(fd - ag)})
        print(f"finite diff [{r},{c}]: fd {fd:.10e} autograd64 {ag:.10e} autograd32 {grad[r, c].item():.10e} |diff| {abs(fd - ag):.2e}")
        assert abs(fd - ag) <= 1e-5 * abs(ag) + 1e-10, "finite difference mismatch"

    # ---------------- AdamW
    g5 = torch.Generator().manual_seed(5)
    grad1 = torch.randn(2, 32, generator=g5)
    grad2 = torch.randn(2, 32, generator=g5)
    adam = {}
    for clip in (None, 0.1):
        p = torch.nn.Parameter(vectors.clone())
        opt = torch.optim.AdamW([p], lr=5e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
        outs = []
        for gk in (grad1, grad2):
            opt.zero_grad(set_to_none=True)
            p.grad = gk.clone()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_([p], clip)
            opt.step()
            outs.append(p.detach().clone())
        adam[clip] = outs
    # independent re-implementation check of the documented AdamW formula
    def adamw_ref(p0, grads, clip):
        p = p0.double().clone()
        m = torch.zeros_like(p)
        v = torch.zeros_like(p)
        res = []
        for step, g in enumerate(grads, 1):
            g = g.double()
            if clip is not None:
                n = g.norm()
                g = g * min(1.0, clip / (n.item() + 1e-6))
            p = p * (1 - 5e-3 * 1e-2)
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g * g
            bc1 = 1 - 0.9**step
            bc2 = 1 - 0.999**step
            p = p - (5e-3 / bc1) * m / (v.sqrt() / math.sqrt(bc2) + 1e-8)
            res.append(p.clone())
        return res
    for clip in (None, 0.1):
        ref = adamw_ref(vectors, [grad1, grad2], clip)
        for a, b in zip(adam[clip], ref):
            assert (a.double() - b).abs().max().item() < 1e-6

    # ---------------- write expected tensors
    tensors = {
        "te.input_ids": ids,
        "te.input_ids_raw": raw_ids.to(torch.int64),
        "te.vectors": vectors,
        "te.last_hidden_state": last,
        "te.clip_skip2": skip2,
        "te.plain_last_hidden_state": te_plain_last,
        "vae.image": image,
        "vae.latent_mean": latent_mean,
        "vae.latent_logvar": latent_logvar,
        "unet.sample": u_sample,
        "unet.timesteps": u_t,
        "unet.context": u_context,
        "unet.noise_pred": u_pred,
        "unet.sample_odd": u_sample_odd,
        "unet.context_odd": u_context_odd,
        "unet.noise_pred_odd": u_pred_odd,
        "unet.time_proj": t_emb,
        "unet.time_embedding": temb,
        "loss.latents": latents,
        "loss.noise": noise,
        "loss.timestep": t,
        "loss.noisy_latents": inter["noisy"],
        "loss.noise_pred": inter["pred"],
        "loss.value": loss.reshape(()),
        "loss.grad": grad,
        "loss.value_f64": loss64.reshape(()),
        "loss.grad_f64": grad64,
        "loss_v.target": inter_v["target"],
        "loss_v.noise_pred": inter_v["pred"],
        "loss_v.value": loss_v.reshape(()),
        "loss_v.grad": grad_v,
        "loss_v.value_f64": loss_v64.reshape(()),
        "loss_v.grad_f64": grad_v64,
        "ddpm.alphas_cumprod": sched.alphas_cumprod.clone(),
        "adamw.param0": vectors,
        "adamw.grad1": grad1,
        "adamw.grad2": grad2,
        "adamw.param1": adam[None][0],
        "adamw.param2": adam[None][1],
        "adamw_clip.param1": adam[0.1][0],
        "adamw_clip.param2": adam[0.1][1],
    }
    tensors = {k: v.detach().clone().contiguous() for k, v in tensors.items()}
    for k, v in tensors.items():
        assert torch.isfinite(v.double()).all(), k
        if v.is_floating_point() and not k.endswith("_f64"):
            assert v.dtype == torch.float32, k
    save_file(tensors, EXPECTED, metadata={"format": "pt"})  # one key only: safetensors writes metadata in random order

    # ---------------- json metadata
    def rep(section, predicate):
        return [{"ldm": lk, "diffusers": dk, "ldm_shape": list(single[lk].shape), "diffusers_shape": list(originals[{"unet": 1, "vae": 2, "text_encoder": 0}[section]][dk].shape)}
                for lk, dk in key_map[section].items() if predicate(lk.split(".", 2)[2] if section == "unet" else lk.split(".", 1)[1])]

    representative = {
        "unet": rep("unet", lambda k: k in [
            "time_embed.0.weight", "input_blocks.0.0.weight", "input_blocks.1.0.in_layers.0.weight",
            "input_blocks.1.0.emb_layers.1.weight", "input_blocks.1.1.proj_in.weight",
            "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight", "input_blocks.3.0.op.weight",
            "input_blocks.7.0.skip_connection.weight", "input_blocks.11.0.out_layers.3.weight",
            "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight", "middle_block.2.in_layers.2.weight",
            "output_blocks.0.0.skip_connection.weight", "output_blocks.2.1.conv.weight",
            "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight", "output_blocks.11.1.proj_out.weight",
            "out.0.weight", "out.2.weight"]),
        "vae": rep("vae", lambda k: k in [
            "encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight", "encoder.down.2.block.0.nin_shortcut.weight",
            "encoder.down.0.downsample.conv.weight", "encoder.mid.block_1.conv1.weight", "encoder.mid.attn_1.norm.weight",
            "encoder.mid.attn_1.q.weight", "encoder.mid.attn_1.k.weight", "encoder.mid.attn_1.v.weight",
            "encoder.mid.attn_1.proj_out.weight", "encoder.norm_out.weight", "decoder.up.0.block.2.conv2.weight",
            "decoder.up.3.block.0.conv1.weight", "decoder.up.3.upsample.conv.weight", "decoder.up.1.block.0.nin_shortcut.weight",
            "quant_conv.weight", "post_quant_conv.weight"]),
        "text_encoder": rep("text_encoder", lambda k: any(s in k for s in [
            "token_embedding.weight", "position_embedding.weight", "layers.0.self_attn.q_proj.weight",
            "layers.2.mlp.fc1.weight", "final_layer_norm.weight"])),
    }

    te_cfg_json = json.load(open(PIPE / "text_encoder" / "config.json"))
    meta = {
        "generator": "tests/reference/make_tiny_sd.py",
        "versions": VERSIONS,
        "seeds": {
            "weights": "torch.manual_seed(0); build CLIPTextModel, UNet2DConditionModel, AutoencoderKL in that order; "
                       "then for te, unet, vae in order, for p in model.parameters(): p.data = (p.data + 0.02*torch.randn_like(p)).half().float()",
            "te.vectors": "torch.randn(2,32, generator=Generator().manual_seed(1)) * 0.3",
            "vae.image": "smooth_image(Generator().manual_seed(2))",
            "unet": "Generator().manual_seed(3): sample randn[2,4,32,32] then context randn[2,77,32]",
            "loss.noise": "randn[1,4,8,8], Generator().manual_seed(4)",
            "adamw": "Generator().manual_seed(5): grad1 randn[2,32] then grad2 randn[2,32]",
        },
        "configs": {
            "text_encoder": TE_CONFIG,
            "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_CONFIG.items()},
            "vae": {k: list(v) if isinstance(v, tuple) else v for k, v in VAE_CONFIG.items()},
            "scheduler": SCHED_CONFIG,
            "text_encoder_attn_implementation_used": te.config._attn_implementation,
            "text_encoder_config_json_dtype": te_cfg_json.get("dtype", te_cfg_json.get("torch_dtype")),
        },
        "weights": {
            "dtype_on_disk": "float16",
            "compute_dtype": "float32 (fp16 weights upcast exactly)",
            "text_encoder_key_prefix": te_note,
            "note": "text_encoder/model.safetensors keys are 'text_model.*' (transformers < 5.6 layout). "
                    "transformers " + transformers.__version__ + " save_pretrained writes them " +
                    ("WITH" if te_note["transformers_save_pretrained_keys_have_text_model_prefix"] else "WITHOUT") +
                    " the prefix (e.g. '" + te_note["example_native_key"] + "'); this script renames them to add it. "
                    "from_pretrained of either layout works in this version.",
        },
        "tokenizer": {
            "source": "bpe_simple_vocab_16e6.txt.gz lines[1:48895] -> merges.txt ('#version: 0.2' header + 48894 merges); "
                      "vocab.json = 256 byte symbols, 256 with '</w>', 48894 merges joined, <|startoftext|>, <|endoftext|>",
            "class": type(tok).__name__,
            "check_a_photo_of_a_cat": cat_ids,
            "check_star": star_ids,
            "bos_id": 49406,
            "eos_id": 49407,
            "pad_id_used_by_tokenizer": pad_id,
            "pad_note": "padding='max_length' pads with <|endoftext|> (49407), NOT with the text config's pad_token_id=1",
        },
        "text_encoder_case": {
            "prompt": PROMPT,
            "placeholder_word": PLACEHOLDER_WORD,
            "placeholder_word_id": sks[0],
            "raw_ids": raw_list,
            "raw_ids_unpadded": raw_list[:n_real],
            "placeholder_tokens": PLACEHOLDER_TOKENS,
            "placeholder_token_ids": new_ids,
            "prompt_with_placeholders": PROMPT_WITH_PLACEHOLDERS,
            "ids": ids_list_inj,
            "ids_unpadded": ids_list_inj[: n_real + 1],
            "slot_positions": slot_positions,
            "construction": "tokenize prompt (max_length 77, pad) and replace the single 'sks' slot by [49408, 49409]; "
                            "the sequence stays 77 long (one trailing pad drops off). Identical to tokenizer.add_tokens(placeholder_tokens) "
                            "then tokenizing prompt_with_placeholders.",
            "injection": "token table rows 49408/49409 := te.vectors (as resize_token_embeddings(49410) + setting the new rows); "
                         "verified bit-identical to a frozen-base ++ leaf-vectors table",
            "clip_skip2": "final_layer_norm(hidden_states[-2]); hidden_states has num_layers+1 entries (embeddings output first). "
                          "A1111 'Clip skip 2' == ComfyUI CLIPSetLastLayer(-2) == diffusers pipeline clip_skip=1",
            "no_attention_mask": "causal mask only; no padding mask (SD 1.x never passes attention_mask)",
            "te.plain_last_hidden_state": "last_hidden_state of te.input_ids_raw with the original 49408-row table (no injection)",
            "eager_vs_default_attention_max_abs_diff": eager_vs_default,
        },
        "vae_case": {
            "image": "smooth_image(): per channel c: 0.6*sin(2pi*fx*x+px)*cos(2pi*fy*y+py) + 0.3*cos(2pi*(fx*x+fy*y)+c), x,y=linspace(0,1,64), "
                     "fx,fy ~ 1+2*U(0,1), px,py ~ 2pi*U(0,1) drawn in float64 from the seeded generator; stored float32 [1,3,64,64]",
            "latent": "vae.encode(image).latent_dist: moments = quant_conv(encoder(image)); mean = moments[:, :4], logvar = clamp(moments[:, 4:], -30, 20)",
            "logvar_clamp_active": logvar_clamped,
        },
        "unet_case": {"timesteps": ids_list(u_t), "note": "unet.time_proj = sinusoidal embedding (flip_sin_to_cos -> [cos, sin]); unet.time_embedding = MLP output (dim 128)"},
        "loss_case": {
            "timestep": 500,
            "latents": "vae.latent_mean * 0.18215 (mean, not a sample)",
            "noisy": "sqrt(acp[t])*latents + sqrt(1-acp[t])*noise with acp = scheduler.alphas_cumprod (float32, cast to the compute dtype)",
            "context": "text encoder last_hidden_state of te.input_ids with te.vectors injected (== te.last_hidden_state)",
            "epsilon_target": "noise",
            "v_target": "sqrt(acp[t])*noise - sqrt(1-acp[t])*latents",
            "loss": "F.mse_loss(pred.float(), target.float(), reduction='mean') over 1*4*8*8 = 256 elements",
            "grad": "d loss / d te.vectors (only the two injected rows are trainable)",
            "f64": "loss.*_f64: same inputs (the float32 loss.latents / loss.noise / vectors upcast), models .double(); "
                   "NB diffusers' get_timestep_embedding always computes the sinusoid in float32 and alphas_cumprod is float32, so those are float32-rounded even in the f64 run",
            "grad_f32_vs_f64_rel_err": {"epsilon": rel32, "v_prediction": rel32v},
            "acp_500": float(sched.alphas_cumprod[500]),
        },
        "finite_difference_check": {"step": eps_fd, "dtype": "float64", "epsilon_loss": fd_report},
        "adamw": {
            "optimizer": "torch.optim.AdamW([p], lr=5e-3, betas=(0.9,0.999), eps=1e-8, weight_decay=1e-2) (amsgrad False)",
            "formula": "p *= 1 - lr*wd; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2; p -= (lr/(1-b1^t)) * m / (sqrt(v)/sqrt(1-b2^t) + eps)",
            "clip": "adamw_clip.*: torch.nn.utils.clip_grad_norm_([p], 0.1) before each step: g *= min(1, 0.1/(||g||_2 + 1e-6))",
        },
        "ddpm": {"betas": "linspace(sqrt(0.00085), sqrt(0.012), 1000, dtype=float32)**2", "alphas_cumprod": "cumprod(1-betas) in float32"},
        "single_file": {
            "path": "tests/fixtures/tiny-sd.safetensors",
            "dtype": "float16 (plus one int64 buffer cond_stage_model.transformer.text_model.embeddings.position_ids [1,77], as real SD 1.x checkpoints have; ignore it)",
            "prefixes": {"model.diffusion_model.": "unet", "first_stage_model.": "vae", "cond_stage_model.transformer.": "text encoder (keys then start with text_model.)"},
            "validated_with": "diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint / convert_ldm_vae_checkpoint / convert_ldm_clip_checkpoint: every tensor bit-identical to the diffusers folder",
            "validation": sf_report,
            "rules": {
                "unet": [
                    "time_embedding.linear_1/2 <- time_embed.0/2; conv_in <- input_blocks.0.0; conv_norm_out <- out.0; conv_out <- out.2",
                    "down_blocks.b.resnets.j <- input_blocks.{3b+j+1}.0; down_blocks.b.attentions.j <- input_blocks.{3b+j+1}.1; down_blocks.b.downsamplers.0.conv <- input_blocks.{3b+3}.0.op (b<3)",
                    "mid_block.resnets.0 <- middle_block.0; mid_block.attentions.0 <- middle_block.1; mid_block.resnets.1 <- middle_block.2",
                    "up_blocks.b.resnets.j <- output_blocks.{3b+j}.0; up_blocks.b.attentions.j <- output_blocks.{3b+j}.1; up_blocks.b.upsamplers.0.conv <- output_blocks.{3b+2}.1.conv if up block b has no attention (b=0) else output_blocks.{3b+2}.2.conv (b<3)",
                    "resnet: norm1<-in_layers.0, conv1<-in_layers.2, norm2<-out_layers.0, conv2<-out_layers.3, time_emb_proj<-emb_layers.1, conv_shortcut<-skip_connection",
                    "attention (Transformer2DModel / SpatialTransformer) inner names identical: norm, proj_in, transformer_blocks.0.{norm1,attn1.to_q/k/v,attn1.to_out.0,norm2,attn2.*,norm3,ff.net.0.proj,ff.net.2}, proj_out; proj_in/proj_out are 1x1 convs [c,c,1,1] in both",
                    "3 = layers_per_block + 1 for input_blocks; 3 = layers_per_block + 1 for output_blocks (each up block has layers_per_block+1 resnets)",
                ],
                "vae": [
                    "encoder/decoder.{conv_in,conv_out} same; conv_norm_out <- norm_out; quant_conv, post_quant_conv same",
                    "encoder.down_blocks.i.resnets.j <- encoder.down.i.block.j; encoder.down_blocks.i.downsamplers.0.conv <- encoder.down.i.downsample.conv",
                    "decoder.up_blocks.i.resnets.j <- decoder.up.{3-i}.block.j; decoder.up_blocks.i.upsamplers.0.conv <- decoder.up.{3-i}.upsample.conv (LDM up index reversed)",
                    "resnet: conv_shortcut <- nin_shortcut (others same: norm1, conv1, norm2, conv2)",
                    "mid_block.resnets.0/1 <- mid.block_1/block_2; mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0} <- mid.attn_1.{norm,q,k,v,proj_out}; q/k/v/proj_out weights are 1x1 conv [c,c,1,1] in LDM, linear [c,c] in diffusers (biases [c] both)",
                ],
                "text_encoder": ["cond_stage_model.transformer.text_model.X <- text_model.X (strip 'cond_stage_model.transformer.')"],
            },
            "representative": representative,
            "key_map_ldm_to_diffusers": key_map,
        },
        "expected_tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in tensors.items()},
    }
    with open(EXPECTED_JSON, "w") as f:
        json.dump(meta, f, indent=1)

    # sizes
    total = 0
    for p in sorted(FIX.rglob("*")):
        if p.is_file() and (p == SINGLE or p == EXPECTED or p == EXPECTED_JSON or PIPE in p.parents):
            total += p.stat().st_size
            print(f"  {p.relative_to(ROOT)}: {p.stat().st_size / 1e6:.2f} MB")
    print(f"total fixture size: {total / 1e6:.2f} MB")
    print("OK")


if __name__ == "__main__":
    main()
