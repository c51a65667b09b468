//! The seeded generator: Philox4x32-10 (Random123) and the integer-only perturbation z.
//!
//! This is a specification implemented twice, here and in `shaders/philox.wgsl`; tests
//! prove the two bit-identical. Only integer operations are used, so every device computes
//! the same bits.
//!
//! Addressing of z (see ARCHITECTURE.md): key = the 64-bit session key; counter =
//! (element / 2, tensor id, seed index, purpose). Even elements use output words 0 and 1,
//! odd elements words 2 and 3. Every element's z is thus computable alone, in any order,
//! by any dispatch shape.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = u64::from(a) * u64::from(b);
    ((p >> 32) as u32, p as u32)
}

/// Philox4x32 with 10 rounds.
pub fn philox4x32_10(mut ctr: [u32; 4], mut key: [u32; 2]) -> [u32; 4] {
    for round in 0..10 {
        if round > 0 {
            key = [key[0].wrapping_add(W0), key[1].wrapping_add(W1)];
        }
        let (hi0, lo0) = mulhilo(M0, ctr[0]);
        let (hi1, lo1) = mulhilo(M1, ctr[2]);
        ctr = [hi1 ^ ctr[1] ^ key[0], lo1, hi0 ^ ctr[3] ^ key[1], lo0];
    }
    ctr
}

/// The distribution of the perturbation z.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ZKind {
    /// z = (popcount(w0) + popcount(w1) - 32) / 4: a shifted Binomial(64, 1/2) with mean 0,
    /// variance 1, |z| <= 8, every value a multiple of 1/4.
    Binomial,
    /// z = +1 or -1 from the lowest bit of w0.
    Rademacher,
}

impl ZKind {
    /// The code the WGSL kernel receives.
    pub fn shader_code(self) -> u32 {
        match self {
            ZKind::Binomial => 0,
            ZKind::Rademacher => 1,
        }
    }
}

/// Purpose tags for the counter's last word, so streams for different uses never overlap.
pub const PURPOSE_PERTURB: u32 = 0;
/// The stream of adapter start values (`adapter::init_values`).
pub const PURPOSE_INIT: u32 = 1;
/// The stream that draws FedKSeed's seed per step (`train::ZoConfig::seed_for_step`).
pub const PURPOSE_SAMPLE: u32 = 2;

/// Where one z value lives: which session, seed, tensor and element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZAddr {
    pub session_key: u64,
    pub seed: u32,
    pub tensor: u32,
    pub purpose: u32,
}

impl ZAddr {
    /// The Philox key for this address.
    pub fn key(&self) -> [u32; 2] {
        [self.session_key as u32, (self.session_key >> 32) as u32]
    }

    /// 4 * z for `element`, an integer in \[-32, 32\]. Elements up to 2^33 are addressable.
    pub fn z4(&self, element: u64, kind: ZKind) -> i32 {
        let ctr = [(element >> 1) as u32, self.tensor, self.seed, self.purpose];
        let w = philox4x32_10(ctr, self.key());
        let (a, b) = if element & 1 == 0 {
            (w[0], w[1])
        } else {
            (w[2], w[3])
        };
        match kind {
            ZKind::Binomial => (a.count_ones() + b.count_ones()) as i32 - 32,
            ZKind::Rademacher => {
                if a & 1 == 1 {
                    4
                } else {
                    -4
                }
            }
        }
    }

    /// z for `element` as f32 (exact: a multiple of 1/4 no larger than 8).
    pub fn z(&self, element: u64, kind: ZKind) -> f32 {
        self.z4(element, kind) as f32 * 0.25
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Known-answer vectors from Random123's kat_vectors (philox4x32 10 rounds).
    #[test]
    fn philox_known_answers() {
        assert_eq!(
            philox4x32_10([0; 4], [0; 2]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    // 4z known answers, produced by the independent numpy implementation
    // (tools/reference/zo_replay.py) and listed in docs/zeroth-order.md.
    #[test]
    fn z_known_answers() {
        let cases: [(u64, u32, u32, ZKind, [i32; 8]); 3] = [
            (0, 0, 0, ZKind::Binomial, [1, 0, -2, 7, -3, -5, -2, -3]),
            (
                0x0123_4567_89ab_cdef,
                17,
                3,
                ZKind::Binomial,
                [2, 3, 4, -6, 3, 0, 4, -3],
            ),
            (
                u64::MAX,
                4095,
                250,
                ZKind::Rademacher,
                [4, 4, -4, 4, -4, -4, -4, 4],
            ),
        ];
        for (session_key, seed, tensor, kind, want) in cases {
            let addr = ZAddr {
                session_key,
                seed,
                tensor,
                purpose: PURPOSE_PERTURB,
            };
            let got: [i32; 8] = core::array::from_fn(|e| addr.z4(e as u64, kind));
            assert_eq!(got, want, "{session_key:x} {seed} {tensor}");
        }
    }

    fn moments(addr: ZAddr, kind: ZKind, n: u64) -> (f64, f64) {
        let (mut s, mut s2) = (0.0f64, 0.0f64);
        for e in 0..n {
            let z = f64::from(addr.z(e, kind));
            s += z;
            s2 += z * z;
        }
        (s / n as f64, s2 / n as f64)
    }

    #[test]
    fn z_has_mean_zero_and_unit_variance() {
        let addr = ZAddr {
            session_key: 0x1234_5678_9abc_def0,
            seed: 7,
            tensor: 3,
            purpose: PURPOSE_PERTURB,
        };
        for kind in [ZKind::Binomial, ZKind::Rademacher] {
            let (mean, var) = moments(addr, kind, 200_000);
            // Standard error of the mean is 1/sqrt(2e5) ~ 0.0022; of the variance ~ 0.003.
            assert!(mean.abs() < 0.012, "{kind:?} mean {mean}");
            assert!((var - 1.0).abs() < 0.02, "{kind:?} variance {var}");
        }
    }

    #[test]
    fn seeds_and_tensors_get_independent_streams() {
        let base = ZAddr {
            session_key: 42,
            seed: 1,
            tensor: 0,
            purpose: PURPOSE_PERTURB,
        };
        let other_seed = ZAddr { seed: 2, ..base };
        let other_tensor = ZAddr { tensor: 1, ..base };
        let n = 100_000u64;
        for other in [other_seed, other_tensor] {
            let mut dot = 0.0f64;
            for e in 0..n {
                dot +=
                    f64::from(base.z(e, ZKind::Binomial)) * f64::from(other.z(e, ZKind::Binomial));
            }
            // Correlation of independent streams: |r| well under 4 standard errors.
            let r = dot / n as f64;
            assert!(r.abs() < 4.0 / (n as f64).sqrt(), "correlation {r}");
        }
    }
}
