//! The CMake package: an installed sdti found with find_package(sdti CONFIG).
//!
//! scripts/install.sh installs the library this test run built into a temporary prefix,
//! which is then moved (the package computes its paths from its own location; nothing of
//! the install path may be remembered). The C host of tests/hosts/cmake is configured
//! against it with `-DCMAKE_PREFIX_PATH`, built, run, and its encoding compared with the
//! reference; find_package refuses a version of another major. CMake is required (CI
//! installs it): without it these tests fail, unless `SDTI_SKIP_CMAKE` is set.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sdti::ffi::{SDTI_ABI_MAJOR, SDTI_ABI_MINOR};

use crate::common::fixture;
use crate::ffi::cdylib;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Whether to run: CMake is required unless `SDTI_SKIP_CMAKE` says otherwise.
fn cmake_required() -> bool {
    if std::env::var_os("SDTI_SKIP_CMAKE").is_some() {
        eprintln!("SKIPPED: SDTI_SKIP_CMAKE is set; the CMake package was not tested");
        return false;
    }
    for tool in ["cmake", "sh"] {
        assert!(
            Command::new(tool).arg("--version").output().is_ok(),
            "{tool} not found: the CMake package test needs CMake 3.16 or newer and a C \
             compiler (apt-get install cmake build-essential); set SDTI_SKIP_CMAKE=1 to skip it"
        );
    }
    true
}

fn run(cmd: &mut Command, what: &str) -> (Output, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

fn run_ok(cmd: &mut Command, what: &str) -> String {
    let (out, text) = run(cmd, what);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
    text
}

/// Installs sdti with scripts/install.sh (the library already built, no second build)
/// under `<dir>/installed`, then moves that prefix to `<dir>/prefix` and returns it.
fn install_and_move(dir: &Path) -> PathBuf {
    let installed = dir.join("installed");
    run_ok(
        Command::new("sh")
            .arg(root().join("scripts/install.sh"))
            .arg("--prefix")
            .arg(&installed)
            .arg("--lib")
            .arg(cdylib()),
        "scripts/install.sh",
    );
    let config = installed.join("lib/cmake/sdti");
    for file in ["sdtiConfig.cmake", "sdtiConfigVersion.cmake"] {
        let text = std::fs::read_to_string(config.join(file))
            .unwrap_or_else(|e| panic!("{file} was not installed: {e}"));
        let installed_path = installed.to_str().expect("UTF-8 temp path");
        assert!(
            !text.contains(installed_path),
            "{file} names the install path; it must compute it:\n{text}"
        );
    }
    let prefix = dir.join("prefix");
    std::fs::rename(&installed, &prefix).expect("move the installed prefix");
    prefix
}

/// `cmake -S tests/hosts/cmake -B <build> -DCMAKE_PREFIX_PATH=<prefix> [-DSDTI_REQUEST=..]`,
/// with no other sdti reachable through the environment.
fn configure(build: &Path, prefix: &Path, request: &str) -> (Output, String) {
    run(
        Command::new("cmake")
            .arg("-S")
            .arg(root().join("tests/hosts/cmake"))
            .arg("-B")
            .arg(build)
            .arg(format!("-DCMAKE_PREFIX_PATH={}", prefix.display()))
            .arg(format!("-DSDTI_REQUEST={request}"))
            .env_remove("CMAKE_PREFIX_PATH")
            .env_remove("sdti_DIR")
            .env_remove("sdti_ROOT")
            .env_remove("SDTI_ROOT"),
        "cmake configure",
    )
}

/// Raw little-endian f32 values, as the host writes them.
fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(bytes.len() % 4, 0, "{} is not whole f32s", path.display());
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// "major.minor" from the `#define SDTI_ABI_MAJOR`/`MINOR` lines of include/sdti.h.
fn header_abi() -> String {
    let header = std::fs::read_to_string(root().join("include/sdti.h")).expect("include/sdti.h");
    let define = |name: &str| {
        header
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_else(|| panic!("include/sdti.h has no {name}"))
            .to_string()
    };
    format!(
        "{}.{}",
        define("#define SDTI_ABI_MAJOR "),
        define("#define SDTI_ABI_MINOR ")
    )
}

#[test]
fn cmake_host_finds_builds_and_runs_against_the_installed_package() {
    if !cmake_required() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let prefix = install_and_move(dir.path());
    let build = dir.path().join("build");
    let major_minor = format!(
        "{}.{}",
        env!("CARGO_PKG_VERSION_MAJOR"),
        env!("CARGO_PKG_VERSION_MINOR")
    );
    // Asking for this major.minor: the version file accepts it.
    let (out, text) = configure(&build, &prefix, &major_minor);
    assert!(out.status.success(), "cmake configure failed:\n{text}");
    // The package's ABI is the installed header's (SDTI_ABI_MAJOR/MINOR of include/sdti.h).
    let found = format!(
        "sdti {} (C ABI {}) from {}",
        env!("CARGO_PKG_VERSION"),
        header_abi(),
        prefix.join("lib/cmake/sdti").display()
    );
    assert!(text.contains(&found), "wanted '{found}' in:\n{text}");
    run_ok(
        Command::new("cmake").arg("--build").arg(&build),
        "cmake --build",
    );
    let exe = build.join(format!("cmake_host{}", std::env::consts::EXE_SUFFIX));
    let states = dir.path().join("states.f32");
    let text = run_ok(
        Command::new(&exe)
            .arg(fixture("tiny-sd"))
            .arg("a photo of a sks toy")
            .arg(&states),
        "cmake_host",
    );
    let version = format!(
        "cmake host: sdti {}, ABI {}.{}",
        env!("CARGO_PKG_VERSION"),
        SDTI_ABI_MAJOR,
        SDTI_ABI_MINOR
    );
    assert!(text.contains(&version), "wanted '{version}' in:\n{text}");
    assert!(text.contains("cmake host: encoded 77 rows of 32"), "{text}");
    assert!(
        text.contains("cmake host: missing model -> model error"),
        "{text}"
    );
    assert!(text.contains("cmake host: ok"), "{text}");

    // The hidden states of the prompt, as transformers' CLIPTextModel gives them
    // (tests/reference/make_tiny_sd.py, `te.plain_last_hidden_state`).
    let got = read_f32(&states);
    let want = candle_core::safetensors::load(
        fixture("tiny-sd-expected.safetensors"),
        &candle_core::Device::Cpu,
    )
    .expect("reference fixture tiny-sd-expected.safetensors")["te.plain_last_hidden_state"]
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("te.plain_last_hidden_state as f32");
    assert_eq!(got.len(), want.len(), "77 x 32 floats");
    let (diff, norm) = got
        .iter()
        .zip(&want)
        .fold((0f64, 0f64), |(d, n), (&a, &b)| {
            let (a, b) = (f64::from(a), f64::from(b));
            (d + (a - b) * (a - b), n + b * b)
        });
    let rel = (diff / norm).sqrt();
    assert!(
        rel <= 1e-5,
        "relative error {rel:.3e} against the reference"
    );

    // The executable needs "libsdti.so", not the path it was linked from (the cdylib has
    // no soname; the package links it as -lsdti): moved again, the library is still found
    // through the loader's search path.
    #[cfg(target_os = "linux")]
    {
        let moved = dir.path().join("moved");
        std::fs::rename(&prefix, &moved).expect("move the prefix again");
        let text = run_ok(
            Command::new(&exe)
                .arg(fixture("tiny-sd"))
                .arg("a photo")
                .arg(dir.path().join("again.f32"))
                .env("LD_LIBRARY_PATH", moved.join("lib")),
            "cmake_host with the prefix moved after linking",
        );
        assert!(text.contains("cmake host: ok"), "{text}");
    }
}

#[test]
fn cmake_find_package_refuses_another_major_version() {
    if !cmake_required() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let prefix = install_and_move(dir.path());
    let major: u32 = env!("CARGO_PKG_VERSION_MAJOR").parse().unwrap();
    let next = (major + 1).to_string();
    let (out, text) = configure(&dir.path().join("build"), &prefix, &next);
    assert!(
        !out.status.success(),
        "find_package(sdti {next}) accepted sdti {}:\n{text}",
        env!("CARGO_PKG_VERSION")
    );
    // CMake wraps its messages; compare without the line breaks.
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let wanted = format!("compatible with requested version \"{next}\"");
    assert!(flat.contains(&wanted), "wanted '{wanted}' in:\n{text}");
    assert!(
        flat.contains(&format!("version: {}", env!("CARGO_PKG_VERSION"))),
        "the refused version is named:\n{text}"
    );
}
