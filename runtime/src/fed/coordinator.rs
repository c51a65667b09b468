//! The server's side of a session without transport or storage: it checks uploads,
//! closes a round from a set of committed uploads (aggregate, apply, digest, Pro weights)
//! and serves checkpoints. A round is a deterministic function of its uploads, so a server
//! that restarts rebuilds every round by closing them again from its store.

use super::aggregate::{Policy, ProStats, updates};
use super::{
    Round, Scalars, Session, Upload, checkpoint_bytes, protocol, seed_for, seed_weights, zo_config,
};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::held::Held;
use crate::model::{KvCache, Model};
use crate::train::{COEFFICIENT_BUDGET, Example, SeedWeights, ZoConfig, ZoState, batch_nll};
use std::prelude::v1::*;

/// The lowest FedKSeed-Pro temperature: below it softmax(a / T) overflows into NaN weights.
pub const MIN_TEMPERATURE: f64 = 1e-3;

/// A closed round not yet made the coordinator's state.
pub struct Prepared<B: Backend> {
    pub round: u32,
    /// The round message.
    pub bytes: Vec<u8>,
    state: ZoState<B>,
    stats: ProStats,
    weights: Option<SeedWeights>,
}

impl<B: Backend> core::fmt::Debug for Prepared<B> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Prepared")
            .field("round", &self.round)
            .finish_non_exhaustive()
    }
}

/// The aggregation state of one session.
pub struct Coordinator<'m, 'b, B: Backend> {
    model: Held<'m, Model<'b, B>>,
    pub session: Session,
    cfg: ZoConfig,
    pub policy: Policy,
    state: ZoState<B>,
    stats: ProStats,
    /// The draw weights of the open round (from the last closed round).
    weights: Option<SeedWeights>,
    /// The last round closed (0: none).
    pub round: u32,
}

impl<B: Backend> core::fmt::Debug for Coordinator<'_, '_, B> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Coordinator")
            .field("session", &self.session)
            .field("round", &self.round)
            .finish_non_exhaustive()
    }
}

impl<'m, 'b, B: Backend> Coordinator<'m, 'b, B> {
    /// A session over `model`, whose adapter (attached with the session key as its init
    /// seed) must be the session's layout.
    pub fn new(
        model: impl Into<Held<'m, Model<'b, B>>>,
        session: Session,
        policy: Policy,
    ) -> Result<Self> {
        let model = model.into();
        if session.layout_sha256 != crate::adapter::layout_hash(model.layout()) {
            return Err(Error::Federation {
                reason: "the session's layout hash is not the model's adapter layout".into(),
            });
        }
        if !(0.0..0.5).contains(&policy.trim)
            || policy
                .temperature
                .is_some_and(|t| !(MIN_TEMPERATURE..=1e6).contains(&t))
        {
            return Err(Error::InvalidArgument {
                name: "policy",
                reason: format!(
                    "trim must be in [0, 0.5) and the temperature in [{MIN_TEMPERATURE}, 1e6]"
                ),
            });
        }
        let w0 = super::start_values(&model, &session)?;
        let state = ZoState::new(model.backend(), &model, &w0)?;
        Ok(Coordinator {
            model,
            cfg: zo_config(&session),
            policy,
            state,
            stats: ProStats::new(session.k),
            weights: None,
            session,
            round: 0,
        })
    }

    /// Decodes an upload and checks that it is for the open round.
    pub fn check_upload(&self, bytes: &[u8]) -> Result<Upload> {
        let up = protocol("upload", Upload::decode(bytes, &self.session))?;
        if up.round != self.round + 1 {
            return Err(Error::Federation {
                reason: format!(
                    "the upload is for round {}, the open round is {}",
                    up.round,
                    self.round + 1
                ),
            });
        }
        let Ok(client) = u32::try_from(up.client_id) else {
            return Err(Error::InvalidArgument {
                name: "upload",
                reason: format!("client id {} is not below 2^32", up.client_id),
            });
        };
        // FedKSeed: each pair's seed must be the client's own draw for a step, in step
        // order (skipped steps leave gaps), so no client can pile its steps on one seed.
        if let Scalars::Pairs(pairs) = &up.scalars {
            let mut step = 0u32;
            for &(seed, _) in pairs {
                loop {
                    if step >= up.steps {
                        return Err(Error::InvalidArgument {
                            name: "upload",
                            reason: format!(
                                "seed {seed} is not the client's draw for any remaining step"
                            ),
                        });
                    }
                    let drawn =
                        seed_for(&self.session, up.round, step, client, self.weights.as_ref());
                    step += 1;
                    if drawn == seed {
                        break;
                    }
                }
            }
        }
        Ok(up)
    }

    /// Closes the open round from its committed uploads (at most one per client; others
    /// are ignored): the round message, encoded, after applying it to the server's state.
    pub fn close_round(&mut self, uploads: &[Upload]) -> Result<Vec<u8>> {
        let p = self.prepare_round(uploads)?;
        let bytes = p.bytes.clone();
        self.commit(p)?;
        Ok(bytes)
    }

    /// The open round's result without changing anything: the server stores it first and
    /// [`Coordinator::commit`]s it after, so a failed store leaves the coordinator as it was.
    ///
    /// If the round would take the integer state past its budget
    /// ([`crate::train::COEFFICIENT_BUDGET`]), every coefficient is scaled by
    /// remaining / needed (integer, toward zero): a session that has spent its budget
    /// publishes empty rounds instead of failing.
    pub fn prepare_round(&self, uploads: &[Upload]) -> Result<Prepared<B>> {
        let round = self.round + 1;
        let mut mine: Vec<Upload> = uploads
            .iter()
            .filter(|u| u.round == round)
            .cloned()
            .collect();
        mine.sort_by_key(|u| u.client_id);
        mine.dedup_by_key(|u| u.client_id);
        let mut updates = updates(
            &self.session,
            round,
            &mine,
            self.weights.as_ref(),
            &self.policy,
        );
        let need: u64 = updates
            .iter()
            .map(|&(_, q)| u64::from(q.unsigned_abs()))
            .sum();
        let left = COEFFICIENT_BUDGET.saturating_sub(self.state.spent());
        if need > left {
            for u in &mut updates {
                u.1 = (i128::from(u.1) * i128::from(left) / i128::from(need)) as i32;
            }
            updates.retain(|&(_, q)| q != 0);
        }
        let mut state = self.state.duplicate(self.model.backend(), &self.model)?;
        state.apply(self.model.backend(), &self.cfg, &updates)?;
        let mut stats = self.stats.clone();
        stats.record(&self.session, round, &mine, self.weights.as_ref());
        let msg = Round {
            session_tag: self.session.tag(),
            round,
            updates,
            weights: self.policy.temperature.map(|t| stats.weights(t)),
            digest: state.hash(self.model.backend())?,
        };
        let bytes = msg.encode();
        // The weights clients will use are the ones they decode.
        let weights = protocol("own round", Round::decode(&bytes, &self.session))?;
        Ok(Prepared {
            round,
            state,
            stats,
            weights: seed_weights(&weights),
            bytes,
        })
    }

    /// Makes a prepared round the coordinator's state (it must be the open round's).
    pub fn commit(&mut self, p: Prepared<B>) -> Result<()> {
        if p.round != self.round + 1 {
            return Err(Error::Federation {
                reason: format!(
                    "round {} prepared while round {} is open",
                    p.round,
                    self.round + 1
                ),
            });
        }
        self.state = p.state;
        self.stats = p.stats;
        self.weights = p.weights;
        self.round = p.round;
        Ok(())
    }

    /// The state after the last closed round, as a checkpoint.
    pub fn checkpoint(&self) -> Result<Vec<u8>> {
        checkpoint_bytes(
            self.model.layout(),
            &self.state.accumulators(self.model.backend())?,
            (self.round, self.state.spent()),
            &self.state.hash(self.model.backend())?,
            // As published: 4-bit weights, each in 1..=16.
            self.weights
                .as_ref()
                .map(|w| w.weights().iter().map(|&x| x as u8).collect::<Vec<u8>>())
                .as_deref(),
        )
    }

    /// Mean loss per target token of `set` at the state after the last closed round.
    pub fn eval(&self, cache: &mut KvCache<B>, set: &[Example]) -> Result<f64> {
        self.state
            .load_into(self.model.backend(), &self.model, &self.cfg, 0, 0.0)?;
        let (nll, n) = batch_nll(&self.model, cache, set)?;
        Ok(nll / n.max(1) as f64)
    }

    /// The hash of the state after the last closed round.
    pub fn state_hash(&self) -> Result<[u8; 32]> {
        self.state.hash(self.model.backend())
    }
}
