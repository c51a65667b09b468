//! Seed-based federated tuning over the wire protocol (`edgetune-proto`,
//! docs/protocol.md): the device client ([`client`]), the server's aggregation
//! ([`aggregate`]), and what both share: the zeroth-order constants a session implies, the
//! seed each local step draws, and the checkpoint format. The HTTP server and the CLI are
//! skins over this module.

pub mod aggregate;
pub mod client;
pub mod coordinator;

use crate::adapter::ParamInfo;
use crate::error::{Error, Result};
use crate::rng::{self, ZKind, philox4x32_10};
use crate::train::{SeedMode, SeedWeights, ZoConfig};
use edgetune_proto as proto;
use std::prelude::v1::*;

pub use proto::{Encoding, Round, Scalars, Session, Upload};

/// The zeroth-order constants of a session (its seeds are always among K).
pub fn zo_config(s: &Session) -> ZoConfig {
    ZoConfig {
        session_key: s.session_key,
        kind: if s.z_kind == 1 {
            ZKind::Rademacher
        } else {
            ZKind::Binomial
        },
        mode: SeedMode::KSeed { k: s.k },
        eps: s.eps,
        lr: s.lr,
        delta_exp: u32::from(s.delta_exp),
        decay_steps: 0,
    }
}

/// The seed of local step `step` of round `round`: from the word
/// w = Philox4x32-10(key = session key, counter = (step, round, c, 2))\[0\] with c the
/// client's id in FedKSeed mode and 0 with shared seeds (so every client draws the same),
/// then (w * K) >> 32, or by the round's FedKSeed-Pro weights.
pub fn seed_for(
    s: &Session,
    round: u32,
    step: u32,
    client: u32,
    weights: Option<&SeedWeights>,
) -> u32 {
    let c = match s.seed_mode {
        proto::SeedMode::KSeed => client,
        proto::SeedMode::Shared => 0,
    };
    let key = [s.session_key as u32, (s.session_key >> 32) as u32];
    let w = philox4x32_10([step, round, c, rng::PURPOSE_SAMPLE], key)[0];
    match weights {
        Some(ws) => ws.pick(w),
        None => ((u64::from(w) * u64::from(s.k)) >> 32) as u32,
    }
}

/// The session's start values `w0` for `model`'s adapter: generated ones (LoRA, IA3, scale
/// factors) from docs/zeroth-order.md's init with the session key as the init seed, so
/// every participant derives them alone; the model's own ones (norms) as loaded. Read
/// from the generator, not from the model's adapter buffers, which training overwrites.
pub fn start_values<B: crate::Backend>(
    model: &crate::model::Model<'_, B>,
    s: &Session,
) -> Result<Vec<Vec<f32>>> {
    let current = model.read_params()?;
    Ok(model
        .layout()
        .iter()
        .enumerate()
        .zip(current)
        .map(|((i, p), cur)| match p.init {
            crate::adapter::Init::Model => cur,
            init => crate::adapter::init_values(init, p.len(), i as u32, s.session_key),
        })
        .collect())
}

/// A round's 4-bit Pro weights as sampling weights.
pub fn seed_weights(round: &Round) -> Option<SeedWeights> {
    let ws: Vec<u32> = round
        .weights
        .as_ref()?
        .iter()
        .map(|&w| u32::from(w))
        .collect();
    SeedWeights::new(&ws).ok()
}

/// Decodes a message, naming it in the error.
pub fn protocol<T>(what: &str, r: core::result::Result<T, proto::ProtoError>) -> Result<T> {
    r.map_err(|error| Error::Protocol {
        what: what.to_owned(),
        error,
    })
}

const CHECKPOINT_FORMAT: &str = "edgetune-fed-checkpoint";

/// A checkpoint: the trainable state after round `round` as a safetensors file whose
/// tensors are the accumulators (I32, layout names and shapes) and whose metadata hold
/// `format`, `round`, `spent`, `state_hash` and, when the round published FedKSeed-Pro
/// weights for the next one, `next_weights` (hex, a byte each). The start values are not in it: every
/// participant derives them from the model and the session key.
pub fn checkpoint_bytes(
    layout: &[ParamInfo],
    acc: &[Vec<i32>],
    (round, spent): (u32, u64),
    state_hash: &[u8; 32],
    next_weights: Option<&[u8]>,
) -> Result<Vec<u8>> {
    let data: Vec<Vec<u8>> = acc
        .iter()
        .map(|a| a.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views = layout
        .iter()
        .zip(&data)
        .map(|(p, d)| {
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::I32,
                vec![p.rows as usize, p.cols as usize],
                d,
            )
            .map(|v| (p.name.clone(), v))
            .map_err(|e| Error::Tensor {
                file: "checkpoint".into(),
                tensor: p.name.clone(),
                reason: e.to_string(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut meta = std::collections::HashMap::from([
        ("format".to_owned(), CHECKPOINT_FORMAT.to_owned()),
        ("round".to_owned(), round.to_string()),
        ("spent".to_owned(), spent.to_string()),
        (
            "state_hash".to_owned(),
            crate::train::history::hex(state_hash),
        ),
    ]);
    if let Some(w) = next_weights {
        meta.insert("next_weights".to_owned(), crate::train::history::hex(w));
    }
    safetensors::serialize(views, Some(meta)).map_err(|e| Error::Tensor {
        file: "checkpoint".into(),
        tensor: String::new(),
        reason: e.to_string(),
    })
}

/// What a checkpoint holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub round: u32,
    pub spent: u64,
    pub state_hash: String,
    pub acc: Vec<Vec<i32>>,
    /// The next round's seed weights, if the round published them.
    pub next_weights: Option<SeedWeights>,
}

/// Reads a checkpoint for `layout`: every tensor by name and shape, nothing else.
pub fn read_checkpoint(bytes: &[u8], layout: &[ParamInfo]) -> Result<Checkpoint> {
    let bad = |reason: String| Error::Syntax {
        path: "checkpoint".into(),
        line: 0,
        column: 0,
        message: reason,
    };
    let (_, meta) = crate::guard::guarded("safetensors", "checkpoint", || {
        safetensors::SafeTensors::read_metadata(bytes)
    })?
    .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let st = crate::guard::guarded("safetensors", "checkpoint", || {
        safetensors::SafeTensors::deserialize(bytes)
    })?
    .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let m = meta.metadata().clone().unwrap_or_default();
    if m.get("format").map(String::as_str) != Some(CHECKPOINT_FORMAT) {
        return Err(bad(format!("metadata `format` is not {CHECKPOINT_FORMAT}")));
    }
    let num = |k: &str| -> Result<u64> {
        m.get(k)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad(format!("metadata `{k}` is missing or not a number")))
    };
    let round = u32::try_from(num("round")?)
        .ok()
        .filter(|&r| r < u32::MAX)
        .ok_or_else(|| bad("round out of range".into()))?;
    let next_weights = match m.get("next_weights") {
        None => None,
        Some(h) => {
            let ws: Option<Vec<u32>> = (0..h.len())
                .step_by(2)
                .map(|i| {
                    h.get(i..i + 2)
                        .and_then(|x| u32::from_str_radix(x, 16).ok())
                })
                .collect();
            let ws = ws
                .filter(|w| w.iter().all(|&x| (1..=16).contains(&x)))
                .ok_or_else(
                    || bad("metadata `next_weights` is not hex weights in 1..=16".into()),
                )?;
            Some(SeedWeights::new(&ws)?)
        }
    };
    let spent = num("spent")?;
    let state_hash = m.get("state_hash").cloned().unwrap_or_default();
    if st.len() != layout.len() {
        return Err(bad(format!(
            "{} tensors; the layout has {}",
            st.len(),
            layout.len()
        )));
    }
    let mut acc = Vec::with_capacity(layout.len());
    for p in layout {
        let t = st
            .tensor(&p.name)
            .map_err(|_| bad(format!("tensor `{}` is missing", p.name)))?;
        if t.dtype() != safetensors::Dtype::I32 || t.shape() != [p.rows as usize, p.cols as usize] {
            return Err(bad(format!(
                "tensor `{}` is {:?} {:?}; the layout needs I32 [{}, {}]",
                p.name,
                t.dtype(),
                t.shape(),
                p.rows,
                p.cols
            )));
        }
        acc.push(
            t.data()
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        );
    }
    Ok(Checkpoint {
        round,
        spent,
        state_hash,
        acc,
        next_weights,
    })
}
