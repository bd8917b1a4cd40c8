//! The audit log: every operation appended as a record of who, for what purpose, which handle and
//! scope, the operation and its outcome, and when. Never a value: no field could carry one.
//!
//! # The chain
//!
//! Records are numbered from 1 (`seq`) and hash-chained. Each row stores `prev_hash`, the previous
//! record's `hash` (32 zero bytes for record 1), and
//!
//! ```text
//! hash = SHA-256(prev_hash || seq || time_ms || who || purpose || operation || handle || scope || outcome)
//! ```
//!
//! where `seq` and `time_ms` are 8-byte big-endian integers, a string is its UTF-8 length as an
//! 8-byte big-endian integer followed by its bytes, and an optional string is one byte `0x00`
//! (absent) or `0x01` followed by the string. Every field is length-prefixed or fixed-size, so
//! the encoding is unambiguous. [`AuditLog::verify`] recomputes the chain and names the first
//! record that breaks it: a changed field, a deleted record or reordered records. A hash chain
//! cannot notice records cut off the end; that needs the latest hash kept somewhere else.
//!
//! # Storage
//!
//! The `audit` table lives in the same SQLite file as the [state store](crate::state);
//! [`AuditLog::open`] opens its own connection to that file (creating and migrating it like
//! [`StateStore::open`](crate::state::StateStore::open) does), with WAL and `synchronous=FULL`.
//! Triggers refuse `UPDATE` and `DELETE` on the table. [`AuditLog::append`] returns only after its
//! transaction committed, so the record is on disk before the caller answers. Appends take the
//! write lock (`BEGIN IMMEDIATE`) and read the chain's head inside the transaction, so appends
//! from many threads, connections or processes keep one chain. Methods block; async callers use
//! `spawn_blocking`.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension, Row, Transaction, TransactionBehavior, params};
use sha2::{Digest, Sha256};

use crate::state::{StateError, lock, open_database, open_database_in_memory};

/// The audit table and its append-only triggers (schema migration 2, applied by
/// [`crate::state`]'s migration list).
pub(crate) const AUDIT_SCHEMA: &str = "
CREATE TABLE audit (
    seq       INTEGER PRIMARY KEY CHECK (seq >= 1),
    time_ms   INTEGER NOT NULL CHECK (time_ms >= 0),
    who       TEXT NOT NULL,
    purpose   TEXT,
    operation TEXT NOT NULL,
    handle    TEXT,
    scope     TEXT,
    outcome   TEXT NOT NULL,
    prev_hash BLOB NOT NULL CHECK (length(prev_hash) = 32),
    hash      BLOB NOT NULL CHECK (length(hash) = 32)
) STRICT;
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
";

/// The `prev_hash` of record 1.
pub const GENESIS_HASH: [u8; 32] = [0; 32];

/// An audit failure. Messages name records, never values.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The database could not be opened, created or migrated.
    #[error("cannot open the audit log: {0}")]
    Open(#[from] StateError),
    /// SQLite failed.
    #[error("audit log database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// An entry's time does not fit SQLite's signed 64-bit integer.
    #[error("audit time {time_ms} ms is out of range")]
    TimeOutOfRange {
        /// The time given.
        time_ms: u64,
    },
    /// A stored record does not decode, or the head of the chain is damaged so nothing can be
    /// appended to it.
    #[error("audit record {seq} is corrupt ({reason}); run keyhole audit verify")]
    Corrupt {
        /// The record.
        seq: i64,
        /// What is wrong with it.
        reason: String,
    },
}

/// One operation to record.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AuditEntry {
    /// The caller's identity, such as `uid:1000`.
    pub who: String,
    /// The purpose the caller stated, if any.
    pub purpose: Option<String>,
    /// The operation, such as `resolve`.
    pub operation: String,
    /// The handle operated on, if any. Callers pass only strings that passed
    /// [`is_handle_id`](crate::state::is_handle_id), never raw client input.
    pub handle: Option<String>,
    /// The handle's scope, if known.
    pub scope: Option<String>,
    /// The outcome, such as `ok`, `denied` or `NotFound`.
    pub outcome: String,
    /// When, in milliseconds since the Unix epoch (at most `i64::MAX`).
    pub time_ms: u64,
}

/// A stored record, for display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// The record's number, from 1.
    pub seq: u64,
    /// What was recorded.
    pub entry: AuditEntry,
    /// The previous record's hash, lowercase hex.
    pub prev_hash: String,
    /// This record's hash, lowercase hex.
    pub hash: String,
}

/// What [`AuditLog::verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyReport {
    /// Every record chains to the one before it.
    Intact {
        /// How many records there are.
        records: u64,
    },
    /// The first record where the chain breaks.
    Broken {
        /// The record.
        seq: u64,
        /// Why, for a human.
        reason: String,
    },
}

/// The fields a record's hash covers besides `prev_hash` and `seq`, borrowed.
struct Fields<'a> {
    time_ms: u64,
    who: &'a str,
    purpose: Option<&'a str>,
    operation: &'a str,
    handle: Option<&'a str>,
    scope: Option<&'a str>,
    outcome: &'a str,
}

impl<'a> From<&'a AuditEntry> for Fields<'a> {
    fn from(e: &'a AuditEntry) -> Self {
        Fields {
            time_ms: e.time_ms,
            who: &e.who,
            purpose: e.purpose.as_deref(),
            operation: &e.operation,
            handle: e.handle.as_deref(),
            scope: e.scope.as_deref(),
            outcome: &e.outcome,
        }
    }
}

/// Feeds the canonical encoding of a record (see the [module documentation](self)) to `sink`.
fn encode(seq: u64, f: &Fields<'_>, sink: &mut impl FnMut(&[u8])) {
    fn string(s: &str, sink: &mut impl FnMut(&[u8])) {
        sink(&(s.len() as u64).to_be_bytes());
        sink(s.as_bytes());
    }
    fn optional(s: Option<&str>, sink: &mut impl FnMut(&[u8])) {
        match s {
            None => sink(&[0]),
            Some(s) => {
                sink(&[1]);
                string(s, sink);
            }
        }
    }
    sink(&seq.to_be_bytes());
    sink(&f.time_ms.to_be_bytes());
    string(f.who, sink);
    optional(f.purpose, sink);
    string(f.operation, sink);
    optional(f.handle, sink);
    optional(f.scope, sink);
    string(f.outcome, sink);
}

/// `SHA-256(prev_hash || canonical encoding)`.
fn record_hash(prev_hash: &[u8; 32], seq: u64, fields: &Fields<'_>) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(prev_hash);
    encode(seq, fields, &mut |bytes| hasher.update(bytes));
    hasher.finalize().into()
}

/// The columns read back, in the order [`read_row`] expects.
const AUDIT_COLUMNS: &str =
    "seq, time_ms, who, purpose, operation, handle, scope, outcome, prev_hash, hash";

/// A stored row, decoded leniently so that [`AuditLog::verify`] can report damage instead of
/// failing on it.
struct StoredRow {
    seq: i64,
    entry: AuditEntry,
    prev_hash: Vec<u8>,
    hash: Vec<u8>,
}

/// Why a row did not decode: SQLite failed, or a column holds the wrong kind of value.
enum RowError {
    Sql(rusqlite::Error),
    Bad(String),
}

impl From<rusqlite::Error> for RowError {
    fn from(e: rusqlite::Error) -> Self {
        RowError::Sql(e)
    }
}

/// Decodes a row of [`AUDIT_COLUMNS`]. The outer error is SQLite's; the inner one names the
/// record and what does not decode.
fn read_row(row: &Row<'_>) -> rusqlite::Result<Result<StoredRow, (i64, String)>> {
    let seq: i64 = row.get(0)?;
    match decode_row(row, seq) {
        Ok(r) => Ok(Ok(r)),
        Err(RowError::Bad(reason)) => Ok(Err((seq, reason))),
        Err(RowError::Sql(e)) => Err(e),
    }
}

/// See [`read_row`].
fn decode_row(row: &Row<'_>, seq: i64) -> Result<StoredRow, RowError> {
    let bad = |what: &str| RowError::Bad(what.to_owned());
    let text = |i: usize, name: &str| -> Result<String, RowError> {
        match row.get_ref(i)? {
            ValueRef::Text(t) => std::str::from_utf8(t)
                .map(str::to_owned)
                .map_err(|_| bad(&format!("{name} is not UTF-8"))),
            _ => Err(bad(&format!("{name} is not text"))),
        }
    };
    let optional = |i: usize, name: &str| -> Result<Option<String>, RowError> {
        match row.get_ref(i)? {
            ValueRef::Null => Ok(None),
            _ => text(i, name).map(Some),
        }
    };
    let blob = |i: usize, name: &str| -> Result<Vec<u8>, RowError> {
        match row.get_ref(i)? {
            ValueRef::Blob(b) => Ok(b.to_vec()),
            _ => Err(bad(&format!("{name} is not a blob"))),
        }
    };
    let time_ms = match row.get_ref(1)? {
        ValueRef::Integer(t) => u64::try_from(t).map_err(|_| bad("time_ms is negative"))?,
        _ => return Err(bad("time_ms is not an integer")),
    };
    Ok(StoredRow {
        seq,
        entry: AuditEntry {
            time_ms,
            who: text(2, "who")?,
            purpose: optional(3, "purpose")?,
            operation: text(4, "operation")?,
            handle: optional(5, "handle")?,
            scope: optional(6, "scope")?,
            outcome: text(7, "outcome")?,
        },
        prev_hash: blob(8, "prev_hash")?,
        hash: blob(9, "hash")?,
    })
}

/// The hash-chained audit log. See the [module documentation](self).
#[derive(Debug)]
pub struct AuditLog {
    conn: Mutex<Connection>,
}

impl AuditLog {
    /// Opens the audit log in the keyhole database at `path` on a connection of its own,
    /// creating and migrating the file if needed (mode 0600, WAL, `synchronous=FULL`). The state
    /// store may have the same file open.
    ///
    /// # Errors
    ///
    /// [`AuditError::Open`] if the database cannot be created, opened or migrated.
    pub fn open(path: &Path) -> Result<AuditLog, AuditError> {
        Ok(AuditLog {
            conn: Mutex::new(open_database(path)?),
        })
    }

    /// Opens a private in-memory log, for tests.
    ///
    /// # Errors
    ///
    /// [`AuditError::Open`] if SQLite fails.
    pub fn open_in_memory() -> Result<AuditLog, AuditError> {
        Ok(AuditLog {
            conn: Mutex::new(open_database_in_memory()?),
        })
    }

    /// Appends one record and returns its `seq` once the transaction has committed (and, with
    /// `synchronous=FULL`, reached the disk).
    ///
    /// # Errors
    ///
    /// [`AuditError::TimeOutOfRange`] if `time_ms` exceeds `i64::MAX`; [`AuditError::Corrupt`]
    /// if the last record's hash is damaged; [`AuditError::Sqlite`]. Nothing is appended on error.
    pub fn append(&self, entry: &AuditEntry) -> Result<u64, AuditError> {
        let seqs = self.append_batch(std::slice::from_ref(entry))?;
        seqs.first().copied().ok_or_else(|| AuditError::Corrupt {
            seq: 0,
            reason: "the append returned no record".to_owned(),
        })
    }

    /// Appends `entries` in order, in one transaction (group commit), and returns their `seq`s
    /// once it has committed. The chain is the same as appending them one by one. An empty
    /// slice appends nothing.
    ///
    /// # Errors
    ///
    /// As [`append`](Self::append); on error none of the entries is appended.
    pub fn append_batch(&self, entries: &[AuditEntry]) -> Result<Vec<u64>, AuditError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(e) = entries.iter().find(|e| i64::try_from(e.time_ms).is_err()) {
            return Err(AuditError::TimeOutOfRange { time_ms: e.time_ms });
        }
        let mut conn = lock(&self.conn);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let seqs = append_in(&tx, entries)?;
        tx.commit()?;
        Ok(seqs)
    }

    /// Recomputes the chain from record 1 and reports the first record that breaks it, or how
    /// many records there are if none does. Reads one consistent snapshot; appends may continue
    /// meanwhile on other connections.
    ///
    /// # Errors
    ///
    /// [`AuditError::Sqlite`] if the log cannot be read. Damage is a [`VerifyReport::Broken`],
    /// not an error.
    pub fn verify(&self) -> Result<VerifyReport, AuditError> {
        let mut conn = lock(&self.conn);
        let tx = conn.transaction()?;
        let report = verify_in(&tx)?;
        tx.finish()?;
        Ok(report)
    }

    /// The last `n` records (fewer if the log is shorter), oldest first, for display.
    ///
    /// # Errors
    ///
    /// [`AuditError::Corrupt`] if a record does not decode; [`AuditError::Sqlite`].
    pub fn tail(&self, n: usize) -> Result<Vec<AuditRecord>, AuditError> {
        let conn = lock(&self.conn);
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {AUDIT_COLUMNS} FROM \
             (SELECT {AUDIT_COLUMNS} FROM audit ORDER BY seq DESC LIMIT ?1) ORDER BY seq"
        ))?;
        let limit = i64::try_from(n).unwrap_or(i64::MAX);
        let rows = stmt.query_map([limit], read_row)?;
        let mut out = Vec::new();
        for row in rows {
            let row = row?.map_err(|(seq, reason)| AuditError::Corrupt { seq, reason })?;
            let seq = u64::try_from(row.seq).map_err(|_| AuditError::Corrupt {
                seq: row.seq,
                reason: "seq is not positive".to_owned(),
            })?;
            out.push(AuditRecord {
                seq,
                entry: row.entry,
                prev_hash: hex::encode(row.prev_hash),
                hash: hex::encode(row.hash),
            });
        }
        Ok(out)
    }
}

/// Appends `entries` after the chain's current head, inside `tx` (which holds the write lock).
fn append_in(tx: &Transaction<'_>, entries: &[AuditEntry]) -> Result<Vec<u64>, AuditError> {
    // Cached: parsing this statement anew was a visible share of each commit's CPU.
    let head: Option<(i64, Vec<u8>)> = tx
        .prepare_cached("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")?
        .query_row([], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    let (mut seq, mut prev) = match head {
        None => (0u64, GENESIS_HASH),
        Some((seq, hash)) => {
            let corrupt = |reason: &str| AuditError::Corrupt {
                seq,
                reason: reason.to_owned(),
            };
            let seq = u64::try_from(seq).map_err(|_| corrupt("seq is not positive"))?;
            let hash = <[u8; 32]>::try_from(hash.as_slice())
                .map_err(|_| corrupt("its hash is not 32 bytes, so nothing can chain to it"))?;
            (seq, hash)
        }
    };
    let mut stmt = tx.prepare_cached(
        "INSERT INTO audit (seq, time_ms, who, purpose, operation, handle, scope, outcome, \
         prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?;
    let mut seqs = Vec::with_capacity(entries.len());
    for entry in entries {
        seq = seq
            .checked_add(1)
            .filter(|s| i64::try_from(*s).is_ok())
            .ok_or_else(|| AuditError::Corrupt {
                seq: i64::MAX,
                reason: "the log has no sequence numbers left".to_owned(),
            })?;
        let hash = record_hash(&prev, seq, &Fields::from(entry));
        stmt.execute(params![
            seq,
            entry.time_ms,
            entry.who,
            entry.purpose,
            entry.operation,
            entry.handle,
            entry.scope,
            entry.outcome,
            prev.as_slice(),
            hash.as_slice(),
        ])?;
        prev = hash;
        seqs.push(seq);
    }
    Ok(seqs)
}

/// Walks the chain inside `tx`; see [`AuditLog::verify`].
fn verify_in(tx: &Transaction<'_>) -> Result<VerifyReport, AuditError> {
    let mut stmt = tx.prepare(&format!("SELECT {AUDIT_COLUMNS} FROM audit ORDER BY seq"))?;
    let mut rows = stmt.query([])?;
    let mut expected_seq: u64 = 1;
    let mut prev = GENESIS_HASH;
    let mut records: u64 = 0;
    while let Some(row) = rows.next()? {
        let row = match read_row(row)? {
            Ok(row) => row,
            Err((seq, reason)) => return Ok(broken(seq, reason)),
        };
        if u64::try_from(row.seq).ok() != Some(expected_seq) {
            let reason = match u64::try_from(row.seq) {
                Ok(found) if found > expected_seq && expected_seq == 1 => format!(
                    "record 1 is missing (the log starts at record {found}): records were deleted"
                ),
                Ok(found) if found > expected_seq => format!(
                    "record {expected_seq} is missing (record {found} follows record {}): \
                     records were deleted",
                    expected_seq - 1
                ),
                _ => format!("seq {} where record {expected_seq} belongs", row.seq),
            };
            return Ok(broken(row.seq, reason));
        }
        let seq = expected_seq;
        if row.prev_hash.as_slice() != prev.as_slice() {
            let reason = if seq == 1 {
                "prev_hash of the first record is not all zeros: records before it were deleted \
                 or it was replaced"
                    .to_owned()
            } else {
                format!(
                    "prev_hash does not match the hash of record {}: records were reordered, \
                     deleted or replaced",
                    seq - 1
                )
            };
            return Ok(broken(row.seq, reason));
        }
        let hash = record_hash(&prev, seq, &Fields::from(&row.entry));
        if row.hash.as_slice() != hash.as_slice() {
            return Ok(broken(
                row.seq,
                "hash does not match the record's contents: a field was changed".to_owned(),
            ));
        }
        prev = hash;
        records += 1;
        expected_seq += 1;
    }
    Ok(VerifyReport::Intact { records })
}

/// A [`VerifyReport::Broken`] for stored `seq` (0 if it is not positive, which the table forbids).
fn broken(seq: i64, reason: String) -> VerifyReport {
    VerifyReport::Broken {
        seq: u64::try_from(seq).unwrap_or(0),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(i: u64) -> AuditEntry {
        AuditEntry {
            who: format!("uid:{}", 1000 + i % 3),
            purpose: i.is_multiple_of(2).then(|| format!("deploy #{i}")),
            operation: "resolve".to_owned(),
            handle: Some("kh_aaaaaaaaaaaaaaaaaaaaaaaaaa".to_owned()),
            scope: (!i.is_multiple_of(3)).then(|| "team-a".to_owned()),
            outcome: if i.is_multiple_of(5) { "denied" } else { "ok" }.to_owned(),
            time_ms: 1_700_000_000_000 + i,
        }
    }

    fn encoding(seq: u64, e: &AuditEntry) -> Vec<u8> {
        let mut out = Vec::new();
        encode(seq, &Fields::from(e), &mut |b| out.extend_from_slice(b));
        out
    }

    fn hashes(log: &AuditLog) -> Vec<(u64, String, String)> {
        log.tail(usize::MAX)
            .unwrap()
            .into_iter()
            .map(|r| (r.seq, r.prev_hash, r.hash))
            .collect()
    }

    #[test]
    fn canonical_encoding_is_pinned() {
        let e = AuditEntry {
            who: "uid:1000".to_owned(),
            purpose: None,
            operation: "resolve".to_owned(),
            handle: Some("kh_x".to_owned()),
            scope: Some(String::new()),
            outcome: "ok".to_owned(),
            time_ms: 0x0102,
        };
        let mut want = Vec::new();
        want.extend_from_slice(&7u64.to_be_bytes());
        want.extend_from_slice(&0x0102u64.to_be_bytes());
        want.extend_from_slice(&8u64.to_be_bytes());
        want.extend_from_slice(b"uid:1000");
        want.push(0);
        want.extend_from_slice(&7u64.to_be_bytes());
        want.extend_from_slice(b"resolve");
        want.push(1);
        want.extend_from_slice(&4u64.to_be_bytes());
        want.extend_from_slice(b"kh_x");
        want.push(1);
        want.extend_from_slice(&0u64.to_be_bytes());
        want.extend_from_slice(&2u64.to_be_bytes());
        want.extend_from_slice(b"ok");
        assert_eq!(encoding(7, &e), want);

        let mut hasher = Sha256::new();
        hasher.update(GENESIS_HASH);
        hasher.update(&want);
        let h: [u8; 32] = hasher.finalize().into();
        assert_eq!(record_hash(&GENESIS_HASH, 7, &Fields::from(&e)), h);
    }

    #[test]
    fn encoding_separates_fields() {
        let base = entry(1);
        let mut a = base.clone();
        a.who = "ab".to_owned();
        a.operation = "c".to_owned();
        let mut b = base.clone();
        b.who = "a".to_owned();
        b.operation = "bc".to_owned();
        assert_ne!(encoding(1, &a), encoding(1, &b));

        let mut none = base.clone();
        none.purpose = None;
        let mut empty = base.clone();
        empty.purpose = Some(String::new());
        assert_ne!(encoding(1, &none), encoding(1, &empty));

        let mut in_handle = base.clone();
        in_handle.handle = Some("x".to_owned());
        in_handle.scope = None;
        let mut in_scope = base;
        in_scope.handle = None;
        in_scope.scope = Some("x".to_owned());
        assert_ne!(encoding(1, &in_handle), encoding(1, &in_scope));
    }

    #[test]
    fn appends_chain_from_zero() {
        let log = AuditLog::open_in_memory().unwrap();
        assert_eq!(log.verify().unwrap(), VerifyReport::Intact { records: 0 });
        assert!(log.tail(10).unwrap().is_empty());
        for i in 1..=5 {
            assert_eq!(log.append(&entry(i)).unwrap(), i);
        }
        let records = log.tail(10).unwrap();
        assert_eq!(records.len(), 5);
        assert_eq!(records[0].prev_hash, "00".repeat(32));
        for pair in records.windows(2) {
            assert_eq!(pair[1].prev_hash, pair[0].hash);
        }
        for (i, r) in records.iter().enumerate() {
            assert_eq!(r.entry, entry(i as u64 + 1));
        }
        assert_eq!(log.verify().unwrap(), VerifyReport::Intact { records: 5 });

        let last2 = log.tail(2).unwrap();
        assert_eq!(last2.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![4, 5]);
        assert!(log.tail(0).unwrap().is_empty());
    }

    #[test]
    fn batch_chains_like_single_appends() {
        let one = AuditLog::open_in_memory().unwrap();
        let many = AuditLog::open_in_memory().unwrap();
        one.append(&entry(0)).unwrap();
        many.append(&entry(0)).unwrap();
        for i in 1..=20 {
            one.append(&entry(i)).unwrap();
        }
        let batch: Vec<_> = (1..=20).map(entry).collect();
        assert_eq!(
            many.append_batch(&batch).unwrap(),
            (2..=21).collect::<Vec<u64>>()
        );
        assert_eq!(hashes(&one), hashes(&many));
        assert_eq!(many.append_batch(&[]).unwrap(), Vec::<u64>::new());
        assert_eq!(many.verify().unwrap(), VerifyReport::Intact { records: 21 });
    }

    #[test]
    fn time_out_of_range_is_refused_whole() {
        let log = AuditLog::open_in_memory().unwrap();
        let mut bad = entry(2);
        bad.time_ms = u64::MAX;
        assert!(matches!(
            log.append(&bad),
            Err(AuditError::TimeOutOfRange { .. })
        ));
        assert!(matches!(
            log.append_batch(&[entry(1), bad]),
            Err(AuditError::TimeOutOfRange { .. })
        ));
        assert_eq!(log.verify().unwrap(), VerifyReport::Intact { records: 0 });
        let mut max = entry(1);
        max.time_ms = i64::MAX as u64;
        assert_eq!(log.append(&max).unwrap(), 1);
        assert_eq!(log.tail(1).unwrap()[0].entry.time_ms, i64::MAX as u64);
    }

    #[test]
    fn triggers_refuse_update_and_delete() {
        let log = AuditLog::open_in_memory().unwrap();
        log.append(&entry(1)).unwrap();
        let conn = lock(&log.conn);
        let update = conn.execute("UPDATE audit SET outcome = 'ok' WHERE seq = 1", []);
        assert!(update.unwrap_err().to_string().contains("append-only"));
        let delete = conn.execute("DELETE FROM audit", []);
        assert!(delete.unwrap_err().to_string().contains("append-only"));
    }

    #[test]
    fn damaged_head_refuses_appends() {
        let log = AuditLog::open_in_memory().unwrap();
        log.append(&entry(1)).unwrap();
        {
            let conn = lock(&log.conn);
            conn.execute_batch(
                "DROP TRIGGER audit_no_update; PRAGMA ignore_check_constraints = ON;
                 UPDATE audit SET hash = x'00' WHERE seq = 1;",
            )
            .unwrap();
        }
        assert!(matches!(
            log.append(&entry(2)),
            Err(AuditError::Corrupt { seq: 1, .. })
        ));
        assert!(matches!(
            log.verify().unwrap(),
            VerifyReport::Broken { seq: 1, .. }
        ));
    }

    #[test]
    fn each_field_is_covered_by_the_hash() {
        let cases: [&str; 8] = [
            "time_ms = time_ms + 1",
            "who = 'uid:0'",
            "purpose = NULL",
            "operation = 'delete'",
            "handle = NULL",
            "scope = 'team-b'",
            "outcome = 'ok!'",
            "purpose = 'x', scope = NULL",
        ];
        for set in cases {
            let log = AuditLog::open_in_memory().unwrap();
            for i in 1..=4 {
                log.append(&entry(i * 2)).unwrap();
            }
            {
                let conn = lock(&log.conn);
                conn.execute_batch("DROP TRIGGER audit_no_update").unwrap();
                conn.execute(&format!("UPDATE audit SET {set} WHERE seq = 3"), [])
                    .unwrap();
            }
            match log.verify().unwrap() {
                VerifyReport::Broken { seq: 3, reason } => {
                    assert!(reason.contains("field was changed"), "{set}: {reason}")
                }
                other => panic!("{set}: {other:?}"),
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn batches_match_singles(
            fields in proptest::collection::vec(
                ("[a-z:0-9]{0,12}", proptest::option::of(".{0,8}"), "[a-z]{1,8}",
                 proptest::option::of("[a-z0-9_]{0,29}"), proptest::option::of(".{0,6}"),
                 "[A-Za-z]{0,8}", 0u64..=i64::MAX as u64),
                0..12),
            split in 0usize..12,
        ) {
            let entries: Vec<AuditEntry> = fields
                .into_iter()
                .map(|(who, purpose, operation, handle, scope, outcome, time_ms)| AuditEntry {
                    who, purpose, operation, handle, scope, outcome, time_ms,
                })
                .collect();
            let one = AuditLog::open_in_memory().unwrap();
            let many = AuditLog::open_in_memory().unwrap();
            for e in &entries {
                one.append(e).unwrap();
            }
            let split = split.min(entries.len());
            many.append_batch(&entries[..split]).unwrap();
            many.append_batch(&entries[split..]).unwrap();
            prop_assert_eq!(hashes(&one), hashes(&many));
            let n = entries.len() as u64;
            prop_assert_eq!(many.verify().unwrap(), VerifyReport::Intact { records: n });
            let back: Vec<AuditEntry> =
                many.tail(usize::MAX).unwrap().into_iter().map(|r| r.entry).collect();
            prop_assert_eq!(back, entries);
        }
    }
}
