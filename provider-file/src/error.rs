//! What can go wrong in the file store, and how each maps to a protocol error code.

use std::path::PathBuf;

use keyhole_providers::protocol::{ErrorCode, ProviderError};

/// A file-store failure. Messages name records and paths, never values.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No secret has this name.
    #[error("no secret named {0:?}")]
    NotFound(String),
    /// The secret is revoked.
    #[error("secret {0:?} is revoked; rotate or store it to restore it")]
    Revoked(String),
    /// The pinned version is unknown or no longer kept.
    #[error("version {version:?} of {name:?} is not kept")]
    VersionUnavailable {
        /// The secret.
        name: String,
        /// The version asked for.
        version: String,
    },
    /// `expected_version` is stale.
    #[error("{name:?} is at version {current}, not {expected:?}")]
    Conflict {
        /// The secret.
        name: String,
        /// The caller's expectation.
        expected: String,
        /// The current version, or "(revoked)".
        current: String,
    },
    /// `create_only` on an existing name.
    #[error("a secret named {0:?} already exists")]
    AlreadyExists(String),
    /// One record failed its checksum, decoding or decryption.
    #[error("record {file} ({}) is damaged: {reason}", name.as_deref().map_or("name unreadable".to_string(), |n| format!("secret {n:?}")))]
    Damaged {
        /// The record file's name.
        file: String,
        /// The secret's name, when known.
        name: Option<String>,
        /// What is wrong.
        reason: String,
    },
    /// The KEK does not open this store.
    #[error("wrong key or passphrase")]
    WrongKey,
    /// Another process holds the store lock for too long.
    #[error("the store is locked by another process (waited {0:?})")]
    LockTimeout(std::time::Duration),
    /// The store was re-keyed by another process while this one was running.
    #[error("the store was re-keyed by another process; restart this provider with the new key")]
    Rekeyed,
    /// The store header is missing, truncated or not a keyhole store.
    #[error("{path}: {reason}")]
    Header {
        /// The header file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A key or passphrase file is readable by others.
    #[error("{path} has mode {mode:o}; it must not be accessible by group or others (chmod 600 {path}), or pass --danger-allow-insecure-key-file", path = path.display())]
    InsecureFile {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Argon2 parameters below the floor or above the ceiling.
    #[error("{0}")]
    WeakKdf(String),
    /// A usage problem: what to do instead.
    #[error("{0}")]
    Usage(String),
    /// A file-system operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        source: std::io::Error,
    },
}

impl StoreError {
    /// An `Io` error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> StoreError {
        StoreError::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<StoreError> for ProviderError {
    fn from(e: StoreError) -> ProviderError {
        let code = match &e {
            StoreError::NotFound(_) => ErrorCode::NotFound,
            StoreError::Revoked(_) => ErrorCode::Revoked,
            StoreError::VersionUnavailable { .. } => ErrorCode::VersionUnavailable,
            StoreError::Conflict { .. } => ErrorCode::Conflict,
            StoreError::AlreadyExists(_) => ErrorCode::AlreadyExists,
            StoreError::LockTimeout(_) => ErrorCode::Unavailable,
            // Retrying cannot help: only a restart with the new key can.
            StoreError::WrongKey | StoreError::Rekeyed => ErrorCode::Unauthenticated,
            StoreError::Usage(_) => ErrorCode::InvalidRequest,
            StoreError::Damaged { .. }
            | StoreError::Header { .. }
            | StoreError::InsecureFile { .. }
            | StoreError::WeakKdf(_)
            | StoreError::Io { .. } => ErrorCode::Internal,
        };
        ProviderError::new(code, e.to_string())
    }
}
