//! `keyhole-provider-keychain`: secrets in the platform's keychain, through keyring v4's split
//! crates (`keyring-core` plus one credential store per platform).
//!
//! | `--store` | backend | crate |
//! |---|---|---|
//! | `secret-service` | the freedesktop Secret Service over D-Bus (gnome-keyring, KWallet, KeePassXC) | `zbus-secret-service-keyring-store` |
//! | `keyutils` | the Linux kernel's key retention service | `linux-keyutils-keyring-store` |
//! | `macos` | the macOS login keychain | `apple-native-keyring-store` |
//! | `windows` | the Windows Credential Manager | `windows-native-keyring-store` |
//!
//! A keychain holds flat entries (service, user) → bytes, with no versions, no compare-and-set and
//! no portable enumeration. [`layout`] emulates the rest: an entry per version, a pointer entry
//! per name (current version, kept versions, labels, the revocation tombstone) and an
//! append-only name index for `List`. Writes are serialized in the process and, through an
//! advisory lock file, across processes on the same host ([`lock`]).
//!
//! Every keychain call runs on a thread of its own under a deadline (`--backend-timeout-ms`), so
//! a daemon that hangs, or waits on a prompt, yields `Unavailable` instead of a hung request. The
//! provider never triggers an unlock prompt itself: on the Secret Service it checks that the
//! default collection is unlocked before each operation and answers `Locked` when it is not.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod backend;
pub mod index;
pub mod layout;
pub mod lock;
pub mod ops;
pub mod options;
pub mod provider;

pub use backend::Keychain;
pub use options::{KeychainOptions, StoreKind};
pub use provider::KeychainProvider;
