//! The integration test suite, one binary (candle links are heavy).

mod cli;
mod common;
mod embedding;
mod ffi;
mod learning;
mod loading;
mod parity;
mod reads;
mod scheduler;
mod sd2;
mod sdxl;
mod sdxl_text;
mod sdxl_train;
mod threads;
mod tokenizer;
mod training;
