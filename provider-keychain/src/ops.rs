//! The operations, each a blocking transaction over the keychain's entries ([`crate::layout`]).
//!
//! Writes (store, rotate, revoke) hold the write lock across their read-check-write. The write
//! order makes every interruption safe:
//!
//! - **Store or rotate**: for a new name, append it to the index; write the new version's entry;
//!   delete leftover garbage; write the pointer (the commit point: until then readers see the
//!   old state); delete the versions the new pointer no longer keeps. An interruption before
//!   the commit leaves an unreferenced version entry that the next write of the same number
//!   replaces, or an index name without a pointer, which List skips.
//! - **Revoke**: write the tombstone first, so every reader answers `Revoked` at once, then
//!   delete the version entries. The tombstone lists them until a later write has deleted them,
//!   and a repeated revoke retries their deletion; revoke succeeds only once they are gone.

use std::collections::BTreeSet;
use std::time::{SystemTime, UNIX_EPOCH};

use keyhole_providers::protocol::{Description, ErrorCode, ProviderError, SecretBytes};
use keyhole_providers::{Resolved, StoreRequest};

use crate::backend::Keychain;
use crate::layout::{
    self, FORMAT, INDEX_HEAD, IndexChunk, IndexHead, Pointer, index_chunk_user, name_hash,
    parse_version, pointer_user, version_user,
};

/// How often a resolve re-reads the pointer when the version it names vanished in between (a
/// concurrent rotate trimmed it, or a revoke deleted it).
const RESOLVE_ATTEMPTS: usize = 3;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn pointer_what(name: &str) -> String {
    format!("the pointer entry of {name:?}")
}

fn version_what(name: &str, v: u64) -> String {
    format!("the entry of version {v} of {name:?}")
}

fn pointer_label(name: &str) -> String {
    format!("keyhole: {name} (pointer)")
}

fn version_label(name: &str, v: u64) -> String {
    format!("keyhole: {name} (version {v})")
}

/// The pointer of `name`, or `None` if it never existed.
fn read_pointer(kc: &Keychain, name: &str, hash: &str) -> Result<Option<Pointer>, ProviderError> {
    let what = pointer_what(name);
    let Some(bytes) = kc.get(&pointer_user(hash), &what)? else {
        return Ok(None);
    };
    let pointer = Pointer::from_bytes(&bytes, &what)?;
    if pointer.name != name {
        return Err(ProviderError::internal(format!(
            "{what} belongs to another name with the same hash {hash}; keyhole cannot keep both"
        )));
    }
    Ok(Some(pointer))
}

fn write_pointer(kc: &Keychain, pointer: &Pointer, hash: &str) -> Result<(), ProviderError> {
    kc.set(
        &pointer_user(hash),
        &pointer_label(&pointer.name),
        &pointer.to_bytes()?,
        &pointer_what(&pointer.name),
    )
}

/// Resolve: the current value, or the pinned version.
pub fn resolve(kc: &Keychain, name: &str, version: Option<&str>) -> Result<Resolved, ProviderError> {
    kc.check_access()?;
    let hash = name_hash(name);
    for _ in 0..RESOLVE_ATTEMPTS {
        let pointer = read_pointer(kc, name, &hash)?.ok_or_else(|| ProviderError::not_found(name))?;
        let Some(current) = pointer.current else {
            return Err(ProviderError::revoked(name));
        };
        let v = match version {
            None => current,
            Some(asked) => match parse_version(asked) {
                Some(v) if pointer.keeps(v) => v,
                Some(v) if v <= pointer.revoked_through => {
                    return Err(ProviderError::new(
                        ErrorCode::Revoked,
                        format!("version {asked:?} of {name:?} was revoked"),
                    ));
                }
                _ => {
                    return Err(ProviderError::new(
                        ErrorCode::VersionUnavailable,
                        format!("version {asked:?} of {name:?} is not kept"),
                    ));
                }
            },
        };
        if let Some(value) = kc.get_value(&version_user(&hash, v), &version_what(name, v))? {
            return Ok(Resolved {
                value,
                version: v.to_string(),
            });
        }
        // Trimmed or revoked between the two reads: the pointer says what holds now.
    }
    Err(ProviderError::internal(format!(
        "the version entry that the pointer of {name:?} names is missing from {}; it may have \
         been deleted outside keyhole (revoke and store the secret again)",
        kc.kind().describe()
    )))
}

/// Store: creates the name, or writes a new version and replaces the labels.
pub fn store(
    kc: &Keychain,
    keep: u32,
    deadline: std::time::Instant,
    request: StoreRequest,
) -> Result<String, ProviderError> {
    kc.check_access()?;
    let _lock = kc.lock(deadline)?;
    let StoreRequest {
        name,
        value,
        create_only,
        labels,
    } = request;
    let hash = name_hash(&name);
    let now = now_ms();
    match read_pointer(kc, &name, &hash)? {
        Some(_) if create_only => Err(ProviderError::new(
            ErrorCode::AlreadyExists,
            format!("a secret named {name:?} already exists"),
        )),
        Some(mut pointer) => {
            pointer.labels = labels;
            commit(kc, pointer, &hash, &value, now, keep, false)
        }
        None => commit(
            kc,
            Pointer::new(&name, now, labels),
            &hash,
            &value,
            now,
            keep,
            true,
        ),
    }
}

/// Rotate: a new version, if `expected` (when given) is the current one.
pub fn rotate(
    kc: &Keychain,
    keep: u32,
    deadline: std::time::Instant,
    name: &str,
    value: &SecretBytes,
    expected: Option<&str>,
) -> Result<String, ProviderError> {
    kc.check_access()?;
    let _lock = kc.lock(deadline)?;
    let hash = name_hash(name);
    let pointer = read_pointer(kc, name, &hash)?.ok_or_else(|| ProviderError::not_found(name))?;
    if let Some(expected) = expected {
        let current = pointer.current.map(|v| v.to_string());
        if current.as_deref() != Some(expected) {
            return Err(ProviderError::new(
                ErrorCode::Conflict,
                format!(
                    "{name:?} is at version {}, not {expected:?}",
                    current.map_or("(revoked)".to_string(), |c| format!("{c:?}"))
                ),
            ));
        }
    }
    commit(kc, pointer, &hash, value, now_ms(), keep, false)
}

/// Writes a new version of `pointer` and commits it; see the module comment for the order.
fn commit(
    kc: &Keychain,
    mut pointer: Pointer,
    hash: &str,
    value: &SecretBytes,
    now: u64,
    keep: u32,
    new_name: bool,
) -> Result<String, ProviderError> {
    let old_garbage = std::mem::take(&mut pointer.garbage);
    let v = pointer.push(now, keep)?;
    let trimmed = pointer.garbage.clone();
    // Refuse a pointer the store cannot hold before anything is written.
    let mut largest = pointer.clone();
    largest.garbage.extend(&old_garbage);
    let size = largest.to_bytes()?.len();
    if size > kc.kind().entry_cap() {
        return Err(ProviderError::new(
            ErrorCode::InvalidRequest,
            format!(
                "the pointer entry of {:?} would need {size} bytes, more than the {} bytes an \
                 entry of {} holds; use a shorter name or fewer labels",
                pointer.name,
                kc.kind().entry_cap(),
                kc.kind().describe()
            ),
        ));
    }
    if new_name {
        index_append(kc, &pointer.name)?;
    }
    let sealed = layout::seal_value(value.expose());
    kc.set(
        &version_user(hash, v),
        &version_label(&pointer.name, v),
        &sealed,
        &version_what(&pointer.name, v),
    )?;
    drop(sealed);
    let mut garbage = delete_versions(kc, &pointer.name, hash, &old_garbage);
    garbage.extend(trimmed.iter().copied());
    pointer.garbage = garbage;
    write_pointer(kc, &pointer, hash)?;
    // Best effort: the pointer lists them, and the next write retries what fails here.
    delete_versions(kc, &pointer.name, hash, &trimmed);
    Ok(v.to_string())
}

/// Deletes version entries, logging failures; returns the versions that may remain.
fn delete_versions(kc: &Keychain, name: &str, hash: &str, versions: &[u64]) -> Vec<u64> {
    let mut remaining = Vec::new();
    for &v in versions {
        if let Err(e) = kc.delete(&version_user(hash, v), &version_what(name, v)) {
            tracing::warn!(
                "could not delete version {v} of {name:?} (kept for a later retry): {}",
                e.message
            );
            remaining.push(v);
        }
    }
    remaining
}

/// Revoke: the tombstone, then the deletion of every version entry. Idempotent.
pub fn revoke(kc: &Keychain, deadline: std::time::Instant, name: &str) -> Result<(), ProviderError> {
    kc.check_access()?;
    let _lock = kc.lock(deadline)?;
    let hash = name_hash(name);
    let mut pointer =
        read_pointer(kc, name, &hash)?.ok_or_else(|| ProviderError::not_found(name))?;
    if pointer.current.is_some() {
        pointer.revoke(now_ms());
        write_pointer(kc, &pointer, &hash)?;
    }
    // On a repeat this retries what an interrupted revoke left; the pointer is not rewritten, so
    // `updated_at_ms` stays.
    for &v in &pointer.garbage {
        kc.delete(&version_user(&hash, v), &version_what(name, v))?;
    }
    Ok(())
}

/// Describe.
pub fn describe(kc: &Keychain, name: &str) -> Result<Description, ProviderError> {
    kc.check_access()?;
    read_pointer(kc, name, &name_hash(name))?
        .map(|p| p.describe())
        .ok_or_else(|| ProviderError::not_found(name))
}

/// The Description of a name the index lists, or `None` if its pointer does not exist (a store
/// interrupted between the index and the pointer).
pub fn describe_listed(kc: &Keychain, name: &str) -> Result<Option<Description>, ProviderError> {
    Ok(read_pointer(kc, name, &name_hash(name))?.map(|p| p.describe()))
}

/// The indexed names under `prefix` after `after`, sorted by byte order, without duplicates.
pub fn list_names(
    kc: &Keychain,
    prefix: &str,
    after: Option<&str>,
) -> Result<Vec<String>, ProviderError> {
    kc.check_access()?;
    let names: BTreeSet<String> = read_index(kc)?
        .into_iter()
        .filter(|n| n.starts_with(prefix) && after.is_none_or(|a| n.as_str() > a))
        .collect();
    Ok(names.into_iter().collect())
}

const INDEX_WHAT: &str = "the name index";

fn chunk_what(k: u32) -> String {
    format!("chunk {k} of the name index")
}

fn chunk_label(k: u32) -> String {
    format!("keyhole: name index, chunk {k}")
}

fn read_head(kc: &Keychain) -> Result<IndexHead, ProviderError> {
    match kc.get(INDEX_HEAD, INDEX_WHAT)? {
        Some(bytes) => IndexHead::from_bytes(&bytes),
        None => Ok(IndexHead {
            f: FORMAT,
            chunks: 0,
        }),
    }
}

fn read_chunk(kc: &Keychain, k: u32) -> Result<Option<IndexChunk>, ProviderError> {
    kc.get(&index_chunk_user(k), &chunk_what(k))?
        .map(|bytes| IndexChunk::from_bytes(&bytes, k))
        .transpose()
}

/// Every name in the index, in insertion order (duplicates possible).
fn read_index(kc: &Keychain) -> Result<Vec<String>, ProviderError> {
    let head = read_head(kc)?;
    let mut names = Vec::new();
    for k in 0..head.chunks {
        // A missing chunk was never committed to the head's count; skip it.
        if let Some(chunk) = read_chunk(kc, k)? {
            names.extend(chunk.names);
        }
    }
    Ok(names)
}

/// Appends `name` to the last chunk, or starts a new chunk when the last one is full. Called
/// under the write lock, only for a name that has no pointer.
fn index_append(kc: &Keychain, name: &str) -> Result<(), ProviderError> {
    let cap = kc.kind().index_chunk_cap();
    let mut head = read_head(kc)?;
    if let Some(last) = head.chunks.checked_sub(1) {
        let mut chunk = read_chunk(kc, last)?.unwrap_or(IndexChunk {
            f: FORMAT,
            names: Vec::new(),
        });
        chunk.names.push(name.to_string());
        let bytes = chunk.to_bytes()?;
        if bytes.len() <= cap {
            return kc.set(
                &index_chunk_user(last),
                &chunk_label(last),
                &bytes,
                &chunk_what(last),
            );
        }
    }
    let k = head.chunks;
    let chunk = IndexChunk {
        f: FORMAT,
        names: vec![name.to_string()],
    };
    kc.set(
        &index_chunk_user(k),
        &chunk_label(k),
        &chunk.to_bytes()?,
        &chunk_what(k),
    )?;
    head.chunks = k
        .checked_add(1)
        .ok_or_else(|| ProviderError::internal("the name index is full"))?;
    kc.set(
        INDEX_HEAD,
        "keyhole: name index",
        &head.to_bytes()?,
        INDEX_WHAT,
    )
}
