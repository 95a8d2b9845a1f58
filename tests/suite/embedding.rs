//! Learned-embedding formats against torch-written fixtures
//! (tests/reference/make_embedding_fixtures.py), round trips, checks and
//! hostile inputs.
//!
//! `SDTI_WRITE_REFERENCE=1 cargo test --test suite embedding::write_reference_outputs`
//! regenerates tests/fixtures/embeddings/written_by_sdti/ for the Python side.

use std::io::Write;
use std::path::{Path, PathBuf};

use sdti::embedding::{
    check_for_family, convert, diffusers_sdxl_second_path, fuzzing, inspect, read_embedding,
    read_embedding_bytes, read_embedding_pair, round_to, write_embedding, write_embedding_bytes,
    write_embedding_pair_bytes, write_embedding_to, zip_member_names, EmbeddingError,
    EmbeddingFile, EmbeddingPart, Encoder, Existing, Family, Format, Precision,
};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/embeddings")
}

fn fixture(name: &str) -> EmbeddingFile {
    match read_embedding(&fixtures().join(name)) {
        Ok(e) => e,
        Err(e) => panic!("{name}: {e}"),
    }
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).expect("expected.json");
    serde_json::from_str(&text).expect("expected.json parses")
}

/// Same hash as the fixture script: FNV-1a 64 over little-endian f32 bytes.
fn fnv1a64(data: &[f32]) -> String {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for v in data {
        for b in v.to_le_bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01B3);
        }
    }
    format!("{h:016x}")
}

fn enc_name(e: Encoder) -> &'static str {
    match e {
        Encoder::Single => "single",
        Encoder::ClipL => "clip-l",
        Encoder::ClipG => "clip-g",
    }
}

#[test]
fn every_fixture_reads_exactly_as_torch_wrote_it() {
    let exp = expected();
    let all = exp["fixtures"].as_object().expect("fixtures");
    assert!(all.len() >= 20);
    for (file, want) in all {
        // `FIRST+SECOND` names a diffusers SDXL pair: each half under the fixtures.
        let path = match file.split_once('+') {
            Some((a, b)) => {
                let mut p = fixtures().join(a).into_os_string();
                p.push("+");
                p.push(fixtures().join(b));
                PathBuf::from(p)
            }
            None => fixtures().join(file),
        };
        let got = read_embedding(&path);
        if let Some(err) = want["error"].as_str() {
            let e = got.expect_err(file);
            let msg = e.to_string();
            assert!(msg.contains(err), "{file}: error '{msg}' lacks '{err}'");
            assert!(
                msg.contains(file.as_str()),
                "{file}: error '{msg}' does not name the file"
            );
            continue;
        }
        let got = got.unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(
            got.source_format.to_string(),
            want["format"].as_str().unwrap(),
            "{file}"
        );
        let stem = file.rsplit_once('.').map_or(file.as_str(), |(s, _)| s);
        assert_eq!(
            got.name.as_deref(),
            Some(want["name"].as_str().unwrap_or(stem)),
            "{file}: name (files without one take the stem, as A1111 does)"
        );
        assert_eq!(got.step, want["step"].as_u64(), "{file}");
        assert_eq!(
            got.sd_checkpoint.as_deref(),
            want["sd_checkpoint"].as_str(),
            "{file}"
        );
        assert_eq!(
            got.sd_checkpoint_name.as_deref(),
            want["sd_checkpoint_name"].as_str(),
            "{file}"
        );
        let parts = want["parts"].as_array().unwrap();
        assert_eq!(got.parts.len(), parts.len(), "{file}");
        for (p, w) in got.parts.iter().zip(parts) {
            assert_eq!(
                enc_name(p.encoder),
                w["encoder"].as_str().unwrap(),
                "{file}"
            );
            let shape: Vec<usize> = w["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(vec![p.vectors, p.dim], shape, "{file}");
            let head: Vec<f32> = w["head"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            assert_eq!(
                &p.data[..head.len()],
                head.as_slice(),
                "{file}: first values"
            );
            assert_eq!(
                fnv1a64(&p.data),
                w["fnv1a64"].as_str().unwrap(),
                "{file}: all values, bit-exact"
            );
        }
    }
}

#[test]
fn content_detection_ignores_extensions() {
    for f in [
        "a1111_sd1.pt",
        "sdxl.safetensors",
        "a1111_text.png",
        "learned_embeds.bin",
    ] {
        let bytes = std::fs::read(fixtures().join(f)).unwrap();
        let a = read_embedding_bytes(&bytes, "renamed.dat").unwrap();
        let b = fixture(f);
        assert_eq!(a.parts, b.parts, "{f}");
        assert_eq!(a.source_format, b.source_format, "{f}");
    }
}

fn check_err(file: &str) -> EmbeddingError {
    read_embedding(&fixtures().join(file)).expect_err(file)
}

#[test]
fn checks_give_specific_errors() {
    match check_err("multi_term.pt") {
        EmbeddingError::MultipleTerms { terms, .. } => assert_eq!(terms, vec!["'*'", "'#'"]),
        e => panic!("{e}"),
    }
    assert!(matches!(
        check_err("empty.safetensors"),
        EmbeddingError::Empty { .. }
    ));
    match check_err("nan.safetensors") {
        EmbeddingError::NonFinite { vector, column, .. } => assert_eq!((vector, column), (0, 5)),
        e => panic!("{e}"),
    }
    assert!(matches!(
        check_err("too_many.safetensors"),
        EmbeddingError::TooManyVectors { vectors: 76, .. }
    ));
    match check_err("malicious.pt") {
        EmbeddingError::ForbiddenGlobal { global, .. } => assert_eq!(global, "os.system"),
        e => panic!("{e}"),
    }
    let msg = check_err("malicious.pt").to_string();
    assert!(
        msg.contains("global 'os.system' is not allowed in a learned-embedding file"),
        "{msg}"
    );
}

#[test]
fn family_width_checks() {
    let sd1 = fixture("a1111_sd1.pt");
    let sd2 = fixture("a1111_sd2.pt");
    let xl = fixture("sdxl.safetensors");
    assert!(check_for_family(&sd1, Family::Sd1).is_ok());
    assert!(check_for_family(&sd2, Family::Sd2).is_ok());
    assert!(check_for_family(&xl, Family::Sdxl).is_ok());
    let e = check_for_family(&sd2, Family::Sd1).unwrap_err();
    assert!(matches!(
        e,
        EmbeddingError::WidthMismatch {
            family: Family::Sd1,
            ..
        }
    ));
    assert!(e.to_string().contains("1024"), "{e}");
    assert!(check_for_family(&sd1, Family::Sdxl).is_err());
    assert!(check_for_family(&xl, Family::Sd1).is_err());
    assert_eq!(Family::of(&xl), Some(Family::Sdxl));
}

/// What a writer's output reads back as (kohya and A1111 safetensors are the same bytes).
fn read_back_format(f: Format) -> Format {
    match f {
        Format::KohyaSafetensors => Format::A1111Safetensors,
        f => f,
    }
}

#[test]
fn round_trips_are_exact_for_every_writable_format() {
    let single = fixture("a1111_sd1.pt");
    let xl = fixture("sdxl.safetensors");
    // diffusers-sdxl writes two files: sdxl_embedding_formats_roundtrip covers it.
    for format in Format::ALL
        .into_iter()
        .filter(|f| f.writable() && *f != Format::DiffusersSdxl)
    {
        for precision in [Precision::F32, Precision::F16] {
            let src = match format {
                Format::SdxlSafetensors => &xl,
                _ => &single,
            };
            let bytes = write_embedding_bytes(src, format, precision, "rt")
                .unwrap_or_else(|e| panic!("{format}: {e}"));
            let back = read_embedding_bytes(&bytes, &format!("rt.{}", format.extension()))
                .unwrap_or_else(|e| panic!("{format} {precision:?}: {e}"));
            assert_eq!(back.source_format, read_back_format(format), "{format}");
            assert_eq!(back.parts.len(), src.parts.len());
            for (a, b) in back.parts.iter().zip(&src.parts) {
                assert_eq!((a.encoder, a.vectors, a.dim), (b.encoder, b.vectors, b.dim));
                assert!(
                    a.data == round_to(&b.data, precision),
                    "{format} {precision:?}: values differ"
                );
            }
            if matches!(format, Format::A1111Pt | Format::A1111Png) {
                assert_eq!(back.name, src.name);
                assert_eq!(back.step, src.step);
                assert_eq!(back.sd_checkpoint, src.sd_checkpoint);
                assert_eq!(back.sd_checkpoint_name, src.sd_checkpoint_name);
            }
            if matches!(format, Format::DiffusersSafetensors | Format::DiffusersBin) {
                assert_eq!(back.name, src.name, "diffusers keeps the token");
            }
            // Deterministic output: same input, same bytes.
            assert_eq!(
                bytes,
                write_embedding_bytes(src, format, precision, "rt").unwrap()
            );
        }
    }
    // SDXL through the kohya/OneTrainer layouts that also carry clip_l/clip_g.
    for format in [Format::KohyaPt, Format::OneTrainer] {
        let bytes = write_embedding_bytes(&xl, format, Precision::F32, "xl").unwrap();
        let back = read_embedding_bytes(&bytes, "xl").unwrap();
        assert_eq!(back.parts, xl.parts);
    }
}

#[test]
fn a1111_pt_has_only_the_members_a1111_allows() {
    let emb = fixture("a1111_sd1.pt");
    let bytes = write_embedding_bytes(&emb, Format::A1111Pt, Precision::F32, "my emb!").unwrap();
    let names = zip_member_names(&bytes, "x.pt").unwrap();
    let got: Vec<&str> = names.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        got,
        ["my_emb_/data.pkl", "my_emb_/data/0", "my_emb_/version"]
    );
    assert!(
        names.iter().all(|(_, stored)| *stored),
        "members must be STORED"
    );
}

#[test]
fn writes_are_atomic_and_never_clobber_on_failure() {
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("word.pt");
    std::fs::write(&dst, b"previous contents").unwrap();
    // SDXL cannot be an A1111 .pt: the write fails before touching anything.
    let xl = fixture("sdxl.safetensors");
    assert!(matches!(
        write_embedding(&dst, &xl, Format::A1111Pt, Precision::F32),
        Err(EmbeddingError::Unsupported { .. })
    ));
    // Values that overflow f16 are refused, not written as inf.
    let mut big = fixture("a1111_sd1.pt");
    big.parts[0].data[3] = 1.0e6;
    assert!(matches!(
        write_embedding(&dst, &big, Format::A1111Pt, Precision::F16),
        Err(EmbeddingError::NonFinite { .. })
    ));
    // A read-only layout.
    assert!(write_embedding(&dst, &big, Format::RinongalPt, Precision::F32).is_err());
    assert_eq!(std::fs::read(&dst).unwrap(), b"previous contents");
    let entries: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(entries.len(), 1, "no temp files left behind");
    // A valid write still refuses to replace it unless asked to.
    assert!(matches!(
        write_embedding(&dst, &big, Format::A1111Pt, Precision::F32),
        Err(EmbeddingError::Exists { .. })
    ));
    assert_eq!(std::fs::read(&dst).unwrap(), b"previous contents");
    write_embedding_to(
        &dst,
        &big,
        Format::A1111Pt,
        Precision::F32,
        Existing::Replace,
    )
    .unwrap();
    assert_eq!(read_embedding(&dst).unwrap().parts, big.parts);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn convert_between_layouts() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = [
        ("rinongal.pt", Format::A1111Safetensors),
        ("a1111_pixels.png", Format::A1111Pt),
        ("learned_embeds.bin", Format::DiffusersSafetensors),
        ("kohya.pt", Format::A1111Png),
        ("onetrainer.safetensors", Format::DiffusersBin),
    ];
    for (src, format) in pairs {
        let dst = dir.path().join(format!("out.{}", format.extension()));
        convert(
            &fixtures().join(src),
            &dst,
            format,
            Precision::F32,
            Existing::Replace,
        )
        .unwrap_or_else(|e| panic!("{src}: {e}"));
        assert_eq!(
            read_embedding(&dst).unwrap().parts,
            fixture(src).parts,
            "{src} -> {format}"
        );
    }
}

#[test]
fn format_names_round_trip() {
    for f in Format::ALL {
        assert_eq!(f.to_string().parse::<Format>().unwrap(), f);
    }
    assert_eq!("png".parse::<Format>().unwrap(), Format::A1111Png);
    assert_eq!(
        "diffusers".parse::<Format>().unwrap(),
        Format::DiffusersSafetensors
    );
    assert_eq!(
        "diffusers-sdxl".parse::<Format>().unwrap(),
        Format::DiffusersSdxl
    );
    assert_eq!(
        "Diffusers_SDXL".parse::<Format>().unwrap(),
        Format::DiffusersSdxl
    );
    let e = "ckpt".parse::<Format>().unwrap_err().to_string();
    assert!(
        e.contains("a1111-pt") && e.contains("sdxl") && e.contains("diffusers-sdxl"),
        "{e}"
    );
    // The layouts only an SDXL word fits, and how many files each writes.
    let sdxl_only: Vec<Format> = Format::ALL.into_iter().filter(|f| f.sdxl_only()).collect();
    assert_eq!(sdxl_only, [Format::SdxlSafetensors, Format::DiffusersSdxl]);
    for f in Format::ALL {
        let files = if f == Format::DiffusersSdxl { 2 } else { 1 };
        assert_eq!(f.files(), files, "{f}");
    }
    assert_eq!("fp16".parse::<Precision>().unwrap(), Precision::F16);
}

#[test]
fn inspect_reports_norms_and_nearest_tokens() {
    let emb = fixture("a1111_sd1.pt");
    // A toy vocab whose token 3 is vector 1 scaled, token 0 is vector 0 negated.
    let dim = 768;
    let mut table = vec![0.0f32; 5 * dim];
    for (i, v) in table.iter_mut().enumerate() {
        *v = ((i * 7919) % 13) as f32 - 6.0;
    }
    for c in 0..dim {
        table[3 * dim + c] = emb.parts[0].data[dim + c] * 2.0;
        table[c] = -emb.parts[0].data[c];
    }
    let names = |id: u32| format!("tok{id}</w>");
    let ins = inspect(&emb, Some((&table, dim, &names)), 2);
    assert_eq!(ins.vectors, 2);
    assert_eq!(ins.widths, [768]);
    assert_eq!(ins.family, Some(Family::Sd1));
    let v1 = &ins.parts[0].vectors_detail[1];
    assert_eq!(v1.nearest[0].id, 3);
    assert!((v1.nearest[0].cosine - 1.0).abs() < 1e-5);
    let n0: f32 = emb.parts[0].data[..dim]
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt();
    assert!((ins.parts[0].vectors_detail[0].norm - n0).abs() < 1e-6);
    assert!(
        ins.parts[0].vectors_detail[0]
            .nearest
            .iter()
            .all(|n| n.id != 0),
        "negated copy is farthest"
    );
    let text = ins.to_string();
    assert!(
        text.contains("a1111_sd1") && text.contains("tok3</w>") && text.contains("SD1"),
        "{text}"
    );
    let json = serde_json::to_value(&ins).unwrap();
    assert_eq!(json["source_format"], "a1111-pt");
    assert_eq!(json["checksum"].as_str().unwrap().len(), 4);
    // Without a vocab (or with one of another width) there are no neighbours.
    let xl = fixture("sdxl.safetensors");
    let ins = inspect(&xl, Some((&table, dim, &names)), 2);
    assert_eq!(ins.widths, [768, 1280]);
    assert!(!ins.parts[0].vectors_detail[0].nearest.is_empty());
    assert!(ins.parts[1].vectors_detail[0].nearest.is_empty());
}

#[test]
fn a1111_checksum_matches_python() {
    // A1111 const_hash over vec*100, computed in Python for [[0.5, -1.25, 3.0]]:
    // r=0 -> (0*281 ^ 50*997) -> ...; the value below is from python3.
    let emb = EmbeddingFile {
        name: Some("c".into()),
        step: None,
        sd_checkpoint: None,
        sd_checkpoint_name: None,
        parts: vec![EmbeddingPart {
            encoder: Encoder::Single,
            vectors: 1,
            dim: 3,
            data: vec![0.5, -1.25, 3.0],
        }],
        source_format: Format::A1111Pt,
    };
    let want = {
        let mut r: i128 = 0;
        for v in [50i128, -125, 300] {
            r = ((r * 281) ^ (v * 997)) & 0xFFFF_FFFF;
        }
        format!("{:04x}", r & 0xffff)
    };
    assert_eq!(inspect(&emb, None, 0).checksum, want);
}

// ------------------------------------------------------------------ hostile input

/// A STORED or deflated zip with arbitrary members (test-side, independent of the crate's writer).
fn zip_with(members: &[(&str, &[u8], bool)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut cd = Vec::new();
    for (name, data, deflate) in members {
        let off = out.len() as u32;
        let mut crc = flate2::Crc::new();
        crc.update(data);
        let body = if *deflate {
            let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        } else {
            data.to_vec()
        };
        let method: u16 = if *deflate { 8 } else { 0 };
        let hdr = |sig: u32, central: bool| {
            let mut h = Vec::new();
            h.extend_from_slice(&sig.to_le_bytes());
            if central {
                h.extend_from_slice(&20u16.to_le_bytes());
            }
            h.extend_from_slice(&20u16.to_le_bytes());
            h.extend_from_slice(&0u16.to_le_bytes());
            h.extend_from_slice(&method.to_le_bytes());
            h.extend_from_slice(&0u32.to_le_bytes());
            h.extend_from_slice(&crc.sum().to_le_bytes());
            h.extend_from_slice(&(body.len() as u32).to_le_bytes());
            h.extend_from_slice(&(data.len() as u32).to_le_bytes());
            h.extend_from_slice(&(name.len() as u16).to_le_bytes());
            h.extend_from_slice(&0u16.to_le_bytes());
            if central {
                h.extend_from_slice(&[0u8; 10]);
                h.extend_from_slice(&off.to_le_bytes());
            }
            h.extend_from_slice(name.as_bytes());
            h
        };
        out.extend(hdr(0x0403_4b50, false));
        out.extend_from_slice(&body);
        cd.extend(hdr(0x0201_4b50, true));
    }
    let cd_off = out.len() as u32;
    out.extend_from_slice(&cd);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&(members.len() as u16).to_le_bytes());
    out.extend_from_slice(&(members.len() as u16).to_le_bytes());
    out.extend_from_slice(&(cd.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_off.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

fn torch_zip(pickle: &[u8]) -> Vec<u8> {
    zip_with(&[("a/data.pkl", pickle, false), ("a/version", b"3\n", false)])
}

#[test]
fn forbidden_globals_are_named_never_run() {
    let cases: [(&[u8], &str); 4] = [
        (
            b"\x80\x02cbuiltins\neval\nX\x01\x00\x00\x001\x85R.",
            "builtins.eval",
        ),
        // STACK_GLOBAL (protocol 4) route to the same thing.
        (
            b"\x80\x04\x8c\x08builtins\x8c\x04exec\x93X\x01\x00\x00\x001\x85R.",
            "builtins.exec",
        ),
        (b"\x80\x02csubprocess\nPopen\n.", "subprocess.Popen"),
        (b"\x80\x02ctorch\nload\n.", "torch.load"),
    ];
    for (pkl, global) in cases {
        match read_embedding_bytes(&torch_zip(pkl), "evil.pt") {
            Err(EmbeddingError::ForbiddenGlobal {
                global: g, file, ..
            }) => {
                assert_eq!(g, global);
                assert_eq!(file, "evil.pt");
            }
            other => panic!("{global}: {other:?}"),
        }
    }
    // Opcodes torch never emits (INST, OBJ) are refused outright.
    let e = read_embedding_bytes(&torch_zip(b"\x80\x02(ios\nsystem\n."), "inst.pt").unwrap_err();
    assert!(e.to_string().contains("not used by torch.save"), "{e}");
}

#[test]
fn tensor_offsets_and_strides_are_checked_against_storage() {
    // Storage claims 4 elements; tensor [2, 768] needs 1536.
    let mut pkl = b"\x80\x02}X\x01\x00\x00\x00tctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQK\x00K\x02M\x00\x03\x86M\x00\x03K\x01\x86\x89ccollections\nOrderedDict\n)RtRs.".to_vec();
    let z = zip_with(&[("a/data.pkl", &pkl, false), ("a/data/0", &[0u8; 16], false)]);
    let e = read_embedding_bytes(&z, "short.bin")
        .unwrap_err()
        .to_string();
    assert!(e.contains("reaches element"), "{e}");
    // Storage numel honest (1536) but the record is short.
    let at = pkl.windows(3).position(|w| w == b"K\x04t").unwrap();
    pkl.splice(at..at + 2, *b"M\x00\x06");
    let z = zip_with(&[("a/data.pkl", &pkl, false), ("a/data/0", &[0u8; 16], false)]);
    let e = read_embedding_bytes(&z, "short.bin").unwrap_err();
    assert!(matches!(e, EmbeddingError::Truncated { .. }), "{e}");
    // Missing record.
    let z = zip_with(&[("a/data.pkl", &pkl, false)]);
    assert!(read_embedding_bytes(&z, "norecord.bin")
        .unwrap_err()
        .to_string()
        .contains("missing"));
    // Complete: reads.
    let data = vec![0x3Fu8; 1536 * 4];
    let z = zip_with(&[("a/data.pkl", &pkl, true), ("a/data/0", &data, true)]);
    let emb = read_embedding_bytes(&z, "ok.bin").unwrap();
    assert_eq!((emb.parts[0].vectors, emb.parts[0].dim), (2, 768));
    assert_eq!(emb.source_format, Format::DiffusersBin);
}

#[test]
fn zip_bombs_are_refused() {
    // 1. Lies about its size: inflates past the declared length.
    let big = vec![0u8; 4 << 20];
    let mut z = zip_with(&[("a/data.pkl", &big, true)]);
    // Patch declared uncompressed size (local @22, central @24 after sig) down to 1000.
    let lh = 22;
    z[lh..lh + 4].copy_from_slice(&1000u32.to_le_bytes());
    let cd = z.windows(4).rposition(|w| w == b"PK\x01\x02").unwrap();
    z[cd + 24..cd + 28].copy_from_slice(&1000u32.to_le_bytes());
    let e = read_embedding_bytes(&z, "bomb1.pt")
        .unwrap_err()
        .to_string();
    assert!(e.contains("declared 1000") || e.contains("CRC"), "{e}");

    // 2. Declares an impossible ratio.
    let mut z = zip_with(&[("a/data.pkl", b"tiny", true)]);
    let cd = z.windows(4).rposition(|w| w == b"PK\x01\x02").unwrap();
    z[cd + 24..cd + 28].copy_from_slice(&(3u32 << 30).to_le_bytes());
    let e = read_embedding_bytes(&z, "bomb2.pt")
        .unwrap_err()
        .to_string();
    assert!(e.contains("zip bomb"), "{e}");

    // 3. Plausible ratio but more than the allocation budget (2 x file + 64 MiB).
    let junk = vec![7u8; 100_000];
    let mut z = zip_with(&[("a/data.pkl", &junk, false)]);
    let cd = z.windows(4).rposition(|w| w == b"PK\x01\x02").unwrap();
    z[cd + 10..cd + 12].copy_from_slice(&8u16.to_le_bytes()); // say deflate
    z[cd + 24..cd + 28].copy_from_slice(&(100_000_000u32).to_le_bytes());
    let e = read_embedding_bytes(&z, "bomb3.pt").unwrap_err();
    assert!(matches!(e, EmbeddingError::TooLarge { .. }), "{e}");

    // 4. Too many members.
    let names: Vec<String> = (0..1100).map(|i| format!("a/data/{i}")).collect();
    let members: Vec<(&str, &[u8], bool)> = names
        .iter()
        .map(|n| (n.as_str(), &b""[..], false))
        .collect();
    let e = read_embedding_bytes(&zip_with(&members), "many.pt")
        .unwrap_err()
        .to_string();
    assert!(e.contains("1100 members"), "{e}");

    // 5. Overlapping members (two directory entries, one local record).
    let mut z = zip_with(&[
        ("a/data.pkl", b"0123456789", false),
        ("a/data.pkl", b"0123456789", false),
    ]);
    let cd2 = z.windows(4).rposition(|w| w == b"PK\x01\x02").unwrap();
    z[cd2 + 42..cd2 + 46].copy_from_slice(&0u32.to_le_bytes());
    assert!(read_embedding_bytes(&z, "overlap.pt").is_err());
}

#[test]
fn truncated_and_corrupt_files_fail_cleanly() {
    let exp = expected();
    let mut files = Vec::new();
    for (file, want) in exp["fixtures"].as_object().unwrap() {
        if !want["error"].is_null() || file.contains('+') {
            continue; // `FIRST+SECOND` names the files of a folder entry
        }
        if fixtures().join(file).is_dir() {
            // A diffusers SDXL pair: each half is one file.
            for half in ["learned_embeds.safetensors", "learned_embeds_2.safetensors"] {
                files.push(format!("{file}/{half}"));
            }
        } else {
            files.push(file.clone());
        }
    }
    for file in &files {
        let bytes = std::fs::read(fixtures().join(file)).unwrap();
        for cut in [
            0,
            1,
            7,
            9,
            30,
            bytes.len() / 3,
            bytes.len() / 2,
            bytes.len() - 13,
            bytes.len() - 1,
        ] {
            let r = read_embedding_bytes(&bytes[..cut.min(bytes.len())], file);
            let e = match r {
                Err(e) => e,
                // A PNG cut after its text chunk still holds the whole embedding.
                Ok(_) if file.ends_with(".png") => continue,
                Ok(_) => panic!("{file} cut at {cut} read fine"),
            };
            assert!(
                e.to_string().starts_with(file.as_str()),
                "{file}@{cut}: {e}"
            );
        }
    }
    // Oversized files are refused before reading.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("huge.safetensors");
    std::fs::File::create(&p)
        .unwrap()
        .set_len(65 << 20)
        .unwrap();
    assert!(matches!(
        read_embedding(&p),
        Err(EmbeddingError::TooLarge { .. })
    ));
    // Random bytes.
    let e = read_embedding_bytes(b"GIF89a....", "x.pt").unwrap_err();
    assert!(matches!(e, EmbeddingError::UnknownFormat { .. }));
}

/// Cheap deterministic mutation fuzzing over every fixture (the cargo-fuzz
/// targets in fuzz/ do the same with coverage guidance). The default run is
/// short; `SDTI_FUZZ_ITERS=200000 cargo test --release -- --ignored fuzz` runs long.
fn mutation_loop(iters: usize) {
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut seeds = Vec::new();
    for e in std::fs::read_dir(fixtures()).unwrap().flatten() {
        if e.path().is_file() && e.path().extension().is_some_and(|x| x != "json") {
            seeds.push(std::fs::read(e.path()).unwrap());
        }
    }
    for i in 0..iters {
        let mut b = seeds[i % seeds.len()].clone();
        for _ in 0..1 + next() % 8 {
            let n = b.len().max(1);
            match next() % 5 {
                0 if !b.is_empty() => {
                    let at = (next() as usize) % n;
                    b[at] = next() as u8;
                }
                1 if !b.is_empty() => {
                    let at = (next() as usize) % n;
                    b[at] ^= 1 << (next() % 8);
                }
                2 => b.truncate((next() as usize) % n),
                3 if b.len() > 4 => {
                    let at = (next() as usize) % (n - 4);
                    b[at..at + 4].copy_from_slice(&(next() as u32).to_le_bytes());
                }
                _ => {
                    let at = (next() as usize) % n;
                    b.insert(at.min(b.len()), next() as u8);
                }
            }
        }
        let (_, used, limit) = fuzzing::read_with_budget(&b);
        assert!(used <= limit);
        let _ = read_embedding_bytes(&b, "fuzz");
        let _ = fuzzing::pickle(&b);
        let _ = fuzzing::zip(&b);
    }
}

#[test]
fn mutation_fuzz_smoke() {
    mutation_loop(3000);
}

#[test]
#[ignore]
fn mutation_fuzz_long() {
    let n = std::env::var("SDTI_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    mutation_loop(n);
}

// ------------------------------------------------------------------ Python cross-check

/// The files the Python script loads back with torch/diffusers/A1111 logic.
fn reference_outputs() -> Vec<(String, &'static str, Format, Precision)> {
    let mut v = Vec::new();
    let single = [
        (Format::A1111Pt, Precision::F32),
        (Format::A1111Pt, Precision::F16),
        (Format::A1111Safetensors, Precision::F32),
        (Format::A1111Safetensors, Precision::F16),
        (Format::DiffusersSafetensors, Precision::F32),
        (Format::DiffusersBin, Precision::F32),
        (Format::DiffusersBin, Precision::F16),
        (Format::KohyaPt, Precision::F16),
        (Format::KohyaSafetensors, Precision::F16),
    ];
    for (f, p) in single {
        let name = format!(
            "sd1_{}_{}.{}",
            f.name().replace('-', "_"),
            if p == Precision::F32 { "f32" } else { "f16" },
            f.extension()
        );
        v.push((name, "a1111_sd1.pt", f, p));
    }
    v.push((
        "png_text_f32.png".to_string(),
        "a1111_text.png",
        Format::A1111Png,
        Precision::F32,
    ));
    v.push((
        "sdxl_f16.safetensors".to_string(),
        "sdxl.safetensors",
        Format::SdxlSafetensors,
        Precision::F16,
    ));
    v.push((
        "sdxl_f32.safetensors".to_string(),
        "sdxl.safetensors",
        Format::SdxlSafetensors,
        Precision::F32,
    ));
    // The other SDXL layouts, loaded by diffusers' own load_textual_inversion in the script.
    v.push((
        "sdxl_kohya_pt_f16.pt".to_string(),
        "sdxl.safetensors",
        Format::KohyaPt,
        Precision::F16,
    ));
    v.push((
        "sdxl_onetrainer_f16.safetensors".to_string(),
        "sdxl.safetensors",
        Format::OneTrainer,
        Precision::F16,
    ));
    // Also writes sdxl_diffusers_sdxl_f16_2.safetensors.
    v.push((
        "sdxl_diffusers_sdxl_f16.safetensors".to_string(),
        "sdxl.safetensors",
        Format::DiffusersSdxl,
        Precision::F16,
    ));
    v
}

/// The word a reference output is written from: the fixture, and for the diffusers pair a
/// placeholder token as diffusers' example names it (the token is the key in both files).
fn reference_source(src: &str, format: Format) -> EmbeddingFile {
    let mut emb = fixture(src);
    if format == Format::DiffusersSdxl {
        emb.name = Some("<sdxl-word>".to_string());
    }
    emb
}

#[test]
#[ignore = "regenerates committed fixtures; run with SDTI_WRITE_REFERENCE=1"]
fn write_reference_outputs() {
    if std::env::var("SDTI_WRITE_REFERENCE").is_err() {
        return;
    }
    let dir = fixtures().join("written_by_sdti");
    std::fs::create_dir_all(&dir).unwrap();
    let mut manifest = serde_json::Map::new();
    for (name, src, format, precision) in reference_outputs() {
        let emb = reference_source(src, format);
        let path = dir.join(&name);
        write_embedding_to(&path, &emb, format, precision, Existing::Replace).unwrap();
        let mut entry = serde_json::json!({
            "format": format.name(),
            "precision": if precision == Precision::F32 { "f32" } else { "f16" },
            "source": src,
            "name": emb.name, "step": emb.step,
            "sd_checkpoint": emb.sd_checkpoint, "sd_checkpoint_name": emb.sd_checkpoint_name,
            "parts": emb.parts.iter().map(|p| serde_json::json!({"encoder": enc_name(p.encoder)})).collect::<Vec<_>>(),
        });
        if format == Format::DiffusersSdxl {
            let second = diffusers_sdxl_second_path(&path).unwrap();
            entry["second"] = Value::from(second.file_name().unwrap().to_str().unwrap());
        }
        manifest.insert(name, entry);
    }
    let text = serde_json::to_string_pretty(&Value::Object(manifest)).unwrap();
    std::fs::write(dir.join("manifest.json"), text + "\n").unwrap();
}

#[test]
fn committed_sdti_outputs_match_the_writer_and_passed_python() {
    let dir = fixtures().join("written_by_sdti");
    let results: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("python_load_results.json"))
            .expect("python_load_results.json"),
    )
    .unwrap();
    for (name, src, format, precision) in reference_outputs() {
        // The committed file is what today's writer produces from the same input
        // (apart from A1111 .pt archive names, which follow the file stem).
        let committed = std::fs::read(dir.join(&name)).unwrap_or_else(|_| panic!("{name} missing"));
        let stem = name.rsplit_once('.').unwrap().0;
        let emb = reference_source(src, format);
        let now = if format == Format::DiffusersSdxl {
            let (first, second) = write_embedding_pair_bytes(&emb, precision, stem).unwrap();
            let second_name = format!("{stem}_2.safetensors");
            let committed_second = std::fs::read(dir.join(&second_name))
                .unwrap_or_else(|_| panic!("{second_name} missing"));
            assert!(
                committed_second == second,
                "{second_name}: writer output changed; rerun write_reference_outputs + the python script"
            );
            first
        } else {
            write_embedding_bytes(&emb, format, precision, stem).unwrap()
        };
        assert!(
            committed == now,
            "{name}: writer output changed; rerun write_reference_outputs + the python script"
        );
        let r = &results["files"][&name];
        assert_eq!(
            r["ok"],
            Value::Bool(true),
            "{name}: python load failed: {r}"
        );
        // SDXL words went through diffusers' own load_textual_inversion, both encoders.
        let loaded_by_diffusers = match format {
            Format::DiffusersSdxl => Some("diffusers_load_textual_inversion_pair"),
            _ if name.starts_with("sdxl_") => Some("diffusers_load_textual_inversion_sdxl"),
            _ => None,
        };
        if let Some(check) = loaded_by_diffusers {
            assert!(
                r["checks"][check].is_object(),
                "{name}: no '{check}' result: {r}"
            );
        }
    }
}

/// Rebuild a PNG with its `sd-ti-embedding` tEXt chunk re-encoded as `kind`.
fn rechunk(png: &[u8], kind: &[u8; 4]) -> Vec<u8> {
    let mut out = png[..8].to_vec();
    let mut pos = 8;
    while pos + 8 <= png.len() {
        let len = u32::from_be_bytes(png[pos..pos + 4].try_into().unwrap()) as usize;
        let typ = &png[pos + 4..pos + 8];
        let data = &png[pos + 8..pos + 8 + len];
        let (typ, data): (&[u8], Vec<u8>) = if typ == b"tEXt" {
            let text = &data[b"sd-ti-embedding\0".len()..];
            let mut d = b"sd-ti-embedding\0".to_vec();
            match kind {
                b"zTXt" => {
                    d.push(0);
                    let mut e =
                        flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
                    e.write_all(text).unwrap();
                    d.extend(e.finish().unwrap());
                }
                _ => {
                    d.extend_from_slice(&[0, 0, 0, 0]); // uncompressed, method, empty lang, empty translation
                    d.extend_from_slice(text);
                }
            }
            (kind, d)
        } else {
            (typ, data.to_vec())
        };
        let mut crc = flate2::Crc::new();
        crc.update(typ);
        crc.update(&data);
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(typ);
        out.extend_from_slice(&data);
        out.extend_from_slice(&crc.sum().to_be_bytes());
        pos += 12 + len;
    }
    out
}

#[test]
fn png_text_chunk_variants_read_the_same() {
    let emb = fixture("a1111_text.png");
    let bytes = std::fs::read(fixtures().join("a1111_text.png")).unwrap();
    for kind in [b"zTXt", b"iTXt"] {
        let got = read_embedding_bytes(&rechunk(&bytes, kind), "v.png").unwrap();
        assert_eq!(got.parts, emb.parts, "{}", String::from_utf8_lossy(kind));
        assert_eq!(got.step, emb.step);
    }
}

#[test]
fn cut_safetensors_header_says_truncated() {
    let bytes = std::fs::read(fixtures().join("a1111.safetensors")).unwrap();
    let e = read_embedding_bytes(&bytes[..40], "cut.safetensors").unwrap_err();
    assert!(matches!(e, EmbeddingError::Truncated { .. }), "{e}");
}

// ------------------------------------------------------------------ PNG CRCs, WebP (issue 10)

/// `(type, offset of the length field, data length)` of every chunk up to IEND.
fn png_chunk_spans(bytes: &[u8]) -> Vec<([u8; 4], usize, usize)> {
    let mut out = Vec::new();
    let mut pos = 8;
    while pos + 12 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        let kind: [u8; 4] = bytes[pos + 4..pos + 8].try_into().unwrap();
        out.push((kind, pos, len));
        pos += 12 + len;
        if &kind == b"IEND" {
            break;
        }
    }
    out
}

#[test]
fn png_changed_byte_is_refused_naming_the_chunk() {
    for (file, flips) in [
        // (chunk type, where inside it: data byte n, or the CRC)
        (
            "a1111_text.png",
            &[
                ("tEXt", Some(40)),
                ("IDAT", Some(10)),
                ("IHDR", Some(3)),
                ("tEXt", None),
            ][..],
        ),
        (
            "a1111_pixels.png",
            &[
                ("IDAT", Some(100)),
                ("IHDR", Some(0)),
                ("IDAT", None),
                ("IEND", None),
            ][..],
        ),
    ] {
        let bytes = std::fs::read(fixtures().join(file)).unwrap();
        let good = read_embedding_bytes(&bytes, file).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(good, fixture(file));
        let spans = png_chunk_spans(&bytes);
        for &(kind, at) in flips {
            let (index, &(_, pos, len)) = spans
                .iter()
                .enumerate()
                .find(|(_, (k, _, _))| k == kind.as_bytes())
                .unwrap_or_else(|| panic!("{file} has no {kind}"));
            let byte = match at {
                Some(n) => pos + 8 + n,
                None => pos + 8 + len + 2,
            };
            let mut bad = bytes.clone();
            bad[byte] ^= 0x01;
            let e = read_embedding_bytes(&bad, file).expect_err(&format!("{file} {kind} {at:?}"));
            let msg = e.to_string();
            let chunk = format!("PNG chunk {index} ({kind} at byte {pos})");
            assert!(
                msg.starts_with(&format!("{file}: {chunk}: CRC-32 mismatch")),
                "{file}, {kind} byte {byte}: {msg}"
            );
            // The fuzzing helper repairs the CRCs: a flipped CRC byte reads as before, a
            // flipped data byte now gets past the checksum to the decoders.
            let fixed = fuzzing::png_with_fixed_crcs(&bad);
            let r = read_embedding_bytes(&fixed, file);
            if at.is_none() {
                assert_eq!(r.unwrap(), good, "{file}: repaired {kind} CRC");
            } else if let Err(e) = r {
                assert!(!e.to_string().contains("CRC-32"), "{file}: {e}");
            }
        }
    }
}

#[test]
fn png_missing_iend_is_truncated() {
    let bytes = std::fs::read(fixtures().join("a1111_text.png")).unwrap();
    let e = read_embedding_bytes(&bytes[..bytes.len() - 12], "cut.png").unwrap_err();
    assert!(matches!(e, EmbeddingError::Truncated { .. }), "{e}");
    assert!(e.to_string().contains("no IEND"), "{e}");
}

#[test]
fn webp_pixel_embedding_reads_like_the_png() {
    let png = fixture("a1111_pixels.png");
    for file in ["a1111_pixels.webp", "a1111_pixels_rgba.webp"] {
        let got = fixture(file);
        assert_eq!(got.source_format, Format::A1111WebpPixels, "{file}");
        assert_eq!(got.parts, png.parts, "{file}: vectors");
        assert_eq!(got.name.as_deref(), Some("pixembed"), "{file}");
        assert_eq!(
            (got.name.clone(), got.step, got.sd_checkpoint.clone()),
            (png.name.clone(), png.step, png.sd_checkpoint.clone()),
            "{file}"
        );
        assert_eq!(got.sd_checkpoint_name, png.sd_checkpoint_name, "{file}");
        assert_eq!(
            inspect(&got, None, 0).source_format,
            Format::A1111WebpPixels
        );
    }
    let f = Format::A1111WebpPixels;
    assert_eq!(f.to_string(), "webp-pixels");
    assert_eq!("webp-pixels".parse::<Format>().unwrap(), f);
    assert_eq!(f.extension(), "webp");
    assert!(!f.writable());
    let e = write_embedding_bytes(&png, f, Precision::F32, "x").unwrap_err();
    assert!(matches!(e, EmbeddingError::Unsupported { .. }), "{e}");
}

#[test]
fn webp_written_here_losslessly_reads_and_plain_pictures_are_named() {
    let px = image::load_from_memory(&std::fs::read(fixtures().join("a1111_pixels.png")).unwrap())
        .unwrap()
        .to_rgb8();
    let encode = |img: &image::RgbImage| {
        let mut out = Vec::new();
        image::codecs::webp::WebPEncoder::new_lossless(&mut out)
            .encode(
                img,
                img.width(),
                img.height(),
                image::ExtendedColorType::Rgb8,
            )
            .unwrap();
        out
    };
    let got = read_embedding_bytes(&encode(&px), "mine.webp").unwrap();
    assert_eq!(got.parts, fixture("a1111_pixels.png").parts);
    let grey = image::RgbImage::from_pixel(40, 30, image::Rgb([90, 90, 90]));
    let e = read_embedding_bytes(&encode(&grey), "plain.webp").unwrap_err();
    assert!(matches!(e, EmbeddingError::UnknownFormat { .. }), "{e}");
    assert!(
        e.to_string()
            .starts_with("plain.webp: unrecognised learned-embedding file: a WebP without"),
        "{e}"
    );
}

#[test]
fn lossy_webp_is_refused_with_the_reason() {
    let e = read_embedding(&fixtures().join("a1111_pixels_lossy.webp")).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.starts_with("a1111_pixels_lossy.webp: WebP pixel-embedded data: a lossy WebP"),
        "{msg}"
    );
    assert!(msg.contains("lossless WebP"), "{msg}");
}

#[test]
fn webp_dimensions_over_the_budget_are_refused_before_decoding() {
    // A VP8L header declaring 16383 x 16383 (1.8 GB to decode) in a 40-byte file.
    // (image-webp 0.2.4 reads a declared 16384 as 0, so stay one below.)
    let mut vp8l = vec![0x2f];
    vp8l.extend_from_slice(&(0x3FFE_u32 | 0x3FFE << 14).to_le_bytes());
    vp8l.extend_from_slice(&[0u8; 15]);
    let mut webp = b"RIFF".to_vec();
    webp.extend_from_slice(&(4 + 8 + vp8l.len() as u32).to_le_bytes());
    webp.extend_from_slice(b"WEBPVP8L");
    webp.extend_from_slice(&(vp8l.len() as u32).to_le_bytes());
    webp.extend_from_slice(&vp8l);
    let e = read_embedding_bytes(&webp, "huge.webp").unwrap_err();
    assert!(matches!(e, EmbeddingError::TooLarge { .. }), "{e}");
    assert!(e.to_string().starts_with("huge.webp: WebP pixels:"), "{e}");
    let (r, used, limit) = fuzzing::read_with_budget(&webp);
    assert!(
        r.is_err() && used <= limit && used < 1 << 20,
        "{used} of {limit}"
    );
}

#[test]
fn jpeg_xl_and_avif_say_what_to_convert_to() {
    let mut avif = b"\0\0\0\x20ftypavif".to_vec();
    avif.extend_from_slice(&[0u8; 24]);
    for (bytes, file, what) in [
        (&b"\xff\x0a\xfa\x7f\x00\x00"[..], "w.jxl", "JPEG XL"),
        (
            &b"\0\0\0\x0cJXL \r\n\x87\n\0\0\0\x14ftypjxl "[..],
            "w.jxl",
            "JPEG XL",
        ),
        (&avif[..], "w.avif", "AVIF"),
    ] {
        let e = read_embedding_bytes(bytes, file).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("{file}: unrecognised learned-embedding file: a"))
                && msg.contains(what)
                && msg.contains("convert it")
                && msg.contains("PNG"),
            "{msg}"
        );
    }
}

/// The kept fuzz corpora (fuzz/corpus/<target>, minimised; fuzz/run.sh rebuilds and
/// extends them) replayed through the same entry points and checks as each fuzz target
/// (fuzz/fuzz_targets/<target>.rs): no panic, and the allocation budget holds.
#[test]
fn fuzz_corpora_replay_without_panics() {
    let root = std::env::var_os("SDTI_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("fuzz/corpus");
    let budget = |bytes: &[u8], what: &str| {
        let (_, used, limit) = fuzzing::read_with_budget(bytes);
        assert!(used <= limit, "{what}: used {used} of {limit}");
    };
    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n";
    let mut replayed = 0;
    for target in ["pickle_zip", "safetensors", "png", "any"] {
        let dir = root.join(target);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{}: empty", dir.display());
        for path in files {
            let data = std::fs::read(&path).unwrap();
            let what = path.display().to_string();
            match target {
                "pickle_zip" => {
                    let _ = fuzzing::pickle(&data);
                    let _ = fuzzing::zip(&data);
                    budget(&data, &what);
                    let mut pt = b"PK\x03\x04".to_vec();
                    pt.extend_from_slice(&data);
                    let _ = read_embedding_bytes(&pt, "fuzz.pt");
                }
                "safetensors" => {
                    let _ = read_embedding_bytes(&data, "fuzz.safetensors");
                    budget(&data, &what);
                }
                "png" => {
                    let mut png = PNG.to_vec();
                    png.extend_from_slice(data.strip_prefix(PNG).unwrap_or(&data));
                    let _ = read_embedding_bytes(&png, "fuzz.png");
                    let fixed = fuzzing::png_with_fixed_crcs(&png);
                    let _ = read_embedding_bytes(&fixed, "fuzz.png");
                    budget(&fixed, &what);
                }
                _ => {
                    let _ = read_embedding_bytes(&data, "fuzz");
                    budget(&data, &what);
                    if data.starts_with(PNG) {
                        let _ = read_embedding_bytes(&fuzzing::png_with_fixed_crcs(&data), "fuzz");
                    }
                }
            }
            replayed += 1;
        }
    }
    assert!(replayed > 0);
}

// ------------------------------------------------------------------ SDXL and SD 2.x files

/// `FIRST+SECOND`, as `--embedding word=FIRST+SECOND` and the C ABI take a diffusers pair.
fn plus(first: &Path, second: &Path) -> PathBuf {
    let mut p = first.as_os_str().to_owned();
    p.push("+");
    p.push(second);
    PathBuf::from(p)
}

/// Reads what `write_embedding_to` wrote at `path` in `format` (a pair through `FIRST+SECOND`).
fn read_written(path: &Path, format: Format) -> EmbeddingFile {
    let r = match format {
        Format::DiffusersSdxl => {
            read_embedding(&plus(path, &diffusers_sdxl_second_path(path).unwrap()))
        }
        _ => read_embedding(path),
    };
    r.unwrap_or_else(|e| panic!("{format}: {e}"))
}

const SDXL_LAYOUTS: [Format; 4] = [
    Format::SdxlSafetensors,
    Format::KohyaPt,
    Format::OneTrainer,
    Format::DiffusersSdxl,
];

/// What an SDXL word written as `f` reads back as (OneTrainer's clip_l/clip_g safetensors is
/// the sdxl layout byte for byte, apart from the key order).
fn sdxl_read_back_format(f: Format) -> Format {
    match f {
        Format::OneTrainer => Format::SdxlSafetensors,
        f => f,
    }
}

#[test]
fn sdxl_embedding_formats_roundtrip() {
    let dir = tempfile::tempdir().unwrap();
    // Every SDXL file the reference tools wrote, through every SDXL layout and back.
    let sources = [
        "sdxl.safetensors",
        "kohya_sdxl.pt",
        "onetrainer_sdxl.safetensors",
        "diffusers_sdxl",
    ];
    for src in sources {
        let emb = fixture(src);
        assert_eq!(Family::of(&emb), Some(Family::Sdxl), "{src}");
        for format in SDXL_LAYOUTS {
            for precision in [Precision::F32, Precision::F16] {
                let path = dir.path().join(format!(
                    "{}-{}-{precision:?}.{}",
                    src.replace('.', "_"),
                    format.name(),
                    format.extension()
                ));
                write_embedding(&path, &emb, format, precision)
                    .unwrap_or_else(|e| panic!("{src} -> {format}: {e}"));
                let back = read_written(&path, format);
                assert_eq!(back.source_format, sdxl_read_back_format(format));
                assert_eq!(back.parts.len(), 2, "{src} -> {format}");
                for (a, b) in back.parts.iter().zip(&emb.parts) {
                    assert_eq!((a.encoder, a.vectors, a.dim), (b.encoder, b.vectors, b.dim));
                    assert!(
                        a.data == round_to(&b.data, precision),
                        "{src} -> {format} {precision:?}: {} values differ",
                        a.encoder
                    );
                }
                if format == Format::DiffusersSdxl {
                    assert_eq!(back.name, emb.name, "the pair keeps the token");
                }
            }
        }
    }
}

#[test]
fn onetrainer_output_vectors_are_not_read_as_input_vectors() {
    // The fixture holds clip_l, clip_g, clip_l_out and clip_g_out (different values).
    let emb = fixture("onetrainer_sdxl.safetensors");
    let encoders: Vec<Encoder> = emb.parts.iter().map(|p| p.encoder).collect();
    assert_eq!(encoders, [Encoder::ClipL, Encoder::ClipG]);
    let exp = expected();
    let want = &exp["fixtures"]["onetrainer_sdxl.safetensors"]["parts"];
    for (p, w) in emb.parts.iter().zip(want.as_array().unwrap()) {
        assert_eq!(fnv1a64(&p.data), w["fnv1a64"].as_str().unwrap());
    }
    // A third input tensor beside clip_l/clip_g is still refused.
    let bytes = safetensors_file(&[("clip_l", 1, 768), ("clip_g", 1, 1280), ("extra", 1, 768)]);
    match read_embedding_bytes(&bytes, "three.safetensors") {
        Err(EmbeddingError::MultipleTerms { terms, .. }) => {
            assert!(terms.contains(&"extra".to_string()), "{terms:?}")
        }
        other => panic!("{other:?}"),
    }
}

/// A safetensors file of f32 tensors `(key, rows, width)` with small distinct values.
fn safetensors_file(tensors: &[(&str, usize, usize)]) -> Vec<u8> {
    use safetensors::tensor::{Dtype, TensorView};
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .enumerate()
        .map(|(t, (_, n, d))| {
            (0..n * d)
                .flat_map(|i| (((i % 97) as f32 - 48.0) * 1e-3 + t as f32 * 1e-4).to_le_bytes())
                .collect()
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&data)
        .map(|((k, n, d), bytes)| {
            (
                k.to_string(),
                TensorView::new(Dtype::F32, vec![*n, *d], bytes).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

#[test]
fn two_part_files_with_different_row_counts_are_refused_naming_both_counts() {
    // Written by torch (sdxl safetensors, kohya .pt) and by hand (OneTrainer with *_out).
    for (file, counts) in [
        (
            "sdxl_rows_differ.safetensors",
            "clip_l has 1 vector but clip_g has 2",
        ),
        (
            "kohya_sdxl_rows_differ.pt",
            "clip_l has 3 vectors but clip_g has 1",
        ),
    ] {
        let msg = check_err(file).to_string();
        assert!(msg.contains(file) && msg.contains(counts), "{msg}");
    }
    let bytes = safetensors_file(&[
        ("clip_l", 2, 768),
        ("clip_g", 3, 1280),
        ("clip_l_out", 2, 768),
        ("clip_g_out", 2, 1280),
    ]);
    let msg = read_embedding_bytes(&bytes, "ot.safetensors")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("ot.safetensors") && msg.contains("clip_l has 2 vectors but clip_g has 3"),
        "{msg}"
    );
    // diffusers itself loads such a word without a word (the script records it).
    let results: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("python_load_results.json")).unwrap(),
    )
    .unwrap();
    let seen = results["diffusers_loads_rows_differ"]
        .as_str()
        .unwrap_or("");
    assert!(seen.starts_with("loaded silently"), "{seen}");
}

/// Writes one diffusers half `{token: [n, dim]}` at `path`.
fn write_half(path: &Path, token: &str, n: usize, dim: usize) {
    let emb = EmbeddingFile {
        name: Some(token.to_string()),
        step: None,
        sd_checkpoint: None,
        sd_checkpoint_name: None,
        parts: vec![EmbeddingPart {
            encoder: Encoder::Single,
            vectors: n,
            dim,
            data: (0..n * dim).map(|i| (i % 13) as f32 * 1e-3).collect(),
        }],
        source_format: Format::DiffusersSafetensors,
    };
    write_embedding(path, &emb, Format::DiffusersSafetensors, Precision::F32).unwrap();
}

#[test]
fn diffusers_pair_reads_from_both_files_or_their_folder() {
    let folder = fixtures().join("diffusers_sdxl");
    let first = folder.join("learned_embeds.safetensors");
    let second = folder.join("learned_embeds_2.safetensors");
    let by_folder = read_embedding(&folder).unwrap();
    let by_plus = read_embedding(&plus(&first, &second)).unwrap();
    let by_fn = read_embedding_pair(&first, &second).unwrap();
    assert_eq!(by_folder, by_plus);
    assert_eq!(by_folder, by_fn);
    assert_eq!(by_folder.source_format, Format::DiffusersSdxl);
    assert_eq!(by_folder.name.as_deref(), Some("<cat-toy>"));
    assert!(check_for_family(&by_folder, Family::Sdxl).is_ok());
    // Each half alone is an ordinary one-encoder diffusers file.
    let half = read_embedding(&first).unwrap();
    assert_eq!(half.source_format, Format::DiffusersSafetensors);
    assert_eq!(half.parts[0].data, by_folder.parts[0].data);
    // inspect names the layout as convert takes it.
    let report = inspect(&by_folder, None, 0);
    assert_eq!(report.source_format, Format::DiffusersSdxl);
    assert_eq!(report.widths, [768, 1280]);
    assert_eq!(report.family, Some(Family::Sdxl));
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["source_format"], "diffusers-sdxl");
    // A folder without the pair is still not an embedding; with one half, the other is named.
    assert!(read_embedding(&fixtures()).is_err());
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(&first, dir.path().join("learned_embeds.safetensors")).unwrap();
    let msg = read_embedding(dir.path()).unwrap_err().to_string();
    assert!(
        msg.contains("learned_embeds_2.safetensors") && msg.contains("second (clip_g"),
        "{msg}"
    );
}

#[test]
fn diffusers_pair_mistakes_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let l = d.join("learned_embeds.safetensors");
    let g = d.join("learned_embeds_2.safetensors");
    write_half(&l, "<w>", 2, 768);
    write_half(&g, "<w>", 2, 1280);
    assert!(read_embedding(&plus(&l, &g)).is_ok());
    let err = |first: &Path, second: &Path| match read_embedding(&plus(first, second)) {
        Ok(_) => panic!("{} + {} read", first.display(), second.display()),
        Err(e) => e.to_string(),
    };
    // Swapped: G first.
    let msg = err(&g, &l);
    assert!(
        msg.contains("swapped")
            && msg.contains("learned_embeds_2.safetensors + learned_embeds.safetensors"),
        "{msg}"
    );
    // One file missing, either one: the message names it and which half it is.
    let missing = d.join("nothing_2.safetensors");
    let msg = err(&l, &missing);
    assert!(
        msg.contains("nothing_2.safetensors") && msg.contains("second (clip_g"),
        "{msg}"
    );
    let msg = err(&d.join("nothing.safetensors"), &g);
    assert!(
        msg.contains("nothing.safetensors") && msg.contains("first (clip_l"),
        "{msg}"
    );
    // Different numbers of vectors: both files, both counts.
    let g3 = d.join("three_2.safetensors");
    write_half(&g3, "<w>", 3, 1280);
    let msg = err(&l, &g3);
    assert!(
        msg.contains("learned_embeds.safetensors has 2 vectors (clip_l)")
            && msg.contains("three_2.safetensors has 3 (clip_g)"),
        "{msg}"
    );
    // Two words.
    let other = d.join("other_2.safetensors");
    write_half(&other, "<v>", 2, 1280);
    let msg = err(&l, &other);
    assert!(
        msg.contains("'<w>'") && msg.contains("'<v>'") && msg.contains("one word"),
        "{msg}"
    );
    // A half that already holds both encoders.
    let msg = err(&fixtures().join("sdxl.safetensors"), &g);
    assert!(
        msg.contains("sdxl.safetensors") && msg.contains("holds clip_l and clip_g already"),
        "{msg}"
    );
    // A path with a `+` that names a file is that file.
    let literal = d.join("a+b.safetensors");
    std::fs::copy(fixtures().join("a1111.safetensors"), &literal).unwrap();
    assert_eq!(
        read_embedding(&literal).unwrap().parts,
        fixture("a1111.safetensors").parts
    );
}

#[test]
fn diffusers_pair_is_written_whole_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let xl = fixture("sdxl.safetensors");
    let first = d.join("learned_embeds.safetensors");
    let second = d.join("learned_embeds_2.safetensors");
    assert_eq!(diffusers_sdxl_second_path(&first).unwrap(), second);
    let listing = || {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };

    // Not a .safetensors path, an SD 1.x word, the bytes API: refused, nothing written.
    for bad in ["word.pt", "word"] {
        let e =
            write_embedding(&d.join(bad), &xl, Format::DiffusersSdxl, Precision::F32).unwrap_err();
        assert!(e.to_string().contains(".safetensors"), "{e}");
    }
    let e = write_embedding(
        &first,
        &fixture("a1111_sd1.pt"),
        Format::DiffusersSdxl,
        Precision::F32,
    )
    .unwrap_err();
    assert!(matches!(e, EmbeddingError::Unsupported { .. }), "{e}");
    let e = write_embedding_bytes(&xl, Format::DiffusersSdxl, Precision::F32, "x").unwrap_err();
    assert!(e.to_string().contains("two files"), "{e}");
    assert!(listing().is_empty(), "{:?}", listing());

    // The second path taken: refused, and the first is not written either.
    std::fs::write(&second, b"theirs").unwrap();
    let e = write_embedding(&first, &xl, Format::DiffusersSdxl, Precision::F32).unwrap_err();
    assert!(matches!(e, EmbeddingError::Exists { .. }), "{e}");
    assert!(
        e.to_string().contains("learned_embeds_2.safetensors"),
        "{e}"
    );
    assert_eq!(listing(), ["learned_embeds_2.safetensors"]);
    assert_eq!(std::fs::read(&second).unwrap(), b"theirs");
    std::fs::remove_file(&second).unwrap();

    // The first path taken (a dangling symlink counts): refused, the second not written.
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(d.join("nowhere"), &first).unwrap();
        let e = write_embedding(&first, &xl, Format::DiffusersSdxl, Precision::F32).unwrap_err();
        assert!(matches!(e, EmbeddingError::Exists { .. }), "{e}");
        assert_eq!(listing(), ["learned_embeds.safetensors"]);
        std::fs::remove_file(&first).unwrap();
    }

    // Written: both files, diffusers' names, the token in both.
    write_embedding(&first, &xl, Format::DiffusersSdxl, Precision::F32).unwrap();
    assert_eq!(
        listing(),
        ["learned_embeds.safetensors", "learned_embeds_2.safetensors"]
    );
    assert_eq!(read_embedding(d).unwrap().parts, xl.parts);
    let halves = [
        read_embedding(&first).unwrap(),
        read_embedding(&second).unwrap(),
    ];
    for (half, want) in halves.iter().zip(&xl.parts) {
        assert_eq!(half.name, xl.name);
        assert_eq!(half.parts[0].data, want.data);
    }
    // Again: refused; replaced when asked.
    let e = write_embedding(&first, &xl, Format::DiffusersSdxl, Precision::F32).unwrap_err();
    assert!(matches!(e, EmbeddingError::Exists { .. }), "{e}");
    let mut renamed = xl.clone();
    renamed.name = Some("<new>".to_string());
    write_embedding_to(
        &first,
        &renamed,
        Format::DiffusersSdxl,
        Precision::F16,
        Existing::Replace,
    )
    .unwrap();
    assert_eq!(read_embedding(d).unwrap().name.as_deref(), Some("<new>"));

    // Replacing, the second write fails (a folder is there): the first keeps what it held.
    let before = std::fs::read(&first).unwrap();
    std::fs::remove_file(&second).unwrap();
    std::fs::create_dir(&second).unwrap();
    std::fs::write(second.join("keep"), b"x").unwrap();
    let e = write_embedding_to(
        &first,
        &xl,
        Format::DiffusersSdxl,
        Precision::F32,
        Existing::Replace,
    );
    assert!(e.is_err());
    assert_eq!(std::fs::read(&first).unwrap(), before);
    assert_eq!(
        listing(),
        ["learned_embeds.safetensors", "learned_embeds_2.safetensors"]
    );
    assert!(second.join("keep").is_file());
}

#[test]
fn sd2_embedding_width_1024() {
    let sd2 = fixture("a1111_sd2.pt");
    let sd1 = fixture("a1111_sd1.pt");
    let xl = fixture("sdxl.safetensors");
    assert_eq!(
        (sd2.parts[0].encoder, sd2.parts[0].dim),
        (Encoder::Single, 1024)
    );
    assert_eq!(Family::of(&sd2), Some(Family::Sd2));
    assert_eq!(inspect(&sd2, None, 0).family, Some(Family::Sd2));
    assert!(check_for_family(&sd2, Family::Sd2).is_ok());
    // 768 (SD 1.x) and SDXL words where SD 2.x is expected: the existing message.
    let msg = check_for_family(&sd1, Family::Sd2).unwrap_err().to_string();
    assert!(
        msg.contains("width single 768 does not fit SD2, which needs 1024 (OpenCLIP ViT-H/14)"),
        "{msg}"
    );
    let msg = check_for_family(&xl, Family::Sd2).unwrap_err().to_string();
    assert!(
        msg.contains("clip_l 768 + clip_g 1280") && msg.contains("needs 1024"),
        "{msg}"
    );
    // Every layout that holds one encoder keeps a 1024-wide word exactly, still SD 2.x.
    let dir = tempfile::tempdir().unwrap();
    for format in Format::ALL
        .into_iter()
        .filter(|f| f.writable() && !f.sdxl_only())
    {
        let path = dir
            .path()
            .join(format!("sd2-{}.{}", format.name(), format.extension()));
        convert(
            &fixtures().join("a1111_sd2.pt"),
            &path,
            format,
            Precision::F32,
            Existing::Refuse,
        )
        .unwrap_or_else(|e| panic!("{format}: {e}"));
        let back = read_embedding(&path).unwrap();
        assert_eq!(back.parts, sd2.parts, "{format}");
        assert_eq!(Family::of(&back), Some(Family::Sd2), "{format}");
    }
    // An SD 2.x word is not an SDXL pair.
    let e = write_embedding(
        &dir.path().join("x.safetensors"),
        &sd2,
        Format::DiffusersSdxl,
        Precision::F32,
    )
    .unwrap_err();
    assert!(e.to_string().contains("needs clip_l and clip_g"), "{e}");
}

#[test]
fn c_abi_writes_and_reads_the_diffusers_pair() {
    use sdti::ffi::*;
    use std::ffi::CString;
    let c = |p: &Path| CString::new(p.to_str().unwrap()).unwrap();
    let mut code = u32::MAX;
    // SAFETY: NUL-terminated name, writable out-parameter.
    let rc = unsafe { sdti_format_from_name(c"diffusers-sdxl".as_ptr(), &mut code) };
    assert_eq!((rc, code), (SDTI_OK, SDTI_FORMAT_DIFFUSERS_SDXL));
    assert_eq!(SDTI_FORMAT_DIFFUSERS_SDXL, 13, "codes are never renumbered");

    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("learned_embeds.safetensors");
    let src = c(&fixtures().join("sdxl.safetensors"));
    let dst = c(&first);
    // SAFETY: NUL-terminated paths.
    let rc = unsafe {
        sdti_embedding_convert(
            src.as_ptr(),
            dst.as_ptr(),
            SDTI_FORMAT_DIFFUSERS_SDXL,
            SDTI_PRECISION_F32,
        )
    };
    assert_eq!(rc, SDTI_OK);
    assert!(dir.path().join("learned_embeds_2.safetensors").is_file());
    // SAFETY: as above.
    let again = unsafe {
        sdti_embedding_convert(
            src.as_ptr(),
            dst.as_ptr(),
            SDTI_FORMAT_DIFFUSERS_SDXL,
            SDTI_PRECISION_F32,
        )
    };
    assert_eq!(again, SDTI_ERR_EXISTS);
    // Back from FIRST+SECOND to one sdxl file.
    let pair = c(&plus(
        &first,
        &dir.path().join("learned_embeds_2.safetensors"),
    ));
    let out = dir.path().join("back.safetensors");
    let out_c = c(&out);
    // SAFETY: as above.
    let rc = unsafe {
        sdti_embedding_convert(
            pair.as_ptr(),
            out_c.as_ptr(),
            SDTI_FORMAT_SDXL_SAFETENSORS,
            SDTI_PRECISION_F32,
        )
    };
    assert_eq!(rc, SDTI_OK);
    assert_eq!(
        read_embedding(&out).unwrap().parts,
        fixture("sdxl.safetensors").parts
    );
    // An SD 1.x word cannot be the pair.
    let sd1 = c(&fixtures().join("a1111_sd1.pt"));
    let nope = c(&dir.path().join("sd1.safetensors"));
    // SAFETY: as above.
    let rc = unsafe {
        sdti_embedding_convert(
            sd1.as_ptr(),
            nope.as_ptr(),
            SDTI_FORMAT_DIFFUSERS_SDXL,
            SDTI_PRECISION_F32,
        )
    };
    assert_eq!(rc, SDTI_ERR_UNSUPPORTED);
}

#[test]
fn cli_converts_and_inspects_the_diffusers_pair() {
    use std::process::Command;
    let run = |args: &[&std::ffi::OsStr]| {
        let out = Command::new(env!("CARGO_BIN_EXE_sdti"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let folder = fixtures().join("diffusers_sdxl");
    let one = dir.path().join("cat-xl.safetensors");
    // Folder -> one sdxl file (the format follows from .safetensors for an SDXL word).
    let (ok, out, err) = run(&["convert".as_ref(), folder.as_os_str(), one.as_os_str()]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("(diffusers-sdxl)") && out.contains("(sdxl, f32)"),
        "{out}"
    );
    assert_eq!(
        read_embedding(&one).unwrap().parts,
        fixture("diffusers_sdxl").parts
    );
    // One sdxl file -> the pair, then refused when either file of the pair exists.
    let first = dir.path().join("out").join("learned_embeds.safetensors");
    std::fs::create_dir(first.parent().unwrap()).unwrap();
    let to_pair = [
        "convert".as_ref(),
        one.as_os_str(),
        first.as_os_str(),
        "--format".as_ref(),
        "diffusers-sdxl".as_ref(),
    ];
    let (ok, out, err) = run(&to_pair);
    assert!(ok, "{out}{err}");
    assert!(out.contains("learned_embeds_2.safetensors"), "{out}");
    std::fs::remove_file(&first).unwrap();
    let (ok, _, err) = run(&to_pair);
    assert!(!ok);
    assert!(
        err.contains("learned_embeds_2.safetensors already exists") && err.contains("--overwrite"),
        "{err}"
    );
    assert!(
        !first.exists(),
        "nothing written when the second file is taken"
    );
    // inspect of FIRST+SECOND; and of one half, with a note about the other.
    let second = first.with_file_name("learned_embeds_2.safetensors");
    let (ok, out, err) = run(&[
        "inspect".as_ref(),
        plus(
            &folder.join("learned_embeds.safetensors"),
            &folder.join("learned_embeds_2.safetensors"),
        )
        .as_os_str(),
        "--json".as_ref(),
    ]);
    assert!(ok, "{err}");
    let json: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["source_format"], "diffusers-sdxl");
    assert_eq!(json["family"], "sdxl");
    let (ok, _, err) = run(&[
        "inspect".as_ref(),
        folder.join("learned_embeds.safetensors").as_os_str(),
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("note:") && err.contains("learned_embeds_2.safetensors"),
        "{err}"
    );
    // Swapped halves: a one-line error that says so.
    let (ok, _, err) = run(&[
        "inspect".as_ref(),
        plus(&second, &folder.join("learned_embeds.safetensors")).as_os_str(),
    ]);
    assert!(!ok);
    assert!(err.contains("swapped"), "{err}");
}
