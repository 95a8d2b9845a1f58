"""Builds the sdti wheel: the crate's cdylib (cargo, through setuptools-rust) copied into the
`sdti` package as the file cargo names it (libsdti.so, libsdti.dylib, sdti.dll), next to the
ctypes layer that loads it.

Settings, read from the environment (as llama-cpp-python reads CMAKE_ARGS):
  SDTI_CARGO_FEATURES            cargo features, e.g. "cuda", "cudnn" or "metal"
                                 (comma or space separated; cargo refuses unknown ones)
  SETUPTOOLS_RUST_CARGO_PROFILE  a cargo profile instead of release: "dev" reuses what
                                 `cargo test` built, dependencies and incremental state
                                 (CI does)
  CARGO_TARGET_DIR               cargo's usual setting (default: the repository's target/)

The wheel is tagged py3-none-<platform>: the library uses no Python C API, so one wheel
serves every Python 3 on its platform. It is built from a checkout (the crate is the
folder above this one); there is no sdist.
"""

import importlib.util
import os
import re

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools_rust import Binding, RustExtension

try:  # setuptools >= 70.1 has its own
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:
    from wheel.bdist_wheel import bdist_wheel

HERE = os.path.dirname(os.path.abspath(__file__))
CARGO_TOML = os.path.join(os.path.dirname(HERE), "Cargo.toml")


def _capi():
    """python/sdti/_capi.py (only the standard library), for the library's file name."""
    spec = importlib.util.spec_from_file_location("_sdti_capi_for_setup", os.path.join(HERE, "sdti", "_capi.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cargo_version():
    """[package] version of Cargo.toml: the one version of the crate, the C library and
    this package."""
    with open(CARGO_TOML, encoding="utf-8") as f:
        text = f.read()
    package = re.search(r"^\[package\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    version = package and re.search(r'^version\s*=\s*"([^"]+)"', package.group(1), re.M)
    if not version:
        raise RuntimeError(f"{CARGO_TOML}: no version in [package]")
    return version.group(1)


LIBRARY = _capi().library_file_name()
MODULE = "_native"  # the extension's last name part, mapped to LIBRARY below


class BuildExt(build_ext):
    def get_ext_filename(self, fullname):
        # The library keeps cargo's name (ctypes loads it by that name, as C hosts do),
        # not a CPython extension suffix such as .cpython-311-x86_64-linux-gnu.so.
        if fullname.split(".")[-1] == MODULE:
            return os.path.join(*fullname.split(".")[:-1], LIBRARY)
        return super().get_ext_filename(fullname)


class BdistWheel(bdist_wheel):
    def get_tag(self):
        _python, _abi, platform = super().get_tag()
        return "py3", "none", platform


features = os.environ.get("SDTI_CARGO_FEATURES", "").replace(",", " ").split()

setup(
    version=cargo_version(),
    rust_extensions=[
        RustExtension(
            f"sdti.{MODULE}",
            path=CARGO_TOML,
            binding=Binding.NoBinding,
            features=features,
            # The crate types of Cargo.toml's [lib], said explicitly: setuptools-rust would
            # otherwise pass --crate-type cdylib, another build of the crate than the one
            # `cargo build` and `cargo test` make, which shares nothing with it.
            args=["--crate-type", "cdylib,rlib"],
        )
    ],
    cmdclass={"build_ext": BuildExt, "bdist_wheel": BdistWheel},
)
