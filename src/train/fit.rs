//! Whether a training job fits in memory, decided from the model's configuration before
//! its weights are read ([`crate::model::SdModel::load_checked`]), so a job that cannot run
//! says so at once instead of after loading half the model (SDXL in f32 takes about
//! 14 GiB of weights) or after the system kills the process.

use candle_core::{DType, Device};

use super::config::{RecomputeMode, TrainConfig};
use crate::error::{Error, Result};
use crate::model::memory::{available_bytes, loading_bytes, StepMemory};
use crate::model::{vae_dtype, ModelConfig, Recompute};

/// Refuses, with [`Error::Memory`], a run of `train` on a model of `model` in `dtype` on
/// `device` whose smallest step does not fit: with recompute on (the least memory a step
/// takes) unless `mode` turns it off. The limit is `budget_mib` where given (a host that
/// knows better, e.g. with swap, gives a larger one), else what the device has available
/// ([`available_bytes`]); where neither is known the run is not refused.
///
/// The estimate ([`StepMemory`]) errs a few percent high, so a job refused here would
/// have come within a few percent of the limit at best.
pub fn check_fits(
    model: &ModelConfig,
    dtype: DType,
    device: &Device,
    train: &TrainConfig,
    mode: RecomputeMode,
    budget_mib: Option<u64>,
) -> Result<()> {
    let (limit, what) = match budget_mib {
        Some(mib) => (mib.saturating_mul(1 << 20), "the memory budget"),
        None => match available_bytes(device, 0) {
            Some(bytes) => (bytes, "available"),
            None => return Ok(()),
        },
    };
    let resolution = train.resolution_for(model);
    let latent = resolution / 8;
    let estimate = |r| {
        StepMemory::estimate(
            model,
            train.batch_size,
            latent,
            latent,
            dtype.size_in_bytes(),
            r,
        )
    };
    let least = if mode == RecomputeMode::Off {
        Recompute::Off
    } else {
        Recompute::On
    };
    let need = estimate(least);
    // Loading holds the VAE and the whole token tables too, until the trainer and its
    // first step free them (SdModel::release_token_tables, SdModel::release_vae).
    let loading = loading_bytes(model, &need, vae_dtype(model, dtype).size_in_bytes());
    if need.total().max(loading) <= limit {
        return Ok(());
    }
    // GiB with one decimal; below 1 GiB, MiB (a tiny model or a small budget).
    let gib = |b: u64| {
        if b >= 1 << 30 {
            format!("{:.1} GiB", b as f64 / f64::from(1u32 << 30))
        } else {
            format!("{} MiB", b.div_ceil(1 << 20))
        }
    };
    let job = format!(
        "training {} at {resolution}x{resolution} px, batch {}, {dtype:?}",
        model.family.model_name(),
        train.batch_size,
    );
    let recompute = if least == Recompute::Off {
        "with recompute off"
    } else {
        "even with recompute on"
    };
    let mut message = format!(
        "{job} needs about {} {recompute} (weights {}, the step {}; loading {} with the VAE's weights and the token tables, freed for the steps); {} {what}",
        gib(need.total().max(loading)),
        gib(need.weights),
        gib(need.activations + need.overhead),
        gib(loading),
        gib(limit),
    );
    let with_recompute = estimate(Recompute::On).total();
    if least == Recompute::Off && with_recompute <= limit {
        message.push_str(&format!(
            "; with recompute on it would need about {}: turn it on (or auto)",
            gib(with_recompute)
        ));
    } else {
        message.push_str(
            ": lower the resolution or the batch size, use f16 or bf16 weights, or give a larger memory budget if the system can provide it (swap)",
        );
    }
    Err(Error::Memory(message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sdxl() -> ModelConfig {
        ModelConfig::sdxl()
    }

    #[test]
    fn sdxl_at_1024_fits_24_gib_with_recompute_and_not_16() {
        let train = TrainConfig::default();
        let fits = check_fits(
            &sdxl(),
            DType::F32,
            &Device::Cpu,
            &train,
            RecomputeMode::Auto,
            Some(24 * 1024),
        );
        assert!(fits.is_ok(), "{fits:?}");
        let e = check_fits(
            &sdxl(),
            DType::F32,
            &Device::Cpu,
            &train,
            RecomputeMode::Auto,
            Some(12 * 1024),
        )
        .unwrap_err()
        .to_string();
        for part in [
            "SDXL at 1024x1024 px, batch 1, F32",
            "even with recompute on",
            "12.0 GiB the memory budget",
            "lower the resolution",
        ] {
            assert!(e.contains(part), "{part:?} missing from: {e}");
        }
        // In bf16 the UNet's weights halve and the same job fits.
        assert!(check_fits(
            &sdxl(),
            DType::BF16,
            &Device::Cpu,
            &train,
            RecomputeMode::Auto,
            Some(12 * 1024)
        )
        .is_ok());
    }

    #[test]
    fn recompute_off_that_does_not_fit_points_to_recompute_on() {
        let train = TrainConfig::default();
        let on = StepMemory::estimate(&sdxl(), 1, 128, 128, 4, Recompute::On).total();
        let off = StepMemory::estimate(&sdxl(), 1, 128, 128, 4, Recompute::Off).total();
        assert!(on < off);
        let between = ((on + off) / 2) >> 20;
        let e = check_fits(
            &sdxl(),
            DType::F32,
            &Device::Cpu,
            &train,
            RecomputeMode::Off,
            Some(between),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("with recompute off"), "{e}");
        assert!(e.contains("turn it on"), "{e}");
        assert!(check_fits(
            &sdxl(),
            DType::F32,
            &Device::Cpu,
            &train,
            RecomputeMode::On,
            Some(between)
        )
        .is_ok());
    }

    #[test]
    fn the_resolution_follows_the_run_then_the_family() {
        // SD 1.x at its 512 px default fits 6 GiB; asked for 2048 px it does not.
        let sd1 = ModelConfig::sd1();
        let mut train = TrainConfig::default();
        let check = |t: &TrainConfig| {
            check_fits(
                &sd1,
                DType::F32,
                &Device::Cpu,
                t,
                RecomputeMode::Auto,
                Some(6 * 1024),
            )
        };
        assert!(check(&train).is_ok());
        train.resolution = Some(2048);
        let e = check(&train).unwrap_err().to_string();
        assert!(e.contains("2048x2048 px"), "{e}");
    }
}
