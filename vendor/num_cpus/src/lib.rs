//! num_cpus 1.17.0 whose `get_physical` asks the operating system once per process.
//!
//! candle-core 0.11.1 sizes every CPU matrix product with `num_cpus::get_physical()` when
//! `RAYON_NUM_THREADS` is unset, and on Linux each call opens and parses `/proc/cpuinfo`:
//! hundreds of times per training step, with the other threads spinning while one reads.
//! The count does not change while a process runs, so the first answer is kept. `upstream/`
//! is num_cpus 1.17.0's `src/` byte for byte; `get` is its `get`, not cached (nothing calls it
//! per product, and it follows the thread's CPU affinity).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

#[rustfmt::skip]
#[path = "upstream/lib.rs"]
mod upstream;

pub use upstream::get;

/// How many times [`get_physical`] has asked the operating system (at most once per process).
static PHYSICAL_QUERIES: AtomicUsize = AtomicUsize::new(0);

/// Returns the number of physical cores of the current system, as num_cpus 1.17.0 does,
/// computed on the first call and returned from memory afterwards.
///
/// This will always return at least `1`.
pub fn get_physical() -> usize {
    static PHYSICAL: OnceLock<usize> = OnceLock::new();
    *PHYSICAL.get_or_init(|| {
        PHYSICAL_QUERIES.fetch_add(1, Ordering::Relaxed);
        upstream::get_physical()
    })
}

/// Not in upstream num_cpus: how many times this process has asked the operating system for
/// the physical core count, so a test can tell that the count is decided once.
#[doc(hidden)]
pub fn physical_queries() -> usize {
    PHYSICAL_QUERIES.load(Ordering::Relaxed)
}
