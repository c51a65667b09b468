//! Request signatures: a client signs each upload with its own key, HMAC-SHA256 over the
//! nonce (8 bytes, little-endian) and the whole body. The server keeps the last nonce per
//! client, so a captured request cannot be replayed, and a bare token is never sent. Here,
//! beside the messages, so the server, the runtime's clients and the C API sign alike.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Header naming the client.
pub const CLIENT: &str = "x-edgetune-client";
/// Header holding the nonce, a decimal u64 above the client's previous one.
pub const NONCE: &str = "x-edgetune-nonce";
/// Header holding the hex HMAC-SHA256.
pub const SIGNATURE: &str = "x-edgetune-signature";

/// The MAC of nonce and body (HMAC accepts keys of any length, so `None` never happens in
/// practice; it is not unwrapped all the same).
fn mac(key: &[u8], nonce: u64, body: &[u8]) -> Option<Hmac<Sha256>> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).ok()?;
    m.update(&nonce.to_le_bytes());
    m.update(body);
    Some(m)
}

/// The signature of `body` with `nonce` under `key`, as hex (empty if `key` cannot key a
/// MAC, which no server accepts).
pub fn sign(key: &[u8], nonce: u64, body: &[u8]) -> String {
    mac(key, nonce, body).map_or_else(String::new, |m| hex(&m.finalize().into_bytes()))
}

/// Whether `signature` (hex) is `key`'s signature of `body` with `nonce`, compared in
/// constant time.
pub fn verify(key: &[u8], nonce: u64, body: &[u8], signature: &str) -> bool {
    match (unhex(signature), mac(key, nonce, body)) {
        (Some(sig), Some(m)) => m.verify_slice(&sig).is_ok(),
        _ => false,
    }
}

pub fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        // Writing to a String cannot fail.
        let _ = write!(s, "{x:02x}");
    }
    s
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4231 test case 2 (key "Jefe"), through the same MAC with the nonce prefix
    /// folded into the message.
    #[test]
    fn hmac_matches_rfc_4231() {
        let msg = b"what do ya want for nothing?";
        let (nonce, body) = msg.split_at(8);
        let nonce = u64::from_le_bytes(nonce.try_into().unwrap_or_default());
        assert_eq!(
            sign(b"Jefe", nonce, body),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert!(verify(b"Jefe", nonce, body, &sign(b"Jefe", nonce, body)));
        assert!(!verify(
            b"Jefe",
            nonce + 1,
            body,
            &sign(b"Jefe", nonce, body)
        ));
        assert!(!verify(b"Jefe", nonce, body, "zz"));
    }
}
