//! `sdti sample`: prompts with learned words to PNG files.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use sdti::app::preview::{sample_image, SampleOptions};
use sdti::prompt::encoder::PromptEncoder;

use super::common::{load_model, Chunking, CliError, CliResult, Context, DeviceArgs, EmbeddingArg};

pub const EXAMPLES: &str = "\
Examples:
  # Four pictures of a learned word (seeds 1..4), 30 DDIM steps, guidance 7.5
  sdti sample --model v1-5.safetensors --embedding my-cat.pt \\
       --prompt \"a watercolor painting of my-cat\" --seed 1 --count 4 -o samples/

  # Name the word yourself, use a negative prompt, write one file
  sdti sample --model ./sd15 --embedding cat=runs/my-cat/my-cat.safetensors \\
       --prompt \"cat on a sofa\" --negative \"blurry\" --cfg 5 -o cat.png

Learned words are recognised as the bare word (A1111), embedding:word (ComfyUI) and
<word> (diffusers). Files are named sample-SEED.png in the --output folder.";

#[derive(Args, Debug)]
pub struct SampleArgs {
    /// The SD 1.x model: a diffusers folder or a single-file .safetensors checkpoint
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// A learned word's file, any format sdti reads; the word is its file stem unless
    /// written WORD=FILE (repeatable)
    #[arg(long, short, value_name = "[WORD=]FILE")]
    pub embedding: Vec<EmbeddingArg>,
    /// The prompt
    #[arg(long, short)]
    pub prompt: String,
    /// The negative prompt (empty: unconditional)
    #[arg(long, default_value = "")]
    pub negative: String,
    /// DDIM steps
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Classifier-free guidance scale (1 turns guidance off)
    #[arg(long = "cfg", id = "guidance", default_value_t = 7.5)]
    pub cfg: f64,
    /// Seed of the first image; the next images use the next seeds
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// How many images
    #[arg(long, short = 'n', default_value_t = 1)]
    pub count: u64,
    /// Image width in pixels, a multiple of 8
    #[arg(long, default_value_t = 512)]
    pub width: usize,
    /// Image height in pixels, a multiple of 8
    #[arg(long, default_value_t = 512)]
    pub height: usize,
    /// Use the output of this CLIP layer from the end (1 = last; default: the model
    /// family's, 1 for SD 1.x, 2 for SD 2.x and SDXL)
    #[arg(long)]
    pub clip_skip: Option<usize>,
    /// How prompts longer than 75 tokens are split
    #[arg(long, value_enum, default_value = "a1111")]
    pub chunking: Chunking,
    /// A folder for sample-SEED.png files, or one .png file when --count is 1
    #[arg(long, short, default_value = "samples", value_name = "DIR|FILE.png")]
    pub output: PathBuf,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// An encoder with the `--embedding` words registered.
pub fn encoder_with_words(
    model: std::sync::Arc<sdti::model::SdModel>,
    embeddings: &[EmbeddingArg],
) -> CliResult<PromptEncoder> {
    let mut encoder = PromptEncoder::new(std::sync::Arc::clone(&model.text_encoder))?;
    for e in embeddings {
        let word = encoder
            .register_file(Some(&e.word_or_stem()), &e.path)
            .context(format!("embedding {}", e.path.display()))?;
        eprintln!("word '{word}' from {}", e.path.display());
    }
    Ok(encoder)
}

pub fn run(a: SampleArgs) -> CliResult<()> {
    if a.count == 0 {
        return Err(CliError::new("--count must be at least 1"));
    }
    let single_file = a
        .output
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if single_file && a.count > 1 {
        return Err(CliError::new(format!(
            "--output {} is one file; give a folder for --count {}",
            a.output.display(),
            a.count
        )));
    }
    let base = SampleOptions {
        prompt: a.prompt.clone(),
        negative: a.negative.clone(),
        steps: a.steps,
        guidance: a.cfg,
        seed: a.seed,
        width: a.width,
        height: a.height,
    };
    base.validate()?;
    for e in &a.embedding {
        if !e.path.is_file() {
            return Err(CliError::new(format!(
                "embedding {}: no such file",
                e.path.display()
            )));
        }
    }
    let model = load_model(&a.model, &a.device)?;
    let mut encoder = encoder_with_words(model.clone(), &a.embedding)?;
    encoder.set_chunk_style(a.chunking.style());
    if let Some(n) = a.clip_skip {
        encoder.set_clip_skip(n)?;
    }
    let words = encoder.words();
    let used: Vec<&str> = words
        .iter()
        .map(|(w, _)| w.as_str())
        .filter(|w| {
            encoder.tokenize(&a.prompt).iter().any(|s| {
                s.learned
                    .is_some_and(|(i, _)| words.get(i).is_some_and(|(n, _)| n == w))
            })
        })
        .collect();
    if !words.is_empty() && used.is_empty() {
        eprintln!(
            "note: the prompt uses none of the learned words ({})",
            words
                .iter()
                .map(|(w, _)| w.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if !single_file {
        std::fs::create_dir_all(&a.output)
            .map_err(|e| CliError::new(format!("output folder {}: {e}", a.output.display())))?;
    }
    for k in 0..a.count {
        let opts = SampleOptions {
            seed: a.seed.wrapping_add(k),
            ..base.clone()
        };
        let start = Instant::now();
        let img = sample_image(&model, &encoder, &opts)?;
        let path = if single_file {
            a.output.clone()
        } else {
            a.output.join(format!("sample-{}.png", opts.seed))
        };
        sdti::app::plot::write_png(&path, &img)?;
        println!(
            "{} (seed {}, {:.1}s)",
            path.display(),
            opts.seed,
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
