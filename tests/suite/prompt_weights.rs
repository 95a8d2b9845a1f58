//! Prompt weights as A1111 and ComfyUI read them, against their own parsers' output.
//!
//! tests/fixtures/prompt-weights.{json,safetensors} come from
//! tests/reference/make_prompt_weight_fixtures.py, which runs each host's own parser,
//! chunking and weighting code (A1111's `parse_prompt_attention`, `tokenize_line`,
//! "Original" emphasis; ComfyUI's `token_weights`, `tokenize_with_weights`,
//! `encode_token_weights`) on the tiny models' text encoders.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Tensor};
use sdti::model::{LoadOptions, TextEncoder};
use sdti::prompt::chunks::{ChunkStyle, Slot};
use sdti::prompt::encoder::PromptEncoder;
use sdti::prompt::weights::{parse_a1111, parse_comfyui, weighted_chunks, Span};
use sdti::prompt::Word;
use sdti::tokenizer::ClipTokenizer;
use serde_json::Value;

use crate::common::{assert_close, fixture, test_device};

fn report() -> &'static Value {
    static REPORT: OnceLock<Value> = OnceLock::new();
    REPORT.get_or_init(|| {
        let text = std::fs::read_to_string(fixture("prompt-weights.json"))
            .expect("reference fixture prompt-weights.json");
        serde_json::from_str(&text).expect("prompt-weights.json is JSON")
    })
}

fn tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("prompt-weights.safetensors"), &test_device())
        .expect("reference fixture prompt-weights.safetensors")
}

fn style_of(name: &str) -> ChunkStyle {
    match name {
        "a1111" => ChunkStyle::A1111,
        "comfyui" => ChunkStyle::ComfyUi,
        other => panic!("unknown host {other}"),
    }
}

fn vec_of(v: &Tensor) -> Vec<f32> {
    v.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn parses_as_each_host_parses() {
    let cases = report()["parse"].as_array().expect("parse cases");
    assert!(cases.len() > 30);
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        for host in ["a1111", "comfyui"] {
            let got = match host {
                "a1111" => parse_a1111(prompt),
                _ => parse_comfyui(prompt),
            };
            let want = &case[host];
            match (want.as_array(), got) {
                (Some(spans), Ok(got)) => {
                    let want: Vec<Span> = spans
                        .iter()
                        .map(|s| Span {
                            text: s[0].as_str().unwrap().to_string(),
                            weight: s[1].as_f64().unwrap(),
                        })
                        .collect();
                    // serde_json's float parsing may be 1 ulp off Python's repr.
                    let same = got.len() == want.len()
                        && got.iter().zip(&want).all(|(g, w)| {
                            g.text == w.text
                                && (g.weight - w.weight).abs() <= 1e-14 * w.weight.abs()
                        });
                    assert!(same, "{host} {prompt:?}: sdti {got:?}, the host {want:?}");
                }
                (None, Err(_)) => {}
                (Some(_), Err(e)) => panic!("{host} {prompt:?}: the host reads it, sdti says {e}"),
                (None, Ok(got)) => {
                    panic!("{host} {prompt:?}: the host fails ({want}), sdti reads {got:?}")
                }
            }
        }
    }
}

#[test]
fn chunks_and_weights_as_each_host_lays_them_out() {
    let tok = ClipTokenizer::new().unwrap();
    let word = &report()["word"];
    let words = [Word {
        name: word["name"].as_str().unwrap().to_string(),
        vectors: word["vectors"].as_u64().unwrap() as usize,
        offset: 0,
    }];
    let mut weighted = 0;
    for host in ["a1111", "comfyui"] {
        for case in report()["layout"][host].as_array().unwrap() {
            let prompt = case["prompt"].as_str().unwrap();
            let got = weighted_chunks(&tok, prompt, &words, style_of(host), true).unwrap();
            let want = case["chunks"].as_array().unwrap();
            assert_eq!(got.len(), want.len(), "{host} {prompt:?}: chunks");
            for (c, (g, w)) in got.iter().zip(want).enumerate() {
                let tokens = w["tokens"].as_array().unwrap();
                let weights = w["weights"].as_array().unwrap();
                let learned = w["learned"].as_array().unwrap();
                assert_eq!(g.len(), tokens.len(), "{host} {prompt:?} chunk {c}");
                for (i, slot) in g.iter().enumerate() {
                    let want_slot = match learned[i].as_array() {
                        Some(l) => Slot::Learned {
                            word: 0,
                            index: l[1].as_u64().unwrap() as usize,
                        },
                        None => Slot::Token(tokens[i].as_u64().unwrap() as u32),
                    };
                    assert_eq!(slot.slot, want_slot, "{host} {prompt:?} chunk {c} slot {i}");
                    // The hosts' multipliers are f32 when they reach the states.
                    let want_w = weights[i].as_f64().unwrap() as f32;
                    assert!(
                        (slot.weight - want_w).abs() <= 1e-6 * want_w.abs(),
                        "{host} {prompt:?} chunk {c} slot {i}: weight {} against {want_w}",
                        slot.weight
                    );
                    weighted += usize::from(want_w != 1.0);
                }
            }
        }
    }
    assert!(weighted > 50, "the cases weight something");
}

fn encoder(model: &str, style: ChunkStyle, t: &HashMap<String, Tensor>) -> PromptEncoder {
    let opts = LoadOptions {
        dtype: DType::F32,
        device: test_device(),
        ..LoadOptions::default()
    };
    let (first, second) =
        TextEncoder::load_all(&fixture(model), &opts).expect("text encoders load");
    let mut enc = PromptEncoder::with_encoders(Arc::new(first), second.map(Arc::new)).unwrap();
    let name = report()["word"]["name"].as_str().unwrap();
    if model == "tiny-sdxl" {
        let l = vec_of(&t["vectors.sdxl_l"]);
        let g = vec_of(&t["vectors.sdxl_g"]);
        enc.register_parts(name, &[&l, &g]).unwrap();
    } else {
        let key = if model == "tiny-sd2" {
            "vectors.sd2"
        } else {
            "vectors.sd1"
        };
        enc.register(name, &vec_of(&t[key])).unwrap();
    }
    enc.set_chunk_style(style);
    enc
}

/// The weighted context of every encode case against the host's, SD 1.x, SD 2.x and SDXL
/// (and SDXL's pooled vector, unweighted in both hosts).
#[test]
fn weighted_states_match_each_host() {
    let t = tensors();
    let mut checked = 0;
    for (host, fam, model) in [
        ("a1111", "sd1", "tiny-sd"),
        ("comfyui", "sd1", "tiny-sd"),
        ("a1111", "sd2", "tiny-sd2"),
        ("comfyui", "sd2", "tiny-sd2"),
        ("a1111", "sdxl", "tiny-sdxl"),
        ("comfyui", "sdxl", "tiny-sdxl"),
    ] {
        let enc = encoder(model, style_of(host), &t);
        for (i, case) in report()["encode"][host]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let families: Vec<&str> = case["families"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f.as_str().unwrap())
                .collect();
            if !families.contains(&fam) {
                continue;
            }
            let prompt = case["prompt"].as_str().unwrap();
            let key = format!("{host}.{i}.{fam}");
            let (states, pooled) = enc.encode_with_pooled(prompt).unwrap();
            assert_close(&key, &states, &t[&format!("{key}.context")], 1e-5);
            if let Some(want) = t.get(&format!("{key}.pooled")) {
                let got = pooled.expect("SDXL has a pooled vector");
                assert_close(&format!("{key} pooled"), &got, want, 1e-5);
            }
            checked += 1;
        }
    }
    assert!(checked >= 18, "{checked} cases checked");
}

#[test]
fn weights_change_the_states_and_can_be_turned_off() {
    let t = tensors();
    for host in ["a1111", "comfyui"] {
        let mut enc = encoder("tiny-sd", style_of(host), &t);
        let case = &report()["encode"][host][0];
        let prompt = case["prompt"].as_str().unwrap();
        let weighted = enc.encode(prompt).unwrap();
        let want = &t[&format!("{host}.0.sd1.context")];
        enc.set_prompt_weights(false);
        assert!(!enc.prompt_weights());
        let plain = enc.encode(prompt).unwrap();
        // Off, the brackets are tokens again: the host's weighted states are far away.
        let e = crate::common::rel_err(&plain, want);
        assert!(
            e > 1e-2,
            "{host}: weights off still gives the weighted states ({e:.2e})"
        );
        let slots = enc.tokenize("(a:1.5)");
        assert!(slots.len() == 77 && slots.iter().all(|s| s.weight == 1.0));
        assert!(
            slots.iter().filter(|s| s.id != 49407).count() > 3,
            "brackets are tokens"
        );
        enc.set_prompt_weights(true);
        assert_close(host, &enc.encode(prompt).unwrap(), &weighted, 0.0);
    }
}

#[test]
fn malformed_weights_do_as_the_host_does() {
    let t = tensors();
    let a1111 = encoder("tiny-sd", ChunkStyle::A1111, &t);
    let comfy = encoder("tiny-sd", ChunkStyle::ComfyUi, &t);
    // A1111's float() raises on these; ComfyUI keeps them as text.
    for bad in ["(word:1.2.3)", "(a:.)"] {
        let err = a1111
            .encode(bad)
            .expect_err("A1111 fails on it")
            .to_string();
        assert!(err.contains("not a number"), "{err}");
        assert_eq!(a1111.tokenize(bad).len(), 77, "tokenize still lays it out");
        comfy.encode(bad).expect("ComfyUI reads it as text");
    }
    // Not finite: refused rather than NaN states.
    let err = comfy
        .encode("(a:inf)")
        .expect_err("an infinite weight")
        .to_string();
    assert!(err.contains("weight"), "{err}");
    let deep = format!("{}a{}", "(".repeat(2000), ")".repeat(2000));
    assert!(comfy.encode(&deep).is_err());
    // Never a panic, whatever the brackets.
    let tok = ClipTokenizer::new().unwrap();
    let nasty = [
        "(((",
        ")))",
        "[[[",
        "]]]",
        ":)",
        "(:",
        "\\",
        "\\\\(",
        "BREAK",
        "BREAK BREAK",
        "(BREAK:-1)",
        "[(:1)]",
        ":::1.5)))",
        "(a:-0)",
        "(a:1e400)",
        "\u{0}\u{1}\u{2}",
        "(\u{0}\u{1})",
        "((((((((((((((((((((x:1.1",
        "日本(語:1.2",
        "(a:0)",
    ];
    for style in [ChunkStyle::A1111, ChunkStyle::ComfyUi] {
        for text in nasty {
            let _ = weighted_chunks(&tok, text, &[], style, true);
        }
    }
    // A zero weight everywhere: A1111 divides by a zero mean; refused, not NaN.
    let r = a1111.encode("(a b c:0)");
    if let Ok(states) = r {
        let v = vec_of(&states);
        assert!(v.iter().all(|x| x.is_finite()), "finite states or an error");
    }
}

fn sdti_encode(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sdti"))
        .arg("encode")
        .args(args)
        .output()
        .expect("sdti runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `sdti encode` shows each slot's weight (text and JSON) as A1111 or ComfyUI read it;
/// `--no-prompt-weights` shows the brackets as tokens.
#[test]
fn cli_encode_shows_the_weights() {
    let prompt = "a photo of (my-cat:1.2) on a [table]";
    let (ok, out, err) = sdti_encode(&[prompt]);
    assert!(ok, "{err}");
    assert!(
        out.contains("weights:  4 slots weighted (a1111 reading"),
        "{out}"
    );
    let line = |word: &str| {
        out.lines()
            .find(|l| l.split_whitespace().nth(2) == Some(word))
            .unwrap_or_default()
            .to_string()
    };
    assert!(line("cat").ends_with("x1.2"), "{out}");
    assert!(
        line("table").ends_with(&format!("x{}", (1.0f64 / 1.1) as f32)),
        "{out}"
    );
    assert!(!line("photo").contains(" x"), "{out}");
    // ComfyUI reads [table] as text.
    let (ok, out, _) = sdti_encode(&["--chunking", "comfyui", "--json", prompt]);
    assert!(ok);
    let json: Value = serde_json::from_str(&out).unwrap();
    let slots = json["chunks"][0].as_array().unwrap();
    let weights: Vec<f64> = slots
        .iter()
        .map(|s| s.get("weight").and_then(Value::as_f64).unwrap_or(1.0))
        .collect();
    assert_eq!(weights.iter().filter(|&&w| w != 1.0).count(), 3);
    assert!(slots.iter().any(|s| s["text"] == "[</w>"), "{out}");
    // Off: the brackets are tokens, nothing weighted.
    let (ok, out, _) = sdti_encode(&["--no-prompt-weights", prompt]);
    assert!(ok);
    assert!(!out.contains("weights:") && out.contains(" (\n"), "{out}");
    // A weight A1111 cannot read: an error naming the weight, no panic.
    let (ok, _, err) = sdti_encode(&["(a:1.2.3)"]);
    assert!(
        !ok && err.contains("1.2.3") && !err.contains("panicked"),
        "{err}"
    );
}

/// A C host gets the hosts' weighted states from `sdti_encoder_encode` (ComfyUI's chunk
/// style too), the weights per slot from `sdti_encoder_token_weights`, and plain text
/// with `sdti_encoder_set_prompt_weights(enc, 0)`.
#[test]
fn c_hosts_get_the_weights_and_can_turn_them_off() {
    use sdti::ffi::*;
    use std::ffi::CString;

    use crate::ffi::expect;

    let t = tensors();
    let enc = crate::ffi::encoder_at(&fixture("tiny-sd"));
    let name = CString::new(report()["word"]["name"].as_str().unwrap()).unwrap();
    let vectors = vec_of(&t["vectors.sd1"]);
    let dim = 32;
    // SAFETY: n * dim readable floats.
    let rc = unsafe {
        sdti_encoder_register_vectors(
            enc,
            name.as_ptr(),
            vectors.as_ptr(),
            vectors.len() / dim,
            dim,
        )
    };
    expect(rc, SDTI_OK, "register");
    let encode = |prompt: &str| -> Vec<f32> {
        let p = CString::new(prompt).unwrap();
        let mut out = vec![0f32; 77 * 4 * dim];
        let (mut needed, mut rows) = (0usize, 0u32);
        // SAFETY: a writable buffer of its length.
        let rc = unsafe {
            sdti_encoder_encode(
                enc,
                p.as_ptr(),
                out.as_mut_ptr(),
                out.len(),
                &mut needed,
                &mut rows,
            )
        };
        expect(rc, SDTI_OK, prompt);
        out.truncate(needed);
        out
    };
    for (host, style) in [
        ("a1111", SDTI_CHUNKS_A1111),
        ("comfyui", SDTI_CHUNKS_COMFYUI),
    ] {
        expect(
            sdti_encoder_set_chunk_style(enc, style),
            SDTI_OK,
            "chunk style",
        );
        let prompt = report()["encode"][host][0]["prompt"].as_str().unwrap();
        let want = vec_of(&t[&format!("{host}.0.sd1.context")]);
        let got = encode(prompt);
        assert_eq!(got.len(), want.len(), "{host}");
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-5 * scale.max(1.0), "{host}: off by {worst}");
        // Off: the brackets are text again, the states move away from the host's.
        expect(
            sdti_encoder_set_prompt_weights(enc, 0),
            SDTI_OK,
            "weights off",
        );
        let plain = encode(prompt);
        assert!(
            plain
                .iter()
                .zip(&want)
                .any(|(a, b)| (a - b).abs() > 1e-2 * scale),
            "{host}: weights off gave the weighted states"
        );
        expect(
            sdti_encoder_set_prompt_weights(enc, 1),
            SDTI_OK,
            "weights on",
        );
    }
    // Per slot: "(a:1.5) b" puts 1.5 on "a" only (slot 1 after the start token).
    expect(
        sdti_encoder_set_chunk_style(enc, SDTI_CHUNKS_A1111),
        SDTI_OK,
        "a1111",
    );
    let weights_of = |prompt: &str, want: sdti_status| -> Vec<f32> {
        let p = CString::new(prompt).unwrap();
        let mut w = vec![0f32; 154];
        let mut needed = 0usize;
        // SAFETY: a writable buffer of its length.
        let rc = unsafe {
            sdti_encoder_token_weights(enc, p.as_ptr(), w.as_mut_ptr(), w.len(), &mut needed)
        };
        expect(rc, want, prompt);
        w.truncate(needed);
        w
    };
    let w = weights_of("(a:1.5) b", SDTI_OK);
    assert_eq!(w.len(), 77);
    assert_eq!((w[0], w[1], w[2]), (1.0, 1.5, 1.0), "{:?}", &w[..4]);
    // A weight A1111 cannot read is refused with the reason.
    weights_of("(a:1.2.3)", SDTI_ERR_INVALID_ARGUMENT);
    // Off, every slot weighs 1; a size query without a buffer.
    expect(sdti_encoder_set_prompt_weights(enc, 0), SDTI_OK, "off");
    assert!(weights_of("(a:1.5) b", SDTI_OK).iter().all(|&x| x == 1.0));
    let p = CString::new("(a:1.5)").unwrap();
    let mut needed = 0usize;
    // SAFETY: a NULL buffer is a size query.
    let rc = unsafe {
        sdti_encoder_token_weights(enc, p.as_ptr(), std::ptr::null_mut(), 0, &mut needed)
    };
    expect(rc, SDTI_ERR_BUFFER_TOO_SMALL, "size query");
    assert_eq!(needed, 77);
    let m = expect(
        sdti_encoder_set_prompt_weights(enc, 2),
        SDTI_ERR_INVALID_ARGUMENT,
        "2",
    );
    assert!(m.contains("prompt weights 2"), "{m}");
    sdti_encoder_free(enc);
}
