//! Round trips of every message in every mode, the byte budgets of the federated issue,
//! and one rejection per kind of bad message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use edgetune_proto::{
    Encoding, ProtoError, Round, Scalars, SeedMode, Session, Upload, VERSION, crc32,
};

fn session(seed_mode: SeedMode, encoding: Encoding) -> Session {
    Session {
        model_sha256: [7; 32],
        layout_sha256: [9; 32],
        session_key: 0x0123_4567_89AB_CDEF,
        generator: 1,
        z_kind: 0,
        seed_mode,
        encoding,
        k: 4096,
        tau: 200,
        delta_exp: 16,
        eps: 1e-2,
        lr: 5e-4,
        clip: 10.0,
    }
}

/// Deterministic scalars of realistic size, some negative.
fn g(i: u32) -> f32 {
    (i.wrapping_mul(2_654_435_761) % 2001) as f32 / 100.0 - 10.0
}

fn kseed_upload(s: &Session) -> Upload {
    Upload {
        session_tag: s.tag(),
        round: 3,
        client_id: 1234,
        samples: 40,
        loss_sum: 512.25,
        steps: s.tau,
        scalars: Scalars::Pairs(
            (0..s.tau)
                .map(|i| (i.wrapping_mul(2_654_435_761) % s.k, g(i)))
                .collect(),
        ),
    }
}

fn round(s: &Session, changed: u32, weights: bool) -> Round {
    Round {
        session_tag: s.tag(),
        round: 3,
        updates: (0..changed)
            .map(|i| (i * 2, (i as i32 % 700) - 350))
            .collect(),
        weights: weights.then(|| (0..s.k).map(|i| (i % 16) as u8 + 1).collect()),
        digest: [0xAB; 32],
    }
}

#[test]
fn crc32_matches_the_standard_check_value() {
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
}

#[test]
fn every_message_round_trips() {
    for (mode, enc) in [
        (SeedMode::KSeed, Encoding::F32),
        (SeedMode::KSeed, Encoding::F16),
        (SeedMode::Shared, Encoding::F32),
        (SeedMode::Shared, Encoding::F16),
        (SeedMode::Shared, Encoding::Sign),
    ] {
        let s = session(mode, enc);
        assert_eq!(Session::decode(&s.encode()).unwrap(), s);
        for r in [round(&s, 0, false), round(&s, 2000, true)] {
            assert_eq!(Round::decode(&r.encode(), &s).unwrap(), r);
        }
        let scalars = match (mode, enc) {
            (SeedMode::KSeed, _) => kseed_upload(&s).scalars,
            (_, Encoding::Sign) => Scalars::Signs {
                skipped: vec![0, 17, 199],
                positive: (0..197).map(|i| g(i) > 0.0).collect(),
            },
            _ => Scalars::Values {
                skipped: vec![5],
                values: (0..199).map(g).collect(),
            },
        };
        let mut up = kseed_upload(&s);
        up.scalars = scalars;
        let back = Upload::decode(&up.encode(&s), &s).unwrap();
        if enc == Encoding::F16 {
            // f16 rounds each scalar once; everything else is exact.
            let round16 = |x: f32| half::f16::from_f32(x).to_f32();
            let want = match &up.scalars {
                Scalars::Pairs(p) => {
                    Scalars::Pairs(p.iter().map(|&(s, g)| (s, round16(g))).collect())
                }
                Scalars::Values { skipped, values } => Scalars::Values {
                    skipped: skipped.clone(),
                    values: values.iter().map(|&g| round16(g)).collect(),
                },
                other => other.clone(),
            };
            assert_eq!(back.scalars, want);
        } else {
            assert_eq!(back, up);
        }
    }
}

/// The federated issue's budgets at tau = 200, K = 4096, 10 clients a round (so at most
/// 2,000 seeds change per round), counted in message bytes.
#[test]
fn messages_fit_the_byte_budgets() {
    let s = session(SeedMode::KSeed, Encoding::F32);
    let up = kseed_upload(&s).encode(&s).len();
    let down = round(&s, 2000, true).encode().len();
    assert!(up <= 9 * 1024, "FedKSeed upload {up} B");
    assert!(down <= 9 * 1024, "FedKSeed round with Pro weights {down} B");
    let shared = session(SeedMode::Shared, Encoding::F32);
    let mut v = kseed_upload(&shared);
    v.scalars = Scalars::Values {
        skipped: vec![],
        values: (0..200).map(g).collect(),
    };
    let n = v.encode(&shared).len();
    assert!(n <= 1024, "shared-seed upload {n} B");
    let signs = session(SeedMode::Shared, Encoding::Sign);
    v.scalars = Scalars::Signs {
        skipped: vec![],
        positive: (0..200).map(|i| g(i) > 0.0).collect(),
    };
    let n = v.encode(&signs).len();
    assert!(n <= 64, "sign-only upload {n} B");
}

fn expect(bytes: &[u8], s: &Session, want: fn(&ProtoError) -> bool) {
    match Upload::decode(bytes, s) {
        Err(e) if want(&e) => {}
        other => panic!("unexpected {other:?}"),
    }
}

/// Rewrites the CRC after an edit, so the decoder reaches the field under test.
fn resealed(mut b: Vec<u8>) -> Vec<u8> {
    let n = b.len() - 4;
    let crc = crc32(&b[..n]);
    b[n..].copy_from_slice(&crc.to_le_bytes());
    b
}

#[test]
fn bad_messages_are_refused_by_name() {
    let s = session(SeedMode::KSeed, Encoding::F32);
    let good = kseed_upload(&s).encode(&s);
    // Corruption anywhere: checksum.
    let mut b = good.clone();
    b[20] ^= 0x40;
    expect(&b, &s, |e| *e == ProtoError::Checksum);
    // Unknown version, wrong kind, not ours.
    let mut b = good.clone();
    b[4] = VERSION + 1;
    expect(&resealed(b), &s, |e| matches!(e, ProtoError::Version(_)));
    let r = round(&s, 3, false).encode();
    expect(&r, &s, |e| matches!(e, ProtoError::Kind { .. }));
    let mut b = good.clone();
    b[0] = b'X';
    expect(&b, &s, |e| *e == ProtoError::BadMagic);
    // Another session (here: other K, so another tag).
    let other = Session { k: 1024, ..s };
    expect(&good, &other, |e| matches!(e, ProtoError::Session { .. }));
    // Truncated and trailing bytes.
    expect(&good[..good.len() / 2], &s, |e| *e == ProtoError::Checksum);
    let mut b = good[..good.len() - 4].to_vec();
    b.push(0);
    b.extend([0; 4]);
    expect(&resealed(b), &s, |e| {
        matches!(e, ProtoError::Trailing { .. })
    });
    // A seed index not below K; NaN, infinity and 1e30 scalars; a duplicate field layout
    // is not possible, but a pair count above tau is.
    let mut up = kseed_upload(&s);
    up.scalars = Scalars::Pairs(vec![(4096, 1.0)]);
    expect(&up.encode(&s), &s, |e| {
        *e == ProtoError::Seed {
            index: 4096,
            k: 4096,
        }
    });
    for bad in [f32::NAN, f32::INFINITY, 1e30] {
        up.scalars = Scalars::Pairs(vec![(3, 1.0), (5, bad)]);
        expect(&up.encode(&s), &s, |e| {
            *e == ProtoError::Scalar { position: 1 }
        });
    }
    up.scalars = Scalars::Pairs((0..201).map(|i| (i, 1.0)).collect());
    expect(&up.encode(&s), &s, |e| {
        matches!(e, ProtoError::Range { .. })
    });
    // A hostile count with no bytes behind it: refused, nothing allocated for it.
    let mut b = good[..6 + 4].to_vec(); // frame head and session tag
    b.extend([3, 1, 40]); // round, client, samples
    b.extend(1.0f32.to_le_bytes());
    b.extend([0xC8, 0x01]); // 200 steps
    b.extend([0xC8, 0x01]); // 200 pairs, then nothing
    b.extend([0; 4]);
    expect(&resealed(b), &s, |e| {
        matches!(e, ProtoError::Truncated { .. })
    });
    // A varint padded with a zero group is not canonical.
    let mut b = good[..6 + 4].to_vec();
    b.extend([0x83, 0x00]);
    b.extend([0; 4]);
    expect(&resealed(b), &s, |e| matches!(e, ProtoError::Varint { .. }));
    // Sessions: a zero K, an unknown generator.
    let mut b = Session { k: 1, ..s }.encode();
    let k_at = 4 + 2 + 32 + 32 + 8 + 4;
    b[k_at] = 0;
    assert!(matches!(
        Session::decode(&resealed(b)),
        Err(ProtoError::Range { what: "K", .. })
    ));
    let bad_gen = Session { generator: 2, ..s }.encode();
    assert!(matches!(
        Session::decode(&bad_gen),
        Err(ProtoError::Range { .. })
    ));
    // Rounds: a seed index not below K.
    let mut r = round(&s, 1, false);
    r.updates = vec![(4095, 1), (4096, 1)];
    assert!(matches!(
        Round::decode(&r.encode(), &s),
        Err(ProtoError::Seed { index: 4096, .. })
    ));
}
