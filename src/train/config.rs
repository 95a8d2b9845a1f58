//! Every training option, with its defaults and their references, checked once.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::lr_schedule::{DiffusersLrKind, LrSchedule};
use crate::error::{Error, Result};
use crate::model::PredictionType;

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
    /// Training resolution in pixels, a multiple of 8 (SD 1.x: 512).
    pub resolution: usize,
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
    /// 1 = the last CLIP layer, as SD 1.x was trained.
    pub clip_skip: usize,
    /// Overrides the model's scheduler `prediction_type` (`epsilon` / `v_prediction`).
    pub prediction_type: Option<PredictionType>,
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
            resolution: 512,
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
            clip_skip: 1,
            prediction_type: None,
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
        if self.resolution < 64 || self.resolution % 8 != 0 || self.resolution > 4096 {
            return Err(Error::config(
                "resolution",
                format!(
                    "{} must be a multiple of 8 between 64 and 4096",
                    self.resolution
                ),
            ));
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
        let eps_ok = self.adam_epsilon.is_finite() && self.adam_epsilon > 0.0;
        let wd_ok = self.weight_decay.is_finite() && self.weight_decay >= 0.0;
        if !(eps_ok && wd_ok) {
            return Err(Error::config(
                "adam_epsilon/weight_decay",
                "must be positive / non-negative",
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
        if self.clip_skip == 0 {
            return Err(Error::config("clip_skip", "must be at least 1"));
        }
        self.lr_schedule()?;
        Ok(())
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
