//! The store on disk:
//!
//! ```text
//! DIR/header.json     store id, generation, KEK parameters, KEK check value
//! DIR/lock            held exclusively across every read-modify-write
//! DIR/counter         bumped by every write, so readers know when their cache is stale
//! DIR/gen-<G>/<hex>   one record file per secret (see record.rs)
//! ```
//!
//! Every write is a temporary file, fsync, rename over the record, fsync of the directory, all
//! under the lock. Readers take no lock: a rename is atomic, so they see the old record or the new
//! one. Parsed records (ciphertexts only) are cached in memory and trusted only while the write
//! counter is unchanged, so a resolve costs one read of one hot 8-byte file however many records
//! the store holds, and still sees every write another process has acknowledged. `rewrap` writes a whole new generation and commits by replacing the header.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use keyhole_providers::protocol::{Description, SecretBytes, SecretState, VersionInfo};
use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::kek::{self, Argon2Params, Kek, KekSource};
use crate::record::{self, Record, SealedVersion};

const HEADER: &str = "header.json";
const LOCK: &str = "lock";
const COUNTER: &str = "counter";
const FORMAT_NAME: &str = "keyhole-file-store";
const FORMAT_VERSION: u32 = 1;

/// How the KEK is made, as recorded in the header.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
enum KekParams {
    KeyFile,
    Argon2id {
        #[serde(flatten)]
        params: Argon2Params,
        salt: String,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Header {
    format: String,
    version: u32,
    store_id: String,
    generation: u64,
    kek: KekParams,
    check: String,
}

/// How a store behaves.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Versions kept per secret, the current one included (0 = unlimited).
    pub versions_kept: u32,
    /// How long a writer waits for another process's lock.
    pub lock_timeout: Duration,
    /// Skip every fsync. Only for building large benchmark fixtures: a crash loses writes.
    pub danger_skip_fsync: bool,
}

impl Default for StoreOptions {
    fn default() -> StoreOptions {
        StoreOptions {
            versions_kept: 10,
            lock_timeout: Duration::from_secs(5),
            danger_skip_fsync: false,
        }
    }
}

/// What `verify` found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    /// Records that decrypted completely.
    pub intact: usize,
    /// Damaged records: (record file, what is wrong).
    pub damaged: Vec<(String, String)>,
}

/// Most records kept parsed in memory (a few hundred bytes each).
const MAX_CACHED_RECORDS: usize = 200_000;

/// Cached records by name, with the generation and write counter they were read at.
type RecordCache = std::collections::HashMap<String, (u64, u64, std::sync::Arc<Record>)>;

/// An unlocked store.
pub struct Store {
    dir: PathBuf,
    store_id: [u8; 16],
    kek: Kek,
    options: StoreOptions,
    generation: Mutex<u64>,
    index: Mutex<Option<NameIndex>>,
    /// The store-wide write counter (`DIR/counter`), bumped under the lock by every write.
    counter: File,
    /// Parsed records (ciphertexts and wrapped DEKs only, never a plaintext), each tagged with
    /// the generation and write counter it was read at; used only while both still match.
    cache: Mutex<RecordCache>,
}

/// Names to record files, for List, as of a generation and write counter: rebuilt from the
/// directory when either moved because of another process (this one's writes update it).
struct NameIndex {
    generation: u64,
    counter: u64,
    names: BTreeMap<String, String>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn gen_dir(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("gen-{generation}"))
}

/// Writes `bytes` to `dir/name` atomically: temporary file, fsync, rename, fsync of `dir`.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8], sync: bool) -> Result<(), StoreError> {
    let suffix = hex::encode(kek::random::<6>()?);
    let tmp = dir.join(format!(".tmp-{name}-{suffix}"));
    let result = (|| {
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&tmp)?;
        file.write_all(bytes)?;
        if sync {
            file.sync_all()?;
        }
        fs::rename(&tmp, dir.join(name))?;
        if sync {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        StoreError::io(format!("cannot write {}", dir.join(name).display()), e)
    })
}

fn create_private_dir(path: &Path) -> Result<(), StoreError> {
    let mut builder = fs::DirBuilder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(path)
        .map_err(|e| StoreError::io(format!("cannot create {}", path.display()), e))
}

fn sync_dir(path: &Path) -> Result<(), StoreError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| StoreError::io(format!("cannot sync {}", path.display()), e))
}

/// The exclusive store lock, released when dropped.
struct LockGuard(File);

impl Drop for LockGuard {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

fn lock(dir: &Path, timeout: Duration) -> Result<LockGuard, StoreError> {
    let path = dir.join(LOCK);
    // A new open file per acquisition, so threads of one process exclude each other too.
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let file = options
        .open(&path)
        .map_err(|e| StoreError::io(format!("cannot open {}", path.display()), e))?;
    let deadline = Instant::now() + timeout;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(LockGuard(file)),
            Err(fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(fs::TryLockError::WouldBlock) => return Err(StoreError::LockTimeout(timeout)),
            Err(fs::TryLockError::Error(e)) => {
                return Err(StoreError::io(format!("cannot lock {}", path.display()), e));
            }
        }
    }
}

/// Opens (creating, 0600) the store's write counter.
fn open_counter(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(COUNTER);
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
        .open(&path)
        .map_err(|e| StoreError::io(format!("cannot open {}", path.display()), e))
}

/// The write counter: 8 bytes, little-endian; a missing or short file reads as 0.
fn read_counter(file: &File) -> Result<u64, StoreError> {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 8];
    let n = file
        .read_at(&mut buf, 0)
        .map_err(|e| StoreError::io("cannot read the store's write counter", e))?;
    Ok(if n == 8 { u64::from_le_bytes(buf) } else { 0 })
}

/// Bumps the write counter and returns its value before and after. Called under the store
/// lock, after the record is durable and before the write is acknowledged. Not fsynced: after a
/// crash every cache starts empty.
fn bump_counter(file: &File) -> Result<(u64, u64), StoreError> {
    use std::os::unix::fs::FileExt;
    let before = read_counter(file)?;
    let next = before.wrapping_add(1);
    file.write_at(&next.to_le_bytes(), 0)
        .map_err(|e| StoreError::io("cannot bump the store's write counter", e))?;
    Ok((before, next))
}

fn read_header(dir: &Path) -> Result<Header, StoreError> {
    let path = dir.join(HEADER);
    let bad = |reason: String| StoreError::Header {
        path: path.clone(),
        reason,
    };
    let bytes = fs::read(&path).map_err(|e| {
        bad(if e.kind() == std::io::ErrorKind::NotFound {
            "no store here (run `keyhole-provider-file init` first)".into()
        } else {
            format!("cannot read the store header: {e}")
        })
    })?;
    if bytes.is_empty() {
        return Err(bad(
            "the store header is empty (truncated); restore it from a backup".into(),
        ));
    }
    let header: Header = serde_json::from_slice(&bytes).map_err(|e| {
        bad(format!(
            "not a keyhole file store header, or a damaged one ({} at line {}, column {}); \
             restore it from a backup",
            match e.classify() {
                serde_json::error::Category::Eof => "truncated",
                _ => "malformed",
            },
            e.line(),
            e.column()
        ))
    })?;
    if header.format != FORMAT_NAME {
        return Err(bad(format!(
            "not a keyhole file store (format {:?})",
            header.format
        )));
    }
    if header.version != FORMAT_VERSION {
        return Err(bad(format!(
            "store format version {} is not supported (this build reads {FORMAT_VERSION})",
            header.version
        )));
    }
    Ok(header)
}

fn store_id(header: &Header, dir: &Path) -> Result<[u8; 16], StoreError> {
    hex::decode(&header.store_id)
        .ok()
        .and_then(|b| <[u8; 16]>::try_from(b).ok())
        .ok_or_else(|| StoreError::Header {
            path: dir.join(HEADER),
            reason: "the store id is malformed".into(),
        })
}

/// Derives the KEK the header calls for from `source`.
fn derive(header: &Header, source: &KekSource, allow_insecure: bool) -> Result<Kek, StoreError> {
    match (&header.kek, source) {
        (KekParams::KeyFile, KekSource::KeyFile(path)) => kek::read_key_file(path, allow_insecure),
        (KekParams::Argon2id { params, salt }, KekSource::PassphraseFile(path)) => {
            let pass = kek::read_passphrase_file(path, allow_insecure)?;
            let salt = BASE64.decode(salt).map_err(|_| StoreError::Header {
                path: PathBuf::from(HEADER),
                reason: "the Argon2id salt is malformed".into(),
            })?;
            params.derive(&pass, &salt)
        }
        (KekParams::KeyFile, KekSource::PassphraseFile(_)) => Err(StoreError::Usage(
            "this store is unlocked with a key file: pass --key-file, not --passphrase-file".into(),
        )),
        (KekParams::Argon2id { .. }, KekSource::KeyFile(_)) => Err(StoreError::Usage(
            "this store is unlocked with a passphrase: pass --passphrase-file, not --key-file"
                .into(),
        )),
    }
}

/// A new KEK and the header fields describing it.
fn new_kek(
    source: &KekSource,
    argon2: Argon2Params,
    allow_insecure: bool,
) -> Result<(Kek, KekParams), StoreError> {
    match source {
        KekSource::KeyFile(path) => Ok((
            kek::read_key_file(path, allow_insecure)?,
            KekParams::KeyFile,
        )),
        KekSource::PassphraseFile(path) => {
            argon2.check()?;
            let pass = kek::read_passphrase_file(path, allow_insecure)?;
            let salt = kek::random::<16>()?;
            let kek = argon2.derive(&pass, &salt)?;
            Ok((
                kek,
                KekParams::Argon2id {
                    params: argon2,
                    salt: BASE64.encode(salt),
                },
            ))
        }
    }
}

/// Creates a new, empty store in `dir` (created 0700 if missing; it must not hold a store).
pub fn init(
    dir: &Path,
    source: &KekSource,
    argon2: Argon2Params,
    allow_insecure: bool,
) -> Result<(), StoreError> {
    if !dir.exists() {
        create_private_dir(dir)?;
    }
    if dir.join(HEADER).exists() {
        return Err(StoreError::Usage(format!(
            "{} already holds a store",
            dir.display()
        )));
    }
    let (kek, params) = new_kek(source, argon2, allow_insecure)?;
    let store_id = kek::random::<16>()?;
    let header = Header {
        format: FORMAT_NAME.into(),
        version: FORMAT_VERSION,
        store_id: hex::encode(store_id),
        generation: 1,
        kek: params,
        check: BASE64.encode(record::seal_check(&kek, &store_id)?),
    };
    create_private_dir(&gen_dir(dir, 1))?;
    let _lock = lock(dir, Duration::from_secs(5))?;
    write_header(dir, &header)
}

fn write_header(dir: &Path, header: &Header) -> Result<(), StoreError> {
    let mut json = serde_json::to_vec_pretty(header)
        .map_err(|e| StoreError::Usage(format!("cannot encode the header: {e}")))?;
    json.push(b'\n');
    write_atomic(dir, HEADER, &json, true)
}

impl Store {
    /// Opens and unlocks the store in `dir`. A wrong key fails here with `WrongKey`.
    pub fn open(
        dir: &Path,
        source: &KekSource,
        allow_insecure: bool,
        options: StoreOptions,
    ) -> Result<Store, StoreError> {
        let header = read_header(dir)?;
        let store_id = store_id(&header, dir)?;
        let kek = derive(&header, source, allow_insecure)?;
        let check = BASE64.decode(&header.check).unwrap_or_default();
        if !record::open_check(&kek, &store_id, &check) {
            return Err(StoreError::WrongKey);
        }
        let generation = header.generation;
        if !gen_dir(dir, generation).is_dir() {
            return Err(StoreError::Header {
                path: dir.join(HEADER),
                reason: format!("generation directory gen-{generation} is missing"),
            });
        }
        let store = Store {
            dir: dir.to_path_buf(),
            store_id,
            kek,
            options,
            generation: Mutex::new(generation),
            index: Mutex::new(None),
            counter: open_counter(dir)?,
            cache: Mutex::new(std::collections::HashMap::new()),
        };
        store.clean_leftovers();
        Ok(store)
    }

    /// Removes temporary files and stale generations left by a crash, if the lock is free.
    fn clean_leftovers(&self) {
        let Ok(_lock) = lock(&self.dir, Duration::from_millis(100)) else {
            return;
        };
        // The header read before the lock may be stale: a rewrap that finished meanwhile made a
        // newer generation live, and that one must be kept. A store rekeyed meanwhile is left
        // alone entirely.
        if self.follow_generation().is_err() {
            return;
        }
        let current = self.current_dir();
        // Temporaries of an interrupted write: records inside the generation, the header at the
        // top (an interrupted rewrap).
        for dir in [current.as_path(), self.dir.as_path()] {
            if let Ok(entries) = fs::read_dir(dir) {
                for entry in entries.flatten() {
                    if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                        let _ = fs::remove_file(entry.path());
                    }
                }
            }
        }
        let current_name = current.file_name().map(|n| n.to_os_string());
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                if name.to_string_lossy().starts_with("gen-")
                    && Some(&name) != current_name.as_ref()
                {
                    let _ = fs::remove_dir_all(entry.path());
                }
            }
        }
    }

    fn current_dir(&self) -> PathBuf {
        gen_dir(&self.dir, self.current_generation())
    }

    fn sync(&self) -> bool {
        !self.options.danger_skip_fsync
    }

    /// Reads `name`'s record, following a generation change made by another process's rewrap.
    fn read(&self, name: &str) -> Result<Option<Record>, StoreError> {
        Ok(self.read_shared(name)?.map(|r| (*r).clone()))
    }

    /// Reads `name`'s record, from memory when no write has happened since it was cached. The
    /// counter is read before the file, so a concurrent write can only make the entry stale
    /// early, never late: any write acknowledged before this call began is seen.
    fn read_shared(&self, name: &str) -> Result<Option<std::sync::Arc<Record>>, StoreError> {
        let (count, generation, cached) = self.cached(name)?;
        if let Some(record) = cached {
            return Ok(Some(record));
        }
        let file = record::file_name(name);
        for attempt in 0..2 {
            let path = self.current_dir().join(&file);
            match fs::read(&path) {
                Ok(bytes) => {
                    let record = std::sync::Arc::new(Record::decode(&bytes, &file, Some(name))?);
                    let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                    if cache.len() >= MAX_CACHED_RECORDS {
                        cache.clear(); // bounded memory; the next reads refill it
                    }
                    cache.insert(
                        name.to_string(),
                        (generation, count, std::sync::Arc::clone(&record)),
                    );
                    return Ok(Some(record));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if attempt == 0 && self.follow_generation()? {
                        continue;
                    }
                    return Ok(None);
                }
                Err(e) => return Err(StoreError::io(format!("cannot read {}", path.display()), e)),
            }
        }
        Ok(None)
    }

    /// The write counter and generation now, and `name`'s record if the cache holds it for
    /// exactly those. Costs one 8-byte pread and a hash lookup: no file is opened.
    #[allow(clippy::type_complexity)]
    fn cached(&self, name: &str) -> Result<(u64, u64, Option<std::sync::Arc<Record>>), StoreError> {
        let (generation, count) = self.stamp()?;
        let hit = match self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            Some((g, c, record)) if *g == generation && *c == count => {
                Some(std::sync::Arc::clone(record))
            }
            _ => None,
        };
        Ok((count, generation, hit))
    }

    /// The generation this process reads and the store's write counter now: what every cache is
    /// keyed on. The counter is read first, so a cache filled after it can only be stale early.
    fn stamp(&self) -> Result<(u64, u64), StoreError> {
        let count = read_counter(&self.counter)?;
        Ok((self.current_generation(), count))
    }

    fn current_generation(&self) -> u64 {
        *self.generation.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Re-reads the header; returns whether the generation moved (and this KEK still opens it).
    fn follow_generation(&self) -> Result<bool, StoreError> {
        let header = read_header(&self.dir)?;
        let mut current = self.generation.lock().unwrap_or_else(|p| p.into_inner());
        if header.generation == *current {
            return Ok(false);
        }
        let check = BASE64.decode(&header.check).unwrap_or_default();
        if !record::open_check(&self.kek, &self.store_id, &check) {
            return Err(StoreError::Rekeyed);
        }
        *current = header.generation;
        Ok(true)
    }

    fn write(&self, record: &Record) -> Result<(), StoreError> {
        let file = record::file_name(&record.name);
        write_atomic(&self.current_dir(), &file, &record.encode()?, self.sync())?;
        // Before the write is acknowledged, every reader's cache must stop trusting it.
        let (before, after) = bump_counter(&self.counter)?;
        let generation = self.current_generation();
        let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        // Writes are serialized by the store lock: an index current just before this one is
        // current after it once this record is in.
        if let Some(index) = index.as_mut()
            && index.generation == generation
            && index.counter == before
        {
            index.names.insert(record.name.clone(), file);
            index.counter = after;
        }
        Ok(())
    }

    fn lock(&self) -> Result<LockGuard, StoreError> {
        lock(&self.dir, self.options.lock_timeout)
    }

    /// The store lock, for a change: under it the header is read again, because a rewrap by
    /// another process since the last look moved the store to a new generation, and a write into
    /// the old one would be acknowledged and then lost with it.
    fn lock_live(&self) -> Result<LockGuard, StoreError> {
        let guard = self.lock()?;
        self.follow_generation()?;
        Ok(guard)
    }

    fn trim(&self, record: &mut Record) {
        let kept = self.options.versions_kept as usize;
        if kept > 0 && record.versions.len() > kept {
            let drop = record.versions.len() - kept;
            record.versions.drain(..drop);
        }
    }

    fn push(
        &self,
        record: &mut Record,
        value: &SecretBytes,
        now: u64,
    ) -> Result<String, StoreError> {
        // The counter comes from disk: a record at the end of the range is damaged, not wrapped
        // to reuse version numbers.
        let version = record
            .counter
            .checked_add(1)
            .ok_or_else(|| StoreError::Damaged {
                file: record::file_name(&record.name),
                name: Some(record.name.clone()),
                reason: "its version counter is at its maximum".into(),
            })?;
        record.counter = version;
        let sealed =
            SealedVersion::seal(&self.kek, &self.store_id, &record.name, version, now, value)?;
        record.versions.push(sealed);
        record.revoked = false;
        record.updated_ms = now;
        self.trim(record);
        Ok(version.to_string())
    }

    /// The current value, or a pinned version.
    pub fn resolve(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<(SecretBytes, String), StoreError> {
        let record = self
            .read_shared(name)?
            .ok_or_else(|| StoreError::NotFound(name.into()))?;
        self.open_version(&record, name, version)
    }

    /// [`Store::resolve`] when `name`'s record is cached and current, without opening a file
    /// (cheap enough to run on an async task); `None` when it would have to read one.
    pub fn resolve_cached(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Option<Result<(SecretBytes, String), StoreError>> {
        match self.cached(name) {
            Err(e) => Some(Err(e)),
            Ok((_, _, None)) => None,
            Ok((_, _, Some(record))) => Some(self.open_version(&record, name, version)),
        }
    }

    /// The value of `version` (default: the current one) in `record`.
    fn open_version(
        &self,
        record: &Record,
        name: &str,
        version: Option<&str>,
    ) -> Result<(SecretBytes, String), StoreError> {
        if record.revoked {
            return Err(StoreError::Revoked(name.into()));
        }
        let unavailable = || StoreError::VersionUnavailable {
            name: name.into(),
            version: version.unwrap_or_default().into(),
        };
        let sealed = match version {
            None => record.versions.last(),
            Some(v) => {
                let n: u64 = v.parse().map_err(|_| unavailable())?;
                if record.revoked_versions.contains(&n) {
                    return Err(StoreError::Revoked(name.into()));
                }
                record.versions.iter().find(|s| s.version == n)
            }
        }
        .ok_or_else(unavailable)?;
        let value = sealed
            .open(&self.kek, &self.store_id, name)
            .ok_or_else(|| StoreError::Damaged {
                file: record::file_name(name),
                name: Some(name.into()),
                reason: format!(
                    "version {} does not decrypt (authentication failed)",
                    sealed.version
                ),
            })?;
        Ok((value, sealed.version.to_string()))
    }

    /// Stores a new secret or a new version.
    pub fn store(
        &self,
        name: &str,
        value: &SecretBytes,
        create_only: bool,
        labels: BTreeMap<String, String>,
    ) -> Result<String, StoreError> {
        let _lock = self.lock_live()?;
        let now = now_ms();
        let mut record = match self.read(name)? {
            Some(_) if create_only => return Err(StoreError::AlreadyExists(name.into())),
            Some(mut existing) => {
                existing.labels = labels;
                existing
            }
            None => Record {
                name: name.into(),
                created_ms: now,
                updated_ms: now,
                labels,
                revoked: false,
                counter: 0,
                versions: Vec::new(),
                revoked_versions: Vec::new(),
            },
        };
        let version = self.push(&mut record, value, now)?;
        self.write(&record)?;
        Ok(version)
    }

    /// Writes a new version of an existing secret.
    pub fn rotate(
        &self,
        name: &str,
        value: &SecretBytes,
        expected_version: Option<&str>,
    ) -> Result<String, StoreError> {
        let _lock = self.lock_live()?;
        let mut record = self
            .read(name)?
            .ok_or_else(|| StoreError::NotFound(name.into()))?;
        if let Some(expected) = expected_version {
            let current = (!record.revoked)
                .then(|| record.versions.last().map(|v| v.version.to_string()))
                .flatten();
            if current.as_deref() != Some(expected) {
                return Err(StoreError::Conflict {
                    name: name.into(),
                    expected: expected.into(),
                    current: current.map_or("(revoked)".into(), |c| format!("{c:?}")),
                });
            }
        }
        let version = self.push(&mut record, value, now_ms())?;
        self.write(&record)?;
        Ok(version)
    }

    /// Revokes every version and destroys their DEKs (crypto-shredding). Idempotent.
    pub fn revoke(&self, name: &str) -> Result<(), StoreError> {
        let _lock = self.lock_live()?;
        let mut record = self
            .read(name)?
            .ok_or_else(|| StoreError::NotFound(name.into()))?;
        if record.revoked {
            return Ok(());
        }
        let destroyed: Vec<u64> = record.versions.drain(..).map(|v| v.version).collect();
        record.revoked_versions.extend(destroyed);
        record.revoked = true;
        record.updated_ms = now_ms();
        self.write(&record)
    }

    /// Metadata, never a value.
    pub fn describe(&self, name: &str) -> Result<Description, StoreError> {
        let record = self
            .read(name)?
            .ok_or_else(|| StoreError::NotFound(name.into()))?;
        Ok(describe(&record))
    }

    /// A page of names under `prefix`, after the page token `after`.
    pub fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Description>, Option<String>), StoreError> {
        let names = self.names()?;
        let mut matching = names
            .range(prefix.to_string()..)
            .take_while(|(n, _)| n.starts_with(prefix))
            .filter(|(n, _)| after.is_none_or(|a| n.as_str() > a))
            .map(|(n, _)| n.clone());
        let mut entries = Vec::new();
        let mut last = None;
        for name in matching.by_ref() {
            match self.read(&name) {
                Ok(Some(record)) => entries.push(describe(&record)),
                Ok(None) => {}
                Err(e) => tracing::warn!("list skips a record: {e}"),
            }
            last = Some(name);
            if entries.len() == limit {
                break;
            }
        }
        let more = matching.next().is_some();
        Ok((entries, if more { last } else { None }))
    }

    /// Every name, from the index, rebuilt when a write of another process moved the counter.
    /// The counter is read before the directory, so the index can only be stale early, never
    /// late (as in [`Store::read_shared`]); a directory's mtime would miss a write made within
    /// its timestamp's granularity.
    fn names(&self) -> Result<BTreeMap<String, String>, StoreError> {
        let (generation, counter) = self.stamp()?;
        let dir = gen_dir(&self.dir, generation);
        let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = index.as_ref()
            && i.generation == generation
            && i.counter == counter
        {
            return Ok(i.names.clone());
        }
        let mut names = BTreeMap::new();
        let cannot_list = |e| StoreError::io(format!("cannot list {}", dir.display()), e);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            // Another process rewrapped the store (and removed this generation): follow it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                drop(index);
                return if self.follow_generation()? {
                    self.names()
                } else {
                    Err(cannot_list(e))
                };
            }
            Err(e) => return Err(cannot_list(e)),
        };
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            if file.starts_with('.') {
                continue;
            }
            match fs::read(entry.path())
                .map_err(|e| e.to_string())
                .and_then(|b| Record::decode(&b, &file, None).map_err(|e| e.to_string()))
            {
                Ok(record) => {
                    names.insert(record.name, file);
                }
                Err(e) => tracing::warn!("index skips a record: {e}"),
            }
        }
        *index = Some(NameIndex {
            generation,
            counter,
            names: names.clone(),
        });
        Ok(names)
    }
}

fn describe(record: &Record) -> Description {
    Description {
        name: record.name.clone(),
        state: if record.revoked {
            SecretState::Revoked
        } else {
            SecretState::Active
        },
        current_version: (!record.revoked)
            .then(|| record.versions.last().map(|v| v.version.to_string()))
            .flatten(),
        versions: record
            .versions
            .iter()
            .map(|v| VersionInfo {
                version: v.version.to_string(),
                created_at_ms: v.created_ms,
            })
            .collect(),
        created_at_ms: record.created_ms,
        updated_at_ms: record.updated_ms,
        labels: record.labels.clone(),
    }
}

/// The record files of a generation directory, skipping temporaries.
fn record_files(dir: &Path) -> Result<Vec<(String, PathBuf)>, StoreError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)
        .map_err(|e| StoreError::io(format!("cannot list {}", dir.display()), e))?
    {
        let entry =
            entry.map_err(|e| StoreError::io(format!("cannot list {}", dir.display()), e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') {
            out.push((name, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Decrypts every version of every record in the store or backup at `dir`.
pub fn verify(
    dir: &Path,
    source: &KekSource,
    allow_insecure: bool,
) -> Result<VerifyReport, StoreError> {
    let store = Store::open(dir, source, allow_insecure, StoreOptions::default())?;
    let mut report = VerifyReport::default();
    for (file, path) in record_files(&store.current_dir())? {
        let checked = fs::read(&path)
            .map_err(|e| StoreError::io(format!("cannot read {}", path.display()), e))
            .and_then(|bytes| Record::decode(&bytes, &file, None))
            .and_then(|record| {
                if record::file_name(&record.name) != file {
                    return Err(StoreError::Damaged {
                        file: file.clone(),
                        name: Some(record.name.clone()),
                        reason: "the record is filed under another name's hash".into(),
                    });
                }
                for v in &record.versions {
                    if v.open(&store.kek, &store.store_id, &record.name).is_none() {
                        return Err(StoreError::Damaged {
                            file: file.clone(),
                            name: Some(record.name.clone()),
                            reason: format!("version {} does not decrypt", v.version),
                        });
                    }
                }
                Ok(())
            });
        match checked {
            Ok(()) => report.intact += 1,
            Err(e) => report.damaged.push((file, e.to_string())),
        }
    }
    Ok(report)
}

/// Copies the store at `dir` to the new directory `to`, under the lock: a consistent snapshot,
/// still encrypted. Needs no key.
pub fn backup(dir: &Path, to: &Path) -> Result<usize, StoreError> {
    if to.exists() {
        return Err(StoreError::Usage(format!(
            "{} already exists; back up into a new directory",
            to.display()
        )));
    }
    let _lock = lock(dir, Duration::from_secs(30))?;
    let header = read_header(dir)?;
    let source = gen_dir(dir, header.generation);
    create_private_dir(to)?;
    let target = gen_dir(to, header.generation);
    create_private_dir(&target)?;
    let mut copied = 0;
    for (file, path) in record_files(&source)? {
        let bytes = fs::read(&path)
            .map_err(|e| StoreError::io(format!("cannot read {}", path.display()), e))?;
        write_atomic(&target, &file, &bytes, false)?;
        let f = File::open(target.join(&file))
            .map_err(|e| StoreError::io("cannot reopen a copied record", e))?;
        f.sync_all()
            .map_err(|e| StoreError::io("cannot sync a copied record", e))?;
        copied += 1;
    }
    sync_dir(&target)?;
    write_header(to, &header)?;
    drop(lock(to, Duration::from_secs(1))?);
    sync_dir(to)?;
    Ok(copied)
}

/// Re-wraps every DEK under a new KEK. Atomic: a new generation is written in full, then the
/// header that names it replaces the old one in one rename; a crash before that leaves the old
/// store untouched. Values are never decrypted.
pub fn rewrap(
    dir: &Path,
    old: &KekSource,
    new: &KekSource,
    argon2: Argon2Params,
    allow_insecure: bool,
) -> Result<usize, StoreError> {
    let store = Store::open(dir, old, allow_insecure, StoreOptions::default())?;
    let _lock = store.lock()?;
    let header = read_header(dir)?;
    let (new_kek, params) = new_kek(new, argon2, allow_insecure)?;
    let next = header
        .generation
        .checked_add(1)
        .ok_or_else(|| StoreError::Header {
            path: dir.join(HEADER),
            reason: "its generation number is at its maximum".into(),
        })?;
    let target = gen_dir(dir, next);
    if target.exists() {
        fs::remove_dir_all(&target)
            .map_err(|e| StoreError::io("cannot clear a stale generation", e))?;
    }
    create_private_dir(&target)?;
    let mut count = 0;
    let source = gen_dir(dir, header.generation);
    for (file, path) in record_files(&source)? {
        let bytes = fs::read(&path)
            .map_err(|e| StoreError::io(format!("cannot read {}", path.display()), e))?;
        let mut record = Record::decode(&bytes, &file, None)?;
        let name = record.name.clone();
        for v in &mut record.versions {
            v.rewrap(&store.kek, &new_kek, &store.store_id, &name)
                .ok_or_else(|| StoreError::Damaged {
                    file: file.clone(),
                    name: Some(name.clone()),
                    reason: format!(
                        "the DEK of version {} does not unwrap; nothing was changed",
                        v.version
                    ),
                })?;
        }
        write_atomic(&target, &file, &record.encode()?, true)?;
        count += 1;
    }
    sync_dir(&target)?;
    let new_header = Header {
        generation: next,
        kek: params,
        check: BASE64.encode(record::seal_check(&new_kek, &store.store_id)?),
        ..header
    };
    write_header(dir, &new_header)?;
    // Readers in other processes must drop what they cached from the old generation.
    bump_counter(&open_counter(dir)?)?;
    let _ = fs::remove_dir_all(&source);
    Ok(count)
}
