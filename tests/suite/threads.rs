//! The CPU thread count is decided once per process: candle-core 0.11.1 sizes every matrix
//! product with `num_cpus::get_physical()`, which upstream recomputes from /proc/cpuinfo on
//! each call; the copy in vendor/num_cpus (patched in by Cargo.toml) keeps the first answer
//! and counts how often it asked the operating system.

use candle_core::{DType, Device, Tensor};

#[test]
fn matrix_products_do_not_ask_the_os_for_the_cpu_count_again() {
    let a = Tensor::arange(0f32, 64., &Device::Cpu)
        .unwrap()
        .reshape((8, 8))
        .unwrap();
    let b = Tensor::ones((8, 8), DType::F32, &Device::Cpu).unwrap();
    for _ in 0..50 {
        a.matmul(&b).unwrap();
    }
    let physical = num_cpus::get_physical();
    for _ in 0..50 {
        assert_eq!(num_cpus::get_physical(), physical);
    }
    // Other tests in this process may have run products first; either way the operating
    // system was asked once (uncached, this is at least 50, and 100 more without
    // RAYON_NUM_THREADS).
    assert_eq!(num_cpus::physical_queries(), 1);

    // A user's or host's RAYON_NUM_THREADS still decides candle's count; without it, the
    // physical core count does.
    let from_env = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&n| n > 0);
    let expected = from_env.unwrap_or(physical);
    assert_eq!(candle_core::utils::get_num_threads(), expected);
}
