//! The provider's own command-line options (the SDK's serve flags are flattened beside them).

use std::path::PathBuf;
use std::time::Duration;

/// Which keychain holds the secrets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum StoreKind {
    /// The freedesktop Secret Service over the D-Bus session bus (gnome-keyring, KWallet,
    /// KeePassXC).
    #[value(name = "secret-service")]
    SecretService,
    /// The Linux kernel's key retention service: the session keyring, linked to the user's
    /// persistent keyring. Needs no daemon; does not survive a reboot.
    Keyutils,
    /// The macOS login keychain.
    Macos,
    /// The Windows Credential Manager.
    Windows,
}

/// Largest value on the Secret Service and the macOS keychain: a sane cap of our choosing (both
/// take far more), large enough for keys, tokens and certificate bundles.
pub const DESKTOP_MAX_VALUE_SIZE: u32 = 64 * 1024;

/// The kernel's limit on a `user` key's payload (`user_preparse` refuses more than 32767 bytes).
pub const KEYUTILS_MAX_PAYLOAD: usize = 32767;

/// The Windows Credential Manager's limit on a credential blob (`CRED_MAX_CREDENTIAL_BLOB_SIZE`).
pub const WINDOWS_MAX_BLOB: usize = 2560;

impl StoreKind {
    /// The platform's desktop store: the Secret Service on Linux and the BSDs, the keychain on
    /// macOS, the Credential Manager on Windows.
    pub fn platform_default() -> Option<StoreKind> {
        if cfg!(target_os = "macos") {
            Some(StoreKind::Macos)
        } else if cfg!(windows) {
            Some(StoreKind::Windows)
        } else if cfg!(target_os = "linux") {
            Some(StoreKind::SecretService)
        } else {
            None
        }
    }

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::SecretService => "secret-service",
            StoreKind::Keyutils => "keyutils",
            StoreKind::Macos => "macos",
            StoreKind::Windows => "windows",
        }
    }

    /// A human name for messages.
    pub fn describe(self) -> &'static str {
        match self {
            StoreKind::SecretService => "the Secret Service",
            StoreKind::Keyutils => "the kernel keyring (keyutils)",
            StoreKind::Macos => "the macOS keychain",
            StoreKind::Windows => "the Windows Credential Manager",
        }
    }

    /// Whether this build can use the store (each is compiled only on its platform).
    pub fn compiled_in(self) -> bool {
        match self {
            StoreKind::SecretService | StoreKind::Keyutils => cfg!(target_os = "linux"),
            StoreKind::Macos => cfg!(target_os = "macos"),
            StoreKind::Windows => cfg!(windows),
        }
    }

    /// The most bytes one keychain entry may hold, as this provider writes it (framing
    /// included). Pointers and index chunks must fit too.
    pub fn entry_cap(self) -> usize {
        match self {
            StoreKind::Keyutils => KEYUTILS_MAX_PAYLOAD,
            StoreKind::Windows => WINDOWS_MAX_BLOB,
            StoreKind::SecretService | StoreKind::Macos => 256 * 1024,
        }
    }

    /// The size of one chunk of the name index.
    pub fn index_chunk_cap(self) -> usize {
        self.entry_cap().min(16 * 1024)
    }
}

/// The keychain provider's settings.
#[derive(Clone, Debug, clap::Args)]
pub struct KeychainOptions {
    /// The keychain: secret-service, keyutils, macos or windows. Default: the platform's desktop
    /// store (secret-service on Linux).
    #[arg(long, value_enum, value_name = "STORE")]
    pub store: Option<StoreKind>,
    /// The namespace of every entry this provider writes (the keychain's "service"): letters,
    /// digits, '.', '_' and '-', at most 64 bytes.
    #[arg(long, default_value = "keyhole", value_name = "NAME", value_parser = parse_service)]
    pub service: String,
    /// Versions kept per secret, the current one included (1 to 100); older ones answer
    /// VersionUnavailable.
    #[arg(long, default_value_t = 10, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub keep: u32,
    /// Deadline of each call into the keychain, in milliseconds. A call that takes longer (a
    /// hung daemon, a prompt nobody answers) answers Unavailable.
    #[arg(long, default_value_t = 3000, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub backend_timeout_ms: u64,
    /// Directory of the advisory write-lock file shared by every provider process of this user
    /// (created 0700). Default: `$XDG_RUNTIME_DIR/keyhole`, else `/tmp/keyhole-<uid>`.
    #[arg(long, value_name = "DIR")]
    pub lock_dir: Option<PathBuf>,
}

impl Default for KeychainOptions {
    fn default() -> KeychainOptions {
        KeychainOptions {
            store: None,
            service: "keyhole".into(),
            keep: 10,
            backend_timeout_ms: 3000,
            lock_dir: None,
        }
    }
}

impl KeychainOptions {
    /// The store these options select, or why there is none.
    pub fn store_kind(&self) -> Result<StoreKind, String> {
        let kind = self.store.or_else(StoreKind::platform_default).ok_or(
            "this platform has no default keychain; choose one with --store \
             secret-service|keyutils|macos|windows",
        )?;
        if !kind.compiled_in() {
            return Err(format!(
                "--store {} is not available in this build: {} exists only on its own platform \
                 (secret-service and keyutils on Linux, macos on macOS, windows on Windows)",
                kind.name(),
                kind.describe()
            ));
        }
        Ok(kind)
    }

    /// The per-call deadline.
    pub fn backend_timeout(&self) -> Duration {
        Duration::from_millis(self.backend_timeout_ms)
    }
}

fn parse_service(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(s.to_string())
    } else {
        Err("use 1 to 64 letters, digits, '.', '_' or '-'".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_are_short_identifiers() {
        assert!(parse_service("keyhole").is_ok());
        assert!(parse_service("kh-test_1.2").is_ok());
        for bad in ["", "a b", "a:b", "a/b", &"x".repeat(65)] {
            assert!(parse_service(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn windows_entries_are_the_smallest() {
        assert_eq!(StoreKind::Windows.entry_cap(), 2560);
        assert_eq!(StoreKind::Windows.index_chunk_cap(), 2560);
        assert_eq!(StoreKind::Keyutils.index_chunk_cap(), 16 * 1024);
    }
}
