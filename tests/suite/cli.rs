//! The `sdti` command, run as a user runs it: the built binary on the tiny test model
//! (64 px, about 0.1 s per step) and on demo-style random models.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use sdti::embedding::{
    read_embedding, write_embedding, EmbeddingFile, EmbeddingPart, Encoder, Format, Precision,
};

use crate::common::fixture;

fn sdti(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdti"))
        .args(args)
        .output()
        .expect("the sdti binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs and asserts success; returns stdout.
pub(crate) fn ok(args: &[&str]) -> String {
    let out = sdti(args);
    assert!(
        out.status.success(),
        "sdti {args:?} failed ({:?}):\n{}\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Runs and asserts a non-zero exit with exactly one line on stderr, `error: ...`
/// containing `want`, besides the `note:` lines a loaded model prints (what loading
/// decided); returns the error line.
pub(crate) fn fails(args: &[&str], want: &str) -> String {
    let out = sdti(args);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "sdti {args:?} succeeded:\n{err}");
    assert_eq!(out.status.code(), Some(1), "sdti {args:?}: {err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("note: "))
        .collect();
    assert_eq!(lines.len(), 1, "sdti {args:?}: not one line:\n{err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(
        lines[0].contains(want),
        "sdti {args:?}: '{want}' not in: {err}"
    );
    lines[0].to_string()
}

fn tiny() -> String {
    fixture("tiny-sd").display().to_string()
}

pub(crate) fn s(p: &Path) -> String {
    p.display().to_string()
}

/// `sdti train` on the tiny model at 64 px from `images` into `dir`, then `extra`.
pub(crate) fn tiny_train_args(images: &Path, dir: &Path, extra: &[&str]) -> Vec<String> {
    let head = ["train", "--model", &tiny(), &s(images), "-o", &s(dir)];
    head.iter()
        .map(|a| a.to_string())
        .chain(
            ["--resolution", "64"]
                .iter()
                .chain(extra)
                .map(|a| a.to_string()),
        )
        .collect()
}

/// A picture of a red disc on a green ground, shifted by `k`.
fn write_picture(path: &Path, k: u32) {
    let img = image::RgbImage::from_fn(80, 72, |x, y| {
        let (dx, dy) = (x as f32 - 30.0 - 4.0 * k as f32, y as f32 - 36.0);
        if dx * dx + dy * dy < 300.0 {
            image::Rgb([210, 50, 40])
        } else {
            image::Rgb([30, 130, 70])
        }
    });
    img.save(path).expect("test picture saves");
}

pub(crate) fn pictures(dir: &Path, n: u32) -> PathBuf {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    for k in 0..n {
        write_picture(&images.join(format!("disc-{k}.png")), k);
    }
    images
}

/// An SD 1.x-width word for the tiny model (32 wide), `vectors` vectors.
fn write_word(path: &Path, name: &str, vectors: usize, format: Format) {
    let dim = 32;
    let data: Vec<f32> = (0..vectors * dim)
        .map(|i| ((i as f32) * 0.37).sin() * 0.02)
        .collect();
    let emb = EmbeddingFile {
        name: Some(name.into()),
        step: Some(10),
        sd_checkpoint: None,
        sd_checkpoint_name: None,
        parts: vec![EmbeddingPart {
            encoder: Encoder::Single,
            vectors,
            dim,
            data,
        }],
        source_format: format,
    };
    write_embedding(path, &emb, format, Precision::F32).unwrap();
}

#[test]
fn help_names_every_command_with_examples() {
    let top = ok(&["--help"]);
    for cmd in [
        "train", "sample", "convert", "inspect", "encode", "bench", "demo",
    ] {
        assert!(top.contains(cmd), "{cmd} missing from --help:\n{top}");
        let help = ok(&[cmd, "--help"]);
        assert!(
            help.contains("Examples:"),
            "sdti {cmd} --help has no examples"
        );
    }
    let train = ok(&["train", "--help"]);
    // Every engine option has a flag.
    for flag in [
        "--token",
        "--init",
        "--init-zeros",
        "--init-random",
        "--vectors",
        "--resolution",
        "--random-crop",
        "--flip-probability",
        "--learning-rate",
        "--lr-scheduler",
        "--lr-warmup-steps",
        "--steps",
        "--batch-size",
        "--gradient-accumulation",
        "--adam-beta1",
        "--adam-beta2",
        "--adam-epsilon",
        "--weight-decay",
        "--max-grad-norm",
        "--seed",
        "--templates",
        "--template",
        "--clip-skip",
        "--prediction-type",
        "--save-every",
        "--formats",
        "--preview-every",
        "--resume",
        "--overwrite",
    ] {
        assert!(train.contains(flag), "{flag} missing from train --help");
    }
    assert!(ok(&["--version"]).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn a_token_is_a_name_and_never_a_path() {
    let tmp = tempfile::tempdir().unwrap();
    let images = pictures(tmp.path(), 1);
    let run = tmp.path().join("runs").join("run");
    for (token, why) in [
        ("../victim", "'/'"),
        ("/tmp/abs", "'/'"),
        ("..", "starts with '.'"),
        ("CON", "device name"),
    ] {
        fails(
            &[
                "train",
                "--model",
                &tiny(),
                &s(&images),
                "-o",
                &s(&run),
                "--token",
                token,
                "--resolution",
                "64",
                "--steps",
                "1",
            ],
            why,
        );
    }
    assert!(!run.exists() && !tmp.path().join("runs/victim.pt").exists());
}

#[test]
fn train_writes_the_run_folder_as_it_goes() {
    let tmp = tempfile::tempdir().unwrap();
    let images = pictures(tmp.path(), 2);
    let run = tmp.path().join("run");
    let out = ok(&[
        "train",
        "--model",
        &tiny(),
        &s(&images),
        "-o",
        &s(&run),
        "--token",
        "sks",
        "--init",
        "cat",
        "--vectors",
        "2",
        "--resolution",
        "64",
        "--steps",
        "6",
        "--save-every",
        "3",
        "--preview-every",
        "3",
        "--preview-steps",
        "2",
        "--seed",
        "3",
        "--formats",
        "a1111-pt,safetensors,diffusers",
    ]);
    assert!(out.contains("sks.pt"), "{out}");

    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["kind"], "sdti-run/1");
    assert_eq!(config["train"]["max_steps"], 6);
    assert_eq!(config["train"]["token"], "sks");
    assert_eq!(config["run"]["save_every"], 3);
    assert_eq!(config["images"].as_array().map(Vec::len), Some(2));

    let csv = std::fs::read_to_string(run.join("loss.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "step,loss,lr,seconds");
    assert_eq!(lines.len(), 7, "{csv}");
    for (i, line) in lines[1..].iter().enumerate() {
        let cols: Vec<&str> = line.split(',').collect();
        assert_eq!(cols.len(), 4, "{line}");
        assert_eq!(cols[0], (i + 1).to_string());
        assert!(cols[1].parse::<f32>().unwrap().is_finite());
        assert_eq!(cols[2].parse::<f64>().unwrap(), 0.005);
    }

    // The first format at the top and in embeddings/, each further one in formats/FORMAT;
    // every file's stem is the name stored in it, once per format.
    for step in [3, 6] {
        assert!(run
            .join(format!("checkpoints/step-{step:06}.safetensors"))
            .is_file());
        for path in [
            format!("embeddings/sks-{step}.pt"),
            format!("formats/safetensors/sks-{step}.safetensors"),
            format!("formats/diffusers/sks-{step}.safetensors"),
        ] {
            let emb = read_embedding(&run.join(&path)).unwrap();
            assert_eq!(
                emb.name.as_deref(),
                Some(format!("sks-{step}").as_str()),
                "{path}"
            );
            if path.ends_with(".pt") {
                assert_eq!(emb.step, Some(step), "{path}");
            }
        }
    }
    let mut stems = std::collections::HashMap::<String, Vec<String>>::new();
    for dir in ["", "embeddings"] {
        for e in std::fs::read_dir(run.join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.is_file()
                && !p
                    .extension()
                    .is_some_and(|x| x == "json" || x == "csv" || x == "png")
            {
                let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
                stems.entry(stem).or_default().push(p.display().to_string());
            }
        }
    }
    assert!(stems.values().all(|v| v.len() == 1), "{stems:?}");
    assert!(
        stems.contains_key("sks") && !stems.keys().any(|k| k.contains('.')),
        "{stems:?}"
    );
    for step in ["000000", "000003", "000006"] {
        let p = image::open(run.join(format!("previews/step-{step}.png"))).unwrap();
        assert_eq!((p.width(), p.height()), (64, 64));
    }
    let grid = image::open(run.join("previews.png")).unwrap();
    assert!(grid.width() > 3 * 64, "three previews side by side");
    let plot = image::open(run.join("loss.png")).unwrap();
    assert_eq!((plot.width(), plot.height()), (800, 480));

    let word = read_embedding(&run.join("sks.pt")).unwrap();
    assert_eq!(word.name.as_deref(), Some("sks"));
    assert_eq!(word.step, Some(6));
    assert_eq!((word.parts[0].vectors, word.parts[0].dim), (2, 32));
    let diffusers = read_embedding(&run.join("formats/diffusers/sks.safetensors")).unwrap();
    assert_eq!(diffusers.parts[0].data, word.parts[0].data);
    assert_eq!(diffusers.name.as_deref(), Some("sks"));
    let by_step = read_embedding(&run.join("formats/safetensors/sks-6.safetensors")).unwrap();
    assert_eq!(by_step.parts[0].data, word.parts[0].data);

    // The folder now exists: refused without --resume / --overwrite.
    fails(
        &[
            "train",
            "--model",
            &tiny(),
            &s(&images),
            "-o",
            &s(&run),
            "--resolution",
            "64",
        ],
        "already exists; pass --resume",
    );
    // --resume of a finished run says so; other options are refused by name.
    let again = sdti(&["train", "--resume", "-o", &s(&run)]);
    assert!(again.status.success());
    assert!(text(&again.stderr).contains("complete"));
    fails(
        &[
            "train",
            "--resume",
            "-o",
            &s(&run),
            "--learning-rate",
            "0.1",
        ],
        "--learning-rate (saved \"0.005\", given \"0.1\")",
    );
    fails(
        &["train", "--resume", "-o", &s(&run), "--steps", "7"],
        "--steps (saved 6, given 7)",
    );
    // --overwrite replaces it.
    ok(&[
        "train",
        "--model",
        &tiny(),
        &s(&images),
        "-o",
        &s(&run),
        "--overwrite",
        "--resolution",
        "64",
        "--steps",
        "2",
        "--preview-every",
        "0",
        "--token",
        "other",
    ]);
    assert!(run.join("other.pt").is_file());
    assert!(!run.join("sks.pt").exists());
    assert!(!run.join("previews.png").exists());
}

/// Ctrl-C stops after the step, writes a checkpoint, exits 130; `--resume` finishes the
/// run with the same vectors as a run that was never stopped.
#[cfg(unix)]
#[test]
fn ctrl_c_writes_a_checkpoint_and_resume_matches_a_straight_run() {
    let tmp = tempfile::tempdir().unwrap();
    let images = pictures(tmp.path(), 2);
    let args = |dir: &Path| {
        tiny_train_args(
            &images,
            dir,
            &[
                "--token",
                "sks",
                "--steps",
                "24",
                "--save-every",
                "100",
                "--preview-every",
                "0",
                "--seed",
                "11",
                "--batch-size",
                "2",
                "--gradient-accumulation",
                "2",
            ],
        )
    };
    let stopped = tmp.path().join("stopped");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sdti"))
        .args(args(&stopped))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        let rows = std::fs::read_to_string(stopped.join("loss.csv"))
            .map(|t| t.lines().count().saturating_sub(1))
            .unwrap_or(0);
        if rows >= 2 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "training did not start"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "training ended too early"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("sdti train --resume"), "{err}");
    let ckpts: Vec<PathBuf> = std::fs::read_dir(stopped.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(ckpts.len(), 1, "{ckpts:?}");
    let csv = std::fs::read_to_string(stopped.join("loss.csv")).unwrap();
    let logged = csv.lines().count() - 1;
    assert!((2..24).contains(&logged), "stopped after {logged} steps");
    assert!(ckpts[0].ends_with(format!("step-{logged:06}.safetensors")));

    ok(&["train", "--resume", "-o", &s(&stopped)]);
    let straight = tmp.path().join("straight");
    ok(&args(&straight)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    let a = std::fs::read(stopped.join("sks.pt")).unwrap();
    let b = std::fs::read(straight.join("sks.pt")).unwrap();
    assert_eq!(a, b, "stopped + resumed differs from a straight run");
    let csv = std::fs::read_to_string(stopped.join("loss.csv")).unwrap();
    let steps: Vec<String> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap().to_string())
        .collect();
    let want: Vec<String> = (1..=24).map(|i| i.to_string()).collect();
    assert_eq!(steps, want);
}

#[test]
fn sample_draws_the_same_picture_for_the_same_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let word = tmp.path().join("sks.pt");
    write_word(&word, "sks", 2, Format::A1111Pt);
    let dir = tmp.path().join("samples");
    let out = ok(&[
        "sample",
        "--model",
        &tiny(),
        "--embedding",
        &s(&word),
        "--prompt",
        "a photo of sks",
        "--steps",
        "3",
        "--width",
        "64",
        "--height",
        "128",
        "--seed",
        "5",
        "--count",
        "2",
        "-o",
        &s(&dir),
    ]);
    assert!(
        out.contains("sample-5.png") && out.contains("sample-6.png"),
        "{out}"
    );
    let first = image::open(dir.join("sample-5.png")).unwrap();
    assert_eq!((first.width(), first.height()), (64, 128));
    // The same seed again, as one file, with the word renamed: the same picture.
    let single = tmp.path().join("one.png");
    let again = sdti(&[
        "sample",
        "--model",
        &tiny(),
        "--embedding",
        &format!("thing={}", s(&word)),
        "--prompt",
        "a photo of <thing>",
        "--steps",
        "3",
        "--width",
        "64",
        "--height",
        "128",
        "--seed",
        "5",
        "-o",
        &s(&single),
    ]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_eq!(
        image::open(&single).unwrap().to_rgb8().into_raw(),
        first.to_rgb8().into_raw()
    );
    fails(
        &[
            "sample",
            "--model",
            &tiny(),
            "--prompt",
            "x",
            "--width",
            "60",
        ],
        "--width: 60 must be a multiple of 8",
    );
    // The engine's `guidance` is sample's --cfg.
    fails(
        &["sample", "--model", &tiny(), "--prompt", "x", "--cfg=-1"],
        "--cfg: -1 must be a number >= 0",
    );
    fails(
        &[
            "sample",
            "--model",
            &tiny(),
            "--prompt",
            "x",
            "--embedding",
            "/nope/w.pt",
        ],
        "no such file",
    );
}

#[test]
fn convert_inspect_and_encode_embeddings() {
    let tmp = tempfile::tempdir().unwrap();
    let pt = tmp.path().join("sks.pt");
    write_word(&pt, "sks", 2, Format::A1111Pt);
    let st = tmp.path().join("sks.safetensors");
    ok(&["convert", &s(&pt), &s(&st)]);
    let back = read_embedding(&st).unwrap();
    assert_eq!(back.source_format, Format::A1111Safetensors);
    assert_eq!(back.parts, read_embedding(&pt).unwrap().parts);
    fails(&["convert", &s(&pt), &s(&st)], "--overwrite");
    // A dangling symlink is something there too: kept, not written through.
    let dangling = tmp.path().join("dangling.safetensors");
    std::os::unix::fs::symlink(tmp.path().join("elsewhere.safetensors"), &dangling).unwrap();
    fails(&["convert", &s(&pt), &s(&dangling)], "dangling");
    assert!(!tmp.path().join("elsewhere.safetensors").exists());
    ok(&["convert", &s(&pt), &s(&dangling), "--overwrite"]);
    assert!(!std::fs::symlink_metadata(&dangling)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(!tmp.path().join("elsewhere.safetensors").exists());
    let bin = tmp.path().join("learned_embeds.bin");
    ok(&["convert", &s(&pt), &s(&bin), "--name", "<sks>"]);
    assert_eq!(
        read_embedding(&bin).unwrap().source_format,
        Format::DiffusersBin
    );
    let diffusers = tmp.path().join("d.safetensors");
    ok(&[
        "convert",
        &s(&pt),
        &s(&diffusers),
        "--format",
        "diffusers",
        "--precision",
        "f16",
    ]);
    assert_eq!(
        read_embedding(&diffusers).unwrap().source_format,
        Format::DiffusersSafetensors
    );
    fails(
        &["convert", &s(&pt), &s(&tmp.path().join("x.txt"))],
        "pass --format",
    );

    let json: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", &s(&st), "--json"])).unwrap();
    assert_eq!(json["vectors"], 2);
    assert_eq!(json["widths"], serde_json::json!([32]));
    assert_eq!(
        json["parts"][0]["vectors_detail"].as_array().map(Vec::len),
        Some(2)
    );
    let human = ok(&["inspect", &s(&pt), "--model", &tiny(), "--top", "3"]);
    assert!(human.contains("name:        sks"), "{human}");
    assert_eq!(human.matches("near:").count(), 2, "{human}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", &s(&pt), "--model", &tiny(), "--json"])).unwrap();
    assert_eq!(
        json["parts"][0]["vectors_detail"][0]["nearest"]
            .as_array()
            .map(Vec::len),
        Some(5)
    );

    let json: serde_json::Value = serde_json::from_str(&ok(&[
        "encode",
        "--embedding",
        &s(&pt),
        "a photo of sks, embedding:sks",
        "--json",
    ]))
    .unwrap();
    assert_eq!(json["words"][0]["name"], "sks");
    assert_eq!(json["words"][0]["vectors"], 2);
    assert_eq!(
        json["learned_slots"],
        serde_json::json!([[0, 4], [0, 5], [0, 7], [0, 8]])
    );
    let chunk = &json["chunks"][0];
    assert_eq!(chunk.as_array().map(Vec::len), Some(77));
    assert_eq!(chunk[0]["id"], 49406);
    assert_eq!(chunk[1]["id"], 320); // "a"
    assert_eq!(chunk[4]["id"], serde_json::Value::Null);
    assert_eq!(chunk[5]["learned"]["vector"], 1);
    assert_eq!(chunk[9]["id"], 49407);
    let human = ok(&["encode", "--embedding", &s(&pt), "a photo of sks"]);
    assert!(human.contains("learned  sks vector 1"), "{human}");
    assert!(human.contains("padding slots"), "{human}");
}

/// `sdti encode`'s output, byte for byte, against tests/fixtures/encode/ (run in the
/// words' folder so the paths printed are the relative ones given):
/// `SDTI_WRITE_REFERENCE=1 cargo test --test suite cli::encode_output` rewrites them.
#[test]
fn encode_output_matches_the_committed_text() {
    let tmp = tempfile::tempdir().unwrap();
    write_word(&tmp.path().join("sks.pt"), "sks", 2, Format::A1111Pt);
    write_word(
        &tmp.path().join("style.safetensors"),
        "style",
        1,
        Format::A1111Safetensors,
    );
    let long = format!(
        "a good photo of my sks, {}, in the style of painter, embedding:sks",
        ["red hat", "blue coat", "green scarf", "old boots"]
            .iter()
            .cycle()
            .take(24)
            .copied()
            .collect::<Vec<_>>()
            .join(", ")
    );
    let cases: [(&str, Vec<&str>); 4] = [
        (
            "short.json",
            vec![
                "--embedding",
                "sks.pt",
                "a photo of sks, embedding:sks",
                "--json",
            ],
        ),
        ("short.txt", vec!["-e", "sks.pt", "a photo of sks"]),
        (
            "long-a1111.txt",
            vec!["-e", "sks.pt", "-e", "painter=style.safetensors", &long],
        ),
        (
            "long-comfyui.txt",
            vec![
                "-e",
                "sks.pt",
                "-e",
                "painter=style.safetensors",
                "--chunking",
                "comfyui",
                &long,
            ],
        ),
    ];
    let dir = fixture("encode");
    for (name, args) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_sdti"))
            .arg("encode")
            .args(&args)
            .current_dir(tmp.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
        let path = dir.join(name);
        if std::env::var_os("SDTI_WRITE_REFERENCE").is_some() {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &out.stdout).unwrap();
            continue;
        }
        let want = std::fs::read(&path).unwrap();
        assert!(
            out.stdout == want,
            "{name} differs from {path:?}:\n{}",
            text(&out.stdout)
        );
    }
}

#[test]
fn bench_times_steps_on_a_random_tiny_model() {
    let json: serde_json::Value = serde_json::from_str(&ok(&[
        "bench",
        "--config",
        "tiny",
        "--resolution",
        "64",
        "--steps",
        "2",
        "--json",
    ]))
    .unwrap();
    assert_eq!(json["resolution"], 64);
    assert_eq!(json["model"], "random tiny");
    assert!(json["mean_ms_per_step"].as_f64().unwrap() > 0.0);
    assert!(json["steps_per_second"].as_f64().unwrap() > 0.0);
    let human = ok(&[
        "bench",
        "--model",
        &tiny(),
        "--resolution",
        "64",
        "--steps",
        "1",
    ]);
    assert!(human.contains("steps/s"), "{human}");
}

#[test]
fn demo_runs_end_to_end_and_replaces_its_own_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let args = ["demo", "--steps", "8", "--resolution", "64", "-o", &s(&dir)];
    let out = ok(&args);
    assert!(out.contains("Everything is in"), "{out}");
    for f in [
        "images/concept-0.png",
        "run/config.json",
        "run/loss.csv",
        "run/loss.png",
        "run/previews.png",
        "run/red-disc.pt",
        "run/formats/safetensors/red-disc.safetensors",
        "sample.png",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let formats: Vec<String> = std::fs::read_dir(dir.join("export"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for f in Format::ALL {
        let expected = f.writable() && !f.sdxl_only();
        assert_eq!(formats.contains(&f.name().to_string()), expected, "{f}");
    }
    let word = read_embedding(&dir.join("export/diffusers/red-disc.safetensors")).unwrap();
    assert_eq!(word.parts[0].vectors, 2);
    // A second demo replaces the first; a folder it did not make is refused.
    ok(&args);
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "mine").unwrap();
    fails(
        &[
            "demo",
            "--steps",
            "1",
            "--resolution",
            "64",
            "-o",
            &s(&other),
        ],
        "was not made by sdti demo",
    );
    assert!(other.join("notes.txt").is_file());
}

/// The mistakes people make print one `error:` line, exit 1, and leave no folder behind.
#[test]
fn errors_for_people_are_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let images = pictures(tmp.path(), 1);
    let img = s(&images.join("disc-0.png"));
    let out = tmp.path().join("run");
    let o = s(&out);
    let tiny = tiny();

    let missing = tmp.path().join("no-model.safetensors");
    let line = fails(
        &["train", "--model", &s(&missing), &img, "-o", &o],
        "no such file or folder",
    );
    assert!(line.contains("no-model.safetensors"), "{line}");

    let sdxl = tmp.path().join("sdxl");
    std::fs::create_dir_all(sdxl.join("text_encoder_2")).unwrap();
    fails(
        &["train", "--model", &s(&sdxl), &img, "-o", &o],
        "an SDXL refiner (text_encoder_2 without text_encoder)",
    );

    let bad = tmp.path().join("bad.png");
    std::fs::write(&bad, b"this is not a picture").unwrap();
    let line = fails(
        &[
            "train",
            "--model",
            &tiny,
            &img,
            &s(&bad),
            "-o",
            &o,
            "--resolution",
            "64",
        ],
        "not a recognised image",
    );
    assert!(line.contains("bad.png"), "{line}");

    fails(
        &[
            "train",
            "--model",
            &tiny,
            &img,
            "-o",
            &o,
            "--resolution",
            "100",
        ],
        "--resolution: 100 must be a multiple of 8",
    );
    assert!(!out.exists(), "a failed start left {o} behind");

    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    fails(
        &[
            "train",
            "--model",
            &tiny,
            &img,
            "-o",
            &o,
            "--resolution",
            "64",
        ],
        "already exists; pass --resume to continue it or --overwrite to replace it",
    );
    fails(
        &["train", "--model", &tiny, &img, "-o", &o, "--overwrite"],
        "--overwrite replaces only sdti run folders",
    );
    fails(&["train", "--resume", "-o", &o], "not an sdti run folder");
    assert!(out.join("keep.txt").is_file());

    fails(
        &[
            "train",
            "--model",
            &tiny,
            &s(&tmp.path().join("gone.png")),
            "-o",
            &s(&tmp.path().join("r2")),
        ],
        "no such file or folder",
    );
    fails(
        &["train", &img, "-o", &s(&tmp.path().join("r3"))],
        "--model is required",
    );
    fails(
        &[
            "train",
            "--model",
            &tiny,
            &img,
            "-o",
            &s(&tmp.path().join("r4")),
            "--token",
            "two words",
        ],
        "--token",
    );
    fails(
        &[
            "train",
            "--model",
            &tiny,
            &img,
            "-o",
            &s(&tmp.path().join("r5")),
            "--formats",
            "pt,nope",
        ],
        "nope",
    );
    fails(
        &["sample", "--model", &s(&missing), "--prompt", "x"],
        "no such file or folder",
    );
    fails(&["inspect", &s(&bad)], "bad.png");
    fails(
        &[
            "train",
            "--device",
            "tpu",
            "--model",
            &tiny,
            &img,
            "-o",
            &s(&tmp.path().join("r6")),
        ],
        "'tpu' is not a device",
    );
}

/// A wrong value of each training option is refused before anything is written, in an
/// error that names the option's flag (the engine names the field; the CLI maps it).
#[test]
fn train_errors_name_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let images = pictures(tmp.path(), 1);
    let out = tmp.path().join("run");
    let cases: [(&[&str], &str); 27] = [
        (&["--batch-size", "0"], "--batch-size: 0 is outside 1..=256"),
        (&["--steps", "0"], "--steps: must be at least 1"),
        (
            &["--adam-epsilon", "0"],
            "--adam-epsilon: 0 must be positive",
        ),
        (
            &["--weight-decay=-1"],
            "--weight-decay: -1 must be zero or positive",
        ),
        (
            &["--clip-skip", "9"],
            "--clip-skip: 9 is more than this text encoder's",
        ),
        (
            &["--preview-every", "1", "--preview-steps", "0"],
            "--preview-steps: 0 is outside 1..=1000",
        ),
        (
            &["--preview-every", "1", "--preview-cfg=-1"],
            "--preview-cfg: -1 must be a number >= 0",
        ),
        (
            &["--preview-every", "1", "--preview-size", "60"],
            "--preview-size: 60 must be a multiple of 8",
        ),
        (
            &["--resolution", "7"],
            "--resolution: 7 must be a multiple of 8",
        ),
        (
            &["--gradient-accumulation", "0"],
            "--gradient-accumulation: must be at least 1",
        ),
        (
            &["--flip-probability", "2"],
            "--flip-probability: must be within 0..=1",
        ),
        (&["--vectors", "0"], "--vectors: 0 is outside 1..=75"),
        (&["--adam-beta1", "1"], "--adam-beta1: 1 is outside [0, 1)"),
        (&["--adam-beta2", "1"], "--adam-beta2: 1 is outside [0, 1)"),
        (
            &["--max-grad-norm", "0"],
            "--max-grad-norm: 0 must be positive",
        ),
        (&["--clip-skip", "0"], "--clip-skip: must be at least 1"),
        (&["--learning-rate", "x"], "--learning-rate: "),
        (
            &[
                "--lr-scheduler",
                "cosine",
                "--learning-rate",
                "0.1:10, 0.01",
            ],
            "--learning-rate: '0.1:10, 0.01' must be a number",
        ),
        (&["--lr-scheduler", "bogus"], "--lr-scheduler: "),
        (&["--prediction-type", "bogus"], "--prediction-type: "),
        (&["--token", "a/b"], "--token: 'a/b' cannot name a word"),
        (&["--init", ""], "--init: the init text '' has no tokens"),
        (&["--templates", "no-such-file.txt"], "--templates: "),
        (&["--save-every", "0"], "--save-every: must be at least 1"),
        (&["--formats", "png-pixels"], "--formats: 'png-pixels'"),
        (&["--precision", "f8"], "--precision: "),
        (&["--device", "tpu"], "--device: "),
    ];
    let (tiny, images, o) = (tiny(), s(&images), s(&out));
    for (wrong, want) in cases {
        let mut args = vec!["train", "--model", &tiny, &images, "-o", &o];
        for default in [
            ["--resolution", "64"],
            ["--steps", "1"],
            ["--preview-every", "0"],
        ] {
            if !wrong.contains(&default[0]) {
                args.extend(default);
            }
        }
        args.extend(wrong);
        fails(&args, want);
        assert!(!out.exists(), "{wrong:?} left {o} behind");
    }
}

/// Every file under `dir`, recursively.
#[cfg(unix)]
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// SIGKILL while a write of the file named like `hold` sits complete in its temporary
/// file, just before it is put in place (the writer's crash-test hook): no destination is
/// half-written, `--resume` finishes the run with the word of a run never killed, and no
/// temporary file is left.
#[cfg(unix)]
fn sigkill_mid_write_then_resume(hold: &str, destination: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let images = pictures(tmp.path(), 2);
    let args = |dir: &Path| {
        tiny_train_args(
            &images,
            dir,
            &[
                "--token",
                "sks",
                "--steps",
                "4",
                "--save-every",
                "2",
                "--preview-every",
                "0",
                "--seed",
                "5",
            ],
        )
    };
    let killed = tmp.path().join("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sdti"))
        .args(args(&killed))
        .env(sdti::io::HOLD_BEFORE_RENAME_ENV, hold)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let held = loop {
        let marker = killed.is_dir().then(|| {
            files_under(&killed)
                .into_iter()
                .find(|p| p.to_string_lossy().ends_with(".held"))
        });
        if let Some(Some(m)) = marker {
            break m;
        }
        if start.elapsed() > Duration::from_secs(60) || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the write of {hold} was never held");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();

    let name = held.file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.contains(".sdti-tmp-"), "{name}");
    assert!(!killed.join(destination).exists(), "{destination} in place");
    let left = files_under(&killed);
    assert!(
        left.iter()
            .any(|p| p.to_string_lossy().contains(".sdti-tmp-") && !p.ends_with(&held)),
        "the complete temporary file was not left: {left:?}"
    );
    for path in &left {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        if file.starts_with('.') {
            continue;
        }
        if path.parent().unwrap().ends_with("checkpoints") {
            candle_core::safetensors::load(path, &candle_core::Device::Cpu)
                .unwrap_or_else(|e| panic!("{path:?} is not a whole checkpoint: {e}"));
        } else if file.ends_with(".pt") || file.ends_with(".safetensors") {
            read_embedding(path).unwrap_or_else(|e| panic!("{path:?} is not a whole word: {e}"));
        }
    }

    ok(&["train", "--resume", "-o", &s(&killed)]);
    let straight = tmp.path().join("straight");
    ok(&args(&straight)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    let word = |dir: &Path| {
        read_embedding(&dir.join("sks.pt")).unwrap().parts[0]
            .data
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<u32>>()
    };
    assert_eq!(word(&killed), word(&straight), "killed + resumed differs");
    assert!(killed.join(destination).is_file(), "{destination} missing");
    assert_eq!(
        read_embedding(&killed.join("embeddings/sks-2.pt"))
            .unwrap()
            .parts[0]
            .data,
        read_embedding(&straight.join("embeddings/sks-2.pt"))
            .unwrap()
            .parts[0]
            .data
    );
    let temps: Vec<PathBuf> = files_under(&killed)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".sdti-tmp-"))
        .collect();
    assert!(temps.is_empty(), "left behind: {temps:?}");
}

#[cfg(unix)]
#[test]
fn sigkill_mid_checkpoint_then_resume_matches_a_straight_run() {
    sigkill_mid_write_then_resume("step-000002", "checkpoints/step-000002.safetensors");
}

#[cfg(unix)]
#[test]
fn sigkill_mid_export_then_resume_matches_a_straight_run() {
    sigkill_mid_write_then_resume("sks-2.", "embeddings/sks-2.pt");
}

/// `sdti sample` on the SD 2.x and SDXL test models writes images of the asked size (of
/// the family's default size without --width/--height, checked on the fast SD 2.x one);
/// `--prediction-type` and `--negative-encode` reach the sampler.
#[test]
fn sample_draws_with_sd2_and_sdxl_models() {
    let tmp = tempfile::tempdir().unwrap();
    let draw = |model: &str, name: &str, extra: &[&str]| -> Vec<u8> {
        let path = tmp.path().join(name);
        let fixture_path = s(&fixture(model));
        let mut args = vec![
            "sample",
            "--model",
            &fixture_path,
            "--prompt",
            "a photo of a toy",
            "--steps",
            "2",
            "--seed",
            "3",
        ];
        args.extend_from_slice(extra);
        let p = s(&path);
        args.extend_from_slice(&["-o", &p]);
        let out = sdti(&args);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let err = text(&out.stderr);
        // What loading decided, where a person sees it.
        assert!(
            err.contains("note: ") && err.contains("override with --prediction-type"),
            "{err}"
        );
        let img = image::open(&path).unwrap().to_rgb8();
        let size = (img.width(), img.height());
        let want = match extra.iter().position(|a| *a == "--width") {
            Some(_) => (64, 48),
            None => (512, 512),
        };
        assert_eq!(size, want, "{name}");
        img.into_raw()
    };
    let small = ["--width", "64", "--height", "48"];
    let sd2 = draw("tiny-sd2", "sd2.png", &small);
    let v = draw(
        "tiny-sd2",
        "sd2-v.png",
        &[&small[..], &["--prediction-type", "v_prediction"]].concat(),
    );
    assert_ne!(sd2, v, "--prediction-type changed nothing");
    draw("tiny-sd2", "sd2-default-size.png", &[]);
    let xl = draw("tiny-sdxl", "xl.png", &small);
    let xl_encoded = draw(
        "tiny-sdxl",
        "xl-encode.png",
        &[&small[..], &["--negative-encode"]].concat(),
    );
    assert_ne!(xl, xl_encoded, "--negative-encode changed nothing");
    fails(
        &[
            "sample",
            "--model",
            &s(&fixture("tiny-sd2")),
            "--prompt",
            "x",
            "--prediction-type",
            "sample",
        ],
        "--prediction-type",
    );
}

/// What an SDXL sample conditions on: the time ids `(H, W, 0, 0, H, W)` (height first,
/// diffusers' `_get_add_time_ids` with its defaults), zeros for the context and the pooled
/// vector of an empty negative prompt (diffusers' `force_zeros_for_empty_prompt`, A1111),
/// as many chunks as the prompt; with `EmptyNegative::Encode` the reference's encoded ""
/// (ComfyUI; tests/reference/make_tiny_sdxl.py's `uncond`).
#[test]
fn sdxl_sample_conditioning_time_ids_and_uncond() {
    use sdti::app::preview::{sample_conditioning, EmptyNegative, SampleOptions};
    use sdti::model::{LoadOptions, SdModel};
    use sdti::prompt::encoder::PromptEncoder;

    use crate::common::{assert_close, test_device};

    let exp =
        candle_core::safetensors::load(fixture("tiny-sdxl-expected.safetensors"), &test_device())
            .unwrap();
    let model = SdModel::load(&fixture("tiny-sdxl"), &LoadOptions::default()).unwrap();
    let encoder = PromptEncoder::for_model(&model).unwrap();
    let max_abs = |t: &candle_core::Tensor| -> f32 {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    // A prompt of two chunks, a non-square image.
    let long = format!("a photo of a toy{}", ", on a table".repeat(20));
    let opts = SampleOptions {
        prompt: long,
        width: 64,
        height: 48,
        ..SampleOptions::default()
    };
    let (cond, uncond) = sample_conditioning(&model, &encoder, &opts).unwrap();
    let uncond = uncond.expect("guidance 7.5 has an unconditional branch");
    assert_eq!(cond.context.dims(), &[1, 154, 80]);
    assert_eq!(uncond.context.dims(), cond.context.dims());
    assert_eq!(max_abs(&uncond.context), 0.0);
    for (c, what) in [(&cond, "cond"), (&uncond, "uncond")] {
        let added = c
            .added
            .as_ref()
            .expect("SDXL conditioning has added inputs");
        assert_eq!(
            added.time_ids.to_vec2::<f32>().unwrap(),
            vec![vec![48.0, 64.0, 0.0, 0.0, 48.0, 64.0]],
            "{what}"
        );
        assert_eq!(added.pooled.dims(), &[1, 48], "{what}");
    }
    let pooled = |c: &sdti::sample::Conditioning| c.added.as_ref().unwrap().pooled.clone();
    assert_eq!(max_abs(&pooled(&uncond)), 0.0);
    assert!(max_abs(&pooled(&cond)) > 0.0);

    // ComfyUI's choice: the encoded "", padded with encoded "" chunks.
    let encode = SampleOptions {
        prompt: "a photo of a toy".into(),
        empty_negative: EmptyNegative::Encode,
        ..opts.clone()
    };
    let (_, uncond) = sample_conditioning(&model, &encoder, &encode).unwrap();
    let uncond = uncond.unwrap();
    assert_close(
        "encoded uncond context",
        &uncond.context,
        &exp["uncond.context"],
        1e-5,
    );
    assert_close(
        "encoded uncond pooled",
        &pooled(&uncond),
        &exp["uncond.pooled"],
        1e-5,
    );
    // A negative prompt is encoded whatever the choice; guidance 1 has no uncond.
    let negative = SampleOptions {
        negative: "blurry".into(),
        ..opts.clone()
    };
    let (_, uncond) = sample_conditioning(&model, &encoder, &negative).unwrap();
    assert!(max_abs(&uncond.unwrap().context) > 0.0);
    let unguided = SampleOptions {
        guidance: 1.0,
        ..opts
    };
    assert!(sample_conditioning(&model, &encoder, &unguided)
        .unwrap()
        .1
        .is_none());
}

/// SD 1.x and 2.x have no zeros rule: an empty negative prompt is the encoded "" (every
/// tool's), and their UNets take no added inputs.
#[test]
fn sd2_sample_uncond_is_the_encoded_empty_prompt() {
    use sdti::app::preview::{sample_conditioning, SampleOptions};
    use sdti::model::{LoadOptions, SdModel};
    use sdti::prompt::encoder::PromptEncoder;

    let model = SdModel::load(&fixture("tiny-sd2"), &LoadOptions::default()).unwrap();
    let encoder = PromptEncoder::for_model(&model).unwrap();
    let opts = SampleOptions {
        prompt: "a photo of a toy".into(),
        width: 64,
        height: 64,
        ..SampleOptions::default()
    };
    let (cond, uncond) = sample_conditioning(&model, &encoder, &opts).unwrap();
    let uncond = uncond.unwrap();
    assert!(cond.added.is_none() && uncond.added.is_none());
    let empty = encoder.encode("").unwrap().unsqueeze(0).unwrap();
    assert_eq!(
        uncond
            .context
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        empty.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}

/// `sdti train --model tiny-sdxl` end to end: the word trains in both encoders' tables,
/// the run folder holds it as `{clip_l, clip_g}` (the `sdxl` format unless --formats says
/// another two-table layout), previews are drawn, and the word samples; a one-table
/// format is refused before anything is written.
#[test]
fn train_sdxl_writes_a_clip_l_clip_g_word() {
    let tmp = tempfile::tempdir().unwrap();
    let images = pictures(tmp.path(), 2);
    let dir = tmp.path().join("run");
    let model = s(&fixture("tiny-sdxl"));
    let train = |dir: &Path, extra: &[&str]| -> Output {
        let mut args = vec![
            "train".to_string(),
            "--model".into(),
            model.clone(),
            s(&images),
            "-o".into(),
            s(dir),
            "--token".into(),
            "xlw".into(),
            "--init".into(),
            "toy".into(),
            "--vectors".into(),
            "2".into(),
            "--resolution".into(),
            "64".into(),
            "--steps".into(),
            "2".into(),
            "--save-every".into(),
            "2".into(),
            "--preview-every".into(),
            "1".into(),
            "--preview-steps".into(),
            "2".into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        sdti(&args)
    };
    let out = train(&dir, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("note: SDXL folder"), "{err}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["run"]["formats"], serde_json::json!(["sdxl"]));
    assert_eq!(config["train"]["resolution"], 64);
    assert_eq!(config["train"]["clip_skip"], 2);
    assert_eq!(config["run"]["preview"]["empty_negative"], "zeros");
    for path in [
        dir.join("xlw.safetensors"),
        dir.join("embeddings").join("xlw-2.safetensors"),
    ] {
        let word = read_embedding(&path).unwrap();
        assert_eq!(word.source_format, Format::SdxlSafetensors, "{path:?}");
        let parts: Vec<(Encoder, usize, usize)> = word
            .parts
            .iter()
            .map(|p| (p.encoder, p.vectors, p.dim))
            .collect();
        assert_eq!(
            parts,
            vec![(Encoder::ClipL, 2, 32), (Encoder::ClipG, 2, 48)],
            "{path:?}"
        );
        assert!(word
            .parts
            .iter()
            .all(|p| p.data.iter().all(|v| v.is_finite())));
    }
    for step in [0, 1, 2] {
        assert!(
            dir.join("previews")
                .join(format!("step-{step:06}.png"))
                .is_file(),
            "preview {step}"
        );
    }
    // The word draws with the model it was trained on.
    let drawn = tmp.path().join("xl.png");
    ok(&[
        "sample",
        "--model",
        &model,
        "--embedding",
        &s(&dir.join("xlw.safetensors")),
        "--prompt",
        "a photo of xlw",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "-o",
        &s(&drawn),
    ]);
    assert!(drawn.is_file());
    // Two-table layouts only; nothing written when refused.
    let refused = tmp.path().join("refused");
    let out = train(&refused, &["--formats", "a1111-pt"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("--formats: 'a1111-pt' holds one text encoder's vectors"),
        "{err}"
    );
    assert!(!refused.exists());
    let pair = tmp.path().join("pair");
    let out = train(
        &pair,
        &[
            "--formats",
            "diffusers-sdxl,sdxl",
            "--preview-negative-encode",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pair.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["run"]["preview"]["empty_negative"], "encode");
    assert!(pair.join("xlw.safetensors").is_file());
    assert!(pair.join("xlw_2.safetensors").is_file());
    assert!(pair.join("formats/sdxl/xlw.safetensors").is_file());
}

/// Without --resolution a run trains at the model's resolution (512, 768 for SD 2.x
/// v-prediction, 1024 for SDXL) and config.json records it; 'sdxl' is refused for a
/// one-table model.
#[test]
fn train_takes_the_models_resolution() {
    let tmp = tempfile::tempdir().unwrap();
    let images = pictures(tmp.path(), 1);
    let dir = tmp.path().join("run");
    let model = s(&fixture("tiny-sd2"));
    let out = sdti(&[
        "train",
        "--model",
        &model,
        &s(&images),
        "-o",
        &s(&dir),
        "--steps",
        "1",
        "--preview-every",
        "0",
        "--prediction-type",
        "v_prediction",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("at 768 px"));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["train"]["resolution"], 768);
    assert_eq!(
        config["run"]["formats"],
        serde_json::json!(["a1111-pt", "safetensors"])
    );
    let word = read_embedding(&dir.join("sdti-word.pt")).unwrap();
    assert_eq!(word.parts[0].dim, 32);
    fails(
        &[
            "train",
            "--model",
            &model,
            &s(&images),
            "-o",
            &s(&tmp.path().join("r2")),
            "--formats",
            "sdxl",
        ],
        "--formats: 'sdxl' holds two text encoders' vectors (SDXL's); an SD 2.x word has one",
    );
}

/// `sdti inspect MODEL`: the family, the prediction type and the rule that chose it,
/// and the defaults training takes from the model; the v_pred and ztsnr marker keys of
/// SDXL fine-tunes (ComfyUI's rule) read as v-prediction with zero terminal SNR.
#[test]
fn inspect_says_what_a_model_is() {
    let human = ok(&["inspect", &s(&fixture("tiny-sdxl"))]);
    for want in [
        "family:      SDXL",
        "prediction:  epsilon",
        "clip_l 32 + clip_g 48 wide",
        "clip skip 2, resolution 1024, VAE scale 0.13025",
        "override with --prediction-type",
    ] {
        assert!(human.contains(want), "'{want}' not in:\n{human}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", &s(&fixture("tiny-sd2")), "--json"])).unwrap();
    assert_eq!(json["family"], "SD 2.x");
    assert_eq!(json["clip_skip"], 2);
    assert_eq!(json["resolution"], 512);
    assert_eq!(json["word_widths"], serde_json::json!([32]));
    let sd1 = ok(&["inspect", &tiny()]);
    assert!(
        sd1.contains("clip skip 1, resolution 512, VAE scale 0.18215"),
        "{sd1}"
    );

    // An SDXL fine-tune's single file with the marker keys.
    let tmp = tempfile::tempdir().unwrap();
    let marked = tmp.path().join("vpred-xl.safetensors");
    let mut tensors =
        candle_core::safetensors::load(fixture("tiny-sdxl.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    for key in ["v_pred", "ztsnr"] {
        tensors.insert(
            key.into(),
            candle_core::Tensor::zeros(1, candle_core::DType::F32, &candle_core::Device::Cpu)
                .unwrap(),
        );
    }
    candle_core::safetensors::save(&tensors, &marked).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", &s(&marked), "--json"])).unwrap();
    assert_eq!(json["family"], "SDXL");
    assert_eq!(json["prediction_type"], "v_prediction");
    assert_eq!(json["zero_terminal_snr"], true);
    assert_eq!(json["resolution"], 1024);
    let notes = json["notes"].to_string();
    assert!(
        notes.contains("v_pred") && notes.contains("ztsnr"),
        "{notes}"
    );
    // --model is for an embedding's nearest tokens.
    fails(
        &["inspect", &s(&marked), "--model", &tiny()],
        "is a model itself",
    );
}

/// `sdti bench --config` builds random models of each family (tiny here; sd2 and sdxl are
/// the real sizes).
#[test]
fn bench_builds_random_sd2_and_sdxl_models() {
    for config in ["tiny-sd2", "tiny-sdxl"] {
        let json: serde_json::Value = serde_json::from_str(&ok(&[
            "bench", "--config", config, "--steps", "1", "--json",
        ]))
        .unwrap();
        assert_eq!(json["model"], format!("random {config}"));
        assert_eq!(json["resolution"], 64);
        assert!(json["mean_ms_per_step"].as_f64().unwrap() > 0.0);
    }
    let help = ok(&["bench", "--help"]);
    assert!(help.contains("sdxl") && help.contains("sd2"), "{help}");
}
