//! PEFT interop, both directions (golden files from tools/reference/peft_golden.py):
//! LoRA and IA3 adapters made by Python `peft` load in edgetune and give peft's logits, and
//! adapters written by `edgetune train` load in `peft` and give the logits edgetune computes
//! with them. Each adapter must move the logits well past the tolerance, so a load that
//! silently ignored the tensors could not pass.

mod common;

use edgetune::Backend;
use edgetune::adapter::peft::attach_dir;
use edgetune::backend::cpu::Cpu;
use edgetune::model::files::ModelFiles;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("golden")
}

fn check_all<B: Backend>(be: &B) -> Vec<String> {
    let g: Value =
        serde_json::from_str(&std::fs::read_to_string(golden().join("peft/logits.json")).unwrap())
            .unwrap();
    let tokens: Vec<u32> = g["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    let cases = g["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 12);
    let mut failures = Vec::new();
    // Each adapter on the Hugging Face checkpoint it was made on, and the Llama ones also
    // on the GGUF conversion, whose q/k rows are permuted for interleaved RoPE.
    let runs = cases.iter().flat_map(|(case, want)| {
        let gguf = case.starts_with("llama").then_some("f32.gguf");
        [Some(""), gguf]
            .into_iter()
            .flatten()
            .map(move |file| (case, want, file))
    });
    for (case, want, file) in runs {
        let want: Vec<f32> = want
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
            })
            .collect();
        let model_name = case.split('/').next().unwrap();
        let files =
            ModelFiles::open(&golden().join("tiny").join(model_name).join(file), None).unwrap();
        let plain = files.load(be).unwrap();
        let mut cache = plain.new_cache(16).unwrap();
        let base = plain.forward(&mut cache, &tokens, true).unwrap();
        let mut model = files.load(be).unwrap();
        attach_dir(&mut model, &golden().join("peft").join(case)).unwrap();
        let mut cache = model.new_cache(16).unwrap();
        let got = model.forward(&mut cache, &tokens, true).unwrap();
        let range = want.iter().fold(f32::MIN, |a, &b| a.max(b))
            - want.iter().fold(f32::MAX, |a, &b| a.min(b));
        let worst = |x: &[f32]| {
            x.iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max)
                / range
        };
        let (err, moved) = (worst(&got), worst(&base));
        if err.is_nan() || err >= 2e-4 || moved < 1e-2 {
            failures.push(format!(
                "{case} on {model_name}/{file}: max |diff| / range = {err} (the adapter moves the logits by {moved})"
            ));
        }
    }
    failures
}

#[test]
fn peft_adapters_match_on_the_cpu_reference() {
    let f = check_all(&Cpu);
    assert!(f.is_empty(), "{f:#?}");
}

#[test]
fn peft_adapters_match_on_the_gpu() {
    let Some(gpu) = common::gpu() else { return };
    let f = check_all(&gpu);
    assert!(f.is_empty(), "{f:#?}");
}

#[test]
fn mismatched_adapters_are_typed_errors() {
    let dir = golden().join("peft/llama_gqa_tied/lora_from_peft");
    // The same adapter on a model with other shapes: named tensor, no panic.
    let files = ModelFiles::open(&golden().join("tiny/qwen2_gqa_bias"), None).unwrap();
    let mut model = files.load(&Cpu).unwrap();
    let err = attach_dir(&mut model, &dir).unwrap_err().to_string();
    assert!(err.contains("lora_A") || err.contains("lora_B"), "{err}");
    assert!(model.adapter().is_none());
    // A model file given as an adapter, and an adapter with a NaN, are named.
    let gguf_model = golden().join("tiny/llama_gqa_tied/f32.gguf");
    let files = ModelFiles::open(&gguf_model, None).unwrap();
    let mut model = files.load(&Cpu).unwrap();
    let err = attach_dir(&mut model, &gguf_model).unwrap_err().to_string();
    assert!(err.contains("general.type"), "{err}");
    let nan_dir = std::env::temp_dir().join(format!("edgetune-nan-{}", std::process::id()));
    std::fs::create_dir_all(&nan_dir).unwrap();
    std::fs::copy(
        dir.join("adapter_config.json"),
        nan_dir.join("adapter_config.json"),
    )
    .unwrap();
    let mut bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let n = bytes.len();
    bytes[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(nan_dir.join("adapter_model.safetensors"), bytes).unwrap();
    let mut model = ModelFiles::open(&golden().join("tiny/llama_gqa_tied"), None)
        .unwrap()
        .load(&Cpu)
        .unwrap();
    let err = attach_dir(&mut model, &nan_dir).unwrap_err().to_string();
    assert!(err.contains("not finite"), "{err}");
    std::fs::remove_dir_all(&nan_dir).unwrap();
}

/// A PEFT adapter exported as llama.cpp's GGUF LoRA and read back gives the same logits,
/// on a GGUF Llama (q/k rows permuted both ways) and on a Qwen2 directory; formats that
/// cannot hold an adapter are refused by name. (That llama.cpp reads the export as edgetune
/// does is checked by scripts/check_gguf_lora.py, recorded in README.md.)
#[test]
fn gguf_lora_export_round_trips() {
    use edgetune::adapter::{gguf, layout, peft};
    for (model_path, case) in [
        (
            "tiny/llama_gqa_tied/f32.gguf",
            "peft/llama_gqa_tied/lora_from_peft",
        ),
        (
            "tiny/qwen2_gqa_bias",
            "peft/qwen2_gqa_bias/lora_from_edgetune",
        ),
    ] {
        let files = ModelFiles::open(&golden().join(model_path), None).unwrap();
        let tokens = [3u32, 17, 0, 42, 5];
        let logits_with = |adapter: &Path| {
            let mut m = files.load(&Cpu).unwrap();
            attach_dir(&mut m, adapter).unwrap();
            let mut cache = m.new_cache(8).unwrap();
            m.forward(&mut cache, &tokens, true).unwrap()
        };
        let cfg = files.config().unwrap();
        let dims = files.dims().unwrap();
        let dir = golden().join(case);
        let (acfg, values) =
            peft::load(&dir, |c| layout(c, &dims), peft::RowOrder::of(&cfg)).unwrap();
        let out = std::env::temp_dir().join(format!("edgetune-lora-{}.gguf", std::process::id()));
        gguf::save(&out, &acfg, &layout(&acfg, &dims), &values, &cfg).unwrap();
        assert_eq!(logits_with(&dir), logits_with(&out), "{case}");
        // Exported from the Hugging Face directory, the file holds llama.cpp's row order:
        // on the GGUF conversion it gives what the PEFT adapter gives there.
        if model_path == "tiny/llama_gqa_tied" {
            let gguf_model =
                ModelFiles::open(&golden().join("tiny/llama_gqa_tied/f32.gguf"), None).unwrap();
            let on_gguf = |adapter: &Path| {
                let mut m = gguf_model.load(&Cpu).unwrap();
                attach_dir(&mut m, adapter).unwrap();
                let mut cache = m.new_cache(8).unwrap();
                m.forward(&mut cache, &tokens, true).unwrap()
            };
            let (a, b) = (on_gguf(&dir), on_gguf(&out));
            let worst = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            assert!(
                worst < 1e-4,
                "{case}: HF-directory export on the GGUF model: {worst}"
            );
        }
        std::fs::remove_file(&out).unwrap();
    }
    let files = ModelFiles::open(&golden().join("tiny/llama_gqa_tied"), None).unwrap();
    let cfg = files.config().unwrap();
    let dims = files.dims().unwrap();
    let dir = golden().join("peft/llama_gqa_tied/ia3_from_peft");
    let (acfg, values) = peft::load(&dir, |c| layout(c, &dims), peft::RowOrder::of(&cfg)).unwrap();
    let out = std::env::temp_dir().join("edgetune-never-written.gguf");
    let err = gguf::save(&out, &acfg, &layout(&acfg, &dims), &values, &cfg).unwrap_err();
    assert!(err.to_string().contains("LoRA only"), "{err}");
    assert!(!out.exists());
}

/// rsLoRA has no flag in llama.cpp's format, which scales by alpha / rank: it is exported as
/// the alpha that gives alpha / sqrt(rank), and gives the same logits read back.
#[test]
fn rslora_exports_as_the_equivalent_alpha() {
    use edgetune::adapter::{Method, gguf, layout, peft};
    let files = ModelFiles::open(&golden().join("tiny/llama_gqa_tied/f32.gguf"), None).unwrap();
    let cfg = files.config().unwrap();
    let dims = files.dims().unwrap();
    let dir = golden().join("peft/llama_gqa_tied/lora_from_peft");
    let (mut acfg, values) =
        peft::load(&dir, |c| layout(c, &dims), peft::RowOrder::of(&cfg)).unwrap();
    if let Method::Lora { rslora, .. } = &mut acfg.method {
        *rslora = true;
    }
    let tokens = [3u32, 17, 0, 42, 5];
    let mut m = files.load(&Cpu).unwrap();
    m.attach(acfg.clone(), 0).unwrap();
    m.write_params(&values).unwrap();
    let mut cache = m.new_cache(8).unwrap();
    let want = m.forward(&mut cache, &tokens, true).unwrap();
    let out = std::env::temp_dir().join(format!("edgetune-rslora-{}.gguf", std::process::id()));
    gguf::save(&out, &acfg, &layout(&acfg, &dims), &values, &cfg).unwrap();
    let mut m = files.load(&Cpu).unwrap();
    attach_dir(&mut m, &out).unwrap();
    let mut cache = m.new_cache(8).unwrap();
    let got = m.forward(&mut cache, &tokens, true).unwrap();
    std::fs::remove_file(&out).unwrap();
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "{worst}");
}
