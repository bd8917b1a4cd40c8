//! The advisory write lock: a keychain has no compare-and-set, so every read-check-write of a
//! pointer or the index happens under an exclusive lock on a file in a private runtime directory.
//!
//! The lock is `flock`-style (std's `File::try_lock`): held per open file, released when the
//! file closes or the process dies, so a crashed provider never leaves it held. Every provider
//! process of one user that writes the same store and service on one host uses the same file,
//! so their updates never overwrite each other. What it cannot cover: processes that use
//! another lock directory (another `$XDG_RUNTIME_DIR`, another `--lock-dir`), processes on
//! other hosts sharing a keychain, and programs other than keyhole writing the same entries.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keyhole_providers::protocol::{ErrorCode, ProviderError};
use sha2::{Digest, Sha256};

use crate::options::StoreKind;

/// How often a waiting writer retries the lock.
const POLL: Duration = Duration::from_millis(2);

/// The lock file of one store and service.
#[derive(Clone, Debug)]
pub struct WriteLock {
    path: PathBuf,
}

/// The default lock directory: `$XDG_RUNTIME_DIR/keyhole`, else a per-user directory under the
/// system's temporary directory (`/tmp/keyhole-<uid>` on Unix).
pub fn default_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute() && p.is_dir())
    {
        return dir.join("keyhole");
    }
    #[cfg(unix)]
    {
        PathBuf::from(format!("/tmp/keyhole-{}", nix::unistd::geteuid().as_raw()))
    }
    #[cfg(not(unix))]
    {
        std::env::var_os("LOCALAPPDATA")
            .map(|d| PathBuf::from(d).join("keyhole"))
            .unwrap_or_else(|| std::env::temp_dir().join("keyhole"))
    }
}

impl WriteLock {
    /// The lock for `store` and `service` in `dir`, which is created (0700) if missing and must
    /// be private to this user.
    pub fn new(dir: &Path, store: StoreKind, service: &str) -> io::Result<WriteLock> {
        #[cfg(unix)]
        keyhole_transport::socket::ensure_private_dir(dir)?;
        #[cfg(not(unix))]
        std::fs::create_dir_all(dir)?;
        let tag = hex::encode(&Sha256::digest(service.as_bytes())[..8]);
        Ok(WriteLock {
            path: dir.join(format!("keychain-{}-{tag}.lock", store.name())),
        })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the lock until `deadline`; the lock is held until the returned file is dropped.
    pub fn acquire(&self, deadline: Instant) -> Result<File, ProviderError> {
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let file = options.open(&self.path).map_err(|e| {
            ProviderError::new(
                ErrorCode::Internal,
                format!("cannot open the lock file {}: {e}", self.path.display()),
            )
        })?;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(file),
                Err(TryLockError::WouldBlock) => {
                    if Instant::now() >= deadline {
                        return Err(ProviderError::new(
                            ErrorCode::Unavailable,
                            format!(
                                "another keyhole operation on this keychain holds the write lock \
                                 {} past the deadline; retry",
                                self.path.display()
                            ),
                        ));
                    }
                    std::thread::sleep(POLL);
                }
                Err(TryLockError::Error(e)) => {
                    return Err(ProviderError::internal(format!(
                        "cannot lock {}: {e}",
                        self.path.display()
                    )));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_waits_and_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let lock = WriteLock::new(&dir.path().join("locks"), StoreKind::Keyutils, "svc").unwrap();
        let held = lock.acquire(Instant::now()).unwrap();
        let started = Instant::now();
        let e = lock
            .acquire(Instant::now() + Duration::from_millis(50))
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Unavailable);
        assert!(started.elapsed() >= Duration::from_millis(50));
        drop(held);
        lock.acquire(Instant::now()).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn the_directory_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(WriteLock::new(&open, StoreKind::Keyutils, "svc").is_err());
        let fresh = dir.path().join("fresh");
        WriteLock::new(&fresh, StoreKind::Keyutils, "svc").unwrap();
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }
}
