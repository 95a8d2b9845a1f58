//! The descriptors sdti's cuDNN shim takes (`shim.h`'s `sdti_dnn_sdpa` and `sdti_dnn_conv`,
//! mirrored as `#[repr(C)]` structs), computed from tensor shapes and element strides in
//! plain Rust: which attention or convolution call cuDNN may run, and with which strides.
//! Nothing here touches CUDA, so the CPU tests check it (tests/suite/gpu_cudnn.rs includes
//! this file in the default build). The cuDNN graph cache in the shim is keyed by every
//! field of these descriptors, so equal descriptors share one plan.

/// `shim.h`'s `SDTI_DNN_F16` and `SDTI_DNN_BF16`.
pub const DNN_F16: i32 = 1;
pub const DNN_BF16: i32 = 2;

/// cuDNN's fused attention takes head dims that are multiples of 8, up to 256 (the Hopper
/// backward's limit; the forward's is the same), in f16 or bf16.
pub const SDPA_MAX_HEAD_DIM: usize = 256;

/// `shim.h`'s `sdti_dnn_sdpa`: one attention call, tensors in BHSD order by element strides.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SdpaDesc {
    pub b: i64,
    pub h: i64,
    pub s_q: i64,
    pub s_kv: i64,
    pub d: i64,
    pub q_stride: [i64; 4],
    pub k_stride: [i64; 4],
    pub v_stride: [i64; 4],
    pub o_stride: [i64; 4],
    pub do_stride: [i64; 4],
    pub dq_stride: [i64; 4],
    pub dk_stride: [i64; 4],
    pub dv_stride: [i64; 4],
    pub dtype: i32,
    pub causal: i32,
    pub scale: f32,
    pub reserved: i32,
}

/// `shim.h`'s `sdti_dnn_conv`: one 2-D convolution (groups 1, dilation 1), NCHW/KCRS
/// element strides.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvDesc {
    pub n: i64,
    pub c: i64,
    pub h: i64,
    pub w: i64,
    pub k: i64,
    pub r: i64,
    pub s: i64,
    pub out_h: i64,
    pub out_w: i64,
    pub pad_h: i64,
    pub pad_w: i64,
    pub stride_h: i64,
    pub stride_w: i64,
    pub x_stride: [i64; 4],
    pub w_stride: [i64; 4],
    pub y_stride: [i64; 4],
    pub dtype: i32,
    pub has_bias: i32,
}

/// One tensor as the descriptors see it: its dims and element strides.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    pub dims: &'a [usize],
    pub strides: &'a [usize],
}

fn i64s<const N: usize>(v: [usize; N]) -> Option<[i64; N]> {
    let mut out = [0i64; N];
    for (o, x) in out.iter_mut().zip(v) {
        *o = i64::try_from(x).ok()?;
    }
    Some(out)
}

/// The BHSD element strides of a merged-head `[B, T, H*dh]` tensor whose heads are the
/// consecutive `dh`-wide slices of its last dimension: any batch and token strides (a view
/// of a fused `[B, T, 3C]` projection is read in place), the last dimension contiguous.
pub fn merged_heads_bhsd(x: View, heads: usize) -> Option<[i64; 4]> {
    let (&[_, _, c], &[sb, st, sc]) = (x.dims, x.strides) else {
        return None;
    };
    if heads == 0 || c % heads != 0 || sc != 1 {
        return None;
    }
    i64s([sb, c / heads, st, 1])
}

/// The BHSD strides of a contiguous `[B, T, H*dh]` tensor (the outputs sdti allocates).
pub fn contiguous_bhsd(tokens: usize, heads: usize, head_dim: usize) -> Option<[i64; 4]> {
    let c = heads.checked_mul(head_dim)?;
    i64s([tokens.checked_mul(c)?, head_dim, c, 1])
}

/// The descriptor of an attention call on merged-head tensors (`q`: `[B, N, H*dh]`, `k`
/// and `v`: `[B, M, H*dh]`, see [`merged_heads_bhsd`]) with contiguous outputs (o, dO, dQ,
/// dK, dV), or `None` when cuDNN's fused attention does not take it (dtype, head dim,
/// strides that are not whole 16-byte units, sizes beyond i32).
pub fn sdpa_desc(
    q: View,
    k: View,
    v: View,
    heads: usize,
    dtype: i32,
    causal: bool,
    scale: f64,
) -> Option<SdpaDesc> {
    if dtype != DNN_F16 && dtype != DNN_BF16 {
        return None;
    }
    let (&[b, n, c], &[kb, m, kc]) = (q.dims, k.dims) else {
        return None;
    };
    if v.dims != [b, m, c] || (kb, kc) != (b, c) || b == 0 || n == 0 || m == 0 {
        return None;
    }
    let qs = merged_heads_bhsd(q, heads)?;
    let ks = merged_heads_bhsd(k, heads)?;
    let vs = merged_heads_bhsd(v, heads)?;
    let d = c / heads;
    if !d.is_multiple_of(8) || d > SDPA_MAX_HEAD_DIM {
        return None;
    }
    // Rows must start on 16-byte boundaries (8 half-precision values) for cuDNN's loads.
    if [qs, ks, vs].iter().any(|s| s[0] % 8 != 0 || s[2] % 8 != 0) {
        return None;
    }
    // cuDNN indexes with 32-bit integers in places: keep every tensor below 2^31 values.
    let limit = i32::MAX as usize;
    if b.checked_mul(n.max(m))?.checked_mul(c)? > limit {
        return None;
    }
    let os = contiguous_bhsd(n, heads, d)?;
    let kvs = contiguous_bhsd(m, heads, d)?;
    let [b, h, s_q, s_kv, d] = i64s([b, heads, n, m, d])?;
    Some(SdpaDesc {
        b,
        h,
        s_q,
        s_kv,
        d,
        q_stride: qs,
        k_stride: ks,
        v_stride: vs,
        o_stride: os,
        do_stride: os,
        dq_stride: os,
        dk_stride: kvs,
        dv_stride: kvs,
        dtype,
        causal: i32::from(causal),
        scale: scale as f32,
        reserved: 0,
    })
}

/// The output side of a convolution: `(size + 2 pad - kernel) / stride + 1`, when the
/// kernel fits the padded input.
pub fn conv_out_size(size: usize, kernel: usize, pad: usize, stride: usize) -> Option<usize> {
    if stride == 0 || kernel == 0 {
        return None;
    }
    let padded = size.checked_add(pad.checked_mul(2)?)?;
    Some(padded.checked_sub(kernel)? / stride + 1)
}

/// The contiguous NCHW strides of `[n, c, h, w]`.
pub fn contiguous_nchw(dims: [usize; 4]) -> Option<[i64; 4]> {
    let [_, c, h, w] = dims;
    let hw = h.checked_mul(w)?;
    i64s([c.checked_mul(hw)?, hw, w, 1])
}

fn dims4(v: View) -> Option<([usize; 4], [i64; 4])> {
    let (&[a, b, c, d], &[sa, sb, sc, sd]) = (v.dims, v.strides) else {
        return None;
    };
    Some(([a, b, c, d], i64s([sa, sb, sc, sd])?))
}

/// The descriptor of a convolution of `x` (`[N, C, H, W]`, any strides) by `weight`
/// (`[K, C, R, S]`) into a contiguous output, or `None` when the shapes do not fit,
/// the dtype is not f16/bf16 or a tensor has 2^31 values or more.
pub fn conv_desc(
    x: View,
    weight: View,
    pad: usize,
    stride: usize,
    dtype: i32,
    has_bias: bool,
) -> Option<ConvDesc> {
    if dtype != DNN_F16 && dtype != DNN_BF16 {
        return None;
    }
    let (xd, xs) = dims4(x)?;
    let (wd, ws) = dims4(weight)?;
    let [n, c, h, w] = xd;
    let [k, wc, r, s] = wd;
    if wc != c || [n, c, h, w, k].contains(&0) {
        return None;
    }
    let out_h = conv_out_size(h, r, pad, stride)?;
    let out_w = conv_out_size(w, s, pad, stride)?;
    let yd = [n, k, out_h, out_w];
    let limit = i32::MAX as usize;
    for dims in [xd, wd, yd] {
        if dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d))? > limit {
            return None;
        }
    }
    let ys = contiguous_nchw(yd)?;
    let [n, c, h, w, k, r, s, out_h, out_w, pad, stride] =
        i64s([n, c, h, w, k, r, s, out_h, out_w, pad, stride])?;
    Some(ConvDesc {
        n,
        c,
        h,
        w,
        k,
        r,
        s,
        out_h,
        out_w,
        pad_h: pad,
        pad_w: pad,
        stride_h: stride,
        stride_w: stride,
        x_stride: xs,
        w_stride: ws,
        y_stride: ys,
        dtype,
        has_bias: i32::from(has_bias),
    })
}

/// The descriptor of a convolution's input gradient: `dy` (`[N, K, H', W']`, any strides)
/// and `weight` (`[K, C, R, S]`) into a contiguous `dx` of `[N, C, in_h, in_w]`, or
/// `None` when the forward convolution of that input does not yield `dy`'s sides (the
/// caller's other path handles such gradients).
pub fn dgrad_desc(
    dy: View,
    weight: View,
    pad: usize,
    stride: usize,
    in_h: usize,
    in_w: usize,
    dtype: i32,
) -> Option<ConvDesc> {
    let (yd, ys) = dims4(dy)?;
    let (wd, _) = dims4(weight)?;
    let [n, k, oh, ow] = yd;
    let [wk, c, _, _] = wd;
    if wk != k {
        return None;
    }
    let xd = [n, c, in_h, in_w];
    let xs = contiguous_nchw(xd)?;
    let x_strides = xs.map(|s| s as usize);
    let mut desc = conv_desc(
        View {
            dims: &xd,
            strides: &x_strides,
        },
        weight,
        pad,
        stride,
        dtype,
        false,
    )?;
    if (desc.out_h, desc.out_w) != (oh as i64, ow as i64) {
        return None;
    }
    desc.y_stride = ys;
    Some(desc)
}
