//! A directory of secrets: a Kubernetes Secret volume as the kubelet writes it, or plain files.
//!
//! The kubelet's layout is
//!
//! ```text
//! DIR/..2026_11_22_06_00_00.123456789/KEY   the files of one generation, never changed in place
//! DIR/..data -> ..2026_11_22_06_00_00.123456789
//! DIR/KEY -> ..data/KEY
//! ```
//!
//! An update writes a new timestamped directory, points `..data_tmp` at it, renames `..data_tmp`
//! over `..data` (the atomic swap), and then deletes the old directory. So the provider reads
//! `..data` once, and then reads every key of that request inside the concrete directory it
//! names, never through `DIR/KEY`: whatever it reads belongs to that one generation. A read that
//! fails is checked against `..data` again; if the link moved meanwhile (the old generation is
//! being deleted), the whole read starts over on the new generation. A `..data` that points at a
//! directory that does not exist yet is waited out briefly and then reported as unavailable.
//!
//! Without `..data` the directory is taken as plain files, read directly, with no atomicity
//! across keys (for local use).
//!
//! Keys are the directory's entries, except those starting with `..` (the kubelet's own; the
//! Kubernetes API refuses such keys). A name is never turned into a path: a name is looked up
//! only if what follows the directory's name prefix is a single file name (no `/`, not `.`, not
//! starting with `..`).

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use keyhole_providers::protocol::{ErrorCode, ProviderError, SecretBytes, validate_name};
use zeroize::Zeroizing;

use crate::version_of;

/// The kubelet's link to the current generation.
pub const DATA_LINK: &str = "..data";

/// How often a read starts over because the generation moved or is not there yet.
const ATTEMPTS: u32 = 20;

/// A directory served as secrets, with the prefix its keys get as names.
#[derive(Clone, Debug)]
pub struct DirSource {
    /// The directory.
    pub path: PathBuf,
    /// Prepended to each key to make its name.
    pub name_prefix: String,
}

/// A value read from a key, with the file's modification time.
pub struct Value {
    /// The file's content.
    pub bytes: SecretBytes,
    /// Its modification time, in milliseconds since the Unix epoch (0 if unknown).
    pub mtime_ms: u64,
}

/// What a scan learned of one key: never its value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyMeta {
    /// The key (the file name).
    pub key: String,
    /// The content hash.
    pub version: String,
    /// The file's modification time.
    pub mtime_ms: u64,
}

/// Why one key cannot be read. Its messages name the key and the OS error, never a value.
#[derive(Debug)]
pub enum KeyError {
    /// Opening or reading failed.
    Io(io::Error),
    /// The key is a directory.
    Directory,
    /// The key is neither a file nor a directory (a FIFO, a socket, a device).
    NotAFile,
    /// The key is a symbolic link to nothing.
    Dangling,
    /// The file is larger than the limit.
    TooLarge(u64, usize),
    /// The key is a symbolic link to a file outside the directory.
    Outside,
}

impl KeyError {
    /// The error code and what is wrong with the key, in words.
    fn what(&self) -> (ErrorCode, String) {
        match self {
            KeyError::Io(e) if e.kind() == io::ErrorKind::PermissionDenied => (
                ErrorCode::PermissionDenied,
                format!("cannot be read by this process: {e}"),
            ),
            KeyError::Io(e) => (ErrorCode::Unavailable, format!("cannot be read: {e}")),
            KeyError::Directory => (
                ErrorCode::Internal,
                "is a directory, not a file (nested keys are not served)".into(),
            ),
            KeyError::NotAFile => (
                ErrorCode::Internal,
                "is not a regular file (a FIFO, socket or device)".into(),
            ),
            KeyError::Dangling => (
                ErrorCode::Internal,
                "is a symbolic link to a file that does not exist".into(),
            ),
            KeyError::TooLarge(len, limit) => (
                ErrorCode::TooLarge,
                format!("is {len} bytes, over this provider's {limit}-byte limit"),
            ),
            KeyError::Outside => (
                ErrorCode::PermissionDenied,
                "is a symbolic link to a file outside the directory, which is not served".into(),
            ),
        }
    }

    /// The wire error for a request about `name`, which is key `key` of `dir`.
    pub fn to_provider_error(&self, name: &str, dir: &Path, key: &str) -> ProviderError {
        let (code, what) = self.what();
        ProviderError::new(
            code,
            format!("secret {name:?}: key {key:?} of {} {what}", dir.display()),
        )
    }

    /// A one-line description for logs and health, naming the key and the directory.
    pub fn describe(&self, dir: &Path, key: &str) -> String {
        format!("key {key:?} of {} {}", dir.display(), self.what().1)
    }
}

/// Why a directory cannot be read as a whole.
#[derive(Debug)]
pub enum DirError {
    /// The directory, or its `..data` link, cannot be read.
    Io(io::Error),
    /// `..data` kept moving, or names a directory that does not exist.
    Unsettled(String),
}

impl DirError {
    /// A one-line description, naming the directory.
    pub fn describe(&self, dir: &Path) -> String {
        match self {
            DirError::Io(e) => format!("cannot read {}: {e}", dir.display()),
            DirError::Unsettled(why) => format!("{}: {why}", dir.display()),
        }
    }

    /// The wire error: the backend cannot be read right now.
    pub fn to_provider_error(&self, dir: &Path) -> ProviderError {
        ProviderError::new(ErrorCode::Unavailable, self.describe(dir))
    }
}

/// A read of one key failed: either the directory or the key.
#[derive(Debug)]
pub enum ReadError {
    /// The directory as a whole.
    Dir(DirError),
    /// This key.
    Key(KeyError),
}

/// The result of a scan: every key's metadata or error, and the entries that are not served.
#[derive(Debug, Default)]
pub struct Scan {
    /// By name (the name prefix plus the key).
    pub keys: std::collections::BTreeMap<String, Result<KeyMeta, String>>,
    /// Entries that cannot be names, one line each.
    pub problems: Vec<String>,
}

/// Where the files of the current generation are.
enum Layout {
    /// The kubelet's: `..data` points at `target`; `link` is what it said.
    Kubelet { link: PathBuf, target: PathBuf },
    /// Plain files in the directory itself.
    Flat,
}

/// Whether `key` can be a file name in a served directory.
pub fn is_key(key: &str) -> bool {
    !key.is_empty() && !key.contains('/') && key != "." && !key.starts_with("..")
}

impl DirSource {
    /// The key `name` would be in this directory, if any.
    pub fn key_for<'n>(&self, name: &'n str) -> Option<&'n str> {
        name.strip_prefix(self.name_prefix.as_str())
            .filter(|key| is_key(key))
    }

    fn layout(&self) -> Result<Layout, DirError> {
        let data = self.path.join(DATA_LINK);
        match std::fs::read_link(&data) {
            // The kubelet's link names a sibling generation directory; anything else could
            // serve files from anywhere as keys.
            Ok(link)
                if !is_generation(&link)
                    || std::fs::symlink_metadata(self.path.join(&link))
                        .is_ok_and(|m| m.file_type().is_symlink()) =>
            {
                Err(DirError::Io(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "{DATA_LINK} points to {}, not to a directory beside it",
                        link.display()
                    ),
                )))
            }
            Ok(link) => Ok(Layout::Kubelet {
                target: self.path.join(&link),
                link,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Plain files; but the directory itself must be there.
                match std::fs::metadata(&self.path) {
                    Ok(m) if m.is_dir() => Ok(Layout::Flat),
                    Ok(_) => Err(DirError::Io(io::Error::other("not a directory"))),
                    Err(e) => Err(DirError::Io(e)),
                }
            }
            // `..data` exists but is not a link: use it as the data directory all the same.
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => Ok(Layout::Kubelet {
                link: PathBuf::from(DATA_LINK),
                target: data,
            }),
            Err(e) => Err(DirError::Io(e)),
        }
    }

    /// Whether `..data` still says `link`.
    fn still_current(&self, link: &Path) -> bool {
        std::fs::read_link(self.path.join(DATA_LINK)).is_ok_and(|now| now == link)
            || (link == Path::new(DATA_LINK)
                && std::fs::symlink_metadata(self.path.join(DATA_LINK)).is_ok_and(|m| m.is_dir()))
    }

    /// Runs `read` on the current generation's directory until it completes on a generation that
    /// stayed current throughout (or, on a flat directory, once). A result for which `done` holds
    /// is taken at once.
    fn consistent<T>(
        &self,
        mut read: impl FnMut(&Path) -> Result<T, DirError>,
        done: impl Fn(&T) -> bool,
    ) -> Result<T, DirError> {
        let mut missing = None;
        for attempt in 0..ATTEMPTS {
            let (link, target) = match self.layout()? {
                Layout::Flat => return read(&self.path),
                Layout::Kubelet { link, target } => (link, target),
            };
            let result = read(&target);
            if result.as_ref().is_ok_and(&done) {
                return result;
            }
            if !self.still_current(&link) {
                // The generation moved while we read (the kubelet deletes the old one after the
                // swap): start over on the new one.
                continue;
            }
            if std::fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
                return result;
            }
            // `..data` names a directory that is not there (yet): wait a moment.
            missing = Some(format!(
                "{DATA_LINK} points to {}, which does not exist",
                link.display()
            ));
            std::thread::sleep(Duration::from_millis((2 * u64::from(attempt + 1)).min(20)));
        }
        Err(DirError::Unsettled(missing.unwrap_or_else(|| {
            format!("{DATA_LINK} changed {ATTEMPTS} times in a row while reading; try again")
        })))
    }

    /// Reads `key` from the current generation: `Ok(None)` if it has no such key.
    pub fn read_key(&self, key: &str, limit: usize) -> Result<Option<Value>, ReadError> {
        let root = Root::open(&self.path).map_err(|e| ReadError::Dir(DirError::Io(e)))?;
        let result = self.consistent(
            |base| Ok(root.read_in(base, key, limit)),
            // A successful read came from an immutable generation directory: it is consistent
            // whether or not `..data` has moved since.
            |r| r.as_ref().is_ok_and(Option::is_some),
        );
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(ReadError::Key(e)),
            Err(e) => Err(ReadError::Dir(e)),
        }
    }

    /// Every key of the current generation, with its version, all from one generation.
    pub fn scan(&self, limit: usize) -> Result<Scan, DirError> {
        let root = Root::open(&self.path).map_err(DirError::Io)?;
        self.consistent(
            |base| {
                let mut scan = Scan::default();
                for entry in std::fs::read_dir(base).map_err(DirError::Io)? {
                    let entry = entry.map_err(DirError::Io)?;
                    let file_name = entry.file_name();
                    let Some(key) = file_name.to_str() else {
                        scan.problems.push(format!(
                            "{}: the entry {:?} is not served: its name is not UTF-8",
                            self.path.display(),
                            file_name
                        ));
                        continue;
                    };
                    if key.starts_with("..") {
                        continue;
                    }
                    let name = format!("{}{key}", self.name_prefix);
                    if let Err(e) = validate_name(&name) {
                        scan.problems.push(format!(
                            "{}: the entry {key:?} is not served: {e}",
                            self.path.display()
                        ));
                        continue;
                    }
                    let meta = match root.read_in(base, key, limit) {
                        Ok(Some(v)) => Ok(KeyMeta {
                            key: key.to_string(),
                            version: version_of(&name, v.bytes.expose()),
                            mtime_ms: v.mtime_ms,
                        }),
                        // Listed a moment ago, gone now: the generation is moving.
                        Ok(None) => Err(format!(
                            "key {key:?} of {} disappeared while reading",
                            self.path.display()
                        )),
                        Err(e) => Err(e.describe(&self.path, key)),
                    };
                    scan.keys.insert(name, meta);
                }
                Ok(scan)
            },
            |_| false,
        )
    }
}

/// Whether `..data`'s target is one directory beside it (`..2026_11_22_...`): one plain
/// component, no `/`, not `.` or `..`.
fn is_generation(link: &Path) -> bool {
    let mut parts = link.components();
    matches!(
        (parts.next(), parts.next()),
        (Some(std::path::Component::Normal(_)), None)
    )
}

/// A served directory, opened once per request: its keys are opened only beneath it.
struct Root<'a> {
    /// The directory as configured: every key's path starts with it.
    served: &'a Path,
    /// Its canonical path.
    canonical: PathBuf,
    /// The directory itself, which `openat2` resolves beneath.
    #[cfg(target_os = "linux")]
    dir: File,
}

impl<'a> Root<'a> {
    fn open(served: &'a Path) -> io::Result<Root<'a>> {
        let canonical = std::fs::canonicalize(served)?;
        Ok(Root {
            served,
            #[cfg(target_os = "linux")]
            dir: File::open(&canonical)?,
            canonical,
        })
    }

    /// Reads the key `key` of the directory `base` (the served one or a directory in it):
    /// `Ok(None)` if there is no such entry. A key that is a link to a file outside the served
    /// directory is [`KeyError::Outside`].
    fn read_in(&self, base: &Path, key: &str, limit: usize) -> Result<Option<Value>, KeyError> {
        let path = base.join(OsStr::new(key));
        match self.read_value(&path, limit) {
            Ok(v) => Ok(Some(v)),
            Err(KeyError::Io(e)) if e.kind() == io::ErrorKind::NotFound => {
                if std::fs::symlink_metadata(&path).is_ok() {
                    Err(KeyError::Dangling)
                } else {
                    Ok(None)
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Reads a whole regular file of at most `limit` bytes, inside the served directory, into
    /// zeroizing memory.
    fn read_value(&self, path: &Path, limit: usize) -> Result<Value, KeyError> {
        let mut file = self.open_file(path)?;
        let meta = file.metadata().map_err(KeyError::Io)?;
        if meta.is_dir() {
            return Err(KeyError::Directory);
        }
        if !meta.is_file() {
            return Err(KeyError::NotAFile);
        }
        if meta.len() > limit as u64 {
            return Err(KeyError::TooLarge(meta.len(), limit));
        }
        let mtime_ms = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let expected = usize::try_from(meta.len()).unwrap_or(limit);
        let bytes = read_bounded(&mut file, expected, limit)?;
        Ok(Value { bytes, mtime_ms })
    }

    /// Opens `path` (inside the served directory) for reading, never a file outside it: a link
    /// leading out is [`KeyError::Outside`].
    ///
    /// On Linux 5.6 and later the kernel resolves the path beneath the directory in one step
    /// (`openat2` with `RESOLVE_BENEATH`): a path that stays inside is opened with no window for
    /// a link to be swapped in. The kernel refuses a path that would leave the directory, and
    /// any absolute link, even one pointing inside; those (and kernels or seccomp filters
    /// without `openat2`) take the portable way: the path is resolved and must lie inside, then
    /// opened without following a link in its last component. A directory swapped for a link
    /// between those two steps would lead out, so on Linux the file actually opened is checked
    /// once more, by its path in `/proc/self/fd`, before anything is read from it.
    fn open_file(&self, path: &Path) -> Result<File, KeyError> {
        #[cfg(target_os = "linux")]
        if let Ok(relative) = path.strip_prefix(self.served) {
            use rustix::fs::{Mode, OFlags, ResolveFlags};
            use rustix::io::Errno;
            // NONBLOCK: opening a FIFO must not hang; it has no effect on regular files.
            let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY;
            let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
            // EAGAIN: a rename raced the resolution, and the kernel refuses rather than risk it.
            let mut tries = 0;
            loop {
                match rustix::fs::openat2(&self.dir, relative, flags, Mode::empty(), resolve) {
                    Ok(fd) => return Ok(File::from(fd)),
                    Err(Errno::AGAIN) if tries < 3 => tries += 1,
                    // Out of the directory, or an absolute link (perhaps to inside it); no
                    // openat2 here (an old kernel, a seccomp filter); renames that kept racing:
                    // the portable way decides.
                    Err(Errno::XDEV | Errno::NOSYS | Errno::PERM | Errno::AGAIN) => break,
                    Err(e) => return Err(KeyError::Io(e.into())),
                }
            }
        }
        let real = std::fs::canonicalize(path).map_err(KeyError::Io)?;
        if !real.starts_with(&self.canonical) {
            return Err(KeyError::Outside);
        }
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOFOLLOW | nix::libc::O_NOCTTY)
            .open(&real)
            .map_err(KeyError::Io)?;
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let opened = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
                .map_err(KeyError::Io)?;
            if !opened.starts_with(&self.canonical) {
                return Err(KeyError::Outside);
            }
        }
        Ok(file)
    }
}

/// Reads to the end, at most `limit` bytes, never leaving a copy behind in freed memory.
fn read_bounded(file: &mut File, expected: usize, limit: usize) -> Result<SecretBytes, KeyError> {
    // One byte more than expected, to notice a file that grew.
    let mut buf = Zeroizing::new(vec![0u8; expected.min(limit) + 1]);
    let mut len = 0;
    loop {
        if len == buf.len() {
            if len > limit {
                return Err(KeyError::TooLarge(len as u64, limit));
            }
            // Grow by copying into a new buffer; the old one is zeroized as it drops.
            let mut bigger = Zeroizing::new(vec![0u8; (len * 2).min(limit + 1).max(len + 1)]);
            bigger[..len].copy_from_slice(&buf[..len]);
            buf = bigger;
        }
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(KeyError::Io(e)),
        }
    }
    if len > limit {
        return Err(KeyError::TooLarge(len as u64, limit));
    }
    buf.truncate(len);
    Ok(SecretBytes::new(std::mem::take(&mut *buf)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_single_file_names() {
        for ok in ["password", ".dockerconfigjson", "a.b", "tls.crt", "x"] {
            assert!(is_key(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "..data",
            "..2026_01_01",
            "a/b",
            "../x",
            "/etc",
        ] {
            assert!(!is_key(bad), "{bad}");
        }
    }

    #[test]
    fn names_map_to_keys_only_under_the_prefix() {
        let d = DirSource {
            path: "/nonexistent".into(),
            name_prefix: "db/".into(),
        };
        assert_eq!(d.key_for("db/password"), Some("password"));
        assert_eq!(d.key_for("db/a/b"), None);
        assert_eq!(d.key_for("db/"), None);
        assert_eq!(d.key_for("db/..data"), None);
        assert_eq!(d.key_for("api/password"), None);
    }

    #[test]
    fn reads_grow_past_a_wrong_size_hint_and_stop_at_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k");
        std::fs::write(&path, b"0123456789").expect("write");
        let mut f = File::open(&path).expect("open");
        assert_eq!(
            read_bounded(&mut f, 2, 100).expect("read").expose(),
            b"0123456789"
        );
        let mut f = File::open(&path).expect("open");
        assert!(matches!(
            read_bounded(&mut f, 2, 5),
            Err(KeyError::TooLarge(_, 5))
        ));
        let mut f = File::open(&path).expect("open");
        assert_eq!(
            read_bounded(&mut f, 10, 10).expect("read").expose(),
            b"0123456789"
        );
    }
}
