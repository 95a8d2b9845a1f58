//! Noise schedule (DDPM forward process) and learning-rate schedules.
//!
//! * [`NoiseSchedule`] reproduces diffusers' `DDPMScheduler.__init__` tables in
//!   f32, operation for operation, so `alphas_cumprod` matches what the diffusers
//!   Textual Inversion example trains with (checked against
//!   `tests/fixtures/schedule_reference.json`, made by
//!   `tests/reference/make_schedule_fixtures.py`).
//! * [`LrSchedule`] covers a plain number, AUTOMATIC1111's schedule strings
//!   (`"0.005:100, 1e-3:1000, 1e-5"`) and diffusers' `get_scheduler` curves
//!   (constant, constant_with_warmup, linear, cosine).
//!
//! Step convention for every learning-rate function: `lr_at(step)` is the rate
//! for the optimizer step with 0-based index `step` (= number of steps already
//! completed). This is both what diffusers' `LambdaLR` yields (`base_lr *
//! lambda(step)`) and what A1111 applies before its step `embedding.step`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::rng::Rng;

/// Errors from schedule configuration and learning-rate strings.
#[derive(Debug, Error)]
pub enum ScheduleError {
    /// The scheduler config file could not be read.
    #[error("{}: cannot read scheduler config: {source}", path.display())]
    Io {
        /// File that failed.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The scheduler config is not valid JSON or has a field of the wrong type.
    #[error("{origin}: invalid scheduler config: {source}")]
    Json {
        /// File name or other description of where the JSON came from.
        origin: String,
        /// Underlying error (carries line and column).
        #[source]
        source: serde_json::Error,
    },
    /// A scheduler config field has a value we cannot use.
    #[error("{origin}: field '{field}': {reason}")]
    Field {
        /// File name or other description of where the config came from.
        origin: String,
        /// JSON field name.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A timestep outside `0..num_train_timesteps` was requested.
    #[error("timestep {t} is out of range: the schedule has {n} timesteps (0..{n})")]
    TimestepOutOfRange {
        /// Requested timestep.
        t: usize,
        /// Number of training timesteps.
        n: usize,
    },
    /// A learning-rate string could not be parsed.
    #[error("learning rate '{input}': {reason}")]
    LearningRate {
        /// The whole string as given.
        input: String,
        /// What is wrong, naming the offending part.
        reason: String,
    },
    /// An unknown diffusers scheduler name.
    #[error("lr scheduler '{name}' is not supported (use constant, constant_with_warmup, linear or cosine)")]
    UnknownLrScheduler {
        /// The name as given.
        name: String,
    },
}

// ---------------------------------------------------------------------------
// DDPM noise schedule
// ---------------------------------------------------------------------------

/// How betas are laid out over the training timesteps (diffusers' `beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    /// `linspace(beta_start, beta_end, n)`.
    Linear,
    /// `linspace(sqrt(beta_start), sqrt(beta_end), n)^2` — Stable Diffusion's schedule.
    ScaledLinear,
    /// Glide cosine schedule (`betas_for_alpha_bar`, max beta 0.999).
    SquaredCosCapV2,
}

impl BetaSchedule {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "linear" => Some(BetaSchedule::Linear),
            "scaled_linear" => Some(BetaSchedule::ScaledLinear),
            "squaredcos_cap_v2" => Some(BetaSchedule::SquaredCosCapV2),
            _ => None,
        }
    }
}

/// What the UNet predicts, hence what the training loss compares against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    /// The added noise (SD 1.x, SD 2.x base 512).
    Epsilon,
    /// `v = sqrt(ac) * noise - sqrt(1 - ac) * sample` (SD 2.x 768-v).
    VPrediction,
}

/// Typed DDPM configuration; [`Default`] equals diffusers' `DDPMScheduler()` defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct DdpmConfig {
    /// Number of diffusion timesteps (diffusers default 1000).
    pub num_train_timesteps: usize,
    /// First beta (default 0.0001).
    pub beta_start: f64,
    /// Last beta (default 0.02).
    pub beta_end: f64,
    /// Beta layout (default linear).
    pub beta_schedule: BetaSchedule,
    /// Explicit betas; when present they replace `beta_start/end/schedule`.
    pub trained_betas: Option<Vec<f64>>,
    /// Training target (default epsilon).
    pub prediction_type: PredictionType,
    /// Rescale betas to zero terminal SNR (Lin et al. 2023), default false.
    pub rescale_betas_zero_snr: bool,
}

impl Default for DdpmConfig {
    fn default() -> Self {
        DdpmConfig {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            rescale_betas_zero_snr: false,
        }
    }
}

/// The subset of `scheduler_config.json` that matters for training; other keys
/// (`_class_name`, `steps_offset`, `clip_sample`, ...) are ignored.
#[derive(Debug, Deserialize)]
struct RawSchedulerConfig {
    num_train_timesteps: Option<u64>,
    beta_start: Option<f64>,
    beta_end: Option<f64>,
    beta_schedule: Option<String>,
    trained_betas: Option<Vec<f64>>,
    prediction_type: Option<String>,
    rescale_betas_zero_snr: Option<bool>,
}

impl DdpmConfig {
    /// Stable Diffusion 1.x / 2.x schedule: scaled_linear, 0.00085 .. 0.012, 1000 steps.
    pub fn stable_diffusion() -> Self {
        DdpmConfig {
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            ..DdpmConfig::default()
        }
    }

    /// Reads a diffusers `scheduler/scheduler_config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ScheduleError> {
        let text =
            crate::io::read::read_text(path, &crate::io::read::SCHEDULER_CONFIG).map_err(|e| {
                ScheduleError::Io {
                    path: path.to_path_buf(),
                    source: e.into_reason(),
                }
            })?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parses scheduler config JSON; `origin` names the source in error messages.
    /// Missing or `null` fields take diffusers' `DDPMScheduler` defaults.
    pub fn from_json_str(json: &str, origin: &str) -> Result<Self, ScheduleError> {
        let raw: RawSchedulerConfig =
            serde_json::from_str(json).map_err(|source| ScheduleError::Json {
                origin: origin.to_string(),
                source,
            })?;
        let field = |field: &'static str, reason: String| ScheduleError::Field {
            origin: origin.to_string(),
            field,
            reason,
        };
        let d = DdpmConfig::default();
        let beta_schedule = match raw.beta_schedule.as_deref() {
            None => d.beta_schedule,
            Some(s) => BetaSchedule::parse(s).ok_or_else(|| {
                field(
                    "beta_schedule",
                    format!("'{s}' is not supported (linear, scaled_linear, squaredcos_cap_v2)"),
                )
            })?,
        };
        let prediction_type = match raw.prediction_type.as_deref() {
            None | Some("epsilon") => PredictionType::Epsilon,
            Some("v_prediction") => PredictionType::VPrediction,
            Some(s) => {
                return Err(field(
                    "prediction_type",
                    format!("'{s}' is not supported for training (epsilon, v_prediction)"),
                ))
            }
        };
        let num_train_timesteps = match (raw.num_train_timesteps, &raw.trained_betas) {
            (Some(n), _) => usize::try_from(n)
                .map_err(|_| field("num_train_timesteps", format!("{n} is too large")))?,
            // diffusers sizes the tables from trained_betas when they are given.
            (None, Some(b)) => b.len(),
            (None, None) => d.num_train_timesteps,
        };
        let cfg = DdpmConfig {
            num_train_timesteps,
            beta_start: raw.beta_start.unwrap_or(d.beta_start),
            beta_end: raw.beta_end.unwrap_or(d.beta_end),
            beta_schedule,
            trained_betas: raw.trained_betas,
            prediction_type,
            rescale_betas_zero_snr: raw.rescale_betas_zero_snr.unwrap_or(false),
        };
        cfg.validate(origin)?;
        Ok(cfg)
    }

    fn validate(&self, origin: &str) -> Result<(), ScheduleError> {
        let field = |field: &'static str, reason: String| ScheduleError::Field {
            origin: origin.to_string(),
            field,
            reason,
        };
        // Upper bound keeps table allocation sane for a hostile config.
        if self.num_train_timesteps < 2 || self.num_train_timesteps > 100_000 {
            return Err(field(
                "num_train_timesteps",
                format!("{} must be between 2 and 100000", self.num_train_timesteps),
            ));
        }
        if let Some(b) = &self.trained_betas {
            if b.len() != self.num_train_timesteps {
                return Err(field(
                    "trained_betas",
                    format!(
                        "has {} values but num_train_timesteps is {}",
                        b.len(),
                        self.num_train_timesteps
                    ),
                ));
            }
            if let Some((i, v)) = b
                .iter()
                .enumerate()
                .find(|(_, v)| !(v.is_finite() && **v > 0.0 && **v < 1.0))
            {
                return Err(field(
                    "trained_betas",
                    format!("value {i} is {v}; betas must be in (0, 1)"),
                ));
            }
        } else if self.beta_schedule != BetaSchedule::SquaredCosCapV2 {
            for (name, v) in [("beta_start", self.beta_start), ("beta_end", self.beta_end)] {
                if !(v.is_finite() && v > 0.0 && v < 1.0) {
                    return Err(field(name, format!("{v} must be in (0, 1)")));
                }
            }
        }
        Ok(())
    }
}

/// `torch.linspace(start, end, n, dtype=torch.float32)` as PyTorch's CPU kernel
/// computes it: f32 step, first half counted up from `start`, second half counted
/// down from `end` (so both endpoints are exact). Each element is one fused
/// multiply-add: the kernel is built with FP contraction, and only the FMA form
/// reproduces torch's output bit for bit (checked against the fixture).
fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    if n <= 1 {
        return vec![s; n];
    }
    let step = (e - s) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, s)
            } else {
                (-step).mul_add((n - i - 1) as f32, e)
            }
        })
        .collect()
}

/// `torch.cumprod` on a CPU float32 tensor: accumulates in f64 (ATen's CPU
/// `acc_type<float>`), rounding each output to f32.
fn torch_cumprod_f32(x: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    x.iter()
        .map(|&v| {
            acc *= f64::from(v);
            acc as f32
        })
        .collect()
}

/// diffusers `betas_for_alpha_bar(n)` with the cosine transform (computed in f64,
/// stored as f32).
fn squaredcos_cap_v2_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// diffusers `rescale_zero_terminal_snr`, in f32 like the torch original.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt_ac: Vec<f32> = torch_cumprod_f32(&alphas)
        .into_iter()
        .map(f32::sqrt)
        .collect();
    let (first, last) = match (sqrt_ac.first(), sqrt_ac.last()) {
        (Some(&f), Some(&l)) => (f, l),
        _ => return Vec::new(),
    };
    let scale = first / (first - last);
    for v in &mut sqrt_ac {
        *v = (*v - last) * scale;
    }
    let ac: Vec<f32> = sqrt_ac.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(ac.len());
    out.push(1.0 - ac[0]);
    for w in ac.windows(2) {
        out.push(1.0 - w[1] / w[0]);
    }
    out
}

/// Per-timestep coefficients: `result = sample_coef * x0 + noise_coef * noise`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Coefs {
    /// Multiplies the clean latent.
    pub sample_coef: f32,
    /// Multiplies the noise.
    pub noise_coef: f32,
}

/// DDPM forward-process tables, bit-compatible with diffusers' `DDPMScheduler`.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    betas: Vec<f32>,
    alphas_cumprod: Vec<f32>,
    prediction_type: PredictionType,
}

impl NoiseSchedule {
    /// Builds the tables for `cfg` (validated again, so hand-built configs are safe).
    pub fn new(cfg: &DdpmConfig) -> Result<Self, ScheduleError> {
        cfg.validate("DDPM config")?;
        let n = cfg.num_train_timesteps;
        let mut betas = match (&cfg.trained_betas, cfg.beta_schedule) {
            (Some(b), _) => b.iter().map(|&v| v as f32).collect(),
            (None, BetaSchedule::Linear) => torch_linspace_f32(cfg.beta_start, cfg.beta_end, n),
            (None, BetaSchedule::ScaledLinear) => {
                torch_linspace_f32(cfg.beta_start.sqrt(), cfg.beta_end.sqrt(), n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            (None, BetaSchedule::SquaredCosCapV2) => squaredcos_cap_v2_betas(n),
        };
        if cfg.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let alphas_cumprod = torch_cumprod_f32(&alphas);
        Ok(NoiseSchedule {
            betas,
            alphas_cumprod,
            prediction_type: cfg.prediction_type,
        })
    }

    /// Number of training timesteps; valid timesteps are `0..len()`.
    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// Betas, one per timestep.
    pub fn betas(&self) -> &[f32] {
        &self.betas
    }

    /// Cumulative products of `1 - beta`, one per timestep.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// The configured prediction type.
    pub fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }

    /// Uniform timestep in `0..num_train_timesteps` (as `torch.randint` in the
    /// diffusers example).
    pub fn random_timestep(&self, rng: &mut Rng) -> usize {
        rng.uniform_usize(self.num_train_timesteps())
    }

    fn ac(&self, t: usize) -> Result<f32, ScheduleError> {
        self.alphas_cumprod
            .get(t)
            .copied()
            .ok_or(ScheduleError::TimestepOutOfRange {
                t,
                n: self.alphas_cumprod.len(),
            })
    }

    /// `add_noise`: `x_t = sqrt(ac[t]) * x0 + sqrt(1 - ac[t]) * noise`.
    pub fn add_noise_coefs(&self, t: usize) -> Result<Coefs, ScheduleError> {
        let ac = self.ac(t)?;
        Ok(Coefs {
            sample_coef: ac.sqrt(),
            noise_coef: (1.0 - ac).sqrt(),
        })
    }

    /// `get_velocity`: `v = sqrt(ac[t]) * noise - sqrt(1 - ac[t]) * x0`.
    pub fn velocity_coefs(&self, t: usize) -> Result<Coefs, ScheduleError> {
        let ac = self.ac(t)?;
        Ok(Coefs {
            sample_coef: -(1.0 - ac).sqrt(),
            noise_coef: ac.sqrt(),
        })
    }

    /// Loss target for the configured prediction type: the noise itself for
    /// epsilon, the velocity for v_prediction.
    pub fn target_coefs(&self, t: usize) -> Result<Coefs, ScheduleError> {
        match self.prediction_type {
            PredictionType::Epsilon => {
                self.ac(t)?;
                Ok(Coefs {
                    sample_coef: 0.0,
                    noise_coef: 1.0,
                })
            }
            PredictionType::VPrediction => self.velocity_coefs(t),
        }
    }
}

// ---------------------------------------------------------------------------
// Learning-rate schedules
// ---------------------------------------------------------------------------

/// One entry of an A1111 schedule string.
#[derive(Debug, Clone, PartialEq)]
pub struct LrSegment {
    /// Learning rate.
    pub lr: f64,
    /// Applies to steps `< until_step`; `None` (bare rate or `:-1`) means to the end.
    pub until_step: Option<u64>,
}

/// diffusers `get_scheduler` names we reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiffusersLrKind {
    /// `"constant"`: always `base_lr`. Like diffusers, ignores `warmup_steps`.
    Constant,
    /// `"constant_with_warmup"`: linear ramp from 0, then `base_lr`.
    ConstantWithWarmup,
    /// `"linear"`: ramp, then linear decay to 0 at `total_steps`.
    Linear,
    /// `"cosine"`: ramp, then half-cosine to 0 at `total_steps` (num_cycles 0.5).
    Cosine,
}

/// A diffusers-style schedule: `base_lr * lambda(step)`.
#[derive(Debug, Clone, PartialEq)]
pub struct DiffusersLr {
    /// Curve shape.
    pub kind: DiffusersLrKind,
    /// Peak learning rate (the optimizer's `lr`).
    pub base_lr: f64,
    /// Linear warmup length in optimizer steps.
    pub warmup_steps: u64,
    /// Total optimizer steps (`max_train_steps`).
    pub total_steps: u64,
}

impl DiffusersLr {
    /// The `lr_lambda` multipliers from `diffusers.optimization`, same float order.
    fn factor(&self, step: u64) -> f64 {
        let s = step as f64;
        let w = self.warmup_steps;
        let ramp = |s: f64| s / (w.max(1) as f64);
        let denom = (self.total_steps.saturating_sub(w)).max(1) as f64;
        match self.kind {
            DiffusersLrKind::Constant => 1.0,
            DiffusersLrKind::ConstantWithWarmup if step < w => ramp(s),
            DiffusersLrKind::ConstantWithWarmup => 1.0,
            DiffusersLrKind::Linear if step < w => ramp(s),
            DiffusersLrKind::Linear => ((self.total_steps as f64 - s) / denom).max(0.0),
            DiffusersLrKind::Cosine if step < w => ramp(s),
            DiffusersLrKind::Cosine => {
                let progress = (s - w as f64) / denom;
                let num_cycles = 0.5;
                (0.5 * (1.0 + (std::f64::consts::PI * num_cycles * 2.0 * progress).cos())).max(0.0)
            }
        }
    }
}

/// Learning-rate schedule.
#[derive(Debug, Clone, PartialEq)]
pub enum LrSchedule {
    /// One rate for the whole run.
    Constant(f64),
    /// AUTOMATIC1111 schedule string, entries in increasing step order.
    Piecewise(Vec<LrSegment>),
    /// diffusers `get_scheduler` curve.
    Diffusers(DiffusersLr),
}

impl LrSchedule {
    /// Parses a plain number (`"5e-3"`) or an A1111 schedule string
    /// (`"0.005:100, 1e-3:1000, 1e-5"`).
    ///
    /// A1111 semantics (`modules/textual_inversion/learn_schedule.py`):
    /// `rate:step` applies while the 0-based step index is `< step`; a bare `rate`
    /// or `rate:-1` applies until the end of training. If every entry has a step,
    /// A1111 *stops training* once the last one is reached — see
    /// [`LrSchedule::stop_step`]. Unlike A1111 (which silently ignores them) we
    /// reject entries after an open-ended one, non-increasing steps, steps <= 0
    /// other than -1, negative or non-finite rates, and empty entries.
    pub fn parse(input: &str) -> Result<Self, ScheduleError> {
        let err = |reason: String| ScheduleError::LearningRate {
            input: input.to_string(),
            reason,
        };
        if input.trim().is_empty() {
            return Err(err("it is empty".to_string()));
        }
        let entries: Vec<&str> = input.split(',').map(str::trim).collect();
        let multi = entries.len() > 1;
        let ctx = |entry: &str| {
            if multi {
                format!(" (in entry '{entry}')")
            } else {
                String::new()
            }
        };
        let mut segments: Vec<LrSegment> = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            if entry.is_empty() {
                return Err(err(format!("entry {} is empty", i + 1)));
            }
            if let Some(prev) = segments.last() {
                if prev.until_step.is_none() {
                    return Err(err(format!(
                        "'{entry}' is never used: the entry before it already runs to the end of training"
                    )));
                }
            }
            let parts: Vec<&str> = entry.split(':').map(str::trim).collect();
            let (lr_text, step_text) = match parts.as_slice() {
                [lr] => (*lr, None),
                [lr, step] => (*lr, Some(*step)),
                _ => {
                    return Err(err(format!(
                        "'{entry}' has more than one ':' (expected rate or rate:step)"
                    )))
                }
            };
            let lr = match lr_text.parse::<f64>() {
                Ok(v) if v.is_finite() && v >= 0.0 => v,
                Ok(_) => {
                    return Err(err(format!(
                        "'{lr_text}' is not a usable learning rate (must be finite and >= 0){}",
                        ctx(entry)
                    )))
                }
                Err(_) => return Err(err(format!("'{lr_text}' is not a number{}", ctx(entry)))),
            };
            let until_step = match step_text {
                None => None,
                Some(st) => match st.parse::<i64>() {
                    Ok(-1) => None,
                    Ok(v) if v >= 1 => Some(v as u64),
                    Ok(v) => {
                        return Err(err(format!(
                        "step {v} must be a positive step number, or -1 for the end of training{}",
                        ctx(entry)
                    )))
                    }
                    Err(_) => {
                        return Err(err(format!("'{st}' is not a step number{}", ctx(entry))))
                    }
                },
            };
            if let (Some(prev), Some(now)) =
                (segments.last().and_then(|s| s.until_step), until_step)
            {
                if now <= prev {
                    return Err(err(format!(
                        "step {now} is not after the previous entry's step {prev}{}",
                        ctx(entry)
                    )));
                }
            }
            segments.push(LrSegment { lr, until_step });
        }
        match segments.as_slice() {
            [LrSegment {
                lr,
                until_step: None,
            }] if !input.contains(':') => Ok(LrSchedule::Constant(*lr)),
            _ => Ok(LrSchedule::Piecewise(segments)),
        }
    }

    /// Builds a diffusers `get_scheduler(name, ...)` schedule.
    ///
    /// Names: `constant` (ignores warmup, exactly like diffusers), `constant_with_warmup`,
    /// `linear`, `cosine`. diffusers' default in the Textual Inversion example is
    /// `constant` with `lr_warmup_steps=500`, which therefore means *no* warmup.
    pub fn diffusers(
        name: &str,
        base_lr: f64,
        warmup_steps: u64,
        total_steps: u64,
    ) -> Result<Self, ScheduleError> {
        let kind = match name.trim() {
            "constant" => DiffusersLrKind::Constant,
            "constant_with_warmup" => DiffusersLrKind::ConstantWithWarmup,
            "linear" => DiffusersLrKind::Linear,
            "cosine" => DiffusersLrKind::Cosine,
            other => {
                return Err(ScheduleError::UnknownLrScheduler {
                    name: other.to_string(),
                })
            }
        };
        if !(base_lr.is_finite() && base_lr >= 0.0) {
            return Err(ScheduleError::LearningRate {
                input: base_lr.to_string(),
                reason: "must be finite and >= 0".to_string(),
            });
        }
        Ok(LrSchedule::Diffusers(DiffusersLr {
            kind,
            base_lr,
            warmup_steps,
            total_steps,
        }))
    }

    /// Learning rate for the optimizer step with 0-based index `step`.
    ///
    /// For an A1111 schedule whose entries all have steps, steps at or past the
    /// last boundary return the last rate; A1111 itself would have stopped
    /// training there (use [`LrSchedule::stop_step`]).
    pub fn lr_at(&self, step: u64) -> f64 {
        match self {
            LrSchedule::Constant(lr) => *lr,
            LrSchedule::Piecewise(segs) => segs
                .iter()
                .find(|s| s.until_step.is_none_or(|u| step < u))
                .or(segs.last())
                .map_or(0.0, |s| s.lr),
            LrSchedule::Diffusers(d) => d.base_lr * d.factor(step),
        }
    }

    /// How many optimizer steps to run when the user asked for `max_steps`.
    ///
    /// Equals `max_steps` except for an A1111 schedule whose last entry has a step
    /// below `max_steps`: A1111's `LearnRateScheduler` marks itself finished when
    /// that step is reached and the training loop breaks, so training ends there.
    pub fn stop_step(&self, max_steps: u64) -> u64 {
        match self {
            LrSchedule::Piecewise(segs) => match segs.last().and_then(|s| s.until_step) {
                Some(last) => last.min(max_steps),
                None => max_steps,
            },
            _ => max_steps,
        }
    }
}

impl fmt::Display for LrSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LrSchedule::Constant(lr) => write!(f, "{lr}"),
            LrSchedule::Piecewise(segs) => {
                for (i, s) in segs.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    match s.until_step {
                        Some(u) => write!(f, "{}:{u}", s.lr)?,
                        None => write!(f, "{}", s.lr)?,
                    }
                }
                Ok(())
            }
            LrSchedule::Diffusers(d) => {
                let name = match d.kind {
                    DiffusersLrKind::Constant => "constant",
                    DiffusersLrKind::ConstantWithWarmup => "constant_with_warmup",
                    DiffusersLrKind::Linear => "linear",
                    DiffusersLrKind::Cosine => "cosine",
                };
                write!(
                    f,
                    "{name} (lr {}, warmup {}, total {})",
                    d.base_lr, d.warmup_steps, d.total_steps
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn fixture() -> Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/schedule_reference.json"
        );
        let text = std::fs::read_to_string(path).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn f32s(v: &Value) -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    }

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn ddpm_tables_match_diffusers_fixture() {
        let fx = fixture();
        let cases = fx["ddpm"].as_object().unwrap();
        assert!(cases.len() >= 5);
        for (name, case) in cases {
            let cfg =
                DdpmConfig::from_json_str(&case["config"].to_string(), name).unwrap_or_else(|e| {
                    panic!("{name}: {e}");
                });
            let sched = NoiseSchedule::new(&cfg).unwrap();
            let betas = f32s(&case["betas"]);
            let ac = f32s(&case["alphas_cumprod"]);
            assert_eq!(sched.betas().len(), betas.len(), "{name}");
            assert_eq!(sched.num_train_timesteps(), ac.len(), "{name}");
            // Zero-SNR goes through torch's CPU sqrt, which is not correctly rounded
            // (1 ulp off on this build), and `1 - ac[t]/ac[t-1]` amplifies that
            // ~1000x; everything else must match to the bit (betas) or within the
            // rounding of a 1000-term product (alphas_cumprod).
            let zero_snr = cfg.rescale_betas_zero_snr;
            let close = |got: f32, want: f32, max_ulps: u32| {
                if zero_snr {
                    (got - want).abs() <= 1e-3 * want.abs() + 1e-9
                } else {
                    ulps(got, want) <= max_ulps
                }
            };
            for (i, (&got, &want)) in sched.betas().iter().zip(&betas).enumerate() {
                assert!(
                    close(got, want, 0),
                    "{name}: beta[{i}] {got:e} vs diffusers {want:e}"
                );
            }
            for (i, (&got, &want)) in sched.alphas_cumprod().iter().zip(&ac).enumerate() {
                assert!(
                    close(got, want, 0),
                    "{name}: alphas_cumprod[{i}] {got:e} vs diffusers {want:e}"
                );
            }
            let ts: Vec<usize> = case["probe_timesteps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            let probes = [
                ("add_noise_sample_coef", 0),
                ("add_noise_noise_coef", 1),
                ("velocity_noise_coef", 2),
                ("velocity_sample_coef", 3),
            ];
            for (key, which) in probes {
                let want = f32s(&case[key]);
                for (&t, &w) in ts.iter().zip(&want) {
                    let an = sched.add_noise_coefs(t).unwrap();
                    let v = sched.velocity_coefs(t).unwrap();
                    let got = [an.sample_coef, an.noise_coef, v.noise_coef, v.sample_coef][which];
                    // torch's sqrt may be 1 ulp off (see above); ours is exact.
                    assert!(
                        ulps(got, w) <= 1 || (zero_snr && (got - w).abs() < 1e-6),
                        "{name}: {key} at t={t}: {got:e} vs {w:e}"
                    );
                }
            }
        }
    }

    #[test]
    fn sd_scaled_linear_exact_against_fixture_and_formula() {
        // The SD table must be bit-identical to diffusers (our linspace/cumprod
        // emulation is exact for it), and close to the f64 formula.
        let fx = fixture();
        let want = f32s(&fx["ddpm"]["sd15_scaled_linear"]["alphas_cumprod"]);
        let sched = NoiseSchedule::new(&DdpmConfig::stable_diffusion()).unwrap();
        for t in [0usize, 1, 500, 999] {
            assert_eq!(
                sched.alphas_cumprod()[t].to_bits(),
                want[t].to_bits(),
                "t={t}"
            );
        }
        // Independent f64 evaluation of the formula.
        let (a, b) = (0.00085f64.sqrt(), 0.012f64.sqrt());
        let mut acc = 1.0f64;
        let mut exact = Vec::new();
        for i in 0..1000 {
            let beta = (a + (b - a) * i as f64 / 999.0).powi(2);
            acc *= 1.0 - beta;
            exact.push(acc);
        }
        for t in [0usize, 1, 500, 999] {
            let got = f64::from(sched.alphas_cumprod()[t]);
            assert!(
                (got - exact[t]).abs() / exact[t] < 1e-4,
                "t={t}: {got} vs f64 {}",
                exact[t]
            );
        }
        // Well-known SD values.
        assert!((exact[0] - 0.99915).abs() < 1e-9);
        assert!((f64::from(sched.alphas_cumprod()[999]) - 0.0047).abs() < 1e-4);
    }

    #[test]
    fn scheduler_config_parsing() {
        let sd2v = r#"{
            "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0",
            "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "clip_sample": false, "num_train_timesteps": 1000,
            "prediction_type": "v_prediction", "set_alpha_to_one": false,
            "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null
        }"#;
        let cfg = DdpmConfig::from_json_str(sd2v, "sd2/scheduler_config.json").unwrap();
        assert_eq!(cfg.prediction_type, PredictionType::VPrediction);
        assert_eq!(
            DdpmConfig {
                prediction_type: PredictionType::Epsilon,
                ..cfg.clone()
            },
            DdpmConfig::stable_diffusion()
        );
        let s = NoiseSchedule::new(&cfg).unwrap();
        let v = s.target_coefs(10).unwrap();
        assert_eq!(v, s.velocity_coefs(10).unwrap());
        assert!(v.sample_coef < 0.0 && v.noise_coef > 0.9);

        assert_eq!(
            DdpmConfig::from_json_str("{}", "x").unwrap(),
            DdpmConfig::default()
        );

        let bad = DdpmConfig::from_json_str(r#"{"beta_schedule": "sigmoid"}"#, "cfg.json")
            .unwrap_err()
            .to_string();
        assert!(
            bad.contains("cfg.json") && bad.contains("beta_schedule") && bad.contains("sigmoid"),
            "{bad}"
        );
        let bad = DdpmConfig::from_json_str(r#"{"prediction_type": "sample"}"#, "c")
            .unwrap_err()
            .to_string();
        assert!(bad.contains("prediction_type"), "{bad}");
        let bad = DdpmConfig::from_json_str(r#"{"beta_start": "x"}"#, "c")
            .unwrap_err()
            .to_string();
        assert!(bad.contains("invalid scheduler config"), "{bad}");
        let bad = DdpmConfig::from_json_str(
            r#"{"trained_betas": [0.1, 0.2], "num_train_timesteps": 3}"#,
            "c",
        )
        .unwrap_err()
        .to_string();
        assert!(
            bad.contains("trained_betas") && bad.contains("2 values"),
            "{bad}"
        );
        assert!(DdpmConfig::from_json_str(r#"{"trained_betas": [0.1, 1.5]}"#, "c").is_err());
        assert!(DdpmConfig::from_json_str(r#"{"num_train_timesteps": 0}"#, "c").is_err());
        assert!(DdpmConfig::from_json_str(r#"{"beta_end": -0.1}"#, "c").is_err());
        assert!(
            DdpmConfig::from_file(Path::new("/nonexistent/scheduler_config.json"))
                .unwrap_err()
                .to_string()
                .contains("/nonexistent/scheduler_config.json")
        );
    }

    #[test]
    fn timestep_bounds_and_epsilon_target() {
        let s = NoiseSchedule::new(&DdpmConfig::stable_diffusion()).unwrap();
        assert!(matches!(
            s.add_noise_coefs(1000),
            Err(ScheduleError::TimestepOutOfRange { t: 1000, n: 1000 })
        ));
        assert!(s.velocity_coefs(1000).is_err());
        assert!(s.target_coefs(1000).is_err());
        let e = s.target_coefs(3).unwrap();
        assert_eq!((e.sample_coef, e.noise_coef), (0.0, 1.0));
        let c = s.add_noise_coefs(999).unwrap();
        // Coefficients form a unit vector (variance preserving), up to f32 rounding.
        assert!((c.sample_coef.powi(2) + c.noise_coef.powi(2) - 1.0).abs() < 1e-6);
        let mut rng = Rng::new(0);
        let mut seen_hi = false;
        for _ in 0..2000 {
            let t = s.random_timestep(&mut rng);
            assert!(t < 1000);
            seen_hi |= t > 900;
        }
        assert!(seen_hi);
    }

    #[test]
    fn diffusers_lr_curves_match_fixture() {
        let fx = fixture();
        let curves = fx["lr"].as_array().unwrap();
        assert!(curves.len() >= 4);
        for c in curves {
            let name = c["name"].as_str().unwrap();
            let sched = LrSchedule::diffusers(
                name,
                c["base_lr"].as_f64().unwrap(),
                c["warmup"].as_u64().unwrap(),
                c["total"].as_u64().unwrap(),
            )
            .unwrap();
            for (i, want) in c["lrs"].as_array().unwrap().iter().enumerate() {
                let want = want.as_f64().unwrap();
                let got = sched.lr_at(i as u64);
                assert!(
                    (got - want).abs() <= 1e-15 * want.abs().max(1e-12),
                    "{name}: step {i}: {got:e} vs diffusers {want:e}"
                );
            }
        }
    }

    #[test]
    fn diffusers_lr_shape_and_errors() {
        let cos = LrSchedule::diffusers("cosine", 1.0, 10, 110).unwrap();
        assert_eq!(cos.lr_at(0), 0.0);
        assert_eq!(cos.lr_at(5), 0.5);
        assert_eq!(cos.lr_at(10), 1.0);
        assert!((cos.lr_at(60) - 0.5).abs() < 1e-12);
        assert!(cos.lr_at(110).abs() < 1e-12);
        let constant = LrSchedule::diffusers("constant", 2.0, 500, 1000).unwrap();
        assert_eq!(constant.lr_at(0), 2.0, "diffusers' constant ignores warmup");
        let lin = LrSchedule::diffusers("linear", 1.0, 0, 4).unwrap();
        let got: Vec<f64> = (0..6).map(|s| lin.lr_at(s)).collect();
        assert_eq!(got, [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]);
        assert!(matches!(
            LrSchedule::diffusers("polynomial", 1.0, 0, 10),
            Err(ScheduleError::UnknownLrScheduler { .. })
        ));
        assert!(LrSchedule::diffusers("linear", f64::NAN, 0, 10).is_err());
    }

    #[test]
    fn a1111_schedule_semantics() {
        let s = LrSchedule::parse("0.005:100, 1e-3:1000, 1e-5").unwrap();
        assert_eq!(s.lr_at(0), 0.005);
        assert_eq!(s.lr_at(99), 0.005);
        assert_eq!(
            s.lr_at(100),
            1e-3,
            "boundary step belongs to the next entry"
        );
        assert_eq!(s.lr_at(999), 1e-3);
        assert_eq!(s.lr_at(1000), 1e-5);
        assert_eq!(s.lr_at(50_000), 1e-5);
        assert_eq!(s.stop_step(3000), 3000);

        // All entries bounded: A1111 stops training at the last step.
        let s = LrSchedule::parse("0.01:500,0.001:1500").unwrap();
        assert_eq!(s.stop_step(3000), 1500);
        assert_eq!(s.stop_step(800), 800);
        assert_eq!(s.lr_at(1499), 0.001);
        assert_eq!(s.lr_at(2000), 0.001);

        let s = LrSchedule::parse("0.01:200, 0.002:-1").unwrap();
        assert_eq!(s.lr_at(5000), 0.002);
        assert_eq!(s.stop_step(5000), 5000);

        assert_eq!(
            LrSchedule::parse(" 5e-3 ").unwrap(),
            LrSchedule::Constant(0.005)
        );
        assert_eq!(LrSchedule::parse("0.005").unwrap().lr_at(123), 0.005);
        let round = LrSchedule::parse("0.005:100, 0.001:1000, 0.00001").unwrap();
        assert_eq!(round.to_string(), "0.005:100, 0.001:1000, 0.00001");
        assert_eq!(LrSchedule::parse(&round.to_string()).unwrap(), round);
    }

    #[test]
    fn a1111_schedule_errors_name_the_problem() {
        let cases = [
            (
                "0.005:abc",
                "learning rate '0.005:abc': 'abc' is not a step number",
            ),
            ("abc", "'abc' is not a number"),
            ("", "empty"),
            ("0.005:100,", "entry 2 is empty"),
            ("0.005:100, x:200", "'x' is not a number (in entry 'x:200')"),
            (
                "0.01:500, 0.001:100",
                "step 100 is not after the previous entry's step 500",
            ),
            ("0.01, 0.001:100", "'0.001:100' is never used"),
            ("0.01:-1, 0.001", "'0.001' is never used"),
            ("0.01:0", "step 0 must be a positive step number"),
            ("0.01:-5", "step -5 must be a positive step number"),
            ("0.01:1:2", "more than one ':'"),
            ("-0.01", "not a usable learning rate"),
            ("inf", "not a usable learning rate"),
            ("0.01:1.5", "'1.5' is not a step number"),
        ];
        for (input, needle) in cases {
            let msg = LrSchedule::parse(input).unwrap_err().to_string();
            assert!(msg.contains(needle), "{input:?}: got {msg:?}");
        }
    }

    #[test]
    fn linspace_endpoints_exact_and_single_point() {
        let v = torch_linspace_f32(0.1, 0.7, 7);
        assert_eq!(v[0], 0.1f32);
        assert_eq!(v[6], 0.7f32);
        assert_eq!(torch_linspace_f32(0.3, 0.9, 1), vec![0.3f32]);
        assert!(torch_linspace_f32(0.3, 0.9, 0).is_empty());
    }
}
