//! The name index: the keychain cannot enumerate its entries portably, so every name ever stored
//! is appended to a chunked list (`index`, `index:0`, `index:1`, ... in [`crate::layout`]).
//!
//! The index is append-only: a revoked secret stays listed, and nothing is ever removed. That
//! makes an in-process copy safe to keep: a name seen in it stays in it. Before using the copy,
//! the provider re-reads the head and the chunks from the last one it knew, which is all another
//! process can have changed.
//!
//! Appends are grouped: every Store registers its name as pending when it arrives, and the first
//! one that has to append a new name appends every pending name the index lacks, in one write.
//! A burst of creates then costs one index write instead of one each. A pending name indexed
//! this way whose store then fails (or finds the secret exists) is harmless: the index may list
//! names without a pointer, and List skips them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};

use keyhole_providers::protocol::ProviderError;

use crate::backend::Keychain;
use crate::layout::{FORMAT, INDEX_HEAD, IndexChunk, IndexHead, index_chunk_user};

/// The in-process copy of the index, and the names of stores in flight.
#[derive(Debug, Default)]
pub struct NameIndex {
    copy: Mutex<Copy>,
    pending: Mutex<BTreeMap<String, usize>>,
}

#[derive(Debug, Default)]
struct Copy {
    /// Whether `names` reflects the keychain up to `chunks`.
    loaded: bool,
    /// The head's chunk count when last read.
    chunks: u32,
    /// The content of chunk `chunks - 1`.
    last: IndexChunk,
    /// Every name in the index.
    names: BTreeSet<String>,
}

/// How long a keychain thread waits for the index copy, which another thread holds across
/// keychain calls. Longer than any sane backend deadline, but finite: behind a call stuck on a
/// hung daemon, later threads give up instead of piling up for ever (their requests have been
/// answered at their own deadlines already).
const INDEX_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Locks `m`, waiting at most [`INDEX_WAIT`].
fn guard_within<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>, ProviderError> {
    let deadline = std::time::Instant::now() + INDEX_WAIT;
    loop {
        match m.try_lock() {
            Ok(g) => return Ok(g),
            Err(std::sync::TryLockError::Poisoned(p)) => return Ok(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            Err(std::sync::TryLockError::WouldBlock) => {
                return Err(ProviderError::new(
                    keyhole_providers::protocol::ErrorCode::Unavailable,
                    "the name index is held by a keychain call that has not returned",
                ));
            }
        }
    }
}

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

const INDEX_WHAT: &str = "the name index";

fn chunk_what(k: u32) -> String {
    format!("chunk {k} of the name index")
}

fn chunk_label(k: u32) -> String {
    format!("keyhole: name index, chunk {k}")
}

/// Registration of a store in flight; unregisters when dropped.
#[derive(Debug)]
pub struct Pending<'a> {
    index: &'a NameIndex,
    name: String,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let mut pending = guard(&self.index.pending);
        if let Some(n) = pending.get_mut(&self.name) {
            *n -= 1;
            if *n == 0 {
                pending.remove(&self.name);
            }
        }
    }
}

impl NameIndex {
    /// Registers a store of `name` until the returned guard is dropped.
    pub fn register(&self, name: &str) -> Pending<'_> {
        *guard(&self.pending).entry(name.to_string()).or_insert(0) += 1;
        Pending {
            index: self,
            name: name.to_string(),
        }
    }

    /// Every indexed name, fresh from the keychain (only what may have changed is read).
    pub fn names(&self, kc: &Keychain) -> Result<BTreeSet<String>, ProviderError> {
        let mut copy = guard_within(&self.copy)?;
        refresh(&mut copy, kc)?;
        Ok(copy.names.clone())
    }

    /// Makes sure `name` is indexed, appending it together with every pending name the index
    /// lacks. Call under the write lock, before the name's pointer is first written.
    pub fn ensure(&self, kc: &Keychain, name: &str) -> Result<(), ProviderError> {
        let mut copy = guard_within(&self.copy)?;
        // A name once seen stays indexed: no keychain call at all.
        if copy.loaded && copy.names.contains(name) {
            return Ok(());
        }
        refresh(&mut copy, kc)?;
        if copy.names.contains(name) {
            return Ok(());
        }
        let mut new: BTreeSet<String> = guard(&self.pending)
            .keys()
            .filter(|n| !copy.names.contains(*n))
            .cloned()
            .collect();
        new.insert(name.to_string());
        let result = append(&mut copy, kc, new);
        if result.is_err() {
            // What the keychain holds is now uncertain: read it all again next time.
            *copy = Copy::default();
        }
        result
    }
}

/// The most index chunks a head may claim (far more names than any keychain holds).
const MAX_CHUNKS: u32 = 65_536;

/// Brings `copy` up to date: the head, then every chunk from the last one known.
fn refresh(copy: &mut Copy, kc: &Keychain) -> Result<(), ProviderError> {
    let head = match kc.get(INDEX_HEAD, INDEX_WHAT)? {
        Some(bytes) => IndexHead::from_bytes(&bytes)?,
        None => IndexHead {
            f: FORMAT,
            chunks: 0,
        },
    };
    if head.chunks > MAX_CHUNKS {
        // A damaged or foreign head: never start millions of keychain reads on its word.
        return Err(ProviderError::internal(format!(
            "the name index head claims {} chunks (at most {MAX_CHUNKS} are possible); it is \
             damaged or was not written by keyhole",
            head.chunks
        )));
    }
    if !copy.loaded || head.chunks < copy.chunks {
        // First use, or the index was reset outside keyhole: read everything.
        *copy = Copy::default();
    }
    let from = copy.chunks.saturating_sub(1);
    for k in from..head.chunks {
        let chunk = match kc.get(&index_chunk_user(k), &chunk_what(k))? {
            Some(bytes) => IndexChunk::from_bytes(&bytes, k)?,
            // Never committed by the head (an interrupted append); an empty chunk stands in.
            None => IndexChunk {
                f: FORMAT,
                names: Vec::new(),
            },
        };
        copy.names.extend(chunk.names.iter().cloned());
        copy.last = chunk;
    }
    copy.chunks = head.chunks;
    copy.loaded = true;
    Ok(())
}

/// Appends `new` (none of them indexed yet) to the last chunk, starting new chunks as they fill;
/// the head is written last, and only if the chunk count grew.
fn append(copy: &mut Copy, kc: &Keychain, new: BTreeSet<String>) -> Result<(), ProviderError> {
    let cap = kc.kind().index_chunk_cap();
    let mut k = copy.chunks.saturating_sub(1);
    let mut chunk = if copy.chunks == 0 {
        IndexChunk {
            f: FORMAT,
            names: Vec::new(),
        }
    } else {
        copy.last.clone()
    };
    let mut chunks = copy.chunks.max(1);
    let mut dirty = false;
    for name in &new {
        chunk.names.push(name.clone());
        if chunk.to_bytes()?.len() > cap && chunk.names.len() > 1 {
            // Full: write it without this name, and start the next chunk with it.
            chunk.names.pop();
            if dirty {
                write_chunk(kc, k, &chunk)?;
            }
            k = k
                .checked_add(1)
                .ok_or_else(|| ProviderError::internal("the name index is full"))?;
            chunks = k + 1;
            chunk = IndexChunk {
                f: FORMAT,
                names: vec![name.clone()],
            };
        }
        dirty = true;
    }
    if dirty {
        write_chunk(kc, k, &chunk)?;
    }
    if chunks != copy.chunks {
        let head = IndexHead { f: FORMAT, chunks };
        kc.set(
            INDEX_HEAD,
            "keyhole: name index",
            &head.to_bytes()?,
            INDEX_WHAT,
        )?;
    }
    copy.names.extend(new);
    copy.last = chunk;
    copy.chunks = chunks;
    Ok(())
}

fn write_chunk(kc: &Keychain, k: u32, chunk: &IndexChunk) -> Result<(), ProviderError> {
    kc.set(
        &index_chunk_user(k),
        &chunk_label(k),
        &chunk.to_bytes()?,
        &chunk_what(k),
    )
}
