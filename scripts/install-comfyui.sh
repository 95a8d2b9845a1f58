#!/bin/sh
# Installs the sdti node pack into a ComfyUI checkout: plugin-manifests/comfyui with
# sdti.plugin.json and the library copied next to it, as custom_nodes/sdti.
#
#   scripts/install-comfyui.sh /path/to/ComfyUI [--lib PATH/TO/libsdti.so]
#
# Without --lib it builds the release library first (cargo build --release --lib; add
# CARGO_FLAGS="--features cuda" for NVIDIA GPUs). Restart ComfyUI afterwards; the nodes
# appear under "sdti".
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
comfy=""
lib=""

while [ $# -gt 0 ]; do
    case "$1" in
        --lib) lib=$2; shift 2 ;;
        --lib=*) lib=${1#--lib=}; shift ;;
        -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "install-comfyui.sh: unknown option '$1'" >&2; exit 2 ;;
        *) comfy=$1; shift ;;
    esac
done
[ -n "$comfy" ] || { echo "usage: install-comfyui.sh /path/to/ComfyUI [--lib PATH]" >&2; exit 2; }

case "$(uname -s)" in
    Darwin) libname=libsdti.dylib ;;
    MINGW*|MSYS*|CYGWIN*) libname=sdti.dll ;;
    *) libname=libsdti.so ;;
esac
if [ -z "$lib" ]; then
    # shellcheck disable=SC2086 # CARGO_FLAGS is a list of words
    (cd "$root" && cargo build --release --lib ${CARGO_FLAGS:-})
    lib="$root/target/release/$libname"
fi
[ -f "$lib" ] || { echo "install-comfyui.sh: $lib does not exist" >&2; exit 1; }
# Only the sdti library: one that exports sdti_abi_version (loaded with python3's ctypes,
# else, e.g. when it needs a GPU driver this machine lacks, looked up with nm).
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

dest="$comfy/custom_nodes/sdti"
mkdir -p "$dest/tests" "$dest/web"
for f in __init__.py nodes.py sdti_lib.py pyproject.toml web/sdti.js; do
    cp "$root/plugin-manifests/comfyui/$f" "$dest/$f"
done
cp "$root/plugin-manifests/comfyui/tests/test_nodes.py" "$dest/tests/test_nodes.py"
cp "$root/plugin-manifests/sdti.plugin.json" "$dest/sdti.plugin.json"
cp "$lib" "$dest/$libname"
echo "installed the sdti nodes into $dest"
