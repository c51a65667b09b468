//! Small random Llama and Qwen2 models against Hugging Face transformers (golden logits
//! from tools/reference/tiny_models.py): safetensors (f32, and quantised at load to Q8_0
//! and Q4_0; also sharded) and GGUF (F32, Q8_0, Q4_0), on the CPU reference and on the GPU.
//! The models cover GQA and MHA, tied and untied embeddings, odd sizes, rope theta, Llama 3
//! rope scaling (config.json in safetensors, `rope_freqs` in GGUF) and Qwen2's biases.
//! Quantised variants are compared with transformers running the same dequantised weights;
//! every variant must agree within 2e-4 of the logit range (f32 rounding is about 1e-6).

mod common;

use edgetune::backend::cpu::Cpu;
use edgetune::model::files::ModelFiles;
use edgetune::{Backend, WeightType};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/tiny")
}

/// (model, variant, path, load-time quantisation, golden logits key)
fn variants() -> Vec<(
    String,
    &'static str,
    PathBuf,
    Option<WeightType>,
    &'static str,
)> {
    let mut v = Vec::new();
    for name in [
        "llama_gqa_tied",
        "llama_mha_untied_odd",
        "llama_rope_llama3",
        "qwen2_gqa_bias",
    ] {
        let d = dir().join(name);
        v.push((name.to_string(), "safetensors", d.clone(), None, "f32"));
        v.push((
            name.to_string(),
            "safetensors --quantize q8_0",
            d.clone(),
            Some(WeightType::Q8_0),
            "q8_0",
        ));
        v.push((
            name.to_string(),
            "safetensors --quantize q4_0",
            d.clone(),
            Some(WeightType::Q4_0),
            "q4_0",
        ));
        for q in ["f32", "q8_0", "q4_0"] {
            v.push((name.to_string(), q, d.join(format!("{q}.gguf")), None, q));
        }
    }
    // The same Qwen2 weights as a sharded checkpoint (model.safetensors.index.json).
    v.push((
        "qwen2_gqa_bias".into(),
        "sharded safetensors",
        dir().join("qwen2_gqa_bias_sharded"),
        None,
        "f32",
    ));
    v
}

/// The golden logits file and the tokens they are of.
fn golden() -> (Value, Vec<u32>) {
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("logits.json")).unwrap()).unwrap();
    let tokens = golden["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    (golden, tokens)
}

/// max |got - want| over the range of `want`.
fn worst_diff(got: &[f32], want: &[f32]) -> f32 {
    let (lo, hi) = want
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0f32, f32::max)
        / (hi - lo)
}

fn check_all<B: Backend>(be: &B) -> Vec<String> {
    let (golden, tokens) = golden();
    let mut failures = Vec::new();
    for (name, variant, path, quantize, key) in variants() {
        let want: Vec<f32> = golden["models"][&name][key]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
            })
            .collect();
        let files = ModelFiles::open(&path, quantize).unwrap();
        let model = files.load(be).unwrap();
        let mut cache = model.new_cache(16).unwrap();
        let got = model.forward(&mut cache, &tokens, true).unwrap();
        assert_eq!(got.len(), want.len(), "{name} {variant}");
        let worst = worst_diff(&got, &want);
        if worst.is_nan() || worst >= 2e-4 {
            failures.push(format!(
                "{name} {variant}: max |diff| / logit range = {worst}"
            ));
        }
        // The training loss: mean next-token NLL, against the same from transformers'
        // logits.
        let vocab = want.len() / tokens.len();
        let want_nll = want
            .chunks_exact(vocab)
            .zip(&tokens[1..])
            .map(|(row, &next)| {
                let max = row.iter().copied().fold(f32::MIN, f32::max) as f64;
                let lse = max
                    + row
                        .iter()
                        .map(|&v| (v as f64 - max).exp())
                        .sum::<f64>()
                        .ln();
                lse - row[next as usize] as f64
            })
            .sum::<f64>()
            / (tokens.len() - 1) as f64;
        let (nll, n) = model.sequence_nll(&mut cache, &tokens).unwrap();
        let got_nll = nll / n as f64;
        let close = (got_nll - want_nll).abs() < 1e-3 * want_nll.abs().max(1.0);
        if n != tokens.len() - 1 || !close {
            failures.push(format!(
                "{name} {variant}: loss {got_nll} over {n} tokens, transformers {want_nll}"
            ));
        }
    }
    failures
}

#[test]
fn cpu_matches_transformers_on_every_format() {
    let failures = check_all(&Cpu);
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn host_matches_transformers_on_every_format() {
    let failures = check_all(&edgetune::backend::host::Host::new(3));
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn gpu_matches_transformers_on_every_format() {
    let Some(gpu) = common::gpu() else { return };
    let failures = check_all(&gpu);
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A decode step's fused kernels, forced where the device has subgroups of 8 (the add,
/// norm, q/k/v products and RoPE into the cache in one dispatch; subgroup attention, from
/// the cache buffers: these rows are too narrow for its texture copies, which
/// tests/tests/tune.rs checks with the same op): GGUF models decoded one token at a time
/// give transformers' logits at every position, as the prompt pass does above.
#[test]
fn gpu_decode_steps_on_the_fused_kernels_match_transformers() {
    use edgetune::backend::tune::{KernelShapes, Tuning};
    use edgetune::backend::wgpu::{Gpu, GpuOptions};
    if common::gpu().is_none() {
        return;
    }
    let (golden, tokens) = golden();
    let mut failures = Vec::new();
    for spec in [
        "matvec=8x8gt,matvec_wide=8x8gt,attention_decode=64dt/256",
        "matvec=16x4g,matvec_wide=16x4g,attention_decode=32d",
    ] {
        let gpu = Gpu::open(&GpuOptions {
            tuning: Tuning::Force(KernelShapes::parse(spec).unwrap()),
            cache_dir: Some(common::tune_cache()),
            ..GpuOptions::default()
        })
        .unwrap();
        let notes = &gpu.tuning().unwrap().notes;
        if notes
            .iter()
            .any(|n| n.contains("need subgroups of exactly 8"))
        {
            eprintln!("skipping: {notes:?}");
            return;
        }
        // The one model of two layers: the second takes the first's add and norm fused.
        for (name, q) in [("llama_gqa_tied", "q8_0"), ("llama_gqa_tied", "q4_0")] {
            let want: Vec<f32> = golden["models"][name][q]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|row| row.as_array().unwrap().clone())
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            let files =
                ModelFiles::open(&dir().join(name).join(format!("{q}.gguf")), None).unwrap();
            let model = files.load(&gpu).unwrap();
            let mut cache = model.new_cache(16).unwrap();
            let mut got = Vec::new();
            for &t in &tokens {
                got.extend(model.forward(&mut cache, &[t], false).unwrap());
            }
            assert_eq!(got.len(), want.len(), "{name} {q}");
            let worst = worst_diff(&got, &want);
            if worst.is_nan() || worst >= 2e-4 {
                failures.push(format!(
                    "{spec} {name} {q}: max |diff| / logit range = {worst}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn bad_model_directories_are_typed_errors() {
    let tmp = std::env::temp_dir().join(format!("edgetune-bad-model-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    // No config.json.
    assert!(matches!(
        ModelFiles::open(&tmp, None),
        Err(edgetune::Error::Io { .. })
    ));
    // An unknown architecture.
    std::fs::write(tmp.join("config.json"), r#"{"model_type": "gpt_neox"}"#).unwrap();
    let err = ModelFiles::open(&tmp, None).unwrap_err().to_string();
    assert!(err.contains("gpt_neox"), "{err}");
    // A truncated safetensors file.
    let cfg = std::fs::read_to_string(dir().join("llama_gqa_tied/config.json")).unwrap();
    std::fs::write(tmp.join("config.json"), cfg).unwrap();
    let st = std::fs::read(dir().join("llama_gqa_tied/model.safetensors")).unwrap();
    std::fs::write(tmp.join("model.safetensors"), &st[..st.len() / 2]).unwrap();
    assert!(matches!(
        ModelFiles::open(&tmp, None),
        Err(edgetune::Error::Syntax { .. })
    ));
    // --quantize with a GGUF file, and an unsupported target type.
    assert!(
        ModelFiles::open(
            &dir().join("llama_gqa_tied/f32.gguf"),
            Some(WeightType::Q8_0)
        )
        .is_err()
    );
    assert!(ModelFiles::open(&dir().join("llama_gqa_tied"), Some(WeightType::Q4K)).is_err());
    std::fs::remove_dir_all(&tmp).unwrap();
}
