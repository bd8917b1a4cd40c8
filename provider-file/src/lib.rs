//! `keyhole-provider-file`: an envelope-encrypted, versioned, crash-safe secret store on one host.
//!
//! Every secret version is sealed with AES-256-GCM under its own random 256-bit DEK; every DEK is
//! wrapped by the store's KEK (a 32-byte key file, or a passphrase through Argon2id). The AAD of
//! both binds the store id, the name and the version. Each secret is one record file, replaced
//! atomically under an exclusive lock; see [`store`] for the layout.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod error;
pub mod kek;
pub mod provider;
pub mod record;
pub mod store;

pub use error::StoreError;
pub use kek::{Argon2Params, KekSource};
pub use provider::FileProvider;
pub use store::{Store, StoreOptions, VerifyReport};
