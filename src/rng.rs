//! Deterministic random numbers for training, with a fully serialisable state.
//!
//! Generator: xoshiro256++ (Blackman & Vigna), seeded through splitmix64 as its
//! authors recommend. Everything that influences future output — the four state
//! words *and* the spare Box-Muller value — lives in [`RngState`], so a run that
//! saves the state after N steps and resumes from it produces exactly the same
//! numbers as a run that never stopped.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Errors from restoring a generator.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RngError {
    /// xoshiro256++ never leaves the all-zero state once in it (it would emit zeros forever),
    /// so such a state can only come from a corrupt or hand-edited checkpoint.
    #[error("rng state: field 's' is all zeros, which is not a valid xoshiro256++ state")]
    ZeroState,
}

/// Complete generator state, for checkpoints (serde; JSON keeps u64 and f32 exactly).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RngState {
    /// The four xoshiro256++ state words.
    pub s: [u64; 4],
    /// Second value of the last Box-Muller pair, handed out by the next `normal_f32`.
    #[serde(default)]
    pub cached_normal: Option<f32>,
}

/// splitmix64 step: used for seeding and forking (its output is well mixed even
/// for adjacent seeds like 0, 1, 2).
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Deterministic xoshiro256++ generator with Box-Muller normals.
#[derive(Debug, Clone, PartialEq)]
pub struct Rng {
    s: [u64; 4],
    cached_normal: Option<f32>,
}

impl Rng {
    /// Seeds the generator from a single `u64` (via four splitmix64 outputs).
    pub fn new(seed: u64) -> Self {
        let mut sm = seed;
        let s = [
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
        ];
        // splitmix64 is a bijection of distinct counters, so four zeros cannot occur.
        Rng {
            s,
            cached_normal: None,
        }
    }

    /// Snapshot of the whole state, for checkpoints.
    pub fn state(&self) -> RngState {
        RngState {
            s: self.s,
            cached_normal: self.cached_normal,
        }
    }

    /// Restores a generator saved with [`Rng::state`].
    pub fn from_state(state: RngState) -> Result<Self, RngError> {
        if state.s == [0; 4] {
            return Err(RngError::ZeroState);
        }
        Ok(Rng {
            s: state.s,
            // A NaN/inf spare can only come from a damaged file; dropping it keeps output sane.
            cached_normal: state.cached_normal.filter(|v| v.is_finite()),
        })
    }

    /// Derives an independent generator for `stream` (e.g. 0 = data order, 1 = noise).
    ///
    /// Pure function of the current state and `stream`: `self` is not advanced, so
    /// forking at the same point always yields the same child.
    pub fn fork(&self, stream: u64) -> Rng {
        let mut acc = stream ^ 0x6A09_E667_F3BC_C908;
        let mut h = splitmix64(&mut acc);
        for w in self.s {
            let mut t = h ^ w;
            h = splitmix64(&mut t);
        }
        Rng::new(h)
    }

    /// Next 64 random bits (xoshiro256++).
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform `f32` in `[0, 1)` with 24 random bits (every value exactly representable).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform `f64` in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Unbiased uniform integer in `0..n` (Lemire's multiply-and-reject).
    ///
    /// `n == 0` has no valid answer; it returns 0 without drawing, so callers must
    /// reject empty collections themselves (the training code does so up front).
    pub fn uniform_usize(&mut self, n: usize) -> usize {
        if n <= 1 {
            return 0;
        }
        let n = n as u64;
        // Values of the low word below `threshold` would over-represent some results.
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = u128::from(self.next_u64()) * u128::from(n);
            if (m as u64) >= threshold {
                return (m >> 64) as usize;
            }
        }
    }

    /// Standard normal `f32` via Box-Muller; the second value of each pair is kept
    /// (and serialised) for the next call.
    pub fn normal_f32(&mut self) -> f32 {
        if let Some(v) = self.cached_normal.take() {
            return v;
        }
        // u1 in (0, 1] so ln(u1) is finite; computed in f64 so the tails are accurate.
        let u1 = ((self.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64);
        let u2 = self.next_f64();
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = std::f64::consts::TAU * u2;
        self.cached_normal = Some((r * theta.sin()) as f32);
        (r * theta.cos()) as f32
    }

    /// Fills `out` with standard normal values (same sequence as repeated `normal_f32`).
    pub fn fill_normal(&mut self, out: &mut [f32]) {
        for v in out {
            *v = self.normal_f32();
        }
    }

    /// Fisher-Yates shuffle, uniform over all permutations.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.uniform_usize(i + 1);
            items.swap(i, j);
        }
    }

    /// `true` with probability `p` (p <= 0 or NaN: never; p >= 1: always).
    pub fn bernoulli(&mut self, p: f64) -> bool {
        // Always draw, so the stream position does not depend on `p`.
        let u = self.next_f64();
        u < p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_reference_vector() {
        // First outputs for seed 1234567 from Vigna's reference splitmix64.c.
        let mut s = 1_234_567u64;
        let got: Vec<u64> = (0..5).map(|_| splitmix64(&mut s)).collect();
        assert_eq!(
            got,
            [
                6457827717110365317,
                3203168211198807973,
                9817491932198370423,
                4593380528125082431,
                16408922859458223821
            ]
        );
    }

    #[test]
    fn xoshiro256pp_reference_vector() {
        // State [1, 2, 3, 4] through the reference xoshiro256plusplus.c algorithm.
        let mut r = Rng::from_state(RngState {
            s: [1, 2, 3, 4],
            cached_normal: None,
        })
        .unwrap();
        let got: Vec<u64> = (0..6).map(|_| r.next_u64()).collect();
        assert_eq!(
            got,
            [
                41943041,
                58720359,
                3588806011781223,
                3591011842654386,
                9228616714210784205,
                9973669472204895162
            ]
        );
    }

    #[test]
    fn same_seed_same_stream_different_seed_differs() {
        let mut a = Rng::new(42);
        let mut b = Rng::new(42);
        let mut c = Rng::new(43);
        let va: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        let vb: Vec<u64> = (0..8).map(|_| b.next_u64()).collect();
        let vc: Vec<u64> = (0..8).map(|_| c.next_u64()).collect();
        assert_eq!(va, vb);
        assert_ne!(va, vc);
    }

    /// One "training step" worth of mixed draws; `7 + i` normals so that after
    /// 10 steps (115 normals) a Box-Muller spare is pending at the checkpoint.
    fn step(r: &mut Rng, i: usize, out: &mut Vec<f32>) {
        let mut buf = vec![0f32; 7 + i];
        r.fill_normal(&mut buf);
        out.extend_from_slice(&buf);
        out.push(r.next_f32());
        out.push(r.uniform_usize(1000) as f32);
        let mut order: Vec<u32> = (0..5).collect();
        r.shuffle(&mut order);
        out.extend(order.iter().map(|&v| v as f32));
    }

    #[test]
    fn resume_through_json_equals_straight_run() {
        let mut straight = Rng::new(7);
        let mut want = Vec::new();
        for i in 0..20 {
            step(&mut straight, i, &mut want);
        }

        let mut first = Rng::new(7);
        let mut got = Vec::new();
        for i in 0..10 {
            step(&mut first, i, &mut got);
        }
        let saved = first.state();
        assert!(
            saved.cached_normal.is_some(),
            "test must cover a pending spare"
        );
        let json = serde_json::to_string(&saved).unwrap();
        let restored: RngState = serde_json::from_str(&json).unwrap();
        let mut resumed = Rng::from_state(restored).unwrap();
        for i in 10..20 {
            step(&mut resumed, i, &mut got);
        }
        assert_eq!(want.len(), got.len());
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            assert_eq!(w.to_bits(), g.to_bits(), "value {i} differs after resume");
        }
    }

    #[test]
    fn zero_state_is_rejected() {
        let err = Rng::from_state(RngState {
            s: [0; 4],
            cached_normal: None,
        });
        assert_eq!(err, Err(RngError::ZeroState));
    }

    #[test]
    fn fork_is_deterministic_distinct_and_leaves_parent_alone() {
        let parent = Rng::new(1);
        let before = parent.state();
        let mut a1 = parent.fork(0);
        let mut a2 = parent.fork(0);
        let mut b = parent.fork(1);
        assert_eq!(parent.state(), before);
        let x1: Vec<u64> = (0..4).map(|_| a1.next_u64()).collect();
        let x2: Vec<u64> = (0..4).map(|_| a2.next_u64()).collect();
        let y: Vec<u64> = (0..4).map(|_| b.next_u64()).collect();
        let mut p = parent.clone();
        let z: Vec<u64> = (0..4).map(|_| p.next_u64()).collect();
        assert_eq!(x1, x2);
        assert_ne!(x1, y);
        assert_ne!(x1, z);
        assert_ne!(y, z);
        // Forking from a different parent state gives a different child.
        let mut q = Rng::new(2).fork(0);
        let w: Vec<u64> = (0..4).map(|_| q.next_u64()).collect();
        assert_ne!(x1, w);
    }

    #[test]
    fn next_f32_in_unit_interval_with_sane_mean() {
        let mut r = Rng::new(3);
        let n = 100_000;
        let mut sum = 0f64;
        for _ in 0..n {
            let v = r.next_f32();
            assert!((0.0..1.0).contains(&v));
            sum += f64::from(v);
        }
        let mean = sum / n as f64;
        // Std of the mean is ~0.0009; 0.005 is > 5 sigma.
        assert!((mean - 0.5).abs() < 0.005, "mean {mean}");
    }

    #[test]
    fn uniform_usize_is_in_range_and_roughly_flat() {
        let mut r = Rng::new(4);
        let mut counts = [0usize; 7];
        let n = 70_000;
        for _ in 0..n {
            let v = r.uniform_usize(7);
            counts[v] += 1;
        }
        // Chi-square with 6 dof: 22.5 is p ~= 0.001.
        let expected = n as f64 / 7.0;
        let chi2: f64 = counts
            .iter()
            .map(|&c| (c as f64 - expected).powi(2) / expected)
            .sum();
        assert!(chi2 < 22.5, "chi2 {chi2}, counts {counts:?}");
        assert_eq!(r.uniform_usize(0), 0);
        assert_eq!(r.uniform_usize(1), 0);
        // A bound that needs rejection sampling to be unbiased still stays in range.
        let big = usize::MAX / 3 * 2;
        for _ in 0..100 {
            assert!(r.uniform_usize(big) < big);
        }
    }

    #[test]
    fn normal_moments() {
        let mut r = Rng::new(5);
        let mut v = vec![0f32; 200_001];
        r.fill_normal(&mut v);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = v
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(v.iter().all(|x| x.is_finite()));
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
        let tail = v.iter().filter(|x| x.abs() > 1.96).count() as f64 / n;
        assert!((tail - 0.05).abs() < 0.004, "two-sided 5% tail was {tail}");
    }

    #[test]
    fn shuffle_is_a_permutation_and_moves_things() {
        let mut r = Rng::new(6);
        let mut v: Vec<usize> = (0..50).collect();
        r.shuffle(&mut v);
        let mut sorted = v.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_ne!(v, (0..50).collect::<Vec<_>>());
        // Each of the 6 orders of 3 items shows up about equally often.
        let mut seen = std::collections::HashMap::new();
        for _ in 0..6000 {
            let mut t = [0u8, 1, 2];
            r.shuffle(&mut t);
            *seen.entry(t).or_insert(0usize) += 1;
        }
        assert_eq!(seen.len(), 6);
        assert!(seen.values().all(|&c| (850..1150).contains(&c)), "{seen:?}");
        let mut empty: [u8; 0] = [];
        r.shuffle(&mut empty);
    }

    #[test]
    fn bernoulli_always_consumes_one_draw() {
        let mut a = Rng::new(8);
        let mut b = Rng::new(8);
        let _ = a.bernoulli(0.0);
        let _ = b.bernoulli(1.0);
        assert_eq!(a.state(), b.state());
    }
}
