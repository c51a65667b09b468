//! Backpropagation against PyTorch + PEFT autograd (golden file from
//! tools/reference/backprop_golden.py): on the tiny random models with LoRA and IA3
//! adapters made by peft, the loss and every adapter tensor's gradient over a batch of two
//! sequences (one with a prompt masked out of the loss) equal PyTorch's, on the CPU
//! reference, the threaded host path and the GPU (keeping activations, and recomputing
//! them layer by layer); and six optimiser steps (AdamW; AdamW
//! with warmup, cosine decay and clipping; SGD with momentum; AdamW over two accumulated
//! micro-batches) follow PyTorch's losses and end at its values.

mod common;

use edgetune::Backend;
use edgetune::adapter::peft::attach_dir;
use edgetune::backend::cpu::Cpu;
use edgetune::backend::host::Host;
use edgetune::model::files::ModelFiles;
use edgetune::train::Example;
use edgetune::train::backprop::{BackpropConfig, BackpropTrainer, Optimizer, Schedule};
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
fn check_gradients<B: Backend>(be: &B, recompute: bool) -> Vec<String> {
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
        let mut tape = model.tape(8, recompute).unwrap();
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
    let f = check_gradients(&Cpu, false);
    assert!(f.is_empty(), "{f:#?}");
}

#[test]
fn gradients_equal_pytorch_on_the_host_path_recomputing_activations() {
    let f = check_gradients(&Host::new(2), true);
    assert!(f.is_empty(), "{f:#?}");
}

#[test]
fn gradients_equal_pytorch_on_the_gpu() {
    let Some(gpu) = common::gpu() else { return };
    let f = check_gradients(&gpu, false);
    assert!(f.is_empty(), "{f:#?}");
    let f = check_gradients(&gpu, true);
    assert!(f.is_empty(), "{f:#?}");
}

/// The settings of one golden trajectory.
fn trajectory_config(t: &Value) -> BackpropConfig {
    let f = |k: &str| t[k].as_f64().unwrap() as f32;
    let optimizer = match t["optimizer"].as_str().unwrap() {
        "adamw" => Optimizer::AdamW {
            beta1: t["betas"][0].as_f64().unwrap() as f32,
            beta2: t["betas"][1].as_f64().unwrap() as f32,
            eps: f("eps"),
            weight_decay: f("weight_decay"),
        },
        _ => Optimizer::Sgd {
            momentum: f("momentum"),
            weight_decay: f("weight_decay"),
        },
    };
    let steps = t["steps"].as_u64().unwrap();
    BackpropConfig {
        optimizer,
        lr: f("lr"),
        schedule: if t["schedule"] == "cosine_with_warmup" {
            Schedule::Cosine
        } else {
            Schedule::Constant
        },
        warmup: t["warmup"].as_u64().unwrap(),
        total_steps: t["total_steps"].as_u64().unwrap_or(steps),
        clip: t["clip"].as_f64().map(|c| c as f32),
        micro_batches: t["micro_batches"].as_array().map_or(1, |m| m.len() as u32),
        recompute: false,
        memory_limit: None,
    }
}

/// Every case's trajectories on `be`; returns the failures.
fn check_trajectories<B: Backend>(be: &B) -> Vec<String> {
    let g = golden();
    let batch: Vec<Example> = sequences(&g)
        .into_iter()
        .map(|(tokens, targets)| Example { tokens, targets })
        .collect();
    let mut failures = Vec::new();
    for (case, want) in g["cases"].as_object().unwrap() {
        let model_name = case.split('/').next().unwrap();
        let files = ModelFiles::open(&golden_dir().join("tiny").join(model_name), None).unwrap();
        for name in ["adamw", "adamw_cosine_clip", "sgd_momentum", "adamw_accum"] {
            let t = &want[name];
            let mut model = files.load(be).unwrap();
            let adapter = golden_dir()
                .join("../..")
                .join(want["adapter"].as_str().unwrap());
            attach_dir(&mut model, &adapter).unwrap();
            let cfg = trajectory_config(t);
            let mut trainer = BackpropTrainer::start(&model, cfg, 8).unwrap();
            let mut losses = Vec::new();
            for (step, lr) in floats(&t["lrs"]).iter().enumerate() {
                let out = trainer.step(&batch).unwrap();
                assert!(!out.skipped);
                assert!(
                    (out.lr as f32 - lr).abs() <= 1e-7,
                    "{case} {name}: lr {} at step {step}, PyTorch {lr}",
                    out.lr
                );
                losses.push(out.loss as f32);
            }
            let want_losses = floats(&t["losses"]);
            let loss_err = rel_err(&losses, &want_losses);
            let mut worst = (0.0f32, String::new());
            for (p, v) in model.layout().iter().zip(model.read_params().unwrap()) {
                let e = rel_err(&v, &floats(&t["final"][&p.name]));
                if e.is_nan() || e > worst.0 {
                    worst = (e, p.name.clone());
                }
            }
            eprintln!(
                "{case} {name}: losses within {loss_err}, values within {} ({})",
                worst.0, worst.1
            );
            if loss_err.is_nan() || loss_err > 1e-5 || worst.0.is_nan() || worst.0 > 1e-4 {
                failures.push(format!(
                    "{case} {name}: losses {losses:?} vs PyTorch {want_losses:?}; values of {} differ by {} of their largest",
                    worst.1, worst.0
                ));
            }
        }
    }
    failures
}

#[test]
fn optimiser_steps_follow_pytorch_on_the_cpu_reference() {
    let f = check_trajectories(&Cpu);
    assert!(f.is_empty(), "{f:#?}");
}

#[test]
fn optimiser_steps_follow_pytorch_on_the_gpu() {
    let Some(gpu) = common::gpu() else { return };
    let f = check_trajectories(&gpu);
    assert!(f.is_empty(), "{f:#?}");
}

/// `adapter merge`'s writer: the merged model alone gives the logits of the model with the
/// adapter attached (LoRA on Llama; IA3 on Qwen2, whose k and v biases the output scales
/// also scale), and the adapter moves them.
#[test]
fn merged_models_give_the_adapters_logits() {
    use edgetune::adapter::merge::merge_into_safetensors;
    let tokens = [3u32, 17, 0, 42, 91, 5, 64];
    for (model_name, kind) in [("llama_gqa_tied", "lora"), ("qwen2_gqa_bias", "ia3")] {
        let src = golden_dir().join("tiny").join(model_name);
        let adapter = golden_dir()
            .join("peft")
            .join(model_name)
            .join(format!("{kind}_from_peft"));
        let files = ModelFiles::open(&src, None).unwrap();
        let ModelFiles::Hf(dir) = &files else {
            panic!("a safetensors model")
        };
        let cfg = files.config().unwrap();
        let dims = files.dims().unwrap();
        let order = edgetune::adapter::peft::RowOrder::of(&cfg);
        let (acfg, values) =
            edgetune::adapter::peft::load(&adapter, |c| edgetune::adapter::layout(c, &dims), order)
                .unwrap();
        let layout = edgetune::adapter::layout(&acfg, &dims);
        let out = std::env::temp_dir().join(format!(
            "edgetune-merge-{model_name}-{}",
            std::process::id()
        ));
        merge_into_safetensors(dir, &acfg, &layout, &values, &out).unwrap();
        let logits = |path: &Path, with: Option<&Path>| {
            let f = ModelFiles::open(path, None).unwrap();
            let mut m = f.load(&Cpu).unwrap();
            if let Some(a) = with {
                attach_dir(&mut m, a).unwrap();
            }
            let mut cache = m.new_cache(16).unwrap();
            m.forward(&mut cache, &tokens, true).unwrap()
        };
        let (base, adapted, merged) = (
            logits(&src, None),
            logits(&src, Some(&adapter)),
            logits(&out, None),
        );
        std::fs::remove_dir_all(&out).unwrap();
        let diff = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        };
        let (moved, err) = (diff(&base, &adapted), diff(&merged, &adapted));
        assert!(
            moved > 1e-2,
            "{model_name} {kind}: the adapter moves logits by {moved}"
        );
        assert!(
            err < 1e-4,
            "{model_name} {kind}: merged logits differ by {err} (the adapter moves them {moved})"
        );
    }
}

/// A tiny model with a LoRA (rank 4 on q, v) attached, and the golden batch.
fn tiny_lora(be: &Cpu) -> (edgetune::model::Model<'_, Cpu>, Vec<Example>) {
    let files = ModelFiles::open(&golden_dir().join("tiny/llama_gqa_tied"), None).unwrap();
    let mut model = files.load(be).unwrap();
    let cfg = edgetune::adapter::AdapterConfig::lora(
        4,
        8.0,
        &[edgetune::adapter::Target::Q, edgetune::adapter::Target::V],
    );
    model.attach(cfg, 1).unwrap();
    // B starts at zero; move it so every tensor has a gradient.
    let values: Vec<Vec<f32>> = model
        .read_params()
        .unwrap()
        .into_iter()
        .map(|v| {
            v.iter()
                .enumerate()
                .map(|(i, x)| x + 0.01 * (i % 7) as f32)
                .collect()
        })
        .collect();
    model.write_params(&values).unwrap();
    let batch = sequences(&golden())
        .into_iter()
        .map(|(tokens, targets)| Example { tokens, targets })
        .collect();
    (model, batch)
}

fn adamw(lr: f32) -> BackpropConfig {
    BackpropConfig {
        optimizer: Optimizer::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        },
        lr,
        schedule: Schedule::Cosine,
        warmup: 1,
        total_steps: 4,
        clip: Some(1.0),
        micro_batches: 1,
        recompute: false,
        memory_limit: None,
    }
}

/// Two steps, a checkpoint, a restore into a fresh model and two more steps end at the
/// bits of four uninterrupted steps; a checkpoint of another layout, or a damaged one, is
/// refused by name and leaves the run as it was.
#[test]
fn checkpoints_resume_exactly_and_refuse_other_layouts() {
    let dir = std::env::temp_dir().join(format!("edgetune-bp-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let be = Cpu;
    let (model, batch) = tiny_lora(&be);
    let mut straight = BackpropTrainer::start(&model, adamw(1e-2), 8).unwrap();
    for _ in 0..4 {
        straight.step(&batch).unwrap();
    }
    let want = model.read_params().unwrap();
    drop(straight);

    let (model, batch) = tiny_lora(&be);
    let mut first = BackpropTrainer::start(&model, adamw(1e-2), 8).unwrap();
    first.step(&batch).unwrap();
    first.step(&batch).unwrap();
    first.save(&dir, &serde_json::json!({})).unwrap();
    drop(first);
    let (model, batch) = tiny_lora(&be);
    let mut resumed = BackpropTrainer::start(&model, adamw(1e-2), 8).unwrap();
    resumed.restore(&dir).unwrap();
    assert_eq!((resumed.next_step, resumed.applied), (2, 2));
    resumed.step(&batch).unwrap();
    resumed.step(&batch).unwrap();
    assert_eq!(model.read_params().unwrap(), want);

    // Another layout (rank 2 on q): named, and nothing loaded.
    let files = ModelFiles::open(&golden_dir().join("tiny/llama_gqa_tied"), None).unwrap();
    let mut other = files.load(&be).unwrap();
    other
        .attach(
            edgetune::adapter::AdapterConfig::lora(2, 4.0, &[edgetune::adapter::Target::Q]),
            1,
        )
        .unwrap();
    let before = other.read_params().unwrap();
    let mut t = BackpropTrainer::start(&other, adamw(1e-2), 8).unwrap();
    let err = t.restore(&dir).unwrap_err().to_string();
    assert!(err.contains("another adapter layout"), "{err}");
    assert_eq!(t.next_step, 0);
    assert_eq!(other.read_params().unwrap(), before);
    // A damaged file is a typed error too.
    let path = dir.join(edgetune::train::backprop::CHECKPOINT);
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes.truncate(n / 2);
    std::fs::write(&path, &bytes).unwrap();
    let err = t.restore(&dir).unwrap_err().to_string();
    assert!(err.contains("checkpoint.safetensors"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Settings that are not finite or positive, a warmup longer than the run, no
/// micro-batches, and a run that needs more memory than allowed are refused before any
/// step, with the size needed.
#[test]
fn bad_settings_are_refused_before_the_first_step() {
    let be = Cpu;
    let (model, _) = tiny_lora(&be);
    let bad = [
        BackpropConfig {
            lr: f32::NAN,
            ..adamw(1e-2)
        },
        BackpropConfig {
            lr: 0.0,
            ..adamw(1e-2)
        },
        BackpropConfig {
            lr: -1e-3,
            ..adamw(1e-2)
        },
        BackpropConfig {
            warmup: 5,
            ..adamw(1e-2)
        },
        BackpropConfig {
            clip: Some(f32::INFINITY),
            ..adamw(1e-2)
        },
        BackpropConfig {
            micro_batches: 0,
            ..adamw(1e-2)
        },
        BackpropConfig {
            optimizer: Optimizer::AdamW {
                beta1: 1.0,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
            },
            ..adamw(1e-2)
        },
        BackpropConfig {
            optimizer: Optimizer::Sgd {
                momentum: -0.5,
                weight_decay: 0.0,
            },
            ..adamw(1e-2)
        },
    ];
    for cfg in bad {
        let shown = format!("{cfg:?}");
        assert!(
            BackpropTrainer::start(&model, cfg, 8).is_err(),
            "accepted {shown}"
        );
    }
    let err = BackpropTrainer::start(
        &model,
        BackpropConfig {
            memory_limit: Some(1 << 10),
            ..adamw(1e-2)
        },
        8,
    )
    .unwrap_err()
    .to_string();
    let need = model.tape_bytes(8, false);
    assert!(err.contains("needs") && err.contains("1024"), "{err}");
    assert!(need > 1 << 10);
    // Recomputing keeps less.
    assert!(model.tape_bytes(64, true) < model.tape_bytes(64, false));
    // Sequences longer than the tape, or token ids outside the vocabulary, are errors.
    let mut trainer = BackpropTrainer::start(&model, adamw(1e-2), 8).unwrap();
    let long = Example {
        tokens: vec![1; 9],
        targets: vec![true; 9],
    };
    assert!(trainer.step(&[long]).is_err());
    let bad_id = Example {
        tokens: vec![1, u32::MAX],
        targets: vec![true; 2],
    };
    assert!(trainer.step(&[bad_id]).is_err());
}

/// A step whose loss is not finite is skipped: reported, and nothing reaches the adapter
/// or the optimiser's count.
#[test]
fn non_finite_steps_are_skipped() {
    let be = Cpu;
    let (model, batch) = tiny_lora(&be);
    let huge: Vec<Vec<f32>> = model
        .read_params()
        .unwrap()
        .into_iter()
        .map(|v| v.iter().map(|_| 3e37f32).collect())
        .collect();
    model.write_params(&huge).unwrap();
    let mut trainer = BackpropTrainer::start(&model, adamw(1e-2), 8).unwrap();
    let out = trainer.step(&batch).unwrap();
    assert!(out.skipped, "{out:?}");
    assert!(!(out.loss.is_finite() && out.grad_norm.is_finite()));
    assert_eq!((trainer.next_step, trainer.applied), (1, 0));
    assert_eq!(model.read_params().unwrap(), huge);
}

/// Micro-batches split the batch as evenly as it allows (3 examples in 2: one, then two),
/// and the step's loss is the mean of their means; an empty batch, or one without a target
/// token, is an error that changes nothing.
#[test]
fn micro_batches_split_unevenly_and_empty_batches_are_refused() {
    let be = Cpu;
    let (model, batch) = tiny_lora(&be);
    let three = vec![batch[0].clone(), batch[1].clone(), batch[0].clone()];
    let cfg = BackpropConfig {
        micro_batches: 2,
        ..adamw(1e-2)
    };
    let mut trainer = BackpropTrainer::start(&model, cfg, 8).unwrap();
    let (first, rest) = (
        trainer.eval(&three[..1]).unwrap(),
        trainer.eval(&three[1..]).unwrap(),
    );
    let out = trainer.step(&three).unwrap();
    assert!(
        (out.loss - (first + rest) / 2.0).abs() < 1e-5,
        "{} vs {}",
        out.loss,
        (first + rest) / 2.0
    );
    let before = model.read_params().unwrap();
    assert!(trainer.step(&[]).is_err());
    let untargeted = Example {
        tokens: vec![1, 2, 3],
        targets: vec![false; 3],
    };
    assert!(trainer.step(&[untargeted]).is_err());
    assert_eq!(model.read_params().unwrap(), before);
    assert_eq!((trainer.next_step, trainer.applied), (1, 1));
}
