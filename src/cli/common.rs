//! What the subcommands share: the error type that prints one line, device and dtype
//! options, model loading, `[WORD=]FILE` embedding arguments.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use candle_core::DType;
use clap::Args;
use sdti::model::{LoadOptions, SdModel};

/// An error for people: printed as one `error: ...` line.
#[derive(Debug)]
pub struct CliError {
    pub message: String,
    /// The process exit code (1 unless said otherwise).
    pub code: u8,
}

impl CliError {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: 1,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // One line, whatever the underlying error printed.
        let one_line: Vec<&str> = self
            .message
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        f.write_str(&one_line.join("; "))
    }
}

/// Engine errors, with configuration fields named as the command-line flags.
impl From<sdti::Error> for CliError {
    fn from(e: sdti::Error) -> Self {
        use sdti::Error as E;
        // Exhaustive: each kind of engine error says which flag it is about, if any.
        let message = match &e {
            E::Config { field, reason } => format!("{}: {reason}", flag_name(field)),
            E::LrSchedule(inner) => format!("{}: {inner}", flag_name("learning_rate")),
            E::Templates(inner) => format!("{}: {inner}", flag_name("templates")),
            E::Device(reason) => format!("{}: {reason}", flag_name("device")),
            E::Memory(reason) => {
                format!(
                    "{reason} (--resolution, --batch-size, --dtype, --recompute, --memory-budget)"
                )
            }
            E::Candle(_)
            | E::Io { .. }
            | E::Model { .. }
            | E::Weight { .. }
            | E::Scheduler(_)
            | E::Data(_)
            | E::Tokenizer(_)
            | E::Rng(_)
            | E::Input { .. }
            | E::Checkpoint { .. }
            | E::Embedding(_)
            | E::Cancelled => e.to_string(),
        };
        CliError::new(message)
    }
}

/// Errors of values parsed from the command line (the caller adds the flag).
macro_rules! cli_error_from {
    ($($t:ty),*) => {$(
        impl From<$t> for CliError {
            fn from(e: $t) -> Self {
                CliError::new(e.to_string())
            }
        }
    )*};
}
cli_error_from!(
    sdti::embedding::EmbeddingError,
    sdti::train::lr_schedule::LrScheduleError,
    sdti::model::scheduler::SchedulerError
);

/// The subcommand being run, set once by `main`: its flags name the configuration fields
/// in errors.
static SUBCOMMAND: OnceLock<clap::Command> = OnceLock::new();

/// Names configuration fields in errors by `command`'s flags from now on.
pub fn set_subcommand(command: clap::Command) {
    // Set once per process; a second call would be a second subcommand, which clap rules out.
    let _ = SUBCOMMAND.set(command);
}

/// The long flag of `command` that sets the configuration field `field`: the flag whose
/// clap id is the field's name (`max_steps` -> `--steps`, `guidance` -> `--cfg`), so the
/// argument definitions are the one table. A field no flag sets (`unet.layers_per_block`,
/// `run configuration`) is named as it is.
pub fn flag_for(command: &clap::Command, field: &str) -> String {
    command
        .get_arguments()
        .find(|arg| arg.get_id() == field)
        .and_then(|arg| arg.get_long())
        .map_or_else(|| field.to_string(), |long| format!("--{long}"))
}

/// [`flag_for`] the subcommand being run.
pub fn flag_name(field: &str) -> String {
    match SUBCOMMAND.get() {
        Some(command) => flag_for(command, field),
        None => field.to_string(),
    }
}

pub type CliResult<T> = Result<T, CliError>;

/// Adds what was being done to an error.
pub trait Context<T> {
    fn context(self, what: impl fmt::Display) -> CliResult<T>;
}

impl<T, E: Into<CliError>> Context<T> for Result<T, E> {
    fn context(self, what: impl fmt::Display) -> CliResult<T> {
        self.map_err(|e| {
            let e: CliError = e.into();
            CliError {
                message: format!("{what}: {}", e.message),
                code: e.code,
            }
        })
    }
}

/// Where and in which precision the model runs.
#[derive(Args, Clone, Debug)]
pub struct DeviceArgs {
    /// cpu, cuda, cuda:N or metal (accelerators need a build with --features cuda/metal)
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: String,
    /// Precision of the frozen UNet and VAE: auto (bf16 on CUDA, f32 elsewhere), f32, f16
    /// or bf16; the text encoder, the learned vectors, the optimizer and the loss stay f32
    #[arg(long, default_value = "auto", value_name = "DTYPE")]
    pub dtype: String,
}

impl DeviceArgs {
    pub fn load_options(&self) -> CliResult<LoadOptions> {
        let device = sdti::device::open_device(&self.device)?;
        let dtype = match self.dtype.to_ascii_lowercase().as_str() {
            "auto" => sdti::device::auto_dtype(&device),
            "f32" | "fp32" | "float32" => DType::F32,
            "f16" | "fp16" | "float16" | "half" => DType::F16,
            "bf16" | "bfloat16" => DType::BF16,
            other => {
                return Err(CliError::new(format!(
                    "--dtype: '{other}' is not auto, f32, f16 or bf16"
                )))
            }
        };
        Ok(LoadOptions {
            dtype,
            device,
            config: None,
        })
    }
}

/// Loads an SD 1.x, SD 2.x or SDXL model with one clear error line when it cannot, and
/// prints what loading decided from clues (the family, the prediction type and the rule
/// that chose it, how to override it) as `note:` lines on stderr, where a person sees them.
pub fn load_model(path: &Path, device: &DeviceArgs) -> CliResult<Arc<SdModel>> {
    load_model_checked(path, device, |_, _| Ok(()))
}

/// [`load_model`], calling `check` with the configuration read from the files' headers
/// and the load options before any weight is read ([`SdModel::load_checked`]).
pub fn load_model_checked(
    path: &Path,
    device: &DeviceArgs,
    check: impl FnOnce(&sdti::model::ModelConfig, &LoadOptions) -> sdti::Result<()>,
) -> CliResult<Arc<SdModel>> {
    let opts = device.load_options()?;
    let model =
        SdModel::load_checked(path, &opts, |config| check(config, &opts)).map_err(|e| match e {
            sdti::Error::Model { path, reason } => {
                CliError::new(format!("model {}: {reason}", path.display()))
            }
            memory @ sdti::Error::Memory(_) => CliError::from(memory),
            other => CliError::new(format!("model {}: {other}", path.display())),
        })?;
    for note in &model.notes {
        eprintln!("note: {note}");
    }
    Ok(Arc::new(model))
}

/// An `--embedding [WORD=]FILE` argument.
#[derive(Clone, Debug)]
pub struct EmbeddingArg {
    pub word: Option<String>,
    pub path: PathBuf,
}

impl std::str::FromStr for EmbeddingArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        // A `=` names the word unless the whole argument is an existing file.
        match s.split_once('=') {
            Some((w, p)) if !Path::new(s).exists() && !w.is_empty() && !p.is_empty() => {
                Ok(EmbeddingArg {
                    word: Some(w.to_string()),
                    path: p.into(),
                })
            }
            _ if s.is_empty() => Err("give a file, or WORD=FILE".into()),
            _ => Ok(EmbeddingArg {
                word: None,
                path: s.into(),
            }),
        }
    }
}

impl EmbeddingArg {
    /// The word: as given, else the file's stem (as A1111 names embeddings).
    pub fn word_or_stem(&self) -> String {
        self.word.clone().unwrap_or_else(|| {
            self.path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
    }
}

/// The long-prompt chunking of A1111 or ComfyUI.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunking {
    A1111,
    Comfyui,
}

impl Chunking {
    pub fn style(self) -> sdti::prompt::chunks::ChunkStyle {
        match self {
            Chunking::A1111 => sdti::prompt::chunks::ChunkStyle::A1111,
            Chunking::Comfyui => sdti::prompt::chunks::ChunkStyle::ComfyUi,
        }
    }
}

/// Writes `text` (JSON) to stdout with a newline.
pub fn print_json<T: serde::Serialize>(value: &T) -> CliResult<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CliError::new(format!("JSON output: {e}")))?;
    println!("{text}");
    Ok(())
}

/// Seconds as `1m05s` / `12.3s`.
pub fn human_duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "?".into();
    }
    if seconds < 60.0 {
        return format!("{seconds:.1}s");
    }
    let s = seconds.round() as u64;
    if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use sdti::app::run_folder::RunSettings;
    use sdti::train::TrainConfig;

    use super::*;

    fn subcommand(name: &str) -> clap::Command {
        super::super::Cli::command()
            .find_subcommand(name)
            .cloned()
            .unwrap_or_else(|| panic!("no subcommand {name}"))
    }

    fn fields(value: serde_json::Value) -> Vec<String> {
        match value {
            serde_json::Value::Object(map) => map.keys().cloned().collect(),
            other => panic!("not an object: {other}"),
        }
    }

    /// Every option a run folder saves is named in errors by a flag of `sdti train` (and
    /// `--resume` names the ones that differ the same way).
    #[test]
    fn every_saved_option_names_a_flag_of_train() {
        // `preview` is the group of the --preview-* options, not an option of its own.
        const NO_FLAG: [&str; 1] = ["preview"];
        let train = subcommand("train");
        let longs: Vec<String> = train
            .get_arguments()
            .filter_map(|a| a.get_long())
            .map(|l| format!("--{l}"))
            .collect();
        let train_fields = fields(serde_json::to_value(TrainConfig::default()).unwrap());
        let run_fields = fields(serde_json::to_value(RunSettings::default()).unwrap());
        assert!(train_fields.len() > 15, "{train_fields:?}");
        for field in train_fields.iter().chain(&run_fields) {
            let flag = flag_for(&train, field);
            if NO_FLAG.contains(&field.as_str()) {
                assert_eq!(&flag, field);
            } else {
                assert!(longs.contains(&flag), "{field} -> {flag}: no such flag");
            }
        }
        assert_eq!(flag_for(&train, "max_steps"), "--steps");
        assert_eq!(flag_for(&train, "learning_rate"), "--learning-rate");
    }

    /// Fields are found by the flags' ids, per subcommand; a field no flag sets is named as
    /// it is.
    #[test]
    fn flags_are_looked_up_by_id_in_the_subcommand() {
        let (train, sample) = (subcommand("train"), subcommand("sample"));
        assert_eq!(flag_for(&sample, "guidance"), "--cfg");
        assert_eq!(flag_for(&sample, "steps"), "--steps");
        assert_eq!(flag_for(&subcommand("demo"), "max_steps"), "--steps");
        assert_eq!(flag_for(&subcommand("bench"), "batch_size"), "--batch-size");
        // `steps` is the long name of train's `max_steps`, not a field of its own.
        assert_eq!(flag_for(&train, "steps"), "steps");
        assert_eq!(flag_for(&train, "guidance"), "guidance");
        assert_eq!(flag_for(&train, "device"), "--device");
        for field in ["unet.layers_per_block", "run configuration", "images"] {
            assert_eq!(flag_for(&train, field), field);
        }
    }
}
