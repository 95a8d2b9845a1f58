//! Timing training steps: the core that `sdti bench` and `cargo bench --bench train_step`
//! share. A [`BenchRun`] sets up a trainer on one synthetic picture (its VAE encoding
//! timed apart, as training encodes each image once), runs one untimed warm-up step and
//! then the timed ones, and reports per-step times, the device memory high-water mark
//! and the process's peak RSS. What each caller prints around it stays its own.

use std::sync::Arc;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::model::SdModel;
use crate::train::data::{ImageSource, PixelFormat};
use crate::train::{Init, TrainConfig, Trainer};

/// The learned word's token in a benchmark (a profile that builds its own prompts uses it).
pub const BENCH_TOKEN: &str = "bench-word";

/// What one benchmark trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchSetup {
    /// Training resolution in pixels.
    pub resolution: usize,
    pub batch_size: usize,
    /// Vectors of the learned word.
    pub vectors: usize,
    /// Timed steps after the warm-up step.
    pub steps: usize,
}

/// One finished step, for progress lines.
#[derive(Clone, Copy, Debug)]
pub struct StepTiming {
    /// 0 for the warm-up step, then 1..=steps.
    pub index: usize,
    pub ms: f64,
    pub loss: f32,
}

/// What the timed steps measured.
#[derive(Clone, Debug)]
pub struct StepTimes {
    pub warmup_ms: f64,
    /// One entry per timed step.
    pub step_ms: Vec<f64>,
    /// Device memory high-water marks over the timed steps in bytes (in use, reserved by
    /// the pool), where the device reports them (CUDA).
    pub device_peak: Option<(u64, u64)>,
    /// The process's peak RSS when the timed steps end (VmHWM; Linux only).
    pub peak_rss_mib: Option<f64>,
}

impl StepTimes {
    pub fn mean_ms(&self) -> f64 {
        self.step_ms.iter().sum::<f64>() / self.step_ms.len().max(1) as f64
    }

    pub fn min_ms(&self) -> f64 {
        self.step_ms.iter().copied().fold(f64::INFINITY, f64::min)
    }

    pub fn max_ms(&self) -> f64 {
        self.step_ms.iter().copied().fold(0.0, f64::max)
    }
}

/// A trainer set up for a benchmark, its image already cached.
pub struct BenchRun {
    trainer: Trainer,
    setup: BenchSetup,
    /// Seconds spent VAE-encoding the picture (and its mirror) when it was added.
    pub cache_seconds: f64,
}

impl BenchRun {
    /// A trainer for `setup` on `model` with one [`synthetic_picture`] added (timed).
    pub fn new(model: Arc<SdModel>, setup: BenchSetup) -> Result<Self> {
        if setup.steps == 0 {
            return Err(Error::config("steps", "must be at least 1"));
        }
        if setup.batch_size == 0 {
            return Err(Error::config("batch_size", "must be at least 1"));
        }
        let config = TrainConfig {
            token: BENCH_TOKEN.into(),
            init: Init::Text("thing".into()),
            vectors: setup.vectors,
            resolution: Some(setup.resolution),
            batch_size: setup.batch_size,
            // The warm-up step, the timed ones and room for a profile's extra steps.
            max_steps: setup.steps as u64 + 3,
            seed: 1,
            ..TrainConfig::default()
        };
        let mut trainer = Trainer::new(model, config)?;
        let start = Instant::now();
        trainer.add_image(synthetic_picture(setup.resolution)?, None)?;
        let cache_seconds = start.elapsed().as_secs_f64();
        Ok(BenchRun {
            trainer,
            setup,
            cache_seconds,
        })
    }

    /// One warm-up step, then `setup.steps` timed steps; `on_step` sees each as it ends.
    /// A loss that is not finite is an error: the numbers of a broken step mean nothing.
    pub fn time_steps(&mut self, mut on_step: impl FnMut(StepTiming)) -> Result<StepTimes> {
        let device = self.trainer.model().device().clone();
        let mut warmup_ms = 0.0;
        let mut step_ms = Vec::with_capacity(self.setup.steps);
        for index in 0..=self.setup.steps {
            let start = Instant::now();
            let stats = self.trainer.step()?;
            let ms = start.elapsed().as_secs_f64() * 1e3;
            if !stats.loss.is_finite() {
                return Err(Error::input(
                    "benchmark step",
                    format!(
                        "the loss is {} at step {index} ({} px, batch {})",
                        stats.loss, self.setup.resolution, self.setup.batch_size
                    ),
                ));
            }
            on_step(StepTiming {
                index,
                ms,
                loss: stats.loss,
            });
            if index == 0 {
                warmup_ms = ms;
                // The peak of the timed steps only, not of caching or the warm-up's
                // one-off allocations.
                crate::device::reset_memory_peak(&device);
            } else {
                step_ms.push(ms);
            }
        }
        Ok(StepTimes {
            warmup_ms,
            step_ms,
            device_peak: crate::device::memory_peak(&device),
            peak_rss_mib: peak_rss_mib(),
        })
    }

    /// The trainer, for a profile that runs more steps after the timed ones.
    pub fn trainer_mut(&mut self) -> &mut Trainer {
        &mut self.trainer
    }
}

/// A smooth colour pattern, `size` pixels square; the same picture as
/// `tests/reference/bench_diffusers_step.py` builds, so both engines encode the same input.
pub fn synthetic_picture(size: usize) -> Result<ImageSource> {
    let side = u32::try_from(size).map_err(|_| Error::config("resolution", "is too large"))?;
    let mut data = vec![0u8; size * size * 3];
    let step = 2.0 / (size as f32 - 1.0).max(1.0);
    for yi in 0..size {
        let y = -1.0 + yi as f32 * step;
        for xi in 0..size {
            let x = -1.0 + xi as f32 * step;
            let rgb = [
                (3.0 * x + 2.0 * y).sin(),
                (2.0 * x - 3.0 * y).cos(),
                (5.0 * x * y).sin(),
            ];
            for (c, v) in rgb.iter().enumerate() {
                data[(yi * size + xi) * 3 + c] = ((v * 0.9 + 1.0) * 127.5).round() as u8;
            }
        }
    }
    Ok(ImageSource::Pixels {
        data,
        width: side,
        height: side,
        stride: size * 3,
        format: PixelFormat::Rgb8,
    })
}

/// A `kB` field of /proc/self/status (`VmRSS`, `VmHWM`), in MiB; None off Linux.
pub fn proc_status_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The process's peak RSS so far (VmHWM), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    proc_status_mib("VmHWM")
}

/// Resets the peak RSS to the current RSS (Linux >= 4.0), so that the next
/// [`peak_rss_mib`] covers only what follows; false where that is not possible.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_picture_is_the_reference_pattern() -> Result<()> {
        let ImageSource::Pixels {
            data,
            width,
            stride,
            ..
        } = synthetic_picture(8)?
        else {
            panic!("not pixels");
        };
        assert_eq!((width, stride, data.len()), (8, 24, 8 * 8 * 3));
        // Corner (-1, -1): sin(-5), cos(1), sin(5) mapped by (v * 0.9 + 1) * 127.5.
        let want = [(-5f32).sin(), 1f32.cos(), 5f32.sin()]
            .map(|v| ((v * 0.9 + 1.0) * 127.5).round() as u8);
        assert_eq!(data[..3], want);
        Ok(())
    }

    #[test]
    fn zero_steps_or_batch_are_refused() -> Result<()> {
        let model = Arc::new(crate::model::random::random_model(
            &crate::model::random::tiny_sd1_config(),
            1,
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )?);
        let setup = BenchSetup {
            resolution: 64,
            batch_size: 1,
            vectors: 1,
            steps: 1,
        };
        for bad in [
            BenchSetup { steps: 0, ..setup },
            BenchSetup {
                batch_size: 0,
                ..setup
            },
        ] {
            assert!(BenchRun::new(model.clone(), bad).is_err(), "{bad:?}");
        }
        let mut run = BenchRun::new(model, setup)?;
        let mut seen = Vec::new();
        let times = run.time_steps(|s| seen.push(s.index))?;
        assert_eq!(seen, [0, 1]);
        assert_eq!(times.step_ms.len(), 1);
        assert!(times.mean_ms() > 0.0 && times.min_ms() <= times.max_ms());
        Ok(())
    }
}
