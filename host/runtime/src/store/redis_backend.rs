//! The fleet backend: Redis. A batch is one Lua script (atomic on the server): the batch id
//! and each group's mark are set with NX, and a group's additions count only when its mark was
//! new; the additions that count are summed in the script, one HINCRBYFLOAT per field. Keys: `store:f:<key>` (a hash of fields), `store:m:<mark>`,
//! `store:r:<key>` (a record: version and value), `store:b:<batch id>` (expires after a week),
//! `store:w:<worker>` (a worker's status, which expires unless written again) and
//! `store:workers` (the workers' ids, each scored with when its status expires).
//! The scripts touch keys they do not declare: a standalone server or a replica set, not a
//! Redis Cluster.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use super::{
    Backend, Batch, Fields, MAX_WORKER_ID, MAX_WORKER_STATUS, MAX_WORKERS, Published, Row,
    StoredRecord,
};

const APPLY: &str = r"
local batch = cjson.decode(ARGV[1])
if not redis.call('SET', 'store:b:' .. batch.id, '1', 'NX', 'EX', 604800) then return 0 end
local sums = {}
for _, g in ipairs(batch.groups) do
  local fresh = true
  if g.mark then fresh = redis.call('SET', 'store:m:' .. g.mark, '1', 'NX') end
  if fresh then
    for _, add in ipairs(g.adds) do
      local key, field, delta = batch.keys[add[1] + 1], batch.fields[add[2] + 1], add[3]
      local sum = sums[key]
      if not sum then sum = {}; sums[key] = sum end
      sum[field] = (sum[field] or 0) + tonumber(delta)
    end
  end
end
for key, fields in pairs(sums) do
  for field, delta in pairs(fields) do
    redis.call('HINCRBYFLOAT', 'store:f:' .. key, field, string.format('%.17g', delta))
  end
end
return 1
";

const CAS: &str = r"
local v = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if v ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'version', v + 1, 'value', ARGV[2])
return 1
";

/// A worker's status, its entry in the index, and the index's expired entries dropped.
const PUBLISH: &str = r"
local ttl, now = tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('SET', 'store:w:' .. ARGV[1], ARGV[2], 'PX', ttl)
redis.call('ZADD', 'store:workers', now + ttl, ARGV[1])
redis.call('ZREMRANGEBYSCORE', 'store:workers', '-inf', '(' .. now)
return 1
";

const UNPUBLISH: &str = r"
redis.call('DEL', 'store:w:' .. ARGV[1])
redis.call('ZREM', 'store:workers', ARGV[1])
return 1
";

/// The index's first ids not expired (at most ARGV[2]), how many there are, and each one's
/// status: at most ARGV[3] + 1 bytes of it (a longer one is not read), false for none, one
/// that is not a string, or an id longer than ARGV[4].
const LIST: &str = r"
local now, limit, len, idlen = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local ids = redis.call('ZRANGEBYSCORE', 'store:workers', now, '+inf', 'LIMIT', 0, limit)
local total = redis.call('ZCOUNT', 'store:workers', now, '+inf')
local values = {}
for i, id in ipairs(ids) do
  local value = false
  if #id <= idlen then
    local got = redis.pcall('GETRANGE', 'store:w:' .. id, 0, len)
    if type(got) == 'string' and #got > 0 then value = got end
  end
  values[i] = value
end
return {total, ids, values}
";

/// What [`LIST`] answers: how many statuses, the first ids, and their texts.
type Listed = (u64, Vec<Vec<u8>>, Vec<Option<Vec<u8>>>);

pub(crate) struct Redis {
    client: redis::Client,
    conn: Option<redis::Connection>,
    timeout: Duration,
}

impl Redis {
    pub(crate) fn new(url: &str, timeout: Duration) -> anyhow::Result<Self> {
        let client = redis::Client::open(url).context("not a Redis URL (redis://host:port/db)")?;
        Ok(Self {
            client,
            conn: None,
            timeout,
        })
    }

    /// Runs `f` on a connection, made if needed; a failed call drops the connection, so the
    /// next one reconnects.
    fn with<T>(
        &mut self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> anyhow::Result<T> {
        if self.conn.is_none() {
            let conn = self
                .client
                .get_connection_with_timeout(self.timeout)
                .map_err(|e| anyhow::anyhow!("connecting to Redis: {}", self.describe(&e)))?;
            conn.set_read_timeout(Some(self.timeout))?;
            conn.set_write_timeout(Some(self.timeout))?;
            self.conn = Some(conn);
        }
        let Some(conn) = self.conn.as_mut() else {
            anyhow::bail!("no Redis connection");
        };
        match f(conn) {
            Ok(v) => Ok(v),
            Err(e) => {
                self.conn = None;
                Err(anyhow::anyhow!("Redis: {}", self.describe(&e)))
            }
        }
    }

    /// What went wrong, once: the error's own text already holds its cause's (which an
    /// error chain would print again), and a timeout says so rather than "Resource
    /// temporarily unavailable".
    fn describe(&self, e: &redis::RedisError) -> String {
        if e.is_timeout() {
            format!("no answer within {} ms", self.timeout.as_millis())
        } else {
            e.to_string()
        }
    }
}

/// A batch as the script reads it.
struct Encoded<'a>(&'a Batch);

/// Names as a JSON list.
struct Names<'a>(&'a [Arc<str>]);

/// The groups of a batch as a JSON list.
struct Groups<'a>(&'a Batch);

/// A group: its mark, if it has one, and its rows.
struct EncodedGroup<'a>(Option<&'a str>, &'a [Row]);

/// Rows as `[key, field, delta]` lists.
struct Adds<'a>(&'a [Row]);

impl serde::Serialize for Encoded<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let batch = self.0;
        let mut out = s.serialize_struct("Batch", 4)?;
        out.serialize_field("id", &batch.id)?;
        out.serialize_field("keys", &Names(&batch.keys))?;
        out.serialize_field("fields", &Names(&batch.fields))?;
        out.serialize_field("groups", &Groups(batch))?;
        out.end()
    }
}

impl serde::Serialize for Names<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|name| &**name))
    }
}

impl serde::Serialize for Groups<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.groups().map(|(mark, rows)| EncodedGroup(mark, rows)))
    }
}

impl serde::Serialize for EncodedGroup<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let mut out = s.serialize_map(None)?;
        // Left out when there is none (the script tests its presence).
        if let Some(mark) = self.0 {
            out.serialize_entry("mark", mark)?;
        }
        out.serialize_entry("adds", &Adds(self.1))?;
        out.end()
    }
}

impl serde::Serialize for Adds<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|r| (r.key, r.field, r.delta)))
    }
}

fn parse_fields(hash: HashMap<String, String>) -> Fields {
    hash.into_iter()
        .filter_map(|(field, value)| value.parse::<f64>().ok().map(|v| (field, v)))
        .collect()
}

/// Escapes the glob characters of a SCAN pattern.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl Backend for Redis {
    fn apply(&mut self, batch: &Batch) -> anyhow::Result<()> {
        // `{"id", "keys": [..], "fields": [..], "groups": [{"mark"?, "adds": [[key, field,
        // delta], ..]}]}` (keys and fields as indexes of the two lists), written straight from
        // the batch. A delta is a JSON number in its shortest exact form, which the script's
        // decoder reads back as the same double; the script writes its sums with 17 digits.
        let text = serde_json::to_string(&Encoded(batch)).context("encoding a batch")?;
        self.with(|c| {
            redis::cmd("EVAL")
                .arg(APPLY)
                .arg(0)
                .arg(&text)
                .query::<i64>(c)
        })?;
        Ok(())
    }

    fn read(&mut self, keys: &[String]) -> anyhow::Result<HashMap<String, Fields>> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("HGETALL").arg(format!("store:f:{key}"));
        }
        let hashes: Vec<HashMap<String, String>> = self.with(|c| pipe.query(c))?;
        Ok(keys
            .iter()
            .cloned()
            .zip(hashes)
            .filter(|(_, h)| !h.is_empty())
            .map(|(k, h)| (k, parse_fields(h)))
            .collect())
    }

    fn records(&mut self, keys: &[String]) -> anyhow::Result<HashMap<String, StoredRecord>> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("HMGET")
                .arg(format!("store:r:{key}"))
                .arg("version")
                .arg("value");
        }
        let rows: Vec<(Option<u64>, Option<String>)> = self.with(|c| pipe.query(c))?;
        Ok(keys
            .iter()
            .cloned()
            .zip(rows)
            .filter_map(|(k, row)| match row {
                (Some(version), Some(value)) => Some((k, StoredRecord { version, value })),
                _ => None,
            })
            .collect())
    }

    fn compare_and_set(&mut self, key: &str, version: u64, value: &str) -> anyhow::Result<bool> {
        let written: i64 = self.with(|c| {
            redis::cmd("EVAL")
                .arg(CAS)
                .arg(1)
                .arg(format!("store:r:{key}"))
                .arg(version)
                .arg(value)
                .query(c)
        })?;
        Ok(written == 1)
    }

    fn ping(&mut self) -> anyhow::Result<()> {
        self.with(|c| redis::cmd("PING").query::<String>(c))?;
        Ok(())
    }

    fn scan(&mut self, prefix: &str) -> anyhow::Result<Vec<(String, Fields)>> {
        let pattern = format!("store:f:{}*", glob_escape(prefix));
        let mut keys = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = self.with(|c| {
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query(c)
            })?;
            keys.extend(
                batch
                    .into_iter()
                    .filter_map(|k| k.strip_prefix("store:f:").map(str::to_owned)),
            );
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        keys.sort();
        keys.dedup();
        let mut fields = self.read(&keys)?;
        Ok(keys
            .into_iter()
            .filter_map(|k| fields.remove(&k).map(|f| (k, f)))
            .collect())
    }

    fn publish(&mut self, id: &str, status: &str, ttl: Duration) -> anyhow::Result<()> {
        let ttl = super::millis(ttl).max(1);
        self.with(|c| {
            redis::cmd("EVAL")
                .arg(PUBLISH)
                .arg(0)
                .arg(id)
                .arg(status)
                .arg(ttl)
                .arg(super::now_ms())
                .query::<()>(c)
        })
    }

    fn unpublish(&mut self, id: &str) -> anyhow::Result<()> {
        self.with(|c| {
            redis::cmd("EVAL")
                .arg(UNPUBLISH)
                .arg(0)
                .arg(id)
                .query::<()>(c)
        })
    }

    fn published(&mut self) -> anyhow::Result<Published> {
        // One script: no SCAN of the whole keyspace, one round trip, bounded.
        let (total, ids, values): Listed = self.with(|c| {
            redis::cmd("EVAL")
                .arg(LIST)
                .arg(0)
                .arg(super::now_ms())
                .arg(MAX_WORKERS)
                .arg(MAX_WORKER_STATUS)
                .arg(MAX_WORKER_ID)
                .query(c)
        })?;
        let mut out = Published::default();
        let read = ids.len();
        let mut values = values.into_iter();
        for id in ids.into_iter().take(MAX_WORKERS) {
            out.push(id, values.next().flatten());
        }
        out.left_out = usize::try_from(total)
            .unwrap_or(usize::MAX)
            .saturating_sub(read);
        Ok(out)
    }
}
