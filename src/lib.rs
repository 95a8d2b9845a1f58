//! sdti: a native Textual Inversion engine for Stable Diffusion.
//!
//! Learns a new word (a few token vectors) from a handful of pictures by optimising the
//! denoising loss through a frozen text encoder, UNet and VAE.

pub mod app;
pub mod device;
pub mod embedding;
pub mod error;
pub mod ffi;
pub mod io;
pub mod model;
pub mod names;
pub mod prompt;
pub mod rng;
pub mod sample;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
