//! `edgetune train`, `replay`, `score` and `adapter export` as users run them, on the tiny
//! Q4_0 model with pre-tokenised data: a run's hash is what `replay` prints, a resumed run
//! ends where an uninterrupted one does, and bad input exits 2 with a message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn edgetune(args: &[&str]) -> Output {
    // The tests' own kernel shape cache: shapes measured while other tests load the machine
    // must not become what the user's commands run with.
    Command::new(env!("CARGO_BIN_EXE_edgetune"))
        .env(
            "EDGETUNE_CACHE_DIR",
            std::env::temp_dir().join("edgetune-test-autotune"),
        )
        .args(args)
        .output()
        .unwrap()
}

fn model() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/golden/tiny/llama_gqa_tied/q4_0.gguf")
        .display()
        .to_string()
}

/// A fresh directory holding data.jsonl (16 sequences that follow a rule).
fn workdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("edgetune-cli-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let lines: String = (0..16)
        .map(|i| {
            let ids: Vec<String> = std::iter::once(1)
                .chain((0..12).map(|k| (i * 7 + 3 * k) % 60 + 2))
                .map(|t| t.to_string())
                .collect();
            let labels: Vec<String> = ids
                .iter()
                .enumerate()
                .map(|(j, t)| if j < 4 { "-100".into() } else { t.clone() })
                .collect();
            format!(
                "{{\"input_ids\":[{}],\"labels\":[{}]}}\n",
                ids.join(","),
                labels.join(",")
            )
        })
        .collect();
    std::fs::write(d.join("data.jsonl"), lines).unwrap();
    d
}

fn hash_of(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    assert!(last.starts_with("state-hash: "), "{text}");
    last.to_owned()
}

fn train(dir: &Path, run: &str, extra: &[&str]) -> Output {
    let (data, out) = (dir.join("data.jsonl"), dir.join(run));
    let mut args = vec![
        "train",
        "--model",
        &model(),
        "--data",
        data.to_str().unwrap(),
        "--backend",
        "cpu",
        "--targets",
        "q,v,down",
        "--mode",
        "kseed",
        "--seeds",
        "64",
        "--batch",
        "2",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect::<Vec<_>>();
    if !extra.contains(&"--resume") {
        args.extend(["--out".into(), out.display().to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    edgetune(&args)
}

fn expect_error(out: &Output, text: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(text), "expected `{text}` in: {err}");
}

#[test]
fn a_run_replays_to_its_hash_and_resumes_where_it_stopped() {
    let dir = workdir("run");
    let whole = hash_of(&train(&dir, "whole", &["--steps", "8"]));
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "history.jsonl",
        "session.json",
        "w0.safetensors",
        "loss.svg",
        "loss.csv",
        "progress.json",
    ] {
        assert!(dir.join("whole").join(f).is_file(), "{f} missing");
    }
    let replayed = edgetune(&[
        "replay",
        "--model",
        &model(),
        "--history",
        dir.join("whole").to_str().unwrap(),
        "--backend",
        "cpu",
    ]);
    assert_eq!(hash_of(&replayed), whole);
    // Half, then resumed to the end.
    hash_of(&train(&dir, "halves", &["--steps", "4"]));
    let halves = dir.join("halves");
    let resumed = train(
        &dir,
        "",
        &["--resume", halves.to_str().unwrap(), "--steps", "8"],
    );
    assert_eq!(hash_of(&resumed), whole);
    // Resuming with other settings, or into an existing run without --resume, is refused.
    let other = train(
        &dir,
        "",
        &["--resume", halves.to_str().unwrap(), "--seed", "9"],
    );
    expect_error(&other, "--seed");
    expect_error(
        &train(&dir, "whole", &["--steps", "2"]),
        "already holds a run",
    );
    // A cut-off history is named, not applied.
    let history = dir.join("whole/history.jsonl");
    let text = std::fs::read_to_string(&history).unwrap();
    std::fs::write(&history, &text[..text.len() - 3]).unwrap();
    let bad = edgetune(&[
        "replay",
        "--model",
        &model(),
        "--history",
        dir.join("whole").to_str().unwrap(),
    ]);
    expect_error(&bad, "truncated");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_training_input_exits_2_with_a_message() {
    let dir = workdir("bad");
    std::fs::write(
        dir.join("data.jsonl"),
        "{\"input_ids\": [1]}\nnot json\n{}\n",
    )
    .unwrap();
    expect_error(&train(&dir, "r", &["--steps", "2"]), "unusable");
    assert!(
        !dir.join("r").exists(),
        "a failed start left a run directory"
    );
    let dir = workdir("flags");
    expect_error(&train(&dir, "r", &["--lr", "2"]), "--lr");
    expect_error(&train(&dir, "r", &["--targets", "q,x"]), "--targets");
    expect_error(&train(&dir, "r", &["--clip", "0"]), "--clip");
    // Trained norms have no place in llama.cpp's adapter format (IA3 is merged instead).
    hash_of(&train(
        &dir,
        "norms",
        &["--steps", "1", "--trainable", "norms"],
    ));
    let export = edgetune(&[
        "adapter",
        "export",
        "--gguf",
        "--model",
        &model(),
        "--adapter",
        dir.join("norms").to_str().unwrap(),
        "--out",
        dir.join("norms.gguf").to_str().unwrap(),
    ]);
    expect_error(&export, "LoRA only");
    std::fs::remove_dir_all(&dir).unwrap();
    let _ = std::fs::remove_dir_all(workdir("bad"));
}

/// `--trainable scales` and FedKSeed-Pro seed weights from the command line: the run draws
/// only seeds with a weight, keeps the weights in its session, replays to its hash, and
/// exports a whole GGUF model that loads; bad weight files are refused.
#[test]
fn a_scales_run_with_seed_weights_exports_a_model() {
    let dir = workdir("scales");
    let weights: Vec<String> = (0..64)
        .map(|i| if i % 8 == 3 { "5" } else { "0" }.to_string())
        .collect();
    let wfile = dir.join("weights.json");
    std::fs::write(&wfile, format!("[{}]", weights.join(","))).unwrap();
    let w = wfile.to_str().unwrap();
    let run = dir.join("scales");
    let hash = hash_of(&train(
        &dir,
        "scales",
        &["--steps", "6", "--trainable", "scales", "--seed-weights", w],
    ));
    let history = std::fs::read_to_string(run.join("history.jsonl")).unwrap();
    let seeds: Vec<u64> = history
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["seed"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert!(
        !seeds.is_empty() && seeds.iter().all(|s| s % 8 == 3),
        "{seeds:?}"
    );
    let session: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("session.json")).unwrap()).unwrap();
    assert_eq!(session["seed_weights"].as_array().unwrap().len(), 64);
    let replayed = edgetune(&[
        "replay",
        "--model",
        &model(),
        "--history",
        run.to_str().unwrap(),
    ]);
    assert_eq!(hash_of(&replayed), hash);
    let merged = dir.join("merged.gguf");
    let export = edgetune(&[
        "adapter",
        "export",
        "--gguf",
        "--model",
        &model(),
        "--adapter",
        run.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    let npy = dir.join("l.npy");
    let logits = edgetune(&[
        "logits",
        "--model",
        merged.to_str().unwrap(),
        "--tokens",
        "1,5,9",
        "--out",
        npy.to_str().unwrap(),
    ]);
    assert!(
        logits.status.success(),
        "{}",
        String::from_utf8_lossy(&logits.stderr)
    );

    std::fs::write(&wfile, "[0, 0]").unwrap();
    expect_error(
        &train(&dir, "r", &["--seed-weights", w]),
        "2 weights for K = 64",
    );
    std::fs::write(&wfile, format!("[{}]", vec!["0"; 64].join(","))).unwrap();
    expect_error(&train(&dir, "r", &["--seed-weights", w]), "above zero");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A backprop run: stopped at step 3 and resumed to 6 it ends with the adapter of an
/// uninterrupted 6-step run, with the run's files written; a cosine run refuses to change
/// its length on resume; bad settings exit 2 with a message; `adapter merge` refuses a
/// GGUF model and writes a safetensors one that `logits` loads.
#[test]
fn a_backprop_run_resumes_exactly_and_merges() {
    let dir = workdir("backprop");
    let bp = ["--method", "backprop", "--lr", "5e-2", "--seq-len", "16"];
    let ok = |out: Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    fn with<'a>(bp: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        [bp, extra].concat()
    }
    ok(train(&dir, "straight", &with(&bp, &["--steps", "6"])));
    ok(train(&dir, "part", &with(&bp, &["--steps", "3"])));
    let part = dir.join("part").display().to_string();
    ok(train(
        &dir,
        "part",
        &with(&bp, &["--steps", "6", "--resume", &part]),
    ));
    let weights =
        |run: &str| std::fs::read(dir.join(run).join("adapter_model.safetensors")).unwrap();
    assert_eq!(weights("straight"), weights("part"));
    // A resumed run keeps its settings: another learning rate is refused.
    expect_error(
        &train(
            &dir,
            "part",
            &with(&bp, &["--steps", "7", "--lr", "1e-3", "--resume", &part]),
        ),
        "--lr",
    );
    for f in [
        "adapter_config.json",
        "checkpoint.safetensors",
        "backprop.json",
        "loss.csv",
        "loss.svg",
    ] {
        assert!(dir.join("part").join(f).is_file(), "{f} missing");
    }
    ok(train(
        &dir,
        "cos",
        &with(&bp, &["--steps", "3", "--schedule", "cosine"]),
    ));
    let cos = dir.join("cos").display().to_string();
    expect_error(
        &train(&dir, "cos", &with(&bp, &["--steps", "6", "--resume", &cos])),
        "--steps",
    );
    expect_error(&train(&dir, "a", &with(&bp, &["--lr", "nan"])), "--lr");
    expect_error(
        &train(&dir, "b", &with(&bp, &["--trainable", "scales"])),
        "backprop trains lora or ia3",
    );
    expect_error(
        &train(&dir, "c", &with(&bp, &["--warmup", "500"])),
        "--warmup",
    );
    expect_error(
        &train(&dir, "d", &with(&bp, &["--max-memory", "0"])),
        "needs",
    );
    // Merging: a GGUF model is refused; a safetensors model is written and loads.
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden");
    let adapter = golden.join("peft/llama_gqa_tied/lora_from_peft");
    let merged = dir.join("merged");
    let merge = |m: &str| {
        edgetune(&[
            "adapter",
            "merge",
            "--model",
            m,
            "--adapter",
            adapter.to_str().unwrap(),
            "--out",
            merged.to_str().unwrap(),
        ])
    };
    expect_error(&merge(&model()), "adapter export --gguf");
    ok(merge(golden.join("tiny/llama_gqa_tied").to_str().unwrap()));
    ok(edgetune(&[
        "logits",
        "--model",
        merged.to_str().unwrap(),
        "--tokens",
        "1,2,3",
        "--out",
        dir.join("logits.npy").to_str().unwrap(),
        "--backend",
        "cpu",
    ]));
    std::fs::remove_dir_all(&dir).unwrap();
}
