//! sdti: a native Textual Inversion engine for Stable Diffusion.
//!
//! Learns a new word (a few token vectors) from a handful of pictures by optimising the
//! denoising loss through a frozen text encoder, UNet and VAE.
//!
//! The engine is `model` (the SD 1.x networks and their files), `train` (the trainer),
//! `prompt` (prompts with learned words as conditioning) and `embedding` (every
//! learned-embedding file format); `ffi` is the C ABI over them and `app` the layer above
//! (run folders, previews, plots) that the `sdti` command uses.
//!
//! Train a word and write it as A1111 does:
//!
//! ```no_run
//! use std::sync::Arc;
//! use sdti::embedding::{Existing, Format, Precision};
//! use sdti::model::{LoadOptions, SdModel};
//! use sdti::train::{data::ImageSource, Init, TrainConfig, Trainer};
//!
//! let model = SdModel::load("v1-5-pruned-emaonly.safetensors".as_ref(), &LoadOptions::default())?;
//! let config = TrainConfig {
//!     token: "my-cat".into(),
//!     init: Init::Text("cat".into()),
//!     vectors: 4,
//!     ..TrainConfig::default()
//! };
//! let mut trainer = Trainer::new(Arc::new(model), config)?;
//! trainer.add_image(ImageSource::File("cat1.jpg".into()), None)?;
//! trainer.train(3000, |stats| stats.loss.is_finite())?;
//! trainer.export("my-cat.pt".as_ref(), Format::A1111Pt, Precision::F32, Existing::Refuse)?;
//! # Ok::<(), sdti::Error>(())
//! ```
//!
//! Read any embedding file and write it in another format:
//!
//! ```
//! use sdti::embedding::{read_embedding, write_embedding, Format, Precision};
//!
//! let word = read_embedding("tests/fixtures/embeddings/a1111_sd1.pt".as_ref())?;
//! assert_eq!(word.parts[0].dim, 768); // an SD 1.x word
//! let out = std::env::temp_dir().join(format!("sdti-doctest-{}.safetensors", std::process::id()));
//! write_embedding(&out, &word, Format::A1111Safetensors, Precision::F32)?;
//! assert_eq!(read_embedding(&out)?.parts, word.parts);
//! # std::fs::remove_file(&out).ok();
//! # Ok::<(), sdti::embedding::EmbeddingError>(())
//! ```
//!
//! A word's name is a name, never a path:
//!
//! ```
//! assert!(sdti::names::check_word_name("my-cat").is_ok());
//! assert!(sdti::names::check_word_name("../checkpoints/victim").is_err());
//! ```

pub mod app;
pub mod device;
pub mod embedding;
pub mod error;
pub mod ffi;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod io;
pub mod model;
pub mod names;
pub mod prompt;
pub mod rng;
pub mod sample;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
