//! Optional per-layer timings (`sdti bench --profile`): when enabled, every frozen layer's
//! forward and input-gradient pass waits for the device before and after it runs and
//! adds the elapsed time to its kind's total. The waits serialise the device, so profiled
//! steps are slower than real ones; the totals say where the time goes, the unprofiled
//! step says how long it takes. Disabled, it costs one atomic load per layer.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use candle_core::Device;

static ENABLED: AtomicBool = AtomicBool::new(false);
/// (calls, seconds) per (layer kind, pass).
type Totals = BTreeMap<(&'static str, Pass), (u64, f64)>;
static TOTALS: Mutex<Totals> = Mutex::new(BTreeMap::new());

/// Which pass of a layer is timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Pass {
    Forward,
    Backward,
}

/// Turns the timings on or off (process-wide).
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Clears the totals.
pub fn reset() {
    if let Ok(mut t) = TOTALS.lock() {
        t.clear();
    }
}

/// `(kind.fwd or kind.bwd, calls, seconds)` per layer kind and pass since the last reset.
pub fn totals() -> Vec<(String, u64, f64)> {
    TOTALS
        .lock()
        .map(|t| {
            t.iter()
                .map(|((kind, pass), (n, s))| {
                    let suffix = match pass {
                        Pass::Forward => "fwd",
                        Pass::Backward => "bwd",
                    };
                    (format!("{kind}.{suffix}"), *n, *s)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `f`, timed as `pass` of `kind` when profiling is on.
pub fn time<R>(
    kind: &'static str,
    pass: Pass,
    device: &Device,
    f: impl FnOnce() -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    device.synchronize()?;
    let start = Instant::now();
    let out = f()?;
    device.synchronize()?;
    let secs = start.elapsed().as_secs_f64();
    if let Ok(mut t) = TOTALS.lock() {
        let e = t.entry((kind, pass)).or_insert((0, 0.0));
        e.0 += 1;
        e.1 += secs;
    }
    Ok(out)
}
