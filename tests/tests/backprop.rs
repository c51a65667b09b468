//! Backpropagation against PyTorch + PEFT autograd (golden file from
//! tools/reference/backprop_golden.py): on the tiny random models with LoRA and IA3
//! adapters made by peft, the loss and every adapter tensor's gradient over a batch of two
//! sequences (one with a prompt masked out of the loss) equal PyTorch's, on the CPU
//! reference, the threaded host path and the GPU.

mod common;

use edgetune::Backend;
use edgetune::adapter::peft::attach_dir;
use edgetune::backend::cpu::Cpu;
use edgetune::backend::host::Host;
use edgetune::model::files::ModelFiles;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("golden")
}

fn golden() -> Value {
    let text = std::fs::read_to_string(golden_dir().join("backprop/gradients.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The batch: (tokens, targets) per sequence.
fn sequences(g: &Value) -> Vec<(Vec<u32>, Vec<bool>)> {
    g["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let tokens = s["tokens"].as_array().unwrap();
            let mask = s["mask"].as_array().unwrap();
            (
                tokens.iter().map(|t| t.as_u64().unwrap() as u32).collect(),
                mask.iter().map(|m| m.as_bool().unwrap()).collect(),
            )
        })
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// max |got - want| / max |want|.
fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f32, |a, b| a.max(b.abs()));
    let diff = got
        .iter()
        .zip(want)
        .fold(0.0f32, |a, (x, y)| a.max((x - y).abs()));
    diff / scale
}

/// Every case's loss and gradients on `be`; returns the failures.
fn check_gradients<B: Backend>(be: &B) -> Vec<String> {
    let g = golden();
    let seqs = sequences(&g);
    let count: usize = seqs
        .iter()
        .map(|(_, m)| m.iter().skip(1).filter(|&&b| b).count())
        .sum();
    let mut failures = Vec::new();
    let cases = g["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 4);
    for (case, want) in cases {
        let model_name = case.split('/').next().unwrap();
        let files = ModelFiles::open(&golden_dir().join("tiny").join(model_name), None).unwrap();
        let mut model = files.load(be).unwrap();
        let adapter = golden_dir()
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .join(want["adapter"].as_str().unwrap());
        attach_dir(&mut model, &adapter).unwrap();
        let mut tape = model.tape(8).unwrap();
        let grads = model.grad_buffers().unwrap();
        let mut total = 0.0;
        for (tokens, mask) in &seqs {
            let (sum, n) = model
                .backward(&mut tape, tokens, mask, 1.0 / count as f32, &grads)
                .unwrap();
            assert!(n > 0);
            total += sum;
        }
        let loss = total / count as f64;
        let want_loss = want["loss"].as_f64().unwrap();
        if (loss - want_loss).abs() > 1e-5 * want_loss.abs() {
            failures.push(format!("{case}: loss {loss} vs PyTorch {want_loss}"));
        }
        let mut worst = (0.0f32, String::new());
        for (p, buf) in model.layout().iter().zip(&grads) {
            let got = be.read_f32(buf, p.len() as usize).unwrap();
            let w = floats(&want["grads"][&p.name]);
            let e = rel_err(&got, &w);
            if e.is_nan() || e > worst.0 {
                worst = (e, p.name.clone());
            }
        }
        eprintln!(
            "{case}: loss {loss} (PyTorch {want_loss}), worst gradient {} ({})",
            worst.0, worst.1
        );
        if worst.0.is_nan() || worst.0 > 2e-5 {
            failures.push(format!(
                "{case}: gradient of {} differs from PyTorch's by {} of its largest value",
                worst.1, worst.0
            ));
        }
    }
    failures
}

#[test]
fn gradients_equal_pytorch_on_the_cpu_reference() {
    let f = check_gradients(&Cpu);
    assert!(f.is_empty(), "{f:#?}");
}

#[test]
fn gradients_equal_pytorch_on_the_host_path() {
    let f = check_gradients(&Host::new(2));
    assert!(f.is_empty(), "{f:#?}");
}

#[test]
fn gradients_equal_pytorch_on_the_gpu() {
    let Some(gpu) = common::gpu() else { return };
    let f = check_gradients(&gpu);
    assert!(f.is_empty(), "{f:#?}");
}
