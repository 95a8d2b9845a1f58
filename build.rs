fn main() {
    println!("cargo:rerun-if-changed=assets/bpe_simple_vocab_16e6.txt.gz");
    #[cfg(feature = "cuda")]
    if let Err(e) = cuda::build_kernels() {
        // A build script reports failure by exiting non-zero; the message shows in cargo's output.
        eprintln!("error: compiling src/gpu/kernels/*.cu to PTX failed: {e}");
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
}
