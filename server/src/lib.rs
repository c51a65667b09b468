//! edgetune's federated aggregation server: the runtime's [`Coordinator`] behind HTTP, with
//! protocol messages as bodies (docs/protocol.md), signed uploads, and durable state in a
//! [`store::Store`]. An upload is acknowledged only after it is committed; a round closes
//! once, when a quorum of uploads is in or its deadline passes, and is a deterministic
//! function of its committed uploads, so a restarted server (or another replica on the
//! same store) recomputes every round and checks it against the stored one.
//!
//! Endpoints: `GET /v1/session`, `POST /v1/upload` (signed, see [`auth`]),
//! `GET /v1/rounds/{r}`, `GET /v1/checkpoint`, `GET /v1/status` (JSON), `GET /metrics`
//! (Prometheus text), `GET /` (status page).

pub mod args;
pub use edgetune_proto::auth;
pub mod postgres;
pub mod store;
pub mod tls;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use edgetune::adapter::AdapterConfig;
use edgetune::backend::host::Host;
use edgetune::fed::aggregate::Policy;
use edgetune::fed::coordinator::Coordinator;
use edgetune::fed::{Session, Upload};
use edgetune::model::files::ModelFiles;
use edgetune::train::Example;
use edgetune_proto::{Encoding, SeedMode};
use serde_json::json;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use store::{Put, Store};
use tokio::sync::{mpsc, oneshot};

/// A server failure at startup or in the coordinator.
#[derive(Debug)]
pub enum ServerError {
    Store(store::StoreError),
    Runtime(edgetune::Error),
    /// The store holds a round that recomputing its uploads does not reproduce, or a
    /// session other than the configured one.
    Inconsistent(String),
    Io(std::io::Error),
    /// The coordinator thread is gone.
    Stopped,
    /// The certificate or key cannot be used.
    Tls(String),
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerError::Store(e) => write!(f, "{e}"),
            ServerError::Runtime(e) => write!(f, "{e}"),
            ServerError::Inconsistent(s) => write!(f, "inconsistent store: {s}"),
            ServerError::Io(e) => write!(f, "{e}"),
            ServerError::Stopped => write!(f, "the coordinator stopped"),
            ServerError::Tls(e) => write!(f, "TLS: {e}"),
        }
    }
}

impl From<store::StoreError> for ServerError {
    fn from(e: store::StoreError) -> Self {
        ServerError::Store(e)
    }
}

impl From<edgetune::Error> for ServerError {
    fn from(e: edgetune::Error) -> Self {
        ServerError::Runtime(e)
    }
}

pub type Result<T> = std::result::Result<T, ServerError>;

/// What a session trains and with which constants (the session message is built from
/// these and the model).
#[derive(Debug, Clone)]
pub struct SessionParams {
    pub adapter: AdapterConfig,
    pub session_key: u64,
    pub seed_mode: SeedMode,
    pub encoding: Encoding,
    pub k: u32,
    pub tau: u32,
    pub delta_exp: u8,
    pub eps: f32,
    pub lr: f32,
    pub clip: f32,
}

/// How the server runs.
#[derive(Debug, Clone)]
pub struct Config {
    pub model: PathBuf,
    pub params: SessionParams,
    pub policy: Policy,
    /// Uploads that close a round.
    pub quorum: u32,
    /// A round with at least one upload closes this long after it opened.
    pub deadline: Duration,
    /// Largest request body accepted.
    pub max_body: usize,
    /// A held-out set scored after every round (the status page's plot).
    pub eval: Vec<Example>,
    /// Threads of the coordinator's CPU backend.
    pub threads: usize,
    /// Serve HTTPS with this certificate and key (plain HTTP without).
    pub tls: Option<tls::TlsFiles>,
}

enum Cmd {
    Check(Vec<u8>, oneshot::Sender<edgetune::Result<Upload>>),
    /// Computes a round (nothing changes until `Commit`).
    Close(u32, Vec<Vec<u8>>, oneshot::Sender<edgetune::Result<Closed>>),
    /// Makes the computed round the coordinator's state once it is stored; replies with
    /// the held-out loss after it.
    Commit(u32, oneshot::Sender<edgetune::Result<Option<f64>>>),
    Checkpoint(oneshot::Sender<edgetune::Result<(u32, Vec<u8>)>>),
}

struct Closed {
    bytes: Vec<u8>,
    train_loss: Option<f64>,
}

/// Starts the coordinator thread (it owns the model and backend); returns its session
/// message and command channel.
fn spawn_coordinator(cfg: &Config) -> Result<(Vec<u8>, mpsc::Sender<Cmd>)> {
    let (tx, mut rx) = mpsc::channel::<Cmd>(64);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<edgetune::Result<Vec<u8>>>();
    let cfg = cfg.clone();
    std::thread::Builder::new()
        .name("coordinator".into())
        .spawn(move || {
            let be = Host::new(cfg.threads);
            let start = || -> edgetune::Result<_> {
                let files = ModelFiles::open(&cfg.model, None)?;
                let sha = files.sha256();
                let mut model = files.load(&be)?;
                let p = &cfg.params;
                model.attach(p.adapter.clone(), p.session_key)?;
                let session = Session {
                    model_sha256: sha,
                    layout_sha256: edgetune::adapter::layout_hash(model.layout()),
                    session_key: p.session_key,
                    generator: edgetune_proto::GENERATOR,
                    z_kind: 0,
                    seed_mode: p.seed_mode,
                    encoding: p.encoding,
                    k: p.k,
                    tau: p.tau,
                    delta_exp: p.delta_exp,
                    eps: p.eps,
                    lr: p.lr,
                    clip: p.clip,
                };
                Ok((model, session))
            };
            let (model, session) = match start() {
                Ok(x) => x,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let mut coord = match Coordinator::new(&model, session, cfg.policy) {
                Ok(c) => c,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let longest = cfg.eval.iter().map(|e| e.tokens.len()).max().unwrap_or(1);
            let mut cache = match model.new_cache(longest as u32) {
                Ok(c) => c,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(session.encode()));
            let mut pending = None;
            while let Some(cmd) = rx.blocking_recv() {
                match cmd {
                    Cmd::Check(bytes, reply) => {
                        let _ = reply.send(coord.check_upload(&bytes));
                    }
                    Cmd::Close(round, uploads, reply) => {
                        let r = (|| {
                            if round != coord.round + 1 {
                                return Err(edgetune::Error::Federation {
                                    reason: format!(
                                        "close of round {round} while round {} is open",
                                        coord.round + 1
                                    ),
                                });
                            }
                            let ups: Vec<Upload> = uploads
                                .iter()
                                .map(|b| coord.check_upload(b))
                                .collect::<edgetune::Result<_>>()?;
                            let train_loss = (!ups.is_empty()).then(|| {
                                ups.iter()
                                    .map(|u| f64::from(u.loss_sum) / f64::from(u.steps.max(1)))
                                    .sum::<f64>()
                                    / ups.len() as f64
                            });
                            let p = coord.prepare_round(&ups)?;
                            let bytes = p.bytes.clone();
                            pending = Some(p);
                            Ok(Closed { bytes, train_loss })
                        })();
                        let _ = reply.send(r);
                    }
                    Cmd::Commit(round, reply) => {
                        let r = (|| {
                            match pending.take() {
                                Some(p) if p.round == round => coord.commit(p)?,
                                _ => {
                                    return Err(edgetune::Error::Federation {
                                        reason: format!("no computed round {round} to commit"),
                                    });
                                }
                            }
                            if cfg.eval.is_empty() {
                                Ok(None)
                            } else {
                                Ok(Some(coord.eval(&mut cache, &cfg.eval)?))
                            }
                        })();
                        let _ = reply.send(r);
                    }
                    Cmd::Checkpoint(reply) => {
                        let _ = reply.send(coord.checkpoint().map(|b| (coord.round, b)));
                    }
                }
            }
        })
        .map_err(ServerError::Io)?;
    let session = ready_rx.recv().map_err(|_| ServerError::Stopped)??;
    Ok((session, tx))
}

/// Per-round figures for the status page and metrics.
#[derive(Debug, Clone, Default)]
struct RoundStat {
    uploads: u32,
    max_up: usize,
    down: usize,
    train_loss: Option<f64>,
    eval: Option<f64>,
}

#[derive(Default)]
struct Metrics {
    committed: AtomicU64,
    duplicates: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    rejected: Mutex<BTreeMap<&'static str, u64>>,
}

struct App {
    store: Arc<dyn Store>,
    coord: mpsc::Sender<Cmd>,
    session_bytes: Vec<u8>,
    session: Session,
    quorum: u32,
    deadline: Duration,
    /// The open round (the last closed + 1).
    open: AtomicU32,
    opened_at: Mutex<Instant>,
    closing: tokio::sync::Mutex<()>,
    rounds: Mutex<BTreeMap<u32, RoundStat>>,
    metrics: Metrics,
}

/// A refusal: status, a reason counted in the metrics, and the message for the body.
struct Refusal(StatusCode, &'static str, String);

impl App {
    fn refuse(&self, r: Refusal) -> Response {
        if let Ok(mut m) = self.metrics.rejected.lock() {
            *m.entry(r.1).or_default() += 1;
        }
        (r.0, axum::Json(json!({ "error": r.2, "reason": r.1 }))).into_response()
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.coord
            .send(make(tx))
            .await
            .map_err(|_| ServerError::Stopped)?;
        rx.await.map_err(|_| ServerError::Stopped)
    }

    /// Closes round `round` from its committed uploads unless it is closed; checks a
    /// stored round against the recomputation.
    async fn close(&self, round: u32) -> Result<()> {
        let _guard = self.closing.lock().await;
        if self.open.load(Ordering::SeqCst) != round {
            return Ok(());
        }
        // Sealed first: from here on the round's uploads cannot change.
        let store = self.store.clone();
        let uploads = blocking(move || -> store::Result<Vec<Vec<u8>>> {
            store.seal(round)?;
            store.uploads(round)
        })
        .await??;
        let up_sizes: Vec<usize> = uploads.iter().map(Vec::len).collect();
        let closed = self
            .ask(|tx| Cmd::Close(round, uploads, tx))
            .await?
            .map_err(ServerError::Runtime)?;
        let store = self.store.clone();
        let bytes = closed.bytes.clone();
        let stored = blocking(move || -> store::Result<Option<Vec<u8>>> {
            store.put_round(round, &bytes)?;
            store.round(round)
        })
        .await??;
        if stored.as_deref() != Some(&closed.bytes[..]) {
            return Err(ServerError::Inconsistent(format!(
                "round {round} as stored differs from its recomputation"
            )));
        }
        let eval = self
            .ask(|tx| Cmd::Commit(round, tx))
            .await?
            .map_err(ServerError::Runtime)?;
        if let Ok(mut rs) = self.rounds.lock() {
            rs.insert(
                round,
                RoundStat {
                    uploads: up_sizes.len() as u32,
                    max_up: up_sizes.iter().copied().max().unwrap_or(0),
                    down: closed.bytes.len(),
                    train_loss: closed.train_loss,
                    eval,
                },
            );
        }
        self.open.store(round + 1, Ordering::SeqCst);
        if let Ok(mut t) = self.opened_at.lock() {
            *t = Instant::now();
        }
        Ok(())
    }

    /// Recomputes every round the store holds (a restart, or rounds another replica
    /// closed), then closes the open round if it already has its quorum.
    async fn catch_up(&self) -> Result<()> {
        let store = self.store.clone();
        let last = blocking(move || store.last_round()).await??;
        while self.open.load(Ordering::SeqCst) <= last {
            self.close(self.open.load(Ordering::SeqCst)).await?;
        }
        // A round sealed before a crash, or at quorum: close it now.
        let open = self.open.load(Ordering::SeqCst);
        let store = self.store.clone();
        let (n, sealed) = blocking(move || -> store::Result<(u32, bool)> {
            Ok((store.upload_count(open)?, store.is_sealed(open)?))
        })
        .await??;
        if sealed || n >= self.quorum {
            self.close(open).await?;
        }
        Ok(())
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| ServerError::Stopped)
}

fn internal(e: impl std::fmt::Display) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        axum::Json(json!({ "error": e.to_string(), "reason": "internal" })),
    )
        .into_response()
}

async fn get_session(State(app): State<Arc<App>>) -> Response {
    app.metrics
        .bytes_down
        .fetch_add(app.session_bytes.len() as u64, Ordering::Relaxed);
    bytes_response(app.session_bytes.clone())
}

fn bytes_response(b: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/octet-stream")], b).into_response()
}

/// The authenticated client of a request, or the refusal.
async fn authenticate(
    app: &App,
    headers: &HeaderMap,
    body: &[u8],
) -> std::result::Result<u32, Refusal> {
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let unauth = |why: &str| Refusal(StatusCode::UNAUTHORIZED, "unauthenticated", why.into());
    let client: u32 = text(auth::CLIENT)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| unauth("missing or malformed x-edgetune-client"))?;
    let nonce: u64 = text(auth::NONCE)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| unauth("missing or malformed x-edgetune-nonce"))?;
    let sig = text(auth::SIGNATURE).ok_or_else(|| unauth("missing x-edgetune-signature"))?;
    let store = app.store.clone();
    let key = blocking(move || store.client_key(client))
        .await
        .ok()
        .and_then(|r| r.ok())
        .flatten()
        .ok_or_else(|| unauth("unknown client"))?;
    if !auth::verify(&key, nonce, body, sig) {
        return Err(unauth("bad signature"));
    }
    let store = app.store.clone();
    let fresh = blocking(move || store.take_nonce(client, nonce))
        .await
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or(false);
    if !fresh {
        return Err(Refusal(
            StatusCode::UNAUTHORIZED,
            "replayed",
            "nonce is not above the client's last one (a replayed request?)".into(),
        ));
    }
    Ok(client)
}

async fn post_upload(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let client = match authenticate(&app, &headers, &body).await {
        Ok(c) => c,
        Err(r) => return app.refuse(r),
    };
    // Rounds another replica closed (or a restart left to recompute) come first.
    if let Err(e) = app.catch_up().await {
        return internal(e);
    }
    let up = match app.ask(|tx| Cmd::Check(body.to_vec(), tx)).await {
        Ok(Ok(u)) => u,
        Ok(Err(edgetune::Error::Federation { reason })) => {
            // A retry of an upload whose acknowledgement was lost, after its round closed:
            // it is in the round, and the client is told so.
            if let Some(r) = committed_round(&app, client, &body).await {
                app.metrics.duplicates.fetch_add(1, Ordering::Relaxed);
                return axum::Json(json!({ "status": "duplicate", "round": r })).into_response();
            }
            return app.refuse(Refusal(StatusCode::CONFLICT, "wrong_round", reason));
        }
        Ok(Err(e)) => {
            return app.refuse(Refusal(StatusCode::BAD_REQUEST, "malformed", e.to_string()));
        }
        Err(e) => return internal(e),
    };
    if up.client_id != u64::from(client) {
        return app.refuse(Refusal(
            StatusCode::FORBIDDEN,
            "impersonation",
            format!("client {client} sent an upload for client {}", up.client_id),
        ));
    }
    let (store, round, bytes) = (app.store.clone(), up.round, body.to_vec());
    let put = match blocking(move || store.put_upload(round, client, &bytes)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return internal(e),
        Err(e) => return internal(e),
    };
    app.metrics
        .bytes_up
        .fetch_add(body.len() as u64, Ordering::Relaxed);
    let status = match put {
        Put::Inserted => {
            app.metrics.committed.fetch_add(1, Ordering::Relaxed);
            "committed"
        }
        Put::Same => {
            app.metrics.duplicates.fetch_add(1, Ordering::Relaxed);
            "duplicate"
        }
        Put::Sealed => {
            return app.refuse(Refusal(
                StatusCode::CONFLICT,
                "wrong_round",
                format!("round {round} is closed"),
            ));
        }
        Put::Conflict => {
            return app.refuse(Refusal(
                StatusCode::CONFLICT,
                "conflict",
                format!("client {client} already committed a different upload for round {round}"),
            ));
        }
    };
    let store = app.store.clone();
    if let Ok(Ok(n)) = blocking(move || store.upload_count(round)).await
        && n >= app.quorum
        && let Err(e) = app.close(round).await
    {
        return internal(e);
    }
    axum::Json(json!({ "status": status, "round": round })).into_response()
}

/// The round of `body` if the store already holds exactly these bytes from `client` for it.
async fn committed_round(app: &App, client: u32, body: &[u8]) -> Option<u32> {
    let up = Upload::decode(body, &app.session).ok()?;
    if up.client_id != u64::from(client) {
        return None;
    }
    let (store, round) = (app.store.clone(), up.round);
    let stored = blocking(move || store.uploads(round)).await.ok()?.ok()?;
    stored.iter().any(|b| b == body).then_some(round)
}

async fn get_round(State(app): State<Arc<App>>, UrlPath(round): UrlPath<u32>) -> Response {
    let store = app.store.clone();
    match blocking(move || store.round(round)).await {
        Ok(Ok(Some(b))) => {
            app.metrics
                .bytes_down
                .fetch_add(b.len() as u64, Ordering::Relaxed);
            bytes_response(b)
        }
        Ok(Ok(None)) => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({
                "error": format!("round {round} is not closed (open: {})", app.open.load(Ordering::SeqCst)),
                "reason": "not_closed",
            })),
        )
            .into_response(),
        Ok(Err(e)) => internal(e),
        Err(e) => internal(e),
    }
}

async fn get_checkpoint(State(app): State<Arc<App>>) -> Response {
    match app.ask(Cmd::Checkpoint).await {
        Ok(Ok((round, b))) => {
            app.metrics
                .bytes_down
                .fetch_add(b.len() as u64, Ordering::Relaxed);
            (
                [
                    (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
                    (
                        header::HeaderName::from_static("x-edgetune-round"),
                        round.to_string(),
                    ),
                ],
                b,
            )
                .into_response()
        }
        Ok(Err(e)) => internal(e),
        Err(e) => internal(e),
    }
}

fn status_json(app: &App) -> serde_json::Value {
    let s = &app.session;
    let rounds: Vec<serde_json::Value> = app
        .rounds
        .lock()
        .map(|rs| {
            rs.iter()
                .map(|(r, st)| {
                    json!({
                        "round": r, "uploads": st.uploads, "max_upload_bytes": st.max_up,
                        "round_bytes": st.down, "train_loss": st.train_loss, "eval_loss": st.eval,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "session": {
            "model_sha256": auth::hex(&s.model_sha256),
            "layout_sha256": auth::hex(&s.layout_sha256),
            "mode": format!("{:?}", s.seed_mode), "encoding": format!("{:?}", s.encoding),
            "k": s.k, "tau": s.tau, "eps": s.eps, "lr": s.lr, "clip": s.clip,
        },
        "open_round": app.open.load(Ordering::SeqCst),
        "quorum": app.quorum,
        "rounds": rounds,
    })
}

async fn get_status(State(app): State<Arc<App>>) -> Response {
    axum::Json(status_json(&app)).into_response()
}

async fn get_page() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("status.html"),
    )
        .into_response()
}

async fn get_metrics(State(app): State<Arc<App>>) -> Response {
    let m = &app.metrics;
    let mut out = String::new();
    let mut put = |name: &str, help: &str, v: u64| {
        out += &format!("# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n");
    };
    put(
        "edgetune_uploads_committed_total",
        "Uploads committed.",
        m.committed.load(Ordering::Relaxed),
    );
    put(
        "edgetune_uploads_duplicate_total",
        "Repeated uploads accepted once.",
        m.duplicates.load(Ordering::Relaxed),
    );
    put(
        "edgetune_bytes_up_total",
        "Upload body bytes received.",
        m.bytes_up.load(Ordering::Relaxed),
    );
    put(
        "edgetune_bytes_down_total",
        "Session, round and checkpoint bytes sent.",
        m.bytes_down.load(Ordering::Relaxed),
    );
    let closed = app.open.load(Ordering::SeqCst).saturating_sub(1);
    out += &format!(
        "# HELP edgetune_rounds_closed Rounds closed.\n# TYPE edgetune_rounds_closed gauge\nedgetune_rounds_closed {closed}\n"
    );
    out += "# HELP edgetune_requests_rejected_total Requests refused, by reason.\n# TYPE edgetune_requests_rejected_total counter\n";
    if let Ok(r) = m.rejected.lock() {
        for (reason, n) in r.iter() {
            out += &format!("edgetune_requests_rejected_total{{reason=\"{reason}\"}} {n}\n");
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// Counts bodies the size limit refused (axum answers them before any handler runs).
async fn count_oversized(State(app): State<Arc<App>>, r: Response) -> Response {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE
        && let Ok(mut m) = app.metrics.rejected.lock()
    {
        *m.entry("oversized").or_default() += 1;
    }
    r
}

/// A running server.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    /// The session message clients join.
    pub session: Vec<u8>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    /// Stops accepting requests and waits for the server to finish.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Starts a server on `listen` (port 0 picks one) in its own thread and runtime, after
/// recomputing the rounds `store` holds; returns once it accepts requests.
pub fn start(cfg: &Config, store: Arc<dyn Store>, listen: SocketAddr) -> Result<Running> {
    let (session_bytes, coord) = spawn_coordinator(cfg)?;
    let stored = store.init_session(&session_bytes)?;
    if stored != session_bytes {
        return Err(ServerError::Inconsistent(
            "the store belongs to another session (model, adapter or settings differ)".into(),
        ));
    }
    let session = Session::decode(&session_bytes).map_err(|e| {
        ServerError::Runtime(edgetune::Error::Protocol {
            what: "session".into(),
            error: e,
        })
    })?;
    let app = Arc::new(App {
        store,
        coord,
        session_bytes: session_bytes.clone(),
        session,
        quorum: cfg.quorum.max(1),
        deadline: cfg.deadline,
        open: AtomicU32::new(1),
        opened_at: Mutex::new(Instant::now()),
        closing: tokio::sync::Mutex::new(()),
        rounds: Mutex::new(BTreeMap::new()),
        metrics: Metrics::default(),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(ServerError::Io)?;
    // A deep accept queue: a thousand clients connecting at once would otherwise overflow
    // the default and wait out SYN retransmissions (a second each).
    let listener = {
        let _guard = rt.enter();
        let socket = if listen.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .map_err(ServerError::Io)?;
        socket.set_reuseaddr(true).map_err(ServerError::Io)?;
        socket.bind(listen).map_err(ServerError::Io)?;
        socket.listen(4096).map_err(ServerError::Io)?
    };
    let addr = listener.local_addr().map_err(ServerError::Io)?;
    rt.block_on(app.catch_up())?;
    let router = Router::new()
        .route("/", get(get_page))
        .route("/v1/session", get(get_session))
        .route("/v1/upload", post(post_upload))
        .route("/v1/rounds/{round}", get(get_round))
        .route("/v1/checkpoint", get(get_checkpoint))
        .route("/v1/status", get(get_status))
        .route("/metrics", get(get_metrics))
        .layer(DefaultBodyLimit::max(cfg.max_body))
        .layer(axum::middleware::map_response_with_state(
            app.clone(),
            count_oversized,
        ))
        .with_state(app.clone());
    let acceptor = cfg
        .tls
        .as_ref()
        .map(tls::acceptor)
        .transpose()
        .map_err(ServerError::Tls)?;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("server".into())
        .spawn(move || {
            rt.block_on(async move {
                let deadline_app = app.clone();
                let ticker = tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        let a = &deadline_app;
                        let open = a.open.load(Ordering::SeqCst);
                        let due = a
                            .opened_at
                            .lock()
                            .map(|t| t.elapsed() >= a.deadline)
                            .unwrap_or(false);
                        let store = a.store.clone();
                        let n = blocking(move || store.upload_count(open)).await;
                        if due && matches!(n, Ok(Ok(n)) if n > 0) {
                            let _ = a.close(open).await;
                        }
                    }
                });
                let stop = async {
                    let _ = stop_rx.await;
                };
                match acceptor {
                    Some(acceptor) => match tls::TlsListener::new(listener, acceptor) {
                        Ok(l) => {
                            let _ = axum::serve(l, router).with_graceful_shutdown(stop).await;
                        }
                        Err(e) => eprintln!("edgetune-server: TLS listener: {e}"),
                    },
                    None => {
                        let _ = axum::serve(listener, router)
                            .with_graceful_shutdown(stop)
                            .await;
                    }
                }
                ticker.abort();
            });
        })
        .map_err(ServerError::Io)?;
    Ok(Running {
        addr,
        session: session_bytes,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

/// Runs the server the command line describes until the process is stopped: opens (or
/// creates) the SQLite store, adds the clients file's keys, recomputes the stored rounds.
pub fn serve_forever(a: &args::ServeArgs) -> std::result::Result<(), String> {
    let cfg = a.config().map_err(|(flag, why)| format!("{flag}: {why}"))?;
    let (store, shown): (Arc<dyn Store>, String) = match &a.postgres {
        Some(url) => (
            Arc::new(
                postgres::Postgres::open(url, &a.pg_schema)
                    .map_err(|e| format!("--postgres: {e}"))?,
            ),
            format!("PostgreSQL schema {}", a.pg_schema),
        ),
        None => (
            Arc::new(store::Sqlite::open(&a.db).map_err(|e| format!("{}: {e}", a.db.display()))?),
            a.db.display().to_string(),
        ),
    };
    if let Some(path) = &a.clients {
        for (id, key) in args::read_clients(path)? {
            store.set_client(id, &key).map_err(|e| e.to_string())?;
        }
    }
    let running = start(&cfg, store, a.listen).map_err(|e| e.to_string())?;
    eprintln!(
        "edgetune-server: session {:08x} on http://{} (store {shown})",
        edgetune_proto::crc32(&running.session[..running.session.len() - 4]),
        running.addr,
    );
    loop {
        std::thread::park();
    }
}
