//! Learning-rate schedules: a plain number, AUTOMATIC1111's schedule strings
//! (`"0.005:100, 1e-3:1000, 1e-5"`) and diffusers' `get_scheduler` curves (constant,
//! constant_with_warmup, linear, cosine), checked against
//! `tests/fixtures/schedule_reference.json` (made by
//! `tests/reference/make_schedule_fixtures.py`). The noise schedule is the model's:
//! [`crate::model::scheduler`].
//!
//! Step convention for every learning-rate function: `lr_at(step)` is the rate
//! for the optimizer step with 0-based index `step` (= number of steps already
//! completed). This is both what diffusers' `LambdaLR` yields (`base_lr *
//! lambda(step)`) and what A1111 applies before its step `embedding.step`.

use std::fmt;

use thiserror::Error;

/// Errors from learning-rate strings and scheduler names.
#[derive(Debug, Error)]
pub enum LrScheduleError {
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

impl DiffusersLrKind {
    /// diffusers' name (`get_scheduler`'s `name`).
    pub fn name(self) -> &'static str {
        match self {
            DiffusersLrKind::Constant => "constant",
            DiffusersLrKind::ConstantWithWarmup => "constant_with_warmup",
            DiffusersLrKind::Linear => "linear",
            DiffusersLrKind::Cosine => "cosine",
        }
    }
}

impl std::str::FromStr for DiffusersLrKind {
    type Err = LrScheduleError;
    fn from_str(name: &str) -> Result<Self, LrScheduleError> {
        Ok(match name.trim() {
            "constant" => DiffusersLrKind::Constant,
            "constant_with_warmup" => DiffusersLrKind::ConstantWithWarmup,
            "linear" => DiffusersLrKind::Linear,
            "cosine" => DiffusersLrKind::Cosine,
            other => {
                return Err(LrScheduleError::UnknownLrScheduler {
                    name: other.to_string(),
                })
            }
        })
    }
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
    pub fn parse(input: &str) -> Result<Self, LrScheduleError> {
        let err = |reason: String| LrScheduleError::LearningRate {
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
        kind: DiffusersLrKind,
        base_lr: f64,
        warmup_steps: u64,
        total_steps: u64,
    ) -> Result<Self, LrScheduleError> {
        if !(base_lr.is_finite() && base_lr >= 0.0) {
            return Err(LrScheduleError::LearningRate {
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
                let name = d.kind.name();
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

    #[test]
    fn diffusers_lr_curves_match_fixture() {
        let fx = fixture();
        let curves = fx["lr"].as_array().unwrap();
        assert!(curves.len() >= 4);
        for c in curves {
            let name = c["name"].as_str().unwrap();
            let sched = LrSchedule::diffusers(
                name.parse().unwrap(),
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
        let cos = LrSchedule::diffusers(DiffusersLrKind::Cosine, 1.0, 10, 110).unwrap();
        assert_eq!(cos.lr_at(0), 0.0);
        assert_eq!(cos.lr_at(5), 0.5);
        assert_eq!(cos.lr_at(10), 1.0);
        assert!((cos.lr_at(60) - 0.5).abs() < 1e-12);
        assert!(cos.lr_at(110).abs() < 1e-12);
        let constant = LrSchedule::diffusers(DiffusersLrKind::Constant, 2.0, 500, 1000).unwrap();
        assert_eq!(constant.lr_at(0), 2.0, "diffusers' constant ignores warmup");
        let lin = LrSchedule::diffusers(DiffusersLrKind::Linear, 1.0, 0, 4).unwrap();
        let got: Vec<f64> = (0..6).map(|s| lin.lr_at(s)).collect();
        assert_eq!(got, [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]);
        assert!(matches!(
            "polynomial".parse::<DiffusersLrKind>(),
            Err(LrScheduleError::UnknownLrScheduler { .. })
        ));
        assert!(LrSchedule::diffusers(DiffusersLrKind::Linear, f64::NAN, 0, 10).is_err());
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
}
