#!/usr/bin/env bash
# gpu-check.sh -- the CUDA checks of sdti, run ON a GPU machine in one go:
#   0. sdti's fused CUDA kernels (tests/suite/gpu_kernels.rs: src/gpu against candle's composed
#      ops and an f64 evaluation, f32 within 1e-5 and f16/bf16 within 1e-2; well under a minute);
#      then cuDNN through sdti's shim (tests/suite/gpu_cudnn.rs: fused attention forward and
#      backward, convolution forward and input gradient, f16/bf16 against f64 and through the
#      layers; SDTI_REQUIRE_CUDNN=1 makes a missing libcudnn.so.9 a failure), and the probe:
#      cuDNN attention and convolutions timed beside candle's at SD 1.5 512 px shapes
#      (probe.log);
#   1. the reference-parity tests (tests/suite/parity.rs: f32 at the engine's tolerances,
#      f64 finite differences, f16/bf16 against torch's own error) and the inversion and
#      f16 loss-scaling tests, on cuda:0;
#   2. tests/reference/bench_gpu.py: `sdti bench` beside diffusers' textual-inversion step
#      at 512 px, batch 1, 4 and 8.
#
# Usage, from the repository root of a checkout:
#   bash scripts/gpu-check.sh DIR
# DIR holds what was built elsewhere (see README "Building with CUDA"):
#   DIR/sdti.xz     a CUDA build of the sdti binary, xz-compressed (cargo build --release --features cuda)
#   DIR/suite.xz    the matching test binary, xz-compressed (cargo test --release --features cuda --test suite --no-run)
#   DIR/whl/*.whl   diffusers (and importlib_metadata) wheels, when the machine lacks them
# The CUDA 13 libraries (libcudart.so.13, libcublas.so.13, libcublasLt.so.13, libcurand.so.10,
# libnvrtc.so.13) are taken from a CUDA toolkit already on LD_LIBRARY_PATH, or from the
# `nvidia` wheels that PyTorch (cu13) installed: every site-packages/nvidia/*/lib folder of
# `python3` (or $PYTHON) goes on LD_LIBRARY_PATH, nvidia/cudnn/lib (libcudnn.so.9, which sdti
# opens at run time) included; folders holding a CUDA 12 runtime (libcudart.so.12) are left
# out, since the cuDNN frontend refuses to choose between two runtimes. libcuda.so.1 comes
# from the driver.
# Results go to $OUT (default ./gpu-out): tests.log, probe.log, bench.log, bench.json.
set -u
dir=${1:?usage: gpu-check.sh DIR}
out=${OUT:-./gpu-out}
mkdir -p "$out"
work=$(mktemp -d "${TMPDIR:-/tmp}/sdti-gpu.XXXXXX") || exit 2
trap 'rm -rf "$work"' EXIT
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"

libs=$("${PYTHON:-python3}" -c 'import glob, nvidia, os
print(":".join(d for p in nvidia.__path__ for d in sorted(glob.glob(os.path.join(os.path.realpath(p), "*", "lib")))
               if not os.path.exists(os.path.join(d, "libcudart.so.12"))))' 2>/dev/null)
export LD_LIBRARY_PATH="${libs}${libs:+${LD_LIBRARY_PATH:+:}}${LD_LIBRARY_PATH:-}"
echo "gpu-check: CUDA libraries from ${libs:-the system (no nvidia wheels found)}" | tee "$out/libs.txt"
for so in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudnn.so.9; do
    found=""
    IFS=: read -ra ds <<< "${LD_LIBRARY_PATH:-}"
    for d in "${ds[@]}"; do [ -n "$d" ] && [ -e "$d/$so" ] && { found=$d; break; }; done
    [ -n "$found" ] || ldconfig -p 2>/dev/null | grep -q "$so " \
        || echo "gpu-check: WARNING $so not found" | tee -a "$out/libs.txt" >&2
done

if compgen -G "$dir/whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$work/site" "$dir"/whl/*.whl && export PYTHONPATH=$work/site${PYTHONPATH:+:$PYTHONPATH}
fi
bin=$work/bin
mkdir -p "$bin"
unpack() {
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$1" "$2" && chmod +x "$2"
}
unpack "$dir/sdti.xz" "$bin/sdti" || exit 2
unpack "$dir/suite.xz" "$bin/suite" || exit 2

status=0
# f32 checks at the CPU tolerances need true f32 arithmetic: a cudnn build may otherwise
# use TF32 tensor cores (10-bit mantissa) for f32 convolutions (candle's cuBLAS calls are
# true f32 by default).
echo "== tests on cuda:0" | tee "$out/tests.log"
for filters in "gpu_kernels::" "gpu_cudnn:: --skip cudnn_at_sd_shapes" "parity::" \
        "training::f16_training learning::inversion"; do
    # shellcheck disable=SC2086
    SDTI_TEST_DEVICE=cuda SDTI_REPO_ROOT=$PWD NVIDIA_TF32_OVERRIDE=0 SDTI_REQUIRE_CUDNN=1 \
        timeout 120 "$bin/suite" --test-threads 1 --nocapture $filters 2>&1 | tee -a "$out/tests.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done

# The probe: cuDNN's fused attention (forward + backward) and convolutions (forward, input
# gradient) at SD 1.5 512 px shapes, batch 1 and 8, bf16, beside candle's own kernels.
echo "== cuDNN probe" | tee "$out/probe.log"
SDTI_REPO_ROOT=$PWD SDTI_REQUIRE_CUDNN=1 timeout 180 "$bin/suite" --test-threads 1 --nocapture \
    --exact gpu_cudnn::cudnn_at_sd_shapes 2>&1 | tee -a "$out/probe.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmark" | tee "$out/bench.log"
timeout 330 python3 tests/reference/bench_gpu.py --sdti "$bin/sdti" \
    --out "$out/bench.json" ${BENCH_ARGS:-} 2>&1 | tee -a "$out/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
