#!/bin/sh
# Installs the sdti C library for C/C++ users: the shared library, include/sdti.h,
# sdti.pc (pkg-config) and the CMake package (lib/cmake/sdti) under a prefix.
#
#   scripts/install.sh [--prefix DIR] [--lib PATH/TO/libsdti.so]
#
# Without --lib it builds the release library first (cargo build --release --lib; add
# features with CARGO_FLAGS="--features cuda"). Then:
#   cc app.c $(pkg-config --cflags --libs sdti)
#   CMake: find_package(sdti 0.1 CONFIG REQUIRED), target_link_libraries(app PRIVATE sdti::sdti)
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
prefix=/usr/local
lib=""

usage() {
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
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

# On Windows a host links against the DLL's import library (MSVC: sdti.dll.lib, GNU:
# libsdti.dll.a), which cargo writes beside the DLL.
implib=""
case "$libname" in
    *.dll)
        for candidate in "$lib.lib" "$(dirname "$lib")/libsdti.dll.a"; do
            if [ -f "$candidate" ]; then implib=$candidate; break; fi
        done
        ;;
esac

mkdir -p "$prefix/lib/pkgconfig" "$prefix/lib/cmake/sdti" "$prefix/include"
cp "$lib" "$prefix/lib/$libname"
chmod 755 "$prefix/lib/$libname"
implib_name=""
if [ -n "$implib" ]; then
    implib_name=$(basename "$implib")
    cp "$implib" "$prefix/lib/$implib_name"
    chmod 644 "$prefix/lib/$implib_name"
fi
cp "$root/include/sdti.h" "$prefix/include/sdti.h"
chmod 644 "$prefix/include/sdti.h"
sed -e "s|@PREFIX@|$prefix|g" -e "s|@VERSION@|$version|g" \
    -e "s|@ABI@|$abi_major.$abi_minor|g" \
    "$root/sdti.pc.in" > "$prefix/lib/pkgconfig/sdti.pc"
# The CMake package finds its files relative to itself: no path of this prefix is written.
sed -e "s|@ABI@|$abi_major.$abi_minor|g" -e "s|@LIBNAME@|$libname|g" \
    -e "s|@IMPLIB@|$implib_name|g" \
    "$root/cmake/sdtiConfig.cmake.in" > "$prefix/lib/cmake/sdti/sdtiConfig.cmake"
sed -e "s|@VERSION@|$version|g" \
    "$root/cmake/sdtiConfigVersion.cmake.in" > "$prefix/lib/cmake/sdti/sdtiConfigVersion.cmake"

echo "installed sdti $version (ABI $abi_major.$abi_minor) into $prefix:"
echo "  $prefix/lib/$libname"
echo "  $prefix/include/sdti.h"
echo "  $prefix/lib/pkgconfig/sdti.pc"
echo "  $prefix/lib/cmake/sdti/sdtiConfig.cmake (find_package(sdti CONFIG), target sdti::sdti)"
