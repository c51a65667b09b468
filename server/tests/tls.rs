//! HTTPS through rustls: a server given a certificate serves the session to a client that
//! trusts it, refuses plain HTTP on that port, and refuses to start on a missing key.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use edgetune::adapter::{AdapterConfig, Target};
use edgetune::fed::aggregate::Policy;
use edgetune_proto::{Encoding, SeedMode};
use edgetune_server::store::Sqlite;
use edgetune_server::tls::TlsFiles;
use edgetune_server::{Config, SessionParams, start};
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::rustls;

fn config(tls: Option<TlsFiles>) -> Config {
    Config {
        model: Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/golden/tiny/llama_gqa_tied/q4_0.gguf"),
        params: SessionParams {
            adapter: AdapterConfig::lora(2, 4.0, &[Target::Q, Target::V]),
            session_key: 8,
            seed_mode: SeedMode::KSeed,
            encoding: Encoding::F32,
            k: 64,
            tau: 4,
            delta_exp: 16,
            eps: 1e-2,
            lr: 1e-2,
            clip: 10.0,
        },
        policy: Policy::default(),
        quorum: 1,
        deadline: Duration::from_secs(3600),
        max_body: 1 << 16,
        eval: Vec::new(),
        threads: 1,
        tls,
    }
}

#[test]
fn https_serves_clients_that_trust_the_certificate() {
    let dir = std::env::temp_dir().join(format!("edgetune-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let rcgen::CertifiedKey { cert, key_pair } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let files = TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key_pair.serialize_pem()).unwrap();
    let store = Arc::new(Sqlite::open(&dir.join("server.db")).unwrap());
    let server = start(
        &config(Some(files.clone())),
        store,
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let port = server.addr.port();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let agent = ureq::AgentBuilder::new()
        .tls_config(Arc::new(client))
        .build();
    let resp = agent
        .get(&format!("https://localhost:{port}/v1/session"))
        .call()
        .unwrap();
    let mut body = Vec::new();
    resp.into_reader().read_to_end(&mut body).unwrap();
    assert_eq!(body, server.session);
    // Plain HTTP on the TLS port gets no answer.
    assert!(
        ureq::get(&format!("http://127.0.0.1:{port}/v1/session"))
            .call()
            .is_err()
    );
    server.stop();

    // A key that is not there: no server.
    let missing = TlsFiles {
        cert: files.cert.clone(),
        key: dir.join("absent.pem"),
    };
    let store = Arc::new(Sqlite::open(&dir.join("other.db")).unwrap());
    let err = start(
        &config(Some(missing)),
        store,
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("absent.pem"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
