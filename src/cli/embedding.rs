//! `sdti convert`, `sdti inspect` and `sdti encode`: embedding files and prompts.

use std::path::{Path, PathBuf};

use candle_core::DType;
use clap::Args;
use sdti::embedding::{
    diffusers_sdxl_second_path, inspect as inspect_embedding, read_embedding, write_embedding_to,
    EmbeddingFile, Encoder, Existing, Format, Precision,
};
use sdti::prompt::chunks::{Slot, WeightedSlot};
use sdti::prompt::weights::weighted_chunks;
use sdti::prompt::Word;
use sdti::tokenizer::{ClipTokenizer, BOS, CONTEXT_LEN, EOS};
use serde::Serialize;

use super::common::{
    load_model, print_json, Chunking, CliError, CliResult, Context, DeviceArgs, EmbeddingArg,
};

pub const CONVERT_EXAMPLES: &str = "\
Examples:
  sdti convert my-cat.pt my-cat.safetensors               # A1111 .pt -> A1111 safetensors
  sdti convert learned_embeds.bin cat.pt --name cat       # diffusers -> A1111, word 'cat'
  sdti convert cat.pt learned_embeds.safetensors --format diffusers --precision f16
  # diffusers' SDXL pair (textual_inversion_sdxl.py) <-> one {clip_l, clip_g} file
  sdti convert learned_embeds.safetensors+learned_embeds_2.safetensors cat-xl.safetensors
  sdti convert textual_inversion_cat_sdxl/ cat-xl.safetensors   # a folder holding the pair
  sdti convert cat-xl.safetensors out/learned_embeds.safetensors --format diffusers-sdxl

Formats (reads all; writes all but png-pixels, webp-pixels and rinongal-pt):
  a1111-pt           A1111 .pt (torch zip, string_to_param)         .pt
  safetensors        A1111 / kohya safetensors (emb_params)          .safetensors
  diffusers          diffusers learned_embeds.safetensors {token}    .safetensors
  diffusers-bin      diffusers learned_embeds.bin {token}            .bin
  png                A1111 PNG with an sd-ti-embedding text chunk    .png
  png-pixels         A1111 PNG with the data in the pixel border     (read only)
  webp-pixels        the same in a lossless WebP (A1111 reads it)    (read only)
  sdxl               SDXL {clip_l, clip_g} safetensors               .safetensors
  onetrainer         OneTrainer safetensors (emp_params)             .safetensors
  kohya-pt           kohya sd-scripts .pt (emb_params)               .pt
  kohya-safetensors  kohya sd-scripts safetensors                    .safetensors
  rinongal-pt        rinongal/textual_inversion .pt                  (read only)
  diffusers-sdxl     diffusers' SDXL pair: DEST NAME.safetensors     .safetensors
                     {token: [n,768]} + NAME_2.safetensors {token: [n,1280]} beside it
SOURCE may be FIRST+SECOND, the two files of a diffusers SDXL pair (clip_l's 768-wide
file first), or a folder holding learned_embeds.safetensors and learned_embeds_2.safetensors.
An existing DEST (a file, a folder, a symlink, dangling or not) is kept unless
--overwrite is given; a pair is written whole or not at all. Without --format the format follows DEST's extension: .pt a1111-pt, .safetensors
safetensors, .bin diffusers-bin, .png png (an SDXL embedding goes to sdxl).";

pub const INSPECT_EXAMPLES: &str = "\
Examples:
  sdti inspect sd_xl_base_1.0.safetensors       # a model: family, prediction type, defaults
  sdti inspect ./stable-diffusion-2-1 --json
  sdti inspect my-cat.pt
  sdti inspect my-cat.pt --model v1-5.safetensors --top 8   # nearest vocabulary tokens
  sdti inspect learned_embeds.bin --json
  sdti inspect learned_embeds.safetensors+learned_embeds_2.safetensors   # diffusers SDXL pair";

pub const ENCODE_EXAMPLES: &str = "\
Examples:
  sdti encode --embedding my-cat.pt \"a photo of my-cat on a sofa\"
  sdti encode --embedding cat=learned_embeds.bin \"<cat>, oil painting\" --json
  sdti encode --chunking comfyui \"a very long prompt ...\"
  sdti encode -e my-cat.pt \"a photo of (my-cat:1.2) on a [table]\"   # weights per slot
  sdti encode --no-prompt-weights \"(brackets as text)\"";

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// The embedding to read (any format sdti reads; FIRST+SECOND or a folder for a diffusers SDXL pair)
    pub source: PathBuf,
    /// The file to write
    pub dest: PathBuf,
    /// The format to write (default: from DEST's extension)
    #[arg(long, short)]
    pub format: Option<String>,
    /// Precision of the written vectors: f32 or f16
    #[arg(long, default_value = "f32")]
    pub precision: String,
    /// Rename the word (the name stored in the file, and the diffusers token)
    #[arg(long)]
    pub name: Option<String>,
    /// Replace DEST when it exists
    #[arg(long)]
    pub overwrite: bool,
}

pub fn convert(a: ConvertArgs) -> CliResult<()> {
    // symlink_metadata: a dangling or looping symlink is something there too.
    if let (Some(kind), false) = (sdti::io::existing_kind(&a.dest), a.overwrite) {
        return Err(CliError::new(format!(
            "{} already exists ({kind}); pass --overwrite to replace it",
            a.dest.display()
        )));
    }
    let precision: Precision = a.precision.parse().context("--precision")?;
    let mut emb = read_embedding(&a.source)?;
    let format = match &a.format {
        Some(f) => f.parse::<Format>().context("--format")?,
        // An SDXL embedding goes to `sdxl` for .safetensors: `emb_params` holds one encoder.
        None => Format::from_extension(&a.dest, emb.parts.len() == 2).ok_or_else(|| {
            CliError::new(format!(
                "{}: cannot tell the format from the extension; pass --format",
                a.dest.display()
            ))
        })?,
    };
    note_pair_half(&a.source, &emb);
    // A pair's second file is as much the destination as DEST.
    let second = match format {
        Format::DiffusersSdxl => Some(diffusers_sdxl_second_path(&a.dest)?),
        _ => None,
    };
    if let (Some(second), false) = (&second, a.overwrite) {
        if let Some(kind) = sdti::io::existing_kind(second) {
            return Err(CliError::new(format!(
                "{} already exists ({kind}); it is the second file of the diffusers-sdxl pair {}: pass --overwrite to replace both",
                second.display(),
                a.dest.display()
            )));
        }
    }
    if let Some(name) = &a.name {
        emb.name = Some(name.clone());
    }
    let existing = if a.overwrite {
        Existing::Replace
    } else {
        Existing::Refuse
    };
    write_embedding_to(&a.dest, &emb, format, precision, existing)?;
    let written = match &second {
        Some(second) => format!("{} + {}", a.dest.display(), second.display()),
        None => a.dest.display().to_string(),
    };
    println!(
        "{} ({}) -> {written} ({format}, {})",
        a.source.display(),
        emb.source_format,
        a.precision.to_ascii_lowercase()
    );
    Ok(())
}

/// Says so on stderr when `path` read as one diffusers file and `NAME_2.safetensors` beside
/// it looks like the clip_g half of a diffusers SDXL pair (read alone, it is only clip_l).
fn note_pair_half(path: &Path, emb: &EmbeddingFile) {
    if emb.source_format != Format::DiffusersSafetensors {
        return;
    }
    let Ok(second) = diffusers_sdxl_second_path(path) else {
        return;
    };
    if second.is_file() {
        eprintln!(
            "note: {} beside it looks like the clip_g half of a diffusers SDXL pair; read this file alone it is only clip_l: give {}+{} for the SDXL word",
            second.display(),
            path.display(),
            second.display()
        );
    }
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The embedding file (any format sdti reads; FIRST+SECOND or a folder for a diffusers
    /// SDXL pair), or a model (a diffusers folder or a single-file checkpoint): its family,
    /// prediction type and the defaults training takes from it
    pub file: PathBuf,
    /// A model whose vocabulary gives the nearest tokens of each vector
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// How many nearest tokens per vector
    #[arg(long, default_value_t = 5)]
    pub top: usize,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Whether `path` holds a model rather than an embedding: a diffusers model folder
/// (`model_index.json` or a `unet/` folder), or a `.safetensors` file whose keys are a
/// checkpoint's (UNet, VAE or text-encoder prefixes of the LDM/SGM layouts).
fn looks_like_model(path: &Path) -> bool {
    if path.is_dir() {
        return path.join("model_index.json").is_file() || path.join("unet").is_dir();
    }
    let safetensors = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    if !safetensors || !path.is_file() {
        return false;
    }
    const PREFIXES: [&str; 4] = [
        "model.diffusion_model.",
        "first_stage_model.",
        "cond_stage_model.",
        "conditioner.",
    ];
    let mut index = sdti::model::weights::WeightIndex::default();
    index.map_file(path).is_ok_and(|keys| {
        keys.iter()
            .any(|(k, _)| PREFIXES.iter().any(|p| k.starts_with(p)))
    })
}

/// What `sdti inspect MODEL` reports.
#[derive(Serialize)]
struct ModelReport {
    model: PathBuf,
    family: String,
    prediction_type: String,
    zero_terminal_snr: bool,
    /// How loading decided (family, prediction type, the rule), as `train` prints it.
    notes: Vec<String>,
    /// What a learned word is made of: one width per text encoder (null where the
    /// shapes alone do not give the model's configuration).
    word_widths: Option<Vec<usize>>,
    /// The text encoders' layer training and sampling condition on by default.
    clip_skip: usize,
    /// The training resolution by default.
    resolution: usize,
    vae_scaling_factor: Option<f64>,
}

fn inspect_model(a: &InspectArgs) -> CliResult<()> {
    use sdti::model::clip::Conditioning;
    use sdti::model::files::{detect_model, index_model};
    use sdti::model::PredictionType;

    if a.model.is_some() {
        return Err(CliError::new(format!(
            "--model gives an embedding file's nearest tokens; {} is a model itself",
            a.file.display()
        )));
    }
    let model_err = |e: sdti::Error| match e {
        sdti::Error::Model { path, reason } => {
            CliError::new(format!("model {}: {reason}", path.display()))
        }
        other => CliError::new(format!("model {}: {other}", a.file.display())),
    };
    let detection = detect_model(&a.file).map_err(model_err)?;
    // Memory-mapped, not read: the widths and the VAE's scale of the files themselves. A
    // file whose configuration its shapes do not give (loading it needs one) still has a
    // family and a prediction type.
    let mut notes = detection.notes;
    let config = match index_model(
        &a.file,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
        None,
    ) {
        Ok(loaded) => Some(loaded.config),
        Err(sdti::Error::Model { reason, .. }) => {
            notes.push(format!("widths unknown: {reason}"));
            None
        }
        Err(e) => return Err(model_err(e)),
    };
    let family = detection.family;
    let first = match family {
        sdti::model::Family::Sdxl => Encoder::ClipL,
        _ => Encoder::Single,
    };
    let clip_skip = Conditioning::default_for(family, first)?.clip_skip;
    let prediction = detection.scheduler.prediction_type;
    let word_widths = config.as_ref().map(|c| {
        let mut widths = vec![c.text_encoder.hidden_size];
        widths.extend(c.text_encoder_2.as_ref().map(|c| c.hidden_size));
        widths
    });
    let report = ModelReport {
        model: a.file.clone(),
        family: family.model_name().to_string(),
        prediction_type: match prediction {
            PredictionType::Epsilon => "epsilon",
            PredictionType::VPrediction => "v_prediction",
        }
        .to_string(),
        zero_terminal_snr: detection.scheduler.rescale_betas_zero_snr,
        notes,
        word_widths,
        clip_skip,
        resolution: sdti::train::TrainConfig::family_resolution(family, prediction),
        vae_scaling_factor: config.as_ref().map(|c| c.vae.scaling_factor),
    };
    if a.json {
        return print_json(&report);
    }
    println!("model:       {}", report.model.display());
    println!("family:      {}", report.family);
    println!(
        "prediction:  {}{}",
        report.prediction_type,
        if report.zero_terminal_snr {
            ", zero terminal SNR"
        } else {
            ""
        }
    );
    let widths: Vec<String> = report
        .word_widths
        .iter()
        .flatten()
        .map(|w| w.to_string())
        .collect();
    let word = match widths.as_slice() {
        [] => "? wide".to_string(),
        [l, g] => format!("clip_l {l} + clip_g {g} wide (written as sdxl {{clip_l, clip_g}})"),
        _ => format!("{} wide", widths.join("+")),
    };
    println!("word:        {word}");
    println!(
        "defaults:    clip skip {}, resolution {}, VAE scale {}",
        report.clip_skip,
        report.resolution,
        report
            .vae_scaling_factor
            .map_or("?".to_string(), |v| v.to_string())
    );
    for note in &report.notes {
        println!("note:        {note}");
    }
    Ok(())
}

pub fn inspect(a: InspectArgs) -> CliResult<()> {
    if looks_like_model(&a.file) {
        return inspect_model(&a);
    }
    let emb = read_embedding(&a.file)?;
    note_pair_half(&a.file, &emb);
    let report = match &a.model {
        None => inspect_embedding(&emb, None, a.top),
        Some(path) => {
            let model = load_model(path, &a.device)?;
            let table = model.text_encoder.token_table()?;
            let dim = table.dim(1).map_err(sdti::Error::from)?;
            let values: Vec<f32> = table
                .to_dtype(DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .map_err(sdti::Error::from)?;
            let tokenizer =
                ClipTokenizer::new().map_err(|e| CliError::new(format!("tokenizer: {e}")))?;
            let name = |id: u32| tokenizer.decode(&[id]);
            if !emb.parts.iter().any(|p| p.dim == dim) {
                eprintln!(
                    "note: the model's tokens are {dim} wide and the file's vectors are not; no nearest tokens"
                );
            }
            inspect_embedding(&emb, Some((&values, dim, &name)), a.top)
        }
    };
    if a.json {
        print_json(&report)
    } else {
        println!("file:        {}", a.file.display());
        print!("{report}");
        Ok(())
    }
}

#[derive(Args, Debug)]
pub struct EncodeArgs {
    /// The prompt
    pub prompt: String,
    /// A learned word's file; the word is its file stem unless written WORD=FILE (repeatable)
    #[arg(long, short, value_name = "[WORD=]FILE")]
    pub embedding: Vec<EmbeddingArg>,
    /// How prompts longer than 75 tokens are split, and whose prompt-weight syntax is read
    #[arg(long, value_enum, default_value = "a1111")]
    pub chunking: Chunking,
    /// Read brackets, weights and BREAK as plain text (no prompt weights)
    #[arg(long)]
    pub no_prompt_weights: bool,
    /// Print JSON (every slot of every 77-slot chunk)
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct LearnedSlot {
    word: String,
    vector: usize,
}

#[derive(Serialize)]
struct SlotReport {
    /// The vocabulary id, or null where the slot carries a learned vector.
    id: Option<u32>,
    text: String,
    learned: Option<LearnedSlot>,
    /// The prompt weight; left out where it is 1.
    #[serde(skip_serializing_if = "is_one")]
    weight: f32,
}

fn is_one(w: &f32) -> bool {
    *w == 1.0
}

#[derive(Serialize)]
struct WordReport {
    name: String,
    vectors: usize,
    file: PathBuf,
}

#[derive(Serialize)]
struct EncodeReport {
    prompt: String,
    chunking: String,
    words: Vec<WordReport>,
    /// Slots per chunk: BOS, 75 prompt slots (EOS-padded), EOS.
    chunks: Vec<Vec<SlotReport>>,
    /// Positions (chunk, slot) of learned vectors.
    learned_slots: Vec<(usize, usize)>,
}

/// The learned words of `--embedding` arguments, their vectors placed one after another
/// (as the prompt encoder stacks them), and what to report of each.
fn read_words(args: &[EmbeddingArg]) -> CliResult<(Vec<Word>, Vec<WordReport>)> {
    let mut words = Vec::new();
    let mut reports = Vec::new();
    let mut offset = 0;
    for e in args {
        let emb = read_embedding(&e.path)?;
        let name = e.word_or_stem();
        let vectors = emb.parts.first().map_or(0, |p| p.vectors);
        words.push(Word {
            name: name.clone(),
            vectors,
            offset,
        });
        offset += vectors;
        reports.push(WordReport {
            name,
            vectors,
            file: e.path.clone(),
        });
    }
    Ok((words, reports))
}

fn slot_report(tokenizer: &ClipTokenizer, words: &[Word], weighted: &WeightedSlot) -> SlotReport {
    let weight = weighted.weight;
    match &weighted.slot {
        Slot::Token(id) => SlotReport {
            id: Some(*id),
            text: tokenizer.id_to_token(*id).unwrap_or("?").to_string(),
            learned: None,
            weight,
        },
        Slot::Learned { word, index } => {
            let name = words.get(*word).map_or("?", |w| w.name.as_str());
            SlotReport {
                id: None,
                text: format!("{name}#{index}"),
                learned: Some(LearnedSlot {
                    word: name.to_string(),
                    vector: *index,
                }),
                weight,
            }
        }
    }
}

/// The prompt's slots in 77-slot chunks with their weights, as the prompt encoder would
/// fill them.
fn encode_report(
    tokenizer: &ClipTokenizer,
    a: &EncodeArgs,
    words: &[Word],
    word_reports: Vec<WordReport>,
) -> CliResult<EncodeReport> {
    let chunks = weighted_chunks(
        tokenizer,
        &a.prompt,
        words,
        a.chunking.style(),
        !a.no_prompt_weights,
    )?;
    let learned_slots = chunks
        .iter()
        .enumerate()
        .flat_map(|(c, chunk)| {
            chunk
                .iter()
                .enumerate()
                .filter(|(_, s)| matches!(s.slot, Slot::Learned { .. }))
                .map(move |(i, _)| (c, i))
        })
        .collect();
    Ok(EncodeReport {
        prompt: a.prompt.clone(),
        chunking: format!("{:?}", a.chunking).to_ascii_lowercase(),
        words: word_reports,
        chunks: chunks
            .iter()
            .map(|chunk| {
                chunk
                    .iter()
                    .map(|slot| slot_report(tokenizer, words, slot))
                    .collect()
            })
            .collect(),
        learned_slots,
    })
}

/// "s" unless there is one.
fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// One chunk's slots up to the first EOS after the text; the padding is summarised.
fn print_chunk(tokenizer: &ClipTokenizer, c: usize, chunk: &[SlotReport]) {
    println!("chunk {c}:");
    let end = chunk
        .iter()
        .enumerate()
        .skip(1)
        .find(|(_, s)| s.id == Some(EOS))
        .map_or(chunk.len(), |(i, _)| i + 1);
    for (i, s) in chunk.iter().take(end).enumerate() {
        // The weight after the slot, where it is not 1.
        let weight = if s.weight == 1.0 {
            String::new()
        } else {
            format!("  x{}", s.weight)
        };
        match (&s.id, &s.learned) {
            (_, Some(l)) => println!("  {i:>3}  learned  {} vector {}{weight}", l.word, l.vector),
            (Some(id), None) => {
                let text = if *id == BOS || *id == EOS {
                    s.text.clone()
                } else {
                    tokenizer.decode(&[*id])
                };
                println!("  {i:>3}  {id:>7}  {text}{weight}");
            }
            (None, None) => {}
        }
    }
    if end < chunk.len() {
        println!("  ... {} padding slots ({EOS})", chunk.len() - end);
    }
}

fn print_report(tokenizer: &ClipTokenizer, report: &EncodeReport) {
    println!("prompt:   {}", report.prompt);
    for w in &report.words {
        println!(
            "word:     {} ({} vector{}, {})",
            w.name,
            w.vectors,
            plural(w.vectors),
            w.file.display()
        );
    }
    println!(
        "chunks:   {} of {CONTEXT_LEN} slots ({} chunking); {} learned slot{}",
        report.chunks.len(),
        report.chunking,
        report.learned_slots.len(),
        plural(report.learned_slots.len())
    );
    let weighted = report
        .chunks
        .iter()
        .flatten()
        .filter(|s| s.weight != 1.0)
        .count();
    if weighted > 0 {
        println!(
            "weights:  {weighted} slot{} weighted ({} reading; x = the weight)",
            plural(weighted),
            report.chunking
        );
    }
    for (c, chunk) in report.chunks.iter().enumerate() {
        print_chunk(tokenizer, c, chunk);
    }
}

pub fn encode(a: EncodeArgs) -> CliResult<()> {
    let tokenizer = ClipTokenizer::new().map_err(|e| CliError::new(format!("tokenizer: {e}")))?;
    let (words, word_reports) = read_words(&a.embedding)?;
    let report = encode_report(&tokenizer, &a, &words, word_reports)?;
    if a.json {
        return print_json(&report);
    }
    print_report(&tokenizer, &report);
    Ok(())
}
