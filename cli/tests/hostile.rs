//! Every command given hostile input, as a user would: out-of-range flags, special files,
//! texts too short to score, models whose metadata or weights are nonsense. Each run is
//! under a 2 GiB address-space limit (an allocation sized by a bad number would abort) and a
//! one-minute watchdog (a FIFO would hang); each must exit with status 2 and a message that
//! names the flag or file, never a panic (101), an abort (134) or a success (0).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn golden(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/golden")
        .join(rel)
}

/// A fresh directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("edgetune-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mkfifo(path: &Path) {
    assert!(Command::new("mkfifo").arg(path).status().unwrap().success());
}

/// Runs `edgetune args` under the memory limit and the watchdog: (exit code, stderr).
fn run(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 2097152 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_edgetune"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("edgetune {args:?}: no exit within a minute (hang?)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code(), err)
}

/// The tiny Llama as a directory with a tokenizer, plus files the cases point at.
struct Fixture {
    tmp: Scratch,
}

impl Fixture {
    fn new(name: &str) -> Fixture {
        let tmp = Scratch::new(name);
        let m = tmp.0.join("model");
        std::fs::create_dir_all(&m).unwrap();
        for (from, to) in [
            ("tiny/llama_gqa_tied/config.json", "config.json"),
            ("tiny/llama_gqa_tied/model.safetensors", "model.safetensors"),
            ("tokenizer/tokenizer.json", "tokenizer.json"),
            ("tokenizer/tokenizer_config.json", "tokenizer_config.json"),
        ] {
            std::fs::copy(golden(from), m.join(to)).unwrap();
        }
        Fixture { tmp }
    }

    fn path(&self, rel: &str) -> String {
        self.tmp.0.join(rel).display().to_string()
    }

    fn model(&self) -> String {
        self.path("model")
    }

    /// A copy of the model directory with config.json edited.
    fn model_with_config(&self, name: &str, edit: impl Fn(&mut serde_json::Value)) -> String {
        let dir = self.tmp.0.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for f in [
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            std::fs::copy(self.tmp.0.join("model").join(f), dir.join(f)).unwrap();
        }
        let mut cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(self.tmp.0.join("model/config.json")).unwrap(),
        )
        .unwrap();
        edit(&mut cfg);
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        dir.display().to_string()
    }
}

#[test]
fn commands_reject_hostile_input_with_exit_2_and_a_named_cause() {
    let fx = Fixture::new("hostile");
    let m = fx.model();
    let fifo = fx.path("fifo");
    mkfifo(Path::new(&fifo));
    let empty = fx.path("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let text = fx.path("text.txt");
    std::fs::write(&text, "the numbers, a robot and the tokens").unwrap();
    let fifo_tok = fx.model_with_config("fifo_tok", |_| {});
    std::fs::remove_file(Path::new(&fifo_tok).join("tokenizer.json")).unwrap();
    mkfifo(&Path::new(&fifo_tok).join("tokenizer.json"));
    let zero_theta = fx.model_with_config("theta", |c| {
        c["rope_parameters"]["rope_theta"] = serde_json::json!(0.0)
    });
    let many_layers = fx.model_with_config("layers", |c| {
        c["num_hidden_layers"] = serde_json::json!(1_000_000_000)
    });
    let huge_context = fx.model_with_config("context", |c| {
        c["max_position_embeddings"] = serde_json::json!(4_000_000_000u64)
    });
    let gguf = golden("tiny/llama_gqa_tied/q8_0.gguf")
        .display()
        .to_string();
    let long_prompt = "the numbers ".repeat(100);
    let ids_65 = vec!["1"; 65].join(",");
    let cpu = ["--backend", "cpu"];
    let g = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["generate", "--model", &m, "--prompt", "the robot"]
            .iter()
            .chain(cpu.iter())
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let own = |args: &[&str]| args.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let cases: Vec<(Vec<String>, String)> = vec![
        (
            g(&["--max-tokens", "0"]),
            "--max-tokens: 0 is outside 1..=".into(),
        ),
        (
            g(&["--max-tokens", "18446744073709551615"]),
            "--max-tokens: 18446744073709551615 is outside 1..=".into(),
        ),
        (g(&["--top-p", "0"]), "--top-p: 0 must be in (0, 1]".into()),
        (
            g(&["--top-p", "1.5"]),
            "--top-p: 1.5 must be in (0, 1]".into(),
        ),
        (
            g(&["--top-p", "NaN"]),
            "--top-p: NaN must be in (0, 1]".into(),
        ),
        (
            g(&["--temperature=-1"]),
            "--temperature: -1 must be finite and >= 0".into(),
        ),
        (
            g(&["--temperature", "inf"]),
            "--temperature: inf must be finite and >= 0".into(),
        ),
        (
            g(&["--top-k", "1000"]),
            "--top-k: 1000 is outside 0..=128".into(),
        ),
        (
            g(&["--repetition-penalty", "0"]),
            "--repetition-penalty: 0 must be finite and > 0".into(),
        ),
        (
            own(&[
                "generate",
                "--model",
                &m,
                "--backend",
                "cpu",
                "--prompt",
                &long_prompt,
            ]),
            "--prompt: 200 is outside 1..=64 (tokens; the model's context is 64)".into(),
        ),
        (
            own(&[
                "generate",
                "--model",
                &huge_context,
                "--backend",
                "cpu",
                "--prompt",
                "the",
                "--max-tokens",
                "3999999990",
            ]),
            "kv cache".into(),
        ),
        (
            own(&[
                "perplexity",
                "--model",
                &m,
                "--backend",
                "cpu",
                "--text",
                &text,
                "--window",
                "1",
            ]),
            "--window: 1 is outside 2..=64".into(),
        ),
        (
            own(&[
                "perplexity",
                "--model",
                &m,
                "--backend",
                "cpu",
                "--text",
                &text,
                "--window",
                "100000",
            ]),
            "--window: 100000 is outside 2..=64".into(),
        ),
        (
            own(&[
                "perplexity",
                "--model",
                &m,
                "--backend",
                "cpu",
                "--text",
                &empty,
            ]),
            "holds 0 tokens; perplexity needs at least 2".into(),
        ),
        (
            own(&[
                "perplexity",
                "--model",
                &m,
                "--backend",
                "cpu",
                "--text",
                &fifo,
            ]),
            "fifo: is a FIFO, not a regular file".into(),
        ),
        (
            own(&[
                "perplexity",
                "--model",
                &m,
                "--backend",
                "cpu",
                "--text",
                "/dev/zero",
            ]),
            "/dev/zero: is a character device, not a regular file".into(),
        ),
        (
            own(&[
                "logits",
                "--model",
                &m,
                "--backend",
                "cpu",
                "--tokens",
                "",
                "--out",
                "/dev/null",
            ]),
            "--tokens: `` is not a token id".into(),
        ),
        (
            own(&[
                "logits",
                "--model",
                &m,
                "--backend",
                "cpu",
                "--tokens",
                "1,,2",
                "--out",
                "/dev/null",
            ]),
            "--tokens: `` is not a token id".into(),
        ),
        (
            own(&[
                "logits",
                "--model",
                &m,
                "--backend",
                "cpu",
                "--tokens=-1",
                "--out",
                "/dev/null",
            ]),
            "--tokens: `-1` is not a token id".into(),
        ),
        (
            own(&[
                "logits",
                "--model",
                &m,
                "--backend",
                "cpu",
                "--tokens",
                &ids_65,
                "--out",
                "/dev/null",
            ]),
            "--tokens: 65 is outside 1..=64".into(),
        ),
        (
            own(&[
                "logits",
                "--model",
                &fifo,
                "--backend",
                "cpu",
                "--tokens",
                "1",
                "--out",
                "/dev/null",
            ]),
            "is a FIFO, not a regular file".into(),
        ),
        (
            own(&[
                "logits",
                "--model",
                &zero_theta,
                "--backend",
                "cpu",
                "--tokens",
                "1",
                "--out",
                "/dev/null",
            ]),
            "`rope_parameters.rope_theta`: is a number (0.0), expected a finite positive number"
                .into(),
        ),
        (
            own(&[
                "logits",
                "--model",
                &many_layers,
                "--backend",
                "cpu",
                "--tokens",
                "1",
                "--out",
                "/dev/null",
            ]),
            "declares 1000000000 layers but the model's tensors are for 2".into(),
        ),
        (
            own(&[
                "logits",
                "--model",
                &gguf,
                "--quantize",
                "q8_0",
                "--backend",
                "cpu",
                "--tokens",
                "1",
                "--out",
                "/dev/null",
            ]),
            "a GGUF file is already quantised".into(),
        ),
        (
            own(&["tokenize", "--model", &fifo_tok, "--text", "hi"]),
            "tokenizer.json: is a FIFO, not a regular file".into(),
        ),
        (
            own(&["info", &fifo]),
            "is a FIFO, not a regular file".into(),
        ),
        (
            own(&["selftest", "--kernel", "nosuch"]),
            "--kernel: no kernel name contains `nosuch`; the kernels are: matmul".into(),
        ),
        (
            own(&[
                "bench",
                "--backend",
                "cpu",
                "--model",
                &gguf,
                "--prompt-tokens",
                "0",
            ]),
            "--prompt-tokens: 0 is outside 1..=".into(),
        ),
        (
            own(&[
                "bench",
                "--backend",
                "cpu",
                "--model",
                &gguf,
                "--prompt-tokens",
                "1000000000000",
            ]),
            "--prompt-tokens: 1000000000000 is outside 1..=".into(),
        ),
        (
            own(&["bench", "--backend", "cpu", "--seconds", "NaN"]),
            "--seconds: NaN must be in (0, 3600]".into(),
        ),
    ];
    let mut failures = Vec::new();
    for (args, want) in &cases {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, err) = run(&argv);
        if code != Some(2) || !err.contains(want.as_str()) || err.contains("panicked") {
            failures.push(format!(
                "{args:?}: exit {code:?}, stderr `{err}`, expected `{want}`"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn the_same_fixture_runs_when_the_input_is_sound() {
    // The control for the table above: its fixture is a working model, so the failures
    // there come from the hostile parts alone.
    let fx = Fixture::new("sound");
    let text = fx.path("text.txt");
    std::fs::write(&text, "the numbers, a robot and the tokens").unwrap();
    let m = fx.model();
    for args in [
        vec![
            "perplexity",
            "--model",
            &m,
            "--backend",
            "cpu",
            "--text",
            &text,
            "--window",
            "8",
        ],
        vec![
            "generate",
            "--model",
            &m,
            "--backend",
            "cpu",
            "--prompt",
            "the robot",
            "--max-tokens",
            "4",
        ],
        vec![
            "logits",
            "--model",
            &m,
            "--backend",
            "cpu",
            "--tokens",
            "1,2,3",
            "--out",
            "/dev/null",
        ],
    ] {
        let (code, err) = run(&args);
        assert_eq!(code, Some(0), "{args:?}: {err}");
    }
}
