//! How secrets map onto keychain entries.
//!
//! A keychain entry is (service, user) → bytes. Every entry this provider writes has the
//! `--service` namespace (default `keyhole`) and one of these users:
//!
//! | user | holds |
//! |---|---|
//! | `ptr:<H>` | the **pointer** of one secret: the byte `02`, the length of the metadata (u32, big-endian), the metadata as JSON (name, version counter, current version or none for the revocation tombstone, kept versions, labels, timestamps), then the current value when it is stored inline |
//! | `ver:<H>:<N>` | version `N` of that secret when it is not inline in the pointer: the byte `01`, then the raw value |
//! | `index` | the name index's head: how many chunks it has, as JSON |
//! | `index:<K>` | chunk `K` of the name index: a JSON list of names |
//!
//! `<H>` is the first 16 bytes of SHA-256 of the name, in lowercase hex: names are up to 1024
//! bytes and may hold any character, while keychain user fields are short (513 characters on
//! Windows). The pointer stores the full name and is checked against it on every read.
//!
//! The current value is kept inline in the pointer whenever pointer and value fit one entry
//! (always on the Secret Service and macOS; on keyutils and Windows, when the value is small
//! enough): creating a secret is then one keychain write besides the index, and resolving it one
//! read. Every keychain write is expensive (gnome-keyring rewrites its whole keyring file), so
//! this halves the cost of a store. Older kept versions, and a current value too large to be
//! inline, live in `ver:` entries.
//!
//! The one-byte prefixes are format tags. The one of a version entry also makes the empty value
//! storable: the kernel keyring refuses an empty payload.

use std::collections::BTreeMap;

use keyhole_providers::protocol::{
    Description, ErrorCode, ProviderError, SecretBytes, SecretState, VersionInfo,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// The format of every JSON record, and the tag byte of every version entry.
pub const FORMAT: u32 = 1;

/// The first byte of a version entry: format 1, the raw value follows.
pub const VALUE_TAG: u8 = 0x01;

/// The first byte of a pointer entry: format 1, then the metadata length and the metadata.
pub const POINTER_TAG: u8 = 0x02;

/// The bytes a pointer entry adds to its metadata: the tag and the length.
pub const POINTER_OVERHEAD: usize = 5;

/// The bytes a version entry adds to its value.
pub const VALUE_OVERHEAD: usize = 1;

/// The key of a name: 32 lowercase hex characters.
pub fn name_hash(name: &str) -> String {
    let digest = Sha256::digest(name.as_bytes());
    hex::encode(&digest[..16])
}

/// The user of a secret's pointer entry.
pub fn pointer_user(hash: &str) -> String {
    format!("ptr:{hash}")
}

/// The user of version `version` of a secret.
pub fn version_user(hash: &str, version: u64) -> String {
    format!("ver:{hash}:{version}")
}

/// The user of the name index's head entry.
pub const INDEX_HEAD: &str = "index";

/// The user of chunk `k` of the name index.
pub fn index_chunk_user(k: u32) -> String {
    format!("index:{k}")
}

/// The user of the entry the keyutils health probe writes and deletes.
pub const PROBE: &str = "probe";

/// A version entry's bytes: the tag, then the value. Zeroized when dropped.
pub fn seal_value(value: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(value.len() + VALUE_OVERHEAD));
    out.push(VALUE_TAG);
    out.extend_from_slice(value);
    out
}

/// The value in a version entry's bytes, or `None` if they do not carry the tag.
pub fn open_value(stored: &[u8]) -> Option<SecretBytes> {
    match stored.split_first() {
        Some((&VALUE_TAG, value)) => Some(SecretBytes::copy_from(value)),
        _ => None,
    }
}

/// A kept version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kept {
    /// The version number.
    pub v: u64,
    /// When it was written, in milliseconds since the Unix epoch.
    pub at: u64,
}

/// One secret's pointer entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pointer {
    /// Record format ([`FORMAT`]).
    pub f: u32,
    /// The secret's full name (the entry is found by its hash).
    pub name: String,
    /// The highest version number ever issued; versions are never reused, not even after a
    /// revoke.
    pub counter: u64,
    /// The current version; `None` is the revocation tombstone.
    pub current: Option<u64>,
    /// Whether the current value follows the metadata in the pointer entry (else it is in its
    /// version entry).
    #[serde(default)]
    pub inline: bool,
    /// The versions still readable, oldest first; empty while revoked.
    pub kept: Vec<Kept>,
    /// Every version up to this one was revoked: a pinned resolve of it answers `Revoked`.
    pub revoked_through: u64,
    /// Version entries that may still exist and must be deleted (trimmed or revoked versions
    /// whose deletion has not been confirmed). Every later write of the pointer retries them.
    #[serde(default)]
    pub garbage: Vec<u64>,
    /// When the name was first stored.
    pub created_ms: u64,
    /// When it last changed (store, rotate, revoke).
    pub updated_ms: u64,
    /// The labels given at the last store.
    pub labels: BTreeMap<String, String>,
}

impl Pointer {
    /// A new pointer with no version yet.
    pub fn new(name: &str, now: u64, labels: BTreeMap<String, String>) -> Pointer {
        Pointer {
            f: FORMAT,
            name: name.to_string(),
            counter: 0,
            current: None,
            inline: false,
            kept: Vec::new(),
            revoked_through: 0,
            garbage: Vec::new(),
            created_ms: now,
            updated_ms: now,
            labels,
        }
    }

    /// The Describe answer.
    pub fn describe(&self) -> Description {
        Description {
            name: self.name.clone(),
            state: if self.current.is_some() {
                SecretState::Active
            } else {
                SecretState::Revoked
            },
            current_version: self.current.map(|v| v.to_string()),
            versions: self
                .kept
                .iter()
                .map(|k| VersionInfo {
                    version: k.v.to_string(),
                    created_at_ms: k.at,
                })
                .collect(),
            created_at_ms: self.created_ms,
            updated_at_ms: self.updated_ms,
            labels: self.labels.clone(),
        }
    }

    /// Whether version `v` is kept.
    pub fn keeps(&self, v: u64) -> bool {
        self.kept.iter().any(|k| k.v == v)
    }

    /// Issues the next version, makes it current (un-revoking), and trims the kept list to
    /// `keep`; the trimmed versions join the garbage. Returns the new version.
    pub fn push(&mut self, now: u64, keep: u32) -> Result<u64, ProviderError> {
        let v = self.counter.checked_add(1).ok_or_else(|| {
            ProviderError::internal(format!("{:?} has run out of version numbers", self.name))
        })?;
        self.counter = v;
        self.current = Some(v);
        self.kept.push(Kept { v, at: now });
        let keep = keep.max(1) as usize;
        if self.kept.len() > keep {
            let excess = self.kept.len() - keep;
            self.garbage.extend(self.kept.drain(..excess).map(|k| k.v));
        }
        self.updated_ms = now;
        Ok(v)
    }

    /// Turns the pointer into a tombstone; the kept versions join the garbage.
    pub fn revoke(&mut self, now: u64) {
        self.garbage.extend(self.kept.drain(..).map(|k| k.v));
        self.current = None;
        self.inline = false;
        self.revoked_through = self.counter;
        self.updated_ms = now;
    }

    /// The pointer entry's bytes, with `value` inline if given (and `inline` set to match).
    /// Zeroized when dropped.
    pub fn seal(&mut self, value: Option<&[u8]>) -> Result<Zeroizing<Vec<u8>>, ProviderError> {
        self.inline = value.is_some();
        let meta = to_json(self)?;
        let len = u32::try_from(meta.len())
            .map_err(|_| ProviderError::internal("a pointer's metadata exceeds 4 GiB"))?;
        let value = value.unwrap_or_default();
        let mut out = Zeroizing::new(Vec::with_capacity(
            POINTER_OVERHEAD + meta.len() + value.len(),
        ));
        out.push(POINTER_TAG);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&meta);
        out.extend_from_slice(value);
        Ok(out)
    }

    /// The size of the pointer entry with `value_len` bytes inline (`None`: not inline).
    pub fn sealed_len(&self, value_len: Option<usize>) -> Result<usize, ProviderError> {
        let mut meta = self.clone();
        meta.inline = value_len.is_some();
        Ok(POINTER_OVERHEAD + to_json(&meta)?.len() + value_len.unwrap_or(0))
    }

    /// Parses a pointer entry read from the keychain; `what` names it in errors. The inline
    /// value, if any, comes back too (only when `with_value`; otherwise it stays in `bytes`,
    /// which the caller zeroizes).
    pub fn open(
        bytes: &[u8],
        what: &str,
        with_value: bool,
    ) -> Result<(Pointer, Option<SecretBytes>), ProviderError> {
        let damaged = |why: &str| {
            ProviderError::internal(format!(
                "{what} in the keychain is damaged or not keyhole's ({why}); revoke and store \
                 the secret again"
            ))
        };
        let (tag, rest) = bytes.split_first().ok_or_else(|| damaged("empty"))?;
        if *tag != POINTER_TAG {
            return Err(damaged("unknown format tag"));
        }
        let (len, rest) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| damaged("truncated"))?;
        let len = u32::from_be_bytes(*len) as usize;
        if rest.len() < len {
            return Err(damaged("truncated"));
        }
        let (meta, value) = rest.split_at(len);
        let p: Pointer = parse(meta, what)?;
        check_format(p.f, what)?;
        let inline = p.inline && p.current.is_some();
        if !inline && !value.is_empty() {
            return Err(damaged("unexpected bytes after the metadata"));
        }
        let value = (inline && with_value).then(|| SecretBytes::copy_from(value));
        Ok((p, value))
    }
}

/// The name index's head entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexHead {
    /// Record format ([`FORMAT`]).
    pub f: u32,
    /// How many chunks: `index:0` to `index:<chunks - 1>`.
    pub chunks: u32,
}

/// One chunk of the name index. Names are only ever appended (a revoked secret stays listed);
/// a name may appear twice after an interrupted store, and readers deduplicate.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexChunk {
    /// Record format ([`FORMAT`]).
    pub f: u32,
    /// Names, in the order they were first stored.
    pub names: Vec<String>,
}

impl IndexHead {
    /// The JSON bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ProviderError> {
        to_json(self)
    }

    /// Parses the head read from the keychain.
    pub fn from_bytes(bytes: &[u8]) -> Result<IndexHead, ProviderError> {
        let h: IndexHead = parse(bytes, "the name index")?;
        check_format(h.f, "the name index")?;
        Ok(h)
    }
}

impl IndexChunk {
    /// The JSON bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ProviderError> {
        to_json(self)
    }

    /// Parses chunk `k` read from the keychain.
    pub fn from_bytes(bytes: &[u8], k: u32) -> Result<IndexChunk, ProviderError> {
        let what = format!("chunk {k} of the name index");
        let c: IndexChunk = parse(bytes, &what)?;
        check_format(c.f, &what)?;
        Ok(c)
    }
}

fn to_json<T: Serialize>(record: &T) -> Result<Vec<u8>, ProviderError> {
    // Plain structs of strings, integers and string-keyed maps always serialize.
    serde_json::to_vec(record)
        .map_err(|_| ProviderError::internal("a keychain record could not be serialized"))
}

fn parse<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &str) -> Result<T, ProviderError> {
    // serde_json's messages can quote their input: report only where parsing stopped.
    serde_json::from_slice(bytes).map_err(|e| {
        ProviderError::internal(format!(
            "{what} in the keychain is damaged or not keyhole's (unreadable at line {}, column {}); \
             revoke and store the secret again",
            e.line(),
            e.column()
        ))
    })
}

fn check_format(f: u32, what: &str) -> Result<(), ProviderError> {
    if f == FORMAT {
        Ok(())
    } else {
        Err(ProviderError::new(
            ErrorCode::Internal,
            format!(
                "{what} has format {f}, written by another keyhole version (this one reads {FORMAT})"
            ),
        ))
    }
}

/// A decimal version string as this provider issues it ("1", "2", ...), or `None`.
pub fn parse_version(s: &str) -> Option<u64> {
    let v: u64 = s.parse().ok()?;
    (v.to_string() == s).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_hash_to_fixed_short_keys() {
        let h = name_hash("db/password");
        assert_eq!(h.len(), 32);
        assert!(
            h.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_ne!(h, name_hash("db/password2"));
        assert_eq!(pointer_user(&h), format!("ptr:{h}"));
        assert_eq!(version_user(&h, 7), format!("ver:{h}:7"));
        assert_eq!(name_hash(&"é".repeat(512)).len(), 32);
    }

    #[test]
    fn values_round_trip_including_empty_and_non_utf8() {
        for value in [&b""[..], b"\0", b"\xff\xfe\xc3\x28", b"plain"] {
            let sealed = seal_value(value);
            assert_eq!(sealed[0], VALUE_TAG);
            assert_eq!(open_value(&sealed).unwrap().expose(), value);
        }
        assert!(open_value(b"").is_none());
        assert!(open_value(b"\x02abc").is_none());
    }

    #[test]
    fn versions_are_canonical_decimals() {
        assert_eq!(parse_version("1"), Some(1));
        assert_eq!(parse_version("42"), Some(42));
        for bad in [
            "",
            "0x1",
            "+1",
            "01",
            " 1",
            "-1",
            "kh-conformance-no-such-version",
        ] {
            assert_eq!(parse_version(bad), None, "{bad}");
        }
    }

    #[test]
    fn push_trims_and_revoke_tombstones() {
        let mut p = Pointer::new("n", 5, BTreeMap::new());
        for i in 1..=4 {
            assert_eq!(p.push(10 + i, 2).unwrap(), i);
        }
        assert_eq!(p.kept.iter().map(|k| k.v).collect::<Vec<_>>(), [3, 4]);
        assert_eq!(p.garbage, [1, 2]);
        assert_eq!(p.current, Some(4));
        p.garbage.clear();
        p.revoke(99);
        assert_eq!(p.current, None);
        assert!(p.kept.is_empty());
        assert_eq!(p.garbage, [3, 4]);
        assert_eq!(p.revoked_through, 4);
        assert_eq!(p.describe().state, SecretState::Revoked);
        assert_eq!(p.push(100, 2).unwrap(), 5, "versions are never reused");
        assert_eq!(p.describe().current_version.as_deref(), Some("5"));
    }

    #[test]
    fn pointers_round_trip_with_and_without_an_inline_value() {
        let mut p = Pointer::new("a/b", 1, BTreeMap::from([("k".into(), "v".into())]));
        p.push(2, 10).unwrap();
        for value in [&b""[..], b"\xff\x00value"] {
            let sealed = p.seal(Some(value)).unwrap();
            assert_eq!(sealed.len(), p.sealed_len(Some(value.len())).unwrap());
            assert_eq!(sealed[0], POINTER_TAG);
            let (back, got) = Pointer::open(&sealed, "the pointer", true).unwrap();
            assert_eq!(back, p);
            assert!(back.inline);
            assert_eq!(got.unwrap().expose(), value);
            let (_, none) = Pointer::open(&sealed, "the pointer", false).unwrap();
            assert!(none.is_none());
        }
        let sealed = p.seal(None).unwrap();
        assert_eq!(sealed.len(), p.sealed_len(None).unwrap());
        let (back, got) = Pointer::open(&sealed, "the pointer", true).unwrap();
        assert!(!back.inline);
        assert!(got.is_none());
    }

    #[test]
    fn damaged_pointers_are_reported_without_content() {
        let mut p = Pointer::new("secret-looking", 1, BTreeMap::new());
        p.push(2, 10).unwrap();
        let sealed = p.seal(Some(b"canary-value")).unwrap();
        for cut in [0, 1, 4, 20, sealed.len() - 13] {
            let e = Pointer::open(&sealed[..cut], "the pointer", true).unwrap_err();
            assert_eq!(e.code, ErrorCode::Internal);
            assert!(!e.message.contains("secret-looking"), "{}", e.message);
            assert!(!e.message.contains("canary"), "{}", e.message);
        }
        let mut wrong = sealed.to_vec();
        wrong[0] = VALUE_TAG;
        assert!(Pointer::open(&wrong, "the pointer", true).is_err());
        let mut newer = p.clone();
        newer.f = 2;
        let e = Pointer::open(&newer.seal(None).unwrap(), "the pointer", true).unwrap_err();
        assert!(e.message.contains("format 2"), "{}", e.message);
        // Trailing bytes on a pointer that says nothing is inline.
        let mut extra = p.seal(None).unwrap().to_vec();
        extra.push(0);
        assert!(Pointer::open(&extra, "the pointer", true).is_err());
    }
}
