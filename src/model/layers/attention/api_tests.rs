//! The off-graph attention against the plain composition `softmax(q k^T scale + mask) v`,
//! built from candle ops on split heads and differentiated by candle's autograd in f64.
//!
//! Tolerances: f64 through the API is the same arithmetic in another order (measured:
//! at most 7e-15), so 1e-10 relative to the largest reference value. f32 is compared with
//! the f64 reference: rounding in sums of up to 4096 terms and in the exp approximation
//! (measured over these cases: at most 2e-6 on outputs and gradients, in the sharp-softmax
//! case) is far below 1e-5 on outputs and lse and 1e-4 on the gradients, relative to the
//! largest reference value; a missed tile, a wrong scale or a mask off by one shows up at
//! 1e-2 or more (a causal mask shifted by one key is off by 0.8).

use candle_core::{DType, Device, Tensor, Var, D};

use super::{attention_backward, attention_forward, AttentionMask};

#[derive(Clone, Copy, Debug)]
struct Case {
    batch: usize,
    n: usize,
    m: usize,
    heads: usize,
    dh: usize,
    mask: AttentionMask,
    /// q, k, v as narrow views of one fused projection output.
    fused: bool,
    /// Multiplies q: large values make peaked softmax rows.
    sharp: f64,
}

fn case(batch: usize, n: usize, m: usize, heads: usize, dh: usize) -> Case {
    Case {
        batch,
        n,
        m,
        heads,
        dh,
        mask: AttentionMask::None,
        fused: false,
        sharp: 1.0,
    }
}

/// The inputs in f64: q `[B, N, C]`, k and v `[B, M, C]` (strided views when `fused`), and
/// the weights `w` of the loss `sum(o * w)`, which is the output gradient.
fn inputs(c: &Case) -> candle_core::Result<[Tensor; 4]> {
    let d = Device::Cpu;
    let ch = c.heads * c.dh;
    let (q, k, v) = if c.fused {
        if c.n == c.m {
            let qkv = Tensor::randn(0f64, 1.0, (c.batch, c.n, 3 * ch), &d)?;
            (
                qkv.narrow(2, 0, ch)?,
                qkv.narrow(2, ch, ch)?,
                qkv.narrow(2, 2 * ch, ch)?,
            )
        } else {
            let kv = Tensor::randn(0f64, 1.0, (c.batch, c.m, 2 * ch), &d)?;
            let q = Tensor::randn(0f64, 1.0, (c.batch, c.n, ch), &d)?;
            (q, kv.narrow(2, 0, ch)?, kv.narrow(2, ch, ch)?)
        }
    } else {
        (
            Tensor::randn(0f64, 1.0, (c.batch, c.n, ch), &d)?,
            Tensor::randn(0f64, 1.0, (c.batch, c.m, ch), &d)?,
            Tensor::randn(0f64, 1.0, (c.batch, c.m, ch), &d)?,
        )
    };
    let w = Tensor::randn(0f64, 1.0, (c.batch, c.n, ch), &d)?;
    Ok([(q * c.sharp)?, k, v, w])
}

/// The plain composition on f64 variables: (o, lse, dq, dk, dv).
fn reference(c: &Case, t: &[Tensor; 4], scale: f64) -> candle_core::Result<[Tensor; 5]> {
    let [q, k, v, w] = t;
    let (q, k, v) = (
        Var::from_tensor(&q.contiguous()?)?,
        Var::from_tensor(&k.contiguous()?)?,
        Var::from_tensor(&v.contiguous()?)?,
    );
    let split = |x: &Tensor, len: usize| {
        x.reshape((c.batch, len, c.heads, c.dh))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (qs, ks, vs) = (
        split(q.as_tensor(), c.n)?,
        split(k.as_tensor(), c.m)?,
        split(v.as_tensor(), c.m)?,
    );
    let mut s = (qs.matmul(&ks.t()?.contiguous()?)? * scale)?;
    if c.mask == AttentionMask::Causal {
        let mask: Vec<f64> = (0..c.n)
            .flat_map(|i| (0..c.m).map(move |j| if j > i { -1e300 } else { 0.0 }))
            .collect();
        s = s.broadcast_add(&Tensor::from_vec(mask, (c.n, c.m), &Device::Cpu)?)?;
    }
    let max = s.max_keepdim(D::Minus1)?.detach();
    let e = s.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    let lse = (max + sum.log()?)?.squeeze(D::Minus1)?;
    let o = e
        .broadcast_div(&sum)?
        .matmul(&vs)?
        .transpose(1, 2)?
        .reshape((c.batch, c.n, c.heads * c.dh))?;
    let grads = (&o * w)?.sum_all()?.backward()?;
    let grad = |x: &Var| {
        grads
            .get(x.as_tensor())
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg("no gradient".into()))
    };
    Ok([o, lse.detach(), grad(&q)?, grad(&k)?, grad(&v)?])
}

/// Largest `|a - b|` relative to the largest `|b|` (at least 1).
fn rel_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    let a = a.to_dtype(DType::F64)?;
    let diff = (&a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
    let size = b.abs()?.max_all()?.to_scalar::<f64>()?;
    Ok(diff / size.max(1.0))
}

/// Runs the API in `dtype` on the case's inputs and compares the output, lse and each
/// gradient wanted by `need` with the reference.
fn check(c: Case, dtype: DType, need: [bool; 3]) -> candle_core::Result<()> {
    let t = inputs(&c)?;
    let scale = (c.dh as f64).powf(-0.5);
    let reference = reference(&c, &t, scale)?;
    let [q, k, v, w] = [
        t[0].to_dtype(dtype)?,
        t[1].to_dtype(dtype)?,
        t[2].to_dtype(dtype)?,
        t[3].to_dtype(dtype)?,
    ];
    // Converting a strided view makes it contiguous; keep the inputs strided views.
    let (q, k, v) = if c.fused && dtype != DType::F64 {
        let ch = c.heads * c.dh;
        let pad = |x: &Tensor| -> candle_core::Result<Tensor> {
            let z = Tensor::zeros((c.batch, x.dim(1)?, 5), dtype, &Device::Cpu)?;
            Tensor::cat(&[&z, x, &z], 2)?.narrow(2, 5, ch)
        };
        (pad(&q)?, pad(&k)?, pad(&v)?)
    } else {
        (q, k, v)
    };
    let (tol_out, tol_grad) = if dtype == DType::F64 {
        (1e-10, 1e-10)
    } else {
        (1e-5, 1e-4)
    };
    let (o, lse) = attention_forward(&q, &k, &v, c.heads, scale, c.mask)?;
    assert!(o.is_contiguous(), "{c:?}: o not contiguous");
    assert_eq!(lse.dims(), [c.batch, c.heads, c.n], "{c:?}: lse shape");
    let diff = rel_diff(&o, &reference[0])?;
    assert!(diff < tol_out, "{c:?} {dtype:?}: output off by {diff}");
    let diff = rel_diff(&lse, &reference[1])?;
    assert!(diff < tol_out, "{c:?} {dtype:?}: lse off by {diff}");
    let grads = attention_backward(&q, &k, &v, &o, &lse, &w, c.heads, scale, c.mask, need)?;
    for (i, (name, got)) in [("q", grads.0), ("k", grads.1), ("v", grads.2)]
        .into_iter()
        .enumerate()
    {
        match got {
            Some(got) => {
                assert!(need[i], "{c:?}: d{name} computed but not asked for");
                assert!(got.is_contiguous(), "{c:?}: d{name} not contiguous");
                assert_eq!(got.dims(), reference[2 + i].dims(), "{c:?}: d{name} shape");
                let diff = rel_diff(&got, &reference[2 + i])?;
                assert!(diff < tol_grad, "{c:?} {dtype:?}: d{name} off by {diff}");
            }
            None => assert!(!need[i], "{c:?}: d{name} missing"),
        }
    }
    Ok(())
}

const ALL: [bool; 3] = [true, true, true];

fn cases() -> Vec<Case> {
    let mut cases = vec![
        case(1, 1, 1, 1, 8),
        case(2, 7, 7, 3, 8),
        case(1, 77, 77, 2, 64),
        case(2, 300, 300, 2, 40),
        case(1, 1000, 1000, 1, 80),
        case(1, 300, 77, 8, 40),
        case(2, 130, 77, 2, 160),
        case(1, 64, 1, 2, 40),
        case(1, 1, 77, 2, 24),
        case(1, 256, 256, 2, 160),
        case(1, 200, 200, 1, 13),
    ];
    cases.push(Case {
        fused: true,
        ..case(2, 257, 257, 4, 40)
    });
    cases.push(Case {
        fused: true,
        ..case(1, 100, 77, 2, 80)
    });
    cases.push(Case {
        mask: AttentionMask::Causal,
        ..case(2, 77, 77, 12, 64)
    });
    cases.push(Case {
        mask: AttentionMask::Causal,
        fused: true,
        ..case(1, 300, 300, 2, 40)
    });
    cases.push(Case {
        mask: AttentionMask::Causal,
        ..case(1, 1, 1, 1, 8)
    });
    cases.push(Case {
        sharp: 8.0,
        ..case(1, 500, 500, 2, 40)
    });
    cases
}

#[test]
fn f64_api_matches_the_plain_composition() -> candle_core::Result<()> {
    for c in cases() {
        check(c, DType::F64, ALL)?;
    }
    Ok(())
}

#[test]
fn f32_api_matches_the_plain_composition() -> candle_core::Result<()> {
    for c in cases() {
        check(c, DType::F32, ALL)?;
    }
    Ok(())
}

#[test]
fn only_the_wanted_gradients_are_computed() -> candle_core::Result<()> {
    let c = Case {
        fused: true,
        ..case(1, 150, 150, 2, 40)
    };
    for dtype in [DType::F32, DType::F64] {
        for need in [
            [true, false, false],
            [false, true, false],
            [false, false, true],
            [false, true, true],
            [true, false, true],
            [false, false, false],
        ] {
            check(c, dtype, need)?;
        }
    }
    Ok(())
}

/// The 64x64 level of a 512 px UNet: 4096 tokens, head dim 40 (one head of eight, and
/// two heads at batch 2 for the batch stride).
#[test]
fn long_self_attention_matches_the_plain_composition() -> candle_core::Result<()> {
    check(case(1, 4096, 4096, 1, 40), DType::F32, ALL)?;
    check(
        Case {
            fused: true,
            ..case(2, 1030, 1030, 2, 40)
        },
        DType::F32,
        ALL,
    )
}

#[test]
fn bad_shapes_are_refused() -> candle_core::Result<()> {
    let d = Device::Cpu;
    let q = Tensor::zeros((1, 4, 12), DType::F32, &d)?;
    let k = Tensor::zeros((1, 5, 12), DType::F32, &d)?;
    let bad = Tensor::zeros((1, 5, 8), DType::F32, &d)?;
    assert!(attention_forward(&q, &k, &k, 5, 1.0, AttentionMask::None).is_err());
    assert!(attention_forward(&q, &k, &bad, 3, 1.0, AttentionMask::None).is_err());
    assert!(attention_forward(
        &q,
        &k,
        &k.to_dtype(DType::F64)?,
        3,
        1.0,
        AttentionMask::None
    )
    .is_err());
    let (o, lse) = attention_forward(&q, &k, &k, 3, 1.0, AttentionMask::None)?;
    assert!(attention_backward(
        &q,
        &k,
        &k,
        &o,
        &lse.narrow(2, 0, 3)?,
        &o,
        3,
        1.0,
        AttentionMask::None,
        ALL
    )
    .is_err());
    Ok(())
}
