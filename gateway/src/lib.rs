//! The keyhole gateway (work in progress: see the gateway issue).
//!
//! Modules so far:
//! - [`redact`]: every value the gateway resolved or stored, redacted from everything it emits,
//!   in raw, base64, hex and URL-encoded forms, safely across split writes.
//! - [`state`]: the handle mapping in SQLite (handle → provider, name, version pin, scope, labels,
//!   state, timestamps), never a value.
//! - [`audit`]: the hash-chained, durable audit log and its verification.
//! - [`manager`]: providers spawned or dialled, supervised, restarted with backoff.
//! - [`defaults`]: with no configuration, the keychain when a Secret Service answers, else the
//!   file store.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod api;
pub mod audit;
pub mod client;
pub mod config;
pub mod defaults;
pub mod journal;
pub mod manager;
pub mod policy;
pub mod redact;
pub mod server;
pub mod state;
