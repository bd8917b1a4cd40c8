//! One secret's record file: every kept version, each value sealed under its own DEK, each DEK
//! wrapped by the KEK, all behind a checksum.
//!
//! Layout: `KHFR` | format (u16 big-endian, 1) | SHA-256 of the body (32 bytes) | body (bincode).

use std::collections::BTreeMap;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use keyhole_providers::protocol::SecretBytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::error::StoreError;
use crate::kek::{KEY_LEN, Kek, random};

const MAGIC: &[u8; 4] = b"KHFR";
const FORMAT: u16 = 1;
const PREFIX: usize = 4 + 2 + 32;
const NONCE_LEN: usize = 12;

/// The persisted form of one secret. Ciphertexts only: no plaintext value or DEK is ever here.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    /// The secret's name (also bound into every ciphertext's AAD).
    pub name: String,
    /// When the name was first stored (ms since the epoch).
    pub created_ms: u64,
    /// When it last changed.
    pub updated_ms: u64,
    /// Labels from Store.
    pub labels: BTreeMap<String, String>,
    /// Whether every version is revoked.
    pub revoked: bool,
    /// The last version number issued; versions are never reused.
    pub counter: u64,
    /// Kept versions, oldest first.
    pub versions: Vec<SealedVersion>,
    /// Versions destroyed by a revoke: they answer Revoked forever.
    pub revoked_versions: Vec<u64>,
}

/// One version: its value under a fresh DEK, and that DEK wrapped by the KEK.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SealedVersion {
    /// The version number.
    pub version: u64,
    /// When it was written.
    pub created_ms: u64,
    /// Nonce and AES-256-GCM ciphertext of the DEK under the KEK.
    pub wrapped_dek: Vec<u8>,
    /// Nonce and AES-256-GCM ciphertext of the value under the DEK.
    pub sealed_value: Vec<u8>,
}

/// The additional data binding a ciphertext to its store, name and version, so it cannot be
/// moved to another record.
fn aad(purpose: &[u8], store_id: &[u8; 16], name: &str, version: u64) -> Vec<u8> {
    let mut a = Vec::with_capacity(purpose.len() + 16 + 4 + name.len() + 8);
    a.extend_from_slice(purpose);
    a.extend_from_slice(store_id);
    a.extend_from_slice(&(name.len() as u32).to_be_bytes());
    a.extend_from_slice(name.as_bytes());
    a.extend_from_slice(&version.to_be_bytes());
    a
}

fn seal(key: &[u8; KEY_LEN], plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, StoreError> {
    let nonce = random::<NONCE_LEN>()?;
    let cipher = Aes256Gcm::new(key.into());
    let mut out = nonce.to_vec();
    let ct = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| StoreError::Usage("encryption failed".into()))?;
    out.extend_from_slice(&ct);
    Ok(out)
}

fn open(key: &[u8; KEY_LEN], sealed: &[u8], aad: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    if sealed.len() < NONCE_LEN {
        return None;
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    Aes256Gcm::new(key.into())
        .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
        .ok()
        .map(Zeroizing::new)
}

/// Encrypts the KEK check value written in the store header.
pub fn seal_check(kek: &Kek, store_id: &[u8; 16]) -> Result<Vec<u8>, StoreError> {
    seal(
        &kek.0,
        b"keyhole kek check v1",
        &aad(b"keyhole-check-v1", store_id, "", 0),
    )
}

/// Whether `kek` opens the header's check value.
pub fn open_check(kek: &Kek, store_id: &[u8; 16], sealed: &[u8]) -> bool {
    open(&kek.0, sealed, &aad(b"keyhole-check-v1", store_id, "", 0))
        .is_some_and(|p| p.as_slice() == b"keyhole kek check v1")
}

impl SealedVersion {
    /// Seals `value` as version `version` of `name` under a fresh random DEK.
    pub fn seal(
        kek: &Kek,
        store_id: &[u8; 16],
        name: &str,
        version: u64,
        created_ms: u64,
        value: &SecretBytes,
    ) -> Result<SealedVersion, StoreError> {
        let dek = Zeroizing::new(random::<KEY_LEN>()?);
        let sealed_value = seal(
            &dek,
            value.expose(),
            &aad(b"keyhole-value-v1", store_id, name, version),
        )?;
        let wrapped_dek = seal(
            &kek.0,
            dek.as_slice(),
            &aad(b"keyhole-dek-v1", store_id, name, version),
        )?;
        Ok(SealedVersion {
            version,
            created_ms,
            wrapped_dek,
            sealed_value,
        })
    }

    /// Unwraps the DEK with `kek`.
    fn dek(&self, kek: &Kek, store_id: &[u8; 16], name: &str) -> Option<Zeroizing<[u8; KEY_LEN]>> {
        let dek = open(
            &kek.0,
            &self.wrapped_dek,
            &aad(b"keyhole-dek-v1", store_id, name, self.version),
        )?;
        let key: [u8; KEY_LEN] = dek.as_slice().try_into().ok()?;
        Some(Zeroizing::new(key))
    }

    /// Decrypts the value; `None` if the DEK or the value fails authentication.
    pub fn open(&self, kek: &Kek, store_id: &[u8; 16], name: &str) -> Option<SecretBytes> {
        let dek = self.dek(kek, store_id, name)?;
        let mut value = open(
            &dek,
            &self.sealed_value,
            &aad(b"keyhole-value-v1", store_id, name, self.version),
        )?;
        Some(SecretBytes::new(std::mem::take(&mut *value)))
    }

    /// Re-wraps the DEK from `old` to `new` without touching the value.
    pub fn rewrap(&mut self, old: &Kek, new: &Kek, store_id: &[u8; 16], name: &str) -> Option<()> {
        let dek = self.dek(old, store_id, name)?;
        self.wrapped_dek = seal(
            &new.0,
            dek.as_slice(),
            &aad(b"keyhole-dek-v1", store_id, name, self.version),
        )
        .ok()?;
        Some(())
    }
}

/// The record file's name for a secret name: 32 hex digits of a hash. Names never become paths.
pub fn file_name(name: &str) -> String {
    let digest = Sha256::new()
        .chain_update(b"keyhole-file-record-name\0")
        .chain_update(name.as_bytes())
        .finalize();
    hex::encode(&digest[..16])
}

impl Record {
    /// The record's bytes on disk.
    pub fn encode(&self) -> Result<Vec<u8>, StoreError> {
        let body = bincode::serde::encode_to_vec(self, bincode::config::standard())
            .map_err(|e| StoreError::Usage(format!("cannot encode a record: {e}")))?;
        let mut out = Vec::with_capacity(PREFIX + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT.to_be_bytes());
        out.extend_from_slice(&Sha256::digest(&body));
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Parses a record file. `file` and `expect` (the name looked up, if any) go into errors.
    pub fn decode(bytes: &[u8], file: &str, expect: Option<&str>) -> Result<Record, StoreError> {
        let damaged = |reason: String| StoreError::Damaged {
            file: file.to_string(),
            name: expect.map(str::to_string),
            reason,
        };
        if bytes.len() < PREFIX {
            return Err(damaged(format!("truncated to {} bytes", bytes.len())));
        }
        if &bytes[..4] != MAGIC {
            return Err(damaged("not a keyhole record (bad magic)".into()));
        }
        let format = u16::from_be_bytes([bytes[4], bytes[5]]);
        if format != FORMAT {
            return Err(damaged(format!("unknown record format {format}")));
        }
        let body = &bytes[PREFIX..];
        if Sha256::digest(body).as_slice() != &bytes[6..PREFIX] {
            return Err(damaged(
                "checksum mismatch (a flipped bit, or a torn write)".into(),
            ));
        }
        let (record, used): (Record, usize) = bincode::serde::decode_from_slice(
            body,
            bincode::config::standard().with_limit::<{ 256 << 20 }>(),
        )
        .map_err(|_| damaged("body does not decode".into()))?;
        if used != body.len() {
            return Err(damaged("trailing bytes after the body".into()));
        }
        if let Some(expected) = expect
            && record.name != expected
        {
            return Err(damaged(format!("holds secret {:?} instead", record.name)));
        }
        Ok(record)
    }
}
