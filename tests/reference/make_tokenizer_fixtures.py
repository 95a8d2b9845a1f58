#!/usr/bin/env python3
"""Generate tests/fixtures/tokenizer_reference.json for sdti's CLIP tokenizer.

Reference: transformers' *slow* ``CLIPTokenizer`` (transformers 4.x; 4.57.6 was used)
without ftfy, i.e. the ``BasicTokenizer`` normalisation path that a default ComfyUI or
diffusers install takes.  The tokenizer is built from a vocab.json / merges.txt pair
derived from ``assets/bpe_simple_vocab_16e6.txt.gz`` exactly the way
openai/clip-vit-large-patch14 ships them (assets/LICENSE-open_clip has its licence).

Usage (needs ``pip install "transformers<5"``; ftfy optional, only used for the
comparison statistics printed at the end):

    python tests/reference/make_tokenizer_fixtures.py

With ``--extra N PATH`` it instead writes N random strings (drawn from all assigned
code points, weighted towards letters, marks and punctuation) with their reference ids
to PATH, for the ignored Rust test ``extra_reference_cases_match``
(``SDTI_TOKENIZER_EXTRA=PATH cargo test -- --ignored``).

Even if ftfy is importable, the reference is forced onto the no-ftfy path (the same
assignment ``CLIPTokenizer.__init__`` makes when ``import ftfy`` fails).
"""

import gzip
import json
import os
import random
import sys
import tempfile
import unicodedata

import transformers
from transformers import CLIPTokenizer, CLIPTokenizerFast
from transformers.models.clip.tokenization_clip import BasicTokenizer, bytes_to_unicode

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BPE = os.path.join(ROOT, "assets", "bpe_simple_vocab_16e6.txt.gz")
OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizer_reference.json")


def build_files(tmp):
    lines = gzip.open(BPE).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_syms = list(bytes_to_unicode().values())
    vocab = byte_syms + [b + "</w>" for b in byte_syms]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408 and len(set(vocab)) == 49408
    vocab_path = os.path.join(tmp, "vocab.json")
    merges_path = os.path.join(tmp, "merges.txt")
    with open(vocab_path, "w", encoding="utf-8") as f:
        json.dump({v: i for i, v in enumerate(vocab)}, f, ensure_ascii=False)
    with open(merges_path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_path, merges_path


def handwritten():
    s = [
        "a photo of a cat",
        "*",
        "",
        " ",
        "   \t\n  ",
        "A Photo Of A CAT",
        "a photo of a <cat-toy>",
        "a rendering of a <sks>",
        "a cropped photo of the *",
        "a close-up photo of a S*",
        "the photo of a clean {}",
        "a painting in the style of <my-style>",
        "hello world",
        "Hello, World!",
        "hello,world",
        "multiple   spaces    here",
        "tabs\tand\ttabs",
        "new\nlines\n\nand\r\nwindows\rreturns",
        "trailing space ",
        " leading space",
        "\u00a0non-breaking\u00a0space\u2003em\u3000ideographic",
        "line\u2028separator\u2029paragraph",
        "zero\u200bwidth\u200cjoiner\u200dthing\ufeffbom",
        "soft\u00adhyphen",
        "ctrl\x00nul\x01soh\x07bel\x1bescape\x7fdel",
        "unit\x1cseparators\x1d\x1e\x1f",
        "next\x85line",
        "replacement\ufffdchar",
        "private\ue000use\U000f0000",
        "vertical\x0btab\x0cformfeed",
        # contractions
        "don't", "DON'T", "I'm", "you're", "we've", "she'll", "he'd", "it's", "can't",
        "y'all", "'s 't 're 've 'm 'll 'd", "rock'n'roll", "''quoted''", "o'clock",
        "it\u2019s curly", "\u2018single\u2019 \u201cdouble\u201d",
        # numbers
        "0", "1234567890", "3.14159", "1,000,000", "2024-01-01", "v1.5", "sd1.5 sdxl 2.1",
        "1girl, 2boys", "100%", "-42", "1e10", "4k 8k uhd", "0x1F",
        "\u00bd \u2153 \u00b2 \u2460 \u2167 \u0663\u0664 \u0967 \uff11\uff12",
        # punctuation
        "!!!", "???", "...", "!?!?", "a.b.c", "a-b-c", "a_b_c", "a/b\\c", "@user #tag $5 ^_^",
        "(parentheses) [brackets] {braces} <angles>",
        "~!@#$%^&*()_+`-=[]\\{}|;':\",./<>?",
        "--", "\u2014em\u2013en dashes\u2026", "\u00abguillemets\u00bb", "\u00bfque?",
        # A1111 / ComfyUI prompt syntax
        "(masterpiece:1.2), best quality, (ultra detailed:1.1)",
        "((very important)), [less important], [[much less]]",
        "a [cat|dog] sitting on a [chair:sofa:0.5]",
        "[from:to:10] [to:20] [from::0.25]",
        "embedding:my_style, a photo",
        "embedding:EasyNegative.pt, embedding:bad-hands-5",
        "a photo of embedding:cat_toy on a beach",
        "<lora:detail_tweaker:0.8> <hypernet:foo:1>",
        "a castle BREAK a dragon AND a knight",
        "\\(escaped\\) \\[brackets\\]",
        "(word:1.2)", "(word)", "[word]", "<token>", "<|startoftext|>", "<|endoftext|>",
        "a<|endoftext|>b", "!<|endoftext|>!", "x<|startoftext|>y<|endoftext|>z",
        "<|ENDOFTEXT|>", "!<|ENDOFTEXT|>", "<|endoftext|><|endoftext|>", "<|endoftext",
        "<|start<|endoftext|>oftext|>", "< |endoftext| >",
        "photo of a sks dog", "photo of a ohwx man", "score_9, score_8_up, rating_safe",
        # html entities
        "&amp;", "&quot;", "&#39;", "&lt;b&gt;bold&lt;/b&gt;", "Tom &amp; Jerry",
        "&nbsp;&copy;&#x27;&#169;", "AT&T", "fish & chips",
        # case
        "UPPERCASE", "lowercase", "MiXeD cAsE", "CamelCaseWord", "snake_case_word",
        "\u00c9COLE \u00e9cole", "STRASSE stra\u00dfe \u1e9e", "\u0130stanbul \u0131\u0049",
        "\u03a3\u0391\u03a3 \u039f\u0394\u039f\u03a3 \u03c3\u03c2", "\u01c5 \u01c4 \u01c6 \u1f88",
        "\u212a\u212b\u2126", "\uff21\uff22\uff23 \uff41\uff42\uff43",
        # accents / Latin
        "caf\u00e9 na\u00efve r\u00e9sum\u00e9 fa\u00e7ade", "cafe\u0301 decomposed",
        "e\u0301\u0302 multiple marks", "a\u0308\u0323 reorder a\u0323\u0308",
        "\u00c5ngstr\u00f6m A\u030angstro\u0308m", "se\u00f1or pi\u00f1ata", "\u00fcber \u00d6l \u00e4rger",
        "\u0142\u00f3d\u017a \u017c\u00f3\u0142w", "\u0153uvre \u00e6ther \ufb01nance \ufb02ow",
        "crème brûlée", "Dvořák Škoda", "Ångström", "Ελληνικά", "Ῥόδος ᾳ \u0345",
        "a\u0345b", "\u03b1\u0345", "Ꙁ ꙁ", "'\u017f", "\u017f", "it'\u212a", "\u0b47\u0b3e",
        "\u1e9b\u0323", "q\u0307\u0323", "\u0958", "\u0344", "\u00c7\u0301", "\u1100\u1161 \uac00\u11a8",
        # scripts
        "\u732b", "\u732b\u72ac", "\u4e00\u5339\u732b\u5728\u684c\u5b50\u4e0a", "\u732b cat \u72ac dog",
        "\u6771\u4eac\u30bf\u30ef\u30fc", "\u3053\u3093\u306b\u3061\u306f\u4e16\u754c", "\u30ab\u30bf\u30ab\u30ca",
        "\uff8a\uff9d\uff76\uff78", "\ud55c\uad6d\uc5b4 \ud14c\uc2a4\ud2b8", "\u1100\u1161\u11a8",
        "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645", "\u0627\u0644\u0639\u0631\u0628\u064a\u0629\u064f",
        "\u05e9\u05dc\u05d5\u05dd", "\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440",
        "\u0928\u092e\u0938\u094d\u0924\u0947", "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35", "\u10d2\u10d0\u10db\u10d0\u10e0\u10ef\u10dd\u10d1\u10d0",
        "\u0531\u0580\u0574\u0565\u0576", "\u1200\u1208\u1218", "\U00020000\U0002a700 ext-b",
        "\uf900\uf901 compat", "\u2f00\u2e80 radicals", "\u3007\u3005",
        "mixed\u732bscripts", "abc\u0645\u0631\u062d\u0628\u0627xyz",
        # emoji and symbols
        "\U0001f600", "\U0001f431\U0001f436", "\U0001f468\u200d\U0001f469\u200d\U0001f467",
        "\U0001f44d\U0001f3fd", "\U0001f1ef\U0001f1f5 flag", "\u2764\ufe0f love", "\u2600\u2601\u2602",
        "\u00a9\u00ae\u2122", "\u20ac100 \u00a35 \u00a5", "\u2190\u2192\u2191\u2193", "\u221e\u2211\u222b\u221a",
        "cat\U0001f431cat", "\U0001f525\U0001f525\U0001f525 fire",
        # long words
        "a" * 100, "ab" * 60, "supercalifragilisticexpialidocious",
        "pneumonoultramicroscopicsilicovolcanoconiosis", "x" * 300,
        "antidisestablishmentarianism " * 5, "\u732b" * 40, "!" * 80, "1" * 50,
        "hyper-realistic-ultra-detailed-8k-octane-render-trending-on-artstation",
        "https://example.com/path?query=1&x=y#frag", "user@example.com", "C:\\path\\to\\file.txt",
        "snake_case_and-kebab-case.and.dots", "tokenizer\u00e9\u00e8\u00ea\u00eb",
    ]
    return s


def long_prompts():
    base = (
        "masterpiece, best quality, ultra detailed, 8k, a beautiful landscape with mountains, "
        "a river, trees, sunset, dramatic lighting, volumetric fog, by greg rutkowski, "
        "artstation, concept art, sharp focus, illustration, highly detailed, intricate"
    )
    return [base, base + ", " + base, " ".join(["word%d" % i for i in range(90)]),
            ", ".join(["tag%d" % i for i in range(60)])]


def random_strings(n):
    rng = random.Random(20240607)
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        " ,.!?'\"-()[]{}:;<>|/\\*&^%$#@~`_+=",
        "   \t\n",
        "\u00e9\u00e8\u00e0\u00fc\u00f6\u00df\u00f1\u00e7\u00c9\u00c0\u00dc\u0130\u0131\u03a3\u03c3\u00c5\u212b",
        "\u0301\u0308\u0323\u030a\u0345\u0327",
        "\u732b\u72ac\u5c71\u6c34\u3042\u30a2\ud55c\u0645\u05e9\u0416\u0436",
        "\U0001f600\U0001f431\u2764\ufe0f\u200d\u2603\u00a9",
        "\x00\x01\x1b\x7f\x85\u200b\ufffd\u00a0\u3000\u2028",
        "\u00bd\u00b2\u2460\u2167\u0663\uff11",
    ]
    weights = [40, 8, 15, 10, 8, 4, 6, 4, 2, 3]
    out = []
    for _ in range(n):
        length = rng.randint(1, 40)
        chars = []
        for _ in range(length):
            pool = rng.choices(pools, weights)[0]
            chars.append(rng.choice(pool))
        out.append("".join(chars))
    return out


def words_from_vocab(n):
    # Real words, capitalised / punctuated, so that merges of many ranks are exercised.
    rng = random.Random(7)
    lines = gzip.open(BPE).read().decode("utf-8").split("\n")[1:48895]
    words = []
    for m in lines:
        w = "".join(m.split())
        if w.endswith("</w>") and w[:-4].isascii() and w[:-4].isalpha() and len(w) > 8:
            words.append(w[:-4])
    picks = rng.sample(words, n)
    out = []
    for i in range(0, n, 6):
        chunk = picks[i : i + 6]
        out.append(" ".join(chunk))
        out.append("".join(chunk))
        out.append(", ".join(x.capitalize() for x in chunk) + ".")
    return out


def extra_strings(n):
    rng = random.Random(99)
    assigned = [cp for cp in range(0x110000)
                if not 0xD800 <= cp <= 0xDFFF and unicodedata.category(chr(cp)) not in ("Cn", "Cs")]
    marks = [cp for cp in assigned if unicodedata.category(chr(cp)).startswith("M")]
    latin = [cp for cp in assigned if cp < 0x250]
    bmp = [cp for cp in assigned if cp < 0x10000]
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, 30)):
            r = rng.random()
            pool = latin if r < 0.4 else marks if r < 0.55 else bmp if r < 0.9 else assigned
            chars.append(chr(rng.choice(pool)))
            if rng.random() < 0.15:
                chars.append(" ")
        out.append("".join(chars))
    return out


def make_slow(tmp):
    vocab_path, merges_path = build_files(tmp)
    slow = CLIPTokenizer(vocab_path, merges_path)
    slow.fix_text = None
    slow.nlp = BasicTokenizer(strip_accents=False, do_split_on_punc=False)
    return slow


def extra(n, path):
    with tempfile.TemporaryDirectory() as tmp:
        slow = make_slow(tmp)
    cases = [{"text": t, "ids": slow(t, add_special_tokens=False)["input_ids"]} for t in extra_strings(n)]
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"cases": cases}, f, ensure_ascii=True)
    print("wrote %d extra cases to %s" % (n, path))


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--extra":
        return extra(int(sys.argv[2]), sys.argv[3])
    with tempfile.TemporaryDirectory() as tmp:
        vocab_path, merges_path = build_files(tmp)
        slow = CLIPTokenizer(vocab_path, merges_path)
        slow_ftfy = None
        if slow.fix_text is not None:
            slow_ftfy = CLIPTokenizer(vocab_path, merges_path)
        # Force the no-ftfy path (what __init__ does when `import ftfy` fails).
        slow.fix_text = None
        slow.nlp = BasicTokenizer(strip_accents=False, do_split_on_punc=False)
        fast = CLIPTokenizerFast(vocab_path, merges_path)

    texts = handwritten() + long_prompts() + random_strings(160) + words_from_vocab(120)
    seen = set()
    cases = []
    diff_fast = []
    diff_ftfy = []
    for t in texts:
        if t in seen:
            continue
        seen.add(t)
        ids = slow(t, add_special_tokens=False)["input_ids"]
        toks = slow.convert_ids_to_tokens(ids)
        case = {"text": t, "ids": ids}
        if len(cases) % 3 == 0:
            case["decoded"] = slow.convert_tokens_to_string(toks)
        cases.append(case)
        if fast(t, add_special_tokens=False)["input_ids"] != ids:
            diff_fast.append(t)
        if slow_ftfy is not None and slow_ftfy(t, add_special_tokens=False)["input_ids"] != ids:
            diff_ftfy.append(t)

    padded = []
    for t in ["", "a photo of a cat"] + long_prompts():
        ids = slow(t, padding="max_length", max_length=77, truncation=True)["input_ids"]
        padded.append({"text": t, "ids": ids})

    # decode of arbitrary id sequences, including ones that split a UTF-8 sequence
    decode = []
    for ids in [[49406, 320, 1125, 539, 320, 2368, 49407], [163, 234], [163, 234, 360],
                [256, 257, 258], [0, 1, 2, 3, 511], [49407, 49407], [139, 139, 225],
                list(range(100, 140)), [187, 188, 189, 190, 191], [171, 172, 128]]:
        decode.append({"ids": ids, "text": slow.convert_tokens_to_string(slow.convert_ids_to_tokens(ids))})

    fixture = {
        "reference": "transformers %s CLIPTokenizer (slow), no ftfy (BasicTokenizer path), python %s, unicodedata %s"
        % (transformers.__version__, sys.version.split()[0], unicodedata.unidata_version),
        "pad_token_id": slow.pad_token_id,
        "bos_token_id": slow.bos_token_id,
        "eos_token_id": slow.eos_token_id,
        "known": [
            {"text": "a photo of a cat", "padded_prefix": [49406, 320, 1125, 539, 320, 2368, 49407]},
            {"text": "*", "padded_prefix": [49406, 265, 49407]},
        ],
        "cases": cases,
        "padded": padded,
        "decode": decode,
        "differs_from_fast": diff_fast,
        "differs_from_ftfy": diff_ftfy,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=True, separators=(",", ":"))
        f.write("\n")
    print("wrote %d cases, %d bytes" % (len(cases), os.path.getsize(OUT)))
    print("differs from CLIPTokenizerFast: %d" % len(diff_fast))
    for t in diff_fast:
        print("   fast:", ascii(t)[:100])
    if slow_ftfy is not None:
        print("differs from slow+ftfy: %d" % len(diff_ftfy))
        for t in diff_ftfy:
            print("   ftfy:", ascii(t)[:100])


if __name__ == "__main__":
    main()
