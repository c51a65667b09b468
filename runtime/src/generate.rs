//! Sampling and the generation loop: batched prefill, then one KV-cached token at a time.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::{KvCache, Model};
use crate::rng::philox4x32_10;
use std::prelude::v1::*;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 picks the most likely token (greedy); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1: all).
    pub top_p: f32,
    /// Divide positive logits of tokens already seen by this, multiply negative ones
    /// (1: off), as Hugging Face's RepetitionPenaltyLogitsProcessor does.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl Sampling {
    /// Checks every parameter's range; an error names the field
    /// ([`Error::InvalidArgument`]).
    pub fn validate(&self) -> Result<()> {
        let bad = |name, reason: String| Err(Error::InvalidArgument { name, reason });
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(
                "temperature",
                format!("{} must be finite and >= 0", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("{} must be in (0, 1]", self.top_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(
                "repetition_penalty",
                format!("{} must be finite and > 0", self.repetition_penalty),
            );
        }
        Ok(())
    }
}

/// A seeded sampler: the same seed, logits and history give the same tokens everywhere.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: Sampling,
    draws: u32,
}

impl Sampler {
    pub fn new(params: Sampling) -> Result<Sampler> {
        params.validate()?;
        Ok(Sampler { params, draws: 0 })
    }

    /// A uniform number in [0, 1) from Philox (key = seed, counter = draw index).
    fn uniform(&mut self) -> f64 {
        let s = self.params.seed;
        let w = philox4x32_10([self.draws, 0x5A4D, 0, 0], [s as u32, (s >> 32) as u32]);
        self.draws = self.draws.wrapping_add(1);
        ((u64::from(w[0]) << 21) ^ u64::from(w[1] >> 11)) as f64 / (1u64 << 53) as f64
    }

    /// The next token from `logits` (one row of the vocabulary), given the tokens so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Result<u32> {
        if let Some(i) = logits.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                what: "logits",
                at: format!("vocabulary id {i}"),
            });
        }
        if logits.is_empty() {
            return Err(Error::InvalidArgument {
                name: "logits",
                reason: "no logits to sample from".into(),
            });
        }
        let mut l = logits.to_vec();
        let p = self.params;
        if p.repetition_penalty != 1.0 {
            for &t in history {
                if let Some(v) = l.get_mut(t as usize) {
                    *v = if *v > 0.0 {
                        *v / p.repetition_penalty
                    } else {
                        *v * p.repetition_penalty
                    };
                }
            }
        }
        if p.temperature == 0.0 {
            // The first maximum, as torch.argmax picks.
            let mut best = 0;
            for (i, &v) in l.iter().enumerate() {
                if v > l[best] {
                    best = i;
                }
            }
            return Ok(best as u32);
        }
        let mut order: Vec<usize> = (0..l.len()).collect();
        order.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
        if p.top_k > 0 {
            order.truncate(p.top_k);
        }
        let max = f64::from(l[order[0]]);
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| libm::exp((f64::from(l[i]) - max) / f64::from(p.temperature)))
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|v| *v /= total);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|v| {
                    acc += v;
                    acc >= f64::from(p.top_p)
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|v| *v /= total);
        }
        let mut u = self.uniform();
        for (k, pr) in probs.iter().enumerate() {
            if u < *pr {
                return Ok(order[k] as u32);
            }
            u -= pr;
        }
        Ok(order[probs.len() - 1] as u32)
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// An end-of-sequence token was produced (it is not included in the output).
    Eos,
    MaxTokens,
    /// The KV cache (context) is full.
    Context,
}

/// Generates up to `max_tokens` after `prompt`, calling `on_token` with each new token.
/// The cache must be empty or hold exactly the tokens before `prompt`.
pub fn generate<B: Backend>(
    model: &Model<'_, B>,
    cache: &mut KvCache<B>,
    prompt: &[u32],
    max_tokens: usize,
    eos: &[u32],
    sampler: &mut Sampler,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<(Vec<u32>, Stop)> {
    if prompt.is_empty() {
        return Err(Error::InvalidArgument {
            name: "prompt",
            reason: "is empty".into(),
        });
    }
    if cache.len() as usize + prompt.len() > cache.capacity() as usize {
        return Err(Error::InvalidArgument {
            name: "prompt",
            reason: format!(
                "the prompt of {} tokens does not fit the context of {}",
                prompt.len(),
                cache.capacity()
            ),
        });
    }
    let mut history = prompt.to_vec();
    let mut out = Vec::new();
    let mut logits = model.forward(cache, prompt, false)?;
    loop {
        if out.len() >= max_tokens {
            return Ok((out, Stop::MaxTokens));
        }
        let next = sampler.sample(&logits, &history)?;
        if eos.contains(&next) {
            return Ok((out, Stop::Eos));
        }
        out.push(next);
        history.push(next);
        on_token(next)?;
        if cache.len() >= cache.capacity() {
            return Ok((out, Stop::Context));
        }
        if out.len() < max_tokens {
            logits = model.forward(cache, &[next], false)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_first_maximum() {
        let mut s = Sampler::new(Sampling::default()).unwrap();
        assert_eq!(s.sample(&[0.0, 2.0, 2.0, -1.0], &[]).unwrap(), 1);
    }

    #[test]
    fn repetition_penalty_follows_hugging_face() {
        let mut s = Sampler::new(Sampling {
            repetition_penalty: 2.0,
            ..Sampling::default()
        })
        .unwrap();
        // Token 0 (logit 3) seen: 3 / 2 = 1.5 < 2.
        assert_eq!(s.sample(&[3.0, 2.0], &[0]).unwrap(), 1);
        // Negative logits seen are multiplied: -1 * 2 = -2 < -1.5.
        assert_eq!(s.sample(&[-1.0, -1.5], &[0]).unwrap(), 1);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let logits = [0.1, 0.5, 0.3, 0.2];
        for params in [
            Sampling {
                temperature: 1.0,
                top_k: 1,
                ..Sampling::default()
            },
            Sampling {
                temperature: 1.0,
                top_p: 1e-6,
                ..Sampling::default()
            },
        ] {
            let mut s = Sampler::new(params).unwrap();
            for _ in 0..20 {
                assert_eq!(s.sample(&logits, &[]).unwrap(), 1);
            }
        }
    }

    #[test]
    fn sampling_follows_the_softmax_and_the_seed() {
        let logits = [0.0f32, 1.0, 2.0];
        let mut s = Sampler::new(Sampling {
            temperature: 1.0,
            seed: 7,
            ..Sampling::default()
        })
        .unwrap();
        let mut counts = [0u32; 3];
        let n = 30_000;
        for _ in 0..n {
            counts[s.sample(&logits, &[]).unwrap() as usize] += 1;
        }
        let z: f64 = [0.0f64, 1.0, 2.0].iter().map(|v| v.exp()).sum();
        for (i, c) in counts.iter().enumerate() {
            let want = (i as f64).exp() / z;
            let got = f64::from(*c) / f64::from(n);
            // Binomial standard error is below 0.003 here.
            assert!((got - want).abs() < 0.015, "token {i}: {got} vs {want}");
        }
        let draw = |seed| {
            let mut s = Sampler::new(Sampling {
                temperature: 1.0,
                seed,
                ..Sampling::default()
            })
            .unwrap();
            (0..50)
                .map(|_| s.sample(&logits, &[]).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
    }

    #[test]
    fn bad_parameters_and_logits_are_errors() {
        assert!(
            Sampler::new(Sampling {
                temperature: -1.0,
                ..Sampling::default()
            })
            .is_err()
        );
        assert!(
            Sampler::new(Sampling {
                top_p: 0.0,
                ..Sampling::default()
            })
            .is_err()
        );
        assert!(
            Sampler::new(Sampling {
                repetition_penalty: f32::NAN,
                ..Sampling::default()
            })
            .is_err()
        );
        let mut s = Sampler::new(Sampling::default()).unwrap();
        assert!(s.sample(&[1.0, f32::NAN], &[]).is_err());
        assert!(s.sample(&[], &[]).is_err());
    }
}
