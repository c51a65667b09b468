//! Durable server state behind one trait: the session, client keys and nonces, committed
//! uploads, closed rounds. A call returns only after its write is committed, so an upload
//! acknowledged to a client survives a crash of the process or machine.

use rusqlite::{Connection, OptionalExtension, params};
use std::path::Path;
use std::sync::Mutex;

/// A store failure (the database's message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError(pub String);

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "store: {}", self.0)
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// What storing an upload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// Newly committed.
    Inserted,
    /// The same bytes were committed before (a retry): nothing changed.
    Same,
    /// The client already committed different bytes for this round: refused.
    Conflict,
    /// The round is being closed (sealed): no upload joins it any more.
    Sealed,
}

/// The server's durable state.
pub trait Store: Send + Sync {
    /// The session message, if one was stored.
    fn session(&self) -> Result<Option<Vec<u8>>>;
    /// Stores the session message unless one is stored; returns the stored one.
    fn init_session(&self, bytes: &[u8]) -> Result<Vec<u8>>;
    /// Adds or replaces a client's key.
    fn set_client(&self, id: u32, key: &[u8]) -> Result<()>;
    fn client_key(&self, id: u32) -> Result<Option<Vec<u8>>>;
    /// Accepts `nonce` if it is above the client's last accepted one (and records it).
    fn take_nonce(&self, id: u32, nonce: u64) -> Result<bool>;
    /// Commits an upload unless the round is sealed or the client has one there.
    fn put_upload(&self, round: u32, client: u32, bytes: &[u8]) -> Result<Put>;
    /// Seals a round before it is closed: every upload committed before this returns is
    /// in the round, every later one is refused, so the round's uploads never change.
    fn seal(&self, round: u32) -> Result<()>;
    fn is_sealed(&self, round: u32) -> Result<bool>;
    /// A round's committed uploads, in client order.
    fn uploads(&self, round: u32) -> Result<Vec<Vec<u8>>>;
    fn upload_count(&self, round: u32) -> Result<u32>;
    /// Stores a closed round unless it is stored; false if it was (another replica closed
    /// it first).
    fn put_round(&self, round: u32, bytes: &[u8]) -> Result<bool>;
    fn round(&self, round: u32) -> Result<Option<Vec<u8>>>;
    /// The last closed round (0: none).
    fn last_round(&self) -> Result<u32>;
}

/// SQLite in WAL mode with synchronous=FULL: a commit is on disk before it returns.
#[derive(Debug)]
pub struct Sqlite {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS session (id INTEGER PRIMARY KEY CHECK (id = 1), bytes BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS clients (id INTEGER PRIMARY KEY, key BLOB NOT NULL, nonce INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS uploads (round INTEGER NOT NULL, client INTEGER NOT NULL, bytes BLOB NOT NULL, PRIMARY KEY (round, client));
CREATE TABLE IF NOT EXISTS rounds (round INTEGER PRIMARY KEY, bytes BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS sealed (round INTEGER PRIMARY KEY);
";

impl Sqlite {
    pub fn open(path: &Path) -> Result<Sqlite> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Sqlite {
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T> {
        let mut c = self
            .conn
            .lock()
            .map_err(|_| StoreError("a thread panicked holding the database".into()))?;
        Ok(f(&mut c)?)
    }
}

impl Store for Sqlite {
    fn session(&self) -> Result<Option<Vec<u8>>> {
        self.with(|c| {
            c.query_row("SELECT bytes FROM session WHERE id = 1", [], |r| r.get(0))
                .optional()
        })
    }

    fn init_session(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        self.with(|c| {
            c.execute(
                "INSERT OR IGNORE INTO session (id, bytes) VALUES (1, ?1)",
                params![bytes],
            )?;
            c.query_row("SELECT bytes FROM session WHERE id = 1", [], |r| r.get(0))
        })
    }

    fn set_client(&self, id: u32, key: &[u8]) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO clients (id, key) VALUES (?1, ?2) ON CONFLICT (id) DO UPDATE SET key = excluded.key",
                params![id, key],
            )
            .map(|_| ())
        })
    }

    fn client_key(&self, id: u32) -> Result<Option<Vec<u8>>> {
        self.with(|c| {
            c.query_row("SELECT key FROM clients WHERE id = ?1", params![id], |r| {
                r.get(0)
            })
            .optional()
        })
    }

    fn take_nonce(&self, id: u32, nonce: u64) -> Result<bool> {
        // Nonces are stored as i64: SQLite integers are signed.
        let nonce = i64::try_from(nonce).map_err(|_| StoreError("nonce above 2^63".into()))?;
        self.with(|c| {
            c.execute(
                "UPDATE clients SET nonce = ?2 WHERE id = ?1 AND nonce < ?2",
                params![id, nonce],
            )
            .map(|n| n == 1)
        })
    }

    fn put_upload(&self, round: u32, client: u32, bytes: &[u8]) -> Result<Put> {
        self.with(|c| {
            // One connection behind a mutex: the check and the insert are not interleaved
            // with a seal.
            let tx = c.transaction()?;
            let sealed: Option<u32> = tx
                .query_row(
                    "SELECT round FROM sealed WHERE round = ?1",
                    params![round],
                    |r| r.get(0),
                )
                .optional()?;
            if sealed.is_some() {
                return Ok(Put::Sealed);
            }
            let old: Option<Vec<u8>> = tx
                .query_row(
                    "SELECT bytes FROM uploads WHERE round = ?1 AND client = ?2",
                    params![round, client],
                    |r| r.get(0),
                )
                .optional()?;
            let put = match old {
                Some(b) if b == bytes => Put::Same,
                Some(_) => Put::Conflict,
                None => {
                    tx.execute(
                        "INSERT INTO uploads (round, client, bytes) VALUES (?1, ?2, ?3)",
                        params![round, client, bytes],
                    )?;
                    Put::Inserted
                }
            };
            tx.commit()?;
            Ok(put)
        })
    }

    fn seal(&self, round: u32) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT OR IGNORE INTO sealed (round) VALUES (?1)",
                params![round],
            )
            .map(|_| ())
        })
    }

    fn is_sealed(&self, round: u32) -> Result<bool> {
        self.with(|c| {
            c.query_row(
                "SELECT COUNT(*) FROM sealed WHERE round = ?1",
                params![round],
                |r| r.get::<_, u32>(0),
            )
            .map(|n| n > 0)
        })
    }

    fn uploads(&self, round: u32) -> Result<Vec<Vec<u8>>> {
        self.with(|c| {
            let mut st = c.prepare("SELECT bytes FROM uploads WHERE round = ?1 ORDER BY client")?;
            let rows = st.query_map(params![round], |r| r.get(0))?;
            rows.collect()
        })
    }

    fn upload_count(&self, round: u32) -> Result<u32> {
        self.with(|c| {
            c.query_row(
                "SELECT COUNT(*) FROM uploads WHERE round = ?1",
                params![round],
                |r| r.get(0),
            )
        })
    }

    fn put_round(&self, round: u32, bytes: &[u8]) -> Result<bool> {
        self.with(|c| {
            c.execute(
                "INSERT OR IGNORE INTO rounds (round, bytes) VALUES (?1, ?2)",
                params![round, bytes],
            )
            .map(|n| n == 1)
        })
    }

    fn round(&self, round: u32) -> Result<Option<Vec<u8>>> {
        self.with(|c| {
            c.query_row(
                "SELECT bytes FROM rounds WHERE round = ?1",
                params![round],
                |r| r.get(0),
            )
            .optional()
        })
    }

    fn last_round(&self) -> Result<u32> {
        self.with(|c| {
            c.query_row("SELECT COALESCE(MAX(round), 0) FROM rounds", [], |r| {
                r.get(0)
            })
        })
    }
}
