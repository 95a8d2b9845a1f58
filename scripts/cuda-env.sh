# shellcheck shell=bash
# cuda-env.sh -- `source scripts/cuda-env.sh` before `cargo build --features cuda`.
#
# Sets up the CUDA 13.0 toolchain that candle 0.11's `cuda` feature (cudarc 0.19,
# candle-kernels) builds with, from PyPI wheels only: no GPU, driver or NVIDIA download
# is needed on the build machine.
#   * nvcc, its headers, cudart, cublas, curand and nvrtc (the pinned `nvidia-*` 13.0 wheels)
#     go into a venv under ${SDTI_CUDA_PREFIX:-$HOME/.cache/sdti-cuda} (1.2 GB, once). The
#     wheels put the toolkit in the venv's site-packages/nvidia/cu13/ (bin/nvcc, include/, lib/).
#   * the linker wants unversioned names (-lcublas): links libcublas.so -> libcublas.so.13 ...
#   * the link needs -lcuda, the driver's library: a link-only stub lib/stubs/libcuda.so
#     (SONAME libcuda.so.1) is generated from cuda.h; every function returns 34
#     (CUDA_ERROR_STUB_LIBRARY). At run time the real driver's libcuda.so.1 is used: never
#     put lib/stubs on LD_LIBRARY_PATH.
#   * exports PATH (nvcc), CUDA_HOME and CUDA_ROOT (cudarc), NVCC (candle-kernels),
#     CUDARC_CUDA_VERSION=13000, CUDA_COMPUTE_CAP and LIBRARY_PATH (the final link).
#   * the cuDNN shim's headers (build.rs compiles src/gpu/cudnn/shim.cpp with `cc`): the
#     header-only cuDNN frontend (nvidia-cudnn-frontend) and cudnn*.h of the cuDNN release
#     PyTorch cu130 ships (nvidia-cudnn-cu13 9.19.0.56, the pin of torch 2.11): only their
#     include/ folders are kept, under $prefix/cudnn-<versions>/; exports
#     SDTI_CUDNN_FRONTEND_INCLUDE and SDTI_CUDNN_INCLUDE. Nothing cuDNN is linked: the shim
#     opens libcudnn.so.9 at run time.
# Everything is pinned to 13.0: cudarc 0.19 rejects newer nvcc (13.5), PTX from a newer nvcc
# does not JIT on a 13.0 driver (R580), and mixed minor versions of nvcc, crt, nvvm and cccl
# break nvcc. CUDA_COMPUTE_CAP is 90 (H100/H200, sm_90a) unless SDTI_CUDA_COMPUTE_CAP is
# exported first (80 = A100, 89 = L4/RTX 4090). cudarc and candle-kernels rebuild (about
# 9 minutes on 2 cores) whenever one of these variables changes: build with the same prefix
# and compute capability every time. Running it again is a no-op (a stamp file).
# With an installed CUDA 13.0 toolkit instead, export the same variables for it.

_sdti_cuda_env() {
    local prefix="${SDTI_CUDA_PREFIX:-$HOME/.cache/sdti-cuda}"
    local venv="$prefix/venv"
    local pins=(
        nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
        nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
    )
    local want="sdti-cuda v2: ${pins[*]}"
    local cu=""

    # 1. The wheels, unless the stamp says they are there.
    if [ -f "$prefix/.stamp" ] && [ "$(cat "$prefix/.stamp")" = "$want" ]; then
        cu=$(cat "$prefix/.cu13")
    fi
    if [ -z "$cu" ] || [ ! -x "$cu/bin/nvcc" ]; then
        echo "cuda-env: installing the pinned CUDA 13.0 wheels into $venv ..." >&2
        mkdir -p "$prefix" || return 1
        rm -f "$prefix/.stamp"
        [ -x "$venv/bin/python" ] || python3 -m venv "$venv" || return 1
        "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps "${pins[@]}" || return 1
        cu="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13"
        [ -x "$cu/bin/nvcc" ] || { echo "cuda-env: no nvcc under $cu" >&2; return 1; }

        # 2. Unversioned names for -lcudart -lcublas -lcublasLt -lcurand -lnvrtc.
        local so
        for so in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
            [ -e "$cu/lib/$so" ] || { echo "cuda-env: $cu/lib/$so missing" >&2; return 1; }
            ln -sfn "$so" "$cu/lib/${so%.so.*}.so"
        done

        # 3. The link-only libcuda stub: every cu* function cuda.h declares (current names,
        #    the per-thread-stream variants and the legacy names), plus the profiler's.
        mkdir -p "$cu/lib/stubs"
        {
            local d
            for d in "" "-DCUDA_API_PER_THREAD_DEFAULT_STREAM" "-D__CUDA_API_VERSION_INTERNAL"; do
                # shellcheck disable=SC2086
                gcc -E -P $d -I"$cu/include" "$cu/include/cuda.h"
            done
            printf '%s(\n' cuProfilerInitialize cuProfilerStart cuProfilerStop  # not in the wheels
        } | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d '( \t' | sort -u \
          | awk '{ printf "int %s(void) { return 34; }\n", $1 }' > "$cu/lib/stubs/libcuda_stub.c" || return 1
        if ! grep -q ' cuInit(' "$cu/lib/stubs/libcuda_stub.c" \
            || [ "$(grep -c . "$cu/lib/stubs/libcuda_stub.c")" -lt 400 ]; then
            echo "cuda-env: generating the libcuda stub failed" >&2; return 1
        fi
        gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cu/lib/stubs/libcuda.so" \
            "$cu/lib/stubs/libcuda_stub.c" || return 1

        printf '%s\n' "$cu" > "$prefix/.cu13"
        printf '%s\n' "$want" > "$prefix/.stamp"
        echo "cuda-env: ready in $cu" >&2
    fi

    # 4. The cuDNN frontend and cuDNN headers (include/ folders only; the 366 MB cuDNN wheel
    #    is downloaded to a temporary folder and dropped).
    local fe_pin=1.19.1 cudnn_pin=9.19.0.56
    local dnn="$prefix/cudnn-fe$fe_pin-$cudnn_pin"
    if [ ! -f "$dnn/.stamp" ]; then
        echo "cuda-env: fetching the cuDNN frontend $fe_pin and cuDNN $cudnn_pin headers ..." >&2
        local tmp
        tmp=$(mktemp -d "${TMPDIR:-/tmp}/sdti-cudnn.XXXXXX") || return 1
        if ! "$venv/bin/python" -m pip download -q --disable-pip-version-check --no-deps \
                --only-binary=:all: -d "$tmp" "nvidia-cudnn-frontend==$fe_pin" \
                "nvidia-cudnn-cu13==$cudnn_pin"; then
            rm -rf "$tmp"; return 1
        fi
        rm -rf "$dnn"
        "$venv/bin/python" - "$tmp" "$dnn" <<'PY' || { rm -rf "$tmp"; return 1; }
import glob, os, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wanted = {"nvidia_cudnn_frontend": ("include/", "frontend/"),
          "nvidia_cudnn_cu13": ("nvidia/cudnn/include/", "cudnn/include/")}
for wheel in glob.glob(os.path.join(tmp, "*.whl")):
    src, dst = wanted[os.path.basename(wheel).split("-")[0]]
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith(src) and not name.endswith("/"):
                path = os.path.join(dest, dst, "include" if dst == "frontend/" else "", name[len(src):])
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with z.open(name) as f, open(path, "wb") as out:
                    out.write(f.read())
for need in ("frontend/include/cudnn_frontend.h", "cudnn/include/cudnn.h"):
    if not os.path.isfile(os.path.join(dest, need)):
        sys.exit(f"cuda-env: {need} missing after extraction")
PY
        rm -rf "$tmp"
        printf 'nvidia-cudnn-frontend==%s nvidia-cudnn-cu13==%s\n' "$fe_pin" "$cudnn_pin" > "$dnn/.stamp"
    fi
    export SDTI_CUDNN_FRONTEND_INCLUDE="$dnn/frontend/include" SDTI_CUDNN_INCLUDE="$dnn/cudnn/include"

    # 5. The environment cudarc, candle-kernels and the final link read.
    case ":$PATH:" in *":$cu/bin:"*) ;; *) export PATH="$cu/bin:$PATH" ;; esac
    export CUDA_HOME="$cu" CUDA_ROOT="$cu"
    export NVCC="$cu/bin/nvcc"
    export CUDARC_CUDA_VERSION=13000
    export CUDA_COMPUTE_CAP="${SDTI_CUDA_COMPUTE_CAP:-90}"
    case ":${LIBRARY_PATH:-}:" in
        *":$cu/lib:"*) ;;
        *) export LIBRARY_PATH="$cu/lib:$cu/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}" ;;
    esac
    return 0
}
_sdti_cuda_env || echo "cuda-env: setup FAILED" >&2
unset -f _sdti_cuda_env
