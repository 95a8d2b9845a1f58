#!/usr/bin/env python3
"""Prompt-weight reference fixtures for sdti, from A1111's and ComfyUI's own code.

Run from the repository root, with checkouts of both tools (their code is read from the
files, never copied here):

    $REFENV/bin/python tests/reference/make_prompt_weight_fixtures.py \
        --a1111 PATH/stable-diffusion-webui --comfyui PATH/ComfyUI

Writes (see tests/reference/README.md, section "Prompt weights"):

  tests/fixtures/prompt-weights.json         parses and chunk layouts, per host
  tests/fixtures/prompt-weights.safetensors  weighted context tensors (f32) and the learned vectors

What runs is each host's code, taken out of its source file with `ast` (their modules
import half of the application, so they are not imported whole):

* A1111: `modules/prompt_parser.py` (`re_attention`, `re_break`, `parse_prompt_attention`),
  `modules/sd_hijack_clip.py` (`PromptChunk`, `PromptChunkFix`, and the methods
  `tokenize_line` and `process_tokens` of `FrozenCLIPEmbedderWithCustomWordsBase`),
  `modules/sd_emphasis.py` (whole; its "Original" emphasis is the default) and
  `modules/textual_inversion/textual_inversion.py` (`EmbeddingDatabase.register_embedding`,
  `find_embedding_at_position`: how a learned word is found among a piece's tokens).
  Settings as A1111's defaults: emphasis "Original", comma_padding_backtrack 20.
* ComfyUI: `comfy/sd1_clip.py` (`escape_important`, `unescape_important`,
  `parse_parentheses`, `token_weights`, `gen_empty_tokens`, `ClipTokenWeightEncoder`,
  `SDTokenizer`). Its `load_embed` (reading an embedding file) is replaced by a lookup of
  the vectors below.

What stands in for the hosts' models is the tiny fixtures' text encoders run with
transformers (tests/fixtures/tiny-sd, tiny-sdxl), learned vectors injected as extra rows of
the token table, conditioned as each host does for the family: SD 1.x the last layer's
final-norm output; SDXL `hidden_states[-2]` of CLIP-L and of bigG without the final norm
(bigG padded with 0 after the first end token), the pooled vector `text_projection` of the
final-normed last layer at the first end token. The tokenizer is transformers'
CLIPTokenizer on tests/fixtures/tiny-sd/tokenizer (A1111 and ComfyUI both use it for CLIP-L;
bigG's open_clip tokenizer gives the same ids).
"""

import argparse
import ast
import copy
import json
import logging
import os
import re
import subprocess
import sys
import types
from collections import namedtuple
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import transformers  # noqa: E402
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
transformers.logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
OUT_JSON = FIX / "prompt-weights.json"
OUT_TENSORS = FIX / "prompt-weights.safetensors"

WORD = "my-cat"
N_VECTORS = 3
BOS, EOS = 49406, 49407


# ------------------------------------------------------------------------------------
# Taking the hosts' functions out of their files
# ------------------------------------------------------------------------------------
def read_tree(path):
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def top_level(tree, names):
    """The top-level defs, classes and assignments of `names`, in file order."""
    found, nodes = set(), []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names:
            nodes.append(node)
            found.add(node.name)
        elif isinstance(node, ast.Assign):
            targets = {t.id for t in node.targets if isinstance(t, ast.Name)}
            if targets & names:
                nodes.append(node)
                found |= targets & names
    missing = names - found
    if missing:
        raise SystemExit(f"not found at the top level: {sorted(missing)}")
    return nodes


def methods(tree, class_name, names):
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            got = [n for n in node.body if isinstance(n, ast.FunctionDef) and n.name in names]
            if {n.name for n in got} != set(names):
                raise SystemExit(f"{class_name}: methods {names} not all found")
            return got
    raise SystemExit(f"class {class_name} not found")


def run_nodes(nodes, namespace, filename):
    module = ast.Module(body=list(nodes), type_ignores=[])
    exec(compile(module, filename, "exec"), namespace)  # the host's own code
    return namespace


def commit_of(path, given):
    if given:
        return given
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (pass --a1111-commit / --comfyui-commit)"


def load_a1111(root):
    m = root / "modules"
    pp_file = m / "prompt_parser.py"
    pp = run_nodes(top_level(read_tree(pp_file), {"re_attention", "re_break", "parse_prompt_attention"}),
                   {"re": re}, str(pp_file))

    emph_file = m / "sd_emphasis.py"
    emph = {"__name__": "sd_emphasis"}
    exec(compile(emph_file.read_text(encoding="utf-8"), str(emph_file), "exec"), emph)

    hc_file = m / "sd_hijack_clip.py"
    hc_tree = read_tree(hc_file)
    opts = types.SimpleNamespace(emphasis="Original", comma_padding_backtrack=20)
    hc_ns = {
        "torch": torch,
        "namedtuple": namedtuple,
        "opts": opts,
        "prompt_parser": types.SimpleNamespace(parse_prompt_attention=pp["parse_prompt_attention"]),
        "sd_emphasis": types.SimpleNamespace(**{k: v for k, v in emph.items() if not k.startswith("__")}),
        "devices": types.SimpleNamespace(device=torch.device("cpu")),
    }
    run_nodes(top_level(hc_tree, {"PromptChunk", "PromptChunkFix"}), hc_ns, str(hc_file))
    base_methods = methods(hc_tree, "FrozenCLIPEmbedderWithCustomWordsBase", ["tokenize_line", "process_tokens"])
    run_nodes(base_methods, hc_ns, str(hc_file))

    ti_file = m / "textual_inversion" / "textual_inversion.py"
    ti_ns = {}
    run_nodes(methods(read_tree(ti_file), "EmbeddingDatabase", ["register_embedding", "find_embedding_at_position"]),
              ti_ns, str(ti_file))
    return types.SimpleNamespace(
        parse=pp["parse_prompt_attention"],
        tokenize_line=hc_ns["tokenize_line"],
        process_tokens=hc_ns["process_tokens"],
        register_embedding=ti_ns["register_embedding"],
        find_embedding_at_position=ti_ns["find_embedding_at_position"],
    )


def load_comfyui(root, vectors_by_key):
    """ComfyUI's functions; `vectors_by_key[(word, embedding_key)]` is what its `load_embed`
    (stubbed: no files) finds for a word."""
    f = root / "comfy" / "sd1_clip.py"
    tree = read_tree(f)

    def load_embed(embedding_name, embedding_directory, embedding_size, embed_key=None):
        # Stands in for reading the file: the learned word's vectors for this encoder.
        name = embedding_name
        for ext in (".safetensors", ".pt", ".bin"):
            if name.endswith(ext):
                name = name[: -len(ext)]
        return vectors_by_key.get((name, embed_key))

    ns = {
        "os": os, "re": re, "logging": logging, "torch": torch, "CLIPTokenizer": CLIPTokenizer,
        "load_embed": load_embed,
        "model_management": types.SimpleNamespace(intermediate_device=lambda: torch.device("cpu")),
    }
    names = {"gen_empty_tokens", "ClipTokenWeightEncoder", "parse_parentheses", "token_weights",
             "escape_important", "unescape_important", "SDTokenizer"}
    return types.SimpleNamespace(**{k: v for k, v in run_nodes(top_level(tree, names), ns, str(f)).items()
                                    if k in names})


# ------------------------------------------------------------------------------------
# The tiny text encoders (the hosts' models' stand-ins)
# ------------------------------------------------------------------------------------
class InjectedTokenEmbedding(torch.nn.Module):
    def __init__(self, base, rows):
        super().__init__()
        self.table = torch.cat([base.detach(), rows], 0)

    def forward(self, ids):
        return F.embedding(ids, self.table)


def text_model(te):
    return te.text_model if hasattr(te, "text_model") else te


def run_clip(te, ids, rows, mode):
    """Hidden states [B, 77, C] of `ids` ([B, 77] long; ids >= 49408 are `rows`), and the
    pooled vector at the first end token where the model has a projection."""
    te = copy.deepcopy(te)
    tm = text_model(te)
    tm.embeddings.token_embedding = InjectedTokenEmbedding(tm.embeddings.token_embedding.weight, rows)
    with torch.no_grad():
        out = te(input_ids=ids, output_hidden_states=True)
        if mode == "last":
            z = out.last_hidden_state
        else:  # SDXL: penultimate, no final norm
            z = out.hidden_states[-2]
        pooled = None
        if hasattr(te, "text_projection"):
            eos = [row.index(EOS) for row in ids.tolist()]
            last = tm.final_layer_norm(out.hidden_states[-1])
            pooled = te.text_projection(last[torch.arange(ids.shape[0]), torch.tensor(eos)])
    return z.float(), pooled


class Encoder:
    """One text encoder as a host holds it: its model, conditioning mode, pad id and
    learned-word vectors (A1111 `fixes` or ComfyUI embedding tensors)."""

    def __init__(self, te, mode, pad, vectors, key):
        self.te, self.mode, self.pad, self.vectors, self.key = te, mode, pad, vectors, key

    def ids_and_rows(self, token_lists, fixes=None):
        rows, ids = [], []
        for b, tokens in enumerate(token_lists):
            row = []
            for t in tokens:
                if isinstance(t, torch.Tensor):  # ComfyUI: an embedding's vector in the token list
                    rows.append(t.float())
                    row.append(49408 + len(rows) - 1)
                else:
                    row.append(int(t))
            if fixes is not None:
                # A1111 (sd_hijack.py EmbeddingsWithFixes): a fix's offset counts from after
                # the chunk's start token, so its vectors go at offset + 1 on.
                for offset, emb in fixes[b]:
                    for k in range(emb.vectors):
                        rows.append(emb.vec[k])
                        row[offset + 1 + k] = 49408 + len(rows) - 1
            ids.append(row)
        width = self.te.config.hidden_size
        table = torch.stack(rows) if rows else torch.zeros(0, width)
        return torch.tensor(ids), table

    def encode(self, token_lists, fixes=None):
        ids, rows = self.ids_and_rows(token_lists, fixes)
        if self.pad != EOS:  # OpenCLIP: 0 after the first end token
            for r in range(ids.shape[0]):
                first = ids[r].tolist().index(EOS)
                ids[r, first + 1:] = self.pad
        return run_clip(self.te, ids, rows, self.mode)


# ------------------------------------------------------------------------------------
# A1111
# ------------------------------------------------------------------------------------
class A1111Embedder:
    """The `self` of A1111's tokenize_line/process_tokens for one text encoder."""

    def __init__(self, host, tok, encoder):
        self.host, self.tok, self.encoder = host, tok, encoder
        self.chunk_length = 75
        self.id_start, self.id_end = BOS, EOS
        self.id_pad = encoder.pad
        self.comma_token = tok.get_vocab().get(",</w>")
        db = types.SimpleNamespace(ids_lookup={}, word_embeddings={})
        db.find_embedding_at_position = types.MethodType(host.find_embedding_at_position, db)
        emb = types.SimpleNamespace(name=WORD, vec=encoder.vectors, vectors=encoder.vectors.shape[0])
        model = types.SimpleNamespace(cond_stage_model=types.SimpleNamespace(tokenizer=tok))
        host.register_embedding(db, emb, model)
        self.hijack = types.SimpleNamespace(embedding_db=db)
        self.current_fixes = None
        self.dtype = torch.float32

    def tokenize(self, texts):
        return self.tok(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def tokenize_line(self, line):
        return self.host.tokenize_line(self, line)

    def encode_with_transformers(self, tokens):
        z, pooled = self.encoder.encode(tokens.tolist(), self.current_fixes)
        return z.to(self.dtype)

    def forward(self, line):
        """A1111's forward for one prompt: each chunk through process_tokens, stacked."""
        chunks, _ = self.tokenize_line(line)
        zs = []
        for c in chunks:
            self.current_fixes = [c.fixes]
            zs.append(self.host.process_tokens(self, [c.tokens], [c.multipliers]))
        return torch.hstack(zs)[0]


def a1111_layout(chunks):
    out = []
    for c in chunks:
        tokens = list(c.tokens)
        learned = [None] * len(tokens)
        for offset, emb in c.fixes:
            for k in range(emb.vectors):
                learned[offset + 1 + k] = [emb.name, k]  # after the start token, as above
        out.append({"tokens": tokens, "weights": [float(w) for w in c.multipliers], "learned": learned})
    return out


# ------------------------------------------------------------------------------------
# ComfyUI
# ------------------------------------------------------------------------------------
def comfy_tokenizer(host, tok_dir, width, key, pad_with_end):
    return host.SDTokenizer(tokenizer_path=str(tok_dir), pad_with_end=pad_with_end, embedding_directory="(stub)",
                            embedding_size=width, embedding_key=key, tokenizer_class=CLIPTokenizer)


def comfy_encoder(host, encoder):
    class Enc(host.ClipTokenWeightEncoder):
        special_tokens = {"start": BOS, "end": EOS, "pad": encoder.pad}

        def encode(self, token_lists):
            return encoder.encode(token_lists)

    return Enc()


def comfy_layout(batched, vectors):
    out = []
    for chunk in batched:
        tokens, weights, learned = [], [], []
        for t, w in chunk:
            weights.append(float(w))
            if isinstance(t, torch.Tensor):
                k = next(i for i in range(vectors.shape[0]) if torch.equal(vectors[i], t))
                tokens.append(0)
                learned.append([WORD, k])
            else:
                tokens.append(int(t))
                learned.append(None)
        out.append({"tokens": tokens, "weights": weights, "learned": learned})
    return out


# ------------------------------------------------------------------------------------
# The cases
# ------------------------------------------------------------------------------------
PARSE_CASES = [
    "normal text",
    "an (important) word",
    "a photo of (my-cat:1.2) on a [table]",
    "((masterpiece)), (((best quality))), [[blurry]], (hill:0.5)",
    "((a:1.5)) and ((b))",
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
    "(unnecessary)(parens)",
    "\\(literal\\] and \\[not\\) \\\\ back\\slash",
    "a BREAK b",
    "first BREAK second BREAK",
    "BREAK at the start",
    "(in brackets BREAK here)",
    "aBREAK and BREAKfast",
    "(unbalanced",
    "unbalanced) close and ] square",
    "[unbalanced square",
    "a) (b",
    "((double open (x:1.3)",
    "(word:abc)",
    "(word:)",
    "(word: 2 )",
    "(word:-1)",
    "(word:+.5)",
    "(word:1.)",
    "(word:1e2)",
    "(word:1_5)",
    "(word:1.2.3)",
    "(word:.)",
    "a lone : colon",
    "x :1.5) y",
    "(:1.3)",
    "()",
    "[]",
    "(a:1.3)(b:1.3)",
    "[(a:1.5)]",
    "(embedding:my-cat:1.2) and (embedding:my-cat)",
    "caf\u00e9 (cr\u00e8me:1.2) \u65e5\u672c",
    "",
]

# Prompts laid out in chunks (with the learned word) and encoded; per host, as its users
# write the word (A1111: the bare word; ComfyUI: embedding:word).
LONG = ", ".join(f"(red:1.3) apple {i}" for i in range(20))
ENCODE_CASES = {
    "a1111": [
        "a photo of (my-cat:1.2) on a [table]",
        "((masterpiece)), a [[dog]], (cat:0.5) BREAK (sky:1.3)",
        f"{LONG}, (my-cat:0.8), [dark]",
        "[my-cat] (unbalanced",
        "plain prompt without weights",
    ],
    "comfyui": [
        "a photo of (embedding:my-cat:1.2) on a [table]",
        "((masterpiece)), a [[dog]], (cat:0.5) BREAK (sky:1.3)",
        f"{LONG}, (embedding:my-cat:0.8), ((dark))",
        "(embedding:my-cat) (unbalanced",
        "plain prompt without weights",
    ],
}
SDXL_CASES = {"a1111": [0, 1], "comfyui": [0, 1]}  # also run on SD 2.x


def a1111_parse_case(host, text):
    try:
        return [[t, float(w)] for t, w in host.parse(text)]
    except Exception as e:  # A1111 fails on the prompt: recorded as an error
        return {"error": f"{type(e).__name__}: {e}"}


def comfy_parse_case(host, text):
    try:
        return [[host.unescape_important(t), float(w)] for t, w in host.token_weights(host.escape_important(text), 1.0)]
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a1111", type=Path, required=True, help="a stable-diffusion-webui checkout")
    ap.add_argument("--comfyui", type=Path, required=True, help="a ComfyUI checkout")
    ap.add_argument("--a1111-commit", help="record this as A1111's commit (default: git rev-parse HEAD)")
    ap.add_argument("--comfyui-commit", help="record this as ComfyUI's commit (default: git rev-parse HEAD)")
    args = ap.parse_args()

    gen = torch.Generator().manual_seed(7)
    vec_sd1 = torch.randn(N_VECTORS, 32, generator=gen) * 0.3
    vec_l = torch.randn(N_VECTORS, 32, generator=gen) * 0.3
    vec_g = torch.randn(N_VECTORS, 48, generator=gen) * 0.3
    vec_sd2 = torch.randn(N_VECTORS, 32, generator=gen) * 0.3

    a1111 = load_a1111(args.a1111)
    embeds = {}
    comfy = load_comfyui(args.comfyui, embeds)
    tok_dir = FIX / "tiny-sd" / "tokenizer"
    tok = CLIPTokenizer.from_pretrained(tok_dir)

    te_sd1 = CLIPTextModel.from_pretrained(FIX / "tiny-sd" / "text_encoder", torch_dtype=torch.float32).eval()
    te_l = CLIPTextModel.from_pretrained(FIX / "tiny-sdxl" / "text_encoder", torch_dtype=torch.float32).eval()
    te_g = CLIPTextModelWithProjection.from_pretrained(FIX / "tiny-sdxl" / "text_encoder_2",
                                                       torch_dtype=torch.float32).eval()
    # SD 2.x: the folder holds 23 of OpenCLIP-H's 24 blocks, so its last layer + final
    # norm is the hosts' penultimate conditioning; padded with 0 after the first end token.
    te_sd2 = CLIPTextModel.from_pretrained(FIX / "tiny-sd2" / "text_encoder", torch_dtype=torch.float32).eval()
    models = {
        "sd1": [Encoder(te_sd1, "last", EOS, vec_sd1, "clip_l")],
        "sd2": [Encoder(te_sd2, "last", 0, vec_sd2, "clip_h")],
        "sdxl": [Encoder(te_l, "penultimate", EOS, vec_l, "clip_l"), Encoder(te_g, "penultimate", 0, vec_g, "clip_g")],
    }

    report = {
        "about": "made by tests/reference/make_prompt_weight_fixtures.py from each host's own code; see tests/reference/README.md",
        "sources": {
            "a1111": {"repo": "AUTOMATIC1111/stable-diffusion-webui", "commit": commit_of(args.a1111, args.a1111_commit),
                      "files": ["modules/prompt_parser.py", "modules/sd_hijack_clip.py", "modules/sd_emphasis.py",
                                "modules/textual_inversion/textual_inversion.py"],
                      "settings": {"emphasis": "Original", "comma_padding_backtrack": 20}},
            "comfyui": {"repo": "comfyanonymous/ComfyUI", "commit": commit_of(args.comfyui, args.comfyui_commit),
                        "files": ["comfy/sd1_clip.py"]},
        },
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__},
        "word": {"name": WORD, "vectors": N_VECTORS},
        "parse": [],
        "layout": {"a1111": [], "comfyui": []},
        "encode": {"a1111": [], "comfyui": []},
    }
    tensors = {"vectors.sd1": vec_sd1, "vectors.sdxl_l": vec_l, "vectors.sdxl_g": vec_g, "vectors.sd2": vec_sd2}

    for text in PARSE_CASES:
        report["parse"].append({"prompt": text, "a1111": a1111_parse_case(a1111, text),
                                "comfyui": comfy_parse_case(comfy, text)})

    for style, prompts in ENCODE_CASES.items():
        for i, prompt in enumerate(prompts):
            families = ["sd1"] + (["sd2", "sdxl"] if i in SDXL_CASES[style] else [])
            entry = {"prompt": prompt, "families": families}
            per_family = {}
            for fam in families:
                parts, pooled = [], None
                for enc in models[fam]:
                    if style == "a1111":
                        emb = A1111Embedder(a1111, tok, enc)
                        layout = a1111_layout(emb.tokenize_line(prompt)[0])
                        # The emphasis restores each chunk's mean, and those means are
                        # near 0 (normed states), so torch's f32 mean cancels: the f32 run
                        # moves with the summation order (CPU vector width, threads). The
                        # fixture is A1111's code on the f32 states promoted to f64 (the
                        # rule's value); how far A1111's own f32 run is from it is recorded.
                        emb.dtype = torch.float64
                        z = emb.forward(prompt).float()
                        emb.dtype = torch.float32
                        z32 = emb.forward(prompt)
                        dev = float((z32 - z).norm() / z.norm())
                        entry.setdefault("a1111_f32_run_rel_err", {})
                        entry["a1111_f32_run_rel_err"][f"{fam}.{enc.te.config.hidden_size}"] = dev
                        if enc.te.config.hidden_size == 48:  # bigG gives the pooled vector (unweighted)
                            chunks, _ = emb.tokenize_line(prompt)
                            _, pooled = enc.encode([chunks[0].tokens], [chunks[0].fixes])
                    else:
                        ct = comfy_tokenizer(comfy, tok_dir, enc.te.config.hidden_size, enc.key, enc.pad == EOS)
                        embeds.clear()
                        embeds[(WORD, enc.key)] = enc.vectors
                        batched = ct.tokenize_with_weights(prompt)
                        layout = comfy_layout(batched, enc.vectors)
                        z, p = comfy_encoder(comfy, enc).encode_token_weights(batched)
                        z = z[0]
                        if p is not None:
                            pooled = p[0]
                    per_family.setdefault("layout", layout)
                    parts.append(z)
                context = torch.cat(parts, -1).contiguous()
                key = f"{style}.{i}.{fam}"
                tensors[f"{key}.context"] = context
                if pooled is not None:
                    tensors[f"{key}.pooled"] = pooled.reshape(-1).contiguous()
                print(f"{key}: context {list(context.shape)}")
            report["layout"][style].append({"prompt": prompt, "chunks": per_family["layout"]})
            report["encode"][style].append(entry)

    OUT_JSON.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(OUT_TENSORS))
    print(f"wrote {OUT_JSON.relative_to(ROOT)} ({OUT_JSON.stat().st_size} bytes), "
          f"{OUT_TENSORS.relative_to(ROOT)} ({OUT_TENSORS.stat().st_size} bytes)")
    print("OK")


if __name__ == "__main__":
    main()
