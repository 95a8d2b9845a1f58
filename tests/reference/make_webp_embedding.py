#!/usr/bin/env python3
"""A1111 pixel-border image embeddings in WebP, from the committed PNG fixture.

A1111's loader (textual_inversion.py, `load_from_file`) opens .png/.webp/.jxl/.avif
with PIL; a WebP has no `.text`, so A1111 always decodes its pixel borders
(`extract_image_data_embed`). The most faithful WebP embedding is therefore the
pixels of tests/fixtures/embeddings/a1111_pixels.png (written by
make_embedding_fixtures.py with A1111's `insert_image_data_embed`) re-saved by PIL:

  a1111_pixels.webp        lossless WebP, RGB: must read exactly like the PNG
  a1111_pixels_rgba.webp   lossless WebP with a varying alpha channel (RGB kept
                           exactly); A1111's convert('RGB') drops alpha
  a1111_pixels_lossy.webp  lossy WebP (quality 90): the data does not survive, and
                           A1111's own decoder fails on it too (checked below)

Each file is checked here with a port of A1111's extract_image_data_embed (numpy,
no torch): the lossless ones give the same JSON as the PNG, the lossy one fails.

Run:  python3 -m venv /tmp/refenv-png && /tmp/refenv-png/bin/pip install pillow numpy
      /tmp/refenv-png/bin/python tests/reference/make_webp_embedding.py
"""
import json
import os
import zlib

import numpy as np
import PIL
from PIL import Image, features

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.normpath(os.path.join(HERE, "..", "fixtures", "embeddings"))


def lcg_nibbles(n):
    """A1111's lcg() (numpy LCG constants, seed 0), each value & 0x0F."""
    out = np.empty(n, np.uint8)
    s = 0
    for i in range(n):
        s = (1664525 * s + 1013904223) % 2**32
        out[i] = (s % 255) & 0x0F
    return out


def extract(image):
    """extract_image_data_embed: crop black, split at the black columns, unscramble, inflate."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    lit = (rgb > 0).all(2)
    cols, rows = lit.any(0), lit.any(1)
    c0, c1 = cols.argmax(), rgb.shape[1] - cols[::-1].argmax()
    r0, r1 = rows.argmax(), rgb.shape[0] - rows[::-1].argmax()
    nib = rgb[r0:r1, c0:c1] & 0x0F
    black = np.where(nib.sum(axis=(0, 2)) == 0)[0]
    if black.shape[0] < 2:
        return None
    lower = nib[:, : black.min(), :]
    upper = nib[:, black.max() + 1 :, :]
    lower = lower ^ lcg_nibbles(lower.size).reshape(lower.shape)
    upper = upper ^ lcg_nibbles(upper.size).reshape(upper.shape)
    packed = ((upper << 4) | lower).astype(np.uint8).flatten().tobytes()
    return json.loads(zlib.decompress(packed))


def main():
    print("pillow", PIL.__version__, "libwebp", features.version("webp"), "numpy", np.__version__)
    src = Image.open(os.path.join(FIX, "a1111_pixels.png"))
    want = extract(src)
    assert want is not None and want["name"] == "pixembed", "the PNG fixture does not decode"
    rgb = src.convert("RGB")

    out = os.path.join(FIX, "a1111_pixels.webp")
    rgb.save(out, "WEBP", lossless=True, quality=100, method=6, exact=True)

    rgba = rgb.copy()
    w, h = rgba.size
    alpha = np.tile(np.linspace(64, 255, w).astype(np.uint8), (h, 1))
    rgba.putalpha(Image.fromarray(alpha, "L"))
    out_rgba = os.path.join(FIX, "a1111_pixels_rgba.webp")
    rgba.save(out_rgba, "WEBP", lossless=True, quality=100, method=6, exact=True)

    out_lossy = os.path.join(FIX, "a1111_pixels_lossy.webp")
    rgb.save(out_lossy, "WEBP", lossless=False, quality=90, method=6)

    for path, mode in [(out, "RGB"), (out_rgba, "RGBA")]:
        im = Image.open(path)
        assert im.mode == mode and not hasattr(im, "text"), (path, im.mode)
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(rgb)), path
        assert extract(im) == want, path
    try:
        got = extract(Image.open(out_lossy))
        lossy_fails = got != want
    except Exception as e:  # zlib.error or a JSON error: A1111 fails the same way
        print("lossy:", type(e).__name__, e)
        lossy_fails = True
    assert lossy_fails, "the lossy WebP kept the data; pick a lower quality"
    for p in (out, out_rgba, out_lossy):
        print(os.path.basename(p), os.path.getsize(p), "bytes")
    print("OK")


if __name__ == "__main__":
    main()
