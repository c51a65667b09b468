//! The federated protocol's readers from arbitrary bytes: the first byte picks the
//! session's seed mode and encoding, the rest is read as a session, a round and an upload.
//! Each must return Ok or a typed error without panicking or allocating by a count it
//! read, and whatever it accepts must encode back to exactly the bytes it read (the format
//! is canonical). Each input is tried as given and with its checksum made right.
#![no_main]

use edgetune_proto::{Encoding, Round, SeedMode, Session, Upload};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, bytes)) = data.split_first() else {
        return;
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
    // As given (the checksum gate), then with the checksum made right, so the fuzzer
    // reaches the body readers.
    for bytes in [bytes.to_vec(), resealed(bytes)] {
        if let Ok(s) = Session::decode(&bytes) {
            assert_eq!(s.encode(), bytes);
        }
        if let Ok(r) = Round::decode(&bytes, &session) {
            assert_eq!(r.encode(), bytes);
        }
        if let Ok(u) = Upload::decode(&bytes, &session) {
            assert_eq!(u.encode(&session), bytes);
        }
    }
});

fn resealed(bytes: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    if b.len() >= 4 {
        let n = b.len() - 4;
        let crc = edgetune_proto::crc32(&b[..n]);
        b[n..].copy_from_slice(&crc.to_le_bytes());
    }
    b
}
