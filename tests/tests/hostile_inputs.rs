//! Hostile inputs for every reader, built from the tiny fixtures: special files, oversized
//! files, config.json and GGUF metadata of every wrong kind, corrupt safetensors headers and
//! shard indexes, and tokenizer.json files that crash or abort the `tokenizers` crate when
//! given unchecked. Each must give its typed error with the expected wording (and no raw
//! control characters), never a panic, an abort or a hang. The same classes through the
//! command line, with exit codes and a memory limit, are in cli/tests/hostile.rs.

use edgetune::Error;
use edgetune::backend::cpu::Cpu;
use edgetune::format::file::{FileKind, read_text};
use edgetune::model::files::ModelFiles;
use edgetune::tokenizer::Tokenizer;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

fn golden(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("golden")
        .join(rel)
}

/// A fresh directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "edgetune-hostile-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mkfifo(path: &Path) {
    let ok = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mkfifo {}", path.display());
}

/// Runs `f` on another thread and fails if it takes longer than a minute: a hang guard,
/// not a speed check (every case here returns in milliseconds).
fn within_a_minute<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("{what}: no answer within a minute (hang?)"))
}

/// Checks an error's wording: it contains `want` and no raw control character.
fn check_message(case: &str, e: &Error, want: &str, failures: &mut Vec<String>) {
    let text = e.to_string();
    if !text.contains(want) {
        failures.push(format!("{case}: expected `{want}` in `{text}`"));
    }
    if text.chars().any(char::is_control) {
        failures.push(format!("{case}: raw control character in `{text:?}`"));
    }
    if matches!(e, Error::Syntax { line, .. } if *line > 0) && text.contains(" at line ") {
        failures.push(format!("{case}: the position is given twice in `{text}`"));
    }
}

/// Opens, loads on the CPU reference and runs two tokens: the first error, if any.
fn open_and_run(path: PathBuf) -> Result<(), Error> {
    within_a_minute("open and run", move || {
        let files = ModelFiles::open(&path, None)?;
        let model = files.load(&Cpu)?;
        let mut cache = model.new_cache(2)?;
        model.forward(&mut cache, &[1, 2], true).map(|_| ())
    })
}

/// Runs a table of (case, path, expected wording).
fn expect_errors(cases: Vec<(String, PathBuf, &str)>) {
    assert!(!cases.is_empty());
    let mut failures = Vec::new();
    for (case, path, want) in cases {
        match open_and_run(path) {
            Ok(()) => failures.push(format!("{case}: accepted")),
            Err(e) => check_message(&case, &e, want, &mut failures),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

type Edit = fn(&mut Value);

/// llama_gqa_tied as a directory whose config.json is the original changed by `edit`.
fn model_dir(tmp: &Scratch, name: &str, edit: Edit) -> PathBuf {
    let dir = tmp.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let src = golden("tiny/llama_gqa_tied");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    dir
}

#[test]
fn config_json_values_of_every_wrong_kind_are_named_errors() {
    let tmp = Scratch::new();
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "a billion layers",
            |c| c["num_hidden_layers"] = json!(1_000_000_000),
            "`num_hidden_layers`: declares 1000000000 layers but the model's tensors are for 2",
        ),
        (
            "fewer layers than the file holds",
            |c| c["num_hidden_layers"] = json!(1),
            "declares 1 layers but the model's tensors are for 2",
        ),
        (
            "zero layers",
            |c| c["num_hidden_layers"] = json!(0),
            "`num_hidden_layers`: is a number (0), expected an integer in 1..=4294967295",
        ),
        (
            "negative layers",
            |c| c["num_hidden_layers"] = json!(-2),
            "`num_hidden_layers`: is a number (-2)",
        ),
        (
            "layers past u32",
            |c| c["num_hidden_layers"] = json!(4_294_967_296u64),
            "`num_hidden_layers`: is a number (4294967296)",
        ),
        (
            "layers as a string",
            |c| c["num_hidden_layers"] = json!("2"),
            "`num_hidden_layers`: is a string (\"2\"), expected an integer",
        ),
        (
            "layers as a float",
            |c| c["num_hidden_layers"] = json!(2.5),
            "`num_hidden_layers`: is a number (2.5)",
        ),
        (
            "missing width",
            |c| {
                c.as_object_mut().unwrap().remove("hidden_size");
            },
            "`hidden_size`: is missing",
        ),
        (
            "width that disagrees with the embedding",
            |c| c["hidden_size"] = json!(32),
            "model.embed_tokens.weight`: has shape [128, 64] but",
        ),
        (
            "a vocabulary of a billion",
            |c| c["vocab_size"] = json!(1_000_000_000),
            "says [1000000000, 64] (vocab_size, hidden_size)",
        ),
        (
            "heads that do not divide the width",
            |c| c["num_attention_heads"] = json!(3),
            "`num_attention_heads`: 3 heads do not divide the width 64",
        ),
        (
            "kv heads that do not divide the heads",
            |c| c["num_key_value_heads"] = json!(3),
            "`num_key_value_heads`: 3 kv heads do not divide the 4 attention heads",
        ),
        (
            "a huge head dimension",
            |c| c["head_dim"] = json!(4_000_000),
            "`head_dim`: head dimension 4000000 must be even and at most 256",
        ),
        (
            "an odd head dimension",
            |c| c["head_dim"] = json!(15),
            "head dimension 15 must be even",
        ),
        (
            "an ffn width the tensors do not have",
            |c| c["intermediate_size"] = json!(50),
            "holds [96, 64] but",
        ),
        (
            "zero context",
            |c| c["max_position_embeddings"] = json!(0),
            "`max_position_embeddings`: is a number (0)",
        ),
        (
            "a rope base of zero",
            |c| c["rope_parameters"]["rope_theta"] = json!(0.0),
            "`rope_parameters.rope_theta`: is a number (0.0), expected a finite positive number",
        ),
        (
            "a negative rope base (transformers 4 layout)",
            |c| {
                c.as_object_mut().unwrap().remove("rope_parameters");
                c["rope_theta"] = json!(-10000.0);
            },
            "`rope_theta`: is a number (-10000.0)",
        ),
        (
            "a rope base as a string",
            |c| {
                c.as_object_mut().unwrap().remove("rope_parameters");
                c["rope_theta"] = json!("10000");
            },
            "`rope_theta`: is a string",
        ),
        (
            "rms eps of zero",
            |c| c["rms_norm_eps"] = json!(0.0),
            "`rms_norm_eps`: is a number (0.0)",
        ),
        (
            "rms eps that is zero in f32",
            |c| c["rms_norm_eps"] = json!(1e-50),
            "must be finite and positive as an f32 (it rounds to 0)",
        ),
        (
            "a linear rope factor of zero",
            |c| c["rope_parameters"] = json!({"rope_type": "linear", "factor": 0.0}),
            "`rope_parameters.factor`: is a number (0.0)",
        ),
        (
            "an unsupported rope type",
            |c| c["rope_parameters"] = json!({"rope_type": "yarn", "factor": 4.0}),
            "`rope_parameters.rope_type`: `yarn` is not supported yet",
        ),
        (
            "llama3 rope with its band inverted",
            |c| {
                c["rope_parameters"] = json!({"rope_type": "llama3", "factor": 8.0,
                    "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                    "original_max_position_embeddings": 32})
            },
            "`rope_parameters.high_freq_factor`: 1 must be greater than low_freq_factor 4",
        ),
        (
            "rope scaling as a string",
            |c| {
                c.as_object_mut().unwrap().remove("rope_parameters");
                c["rope_scaling"] = json!("linear");
            },
            "`rope_scaling`: is a string (\"linear\"), expected an object",
        ),
        (
            "tied embeddings as a string",
            |c| c["tie_word_embeddings"] = json!("yes"),
            "`tie_word_embeddings`: is a string (\"yes\"), expected a boolean",
        ),
        (
            "model type as a number",
            |c| c["model_type"] = json!(5),
            "`model_type`: is a number (5), expected a string",
        ),
        (
            "an unsupported architecture",
            |c| c["model_type"] = json!("gpt_neox"),
            "Some(\"gpt_neox\") is not supported",
        ),
        (
            "control characters in a value",
            |c| c["model_type"] = json!("llama\u{1b}[31m\r"),
            "is not supported",
        ),
        (
            "not an object",
            |c| *c = json!([1, 2, 3]),
            "`(top level)`: is an array, expected an object",
        ),
    ];
    expect_errors(
        cases
            .into_iter()
            .enumerate()
            .map(|(i, (case, edit, want))| {
                (
                    case.to_string(),
                    model_dir(&tmp, &format!("c{i}"), edit),
                    want,
                )
            })
            .collect(),
    );
}

#[test]
fn config_json_syntax_and_special_files_are_named_errors() {
    let tmp = Scratch::new();
    let with_config = |name: &str, config: &dyn Fn(&Path)| {
        let dir = model_dir(&tmp, name, |_| {});
        std::fs::remove_file(dir.join("config.json")).unwrap();
        config(&dir.join("config.json"));
        dir
    };
    let deep = "[".repeat(100_000);
    let cases = vec![
        (
            "truncated",
            with_config("t", &|p| {
                std::fs::write(p, "{\"model_type\": \"llama\",").unwrap()
            }),
            "config.json:1:23: EOF while parsing a value",
        ),
        (
            "nested 100000 deep",
            with_config("d", &|p| std::fs::write(p, &deep).unwrap()),
            "recursion limit exceeded",
        ),
        (
            "NaN literal",
            with_config("n", &|p| {
                std::fs::write(p, "{\"rope_theta\": NaN}").unwrap()
            }),
            "config.json:1:",
        ),
        (
            "not UTF-8",
            with_config("u", &|p| std::fs::write(p, b"{\"a\": \"\xff\"}").unwrap()),
            "config.json:1:",
        ),
        (
            "a FIFO",
            with_config("f", &|p| mkfifo(p)),
            "config.json: is a FIFO, not a regular file",
        ),
        (
            "a directory",
            with_config("r", &|p| std::fs::create_dir(p).unwrap()),
            "config.json: is a directory, not a regular file",
        ),
        (
            "2 MiB",
            with_config("b", &|p| {
                std::fs::File::create(p).unwrap().set_len(2 << 20).unwrap()
            }),
            "2097152 bytes is more than edgetune reads for a config.json (1048576 bytes)",
        ),
        (
            "missing",
            with_config("m", &|_| {}),
            "config.json: No such file",
        ),
    ];
    expect_errors(
        cases
            .into_iter()
            .map(|(c, p, w)| (c.to_string(), p, w))
            .collect(),
    );
}

/// A safetensors file with its header JSON changed by `edit` (data left as it is).
fn edit_safetensors(bytes: &[u8], edit: impl Fn(&mut Value)) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let text = header.to_string();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

#[test]
fn corrupt_safetensors_and_shard_indexes_are_named_errors() {
    let tmp = Scratch::new();
    let weights = std::fs::read(golden("tiny/llama_gqa_tied/model.safetensors")).unwrap();
    let with_weights = |name: &str, bytes: Vec<u8>| {
        let dir = model_dir(&tmp, name, |_| {});
        std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
        dir
    };
    let q = "model.layers.0.self_attn.q_proj.weight";
    let mut huge_header = u64::MAX.to_le_bytes().to_vec();
    huge_header.extend_from_slice(b"{}");
    let mut nan_norm = weights.clone();
    {
        let n = u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
        let header: Value = serde_json::from_slice(&weights[8..8 + n]).unwrap();
        let start = header["model.norm.weight"]["data_offsets"][0]
            .as_u64()
            .unwrap() as usize;
        nan_norm[8 + n + start..8 + n + start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    }
    let sharded = |name: &str, index: Value, files: &[&str]| {
        let dir = model_dir(&tmp, name, |_| {});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
        for f in files {
            std::fs::write(dir.join(f), &weights).unwrap();
        }
        dir
    };
    let cases = vec![
        (
            "header length u64::MAX",
            with_weights("h", huge_header),
            "not a valid safetensors file",
        ),
        (
            "empty file",
            with_weights("e", Vec::new()),
            "not a valid safetensors file",
        ),
        (
            "header not JSON",
            with_weights("j", {
                let mut b = 5u64.to_le_bytes().to_vec();
                b.extend_from_slice(b"{{{{{");
                b
            }),
            "not a valid safetensors file",
        ),
        (
            "an integer dtype",
            with_weights(
                "i",
                edit_safetensors(&weights, |h| h[q]["dtype"] = json!("I32")),
            ),
            "tensor `model.layers.0.self_attn.q_proj.weight`: has dtype I32",
        ),
        (
            "a 3-d weight",
            with_weights(
                "3",
                edit_safetensors(&weights, |h| h[q]["shape"] = json!([64, 8, 8])),
            ),
            "has shape [64, 8, 8], not a matrix or vector",
        ),
        (
            "offsets past the data",
            with_weights(
                "o",
                edit_safetensors(&weights, |h| h[q]["data_offsets"] = json!([0, 1u64 << 40])),
            ),
            "not a valid safetensors file",
        ),
        (
            "a missing projection",
            with_weights(
                "m",
                edit_safetensors(&weights, |h| {
                    let t = h.as_object_mut().unwrap().remove(q).unwrap();
                    h["model.layers.0.self_attn.query.weight"] = t;
                }),
            ),
            "tensor `model.layers.0.self_attn.q_proj.weight`: is missing",
        ),
        (
            "NaN in the output norm",
            with_weights("n", nan_norm),
            "logits are not finite: the first NaN or infinity is at token 0 (position 0), vocabulary id 0",
        ),
        (
            "a shard outside the directory",
            sharded("x", json!({"weight_map": {q: "../model.safetensors"}}), &[]),
            "shard name `../model.safetensors` is not a plain file name",
        ),
        (
            "weight_map not an object",
            sharded("w", json!({"weight_map": 5}), &[]),
            "`weight_map`: is missing or not an object",
        ),
        (
            "a tensor in two shards",
            sharded(
                "t",
                json!({"weight_map": {"a": "one.safetensors", "b": "two.safetensors"}}),
                &["one.safetensors", "two.safetensors"],
            ),
            "appears in two shards",
        ),
        (
            "a shard that is a FIFO",
            {
                let dir = sharded("f", json!({"weight_map": {"a": "pipe.safetensors"}}), &[]);
                mkfifo(&dir.join("pipe.safetensors"));
                dir
            },
            "pipe.safetensors: is a FIFO, not a regular file",
        ),
    ];
    expect_errors(
        cases
            .into_iter()
            .map(|(c, p, w)| (c.to_string(), p, w))
            .collect(),
    );
}

/// The tiny GGUF with the 4-byte value of `key` replaced (and its type tag, if given).
fn patch_gguf(key: &str, type_tag: Option<u32>, value: [u8; 4]) -> Vec<u8> {
    let mut b = std::fs::read(golden("tiny/llama_gqa_tied/f32.gguf")).unwrap();
    let at = b
        .windows(key.len())
        .position(|w| w == key.as_bytes())
        .unwrap()
        + key.len();
    if let Some(t) = type_tag {
        b[at..at + 4].copy_from_slice(&t.to_le_bytes());
    }
    b[at + 4..at + 8].copy_from_slice(&value);
    b
}

#[test]
fn gguf_metadata_of_every_wrong_kind_is_a_named_error() {
    let tmp = Scratch::new();
    let u = |v: u32| v.to_le_bytes();
    let f = |v: f32| v.to_le_bytes();
    let cases = vec![
        (
            "a billion layers",
            patch_gguf("llama.block_count", None, u(1_000_000_000)),
            "`llama.block_count`: declares 1000000000 layers but the model's tensors are for 2",
        ),
        (
            "fewer layers than the file holds",
            patch_gguf("llama.block_count", None, u(1)),
            "declares 1 layers but the model's tensors are for 2",
        ),
        (
            "a layer count that is a float",
            patch_gguf("llama.block_count", Some(6), f(2.0)),
            "`llama.block_count`: is a float (2), expected an unsigned integer",
        ),
        (
            "a width the embedding does not have",
            patch_gguf("llama.embedding_length", None, u(32)),
            "has dims [64, 128] but the metadata says width 32",
        ),
        (
            "zero context",
            patch_gguf("llama.context_length", None, u(0)),
            "`llama.context_length`: 0 is not in 1..=4294967295",
        ),
        (
            "a rope base of zero",
            patch_gguf("llama.rope.freq_base", None, f(0.0)),
            "`llama.rope.freq_base`: 0 must be finite and positive",
        ),
        (
            "a NaN rope base",
            patch_gguf("llama.rope.freq_base", None, f(f32::NAN)),
            "`llama.rope.freq_base`: NaN must be finite and positive",
        ),
        (
            "an infinite rms eps",
            patch_gguf(
                "llama.attention.layer_norm_rms_epsilon",
                None,
                f(f32::INFINITY),
            ),
            "`llama.attention.layer_norm_rms_epsilon`: inf must be finite and positive",
        ),
        (
            "heads that do not divide the width",
            patch_gguf("llama.attention.head_count", None, u(3)),
            "`llama.attention.head_count`: 3 heads do not divide the width 64",
        ),
    ];
    // One layer's query renamed to layer 7 (same length), and 8 layers declared: the
    // highest index alone must not vouch for the layers below it.
    let mut gap = patch_gguf("llama.block_count", None, u(8));
    let from = b"blk.1.attn_q.weight";
    let at = gap.windows(from.len()).position(|w| w == from).unwrap();
    gap[at..at + from.len()].copy_from_slice(b"blk.7.attn_q.weight");
    let mut cases = cases;
    cases.push((
        "a gap in the layers",
        gap,
        "`llama.block_count`: the model's tensors are for layers 0 to 7 but layer 2 has none",
    ));
    let mut table = Vec::new();
    for (i, (case, bytes, want)) in cases.into_iter().enumerate() {
        let p = tmp.join(&format!("m{i}.gguf"));
        std::fs::write(&p, bytes).unwrap();
        table.push((case.to_string(), p, want));
    }
    // Special files given as the model.
    let fifo = tmp.join("fifo.gguf");
    mkfifo(&fifo);
    table.push(("a FIFO".into(), fifo, "is a FIFO, not a regular file"));
    table.push((
        "a character device".into(),
        PathBuf::from("/dev/zero"),
        "/dev/zero: is a character device, not a regular file",
    ));
    expect_errors(table);
}

/// The golden tokenizer.json changed by `edit`, with its tokenizer_config.json, in a fresh
/// directory; `config` replaces tokenizer_config.json when given.
fn tokenizer_dir(tmp: &Scratch, name: &str, edit: Edit, config: Option<&str>) -> PathBuf {
    let dir = tmp.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let src = golden("tokenizer");
    let mut t: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap())
            .unwrap();
    edit(&mut t);
    std::fs::write(dir.join("tokenizer.json"), t.to_string()).unwrap();
    match config {
        Some(c) => std::fs::write(dir.join("tokenizer_config.json"), c).unwrap(),
        None => {
            std::fs::copy(
                src.join("tokenizer_config.json"),
                dir.join("tokenizer_config.json"),
            )
            .unwrap();
        }
    }
    dir.join("tokenizer.json")
}

/// Loads a tokenizer and runs it on a text and on ids: the first error, if any.
fn tokenize(path: PathBuf) -> Result<Vec<u32>, Error> {
    within_a_minute("tokenize", move || {
        let t = Tokenizer::from_file(&path)?;
        let ids = t.encode("the numbers, a robot")?;
        t.decode(&ids)?;
        t.decode(&[6, 10])?;
        Ok(ids)
    })
}

#[test]
fn tokenizer_json_cannot_take_the_process_down() {
    edgetune::guard::quiet_caught_panics();
    let tmp = Scratch::new();
    let want_ids = tokenize(golden("tokenizer/tokenizer.json")).unwrap();
    // Padding and truncation inside the file would change (or crash) encoding: they are
    // dropped, and the ids are those of the unmodified file.
    let harmless: Vec<(&str, Edit)> = vec![
        ("fixed padding of u64::MAX", |t| {
            t["padding"] = json!({"strategy": {"Fixed": u64::MAX}, "direction": "Right",
                "pad_to_multiple_of": null, "pad_id": 0, "pad_type_id": 0, "pad_token": "<unk>"})
        }),
        ("padding to a multiple of 10^10", |t| {
            t["padding"] = json!({"strategy": "BatchLongest", "direction": "Right",
                "pad_to_multiple_of": 10_000_000_000u64, "pad_id": 0, "pad_type_id": 0,
                "pad_token": "<unk>"})
        }),
        ("truncation with stride >= max_length", |t| {
            t["truncation"] = json!({"direction": "Right", "max_length": 1, "stride": 1,
                "strategy": "LongestFirst"})
        }),
    ];
    // An EOS that tokenizer.json lacks (transformers would add it) is not used: no error.
    let got = tokenize(tokenizer_dir(
        &tmp,
        "eos",
        |_| {},
        Some(r#"{"eos_token": "</s>"}"#),
    ));
    assert_eq!(got.as_ref().ok(), Some(&want_ids), "{got:?}");
    for (i, (case, edit)) in harmless.into_iter().enumerate() {
        let got = tokenize(tokenizer_dir(&tmp, &format!("h{i}"), edit, None));
        assert_eq!(got.as_ref().ok(), Some(&want_ids), "{case}: {got:?}");
    }
    let fatal: Vec<(&str, Edit, Option<&str>, &str)> = vec![
        (
            "an unknown normalizer",
            |t| t["normalizer"] = json!({"type": "Foo"}),
            None,
            "normalizer type `Foo` is not supported (supported: BertNormalizer",
        ),
        (
            "an unknown normalizer inside a sequence",
            |t| {
                t["normalizer"] =
                    json!({"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Bar"}]})
            },
            None,
            "normalizer type `Bar` is not supported",
        ),
        (
            "an unknown model type",
            |t| t["model"]["type"] = json!("SentencePieceBPE"),
            None,
            "model type `SentencePieceBPE` is not supported",
        ),
        (
            "a model without a type",
            |t| {
                t["model"].as_object_mut().unwrap().remove("type");
            },
            None,
            "`model` has no `type` string",
        ),
        (
            "an unknown pre-tokenizer",
            |t| t["pre_tokenizer"] = json!({"type": "Delimiter", "delimiter": " "}),
            None,
            "pre_tokenizer type `Delimiter` is not supported",
        ),
        (
            "a precompiled charsmap declaring a 4 GiB trie (an abort when unchecked)",
            |t| {
                t["normalizer"] = json!({"type": "Precompiled", "precompiled_charsmap": "/////w=="})
            },
            None,
            "declares a trie of 4294967295 bytes in 4 bytes of data",
        ),
        (
            "an empty precompiled trie (panics inside the crate on encode)",
            |t| {
                t["normalizer"] = json!({"type": "Precompiled", "precompiled_charsmap": "AAAAAA=="})
            },
            None,
            "the `tokenizers` library failed on this input (it panicked",
        ),
        (
            "a fixed-length pre-tokenizer of length 0 (panics on encode)",
            |t| t["pre_tokenizer"] = json!({"type": "FixedLength", "length": 0}),
            None,
            "(it panicked: chunk size must be non-zero)",
        ),
        (
            "a strip decoder past the token (panics on decode)",
            |t| t["decoder"] = json!({"type": "Strip", "content": "a", "start": 1, "stop": 1}),
            None,
            "the `tokenizers` library failed on this input",
        ),
        (
            "a subword prefix longer than merge parts (panics on load)",
            |t| t["model"]["continuing_subword_prefix"] = json!("##"),
            None,
            "the `tokenizers` library failed on this input",
        ),
        (
            "an unknown top-level key",
            |t| t["paddings"] = json!(null),
            None,
            "unknown top-level key `paddings` (known: version,",
        ),
        (
            "not an object",
            |t| *t = json!(["BPE"]),
            None,
            "the document is not a JSON object",
        ),
        (
            "a chat template that is a number",
            |_| {},
            Some(r#"{"chat_template": 5}"#),
            "`chat_template`: is neither a string nor a list",
        ),
        (
            "add_bos_token as a string",
            |_| {},
            Some(r#"{"add_bos_token": "yes"}"#),
            "`add_bos_token`: is not a boolean",
        ),
        (
            "an eos token that is a number",
            |_| {},
            Some(r#"{"eos_token": 3}"#),
            "`eos_token`: is neither a string",
        ),
        (
            "a BOS prompts start with that tokenizer.json lacks",
            |_| {},
            Some(r#"{"bos_token": "<s>", "add_bos_token": true}"#),
            "`bos_token`: is missing or not a token of tokenizer.json, but add_bos_token is true",
        ),
        (
            "a malformed tokenizer_config.json",
            |_| {},
            Some(r#"{"eos_token": "#),
            "tokenizer_config.json:1:",
        ),
    ];
    let mut failures = Vec::new();
    for (i, (case, edit, config, want)) in fatal.into_iter().enumerate() {
        match tokenize(tokenizer_dir(&tmp, &format!("f{i}"), edit, config)) {
            Ok(ids) => failures.push(format!("{case}: accepted, ids {ids:?}")),
            Err(e) => check_message(case, &e, want, &mut failures),
        }
    }
    // Nesting past serde_json's limit, and special files.
    let deep = tmp.join("deep.json");
    std::fs::write(&deep, "{\"decoder\":".repeat(5000)).unwrap();
    let fifo = tmp.join("fifo.json");
    mkfifo(&fifo);
    for (case, path, want) in [
        ("nested 5000 deep", deep, "recursion limit exceeded"),
        ("a FIFO", fifo, "is a FIFO, not a regular file"),
        (
            "a directory",
            tmp.0.clone(),
            "is a directory, not a regular file",
        ),
    ] {
        match tokenize(path) {
            Ok(ids) => failures.push(format!("{case}: accepted, ids {ids:?}")),
            Err(e) => check_message(case, &e, want, &mut failures),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn text_files_are_bounded_and_utf8() {
    let tmp = Scratch::new();
    let bad = tmp.join("bad.txt");
    std::fs::write(&bad, b"ab\ncd\xffe").unwrap();
    let e = read_text(&bad, FileKind::Text).unwrap_err();
    assert!(
        e.to_string()
            .ends_with("bad.txt:2:3: invalid UTF-8 at byte 5"),
        "{e}"
    );
    let big = tmp.join("big.txt");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(FileKind::Text.limit() + 1)
        .unwrap();
    assert!(matches!(
        read_text(&big, FileKind::Text),
        Err(Error::FileTooLarge { .. })
    ));
    let fifo = tmp.join("fifo.txt");
    mkfifo(&fifo);
    let e = within_a_minute("fifo", move || read_text(&fifo, FileKind::Text)).unwrap_err();
    assert!(
        matches!(
            e,
            Error::NotAFile {
                found: "a FIFO",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn messages_never_carry_raw_control_characters() {
    let e = Error::Tensor {
        file: "m.gguf".into(),
        tensor: "blk.0\u{1b}[2J\u{7}\r\n".into(),
        reason: "is missing".into(),
    };
    assert_eq!(
        e.to_string(),
        "m.gguf: tensor `blk.0\\u{1b}[2J\\u{7}\\r\\n`: is missing"
    );
}
