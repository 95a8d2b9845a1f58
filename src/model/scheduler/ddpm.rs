//! The DDPM forward process: the tables of diffusers' `DDPMScheduler.__init__` in f32,
//! operation for operation, so `alphas_cumprod` matches what the diffusers Textual
//! Inversion example trains with (checked against `tests/fixtures/schedule_reference.json`,
//! made by `tests/reference/make_schedule_fixtures.py`, and against
//! `tests/fixtures/zero_snr_schedule.json`), and the coefficients training draws from them.

use super::{BetaSchedule, PredictionType, SchedulerConfig, SchedulerError};
use crate::rng::Rng;

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
    pub fn new(cfg: &SchedulerConfig) -> Result<Self, SchedulerError> {
        cfg.validate()?;
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

    fn ac(&self, t: usize) -> Result<f32, SchedulerError> {
        self.alphas_cumprod
            .get(t)
            .copied()
            .ok_or(SchedulerError::TimestepOutOfRange {
                t,
                n: self.alphas_cumprod.len(),
            })
    }

    /// `add_noise`: `x_t = sqrt(ac[t]) * x0 + sqrt(1 - ac[t]) * noise`.
    pub fn add_noise_coefs(&self, t: usize) -> Result<Coefs, SchedulerError> {
        let ac = self.ac(t)?;
        Ok(Coefs {
            sample_coef: ac.sqrt(),
            noise_coef: (1.0 - ac).sqrt(),
        })
    }

    /// `get_velocity`: `v = sqrt(ac[t]) * noise - sqrt(1 - ac[t]) * x0`.
    pub fn velocity_coefs(&self, t: usize) -> Result<Coefs, SchedulerError> {
        let ac = self.ac(t)?;
        Ok(Coefs {
            sample_coef: -(1.0 - ac).sqrt(),
            noise_coef: ac.sqrt(),
        })
    }

    /// Loss target for the configured prediction type: the noise itself for
    /// epsilon, the velocity for v_prediction.
    pub fn target_coefs(&self, t: usize) -> Result<Coefs, SchedulerError> {
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
            let cfg = SchedulerConfig::from_json_str(&case["config"].to_string())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
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
        let sched = NoiseSchedule::new(&SchedulerConfig::default()).unwrap();
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
    fn v_prediction_target_is_the_velocity() {
        // stabilityai/stable-diffusion-2 scheduler/scheduler_config.json.
        let sd2v = r#"{
            "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0",
            "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "clip_sample": false, "num_train_timesteps": 1000,
            "prediction_type": "v_prediction", "set_alpha_to_one": false,
            "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null
        }"#;
        let cfg = SchedulerConfig::from_json_str(sd2v).unwrap();
        assert_eq!(cfg.prediction_type, PredictionType::VPrediction);
        assert_eq!(
            SchedulerConfig {
                prediction_type: PredictionType::Epsilon,
                set_alpha_to_one: true,
                ..cfg.clone()
            },
            SchedulerConfig::default()
        );
        let s = NoiseSchedule::new(&cfg).unwrap();
        assert_eq!(s.prediction_type(), PredictionType::VPrediction);
        let v = s.target_coefs(10).unwrap();
        assert_eq!(v, s.velocity_coefs(10).unwrap());
        assert!(v.sample_coef < 0.0 && v.noise_coef > 0.9);
    }

    #[test]
    fn timestep_bounds_and_epsilon_target() {
        let s = NoiseSchedule::new(&SchedulerConfig::default()).unwrap();
        assert!(matches!(
            s.add_noise_coefs(1000),
            Err(SchedulerError::TimestepOutOfRange { t: 1000, n: 1000 })
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
    fn linspace_endpoints_exact_and_single_point() {
        let v = torch_linspace_f32(0.1, 0.7, 7);
        assert_eq!(v[0], 0.1f32);
        assert_eq!(v[6], 0.7f32);
        assert_eq!(torch_linspace_f32(0.3, 0.9, 1), vec![0.3f32]);
        assert!(torch_linspace_f32(0.3, 0.9, 0).is_empty());
    }
}
