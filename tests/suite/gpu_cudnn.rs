//! cuDNN through sdti's shim (src/gpu/cudnn): the descriptors in every build (shapes,
//! strides and refusals, computed by plain Rust that this file includes; the C and Rust
//! struct layouts agree; the default build stays free of CUDA and cuDNN), and, on a CUDA
//! device with cuDNN, its fused attention forward/backward and convolution forward/input
//! gradient against an f64 CPU evaluation and candle's composed ops on the device, through
//! the wrappers and through the layers that call them. Without the `cuda` feature, a GPU or
//! cuDNN the device tests print SKIPPED and pass (`SDTI_REQUIRE_CUDNN=1`, which
//! scripts/gpu-check.sh sets, makes a missing cuDNN a failure); gpu-check.sh runs them.

use std::path::PathBuf;

use candle_core::Device;

#[allow(dead_code)]
#[path = "../../src/gpu/cudnn/layout.rs"]
mod layout;

use layout::{View, DNN_BF16, DNN_F16};

fn repo_root() -> PathBuf {
    std::env::var_os("SDTI_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn read(rel: &str) -> String {
    let path = repo_root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn contiguous(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * dims[i + 1];
    }
    s
}

/// q, k and v as the fused projection's `[B, T, 3C]` output holds them: views of width C
/// whose token stride is 3C, read in place; the outputs contiguous.
#[test]
fn attention_reads_the_fused_projection_in_place() {
    let (b, t, heads, dh) = (2, 77, 8, 40);
    let c = heads * dh;
    let dims = [b, t, c];
    let strides = [t * 3 * c, 3 * c, 1];
    let qkv = View {
        dims: &dims,
        strides: &strides,
    };
    assert_eq!(
        layout::merged_heads_bhsd(qkv, heads),
        Some([(t * 3 * c) as i64, dh as i64, (3 * c) as i64, 1])
    );
    let d = layout::sdpa_desc(qkv, qkv, qkv, heads, DNN_BF16, false, 0.125).unwrap();
    assert_eq!((d.b, d.h, d.s_q, d.s_kv, d.d), (2, 8, 77, 77, 40));
    let out = [(t * c) as i64, dh as i64, c as i64, 1];
    for s in [
        d.o_stride,
        d.do_stride,
        d.dq_stride,
        d.dk_stride,
        d.dv_stride,
    ] {
        assert_eq!(s, out);
    }
    assert_eq!(
        (d.dtype, d.causal, d.scale, d.reserved),
        (DNN_BF16, 0, 0.125, 0)
    );
}

/// Cross-attention: 4096 queries against CLIP's 77 tokens (k and v of another length).
#[test]
fn attention_descriptor_of_cross_attention() {
    let (q_dims, kv_dims) = ([8, 4096, 320], [8, 77, 320]);
    let (qs, kvs) = (contiguous(&q_dims), contiguous(&kv_dims));
    let q = View {
        dims: &q_dims,
        strides: &qs,
    };
    let kv = View {
        dims: &kv_dims,
        strides: &kvs,
    };
    let d = layout::sdpa_desc(q, kv, kv, 8, DNN_F16, true, 1.0 / 40f64.sqrt()).unwrap();
    assert_eq!((d.s_q, d.s_kv, d.causal), (4096, 77, 1));
    assert_eq!(d.dk_stride, [77 * 320, 40, 320, 1]);
    assert_eq!(d.o_stride, [4096 * 320, 40, 320, 1]);
}

/// What cuDNN's fused attention does not take comes back `None` (the caller's own path
/// runs): f32, head dims that are not multiples of 8 or above 256, a strided last
/// dimension, rows off 16-byte boundaries, mismatched shapes, heads that do not divide C.
#[test]
fn attention_descriptor_refusals() {
    let desc = |dims: [usize; 3], strides: &[usize], heads: usize, dtype: i32| {
        let v = View {
            dims: &dims,
            strides,
        };
        layout::sdpa_desc(v, v, v, heads, dtype, false, 1.0)
    };
    for dh in [40, 80, 160, 64, 256] {
        let dims = [1, 9, 2 * dh];
        assert!(
            desc(dims, &contiguous(&dims), 2, DNN_BF16).is_some(),
            "{dh}"
        );
    }
    for dh in [36, 12, 264] {
        let dims = [1, 9, 2 * dh];
        assert!(
            desc(dims, &contiguous(&dims), 2, DNN_BF16).is_none(),
            "{dh}"
        );
    }
    let dims = [1, 9, 80];
    assert!(desc(dims, &contiguous(&dims), 2, 0).is_none(), "f32");
    assert!(
        desc(dims, &[720, 80, 2], 2, DNN_F16).is_none(),
        "strided channels"
    );
    assert!(
        desc(dims, &[9 * 84, 84, 1], 2, DNN_F16).is_none(),
        "84-value rows"
    );
    assert!(
        desc(dims, &contiguous(&dims), 3, DNN_F16).is_none(),
        "3 heads of 80"
    );
    assert!(
        desc(dims, &contiguous(&dims), 0, DNN_F16).is_none(),
        "0 heads"
    );
    let (q_dims, k_dims) = ([1, 9, 80], [2, 9, 80]);
    let (qs, ks) = (contiguous(&q_dims), contiguous(&k_dims));
    let (q, k) = (
        View {
            dims: &q_dims,
            strides: &qs,
        },
        View {
            dims: &k_dims,
            strides: &ks,
        },
    );
    assert!(layout::sdpa_desc(q, k, k, 2, DNN_F16, false, 1.0).is_none());
}

/// (batch, channels, height, width, out channels, kernel, padding, stride).
type ConvCase = (usize, usize, usize, usize, usize, usize, usize, usize);

/// The odd sizes of src/model/layers/conv.rs's tests (strides 1 and 2, paddings 0 to 2, 1x1
/// and 3x3 kernels), and odd sides with channel counts that are multiples of 8 (the ones
/// cuDNN's tensor-core engines take; SD's are all such but its first layer's 4).
const CONV_CASES: &[ConvCase] = &[
    (2, 3, 7, 9, 5, 3, 1, 1),
    (1, 4, 8, 8, 6, 3, 1, 2),
    (1, 4, 9, 7, 2, 3, 1, 2),
    (1, 4, 9, 7, 2, 3, 0, 2),
    (2, 5, 6, 6, 3, 1, 0, 1),
    (1, 2, 5, 5, 2, 3, 0, 1),
    (1, 2, 5, 5, 2, 3, 2, 1),
    (1, 8, 17, 13, 16, 3, 1, 2),
    (2, 8, 7, 9, 16, 3, 1, 1),
    (1, 16, 9, 7, 8, 3, 1, 2),
    (2, 32, 6, 5, 16, 1, 0, 1),
];

#[test]
fn convolution_descriptors() {
    for &(b, c, h, w, o, k, pad, stride) in CONV_CASES {
        let (xd, wd) = ([b, c, h, w], [o, c, k, k]);
        let (xs, ws) = (contiguous(&xd), contiguous(&wd));
        let x = View {
            dims: &xd,
            strides: &xs,
        };
        let wv = View {
            dims: &wd,
            strides: &ws,
        };
        let d = layout::conv_desc(x, wv, pad, stride, DNN_BF16, true).unwrap();
        let (oh, ow) = (
            (h + 2 * pad - k) / stride + 1,
            (w + 2 * pad - k) / stride + 1,
        );
        assert_eq!((d.out_h, d.out_w), (oh as i64, ow as i64));
        assert_eq!(d.x_stride.map(|s| s as usize).to_vec(), xs);
        assert_eq!(d.w_stride.map(|s| s as usize).to_vec(), ws);
        assert_eq!(
            d.y_stride.map(|s| s as usize).to_vec(),
            contiguous(&[b, o, oh, ow])
        );
        assert_eq!(
            (d.pad_h, d.pad_w, d.stride_h, d.stride_w, d.has_bias),
            (pad as i64, pad as i64, stride as i64, stride as i64, 1)
        );

        // The input gradient of the same layer: dy [b, o, oh, ow] into [b, c, h, w].
        let yd = [b, o, oh, ow];
        let ys = contiguous(&yd);
        let dy = View {
            dims: &yd,
            strides: &ys,
        };
        let g = layout::dgrad_desc(dy, wv, pad, stride, h, w, DNN_F16).unwrap();
        assert_eq!(
            (g.n, g.c, g.h, g.w, g.k),
            (b as i64, c as i64, h as i64, w as i64, o as i64)
        );
        assert_eq!(g.x_stride.map(|s| s as usize).to_vec(), xs);
        assert_eq!(g.y_stride.map(|s| s as usize).to_vec(), ys);
        assert_eq!(g.has_bias, 0);
        // An input whose forward pass would not give dy's sides is refused.
        assert!(layout::dgrad_desc(dy, wv, pad, stride, h + 2 * stride, w, DNN_F16).is_none());
    }
    // Stride 2 maps both 7 and 8 rows to 4: the gradient takes the side it is asked for.
    let (yd, wd) = ([1, 2, 4, 4], [2, 3, 3, 3]);
    let (ys, ws) = (contiguous(&yd), contiguous(&wd));
    let (dy, wv) = (
        View {
            dims: &yd,
            strides: &ys,
        },
        View {
            dims: &wd,
            strides: &ws,
        },
    );
    for side in [7, 8] {
        let g = layout::dgrad_desc(dy, wv, 1, 2, side, side, DNN_BF16).unwrap();
        assert_eq!((g.h, g.w), (side as i64, side as i64));
    }
    // f32, a channel mismatch, a kernel larger than the padded input.
    let (xd, xs) = ([1, 3, 4, 4], contiguous(&[1, 3, 4, 4]));
    let x = View {
        dims: &xd,
        strides: &xs,
    };
    assert!(layout::conv_desc(x, wv, 1, 1, 0, false).is_none());
    let (xd2, xs2) = ([1, 2, 4, 4], contiguous(&[1, 2, 4, 4]));
    let x2 = View {
        dims: &xd2,
        strides: &xs2,
    };
    assert!(layout::conv_desc(x2, wv, 1, 1, DNN_BF16, false).is_none());
    let (xd3, xs3) = ([1, 3, 1, 1], contiguous(&[1, 3, 1, 1]));
    let x3 = View {
        dims: &xd3,
        strides: &xs3,
    };
    assert!(layout::conv_desc(x3, wv, 0, 1, DNN_BF16, false).is_none());
    assert_eq!(layout::conv_out_size(64, 3, 1, 2), Some(32));
    assert_eq!(layout::conv_out_size(2, 5, 1, 1), None);
    assert_eq!(layout::conv_out_size(2, 1, 0, 0), None);
}

/// The field names of `struct_name` in shim.h, in order (`int64_t b, h;` gives b, h;
/// arrays lose their extent).
fn c_fields(header: &str, struct_name: &str) -> Vec<String> {
    let start = header
        .find(&format!("typedef struct {struct_name} {{"))
        .unwrap_or_else(|| panic!("shim.h: no struct {struct_name}"));
    let body = &header[start..];
    let body = &body[body.find('{').unwrap() + 1..body.find('}').unwrap()];
    let comments = regex::Regex::new(r"/\*.*?\*/").unwrap();
    let body = comments.replace_all(body, "");
    let mut names = Vec::new();
    for decl in body.split(';').map(str::trim).filter(|d| !d.is_empty()) {
        let (_, list) = decl.split_once(char::is_whitespace).unwrap();
        for name in list.split(',') {
            names.push(name.trim().split('[').next().unwrap().to_string());
        }
    }
    names
}

/// The field names of `struct_name` in layout.rs, in order.
fn rust_fields(source: &str, struct_name: &str) -> Vec<String> {
    let start = source
        .find(&format!("pub struct {struct_name} {{"))
        .unwrap();
    let body = &source[start..];
    let body = &body[body.find('{').unwrap() + 1..body.find('}').unwrap()];
    let field = regex::Regex::new(r"pub (\w+):").unwrap();
    field
        .captures_iter(body)
        .map(|c| c[1].to_string())
        .collect()
}

/// The `#[repr(C)]` mirrors in layout.rs have shim.h's fields in shim.h's order, and the
/// sizes those fields add up to (all 8-byte fields, then the 4-byte ones: no padding).
#[test]
fn rust_descriptors_mirror_the_c_header() {
    let header = read("src/gpu/cudnn/shim.h");
    let rust = read("src/gpu/cudnn/layout.rs");
    for (c, r) in [("sdti_dnn_sdpa", "SdpaDesc"), ("sdti_dnn_conv", "ConvDesc")] {
        assert_eq!(
            c_fields(&header, c),
            rust_fields(&rust, r),
            "{c} (shim.h) and {r} (layout.rs) differ"
        );
    }
    assert_eq!(
        std::mem::size_of::<layout::SdpaDesc>(),
        5 * 8 + 8 * 32 + 4 * 4
    );
    assert_eq!(
        std::mem::size_of::<layout::ConvDesc>(),
        13 * 8 + 3 * 32 + 2 * 4
    );
    for (name, value) in [("SDTI_DNN_F16", DNN_F16), ("SDTI_DNN_BF16", DNN_BF16)] {
        assert!(
            header.contains(&format!("#define {name} {value}\n")),
            "shim.h: {name} is not {value}"
        );
    }
}

/// The default build is free of CUDA and cuDNN: the `cuda` feature is off by default, the
/// build-dependencies that compile CUDA and C++ (cudaforge, cc) are optional and turned on
/// by `cuda` alone, and build.rs compiles the kernels and the shim only with it.
#[test]
fn default_build_is_free_of_cuda_and_cudnn() {
    let toml = read("Cargo.toml");
    assert!(
        toml.contains("default = []"),
        "Cargo.toml: default features"
    );
    let cuda = toml
        .lines()
        .find(|l| l.starts_with("cuda = ["))
        .expect("Cargo.toml: the cuda feature");
    for dep in ["cudaforge", "cc"] {
        let line = toml
            .lines()
            .find(|l| l.starts_with(&format!("{dep} = ")))
            .unwrap_or_else(|| panic!("Cargo.toml: no {dep} build-dependency"));
        assert!(line.contains("optional = true"), "{dep} must be optional");
        assert!(
            cuda.contains(&format!("\"dep:{dep}\"")),
            "cuda must enable {dep}"
        );
        let others = toml
            .lines()
            .filter(|l| l.contains(&format!("\"dep:{dep}\"")))
            .count();
        assert_eq!(others, 1, "only the cuda feature enables {dep}");
    }
    let build = read("build.rs");
    for call in ["cuda::build_kernels()", "cuda::build_cudnn_shim()"] {
        let at = build
            .find(call)
            .unwrap_or_else(|| panic!("build.rs: {call}"));
        let before = &build[..at];
        let gate = before.rfind("#[cfg(feature = \"cuda\")]").unwrap();
        assert!(
            !before[gate..].contains(';'),
            "build.rs: {call} must be behind #[cfg(feature = \"cuda\")]"
        );
    }
    #[cfg(not(feature = "cuda"))]
    {
        // This very binary is the default build: attention and convolutions in half
        // precision run candle's own ops on the CPU.
        use candle_core::{DType, Tensor};
        let q = Tensor::randn(0f32, 1.0, (1, 5, 16), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let (o, lse) = sdti::model::layers::attention_forward(
            &q,
            &q,
            &q,
            2,
            0.25,
            sdti::model::layers::AttentionMask::None,
        )
        .unwrap();
        assert_eq!((o.dims(), lse.dims()), (&[1, 5, 16][..], &[1, 2, 5][..]));
    }
}

/// The CUDA device, opened once; None, with a SKIPPED line, without CUDA, a GPU or cuDNN.
fn cudnn_device(test: &str) -> Option<Device> {
    static DEVICE: std::sync::OnceLock<Result<Device, String>> = std::sync::OnceLock::new();
    let opened =
        DEVICE.get_or_init(|| sdti::device::open_device("cuda").map_err(|e| e.to_string()));
    let device = match opened {
        Ok(d) => d.clone(),
        Err(e) => {
            eprintln!("SKIPPED: {test}: {e}");
            return None;
        }
    };
    #[cfg(feature = "cuda")]
    if sdti::gpu::cudnn::version().is_none() {
        assert!(
            std::env::var("SDTI_REQUIRE_CUDNN").map_or(true, |v| v != "1"),
            "{test}: cuDNN is not available and SDTI_REQUIRE_CUDNN=1"
        );
        eprintln!("SKIPPED: {test}: cuDNN is not available");
        return None;
    }
    Some(device)
}

macro_rules! cudnn_test {
    ($(#[$doc:meta])* $name:ident => $body:path) => {
        $(#[$doc])*
        #[test]
        fn $name() -> candle_core::Result<()> {
            if let Some(device) = cudnn_device(stringify!($name)) {
                #[cfg(feature = "cuda")]
                $body(&device)?;
                #[cfg(not(feature = "cuda"))]
                let _ = device;
            }
            Ok(())
        }
    };
}

cudnn_test!(
    /// Fused attention forward (output and row log-sum-exp) and backward (dQ, dK, dV), f16
    /// and bf16: head dims 40/80/160 (and 64 with the causal mask), odd token counts, q/k/v
    /// read in place from a fused projection, 77-token cross-attention; against the f64
    /// evaluation on the CPU (within 1e-2, or twice candle's composed ops' own error when
    /// that is larger) and through `attention_forward`/`attention_backward`.
    cudnn_attention_matches_f64 => on_gpu::attention
);
cudnn_test!(
    /// Convolution forward with bias and input gradient, f16 and bf16, on the odd sizes,
    /// strides and paddings of the CPU tests; against f64 on the CPU (1e-2) and through the
    /// Conv2d layer (forward and its input gradient by autograd).
    cudnn_convolution_matches_f64 => on_gpu::convolution
);
cudnn_test!(
    /// The probe: cuDNN attention and convolutions at SD 1.5's 512 px shapes (batch 1 and 8,
    /// bf16) against candle's composed ops on the same card, agreeing within 1e-2; prints
    /// both times (for the record, not asserted).
    cudnn_at_sd_shapes => on_gpu::sd_shapes
);

#[cfg(feature = "cuda")]
mod on_gpu {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Result, Tensor, Var, D};
    use sdti::gpu::cudnn;
    use sdti::model::layers::{attention_backward, attention_forward, AttentionMask, Conv2d};
    use sdti::model::weights::Weights;

    use crate::common::rel_err;

    const TOL: f64 = 1e-2;

    fn cpu64(t: &Tensor) -> Result<Tensor> {
        t.to_device(&Device::Cpu)?.to_dtype(DType::F64)
    }

    fn err(got: &Tensor, want: &Tensor) -> f64 {
        rel_err(&cpu64(got).unwrap(), &cpu64(want).unwrap())
    }

    fn check(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
        assert_eq!(got.dims(), want.dims(), "{what}: shapes differ");
        let e = err(got, want);
        assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.1e}");
    }

    /// `[B, T, H*dh]` to `[B, H, T, dh]`.
    fn heads_first(x: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        x.reshape((b, t, heads, c / heads))?
            .transpose(1, 2)?
            .contiguous()
    }

    fn heads_merged(x: &Tensor) -> Result<Tensor> {
        let (b, h, t, d) = x.dims4()?;
        x.transpose(1, 2)?.contiguous()?.reshape((b, t, h * d))
    }

    /// Attention forward and backward in the dtype of its inputs with candle ops (f64 on
    /// the CPU: the truth; half precision on the GPU: the composed path the layers ran
    /// before, its softmax in f32): (o, lse, dq, dk, dv).
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        g: &Tensor,
        heads: usize,
        scale: f64,
        causal: bool,
    ) -> Result<[Tensor; 5]> {
        let dtype = q.dtype();
        let acc = if dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let (q, k, v, g) = (
            heads_first(q, heads)?,
            heads_first(k, heads)?,
            heads_first(v, heads)?,
            heads_first(g, heads)?,
        );
        let s = (q.matmul(&k.t()?)? * scale)?.to_dtype(acc)?;
        let s = if causal {
            let (n, m) = (s.dim(2)?, s.dim(3)?);
            let mask: Vec<f64> = (0..n)
                .flat_map(|i| (0..m).map(move |j| if j > i { f64::NEG_INFINITY } else { 0.0 }))
                .collect();
            let mask = Tensor::from_vec(mask, (n, m), s.device())?.to_dtype(acc)?;
            s.broadcast_add(&mask)?
        } else {
            s
        };
        let max = s.max_keepdim(D::Minus1)?;
        let lse = (s
            .broadcast_sub(&max)?
            .exp()?
            .sum_keepdim(D::Minus1)?
            .log()?
            + &max)?;
        let p = s.broadcast_sub(&lse)?.exp()?;
        let o = p.to_dtype(dtype)?.matmul(&v)?;
        let dv = p.to_dtype(dtype)?.t()?.matmul(&g)?;
        let dp = g.matmul(&v.t()?)?.to_dtype(acc)?;
        let dot = (g.to_dtype(acc)? * o.to_dtype(acc)?)?.sum_keepdim(D::Minus1)?;
        let ds = (p * dp.broadcast_sub(&dot)?)?.to_dtype(dtype)?;
        let dq = (ds.matmul(&k)? * scale)?;
        let dk = (ds.t()?.matmul(&q)? * scale)?;
        Ok([
            heads_merged(&o)?,
            lse.squeeze(D::Minus1)?,
            heads_merged(&dq)?,
            heads_merged(&dk)?,
            heads_merged(&dv)?,
        ])
    }

    /// `randn` in `dtype` on `device`, and the same values in f64 on the CPU.
    fn input(dims: &[usize], dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
        let x = Tensor::randn(0f32, 1.0, dims, &Device::Cpu)?.to_dtype(dtype)?;
        Ok((x.to_device(device)?, x.to_dtype(DType::F64)?))
    }

    pub fn attention(device: &Device) -> Result<()> {
        // (batch, queries, keys, heads, head dim, q/k/v from one fused projection, causal)
        let cases = [
            (2, 67, 67, 5, 40, true, false),
            (1, 131, 131, 4, 80, true, false),
            (2, 45, 45, 2, 160, true, false),
            (2, 96, 77, 8, 40, false, false),
            (1, 33, 77, 4, 160, false, false),
            (1, 77, 77, 2, 64, true, true),
        ];
        for dtype in [DType::BF16, DType::F16] {
            for &(b, n, m, heads, dh, fused, causal) in &cases {
                let c = heads * dh;
                let scale = 1.0 / (dh as f64).sqrt();
                let what = format!("{dtype:?} b{b} n{n} m{m} {heads}x{dh} causal {causal}");
                let (q, k, v, q64, k64, v64) = if fused {
                    let (qkv, qkv64) = input(&[b, n, 3 * c], dtype, device)?;
                    let part = |t: &Tensor, i: usize| t.narrow(2, i * c, c);
                    (
                        part(&qkv, 0)?,
                        part(&qkv, 1)?,
                        part(&qkv, 2)?,
                        part(&qkv64, 0)?,
                        part(&qkv64, 1)?,
                        part(&qkv64, 2)?,
                    )
                } else {
                    let (q, q64) = input(&[b, n, c], dtype, device)?;
                    let (kv, kv64) = input(&[b, m, 2 * c], dtype, device)?;
                    (
                        q,
                        kv.narrow(2, 0, c)?,
                        kv.narrow(2, c, c)?,
                        q64,
                        kv64.narrow(2, 0, c)?,
                        kv64.narrow(2, c, c)?,
                    )
                };
                let (g, g64) = input(&[b, n, c], dtype, device)?;

                let (o, lse) = cudnn::sdpa_forward(&q, &k, &v, heads, scale, causal)?
                    .unwrap_or_else(|| panic!("{what}: cuDNN refused the forward"));
                let (dq, dk, dv) =
                    cudnn::sdpa_backward(&q, &k, &v, &o, &lse, &g, heads, scale, causal)?
                        .unwrap_or_else(|| panic!("{what}: cuDNN refused the backward"));
                assert_eq!(
                    (o.dtype(), lse.dtype(), dq.dtype()),
                    (dtype, DType::F32, dtype)
                );

                let truth = reference(&q64, &k64, &v64, &g64, heads, scale, causal)?;
                let composed = reference(&q, &k, &v, &g, heads, scale, causal)?;
                let names = ["o", "lse", "dq", "dk", "dv"];
                let got = [&o, &lse, &dq, &dk, &dv];
                for i in 0..5 {
                    let own = err(&composed[i], &truth[i]);
                    let tol = if i == 1 { 1e-3 } else { TOL.max(2.0 * own) };
                    check(&format!("{what} {}", names[i]), got[i], &truth[i], tol);
                }

                // The layer entry points run cuDNN too: the forward gives the same values (the
                // same plan; candle's path differs by ~1e-3); the backward, whose dQ sums
                // cuDNN may add in another order, is held to the truth like the direct call.
                let mask = if causal {
                    AttentionMask::Causal
                } else {
                    AttentionMask::None
                };
                let (o2, lse2) = attention_forward(&q, &k, &v, heads, scale, mask)?;
                check(&format!("{what} attention_forward"), &o2, &o, 1e-6);
                check(&format!("{what} attention_forward lse"), &lse2, &lse, 1e-6);
                let (dq2, dk2, dv2) = attention_backward(
                    &q,
                    &k,
                    &v,
                    &o,
                    &lse,
                    &g,
                    heads,
                    scale,
                    mask,
                    [true, false, true],
                )?;
                assert!(dk2.is_none(), "{what}: dk was not asked for");
                check(
                    &format!("{what} attention_backward dq"),
                    &dq2.unwrap(),
                    &truth[2],
                    TOL.max(2.0 * err(&composed[2], &truth[2])),
                );
                check(
                    &format!("{what} attention_backward dv"),
                    &dv2.unwrap(),
                    &truth[4],
                    TOL.max(2.0 * err(&composed[4], &truth[4])),
                );
            }
        }
        Ok(())
    }

    pub fn convolution(device: &Device) -> Result<()> {
        for dtype in [DType::BF16, DType::F16] {
            for &(b, c, h, w, o, k, pad, stride) in super::CONV_CASES {
                let what =
                    format!("{dtype:?} {b}x{c}x{h}x{w} -> {o} k{k} pad {pad} stride {stride}");
                let (x, x64) = input(&[b, c, h, w], dtype, device)?;
                let (kern, kern64) = input(&[o, c, k, k], dtype, device)?;
                let (bias, bias64) = input(&[o], dtype, device)?;
                let y64 = x64
                    .conv2d(&kern64, pad, stride, 1, 1)?
                    .broadcast_add(&bias64.reshape((1, o, 1, 1))?)?;
                // Channel counts that are multiples of 8 must run on cuDNN; cuDNN may have no
                // engine for others (the layer then runs candle's kernels, checked below too).
                let aligned = c.is_multiple_of(8) && o.is_multiple_of(8);
                let y = cudnn::conv_forward(&x, &kern, Some(&bias), pad, stride)?;
                match &y {
                    Some(y) => check(&format!("{what} forward"), y, &y64, TOL),
                    None if aligned => panic!("{what}: cuDNN refused the forward"),
                    None => println!("{what}: no cuDNN engine for the forward"),
                }

                let (g, g64) = input(y64.dims(), dtype, device)?;
                let x64v = Var::from_tensor(&x64)?;
                let grads = (x64v.as_tensor().conv2d(&kern64, pad, stride, 1, 1)? * &g64)?
                    .sum_all()?
                    .backward()?;
                let gx64 = grads.get(x64v.as_tensor()).expect("input gradient").clone();
                match cudnn::conv_input_grad(&g, &kern, pad, stride, h, w)? {
                    Some(gx) => check(&format!("{what} input gradient"), &gx, &gx64, TOL),
                    None if aligned => panic!("{what}: cuDNN refused the input gradient"),
                    None => println!("{what}: no cuDNN engine for the input gradient"),
                }

                // Through the layer: its forward and, by autograd, its input gradient.
                let tensors = HashMap::from([
                    ("conv.weight".to_string(), kern.clone()),
                    ("conv.bias".to_string(), bias.clone()),
                ]);
                let weights = Weights::from_tensors(tensors, dtype, device.clone());
                let layer = Conv2d::new(&weights, "conv", stride, pad)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                let xv = Var::from_tensor(&x)?;
                let y2 = layer
                    .forward(xv.as_tensor())
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                match &y {
                    // The same plan as the direct call: the same values.
                    Some(y) => check(&format!("{what} Conv2d forward"), &y2, y, 1e-6),
                    None => check(&format!("{what} Conv2d forward"), &y2, &y64, TOL),
                }
                let grads = (y2 * &g)?.sum_all()?.backward()?;
                let gx2 = grads.get(xv.as_tensor()).expect("layer input gradient");
                check(&format!("{what} Conv2d input gradient"), gx2, &gx64, TOL);
            }
        }
        Ok(())
    }

    /// The mean time of `f` over 5 runs after a warm-up, in ms, and its result.
    fn timed<T>(device: &Device, f: impl Fn() -> Result<T>) -> Result<(T, f64)> {
        let out = f()?;
        device.synchronize()?;
        let start = std::time::Instant::now();
        for _ in 0..5 {
            f()?;
        }
        device.synchronize()?;
        Ok((out, start.elapsed().as_secs_f64() * 1e3 / 5.0))
    }

    fn on_device_err(got: &Tensor, want: &Tensor) -> Result<f64> {
        let (a, b) = (got.to_dtype(DType::F32)?, want.to_dtype(DType::F32)?);
        let diff = (a - &b)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        let norm = b.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        Ok((diff / norm.max(1e-30)).sqrt())
    }

    /// Prints a probe line and checks that cuDNN and candle agree within `tol`.
    fn report(what: &str, cudnn_ms: f64, candle_ms: f64, errs: &[f64], tol: f64) {
        let worst = errs.iter().cloned().fold(0.0, f64::max);
        println!(
            "probe {what}: cudnn {cudnn_ms:.3} ms, candle {candle_ms:.3} ms ({:.1}x), relative \
             difference {worst:.2e}",
            candle_ms / cudnn_ms.max(1e-9)
        );
        assert!(
            worst <= tol,
            "{what}: cuDNN and candle differ by {worst:.3e}"
        );
    }

    pub fn sd_shapes(device: &Device) -> Result<()> {
        let bf16 = |dims: &[usize]| Tensor::randn(0f32, 1.0, dims, device)?.to_dtype(DType::BF16);
        for batch in [1, 8] {
            // SD 1.5 at 512 px: self-attention at 64/32/16 latents (C 320/640/1280, 8 heads),
            // cross-attention against 77 tokens at the first level.
            for (tokens, keys, c, fused) in [
                (4096, 4096, 320, true),
                (1024, 1024, 640, true),
                (256, 256, 1280, true),
                (4096, 77, 320, false),
            ] {
                let heads = 8;
                let scale = 1.0 / ((c / heads) as f64).sqrt();
                let (q, k, v) = if fused {
                    let qkv = bf16(&[batch, tokens, 3 * c])?;
                    (
                        qkv.narrow(2, 0, c)?,
                        qkv.narrow(2, c, c)?,
                        qkv.narrow(2, 2 * c, c)?,
                    )
                } else {
                    let kv = bf16(&[batch, keys, 2 * c])?;
                    (
                        bf16(&[batch, tokens, c])?,
                        kv.narrow(2, 0, c)?,
                        kv.narrow(2, c, c)?,
                    )
                };
                let g = bf16(&[batch, tokens, c])?;
                let what = format!("attention b{batch} {tokens}x{keys} C{c}");
                let ((o, lse), fwd) = timed(device, || {
                    cudnn::sdpa_forward(&q, &k, &v, heads, scale, false)?
                        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: refused")))
                })?;
                let ((dq, dk, dv), bwd) = timed(device, || {
                    cudnn::sdpa_backward(&q, &k, &v, &o, &lse, &g, heads, scale, false)?
                        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: refused")))
                })?;
                // candle's composed ops, forward and backward in one (materialised scores).
                let (want, both) =
                    timed(device, || reference(&q, &k, &v, &g, heads, scale, false))?;
                let errs = [
                    on_device_err(&o, &want[0])?,
                    on_device_err(&dq, &want[2])?,
                    on_device_err(&dk, &want[3])?,
                    on_device_err(&dv, &want[4])?,
                ];
                // Two bf16 computations of a 4096-key backward differ by more than one
                // rounding: the accuracy bound is cudnn_attention_matches_f64's, this one
                // only catches a wrong result.
                report(
                    &format!("{what} forward+backward"),
                    fwd + bwd,
                    both,
                    &errs,
                    2e-2,
                );
            }
            // The UNet's convolution kinds at 512 px: 3x3 at each level, the 2x downsamplers,
            // a 1x1 shortcut.
            for (c, o, side, k, pad, stride) in [
                (320, 320, 64, 3, 1, 1),
                (640, 640, 32, 3, 1, 1),
                (1280, 1280, 16, 3, 1, 1),
                (1280, 1280, 8, 3, 1, 1),
                (320, 320, 64, 3, 1, 2),
                (640, 1280, 16, 1, 0, 1),
                (4, 320, 64, 3, 1, 1),
            ] {
                let x = bf16(&[batch, c, side, side])?;
                let kern = bf16(&[o, c, k, k])?;
                let bias = bf16(&[o])?;
                let what = format!("conv b{batch} {c}->{o} {side}x{side} k{k} s{stride}");
                if cudnn::conv_forward(&x, &kern, Some(&bias), pad, stride)?.is_none() {
                    assert!(!c.is_multiple_of(8), "{what}: cuDNN refused the forward");
                    println!("probe {what}: no cuDNN engine (candle's kernels run it)");
                    continue;
                }
                let (y, ms) = timed(device, || {
                    cudnn::conv_forward(&x, &kern, Some(&bias), pad, stride)?
                        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: refused")))
                })?;
                let (want, ms_c) = timed(device, || {
                    x.conv2d(&kern, pad, stride, 1, 1)?
                        .broadcast_add(&bias.reshape((1, o, 1, 1))?)
                })?;
                let e = on_device_err(&y, &want)?;
                report(&format!("{what} forward"), ms, ms_c, &[e], TOL);
                let g = bf16(y.dims())?;
                let (gx, ms) = timed(device, || {
                    cudnn::conv_input_grad(&g, &kern, pad, stride, side, side)?
                        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: refused")))
                })?;
                // candle's transposed convolution: the same sums as the flipped-kernel
                // convolution src/model/layers/conv.rs runs without cuDNN.
                let (want, ms_c) = timed(device, || {
                    let out_pad = side + 2 * pad - k - (g.dim(2)? - 1) * stride;
                    g.conv_transpose2d(&kern, pad, out_pad, stride, 1)
                })?;
                let e = on_device_err(&gx, &want)?;
                report(&format!("{what} input gradient"), ms, ms_c, &[e], TOL);
            }
        }
        Ok(())
    }
}
