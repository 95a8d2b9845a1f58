//! One textual-inversion training step (forward + backward + AdamW update) on the real
//! Stable Diffusion 1.5 (or SDXL base) architecture with random weights, on the CPU,
//! beside diffusers' own step measured in the same invocation.
//!
//! ```sh
//! SDTI_BENCH_PYTHON=$REFENV/bin/python \
//!     cargo bench --bench train_step -- [--config sd15|sdxl] [--resolution 256,512] [--steps N] [--order interleaved|sequential] [--no-reference] [--profile]
//! ```
//!
//! * `--config sdxl`: `ModelConfig::sdxl()`, checked against
//!   `tests/reference/sdxl_shapes.json` (`tests/reference/sdxl_architecture.py`), beside
//!   diffusers' `textual_inversion_sdxl.py` step (`bench_diffusers_step.py --config
//!   sdxl`); both learn a table for each SDXL encoder (the example has since diffusers PR
//!   #9010), so both backward passes run through bigG. Default resolution 512.
//!
//! * The model is `sdti::model::random` at `ModelConfig::sd1()`, f32 on the CPU, from a
//!   fixed seed: the same generator as `sdti bench` (weights N(0, 1/fan_in), norm weights
//!   1, biases 0). Until this benchmark used it, it drew N(0, 0.02) weights from a
//!   generator of its own, so its weights' values changed then; a step's time does not
//!   depend on them. Before timing, the generated tensors' names and shapes are checked
//!   against `tests/reference/sd15_shapes.json`, diffusers' own SD 1.5 (written by
//!   `tests/reference/sd15_architecture.py` from the runwayml/stable-diffusion-v1-5
//!   configs): the random model is the real architecture, and `ModelConfig::sd1()` (what
//!   single-file SD 1.x checkpoints load with) is SD 1.5's.
//! * Per resolution: `sdti::app::bench` (the timing core of `sdti bench`) at batch 1,
//!   1 vector: one synthetic image, one warm-up step, then N timed steps. Reports the
//!   mean and min ms/step, the peak RSS (VmHWM, reset per resolution where the kernel
//!   allows) and its growth over the weights.
//! * The reference: `tests/reference/bench_diffusers_step.py`, run through
//!   `$SDTI_BENCH_PYTHON` (or `python3`) when that interpreter imports torch and
//!   diffusers, unless `--no-reference`. It runs diffusers' textual_inversion example
//!   step, which VAE-encodes the image in every step; sdti encodes each image once when it
//!   is added, so the table also shows diffusers' step without the VAE encode (timed
//!   inside each of its steps).
//! * `--order interleaved` (the default for SD 1.5): diffusers' script runs beside this
//!   process (`--serve`), and the two engines take turns, one sdti step then one
//!   diffusers step per round, so a machine whose speed drifts within minutes (shared
//!   VMs) slows both alike; the table adds the median of the per-round ratios. Both
//!   models are then in memory at once (about 4 + 7.5 GiB for SD 1.5), so SDXL (about
//!   16 + 18 GiB) runs `sequential` by default: all sdti steps, then diffusers'.
//! * `--profile`: also times the UNet alone at each resolution: forward without a
//!   gradient path, forward with the context on a gradient path, and that backward pass.
//!
//! cargo bench passes `--bench` to this binary, and the benchmark runs only then (pass it
//! when running the binary by hand); `cargo test --benches` starts it without, and gets a
//! few quick self-checks instead.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use candle_core::{DType, Device, Tensor, Var};
use sdti::app::bench::{proc_status_mib, reset_peak_rss, BenchRun, BenchSetup};
use sdti::model::random::random_model_inspected;
use sdti::model::{ModelConfig, Recompute, SdModel};
use sdti::train::config::RecomputeMode;

type BenchResult<T> = std::result::Result<T, String>;

const USAGE: &str = "usage: cargo bench --bench train_step -- \
[--config sd15|sdxl] [--resolution 256,512] [--recompute off,on] [--steps N] [--no-reference] [--profile]

  --config NAME      the architecture: sd15 (default) or sdxl (SDXL base, beside
                     diffusers' textual_inversion_sdxl.py step)
  --resolution LIST  comma-separated training resolutions in pixels, multiples of 8
                     (default 256,512; 512 for sdxl)
  --recompute LIST   off, on, or both (off,on): each resolution's sdti step with each
                     (default off: every activation kept, the fastest step)
  --steps N          timed steps per resolution after one warm-up step (default 3)
  --order ORDER      interleaved (default for sd15): one sdti step then one diffusers
                     step per round, both models in memory; sequential (default for
                     sdxl, whose two models do not fit 24 GiB together): all sdti
                     steps, then all diffusers steps
  --no-reference     skip diffusers' step (tests/reference/bench_diffusers_step.py)
  --profile          also time the UNet forward / backward alone at each resolution

The reference runs through $SDTI_BENCH_PYTHON (default python3), which needs torch,
diffusers and transformers.";

const SEED: u64 = 0x5d71_be5c;

/// The architecture benchmarked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arch {
    Sd15,
    Sdxl,
}

impl Arch {
    fn name(self) -> &'static str {
        match self {
            Arch::Sd15 => "SD 1.5",
            Arch::Sdxl => "SDXL base",
        }
    }

    /// The `--config` value of `bench_diffusers_step.py` and of this bench.
    fn flag(self) -> &'static str {
        match self {
            Arch::Sd15 => "sd15",
            Arch::Sdxl => "sdxl",
        }
    }

    fn model_config(self) -> ModelConfig {
        match self {
            Arch::Sd15 => ModelConfig::sd1(),
            Arch::Sdxl => ModelConfig::sdxl(),
        }
    }

    /// diffusers' shapes, written by `tests/reference/<file>_architecture.py`.
    fn shapes_file(self) -> &'static str {
        match self {
            Arch::Sd15 => "sd15",
            Arch::Sdxl => "sdxl",
        }
    }
}

/// How the two engines' steps are ordered (`--order`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Order {
    /// One sdti step, then one diffusers step, per round.
    Interleaved,
    /// All sdti steps, then all diffusers steps.
    Sequential,
}

#[derive(Debug)]
struct Args {
    config: Arch,
    resolutions: Vec<usize>,
    recompute: Vec<Recompute>,
    steps: usize,
    order: Order,
    reference: bool,
    profile: bool,
}

enum Parsed {
    Run(Args),
    Help,
}

fn parse_args(raw: &[String]) -> BenchResult<Parsed> {
    let mut resolutions = None;
    let mut order = None;
    let mut args = Args {
        config: Arch::Sd15,
        resolutions: vec![256, 512],
        recompute: vec![Recompute::Off],
        steps: 3,
        order: Order::Interleaved,
        reference: true,
        profile: false,
    };
    let mut it = raw.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = |name: &str| -> BenchResult<String> {
            match inline.clone().or_else(|| it.next().cloned()) {
                Some(v) => Ok(v),
                None => Err(format!("{name} needs a value")),
            }
        };
        match flag {
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            "-h" | "--help" => return Ok(Parsed::Help),
            "--no-reference" => args.reference = false,
            "--profile" => args.profile = true,
            "--resolution" | "--resolutions" => {
                let v = value("--resolution")?;
                resolutions = Some(parse_resolutions(&v)?);
            }
            "--recompute" => {
                let v = value("--recompute")?;
                let mut list = Vec::new();
                for part in v.split(',').map(str::trim) {
                    let r = match part {
                        "off" => Recompute::Off,
                        "on" => Recompute::On,
                        _ => return Err(format!("--recompute '{part}' is not off or on")),
                    };
                    if !list.contains(&r) {
                        list.push(r);
                    }
                }
                args.recompute = list;
            }
            "--order" => {
                order = Some(match value("--order")?.as_str() {
                    "interleaved" => Order::Interleaved,
                    "sequential" => Order::Sequential,
                    other => {
                        return Err(format!(
                            "--order '{other}' is not interleaved or sequential"
                        ))
                    }
                });
            }
            "--config" => {
                args.config = match value("--config")?.as_str() {
                    "sd15" => Arch::Sd15,
                    "sdxl" => Arch::Sdxl,
                    other => return Err(format!("--config '{other}' is not sd15 or sdxl")),
                };
            }
            "--steps" => {
                let v = value("--steps")?;
                args.steps = match v.trim().parse::<usize>() {
                    Ok(n) if (1..=1000).contains(&n) => n,
                    _ => return Err(format!("--steps '{v}' must be a whole number in 1..=1000")),
                };
            }
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    args.resolutions = resolutions.unwrap_or_else(|| match args.config {
        Arch::Sd15 => vec![256, 512],
        Arch::Sdxl => vec![512],
    });
    args.order = order.unwrap_or(match args.config {
        Arch::Sd15 => Order::Interleaved,
        Arch::Sdxl => Order::Sequential,
    });
    if args.profile && args.config == Arch::Sdxl {
        return Err("--profile times the SD 1.5 UNet alone; not with --config sdxl".into());
    }
    Ok(Parsed::Run(args))
}

fn parse_resolutions(v: &str) -> BenchResult<Vec<usize>> {
    let mut out = Vec::new();
    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.parse::<usize>() {
            Ok(r) if (64..=2048).contains(&r) && r % 8 == 0 => out.push(r),
            _ => {
                return Err(format!(
                    "--resolution '{part}' must be a multiple of 8 between 64 and 2048"
                ))
            }
        }
    }
    if out.is_empty() {
        return Err(format!("--resolution '{v}' names no resolution"));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// The architecture check
// ---------------------------------------------------------------------------------------

fn shapes_path(arch: Arch) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
        "tests/reference/{}_shapes.json",
        arch.shapes_file()
    ))
}

fn load_shapes(arch: Arch) -> BenchResult<BTreeMap<String, Vec<usize>>> {
    let path = shapes_path(arch);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "cannot read {}: {e} (write it with tests/reference/{}_architecture.py)",
            path.display(),
            arch.shapes_file()
        )
    })?;
    let shapes: BTreeMap<String, Vec<usize>> = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not a {{name: shape}} map: {e}", path.display()))?;
    if shapes.is_empty() {
        return Err(format!("{} lists no tensors", path.display()));
    }
    Ok(shapes)
}

/// Where the generated architecture (`got`) differs from diffusers' (`want`), by name;
/// an error listing the first few differences.
fn check_architecture(
    arch: Arch,
    want: &BTreeMap<String, Vec<usize>>,
    got: &BTreeMap<String, Vec<usize>>,
) -> BenchResult<()> {
    let mut problems = Vec::new();
    for (name, shape) in want {
        match got.get(name) {
            None => problems.push(format!("{name} is missing")),
            Some(g) if g != shape => problems.push(format!("{name} is {g:?}, not {shape:?}")),
            Some(_) => {}
        }
    }
    problems.extend(
        got.keys()
            .filter(|n| !want.contains_key(*n))
            .map(|n| format!("{n} is not in {}", arch.name())),
    );
    if problems.is_empty() {
        return Ok(());
    }
    Err(format!(
        "model::random's {} differs from {} in {} tensors: {}",
        arch.name(),
        shapes_path(arch).display(),
        problems.len(),
        problems[..problems.len().min(5)].join("; ")
    ))
}

// ---------------------------------------------------------------------------------------
// Machine and memory
// ---------------------------------------------------------------------------------------

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// The 1-minute load average (other work on the machine skews the timings).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// `YYYY-MM-DD HH:MM UTC` without a date crate (days-from-civil, inverted).
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// The version of `package` in this crate's Cargo.lock.
fn locked_version(package: &str) -> String {
    let lock = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.lock");
    let text = std::fs::read_to_string(lock).unwrap_or_default();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.trim() == format!("name = \"{package}\"") {
            if let Some(v) = lines
                .next()
                .and_then(|l| l.trim().strip_prefix("version = "))
            {
                return v.trim_matches('"').to_string();
            }
        }
    }
    "?".into()
}

fn rustc_version() -> String {
    Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "rustc ?".into())
}

// ---------------------------------------------------------------------------------------
// The sdti step
// ---------------------------------------------------------------------------------------

struct SdtiResult {
    resolution: usize,
    recompute: Recompute,
    times_ms: Vec<f64>,
    add_image_ms: f64,
    peak_mib: Option<f64>,
    peak_is_per_resolution: bool,
    profile: Option<UnetProfile>,
    /// diffusers' steps beside these: interleaved with them, or (sequential) its run at
    /// this resolution.
    reference_steps: Vec<RefStep>,
}

fn err<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> String {
    move |e| format!("{what}: {e}")
}

/// sdti's steps at `res`; with a `partner`, one diffusers step after each timed sdti step.
fn run_sdti(
    model: &Arc<SdModel>,
    res: usize,
    recompute: Recompute,
    args: &Args,
    mut partner: Option<&mut RefSession>,
) -> BenchResult<SdtiResult> {
    let peak_is_per_resolution = reset_peak_rss();
    let setup = BenchSetup {
        resolution: res,
        batch_size: 1,
        vectors: 1,
        steps: args.steps,
    };
    let mut run = BenchRun::new(model.clone(), setup).map_err(err("setting up the trainer"))?;
    let mode = match recompute {
        Recompute::Off => RecomputeMode::Off,
        // (--recompute takes off and on only.)
        Recompute::On | Recompute::Transformers(_) => RecomputeMode::On,
    };
    let choice = run.trainer_mut().choose_recompute(mode, None);
    eprintln!("sdti {res}px: {choice}");
    let add_image_ms = run.cache_seconds * 1e3;
    eprintln!("sdti {res}px: add_image (VAE encode of 2 views, once) {add_image_ms:.0} ms");
    let mut reference_steps = Vec::new();
    let mut partner_error = None;
    let times = run
        .time_steps(|s| {
            let kind = if s.index == 0 { "warm-up" } else { "timed" };
            eprintln!(
                "sdti {res}px step {} ({kind}): {:.0} ms, loss {:.4}",
                s.index, s.ms, s.loss
            );
            // diffusers ran its warm-up step before sdti's; after that, one of its steps
            // after each of sdti's. Only sdti's own step is inside sdti's timing.
            if let (true, None, Some(p)) = (s.index > 0, &partner_error, partner.as_deref_mut()) {
                match p.step() {
                    Ok(step) => reference_steps.push(step),
                    Err(e) => partner_error = Some(e),
                }
            }
        })
        .map_err(err("Trainer::step"))?;
    drop(run);
    if let Some(e) = partner_error {
        return Err(format!("diffusers {res}px (interleaved): {e}"));
    }
    let profile = if args.profile {
        Some(profile_unet(model, res)?)
    } else {
        None
    };
    Ok(SdtiResult {
        resolution: res,
        recompute,
        times_ms: times.step_ms,
        add_image_ms,
        peak_mib: times.peak_rss_mib,
        peak_is_per_resolution,
        profile,
        reference_steps,
    })
}

struct UnetProfile {
    text_encoder_ms: f64,
    forward_plain_ms: f64,
    forward_tracked_ms: f64,
    backward_ms: f64,
}

/// The UNet alone at `res`: forward with a plain context, forward with the context on a
/// gradient path (a `Var`), and the backward pass of `mean(out^2)` to that context.
fn profile_unet(model: &SdModel, res: usize) -> BenchResult<UnetProfile> {
    let dev = Device::Cpu;
    let lat = res / 8;
    let normal = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev).map_err(err("tensor"));
    let sample = normal(&[1, 4, lat, lat])?;
    let context = normal(&[1, 77, 768])?;
    let mut ids = vec![49407u32; 77];
    ids[..6].copy_from_slice(&[49406, 320, 1125, 539, 320, 5988]);
    let ids = Tensor::from_vec(ids, (1, 77), &dev).map_err(err("ids"))?;
    let time = |f: &mut dyn FnMut() -> BenchResult<()>| -> BenchResult<f64> {
        let start = Instant::now();
        f()?;
        Ok(start.elapsed().as_secs_f64() * 1e3)
    };
    let text_encoder_ms = time(&mut || {
        model
            .text_encoder
            .forward(&ids, None, 1)
            .map(drop)
            .map_err(err("text encoder"))
    })?;
    let forward_plain_ms = time(&mut || {
        model
            .unet
            .forward(&sample, &[500.0], &context)
            .map(drop)
            .map_err(err("unet forward"))
    })?;
    let var = Var::from_tensor(&context).map_err(err("var"))?;
    let mut out = None;
    let forward_tracked_ms = time(&mut || {
        out = Some(
            model
                .unet
                .forward(&sample, &[500.0], var.as_tensor())
                .map_err(err("unet forward"))?,
        );
        Ok(())
    })?;
    let out = out.ok_or("no unet output")?;
    let backward_ms = time(&mut || {
        let loss = out.sqr().and_then(|s| s.mean_all()).map_err(err("loss"))?;
        let grads = loss.backward().map_err(err("backward"))?;
        match grads.get(var.as_tensor()) {
            Some(_) => Ok(()),
            None => Err("the context got no gradient".into()),
        }
    })?;
    eprintln!(
        "sdti {res}px profile: text encoder {text_encoder_ms:.0} ms, unet forward {forward_plain_ms:.0} ms \
         (no grad path) / {forward_tracked_ms:.0} ms (context tracked), backward {backward_ms:.0} ms"
    );
    Ok(UnetProfile {
        text_encoder_ms,
        forward_plain_ms,
        forward_tracked_ms,
        backward_ms,
    })
}

// ---------------------------------------------------------------------------------------
// The diffusers reference
// ---------------------------------------------------------------------------------------

struct Reference {
    python: String,
    script: PathBuf,
}

fn find_reference() -> BenchResult<Reference> {
    let python = std::env::var("SDTI_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/bench_diffusers_step.py");
    if !script.exists() {
        return Err(format!("{} is missing", script.display()));
    }
    let probe = Command::new(&python)
        .args(["-c", "import torch, diffusers, transformers"])
        .output()
        .map_err(|e| format!("cannot run '{python}': {e}"))?;
    if !probe.status.success() {
        return Err(format!(
            "'{python}' cannot import torch, diffusers and transformers \
             (set SDTI_BENCH_PYTHON to an interpreter that can)"
        ));
    }
    Ok(Reference { python, script })
}

/// `bench_diffusers_step.py` at `res`, with the bench's settings.
fn reference_command(r: &Reference, res: usize, args: &Args, threads: usize) -> Command {
    let mut cmd = Command::new(&r.python);
    cmd.arg(&r.script)
        .args(["--config", args.config.flag()])
        .args(["--resolution", &res.to_string()])
        .args(["--steps", &args.steps.to_string()])
        .args(["--threads", &threads.to_string()])
        .stderr(Stdio::inherit());
    if args.profile {
        cmd.arg("--profile");
    }
    cmd
}

/// One diffusers step, as the script reports it.
#[derive(Clone, Copy, Debug)]
struct RefStep {
    ms: f64,
    /// The part of `ms` that was the VAE encode.
    vae_encode_ms: f64,
}

impl RefStep {
    fn from_json(v: &serde_json::Value) -> BenchResult<Self> {
        match (v["ms"].as_f64(), v["vae_encode_ms"].as_f64()) {
            (Some(ms), Some(vae_encode_ms)) => Ok(Self { ms, vae_encode_ms }),
            _ => Err(format!("a step line without ms / vae_encode_ms: {v}")),
        }
    }

    /// The step as sdti's cached latents make it: without the VAE encode.
    fn cached_ms(self) -> f64 {
        self.ms - self.vae_encode_ms
    }
}

/// The last JSON line of the script's stdout.
fn last_json_line(stdout: &str) -> BenchResult<serde_json::Value> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .ok_or("the reference printed no JSON line")?;
    serde_json::from_str(line).map_err(|e| format!("unreadable reference output: {e}"))
}

/// The summary's per-step times as `RefStep`s.
fn summary_steps(v: &serde_json::Value) -> BenchResult<Vec<RefStep>> {
    let list = |k: &str| -> BenchResult<Vec<f64>> {
        v[k].as_array()
            .and_then(|a| a.iter().map(|x| x.as_f64()).collect::<Option<Vec<_>>>())
            .ok_or_else(|| format!("the reference summary has no {k} list"))
    };
    let (ms, vae) = (list("step_ms")?, list("step_vae_encode_ms")?);
    if ms.len() != vae.len() {
        return Err("the reference summary's step lists differ in length".into());
    }
    Ok(ms
        .into_iter()
        .zip(vae)
        .map(|(ms, vae_encode_ms)| RefStep { ms, vae_encode_ms })
        .collect())
}

/// Sequential order: the script runs its warm-up and timed steps on its own.
fn run_reference(
    r: &Reference,
    res: usize,
    args: &Args,
    threads: usize,
) -> BenchResult<serde_json::Value> {
    let steps = args.steps;
    eprintln!("diffusers {res}px: building the model and running {steps}+1 steps ...");
    let out = reference_command(r, res, args, threads)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", r.script.display()))?;
    if !out.status.success() {
        return Err(format!("{} exited with {}", r.script.display(), out.status));
    }
    last_json_line(&String::from_utf8_lossy(&out.stdout))
}

/// Interleaved order: the script (`--serve`) beside this process, running one step when
/// asked. Dropping it closes the script's stdin, which ends it.
struct RefSession {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl RefSession {
    /// Starts the script and waits until it has built its model and run its warm-up step.
    fn start(r: &Reference, res: usize, args: &Args, threads: usize) -> BenchResult<Self> {
        eprintln!("diffusers {res}px: building the model and running its warm-up step ...");
        let mut child = reference_command(r, res, args, threads)
            .arg("--serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", r.script.display()))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("the reference's stdin / stdout were not piped".into());
        };
        let mut session = Self {
            child,
            stdin,
            stdout: BufReader::new(stdout),
        };
        let ready = session.read_json()?;
        if ready["ready"].as_bool() != Some(true) {
            return Err(format!("the reference did not say it was ready: {ready}"));
        }
        Ok(session)
    }

    fn read_json(&mut self) -> BenchResult<serde_json::Value> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self
                .stdout
                .read_line(&mut line)
                .map_err(|e| format!("reading the reference's output: {e}"))?;
            if n == 0 {
                return Err("the reference exited before answering".into());
            }
            if line.trim_start().starts_with('{') {
                return serde_json::from_str(line.trim())
                    .map_err(|e| format!("unreadable reference output: {e}"));
            }
        }
    }

    fn send(&mut self, command: &str) -> BenchResult<()> {
        writeln!(self.stdin, "{command}")
            .and_then(|()| self.stdin.flush())
            .map_err(|e| format!("writing to the reference: {e}"))
    }

    fn step(&mut self) -> BenchResult<RefStep> {
        self.send("step")?;
        RefStep::from_json(&self.read_json()?)
    }

    /// Ends the script and returns its summary line (peaks, versions, profile).
    fn finish(mut self) -> BenchResult<serde_json::Value> {
        self.send("end")?;
        let summary = self.read_json()?;
        let status = self
            .child
            .wait()
            .map_err(|e| format!("waiting for the reference: {e}"))?;
        if !status.success() {
            return Err(format!("the reference exited with {status}"));
        }
        Ok(summary)
    }
}

// ---------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// The middle value (mean of the two middle ones for an even count); None when empty.
fn median(v: &[f64]) -> Option<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(s[n / 2]),
        _ => Some((s[n / 2 - 1] + s[n / 2]) / 2.0),
    }
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.digits$}"))
}

fn run(args: &Args) -> BenchResult<()> {
    let threads = candle_core::utils::get_num_threads();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("# sdti train_step benchmark");
    println!(
        "machine: {} | {cores} cores available | candle threads {threads} | {} | load average {}",
        cpu_model(),
        utc_now(),
        load_average()
    );
    println!(
        "sdti {} | candle-core {} | {} | release profile",
        env!("CARGO_PKG_VERSION"),
        locked_version("candle-core"),
        rustc_version()
    );
    println!(
        "{}, resolutions {:?}, batch 1, 1 vector, f32, 1 warm-up + {} timed steps each",
        args.config.name(),
        args.resolutions,
        args.steps
    );

    let rss_start = proc_status_mib("VmRSS");
    let shapes = load_shapes(args.config)?;
    let start = Instant::now();
    let config = args.config.model_config();
    // model::random's model, its generated tensors seen on the way (names and shapes,
    // checked against diffusers' once it is built).
    let mut weights_s = 0.0;
    let mut generated: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let model = random_model_inspected(&config, SEED, DType::F32, &Device::Cpu, |tensors| {
        weights_s = start.elapsed().as_secs_f64();
        generated = tensors
            .iter()
            .map(|(name, t)| (name.clone(), t.dims().to_vec()))
            .collect();
    })
    .map_err(err("model::random"))?;
    let built_s = start.elapsed().as_secs_f64() - weights_s;
    check_architecture(args.config, &shapes, &generated)?;
    let params: usize = generated
        .values()
        .map(|s| s.iter().product::<usize>())
        .sum();
    let model = Arc::new(model);
    let rss_model = proc_status_mib("VmRSS");
    println!(
        "model: {} tensors (names and shapes as diffusers' {}), {:.1} M parameters \
         ({:.0} MiB f32), generated in {weights_s:.1} s, built in {:.1} s; RSS {} MiB at \
         start, {} MiB with the model",
        generated.len(),
        args.config.name(),
        params as f64 / 1e6,
        params as f64 * 4.0 / 1048576.0,
        built_s,
        fmt_opt(rss_start, 0),
        fmt_opt(rss_model, 0),
    );

    let reference = if args.reference {
        match find_reference() {
            Ok(r) => Some(r),
            Err(e) => {
                println!("diffusers reference skipped: {e}");
                None
            }
        }
    } else {
        println!("diffusers reference skipped (--no-reference)");
        None
    };
    if reference.is_some() {
        println!(
            "order: {}",
            match args.order {
                Order::Interleaved =>
                    "interleaved (one sdti step, then one diffusers step, per round; both models in memory)",
                Order::Sequential => "sequential (all sdti steps, then all diffusers steps)",
            }
        );
    }

    // Recompute on first: memory a step frees stays with the allocator (and in the RSS),
    // so a run after one without recompute would report that run's peak.
    let mut order = args.recompute.clone();
    order.sort_by_key(|r| *r != Recompute::On);
    let mut results = Vec::new();
    // diffusers' summary line per resolution (peaks, versions, profile).
    let mut summaries: BTreeMap<usize, serde_json::Value> = BTreeMap::new();
    match (&reference, args.order) {
        (Some(py), Order::Interleaved) => {
            for &res in &args.resolutions {
                let mut session = RefSession::start(py, res, args, threads)?;
                for &recompute in &order {
                    results.push(run_sdti(&model, res, recompute, args, Some(&mut session))?);
                }
                summaries.insert(res, session.finish()?);
            }
        }
        _ => {
            for &res in &args.resolutions {
                for &recompute in &order {
                    results.push(run_sdti(&model, res, recompute, args, None)?);
                }
            }
            // Free the model's memory before torch builds its own copy.
            drop(model);
            if let Some(py) = &reference {
                for &res in &args.resolutions {
                    match run_reference(py, res, args, threads) {
                        Ok(v) => {
                            let steps = summary_steps(&v)?;
                            for r in results.iter_mut().filter(|r| r.resolution == res) {
                                r.reference_steps = steps.clone();
                            }
                            summaries.insert(res, v);
                        }
                        Err(e) => println!("diffusers {res}px failed: {e}"),
                    }
                }
            }
        }
    }
    let refs: Vec<Option<&serde_json::Value>> = results
        .iter()
        .map(|r| summaries.get(&r.resolution))
        .collect();

    println!();
    if let Some(v) = refs.iter().flatten().next() {
        let s = |k: &str| {
            v[k].as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v[k].to_string())
        };
        println!(
            "reference: torch {} | diffusers {} | transformers {} | python {} | torch threads {} \
             (interop {}) | unet attention {} | CLIP attention {}",
            s("torch"),
            s("diffusers"),
            s("transformers"),
            s("python"),
            s("threads"),
            s("interop_threads"),
            s("unet_attn_processor"),
            s("text_encoder_attn_implementation"),
        );
    }
    println!(
        "| resolution | recompute | sdti ms/step mean (min) | diffusers ms/step mean (min) | ratio | \
         diffusers w/o VAE encode | ratio w/o encode | median of round ratios w/o encode | \
         sdti peak MiB (over weights) | diffusers peak MiB (over weights) | peak ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (r, d) in results.iter().zip(&refs) {
        let sdti_mean = mean(&r.times_ms);
        let f = |k: &str| d.and_then(|v| v[k].as_f64());
        let steps = &r.reference_steps;
        let d_ms: Vec<f64> = steps.iter().map(|s| s.ms).collect();
        let d_cached: Vec<f64> = steps.iter().map(|s| s.cached_ms()).collect();
        let some = |x: f64| Some(x).filter(|_| !steps.is_empty());
        let (d_mean, d_min, d_no_vae) =
            (some(mean(&d_ms)), some(min(&d_ms)), some(mean(&d_cached)));
        // Round i: sdti's timed step i and the diffusers step after it.
        let round_ratios: Vec<f64> = r
            .times_ms
            .iter()
            .zip(&d_cached)
            .map(|(s, d)| s / d)
            .collect();
        let d_over = f("peak_rss_mib")
            .zip(f("rss_after_load_mib"))
            .map(|(p, l)| p - l);
        let sdti_over = r.peak_mib.zip(rss_model).map(|(p, m)| p - m);
        println!(
            "| {}px | {} | {:.0} ({:.0}) | {} ({}) | {} | {} | {} | {} | {}{} ({}) | {} ({}) | {} |",
            r.resolution,
            match r.recompute {
                Recompute::Off => "off",
                Recompute::On => "on",
                Recompute::Transformers(_) => "some",
            },
            sdti_mean,
            min(&r.times_ms),
            fmt_opt(d_mean, 0),
            fmt_opt(d_min, 0),
            fmt_opt(d_mean.map(|d| sdti_mean / d), 2),
            fmt_opt(d_no_vae, 0),
            fmt_opt(d_no_vae.map(|d| sdti_mean / d), 2),
            fmt_opt(median(&round_ratios), 2),
            fmt_opt(r.peak_mib, 0),
            if r.peak_is_per_resolution { "" } else { "*" },
            fmt_opt(sdti_over, 0),
            fmt_opt(f("peak_rss_mib"), 0),
            fmt_opt(d_over, 0),
            fmt_opt(r.peak_mib.zip(f("peak_rss_mib")).map(|(s, d)| s / d), 2),
        );
    }
    println!(
        "ratio = sdti / diffusers mean step time; round ratios = sdti's step i / the diffusers \
         step {} it. sdti encodes each image once when it is added ({}); diffusers' example \
         encodes it in every step (timed inside each step, for the columns without it).",
        match args.order {
            Order::Interleaved => "right after",
            Order::Sequential => "numbered i in its own run after all of sdti's, not beside",
        },
        results
            .iter()
            .map(|r| format!("{}px {:.0} ms for 2 views", r.resolution, r.add_image_ms))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "peak = VmHWM of each process (diffusers: one process per resolution; its ru_maxrss would include this process's peak, inherited across exec); \
         over weights = peak - RSS once the model is built. Load average at the end: {}",
        load_average()
    );
    if results.iter().any(|r| !r.peak_is_per_resolution) {
        println!("* VmHWM could not be reset: the peak covers all earlier resolutions too");
    }
    if args.profile {
        println!();
        println!(
            "| resolution | engine | text encoder fwd ms | unet fwd ms (no grad path) | \
             unet fwd ms (context tracked) | unet bwd ms |"
        );
        println!("|---|---|---|---|---|---|");
        for (r, d) in results.iter().zip(&refs) {
            if let Some(p) = &r.profile {
                println!(
                    "| {}px | sdti | {:.0} | {:.0} | {:.0} | {:.0} |",
                    r.resolution,
                    p.text_encoder_ms,
                    p.forward_plain_ms,
                    p.forward_tracked_ms,
                    p.backward_ms
                );
            }
            if let Some(p) = d.map(|v| &v["profile"]).filter(|p| p.is_object()) {
                let f = |k: &str| fmt_opt(p[k].as_f64(), 0);
                println!(
                    "| {}px | diffusers | {} | {} | {} | {} |",
                    r.resolution,
                    f("text_encoder_ms"),
                    f("unet_forward_no_grad_ms"),
                    f("unet_forward_tracked_ms"),
                    f("unet_backward_ms")
                );
            }
        }
    }
    Ok(())
}

fn main() {
    // As `sdti bench`: the step runs on this thread (`awake::init_main_thread`).
    sdti::model::awake::init_main_thread();
    let raw: Vec<String> = std::env::args().skip(1).collect();
    // cargo bench passes --bench; cargo test runs bench targets without it.
    if !raw.iter().any(|a| a == "--bench") {
        if let Err(e) = self_check() {
            eprintln!("train_step self-check: {e}");
            std::process::exit(1);
        }
        return;
    }
    let args = match parse_args(&raw) {
        Ok(Parsed::Run(a)) => a,
        Ok(Parsed::Help) => {
            println!("{USAGE}");
            return;
        }
        Err(e) => {
            eprintln!("train_step: {e}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&args) {
        eprintln!("train_step: {e}");
        std::process::exit(1);
    }
}

/// What `cargo test --benches` / `--all-targets` runs (it starts this binary without
/// `--bench`): quick checks of the argument parser, the architecture comparison and the shapes file,
/// instead of minutes of benchmark.
fn self_check() -> BenchResult<()> {
    let parse = |a: &[&str]| parse_args(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    match parse(&["--resolution", "256,512", "--steps=2", "--bench"])? {
        Parsed::Run(a) if a.resolutions == [256, 512] && a.steps == 2 && a.reference => {}
        _ => return Err("valid arguments parsed wrongly".into()),
    }
    for bad in [
        &["--steps"][..],
        &["--steps", "0"],
        &["--steps", "x"],
        &["--resolution", "100"],
        &["--resolution", ","],
        &["--frobnicate"],
    ] {
        if parse(bad).is_ok() {
            return Err(format!("{bad:?} was accepted"));
        }
    }
    let shapes_of = |entries: &[(&str, &[usize])]| -> BTreeMap<String, Vec<usize>> {
        entries
            .iter()
            .map(|(n, s)| (n.to_string(), s.to_vec()))
            .collect()
    };
    let want = shapes_of(&[("a.weight", &[2, 3]), ("a.bias", &[2])]);
    check_architecture(Arch::Sd15, &want, &want)?;
    for got in [
        shapes_of(&[("a.weight", &[2, 3])]),
        shapes_of(&[("a.weight", &[3, 2]), ("a.bias", &[2])]),
        shapes_of(&[("a.weight", &[2, 3]), ("a.bias", &[2]), ("b", &[1])]),
    ] {
        if check_architecture(Arch::Sd15, &want, &got).is_ok() {
            return Err(format!("{got:?} passed the architecture check"));
        }
    }
    if median(&[3.0, 1.0, 2.0]) != Some(2.0)
        || median(&[4.0, 1.0]) != Some(2.5)
        || median(&[]).is_some()
    {
        return Err("median is wrong".into());
    }
    match parse(&["--bench"])? {
        Parsed::Run(a) if a.order == Order::Interleaved => {}
        _ => return Err("SD 1.5 should interleave by default".into()),
    }
    match parse(&["--config", "sdxl", "--order", "interleaved", "--bench"])? {
        Parsed::Run(a) if a.order == Order::Interleaved => {}
        _ => return Err("--order interleaved parsed wrongly".into()),
    }
    match parse(&["--config", "sdxl", "--bench"])? {
        Parsed::Run(a)
            if a.config == Arch::Sdxl && a.resolutions == [512] && a.order == Order::Sequential => {
        }
        _ => return Err("--config sdxl parsed wrongly".into()),
    }
    match parse(&["--recompute", "on,off,on", "--bench"])? {
        Parsed::Run(a) if a.recompute == [Recompute::On, Recompute::Off] => {}
        _ => return Err("--recompute parsed wrongly".into()),
    }
    for bad in [
        &["--config", "sd3"][..],
        &["--config", "sdxl", "--profile"],
        &["--recompute", "auto"],
        &["--order", "random"],
    ] {
        if parse(bad).is_ok() {
            return Err(format!("{bad:?} was accepted"));
        }
    }
    for arch in [Arch::Sd15, Arch::Sdxl] {
        let shapes = load_shapes(arch)?;
        let params: usize = shapes.values().map(|s| s.iter().product::<usize>()).sum();
        println!(
            "train_step self-check OK: {} has {} tensors, {params} parameters",
            arch.name(),
            shapes.len()
        );
    }
    println!("run the benchmark with `cargo bench --bench train_step`");
    Ok(())
}
