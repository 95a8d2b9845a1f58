//! The model's scheduler: one typed `scheduler_config.json`, the DDPM noise schedule it
//! describes (what training adds to the latents and asks the UNet to predict) and the DDIM
//! steps that previews sample with.
//!
//! sdti trains with the DDPM forward process and samples with DDIM, whatever scheduler class
//! the folder names, as diffusers' textual_inversion example trains with
//! `DDPMScheduler.from_pretrained(model, subfolder="scheduler")`. So the settings that matter
//! are the ones diffusers' `DDPMScheduler` and `DDIMScheduler` read (`scheduling_ddpm.py`,
//! `scheduling_ddim.py`, diffusers 0.42.1): each is either a field of [`SchedulerConfig`] or,
//! set to a value that changes the math and that sdti does not implement, an error naming
//! the field. Settings that only other sampler classes read are accepted and ignored, by
//! name ([`OTHER_SAMPLER_KEYS`]); a key in neither list is an error too, so that a setting a
//! later diffusers adds to the noise schedule (as `rescale_betas_zero_snr` once was) cannot
//! be dropped silently.

mod ddim;
mod ddpm;

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use thiserror::Error;

pub use ddim::{DdimSchedule, DdimStep};
pub use ddpm::{Coefs, NoiseSchedule};

/// What is wrong with a scheduler configuration, or with a request to a schedule.
#[derive(Debug, Error)]
pub enum SchedulerError {
    /// Not a JSON object, or not JSON at all.
    #[error("not a scheduler config object: {0}")]
    Json(#[source] serde_json::Error),
    /// A known field has a value sdti cannot use.
    #[error("field '{field}': {reason}")]
    Field {
        /// The JSON key.
        field: &'static str,
        /// What is wrong with its value.
        reason: String,
    },
    /// A key that is neither a DDPM/DDIM setting nor one of another sampler's.
    #[error(
        "field '{field}' is not a setting sdti knows: it is not one that diffusers' \
         DDPMScheduler or DDIMScheduler reads, nor one of the other samplers' that training \
         ignores, so sdti cannot tell whether it changes the noise schedule"
    )]
    UnknownField {
        /// The JSON key.
        field: String,
    },
    /// A timestep outside `0..num_train_timesteps` was requested.
    #[error("timestep {t} is out of range: the schedule has {n} timesteps (0..{n})")]
    TimestepOutOfRange {
        /// Requested timestep.
        t: usize,
        /// Number of training timesteps.
        n: usize,
    },
    /// A DDIM step count the schedule cannot be divided into.
    #[error("{steps} DDIM steps: outside 1..={max} (the schedule has {max} timesteps)")]
    InferenceSteps {
        /// Requested steps.
        steps: usize,
        /// Number of training timesteps.
        max: usize,
    },
}

/// How betas are laid out over the training timesteps (diffusers' `beta_schedule`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BetaSchedule {
    /// `linspace(beta_start, beta_end, n)`.
    #[serde(rename = "linear")]
    Linear,
    /// `linspace(sqrt(beta_start), sqrt(beta_end), n)^2`: Stable Diffusion's schedule.
    #[serde(rename = "scaled_linear")]
    ScaledLinear,
    /// Glide cosine schedule (`betas_for_alpha_bar`, max beta 0.999).
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredCosCapV2,
}

/// What the UNet predicts, hence what the training loss compares against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PredictionType {
    /// The added noise (SD 1.x, SD 2.x base 512).
    #[serde(rename = "epsilon")]
    Epsilon,
    /// `v = sqrt(ac) * noise - sqrt(1 - ac) * sample` (SD 2.x 768-v, zero-SNR fine-tunes).
    #[serde(rename = "v_prediction")]
    VPrediction,
}

impl std::str::FromStr for PredictionType {
    type Err = SchedulerError;

    /// `epsilon` or `v_prediction`, as `scheduler_config.json` writes them.
    fn from_str(s: &str) -> Result<Self, SchedulerError> {
        parse_value("prediction_type", Value::String(s.to_string()))
    }
}

/// Which training timesteps DDIM visits (diffusers' `timestep_spacing`; Table 2 of
/// Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimestepSpacing {
    /// `i * (T / steps) + steps_offset` (SD 1.x).
    #[serde(rename = "leading")]
    Leading,
    /// `round(T - i * T / steps) - 1`: starts at the last timestep (zero-SNR models).
    #[serde(rename = "trailing")]
    Trailing,
    /// `round(linspace(0, T - 1, steps))`.
    #[serde(rename = "linspace")]
    Linspace,
}

/// A diffusers `scheduler_config.json`, typed: the noise schedule, the training target
/// and the DDIM settings.
///
/// [`Default`], which is also every key a file leaves out, is SD 1.x's scheduler
/// (runwayml/stable-diffusion-v1-5 `scheduler/scheduler_config.json`: scaled_linear
/// 0.00085..0.012, 1000 steps, epsilon, leading spacing, `steps_offset` 1, `clip_sample`
/// false) and what sdti did before it read these keys, with one exception:
/// `set_alpha_to_one`, false in that file, defaults to true, `DDIMScheduler`'s default,
/// because DDPM and Euler configs leave it out and diffusers' DDIM built from them uses 1.
/// diffusers' defaults for the beta keys differ (linear 0.0001..0.02), but the configs it
/// saves always write them, so only hand-written files see the difference.
///
/// Read with [`SchedulerConfig::from_file`] or [`SchedulerConfig::from_json_str`]; its
/// `Deserialize` goes through the same checks. It serialises to keys diffusers reads.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SchedulerConfig {
    /// Number of diffusion timesteps.
    pub num_train_timesteps: usize,
    /// First beta (linear and scaled_linear).
    pub beta_start: f64,
    /// Last beta (linear and scaled_linear).
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    /// Explicit betas; when present they replace `beta_start/end/schedule`.
    pub trained_betas: Option<Vec<f64>>,
    /// What the UNet predicts: the training target and how DDIM reads the output.
    pub prediction_type: PredictionType,
    /// Rescale the betas to zero terminal SNR (Lin et al. 2023).
    pub rescale_betas_zero_snr: bool,
    /// DDIM: which timesteps a run of `steps` visits.
    pub timestep_spacing: TimestepSpacing,
    /// DDIM: added to every timestep of the leading spacing.
    pub steps_offset: usize,
    /// DDIM: the last step lands on `alphas_cumprod = 1` (else on `alphas_cumprod[0]`).
    pub set_alpha_to_one: bool,
    /// DDIM: clamp the predicted clean latent to `±clip_sample_range`.
    pub clip_sample: bool,
    pub clip_sample_range: f64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            rescale_betas_zero_snr: false,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 1,
            set_alpha_to_one: true,
            clip_sample: false,
            clip_sample_range: 1.0,
        }
    }
}

/// Keys that only diffusers' other sampler classes read (PNDM, LMS, Euler, Euler
/// ancestral, Heun, KDPM2, DPM-Solver single and multistep, DEIS, UniPC, SA-Solver, LCM,
/// TCD, the EDM ones; diffusers 0.42.1). Training never reads them: diffusers' own
/// `DDPMScheduler.from_pretrained` drops them too. Nor does sdti's DDIM sampler, as
/// `DDIMScheduler.from_config` drops them.
pub const OTHER_SAMPLER_KEYS: &[&str] = &[
    "algorithm_type",
    "corrector_order",
    "disable_corrector",
    "euler_at_final",
    "final_sigmas_type",
    "flow_shift",
    "interpolation_type",
    "lambda_min_clipped",
    "lower_order_final",
    "original_inference_steps",
    "predict_x0",
    "predictor_order",
    "rho",
    "shift_terminal",
    "sigma_data",
    "sigma_max",
    "sigma_min",
    "sigma_schedule",
    "skip_prk_steps",
    "solver_order",
    "solver_p",
    "solver_type",
    "tau_func",
    "time_shift_type",
    "timestep_scaling",
    "timestep_type",
    "use_beta_sigmas",
    "use_dynamic_shifting",
    "use_exponential_sigmas",
    "use_flow_sigmas",
    "use_karras_sigmas",
    "use_lu_lambdas",
];

/// DDPM/DDIM keys that need no field, being read only with `thresholding` on (refused).
/// `thresholding` and `variance_type` need no field either and are checked by name:
/// `variance_type` is the variance of DDPM's ancestral sampling step (`fixed_small` ...),
/// which training does not read, sdti's DDIM runs with eta 0 and `DDIMScheduler` has no
/// such key; only its learned kinds would change the model's output, and are refused.
const DDPM_KEYS_WITHOUT_EFFECT: &[&str] = &["dynamic_thresholding_ratio", "sample_max_value"];

/// A JSON value in [`NOT_IMPLEMENTED`].
enum Setting {
    Str(&'static str),
    Bool(bool),
}

impl Setting {
    fn is(&self, value: &Value) -> bool {
        match self {
            Setting::Str(s) => value.as_str() == Some(*s),
            Setting::Bool(b) => value.as_bool() == Some(*b),
        }
    }
}

/// Values diffusers' `DDPMScheduler` or `DDIMScheduler` accept that change the math and
/// that sdti does not implement: (key, value, why).
const NOT_IMPLEMENTED: &[(&str, Setting, &str)] = &[
    (
        "beta_schedule",
        Setting::Str("sigmoid"),
        "DDPMScheduler's sigmoid betas are not implemented (DDIMScheduler has none either); \
         linear, scaled_linear and squaredcos_cap_v2 are",
    ),
    (
        "prediction_type",
        Setting::Str("sample"),
        "training toward the clean latent is not implemented; epsilon and v_prediction are",
    ),
    (
        "variance_type",
        Setting::Str("learned"),
        "the UNet would predict its variance in extra output channels, which sdti's loss and \
         sampler do not split off",
    ),
    (
        "variance_type",
        Setting::Str("learned_range"),
        "the UNet would predict its variance in extra output channels, which sdti's loss and \
         sampler do not split off",
    ),
    (
        "thresholding",
        Setting::Bool(true),
        "dynamic thresholding of the predicted sample is not implemented (diffusers means it \
         for pixel-space models, not latent ones)",
    ),
];

const VARIANCE_TYPES_WITHOUT_EFFECT: &[&str] = &[
    "fixed_small",
    "fixed_small_log",
    "fixed_large",
    "fixed_large_log",
];

/// Parses `value` as the type of `field`.
fn parse_value<T: DeserializeOwned>(
    field: &'static str,
    value: Value,
) -> Result<T, SchedulerError> {
    serde_json::from_value(value).map_err(|e| SchedulerError::Field {
        field,
        reason: e.to_string(),
    })
}

/// Removes `field` from `map` and parses it; absent and `null` are `None`.
fn take<T: DeserializeOwned>(
    map: &mut Map<String, Value>,
    field: &'static str,
) -> Result<Option<T>, SchedulerError> {
    match map.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => parse_value(field, value).map(Some),
    }
}

impl SchedulerConfig {
    /// This configuration with a run's overrides applied: `prediction_type` and
    /// `zero_terminal_snr` (`rescale_betas_zero_snr`) where given, every other setting
    /// (the timestep spacing too, as a single file's `ztsnr` marker leaves it) as it is.
    /// Training ([`crate::train::TrainConfig::scheduler_for`]) and previews
    /// ([`crate::app::preview::SampleOptions::scheduler_for`]) both go through it, so a
    /// word is drawn with the schedule it was trained with.
    pub fn with_overrides(
        &self,
        prediction_type: Option<PredictionType>,
        zero_terminal_snr: Option<bool>,
    ) -> Self {
        Self {
            prediction_type: prediction_type.unwrap_or(self.prediction_type),
            rescale_betas_zero_snr: zero_terminal_snr.unwrap_or(self.rescale_betas_zero_snr),
            ..self.clone()
        }
    }

    /// Reads a diffusers `scheduler/scheduler_config.json`; errors name the file.
    pub fn from_file(path: &Path) -> crate::error::Result<Self> {
        let text = crate::io::read::read_text(path, &crate::io::read::SCHEDULER_CONFIG)?;
        Self::from_json_str(&text).map_err(|e| crate::error::Error::Model {
            path: path.to_path_buf(),
            reason: format!("invalid scheduler config: {e}"),
        })
    }

    /// Parses scheduler config JSON (see the type's documentation for missing keys).
    ///
    /// ```
    /// use sdti::model::scheduler::{PredictionType, SchedulerConfig};
    ///
    /// let json = r#"{"prediction_type": "v_prediction", "rescale_betas_zero_snr": true}"#;
    /// let config = SchedulerConfig::from_json_str(json)?;
    /// assert_eq!(config.prediction_type, PredictionType::VPrediction);
    /// // Zero terminal SNR: the last timestep keeps no signal.
    /// assert_eq!(config.noise_schedule()?.alphas_cumprod()[999], 0.0);
    ///
    /// let err = SchedulerConfig::from_json_str(r#"{"thresholding": true}"#).unwrap_err();
    /// assert!(err.to_string().contains("'thresholding'"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn from_json_str(json: &str) -> Result<Self, SchedulerError> {
        let map: Map<String, Value> = serde_json::from_str(json).map_err(SchedulerError::Json)?;
        Self::from_map(map)
    }

    fn from_map(mut map: Map<String, Value>) -> Result<Self, SchedulerError> {
        for (field, setting, why) in NOT_IMPLEMENTED {
            if let Some(value) = map.get(*field).filter(|v| setting.is(v)) {
                return Err(SchedulerError::Field {
                    field,
                    reason: format!("{value}: {why}"),
                });
            }
        }
        // Type-checked, then dropped: false is the only value the table above lets by.
        take::<bool>(&mut map, "thresholding")?;
        if let Some(v) = take::<String>(&mut map, "variance_type")? {
            if !VARIANCE_TYPES_WITHOUT_EFFECT.contains(&v.as_str()) {
                return Err(SchedulerError::Field {
                    field: "variance_type",
                    reason: format!("'{v}' is not one diffusers knows"),
                });
            }
        }
        let d = Self::default();
        let trained_betas: Option<Vec<f64>> = take(&mut map, "trained_betas")?;
        // diffusers sizes the tables from trained_betas when they are given.
        let num_train_timesteps = match take(&mut map, "num_train_timesteps")? {
            Some(n) => n,
            None => trained_betas
                .as_ref()
                .map_or(d.num_train_timesteps, Vec::len),
        };
        let config = Self {
            num_train_timesteps,
            beta_start: take(&mut map, "beta_start")?.unwrap_or(d.beta_start),
            beta_end: take(&mut map, "beta_end")?.unwrap_or(d.beta_end),
            beta_schedule: take(&mut map, "beta_schedule")?.unwrap_or(d.beta_schedule),
            trained_betas,
            prediction_type: take(&mut map, "prediction_type")?.unwrap_or(d.prediction_type),
            rescale_betas_zero_snr: take(&mut map, "rescale_betas_zero_snr")?
                .unwrap_or(d.rescale_betas_zero_snr),
            timestep_spacing: take(&mut map, "timestep_spacing")?.unwrap_or(d.timestep_spacing),
            steps_offset: take(&mut map, "steps_offset")?.unwrap_or(d.steps_offset),
            set_alpha_to_one: take(&mut map, "set_alpha_to_one")?.unwrap_or(d.set_alpha_to_one),
            clip_sample: take(&mut map, "clip_sample")?.unwrap_or(d.clip_sample),
            clip_sample_range: take(&mut map, "clip_sample_range")?.unwrap_or(d.clip_sample_range),
        };
        // What is left: metadata (`_class_name`, `_diffusers_version`, ...), keys without
        // effect here, other samplers' keys, or unknown.
        if let Some(field) = map.keys().find(|k| {
            !(k.starts_with('_')
                || DDPM_KEYS_WITHOUT_EFFECT.contains(&k.as_str())
                || OTHER_SAMPLER_KEYS.contains(&k.as_str()))
        }) {
            return Err(SchedulerError::UnknownField {
                field: field.clone(),
            });
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks the values a hand-built configuration could get wrong.
    pub fn validate(&self) -> Result<(), SchedulerError> {
        let field = |field: &'static str, reason: String| SchedulerError::Field { field, reason };
        // The upper bound keeps the tables' allocation sane for a hostile config.
        if !(2..=100_000).contains(&self.num_train_timesteps) {
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
        if self.steps_offset >= self.num_train_timesteps {
            return Err(field(
                "steps_offset",
                format!(
                    "{} must be below num_train_timesteps ({})",
                    self.steps_offset, self.num_train_timesteps
                ),
            ));
        }
        if !(self.clip_sample_range.is_finite() && self.clip_sample_range > 0.0) {
            return Err(field(
                "clip_sample_range",
                format!("{} must be positive", self.clip_sample_range),
            ));
        }
        Ok(())
    }

    /// The DDPM noise schedule this configuration describes.
    pub fn noise_schedule(&self) -> crate::error::Result<NoiseSchedule> {
        NoiseSchedule::new(self).map_err(crate::error::Error::Scheduler)
    }
}

impl<'de> Deserialize<'de> for SchedulerConfig {
    /// Through [`SchedulerConfig::from_json_str`]'s checks, so no reader drops a key.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let map = Map::<String, Value>::deserialize(deserializer)?;
        Self::from_map(map).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// tests/fixtures/tiny-sd/scheduler/scheduler_config.json, as diffusers 0.42.1 saves a
    /// DDPMScheduler.
    const DDPM_0_42: &str = r#"{
        "_class_name": "DDPMScheduler", "_diffusers_version": "0.42.1",
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "clip_sample": false, "clip_sample_range": 1.0, "dynamic_thresholding_ratio": 0.995,
        "num_train_timesteps": 1000, "prediction_type": "epsilon",
        "rescale_betas_zero_snr": false, "sample_max_value": 1.0, "steps_offset": 1,
        "thresholding": false, "timestep_spacing": "leading", "trained_betas": null,
        "variance_type": "fixed_small"
    }"#;

    /// CompVis/stable-diffusion-v1-4 scheduler/scheduler_config.json (diffusers 0.7).
    const PNDM_SD14: &str = r#"{
        "_class_name": "PNDMScheduler", "_diffusers_version": "0.7.0.dev0",
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "num_train_timesteps": 1000, "set_alpha_to_one": false, "skip_prk_steps": true,
        "steps_offset": 1, "trained_betas": null, "clip_sample": false
    }"#;

    #[test]
    fn diffusers_configs_parse_to_sd_defaults() {
        assert_eq!(
            SchedulerConfig::from_json_str(DDPM_0_42).unwrap(),
            SchedulerConfig::default()
        );
        let pndm = SchedulerConfig::from_json_str(PNDM_SD14).unwrap();
        assert_eq!(
            pndm,
            SchedulerConfig {
                set_alpha_to_one: false,
                ..SchedulerConfig::default()
            }
        );
        assert_eq!(
            SchedulerConfig::from_json_str("{}").unwrap(),
            SchedulerConfig::default()
        );
        // A DPM-Solver++ config as diffusers 0.42 saves one: its own keys are ignored.
        let dpm = r#"{"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++",
            "solver_order": 2, "use_karras_sigmas": true, "use_flow_sigmas": false,
            "flow_shift": 1.0, "lambda_min_clipped": "-inf", "final_sigmas_type": "zero",
            "timestep_spacing": "linspace", "variance_type": null, "steps_offset": 1}"#;
        let dpm = SchedulerConfig::from_json_str(dpm).unwrap();
        assert_eq!(dpm.timestep_spacing, TimestepSpacing::Linspace);
    }

    #[test]
    fn zero_snr_and_v_prediction_are_read() {
        let json = DDPM_0_42
            .replace(
                "\"rescale_betas_zero_snr\": false",
                "\"rescale_betas_zero_snr\": true",
            )
            .replace("\"epsilon\"", "\"v_prediction\"")
            .replace("\"leading\"", "\"trailing\"");
        let c = SchedulerConfig::from_json_str(&json).unwrap();
        assert!(c.rescale_betas_zero_snr);
        assert_eq!(c.prediction_type, PredictionType::VPrediction);
        assert_eq!(c.timestep_spacing, TimestepSpacing::Trailing);
    }

    #[test]
    fn serialised_form_round_trips_with_diffusers_names() {
        let c = SchedulerConfig {
            prediction_type: PredictionType::VPrediction,
            rescale_betas_zero_snr: true,
            trained_betas: Some(vec![0.1; 4]),
            num_train_timesteps: 4,
            ..SchedulerConfig::default()
        };
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["prediction_type"], "v_prediction");
        assert_eq!(json["beta_schedule"], "scaled_linear");
        assert_eq!(json["timestep_spacing"], "leading");
        let back: SchedulerConfig = serde_json::from_value(json).unwrap();
        assert_eq!(back, c);
        // The form written before the scheduler was typed reads back as it meant.
        let old = r#"{"beta_start":0.00085,"beta_end":0.012,"beta_schedule":"scaled_linear",
            "num_train_timesteps":1000,"prediction_type":"v_prediction","trained_betas":null}"#;
        let old: SchedulerConfig = serde_json::from_str(old).unwrap();
        assert_eq!(old.prediction_type, PredictionType::VPrediction);
        assert_eq!(
            "v_prediction".parse::<PredictionType>().unwrap(),
            old.prediction_type
        );
        assert!("sample".parse::<PredictionType>().is_err());
    }

    #[test]
    fn unimplemented_and_unknown_fields_are_named() {
        let cases = [
            (r#"{"thresholding": true}"#, "thresholding"),
            (r#"{"variance_type": "learned_range"}"#, "variance_type"),
            (r#"{"variance_type": "wobbly"}"#, "variance_type"),
            (r#"{"beta_schedule": "sigmoid"}"#, "beta_schedule"),
            (r#"{"prediction_type": "sample"}"#, "prediction_type"),
            (
                r#"{"prediction_type": "flow_prediction"}"#,
                "prediction_type",
            ),
            (r#"{"timestep_spacing": "karras"}"#, "timestep_spacing"),
            (
                r#"{"rescale_betas_zero_snr": "yes"}"#,
                "rescale_betas_zero_snr",
            ),
            (r#"{"shift": 3.0}"#, "shift"),
            (r#"{"snr_shift_scale": 1.0}"#, "snr_shift_scale"),
        ];
        for (json, field) in cases {
            let e = SchedulerConfig::from_json_str(json)
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("'{field}'")), "{json}: {e}");
        }
        // Off, they change nothing and are accepted.
        let off = r#"{"thresholding": false, "variance_type": "fixed_large",
            "dynamic_thresholding_ratio": 0.9, "sample_max_value": 2.0}"#;
        assert_eq!(
            SchedulerConfig::from_json_str(off).unwrap(),
            SchedulerConfig::default()
        );
        // The same checks when a ModelConfig (or anything else) deserialises one.
        assert!(serde_json::from_str::<SchedulerConfig>(r#"{"thresholding": true}"#).is_err());
        assert!(matches!(
            SchedulerConfig::from_json_str("[1]"),
            Err(SchedulerError::Json(_))
        ));
    }

    #[test]
    fn values_are_validated() {
        let bad = SchedulerConfig::from_json_str(r#"{"beta_start": "x"}"#)
            .unwrap_err()
            .to_string();
        assert!(bad.contains("beta_start"), "{bad}");
        let bad = SchedulerConfig::from_json_str(
            r#"{"trained_betas": [0.1, 0.2], "num_train_timesteps": 3}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            bad.contains("trained_betas") && bad.contains("2 values"),
            "{bad}"
        );
        let c = SchedulerConfig::from_json_str(r#"{"trained_betas": [0.1, 0.2, 0.3]}"#).unwrap();
        assert_eq!(c.num_train_timesteps, 3);
        assert!(SchedulerConfig::from_json_str(r#"{"trained_betas": [0.1, 1.5]}"#).is_err());
        assert!(SchedulerConfig::from_json_str(r#"{"num_train_timesteps": 0}"#).is_err());
        assert!(SchedulerConfig::from_json_str(r#"{"num_train_timesteps": -3}"#).is_err());
        assert!(SchedulerConfig::from_json_str(r#"{"beta_end": -0.1}"#).is_err());
        assert!(SchedulerConfig::from_json_str(r#"{"steps_offset": 1000}"#).is_err());
        assert!(SchedulerConfig::from_json_str(r#"{"clip_sample_range": 0}"#).is_err());
    }

    #[test]
    fn from_file_names_the_file_and_the_field() {
        let dir = std::env::temp_dir().join(format!("sdti-sched-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("scheduler_config.json");
        std::fs::write(&path, r#"{"thresholding": true}"#).unwrap();
        let e = SchedulerConfig::from_file(&path).unwrap_err().to_string();
        assert!(
            e.contains(&path.display().to_string()) && e.contains("'thresholding'"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        let missing = SchedulerConfig::from_file(Path::new("/nonexistent/scheduler_config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("/nonexistent/scheduler_config.json"),
            "{missing}"
        );
    }

    #[test]
    fn overrides_replace_only_the_prediction_type_and_zero_snr() {
        // A base whose every other field differs from the defaults, so a field the
        // override dropped or reset would show.
        let base = SchedulerConfig::from_json_str(
            r#"{"prediction_type": "v_prediction", "rescale_betas_zero_snr": true,
                "timestep_spacing": "trailing", "steps_offset": 0, "beta_end": 0.02,
                "num_train_timesteps": 500, "set_alpha_to_one": false}"#,
        )
        .unwrap();
        assert_eq!(base.with_overrides(None, None), base);
        let eps = [
            None,
            Some(PredictionType::Epsilon),
            Some(PredictionType::VPrediction),
        ];
        for prediction in eps {
            for zsnr in [None, Some(false), Some(true)] {
                let got = base.with_overrides(prediction, zsnr);
                let want = SchedulerConfig {
                    prediction_type: prediction.unwrap_or(PredictionType::VPrediction),
                    rescale_betas_zero_snr: zsnr.unwrap_or(true),
                    ..base.clone()
                };
                assert_eq!(got, want, "{prediction:?} {zsnr:?}");
            }
        }
    }
}
