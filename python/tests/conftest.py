"""Shared by the sdti package's tests: the repository's tiny models and reference tensors
(tests/fixtures, made by tests/reference/make_tiny_*.py with transformers and diffusers).

Run from a checkout, against the installed package (.ci/run builds the wheel and installs
it into a fresh virtual environment first):

    python -m pytest python/tests
"""

import json
import os
import struct

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
TINY_SD = os.path.join(FIXTURES, "tiny-sd")
TINY_SDXL = os.path.join(FIXTURES, "tiny-sdxl")

_DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "F16": np.float16}


def read_safetensors(path):
    """{name: array} of a safetensors file (numpy only; no torch, no safetensors package)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        data = f.read()
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        start, end = spec["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtype=_DTYPES[spec["dtype"]]).reshape(spec["shape"])
    return out


def relative_error(got, want):
    got, want = np.asarray(got, np.float64).ravel(), np.asarray(want, np.float64).ravel()
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.sqrt(((got - want) ** 2).sum() / (want ** 2).sum()))


def picture(k=0, size=64):
    """A uint8 picture [size, size, 3]: a disc moving across a gradient."""
    y, x = np.mgrid[0:size, 0:size]
    img = np.zeros((size, size, 3), np.float32)
    img[..., 0] = 0.1 + 0.08 * k
    img[..., 1] = 0.35
    img[..., 2] = x / size
    inside = (x - 32 - 3 * k) ** 2 + (y - 30) ** 2 < 300
    img[inside] = (0.86, 0.24, 0.16)
    return (img * 255 + 0.5).astype(np.uint8)


@pytest.fixture(scope="session")
def sd_reference():
    return read_safetensors(os.path.join(FIXTURES, "tiny-sd-expected.safetensors"))


@pytest.fixture(scope="session")
def sdxl_reference():
    return read_safetensors(os.path.join(FIXTURES, "tiny-sdxl-expected.safetensors"))


@pytest.fixture(scope="session")
def sd_case():
    with open(os.path.join(FIXTURES, "tiny-sd-expected.json"), encoding="utf-8") as f:
        return json.load(f)["text_encoder_case"]
