#!/usr/bin/env python3
"""Reference fixtures for sdti's learned-embedding readers/writers.

Part 1 (`gen`): writes every fixture under tests/fixtures/embeddings/ with torch,
safetensors and PIL exactly the way each home tool saves it, plus
`expected.json` describing what the Rust readers must find.

Part 2 (`verify`): loads the files sdti wrote into
tests/fixtures/embeddings/written_by_sdti/ (see the env-gated Rust test
`write_reference_outputs`) the way the home tools do -- torch.load(weights_only=True),
A1111's zip-member + restricted-unpickler allow-list, diffusers' textual-inversion
state-dict helpers, safetensors.torch.load_file, PIL text chunks, and for SDXL words
diffusers' own `load_textual_inversion` into two tiny text encoders of SDXL's widths
(`sd["clip_l"]`/`sd["clip_g"]`, and the two-file pair by folder + weight_name) -- and
records the outcome in python_load_results.json.

Run:  $REFENV/bin/python tests/reference/make_embedding_fixtures.py [gen|verify|all]
"""
import base64
import collections
import io
import json
import os
import pickle
import re
import sys
import zipfile
import zlib

import numpy as np
import torch
from PIL import Image, ImageDraw, PngImagePlugin
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.normpath(os.path.join(HERE, "..", "fixtures", "embeddings"))
WRITTEN = os.path.join(FIX, "written_by_sdti")


def vec(n, dim, seed, dtype=torch.float32, dyadic=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, dim, generator=g) * 0.02
    if dyadic:
        # Short decimal expansions keep JSON/PNG fixtures small while staying exact in f32.
        t = torch.round(t * 1024) / 1024
    return t.to(dtype)


def fnv1a64(t):
    """FNV-1a 64 over the little-endian f32 bytes: lets expected.json pin every value exactly
    without storing them (fixtures must stay small). sdti's tests compute the same hash."""
    h = 0xCBF29CE484222325
    for b in t.detach().float().contiguous().numpy().astype("<f4").tobytes():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def head(t, n=4):
    return t.detach().float().reshape(-1)[:n].tolist()


# ---------------------------------------------------------------- A1111 image_embedding (ported)
class EmbeddingEncoder(json.JSONEncoder):
    # Same as A1111's: tensors become {"TORCHTENSOR": nested lists}.
    def default(self, obj):
        if isinstance(obj, torch.Tensor):
            return {"TORCHTENSOR": obj.cpu().detach().numpy().tolist()}
        return json.JSONEncoder.default(self, obj)


class EmbeddingDecoder(json.JSONDecoder):
    def __init__(self, *args, **kwargs):
        json.JSONDecoder.__init__(self, *args, object_hook=self.object_hook, **kwargs)

    def object_hook(self, d):
        if "TORCHTENSOR" in d:
            return torch.from_numpy(np.array(d["TORCHTENSOR"]))
        return d


def embedding_to_b64(data):
    return base64.b64encode(json.dumps(data, cls=EmbeddingEncoder).encode())


def embedding_from_b64(data):
    return json.loads(base64.b64decode(data), cls=EmbeddingDecoder)


def lcg(m=2**32, a=1664525, c=1013904223, seed=0):
    while True:
        seed = (a * seed + c) % m
        yield seed % 255


def xor_block(block):
    g = lcg()
    rnd = np.array([next(g) for _ in range(np.prod(block.shape))]).astype(np.uint8).reshape(block.shape)
    return np.bitwise_xor(block.astype(np.uint8), rnd & 0x0F)


def style_block(block, sequence):
    im = Image.new("RGB", (block.shape[1], block.shape[0]))
    draw = ImageDraw.Draw(im)
    i = 0
    for x in range(-6, im.size[0], 8):
        for yi, y in enumerate(range(-6, im.size[1], 8)):
            offset = 4 if yi % 2 == 0 else 0
            shade = sequence[i % len(sequence)]
            i += 1
            draw.ellipse((x + offset, y, x + 6 + offset, y + 6), fill=(shade, shade, shade))
    fg = np.array(im).astype(np.uint8) & 0xF0
    return block ^ fg


def insert_image_data_embed(image, data):
    d = 3
    comp = zlib.compress(json.dumps(data, cls=EmbeddingEncoder).encode(), level=9)
    arr = np.frombuffer(comp, np.uint8).copy()
    hi, lo = arr >> 4, arr & 0x0F
    h = image.size[1]
    n = lo.shape[0] + (h - (lo.shape[0] % h))
    n = n + ((h * d) - (n % (h * d)))
    lo = np.resize(lo, n).reshape((h, -1, d))
    hi = np.resize(hi, n).reshape((h, -1, d))
    edge = list(data["string_to_param"].values())[0].cpu().detach().numpy().tolist()[0][:1024]
    edge = (np.abs(edge) / np.max(np.abs(edge)) * 255).astype(np.uint8)
    lo = xor_block(style_block(lo, sequence=edge))
    hi = xor_block(style_block(hi, sequence=edge[::-1]))
    im_lo, im_hi = Image.fromarray(lo, mode="RGB"), Image.fromarray(hi, mode="RGB")
    bg = Image.new("RGB", (image.size[0] + im_lo.size[0] + im_hi.size[0] + 2, image.size[1]), (0, 0, 0))
    bg.paste(im_lo, (0, 0))
    bg.paste(image, (im_lo.size[0] + 1, 0))
    bg.paste(im_hi, (im_lo.size[0] + 1 + image.size[0] + 1, 0))
    return bg


def crop_black(img, tol=0):
    mask = (img > tol).all(2)
    m0, m1 = mask.any(0), mask.any(1)
    cs, ce = m0.argmax(), mask.shape[1] - m0[::-1].argmax()
    rs, re_ = m1.argmax(), mask.shape[0] - m1[::-1].argmax()
    return img[rs:re_, cs:ce]


def extract_image_data_embed(image):
    d = 3
    out = crop_black(np.array(image.convert("RGB").getdata()).reshape(image.size[1], image.size[0], d).astype(np.uint8)) & 0x0F
    black = np.where(np.sum(out, axis=(0, 2)) == 0)
    if black[0].shape[0] < 2:
        return None
    lower = xor_block(out[:, : black[0].min(), :].astype(np.uint8))
    upper = xor_block(out[:, black[0].max() + 1 :, :].astype(np.uint8))
    blob = ((upper << 4) | lower).flatten().tobytes()
    return json.loads(zlib.decompress(blob), cls=EmbeddingDecoder)


def preview(w=48, h=48):
    # A non-black preview so A1111's crop/separator logic works (as with a real render).
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = 40 + (np.arange(w) * 4)[None, :]
    a[..., 1] = 40 + (np.arange(h) * 4)[:, None]
    a[..., 2] = 128
    return Image.fromarray(a, mode="RGB")


# ---------------------------------------------------------------- A1111 safe.py (ported allow-list)
ALLOWED_ZIP = re.compile(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$")


class RestrictedUnpickler(pickle.Unpickler):
    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"
        return torch.storage.TypedStorage(_internal=True)

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ["_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_device_tensor_from_numpy"]:
            return getattr(torch._utils, name)
        if module == "torch" and name in ["FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage", "ByteStorage", "float32", "BFloat16Storage"]:
            return getattr(torch, name)
        if module == "torch.nn.modules.container" and name in ["ParameterDict"]:
            return getattr(torch.nn.modules.container, name)
        if module == "__builtin__" and name == "set":
            return set
        raise Exception(f"global '{module}/{name}' is forbidden")


def a1111_check_pt(path):
    """A1111 modules/safe.py check_pt: member names + restricted unpickling."""
    with zipfile.ZipFile(path) as z:
        for n in z.namelist():
            if not ALLOWED_ZIP.match(n):
                raise Exception(f"bad file inside {os.path.basename(path)}: {n}")
        pk = [n for n in z.namelist() if re.match(r"^([^/]+)/data\.pkl$", n)]
        if len(pk) != 1:
            raise Exception("need exactly one data.pkl")
        with z.open(pk[0]) as f:
            RestrictedUnpickler(f).load()
        return [(i.filename, i.compress_type) for i in z.infolist()]


def a1111_create_embedding_from_data(data):
    """A1111 textual_inversion.create_embedding_from_data: which branch, and the vectors."""
    if "string_to_param" in data:
        pd = data["string_to_param"]
        pd = getattr(pd, "_parameters", pd)
        assert len(pd) == 1, "embedding file has multiple terms in it"
        return "string_to_param", {"": next(iter(pd.values())).detach().float()}
    if isinstance(data, dict) and "clip_g" in data and "clip_l" in data:
        return "sdxl", {k: v.detach().float() for k, v in data.items()}
    if isinstance(data, dict) and isinstance(next(iter(data.values())), torch.Tensor):
        assert len(data.keys()) == 1, "embedding file has multiple terms in it"
        emb = next(iter(data.values()))
        if len(emb.shape) == 1:
            emb = emb.unsqueeze(0)
        return "diffuser concept", {"": emb.detach().float()}
    raise Exception("Couldn't identify as neither textual inversion embedding nor diffuser concept.")


# ---------------------------------------------------------------- part 1
def gen():
    os.makedirs(FIX, exist_ok=True)
    expected = {}

    def a1111_dict(t, name, step=500):
        return {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": t},
            "name": name,
            "step": step,
            "sd_checkpoint": "4c86efd062",
            "sd_checkpoint_name": "v1-5-pruned-emaonly",
        }

    def rec(fname, fmt, parts, name=None, step=None, ckpt=None, ckpt_name=None, error=None):
        expected[fname] = {
            "format": fmt,
            "name": name,
            "step": step,
            "sd_checkpoint": ckpt,
            "sd_checkpoint_name": ckpt_name,
            "parts": [{"encoder": e, "shape": list(t.shape), "fnv1a64": fnv1a64(t), "head": head(t)} for e, t in parts],
            "error": error,
        }

    # A1111 .pt as Embedding.save writes it (torch.save of a plain dict).
    for fname, t in [
        ("a1111_sd1.pt", vec(2, 768, 1)),
        ("a1111_sd1_fp16.pt", vec(1, 768, 2, torch.float16)),
        ("a1111_sd1_bf16.pt", vec(1, 768, 3, torch.bfloat16)),
        ("a1111_sd2.pt", vec(1, 1024, 4)),
    ]:
        torch.save(a1111_dict(t, fname[:-3]), os.path.join(FIX, fname))
        rec(fname, "a1111-pt", [("single", t)], fname[:-3], 500, "4c86efd062", "v1-5-pruned-emaonly")

    # A1111 before metadata existed: step/checkpoint None.
    t = vec(1, 768, 5)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": t}, "name": "old", "step": None,
                "sd_checkpoint": None, "sd_checkpoint_name": None}, os.path.join(FIX, "a1111_nometa.pt"))
    rec("a1111_nometa.pt", "a1111-pt", [("single", t)], "old")

    # A tensor that is a view into a larger storage (offset + stride): torch keeps the whole storage.
    base = vec(3, 768, 6)
    view = base[1:3]
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": view}, "name": "view", "step": 1,
                "sd_checkpoint": None, "sd_checkpoint_name": None}, os.path.join(FIX, "a1111_view.pt"))
    rec("a1111_view.pt", "a1111-pt", [("single", view)], "view", 1)

    # Multiple terms in one file (A1111 asserts; sdti errors naming them).
    torch.save({"string_to_token": {"*": 265, "#": 266}, "string_to_param": {"*": vec(1, 768, 7), "#": vec(1, 768, 8)},
                "name": "multi", "step": 1}, os.path.join(FIX, "multi_term.pt"))
    rec("multi_term.pt", "a1111-pt", [], error="multiple terms")

    # rinongal/textual_inversion EmbeddingManager.save: 0-d token tensor + nn.ParameterDict.
    t = vec(1, 768, 9)
    pdict = torch.nn.ParameterDict()
    pdict["*"] = torch.nn.Parameter(t.clone(), requires_grad=True)
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": pdict}, os.path.join(FIX, "rinongal.pt"))
    rec("rinongal.pt", "rinongal-pt", [("single", t)])

    # kohya sd-scripts train_textual_inversion.save_weights: {"emb_params": t} via torch.save / save_file.
    t = vec(2, 768, 10)
    torch.save({"emb_params": t}, os.path.join(FIX, "kohya.pt"))
    rec("kohya.pt", "kohya-pt", [("single", t)])
    t = vec(2, 768, 11, torch.float16)
    save_file({"emb_params": t}, os.path.join(FIX, "kohya.safetensors"), {"ss_network_module": "textual_inversion"})
    rec("kohya.safetensors", "kohya-safetensors", [("single", t)])

    # A1111/ComfyUI single-key safetensors.
    t = vec(2, 768, 12)
    save_file({"emb_params": t}, os.path.join(FIX, "a1111.safetensors"))
    rec("a1111.safetensors", "safetensors", [("single", t)])

    # diffusers textual_inversion.py save_progress: {placeholder: weight[min:max+1]}.
    t = vec(1, 768, 13)
    save_file({"<cat-toy>": t}, os.path.join(FIX, "learned_embeds.safetensors"), metadata={"format": "pt"})
    rec("learned_embeds.safetensors", "diffusers", [("single", t)], "<cat-toy>")
    t = vec(2, 768, 14)
    torch.save({"<cat-toy>": t}, os.path.join(FIX, "learned_embeds.bin"))
    rec("learned_embeds.bin", "diffusers-bin", [("single", t)], "<cat-toy>")
    # sd-concepts-library era: a 1-D vector.
    t = vec(1, 768, 15)[0]
    torch.save({"<old-concept>": t}, os.path.join(FIX, "concept_1d.bin"))
    rec("concept_1d.bin", "diffusers-bin", [("single", t.unsqueeze(0))], "<old-concept>")

    # OneTrainer StableDiffusionEmbeddingSaver ("emp_params") and SDXL saver (clip_l/clip_g).
    t = vec(2, 768, 16, torch.float16)
    save_file({"emp_params": t}, os.path.join(FIX, "onetrainer.safetensors"))
    rec("onetrainer.safetensors", "onetrainer", [("single", t)])

    # SDXL (A1111/ComfyUI/kohya sdxl_train_textual_inversion): clip_l + clip_g.
    l, g = vec(2, 768, 17, torch.float16), vec(2, 1280, 18, torch.float16)
    save_file({"clip_g": g, "clip_l": l}, os.path.join(FIX, "sdxl.safetensors"))
    rec("sdxl.safetensors", "sdxl", [("clip-l", l), ("clip-g", g)])

    # kohya sdxl_train_textual_inversion.save_weights to .pt: torch.save({"clip_l", "clip_g"}).
    l, g = vec(1, 768, 30), vec(1, 1280, 31)
    torch.save({"clip_l": l, "clip_g": g}, os.path.join(FIX, "kohya_sdxl.pt"))
    rec("kohya_sdxl.pt", "kohya-pt", [("clip-l", l), ("clip-g", g)])

    # OneTrainer StableDiffusionXLEmbeddingSaver with output embeddings: clip_l/clip_g plus
    # clip_l_out/clip_g_out, which are not input vectors (sdti ignores them).
    l, g = vec(1, 768, 32, torch.bfloat16), vec(1, 1280, 33, torch.bfloat16)
    save_file({"clip_l": l, "clip_g": g, "clip_l_out": vec(1, 768, 34, torch.bfloat16),
               "clip_g_out": vec(1, 1280, 35, torch.bfloat16)}, os.path.join(FIX, "onetrainer_sdxl.safetensors"))
    rec("onetrainer_sdxl.safetensors", "sdxl", [("clip-l", l), ("clip-g", g)])

    # diffusers textual_inversion_sdxl.py save_progress, twice, into its output folder:
    # learned_embeds.safetensors {token: [n,768]} + learned_embeds_2.safetensors {token: [n,1280]}.
    pair_dir = os.path.join(FIX, "diffusers_sdxl")
    os.makedirs(pair_dir, exist_ok=True)
    l, g = vec(2, 768, 36, torch.float16), vec(2, 1280, 37, torch.float16)
    save_file({"<cat-toy>": l}, os.path.join(pair_dir, "learned_embeds.safetensors"), metadata={"format": "pt"})
    save_file({"<cat-toy>": g}, os.path.join(pair_dir, "learned_embeds_2.safetensors"), metadata={"format": "pt"})
    rec("diffusers_sdxl", "diffusers-sdxl", [("clip-l", l), ("clip-g", g)], "<cat-toy>")
    rec("diffusers_sdxl/learned_embeds.safetensors+diffusers_sdxl/learned_embeds_2.safetensors",
        "diffusers-sdxl", [("clip-l", l), ("clip-g", g)], "<cat-toy>")

    # Two-part files whose clip_l and clip_g disagree on the number of vectors (diffusers loads
    # such a word silently; sdti refuses it naming both counts).
    save_file({"clip_l": vec(1, 768, 38, torch.float16), "clip_g": vec(2, 1280, 39, torch.float16)},
              os.path.join(FIX, "sdxl_rows_differ.safetensors"))
    rec("sdxl_rows_differ.safetensors", "sdxl", [], error="clip_l has 1 vector but clip_g has 2")
    torch.save({"clip_l": vec(3, 768, 40, torch.float16), "clip_g": vec(1, 1280, 41, torch.float16)},
               os.path.join(FIX, "kohya_sdxl_rows_differ.pt"))
    rec("kohya_sdxl_rows_differ.pt", "kohya-pt", [], error="clip_l has 3 vectors but clip_g has 1")

    # A1111 PNG with sd-ti-embedding text chunk (what train_embedding saves, via embedding_to_b64).
    t = vec(1, 768, 19, dyadic=True)
    data = a1111_dict(t, "pngembed", 250)
    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", embedding_to_b64(data))
    preview().save(os.path.join(FIX, "a1111_text.png"), "PNG", pnginfo=info)
    rec("a1111_text.png", "png", [("single", t)], "pngembed", 250, "4c86efd062", "v1-5-pruned-emaonly")

    # A1111 PNG with the data hidden in the pixel borders only (insert_image_data_embed).
    t = vec(1, 768, 20, dyadic=True)
    data = a1111_dict(t, "pixembed", 300)
    img = insert_image_data_embed(preview(), data)
    img.save(os.path.join(FIX, "a1111_pixels.png"), "PNG")
    back = extract_image_data_embed(Image.open(os.path.join(FIX, "a1111_pixels.png")))
    assert torch.equal(back["string_to_param"]["*"].float(), t), "pixel embed round trip failed in python"
    rec("a1111_pixels.png", "png-pixels", [("single", t)], "pixembed", 300, "4c86efd062", "v1-5-pruned-emaonly")

    # Check fixtures.
    t = vec(1, 768, 21)
    t[0, 5] = float("nan")
    save_file({"emb_params": t}, os.path.join(FIX, "nan.safetensors"))
    rec("nan.safetensors", "safetensors", [], error="non-finite")
    save_file({"emb_params": torch.zeros(0, 768)}, os.path.join(FIX, "empty.safetensors"))
    rec("empty.safetensors", "safetensors", [], error="no vectors")
    save_file({"emb_params": vec(76, 8, 22, torch.float16)}, os.path.join(FIX, "too_many.safetensors"))
    rec("too_many.safetensors", "safetensors", [], error="too many vectors")

    # Malicious pickle: a torch-shaped zip whose data.pkl calls os.system. Built by hand and NEVER loaded.
    evil = b"\x80\x02cos\nsystem\nq\x00X\x0b\x00\x00\x00echo pwned\nq\x01\x85q\x02Rq\x03."
    with zipfile.ZipFile(os.path.join(FIX, "malicious.pt"), "w", zipfile.ZIP_STORED) as z:
        z.writestr("malicious/data.pkl", evil)
        z.writestr("malicious/version", "3\n")
    rec("malicious.pt", "a1111-pt", [], error="global 'os.system' is not allowed")

    # Record what A1111's own restricted loader thinks of each torch-written .pt (new torch adds
    # .format_version/.storage_alignment/byteorder members, which A1111's name check refuses).
    a1111_ok = {}
    for f in sorted(os.listdir(FIX)):
        if f.endswith(".pt") and f != "malicious.pt":
            try:
                a1111_check_pt(os.path.join(FIX, f))
                a1111_ok[f] = "ok"
            except Exception as e:  # noqa: BLE001
                a1111_ok[f] = f"refused: {e}"
    out = {
        "torch": torch.__version__,
        "fixtures": expected,
        "a1111_safe_check_of_torch_written": a1111_ok,
    }
    with open(os.path.join(FIX, "expected.json"), "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
    print(f"wrote {len(expected)} fixtures to {FIX}")


# ---------------------------------------------------------------- part 2
class DummyTokenizer:
    # diffusers' helpers only ask whether the token is already in the vocab.
    added_tokens_encoder = {}

    def get_vocab(self):
        return {}


def load_source(fname):
    """The fixture sdti read before writing, loaded independently with torch/PIL/safetensors."""
    path = os.path.join(FIX, fname)
    if fname.endswith(".png"):
        data = embedding_from_b64(Image.open(path).text["sd-ti-embedding"])
    elif fname.endswith(".safetensors"):
        data = load_file(path)
    else:
        data = torch.load(path, weights_only=True)
    branch, vecs = a1111_create_embedding_from_data(data)
    if branch == "sdxl":
        return {"clip-l": vecs["clip_l"], "clip-g": vecs["clip_g"]}
    return {"single": vecs[""]}


TINY_TOKENIZER = os.path.normpath(os.path.join(HERE, "..", "fixtures", "tiny-sd", "tokenizer"))


class TinySdxlTextEncoders:
    """Just enough of an SDXL pipeline for diffusers' own `load_textual_inversion`: CLIP's
    tokenizer twice and two one-layer text encoders of SDXL's widths (768, and 1280 with a
    projection, as text_encoder_2 is), random weights."""

    def __init__(self):
        from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        torch.manual_seed(0)

        def config(width):
            return CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, max_position_embeddings=77, projection_dim=width,
                                  hidden_act="gelu")

        class Host(TextualInversionLoaderMixin):
            hf_device_map = None

            def __init__(self, **components):
                self.components = components
                for k, v in components.items():
                    setattr(self, k, v)

        self.host = Host(tokenizer=CLIPTokenizer.from_pretrained(TINY_TOKENIZER),
                         tokenizer_2=CLIPTokenizer.from_pretrained(TINY_TOKENIZER),
                         text_encoder=CLIPTextModel(config(768)).eval(),
                         text_encoder_2=CLIPTextModelWithProjection(config(1280)).eval())
        self.count = 0

    def encoders(self):
        h = self.host
        return {"clip-l": (h.text_encoder, h.tokenizer), "clip-g": (h.text_encoder_2, h.tokenizer_2)}

    def fresh_token(self):
        self.count += 1
        return f"<sdti-word-{self.count}>"

    def load(self, source, enc, token=None, **kwargs):
        """diffusers' documented SDXL call for one encoder; returns the rows the word's tokens
        got in that encoder's table, in prompt order, after a forward pass that uses them."""
        te, tok = self.encoders()[enc]
        self.host.load_textual_inversion(source, token=token, text_encoder=te, tokenizer=tok, **kwargs)
        # A file's own token (token=None) is looked up by the caller, who knows it.
        return None if token is None else self.rows(enc, token)

    def rows(self, enc, token):
        te, tok = self.encoders()[enc]
        prompt = self.host.maybe_convert_prompt(f"a photo of {token}", tok)
        ids = tok(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            out = te(ids)[0]
        assert torch.isfinite(out).all(), "non-finite text encoder output"
        added = [i for i in ids[0].tolist() if i >= 49408]
        assert added, f"{token} tokenised to no added token: {prompt}"
        return te.get_input_embeddings().weight[added].detach()


def verify():
    import diffusers
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin, load_textual_inversion_state_dicts

    sdxl = TinySdxlTextEncoders()

    with open(os.path.join(WRITTEN, "manifest.json")) as f:
        manifest = json.load(f)
    results = {"torch": torch.__version__, "diffusers": diffusers.__version__, "files": {}}
    for fname, m in sorted(manifest.items()):
        path = os.path.join(WRITTEN, fname)
        r = {"format": m["format"], "checks": {}, "ok": True}
        want = load_source(m["source"])
        if m["precision"] == "f16":
            want = {k: v.half().float() for k, v in want.items()}

        def check(label, fn):
            try:
                v = fn()
                r["checks"][label] = "ok" if v is None else v
            except Exception as e:  # noqa: BLE001
                r["checks"][label] = f"FAIL: {type(e).__name__}: {e}"
                r["ok"] = False

        def load_sdxl_dict(sd):
            # diffusers' documented SDXL recipe (load_textual_inversion docstring), for real:
            # load_textual_inversion(sd["clip_l"], text_encoder, tokenizer) and the same with
            # sd["clip_g"] into text_encoder_2/tokenizer_2; the rows must be the file's, bit for bit.
            token = sdxl.fresh_token()
            for key, enc in (("clip_l", "clip-l"), ("clip_g", "clip-g")):
                same(sdxl.load(sd[key], enc, token=token), enc)
            return {"token": token}

        def same(got, key="single"):
            w = want[key]
            assert tuple(got.shape) == tuple(w.shape), f"shape {tuple(got.shape)} != {tuple(w.shape)}"
            assert torch.equal(got.detach().float(), w), "values differ"

        def dtype_of(t):
            want_dt = torch.float16 if m["precision"] == "f16" else torch.float32
            assert t.dtype == want_dt, f"dtype {t.dtype}, wanted {want_dt}"

        fmt = m["format"]
        if fmt in ("a1111-pt", "kohya-pt", "diffusers-bin"):
            def members():
                with zipfile.ZipFile(path) as z:
                    names = z.namelist()
                    assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist()), "compressed member"
                    assert all(z.testzip() is None for _ in [0]), "bad crc"
                return names
            check("zip_members", members)
            check("a1111_safe_check_pt", lambda: a1111_check_pt(path) and None)
            d = {}

            def tl():
                d["data"] = torch.load(path, weights_only=True)
            check("torch_load_weights_only", tl)
            if "data" in d:
                data = d["data"]
                if fmt == "a1111-pt":
                    def meta():
                        assert set(data.keys()) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}, data.keys()
                        assert data["string_to_token"] == {"*": 265}
                        assert data["name"] == m["name"], (data["name"], m["name"])
                        assert data["step"] == m["step"]
                        assert data["sd_checkpoint"] == m["sd_checkpoint"]
                        assert data["sd_checkpoint_name"] == m["sd_checkpoint_name"]
                        dtype_of(data["string_to_param"]["*"])
                        same(data["string_to_param"]["*"])
                    check("a1111_dict_layout", meta)
                if fmt == "kohya-pt" and "clip_l" in data:
                    def kohya_sdxl():
                        assert set(data.keys()) == {"clip_l", "clip_g"}, data.keys()
                        dtype_of(data["clip_l"])
                        dtype_of(data["clip_g"])
                        same(data["clip_l"], "clip-l")
                        same(data["clip_g"], "clip-g")
                    check("kohya_sdxl_layout", kohya_sdxl)
                    check("diffusers_load_textual_inversion_sdxl", lambda: load_sdxl_dict(data))
                elif fmt == "kohya-pt":
                    check("kohya_layout", lambda: (dtype_of(data["emb_params"]), same(data["emb_params"])) and None)

                def a1111_branch():
                    branch, vecs = a1111_create_embedding_from_data(data)
                    if branch == "sdxl":
                        same(vecs["clip_l"], "clip-l")
                        same(vecs["clip_g"], "clip-g")
                    else:
                        same(vecs[""])
                    return branch
                check("a1111_create_embedding_from_data", a1111_branch)
        if fmt in ("diffusers", "diffusers-bin", "safetensors", "kohya-safetensors", "sdxl", "onetrainer"):
            if fmt != "diffusers-bin":
                def st():
                    sd = load_file(path)
                    if fmt in ("sdxl", "onetrainer"):
                        assert set(sd) == {"clip_l", "clip_g"}, set(sd)
                        dtype_of(sd["clip_l"])
                        same(sd["clip_l"], "clip-l")
                        same(sd["clip_g"], "clip-g")
                    else:
                        assert len(sd) == 1, set(sd)
                        t = next(iter(sd.values()))
                        dtype_of(t)
                        same(t)
                check("safetensors_load_file", st)

                def a1111_branch():
                    branch, vecs = a1111_create_embedding_from_data(load_file(path))
                    if fmt in ("sdxl", "onetrainer"):
                        same(vecs["clip_l"], "clip-l")
                        same(vecs["clip_g"], "clip-g")
                    else:
                        same(vecs[""])
                    return branch
                check("a1111_create_embedding_from_data", a1111_branch)
            if fmt not in ("sdxl", "onetrainer"):
                def dif():
                    sds = load_textual_inversion_state_dicts([WRITTEN], weight_name=fname)
                    toks, embs = TextualInversionLoaderMixin._retrieve_tokens_and_embeddings([None], sds, DummyTokenizer())
                    same(embs[0])
                    toks2, embs2 = TextualInversionLoaderMixin._extend_tokens_and_embeddings(toks, embs, DummyTokenizer())
                    return {"token": toks[0], "expanded_tokens": toks2}
                check("diffusers_load_textual_inversion_helpers", dif)
            else:
                def dif_xl():
                    # diffusers' documented SDXL recipe: load_file + one load_textual_inversion per encoder.
                    sd = load_file(path)
                    for key, enc in (("clip_l", "clip-l"), ("clip_g", "clip-g")):
                        _, embs = TextualInversionLoaderMixin._retrieve_tokens_and_embeddings(["<x>"], [sd[key]], DummyTokenizer())
                        same(embs[0], enc)
                check("diffusers_sdxl_recipe", dif_xl)
                check("diffusers_load_textual_inversion_sdxl", lambda: load_sdxl_dict(load_file(path)))
        if fmt == "diffusers-sdxl":
            second = m["second"]

            def pair_files():
                # Each file as diffusers' textual_inversion_sdxl.py save_progress writes it.
                from safetensors import safe_open
                for f, enc in ((fname, "clip-l"), (second, "clip-g")):
                    with safe_open(os.path.join(WRITTEN, f), "pt") as h:
                        assert h.metadata() == {"format": "pt"}, h.metadata()
                        assert list(h.keys()) == [m["name"]], list(h.keys())
                        t = h.get_tensor(m["name"])
                    dtype_of(t)
                    same(t, enc)
            check("diffusers_sdxl_pair_layout", pair_files)

            def pair_load():
                # What a diffusers user runs on textual_inversion_sdxl.py's output folder.
                sdxl.load(WRITTEN, "clip-l", weight_name=fname)
                sdxl.load(WRITTEN, "clip-g", weight_name=second)
                for enc in ("clip-l", "clip-g"):
                    same(sdxl.rows(enc, m["name"]), enc)
                return {"token": m["name"]}
            check("diffusers_load_textual_inversion_pair", pair_load)
        if fmt == "png":
            def png():
                im = Image.open(path)
                im.load()
                data = embedding_from_b64(im.text["sd-ti-embedding"])
                assert data.get("name") == m["name"]
                assert data.get("step") == m["step"]
                assert data.get("sd_checkpoint") == m["sd_checkpoint"]
                _, vecs = a1111_create_embedding_from_data(data)
                same(vecs[""])
                return {"size": list(im.size), "mode": im.mode}
            check("a1111_png_text_chunk", png)

            def json_identity():
                # sdti's JSON must be byte-identical to what A1111's embedding_to_b64 would write.
                text = base64.b64decode(Image.open(path).text["sd-ti-embedding"]).decode()
                again = json.dumps(json.loads(text, cls=EmbeddingDecoder), cls=EmbeddingEncoder)
                assert text == again, "JSON differs from python json.dumps"
            check("json_byte_identical_to_a1111_encoder", json_identity)
        results["files"][fname] = r

    # What diffusers itself does with a two-part word whose encoders disagree on the number of
    # vectors (sdti refuses it): it loads both halves without a word.
    try:
        token = sdxl.fresh_token()
        sdxl.load(vec(1, 768, 50), "clip-l", token=token)
        sdxl.load(vec(2, 1280, 51), "clip-g", token=token)
        results["diffusers_loads_rows_differ"] = "loaded silently: clip_l 1 vector, clip_g 2"
    except Exception as e:  # noqa: BLE001
        results["diffusers_loads_rows_differ"] = f"refused: {type(e).__name__}: {e}"

    # Negative control: the comparison really detects a one-ulp change.
    try:
        t = load_source("a1111_sd1.pt")["single"].clone()
        t2 = t.clone()
        t2[1, 7] = torch.nextafter(t2[1, 7], torch.tensor(1.0))
        assert not torch.equal(t, t2)
        results["negative_control"] = "ok: a one-ulp change is detected"
    except Exception as e:  # noqa: BLE001
        results["negative_control"] = f"FAIL: {e}"
    with open(os.path.join(FIX, "python_load_results.json"), "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    bad = [k for k, v in results["files"].items() if not v["ok"]]
    print(f"verified {len(results['files'])} sdti-written files; failures: {bad}")
    return not bad


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    if what in ("gen", "all"):
        gen()
    if what in ("verify", "all"):
        sys.exit(0 if verify() else 1)
