//! The handle store: handle → provider, name, version pin, scope, labels, state and timestamps,
//! in SQLite. It never holds a value: no type or method here has a parameter that could carry one.
//!
//! A handle id is `kh_` followed by 26 characters of lowercase, unpadded RFC 4648 base32 that
//! encode 16 bytes from the operating system's random source. It is unguessable and carries no
//! name; [`is_handle_id`] checks the shape (canonical spelling included) before anything is
//! looked up.
//!
//! The database file is shared with the [audit log](crate::audit): both open it through
//! one private opener, which creates the file 0600, turns on WAL, `synchronous=FULL`, foreign keys
//! and a 5 s busy timeout, and applies the schema migrations (keyed on `PRAGMA user_version`).
//! Every method takes `&self`, holds an internal mutex around one connection and blocks; async
//! callers use `spawn_blocking`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

/// How long a connection waits for another connection's write lock before giving up.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The prefix of every handle id.
pub const HANDLE_PREFIX: &str = "kh_";

/// The RFC 4648 base32 alphabet, lowercase.
const BASE32_ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// Random bytes in a handle id (128 bits).
const HANDLE_RANDOM_BYTES: usize = 16;

/// Base32 characters that encode [`HANDLE_RANDOM_BYTES`] without padding: ceil(128 / 5).
const HANDLE_BASE32_CHARS: usize = 26;

/// The handles table (migration 1).
const HANDLES_SCHEMA: &str = "
CREATE TABLE handles (
    id            TEXT PRIMARY KEY NOT NULL CHECK (length(id) = 29 AND substr(id, 1, 3) = 'kh_'),
    provider      TEXT NOT NULL,
    name          TEXT NOT NULL,
    version_pin   TEXT,
    scope         TEXT NOT NULL,
    labels        TEXT NOT NULL CHECK (json_valid(labels)),
    state         TEXT NOT NULL CHECK (state IN ('active', 'revoked')),
    created_at_ms INTEGER NOT NULL CHECK (created_at_ms >= 0),
    updated_at_ms INTEGER NOT NULL CHECK (updated_at_ms >= created_at_ms)
) STRICT;
CREATE INDEX handles_by_provider_name ON handles (provider, name);
CREATE INDEX handles_by_created ON handles (created_at_ms, id);
";

/// The schema migrations, applied in order; `PRAGMA user_version` counts those applied.
///
/// Append only: never edit or reorder an entry that has shipped.
const MIGRATIONS: &[&str] = &[HANDLES_SCHEMA, crate::audit::AUDIT_SCHEMA];

/// The schema version this build writes and understands.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// A state-store failure. Messages name handles, columns and paths, never values.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The database file could not be created or its permissions could not be set.
    #[error("cannot create the state database {path}: {source}")]
    Io {
        /// The database file.
        path: String,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// SQLite failed.
    #[error("state database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database was written by a newer keyhole.
    #[error(
        "the state database {path} has schema version {found}, newer than version {supported} \
         that this keyhole understands; upgrade keyhole or point it at another state file"
    )]
    SchemaTooNew {
        /// The database file.
        path: String,
        /// The database's `user_version`.
        found: i64,
        /// [`SCHEMA_VERSION`].
        supported: u32,
    },
    /// SQLite refused to put the database in WAL mode (some network file systems cannot).
    #[error(
        "the state database {path} cannot use WAL (journal mode is {mode:?}); put it on a local file system"
    )]
    NotWal {
        /// The database file.
        path: String,
        /// The journal mode SQLite reported instead.
        mode: String,
    },
    /// The operating system's random source failed.
    #[error("the operating system's random source failed: {0}")]
    Random(getrandom::Error),
    /// A field of a [`NewHandle`] is not acceptable.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A stored row does not decode (the database was edited or damaged).
    #[error("handle {id} has a corrupt {column} column in the state database: {reason}")]
    Corrupt {
        /// The handle id as stored.
        id: String,
        /// The column.
        column: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// Which version of the secret a handle resolves to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum VersionPin {
    /// Whatever version is current when the handle is resolved.
    Current,
    /// Exactly this version, as the provider names it.
    Fixed(String),
}

/// Whether a handle may still be resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandleState {
    /// The handle is live.
    Active,
    /// The handle was revoked.
    Revoked,
}

impl HandleState {
    /// The column text.
    fn as_str(self) -> &'static str {
        match self {
            HandleState::Active => "active",
            HandleState::Revoked => "revoked",
        }
    }

    /// Parses the column text.
    fn parse(s: &str) -> Option<HandleState> {
        match s {
            "active" => Some(HandleState::Active),
            "revoked" => Some(HandleState::Revoked),
            _ => None,
        }
    }
}

/// A stored handle: where its secret lives and how it may be used, never the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handle {
    /// The opaque id (`kh_…`).
    pub id: String,
    /// The provider that holds the secret.
    pub provider: String,
    /// The secret's name at that provider.
    pub name: String,
    /// Which version the handle resolves to.
    pub version_pin: VersionPin,
    /// The scope policy matches on.
    pub scope: String,
    /// Labels policy matches on.
    pub labels: BTreeMap<String, String>,
    /// Active or revoked.
    pub state: HandleState,
    /// When the handle was created, in milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// When the handle last changed, in milliseconds since the Unix epoch.
    pub updated_at_ms: u64,
}

/// What a caller supplies to create a handle; the store picks the id, state and timestamps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewHandle {
    /// The provider that holds the secret.
    pub provider: String,
    /// The secret's name at that provider.
    pub name: String,
    /// Which version the handle resolves to.
    pub version_pin: VersionPin,
    /// The scope policy matches on.
    pub scope: String,
    /// Labels policy matches on.
    pub labels: BTreeMap<String, String>,
}

/// Makes a fresh handle id: `kh_` and 26 lowercase base32 characters of 16 random bytes.
///
/// # Errors
///
/// [`StateError::Random`] if the operating system's random source fails.
pub fn new_handle_id() -> Result<String, StateError> {
    let mut bytes = [0u8; HANDLE_RANDOM_BYTES];
    getrandom::fill(&mut bytes).map_err(StateError::Random)?;
    let mut id = String::with_capacity(HANDLE_PREFIX.len() + HANDLE_BASE32_CHARS);
    id.push_str(HANDLE_PREFIX);
    base32_lower(&bytes, &mut id);
    Ok(id)
}

/// Whether `s` has the shape of a handle id made by [`new_handle_id`]: the prefix, 26 characters
/// of the lowercase base32 alphabet, and zero padding bits in the last one (so every id has exactly
/// one spelling). Says nothing about whether the handle exists.
pub fn is_handle_id(s: &str) -> bool {
    let Some(body) = s.strip_prefix(HANDLE_PREFIX) else {
        return false;
    };
    let body = body.as_bytes();
    if body.len() != HANDLE_BASE32_CHARS {
        return false;
    }
    let mut last = 0u8;
    for &c in body {
        match BASE32_ALPHABET.iter().position(|&a| a == c) {
            Some(v) => last = v as u8,
            None => return false,
        }
    }
    // 26 characters carry 130 bits; the last character's low 2 bits are padding.
    last & 0b11 == 0
}

/// Appends the unpadded lowercase base32 encoding of `bytes` to `out`.
fn base32_lower(bytes: &[u8], out: &mut String) {
    let mut buffer: u16 = 0;
    let mut bits: u32 = 0;
    for &b in bytes {
        buffer = (buffer << 8) | u16::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(
                BASE32_ALPHABET[usize::from((buffer >> bits) & 0x1f)],
            ));
        }
        buffer &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(char::from(
            BASE32_ALPHABET[usize::from((buffer << (5 - bits)) & 0x1f)],
        ));
    }
}

/// Milliseconds since the Unix epoch now (0 if the clock is before 1970).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Milliseconds as SQLite stores them (saturating at `i64::MAX`, which no clock reaches).
fn ms_to_sql(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// Opens (creating if needed) the keyhole database at `path`, shared by the state store and the
/// audit log. The file is created 0600 on Unix (an existing file is tightened to 0600; SQLite
/// gives its `-wal` and `-shm` files the same mode); the parent directory is the caller's.
/// The connection uses WAL, `synchronous=FULL`, foreign keys and a [`BUSY_TIMEOUT`], and the
/// schema is migrated to [`SCHEMA_VERSION`].
pub(crate) fn open_database(path: &Path) -> Result<Connection, StateError> {
    // Connections racing to open a new database can get SQLITE_BUSY from the journal-mode switch
    // without SQLite calling the busy handler; retry the whole open within the same deadline.
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        match open_database_once(path) {
            Err(StateError::Sqlite(rusqlite::Error::SqliteFailure(e, _)))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

fn open_database_once(path: &Path) -> Result<Connection, StateError> {
    let shown = path.display().to_string();
    create_private_file(path).map_err(|source| StateError::Io {
        path: shown.clone(),
        source,
    })?;
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StateError::NotWal { path: shown, mode });
    }
    configure_and_migrate(conn, &shown)
}

/// Opens a fresh in-memory database with the same settings and schema (journal mode aside).
pub(crate) fn open_database_in_memory() -> Result<Connection, StateError> {
    let conn = Connection::open_in_memory()?;
    configure_and_migrate(conn, ":memory:")
}

/// The per-connection settings other than the journal mode, then the migrations.
fn configure_and_migrate(mut conn: Connection, shown: &str) -> Result<Connection, StateError> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    migrate(&mut conn, shown)?;
    Ok(conn)
}

/// Applies the migrations the database lacks, all in one immediate transaction, and refuses a
/// database from a newer keyhole.
fn migrate(conn: &mut Connection, shown: &str) -> Result<(), StateError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let found: i64 = tx.pragma_query_value(None, "user_version", |row| row.get(0))?;
    let applied = usize::try_from(found).unwrap_or(usize::MAX);
    if found < 0 || applied > MIGRATIONS.len() {
        return Err(StateError::SchemaTooNew {
            path: shown.to_owned(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    if applied == MIGRATIONS.len() {
        return Ok(());
    }
    for migration in &MIGRATIONS[applied..] {
        tx.execute_batch(migration)?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    Ok(())
}

/// Creates `path` with mode 0600 if it does not exist, and tightens it to 0600 if it does.
#[cfg(unix)]
fn create_private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    let mode = file.metadata()?.permissions().mode() & 0o777;
    if mode != 0o600 {
        tracing::warn!(path = %path.display(), mode = format_args!("{mode:o}"), "tightening the state database to 0600");
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Creates `path` if it does not exist (permissions are the directory's on this platform).
#[cfg(not(unix))]
fn create_private_file(path: &Path) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map(drop)
}

/// Locks a connection (or the handle cache). A panic while a connection was held cannot have
/// left a transaction open (rusqlite rolls back on drop), and the cache is updated in single
/// calls that cannot panic half-way, so a poisoned lock is still safe to use.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The handle store. See the [module documentation](self).
#[derive(Debug)]
pub struct StateStore {
    conn: Mutex<Connection>,
    /// Handles read or written by this process, so a resolve does not query SQLite (or wait for
    /// the blocking pool). Exact, not a hint: every change to a row goes through this store,
    /// which updates the entry in the same call, under the connection's lock. Bounded by
    /// [`MAX_CACHED_HANDLES`]; when full it is emptied and refills from the database.
    cache: Mutex<std::collections::HashMap<String, Handle>>,
}

/// The most handles kept in memory.
pub const MAX_CACHED_HANDLES: usize = 100_000;

/// The columns every query reads, in the order [`row_to_handle`] expects.
const HANDLE_COLUMNS: &str =
    "id, provider, name, version_pin, scope, labels, state, created_at_ms, updated_at_ms";

impl StateStore {
    /// Opens, creating and migrating if needed, the database at `path`: the file is created 0600
    /// on Unix (an existing one is tightened to 0600; SQLite gives `-wal` and `-shm` the same
    /// mode), with WAL, `synchronous=FULL`, foreign keys and a [`BUSY_TIMEOUT`]. The parent
    /// directory is the caller's.
    ///
    /// # Errors
    ///
    /// [`StateError::Io`] if the file cannot be created, [`StateError::SchemaTooNew`] if a newer
    /// keyhole wrote it, [`StateError::NotWal`] or [`StateError::Sqlite`] otherwise.
    pub fn open(path: &Path) -> Result<StateStore, StateError> {
        Ok(StateStore {
            conn: Mutex::new(open_database(path)?),
            cache: Mutex::default(),
        })
    }

    /// Opens a private in-memory store with the same schema, for tests.
    ///
    /// # Errors
    ///
    /// [`StateError::Sqlite`] if SQLite fails.
    pub fn open_in_memory() -> Result<StateStore, StateError> {
        Ok(StateStore {
            conn: Mutex::new(open_database_in_memory()?),
            cache: Mutex::default(),
        })
    }

    /// Stores a new active handle with a fresh id and returns it.
    ///
    /// # Errors
    ///
    /// [`StateError::Invalid`] if the provider or name is empty or a fixed version pin is empty;
    /// [`StateError::Random`] or [`StateError::Sqlite`] otherwise.
    pub fn insert(&self, new: NewHandle) -> Result<Handle, StateError> {
        if new.provider.is_empty() {
            return Err(invalid("provider", "must not be empty"));
        }
        if new.name.is_empty() {
            return Err(invalid("name", "must not be empty"));
        }
        if matches!(&new.version_pin, VersionPin::Fixed(v) if v.is_empty()) {
            return Err(invalid("version pin", "a fixed version must not be empty"));
        }
        let labels = serde_json::to_string(&new.labels)
            .map_err(|_| invalid("labels", "cannot be encoded as JSON"))?;
        let id = new_handle_id()?;
        let now = now_ms();
        let pin = match &new.version_pin {
            VersionPin::Current => None,
            VersionPin::Fixed(v) => Some(v.as_str()),
        };
        let state = HandleState::Active;
        let mut conn = lock(&self.conn);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO handles (id, provider, name, version_pin, scope, labels, state, \
             created_at_ms, updated_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)",
            params![
                id,
                new.provider,
                new.name,
                pin,
                new.scope,
                labels,
                state.as_str(),
                ms_to_sql(now)
            ],
        )?;
        tx.commit()?;
        let handle = Handle {
            id,
            provider: new.provider,
            name: new.name,
            version_pin: new.version_pin,
            scope: new.scope,
            labels: new.labels,
            state,
            created_at_ms: now,
            updated_at_ms: now,
        };
        self.remember(handle.clone());
        Ok(handle)
    }

    /// The handle `id` if this process has it in memory; `None` says nothing about the
    /// database (ask [`StateStore::get`]).
    pub fn cached(&self, id: &str) -> Option<Handle> {
        lock(&self.cache).get(id).cloned()
    }

    fn remember(&self, handle: Handle) {
        let mut cache = lock(&self.cache);
        if cache.len() >= MAX_CACHED_HANDLES {
            cache.clear();
        }
        cache.insert(handle.id.clone(), handle);
    }

    /// The handle `id`, or `None` if there is none (or `id` is not shaped like a handle id,
    /// which is rejected without a query).
    ///
    /// # Errors
    ///
    /// [`StateError::Corrupt`] if the stored row does not decode; [`StateError::Sqlite`].
    pub fn get(&self, id: &str) -> Result<Option<Handle>, StateError> {
        if !is_handle_id(id) {
            return Ok(None);
        }
        if let Some(handle) = self.cached(id) {
            return Ok(Some(handle));
        }
        let conn = lock(&self.conn);
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {HANDLE_COLUMNS} FROM handles WHERE id = ?1"
        ))?;
        let handle = stmt
            .query_row([id], row_to_handle)
            .optional()?
            .transpose()?;
        if let Some(h) = &handle {
            // Under the connection's lock, so no set_state can slip between read and insert.
            self.remember(h.clone());
        }
        Ok(handle)
    }

    /// Every handle, oldest first (by creation time, then id).
    ///
    /// # Errors
    ///
    /// [`StateError::Corrupt`] if a stored row does not decode; [`StateError::Sqlite`].
    pub fn list(&self) -> Result<Vec<Handle>, StateError> {
        let conn = lock(&self.conn);
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {HANDLE_COLUMNS} FROM handles ORDER BY created_at_ms, id"
        ))?;
        let rows = stmt.query_map([], row_to_handle)?;
        rows.map(|r| r?).collect()
    }

    /// The handles for secret `name` at `provider`, oldest first.
    ///
    /// # Errors
    ///
    /// [`StateError::Corrupt`] if a stored row does not decode; [`StateError::Sqlite`].
    pub fn find(&self, provider: &str, name: &str) -> Result<Vec<Handle>, StateError> {
        let conn = lock(&self.conn);
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {HANDLE_COLUMNS} FROM handles WHERE provider = ?1 AND name = ?2 \
             ORDER BY created_at_ms, id"
        ))?;
        let rows = stmt.query_map([provider, name], row_to_handle)?;
        rows.map(|r| r?).collect()
    }

    /// Sets the state of handle `id` and bumps its `updated_at_ms` (never backwards). Returns
    /// `false` if there is no such handle. Any transition is allowed: which ones make sense is
    /// the caller's policy.
    ///
    /// # Errors
    ///
    /// [`StateError::Sqlite`].
    pub fn set_state(&self, id: &str, state: HandleState) -> Result<bool, StateError> {
        if !is_handle_id(id) {
            return Ok(false);
        }
        let mut conn = lock(&self.conn);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let changed = tx.execute(
            "UPDATE handles SET state = ?1, updated_at_ms = max(?2, updated_at_ms) WHERE id = ?3",
            params![state.as_str(), ms_to_sql(now_ms()), id],
        )?;
        tx.commit()?;
        // The row's timestamp is the database's max(); let the next get() read it back.
        lock(&self.cache).remove(id);
        Ok(changed == 1)
    }
}

/// Shorthand for [`StateError::Invalid`].
fn invalid(field: &'static str, reason: &'static str) -> StateError {
    StateError::Invalid { field, reason }
}

/// Decodes a row of [`HANDLE_COLUMNS`]. The outer error is SQLite's (a column of the wrong
/// type); the inner one is ours (a column that does not decode).
fn row_to_handle(row: &Row<'_>) -> rusqlite::Result<Result<Handle, StateError>> {
    let id: String = row.get(0)?;
    let provider: String = row.get(1)?;
    let name: String = row.get(2)?;
    let pin: Option<String> = row.get(3)?;
    let scope: String = row.get(4)?;
    let labels: String = row.get(5)?;
    let state: String = row.get(6)?;
    let created: i64 = row.get(7)?;
    let updated: i64 = row.get(8)?;
    let corrupt = |column: &'static str, reason: String| StateError::Corrupt {
        id: id.clone(),
        column,
        reason,
    };
    let labels = match serde_json::from_str::<BTreeMap<String, String>>(&labels) {
        Ok(l) => l,
        Err(e) => return Ok(Err(corrupt("labels", e.to_string()))),
    };
    let Some(state) = HandleState::parse(&state) else {
        return Ok(Err(corrupt("state", format!("unknown state {state:?}"))));
    };
    let (Ok(created_at_ms), Ok(updated_at_ms)) = (u64::try_from(created), u64::try_from(updated))
    else {
        return Ok(Err(corrupt("timestamps", "negative time".to_owned())));
    };
    let version_pin = match pin {
        None => VersionPin::Current,
        Some(v) => VersionPin::Fixed(v),
    };
    Ok(Ok(Handle {
        id,
        provider,
        name,
        version_pin,
        scope,
        labels,
        state,
        created_at_ms,
        updated_at_ms,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_handle(name: &str) -> NewHandle {
        NewHandle {
            provider: "file".to_owned(),
            name: name.to_owned(),
            version_pin: VersionPin::Current,
            scope: "team-a".to_owned(),
            labels: BTreeMap::from([("env".to_owned(), "prod".to_owned())]),
        }
    }

    #[test]
    fn base32_matches_rfc4648_vectors() {
        // RFC 4648 section 10, lowercased and unpadded.
        for (input, want) in [
            ("", ""),
            ("f", "my"),
            ("fo", "mzxq"),
            ("foo", "mzxw6"),
            ("foob", "mzxw6yq"),
            ("fooba", "mzxw6ytb"),
            ("foobar", "mzxw6ytboi"),
        ] {
            let mut out = String::new();
            base32_lower(input.as_bytes(), &mut out);
            assert_eq!(out, want, "base32 of {input:?}");
        }
        let mut out = String::new();
        base32_lower(&[0xff; 16], &mut out);
        assert_eq!(out, "77777777777777777777777774");
        let mut out = String::new();
        base32_lower(&[0; 16], &mut out);
        assert_eq!(out, "a".repeat(26));
    }

    #[test]
    fn handle_ids_are_well_formed_and_distinct() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let id = new_handle_id().unwrap();
            assert_eq!(id.len(), 29);
            assert!(id.starts_with("kh_"));
            assert!(is_handle_id(&id), "{id}");
            assert!(seen.insert(id));
        }
    }

    #[test]
    fn junk_is_not_a_handle_id() {
        let good = new_handle_id().unwrap();
        assert!(is_handle_id(&good));
        for junk in [
            "",
            "kh_",
            "kh_aaaaaaaaaaaaaaaaaaaaaaaaa",   // 25
            "kh_aaaaaaaaaaaaaaaaaaaaaaaaaaa", // 27
            "KH_aaaaaaaaaaaaaaaaaaaaaaaaaa",
            "kh_AAAAAAAAAAAAAAAAAAAAAAAAAA",
            "kh_aaaaaaaaaaaaaaaaaaaaaaaaa1", // 1 is not in the alphabet
            "kh_aaaaaaaaaaaaaaaaaaaaaaaaab", // nonzero padding bits
            "xx_aaaaaaaaaaaaaaaaaaaaaaaaaa",
            "kh_aaaaaaaaaaaaaaaaaaaaaaaaa\u{e9}",
            "'; DROP TABLE handles; --",
        ] {
            assert!(!is_handle_id(junk), "{junk:?}");
        }
        assert!(is_handle_id("kh_aaaaaaaaaaaaaaaaaaaaaaaaaa"));
        assert!(is_handle_id("kh_aaaaaaaaaaaaaaaaaaaaaaaaa4"));
    }

    #[test]
    fn insert_get_roundtrip() {
        let store = StateStore::open_in_memory().unwrap();
        let mut new = new_handle("db-password");
        new.version_pin = VersionPin::Fixed("3".to_owned());
        let h = store.insert(new.clone()).unwrap();
        assert!(is_handle_id(&h.id));
        assert_eq!(h.state, HandleState::Active);
        assert_eq!(h.created_at_ms, h.updated_at_ms);
        assert_eq!(store.get(&h.id).unwrap(), Some(h.clone()));
        assert_eq!(h.version_pin, VersionPin::Fixed("3".to_owned()));
        assert_eq!(h.labels, new.labels);

        let current = store.insert(new_handle("db-password")).unwrap();
        assert_eq!(
            store.get(&current.id).unwrap().unwrap().version_pin,
            VersionPin::Current
        );
    }

    #[test]
    fn get_unknown_or_junk_is_none() {
        let store = StateStore::open_in_memory().unwrap();
        store.insert(new_handle("a")).unwrap();
        assert_eq!(store.get(&new_handle_id().unwrap()).unwrap(), None);
        assert_eq!(store.get("not a handle").unwrap(), None);
        assert!(
            !store
                .set_state("not a handle", HandleState::Revoked)
                .unwrap()
        );
    }

    #[test]
    fn set_state_revokes_and_bumps() {
        let store = StateStore::open_in_memory().unwrap();
        let h = store.insert(new_handle("a")).unwrap();
        std::thread::sleep(Duration::from_millis(3));
        assert!(store.set_state(&h.id, HandleState::Revoked).unwrap());
        let after = store.get(&h.id).unwrap().unwrap();
        assert_eq!(after.state, HandleState::Revoked);
        assert!(after.updated_at_ms > h.updated_at_ms);
        assert_eq!(after.created_at_ms, h.created_at_ms);
        assert!(
            !store
                .set_state(&new_handle_id().unwrap(), HandleState::Revoked)
                .unwrap()
        );
    }

    #[test]
    fn list_and_find_are_ordered_and_filtered() {
        let store = StateStore::open_in_memory().unwrap();
        let a1 = store.insert(new_handle("a")).unwrap();
        let b = store.insert(new_handle("b")).unwrap();
        let a2 = store.insert(new_handle("a")).unwrap();
        let mut other = new_handle("a");
        other.provider = "env".to_owned();
        let a_env = store.insert(other).unwrap();

        let list = store.list().unwrap();
        assert_eq!(list.len(), 4);
        let keys: Vec<_> = list
            .iter()
            .map(|h| (h.created_at_ms, h.id.clone()))
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);

        let mut found: Vec<_> = store
            .find("file", "a")
            .unwrap()
            .into_iter()
            .map(|h| h.id)
            .collect();
        found.sort();
        let mut want = vec![a1.id, a2.id];
        want.sort();
        assert_eq!(found, want);
        assert_eq!(store.find("file", "b").unwrap(), vec![b]);
        assert_eq!(store.find("env", "a").unwrap(), vec![a_env]);
        assert!(store.find("file", "zzz").unwrap().is_empty());
    }

    #[test]
    fn empty_fields_are_refused() {
        let store = StateStore::open_in_memory().unwrap();
        let mut n = new_handle("a");
        n.provider.clear();
        assert!(matches!(
            store.insert(n),
            Err(StateError::Invalid {
                field: "provider",
                ..
            })
        ));
        assert!(matches!(
            store.insert(new_handle("")),
            Err(StateError::Invalid { field: "name", .. })
        ));
        let mut n = new_handle("a");
        n.version_pin = VersionPin::Fixed(String::new());
        assert!(matches!(
            store.insert(n),
            Err(StateError::Invalid {
                field: "version pin",
                ..
            })
        ));
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn connection_settings() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_database(&dir.path().join("k.db")).unwrap();
        let get = |p: &str| -> String {
            conn.pragma_query_value(None, p, |r| r.get::<_, rusqlite::types::Value>(0))
                .map(|v| format!("{v:?}"))
                .unwrap()
        };
        assert_eq!(get("journal_mode"), "Text(\"wal\")");
        assert_eq!(get("synchronous"), "Integer(2)"); // FULL
        assert_eq!(get("foreign_keys"), "Integer(1)");
        assert_eq!(get("busy_timeout"), "Integer(5000)");
        assert_eq!(get("user_version"), format!("Integer({SCHEMA_VERSION})"));
    }

    #[test]
    fn migrates_from_version_1() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO handles VALUES ('kh_aaaaaaaaaaaaaaaaaaaaaaaaaa', 'file', 'a', NULL, \
                 '', '{}', 'active', 1, 1)",
                [],
            )
            .unwrap();
        }
        let conn = open_database(&path).unwrap();
        let version: u32 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let audit_rows: i64 = conn
            .query_row("SELECT count(*) FROM audit", [], |r| r.get(0))
            .unwrap();
        assert_eq!(audit_rows, 0);
        drop(conn);
        let store = StateStore::open(&path).unwrap();
        let h = store.get("kh_aaaaaaaaaaaaaaaaaaaaaaaaaa").unwrap().unwrap();
        assert_eq!(h.name, "a");
    }

    #[test]
    fn corrupt_rows_are_errors_not_panics() {
        let store = StateStore::open_in_memory().unwrap();
        let h = store.insert(new_handle("a")).unwrap();
        {
            let conn = lock(&store.conn);
            // Bypass the CHECK constraints the way a hand edit could not, to exercise decoding.
            conn.execute_batch("PRAGMA ignore_check_constraints = ON")
                .unwrap();
            conn.execute("UPDATE handles SET state = 'weird' WHERE id = ?1", [&h.id])
                .unwrap();
        }
        // A hand edit happens outside a running gateway: a new process starts uncached.
        lock(&store.cache).clear();
        assert!(matches!(
            store.get(&h.id),
            Err(StateError::Corrupt {
                column: "state",
                ..
            })
        ));
        assert!(store.list().is_err());
    }
}
