//! Every fuzz seed and every input a fuzzer ever crashed on (fuzz/seeds/<target>,
//! fuzz/regressions/<target>) goes through the same calls as its fuzz target and ends in Ok
//! or a typed error, without a panic escaping.

use edgetune::format::file::parse_json;
use edgetune::format::gguf::Gguf;
use edgetune::model::files::{check_config_against_tensors, config_from_json, safetensors_header};
use edgetune::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

/// The seed and regression files of a fuzz target.
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut out = Vec::new();
    for dir in ["seeds", "regressions"] {
        for entry in std::fs::read_dir(root.join(dir).join(target)).unwrap() {
            let path = entry.unwrap().path();
            if path.file_name().is_some_and(|n| n == ".keep") {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            out.push((path, bytes));
        }
    }
    assert!(!out.is_empty(), "no fuzz inputs for {target}");
    out
}

#[test]
fn gguf_fuzz_inputs_never_panic() {
    for (path, bytes) in inputs("gguf") {
        if let Ok(g) = Gguf::parse(&bytes) {
            for t in &g.tensors {
                assert_eq!(
                    g.tensor_data(&bytes, t).map(<[u8]>::len),
                    Some(t.size as usize),
                    "{}",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn config_fuzz_inputs_never_panic() {
    let mut checked = 0;
    for (path, data) in inputs("config") {
        let (len, rest) = data.split_first_chunk::<2>().unwrap();
        let (config, weights) = rest.split_at((u16::from_le_bytes(*len) as usize).min(rest.len()));
        let config = parse_json(config, "config.json")
            .and_then(|json| config_from_json(&json, Path::new("config.json")));
        if let (Ok(config), Ok((_, meta))) = (config, safetensors_header(weights, "st")) {
            let r = check_config_against_tensors(
                &config,
                "st",
                meta.tensors().keys().map(String::as_str),
                |name| Some(meta.info(name)?.shape.clone()),
            );
            assert!(r.is_ok(), "{}: {r:?}", path.display());
            checked += 1;
        }
    }
    // The seeds are sound models: the checks past parsing must be reached.
    assert!(
        checked >= 2,
        "only {checked} seeds reached the tensor checks"
    );
}

#[test]
fn tokenizer_fuzz_inputs_never_panic() {
    edgetune::guard::quiet_caught_panics();
    for (_, data) in inputs("tokenizer") {
        if let Ok(t) = Tokenizer::from_json_bytes(&data, "tokenizer.json") {
            if let Ok(ids) = t.encode("Hello, wörld! 123 <|im_start|> \u{1F600}") {
                let _ = t.decode(&ids);
            }
            let _ = t.decode(&[0, 1, 2, 3, 255, 65_535, u32::MAX]);
        }
    }
}

#[test]
fn proto_fuzz_inputs_never_panic_and_reencode_exactly() {
    use edgetune_proto::{Encoding, Round, SeedMode, Session, Upload};
    let mut accepted = 0;
    for (path, data) in inputs("proto") {
        let Some((&pick, bytes)) = data.split_first() else {
            continue;
        };
        let (seed_mode, encoding) = match pick % 5 {
            0 => (SeedMode::KSeed, Encoding::F32),
            1 => (SeedMode::KSeed, Encoding::F16),
            2 => (SeedMode::Shared, Encoding::F32),
            3 => (SeedMode::Shared, Encoding::F16),
            _ => (SeedMode::Shared, Encoding::Sign),
        };
        let session = Session {
            model_sha256: [7; 32],
            layout_sha256: [9; 32],
            session_key: 1,
            generator: 1,
            z_kind: 0,
            seed_mode,
            encoding,
            k: 64,
            tau: 16,
            delta_exp: 16,
            eps: 1e-2,
            lr: 5e-4,
            clip: 10.0,
        };
        let shown = path.display();
        let mut resealed = bytes.to_vec();
        if resealed.len() >= 4 {
            let n = resealed.len() - 4;
            let crc = edgetune_proto::crc32(&resealed[..n]);
            resealed[n..].copy_from_slice(&crc.to_le_bytes());
        }
        for bytes in [bytes.to_vec(), resealed] {
            if let Ok(s) = Session::decode(&bytes) {
                assert_eq!(s.encode(), bytes, "{shown}");
                accepted += 1;
            }
            if let Ok(r) = Round::decode(&bytes, &session) {
                assert_eq!(r.encode(), bytes, "{shown}");
                accepted += 1;
            }
            if let Ok(u) = Upload::decode(&bytes, &session) {
                assert_eq!(u.encode(&session), bytes, "{shown}");
                accepted += 1;
            }
        }
    }
    // The seeds are sound messages of each kind and mode (each read twice).
    assert_eq!(accepted, 30);
}
