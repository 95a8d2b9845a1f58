#!/usr/bin/env bash
# Run the embedding fuzz targets for a bounded time each (default 60 s), one at a time.
#   fuzz/run.sh [seconds-per-target] [target...]
#   fuzz/run.sh --cmin [target...]     minimise the kept corpora in place
# cargo-fuzz needs nightly; on a stable toolchain RUSTC_BOOTSTRAP=1 unlocks the
# -Z flags it uses. The corpora in fuzz/corpus/<target> are kept in git; every run
# first (re)seeds them with the fixtures in tests/fixtures/embeddings, so deleting
# fuzz/corpus and running this script rebuilds a starting corpus from scratch.
# Record long runs in fuzz/RUNS.md.
#
# FUZZ_BUILD: cargo-fuzz build flags. Default: release with debug assertions and
# overflow checks (cargo-fuzz's default); FUZZ_BUILD=-O drops those checks (the build
# `cargo fuzz build -O` makes). Both with AddressSanitizer.
# FUZZ_NO_BUILD=1: run the binaries already in fuzz/target as they are (cargo fuzz
# rebuilds the crate first, which fails while a shared working tree is mid-edit).
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTC_BOOTSTRAP=1
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"
read -r -a BUILD <<< "${FUZZ_BUILD:-}"
ALL=(pickle_zip safetensors png any)
FIX=tests/fixtures/embeddings
# -rss_limit_mb: the readers promise 2 x input + 64 MiB; libFuzzer inputs are
# capped at 1 MiB here, so 512 MiB (incl. sanitizer overhead) is generous.
OPTS=(-max_len=1048576 -rss_limit_mb=512 -timeout=10)

seed() { # target, extension glob...
  local t="$1"; shift
  mkdir -p "fuzz/corpus/$t"
  for g in "$@"; do
    for f in $FIX/$g $FIX/written_by_sdti/$g; do
      [ -f "$f" ] && cp -f "$f" "fuzz/corpus/$t/" || true
    done
  done
}
seed pickle_zip '*.pt' '*.bin'
seed safetensors '*.safetensors'
seed png '*.png'
seed any '*.pt' '*.bin' '*.safetensors' '*.png' '*.webp'

binary() {
  echo "fuzz/target/$(rustc -vV | sed -n 's/^host: //p')/release/$1"
}

if [ "${1:-}" = "--cmin" ]; then
  shift
  targets=("$@")
  [ ${#targets[@]} -gt 0 ] || targets=("${ALL[@]}")
  for t in "${targets[@]}"; do
    echo "== cmin $t"
    if [ -n "${FUZZ_NO_BUILD:-}" ]; then
      rm -rf "fuzz/corpus/$t.min" && mkdir "fuzz/corpus/$t.min"
      "$(binary "$t")" -merge=1 "fuzz/corpus/$t.min" "fuzz/corpus/$t" "${OPTS[@]}"
      rm -rf "fuzz/corpus/$t" && mv "fuzz/corpus/$t.min" "fuzz/corpus/$t"
    else
      cargo fuzz cmin "${BUILD[@]}" "$t" "fuzz/corpus/$t" -- "${OPTS[@]}"
    fi
  done
  exit 0
fi

SECS="${1:-60}"
[ $# -gt 0 ] && shift
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${ALL[@]}")
status=0
for t in "${targets[@]}"; do
  echo "== $t (${SECS}s)"
  run=(-max_total_time="$SECS" "${OPTS[@]}" -print_final_stats=1)
  if [ -n "${FUZZ_NO_BUILD:-}" ]; then
    mkdir -p "fuzz/artifacts/$t"
    "$(binary "$t")" -artifact_prefix="fuzz/artifacts/$t/" "fuzz/corpus/$t" "${run[@]}" || status=1
  else
    cargo fuzz run "${BUILD[@]}" "$t" "fuzz/corpus/$t" -- "${run[@]}" || status=1
  fi
done
exit $status
