//! SDXL's text side against tests/reference/make_tiny_sdxl.py (transformers): CLIP ViT-L
//! and OpenCLIP bigG `hidden_states[-2]` without the final norm, G padded with 0 after the
//! first end token, the pooled vector at the first end token through `text_projection`,
//! and the context `[L ‖ G]`, with learned vectors in both tables.
//!
//! The encoders are built from the folder's `text_encoder/` and `text_encoder_2/` files
//! directly, so these tests check the text encoders alone, whatever loads the rest.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};
use sdti::embedding::{Encoder, Family};
use sdti::model::clip::Conditioning;
use sdti::model::text_encoder::encode_context;
use sdti::model::{Injection, TextEncoder};

use crate::common::{
    assert_close, clip_config, fixture, reference, rel_err, test_device, text_encoder_from_files,
    ReferencePrompt,
};

fn expected() -> HashMap<String, Tensor> {
    reference("tiny-sdxl-expected.safetensors")
}

/// One of the folder's text encoders (`text_encoder` = CLIP ViT-L, `text_encoder_2` =
/// OpenCLIP bigG) in `dtype`.
fn encoder(part: &str, encoder: Encoder, dtype: DType) -> TextEncoder {
    let dir = fixture("tiny-sdxl").join(part);
    text_encoder_from_files(&dir, &clip_config(&dir), Family::Sdxl, encoder, dtype)
}

/// The word's two tables (`te.vectors_l`, `te.vectors_g`) in `prompt`'s learned slots.
fn both_tables<'a>(
    prompt: &'a ReferencePrompt,
    exp: &'a HashMap<String, Tensor>,
) -> (Injection<'a>, Injection<'a>) {
    (
        prompt.inject(&exp["te.vectors_l"]),
        prompt.inject(&exp["te.vectors_g"]),
    )
}

#[test]
fn sdxl_te1_and_te2_hidden_minus2_without_final_norm() {
    let exp = expected();
    let l = encoder("text_encoder", Encoder::ClipL, DType::F32);
    let g = encoder("text_encoder_2", Encoder::ClipG, DType::F32);
    assert_eq!(l.default_conditioning().clip_skip, 2);
    assert!(!l.default_conditioning().final_norm);
    // L's ids (padded with the end token) for both: G rewrites its padding to 0 itself.
    let prompt = ReferencePrompt::new(&exp["te.input_ids_l"]);
    let ids = &prompt.ids;
    let (inj_l, inj_g) = both_tables(&prompt, &exp);
    let states_l = l.encode(ids, Some(&inj_l), 2).unwrap();
    assert_close(
        "te1 hidden_states[-2]",
        &states_l,
        &exp["te1.hidden_m2"],
        1e-5,
    );
    let states_g = g.encode(ids, Some(&inj_g), 2).unwrap();
    assert_close(
        "te2 hidden_states[-2]",
        &states_g,
        &exp["te2.hidden_m2"],
        1e-5,
    );
    // The same from G's own (0-padded) ids.
    let ids_g = ReferencePrompt::new(&exp["te.input_ids_g"]).ids;
    let from_g = g.encode(&ids_g, Some(&inj_g), 2).unwrap();
    assert_eq!(rel_err(&from_g, &states_g), 0.0);
    // Padding G with the end token instead would be a different context.
    let eos_padded = Conditioning {
        pad_after_eos: None,
        ..g.default_conditioning()
    };
    let (wrong, _) = g
        .encode_with_pooled(ids, Some(&inj_g), &eos_padded)
        .unwrap();
    assert!(rel_err(&wrong, &exp["te2.hidden_m2"]) > 1e-2);
}

#[test]
fn sdxl_pooled_at_the_first_end_token_with_gradient() {
    let exp = expected();
    let g = encoder("text_encoder_2", Encoder::ClipG, DType::F32);
    let prompt = ReferencePrompt::new(&exp["te.input_ids_g"]);
    let ids = &prompt.ids;
    let vectors = Var::from_tensor(&exp["te.vectors_g"]).unwrap();
    let inj = prompt.inject(vectors.as_tensor());
    let (_, pooled) = g
        .encode_with_pooled(ids, Some(&inj), &g.default_conditioning())
        .unwrap();
    let pooled = pooled.expect("G gives the pooled vector");
    assert_close("pooled (first EOS)", &pooled, &exp["te2.pooled_eos"], 1e-5);
    // transformers with the Hub's eos_token_id 2 pools at the last placeholder instead
    // (its config's eos_token_id 2 keeps the legacy argmax pooling); sdti follows the
    // inference hosts (SGM, A1111, ComfyUI), which pool at the first end token.
    assert!(rel_err(&pooled, &exp["te2.pooled_hf_argmax"]) > 1e-2);
    let grads = pooled.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let grad = grads
        .get(vectors.as_tensor())
        .expect("the pooled path reaches the vectors");
    let norm = grad
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(norm > 0.0 && norm.is_finite());
    // L has no projection and gives no pooled vector.
    let l = encoder("text_encoder", Encoder::ClipL, DType::F32);
    let (_, none) = l
        .encode_with_pooled(ids, None, &l.default_conditioning())
        .unwrap();
    assert!(none.is_none());
}

/// The context is `[L ‖ G]` along the width, per token; the pooled vector G's.
#[test]
fn sdxl_context_concat_order() {
    let exp = expected();
    let l = encoder("text_encoder", Encoder::ClipL, DType::F32);
    let g = encoder("text_encoder_2", Encoder::ClipG, DType::F32);
    let prompt = ReferencePrompt::new(&exp["te.input_ids_l"]);
    let ids = &prompt.ids;
    let (inj_l, inj_g) = both_tables(&prompt, &exp);
    let (context, pooled) =
        encode_context(&[(&l, Some(&inj_l)), (&g, Some(&inj_g))], ids, None).unwrap();
    assert_eq!(context.dims(), &[1, 77, 80]);
    assert_close("context [L || G]", &context, &exp["te.context"], 1e-5);
    let pooled = pooled.expect("pooled vector");
    assert_close("pooled", &pooled, &exp["te2.pooled_eos"], 1e-5);
    // The empty prompt (ComfyUI's uncond).
    let uncond = ReferencePrompt::new(&exp["uncond.input_ids_l"]);
    let (context, pooled) = encode_context(&[(&l, None), (&g, None)], &uncond.ids, None).unwrap();
    assert_close("uncond context", &context, &exp["uncond.context"], 1e-5);
    assert_close(
        "uncond pooled",
        &pooled.expect("pooled vector"),
        &exp["uncond.pooled"],
        1e-5,
    );
}

/// A prompt of two chunks: `[1, 154, 80]`, each chunk padded by its encoder's rule, the
/// pooled vector from the first chunk.
#[test]
fn sdxl_two_chunks_pooled_from_the_first() {
    let exp = expected();
    let l = encoder("text_encoder", Encoder::ClipL, DType::F32);
    let g = encoder("text_encoder_2", Encoder::ClipG, DType::F32);
    let prompt = ReferencePrompt::new(&exp["chunks.input_ids_l"]);
    let ids = &prompt.ids;
    let (inj_l, inj_g) = both_tables(&prompt, &exp);
    let (context, pooled) =
        encode_context(&[(&l, Some(&inj_l)), (&g, Some(&inj_g))], ids, None).unwrap();
    assert_eq!(context.dims(), &[1, 154, 80]);
    assert_close("two-chunk context", &context, &exp["chunks.context"], 1e-5);
    assert_close(
        "two-chunk pooled",
        &pooled.expect("pooled vector"),
        &exp["chunks.pooled"],
        1e-5,
    );
}

/// The prompt encoder a host uses gives what the reference conditions on: the context
/// `[L ‖ G]` and G's pooled vector, for a one-chunk and a two-chunk prompt in both chunk
/// styles, with an SDXL word registered from its two parts or from a `{clip_l, clip_g}`
/// file.
#[test]
fn sdxl_prompt_encoder_matches_the_reference() {
    use sdti::embedding::{
        write_embedding, EmbeddingFile, EmbeddingPart, Format as EmbeddingFormat, Precision,
    };
    use sdti::prompt::chunks::ChunkStyle;
    use sdti::prompt::encoder::PromptEncoder;
    use std::sync::Arc;

    let exp = expected();
    let l = Arc::new(encoder("text_encoder", Encoder::ClipL, DType::F32));
    let g = Arc::new(encoder("text_encoder_2", Encoder::ClipG, DType::F32));
    let values = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
    let (vl, vg) = (values(&exp["te.vectors_l"]), values(&exp["te.vectors_g"]));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sks.safetensors");
    let part = |encoder, dim, data: &Vec<f32>| EmbeddingPart {
        encoder,
        vectors: 2,
        dim,
        data: data.clone(),
    };
    let emb = EmbeddingFile {
        name: Some("sks".into()),
        step: None,
        sd_checkpoint: None,
        sd_checkpoint_name: None,
        parts: vec![part(Encoder::ClipL, 32, &vl), part(Encoder::ClipG, 48, &vg)],
        source_format: EmbeddingFormat::SdxlSafetensors,
    };
    write_embedding(
        &file,
        &emb,
        EmbeddingFormat::SdxlSafetensors,
        Precision::F32,
    )
    .unwrap();
    // The chunk case's prompt with the word in place of its two placeholder tokens.
    let long = "a photo of a sks toy on a wooden table in a quiet garden with red flowers and green leaves under the blue sky"
        .to_string()
        + &" on a wooden table in a quiet garden with red flowers and green leaves under the blue sky".repeat(5);
    for (style, from_file) in [(ChunkStyle::A1111, false), (ChunkStyle::ComfyUi, true)] {
        let mut enc = PromptEncoder::with_encoders(l.clone(), Some(g.clone())).unwrap();
        enc.set_chunk_style(style);
        if from_file {
            assert_eq!(enc.register_file(None, &file).unwrap(), "sks");
        } else {
            enc.register_parts("sks", &[&vl, &vg]).unwrap();
        }
        assert_eq!(
            (enc.dim(), enc.pooled_dim(), enc.clip_skip()),
            (80, Some(48), 2)
        );
        assert_eq!(enc.words(), vec![("sks".to_string(), 2)]);
        let (context, pooled) = enc.encode_with_pooled("a photo of a sks toy").unwrap();
        assert_close(
            "context",
            &context.unsqueeze(0).unwrap(),
            &exp["te.context"],
            1e-5,
        );
        let pooled = pooled.expect("SDXL gives a pooled vector");
        assert_close(
            "pooled",
            &pooled.unsqueeze(0).unwrap(),
            &exp["te2.pooled_eos"],
            1e-5,
        );
        let (context, pooled) = enc.encode_with_pooled(&long).unwrap();
        assert_close(
            &format!("two-chunk context ({style:?})"),
            &context.unsqueeze(0).unwrap(),
            &exp["chunks.context"],
            1e-5,
        );
        assert_close(
            &format!("two-chunk pooled ({style:?})"),
            &pooled.expect("pooled").unsqueeze(0).unwrap(),
            &exp["chunks.pooled"],
            1e-5,
        );
        // A one-part word does not fit an SDXL model.
        assert!(enc.register("one", &vl).is_err());
    }
    // A one-encoder (SD 1.x-layout) file: no clip_g part.
    let single = dir.path().join("one.safetensors");
    let one = EmbeddingFile {
        parts: vec![EmbeddingPart {
            encoder: Encoder::Single,
            ..part(Encoder::Single, 32, &vl)
        }],
        source_format: EmbeddingFormat::A1111Safetensors,
        ..emb
    };
    write_embedding(
        &single,
        &one,
        EmbeddingFormat::A1111Safetensors,
        Precision::F32,
    )
    .unwrap();
    let mut enc = PromptEncoder::with_encoders(l.clone(), Some(g)).unwrap();
    let err = enc.register_file(None, &single).unwrap_err().to_string();
    assert!(err.contains("clip_l") && err.contains("clip_g"), "{err}");
    // L alone is not an SDXL prompt encoder.
    assert!(PromptEncoder::new(l).is_err());
}

/// Loaded as a host loads them (folder, and single file with the OpenCLIP G's packed q/k/v
/// split and its `text_projection` transposed), the two encoders give the reference
/// context and pooled vector; the single file's equal the folder's.
#[test]
fn sdxl_text_encoders_load_from_folder_and_single_file() {
    use sdti::model::files::index_text_encoders;
    use sdti::model::{LoadOptions, ModelConfig};

    let exp = expected();
    let opts = crate::common::load_options(DType::F32);
    let (l, g) = TextEncoder::load_all(&fixture("tiny-sdxl"), &opts).unwrap();
    let g = g.expect("SDXL has a second text encoder");
    assert!(TextEncoder::load(&fixture("tiny-sdxl"), &opts).is_err());
    // Single files carry no configuration and the tiny widths do not follow the real
    // models' 64-channel heads: the folder's text configurations are passed along.
    let found = index_text_encoders(&fixture("tiny-sdxl"), DType::F32, &test_device(), None)
        .expect("the folder's text encoders index");
    let folder_config = ModelConfig {
        text_encoder: found.text_encoder,
        text_encoder_2: found.text_encoder_2,
        ..ModelConfig::sdxl()
    };
    let single_opts = LoadOptions {
        config: Some(folder_config),
        ..opts.clone()
    };
    let (sl, sg) = TextEncoder::load_all(&fixture("tiny-sdxl.safetensors"), &single_opts).unwrap();
    let sg = sg.expect("SDXL has a second text encoder");
    let prompt = ReferencePrompt::new(&exp["te.input_ids_l"]);
    let ids = &prompt.ids;
    let (inj_l, inj_g) = both_tables(&prompt, &exp);
    let (context, pooled) =
        encode_context(&[(&l, Some(&inj_l)), (&g, Some(&inj_g))], ids, None).unwrap();
    assert_close("folder context", &context, &exp["te.context"], 1e-5);
    let pooled = pooled.expect("pooled vector");
    assert_close("folder pooled", &pooled, &exp["te2.pooled_eos"], 1e-5);
    let (s_context, s_pooled) =
        encode_context(&[(&sl, Some(&inj_l)), (&sg, Some(&inj_g))], ids, None).unwrap();
    assert_close("single-file context vs folder", &s_context, &context, 1e-6);
    assert_close(
        "single-file pooled vs folder",
        &s_pooled.expect("pooled vector"),
        &pooled,
        1e-6,
    );
}
