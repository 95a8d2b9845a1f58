#!/usr/bin/env python3
"""Build the tiny SDXL reference fixtures for sdti.

Run from the repository root:

    $REFENV/bin/python tests/reference/make_tiny_sdxl.py

Writes (see tests/reference/README.md, section "tiny-sdxl (SDXL)"):

  tests/fixtures/tiny-sdxl/                      diffusers StableDiffusionXLPipeline folder (fp16 weights)
  tests/fixtures/tiny-sdxl.safetensors           same weights, SGM/A1111/ComfyUI single-file layout, fp16
  tests/fixtures/tiny-sdxl-expected.safetensors  expected outputs (float32 unless the name ends in _f64)
  tests/fixtures/tiny-sdxl-expected.json         metadata: versions, prompts, ids, configs, key map

Same conventions as make_tiny_sd.py: everything is built from configs (no hub access),
torch.manual_seed(0), every parameter perturbed by 0.02*randn and rounded through fp16,
and all reference outputs computed in float32 (float64 for the finite-difference checks)
*after* reloading the written files, so the numbers belong to exactly the bytes on disk.
Real depths (12-layer L, 32-layer G, UNet depths 1/2/3 with the SDXL block pattern),
tiny widths (L 32, G 48 so that a swap or a wrong concat order shows).
"""

import copy
import gzip
import hashlib
import json
import math
import os
import sys
import tempfile
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
from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
torch.use_deterministic_algorithms(True)
transformers.logging.set_verbosity_error()
diffusers.logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
PIPE = FIX / "tiny-sdxl"
SINGLE = FIX / "tiny-sdxl.safetensors"
EXPECTED = FIX / "tiny-sdxl-expected.safetensors"
EXPECTED_JSON = FIX / "tiny-sdxl-expected.json"
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
# CLIP ViT-L/14 text model (SDXL text_encoder/config.json: quick_gelu, 12 layers, bos 0 / eos 2 /
# pad 1 as on the Hub) at width 32.
TE1_CONFIG = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=12,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
    projection_dim=32,
)
# OpenCLIP ViT-bigG/14 text model (SDXL text_encoder_2/config.json: gelu (erf), 32 layers,
# projection, eos_token_id 2 as on the Hub, which makes transformers pool at argmax(ids)) at width 48.
TE2_CONFIG = dict(
    vocab_size=49408,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=32,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
    projection_dim=48,
)
ADD_TIME_DIM = 8
UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 32, 64),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 3),
    attention_head_dim=(2, 2, 4),
    cross_attention_dim=TE1_CONFIG["hidden_size"] + TE2_CONFIG["hidden_size"],  # 80 = 32 + 48
    use_linear_projection=True,
    upcast_attention=False,
    addition_embed_type="text_time",
    addition_time_embed_dim=ADD_TIME_DIM,
    projection_class_embeddings_input_dim=TE2_CONFIG["projection_dim"] + 6 * ADD_TIME_DIM,  # 96 = 48 + 6*8
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
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
    scaling_factor=0.13025,
    force_upcast=True,
)
# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (the fields
# EulerDiscreteScheduler takes; the Hub file also carries clip_sample/set_alpha_to_one/
# skip_prk_steps/sample_max_value, which this class ignores).
SCHED_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    interpolation_type="linear",
    use_karras_sigmas=False,
    steps_offset=1,
    timestep_spacing="leading",
)
SCALING_FACTOR = 0.13025

BOS, EOS = 49406, 49407
PAD_G = 0
PROMPT = "a photo of a sks toy"
PLACEHOLDER_WORD = "sks"
PLACEHOLDER_TOKENS = ["<sks-0>", "<sks-1>"]
PROMPT_WITH_PLACEHOLDERS = "a photo of a <sks-0> <sks-1> toy"
LONG_PROMPT = PROMPT + " " + " ".join(
    ["on a wooden table in a quiet garden with red flowers and green leaves under the blue sky"] * 6
)
# (orig_h, orig_w, crop_top, crop_left, target_h, target_w): non-square, non-zero crop
LOSS_TIME_IDS = [[64.0, 48.0, 3.0, 5.0, 64.0, 64.0]]
UNET_TIME_IDS = [[64.0, 48.0, 3.0, 5.0, 64.0, 64.0], [96.0, 128.0, 16.0, 0.0, 80.0, 112.0]]


def ids_list(t):
    return [int(x) for x in t.reshape(-1).tolist()]


def g_ids(l_ids):
    """G's ids: L's ids with every slot after the first EOS set to 0 (open_clip/A1111/ComfyUI)."""
    out = list(l_ids)
    first = out.index(EOS)
    return out[: first + 1] + [PAD_G] * (len(out) - first - 1)


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


def write_tokenizer(dst: Path, pad_token):
    """tokenizer/ (pad <|endoftext|>) and tokenizer_2/ (pad "!", as the SDXL Hub folders).

    vocab.json and merges.txt are byte-identical to tests/fixtures/tiny-sd/tokenizer/ (git
    stores them once)."""
    dst.mkdir(parents=True, exist_ok=True)
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
        f.write("#version: 0.2\n")
        for m in merges:
            f.write(" ".join(m) + "\n")

    def added(content, normalized=True):
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}

    special = {
        "bos_token": added("<|startoftext|>"),
        "eos_token": added("<|endoftext|>"),
        # SDXL tokenizer_2/special_tokens_map.json: {"content": "!", "normalized": false, ...}
        "pad_token": pad_token if pad_token == "<|endoftext|>" else added(pad_token, normalized=False),
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
        "pad_token": pad_token,
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
    te1 = CLIPTextModel(CLIPTextConfig(**TE1_CONFIG))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**TE2_CONFIG))
    unet = UNet2DConditionModel(**UNET_CONFIG)
    vae = AutoencoderKL(**VAE_CONFIG)
    with torch.no_grad():
        for model in (te1, te2, unet, vae):
            for p in model.parameters():
                p.data = (p.data + 0.02 * torch.randn_like(p)).half().float()
    for m in (te1, te2, unet, vae):
        m.eval()
    # a missing transpose of the G projection must show
    w = te2.text_projection.weight
    assert (w - w.T).norm() > 0.5 * w.norm()
    return te1, te2, unet, vae


def fp16_state(model, prefix=""):
    out = {}
    for k, v in model.state_dict().items():
        out[prefix + k] = v.detach().to(torch.float16).contiguous()
    return out


def te1_state(te1):
    sd = fp16_state(te1)
    if not all(k.startswith("text_model.") for k in sd):
        sd = {"text_model." + k: v for k, v in sd.items()}
    return sd


def te2_state(te2):
    sd = fp16_state(te2)
    assert all(k.startswith("text_model.") or k == "text_projection.weight" for k in sd), list(sd)[:5]
    return sd


def write_pipeline(te1, te2, unet, vae):
    PIPE.mkdir(parents=True, exist_ok=True)
    # --- text encoders: configs via transformers, weights written by hand with the `text_model.`
    # prefix (transformers < 5.6 layout, as every SDXL folder on the Hub)
    notes = {}
    for name, te, state in (("text_encoder", te1, te1_state), ("text_encoder_2", te2, te2_state)):
        d = PIPE / name
        d.mkdir(exist_ok=True)
        copy.deepcopy(te).half().save_pretrained(d, safe_serialization=True)
        native = list(safe_open(d / "model.safetensors", "pt").keys())
        notes[name] = {
            "transformers_save_pretrained_keys_have_text_model_prefix": all(k.startswith("text_model.") or k == "text_projection.weight" for k in native),
            "example_native_key": sorted(native)[0],
        }
        save_file(state(te), d / "model.safetensors", metadata={"format": "pt"})
    # --- unet / vae: diffusers writes the real key names itself
    copy.deepcopy(unet).half().save_pretrained(PIPE / "unet", safe_serialization=True)
    copy.deepcopy(vae).half().save_pretrained(PIPE / "vae", safe_serialization=True)
    # --- scheduler (+ two variants beside it: v-prediction, and v-prediction with zero terminal SNR)
    EulerDiscreteScheduler(**SCHED_CONFIG).save_pretrained(PIPE / "scheduler")
    base = json.load(open(PIPE / "scheduler" / "scheduler_config.json"))
    for fname, upd in (("scheduler_config_v.json", {"prediction_type": "v_prediction"}),
                       ("scheduler_config_v_ztsnr.json", {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True})):
        cfg = dict(base)
        cfg.update(upd)
        with open(PIPE / "scheduler" / fname, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
    # --- tokenizers
    write_tokenizer(PIPE / "tokenizer", "<|endoftext|>")
    write_tokenizer(PIPE / "tokenizer_2", "!")
    # --- model_index.json
    model_index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "force_zeros_for_empty_prompt": True,
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    with open(PIPE / "model_index.json", "w") as f:
        json.dump(model_index, f, indent=2)
    return notes


def load_pipeline_fp32():
    """Reload the written folder exactly as a consumer would, as float32."""
    te1 = CLIPTextModel.from_pretrained(PIPE / "text_encoder", torch_dtype=torch.float32)
    te2 = CLIPTextModelWithProjection.from_pretrained(PIPE / "text_encoder_2", torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(PIPE / "unet", torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(PIPE / "vae", torch_dtype=torch.float32)
    for m in (te1, te2, unet, vae):
        m.eval()
        m.requires_grad_(False)
    return te1, te2, unet, vae


def assert_same_params(a, b, what):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb), (what, set(sa) ^ set(sb))
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), (what, k)


# --------------------------------------------------------------------------------------
# 3. Single-file (SGM) layout: reverse mapping diffusers -> SGM
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
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
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
    side = p[0]
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
            sub = ".".join(rest[4:]).replace("conv_shortcut", "nin_shortcut")
            return f"{side}.down.{i}.block.{rest[3]}.{sub}"
        if rest[2] == "downsamplers":
            return f"{side}.down.{i}.downsample.conv.{param}"
    if rest[0] == "up_blocks":
        i = nblocks - 1 - int(rest[1])
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


G_PREFIX = "conditioner.embedders.1.model."
L_PREFIX = "conditioner.embedders.0.transformer."
OPENCLIP_LAYER_RENAMES = [
    ("self_attn.out_proj", "attn.out_proj"),
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
]


def te2_to_openclip(te2_sd):
    """transformers CLIPTextModelWithProjection keys -> OpenCLIP (FrozenOpenCLIPEmbedder2) keys.

    Returns (tensors, key_map) with key_map[openclip_key] = diffusers key, or the list
    [q, k, v] for the packed in_proj (rows concatenated in that order), or for
    text_projection the diffusers key whose TRANSPOSE it is."""
    out, key_map = {}, {}
    nl = TE2_CONFIG["num_hidden_layers"]
    fixed = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    used = set()
    for dk, ok in fixed.items():
        out[ok] = te2_sd[dk]
        key_map[ok] = dk
        used.add(dk)
    out["text_projection"] = te2_sd["text_projection.weight"].T.contiguous()  # [width, embed_dim], used as x @ P
    key_map["text_projection"] = "text_projection.weight"
    used.add("text_projection.weight")
    for i in range(nl):
        src = f"text_model.encoder.layers.{i}."
        dst = f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            parts = [src + f"self_attn.{x}_proj.{kind}" for x in ("q", "k", "v")]
            out[dst + f"attn.in_proj_{kind}"] = torch.cat([te2_sd[q] for q in parts], 0).contiguous()
            key_map[dst + f"attn.in_proj_{kind}"] = parts
            used.update(parts)
            for a, b in OPENCLIP_LAYER_RENAMES:
                dk = src + f"{a}.{kind}"
                out[dst + f"{b}.{kind}"] = te2_sd[dk]
                key_map[dst + f"{b}.{kind}"] = dk
                used.add(dk)
    assert used == set(te2_sd), set(te2_sd) ^ used
    # OpenCLIP's CLIP.logit_scale (init log(1/0.07)); a 0-d tensor, as in real SDXL files. Unused.
    out["logit_scale"] = torch.tensor(math.log(1 / 0.07), dtype=torch.float16)
    return out, key_map


def build_single_file(te1, te2, unet, vae):
    sd1 = te1_state(te1)
    sd2 = te2_state(te2)
    unet_sd = fp16_state(unet)
    vae_sd = fp16_state(vae)
    out = {}
    key_map = {"unet": {}, "vae": {}, "text_encoder": {}, "text_encoder_2": {}}
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
    for k, v in sd1.items():
        lk = L_PREFIX + k
        out[lk] = v
        key_map["text_encoder"][lk] = k
    # Real SDXL single files carry this int64 buffer; loaders must ignore it.
    out[L_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    oc, oc_map = te2_to_openclip(sd2)
    for k, v in oc.items():
        out[G_PREFIX + k] = v
        if k in oc_map:
            key_map["text_encoder_2"][G_PREFIX + k] = oc_map[k]
    return out, key_map, (sd1, sd2, unet_sd, vae_sd)


def validate_single_file(path, originals, te2_model):
    sd1, sd2, unet_sd, vae_sd = originals
    ckpt = load_file(path)
    unet_conv = convert_ldm_unet_checkpoint(ckpt, dict(UNET_CONFIG))
    vae_conv = convert_ldm_vae_checkpoint(ckpt, dict(VAE_CONFIG))
    l_conv = convert_ldm_clip_checkpoint(ckpt)
    g_conv = convert_open_clip_checkpoint(te2_model, ckpt, prefix=G_PREFIX)
    report = {}
    for name, conv, orig in (("unet", unet_conv, unet_sd), ("vae", vae_conv, vae_sd),
                             ("text_encoder", l_conv, sd1), ("text_encoder_2", g_conv, sd2)):
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
    UNet2DConditionModel(**UNET_CONFIG).load_state_dict({k: v.float() for k, v in unet_conv.items()}, strict=True)
    AutoencoderKL(**VAE_CONFIG).load_state_dict({k: v.float() for k, v in vae_conv.items()}, strict=True)
    CLIPTextModelWithProjection(CLIPTextConfig(**TE2_CONFIG)).load_state_dict({k: v.float() for k, v in g_conv.items()}, strict=True)
    # end to end: diffusers' own single-file loader (configs from the local folder, no hub)
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    model_type = infer_diffusers_model_type(ckpt)
    assert model_type == "xl_base", model_type
    sfp = StableDiffusionXLPipeline.from_single_file(str(path), config=str(PIPE), local_files_only=True, torch_dtype=torch.float32)
    ref = StableDiffusionXLPipeline.from_pretrained(PIPE, torch_dtype=torch.float32)
    for name in ("text_encoder", "text_encoder_2", "unet", "vae"):
        assert_same_params(getattr(ref, name), getattr(sfp, name), "from_single_file." + name)
    report["infer_diffusers_model_type"] = model_type
    report["StableDiffusionXLPipeline.from_single_file"] = "text_encoder, text_encoder_2, unet, vae identical to from_pretrained(tiny-sdxl/)"
    print("StableDiffusionXLPipeline.from_single_file(tiny-sdxl.safetensors, config=tiny-sdxl/) == from_pretrained(tiny-sdxl/)")
    return report


# --------------------------------------------------------------------------------------
# 4. Reference computations
# --------------------------------------------------------------------------------------
class InjectedTokenEmbedding(torch.nn.Module):
    """Token embedding = frozen base table ++ learnable new rows (a leaf tensor)."""

    def __init__(self, base_weight, new_rows):
        super().__init__()
        self.register_buffer("base", base_weight.detach().clone())
        self.new_rows = new_rows  # leaf tensor with requires_grad, NOT registered

    def forward(self, ids):
        table = torch.cat([self.base, self.new_rows], dim=0)
        return F.embedding(ids, table)


def text_model(te):
    """The module holding embeddings/encoder/final_layer_norm (CLIPTextModel is flat in transformers >= 5.6)."""
    return te.text_model if hasattr(te, "text_model") else te


def injected(te, vectors):
    te = copy.deepcopy(te)
    te.requires_grad_(False)
    tm = text_model(te)
    tm.embeddings.token_embedding = InjectedTokenEmbedding(tm.embeddings.token_embedding.weight, vectors)
    return te


def encode_l(te1, ids):
    """SDXL CLIP-L conditioning: hidden_states[-2] (= [11], output of 11 of 12 layers), no final LN."""
    out = te1(input_ids=ids, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == TE1_CONFIG["num_hidden_layers"] + 1
    assert hs[-2] is hs[11]
    return hs[-2]


def encode_g(te2, ids, eos_pos):
    """SDXL OpenCLIP-G conditioning: hidden_states[-2] no LN; pooled at the first EOS computed
    explicitly (SGM: ln_final(last)[eos] @ text_projection); also the transformers pooled output."""
    out = te2(input_ids=ids, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == TE2_CONFIG["num_hidden_layers"] + 1
    tm = text_model(te2)
    last_ln = tm.final_layer_norm(hs[-1])
    assert torch.equal(last_ln, out.last_hidden_state)
    rows = torch.arange(ids.shape[0])
    pooled_eos = te2.text_projection(last_ln[rows, torch.as_tensor(eos_pos)])
    return hs[-2], pooled_eos, out.text_embeds, last_ln


def first_eos(row):
    return ids_list(row).index(EOS)


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


def add_embeds(unet, text_embeds, time_ids):
    """diffusers' text_time branch, spelled out: sinusoids of the 6 ids, concat after the pooled vector."""
    time_embeds = unet.add_time_proj(time_ids.flatten()).reshape(text_embeds.shape[0], -1)
    return time_embeds, unet.add_embedding(torch.cat([text_embeds, time_embeds], -1).to(text_embeds.dtype))


def training_loss(te1, te2, unet, sched, ids_l, ids_g, vec_l, vec_g, latents, noise, t, time_ids, prediction_type, dtype,
                  pooled="eos", detach_g_context=False, detach_pooled=False):
    """One SDXL textual-inversion step as diffusers' textual_inversion_sdxl example does it,
    except that the pooled vector is taken at the first EOS (sdti's choice, = SGM/kohya/A1111/ComfyUI)
    unless pooled == "hf" (the example's text_encoder_2(...)[0] with eos_token_id 2)."""
    vl = vec_l.detach().to(dtype).clone().requires_grad_(True)
    vg = vec_g.detach().to(dtype).clone().requires_grad_(True)
    te1_i = injected(te1, vl).to(dtype)
    te2_i = injected(te2, vg).to(dtype)
    unet_i = copy.deepcopy(unet).to(dtype)
    unet_i.requires_grad_(False)
    lat = latents.to(dtype)
    nz = noise.to(dtype)
    noisy = sched.add_noise(lat, nz, t)
    h_l = encode_l(te1_i, ids_l)
    h_g, p_eos, p_hf, _ = encode_g(te2_i, ids_g, [first_eos(r) for r in ids_g])
    if detach_g_context:
        h_g = h_g.detach()
    ctx = torch.cat([h_l, h_g], -1)
    text_embeds = p_eos if pooled == "eos" else p_hf
    if detach_pooled:
        text_embeds = text_embeds.detach()
    tid = time_ids.to(dtype)
    pred = unet_i(noisy, t, ctx, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": tid}).sample
    if prediction_type == "epsilon":
        target = nz
    else:
        target = sched.get_velocity(lat, nz, t)
    if dtype == torch.float32:
        loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
    else:
        loss = F.mse_loss(pred, target, reduction="mean")
    loss.backward()
    for m in (te1_i, te2_i, unet_i):
        for name, p in m.named_parameters():
            assert p.grad is None, f"unexpected gradient on {name}"
    return loss.detach(), vl.grad.detach(), vg.grad.detach(), dict(
        noisy=noisy.detach(), pred=pred.detach(), target=target.detach(), context=ctx.detach(), pooled=text_embeds.detach())


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main():
    FIX.mkdir(parents=True, exist_ok=True)
    te1_0, te2_0, unet0, vae0 = build_models()
    te_notes = write_pipeline(te1_0, te2_0, unet0, vae0)
    print("text encoder key prefixes:", te_notes)

    # Reload everything from disk (float32) and prove it is what we built.
    te1, te2, unet, vae = load_pipeline_fp32()
    assert_same_params(te1_0, te1, "text_encoder")
    assert_same_params(te2_0, te2, "text_encoder_2")
    assert_same_params(unet0, unet, "unet")
    assert_same_params(vae0, vae, "vae")
    assert te2.config.eos_token_id == 2 and text_model(te2).eos_token_id == 2
    sched = DDPMScheduler.from_pretrained(PIPE / "scheduler")  # as textual_inversion_sdxl.py does
    tok = CLIPTokenizer.from_pretrained(PIPE / "tokenizer")
    tok_2 = CLIPTokenizer.from_pretrained(PIPE / "tokenizer_2")
    print("reloaded pipeline folder: weights identical")
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(PIPE, torch_dtype=torch.float32)
    for name, m in (("text_encoder", te1_0), ("text_encoder_2", te2_0), ("unet", unet0), ("vae", vae0)):
        assert_same_params(m, getattr(pipe, name), "pipeline." + name)
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.config.force_zeros_for_empty_prompt is True

    # ---------------- single file
    single, key_map, originals = build_single_file(te1_0, te2_0, unet0, vae0)
    save_file(single, SINGLE, metadata={"format": "pt"})
    sf_report = validate_single_file(SINGLE, originals, te2_0)

    # ---------------- tokenizer / ids
    cat_ids = tok("a photo of a cat").input_ids
    assert cat_ids == [49406, 320, 1125, 539, 320, 2368, 49407], cat_ids
    assert tok_2("a photo of a cat").input_ids == cat_ids
    assert tok_2.pad_token == "!" and tok_2.pad_token_id == 0
    enc = tok(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    raw_ids = enc.input_ids
    raw_list = ids_list(raw_ids)
    sks = tok(PLACEHOLDER_WORD, add_special_tokens=False).input_ids
    assert len(sks) == 1, sks
    n_real = raw_list.index(EOS) + 1
    slot = raw_list.index(sks[0])
    assert slot == 5 and raw_list.count(sks[0]) == 1
    assert all(i == EOS for i in raw_list[n_real:])
    ids_l_list = (raw_list[:slot] + [49408, 49409] + raw_list[slot + 1 :])[:77]
    ids_g_list = g_ids(ids_l_list)
    eos_pos = ids_l_list.index(EOS)
    assert eos_pos == n_real and ids_g_list[eos_pos] == EOS and ids_g_list[eos_pos + 1 :] == [0] * (76 - eos_pos)
    ids_l = torch.tensor([ids_l_list], dtype=torch.int64)
    ids_g = torch.tensor([ids_g_list], dtype=torch.int64)
    # as diffusers' textual_inversion_sdxl example: add the tokens to BOTH tokenizers -> same new ids
    tok_a = CLIPTokenizer.from_pretrained(PIPE / "tokenizer")
    tok_b = CLIPTokenizer.from_pretrained(PIPE / "tokenizer_2")
    assert tok_a.add_tokens(PLACEHOLDER_TOKENS) == 2 and tok_b.add_tokens(PLACEHOLDER_TOKENS) == 2
    assert tok_a.convert_tokens_to_ids(PLACEHOLDER_TOKENS) == [49408, 49409]
    assert tok_b.convert_tokens_to_ids(PLACEHOLDER_TOKENS) == [49408, 49409]
    assert tok_a(PROMPT_WITH_PLACEHOLDERS, padding="max_length", max_length=77, truncation=True).input_ids == ids_l_list
    # the folder's tokenizer_2 pads with "!" = id 0, so without a literal "!" it gives G's ids
    assert tok_b(PROMPT_WITH_PLACEHOLDERS, padding="max_length", max_length=77, truncation=True).input_ids == ids_g_list
    bang = tok_2("a photo! of a cat").input_ids
    bang_l = tok("a photo! of a cat").input_ids
    print("tokenizer_2 '!' quirk: tokenizer ids", bang_l, "tokenizer_2 ids", bang)

    g1 = torch.Generator().manual_seed(1)
    vec_l = torch.randn(2, 32, generator=g1) * 0.3
    vec_g = torch.randn(2, 48, generator=g1) * 0.3

    # ---------------- text encoders
    with torch.no_grad():
        # (a) add_tokens + resize_token_embeddings + set the rows, as the diffusers example
        te1_r = copy.deepcopy(te1)
        te1_r.resize_token_embeddings(49410, mean_resizing=False)
        text_model(te1_r).embeddings.token_embedding.weight[49408:] = vec_l
        te2_r = copy.deepcopy(te2)
        te2_r.resize_token_embeddings(49410, mean_resizing=False)
        text_model(te2_r).embeddings.token_embedding.weight[49408:] = vec_g
        assert torch.equal(text_model(te2_r).embeddings.token_embedding.weight[:49408], text_model(te2).embeddings.token_embedding.weight)
        h_l = encode_l(te1_r, ids_l)
        h_g, pooled_eos, pooled_hf, last_ln_g = encode_g(te2_r, ids_g, [eos_pos])
        # (b) frozen table ++ leaf rows: bit-identical
        h_l_b = encode_l(injected(te1, vec_l), ids_l)
        h_g_b, pooled_eos_b, pooled_hf_b, _ = encode_g(injected(te2, vec_g), ids_g, [eos_pos])
        for a, b, what in ((h_l, h_l_b, "te1"), (h_g, h_g_b, "te2"), (pooled_eos, pooled_eos_b, "pooled"), (pooled_hf, pooled_hf_b, "pooled_hf")):
            assert torch.equal(a, b), what
        context = torch.cat([h_l, h_g], -1)
        # transformers' pooled output with eos_token_id 2 = argmax(ids) = the last placeholder slot
        argmax_pos = int(ids_g.argmax(-1))
        assert argmax_pos == slot + 1, argmax_pos
        assert torch.equal(pooled_hf, te2_r.text_projection(last_ln_g[:, argmax_pos]))
        pooled_rel_diff = rel(pooled_hf, pooled_eos)
        assert pooled_rel_diff > 1e-2, pooled_rel_diff
        # with eos_token_id 49407 transformers pools at the first EOS == the explicit computation
        te2_e = copy.deepcopy(te2_r)
        text_model(te2_e).eos_token_id = EOS
        assert torch.equal(te2_e(input_ids=ids_g).text_embeds, pooled_eos)
        # eager attention agrees with the default (sdpa)
        eager = {}
        for name, m, ids in (("te1", te1_r, ids_l), ("te2", te2_r, ids_g)):
            me = copy.deepcopy(m)
            me.config._attn_implementation = "eager"
            if hasattr(me, "text_model"):
                me.text_model.config._attn_implementation = "eager"
            hs_e = me(input_ids=ids, output_hidden_states=True).hidden_states[-2]
            ref_hs = h_l if name == "te1" else h_g
            eager[name] = (hs_e - ref_hs).abs().max().item()
            assert eager[name] < 1e-5, (name, eager)
        # pad ids after the first EOS: G's 0 vs L-style EOS padding changes G's context, never the pooled vector
        h_g_eospad, pooled_eospad, _, _ = encode_g(te2_r, ids_l, [eos_pos])
        g_pad_rel = rel(h_g_eospad, h_g)
        assert torch.allclose(pooled_eospad, pooled_eos, rtol=0, atol=1e-6) and g_pad_rel > 1e-3

        # the plain prompt (no injection) through diffusers' own StableDiffusionXLPipeline.encode_prompt
        pe, _, ppe, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
        raw_g = torch.tensor([g_ids(raw_list)])
        ctx_plain = torch.cat([encode_l(te1, raw_ids), encode_g(te2, raw_g, [first_eos(raw_g[0])])[0]], -1)
        pooled_plain = encode_g(te2, raw_g, [first_eos(raw_g[0])])[1]
        enc_prompt_diff = max((pe - ctx_plain).abs().max().item(), (ppe - pooled_plain).abs().max().item())
        assert enc_prompt_diff < 1e-6, enc_prompt_diff

        # empty prompt (the uncond ComfyUI encodes; diffusers/A1111 use zeros for an empty negative prompt)
        e_list = ids_list(tok("", padding="max_length", max_length=77, return_tensors="pt").input_ids)
        assert e_list[:2] == [BOS, EOS] and all(i == EOS for i in e_list[2:])
        ids_e_l = torch.tensor([e_list])
        ids_e_g = torch.tensor([g_ids(e_list)])
        h_e_g, pooled_empty, _, _ = encode_g(te2, ids_e_g, [1])
        context_empty = torch.cat([encode_l(te1, ids_e_l), h_e_g], -1)
        pe_e, _, ppe_e, _ = pipe.encode_prompt("", do_classifier_free_guidance=False)
        empty_diff = max((pe_e - context_empty).abs().max().item(), (ppe_e - pooled_empty).abs().max().item())
        assert empty_diff < 1e-6, empty_diff

        # two chunks of 75 (BOS + 75 + EOS, padded), the same text split for A1111 and ComfyUI (no commas,
        # one long text group, the embedding far from the boundary); pooled from chunk 0
        toks = tok(LONG_PROMPT, add_special_tokens=False, truncation=False).input_ids
        j = toks.index(sks[0])
        toks = toks[:j] + [49408, 49409] + toks[j + 1 :]
        assert 75 < len(toks) <= 150, len(toks)
        chunks_l = []
        for c in range(2):
            part = toks[75 * c : 75 * (c + 1)]
            row = [BOS] + part + [EOS]
            row = row + [EOS] * (77 - len(row))
            chunks_l.append(row)
        chunks_g = [g_ids(r) for r in chunks_l]
        ids2_l = torch.tensor(chunks_l)
        ids2_g = torch.tensor(chunks_g)
        te1_inj, te2_inj = injected(te1, vec_l), injected(te2, vec_g)
        h2_l = encode_l(te1_inj, ids2_l)
        h2_g, pooled2_all, _, _ = encode_g(te2_inj, ids2_g, [first_eos(r) for r in ids2_g])
        context2 = torch.cat([h2_l, h2_g], -1).reshape(1, 154, 80)
        pooled2 = pooled2_all[0:1]
        # chunk 0 starts like the one-chunk prompt (causal attention: equal states up to "toy");
        # it is full, so its EOS (and pooled row) sits at 76; chunk 1 is padded
        assert chunks_l[0][:8] == ids_l_list[:8] and torch.equal(context2[:, :8], context[:, :8])
        assert chunks_l[0][76] == EOS and first_eos(ids2_g[0]) == 76 and chunks_g[1][-1] == 0
        assert rel(pooled2, pooled_eos) > 1e-2
    print(f"te: pooled_hf vs pooled_eos rel diff {pooled_rel_diff:.3f}; eager vs sdpa {eager}; encode_prompt diff {enc_prompt_diff:.1e}")

    # ---------------- vae
    g2 = torch.Generator().manual_seed(2)
    image = smooth_image(g2)
    with torch.no_grad():
        dist = vae.encode(image).latent_dist
        latent_mean, latent_logvar = dist.mean.clone(), dist.logvar.clone()
        raw_logvar = vae.quant_conv(vae.encoder(image))[:, 4:]
        assert torch.equal(raw_logvar.clamp(-30, 20), latent_logvar)
        logvar_clamped = bool((raw_logvar != latent_logvar).any())

    # ---------------- unet: two samples, different time ids
    g3 = torch.Generator().manual_seed(3)
    u_sample = torch.randn(2, 4, 16, 16, generator=g3)
    u_context = torch.randn(2, 77, 80, generator=g3)
    u_text_embeds = torch.randn(2, 48, generator=g3)
    u_t = torch.tensor([10, 700], dtype=torch.int64)
    u_time_ids = torch.tensor(UNET_TIME_IDS, dtype=torch.float32)
    with torch.no_grad():
        u_pred = unet(u_sample, u_t, u_context, added_cond_kwargs={"text_embeds": u_text_embeds, "time_ids": u_time_ids}).sample
        t_emb = unet.time_proj(u_t)
        temb = unet.time_embedding(t_emb)
        u_add_time_proj, u_aug = add_embeds(unet, u_text_embeds, u_time_ids)
        aug_diffusers = unet.get_aug_embed(emb=temb, encoder_hidden_states=u_context, added_cond_kwargs={"text_embeds": u_text_embeds, "time_ids": u_time_ids})
        assert torch.equal(u_aug, aug_diffusers)
        # the time ids matter: swapping them between the samples changes the prediction
        u_pred_swapped = unet(u_sample, u_t, u_context, added_cond_kwargs={"text_embeds": u_text_embeds, "time_ids": u_time_ids.flip(0)}).sample
        assert rel(u_pred_swapped, u_pred) > 1e-3
        u64 = copy.deepcopy(unet).double()
        u_pred64 = u64(u_sample.double(), u_t, u_context.double(), added_cond_kwargs={"text_embeds": u_text_embeds.double(), "time_ids": u_time_ids.double()}).sample
        unet_f32_vs_f64 = rel(u_pred, u_pred64)
    print(f"unet: |noise_pred| max {u_pred.abs().max():.4f}, f32 vs f64 rel {unet_f32_vs_f64:.2e}")

    # ---------------- loss + grads on both tables
    latents = (latent_mean * SCALING_FACTOR).contiguous()
    g4 = torch.Generator().manual_seed(4)
    noise = torch.randn(1, 4, 8, 8, generator=g4)
    t = torch.tensor([500], dtype=torch.int64)
    time_ids = torch.tensor(LOSS_TIME_IDS, dtype=torch.float32)
    sched_v = DDPMScheduler.from_config(sched.config, prediction_type="v_prediction")
    sched_vz = DDPMScheduler.from_config(sched.config, prediction_type="v_prediction", rescale_betas_zero_snr=True)
    # the folder's extra scheduler JSONs give the same schedules
    for fname, s in (("scheduler_config_v.json", sched_v), ("scheduler_config_v_ztsnr.json", sched_vz)):
        s2 = DDPMScheduler.from_config(json.load(open(PIPE / "scheduler" / fname)))
        assert torch.equal(s2.alphas_cumprod, s.alphas_cumprod) and s2.config.prediction_type == "v_prediction"
    assert float(sched_vz.alphas_cumprod[-1]) == 0.0
    args = (te1, te2, unet)
    data = (ids_l, ids_g, vec_l, vec_g, latents, noise, t, time_ids)
    res = {}
    for tag, s, pt in (("loss", sched, "epsilon"), ("loss_v", sched_v, "v_prediction"), ("loss_vz", sched_vz, "v_prediction")):
        res[tag] = training_loss(*args, s, *data, pt, torch.float32)
        res[tag + "_f64"] = training_loss(*args, s, *data, pt, torch.float64)
        l32, gl32, gg32, inter = res[tag]
        l64, gl64, gg64, _ = res[tag + "_f64"]
        print(f"{tag}: f32 {l32.item():.8f} f64 {l64.item():.10f}; grad_l rel {rel(gl32, gl64):.2e} grad_g rel {rel(gg32, gg64):.2e}")
    inter = res["loss"][3]
    assert torch.equal(inter["context"], context) and torch.equal(inter["pooled"], pooled_eos)
    with torch.no_grad():
        loss_add_time_proj, loss_aug = add_embeds(unet, pooled_eos, time_ids)
    # the G gradient through the pooled vector only (G's half of the context detached), and through the context only
    pooled_only = training_loss(*args, sched, *data, "epsilon", torch.float32, detach_g_context=True)
    pooled_only64 = training_loss(*args, sched, *data, "epsilon", torch.float64, detach_g_context=True)
    context_only = training_loss(*args, sched, *data, "epsilon", torch.float32, detach_pooled=True)
    assert torch.equal(pooled_only[0], res["loss"][0]) and torch.equal(pooled_only[1], res["loss"][1])
    split_rel = rel(pooled_only[2] + context_only[2], res["loss"][2])
    assert split_rel < 1e-5, split_rel
    pooled_share = (pooled_only[2].norm() / res["loss"][2].norm()).item()
    print(f"grad_g: |pooled-only| / |full| = {pooled_share:.3f}; pooled-only + context-only vs full rel {split_rel:.1e}")
    # what diffusers' example computes with the Hub config (pooled at argmax(ids) = the last placeholder)
    hf = training_loss(*args, sched, *data, "epsilon", torch.float32, pooled="hf")
    hf_rel = {"loss": abs(hf[0].item() - res["loss"][0].item()) / res["loss"][0].item(),
              "grad_l": rel(hf[1], res["loss"][1]), "grad_g": rel(hf[2], res["loss"][2])}
    print("pooled at argmax (diffusers example) vs first EOS:", hf_rel)

    # ---------------- finite differences (float64) on each table, and on the pooled-only path
    te1_64, te2_64, unet64 = copy.deepcopy(te1).double(), copy.deepcopy(te2).double(), copy.deepcopy(unet).double()
    lat64, nz64 = latents.double(), noise.double()
    noisy64 = sched.add_noise(lat64, nz64, t)
    with torch.no_grad():
        g_ctx_fixed = encode_g(injected(te2_64, vec_g.double()), ids_g, [eos_pos])[0]

    def loss_at(vl, vg, fixed_g_context=False):
        with torch.no_grad():
            hl = encode_l(injected(te1_64, vl), ids_l)
            hg, pe_, _, _ = encode_g(injected(te2_64, vg), ids_g, [eos_pos])
            if fixed_g_context:
                hg = g_ctx_fixed
            pred = unet64(noisy64, t, torch.cat([hl, hg], -1), added_cond_kwargs={"text_embeds": pe_, "time_ids": time_ids.double()}).sample
            return F.mse_loss(pred, nz64).item()

    eps_fd = 1e-6
    fd_report = []
    grads64 = {"l": res["loss_f64"][1], "g": res["loss_f64"][2], "g_pooled_only": pooled_only64[2]}
    grads32 = {"l": res["loss"][1], "g": res["loss"][2], "g_pooled_only": pooled_only[2]}
    for table, coords in (("l", [(0, 0), (1, 7), (0, 31)]), ("g", [(0, 0), (1, 11), (0, 47)]), ("g_pooled_only", [(0, 3), (1, 20), (1, 47)])):
        for (r, c) in coords:
            vl_p, vl_m = vec_l.double().clone(), vec_l.double().clone()
            vg_p, vg_m = vec_g.double().clone(), vec_g.double().clone()
            if table == "l":
                vl_p[r, c] += eps_fd
                vl_m[r, c] -= eps_fd
            else:
                vg_p[r, c] += eps_fd
                vg_m[r, c] -= eps_fd
            fixed = table == "g_pooled_only"
            fd = (loss_at(vl_p, vg_p, fixed) - loss_at(vl_m, vg_m, fixed)) / (2 * eps_fd)
            ag = grads64[table][r, c].item()
            fd_report.append({"table": table, "coord": [r, c], "finite_difference": fd, "autograd_f64": ag,
                              "autograd_f32": grads32[table][r, c].item(), "abs_diff": abs(fd - ag)})
            print(f"finite diff {table}[{r},{c}]: fd {fd:.10e} autograd64 {ag:.10e} |diff| {abs(fd - ag):.2e}")
            assert abs(fd - ag) <= 1e-5 * abs(ag) + 1e-10, "finite difference mismatch"

    # ---------------- AdamW over both tables with the joint gradient-norm clip (torch clip_grad_norm_([l, g]))
    g5 = torch.Generator().manual_seed(5)
    agrads = [(torch.randn(2, 32, generator=g5), torch.randn(2, 48, generator=g5)) for _ in range(2)]
    pl = torch.nn.Parameter(vec_l.clone())
    pg = torch.nn.Parameter(vec_g.clone())
    opt = torch.optim.AdamW([pl, pg], lr=5e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    adam_out = []
    for gl_, gg_ in agrads:
        opt.zero_grad(set_to_none=True)
        pl.grad, pg.grad = gl_.clone(), gg_.clone()
        torch.nn.utils.clip_grad_norm_([pl, pg], 0.1)
        opt.step()
        adam_out.append((pl.detach().clone(), pg.detach().clone()))

    def adamw_joint_ref(p0s, grads, clip):
        ps = [p.double().clone() for p in p0s]
        ms = [torch.zeros_like(p) for p in ps]
        vs = [torch.zeros_like(p) for p in ps]
        outs = []
        for step, gs in enumerate(grads, 1):
            gs = [g.double() for g in gs]
            n = math.sqrt(sum((g * g).sum().item() for g in gs))
            gs = [g * min(1.0, clip / (n + 1e-6)) for g in gs]
            for i in range(len(ps)):
                ps[i] = ps[i] * (1 - 5e-3 * 1e-2)
                ms[i] = 0.9 * ms[i] + 0.1 * gs[i]
                vs[i] = 0.999 * vs[i] + 0.001 * gs[i] * gs[i]
                ps[i] = ps[i] - (5e-3 / (1 - 0.9**step)) * ms[i] / (vs[i].sqrt() / math.sqrt(1 - 0.999**step) + 1e-8)
            outs.append([p.clone() for p in ps])
        return outs

    for got, want in zip(adam_out, adamw_joint_ref([vec_l, vec_g], agrads, 0.1)):
        for a, b in zip(got, want):
            assert (a.double() - b).abs().max().item() < 1e-6

    # ---------------- write expected tensors
    tensors = {
        "te.input_ids_raw": raw_ids.to(torch.int64),
        "te.input_ids_l": ids_l,
        "te.input_ids_g": ids_g,
        "te.vectors_l": vec_l,
        "te.vectors_g": vec_g,
        "te1.hidden_m2": h_l,
        "te2.hidden_m2": h_g,
        "te2.last_hidden_state": last_ln_g,
        "te2.pooled_eos": pooled_eos,
        "te2.pooled_hf_argmax": pooled_hf,
        "te.context": context,
        "uncond.input_ids_l": ids_e_l,
        "uncond.input_ids_g": ids_e_g,
        "uncond.context": context_empty,
        "uncond.pooled": pooled_empty,
        "chunks.input_ids_l": ids2_l,
        "chunks.input_ids_g": ids2_g,
        "chunks.context": context2,
        "chunks.pooled": pooled2,
        "vae.image": image,
        "vae.latent_mean": latent_mean,
        "vae.latent_logvar": latent_logvar,
        "unet.sample": u_sample,
        "unet.timesteps": u_t,
        "unet.context": u_context,
        "unet.text_embeds": u_text_embeds,
        "unet.time_ids": u_time_ids,
        "unet.noise_pred": u_pred,
        "unet.time_proj": t_emb,
        "unet.time_embedding": temb,
        "unet.add_time_proj": u_add_time_proj,
        "unet.aug_emb": u_aug,
        "loss.latents": latents,
        "loss.noise": noise,
        "loss.timestep": t,
        "loss.time_ids": time_ids,
        "loss.add_time_proj": loss_add_time_proj,
        "loss.aug_emb": loss_aug,
        "loss.noisy_latents": inter["noisy"],
        "loss.noise_pred": inter["pred"],
        "loss.grad_g_pooled_only": pooled_only[2],
        "loss.grad_g_pooled_only_f64": pooled_only64[2],
        "loss.grad_g_context_only": context_only[2],
        "loss_hf_argmax.value": hf[0].reshape(()),
        "loss_hf_argmax.grad_l": hf[1],
        "loss_hf_argmax.grad_g": hf[2],
        "ddpm.alphas_cumprod": sched.alphas_cumprod.clone(),
        "ddpm.alphas_cumprod_zsnr": sched_vz.alphas_cumprod.clone(),
        "adamw_joint_clip.grad1_l": agrads[0][0],
        "adamw_joint_clip.grad1_g": agrads[0][1],
        "adamw_joint_clip.grad2_l": agrads[1][0],
        "adamw_joint_clip.grad2_g": agrads[1][1],
        "adamw_joint_clip.param1_l": adam_out[0][0],
        "adamw_joint_clip.param1_g": adam_out[0][1],
        "adamw_joint_clip.param2_l": adam_out[1][0],
        "adamw_joint_clip.param2_g": adam_out[1][1],
    }
    for tag in ("loss", "loss_v", "loss_vz"):
        l32, gl32, gg32, it = res[tag]
        l64, gl64, gg64, _ = res[tag + "_f64"]
        if tag != "loss":
            tensors[tag + ".target"] = it["target"]
            tensors[tag + ".noise_pred"] = it["pred"]
        tensors[tag + ".value"] = l32.reshape(())
        tensors[tag + ".grad_l"] = gl32
        tensors[tag + ".grad_g"] = gg32
        tensors[tag + ".value_f64"] = l64.reshape(())
        tensors[tag + ".grad_l_f64"] = gl64
        tensors[tag + ".grad_g_f64"] = gg64
    tensors = {k: v.detach().clone().contiguous() for k, v in sorted(tensors.items())}
    for k, v in tensors.items():
        assert torch.isfinite(v.double()).all(), k
        if v.is_floating_point():
            assert v.dtype == (torch.float64 if k.endswith("_f64") else torch.float32), k
    save_file(tensors, EXPECTED, metadata={"format": "pt"})

    # ---------------- json metadata
    te1_cfg_json = json.load(open(PIPE / "text_encoder" / "config.json"))
    grad_rel = {tag: {"grad_l": rel(res[tag][1], res[tag + "_f64"][1]), "grad_g": rel(res[tag][2], res[tag + "_f64"][2]),
                      "loss": abs(res[tag][0].item() - res[tag + "_f64"][0].item()) / res[tag + "_f64"][0].item()}
                for tag in ("loss", "loss_v", "loss_vz")}
    sd1_o, sd2_o, unet_o, vae_o = originals
    diffusers_sd = {"unet": unet_o, "vae": vae_o, "text_encoder": sd1_o, "text_encoder_2": sd2_o}

    def rep(section, prefix, names):
        out = []
        for n in names:
            lk = prefix + n
            dk = key_map[section][lk]
            dshape = [list(diffusers_sd[section][x].shape) for x in dk] if isinstance(dk, list) else list(diffusers_sd[section][dk].shape)
            out.append({"ldm": lk, "diffusers": dk, "ldm_shape": list(single[lk].shape), "diffusers_shape": dshape})
        return out

    representative = {
        "unet": rep("unet", "model.diffusion_model.", [
            "time_embed.0.weight", "label_emb.0.0.weight", "label_emb.0.0.bias", "label_emb.0.2.weight", "label_emb.0.2.bias",
            "input_blocks.0.0.weight", "input_blocks.1.0.in_layers.0.weight", "input_blocks.2.0.emb_layers.1.weight",
            "input_blocks.3.0.op.weight", "input_blocks.4.1.proj_in.weight", "input_blocks.5.1.transformer_blocks.1.attn2.to_k.weight",
            "input_blocks.6.0.op.weight", "input_blocks.7.0.skip_connection.weight", "input_blocks.8.1.transformer_blocks.2.ff.net.0.proj.weight",
            "middle_block.1.transformer_blocks.2.attn1.to_q.weight", "middle_block.2.in_layers.2.weight",
            "output_blocks.0.1.transformer_blocks.2.norm3.weight", "output_blocks.2.2.conv.weight", "output_blocks.3.1.transformer_blocks.1.attn2.to_v.weight",
            "output_blocks.5.2.conv.weight", "output_blocks.6.0.skip_connection.weight", "output_blocks.8.0.out_layers.3.weight",
            "out.0.weight", "out.2.weight"]),
        "vae": rep("vae", "first_stage_model.", [
            "encoder.conv_in.weight", "encoder.mid.attn_1.q.weight", "encoder.mid.attn_1.proj_out.weight",
            "decoder.up.3.upsample.conv.weight", "decoder.up.1.block.0.nin_shortcut.weight", "quant_conv.weight"]),
        "text_encoder": rep("text_encoder", L_PREFIX, [
            "text_model.embeddings.token_embedding.weight", "text_model.encoder.layers.11.mlp.fc2.weight", "text_model.final_layer_norm.weight"]),
        "text_encoder_2": rep("text_encoder_2", G_PREFIX, [
            "token_embedding.weight", "positional_embedding", "text_projection", "ln_final.weight",
            "transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.0.attn.in_proj_bias",
            "transformer.resblocks.0.attn.out_proj.weight", "transformer.resblocks.9.mlp.c_proj.bias",
            "transformer.resblocks.31.ln_1.weight", "transformer.resblocks.31.mlp.c_fc.weight"]),
    }
    meta = {
        "generator": "tests/reference/make_tiny_sdxl.py",
        "versions": VERSIONS,
        "seeds": {
            "weights": "torch.manual_seed(0); build CLIPTextModel (L), CLIPTextModelWithProjection (G), UNet2DConditionModel, AutoencoderKL in that order; "
                       "then for te1, te2, unet, vae in order, for p in model.parameters(): p.data = (p.data + 0.02*torch.randn_like(p)).half().float()",
            "te.vectors_l/te.vectors_g": "g = Generator().manual_seed(1); vectors_l = randn(2,32, g)*0.3; vectors_g = randn(2,48, g)*0.3",
            "vae.image": "smooth_image(Generator().manual_seed(2)) (as make_tiny_sd.py)",
            "unet": "Generator().manual_seed(3): sample randn[2,4,16,16], context randn[2,77,80], text_embeds randn[2,48], in that order",
            "loss.noise": "randn[1,4,8,8], Generator().manual_seed(4)",
            "adamw_joint_clip": "Generator().manual_seed(5): grad1_l randn[2,32], grad1_g randn[2,48], grad2_l, grad2_g",
        },
        "configs": {
            "text_encoder": TE1_CONFIG,
            "text_encoder_2": TE2_CONFIG,
            "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_CONFIG.items()},
            "vae": {k: list(v) if isinstance(v, tuple) else v for k, v in VAE_CONFIG.items()},
            "scheduler": SCHED_CONFIG,
            "scheduler_variants": {"scheduler/scheduler_config_v.json": {"prediction_type": "v_prediction"},
                                   "scheduler/scheduler_config_v_ztsnr.json": {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}},
            "text_encoder_attn_implementation_used": te1.config._attn_implementation,
            "text_encoder_config_json_dtype": te1_cfg_json.get("dtype", te1_cfg_json.get("torch_dtype")),
            "unet_derived": {
                "heads_per_level": [2, 2, 4], "head_dim": 16, "time_embed_dim": 128,
                "transformer_depth_per_attention_block": {"down_blocks.1": 2, "down_blocks.2": 3, "mid_block": 3, "up_blocks.0": 3, "up_blocks.1": 2},
                "note": "level 0 (DownBlock2D/UpBlock2D) has no attention, so transformer_layers_per_block[0]=1 is unused; "
                        "mid depth = transformer_layers_per_block[-1]; up blocks use the reversed list",
            },
        },
        "weights": {
            "dtype_on_disk": "float16",
            "compute_dtype": "float32 (fp16 weights upcast exactly)",
            "text_encoder_key_prefix": te_notes,
            "note": "text_encoder/ and text_encoder_2/ model.safetensors keys are 'text_model.*' (+ 'text_projection.weight' [48,48] "
                    "Linear layout [out,in] for text_encoder_2), the layout of every SDXL folder on the Hub; this script writes them itself.",
        },
        "tokenizer": {
            "source": "as make_tiny_sd.py; tokenizer/ and tokenizer_2/ vocab.json + merges.txt are byte-identical to tiny-sd/tokenizer/",
            "tokenizer_pad": "<|endoftext|> (49407)",
            "tokenizer_2_pad": "'!' (id 0), as stabilityai/stable-diffusion-xl-base-1.0/tokenizer_2; NOT used for reference ids",
            "check_a_photo_of_a_cat": cat_ids,
            "bang_quirk_example": {"text": "a photo! of a cat", "tokenizer": bang_l, "tokenizer_2": bang},
            "ids_rule": "L: SD1 tokenizer, padding with EOS 49407. G: the same ids with every slot after the first EOS set to 0.",
        },
        "text_encoder_case": {
            "prompt": PROMPT,
            "placeholder_word": PLACEHOLDER_WORD,
            "placeholder_word_id": sks[0],
            "placeholder_tokens": PLACEHOLDER_TOKENS,
            "placeholder_token_ids": [49408, 49409],
            "prompt_with_placeholders": PROMPT_WITH_PLACEHOLDERS,
            "raw_ids": raw_list,
            "ids_l": ids_l_list,
            "ids_g": ids_g_list,
            "slot_positions": [slot, slot + 1],
            "first_eos_position": eos_pos,
            "hf_argmax_position": argmax_pos,
            "injection": "token table rows 49408/49409 of L := te.vectors_l, of G := te.vectors_g (resize_token_embeddings(49410) + setting the "
                         "rows); verified bit-identical to a frozen-base ++ leaf-rows table",
            "te1.hidden_m2": "CLIPTextModel(ids_l, output_hidden_states=True).hidden_states[-2] (= [11]; output of 11 of 12 layers), no final LN",
            "te2.hidden_m2": "CLIPTextModelWithProjection(ids_g).hidden_states[-2] (output of 31 of 32 layers), no final LN",
            "te2.last_hidden_state": "final_layer_norm(hidden_states[-1]) of G (all positions)",
            "te2.pooled_eos": "text_projection(final_layer_norm(hidden_states[-1])[first EOS]) (= SGM ln_final(x)[argmax] @ P with P the OpenCLIP "
                              "[width,embed] matrix = text_projection.weight.T); equals transformers' text_embeds when eos_token_id is 49407",
            "te2.pooled_hf_argmax": "transformers' text_embeds with the Hub's eos_token_id 2: pooled at argmax(ids) = the last placeholder slot "
                                    "(what diffusers' textual_inversion_sdxl example trains with). Divergence 2.8-1.",
            "pooled_hf_vs_eos_rel_diff": pooled_rel_diff,
            "te.context": "cat([te1.hidden_m2, te2.hidden_m2], -1): [L (32) || G (48)] = 80",
            "g_pad_eos_instead_of_0_context_rel_diff": g_pad_rel,
            "eager_vs_default_attention_max_abs_diff": eager,
            "diffusers_encode_prompt_check": "StableDiffusionXLPipeline.encode_prompt(prompt) (no placeholders, its own tokenizers) == the rules above: max abs diff "
                                             f"{enc_prompt_diff:.1e}; same for the empty prompt ({empty_diff:.1e})",
        },
        "uncond_case": {
            "prompt": "",
            "ids_l": e_list,
            "ids_g": g_ids(e_list),
            "note": "encoded empty prompt (ComfyUI's uncond; == diffusers encode_prompt('')). diffusers with force_zeros_for_empty_prompt and A1111 "
                    "use ZEROS for an empty negative prompt (context and pooled) instead.",
        },
        "chunks_case": {
            "prompt": LONG_PROMPT.replace(" sks ", " <sks-0> <sks-1> "),
            "n_tokens": len(toks),
            "ids_l": chunks_l,
            "ids_g": chunks_g,
            "rule": "tokens (placeholder expanded to 2 slots) split at 75; each chunk = [BOS] + up to 75 + [EOS] + pad (L: EOS, G: 0 after the first EOS). "
                    "A1111 and ComfyUI agree here (no commas, no BREAK, one text group, the embedding at slots 5-6). "
                    "chunks.context = cat over chunks along tokens of [L || G] -> [1,154,80]; chunks.pooled = G's pooled (first EOS) of chunk 0",
            "chunk0": "starts with the one-chunk prompt's first 8 ids (states equal there); full (EOS at 76)",
        },
        "vae_case": {"image": "as make_tiny_sd.py", "latent": "vae.encode(image).latent_dist mean / logvar (unscaled)", "logvar_clamp_active": logvar_clamped,
                     "scaling_factor": SCALING_FACTOR, "force_upcast": True},
        "unet_case": {
            "timesteps": ids_list(u_t),
            "time_ids": UNET_TIME_IDS,
            "call": "unet(sample, timesteps, context, added_cond_kwargs={'text_embeds': unet.text_embeds, 'time_ids': unet.time_ids}).sample",
            "add_time_proj": "get_timestep_embedding(time_ids.flatten(), 8, flip_sin_to_cos=True, shift=0) reshaped [B, 6*8]: per id [cos(4) | sin(4)], ids in order "
                             "(orig_h, orig_w, crop_top, crop_left, target_h, target_w); always computed in float32",
            "aug_emb": "add_embedding(cat([text_embeds, add_time_proj], -1)): linear_1 (96->128), SiLU, linear_2 (128->128); "
                       "emb = time_embedding(time_proj(t)) + aug_emb",
            "sample_size_note": "16x16 latents (levels 16, 8, 4); f32 vs f64 relative error of unet.noise_pred",
            "f32_vs_f64_rel_err": unet_f32_vs_f64,
        },
        "loss_case": {
            "timestep": 500,
            "time_ids": LOSS_TIME_IDS,
            "latents": f"vae.latent_mean * {SCALING_FACTOR} (mean, not a sample)",
            "noisy": "sqrt(acp[t])*latents + sqrt(1-acp[t])*noise, acp = DDPMScheduler.from_pretrained(tiny-sdxl/scheduler).alphas_cumprod (float32)",
            "context": "te.context (injected vectors), pooled text_embeds = te2.pooled_eos",
            "targets": {"loss": "epsilon: noise", "loss_v": "v: sqrt(acp)*noise - sqrt(1-acp)*latents",
                        "loss_vz": "v with rescale_betas_zero_snr=True (acp = ddpm.alphas_cumprod_zsnr; NoobAI-style)"},
            "loss": "F.mse_loss(pred.float(), target.float(), reduction='mean') over 256 elements",
            "grads": "grad_l = d loss / d te.vectors_l [2,32]; grad_g = d loss / d te.vectors_g [2,48] (context G half + pooled path)",
            "grad_g_pooled_only": "grad_g with G's half of the context detached: only the pooled -> add_embedding -> time_emb_proj path (epsilon)",
            "grad_g_context_only": "grad_g with the pooled vector detached (epsilon); pooled_only + context_only == grad_g",
            "pooled_only_share_of_grad_g_norm": pooled_share,
            "loss_hf_argmax": "epsilon loss/grads with the pooled vector of transformers' text_embeds (eos_token_id 2: argmax position); rel diff vs loss.*",
            "loss_hf_argmax_rel_diff": hf_rel,
            "f64": "*_f64: models .double(), inputs = the f32 tensors upcast. diffusers computes the timestep AND time-id sinusoids in float32 "
                   "even in the f64 run, and alphas_cumprod is float32: those constants are float32-rounded in the f64 numbers too",
            "f32_vs_f64_rel_err": grad_rel,
            "acp_500": float(sched.alphas_cumprod[500]),
            "acp_500_zsnr": float(sched_vz.alphas_cumprod[500]),
        },
        "finite_difference_check": {"step": eps_fd, "dtype": "float64", "epsilon_loss": fd_report,
                                    "g_pooled_only": "G's context half held at its value for te.vectors_g; only the pooled vector varies"},
        "adamw_joint_clip": {
            "optimizer": "torch.optim.AdamW([l, g], lr=5e-3, betas=(0.9,0.999), eps=1e-8, weight_decay=1e-2), param0 = te.vectors_l / te.vectors_g",
            "clip": "torch.nn.utils.clip_grad_norm_([l, g], 0.1) before each step: both scaled by min(1, 0.1/(sqrt(|gl|^2+|gg|^2) + 1e-6))",
        },
        "single_file": {
            "path": "tests/fixtures/tiny-sdxl.safetensors",
            "dtype": "float16, plus int64 conditioner.embedders.0.transformer.text_model.embeddings.position_ids [1,77] and a 0-d "
                     "conditioner.embedders.1.model.logit_scale (both unused; loaders must ignore them)",
            "prefixes": {"model.diffusion_model.": "unet", "first_stage_model.": "vae",
                         "conditioner.embedders.0.transformer.": "text_encoder (keys then start with text_model.)",
                         "conditioner.embedders.1.model.": "text_encoder_2 in OpenCLIP layout"},
            "validated_with": "diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint / convert_ldm_vae_checkpoint / convert_ldm_clip_checkpoint / "
                              "convert_open_clip_checkpoint(prefix='conditioner.embedders.1.model.'): every tensor bit-identical to the folder; "
                              "infer_diffusers_model_type == 'xl_base'; StableDiffusionXLPipeline.from_single_file(config=folder) == from_pretrained(folder)",
            "validation": sf_report,
            "rules": {
                "unet": [
                    "as make_tiny_sd.py with 3 levels: down_blocks.b.resnets.j <- input_blocks.{3b+j+1}.0; attentions.j <- input_blocks.{3b+j+1}.1 (b=1,2 only); "
                    "downsamplers.0.conv <- input_blocks.{3b+3}.0.op (b=0,1); no input_blocks.9",
                    "mid_block.resnets.0 / attentions.0 / resnets.1 <- middle_block.0 / .1 / .2",
                    "up_blocks.b.resnets.j <- output_blocks.{3b+j}.0; attentions.j <- output_blocks.{3b+j}.1 (b=0,1); "
                    "upsamplers.0.conv <- output_blocks.{3b+2}.2.conv (b=0,1: both have attention); up block 2 has neither",
                    "add_embedding.linear_1 <- label_emb.0.0 [128,96]; add_embedding.linear_2 <- label_emb.0.2 [128,128]",
                    "proj_in / proj_out are Linear [c,c] in both layouts (use_linear_projection)",
                ],
                "vae": ["as make_tiny_sd.py (mid attention q/k/v/proj_out 1x1 conv [c,c,1,1] in the single file)"],
                "text_encoder": ["conditioner.embedders.0.transformer.text_model.X <- text_model.X"],
                "text_encoder_2": [
                    "token_embedding.weight <- text_model.embeddings.token_embedding.weight; positional_embedding <- text_model.embeddings.position_embedding.weight",
                    "transformer.resblocks.i.attn.in_proj_weight [3*48,48] = cat(q_proj.weight, k_proj.weight, v_proj.weight) rows; in_proj_bias likewise",
                    "transformer.resblocks.i.{attn.out_proj, ln_1, ln_2, mlp.c_fc, mlp.c_proj} <- text_model.encoder.layers.i.{self_attn.out_proj, layer_norm1, layer_norm2, mlp.fc1, mlp.fc2}",
                    "ln_final <- text_model.final_layer_norm",
                    "text_projection [width 48, embed 48] = text_projection.weight.T (TRANSPOSED; used as x @ P)",
                    "logit_scale: 0-d, unused",
                ],
            },
            "representative": representative,
            "key_map_ldm_to_diffusers": key_map,
            "key_map_note": "text_encoder_2: a list value [q,k,v] means the SGM tensor is those three diffusers tensors concatenated along dim 0; "
                            "'…text_projection' maps to the TRANSPOSE of 'text_projection.weight'; VAE mid attention q/k/v/proj_out weights "
                            "are the diffusers [c,c] weights reshaped to [c,c,1,1]",
        },
        "expected_tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in tensors.items()},
    }
    with open(EXPECTED_JSON, "w") as f:
        json.dump(meta, f, indent=1)

    total = 0
    for p in sorted(FIX.rglob("*")):
        if p.is_file() and (p == SINGLE or p == EXPECTED or p == EXPECTED_JSON or PIPE in p.parents):
            total += p.stat().st_size
            print(f"  {p.relative_to(ROOT)}: {p.stat().st_size / 1e6:.2f} MB")
    print(f"total fixture size: {total / 1e6:.2f} MB")
    print("OK")


if __name__ == "__main__":
    main()
