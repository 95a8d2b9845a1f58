//! Optional per-layer timings (`sdti bench --profile`): when enabled, every frozen layer's
//! forward and input-gradient pass waits for the device before and after it runs and
//! adds the elapsed time to its kind's total. The waits serialise the device, so profiled
//! steps are slower than real ones; the totals say where the time goes, the unprofiled
//! step says how long it takes. Disabled, it costs one atomic load per layer.
//!
//! Blocks (a resnet, a spatial transformer, a CLIP layer) are timed as a whole, and the
//! layers timed inside them are reported under the block's name (`transformer/attention`):
//! their time is part of the block's, not added to it.
//!
//! A layer or block whose input is an image (`[B, C, H, W]`) is also timed at its
//! [`Level`], the input's channels and size, so that [`totals_by_level`] can tell the
//! UNet's levels apart (a layer timed inside a block is at the block's level).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use candle_core::{Device, Tensor};

static ENABLED: AtomicBool = AtomicBool::new(false);
/// (calls, seconds) per (enclosing block kind, layer kind, level, pass).
type Totals = BTreeMap<(Option<&'static str>, &'static str, Option<Level>, Pass), (u64, f64)>;
static TOTALS: Mutex<Totals> = Mutex::new(BTreeMap::new());

thread_local! {
    /// The kind (and level) being timed on this thread, if any: what a nested timing is
    /// part of.
    static CURRENT: std::cell::Cell<Option<(&'static str, Option<Level>)>> =
        const { std::cell::Cell::new(None) };
}

/// Where a layer runs: its image input's channels and size (a UNet level; a block on
/// joined inputs counts both parts' channels).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Level {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl Level {
    /// The level of a `[B, C, H, W]` input; `None` for any other shape.
    pub fn of(x: &Tensor) -> Option<Level> {
        match x.dims() {
            &[_, channels, height, width] => Some(Level {
                channels,
                height,
                width,
            }),
            _ => None,
        }
    }
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

/// `(kind.fwd or kind.bwd, calls, seconds)` per layer kind and pass since the last reset,
/// every level together; a layer timed inside a block is named `block/kind.fwd`.
pub fn totals() -> Vec<(String, u64, f64)> {
    let mut merged: BTreeMap<String, (u64, f64)> = BTreeMap::new();
    for ((outer, kind, _, pass), (n, s)) in snapshot() {
        let e = merged.entry(name(outer, kind, pass)).or_default();
        e.0 += n;
        e.1 += s;
    }
    merged.into_iter().map(|(k, (n, s))| (k, n, s)).collect()
}

/// One layer kind's total at one level and pass (see [`totals_by_level`]).
#[derive(Clone, Debug, PartialEq)]
pub struct LevelTotal {
    /// `kind`, or `block/kind` for a layer timed inside a block.
    pub name: String,
    pub level: Level,
    pub pass: Pass,
    pub calls: u64,
    pub seconds: f64,
}

/// As [`totals`], per level, for the layers timed at one.
pub fn totals_by_level() -> Vec<LevelTotal> {
    snapshot()
        .into_iter()
        .filter_map(|((outer, kind, level, pass), (calls, seconds))| {
            Some(LevelTotal {
                name: qualified(outer, kind),
                level: level?,
                pass,
                calls,
                seconds,
            })
        })
        .collect()
}

fn snapshot() -> Totals {
    TOTALS.lock().map(|t| t.clone()).unwrap_or_default()
}

/// `kind.fwd`, `block/kind.bwd`, ...
fn name(outer: Option<&str>, kind: &str, pass: Pass) -> String {
    let suffix = match pass {
        Pass::Forward => "fwd",
        Pass::Backward => "bwd",
    };
    format!("{}.{suffix}", qualified(outer, kind))
}

/// `kind`, or `block/kind` for a layer timed inside a block.
fn qualified(outer: Option<&str>, kind: &str) -> String {
    match outer {
        Some(outer) => format!("{outer}/{kind}"),
        None => kind.to_string(),
    }
}

/// Runs `f`, timed as `pass` of `kind` when profiling is on (at the enclosing block's
/// level, if any).
pub fn time<R>(
    kind: &'static str,
    pass: Pass,
    device: &Device,
    f: impl FnOnce() -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    time_at(kind, None, pass, device, f)
}

/// [`time`] at `level` (`None`: the enclosing block's, if any).
pub fn time_at<R>(
    kind: &'static str,
    level: Option<Level>,
    pass: Pass,
    device: &Device,
    f: impl FnOnce() -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    device.synchronize()?;
    let outer = CURRENT.with(|c| c.get());
    let level = level.or(outer.and_then(|(_, l)| l));
    CURRENT.with(|c| c.set(Some((kind, level))));
    let start = Instant::now();
    let out = f().and_then(|out| device.synchronize().map(|()| out));
    let secs = start.elapsed().as_secs_f64();
    CURRENT.with(|c| c.set(outer));
    let out = out?;
    if let Ok(mut t) = TOTALS.lock() {
        let e = t
            .entry((outer.map(|(k, _)| k), kind, level, pass))
            .or_insert((0, 0.0));
        e.0 += 1;
        e.1 += secs;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block timed at a level, with a layer inside it: the layer is reported under the
    /// block's name and at its level, and both are in the totals of every level together.
    /// Only this test's own kinds are checked (other tests may run layers meanwhile).
    #[test]
    fn nested_timings_carry_the_blocks_level() -> candle_core::Result<()> {
        let d = Device::Cpu;
        let x = Tensor::zeros((1, 8, 4, 2), candle_core::DType::F32, &d)?;
        let level = Level::of(&x);
        assert_eq!(
            level,
            Some(Level {
                channels: 8,
                height: 4,
                width: 2
            })
        );
        assert_eq!(Level::of(&x.flatten_from(2)?), None);
        enable(true);
        let run = || {
            time_at("test-block", level, Pass::Forward, &d, || {
                time("test-layer", Pass::Forward, &d, || Ok(()))
            })?;
            time_at("test-block", level, Pass::Backward, &d, || Ok(()))?;
            time("test-block", Pass::Forward, &d, || Ok(()))
        };
        let out = run();
        enable(false);
        out?;
        let total = |name: &str| totals().into_iter().find(|t| t.0 == name).map(|t| t.1);
        assert_eq!(total("test-block.fwd"), Some(2), "both levels together");
        assert_eq!(total("test-block.bwd"), Some(1));
        assert_eq!(total("test-block/test-layer.fwd"), Some(1));
        let mut mine: Vec<(String, Pass, u64)> = totals_by_level()
            .into_iter()
            .filter(|t| t.name.starts_with("test-block"))
            .inspect(|t| assert_eq!(Some(t.level), level, "{}", t.name))
            .map(|t| (t.name, t.pass, t.calls))
            .collect();
        mine.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        let want = [
            ("test-block", Pass::Forward, 1),
            ("test-block", Pass::Backward, 1),
            ("test-block/test-layer", Pass::Forward, 1),
        ];
        assert_eq!(mine.len(), want.len(), "{mine:?}");
        for (got, want) in mine.iter().zip(want) {
            assert_eq!((got.0.as_str(), got.1, got.2), want);
        }
        Ok(())
    }
}
