//! The embedded backend: one SQLite file, shared by the processes of one machine (WAL journal,
//! a busy timeout, immediate transactions).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rusqlite::{Connection, ErrorCode, OptionalExtension as _, TransactionBehavior, params};

use super::{Backend, Batch, Fields, MAX_WORKER_STATUS, MAX_WORKERS, Published, StoredRecord};

/// How long a batch id is remembered (seconds): far longer than any retry.
const BATCH_MEMORY_S: i64 = 7 * 24 * 3600;

pub(crate) struct Sqlite {
    conn: Connection,
}

impl Sqlite {
    pub(crate) fn open(path: &Path, timeout: Duration) -> anyhow::Result<Self> {
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating the directory {}", parent.display()))?;
        }
        // Made (if new) by us, owner-only and never through a symbolic link, like the state
        // files; SQLite gives its -wal and -shm files the database file's permissions.
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(path)
                .with_context(|| {
                    format!(
                        "opening the store file {} (it must be a regular file, not a link)",
                        path.display()
                    )
                })?;
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(timeout)?;
        // Switching a new file to WAL takes a lock that SQLite does not wait for: workers
        // started together on one new file see "database is locked" here. Retried until the
        // timeout, like any other busy moment.
        let deadline = Instant::now() + timeout;
        loop {
            match prepare(&conn) {
                Ok(()) => break,
                Err(e)
                    if matches!(
                        e.sqlite_error_code(),
                        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
                    ) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Self { conn })
    }
}

/// The journal mode and the tables, made if missing.
fn prepare(conn: &Connection) -> rusqlite::Result<()> {
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        conn.pragma_update(None, "journal_mode", "WAL")?;
    }
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS fields (key TEXT NOT NULL, field TEXT NOT NULL, value REAL NOT NULL, PRIMARY KEY (key, field)) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS marks (mark TEXT PRIMARY KEY) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS batches (id TEXT PRIMARY KEY, at INTEGER NOT NULL) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS records (key TEXT PRIMARY KEY, version INTEGER NOT NULL, value TEXT NOT NULL) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS workers (id TEXT PRIMARY KEY, status TEXT NOT NULL, expires INTEGER NOT NULL) WITHOUT ROWID;",
    )
}

fn now_ms() -> i64 {
    i64::try_from(super::now_ms()).unwrap_or(i64::MAX)
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl Backend for Sqlite {
    fn apply(&mut self, batch: &Batch) -> anyhow::Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now = now_s();
        let new = tx.execute(
            "INSERT OR IGNORE INTO batches (id, at) VALUES (?1, ?2)",
            params![batch.id, now],
        )?;
        if new == 1 {
            tx.execute(
                "DELETE FROM batches WHERE at < ?1",
                params![now - BATCH_MEMORY_S],
            )?;
            let mut mark = tx.prepare_cached("INSERT OR IGNORE INTO marks (mark) VALUES (?1)")?;
            let mut add = tx.prepare_cached(
                "INSERT INTO fields (key, field, value) VALUES (?1, ?2, ?3)
                 ON CONFLICT (key, field) DO UPDATE SET value = value + excluded.value",
            )?;
            // The additions of the groups that apply (no mark, or a new one), summed: one
            // statement per field rather than one per group and field.
            let mut sums: BTreeMap<(&str, &str), f64> = BTreeMap::new();
            for (group_mark, rows) in batch.groups() {
                if let Some(m) = group_mark
                    && mark.execute(params![m])? == 0
                {
                    continue;
                }
                for (key, field, delta) in batch.adds(rows) {
                    *sums.entry((key, field)).or_insert(0.0) += delta;
                }
            }
            for ((key, field), delta) in sums {
                add.execute(params![key, field, delta])?;
            }
            drop((mark, add));
        }
        tx.commit()?;
        Ok(())
    }

    fn read(&mut self, keys: &[String]) -> anyhow::Result<HashMap<String, Fields>> {
        let mut out = HashMap::new();
        let mut stmt = self
            .conn
            .prepare_cached("SELECT field, value FROM fields WHERE key = ?1")?;
        for key in keys {
            let rows = stmt.query_map(params![key], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, f64>(1)?))
            })?;
            let fields: Fields = rows.collect::<Result<_, _>>()?;
            if !fields.is_empty() {
                out.insert(key.clone(), fields);
            }
        }
        Ok(out)
    }

    fn records(&mut self, keys: &[String]) -> anyhow::Result<HashMap<String, StoredRecord>> {
        let mut out = HashMap::new();
        let mut stmt = self
            .conn
            .prepare_cached("SELECT version, value FROM records WHERE key = ?1")?;
        for key in keys {
            let found = stmt
                .query_row(params![key], |r| {
                    Ok(StoredRecord {
                        version: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                        value: r.get(1)?,
                    })
                })
                .optional()?;
            if let Some(record) = found {
                out.insert(key.clone(), record);
            }
        }
        Ok(out)
    }

    fn compare_and_set(&mut self, key: &str, version: u64, value: &str) -> anyhow::Result<bool> {
        let version = i64::try_from(version).context("record version out of range")?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let written = if version == 0 {
            tx.execute(
                "INSERT OR IGNORE INTO records (key, version, value) VALUES (?1, 1, ?2)",
                params![key, value],
            )?
        } else {
            tx.execute(
                "UPDATE records SET version = version + 1, value = ?3 WHERE key = ?1 AND version = ?2",
                params![key, version, value],
            )?
        };
        tx.commit()?;
        Ok(written == 1)
    }

    fn ping(&mut self) -> anyhow::Result<()> {
        self.conn.query_row("SELECT 1", [], |_| Ok(()))?;
        Ok(())
    }

    fn scan(&mut self, prefix: &str) -> anyhow::Result<Vec<(String, Fields)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT key, field, value FROM fields WHERE substr(key, 1, length(?1)) = ?1 ORDER BY key",
        )?;
        let rows = stmt.query_map(params![prefix], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, f64>(2)?,
            ))
        })?;
        let mut out: Vec<(String, Fields)> = Vec::new();
        for row in rows {
            let (key, field, value) = row?;
            match out.last_mut() {
                Some((last, fields)) if *last == key => {
                    fields.insert(field, value);
                }
                _ => out.push((key, Fields::from([(field, value)]))),
            }
        }
        Ok(out)
    }

    fn publish(&mut self, id: &str, status: &str, ttl: Duration) -> anyhow::Result<()> {
        let now = now_ms();
        let ttl = i64::try_from(super::millis(ttl)).unwrap_or(i64::MAX);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO workers (id, status, expires) VALUES (?1, ?2, ?3)
             ON CONFLICT (id) DO UPDATE SET status = excluded.status, expires = excluded.expires",
            params![id, status, now.saturating_add(ttl)],
        )?;
        tx.execute("DELETE FROM workers WHERE expires < ?1", params![now])?;
        tx.commit()?;
        Ok(())
    }

    fn unpublish(&mut self, id: &str) -> anyhow::Result<()> {
        self.conn
            .execute("DELETE FROM workers WHERE id = ?1", params![id])?;
        Ok(())
    }

    fn published(&mut self) -> anyhow::Result<Published> {
        let now = now_ms();
        let max_status = i64::try_from(MAX_WORKER_STATUS).unwrap_or(i64::MAX);
        let mut out = Published::default();
        // As bytes, whatever a writer put there; a text too long is not read.
        let mut stmt = self.conn.prepare_cached(
            "SELECT CAST(id AS BLOB),
                    CASE WHEN length(CAST(status AS BLOB)) <= ?2 THEN CAST(status AS BLOB) END
             FROM workers WHERE expires >= ?1 ORDER BY id LIMIT ?3",
        )?;
        let rows = stmt.query_map(
            params![
                now,
                max_status,
                i64::try_from(MAX_WORKERS).unwrap_or(i64::MAX)
            ],
            |r| {
                Ok((
                    r.get::<_, Option<Vec<u8>>>(0)?,
                    r.get::<_, Option<Vec<u8>>>(1)?,
                ))
            },
        )?;
        for row in rows {
            let (id, text) = row?;
            out.push(id.unwrap_or_default(), text);
        }
        let all: i64 = self.conn.query_row(
            "SELECT count(*) FROM workers WHERE expires >= ?1",
            params![now],
            |r| r.get(0),
        )?;
        out.left_out = usize::try_from(all)
            .unwrap_or(0)
            .saturating_sub(out.statuses.len() + out.unreadable);
        Ok(out)
    }
}
