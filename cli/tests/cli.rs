//! The `edgetune` command as users run it: exact command forms, outputs and exit codes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn edgetune() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_edgetune"));
    // The tests' own kernel shape cache: shapes measured while other tests load the machine
    // must not become what the user's commands run with.
    c.env(
        "EDGETUNE_CACHE_DIR",
        std::env::temp_dir().join("edgetune-test-autotune"),
    );
    c
}

fn tiny(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/golden/tiny")
        .join(rel)
}

/// Reads a float32 .npy written by `edgetune logits`: (shape, values).
fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
    let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
    let header = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
    assert!(header.contains("'descr': '<f4'"), "{header}");
    let shape_txt = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let shape = shape_txt
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let data = b[10 + hlen..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (shape, data)
}

/// `edgetune logits` on `backend` for the tiny Qwen2 Q8_0 model against transformers.
/// Returns false if the backend is unavailable (a GPU-less machine outside CI).
fn logits_match_transformers(backend: &str) -> bool {
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny("logits.json")).unwrap()).unwrap();
    let out = std::env::temp_dir().join(format!(
        "edgetune-cli-logits-{backend}-{}.npy",
        std::process::id()
    ));
    let run = edgetune()
        .args([
            "logits",
            "--backend",
            backend,
            "--tokens",
            "3,17,0,42,91,5,64",
            "--out",
        ])
        .arg(&out)
        .arg("--model")
        .arg(tiny("qwen2_gqa_bias/q8_0.gguf"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    if backend == "gpu" && !run.status.success() && stderr.contains("no GPU adapter") {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(!ci, "CI=true but no GPU adapter: {stderr}");
        eprintln!("skipping the GPU run: {stderr}");
        return false;
    }
    assert!(run.status.success(), "{stderr}");
    let (shape, got) = read_npy(&out);
    assert_eq!(shape, vec![7, 96]);
    let want: Vec<f32> = golden["models"]["qwen2_gqa_bias"]["q8_0"]
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
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-3, "{backend}: max diff {worst}");
    std::fs::remove_file(out).unwrap();
    true
}

#[test]
fn logits_writes_every_position_as_npy_on_both_backends() {
    assert!(logits_match_transformers("cpu"));
    logits_match_transformers("gpu");
}

#[test]
fn info_describes_a_model() {
    let out = edgetune()
        .arg("info")
        .arg(tiny("llama_gqa_tied/q4_0.gguf"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("Llama, 2 layers, width 64"), "{text}");
    assert!(text.contains("tied embeddings"), "{text}");
    assert!(text.contains("Q4_0"), "{text}");
}

#[test]
fn bad_input_gives_a_message_and_exit_code_2() {
    let dir = std::env::temp_dir();
    let bad = dir.join(format!("edgetune-cli-bad-{}.gguf", std::process::id()));
    std::fs::write(
        &bad,
        b"GGUF\x03\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\xff",
    )
    .unwrap();
    let out = edgetune().arg("info").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("tensor count"), "{err}");
    std::fs::remove_file(bad).unwrap();

    let out = edgetune()
        .args([
            "logits",
            "--backend",
            "cpu",
            "--tokens",
            "1,99999",
            "--out",
            "/dev/null",
            "--model",
        ])
        .arg(tiny("llama_gqa_tied/f32.gguf"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("out of range")
    );
}
