//! SD 2.x: OpenCLIP ViT-H conditioning, the SD 2.x UNet, training, against the
//! reference fixtures of tests/reference/make_tiny_sd2.py.
//!
//! The text encoder conditions on the penultimate of its 24 blocks plus the final layer
//! norm, with 0 after the first end token of each chunk. The diffusers folder holds 23
//! blocks (block 24 dropped by the conversion), the single file all 24.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use sdti::embedding::{Encoder, Family};
use sdti::model::clip::Conditioning;
use sdti::model::weights::WeightIndex;
use sdti::model::{ClipConfig, Injection, TextEncoder};
use sdti::prompt::chunks::ChunkStyle;
use sdti::prompt::encoder::PromptEncoder;
use sdti::tokenizer::ClipTokenizer;

use crate::common::{assert_close, fixture, rel_err, test_device};

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("tiny-sd2-expected.safetensors"), &test_device())
        .expect("reference fixture tiny-sd2-expected.safetensors")
}

/// The folder's 23-layer text encoder, built from its files as a folder loader builds it:
/// the config says 23 layers, and the encoder knows it lacks the original's block 24.
fn folder_encoder(dtype: DType) -> TextEncoder {
    let dir = fixture("tiny-sd2/text_encoder");
    let text = std::fs::read_to_string(dir.join("config.json")).expect("config.json");
    let mut config: ClipConfig = serde_json::from_str(&text).expect("a CLIP text config");
    assert_eq!(config.num_hidden_layers, 23);
    config.dropped_final_layers = 1;
    let mut index = WeightIndex::default();
    for (key, _) in index.map_file(&dir.join("model.safetensors")).unwrap() {
        index.alias_last(&key, format!("te.{key}"));
    }
    let w = index.finish(dtype, test_device());
    TextEncoder::for_family(&w.pp("te"), &config, Family::Sd2, Encoder::Single)
        .expect("SD 2.x text encoder builds")
}

/// Reference ids `[1, T]` (placeholders 49408.. as learned slots holding id 0) as ids,
/// index and mask; several rows (chunks) are laid side by side.
fn prompt(raw: &Tensor) -> (Tensor, Tensor, Tensor) {
    let raw: Vec<i64> = raw.flatten_all().unwrap().to_vec1().unwrap();
    let n = raw.len();
    let ids: Vec<u32> = raw
        .iter()
        .map(|&id| if id >= 49408 { 0 } else { id as u32 })
        .collect();
    let index: Vec<u32> = raw
        .iter()
        .map(|&id| if id >= 49408 { (id - 49408) as u32 } else { 0 })
        .collect();
    let mask: Vec<f32> = raw
        .iter()
        .map(|&id| if id >= 49408 { 1.0 } else { 0.0 })
        .collect();
    let dev = test_device();
    (
        Tensor::from_vec(ids, (1, n), &dev).unwrap(),
        Tensor::from_vec(index, (1, n), &dev).unwrap(),
        Tensor::from_vec(mask, (1, n), &dev).unwrap(),
    )
}

fn ids_of(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

#[test]
fn sd2_text_states_match_transformers() {
    let exp = expected();
    let te = folder_encoder(DType::F32);
    assert_eq!(te.full_depth(), 24);
    let cond = te.conditioning(None).unwrap();
    assert_eq!(
        (cond.clip_skip, cond.final_norm, cond.pad_after_eos),
        (2, true, Some(0))
    );
    let (ids, index, mask) = prompt(&exp["te.input_ids"]);
    let inj = Injection {
        table: &exp["te.vectors"],
        index: &index,
        mask: &mask,
    };
    let states = te.encode(&ids, Some(&inj), 2).unwrap();
    assert_close(
        "penultimate + LN, pad 0",
        &states,
        &exp["te.last_hidden_state"],
        1e-5,
    );
    // The same ids padded with the end token (the shared prompt layout): the encoder
    // rewrites them itself.
    let (eos_ids, _, _) = prompt(&exp["te.input_ids_eos_pad"]);
    let from_eos = te.encode(&eos_ids, Some(&inj), 2).unwrap();
    assert_eq!(rel_err(&from_eos, &states), 0.0);
    // Kept as given, the end-token padding is what the reference shows is different.
    let eos_kept = Conditioning {
        pad_after_eos: None,
        ..cond
    };
    let (kept, _) = te
        .encode_with_pooled(&eos_ids, Some(&inj), &eos_kept)
        .unwrap();
    assert_close(
        "end-token padding (the SD 1.x rule)",
        &kept,
        &exp["te.eos_pad_last_hidden_state"],
        1e-5,
    );
    assert!(rel_err(&kept, &states) > 1e-2);
    // clip skip 3 = hidden_states[-3] of the 24 blocks = the folder's penultimate.
    let skip3 = te.encode(&ids, Some(&inj), 3).unwrap();
    assert_close("clip skip 3", &skip3, &exp["te.clip_skip3"], 1e-5);
    // Without learned vectors.
    let (raw, _, _) = prompt(&exp["te.input_ids_raw"]);
    let plain = te.encode(&raw, None, 2).unwrap();
    assert_close(
        "plain prompt",
        &plain,
        &exp["te.plain_last_hidden_state"],
        1e-5,
    );
    // Block 24 is not in the folder.
    let err = te.encode(&ids, None, 1).unwrap_err().to_string();
    assert!(err.contains("lacks block 24"), "{err}");
}

/// Prompts through the shared layout (EOS padding) and the encoder's pad rule, in both
/// chunk styles: the reference ids and states, learned slots staying learned.
#[test]
fn sd2_pad_zero_after_first_eos() {
    let exp = expected();
    let te = Arc::new(folder_encoder(DType::F32));
    let vectors: Vec<f32> = exp["te.vectors"].flatten_all().unwrap().to_vec1().unwrap();
    let long_prompt = "a photo of a sks toy red green blue cat dog tree house car sky sun red green blue cat dog tree house car sky sun red green blue cat dog tree house car sky sun red green blue cat dog tree house car sky sun red green blue cat dog tree house car sky sun red green blue cat dog tree house car sky sun red green blue cat dog tree house car sky sun red green blue sks cat dog tree house car sky sun red";
    for style in [ChunkStyle::A1111, ChunkStyle::ComfyUi] {
        let mut enc = PromptEncoder::new(te.clone()).unwrap();
        enc.set_chunk_style(style);
        enc.register("sks", &vectors).unwrap();
        assert_eq!(enc.clip_skip(), 2);
        // Short prompt: ids (learned slots 5, 6; 0 after the end token at 8) and states.
        let slots = enc.tokenize("a photo of a sks toy");
        let want = ids_of(&exp["te.input_ids"]);
        assert_eq!(slots.len(), 77);
        for (i, (slot, &want)) in slots.iter().zip(&want).enumerate() {
            if want >= 49408 {
                assert_eq!(slot.learned, Some((0, (want - 49408) as usize)), "slot {i}");
            } else {
                assert_eq!(
                    (slot.id, slot.learned),
                    (want, None),
                    "slot {i} ({style:?})"
                );
            }
        }
        let states = enc.encode("a photo of a sks toy").unwrap();
        assert_close(
            "short prompt",
            &states.unsqueeze(0).unwrap(),
            &exp["te.last_hidden_state"],
            1e-5,
        );
        // Two chunks, each padded with 0 after its own end token.
        let slots = enc.tokenize(long_prompt);
        let want = ids_of(&exp["te.long_input_ids"]);
        assert_eq!(slots.len(), want.len());
        for (i, (slot, &want)) in slots.iter().zip(&want).enumerate() {
            if want >= 49408 {
                assert!(slot.learned.is_some(), "slot {i} ({style:?})");
            } else {
                assert_eq!(slot.id, want, "slot {i} ({style:?})");
            }
        }
        let states = enc.encode(long_prompt).unwrap();
        assert_close(
            "long prompt",
            &states.unsqueeze(0).unwrap(),
            &exp["te.long_last_hidden_state"],
            1e-5,
        );
        // The empty prompt: [BOS, EOS, 0 x 75].
        let states = enc.encode("").unwrap();
        assert_close(
            "empty prompt",
            &states.unsqueeze(0).unwrap(),
            &exp["te.empty_last_hidden_state"],
            1e-5,
        );
    }
}

/// A literal `!` is BPE (256, `!!` 748), as open_clip, A1111 and ComfyUI tokenise it, not
/// the pad id 0 HF's tokenizer of an SD 2.x folder makes of it.
#[test]
fn sd2_bang_is_bpe_not_pad() {
    let exp = expected();
    let tok = ClipTokenizer::new().unwrap();
    let prompt_text = "a cat! a dog!! wow";
    let ids = tok.encode(prompt_text);
    let want = ids_of(&exp["te.bang_input_ids"]);
    assert_eq!(ids, want[1..=ids.len()].to_vec());
    assert!(ids.contains(&256) && ids.contains(&748));
    let te = Arc::new(folder_encoder(DType::F32));
    let enc = PromptEncoder::new(te).unwrap();
    let slots: Vec<u32> = enc.tokenize(prompt_text).iter().map(|s| s.id).collect();
    assert_eq!(slots, want);
    let states = enc.encode(prompt_text).unwrap();
    assert_close(
        "'!' prompt",
        &states.unsqueeze(0).unwrap(),
        &exp["te.bang_last_hidden_state"],
        1e-5,
    );
}
