//! sdti's fused CUDA kernels (src/gpu): the wiring between the Rust launchers and the `.cu`
//! sources, checked in every build; and, on a CUDA device, each kernel against candle's
//! composed ops (the path it replaces) and an f64 CPU evaluation of the same formula on the
//! same inputs, and each backward kernel against central differences of its forward.
//! Without the `cuda` feature or without a GPU the device tests print SKIPPED and pass;
//! scripts/gpu-check.sh runs them on the GPU machine.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use candle_core::Device;

/// The checkout's root (`SDTI_REPO_ROOT` when the test binary runs from another checkout).
fn repo_root() -> PathBuf {
    std::env::var_os("SDTI_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn read(rel: &str) -> String {
    let path = repo_root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `LayerNorm` -> `layer_norm`.
fn snake(camel: &str) -> String {
    let mut out = String::new();
    for (i, ch) in camel.chars().enumerate() {
        if ch.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(ch.to_ascii_lowercase());
    }
    out
}

/// Every kernel src/gpu/mod.rs launches exists in the `.cu` file its module loads, for each
/// storage type, with the PTX constant build.rs names after that file; and every entry point
/// of the `.cu` files is launched by some wrapper (no kernel is compiled for nothing).
/// Runs in every build: the CPU CI checks the names the CUDA build will look up at run time.
#[test]
fn launched_kernels_exist_in_the_cuda_sources() {
    let rust = read("src/gpu/mod.rs");
    let kernel =
        regex::Regex::new(r#"Kernel\s*\{\s*module:\s*Module::(\w+),\s*name:\s*"(\w+)"\s*,?\s*\}"#)
            .unwrap();
    let mut launched: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for c in kernel.captures_iter(&rust) {
        launched
            .entry(c[1].to_string())
            .or_default()
            .insert(c[2].to_string());
    }
    let names: usize = launched.values().map(BTreeSet::len).sum();
    assert!(
        names >= 9,
        "src/gpu/mod.rs: found {names} kernel definitions: {launched:?}"
    );

    // `Module::X => ptx::Y`: the PTX constant build.rs writes for x.cu is X (upper case).
    let ptx = regex::Regex::new(r"Module::(\w+)\s*=>\s*ptx::(\w+)").unwrap();
    let ptx_of: BTreeMap<String, String> = ptx
        .captures_iter(&rust)
        .map(|c| (c[1].to_string(), c[2].to_string()))
        .collect();

    let entry = regex::Regex::new(r#"extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\("#).unwrap();
    let kernels_dir = repo_root().join("src/gpu/kernels");
    let mut files = BTreeSet::new();
    for e in std::fs::read_dir(&kernels_dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "cu") {
            files.insert(path.file_stem().unwrap().to_string_lossy().into_owned());
        }
    }
    let modules: BTreeSet<String> = launched.keys().map(|m| snake(m)).collect();
    assert_eq!(
        files, modules,
        "the .cu files under src/gpu/kernels and the modules src/gpu/mod.rs loads differ"
    );

    for (module, kernels) in &launched {
        let file = snake(module);
        assert_eq!(
            ptx_of.get(module).map(String::as_str),
            Some(file.to_uppercase().as_str()),
            "Module::{module} must load ptx::{} (build.rs names it after {file}.cu)",
            file.to_uppercase()
        );
        let source = read(&format!("src/gpu/kernels/{file}.cu"));
        let defined: BTreeSet<String> = entry
            .captures_iter(&source)
            .map(|c| c[1].to_string())
            .collect();
        let mut expected = BTreeSet::new();
        for k in kernels {
            for suffix in ["f32", "f16", "bf16"] {
                expected.insert(format!("{k}_{suffix}"));
            }
        }
        let missing: Vec<_> = expected.difference(&defined).collect();
        assert!(
            missing.is_empty(),
            "{file}.cu lacks the entry points {missing:?} that src/gpu/mod.rs launches"
        );
        let unused: Vec<_> = defined.difference(&expected).collect();
        assert!(
            unused.is_empty(),
            "{file}.cu defines {unused:?}, which src/gpu/mod.rs never launches"
        );
    }
}

/// The CUDA device of the kernel tests, opened once (tensors of two opened devices do not
/// mix); None, with a SKIPPED line, in a build without CUDA or on a machine without a GPU.
fn cuda_device(test: &str) -> Option<Device> {
    static DEVICE: std::sync::OnceLock<Result<Device, String>> = std::sync::OnceLock::new();
    let opened =
        DEVICE.get_or_init(|| sdti::device::open_device("cuda").map_err(|e| e.to_string()));
    match opened {
        Ok(d) => Some(d.clone()),
        Err(e) => {
            eprintln!("SKIPPED: {test}: {e}");
            None
        }
    }
}

/// A test that runs `$body(&device)` on the CUDA device, and is SKIPPED elsewhere.
macro_rules! gpu_test {
    ($(#[$doc:meta])* $name:ident => $body:path) => {
        $(#[$doc])*
        #[test]
        fn $name() -> candle_core::Result<()> {
            if let Some(device) = cuda_device(stringify!($name)) {
                #[cfg(feature = "cuda")]
                $body(&device)?;
                #[cfg(not(feature = "cuda"))]
                let _ = device;
            }
            Ok(())
        }
    };
}

gpu_test!(
    /// GEGLU forward and backward: f32 within 1e-5 of the f64 formula and of candle's
    /// composed ops, f16/bf16 within 1e-2; odd widths, more rows than the grid has blocks;
    /// the backward against central differences of the forward kernel.
    geglu_kernels_match_the_composition => on_gpu::geglu
);
gpu_test!(
    /// The erf GELU, SiLU and quick GELU gradients and the quick GELU forward, as above; one
    /// tensor longer than a launch's threads (the grid-stride loop).
    activation_kernels_match_the_composition => on_gpu::activations
);
gpu_test!(
    /// Layer norm forward (output, mean, 1/std) and backward (with and without the residual
    /// gradient), as above, at SD's widths and odd ones.
    layer_norm_kernels_match_the_composition => on_gpu::layer_norm
);
gpu_test!(
    /// Group norm forward (output, mean, 1/std) and backward, each with and without the
    /// fused SiLU, as above, at SD's widths (320/640/1280 channels in 32 groups, batch 1 and
    /// 8, odd spatial sizes), tiny groups and one group split across the most blocks.
    group_norm_kernels_match_the_composition => on_gpu::group_norm
);
gpu_test!(
    /// The wrappers refuse what they do not implement: CPU tensors, f64, mixed dtypes,
    /// mismatched shapes, an odd GEGLU width; and `fusable` says so.
    kernel_wrappers_refuse_unsupported_input => on_gpu::refusals
);
gpu_test!(
    /// At SD 1.5's batch-8 shapes in bf16 (64x64 latents: 4096 tokens of 320 channels, the
    /// GEGLU projection 2560 wide; group norm + SiLU over [8, 320, 64, 64]), each kernel
    /// agrees with the composed ops the layers ran before within 1e-2; prints the time of both
    /// (for the record, not asserted).
    kernels_at_sd_shapes_match_the_composition => on_gpu::sd_shapes
);

#[cfg(feature = "cuda")]
mod on_gpu {
    use candle_core::{DType, Device, Result, Tensor, D};
    use sdti::gpu;

    use crate::common::rel_err;

    /// The tolerance of a kernel's result in `dtype` against the f64 truth: f32 at 1e-5,
    /// half precision at 1e-2 (a few roundings of an 8- or 11-bit mantissa).
    fn tol(dtype: DType) -> f64 {
        if dtype == DType::F32 {
            1e-5
        } else {
            1e-2
        }
    }

    /// Norm-wise relative error of `got` against `want`, both brought to the CPU in f64.
    fn err(got: &Tensor, want: &Tensor) -> f64 {
        let cpu = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F64);
        rel_err(&cpu(got).unwrap(), &cpu(want).unwrap())
    }

    fn check(what: &str, dtype: DType, got: &Tensor, want: &Tensor, tol: f64) {
        assert_eq!(got.dims(), want.dims(), "{what} ({dtype:?}): shapes differ");
        assert_eq!(got.dtype(), dtype, "{what}: output dtype");
        let e = err(got, want);
        assert!(
            e <= tol,
            "{what} ({dtype:?}): relative error {e:.3e} > {tol:.0e}"
        );
    }

    /// `randn * scale + shift` in `dtype` on `device`, and the same values (after rounding
    /// to `dtype`) in f64 on the CPU.
    fn input(
        dims: &[usize],
        scale: f64,
        shift: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let x = Tensor::randn(0f32, 1.0, dims, &Device::Cpu)?
            .affine(scale, shift)?
            .to_dtype(dtype)?;
        Ok((x.to_device(device)?, x.to_dtype(DType::F64)?))
    }

    /// `Phi(x)` and `phi(x)` in f64.
    fn cdf_pdf(x: &Tensor) -> Result<(Tensor, Tensor)> {
        let cdf = ((x / std::f64::consts::SQRT_2)?.erf()? + 1.0)?.affine(0.5, 0.0)?;
        let pdf = (x.sqr()? * -0.5)?
            .exp()?
            .affine(1.0 / (2.0 * std::f64::consts::PI).sqrt(), 0.0)?;
        Ok((cdf, pdf))
    }

    fn sigmoid(x: &Tensor) -> Result<Tensor> {
        (x.neg()?.exp()? + 1.0)?.recip()
    }

    /// `(sum(f(x + e v) g) - sum(f(x - e v) g)) / 2e` against `sum(df v)`, the sums in f64 on
    /// the CPU: the backward kernel's `df` (the input gradient for the output gradient `g`) is
    /// the derivative of the forward kernel `f` (f32, on the device). The difference is
    /// measured against `||df v||` (the size of the sum's terms), so a wrong derivative fails
    /// whatever the size of the tensor.
    fn directional(
        what: &str,
        f: impl Fn(&Tensor) -> Result<Tensor>,
        df: &Tensor,
        x: &Tensor,
        g: &Tensor,
    ) -> Result<()> {
        let cpu = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F64);
        let v = x.randn_like(0.0, 1.0)?;
        let e = 1e-2;
        let g64 = cpu(g)?;
        let plus = cpu(&f(&(x + (&v * e)?)?)?)?;
        let minus = cpu(&f(&(x - (&v * e)?)?)?)?;
        let numeric = (((plus - minus)? * &g64)?.sum_all()? / (2.0 * e))?.to_scalar::<f64>()?;
        let terms = (cpu(df)? * cpu(&v)?)?;
        let analytic = terms.sum_all()?.to_scalar::<f64>()?;
        let scale = terms.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
        let diff = (numeric - analytic).abs() / scale.max(1e-30);
        assert!(
            diff < 1e-3,
            "{what}: directional derivative {analytic} vs central difference {numeric} ({diff:.2e})"
        );
        Ok(())
    }

    pub fn geglu(device: &Device) -> Result<()> {
        // [rows..., 2n]: odd n, n above a block's 256 threads, SD's 4C = 1280, rows beyond
        // the 65536 blocks of a launch (grid-stride).
        let shapes: [&[usize]; 5] = [
            &[1, 2],
            &[3, 5, 14],
            &[2, 77, 2 * 300],
            &[4, 2560],
            &[70001, 6],
        ];
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for dims in shapes {
                let n = dims[dims.len() - 1] / 2;
                let (h, h64) = input(dims, 2.0, 0.3, dtype, device)?;
                let mut out_dims = dims.to_vec();
                *out_dims.last_mut().unwrap() = n;
                let (g, g64) = input(&out_dims, 1.0, 0.0, dtype, device)?;

                let a64 = h64.narrow(D::Minus1, 0, n)?;
                let b64 = h64.narrow(D::Minus1, n, n)?;
                let (cdf, pdf) = cdf_pdf(&b64)?;
                let want = (&a64 * (&b64 * &cdf)?)?;
                let got = gpu::geglu_forward(&h)?;
                let what = format!("geglu_forward {dims:?}");
                check(&what, dtype, &got, &want, tol(dtype));
                // The composed ops it replaces (src/model/layers/activation.rs, on the GPU).
                let composed =
                    (h.narrow(D::Minus1, 0, n)? * h.narrow(D::Minus1, n, n)?.gelu_erf()?)?;
                check(
                    &format!("{what} vs composed"),
                    dtype,
                    &got,
                    &composed,
                    tol(dtype),
                );

                let da = (&g64 * (&b64 * &cdf)?)?;
                let db = ((&g64 * &a64)? * (&cdf + (&b64 * &pdf)?)?)?;
                let want = Tensor::cat(&[da, db], D::Minus1)?;
                let got = gpu::geglu_backward(&g, &h)?;
                check(
                    &format!("geglu_backward {dims:?}"),
                    dtype,
                    &got,
                    &want,
                    tol(dtype),
                );
                if dtype == DType::F32 && h.elem_count() < 100_000 {
                    directional(&format!("geglu {dims:?}"), gpu::geglu_forward, &got, &h, &g)?;
                }
            }
        }
        // A non-contiguous projection (a transposed view) gives the same result.
        let (h, _) = input(&[8, 3, 2], 1.0, 0.0, DType::F32, device)?;
        let ht = h.transpose(0, 2)?; // [2, 3, 8], strided
        let want = gpu::geglu_forward(&ht.contiguous()?)?;
        check(
            "geglu_forward strided",
            DType::F32,
            &gpu::geglu_forward(&ht)?,
            &want,
            0.0,
        );
        Ok(())
    }

    pub fn activations(device: &Device) -> Result<()> {
        let alpha = sdti::model::layers::QUICK_GELU_ALPHA;
        let shapes: [&[usize]; 3] = [&[1], &[3, 7, 131], &[2, 320, 9, 9]];
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for dims in shapes {
                let (x, x64) = input(dims, 3.0, 0.1, dtype, device)?;
                let (g, g64) = input(dims, 1.0, 0.0, dtype, device)?;
                let t = tol(dtype);

                let (cdf, pdf) = cdf_pdf(&x64)?;
                let want = (&g64 * (&cdf + (&x64 * &pdf)?)?)?;
                let got = gpu::gelu_erf_backward(&g, &x)?;
                check(
                    &format!("gelu_erf_backward {dims:?}"),
                    dtype,
                    &got,
                    &want,
                    t,
                );

                let s = sigmoid(&x64)?;
                let want = (&g64 * (&s * ((&x64 * (1.0 - &s)?)? + 1.0)?)?)?;
                let got = gpu::silu_backward(&g, &x)?;
                check(&format!("silu_backward {dims:?}"), dtype, &got, &want, t);
                if dtype == DType::F32 {
                    directional(&format!("silu {dims:?}"), |x| x.silu(), &got, &x, &g)?;
                }

                let s = sigmoid(&(&x64 * alpha)?)?;
                let want = (&x64 * &s)?;
                let got = gpu::quick_gelu_forward(&x)?;
                check(
                    &format!("quick_gelu_forward {dims:?}"),
                    dtype,
                    &got,
                    &want,
                    t,
                );
                let composed = (&x * candle_nn::ops::sigmoid(&(&x * alpha)?)?)?;
                check(
                    &format!("quick_gelu_forward {dims:?} vs composed"),
                    dtype,
                    &got,
                    &composed,
                    t,
                );
                let want = (&g64 * (&s + ((&x64 * &s)? * (1.0 - &s)?)?.affine(alpha, 0.0)?)?)?;
                let got = gpu::quick_gelu_backward(&g, &x)?;
                check(
                    &format!("quick_gelu_backward {dims:?}"),
                    dtype,
                    &got,
                    &want,
                    t,
                );
                if dtype == DType::F32 {
                    let f = gpu::quick_gelu_forward;
                    directional(&format!("quick_gelu {dims:?}"), f, &got, &x, &g)?;
                }
            }
        }
        // More values than one launch has threads (65536 blocks of 256): the grid-stride
        // loop reaches the tail. Against candle's composed SiLU gradient on the device.
        let n = (1 << 24) + 4097;
        let x = Tensor::randn(0f32, 2.0, n, device)?;
        let g = Tensor::randn(0f32, 1.0, n, device)?;
        let s = candle_nn::ops::sigmoid(&x)?;
        let composed = (&g * (&s * ((&x * (1.0 - &s)?)? + 1.0)?)?)?;
        let got = gpu::silu_backward(&g, &x)?;
        check(
            "silu_backward 2^24 + 4097",
            DType::F32,
            &got,
            &composed,
            1e-5,
        );
        let tail = got.narrow(0, n - 5, 5)?;
        let want = composed.narrow(0, n - 5, 5)?;
        check("silu_backward tail", DType::F32, &tail, &want, 1e-5);
        Ok(())
    }

    /// Layer norm of f64 rows: `(y, mean, rstd, xhat)`.
    fn layer_norm64(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        eps: f64,
    ) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let rstd = (var + eps)?.sqrt()?.recip()?;
        let xhat = centred.broadcast_mul(&rstd)?;
        let y = xhat.broadcast_mul(w)?.broadcast_add(b)?;
        Ok((y, mean, rstd, xhat))
    }

    pub fn layer_norm(device: &Device) -> Result<()> {
        let eps = 1e-5;
        // Widths: SD's 320/640/1280 and CLIP's 768, odd ones, one value per row (var 0),
        // and rows beyond the 65536 blocks x 8 warps of a launch.
        let shapes: [&[usize]; 7] = [
            &[2, 4096 / 16, 320],
            &[3, 77, 768],
            &[1, 64, 1280],
            &[5, 37],
            &[2, 3, 2049],
            &[7, 1],
            &[524_288 + 19, 3],
        ];
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for dims in shapes {
                let c = dims[dims.len() - 1];
                let (x, x64) = input(dims, 2.0, 5.0, dtype, device)?;
                let (w, w64) = input(&[c], 0.5, 1.0, dtype, device)?;
                let (b, b64) = input(&[c], 0.5, 0.0, dtype, device)?;
                let (g, g64) = input(dims, 1.0, 0.0, dtype, device)?;
                let (dr, dr64) = input(dims, 1.0, 0.0, dtype, device)?;
                let t = tol(dtype);
                let what = format!("layer_norm_forward {dims:?}");

                let (y64, mean64, rstd64, xhat64) = layer_norm64(&x64, &w64, &b64, eps)?;
                let (y, mean, rstd) = gpu::layer_norm_forward(&x, &w, &b, eps)?;
                check(&what, dtype, &y, &y64, t);
                // Statistics in f32 of the rounded input: f32 accuracy in every dtype.
                check(&format!("{what} mean"), DType::F32, &mean, &mean64, 1e-5);
                check(&format!("{what} rstd"), DType::F32, &rstd, &rstd64, 1e-5);
                // candle-nn's fused kernel, which the layers run on the GPU today.
                let candle = candle_nn::ops::layer_norm(&x, &w, &b, eps as f32)?;
                check(&format!("{what} vs candle-nn"), dtype, &y, &candle, t);

                // dx = rstd (gs - mean(gs) - xhat mean(gs xhat)), gs = g w
                let gs = g64.broadcast_mul(&w64)?;
                let mean_g = gs.mean_keepdim(D::Minus1)?;
                let mean_gx = (&gs * &xhat64)?.mean_keepdim(D::Minus1)?;
                let want = gs
                    .broadcast_sub(&mean_g)?
                    .sub(&xhat64.broadcast_mul(&mean_gx)?)?
                    .broadcast_mul(&rstd64)?;
                let got = gpu::layer_norm_backward(&g, &x, &mean, &rstd, &w, None)?;
                let what = format!("layer_norm_backward {dims:?}");
                check(&what, dtype, &got, &want, t);
                let got_add = gpu::layer_norm_backward(&g, &x, &mean, &rstd, &w, Some(&dr))?;
                check(
                    &format!("{what} + residual"),
                    dtype,
                    &got_add,
                    &(&want + &dr64)?,
                    t,
                );
                if dtype == DType::F32 && x.elem_count() < 100_000 && c > 1 {
                    let f = |x: &Tensor| Ok(gpu::layer_norm_forward(x, &w, &b, eps)?.0);
                    directional(&format!("layer_norm {dims:?}"), f, &got, &x, &g)?;
                }
            }
        }
        Ok(())
    }

    /// Group norm (`groups` groups over dimension 1) of f64 values, SiLU after it when
    /// `silu`: `(y, mean, rstd, xhat)`, the statistics `[B, groups, 1]`.
    fn group_norm64(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        let xg = x.reshape((x.dim(0)?, groups, ()))?;
        let mean = xg.mean_keepdim(D::Minus1)?;
        let centred = xg.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let rstd = (var + eps)?.sqrt()?.recip()?;
        let xhat = centred.broadcast_mul(&rstd)?.reshape(x.dims())?;
        let (w, b) = (per_channel(w, x.rank())?, per_channel(b, x.rank())?);
        let a = xhat.broadcast_mul(&w)?.broadcast_add(&b)?;
        let y = if silu { (&a * sigmoid(&a)?)? } else { a };
        Ok((y, mean, rstd, xhat))
    }

    /// A `[C]` vector shaped `[1, C, 1, ...]` for a tensor of `rank` dimensions.
    fn per_channel(v: &Tensor, rank: usize) -> Result<Tensor> {
        let mut dims = vec![1, v.dim(0)?];
        dims.resize(rank, 1);
        v.reshape(dims)
    }

    /// The group norm the layers composed before the kernels: candle-nn's layer norm over
    /// each group's values, the affine in two broadcast passes, then SiLU.
    fn group_norm_composed(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> Result<Tensor> {
        let xg = x.reshape((x.dim(0)?, groups, ()))?.contiguous()?;
        let n = xg.dim(2)?;
        let ones = Tensor::ones(n, x.dtype(), x.device())?;
        let zeros = Tensor::zeros(n, x.dtype(), x.device())?;
        let xhat = candle_nn::ops::layer_norm(&xg, &ones, &zeros, eps as f32)?;
        let y = xhat
            .reshape(x.dims())?
            .broadcast_mul(&per_channel(w, x.rank())?)?
            .broadcast_add(&per_channel(b, x.rank())?)?;
        if silu {
            candle_nn::ops::silu(&y)
        } else {
            Ok(y)
        }
    }

    pub fn group_norm(device: &Device) -> Result<()> {
        let eps = 1e-5;
        // (dims, groups): SD 1.5's resnet widths at batch 1 and 8 with odd spatial sizes,
        // a rank-3 and a rank-2 input (one value per group: variance 0), and one group of
        // 2.9M values (more than 128 blocks x 2048 values: long chunks).
        let shapes: [(&[usize], usize); 8] = [
            (&[1, 320, 63, 65], 32),
            (&[8, 320, 17, 15], 32),
            (&[1, 640, 31, 33], 32),
            (&[8, 640, 9, 7], 32),
            (&[8, 1280, 7, 9], 32),
            (&[3, 96, 5], 32),
            (&[4, 32], 32),
            (&[1, 32, 301, 299], 1),
        ];
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for (dims, groups) in shapes {
                let c = dims[1];
                let (x, x64) = input(dims, 2.0, 5.0, dtype, device)?;
                let (w, w64) = input(&[c], 0.5, 1.0, dtype, device)?;
                let (b, b64) = input(&[c], 0.5, 0.0, dtype, device)?;
                let (g, g64) = input(dims, 1.0, 0.0, dtype, device)?;
                let t = tol(dtype);
                for silu in [false, true] {
                    let what = format!("group_norm_forward {dims:?} / {groups} silu {silu}");
                    let (y64, mean64, rstd64, xhat64) =
                        group_norm64(&x64, &w64, &b64, groups, eps, silu)?;
                    let (y, mean, rstd) = gpu::group_norm_forward(&x, &w, &b, groups, eps, silu)?;
                    check(&what, dtype, &y, &y64, t);
                    // Statistics in f32 of the rounded input: f32 accuracy in every dtype.
                    check(&format!("{what} mean"), DType::F32, &mean, &mean64, 1e-5);
                    check(&format!("{what} rstd"), DType::F32, &rstd, &rstd64, 1e-5);
                    let composed = group_norm_composed(&x, &w, &b, groups, eps, silu)?;
                    // The composition rounds the normalised values to the storage type
                    // before the affine and the SiLU: two roundings more.
                    check(
                        &format!("{what} vs composed"),
                        dtype,
                        &y,
                        &composed,
                        2.0 * t,
                    );

                    // gs = g silu'(a) w, a = xhat w + b; per group
                    // dx = rstd (gs - mean(gs) - xhat mean(gs xhat))
                    let (wc, bc) = (per_channel(&w64, x.rank())?, per_channel(&b64, x.rank())?);
                    let mut gs = g64.clone();
                    if silu {
                        let a = xhat64.broadcast_mul(&wc)?.broadcast_add(&bc)?;
                        let s = sigmoid(&a)?;
                        gs = (gs * (&s * ((&a * (1.0 - &s)?)? + 1.0)?)?)?;
                    }
                    let gs = gs.broadcast_mul(&wc)?.reshape((dims[0], groups, ()))?;
                    let xg = xhat64.reshape((dims[0], groups, ()))?;
                    let mean_g = gs.mean_keepdim(D::Minus1)?;
                    let mean_gx = (&gs * &xg)?.mean_keepdim(D::Minus1)?;
                    let want = gs
                        .broadcast_sub(&mean_g)?
                        .sub(&xg.broadcast_mul(&mean_gx)?)?
                        .broadcast_mul(&rstd64)?
                        .reshape(dims)?;
                    let got = gpu::group_norm_backward(&g, &x, &mean, &rstd, &w, &b, groups, silu)?;
                    let what = format!("group_norm_backward {dims:?} / {groups} silu {silu}");
                    check(&what, dtype, &got, &want, t);
                    let per_group = x.elem_count() / (dims[0] * groups);
                    if dtype == DType::F32 && x.elem_count() < 100_000 && per_group > 1 {
                        let f = |x: &Tensor| {
                            Ok(gpu::group_norm_forward(x, &w, &b, groups, eps, silu)?.0)
                        };
                        directional(&what, f, &got, &x, &g)?;
                    }
                }
            }
        }
        Ok(())
    }

    pub fn refusals(device: &Device) -> Result<()> {
        let x = Tensor::randn(0f32, 1.0, (4, 6), device)?;
        let cpu = x.to_device(&Device::Cpu)?;
        let x64 = x.to_dtype(DType::F64)?;
        let xbf = x.to_dtype(DType::BF16)?;
        assert!(gpu::fusable(&[&x]) == gpu::enabled());
        assert!(!gpu::fusable(&[&cpu]));
        assert!(!gpu::fusable(&[&x64]));
        assert!(!gpu::fusable(&[&x, &xbf]));
        assert!(gpu::geglu_forward(&cpu).is_err());
        assert!(gpu::geglu_forward(&x64).is_err());
        assert!(
            gpu::geglu_forward(&x.narrow(1, 0, 5)?).is_err(),
            "odd width"
        );
        assert!(
            gpu::geglu_backward(&x, &x).is_err(),
            "gradient of the wrong width"
        );
        assert!(gpu::silu_backward(&x, &xbf).is_err(), "mixed dtypes");
        assert!(
            gpu::silu_backward(&x.narrow(0, 0, 2)?, &x).is_err(),
            "shapes"
        );
        let w = Tensor::ones(6, DType::F32, device)?;
        assert!(gpu::layer_norm_forward(&x, &w.narrow(0, 0, 5)?, &w, 1e-5).is_err());
        let (_, mean, rstd) = gpu::layer_norm_forward(&x, &w, &w, 1e-5)?;
        let half_mean = mean.to_dtype(DType::BF16)?;
        assert!(gpu::layer_norm_backward(&x, &x, &half_mean, &rstd, &w, None).is_err());
        assert!(gpu::layer_norm_backward(&x, &x, &mean, &rstd, &w, Some(&xbf)).is_err());

        let x4 = Tensor::randn(0f32, 1.0, (2, 6, 3, 3), device)?;
        assert!(
            gpu::group_norm_forward(&x4, &w, &w, 4, 1e-5, false).is_err(),
            "6 channels in 4 groups"
        );
        assert!(gpu::group_norm_forward(&x4, &w.narrow(0, 0, 5)?, &w, 3, 1e-5, true).is_err());
        assert!(
            gpu::group_norm_forward(&w, &w, &w, 3, 1e-5, false).is_err(),
            "rank 1"
        );
        let (_, mean, rstd) = gpu::group_norm_forward(&x4, &w, &w, 3, 1e-5, false)?;
        assert_eq!(mean.dims(), [2, 3, 1]);
        let half_mean = mean.to_dtype(DType::BF16)?;
        assert!(gpu::group_norm_backward(&x4, &x4, &half_mean, &rstd, &w, &w, 3, false).is_err());
        assert!(
            gpu::group_norm_backward(&x4, &x4, &mean, &rstd, &w, &w, 2, false).is_err(),
            "statistics of another grouping"
        );
        let g = x4.narrow(3, 0, 2)?;
        assert!(gpu::group_norm_backward(&g, &x4, &mean, &rstd, &w, &w, 3, true).is_err());
        Ok(())
    }

    /// Norm-wise relative error computed on the device in f32 (for tensors too large to
    /// bring to the CPU in f64 cheaply).
    fn err_on_device(got: &Tensor, want: &Tensor) -> Result<f64> {
        let (a, b) = (got.to_dtype(DType::F32)?, want.to_dtype(DType::F32)?);
        let diff = (a - &b)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        let norm = b.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        Ok((diff / norm.max(1e-30)).sqrt())
    }

    /// The result of `f` and its mean time over 5 runs after a warm-up, in ms.
    fn timed(device: &Device, f: impl Fn() -> Result<Tensor>) -> Result<(Tensor, f64)> {
        let out = f()?;
        device.synchronize()?;
        let start = std::time::Instant::now();
        for _ in 0..5 {
            f()?;
        }
        device.synchronize()?;
        Ok((out, start.elapsed().as_secs_f64() * 1e3 / 5.0))
    }

    fn compare(
        device: &Device,
        what: &str,
        fused: impl Fn() -> Result<Tensor>,
        composed: impl Fn() -> Result<Tensor>,
    ) -> Result<()> {
        let (got, fused_ms) = timed(device, fused)?;
        let (want, composed_ms) = timed(device, composed)?;
        let e = err_on_device(&got, &want)?;
        println!("{what}: fused {fused_ms:.3} ms, composed {composed_ms:.3} ms, relative difference {e:.2e}");
        assert!(e <= 1e-2, "{what}: fused and composed differ by {e:.3e}");
        Ok(())
    }

    pub fn sd_shapes(device: &Device) -> Result<()> {
        let bf16 = |dims: &[usize]| Tensor::randn(0f32, 1.0, dims, device)?.to_dtype(DType::BF16);
        let (m, c) = (8 * 4096, 320);

        let h = bf16(&[m, 8 * c])?;
        let g = bf16(&[m, 4 * c])?;
        let n = 4 * c;
        compare(
            device,
            "geglu forward [32768, 2560] bf16",
            || gpu::geglu_forward(&h),
            || h.narrow(1, 0, n)? * h.narrow(1, n, n)?.gelu_erf()?,
        )?;
        compare(
            device,
            "geglu backward [32768, 2560] bf16",
            || gpu::geglu_backward(&g, &h),
            || {
                let (a, b) = (h.narrow(1, 0, n)?, h.narrow(1, n, n)?);
                let da = (&g * b.gelu_erf()?)?;
                let cdf = ((&b / std::f64::consts::SQRT_2)?.erf()? + 1.0)?.affine(0.5, 0.0)?;
                let pdf = (b.sqr()? * -0.5)?
                    .exp()?
                    .affine(1.0 / (2.0 * std::f64::consts::PI).sqrt(), 0.0)?;
                let db = ((&g * &a)? * (cdf + (&b * pdf)?)?)?;
                Tensor::cat(&[da, db], 1)
            },
        )?;

        let x = bf16(&[8, 320, 64, 64])?;
        let gx = bf16(&[8, 320, 64, 64])?;
        compare(
            device,
            "silu backward [8, 320, 64, 64] bf16",
            || gpu::silu_backward(&gx, &x),
            || {
                let s = candle_nn::ops::sigmoid(&x)?;
                &gx * (&s * ((&x * (1.0 - &s)?)? + 1.0)?)?
            },
        )?;

        let x = bf16(&[8, 4096, c])?;
        let g = bf16(&[8, 4096, c])?;
        let w = bf16(&[c])?;
        let b = bf16(&[c])?;
        let eps = 1e-5;
        compare(
            device,
            "layer norm forward [8, 4096, 320] bf16",
            || Ok(gpu::layer_norm_forward(&x, &w, &b, eps)?.0),
            || candle_nn::ops::layer_norm(&x, &w, &b, eps as f32),
        )?;
        let (_, mean, rstd) = gpu::layer_norm_forward(&x, &w, &b, eps)?;
        compare(
            device,
            "layer norm backward + residual [8, 4096, 320] bf16",
            || gpu::layer_norm_backward(&g, &x, &mean, &rstd, &w, Some(&g)),
            || {
                // The composed path: statistics recomputed in f32 (candle-nn's forward keeps
                // none), the gradient formula in f32, then the residual added.
                let x32 = x.to_dtype(DType::F32)?;
                let mean = x32.mean_keepdim(D::Minus1)?;
                let var = x32.broadcast_sub(&mean)?.sqr()?.mean_keepdim(D::Minus1)?;
                let rstd = (var + eps)?.sqrt()?.recip()?;
                let gs = g.broadcast_mul(&w)?.to_dtype(DType::F32)?;
                let xhat = x32.broadcast_sub(&mean)?.broadcast_mul(&rstd)?;
                let mean_g = gs.mean_keepdim(D::Minus1)?;
                let mean_gx = (&gs * &xhat)?.mean_keepdim(D::Minus1)?;
                let inner = gs
                    .broadcast_sub(&mean_g)?
                    .sub(&xhat.broadcast_mul(&mean_gx)?)?;
                &g + inner.broadcast_mul(&rstd)?.to_dtype(DType::BF16)?
            },
        )?;

        // Group norm -> SiLU at the resnet block's first level: [8, 320, 64, 64], 32 groups.
        let x = bf16(&[8, c, 64, 64])?;
        let g = bf16(&[8, c, 64, 64])?;
        let groups = 32;
        compare(
            device,
            "group norm + silu forward [8, 320, 64, 64] bf16",
            || Ok(gpu::group_norm_forward(&x, &w, &b, groups, eps, true)?.0),
            || group_norm_composed(&x, &w, &b, groups, eps, true),
        )?;
        let (_, mean, rstd) = gpu::group_norm_forward(&x, &w, &b, groups, eps, true)?;
        compare(
            device,
            "group norm + silu backward [8, 320, 64, 64] bf16",
            || gpu::group_norm_backward(&g, &x, &mean, &rstd, &w, &b, groups, true),
            || {
                // The composed path: the SiLU's input recomputed (the norm again), the SiLU's
                // gradient, then the normalisation's backward in f32 (statistics kept).
                let a = group_norm_composed(&x, &w, &b, groups, eps, false)?;
                let s = candle_nn::ops::sigmoid(&a)?;
                let dn = (&g * (&s * ((&a * (1.0 - &s)?)? + 1.0)?)?)?;
                let gs = dn
                    .broadcast_mul(&per_channel(&w, 4)?)?
                    .reshape((8, groups, ()))?
                    .to_dtype(DType::F32)?;
                let xg = x.reshape((8, groups, ()))?.to_dtype(DType::F32)?;
                let xhat = xg.broadcast_sub(&mean)?.broadcast_mul(&rstd)?;
                let mean_g = gs.mean_keepdim(D::Minus1)?;
                let mean_gx = (&gs * &xhat)?.mean_keepdim(D::Minus1)?;
                let inner = gs
                    .broadcast_sub(&mean_g)?
                    .sub(&xhat.broadcast_mul(&mean_gx)?)?;
                inner
                    .broadcast_mul(&rstd)?
                    .to_dtype(DType::BF16)?
                    .reshape(x.dims())
            },
        )?;
        Ok(())
    }
}
