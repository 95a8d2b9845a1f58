#!/usr/bin/env python3
"""Build the tiny Stable Diffusion 2.x reference fixtures for sdti.

Run from the repository root:

    $REFENV/bin/python tests/reference/make_tiny_sd2.py

Writes (see tests/reference/README.md, section "tiny-sd2 (SD 2.x)"):

  tests/fixtures/tiny-sd2/                      diffusers-format SD 2.x pipeline folder (fp16 weights):
                                                23-layer OpenCLIP-style text encoder (GELU), linear-projection
                                                UNet with per-level heads and upcast_attention, the SD1 tiny VAE,
                                                tokenizer with pad_token "!" (as the Hub SD 2 folders)
  tests/fixtures/tiny-sd2.safetensors           same weights, single-file (LDM) layout with the FULL 24-block
                                                OpenCLIP text tower under cond_stage_model.model., fp16
  tests/fixtures/tiny-sd2-expected.safetensors  expected outputs (float32 unless noted)
  tests/fixtures/tiny-sd2-expected.json         metadata: versions, prompts, ids, key map, checks

Conventions are those of make_tiny_sd.py (several helpers are imported from it): no
network, every model built from a config, torch.manual_seed(0), every parameter
perturbed by 0.02*randn and rounded through fp16, every reference computed in float32
(and float64 for the gradient checks) *after reloading the written files*.
"""

import copy
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_tiny_sd as sd1  # noqa: E402  (prints the versions; sets threads and deterministic algorithms)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from diffusers.models.attention_processor import Attention, AttnProcessor  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402

ROOT = sd1.ROOT
FIX = sd1.FIX
PIPE = FIX / "tiny-sd2"
SINGLE = FIX / "tiny-sd2.safetensors"
EXPECTED = FIX / "tiny-sd2-expected.safetensors"
EXPECTED_JSON = FIX / "tiny-sd2-expected.json"
SD1_TOKENIZER = FIX / "tiny-sd" / "tokenizer"  # EOS padding; same vocab/merges as ours (checked)
VERSIONS = sd1.VERSIONS

BOS, EOS, PAD = 49406, 49407, 0
OC = "cond_stage_model.model."  # OpenCLIP prefix in SD 2.x single files

# --------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------
# The Hub SD 2 text_encoder/config.json (and kohya's convert_ldm_clip_checkpoint_v2) has
# bos_token_id 0, eos_token_id 2, pad_token_id 1, hidden_act "gelu", 23 layers; its
# projection_dim 512 is unused by CLIPTextModel. Here projection_dim = hidden (the real
# OpenCLIP ViT-H text_projection is square, [1024,1024]).
TE_FULL_LAYERS = 24
TE_CONFIG = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=23,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
    projection_dim=32,
)
TE_FULL_CONFIG = dict(TE_CONFIG, num_hidden_layers=TE_FULL_LAYERS)
UNET_CONFIG = dict(sd1.UNET_CONFIG, attention_head_dim=(2, 2, 4, 4), use_linear_projection=True, upcast_attention=True)
VAE_CONFIG = dict(sd1.VAE_CONFIG)
SCHED_CONFIG = dict(sd1.SCHED_CONFIG)
SCHED_CONFIG_V = dict(SCHED_CONFIG, prediction_type="v_prediction")
SCALING_FACTOR = 0.18215
IMAGE_SIZE = 128  # VAE test image and loss latents (16x16); see the comment in main()
LOGIT_SCALE = math.log(100.0)  # OpenCLIP's trained value; unused by SD 2.x

PROMPT = sd1.PROMPT  # "a photo of a sks toy"
PLACEHOLDER_WORD = sd1.PLACEHOLDER_WORD
PLACEHOLDER_TOKENS = sd1.PLACEHOLDER_TOKENS
PROMPT_WITH_PLACEHOLDERS = sd1.PROMPT_WITH_PLACEHOLDERS
FILLER = ["red", "green", "blue", "cat", "dog", "tree", "house", "car", "sky", "sun"]
# 4 + 2 (sks) + 1 + 73 fillers = 80 slots, then sks (2 slots) and 8 fillers: 90 slots,
# two chunks (75 + 15); the second sks sits at slots 80-81 (chunk 1 slots 5-6), far from
# the boundary; single-token words and no commas, so A1111 and ComfyUI chunk it alike.
LONG_PROMPT = PROMPT + " " + " ".join(FILLER[i % 10] for i in range(73)) + " sks " + " ".join(FILLER[(i + 3) % 10] for i in range(8))
BANG_PROMPT = "a cat! a dog!! wow"
EMPTY_PROMPT = ""

ids_list = sd1.ids_list


# --------------------------------------------------------------------------------------
# 1. Tokenizer folder: SD1 vocab/merges, pad_token "!" (as the Hub SD 2 tokenizer folder)
# --------------------------------------------------------------------------------------
def write_tokenizer(dst: Path):
    sd1.write_tokenizer(dst)
    for name in ("vocab.json", "merges.txt"):
        assert (dst / name).read_bytes() == (SD1_TOKENIZER / name).read_bytes(), name

    def added(content):
        return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

    special = {"bos_token": added("<|startoftext|>"), "eos_token": added("<|endoftext|>"), "pad_token": "!", "unk_token": added("<|endoftext|>")}
    with open(dst / "special_tokens_map.json", "w") as f:
        json.dump(special, f, indent=2)
    tok_cfg = {
        "add_prefix_space": False,
        "bos_token": dict(special["bos_token"], __type="AddedToken"),
        "do_lower_case": True,
        "eos_token": dict(special["eos_token"], __type="AddedToken"),
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": "!",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": dict(special["unk_token"], __type="AddedToken"),
    }
    with open(dst / "tokenizer_config.json", "w") as f:
        json.dump(tok_cfg, f, indent=2)


# --------------------------------------------------------------------------------------
# 2. Models: random init, perturbed, fp16-rounded
# --------------------------------------------------------------------------------------
def build_models():
    torch.manual_seed(0)
    te_full = CLIPTextModelWithProjection(CLIPTextConfig(**TE_FULL_CONFIG))  # 24 blocks + text_projection
    unet = UNet2DConditionModel(**UNET_CONFIG)
    vae = AutoencoderKL(**VAE_CONFIG)
    with torch.no_grad():
        for model in (te_full, unet, vae):
            for p in model.parameters():
                p.data = (p.data + 0.02 * torch.randn_like(p)).half().float()
    for m in (te_full, unet, vae):
        m.eval()
    # The folder's text encoder: the first 23 blocks + final LN (block 24 dropped, as the Hub).
    te = CLIPTextModel(CLIPTextConfig(**TE_CONFIG))
    sd = {k[len("text_model."):]: v for k, v in te_full.state_dict().items()
          if k.startswith("text_model.") and f"encoder.layers.{TE_FULL_LAYERS - 1}." not in k}
    te.load_state_dict(sd, strict=True)
    te.eval()
    w = te_full.text_projection.weight
    assert (w - w.T).abs().max().item() > 0.1, "text_projection must be visibly non-symmetric"
    return te_full, te, unet, vae


def te_folder_state(te):
    sd = sd1.fp16_state(te)
    if not all(k.startswith("text_model.") for k in sd):
        sd = {"text_model." + k: v for k, v in sd.items()}
    return sd


def write_pipeline(te, unet, vae):
    PIPE.mkdir(parents=True, exist_ok=True)
    ted = PIPE / "text_encoder"
    ted.mkdir(exist_ok=True)
    copy.deepcopy(te).half().save_pretrained(ted, safe_serialization=True)
    save_file(te_folder_state(te), ted / "model.safetensors", metadata={"format": "pt"})
    copy.deepcopy(unet).half().save_pretrained(PIPE / "unet", safe_serialization=True)
    copy.deepcopy(vae).half().save_pretrained(PIPE / "vae", safe_serialization=True)
    DDPMScheduler(**SCHED_CONFIG).save_pretrained(PIPE / "scheduler")
    # v-prediction variant (as the 768-v models); diffusers reads only scheduler_config.json
    cfg_v = json.load(open(PIPE / "scheduler" / "scheduler_config.json"))
    cfg_v["prediction_type"] = "v_prediction"
    with open(PIPE / "scheduler" / "scheduler_config_v.json", "w") as f:
        json.dump(cfg_v, f, indent=2, sort_keys=True)
        f.write("\n")
    write_tokenizer(PIPE / "tokenizer")
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


def load_pipeline_fp32():
    te = CLIPTextModel.from_pretrained(PIPE / "text_encoder", torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(PIPE / "unet", torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(PIPE / "vae", torch_dtype=torch.float32)
    for m in (te, unet, vae):
        m.eval()
        m.requires_grad_(False)
    return te, unet, vae


assert_same_params = sd1.assert_same_params


# --------------------------------------------------------------------------------------
# 3. Single file: OpenCLIP text tower (24 blocks), LDM UNet and VAE
# --------------------------------------------------------------------------------------
def openclip_from_hf(te_full):
    """HF CLIPTextModelWithProjection (24 layers) -> OpenCLIP keys, plus the map."""
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in te_full.state_dict().items()}
    out, tmap = {}, []

    def put(lk, v, entry):
        out[OC + lk] = v.contiguous()
        tmap.append(dict(entry, ldm=OC + lk, ldm_shape=list(v.shape)))

    T = "text_model."
    put("token_embedding.weight", sd[T + "embeddings.token_embedding.weight"], {"diffusers": T + "embeddings.token_embedding.weight"})
    put("positional_embedding", sd[T + "embeddings.position_embedding.weight"], {"diffusers": T + "embeddings.position_embedding.weight"})
    d = TE_CONFIG["hidden_size"]
    for i in range(TE_FULL_LAYERS):
        L = f"{T}encoder.layers.{i}."
        R = f"transformer.resblocks.{i}."
        for a, b in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2")):
            for p in ("weight", "bias"):
                put(f"{R}{b}.{p}", sd[f"{L}{a}.{p}"], {"diffusers": f"{L}{a}.{p}"})
        for p, lp in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
            parts = [sd[f"{L}self_attn.{q}_proj.{p}"] for q in ("q", "k", "v")]
            put(f"{R}attn.{lp}", torch.cat(parts, 0), {"diffusers": [f"{L}self_attn.{q}_proj.{p}" for q in ("q", "k", "v")],
                                                       "rows": [[0, d], [d, 2 * d], [2 * d, 3 * d]]})
        for p in ("weight", "bias"):
            put(f"{R}attn.out_proj.{p}", sd[f"{L}self_attn.out_proj.{p}"], {"diffusers": f"{L}self_attn.out_proj.{p}"})
            put(f"{R}mlp.c_fc.{p}", sd[f"{L}mlp.fc1.{p}"], {"diffusers": f"{L}mlp.fc1.{p}"})
            put(f"{R}mlp.c_proj.{p}", sd[f"{L}mlp.fc2.{p}"], {"diffusers": f"{L}mlp.fc2.{p}"})
    for p in ("weight", "bias"):
        put(f"ln_final.{p}", sd[f"{T}final_layer_norm.{p}"], {"diffusers": f"{T}final_layer_norm.{p}"})
    put("text_projection", sd["text_projection.weight"].T, {"diffusers": "text_projection.weight", "transpose": True})
    put("logit_scale", torch.tensor(LOGIT_SCALE, dtype=torch.float16), {"diffusers": None, "note": "unused, ignore"})
    assert len(out) == len(sd) - 4 * TE_FULL_LAYERS + 1, (len(out), len(sd))  # q/k/v weights and biases fused (6 -> 2 per block), + logit_scale
    return out, tmap


def build_single_file(te_full, unet, vae):
    out, tmap = openclip_from_hf(te_full)
    unet_sd = sd1.fp16_state(unet)
    vae_sd = sd1.fp16_state(vae)
    key_map = {"unet": {}, "vae": {}}
    for k, v in unet_sd.items():
        lk = "model.diffusion_model." + sd1.unet_diffusers_to_ldm_key(k, UNET_CONFIG)
        assert lk not in out, lk
        out[lk] = v
        key_map["unet"][lk] = k
    for k, v in vae_sd.items():
        lk = "first_stage_model." + sd1.vae_diffusers_to_ldm_key(k, VAE_CONFIG)
        assert lk not in out, lk
        if ".mid.attn_1." in lk and v.ndim == 2:
            v = v[:, :, None, None].contiguous()
        out[lk] = v
        key_map["vae"][lk] = k
    return out, key_map, tmap, (unet_sd, vae_sd)


def full_tower_from_single_file(ckpt):
    """The 24-block tower (+ text_projection) through diffusers' own converter.

    convert_open_clip_checkpoint(prefix="cond_stage_model.model.") drops resblocks.23 and
    text_projection (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE lists them under that prefix), so the
    full tower is converted under a neutral prefix, where nothing is ignored and
    text_projection is transposed (the SDXL path)."""
    other = "sdti_full_tower.model."
    renamed = {other + k[len(OC):]: v for k, v in ckpt.items() if k.startswith(OC)}
    model = CLIPTextModelWithProjection(CLIPTextConfig(**TE_FULL_CONFIG))
    conv = convert_open_clip_checkpoint(model, renamed, prefix=other)
    return conv, model


def validate_single_file(path, te_full, te, originals):
    unet_sd, vae_sd = originals
    ckpt = load_file(path)
    report = {}
    # text encoder, SD 2.x path: 23 layers, no text_projection
    conv = convert_open_clip_checkpoint(te, ckpt, prefix=OC)
    want = te_folder_state(te)
    assert set(conv) == set(want), sorted(set(conv) ^ set(want))[:10]
    for k, v in want.items():
        assert conv[k].dtype == v.dtype and torch.equal(conv[k], v), k
    report["text_encoder_23"] = {"converter": "convert_open_clip_checkpoint(te, ckpt, prefix='cond_stage_model.model.')",
                                 "tensors_checked": len(want), "note": "resblocks.23.* and text_projection ignored by diffusers (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE)"}
    # full tower: 24 blocks + transposed text_projection
    conv_full, _ = full_tower_from_single_file(ckpt)
    want_full = {k: v.detach().half() for k, v in te_full.state_dict().items()}
    assert set(conv_full) == set(want_full), sorted(set(conv_full) ^ set(want_full))[:10]
    for k, v in want_full.items():
        assert conv_full[k].dtype == v.dtype and torch.equal(conv_full[k], v), k
    report["text_encoder_24"] = {"converter": "convert_open_clip_checkpoint under a neutral prefix (nothing ignored; text_projection transposed)",
                                 "tensors_checked": len(want_full)}
    print(f"single-file -> diffusers: text encoder 23 layers ({len(want)} tensors) and full 24-block tower ({len(want_full)}) identical")
    unet_conv = convert_ldm_unet_checkpoint(ckpt, dict(UNET_CONFIG))
    vae_conv = convert_ldm_vae_checkpoint(ckpt, dict(VAE_CONFIG))
    for name, c, orig in (("unet", unet_conv, unet_sd), ("vae", vae_conv, vae_sd)):
        assert set(c) == set(orig), (name, sorted(set(c) ^ set(orig))[:10])
        for k, v in orig.items():
            assert c[k].shape == v.shape and c[k].dtype == v.dtype and torch.equal(c[k], v), (name, k)
        report[name] = {"tensors_checked": len(orig)}
        print(f"single-file -> diffusers via diffusers.loaders.single_file_utils: {name}: {len(orig)} tensors identical")
    UNet2DConditionModel(**UNET_CONFIG).load_state_dict({k: v.float() for k, v in unet_conv.items()}, strict=True)
    AutoencoderKL(**VAE_CONFIG).load_state_dict({k: v.float() for k, v in vae_conv.items()}, strict=True)
    # end to end, with the folder as config (model-type inference would say "v1": ctx 32 != 1024)
    from diffusers import StableDiffusionPipeline

    sfp = StableDiffusionPipeline.from_single_file(str(path), config=str(PIPE), safety_checker=None, torch_dtype=torch.float32, local_files_only=True)
    ref = StableDiffusionPipeline.from_pretrained(PIPE, safety_checker=None, torch_dtype=torch.float32)
    for name in ("text_encoder", "unet", "vae"):
        assert_same_params(getattr(ref, name), getattr(sfp, name), "from_single_file." + name)
    report["StableDiffusionPipeline.from_single_file"] = "text_encoder (23 layers), unet, vae identical to from_pretrained(tiny-sd2/) (config=tiny-sd2/)"
    print("StableDiffusionPipeline.from_single_file(tiny-sd2.safetensors, config=tiny-sd2/) == from_pretrained(tiny-sd2/)")
    return report


# --------------------------------------------------------------------------------------
# 4. Ids (A1111 rule) and text states
# --------------------------------------------------------------------------------------
def a1111_chunks(tokens):
    """tokens: ids without BOS/EOS (learned slots as ids >= 49408). Chunks of 75, each
    [BOS] + chunk + [EOS] padded to 77 with EOS, then every slot after the first EOS := 0
    (modules/sd_hijack_clip.py: chunking, then process_tokens with id_pad 0)."""
    chunks = [tokens[i:i + 75] for i in range(0, max(len(tokens), 1), 75)] or [[]]
    out = []
    for c in chunks:
        row = [BOS] + c + [EOS] * (76 - len(c))
        first = row.index(EOS)
        row = row[:first + 1] + [PAD] * (76 - first)
        assert len(row) == 77
        out.append(row)
    return out


def expand_placeholder(tokens, sks_id):
    out = []
    for t in tokens:
        out += [49408, 49409] if t == sks_id else [t]
    return out


def encode_states(te, ids, vectors=None):
    """last_hidden_state of te (CLIPTextModel) for each 77-row of ids, concatenated along tokens."""
    m = sd1.injected_text_encoder(te, vectors) if vectors is not None else te
    return torch.cat([m(input_ids=row[None]).last_hidden_state for row in ids], dim=1)


def tower(te_full):
    """The CLIPTextModel-like part of a CLIPTextModelWithProjection."""
    return te_full.text_model


def upcast_variants(unet32, sample, t, ctx):
    """UNet in f16/bf16 with the classic AttnProcessor, upcast_attention on and off."""
    out = {}
    with torch.no_grad():
        ref = unet32(sample, t, ctx).sample
        for name, dtype in (("f16", torch.float16), ("bf16", torch.bfloat16)):
            for up in (True, False):
                u = copy.deepcopy(unet32).to(dtype)
                u.set_attn_processor(AttnProcessor())
                n = 0
                for m in u.modules():
                    if isinstance(m, Attention):
                        m.upcast_attention = up
                        n += 1
                assert n > 0
                pred = u(sample.to(dtype), t, ctx.to(dtype)).sample.float()
                err = ((pred.double() - ref.double()).norm() / ref.double().norm()).item()
                tag = "upcast" if up else "no_upcast"
                out[f"half.{name}.unet_pred_{tag}"] = pred
                out[f"half.{name}.unet_err_{tag}"] = torch.tensor(err, dtype=torch.float32)
                print(f"torch {name} UNet, attention upcast {up}: rel err vs f32 {err:.3e}")
    return out


def smooth_image(gen, size):
    """make_tiny_sd.smooth_image at another size (same formula, same draws)."""
    y = torch.linspace(0.0, 1.0, size, dtype=torch.float64)[:, None]
    x = torch.linspace(0.0, 1.0, size, dtype=torch.float64)[None, :]
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


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def main():
    FIX.mkdir(parents=True, exist_ok=True)
    te_full0, te0, unet0, vae0 = build_models()
    write_pipeline(te0, unet0, vae0)

    te, unet, vae = load_pipeline_fp32()
    assert_same_params(te0, te, "text_encoder")
    assert_same_params(unet0, unet, "unet")
    assert_same_params(vae0, vae, "vae")
    te_cfg_json = json.load(open(PIPE / "text_encoder" / "config.json"))
    for k in ("num_hidden_layers", "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id", "projection_dim"):
        assert te_cfg_json[k] == TE_CONFIG[k], (k, te_cfg_json[k])
    unet_cfg_json = json.load(open(PIPE / "unet" / "config.json"))
    assert unet_cfg_json["use_linear_projection"] is True and unet_cfg_json["upcast_attention"] is True
    assert unet_cfg_json["attention_head_dim"] == [2, 2, 4, 4]
    sched = DDPMScheduler.from_pretrained(PIPE / "scheduler")
    assert sched.config.prediction_type == "epsilon"
    sched_v = DDPMScheduler.from_config(json.load(open(PIPE / "scheduler" / "scheduler_config_v.json")))
    assert sched_v.config.prediction_type == "v_prediction"
    assert torch.equal(sched.alphas_cumprod, sched_v.alphas_cumprod)
    tok_folder = CLIPTokenizer.from_pretrained(PIPE / "tokenizer")
    assert tok_folder.pad_token == "!" and tok_folder.pad_token_id == 0
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(PIPE, safety_checker=None, feature_extractor=None, torch_dtype=torch.float32)
    assert_same_params(te0, pipe.text_encoder, "pipeline.text_encoder")
    assert_same_params(unet0, pipe.unet, "pipeline.unet")
    assert_same_params(vae0, pipe.vae, "pipeline.vae")
    del pipe
    print("reloaded pipeline folder: weights identical; scheduler eps + v; tokenizer pad '!' = 0")

    # ---------------- single file
    single, key_map, te_map, originals = build_single_file(te_full0, unet0, vae0)
    save_file(single, SINGLE, metadata={"format": "pt"})
    sf_report = validate_single_file(SINGLE, te_full0, te, originals)
    # the 24-block tower used for the references is the one read back from the single file
    conv_full, te_full = full_tower_from_single_file(load_file(SINGLE))
    te_full.load_state_dict({k: v.float() for k, v in conv_full.items()}, strict=True)
    te_full.eval()
    te_full.requires_grad_(False)
    assert_same_params(te_full0, te_full, "single-file full tower")

    # ---------------- ids
    tok = CLIPTokenizer.from_pretrained(SD1_TOKENIZER)  # EOS padding, "!" tokenised normally
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    sks_id = tok(PLACEHOLDER_WORD, add_special_tokens=False).input_ids
    assert len(sks_id) == 1
    sks_id = sks_id[0]

    def words(p):
        return tok(p, add_special_tokens=False).input_ids

    raw_tokens = words(PROMPT)
    raw_rows = a1111_chunks(raw_tokens)
    assert len(raw_rows) == 1
    raw_list = raw_rows[0]
    slot = raw_list.index(sks_id)
    assert slot == 5
    inj_tokens = expand_placeholder(raw_tokens, sks_id)
    inj_list = a1111_chunks(inj_tokens)[0]
    assert inj_list[5:7] == [49408, 49409] and inj_list[8] == EOS and all(i == 0 for i in inj_list[9:])
    # same as SD1 tokenizer + add_tokens, then the A1111 pad rule
    tok2 = CLIPTokenizer.from_pretrained(SD1_TOKENIZER)
    assert tok2.add_tokens(PLACEHOLDER_TOKENS) == 2
    assert tok2.convert_tokens_to_ids(PLACEHOLDER_TOKENS) == [49408, 49409]
    via_tok = tok2(PROMPT_WITH_PLACEHOLDERS, padding="max_length", max_length=77, truncation=True).input_ids
    assert via_tok[:9] == inj_list[:9] and all(i == EOS for i in via_tok[9:])
    eos_pad_list = via_tok  # the SD1 rule (EOS padding): wrong for SD 2.x, recorded to show it matters
    # ... and the folder tokenizer gives the same ids when the prompt has no "!"
    tok_folder2 = CLIPTokenizer.from_pretrained(PIPE / "tokenizer")
    tok_folder2.add_tokens(PLACEHOLDER_TOKENS)
    assert tok_folder2(PROMPT_WITH_PLACEHOLDERS, padding="max_length", max_length=77).input_ids == inj_list
    ids = torch.tensor([inj_list], dtype=torch.int64)
    raw_ids = torch.tensor([raw_list], dtype=torch.int64)
    eos_pad_ids = torch.tensor([eos_pad_list], dtype=torch.int64)

    long_tokens = words(LONG_PROMPT)
    assert long_tokens.count(sks_id) == 2
    for w in FILLER:
        assert len(words(w)) == 1, w
    long_inj = expand_placeholder(long_tokens, sks_id)
    assert len(long_inj) == 90, len(long_inj)
    assert long_inj[80:82] == [49408, 49409]
    long_rows = a1111_chunks(long_inj)
    assert len(long_rows) == 2 and long_rows[0][76] == EOS and long_rows[1][6:8] == [49408, 49409]
    assert long_rows[1][16] == EOS and all(i == 0 for i in long_rows[1][17:])
    long_ids = torch.tensor(long_rows, dtype=torch.int64)

    bang_tokens = words(BANG_PROMPT)
    assert 256 in bang_tokens and 748 in bang_tokens, bang_tokens
    bang_list = a1111_chunks(bang_tokens)[0]
    bang_quirk = tok_folder(BANG_PROMPT, padding="max_length", max_length=77).input_ids
    assert 256 not in bang_quirk and 748 not in bang_quirk and bang_quirk != bang_list
    bang_ids = torch.tensor([bang_list], dtype=torch.int64)
    bang_quirk_ids = torch.tensor([bang_quirk], dtype=torch.int64)

    empty_list = a1111_chunks(words(EMPTY_PROMPT))[0]
    assert empty_list[:3] == [BOS, EOS, 0]
    empty_ids = torch.tensor([empty_list], dtype=torch.int64)

    g1 = torch.Generator().manual_seed(1)
    vectors = torch.randn(2, 32, generator=g1) * 0.3

    # ---------------- text encoder
    with torch.no_grad():
        te_resized = copy.deepcopy(te)
        te_resized.resize_token_embeddings(49410)
        te_resized.embeddings.token_embedding.weight[49408:] = vectors
        out = te_resized(input_ids=ids, output_hidden_states=True)
        last = out.last_hidden_state
        assert len(out.hidden_states) == TE_CONFIG["num_hidden_layers"] + 1
        clip_skip3 = te_resized.final_layer_norm(out.hidden_states[-2])
        last_inj = encode_states(te, ids, vectors)
        assert torch.equal(last_inj, last), "injected != resized"
        te_eager = copy.deepcopy(te_resized)
        te_eager.config._attn_implementation = "eager"
        eager_vs_default = (te_eager(input_ids=ids).last_hidden_state - last).abs().max().item()
        assert eager_vs_default < 1e-5, eager_vs_default
        # the full 24-block tower from the single file
        tw = tower(te_full)
        o24 = sd1.injected_text_encoder(tw, vectors)(input_ids=ids, output_hidden_states=True)
        assert len(o24.hidden_states) == TE_FULL_LAYERS + 1
        last24 = o24.last_hidden_state
        pen24 = tw.final_layer_norm(o24.hidden_states[-2])
        skip3_24 = tw.final_layer_norm(o24.hidden_states[-3])
        pen_vs_folder = (pen24 - last).abs().max().item()
        skip3_vs_folder = (skip3_24 - clip_skip3).abs().max().item()
        assert pen_vs_folder < 1e-6 and skip3_vs_folder < 1e-6, (pen_vs_folder, skip3_vs_folder)
        last24_vs_pen = rel(last24, last)
        assert last24_vs_pen > 1e-2, last24_vs_pen
        # pooled (unused by SD 2.x): ln_final(last)[first EOS] @ text_projection.weight.T
        eos_pos = inj_list.index(EOS)
        pooled24 = te_full.text_projection(last24[:, eos_pos])
        wrong = last24[:, eos_pos] @ te_full.text_projection.weight  # a missed transpose
        pooled_transpose_miss_rel = rel(wrong, pooled24)
        assert pooled_transpose_miss_rel > 0.1
        eos_pad_last = encode_states(te, eos_pad_ids, vectors)
        pad_rel = rel(eos_pad_last, last)
        assert torch.equal(eos_pad_last[:, :eos_pos + 1], last[:, :eos_pos + 1]) and pad_rel > 1e-2
        plain_last = te(input_ids=raw_ids).last_hidden_state
        long_last = encode_states(te, long_ids, vectors)
        assert long_last.shape == (1, 154, 32)
        bang_last = te(input_ids=bang_ids).last_hidden_state
        bang_quirk_last = te(input_ids=bang_quirk_ids).last_hidden_state
        bang_quirk_rel = rel(bang_quirk_last, bang_last)
        empty_last = te(input_ids=empty_ids).last_hidden_state
    print(f"te: pad 0 vs EOS pad rel {pad_rel:.3f}; last24 vs penultimate rel {last24_vs_pen:.3f}; "
          f"'!' quirk rel {bang_quirk_rel:.3f}; missed transpose rel {pooled_transpose_miss_rel:.3f}; eager {eager_vs_default:.1e}")

    # ---------------- vae
    g2 = torch.Generator().manual_seed(2)
    # 128x128 -> 16x16 latents (tiny-sd uses 64 -> 8x8). At 8x8 the UNet's lowest level is
    # 1x1, its GroupNorms normalise 2 values per group, and on this model torch's own f32
    # gradient on the vectors was 6% (eps) / 11% (v) off the f64 one; at 16x16 (2x2, 8
    # values per group) it agrees to about 2e-6.
    image = smooth_image(g2, IMAGE_SIZE)
    with torch.no_grad():
        dist = vae.encode(image).latent_dist
        latent_mean, latent_logvar = dist.mean.clone(), dist.logvar.clone()
        raw_logvar = vae.quant_conv(vae.encoder(image))[:, 4:]
        assert torch.equal(raw_logvar.clamp(-30, 20), latent_logvar)
        logvar_clamped = bool((raw_logvar != latent_logvar).any())

    # ---------------- unet
    g3 = torch.Generator().manual_seed(3)
    u_sample = torch.randn(2, 4, 32, 32, generator=g3)
    u_context = torch.randn(2, 77, 32, generator=g3)
    u_t = torch.tensor([10, 700], dtype=torch.int64)
    with torch.no_grad():
        u_pred = unet(u_sample, u_t, u_context).sample
        t_emb = unet.time_proj(u_t)
        temb = unet.time_embedding(t_emb)
        # the classic processor (which honours upcast_attention) agrees in f32
        u_classic = copy.deepcopy(unet)
        u_classic.set_attn_processor(AttnProcessor())
        classic_vs_sdpa = rel(u_classic(u_sample, u_t, u_context).sample, u_pred)
        assert classic_vs_sdpa < 1e-5, classic_vs_sdpa
    g3b = torch.Generator().manual_seed(31)
    u_sample_odd = torch.randn(1, 4, 20, 28, generator=g3b)
    u_context_odd = torch.randn(1, 77, 32, generator=g3b)
    with torch.no_grad():
        u_pred_odd = unet(u_sample_odd, torch.tensor([300]), u_context_odd).sample
    half = upcast_variants(unet, u_sample, u_t, u_context)
    print(f"unet: |noise_pred| max {u_pred.abs().max():.4f}, std {u_pred.std():.4f}; classic vs sdpa {classic_vs_sdpa:.1e}")

    # prediction-type heuristics on this (epsilon-labelled, random) model
    with torch.no_grad():
        x_probe = torch.ones(1, 4, 8, 8) * 0.5
        c_probe = torch.ones(1, 2, 32) * 0.5
        a1111_probe = (unet(x_probe, torch.tensor([999]), c_probe).sample - x_probe).mean().item()
    comfy_key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    comfy_std = single[comfy_key].float().std(unbiased=False).item()

    # ---------------- loss + grad (eps and v), f32 and f64
    latents = (latent_mean * SCALING_FACTOR).contiguous()
    g4 = torch.Generator().manual_seed(4)
    noise = torch.randn(latents.shape, generator=g4)
    t = torch.tensor([500], dtype=torch.int64)
    loss, grad, inter = sd1.training_loss(te, unet, sched, ids, vectors, latents, noise, t, "epsilon", torch.float32)
    assert torch.equal(inter["context"], last), "loss context must equal te.last_hidden_state"
    loss64, grad64, _ = sd1.training_loss(te, unet, sched, ids, vectors, latents, noise, t, "epsilon", torch.float64)
    loss_v, grad_v, inter_v = sd1.training_loss(te, unet, sched_v, ids, vectors, latents, noise, t, "v_prediction", torch.float32)
    loss_v64, grad_v64, _ = sd1.training_loss(te, unet, sched_v, ids, vectors, latents, noise, t, "v_prediction", torch.float64)
    rel32 = rel(grad, grad64)
    rel32v = rel(grad_v, grad_v64)
    print(f"loss eps: f32 {loss.item():.8f} f64 {loss64.item():.10f}; |grad| {grad.norm():.6e}; f32 vs f64 {rel32:.2e}")
    print(f"loss v:   f32 {loss_v.item():.8f} f64 {loss_v64.item():.10f}; |grad| {grad_v.norm():.6e}; f32 vs f64 {rel32v:.2e}")
    assert rel32 < 1e-4 and rel32v < 1e-4, (rel32, rel32v)

    te64 = copy.deepcopy(te).double()
    unet64 = copy.deepcopy(unet).double()
    lat64, nz64 = latents.double(), noise.double()
    noisy64 = sched.add_noise(lat64, nz64, t)
    target_v64 = sched_v.get_velocity(lat64, nz64, t)

    def loss_at(v, target):
        with torch.no_grad():
            ctx = sd1.injected_text_encoder(te64, v)(input_ids=ids).last_hidden_state
            return F.mse_loss(unet64(noisy64, t, ctx).sample, target).item()

    eps_fd = 1e-6
    fd_report = {"epsilon": [], "v_prediction": []}
    for kind, target, g64, g32 in (("epsilon", nz64, grad64, grad), ("v_prediction", target_v64, grad_v64, grad_v)):
        for (r, c) in [(0, 0), (1, 7), (0, 31)]:
            vp = vectors.double().clone()
            vm = vectors.double().clone()
            vp[r, c] += eps_fd
            vm[r, c] -= eps_fd
            fd = (loss_at(vp, target) - loss_at(vm, target)) / (2 * eps_fd)
            ag = g64[r, c].item()
            fd_report[kind].append({"coord": [r, c], "finite_difference": fd, "autograd_f64": ag, "autograd_f32": g32[r, c].item(), "abs_diff": abs(fd - ag)})
            print(f"finite diff {kind} [{r},{c}]: fd {fd:.10e} autograd64 {ag:.10e} |diff| {abs(fd - ag):.2e}")
            assert abs(fd - ag) <= 1e-5 * abs(ag) + 1e-10, "finite difference mismatch"

    # ---------------- write expected tensors
    tensors = {
        "te.input_ids": ids,
        "te.input_ids_raw": raw_ids,
        "te.input_ids_eos_pad": eos_pad_ids,
        "te.vectors": vectors,
        "te.last_hidden_state": last,
        "te.last24_hidden_state": last24,
        "te.clip_skip3": clip_skip3,
        "te.eos_pad_last_hidden_state": eos_pad_last,
        "te.plain_last_hidden_state": plain_last,
        "te.pooled24": pooled24,
        "te.text_projection": te_full.text_projection.weight,
        "te.long_input_ids": long_ids,
        "te.long_last_hidden_state": long_last,
        "te.bang_input_ids": bang_ids,
        "te.bang_input_ids_quirk": bang_quirk_ids,
        "te.bang_last_hidden_state": bang_last,
        "te.empty_input_ids": empty_ids,
        "te.empty_last_hidden_state": empty_last,
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
        "probe.a1111_mean": torch.tensor(a1111_probe, dtype=torch.float32),
        "probe.comfy_norm1_bias_std": torch.tensor(comfy_std, dtype=torch.float32),
        **half,
    }
    tensors = {k: v.detach().clone().contiguous() for k, v in tensors.items()}
    for k, v in tensors.items():
        assert torch.isfinite(v.double()).all(), k
        if v.is_floating_point() and not k.endswith("_f64"):
            assert v.dtype == torch.float32, k
        if not v.is_floating_point():
            assert v.dtype == torch.int64, k
    save_file(tensors, EXPECTED, metadata={"format": "pt"})

    # ---------------- json
    def te_rep(pred):
        return [e for e in te_map if pred(e["ldm"][len(OC):])]

    meta = {
        "generator": "tests/reference/make_tiny_sd2.py",
        "versions": VERSIONS,
        "seeds": {
            "weights": "torch.manual_seed(0); build CLIPTextModelWithProjection (24 layers), UNet2DConditionModel, AutoencoderKL in that order; "
                       "then for each in that order, for p in model.parameters(): p.data = (p.data + 0.02*torch.randn_like(p)).half().float(). "
                       "The folder's 23-layer CLIPTextModel = the first 23 layers + final_layer_norm of that model.",
            "te.vectors": "torch.randn(2,32, generator=Generator().manual_seed(1)) * 0.3",
            "vae.image": "smooth_image(Generator().manual_seed(2), 128): make_tiny_sd.smooth_image's formula and draws at 128x128",
            "unet": "Generator().manual_seed(3): sample randn[2,4,32,32] then context randn[2,77,32]; odd: Generator().manual_seed(31): sample randn[1,4,20,28], context randn[1,77,32], t=300",
            "loss.noise": "randn[1,4,16,16], Generator().manual_seed(4)",
        },
        "configs": {
            "text_encoder": TE_CONFIG,
            "text_encoder_full_single_file": TE_FULL_CONFIG,
            "text_encoder_hub_note": "Hub SD 2 text_encoder/config.json: bos 0, eos 2, pad 1, gelu, 23 layers, projection_dim 512 (unused by CLIPTextModel); "
                                     "here projection_dim = hidden_size = 32 (OpenCLIP's text_projection is square)",
            "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_CONFIG.items()},
            "unet_heads_per_level": "attention_head_dim (2,2,4,4) = number of heads per down level (up levels reversed, mid = 4); 16 channels per head everywhere",
            "vae": VAE_CONFIG,
            "scheduler": SCHED_CONFIG,
            "scheduler_v": "tiny-sd2/scheduler/scheduler_config_v.json: the same with prediction_type v_prediction (diffusers reads only scheduler_config.json; "
                           "load with DDPMScheduler.from_config(json.load(open(...))))",
            "text_encoder_attn_implementation_used": te.config._attn_implementation,
        },
        "weights": {
            "dtype_on_disk": "float16",
            "compute_dtype": "float32 (fp16 weights upcast exactly)",
            "text_encoder_keys": "text_encoder/model.safetensors keys are 'text_model.*' (written by this script, as make_tiny_sd.py does)",
        },
        "tokenizer": {
            "folder": "tiny-sd2/tokenizer: vocab.json and merges.txt byte-identical to tiny-sd/tokenizer; pad_token '!' (id 0) as the Hub SD 2 folders",
            "ids_rule": "ids are NOT made with the folder's tokenizer: tokenize with the SD1 tokenizer (tiny-sd/tokenizer, no special tokens), chunks of 75 -> "
                        "[49406] + chunk + [49407] padded to 77 with 49407, then every slot after the first 49407 set to 0 "
                        "(A1111 modules/sd_hijack_clip.py process_tokens with id_pad 0; = open_clip.tokenize / ComfyUI pad 0)",
            "bos_id": BOS, "eos_id": EOS, "pad_id": PAD,
            "bang_quirk": "HF CLIPTokenizer loaded from an SD 2 tokenizer folder registers '!' (its pad token) as a special token: a literal '!' becomes id 0 "
                          "and '!!' two 0s, instead of BPE 256 ('!</w>') / 748 ('!!</w>') (diffusers#4153, transformers#24925). Still true in transformers "
                          + transformers.__version__ + ". open_clip / A1111 / ComfyUI tokenise '!' normally: te.bang_input_ids.",
        },
        "text_encoder_case": {
            "prompt": PROMPT,
            "placeholder_word": PLACEHOLDER_WORD,
            "placeholder_word_id": sks_id,
            "placeholder_token_ids": [49408, 49409],
            "slot_positions": [slot, slot + 1],
            "raw_ids": raw_list,
            "ids": inj_list,
            "ids_eos_pad": eos_pad_list,
            "construction": "the single 'sks' slot (pos 5) of the raw tokens becomes [49408, 49409] BEFORE padding, then the pad rule; "
                            "sdti keeps id 0 in learned slots (A1111); te.input_ids carries 49408/49409 there as the SD1 fixture does",
            "injection": "token table rows 49408/49409 := te.vectors (resize_token_embeddings(49410) + setting the rows), bit-identical to frozen table ++ leaf rows",
            "te.last_hidden_state": "23-layer folder: final_layer_norm(output of block 23 of 24) = SD 2.x conditioning ('penultimate' + ln_final; "
                                    "ComfyUI CLIPSetLastLayer(-2); sdti clip_skip 2). Equal (max abs diff below) to ln_final(hidden_states[-2]) of the single file's 24-block tower",
            "te.last24_hidden_state": "single file's full 24-block tower: ln_final(output of block 24) = ComfyUI CLIPSetLastLayer(-1) = sdti clip_skip 1 (no diffusers-folder equivalent)",
            "te.clip_skip3": "final_layer_norm(hidden_states[-2]) of the 23-layer folder = ln_final(hidden_states[-3]) of the 24-block tower "
                             "= diffusers clip_skip=1 on SD 2 = ComfyUI CLIPSetLastLayer(-3) = sdti clip_skip 3",
            "te.eos_pad_last_hidden_state": "same prompt/vectors with EOS padding (the SD1 rule): states differ after the EOS (position 8), identical up to it",
            "te.plain_last_hidden_state": "te.input_ids_raw (pad 0) through the folder model, no injection",
            "te.pooled24": "text_projection(last24[:, first EOS]) with text_projection.weight = te.text_projection [p,d] "
                           "(the single file stores its transpose [d,p] as cond_stage_model.model.text_projection). Unused by SD 2.x; pins the transpose",
            "te.text_projection": "HF-layout text_projection.weight [p,d] (float32) = transpose of the single file's cond_stage_model.model.text_projection",
            "first_eos_position": eos_pos,
            "penultimate24_vs_folder_max_abs_diff": pen_vs_folder,
            "skip3_24_vs_folder_max_abs_diff": skip3_vs_folder,
            "last24_vs_penultimate_rel": last24_vs_pen,
            "eos_pad_vs_pad0_rel": pad_rel,
            "missed_transpose_pooled_rel": pooled_transpose_miss_rel,
            "eager_vs_default_attention_max_abs_diff": eager_vs_default,
        },
        "long_prompt_case": {
            "prompt": LONG_PROMPT,
            "slots": len(long_inj),
            "ids": long_rows,
            "layout": "90 slots (sks -> 2 slots, twice) -> chunk 0 = slots 0..74, chunk 1 = slots 75..89 (15 slots, learned slots at row positions 6,7); "
                      "single-token words, no commas: A1111 and ComfyUI chunk it alike",
            "states": "te.long_last_hidden_state [1,154,32] = the two chunks' last_hidden_state (with te.vectors injected) concatenated along tokens",
        },
        "bang_case": {
            "prompt": BANG_PROMPT,
            "ids": bang_list,
            "ids_quirk_folder_tokenizer": bang_quirk,
            "quirk_vs_correct_states_rel": bang_quirk_rel,
            "states": "te.bang_last_hidden_state: te.bang_input_ids (correct BPE ids, pad 0) through the folder model, no injection",
        },
        "empty_case": {"ids": empty_list, "states": "te.empty_last_hidden_state: '' -> [49406, 49407, 0 x 75]"},
        "vae_case": {"image": "make_tiny_sd.smooth_image's formula at 128x128 (x,y = linspace(0,1,128)), float32 [1,3,128,128]; latents [1,4,16,16]",
                     "logvar_clamp_active": logvar_clamped},
        "unet_case": {
            "timesteps": ids_list(u_t),
            "note": "unet.time_proj = sinusoidal embedding ([cos, sin]); unet.time_embedding = MLP output (dim 128). 32x32 sample as tiny-sd (an 8x8 latent's 1x1 level amplifies f32 rounding)",
            "linear_projection": "proj_in/proj_out are Linear [C,C] applied after flattening to tokens (norm -> reshape -> proj_in -> blocks -> proj_out -> reshape -> + x)",
            "upcast_attention": "diffusers' default AttnProcessor2_0 (SDPA) IGNORES upcast_attention; only the classic AttnProcessor honours it "
                                "(q,k -> f32, scores and softmax in f32, probs cast back). In f32 it changes nothing: classic vs SDPA rel " + f"{classic_vs_sdpa:.2e}",
            "half": "half.{f16,bf16}.unet_pred_{upcast,no_upcast}: the UNet in f16/bf16 (weights and activations; classic AttnProcessor with upcast_attention "
                    "True/False), inputs unet.sample/timesteps/context cast, output stored as f32; half.*.unet_err_* = ||pred - unet.noise_pred|| / ||unet.noise_pred|| (torch CPU)",
            "half_errors": {k: half[k].item() for k in sorted(half) if "_err_" in k},
        },
        "prediction_type_probes": {
            "a1111": "mean(unet(0.5*ones[1,4,8,8], t=999, context=0.5*ones[1,2,32]) - x); A1111 says v-prediction when < -1 (modules/sd_models_config.py)",
            "a1111_value": a1111_probe,
            "a1111_says_v": a1111_probe < -1,
            "comfy": "std(" + comfy_key + ", unbiased=False); ComfyUI says v-prediction when > 0.09 (comfy/supported_models.py SD20.model_type)",
            "comfy_value": comfy_std,
            "comfy_says_v": comfy_std > 0.09,
            "note": "the model is random: the probes are recorded for sdti's rule tests, not as truth (its scheduler says epsilon)",
        },
        "loss_case": {
            "timestep": 500,
            "latents": "vae.latent_mean * 0.18215",
            "noisy": "sqrt(acp[t])*latents + sqrt(1-acp[t])*noise (acp float32, cast to the compute dtype)",
            "context": "te.last_hidden_state (23-layer folder, pad 0, te.vectors injected)",
            "epsilon_target": "noise",
            "v_target": "sqrt(acp[t])*noise - sqrt(1-acp[t])*latents",
            "loss": "F.mse_loss(pred, target, reduction='mean') over 1*4*16*16 = 1024 elements",
            "latent_size_note": "16x16 latents, not tiny-sd's 8x8: at 8x8 the UNet's 1x1 level (GroupNorm over 2 values per group) made torch's own f32 gradient "
                                "6% (eps) / 11% (v) off the f64 one on this model; at 16x16 it agrees to ~2e-6 (grad_f32_vs_f64_rel_err)",
            "grad": "d loss / d te.vectors",
            "f64": "loss*.*_f64: models .double(), inputs = the float32 tensors upcast; the timestep sinusoid and alphas_cumprod stay float32-rounded (diffusers)",
            "grad_f32_vs_f64_rel_err": {"epsilon": rel32, "v_prediction": rel32v},
            "acp_500": float(sched.alphas_cumprod[500]),
        },
        "finite_difference_check": {"step": eps_fd, "dtype": "float64", "report": fd_report},
        "single_file": {
            "path": "tests/fixtures/tiny-sd2.safetensors",
            "dtype": "float16 (every tensor; logit_scale is a 0-d tensor)",
            "prefixes": {"model.diffusion_model.": "unet (LDM keys as tiny-sd; proj_in/proj_out 2-D [C,C])", "first_stage_model.": "vae (as tiny-sd)",
                         "cond_stage_model.model.": "OpenCLIP text tower, 24 resblocks"},
            "validation": sf_report,
            "rules": {
                "text_encoder": [
                    "token_embedding.weight -> embeddings.token_embedding.weight; positional_embedding -> embeddings.position_embedding.weight",
                    "transformer.resblocks.i.ln_1/ln_2 -> encoder.layers.i.layer_norm1/layer_norm2",
                    "transformer.resblocks.i.attn.in_proj_weight [3d,d] rows [0,d) q, [d,2d) k, [2d,3d) v -> self_attn.{q,k,v}_proj.weight; in_proj_bias [3d] likewise",
                    "transformer.resblocks.i.attn.out_proj -> self_attn.out_proj; mlp.c_fc -> mlp.fc1; mlp.c_proj -> mlp.fc2",
                    "ln_final -> final_layer_norm; text_projection [d,p] -> text_projection.weight [p,d] (transpose); logit_scale: ignore",
                    "the diffusers folder has blocks 0..22 only (resblocks.23 dropped)",
                ],
                "unet": "as tiny-sd (tests/fixtures/tiny-sd-expected.json single_file.rules.unet)",
                "vae": "as tiny-sd",
            },
            "key_map_text_encoder": te_map,
            "representative_text_encoder": te_rep(lambda k: k in ("token_embedding.weight", "positional_embedding", "transformer.resblocks.0.attn.in_proj_weight",
                                                                 "transformer.resblocks.23.attn.in_proj_bias", "transformer.resblocks.23.mlp.c_fc.weight",
                                                                 "ln_final.weight", "text_projection", "logit_scale")),
            "key_map_ldm_to_diffusers": key_map,
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
