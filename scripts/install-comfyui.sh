#!/bin/sh
# Installs the sdti node pack into a ComfyUI checkout: plugin-manifests/comfyui with
# sdti.plugin.json, the ctypes layer (python/sdti/_capi.py) and the library copied next to
# it, as custom_nodes/sdti.
#
#   scripts/install-comfyui.sh /path/to/ComfyUI [--lib PATH/TO/libsdti.so | --no-lib]
#
# Without --lib it builds the release library first (cargo build --release --lib; add
# CARGO_FLAGS="--features cuda" for NVIDIA GPUs). --no-lib copies no library (nor needs
# Rust): the pack then uses the sdti Python package's, installed into ComfyUI's Python
# with pip (its requirements.txt). Restart ComfyUI afterwards; the nodes appear under
# "sdti".
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
comfy=""
lib=""
no_lib=""

while [ $# -gt 0 ]; do
    case "$1" in
        --lib) lib=$2; shift 2 ;;
        --lib=*) lib=${1#--lib=}; shift ;;
        --no-lib) no_lib=1; shift ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "install-comfyui.sh: unknown option '$1'" >&2; exit 2 ;;
        *) comfy=$1; shift ;;
    esac
done
[ -n "$comfy" ] || { echo "usage: install-comfyui.sh /path/to/ComfyUI [--lib PATH | --no-lib]" >&2; exit 2; }
if [ -n "$no_lib" ] && [ -n "$lib" ]; then
    echo "install-comfyui.sh: --lib and --no-lib exclude each other" >&2; exit 2
fi

case "$(uname -s)" in
    Darwin) libname=libsdti.dylib ;;
    MINGW*|MSYS*|CYGWIN*) libname=sdti.dll ;;
    *) libname=libsdti.so ;;
esac
if [ -z "$lib" ] && [ -z "$no_lib" ]; then
    # shellcheck disable=SC2086 # CARGO_FLAGS is a list of words
    (cd "$root" && cargo build --release --lib ${CARGO_FLAGS:-})
    lib="$root/target/release/$libname"
fi
# Only the sdti library: one that exports sdti_abi_version (loaded with python3's ctypes,
# else, e.g. when it needs a GPU driver this machine lacks, looked up with nm).
check_library() {
    abi=unknown
    if command -v python3 >/dev/null 2>&1; then
        if python3 -c 'import ctypes, sys; ctypes.CDLL(sys.argv[1]).sdti_abi_version' "$lib" >/dev/null 2>&1; then
            abi=yes
        else
            abi=no
        fi
    fi
    if [ "$abi" != yes ] && command -v nm >/dev/null 2>&1; then
        if { nm -D --defined-only "$lib" 2>/dev/null || nm -g "$lib" 2>/dev/null; } \
            | grep -Eq '[[:space:]]T _?sdti_abi_version$'; then
            abi=yes
        else
            abi=no
        fi
    fi
    case $abi in
        no)
            echo "install-comfyui.sh: $lib is not the sdti library (it does not export sdti_abi_version); give --lib the libsdti built by 'cargo build --release --lib'" >&2
            exit 1 ;;
        unknown) echo "install-comfyui.sh: warning: neither python3 nor nm found; $lib was not checked" >&2 ;;
    esac
}
if [ -z "$no_lib" ]; then
    [ -f "$lib" ] || { echo "install-comfyui.sh: $lib does not exist" >&2; exit 1; }
    check_library
fi

dest="$comfy/custom_nodes/sdti"
mkdir -p "$dest/tests" "$dest/web"
for f in __init__.py nodes.py sdti_lib.py pyproject.toml requirements.txt web/sdti.js; do
    cp "$root/plugin-manifests/comfyui/$f" "$dest/$f"
done
cp "$root/plugin-manifests/comfyui/tests/test_nodes.py" "$dest/tests/test_nodes.py"
cp "$root/plugin-manifests/sdti.plugin.json" "$dest/sdti.plugin.json"
# The ctypes layer the pack shares with the sdti Python package (used when that package
# is not installed).
cp "$root/python/sdti/_capi.py" "$dest/sdti_capi.py"
if [ -n "$no_lib" ]; then
    # A library left by an earlier install would come before the package's.
    rm -f "$dest/$libname"
    echo "installed the sdti nodes into $dest without a library: install the sdti package into ComfyUI's Python (pip install -r $dest/requirements.txt)"
else
    cp "$lib" "$dest/$libname"
    echo "installed the sdti nodes into $dest"
fi
