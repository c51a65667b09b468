//! A training run's directory: the session (`session.json`: model and layout hashes, the
//! adapter, the zeroth-order constants), the start values (`w0.safetensors`), the seed
//! history (`history.jsonl`, one `{"step","seed","g"}` per applied step) and the adapter.
//! Every file is written atomically; everything read back is checked before any of it is
//! applied, so a bad history applies nothing.

use super::{SeedMode, SeedWeights, ZoConfig, check_scalar};
use crate::adapter::peft::{config_json, parse_config, read_layout, safetensors_bytes};
use crate::adapter::{AdapterConfig, ParamInfo};
use crate::error::{Error, Result};
use crate::format::file::{FileKind, read_json, read_text, write_atomic};
use crate::rng::ZKind;
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::path::Path;
use std::prelude::v1::*;

pub const SESSION: &str = "session.json";
pub const HISTORY: &str = "history.jsonl";
pub const W0: &str = "w0.safetensors";
/// The number of the next step (skipped steps leave no record, so the history alone
/// cannot say where a run stopped).
pub const PROGRESS: &str = "progress.json";
/// The version of the session and history formats this build reads and writes.
pub const VERSION: u64 = 1;

/// Lower-case hex of a hash.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Everything a replay needs besides the records.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub model_sha256: String,
    pub layout_sha256: String,
    pub adapter: AdapterConfig,
    pub init_seed: u64,
    pub zo: ZoConfig,
    /// FedKSeed-Pro's weights over the K seeds (uniform when absent).
    pub seed_weights: Option<SeedWeights>,
    /// What produced the records (data seed, batch, sequence length, ...): informative.
    pub run: Value,
}

impl Session {
    /// Whether `other` is the same run: everything but the informative `run` record.
    pub fn same_run(&self, other: &Session) -> bool {
        (
            &self.model_sha256,
            &self.layout_sha256,
            &self.adapter,
            self.init_seed,
            &self.zo,
            &self.seed_weights,
        ) == (
            &other.model_sha256,
            &other.layout_sha256,
            &other.adapter,
            other.init_seed,
            &other.zo,
            &other.seed_weights,
        )
    }
}

/// FedKSeed-Pro weights from a JSON array of K integers, for a session in `mode`.
pub fn seed_weights_from_json(
    v: &Value,
    mode: SeedMode,
) -> core::result::Result<SeedWeights, String> {
    let SeedMode::KSeed { k } = mode else {
        return Err("apply to --mode kseed only".into());
    };
    let list = v.as_array().ok_or("must be a list of integers")?;
    if list.len() != k as usize {
        return Err(format!("has {} weights for K = {k} seeds", list.len()));
    }
    let weights = list
        .iter()
        .map(|w| w.as_u64().and_then(|w| u32::try_from(w).ok()))
        .collect::<Option<Vec<u32>>>()
        .ok_or("must hold integers in 0..2^32")?;
    SeedWeights::new(&weights).map_err(|e| e.to_string())
}

/// One applied step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Record {
    pub step: u64,
    pub seed: u32,
    pub g: f32,
}

impl Session {
    pub fn to_json(&self) -> Value {
        let (mode, k) = match self.zo.mode {
            SeedMode::Mezo => ("mezo", Value::Null),
            SeedMode::KSeed { k } => ("kseed", json!(k)),
        };
        json!({
            "format": "edgetune-zo-session",
            "version": VERSION,
            "model_sha256": self.model_sha256,
            "layout_sha256": self.layout_sha256,
            "adapter": config_json(&self.adapter),
            "init_seed": self.init_seed.to_string(),
            "session_key": self.zo.session_key.to_string(),
            "z": match self.zo.kind { ZKind::Binomial => "binomial", ZKind::Rademacher => "rademacher" },
            "mode": mode,
            "k": k,
            "eps": self.zo.eps,
            "lr": self.zo.lr,
            "delta_exp": self.zo.delta_exp,
            "lr_decay_steps": self.zo.decay_steps,
            "seed_weights": self.seed_weights.as_ref().map(SeedWeights::weights),
            "run": self.run,
        })
    }

    pub fn from_json(v: &Value, file: &str) -> Result<Session> {
        let bad = |key: &str, reason: &str| Error::Metadata {
            file: file.to_owned(),
            key: key.to_owned(),
            reason: reason.to_owned(),
        };
        if v["format"] != "edgetune-zo-session" {
            return Err(bad("format", "is not edgetune-zo-session"));
        }
        match v["version"].as_u64() {
            Some(VERSION) => {}
            Some(other) => {
                return Err(bad(
                    "version",
                    &format!("{other} is not a version this build reads ({VERSION})"),
                ));
            }
            None => return Err(bad("version", "is missing")),
        }
        let text = |key: &str| {
            v[key]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| bad(key, "must be a string"))
        };
        let u64_text = |key: &str| {
            text(key)?
                .parse::<u64>()
                .map_err(|_| bad(key, "must be a decimal u64 in a string"))
        };
        let f32_of = |key: &str| {
            v[key]
                .as_f64()
                .map(|x| x as f32)
                .ok_or_else(|| bad(key, "must be a number"))
        };
        let kind = match text("z")?.as_str() {
            "binomial" => ZKind::Binomial,
            "rademacher" => ZKind::Rademacher,
            _ => return Err(bad("z", "must be binomial or rademacher")),
        };
        let mode = match text("mode")?.as_str() {
            "mezo" => SeedMode::Mezo,
            "kseed" => SeedMode::KSeed {
                k: v["k"]
                    .as_u64()
                    .and_then(|k| u32::try_from(k).ok())
                    .ok_or_else(|| bad("k", "must be an integer below 2^32"))?,
            },
            _ => return Err(bad("mode", "must be mezo or kseed")),
        };
        let zo = ZoConfig {
            session_key: u64_text("session_key")?,
            kind,
            mode,
            eps: f32_of("eps")?,
            lr: f32_of("lr")?,
            delta_exp: v["delta_exp"]
                .as_u64()
                .and_then(|d| u32::try_from(d).ok())
                .ok_or_else(|| bad("delta_exp", "must be an integer"))?,
            // Absent in sessions written before decay existed: constant.
            decay_steps: match &v["lr_decay_steps"] {
                Value::Null => 0,
                d => d
                    .as_u64()
                    .and_then(|d| u32::try_from(d).ok())
                    .ok_or_else(|| bad("lr_decay_steps", "must be an integer below 2^32"))?,
            },
        };
        zo.validate().map_err(|e| bad("zo", &e.to_string()))?;
        let seed_weights = match &v["seed_weights"] {
            Value::Null => None,
            w => Some(seed_weights_from_json(w, zo.mode).map_err(|e| bad("seed_weights", &e))?),
        };
        Ok(Session {
            model_sha256: text("model_sha256")?,
            layout_sha256: text("layout_sha256")?,
            adapter: parse_config(&v["adapter"], &format!("{file}: adapter"))?,
            init_seed: u64_text("init_seed")?,
            zo,
            seed_weights,
            run: v["run"].clone(),
        })
    }

    /// Fails unless this session belongs to the model and layout given (hex SHA-256).
    pub fn check_target(&self, model_sha256: &str, layout_sha256: &str, file: &str) -> Result<()> {
        for (what, want, got) in [
            ("model_sha256", &self.model_sha256, model_sha256),
            ("layout_sha256", &self.layout_sha256, layout_sha256),
        ] {
            if want != got {
                return Err(Error::Metadata {
                    file: file.to_owned(),
                    key: what.to_owned(),
                    reason: format!(
                        "is {want}, but this model{} gives {got}: the history belongs to another {}",
                        if what == "layout_sha256" {
                            " with this adapter"
                        } else {
                            ""
                        },
                        if what == "layout_sha256" {
                            "trainable layout"
                        } else {
                            "model"
                        }
                    ),
                });
            }
        }
        Ok(())
    }
}

/// Writes session.json and w0.safetensors (once per run). The session also lists the
/// layout (name, rows, cols in the pinned order), which its hash covers, so a reader
/// in another language needs no model to replay.
pub fn write_start(dir: &Path, s: &Session, layout: &[ParamInfo], w0: &[Vec<f32>]) -> Result<()> {
    write_atomic(&dir.join(W0), &safetensors_bytes(layout, w0, W0)?)?;
    let mut v = s.to_json();
    v["layout"] = layout
        .iter()
        .map(|p| json!({"name": p.name, "rows": p.rows, "cols": p.cols}))
        .collect();
    let text = serde_json::to_string_pretty(&v).unwrap_or_default();
    write_atomic(&dir.join(SESSION), text.as_bytes())
}

/// Rewrites history.jsonl with every record so far.
pub fn write_history(dir: &Path, records: &[Record]) -> Result<()> {
    let mut text = String::with_capacity(records.len() * 48);
    for r in records {
        // `{:?}` prints the shortest decimal that reads back as the same f32.
        let _ = writeln!(
            text,
            "{{\"step\":{},\"seed\":{},\"g\":{:?}}}",
            r.step, r.seed, r.g
        );
    }
    write_atomic(&dir.join(HISTORY), text.as_bytes())
}

pub fn write_progress(dir: &Path, next_step: u64) -> Result<()> {
    write_atomic(
        &dir.join(PROGRESS),
        json!({ "next_step": next_step }).to_string().as_bytes(),
    )
}

/// The next step recorded by the last checkpoint (0 without one).
pub fn read_progress(dir: &Path) -> Result<u64> {
    let path = dir.join(PROGRESS);
    if !path.exists() {
        return Ok(0);
    }
    read_json(&path, FileKind::History)?["next_step"]
        .as_u64()
        .ok_or_else(|| Error::Metadata {
            file: path.display().to_string(),
            key: "next_step".into(),
            reason: "must be an integer".into(),
        })
}

pub fn read_session(dir: &Path) -> Result<Session> {
    let path = dir.join(SESSION);
    Session::from_json(
        &read_json(&path, FileKind::History)?,
        &path.display().to_string(),
    )
}

/// The start values in layout order, checked by name, shape and finiteness.
pub fn read_w0(dir: &Path, layout: &[ParamInfo]) -> Result<Vec<Vec<f32>>> {
    read_layout(&dir.join(W0), layout)
}

/// The records of history.jsonl, every one checked (steps increasing, seeds in range,
/// scalars finite and bounded) before any is returned. A missing file is an empty history.
pub fn read_history(dir: &Path, s: &Session) -> Result<Vec<Record>> {
    let path = dir.join(HISTORY);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let shown = path.display().to_string();
    let text = read_text(&path, FileKind::History)?;
    if !text.is_empty() && !text.ends_with('\n') {
        return Err(Error::Syntax {
            path: shown,
            line: text.lines().count(),
            column: 0,
            message: "the last record is cut off (the history is truncated)".into(),
        });
    }
    let mut out: Vec<Record> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let err = |message: String| Error::Syntax {
            path: shown.clone(),
            line: i + 1,
            column: 0,
            message,
        };
        let v: Value =
            serde_json::from_str(line).map_err(|e| err(format!("not a JSON record: {e}")))?;
        let step = v["step"]
            .as_u64()
            .ok_or_else(|| err("`step` must be an integer".into()))?;
        let seed = v["seed"]
            .as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(|| err("`seed` must be an integer below 2^32".into()))?;
        let g = v["g"]
            .as_f64()
            .ok_or_else(|| err("`g` must be a number".into()))? as f32;
        check_scalar(g).map_err(|e| err(e.to_string()))?;
        if let SeedMode::KSeed { k } = s.zo.mode
            && seed >= k
        {
            return Err(err(format!("seed {seed} is not below K = {k}")));
        }
        if out.last().is_some_and(|r| r.step >= step) {
            return Err(err(format!("step {step} does not follow the one before")));
        }
        out.push(Record { step, seed, g });
    }
    Ok(out)
}
