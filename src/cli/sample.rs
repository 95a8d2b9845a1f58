//! `sdti sample`: prompts with learned words to PNG files.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use sdti::app::preview::{sample_image, EmptyNegative, SampleOptions};
use sdti::model::scheduler::PredictionType;
use sdti::prompt::encoder::PromptEncoder;
use sdti::train::TrainConfig;

use super::common::{load_model, Chunking, CliError, CliResult, Context, DeviceArgs, EmbeddingArg};

pub const EXAMPLES: &str = "\
Examples:
  # Four pictures of a learned word (seeds 1..4), 30 DDIM steps, guidance 7.5
  sdti sample --model v1-5.safetensors --embedding my-cat.pt \\
       --prompt \"a watercolor painting of my-cat\" --seed 1 --count 4 -o samples/

  # Name the word yourself, use a negative prompt, write one file
  sdti sample --model ./sd15 --embedding cat=runs/my-cat/my-cat.safetensors \\
       --prompt \"cat on a sofa\" --negative \"blurry\" --cfg 5 -o cat.png

  # SDXL (1024x1024 by default) with a {clip_l, clip_g} word; SD 2.x 768-v draws 768x768
  sdti sample --model sd_xl_base_1.0.safetensors --embedding my-cat-xl.safetensors \\
       --prompt \"a photo of my-cat-xl\" -o samples/
  sdti sample --model ./stable-diffusion-2-1 --embedding my-cat-sd2.pt --prompt \"my-cat-sd2\"

Learned words are recognised as the bare word (A1111), embedding:word (ComfyUI) and
<word> (diffusers). Files are named sample-SEED.png in the --output folder.
SDXL: the UNet gets the pooled vector of the prompt's first chunk and the time ids
(H, W, 0, 0, H, W); an empty --negative gives zeros for the context and the pooled vector
(diffusers, A1111), or the encoded \"\" with --negative-encode (ComfyUI).";

#[derive(Args, Debug)]
pub struct SampleArgs {
    /// The model (SD 1.x, SD 2.x or SDXL): a diffusers folder or a single-file
    /// .safetensors checkpoint
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// A learned word's file, any format sdti reads; the word is its file stem unless
    /// written WORD=FILE (repeatable)
    #[arg(long, short, value_name = "[WORD=]FILE")]
    pub embedding: Vec<EmbeddingArg>,
    /// The prompt
    #[arg(long, short)]
    pub prompt: String,
    /// The negative prompt (empty: the encoded "" for SD 1.x and 2.x, zeros for SDXL)
    #[arg(long, default_value = "")]
    pub negative: String,
    /// SDXL with an empty --negative: encode "" as ComfyUI does, instead of zeros for the
    /// context and the pooled vector (diffusers, A1111). SD 1.x and 2.x always encode ""
    #[arg(long)]
    pub negative_encode: bool,
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
    /// Image width in pixels, a multiple of 8 [the model's: 512, 768 or 1024]
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height in pixels, a multiple of 8 [the model's: 512, 768 or 1024]
    #[arg(long)]
    pub height: Option<usize>,
    /// Override the model's prediction type: epsilon or v_prediction
    #[arg(long, value_name = "TYPE")]
    pub prediction_type: Option<String>,
    /// Override the model's zero-terminal-SNR noise schedule: on or off [the model's]; a
    /// word trained with `sdti train --zero-terminal-snr on` is drawn with it on
    #[arg(long, value_name = "on|off", value_parser = ["on", "off"])]
    pub zero_terminal_snr: Option<String>,
    /// Use the output of this CLIP layer from the end (1 = last; default: the model
    /// family's, 1 for SD 1.x, 2 for SD 2.x and SDXL)
    #[arg(long)]
    pub clip_skip: Option<usize>,
    /// How prompts longer than 75 tokens are split, and whose prompt weights are applied
    #[arg(long, value_enum, default_value = "a1111")]
    pub chunking: Chunking,
    /// Read brackets, weights and BREAK as plain text (no prompt weights)
    #[arg(long)]
    pub no_prompt_weights: bool,
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
    let mut encoder = PromptEncoder::for_model(&model)?;
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
    let prediction_type: Option<PredictionType> = match &a.prediction_type {
        Some(v) => Some(v.parse().context("--prediction-type")?),
        None => None,
    };
    let mut base = SampleOptions {
        prompt: a.prompt.clone(),
        negative: a.negative.clone(),
        empty_negative: if a.negative_encode {
            EmptyNegative::Encode
        } else {
            EmptyNegative::Zeros
        },
        prediction_type,
        zero_terminal_snr: a.zero_terminal_snr.as_deref().map(|v| v == "on"),
        steps: a.steps,
        guidance: a.cfg,
        seed: a.seed,
        // Checked here with a stand-in for a size not given; the model's comes after loading.
        width: a.width.unwrap_or(512),
        height: a.height.unwrap_or(512),
    };
    base.validate()?;
    if !a.no_prompt_weights {
        // A weight the host cannot read fails here, before the model loads.
        for (what, text) in [("--prompt", &a.prompt), ("--negative", &a.negative)] {
            sdti::prompt::weights::parse(text, a.chunking.style()).context(what)?;
        }
    }
    for e in &a.embedding {
        if !e.path.is_file() {
            return Err(CliError::new(format!(
                "embedding {}: no such file",
                e.path.display()
            )));
        }
    }
    let model = load_model(&a.model, &a.device)?;
    let prediction = prediction_type.unwrap_or(model.config.scheduler.prediction_type);
    let size = TrainConfig::family_resolution(model.config.family, prediction);
    base.width = a.width.unwrap_or(size);
    base.height = a.height.unwrap_or(size);
    let mut encoder = encoder_with_words(model.clone(), &a.embedding)?;
    encoder.set_chunk_style(a.chunking.style());
    encoder.set_prompt_weights(!a.no_prompt_weights);
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
