//! Public-API tests of the state store and the audit log on a real database file: file modes,
//! reopening and migrations, the no-values canary, tampering caught by `verify`, concurrency.

#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use keyhole_gateway::audit::{AuditEntry, AuditError, AuditLog, VerifyReport};
use keyhole_gateway::state::{
    HandleState, NewHandle, SCHEMA_VERSION, StateError, StateStore, VersionPin, is_handle_id,
};
use rusqlite::Connection;

fn db(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("keyhole.db")
}

fn new_handle(name: &str) -> NewHandle {
    NewHandle {
        provider: "file".to_owned(),
        name: name.to_owned(),
        version_pin: VersionPin::Current,
        scope: "team-a".to_owned(),
        labels: BTreeMap::from([("env".to_owned(), "prod".to_owned())]),
    }
}

fn entry(i: u64) -> AuditEntry {
    AuditEntry {
        who: format!("uid:{}", 1000 + i % 4),
        purpose: i.is_multiple_of(2).then(|| format!("job {i}")),
        operation: if i.is_multiple_of(3) {
            "describe"
        } else {
            "resolve"
        }
        .to_owned(),
        handle: Some("kh_aaaaaaaaaaaaaaaaaaaaaaaaaa".to_owned()),
        scope: Some("team-a".to_owned()),
        outcome: if i.is_multiple_of(7) { "denied" } else { "ok" }.to_owned(),
        time_ms: 1_700_000_000_000 + i,
    }
}

fn user_version(path: &Path) -> i64 {
    Connection::open(path)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap()
}

/// A second connection, as someone with write access to the file, with the append-only
/// triggers dropped (they are a guard against mistakes, not against that someone).
fn tamper(path: &Path) -> Connection {
    let conn = Connection::open(path).unwrap();
    conn.execute_batch("DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete;")
        .unwrap();
    conn
}

fn log_with(path: &Path, n: u64) -> AuditLog {
    let log = AuditLog::open(path).unwrap();
    for i in 1..=n {
        assert_eq!(log.append(&entry(i)).unwrap(), i);
    }
    assert_eq!(log.verify().unwrap(), VerifyReport::Intact { records: n });
    log
}

fn expect_broken(log: &AuditLog, seq: u64, reason_has: &str) {
    match log.verify().unwrap() {
        VerifyReport::Broken { seq: s, reason } => {
            assert_eq!(s, seq, "{reason}");
            assert!(reason.contains(reason_has), "{reason}");
        }
        other => panic!("expected record {seq} broken, got {other:?}"),
    }
}

#[cfg(unix)]
#[test]
fn database_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    let store = StateStore::open(&path).unwrap();
    store.insert(new_handle("a")).unwrap();
    let log = AuditLog::open(&path).unwrap();
    log.append(&entry(1)).unwrap();
    let mut seen = 0;
    for file in std::fs::read_dir(dir.path()).unwrap() {
        let file = file.unwrap();
        let mode = file.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{:?}", file.file_name());
        seen += 1;
    }
    assert_eq!(seen, 3, "the database, its -wal and its -shm");
}

#[cfg(unix)]
#[test]
fn an_existing_loose_file_is_tightened() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    std::fs::write(&path, b"").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    StateStore::open(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn reopening_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    let h = {
        let store = StateStore::open(&path).unwrap();
        let mut new = new_handle("db-password");
        new.version_pin = VersionPin::Fixed("v7".to_owned());
        store.insert(new).unwrap()
    };
    {
        let log = log_with(&path, 3);
        drop(log);
    }
    assert_eq!(user_version(&path), i64::from(SCHEMA_VERSION));
    for _ in 0..3 {
        let store = StateStore::open(&path).unwrap();
        assert_eq!(store.get(&h.id).unwrap(), Some(h.clone()));
        assert_eq!(store.list().unwrap().len(), 1);
        let log = AuditLog::open(&path).unwrap();
        assert_eq!(log.verify().unwrap(), VerifyReport::Intact { records: 3 });
        assert_eq!(user_version(&path), i64::from(SCHEMA_VERSION));
    }
    let log = AuditLog::open(&path).unwrap();
    assert_eq!(log.append(&entry(4)).unwrap(), 4);
    assert_eq!(log.verify().unwrap(), VerifyReport::Intact { records: 4 });
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    StateStore::open(&path).unwrap();
    let newer = i64::from(SCHEMA_VERSION) + 1;
    Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", newer)
        .unwrap();

    let err = StateStore::open(&path).unwrap_err();
    match &err {
        StateError::SchemaTooNew {
            found, supported, ..
        } => {
            assert_eq!(*found, newer);
            assert_eq!(*supported, SCHEMA_VERSION);
        }
        other => panic!("{other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains("newer"), "{message}");
    assert!(message.contains("upgrade keyhole"), "{message}");

    assert!(matches!(
        AuditLog::open(&path),
        Err(AuditError::Open(StateError::SchemaTooNew { .. }))
    ));
    assert_eq!(user_version(&path), newer, "a refused open changes nothing");
}

#[test]
fn handles_lifecycle_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    let store = StateStore::open(&path).unwrap();
    let a = store.insert(new_handle("a")).unwrap();
    let b = store.insert(new_handle("b")).unwrap();
    assert!(is_handle_id(&a.id) && is_handle_id(&b.id));
    assert_ne!(a.id, b.id);
    assert!(store.set_state(&a.id, HandleState::Revoked).unwrap());
    drop(store);

    let store = StateStore::open(&path).unwrap();
    assert_eq!(
        store.get(&a.id).unwrap().unwrap().state,
        HandleState::Revoked
    );
    assert_eq!(
        store.get(&b.id).unwrap().unwrap().state,
        HandleState::Active
    );
    assert_eq!(store.find("file", "a").unwrap().len(), 1);
    let ids: Vec<_> = store.list().unwrap().into_iter().map(|h| h.id).collect();
    assert!(ids.contains(&a.id) && ids.contains(&b.id));
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Every file in `dir`, concatenated per file.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|f| {
            let f = f.unwrap();
            (
                f.file_name().to_string_lossy().into_owned(),
                std::fs::read(f.path()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn no_value_reaches_the_database_files() {
    let mut random = [0u8; 24];
    getrandom::fill(&mut random).unwrap();
    let canary = hex::encode(random);
    let name = "canary-secret-name-7f3a";

    let mut forms: Vec<(&str, Vec<u8>)> = vec![
        ("raw", canary.as_bytes().to_vec()),
        ("hex", hex::encode(canary.as_bytes()).into_bytes()),
        ("HEX", hex::encode_upper(canary.as_bytes()).into_bytes()),
        ("the random bytes", random.to_vec()),
        (
            "hex of the random bytes, upper",
            hex::encode_upper(random).into_bytes(),
        ),
    ];
    for (label, engine) in [
        ("base64", base64::engine::general_purpose::STANDARD),
        (
            "base64url",
            base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ),
    ] {
        forms.push((label, engine.encode(canary.as_bytes()).into_bytes()));
        forms.push((label, engine.encode(random).into_bytes()));
    }

    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    let scan = |when: &str| {
        let files = files(dir.path());
        assert!(!files.is_empty());
        // The scan does see what is stored: the name is there.
        assert!(
            files
                .iter()
                .any(|(_, bytes)| contains(bytes, name.as_bytes())),
            "{when}: the scan found not even the name"
        );
        for (file, bytes) in &files {
            for (label, form) in &forms {
                assert!(
                    !contains(bytes, form),
                    "{when}: the canary's {label} form is in {file}"
                );
            }
        }
    };
    {
        let store = StateStore::open(&path).unwrap();
        let log = AuditLog::open(&path).unwrap();
        for pin in [
            VersionPin::Current,
            VersionPin::Fixed("1".to_owned()),
            VersionPin::Current,
        ] {
            let mut new = new_handle(name);
            new.version_pin = pin;
            let h = store.insert(new).unwrap();
            log.append(&AuditEntry {
                who: "uid:1000".to_owned(),
                purpose: Some("store".to_owned()),
                operation: "put".to_owned(),
                handle: Some(h.id.clone()),
                scope: Some(h.scope.clone()),
                outcome: "ok".to_owned(),
                time_ms: 1,
            })
            .unwrap();
            store.set_state(&h.id, HandleState::Revoked).unwrap();
        }
        assert_eq!(store.find("file", name).unwrap().len(), 3);
        scan("while open");
    }
    scan("after close");
}

#[test]
fn verify_names_a_changed_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    let log = log_with(&path, 6);
    tamper(&path)
        .execute("UPDATE audit SET outcome = 'denied' WHERE seq = 4", [])
        .unwrap();
    expect_broken(&log, 4, "field was changed");
}

/// The chain hash as the audit module documents it, written independently of it.
fn documented_hash(prev: &[u8], seq: u64, e: &AuditEntry) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    fn string(h: &mut Sha256, s: &str) {
        h.update((s.len() as u64).to_be_bytes());
        h.update(s.as_bytes());
    }
    fn optional(h: &mut Sha256, s: &Option<String>) {
        match s {
            None => h.update([0]),
            Some(s) => {
                h.update([1]);
                string(h, s);
            }
        }
    }
    let mut h = Sha256::new();
    h.update(prev);
    h.update(seq.to_be_bytes());
    h.update(e.time_ms.to_be_bytes());
    string(&mut h, &e.who);
    optional(&mut h, &e.purpose);
    string(&mut h, &e.operation);
    optional(&mut h, &e.handle);
    optional(&mut h, &e.scope);
    string(&mut h, &e.outcome);
    h.finalize().to_vec()
}

#[test]
fn stored_hashes_follow_the_documented_encoding() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_with(&db(&dir), 5);
    let mut prev = vec![0u8; 32];
    for r in log.tail(5).unwrap() {
        assert_eq!(r.prev_hash, hex::encode(&prev));
        let hash = documented_hash(&prev, r.seq, &r.entry);
        assert_eq!(r.hash, hex::encode(&hash), "record {}", r.seq);
        prev = hash;
    }
}

#[test]
fn a_forged_record_with_its_hash_recomputed_breaks_the_next_link() {
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    let log = log_with(&path, 5);
    let mut forged = log.tail(5).unwrap().remove(1);
    assert_eq!(forged.seq, 2);
    forged.entry.outcome = "ok".to_owned();
    forged.entry.who = "uid:0".to_owned();
    let prev = hex::decode(&forged.prev_hash).unwrap();
    let hash = documented_hash(&prev, 2, &forged.entry);
    tamper(&path)
        .execute(
            "UPDATE audit SET who = ?1, outcome = ?2, hash = ?3 WHERE seq = 2",
            rusqlite::params![forged.entry.who, forged.entry.outcome, hash],
        )
        .unwrap();
    expect_broken(&log, 3, "prev_hash does not match the hash of record 2");
}

#[test]
fn verify_names_a_deleted_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    let log = log_with(&path, 6);
    tamper(&path)
        .execute("DELETE FROM audit WHERE seq = 3", [])
        .unwrap();
    expect_broken(&log, 4, "record 3 is missing");
}

#[test]
fn verify_names_a_deleted_first_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    let log = log_with(&path, 3);
    tamper(&path)
        .execute("DELETE FROM audit WHERE seq = 1", [])
        .unwrap();
    expect_broken(&log, 2, "record 1 is missing");
}

#[test]
fn verify_names_a_deletion_hidden_by_renumbering() {
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    let log = log_with(&path, 6);
    tamper(&path)
        .execute_batch(
            "DELETE FROM audit WHERE seq = 3;
             UPDATE audit SET seq = seq + 100 WHERE seq > 3;
             UPDATE audit SET seq = seq - 101 WHERE seq > 100;",
        )
        .unwrap();
    expect_broken(&log, 3, "prev_hash does not match the hash of record 2");
}

#[test]
fn verify_names_reordered_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    let log = log_with(&path, 6);
    // Swap the contents (everything but seq) of records 3 and 5.
    tamper(&path)
        .execute_batch(
            "UPDATE audit SET seq = seq + 100 WHERE seq IN (3, 5);
             UPDATE audit SET seq = 5 WHERE seq = 103;
             UPDATE audit SET seq = 3 WHERE seq = 105;",
        )
        .unwrap();
    let conn = Connection::open(&path).unwrap();
    let who: String = conn
        .query_row("SELECT who FROM audit WHERE seq = 3", [], |r| r.get(0))
        .unwrap();
    assert_eq!(who, entry(5).who, "the rows were swapped");
    expect_broken(&log, 3, "prev_hash does not match the hash of record 2");
}

#[test]
fn verify_names_swapped_fields_with_hashes_kept() {
    // Swap only the recorded fields of two records, leaving the hash columns in place.
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    let log = log_with(&path, 4);
    let conn = tamper(&path);
    conn.execute_batch(
        "CREATE TEMP TABLE t AS SELECT * FROM audit WHERE seq IN (2, 3);
         UPDATE audit SET (time_ms, who, purpose, operation, handle, scope, outcome) =
             (SELECT time_ms, who, purpose, operation, handle, scope, outcome FROM t
              WHERE t.seq = 5 - audit.seq)
           WHERE seq IN (2, 3);",
    )
    .unwrap();
    expect_broken(&log, 2, "field was changed");
}

#[test]
fn an_empty_log_is_intact() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(&db(&dir)).unwrap();
    assert_eq!(log.verify().unwrap(), VerifyReport::Intact { records: 0 });
    assert!(log.tail(5).unwrap().is_empty());
}

#[test]
fn appends_are_append_only_to_other_connections() {
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    let _log = log_with(&path, 2);
    let conn = Connection::open(&path).unwrap();
    assert!(conn.execute("UPDATE audit SET who = 'x'", []).is_err());
    assert!(conn.execute("DELETE FROM audit", []).is_err());
}

#[test]
fn appends_are_durable_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    let log = AuditLog::open(&path).unwrap();
    let seqs = log
        .append_batch(&(1..=10).map(entry).collect::<Vec<_>>())
        .unwrap();
    assert_eq!(seqs, (1..=10).collect::<Vec<u64>>());
    // Another connection sees the committed records while the first is still open.
    let other = AuditLog::open(&path).unwrap();
    assert_eq!(
        other.verify().unwrap(),
        VerifyReport::Intact { records: 10 }
    );
    let tail = other.tail(3).unwrap();
    assert_eq!(tail.iter().map(|r| r.seq).collect::<Vec<_>>(), [8, 9, 10]);
    assert_eq!(tail[2].entry, entry(10));
    assert_eq!(tail[1].hash, tail[2].prev_hash);
    assert_eq!(tail[2].hash.len(), 64);
}

#[test]
fn many_threads_keep_one_chain() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(AuditLog::open(&db(&dir)).unwrap());
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                (0..50u64)
                    .map(|i| log.append(&entry(t * 1000 + i)).unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut seqs: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=400).collect::<Vec<u64>>());
    assert_eq!(log.verify().unwrap(), VerifyReport::Intact { records: 400 });
}

#[test]
fn many_connections_keep_one_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = db(&dir);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let path = path.clone();
            std::thread::spawn(move || {
                let log = AuditLog::open(&path).unwrap();
                for i in 0..25u64 {
                    if i.is_multiple_of(5) {
                        let batch: Vec<_> = (0..3).map(|j| entry(t * 1000 + i * 10 + j)).collect();
                        log.append_batch(&batch).unwrap();
                    } else {
                        log.append(&entry(t * 1000 + i)).unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let log = AuditLog::open(&path).unwrap();
    assert_eq!(
        log.verify().unwrap(),
        VerifyReport::Intact {
            records: 4 * (20 + 5 * 3)
        }
    );
}
