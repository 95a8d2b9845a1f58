#!/usr/bin/env bash
# Run every embedding fuzz target for a bounded time (default 60 s each).
#   fuzz/run.sh [seconds-per-target]
# cargo-fuzz needs nightly; on a stable toolchain RUSTC_BOOTSTRAP=1 unlocks the
# -Z flags it uses. Seeds come from tests/fixtures/embeddings.
set -euo pipefail
SECS="${1:-60}"
cd "$(dirname "$0")/.."
export RUSTC_BOOTSTRAP=1
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"
FIX=tests/fixtures/embeddings
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
seed any '*.pt' '*.bin' '*.safetensors' '*.png'
status=0
for t in pickle_zip safetensors png any; do
  echo "== $t (${SECS}s)"
  # -rss_limit_mb: the readers promise 2 x input + 64 MiB; libFuzzer inputs are
  # capped at 1 MiB here, so 512 MiB (incl. sanitizer overhead) is generous.
  if ! cargo fuzz run "$t" "fuzz/corpus/$t" -- \
      -max_total_time="$SECS" -max_len=1048576 -rss_limit_mb=512 -timeout=10; then
    status=1
  fi
done
exit $status
