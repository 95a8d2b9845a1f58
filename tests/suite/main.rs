//! The integration test suite, one binary (candle links are heavy).

mod cli;
mod cmake;
mod common;
mod embedding;
mod ffi;
mod ffi_params;
mod ffi_preview;
mod gpu_cudnn;
mod gpu_kernels;
mod learning;
mod loading;
mod parity;
mod prompt_weights;
mod reads;
mod scheduler;
mod sd2;
mod sdxl;
mod sdxl_text;
mod sdxl_train;
mod threads;
mod tokenizer;
mod training;
