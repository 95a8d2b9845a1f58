#!/bin/sh
# Installs the sdti C library for C/C++ users: the shared library, include/sdti.h and
# sdti.pc (pkg-config) under a prefix.
#
#   scripts/install.sh [--prefix DIR] [--lib PATH/TO/libsdti.so]
#
# Without --lib it builds the release library first (cargo build --release --lib; add
# features with CARGO_FLAGS="--features cuda"). Then:
#   cc app.c $(pkg-config --cflags --libs sdti)
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
prefix=/usr/local
lib=""

usage() {
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix=$2; shift 2 ;;
        --prefix=*) prefix=${1#--prefix=}; shift ;;
        --lib) lib=$2; shift 2 ;;
        --lib=*) lib=${1#--lib=}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done

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
[ -f "$lib" ] || { echo "install.sh: $lib does not exist" >&2; exit 1; }

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/Cargo.toml" | head -n 1)
abi_major=$(sed -n 's/^#define SDTI_ABI_MAJOR \([0-9]*\)$/\1/p' "$root/include/sdti.h")
abi_minor=$(sed -n 's/^#define SDTI_ABI_MINOR \([0-9]*\)$/\1/p' "$root/include/sdti.h")

mkdir -p "$prefix/lib/pkgconfig" "$prefix/include"
cp "$lib" "$prefix/lib/$libname"
chmod 755 "$prefix/lib/$libname"
cp "$root/include/sdti.h" "$prefix/include/sdti.h"
chmod 644 "$prefix/include/sdti.h"
sed -e "s|@PREFIX@|$prefix|g" -e "s|@VERSION@|$version|g" \
    -e "s|@ABI@|$abi_major.$abi_minor|g" \
    "$root/sdti.pc.in" > "$prefix/lib/pkgconfig/sdti.pc"

echo "installed sdti $version (ABI $abi_major.$abi_minor) into $prefix:"
echo "  $prefix/lib/$libname"
echo "  $prefix/include/sdti.h"
echo "  $prefix/lib/pkgconfig/sdti.pc"
