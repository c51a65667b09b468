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
        // The tests' own kernel shape cache: shapes measured while other tests load the machine
        // must not become what the user's commands run with.
        .env(
            "EDGETUNE_CACHE_DIR",
            std::env::temp_dir().join("edgetune-test-autotune"),
        )
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
    // The GGUF with a billion layers declared (the u32 after the key and its type tag).
    let layers_gguf = fx.path("layers.gguf");
    let mut b = std::fs::read(&gguf).unwrap();
    let key = b"llama.block_count";
    let at = b.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 4;
    b[at..at + 4].copy_from_slice(&1_000_000_000u32.to_le_bytes());
    std::fs::write(&layers_gguf, b).unwrap();
    // The model with NaN in its output norm: every logit is NaN.
    let nan = fx.model_with_config("nan", |_| {});
    let st = Path::new(&nan).join("model.safetensors");
    let mut w = std::fs::read(&st).unwrap();
    let n = u64::from_le_bytes(w[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&w[8..8 + n]).unwrap();
    let at = 8
        + n
        + header["model.norm.weight"]["data_offsets"][0]
            .as_u64()
            .unwrap() as usize;
    w[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&st, w).unwrap();
    let long_prompt = "the numbers ".repeat(100);
    let ids_65 = vec!["1"; 65].join(",");
    // Command lines: the model commands on the CPU reference, with extra flags.
    let with = |base: &[&str], extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let gen_ = |model: &str, extra: &[&str]| {
        with(
            &[
                "generate",
                "--backend",
                "cpu",
                "--model",
                model,
                "--prompt",
                "the robot",
            ],
            extra,
        )
    };
    let ppl = |model: &str, text: &str, extra: &[&str]| {
        with(
            &[
                "perplexity",
                "--backend",
                "cpu",
                "--model",
                model,
                "--text",
                text,
            ],
            extra,
        )
    };
    let logits = |model: &str, tokens: &str, extra: &[&str]| {
        let tokens = format!("--tokens={tokens}");
        with(
            &[
                "logits",
                "--backend",
                "cpu",
                "--model",
                model,
                &tokens,
                "--out",
                "/dev/null",
            ],
            extra,
        )
    };
    let bench = |extra: &[&str]| with(&["bench", "--backend", "cpu", "--model", &gguf], extra);
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            gen_(&m, &["--max-tokens", "0"]),
            "--max-tokens: 0 is outside 1..=",
        ),
        (
            gen_(&m, &["--max-tokens", "18446744073709551615"]),
            "--max-tokens: 18446744073709551615 is outside 1..=",
        ),
        (gen_(&m, &["--top-p", "0"]), "--top-p: 0 must be in (0, 1]"),
        (
            gen_(&m, &["--top-p", "1.5"]),
            "--top-p: 1.5 must be in (0, 1]",
        ),
        (
            gen_(&m, &["--top-p", "NaN"]),
            "--top-p: NaN must be in (0, 1]",
        ),
        (
            gen_(&m, &["--temperature=-1"]),
            "--temperature: -1 must be finite and >= 0",
        ),
        (
            gen_(&m, &["--temperature", "inf"]),
            "--temperature: inf must be finite and >= 0",
        ),
        (
            gen_(&m, &["--top-k", "1000"]),
            "--top-k: 1000 is outside 0..=128",
        ),
        (
            gen_(&m, &["--repetition-penalty", "0"]),
            "--repetition-penalty: 0 must be finite and > 0",
        ),
        (
            with(
                &[
                    "generate",
                    "--backend",
                    "cpu",
                    "--model",
                    &m,
                    "--prompt",
                    &long_prompt,
                ],
                &[],
            ),
            "--prompt: 200 is outside 1..=63 (tokens; the model's context is 64)",
        ),
        (
            gen_(&huge_context, &["--max-tokens", "3999999990"]),
            "kv cache",
        ),
        (gen_(&nan, &[]), "logits are not finite"),
        (
            ppl(&m, &text, &["--window", "1"]),
            "--window: 1 is outside 2..=64",
        ),
        (
            ppl(&m, &text, &["--window", "100000"]),
            "--window: 100000 is outside 2..=64",
        ),
        (
            ppl(&m, &empty, &[]),
            "holds 0 tokens; perplexity needs at least 2",
        ),
        (ppl(&m, &fifo, &[]), "fifo: is a FIFO, not a regular file"),
        (
            ppl(&m, "/dev/zero", &[]),
            "/dev/zero: is a character device, not a regular file",
        ),
        (
            ppl(&nan, &text, &[]),
            "logits are not finite: the first NaN or infinity is at token 0 (position 0)",
        ),
        (logits(&m, "", &[]), "--tokens: `` is not a token id"),
        (logits(&m, "1,,2", &[]), "--tokens: `` is not a token id"),
        (logits(&m, "-1", &[]), "--tokens: `-1` is not a token id"),
        (logits(&m, &ids_65, &[]), "--tokens: 65 is outside 1..=64"),
        (logits(&fifo, "1", &[]), "is a FIFO, not a regular file"),
        (
            logits(&zero_theta, "1", &[]),
            "`rope_parameters.rope_theta`: is a number (0.0), expected a finite positive number",
        ),
        (
            logits(&many_layers, "1", &[]),
            "declares 1000000000 layers but the model's tensors are for 2",
        ),
        (
            logits(&gguf, "1", &["--quantize", "q8_0"]),
            "a GGUF file is already quantised",
        ),
        (
            with(&["tokenize", "--model", &fifo_tok, "--text", "hi"], &[]),
            "tokenizer.json: is a FIFO, not a regular file",
        ),
        (with(&["info", &fifo], &[]), "is a FIFO, not a regular file"),
        (
            with(&["info", &layers_gguf], &[]),
            "`llama.block_count`: declares 1000000000 layers but the model's tensors are for 2",
        ),
        (
            with(&["selftest", "--kernel", "nosuch"], &[]),
            "--kernel: no kernel name contains `nosuch`; the kernels are: matmul",
        ),
        (
            bench(&["--prompt-tokens", "0"]),
            "--prompt-tokens: 0 is outside 1..=",
        ),
        (
            bench(&["--prompt-tokens", "1000000000000"]),
            "--prompt-tokens: 1000000000000 is outside 1..=",
        ),
        (
            with(&["bench", "--backend", "cpu", "--seconds", "NaN"], &[]),
            "--seconds: NaN must be in (0, 3600]",
        ),
        (
            bench(&[
                "--prompt-tokens",
                "8",
                "--gen-tokens",
                "8",
                "--train",
                "4x1",
            ]),
            "--train: 1 is outside 2..=",
        ),
        (
            bench(&[
                "--prompt-tokens",
                "8",
                "--gen-tokens",
                "8",
                "--train",
                "0x128",
            ]),
            "is not BATCHxTOKENS with 1 <= BATCH <= 1024",
        ),
        (
            with(&["selftest", "--kernel-shapes", "matvec=7x4"], &[]),
            "matvec: \"7\" is not one of [8, 16, 32, 64]",
        ),
        (
            with(&["selftest", "--kernel-shapes", "speed=11"], &[]),
            "unknown key \"speed\"",
        ),
        (
            with(
                &["selftest", "--backend", "host", "--cpu-isa", "nosuch"],
                &[],
            ),
            "invalid value 'nosuch' for '--cpu-isa <CPU_ISA>'",
        ),
    ];
    let mut failures = Vec::new();
    for (args, want) in &cases {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, err) = run(&argv);
        if code != Some(2) || !err.contains(want) || err.contains("panicked") {
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
