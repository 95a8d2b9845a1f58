fn main() {
    println!("cargo:rerun-if-changed=assets/bpe_simple_vocab_16e6.txt.gz");
    #[cfg(feature = "cuda")]
    if let Err(e) = cuda::build_kernels() {
        // A build script reports failure by exiting non-zero; the message shows in cargo's output.
        eprintln!("error: compiling src/gpu/kernels/*.cu to PTX failed: {e}");
        std::process::exit(1);
    }
    #[cfg(feature = "cuda")]
    if let Err(e) = cuda::build_cudnn_shim() {
        eprintln!("error: compiling the cuDNN shim (src/gpu/cudnn/shim.cpp) failed: {e}");
        std::process::exit(1);
    }
}

/// The CUDA build only: `src/gpu/kernels/*.cu` compiled to PTX by nvcc (found through `NVCC` /
/// `CUDA_HOME`, for `CUDA_COMPUTE_CAP`, as candle-kernels builds its own), and
/// `$OUT_DIR/sdti_ptx.rs` with one `&str` constant per file (`layer_norm.cu` -> `LAYER_NORM`),
/// which `src/gpu/mod.rs` includes and loads with candle's `get_or_load_custom_func`.
/// No `--use_fast_math`: the kernels' erf, exp and division match the CPU's to f32 rounding.
#[cfg(feature = "cuda")]
mod cuda {
    use std::path::PathBuf;

    pub fn build_kernels() -> Result<(), Box<dyn std::error::Error>> {
        println!("cargo:rerun-if-changed=src/gpu/kernels");
        println!("cargo:rerun-if-env-changed=NVCC");
        println!("cargo:rerun-if-env-changed=CUDA_HOME");
        let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
        cudaforge::KernelBuilder::new()
            .source_dir("src/gpu/kernels")
            // The shared header: a change to it recompiles every kernel file.
            .watch(["src/gpu/kernels/common.cuh"])
            .arg("-std=c++17")
            .arg("-O3")
            .build_ptx()?
            .write(out_dir.join("sdti_ptx.rs"))?;
        Ok(())
    }

    /// The C++ shim over the cuDNN frontend (header-only, v1 graph API), compiled with
    /// `NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING`: cuDNN and the CUDA runtime are opened with
    /// dlopen at run time, so the link needs neither (only libstdc++ and libdl). The headers
    /// come from `SDTI_CUDNN_FRONTEND_INCLUDE` (cudnn_frontend.h) and `SDTI_CUDNN_INCLUDE`
    /// (cudnn.h; optional when it is on the compiler's default path), both exported by
    /// scripts/cuda-env.sh, and `CUDA_HOME/include` (cuda.h, cuda_runtime_api.h).
    pub fn build_cudnn_shim() -> Result<(), Box<dyn std::error::Error>> {
        println!("cargo:rerun-if-changed=src/gpu/cudnn/shim.cpp");
        println!("cargo:rerun-if-changed=src/gpu/cudnn/shim.h");
        println!("cargo:rerun-if-env-changed=SDTI_CUDNN_FRONTEND_INCLUDE");
        println!("cargo:rerun-if-env-changed=SDTI_CUDNN_INCLUDE");
        let frontend = std::env::var("SDTI_CUDNN_FRONTEND_INCLUDE").map_err(|_| {
            "SDTI_CUDNN_FRONTEND_INCLUDE is not set: `source scripts/cuda-env.sh` installs the \
             pinned nvidia-cudnn-frontend headers and exports it"
        })?;
        let mut includes = vec![PathBuf::from(frontend)];
        if let Ok(dir) = std::env::var("SDTI_CUDNN_INCLUDE") {
            includes.push(PathBuf::from(dir));
        }
        if let Ok(dir) = std::env::var("CUDA_HOME") {
            includes.push(PathBuf::from(dir).join("include"));
        }
        for dir in &includes {
            if !dir.is_dir() {
                return Err(format!("include directory {} does not exist", dir.display()).into());
            }
        }
        let mut build = cc::Build::new();
        build
            .cpp(true)
            .std("c++17")
            .define("NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING", None)
            .file("src/gpu/cudnn/shim.cpp");
        // -isystem: the frontend's own warnings are not sdti's to fix.
        for dir in &includes {
            build.flag("-isystem").flag(dir.to_string_lossy().as_ref());
        }
        build.try_compile("sdti_cudnn_shim")?;
        println!("cargo:rustc-link-lib=dl");
        Ok(())
    }
}
