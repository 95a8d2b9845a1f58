//! Optional per-layer timings (`sdti bench --profile`): when enabled, every frozen layer's
//! forward and input-gradient pass waits for the device before and after it runs and
//! adds the elapsed time to its kind's total. The waits serialise the device, so profiled
//! steps are slower than real ones; the totals say where the time goes, the unprofiled
//! step says how long it takes. Disabled, it costs one atomic load per layer.
//!
//! Blocks (a resnet, a spatial transformer, a CLIP layer) are timed as a whole, and the
//! layers timed inside them are reported under the block's name (`transformer/attention`):
//! their time is part of the block's, not added to it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use candle_core::Device;

static ENABLED: AtomicBool = AtomicBool::new(false);
/// (calls, seconds) per (enclosing block kind, layer kind, pass).
type Totals = BTreeMap<(Option<&'static str>, &'static str, Pass), (u64, f64)>;
static TOTALS: Mutex<Totals> = Mutex::new(BTreeMap::new());

thread_local! {
    /// The kind being timed on this thread, if any: what a nested timing is part of.
    static CURRENT: std::cell::Cell<Option<&'static str>> = const { std::cell::Cell::new(None) };
}

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

/// `(kind.fwd or kind.bwd, calls, seconds)` per layer kind and pass since the last reset;
/// a layer timed inside a block is named `block/kind.fwd`.
pub fn totals() -> Vec<(String, u64, f64)> {
    TOTALS
        .lock()
        .map(|t| {
            t.iter()
                .map(|((outer, kind, pass), (n, s))| {
                    let suffix = match pass {
                        Pass::Forward => "fwd",
                        Pass::Backward => "bwd",
                    };
                    let name = match outer {
                        Some(outer) => format!("{outer}/{kind}.{suffix}"),
                        None => format!("{kind}.{suffix}"),
                    };
                    (name, *n, *s)
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
    let outer = CURRENT.with(|c| c.replace(Some(kind)));
    let start = Instant::now();
    let out = f().and_then(|out| device.synchronize().map(|()| out));
    let secs = start.elapsed().as_secs_f64();
    CURRENT.with(|c| c.set(outer));
    let out = out?;
    if let Ok(mut t) = TOTALS.lock() {
        let e = t.entry((outer, kind, pass)).or_insert((0, 0.0));
        e.0 += 1;
        e.1 += secs;
    }
    Ok(out)
}
