//! The kernel transform on x86-64 CPUs with AVX2 and FMA: eight kernels at a time, one per
//! lane of a 256-bit vector, each tap's vector built from the kernels' values in registers
//! and each plane written by one vector store.
//!
//! The portable transform ([`super::transform_task_body`]) builds its lanes through
//! memory, one value at a time, then reads each vector back whole: the store-to-load
//! forwarding of every such read stalled, and its plane writes were calls to `memcpy`.
//! In a profile of F(2x2) at 8x8 over 1280 channels (where the kernel is transformed a
//! block at a time inside the products) the transform took more samples than the
//! products. On a 2-core AVX2 machine (Zen 1) that convolution went from 26.4 to 19.6 ms
//! forward, F(4x4) at 16x16 overtook F(2x2) ([`super::NARROW_VECTORS`]), and a 256 px
//! SD 1.5 step went from 4.81 to 4.62-4.72 s.
//!
//! Each group also asks the cache for the kernels a few groups ahead, and
//! [`prefetch_start`] for the start of a kernel block's next row: the rows are runs of
//! 2-9 KB, 46-92 KB apart, too short for the hardware prefetchers to follow from their
//! first lines (F(2x2) at 8x8 over 1280 channels 17.5 / 21.3 -> 16.9 / 20.1 ms forward /
//! input gradient).
//!
//! The arithmetic is the portable transform's own ([`kernel_columns`], [`Variant::kernel`])
//! on [`Ymm`] values: the same operations, lane by lane, as on `f32`, so the transformed
//! values are the same bits as the portable transform's.

use std::arch::x86_64::{
    __m256, _mm256_add_ps, _mm256_mul_ps, _mm256_set1_ps, _mm256_setr_ps, _mm256_setzero_ps,
    _mm256_storeu_ps, _mm256_sub_ps, _mm256_xor_ps, _mm_prefetch, _MM_HINT_T0,
};

use super::{kernel_columns, Tap, Variant};

/// Kernels transformed together: the lanes of one vector.
const LANES: usize = 8;

/// Groups ahead whose kernels are asked into the cache.
const PREFETCH_GROUPS: usize = 4;

/// One tap of [`LANES`] kernels. Values of this type are made only inside
/// [`transform_task`], which runs only on CPUs with AVX2 and FMA (its callers check), so
/// the operators below run only there.
#[derive(Clone, Copy)]
pub(super) struct Ymm(__m256);

impl Tap for Ymm {}

/// `impl $trait<$rhs> for Ymm` by the AVX intrinsic `$op`; `$rhs` f32 is broadcast.
macro_rules! ymm_op {
    ($trait:ident, $method:ident, Ymm, $op:ident) => {
        impl std::ops::$trait<Ymm> for Ymm {
            type Output = Ymm;
            #[inline(always)]
            fn $method(self, r: Ymm) -> Ymm {
                // SAFETY: a Ymm exists only where the CPU has AVX2 (see the type).
                Ymm(unsafe { $op(self.0, r.0) })
            }
        }
    };
    ($trait:ident, $method:ident, f32, $op:ident) => {
        impl std::ops::$trait<f32> for Ymm {
            type Output = Ymm;
            #[inline(always)]
            fn $method(self, r: f32) -> Ymm {
                // SAFETY: a Ymm exists only where the CPU has AVX2 (see the type).
                Ymm(unsafe { $op(self.0, _mm256_set1_ps(r)) })
            }
        }
    };
}

ymm_op!(Add, add, Ymm, _mm256_add_ps);
ymm_op!(Sub, sub, Ymm, _mm256_sub_ps);
ymm_op!(Mul, mul, f32, _mm256_mul_ps);

impl std::ops::Neg for Ymm {
    type Output = Ymm;
    #[inline(always)]
    fn neg(self) -> Ymm {
        // The sign bit flipped, as f32's negation (zero becomes negative zero).
        // SAFETY: a Ymm exists only where the CPU has AVX2 (see the type).
        Ymm(unsafe { _mm256_xor_ps(self.0, _mm256_set1_ps(-0.0)) })
    }
}

/// Asks the cache for the first [`PREFETCH_GROUPS`] groups of kernels of `taps`: the run
/// of a kernel block's next row, while [`transform_task`] works on this one.
pub(super) fn prefetch_start(taps: &[f32]) {
    prefetch(taps.as_ptr(), taps.len().min(PREFETCH_GROUPS * 9 * LANES));
}

/// Asks the cache for the lines of the `values` values from `p` (any address: a prefetch
/// reads nothing and faults on none).
#[inline(always)]
fn prefetch(p: *const f32, values: usize) {
    for at in (0..values).step_by(16) {
        // SAFETY: a prefetch reads nothing and faults on no address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(at).cast()) };
    }
}

/// [`Variant::transform_task`] for the whole groups of [`LANES`] kernels at the start of
/// `taps` (9 values a kernel): `G g G^T` of each, flipped with `flip`, into `planes` (one
/// slice per position of the A x A block, indexed by kernel). Returns how many kernels it
/// transformed (the whole groups that `taps` holds and every plane has room for); the
/// caller transforms the rest.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn transform_task<V: Variant<M, A>, const M: usize, const A: usize>(
    taps: &[f32],
    planes: &mut [&mut [f32]],
    flip: bool,
) -> usize {
    // Two instances, so that each tap's offsets are constants.
    if flip {
        groups::<V, M, A, true>(taps, planes)
    } else {
        groups::<V, M, A, false>(taps, planes)
    }
}

/// Positions of the largest block (F(4x4)'s 6 x 6).
const MAX_PLANES: usize = 36;

/// [`transform_task`] with the flip fixed.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn groups<V: Variant<M, A>, const M: usize, const A: usize, const FLIP: bool>(
    taps: &[f32],
    planes: &mut [&mut [f32]],
) -> usize {
    let count = A * A;
    if count > MAX_PLANES || planes.len() < count {
        return 0;
    }
    // The planes' starts, read once: the stores below go through these (a bounds check
    // on every store was a large part of the loop).
    let room = planes[..count].iter().map(|p| p.len()).min().unwrap_or(0);
    let groups = (taps.len() / 9).min(room) / LANES;
    let mut dst = [std::ptr::null_mut::<f32>(); MAX_PLANES];
    for (d, p) in dst.iter_mut().zip(planes.iter_mut()) {
        *d = p.as_mut_ptr();
    }
    for b in 0..groups {
        // SAFETY: b < groups <= taps.len() / (9 * LANES), so the group's 9 * LANES values
        // are in `taps`.
        let k = unsafe { taps.as_ptr().add(b * 9 * LANES) };
        prefetch(k.wrapping_add(PREFETCH_GROUPS * 9 * LANES), 9 * LANES);
        let mut g = [Ymm(_mm256_setzero_ps()); 9];
        for (t, v) in g.iter_mut().enumerate() {
            let s = if FLIP { 8 - t } else { t };
            // SAFETY: s + 9 * 7 < 9 * LANES: inside the group.
            *v = Ymm(unsafe {
                _mm256_setr_ps(
                    *k.add(s),
                    *k.add(9 + s),
                    *k.add(18 + s),
                    *k.add(27 + s),
                    *k.add(36 + s),
                    *k.add(45 + s),
                    *k.add(54 + s),
                    *k.add(63 + s),
                )
            });
        }
        let at = b * LANES;
        for (i, row) in kernel_columns::<V, M, A, Ymm>(g).iter().enumerate() {
            let u = V::kernel(*row);
            for (j, v) in u.iter().enumerate() {
                // SAFETY: i * A + j < count <= planes.len(), so `dst` holds that plane's
                // start, and at + LANES <= groups * LANES <= room, its length or less.
                unsafe { _mm256_storeu_ps(dst[i * A + j].add(at), v.0) };
            }
        }
    }
    groups * LANES
}
