//! The `sdti` command: a thin front on the engine. Each subcommand parses its options,
//! calls the engine and reports; run folders, previews and plots live in the library's
//! layer above the engine (`sdti::app::run_folder`, `sdti::app::preview`,
//! `sdti::app::plot`) so hosts can use them too.

mod bench;
mod common;
mod demo;
mod embedding;
mod sample;
mod train;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

const ABOUT: &str = "Textual Inversion for Stable Diffusion 1.x, 2.x and SDXL, natively: learn \
a new word from a few pictures, check what it draws, and convert it between the common embedding \
formats.";

const EXAMPLES: &str = "\
Examples:
  sdti demo                                   # a random tiny model, CPU, a few minutes
  sdti train --model v1-5.safetensors --token my-cat --init cat photos/ -o runs/my-cat
  sdti train --model sd_xl_base_1.0.safetensors --token my-cat --init cat photos/ -o runs/xl
  sdti sample --model v1-5.safetensors --embedding runs/my-cat/my-cat.pt \\
       --prompt \"a painting of my-cat\" --seed 1 -o samples/
  sdti inspect runs/my-cat/my-cat.pt --model v1-5.safetensors
  sdti inspect sd_xl_base_1.0.safetensors      # family, prediction type, defaults
  sdti convert my-cat.pt my-cat.safetensors
  sdti encode --embedding my-cat.pt \"a photo of my-cat\"
  sdti bench --config sd15 --resolution 512
  sdti bench --config sdxl --resolution 1024";

#[derive(Parser, Debug)]
#[command(name = "sdti", version, about = ABOUT, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Learn a word from images into a run folder (checkpoints, embeddings, previews, loss)
    #[command(after_help = train::EXAMPLES)]
    Train(Box<train::TrainArgs>),
    /// Draw images from a prompt that uses learned words (DDIM, classifier-free guidance)
    #[command(after_help = sample::EXAMPLES)]
    Sample(sample::SampleArgs),
    /// Convert an embedding file to another format
    #[command(after_help = embedding::CONVERT_EXAMPLES)]
    Convert(embedding::ConvertArgs),
    /// Show what an embedding file holds (and its nearest vocabulary tokens with --model),
    /// or what a model is (family, prediction type, the defaults it gives training)
    #[command(after_help = embedding::INSPECT_EXAMPLES)]
    Inspect(embedding::InspectArgs),
    /// Show a prompt's token ids and which slots carry learned vectors
    #[command(after_help = embedding::ENCODE_EXAMPLES)]
    Encode(embedding::EncodeArgs),
    /// Time training steps on a random SD 1.x, SD 2.x or SDXL model (or a given model)
    #[command(after_help = bench::EXAMPLES)]
    Bench(bench::BenchArgs),
    /// Train, export, encode and sample end to end: a random tiny model without --model
    #[command(after_help = demo::EXAMPLES)]
    Demo(demo::DemoArgs),
}

/// Parses the command line, runs the subcommand and turns an error into one line.
pub fn main() -> ExitCode {
    // The step's work then runs on this thread, its memory in the main arena, and
    // candle's element-wise threads spin briefly (src/model/awake.rs).
    sdti::model::awake::init_main_thread();
    // `Cli::parse()`, keeping the parsed subcommand's definition: errors name
    // configuration fields by its flags.
    let mut command = Cli::command();
    let matches = command.get_matches_mut();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut command).exit());
    if let Some(sub) = matches
        .subcommand_name()
        .and_then(|name| command.find_subcommand(name))
    {
        common::set_subcommand(sub.clone());
    }
    let result = match cli.command {
        Command::Train(a) => train::run(*a),
        Command::Sample(a) => sample::run(a),
        Command::Convert(a) => embedding::convert(a),
        Command::Inspect(a) => embedding::inspect(a),
        Command::Encode(a) => embedding::encode(a),
        Command::Bench(a) => bench::run(a),
        Command::Demo(a) => demo::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !e.message.is_empty() {
                eprintln!("error: {e}");
            }
            ExitCode::from(e.code)
        }
    }
}
