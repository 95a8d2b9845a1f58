//! DDIM sampling steps (eta 0) as diffusers' `DDIMScheduler` takes them from the same
//! config: `set_timesteps` (the spacings and `steps_offset`) and `step` (`set_alpha_to_one`,
//! `clip_sample`, the prediction type).

use candle_core::Tensor;

use super::{NoiseSchedule, PredictionType, SchedulerConfig, SchedulerError, TimestepSpacing};

/// One DDIM step: from `timestep` to `timestep - T / steps`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DdimStep {
    /// The timestep the UNet is evaluated at.
    pub timestep: usize,
    /// `alphas_cumprod[timestep]`.
    pub alpha_cumprod: f32,
    /// `alphas_cumprod` of the previous timestep, or the final one past the first.
    pub alpha_cumprod_prev: f32,
}

/// A deterministic DDIM run of a fixed number of steps.
#[derive(Clone, Debug, PartialEq)]
pub struct DdimSchedule {
    steps: Vec<DdimStep>,
    prediction_type: PredictionType,
    clip_sample: Option<f64>,
}

/// The timesteps diffusers' `DDIMScheduler.set_timesteps(steps)` yields, last first.
///
/// numpy's arithmetic is reproduced (float `arange` and `linspace`, `round` to even), so
/// the timesteps are the same for every step count. Two cases differ on purpose: the
/// leading spacing is clamped to the last timestep (diffusers indexes past the table when
/// `steps_offset` pushes it there), and the trailing spacing stops at `steps` timesteps
/// (numpy's `arange` adds a step at -1 for some counts, e.g. 61 of 1000).
fn timesteps(config: &SchedulerConfig, steps: usize) -> Vec<usize> {
    let n = config.num_train_timesteps;
    let last = n - 1;
    // Values stay within 0..=n, so the cast is exact.
    let round = |v: f64| v.round_ties_even().clamp(0.0, n as f64) as usize;
    match config.timestep_spacing {
        TimestepSpacing::Leading => {
            let ratio = n / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio + config.steps_offset).min(last))
                .collect()
        }
        TimestepSpacing::Trailing => {
            // np.arange(n, 0, -n/steps): numpy fills start + i * (second - first).
            let start = n as f64;
            let delta = (start - start / steps as f64) - start;
            (0..steps)
                .map(|i| round(start + i as f64 * delta).saturating_sub(1))
                .collect()
        }
        TimestepSpacing::Linspace => {
            if steps == 1 {
                return vec![0];
            }
            // np.linspace(0, n - 1, steps): i * step, the last value exactly n - 1.
            let step = last as f64 / (steps - 1) as f64;
            (0..steps)
                .rev()
                .map(|i| {
                    if i == steps - 1 {
                        last
                    } else {
                        round(i as f64 * step)
                    }
                })
                .collect()
        }
    }
}

impl DdimSchedule {
    /// The `steps` DDIM steps `config` describes.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self, SchedulerError> {
        let schedule = NoiseSchedule::new(config)?;
        let ac = schedule.alphas_cumprod();
        let n = ac.len();
        if steps == 0 || steps > n {
            return Err(SchedulerError::InferenceSteps { steps, max: n });
        }
        let final_alpha = if config.set_alpha_to_one { 1.0 } else { ac[0] };
        let ratio = n / steps;
        let steps: Vec<DdimStep> = timesteps(config, steps)
            .into_iter()
            .map(|t| DdimStep {
                timestep: t,
                alpha_cumprod: ac[t],
                alpha_cumprod_prev: t.checked_sub(ratio).map_or(final_alpha, |p| ac[p]),
            })
            .collect();
        if config.prediction_type == PredictionType::Epsilon
            && steps.iter().any(|s| s.alpha_cumprod == 0.0)
        {
            return Err(SchedulerError::Field {
                field: "prediction_type",
                reason: "epsilon cannot be sampled from a timestep whose signal is zero \
                         (zero terminal SNR): such models predict v_prediction"
                    .into(),
            });
        }
        Ok(Self {
            steps,
            prediction_type: config.prediction_type,
            clip_sample: config.clip_sample.then_some(config.clip_sample_range),
        })
    }

    /// The steps in the order they run (from the noisiest timestep).
    pub fn steps(&self) -> &[DdimStep] {
        &self.steps
    }

    /// `DDIMScheduler.step` with eta 0: the latent at the previous timestep from `sample`
    /// at `step.timestep` and the UNet's (guided) output there.
    pub fn step(
        &self,
        step: &DdimStep,
        sample: &Tensor,
        model_output: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let a_t = f64::from(step.alpha_cumprod);
        let a_prev = f64::from(step.alpha_cumprod_prev);
        let (x0, eps) = match self.prediction_type {
            PredictionType::VPrediction => {
                let x0 = ((sample * a_t.sqrt())? - (model_output * (1.0 - a_t).sqrt())?)?;
                let eps = ((model_output * a_t.sqrt())? + (sample * (1.0 - a_t).sqrt())?)?;
                (x0, eps)
            }
            PredictionType::Epsilon => {
                let x0 = ((sample - (model_output * (1.0 - a_t).sqrt())?)? / a_t.sqrt())?;
                (x0, model_output.clone())
            }
        };
        let x0 = match self.clip_sample {
            Some(r) => x0.clamp(-r, r)?,
            None => x0,
        };
        (x0 * a_prev.sqrt())? + (eps * (1.0 - a_prev).sqrt())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(spacing: TimestepSpacing) -> SchedulerConfig {
        SchedulerConfig {
            timestep_spacing: spacing,
            ..SchedulerConfig::default()
        }
    }

    fn ts(spacing: TimestepSpacing, steps: usize) -> Vec<usize> {
        DdimSchedule::new(&config(spacing), steps)
            .unwrap()
            .steps()
            .iter()
            .map(|s| s.timestep)
            .collect()
    }

    /// `DDIMScheduler.from_config(tiny-sd scheduler, timestep_spacing=...).set_timesteps(n)`,
    /// diffusers 0.42.1 (steps_offset 1).
    #[test]
    fn timesteps_match_diffusers() {
        use TimestepSpacing::*;
        assert_eq!(ts(Leading, 4), [751, 501, 251, 1]);
        assert_eq!(ts(Leading, 3), [667, 334, 1]);
        assert_eq!(
            ts(Leading, 1000)[0],
            999,
            "clamped where diffusers overruns"
        );
        assert_eq!(ts(Trailing, 4), [999, 749, 499, 249]);
        assert_eq!(ts(Trailing, 3), [999, 666, 332]);
        assert_eq!(ts(Trailing, 7), [999, 856, 713, 570, 428, 285, 142]);
        assert_eq!(ts(Trailing, 61).len(), 61);
        assert_eq!(ts(Trailing, 61)[60], 15);
        assert_eq!(ts(Linspace, 4), [999, 666, 333, 0]);
        assert_eq!(ts(Linspace, 3), [999, 500, 0]);
        assert_eq!(ts(Linspace, 7), [999, 832, 666, 500, 333, 166, 0]);
        assert_eq!(ts(Linspace, 1), [0]);
    }

    #[test]
    fn final_alpha_and_errors() {
        let ac = NoiseSchedule::new(&SchedulerConfig::default())
            .unwrap()
            .alphas_cumprod()
            .to_vec();
        let one = DdimSchedule::new(&SchedulerConfig::default(), 4).unwrap();
        let last = one.steps()[3];
        assert_eq!((last.timestep, last.alpha_cumprod_prev), (1, 1.0));
        assert_eq!(one.steps()[0].alpha_cumprod_prev, ac[501]);
        let sd = SchedulerConfig {
            set_alpha_to_one: false,
            ..SchedulerConfig::default()
        };
        let last = DdimSchedule::new(&sd, 4).unwrap().steps()[3];
        assert_eq!(last.alpha_cumprod_prev, ac[0]);
        assert!(matches!(
            DdimSchedule::new(&sd, 1001),
            Err(SchedulerError::InferenceSteps {
                steps: 1001,
                max: 1000
            })
        ));
        assert!(DdimSchedule::new(&sd, 0).is_err());
        let zero_snr = SchedulerConfig {
            rescale_betas_zero_snr: true,
            timestep_spacing: TimestepSpacing::Trailing,
            ..SchedulerConfig::default()
        };
        let e = DdimSchedule::new(&zero_snr, 10).unwrap_err().to_string();
        assert!(e.contains("prediction_type"), "{e}");
        let v = SchedulerConfig {
            prediction_type: PredictionType::VPrediction,
            ..zero_snr
        };
        assert_eq!(
            DdimSchedule::new(&v, 10).unwrap().steps()[0].alpha_cumprod,
            0.0
        );
    }

    #[test]
    fn step_is_ddim_with_clipping() {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::new(&[0.5f32, -3.0], &dev).unwrap();
        let out = Tensor::new(&[0.1f32, 0.2], &dev).unwrap();
        let step = DdimStep {
            timestep: 500,
            alpha_cumprod: 0.25,
            alpha_cumprod_prev: 0.64,
        };
        let plain = DdimSchedule::new(&SchedulerConfig::default(), 10).unwrap();
        // x0 = (x - sqrt(0.75) * out) / 0.5, x' = 0.8 x0 + 0.6 out.
        let got: Vec<f32> = plain.step(&step, &x, &out).unwrap().to_vec1().unwrap();
        for (g, (xi, oi)) in got.iter().zip([(0.5f64, 0.1f64), (-3.0, 0.2)]) {
            let want = 0.8 * (xi - 0.75f64.sqrt() * oi) / 0.5 + 0.6 * oi;
            assert!((f64::from(*g) - want).abs() < 1e-6, "{g} vs {want}");
        }
        let clipped = DdimSchedule::new(
            &SchedulerConfig {
                clip_sample: true,
                clip_sample_range: 2.0,
                ..SchedulerConfig::default()
            },
            10,
        )
        .unwrap();
        let got: Vec<f32> = clipped.step(&step, &x, &out).unwrap().to_vec1().unwrap();
        let want = 0.8 * -2.0 + 0.6 * 0.2;
        assert!(
            (f64::from(got[1]) - want).abs() < 1e-6,
            "{} vs {want}",
            got[1]
        );
    }
}
