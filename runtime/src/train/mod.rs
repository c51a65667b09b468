//! Zeroth-order training (MeZO, FedKSeed): two forward passes per step, every update a
//! (seed, scalar) pair, and a trainable state that is the same bits on every device.
//!
//! The state of each trainable tensor is its start `w0` (f32) and an integer accumulator
//! `D` (i32); its value is `w0 + (2^-e / 4) * D` where e is [`ZoConfig::delta_exp`]. A step
//! with scalar g adds `Q * 4z` to `D`, where `Q = round_half_even(-lr * g * 2^e)` is
//! computed exactly in f64 ([`ZoConfig::coefficient`]). Integer sums do not depend on order or
//! device, so applying steps one by one, replaying a history, or fusing many seeds into one
//! pass ([`crate::Op::ZoAccumulate`]) give identical accumulators; [`ZoState::spent`]
//! bounds the accumulators so they cannot overflow. The perturbed forward passes read
//! `w + eps * z` computed in the kernel ([`crate::Op::ZoWeights`]): `w0` and `D` are
//! never written by a perturbation. docs/zeroth-order.md is the specification.

#[cfg(feature = "std")]
pub mod backprop;
#[cfg(feature = "std")]
pub mod data;
#[cfg(feature = "std")]
pub mod history;
#[cfg(feature = "std")]
pub mod run;

use crate::backend::{Backend, Op};
use crate::error::{Error, Result};
use crate::model::{KvCache, Model};
use crate::rng::{self, ZKind, philox4x32_10};
use sha2::{Digest, Sha256};
use std::prelude::v1::*;

/// The largest |Q| one step may add; larger coefficients are clamped to it.
pub const MAX_COEFFICIENT: i32 = 1 << 20;
/// Sum of |Q| over a state's history at which it refuses further updates: 32 * this is
/// below 2^31, so no accumulator (|4z| <= 32) can overflow i32.
pub const COEFFICIENT_BUDGET: u64 = (i32::MAX as u64) / 32;
/// Scalars beyond this are treated as corrupt in a history.
pub const MAX_ABS_G: f32 = 1e9;

/// How the seed of each step is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeedMode {
    /// MeZO: a fresh seed per step (the step number).
    Mezo,
    /// FedKSeed: one of K candidate seeds per step, drawn uniformly or by
    /// [`SeedWeights`].
    KSeed { k: u32 },
}

/// FedKSeed-Pro's non-uniform choice among the K candidate seeds, as integer weights (a
/// server quantises its probabilities to them), so every device draws the same seed with
/// integer arithmetic alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedWeights {
    /// Running sums of the weights; the last is their total.
    cumulative: Vec<u64>,
}

impl SeedWeights {
    /// Weights for K = `weights.len()` seeds; at least one must be non-zero.
    pub fn new(weights: &[u32]) -> Result<SeedWeights> {
        let cumulative: Vec<u64> = weights
            .iter()
            .scan(0u64, |sum, &w| {
                *sum += u64::from(w);
                Some(*sum)
            })
            .collect();
        if cumulative.last().is_none_or(|&t| t == 0) {
            return Err(Error::InvalidArgument {
                name: "seed weights",
                reason: "at least one weight must be above zero".into(),
            });
        }
        Ok(SeedWeights { cumulative })
    }

    /// K.
    pub fn len(&self) -> usize {
        self.cumulative.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cumulative.is_empty()
    }

    pub fn weights(&self) -> Vec<u32> {
        let mut prev = 0;
        self.cumulative
            .iter()
            .map(|&c| {
                let w = (c - prev) as u32;
                prev = c;
                w
            })
            .collect()
    }

    /// The seed a 32-bit draw `w` picks: with T the total, the first i whose running sum
    /// exceeds (w * T) >> 32, so seed i is picked with probability weight_i / T (to 2^-32).
    pub fn pick(&self, w: u32) -> u32 {
        let total = self.cumulative.last().copied().unwrap_or(0);
        let target = ((u128::from(w) * u128::from(total)) >> 32) as u64;
        self.cumulative.partition_point(|&c| c <= target) as u32
    }
}

/// The shared constants of a zeroth-order session.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ZoConfig {
    pub session_key: u64,
    pub kind: ZKind,
    pub mode: SeedMode,
    /// Perturbation scale.
    pub eps: f32,
    pub lr: f32,
    /// The update unit is 2^-delta_exp; the accumulator's unit is a quarter of it.
    pub delta_exp: u32,
    /// The learning rate falls linearly to zero at this step (0: constant).
    pub decay_steps: u32,
}

impl ZoConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |name, reason: String| Err(Error::InvalidArgument { name, reason });
        if !(self.eps.is_finite() && self.eps > 0.0 && self.eps <= 1.0) {
            return bad("eps", format!("{} must be in (0, 1]", self.eps));
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr <= 1.0) {
            return bad("lr", format!("{} must be in (0, 1]", self.lr));
        }
        if !(8..=40).contains(&self.delta_exp) {
            return bad("delta_exp", format!("{} must be in 8..=40", self.delta_exp));
        }
        if let SeedMode::KSeed { k } = self.mode
            && k == 0
        {
            return bad("seeds", "K must be at least 1".into());
        }
        Ok(())
    }

    /// The accumulator's unit, 2^-(delta_exp + 2), exact in f32.
    pub fn unit(&self) -> f32 {
        libm::exp2f(-(self.delta_exp as f32) - 2.0)
    }

    /// The seed of step `step`: the step itself (MeZO), or a draw among K from the word
    /// w = Philox(key = session key, counter = (step, 0, 0, PURPOSE_SAMPLE))\[0\]: uniform
    /// by multiply-shift, (w * K) >> 32, or by `weights` ([`SeedWeights::pick`]).
    pub fn seed_for_step(&self, step: u32, weights: Option<&SeedWeights>) -> u32 {
        match self.mode {
            SeedMode::Mezo => step,
            SeedMode::KSeed { k } => {
                let key = [self.session_key as u32, (self.session_key >> 32) as u32];
                let w = philox4x32_10([step, 0, 0, rng::PURPOSE_SAMPLE], key)[0];
                match weights {
                    Some(weights) => weights.pick(w),
                    None => ((u64::from(w) * u64::from(k)) >> 32) as u32,
                }
            }
        }
    }

    /// The learning rate of step `step` in f64: lr, or with decay
    /// lr * max(0, 1 - step / decay_steps), each operation one IEEE f64 rounding in this
    /// order, so every language computes the same bits.
    pub fn lr_at(&self, step: u64) -> f64 {
        let lr = f64::from(self.lr);
        if self.decay_steps == 0 {
            return lr;
        }
        let factor = 1.0 - step as f64 / f64::from(self.decay_steps);
        lr * factor.max(0.0)
    }

    /// Q for scalar `g` at step `step`: round_half_even(-lr_at(step) * g * 2^delta_exp) in
    /// f64 (without decay the product of two f32 values is exact there), clamped to
    /// ±[`MAX_COEFFICIENT`].
    pub fn coefficient(&self, g: f32, step: u64) -> i32 {
        let q = -self.lr_at(step) * f64::from(g) * libm::exp2(f64::from(self.delta_exp));
        let bound = f64::from(MAX_COEFFICIENT);
        libm::rint(q.clamp(-bound, bound)) as i32
    }
}

/// A trainable element's value: `(w0 + (4096 unit) * (d >> 12)) + unit * (d & 4095)`. With
/// `unit` a power of two both products are exact (each integer part fits f32's 24 bits), so
/// the value has two roundings whatever a device fuses, and is the same bits everywhere.
pub fn value(w0: f32, d: i32, unit: f32) -> f32 {
    (w0 + (4096.0 * unit) * (d >> 12) as f32) + unit * (d & 4095) as f32
}

/// Checks a scalar read from a history or a message.
pub fn check_scalar(g: f32) -> Result<()> {
    if !g.is_finite() || g.abs() > MAX_ABS_G {
        return Err(Error::InvalidArgument {
            name: "g",
            reason: format!("{g} is not a finite scalar of at most {MAX_ABS_G:e}"),
        });
    }
    Ok(())
}

/// The trainable state: per tensor of the model's adapter layout, `w0` and `D` on the
/// device.
#[derive(Debug)]
pub struct ZoState<B: Backend> {
    pub layout_hash: [u8; 32],
    lens: Vec<u32>,
    base: Vec<B::Buffer>,
    acc: Vec<B::Buffer>,
    spent: u64,
}

impl<B: Backend> ZoState<B> {
    /// A state starting from the values `w0` (layout order), with every accumulator zero.
    pub fn new(be: &B, model: &Model<'_, B>, w0: &[Vec<f32>]) -> Result<Self> {
        let layout = model.layout();
        if layout.is_empty() {
            return Err(Error::InvalidArgument {
                name: "trainable",
                reason: "the model has no adapter attached".into(),
            });
        }
        if w0.len() != layout.len() {
            return Err(Error::InvalidArgument {
                name: "w0",
                reason: format!("{} tensors for a layout of {}", w0.len(), layout.len()),
            });
        }
        let mut base = Vec::with_capacity(layout.len());
        let mut acc = Vec::with_capacity(layout.len());
        for (p, v) in layout.iter().zip(w0) {
            if v.len() != p.len() as usize {
                return Err(Error::Tensor {
                    file: "w0".into(),
                    tensor: p.name.clone(),
                    reason: format!("holds {} values; the layout needs {}", v.len(), p.len()),
                });
            }
            base.push(be.upload_f32(v, "trainable w0")?);
            acc.push(be.alloc(u64::from(p.len()) * 4, "trainable accumulator")?);
        }
        Ok(ZoState {
            layout_hash: crate::adapter::layout_hash(layout),
            lens: layout.iter().map(|p| p.len()).collect(),
            base,
            acc,
            spent: 0,
        })
    }

    /// A state with the given start values, accumulators and spent budget (a checkpoint).
    pub fn from_parts(
        be: &B,
        model: &Model<'_, B>,
        w0: &[Vec<f32>],
        acc: &[Vec<i32>],
        spent: u64,
    ) -> Result<Self> {
        let mut s = ZoState::new(be, model, w0)?;
        if acc.len() != s.lens.len() || acc.iter().zip(&s.lens).any(|(a, &n)| a.len() != n as usize)
        {
            return Err(Error::InvalidArgument {
                name: "accumulators",
                reason: "do not match the layout's tensors and sizes".into(),
            });
        }
        if spent > COEFFICIENT_BUDGET {
            return Err(Error::InvalidArgument {
                name: "spent",
                reason: format!("{spent} exceeds the budget {COEFFICIENT_BUDGET}"),
            });
        }
        for (buf, a) in s.acc.iter_mut().zip(acc) {
            let bytes: Vec<u8> = a.iter().flat_map(|v| v.to_le_bytes()).collect();
            *buf = be.upload(&bytes, "trainable accumulator")?;
        }
        s.spent = spent;
        Ok(s)
    }

    /// An independent copy (for local steps that must not touch this state).
    pub fn duplicate(&self, be: &B, model: &Model<'_, B>) -> Result<Self> {
        ZoState::from_parts(
            be,
            model,
            &self.start(be)?,
            &self.accumulators(be)?,
            self.spent,
        )
    }

    /// The sum of |Q| applied so far.
    pub fn spent(&self) -> u64 {
        self.spent
    }

    /// Number of trainable values.
    pub fn params(&self) -> u64 {
        self.lens.iter().map(|&n| u64::from(n)).sum()
    }

    /// Writes `w + eps * z(seed)` (eps may be negative or zero) into the model's adapter
    /// buffers, which the next forward pass reads.
    pub fn load_into(
        &self,
        be: &B,
        model: &Model<'_, B>,
        cfg: &ZoConfig,
        seed: u32,
        eps: f32,
    ) -> Result<()> {
        let views = model.params()?;
        if views.len() != self.lens.len() {
            return Err(Error::InvalidArgument {
                name: "trainable",
                reason: "the model's adapter is not the state's layout".into(),
            });
        }
        for (i, out) in views.into_iter().enumerate() {
            be.run(&Op::ZoWeights {
                base: &self.base[i],
                acc: &self.acc[i],
                out,
                n: self.lens[i],
                step: cfg.unit(),
                eps,
                session_key: cfg.session_key,
                seed,
                tensor: i as u32,
                kind: cfg.kind,
            })?;
        }
        Ok(())
    }

    /// Adds `Q * 4z(seed)` to every accumulator for each (seed, Q), in one fused pass per
    /// tensor. Refused, with nothing applied, if the budget would be exceeded.
    pub fn apply(&mut self, be: &B, cfg: &ZoConfig, updates: &[(u32, i32)]) -> Result<()> {
        if updates.is_empty() {
            return Ok(());
        }
        let cost: u64 = updates
            .iter()
            .map(|&(_, q)| u64::from(q.unsigned_abs()))
            .sum();
        if self.spent + cost > COEFFICIENT_BUDGET {
            return Err(Error::InvalidArgument {
                name: "updates",
                reason: format!(
                    "the accumulated coefficients would reach {} of the {COEFFICIENT_BUDGET} \
                     that keep the integer state exact; lower lr or delta_exp",
                    self.spent + cost
                ),
            });
        }
        let n_seeds = u32::try_from(updates.len()).map_err(|_| Error::InvalidArgument {
            name: "updates",
            reason: "more than 2^32 seeds in one call".into(),
        })?;
        let pairs: Vec<u8> = updates
            .iter()
            .flat_map(|&(s, q)| [s.to_le_bytes(), q.to_le_bytes()])
            .flatten()
            .collect();
        let seeds = be.upload(&pairs, "seed list")?;
        for (i, acc) in self.acc.iter().enumerate() {
            be.run(&Op::ZoAccumulate {
                acc,
                seeds: &seeds,
                n: self.lens[i],
                n_seeds,
                session_key: cfg.session_key,
                tensor: i as u32,
                kind: cfg.kind,
            })?;
        }
        self.spent += cost;
        Ok(())
    }

    /// The accumulators, read back (layout order).
    pub fn accumulators(&self, be: &B) -> Result<Vec<Vec<i32>>> {
        self.acc
            .iter()
            .zip(&self.lens)
            .map(|(b, &n)| {
                let bytes = be.read(b)?;
                Ok(bytes
                    .chunks_exact(4)
                    .take(n as usize)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect())
            })
            .collect()
    }

    /// The start values, read back (layout order).
    pub fn start(&self, be: &B) -> Result<Vec<Vec<f32>>> {
        self.base
            .iter()
            .zip(&self.lens)
            .map(|(b, &n)| be.read_f32(b, n as usize))
            .collect()
    }

    /// SHA-256 of `edgetune-state-v1\n`, the layout hash, then per tensor its w0 (f32 LE)
    /// and its accumulator (i32 LE): the shared state, identical on every device.
    pub fn hash(&self, be: &B) -> Result<[u8; 32]> {
        let mut h = Sha256::new();
        h.update(b"edgetune-state-v1\n");
        h.update(self.layout_hash);
        for (w0, d) in self.start(be)?.iter().zip(self.accumulators(be)?) {
            for v in w0 {
                h.update(v.to_le_bytes());
            }
            for v in d {
                h.update(v.to_le_bytes());
            }
        }
        Ok(h.finalize().into())
    }
}

/// One training example: tokens, and which tokens the loss predicts (`targets[i]`: token
/// i is predicted from those before it; `targets[0]` is ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub tokens: Vec<u32>,
    pub targets: Vec<bool>,
}

/// KV cache positions that let [`batch_nll`] pack `batch` examples of up to `longest`
/// tokens into one forward pass, within the model's context (a longer batch takes more
/// passes).
pub fn pack_capacity(model: &Model<'_, impl Backend>, longest: usize, batch: usize) -> u32 {
    let context = model.cfg.context as usize;
    longest.saturating_mul(batch.max(1)).min(context) as u32
}

/// The summed NLL and target count of a batch. Consecutive examples are packed into one
/// forward pass while their tokens fit the cache's capacity ([`Model::packed_nll`]): a
/// cache of batch x longest positions runs the whole batch at once, a cache of the longest
/// example one example per pass.
pub fn batch_nll<B: Backend>(
    model: &Model<'_, B>,
    cache: &mut KvCache<B>,
    batch: &[Example],
) -> Result<(f64, usize)> {
    let mut total = (0.0, 0);
    let capacity = cache.capacity() as usize;
    let mut rest = batch;
    while !rest.is_empty() {
        // At least one example per pass: one longer than the cache is refused there.
        let mut tokens = rest[0].tokens.len();
        let mut n = 1;
        while n < rest.len() && tokens + rest[n].tokens.len() <= capacity {
            tokens += rest[n].tokens.len();
            n += 1;
        }
        let seqs: Vec<(&[u32], Option<&[bool]>)> = rest[..n]
            .iter()
            .map(|ex| (&ex.tokens[..], Some(&ex.targets[..])))
            .collect();
        let (nll, count) = model.packed_nll(cache, &seqs)?;
        total.0 += nll;
        total.1 += count;
        rest = &rest[n..];
    }
    Ok(total)
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutcome {
    pub seed: u32,
    /// Mean losses at w + eps z and w - eps z.
    pub loss_plus: f64,
    pub loss_minus: f64,
    /// The projected gradient (after clipping), or None when the step was skipped
    /// (non-finite loss).
    pub g: Option<f32>,
    /// Whether |g| was above the clip and was cut to it.
    pub clipped: bool,
    pub coefficient: i32,
}

/// One zeroth-order step on `batch` with seed `seed`: two perturbed forward passes, the
/// scalar g = (l+ - l-) / (2 eps), cut to ±`clip` if given (the recorded g is the cut one,
/// so a replay applies what the step applied), and the update. A non-finite loss skips
/// the step (nothing is applied). The model's adapter buffers are left perturbed: call
/// [`ZoState::load_into`] with eps = 0 before using the model otherwise.
#[allow(clippy::too_many_arguments)]
pub fn zo_step<B: Backend>(
    be: &B,
    model: &Model<'_, B>,
    cache: &mut KvCache<B>,
    state: &mut ZoState<B>,
    cfg: &ZoConfig,
    batch: &[Example],
    (step, seed): (u64, u32),
    clip: Option<f32>,
) -> Result<StepOutcome> {
    let mut loss = |eps: f32| -> Result<f64> {
        state.load_into(be, model, cfg, seed, eps)?;
        match batch_nll(model, cache, batch) {
            Ok((nll, n)) => Ok(nll / n.max(1) as f64),
            // A perturbation that drives the logits to NaN is a skipped step, not a failure.
            Err(Error::NonFinite { .. }) => Ok(f64::NAN),
            Err(e) => Err(e),
        }
    };
    let loss_plus = loss(cfg.eps)?;
    let loss_minus = loss(-cfg.eps)?;
    let mut g = ((loss_plus - loss_minus) / (2.0 * f64::from(cfg.eps))) as f32;
    // A non-finite g is skipped below, never cut to the clip.
    let clipped = g.is_finite() && clip.is_some_and(|c| g.abs() > c);
    if let (true, Some(c)) = (clipped, clip) {
        g = c.copysign(g);
    }
    let mut out = StepOutcome {
        seed,
        loss_plus,
        loss_minus,
        g: None,
        clipped,
        coefficient: 0,
    };
    if g.is_finite() && g.abs() <= MAX_ABS_G {
        let q = cfg.coefficient(g, step);
        state.apply(be, cfg, &[(seed, q)])?;
        out.g = Some(g);
        out.coefficient = q;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ZoConfig {
        ZoConfig {
            session_key: 7,
            kind: ZKind::Binomial,
            mode: SeedMode::KSeed { k: 4096 },
            eps: 1e-3,
            lr: 1e-4,
            delta_exp: 20,
            decay_steps: 0,
        }
    }

    #[test]
    fn coefficient_is_exact_rounding_half_even() {
        let mut c = cfg();
        c.lr = 1.0;
        c.delta_exp = 8;
        // -g * 256: 0.5 / 256 rounds to 0 (even), 1.5 / 256 to -2.
        assert_eq!(c.coefficient(0.5 / 256.0, 0), 0);
        assert_eq!(c.coefficient(1.5 / 256.0, 0), -2);
        assert_eq!(c.coefficient(-2.5 / 256.0, 0), 2);
        assert_eq!(c.coefficient(1e30, 0), -MAX_COEFFICIENT);
        // Linear decay: half the rate half way, nothing from the last step on.
        c.decay_steps = 100;
        assert_eq!(c.coefficient(-4.0 / 256.0, 50), 2);
        assert_eq!(c.coefficient(-4.0 / 256.0, 100), 0);
        assert_eq!(c.coefficient(-4.0 / 256.0, 1000), 0);
    }

    /// On f(w) = sum a_i (w_i - c_i)^2 / 2, the mean of g * z over seeds approaches the
    /// gradient a_i (w_i - c_i): the estimator the step relies on, with this generator.
    #[test]
    fn mean_of_g_times_z_converges_to_the_gradient_of_a_quadratic() {
        let n = 8;
        let a: Vec<f64> = (0..n).map(|i| 1.0 + i as f64 / 4.0).collect();
        let c: Vec<f64> = (0..n).map(|i| (i as f64 - 3.5) / 2.0).collect();
        let w = vec![0.25f64; n];
        let f = |v: &[f64]| -> f64 { (0..n).map(|i| a[i] * (v[i] - c[i]).powi(2) / 2.0).sum() };
        let eps = 1e-3;
        let seeds = 40_000u32;
        let mut mean = vec![0.0f64; n];
        for seed in 0..seeds {
            let addr = rng::ZAddr {
                session_key: 11,
                seed,
                tensor: 0,
                purpose: rng::PURPOSE_PERTURB,
            };
            let z: Vec<f64> = (0..n)
                .map(|e| f64::from(addr.z(e as u64, ZKind::Binomial)))
                .collect();
            let plus: Vec<f64> = (0..n).map(|i| w[i] + eps * z[i]).collect();
            let minus: Vec<f64> = (0..n).map(|i| w[i] - eps * z[i]).collect();
            let g = (f(&plus) - f(&minus)) / (2.0 * eps);
            for i in 0..n {
                mean[i] += g * z[i] / f64::from(seeds);
            }
        }
        for i in 0..n {
            let truth = a[i] * (w[i] - c[i]);
            // The estimator's standard error is about |grad| / sqrt(seeds) per coordinate.
            assert!(
                (mean[i] - truth).abs() < 0.06,
                "{i}: {} vs {truth}",
                mean[i]
            );
        }
    }

    #[test]
    fn kseed_draws_stay_below_k_and_cover_it() {
        let c = cfg();
        let mut seen = vec![false; 4096];
        for s in 0..100_000 {
            let j = c.seed_for_step(s, None);
            assert!(j < 4096);
            seen[j as usize] = true;
        }
        assert!(seen.iter().all(|&x| x));
    }

    #[test]
    fn seed_weights_pick_in_exact_proportion() {
        let w = SeedWeights::new(&[0, 1, 3, 0, 4]).unwrap();
        assert_eq!(w.weights(), [0, 1, 3, 0, 4]);
        // Draws evenly spread over the 32-bit range land in exact proportion to the weights.
        let mut counts = [0u32; 5];
        for i in 0..8192u32 {
            counts[w.pick(i << 19) as usize] += 1;
        }
        assert_eq!(counts, [0, 1024, 3072, 0, 4096]);
        assert_eq!(w.pick(u32::MAX), 4);
        assert!(SeedWeights::new(&[0, 0]).is_err());
        assert!(SeedWeights::new(&[]).is_err());
        // Through the step draw: a zero weight is never drawn.
        let c = ZoConfig {
            mode: SeedMode::KSeed { k: 5 },
            ..cfg()
        };
        for s in 0..10_000 {
            let j = c.seed_for_step(s, Some(&w));
            assert!(j == 1 || j == 2 || j == 4, "{j}");
        }
    }
}
