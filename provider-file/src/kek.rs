//! The key-encryption key: from a 32-byte key file, or from a passphrase through Argon2id.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::StoreError;

/// Length of every AES-256 key here.
pub const KEY_LEN: usize = 32;

/// A 256-bit key-encryption key. Zeroized on drop; never printed.
pub struct Kek(pub(crate) Zeroizing<[u8; KEY_LEN]>);

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek([REDACTED])")
    }
}

/// Argon2id cost parameters, kept in the store header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Argon2Params {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes over memory.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl Argon2Params {
    /// RFC 9106's second recommended option: 64 MiB, t = 3, p = 4. The default.
    pub const DEFAULT: Argon2Params = Argon2Params {
        memory_kib: 64 * 1024,
        iterations: 3,
        parallelism: 4,
    };

    /// The OWASP floor for Argon2id: 19 MiB and two passes. Below it, the store refuses.
    pub const FLOOR: Argon2Params = Argon2Params {
        memory_kib: 19 * 1024,
        iterations: 2,
        parallelism: 1,
    };

    /// The most any store may ask for: 4 GiB, 64 passes, 64 lanes. The parameters come from the
    /// store's header, so without a ceiling a damaged or hostile header could make every open
    /// exhaust memory or run for ever.
    pub const CEILING: Argon2Params = Argon2Params {
        memory_kib: 4 * 1024 * 1024,
        iterations: 64,
        parallelism: 64,
    };

    /// Refuses parameters below [`Argon2Params::FLOOR`] or above [`Argon2Params::CEILING`].
    pub fn check(&self) -> Result<(), StoreError> {
        let ceiling = Argon2Params::CEILING;
        if self.memory_kib > ceiling.memory_kib
            || self.iterations > ceiling.iterations
            || self.parallelism > ceiling.parallelism
        {
            return Err(StoreError::WeakKdf(format!(
                "Argon2id with {} KiB, {} iterations and parallelism {} is above the ceiling of \
                 {} KiB, {} iterations and parallelism {}; refused rather than run (a damaged \
                 header, or a store not made by this tool)",
                self.memory_kib,
                self.iterations,
                self.parallelism,
                ceiling.memory_kib,
                ceiling.iterations,
                ceiling.parallelism,
            )));
        }
        let floor = Argon2Params::FLOOR;
        if self.memory_kib < floor.memory_kib || self.iterations < floor.iterations {
            return Err(StoreError::WeakKdf(format!(
                "Argon2id with {} KiB and {} iterations is below the floor of {} KiB and {} \
                 iterations (OWASP); the default is {} KiB, {} iterations, parallelism {} \
                 (RFC 9106)",
                self.memory_kib,
                self.iterations,
                floor.memory_kib,
                floor.iterations,
                Argon2Params::DEFAULT.memory_kib,
                Argon2Params::DEFAULT.iterations,
                Argon2Params::DEFAULT.parallelism,
            )));
        }
        if self.parallelism == 0 {
            return Err(StoreError::WeakKdf(
                "Argon2id parallelism must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// Derives a KEK from `passphrase` and `salt`.
    pub fn derive(&self, passphrase: &[u8], salt: &[u8]) -> Result<Kek, StoreError> {
        self.check()?;
        let params = argon2::Params::new(
            self.memory_kib,
            self.iterations,
            self.parallelism,
            Some(KEY_LEN),
        )
        .map_err(|e| StoreError::WeakKdf(format!("invalid Argon2id parameters: {e}")))?;
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        argon
            .hash_password_into(passphrase, salt, key.as_mut_slice())
            .map_err(|e| StoreError::Usage(format!("Argon2id failed: {e}")))?;
        Ok(Kek(key))
    }
}

/// Where the KEK comes from, as given on the command line.
#[derive(Clone, Debug)]
pub enum KekSource {
    /// A file of exactly 32 random bytes.
    KeyFile(PathBuf),
    /// A file holding a passphrase (trailing newline removed).
    PassphraseFile(PathBuf),
}

/// Reads a key or passphrase file, refusing one that group or others can access unless
/// `allow_insecure` (the `--danger-allow-insecure-key-file` flag).
pub fn read_protected(path: &Path, allow_insecure: bool) -> Result<Zeroizing<Vec<u8>>, StoreError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(|e| StoreError::io(format!("cannot read {}", path.display()), e))?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            if !allow_insecure {
                return Err(StoreError::InsecureFile {
                    path: path.to_path_buf(),
                    mode,
                });
            }
            tracing::warn!(
                path = %path.display(),
                "DANGER: key file is accessible by group or others (mode {mode:o}); allowed by \
                 --danger-allow-insecure-key-file"
            );
        }
    }
    std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|e| StoreError::io(format!("cannot read {}", path.display()), e))
}

/// Reads a key file: exactly 32 bytes.
pub fn read_key_file(path: &Path, allow_insecure: bool) -> Result<Kek, StoreError> {
    let bytes = read_protected(path, allow_insecure)?;
    let key: [u8; KEY_LEN] = bytes.as_slice().try_into().map_err(|_| {
        StoreError::Usage(format!(
            "{} must hold exactly {KEY_LEN} bytes (it holds {}); create one with init --generate-key",
            path.display(),
            bytes.len()
        ))
    })?;
    Ok(Kek(Zeroizing::new(key)))
}

/// Reads a passphrase file; the passphrase is its content without trailing line breaks.
pub fn read_passphrase_file(
    path: &Path,
    allow_insecure: bool,
) -> Result<Zeroizing<Vec<u8>>, StoreError> {
    let mut bytes = read_protected(path, allow_insecure)?;
    while matches!(bytes.last(), Some(b'\n' | b'\r')) {
        bytes.pop();
    }
    if bytes.is_empty() {
        return Err(StoreError::Usage(format!(
            "{} holds an empty passphrase",
            path.display()
        )));
    }
    Ok(bytes)
}

/// Writes 32 random bytes to a new file with mode 0600. Refuses to overwrite.
pub fn generate_key_file(path: &Path) -> Result<(), StoreError> {
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    getrandom::fill(key.as_mut_slice())
        .map_err(|e| StoreError::io("cannot get random bytes", std::io::Error::other(e)))?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .map_err(|e| StoreError::io(format!("cannot create key file {}", path.display()), e))?;
    file.write_all(key.as_slice())
        .and_then(|()| file.sync_all())
        .map_err(|e| StoreError::io(format!("cannot write key file {}", path.display()), e))?;
    Ok(())
}

/// Fresh random bytes.
pub fn random<const N: usize>() -> Result<[u8; N], StoreError> {
    let mut out = [0u8; N];
    getrandom::fill(&mut out)
        .map_err(|e| StoreError::io("cannot get random bytes", std::io::Error::other(e)))?;
    Ok(out)
}
