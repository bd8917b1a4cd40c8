//! The operations, each a blocking transaction over the keychain's entries ([`crate::layout`]).
//!
//! Writes (store, rotate, revoke) hold the write lock across their read-check-write. The write
//! order makes every interruption safe:
//!
//! - **Store or rotate**: for a new name, append it to the index; if the old current value was
//!   inline in the pointer and stays kept, copy it to its version entry; if the new value is too
//!   large to be inline, write its version entry; delete leftover garbage; write the pointer (the
//!   commit point: until then readers see the old state); delete the version entries the new
//!   pointer no longer keeps. An interruption before the commit leaves entries nothing refers to
//!   (the next write of the same version number replaces them), or an index name without a
//!   pointer, which List skips.
//! - **Revoke**: write the tombstone first (it drops an inline value), so every reader answers
//!   `Revoked` at once, then delete the version entries. The tombstone lists them until a later
//!   write has deleted them, and a repeated revoke retries their deletion; revoke succeeds only
//!   once they are gone.

use std::time::{SystemTime, UNIX_EPOCH};

use keyhole_providers::protocol::{Description, ErrorCode, ProviderError, SecretBytes};
use keyhole_providers::{Resolved, StoreRequest};

use crate::backend::Keychain;
use crate::layout::{self, Pointer, name_hash, parse_version, pointer_user, version_user};

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

/// The pointer of `name` and, when `with_value`, its inline value; `None` if it never existed.
fn read_pointer(
    kc: &Keychain,
    name: &str,
    hash: &str,
    with_value: bool,
) -> Result<Option<(Pointer, Option<SecretBytes>)>, ProviderError> {
    let what = pointer_what(name);
    let Some(bytes) = kc.get(&pointer_user(hash), &what)? else {
        return Ok(None);
    };
    let (pointer, value) = Pointer::open(&bytes, &what, with_value)?;
    if pointer.name != name {
        return Err(ProviderError::internal(format!(
            "{what} belongs to another name with the same hash {hash}; keyhole cannot keep both"
        )));
    }
    Ok(Some((pointer, value)))
}

fn write_pointer(
    kc: &Keychain,
    pointer: &mut Pointer,
    hash: &str,
    value: Option<&[u8]>,
) -> Result<(), ProviderError> {
    let sealed = pointer.seal(value)?;
    kc.set(
        &pointer_user(hash),
        &pointer_label(&pointer.name),
        &sealed,
        &pointer_what(&pointer.name),
    )
}

/// Resolve: the current value, or the pinned version.
pub fn resolve(
    kc: &Keychain,
    name: &str,
    version: Option<&str>,
) -> Result<Resolved, ProviderError> {
    kc.check_access()?;
    let hash = name_hash(name);
    for _ in 0..RESOLVE_ATTEMPTS {
        let (pointer, inline) =
            read_pointer(kc, name, &hash, true)?.ok_or_else(|| ProviderError::not_found(name))?;
        let Some(current) = pointer.current else {
            return Err(ProviderError::revoked(name));
        };
        let v = match version {
            None => current,
            Some(asked) => match parse_version(asked) {
                Some(v) if pointer.keeps(v) => v,
                // Version numbers start at 1: "0" was never a version, revoked or not.
                Some(v) if v > 0 && v <= pointer.revoked_through => {
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
        if v == current
            && let Some(value) = inline
        {
            return Ok(Resolved {
                value,
                version: v.to_string(),
            });
        }
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
    match read_pointer(kc, &name, &hash, !create_only)? {
        Some(_) if create_only => Err(ProviderError::new(
            ErrorCode::AlreadyExists,
            format!("a secret named {name:?} already exists"),
        )),
        Some((mut pointer, inline)) => {
            pointer.labels = labels;
            commit(kc, pointer, inline, &hash, &value, now, keep, false)
        }
        None => commit(
            kc,
            Pointer::new(&name, now, labels),
            None,
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
    let (pointer, inline) =
        read_pointer(kc, name, &hash, true)?.ok_or_else(|| ProviderError::not_found(name))?;
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
    commit(kc, pointer, inline, &hash, value, now_ms(), keep, false)
}

/// Writes a new version of `pointer` and commits it; `old_inline` is the current value the
/// pointer holds inline, if any. See the module comment for the order.
#[allow(clippy::too_many_arguments)]
fn commit(
    kc: &Keychain,
    mut pointer: Pointer,
    old_inline: Option<SecretBytes>,
    hash: &str,
    value: &SecretBytes,
    now: u64,
    keep: u32,
    new_name: bool,
) -> Result<String, ProviderError> {
    let name = pointer.name.clone();
    let cap = kc.kind().entry_cap();
    // The old current value, when inline, has no entry of its own yet.
    let moved = pointer.current.filter(|_| old_inline.is_some());
    let old_garbage = std::mem::take(&mut pointer.garbage);
    let v = pointer.push(now, keep)?;
    // Deleted even when `moved` (with --keep 1): an interrupted rotate may have left its entry.
    let trimmed = pointer.garbage.clone();
    // Decide where the value goes, and refuse a pointer the store cannot hold, before writing.
    let mut largest = pointer.clone();
    largest.garbage = old_garbage.iter().chain(&trimmed).copied().collect();
    let inline = largest.sealed_len(Some(value.len()))? <= cap;
    if !inline {
        let size = largest.sealed_len(None)?;
        if size > cap {
            return Err(ProviderError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "the pointer entry of {name:?} would need {size} bytes, more than the {cap} \
                     bytes an entry of {} holds; use a shorter name or fewer labels",
                    kc.kind().describe()
                ),
            ));
        }
    }
    if new_name {
        kc.index().ensure(kc, &name)?;
    }
    if let (Some(c), Some(old_value)) = (moved, &old_inline)
        && pointer.keeps(c)
    {
        let sealed = layout::seal_value(old_value.expose());
        kc.set(
            &version_user(hash, c),
            &version_label(&name, c),
            &sealed,
            &version_what(&name, c),
        )?;
    }
    drop(old_inline);
    if !inline {
        let sealed = layout::seal_value(value.expose());
        kc.set(
            &version_user(hash, v),
            &version_label(&name, v),
            &sealed,
            &version_what(&name, v),
        )?;
    }
    let mut garbage = delete_versions(kc, &name, hash, &old_garbage);
    garbage.extend(trimmed.iter().copied());
    pointer.garbage = garbage;
    write_pointer(kc, &mut pointer, hash, inline.then(|| value.expose()))?;
    // Best effort: the pointer lists them, and the next write retries what fails here.
    delete_versions(kc, &name, hash, &trimmed);
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
pub fn revoke(
    kc: &Keychain,
    deadline: std::time::Instant,
    name: &str,
) -> Result<(), ProviderError> {
    kc.check_access()?;
    let _lock = kc.lock(deadline)?;
    let hash = name_hash(name);
    let (mut pointer, _) =
        read_pointer(kc, name, &hash, false)?.ok_or_else(|| ProviderError::not_found(name))?;
    if pointer.current.is_some() {
        // The kept versions join the garbage, the current one too even when it is inline: an
        // interrupted rotate may have left an entry for it.
        pointer.revoke(now_ms());
        write_pointer(kc, &mut pointer, &hash, None)?;
    }
    // On a repeat this retries what an interrupted revoke left; the pointer is not rewritten, so
    // `updated_at_ms` stays. The version after the last one goes too: an interrupted store or
    // rotate may have written its entry without committing it.
    let uncommitted = pointer.counter.checked_add(1);
    for v in pointer.garbage.iter().copied().chain(uncommitted) {
        kc.delete(&version_user(&hash, v), &version_what(name, v))?;
    }
    Ok(())
}

/// Describe.
pub fn describe(kc: &Keychain, name: &str) -> Result<Description, ProviderError> {
    kc.check_access()?;
    read_pointer(kc, name, &name_hash(name), false)?
        .map(|(p, _)| p.describe())
        .ok_or_else(|| ProviderError::not_found(name))
}

/// The Description of a name the index lists, or `None` if its pointer does not exist (a store
/// interrupted between the index and the pointer).
pub fn describe_listed(kc: &Keychain, name: &str) -> Result<Option<Description>, ProviderError> {
    Ok(read_pointer(kc, name, &name_hash(name), false)?.map(|(p, _)| p.describe()))
}

/// The indexed names under `prefix` after `after`, sorted by byte order.
pub fn list_names(
    kc: &Keychain,
    prefix: &str,
    after: Option<&str>,
) -> Result<Vec<String>, ProviderError> {
    kc.check_access()?;
    Ok(kc
        .index()
        .names(kc)?
        .into_iter()
        .filter(|n| n.starts_with(prefix) && after.is_none_or(|a| n.as_str() > a))
        .collect())
}
