//! The PostgreSQL store: the scale-out path, where several server replicas behind a load
//! balancer share one database. Every write is its own committed statement or
//! transaction; a round is inserted once (`ON CONFLICT DO NOTHING`), and because a round is
//! a deterministic function of its uploads, replicas that both close it write the same row.

use crate::store::{Put, Result, Store, StoreError};
use postgres::{Client, NoTls};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Connections kept open: requests run in parallel, and PostgreSQL groups their commits.
const CONNECTIONS: usize = 8;

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        StoreError(e.to_string())
    }
}

/// A PostgreSQL database (tables in `schema`, created if absent), over a small pool of
/// connections.
pub struct Postgres {
    pool: Vec<Mutex<Client>>,
    next: AtomicUsize,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres").finish_non_exhaustive()
    }
}

impl Postgres {
    /// Connects to `url` (`postgres://user:password@host:port/database`) and uses `schema`.
    pub fn open(url: &str, schema: &str) -> Result<Postgres> {
        if schema.is_empty()
            || !schema
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(StoreError(format!(
                "schema `{schema}` must be ASCII letters, digits and _"
            )));
        }
        let mut client = Client::connect(url, NoTls)?;
        client.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
             SET search_path TO {schema};
             CREATE TABLE IF NOT EXISTS session (id INTEGER PRIMARY KEY CHECK (id = 1), bytes BYTEA NOT NULL);
             CREATE TABLE IF NOT EXISTS clients (id BIGINT PRIMARY KEY, key BYTEA NOT NULL, nonce BIGINT NOT NULL DEFAULT 0);
             CREATE TABLE IF NOT EXISTS uploads (round BIGINT NOT NULL, client BIGINT NOT NULL, bytes BYTEA NOT NULL, PRIMARY KEY (round, client));
             CREATE TABLE IF NOT EXISTS rounds (round BIGINT PRIMARY KEY, bytes BYTEA NOT NULL);
             CREATE TABLE IF NOT EXISTS sealed (round BIGINT PRIMARY KEY);"
        ))?;
        let mut pool = vec![Mutex::new(client)];
        for _ in 1..CONNECTIONS {
            let mut c = Client::connect(url, NoTls)?;
            c.batch_execute(&format!("SET search_path TO {schema}"))?;
            pool.push(Mutex::new(c));
        }
        Ok(Postgres {
            pool,
            next: AtomicUsize::new(0),
        })
    }

    /// Runs `f` on a free connection (the next one in turn if all are busy).
    fn with<T>(
        &self,
        f: impl FnOnce(&mut Client) -> std::result::Result<T, postgres::Error>,
    ) -> Result<T> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.pool.len();
        let free = (0..n).find_map(|i| self.pool[(start + i) % n].try_lock().ok());
        let mut c = match free {
            Some(c) => c,
            None => self.pool[start % n]
                .lock()
                .map_err(|_| StoreError("a thread panicked holding the database".into()))?,
        };
        Ok(f(&mut c)?)
    }
}

impl Store for Postgres {
    fn session(&self) -> Result<Option<Vec<u8>>> {
        self.with(|c| {
            Ok(c.query_opt("SELECT bytes FROM session WHERE id = 1", &[])?
                .map(|r| r.get(0)))
        })
    }

    fn init_session(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        self.with(|c| {
            c.execute(
                "INSERT INTO session (id, bytes) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
                &[&bytes],
            )?;
            Ok(c.query_one("SELECT bytes FROM session WHERE id = 1", &[])?
                .get(0))
        })
    }

    fn set_client(&self, id: u32, key: &[u8]) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO clients (id, key) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET key = excluded.key",
                &[&i64::from(id), &key],
            )
            .map(|_| ())
        })
    }

    fn client_key(&self, id: u32) -> Result<Option<Vec<u8>>> {
        self.with(|c| {
            Ok(
                c.query_opt("SELECT key FROM clients WHERE id = $1", &[&i64::from(id)])?
                    .map(|r| r.get(0)),
            )
        })
    }

    fn take_nonce(&self, id: u32, nonce: u64) -> Result<bool> {
        let nonce = i64::try_from(nonce).map_err(|_| StoreError("nonce above 2^63".into()))?;
        self.with(|c| {
            c.execute(
                "UPDATE clients SET nonce = $2 WHERE id = $1 AND nonce < $2",
                &[&i64::from(id), &nonce],
            )
            .map(|n| n == 1)
        })
    }

    fn put_upload(&self, round: u32, client: u32, bytes: &[u8]) -> Result<Put> {
        let (round, client) = (i64::from(round), i64::from(client));
        self.with(|c| {
            // One statement: it takes the uploads table's ROW EXCLUSIVE lock before its
            // snapshot, so it either finishes before a seal's SHARE lock is granted (and is
            // in the round) or starts after the seal committed (and sees it).
            let inserted = c.execute(
                "INSERT INTO uploads (round, client, bytes) SELECT $1, $2, $3 \
                 WHERE NOT EXISTS (SELECT 1 FROM sealed WHERE round = $1) ON CONFLICT DO NOTHING",
                &[&round, &client, &bytes],
            )?;
            if inserted == 1 {
                return Ok(Put::Inserted);
            }
            let old: Option<Vec<u8>> = c
                .query_opt(
                    "SELECT bytes FROM uploads WHERE round = $1 AND client = $2",
                    &[&round, &client],
                )?
                .map(|r| r.get(0));
            Ok(match old {
                Some(b) if b == bytes => Put::Same,
                Some(_) => Put::Conflict,
                None => Put::Sealed,
            })
        })
    }

    fn seal(&self, round: u32) -> Result<()> {
        self.with(|c| {
            // SHARE mode waits for uploads in flight and holds new ones until the seal is
            // committed.
            let mut tx = c.transaction()?;
            tx.batch_execute("LOCK TABLE uploads IN SHARE MODE")?;
            tx.execute(
                "INSERT INTO sealed (round) VALUES ($1) ON CONFLICT DO NOTHING",
                &[&i64::from(round)],
            )?;
            tx.commit()
        })
    }

    fn is_sealed(&self, round: u32) -> Result<bool> {
        self.with(|c| {
            Ok(c.query_opt(
                "SELECT 1 FROM sealed WHERE round = $1",
                &[&i64::from(round)],
            )?
            .is_some())
        })
    }

    fn uploads(&self, round: u32) -> Result<Vec<Vec<u8>>> {
        self.with(|c| {
            Ok(c.query(
                "SELECT bytes FROM uploads WHERE round = $1 ORDER BY client",
                &[&i64::from(round)],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect())
        })
    }

    fn upload_count(&self, round: u32) -> Result<u32> {
        self.with(|c| {
            let n: i64 = c
                .query_one(
                    "SELECT COUNT(*) FROM uploads WHERE round = $1",
                    &[&i64::from(round)],
                )?
                .get(0);
            Ok(n as u32)
        })
    }

    fn put_round(&self, round: u32, bytes: &[u8]) -> Result<bool> {
        self.with(|c| {
            c.execute(
                "INSERT INTO rounds (round, bytes) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&i64::from(round), &bytes],
            )
            .map(|n| n == 1)
        })
    }

    fn round(&self, round: u32) -> Result<Option<Vec<u8>>> {
        self.with(|c| {
            Ok(c.query_opt(
                "SELECT bytes FROM rounds WHERE round = $1",
                &[&i64::from(round)],
            )?
            .map(|r| r.get(0)))
        })
    }

    fn last_round(&self) -> Result<u32> {
        self.with(|c| {
            let n: i64 = c
                .query_one("SELECT COALESCE(MAX(round), 0) FROM rounds", &[])?
                .get(0);
            Ok(n as u32)
        })
    }
}
