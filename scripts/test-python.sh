#!/usr/bin/env bash
# The Python package's tests (README "Two commands", after `cargo test`; CI runs them).
# The Python package (python/): the wheel built by setuptools-rust from the dev profile
# `cargo test` just built (cargo finds every unit fresh, the cdylib included, as long as
# Cargo.toml's `[profile.dev.package."*"]` says `debug` explicitly; nothing is rebuilt in
# release), installed into a fresh virtual environment, then its pytest tests, which run
# the ComfyUI pack's tests on the installed wheel too.
set -euo pipefail
cd "$(dirname "$0")/.."
py_tests="$PWD/python/tests"
py_tmp=$(mktemp -d)
trap 'rm -rf "$py_tmp"' EXIT
python3 -m venv "$py_tmp/venv"
py="$py_tmp/venv/bin/python"
"$py" -m pip install -q --disable-pip-version-check setuptools setuptools-rust wheel pytest numpy pillow
SETUPTOOLS_RUST_CARGO_PROFILE=dev CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}" \
    "$py" -m pip wheel -q --no-build-isolation --no-deps -w "$py_tmp/wheels" ./python
"$py" -m pip install -q "$py_tmp"/wheels/sdti-*.whl
(cd "$py_tmp" && env -u SDTI_LIBRARY PYTHONDONTWRITEBYTECODE=1 "$py" -m pytest -q -p no:cacheprovider "$py_tests")
