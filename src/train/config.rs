//! Every training option, with its defaults and their references, checked once.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::lr_schedule::{DiffusersLrKind, LrSchedule};
use crate::error::{Error, Result};
use crate::model::{Family, ModelConfig, PredictionType, Recompute, SchedulerConfig};

/// How the learned vectors start.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Init {
    /// The token vectors of a text, repeated or truncated to the vector count (A1111).
    Text(String),
    Zeros,
    /// Gaussian with the token table's standard deviation.
    Random,
}

/// Which prompt templates to train with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Templates {
    /// The paper's / diffusers' object list ("a photo of a {}", ...).
    Object,
    /// The paper's / diffusers' style list ("a painting in the style of {}", ...).
    Style,
    /// An A1111-style template file (`[name]`, `[filewords]`).
    File(PathBuf),
    /// Given templates.
    List(Vec<String>),
}

/// Every training option. Defaults name their reference.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// The word the vectors are learned for.
    pub token: String,
    /// Default: the text "*" (A1111's default initialization text).
    pub init: Init,
    /// Vectors per token (A1111 default 1).
    pub vectors: usize,
    /// Training resolution in pixels, a multiple of 8. `None`: the model family's, the
    /// resolution each was trained at ([`TrainConfig::family_resolution`]: 512 for SD 1.x
    /// and SD 2.x base, 768 for the v-prediction SD 2.x models, 1024 for SDXL);
    /// [`crate::train::Trainer::new`] fills it in, as it does `clip_skip`, so a run's
    /// checkpoints record the value it trained at (and those written when this was a
    /// plain number read back as that number).
    pub resolution: Option<usize>,
    /// Center crop (diffusers' default) or random crop (one crop per image, cached).
    pub random_crop: bool,
    /// Probability of the horizontally flipped view (diffusers' flip_p 0.5).
    pub flip_probability: f64,
    /// A number or an A1111 schedule (A1111 default 0.005), parsed where it enters
    /// (`LrSchedule::parse`); stored in `config.json` and checkpoints as its text.
    #[serde(with = "schedule_text")]
    pub learning_rate: LrSchedule,
    /// diffusers' get_scheduler curve (`constant`, `constant_with_warmup`, `linear`,
    /// `cosine`); when set, `learning_rate` must be a plain number.
    #[serde(with = "lr_scheduler_name")]
    pub lr_scheduler: Option<DiffusersLrKind>,
    pub lr_warmup_steps: u64,
    /// Optimizer steps (the diffusers example README runs 3000).
    pub max_steps: u64,
    /// Images per micro-batch (diffusers' train_batch_size default 1... its README uses 4).
    pub batch_size: usize,
    /// Micro-batches per optimizer step (A1111 and diffusers default 1).
    pub gradient_accumulation: usize,
    /// AdamW as diffusers' example configures it: 0.9, 0.999, 1e-8, weight decay 1e-2.
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub weight_decay: f64,
    /// Clip the gradient's L2 norm (off by default, as in both references).
    pub max_grad_norm: Option<f64>,
    pub seed: u64,
    pub templates: Templates,
    /// `hidden_states[-clip_skip]` of the full-depth text encoder (1 = the last layer).
    /// `None`: the model family's, as each was trained (1 for SD 1.x, 2 for SD 2.x, whose
    /// OpenCLIP encoder conditions on its penultimate block, and for SDXL's two encoders);
    /// [`crate::train::Trainer::new`] fills it in, so a run's checkpoints record the value
    /// it trained with.
    pub clip_skip: Option<usize>,
    /// Overrides the model's scheduler `prediction_type` (`epsilon` / `v_prediction`).
    pub prediction_type: Option<PredictionType>,
    /// Overrides the model's `rescale_betas_zero_snr` (zero terminal SNR, as the
    /// v-prediction SDXL fine-tunes are trained: NoobAI-XL V-Pred and the like). `None`:
    /// the model's, from its scheduler config or its `ztsnr` marker.
    pub zero_terminal_snr: Option<bool>,
}

/// `LrSchedule` as the text `LrSchedule::parse` reads back (a number or A1111's string).
mod schedule_text {
    use super::LrSchedule;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(lr: &LrSchedule, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(lr)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<LrSchedule, D::Error> {
        let text = String::deserialize(d)?;
        LrSchedule::parse(&text)
            .map_err(|e| serde::de::Error::custom(format!("learning_rate: {e}")))
    }
}

/// `Option<DiffusersLrKind>` as diffusers' name, or null.
mod lr_scheduler_name {
    use super::DiffusersLrKind;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(k: &Option<DiffusersLrKind>, s: S) -> Result<S::Ok, S::Error> {
        match k {
            Some(k) => s.serialize_some(k.name()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<DiffusersLrKind>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|name| {
                name.parse()
                    .map_err(|e| serde::de::Error::custom(format!("lr_scheduler: {e}")))
            })
            .transpose()
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            token: "sdti-word".into(),
            init: Init::Text("*".into()),
            vectors: 1,
            resolution: None,
            random_crop: false,
            flip_probability: 0.5,
            learning_rate: LrSchedule::Constant(0.005),
            lr_scheduler: None,
            lr_warmup_steps: 0,
            max_steps: 3000,
            batch_size: 1,
            gradient_accumulation: 1,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            weight_decay: 1e-2,
            max_grad_norm: None,
            seed: 0,
            templates: Templates::Object,
            clip_skip: None,
            prediction_type: None,
            zero_terminal_snr: None,
        }
    }
}

impl TrainConfig {
    /// Checks every value, naming the field that is wrong.
    pub fn validate(&self) -> Result<()> {
        crate::names::check_word_name(&self.token).map_err(|why| Error::config("token", why))?;
        if !(1..=75).contains(&self.vectors) {
            return Err(Error::config(
                "vectors",
                format!("{} is outside 1..=75", self.vectors),
            ));
        }
        if let Some(r) = self.resolution {
            if r < 64 || !r.is_multiple_of(8) || r > 4096 {
                return Err(Error::config(
                    "resolution",
                    format!("{r} must be a multiple of 8 between 64 and 4096"),
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.flip_probability) {
            return Err(Error::config("flip_probability", "must be within 0..=1"));
        }
        if self.batch_size == 0 || self.batch_size > 256 {
            return Err(Error::config(
                "batch_size",
                format!("{} is outside 1..=256", self.batch_size),
            ));
        }
        if self.max_steps == 0 {
            return Err(Error::config("max_steps", "must be at least 1"));
        }
        if self.gradient_accumulation == 0 {
            return Err(Error::config("gradient_accumulation", "must be at least 1"));
        }
        for (field, v) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                return Err(Error::config(field, format!("{v} is outside [0, 1)")));
            }
        }
        if !(self.adam_epsilon.is_finite() && self.adam_epsilon > 0.0) {
            return Err(Error::config(
                "adam_epsilon",
                format!("{} must be positive", self.adam_epsilon),
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(Error::config(
                "weight_decay",
                format!("{} must be zero or positive", self.weight_decay),
            ));
        }
        if let Some(n) = self.max_grad_norm {
            if !n.is_finite() || n <= 0.0 {
                return Err(Error::config(
                    "max_grad_norm",
                    format!("{n} must be positive"),
                ));
            }
        }
        if self.clip_skip == Some(0) {
            return Err(Error::config("clip_skip", "must be at least 1"));
        }
        self.lr_schedule()?;
        Ok(())
    }

    /// The resolution a model family was trained at, the default of `resolution`: SDXL
    /// 1024 (`sd_xl_base.yaml`, OneTrainer's SDXL presets), SD 2.x with v-prediction 768
    /// (the 768-v models; `v2-inference-v.yaml`), everything else 512 (SD 1.x, SD 2.x
    /// base). `prediction` is the run's (the model's, or `prediction_type` where given).
    pub fn family_resolution(family: Family, prediction: PredictionType) -> usize {
        match (family, prediction) {
            (Family::Sdxl, _) => 1024,
            (Family::Sd2, PredictionType::VPrediction) => 768,
            _ => 512,
        }
    }

    /// The noise schedule's configuration a run of these options trains `model` with: the
    /// model's, with `prediction_type` and `zero_terminal_snr` where they override it
    /// ([`SchedulerConfig::with_overrides`], which previews use too).
    pub fn scheduler_for(&self, model: &ModelConfig) -> SchedulerConfig {
        model
            .scheduler
            .with_overrides(self.prediction_type, self.zero_terminal_snr)
    }

    /// The resolution a run of these options trains `model` at: `resolution`, else the
    /// family's for the prediction type the run uses ([`TrainConfig::family_resolution`]).
    pub fn resolution_for(&self, model: &ModelConfig) -> usize {
        self.resolution.unwrap_or_else(|| {
            let prediction = self
                .prediction_type
                .unwrap_or(model.scheduler.prediction_type);
            Self::family_resolution(model.family, prediction)
        })
    }

    /// The learning-rate schedule these options describe.
    pub fn lr_schedule(&self) -> Result<LrSchedule> {
        match (self.lr_scheduler, &self.learning_rate) {
            (None, lr) => Ok(lr.clone()),
            (Some(kind), LrSchedule::Constant(base)) => {
                LrSchedule::diffusers(kind, *base, self.lr_warmup_steps, self.max_steps)
                    .map_err(Error::from)
            }
            (Some(kind), other) => Err(Error::config(
                "learning_rate",
                format!(
                    "'{other}' must be a number when lr_scheduler is '{}'",
                    kind.name()
                ),
            )),
        }
    }
}

/// Whether a run recomputes the UNet blocks' activations in the backward pass
/// ([`Recompute`]): always, never, or only when the step would not fit in memory without.
///
/// Not a [`TrainConfig`] field, and not stored in a run folder or a checkpoint: recompute
/// changes a step's memory and time, never its numbers (each block reruns the same ops in
/// the same order), so a run may continue with another choice or on another machine,
/// while a checkpoint and `--resume` compare every [`TrainConfig`] field. Like the device,
/// each invocation chooses it ([`crate::train::Trainer::choose_recompute`]).
///
/// The default is [`RecomputeMode::Auto`]: the people who train are on their own GPU or
/// CPU, where a run that runs out of memory is lost (or swaps for hours) and a run that
/// fits should not pay the extra forward pass; auto keeps recompute off wherever the step
/// fits, so a run that fitted before is as fast as before.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecomputeMode {
    /// Keep every block's activations (fastest, most memory).
    Off,
    /// Keep only the blocks' inputs; about one more UNet forward pass per step. Measured
    /// with `sdti bench` on a random SD 1.5 (f32, batch 1, a shared 2-core CPU): 27% and
    /// 41% longer steps at 256 px in two interleaved pairs, 21% at 512 px, for 185 MiB
    /// (256 px) and 657 MiB (512 px) less peak memory (`crate::model::memory`).
    On,
    /// Off when the estimated peak fits the memory budget, else on.
    #[default]
    Auto,
}

impl RecomputeMode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::On => "on",
            Self::Auto => "auto",
        }
    }
}

impl std::fmt::Display for RecomputeMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for RecomputeMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "off" => Ok(Self::Off),
            "on" => Ok(Self::On),
            "auto" => Ok(Self::Auto),
            other => Err(Error::config(
                "recompute",
                format!("'{other}' is not off, on or auto"),
            )),
        }
    }
}

/// Where the memory budget of an automatic recompute choice came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BudgetSource {
    /// Given by the user (`--memory-budget`, `memory_budget_mib`).
    Given,
    /// What this process holds plus the system's `MemAvailable` when training started.
    Available,
}

/// A memory budget in bytes for the process's peak during a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryBudget {
    pub bytes: u64,
    pub source: BudgetSource,
}

/// What [`RecomputeMode`] decided, and on what grounds (printed by the CLI).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecomputeChoice {
    pub mode: RecomputeMode,
    pub recompute: Recompute,
    /// Estimated peak bytes of a step without and with recompute (weights included).
    pub peak_off: u64,
    pub peak_on: u64,
    /// The estimated peak of the step as chosen: `peak_off`, `peak_on`, or in between when
    /// auto reruns only some transformers.
    pub peak: u64,
    /// When auto reruns only some of the UNet's spatial transformers
    /// ([`Recompute::Transformers`]): how many, of how many.
    pub transformers: Option<(usize, usize)>,
    /// The budget auto compared with (None: none was known, or the mode was not auto).
    pub budget: Option<MemoryBudget>,
}

impl RecomputeChoice {
    /// The choice for `mode` from the estimates and the budget: auto recomputes only when
    /// the step without recompute would not fit (and without a budget it does not), and
    /// then as little as fits: the first of `partial` (rerunning more and more of the
    /// transformers, with each one's estimated peak) that fits the budget, else every
    /// block. `transformer_count` is how many spatial transformers the UNet has
    /// (`partial` may stop short of all of them: `memory::recompute_order`).
    pub fn decide(
        mode: RecomputeMode,
        peak_off: u64,
        peak_on: u64,
        partial: &[(Recompute, u64)],
        transformer_count: usize,
        budget: Option<MemoryBudget>,
    ) -> Self {
        let mut transformers = None;
        let (recompute, peak) = match (mode, budget) {
            (RecomputeMode::Off, _) => (Recompute::Off, peak_off),
            (RecomputeMode::On, _) => (Recompute::On, peak_on),
            (RecomputeMode::Auto, Some(b)) if peak_off > b.bytes => {
                match partial.iter().position(|&(_, peak)| peak <= b.bytes) {
                    Some(i) => {
                        transformers = Some((i + 1, transformer_count));
                        partial[i]
                    }
                    None => (Recompute::On, peak_on),
                }
            }
            (RecomputeMode::Auto, _) => (Recompute::Off, peak_off),
        };
        Self {
            mode,
            recompute,
            peak_off,
            peak_on,
            peak,
            transformers,
            budget: if mode == RecomputeMode::Auto {
                budget
            } else {
                None
            },
        }
    }
}

impl std::fmt::Display for RecomputeChoice {
    /// `recompute off (auto: a step needs about 6.2 GiB without recompute, 4.9 GiB with;
    /// 9.8 GiB available)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
        let on = self.recompute == Recompute::On;
        let mut estimate = format!(
            "a step needs about {:.1} GiB without recompute, {:.1} GiB with",
            gib(self.peak_off),
            gib(self.peak_on)
        );
        match self.transformers {
            Some((k, n)) => {
                write!(f, "recompute on for {k} of the UNet's {n} transformers")?;
                estimate += &format!(", {:.1} GiB with it for those", gib(self.peak));
            }
            None => write!(f, "recompute {}", if on { "on" } else { "off" })?,
        }
        match (self.mode, self.budget) {
            (RecomputeMode::Auto, Some(b)) => {
                let what = match b.source {
                    BudgetSource::Given => "budget",
                    BudgetSource::Available => "available",
                };
                write!(f, " (auto: {estimate}; {:.1} GiB {what}", gib(b.bytes))?;
                if on && self.peak_on > b.bytes {
                    write!(f, "; even that may not fit")?;
                }
                write!(f, ")")
            }
            (RecomputeMode::Auto, None) => write!(
                f,
                " (auto: no memory budget known on this device; give one to let auto choose; {estimate})"
            ),
            _ => write!(f, " (as asked; {estimate})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recompute_modes_parse_and_decide() {
        for (text, mode) in [
            ("off", RecomputeMode::Off),
            ("ON", RecomputeMode::On),
            (" auto", RecomputeMode::Auto),
        ] {
            assert_eq!(text.parse::<RecomputeMode>().unwrap(), mode);
        }
        let err = "sometimes"
            .parse::<RecomputeMode>()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("recompute") && err.contains("sometimes"),
            "{err}"
        );
        assert_eq!(RecomputeMode::default(), RecomputeMode::Auto);

        let budget = |bytes| {
            Some(MemoryBudget {
                bytes,
                source: BudgetSource::Given,
            })
        };
        let decide = |mode, b| RecomputeChoice::decide(mode, 100, 60, &[], 3, b).recompute;
        assert_eq!(decide(RecomputeMode::Auto, budget(100)), Recompute::Off);
        assert_eq!(decide(RecomputeMode::Auto, budget(99)), Recompute::On);
        // No budget known (a GPU without one): off, as before recompute existed.
        assert_eq!(decide(RecomputeMode::Auto, None), Recompute::Off);
        assert_eq!(decide(RecomputeMode::Off, budget(1)), Recompute::Off);
        assert_eq!(decide(RecomputeMode::On, budget(1000)), Recompute::On);
        let tight = RecomputeChoice::decide(RecomputeMode::Auto, 100, 60, &[], 3, budget(50));
        assert!(tight.to_string().contains("may not fit"), "{tight}");

        // Rerunning some transformers: auto takes the fewest that fit, else all blocks;
        // off and on ignore them. The ranking may stop short of the UNet's 4.
        let partial = [
            (Recompute::Transformers(0b100), 90),
            (Recompute::Transformers(0b110), 80),
            (Recompute::Transformers(0b111), 70),
        ];
        let pick = |mode, b| RecomputeChoice::decide(mode, 100, 60, &partial, 4, b);
        let some = pick(RecomputeMode::Auto, budget(85));
        assert_eq!(some.recompute, Recompute::Transformers(0b110));
        assert_eq!((some.peak, some.transformers), (80, Some((2, 4))));
        let text = some.to_string();
        assert!(
            text.starts_with("recompute on for 2 of the UNet's 4 transformers"),
            "{text}"
        );
        let all = pick(RecomputeMode::Auto, budget(65));
        assert_eq!(
            (all.recompute, all.peak, all.transformers),
            (Recompute::On, 60, None)
        );
        assert_eq!(
            pick(RecomputeMode::Auto, budget(100)).recompute,
            Recompute::Off
        );
        assert_eq!(
            pick(RecomputeMode::Off, budget(85)).recompute,
            Recompute::Off
        );
        assert_eq!(pick(RecomputeMode::On, budget(85)).recompute, Recompute::On);
    }
}
