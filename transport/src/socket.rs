//! Private local sockets: a Unix domain socket with mode 0600 inside a 0700 directory (a named
//! pipe on Windows), through the `interprocess` crate.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
#[cfg(not(unix))]
use std::sync::Arc;
use std::task::{Context, Poll};

use interprocess::local_socket::tokio::{Listener, Stream, prelude::*};
use interprocess::local_socket::{GenericFilePath, ListenerOptions, ToFsName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{BoxRead, BoxWrite};

/// The socket file's name inside a private directory: short, because Unix socket paths are
/// limited to about 100 bytes.
pub const SOCKET_FILE: &str = "s";

/// A freshly made private directory (0700) for one socket, removed when dropped.
#[derive(Debug)]
pub struct PrivateDir {
    dir: tempfile::TempDir,
}

impl PrivateDir {
    /// Creates `kh-XXXXXX` under `$XDG_RUNTIME_DIR` if it is set and usable, else under the
    /// system temporary directory.
    pub fn new() -> io::Result<PrivateDir> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let mut builder = tempfile::Builder::new();
        builder.prefix("kh-");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            builder.permissions(std::fs::Permissions::from_mode(0o700));
        }
        Ok(PrivateDir {
            dir: builder.tempdir_in(base)?,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The socket path inside it.
    pub fn socket_path(&self) -> PathBuf {
        self.dir.path().join(SOCKET_FILE)
    }
}

/// Checks that `path`'s parent directory is private (see [`ensure_private_dir`]).
#[cfg(unix)]
pub fn ensure_private_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => ensure_private_dir(p),
        _ => ensure_private_dir(Path::new(".")),
    }
}

/// Checks that directory `dir` belongs to this user and is not accessible by group or others;
/// creates it (and missing parents) with mode 0700 if it does not exist.
#[cfg(unix)]
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let meta = std::fs::metadata(dir)?;
    let mode = meta.permissions().mode() & 0o777;
    if meta.uid() != nix::unistd::geteuid().as_raw() || mode & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} must belong to this user with mode 0700 (it has {mode:o}); keyhole keeps \
                 its sockets and state in private directories (chmod 700 {})",
                dir.display(),
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// Binds a listener at `path` with socket mode 0600. On Unix the parent directory must be
/// private (see [`ensure_private_parent`]). A stale socket file nobody listens on is replaced; a
/// live one is an error.
pub async fn listen(path: &Path) -> io::Result<Listener> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        ensure_private_parent(path)?;
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            // Only a stale socket is ours to replace: a misconfigured path must not delete a
            // file (or the target of a link) that happens to be there.
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "{} exists and is not a socket; keyhole will not remove it (choose \
                         another path, or remove it yourself)",
                        path.display()
                    ),
                ));
            }
            if connect(path).await.is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is already in use by a live listener", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
    }
    // On Unix the file appears at bind(), a moment before listen(): a peer that sees it then
    // gets "connection refused". Bind under a temporary name and rename it into place once it
    // listens, so the path exists only when it accepts (a sidecar's gateway can dial as soon as
    // it sees the file).
    #[cfg(unix)]
    let (bound, publish) = {
        let file = path.file_name().unwrap_or_default().to_string_lossy();
        let tmp = path.with_file_name(format!(".{file}.{}.binding", std::process::id()));
        // sun_path holds 108 bytes: a temporary name too long for it binds in place instead.
        if tmp.as_os_str().len() < 100 {
            let _ = std::fs::remove_file(&tmp);
            (tmp, true)
        } else {
            (path.to_path_buf(), false)
        }
    };
    #[cfg(not(unix))]
    let (bound, publish) = (path.to_path_buf(), false);
    let name = bound.as_path().to_fs_name::<GenericFilePath>()?;
    let options = ListenerOptions::new().name(name);
    #[cfg(unix)]
    let options = {
        use interprocess::os::unix::local_socket::ListenerOptionsExt;
        options.mode(0o600)
    };
    let listener = options.create_tokio()?;
    if publish && let Err(e) = std::fs::rename(&bound, path) {
        let _ = std::fs::remove_file(&bound);
        return Err(io::Error::new(
            e.kind(),
            format!("cannot publish the socket at {}: {e}", path.display()),
        ));
    }
    Ok(listener)
}

/// Connects to the listener at `path`.
pub async fn connect(path: &Path) -> io::Result<Stream> {
    let name = path.to_fs_name::<GenericFilePath>()?;
    Stream::connect(name).await
}

/// The effective user id of the peer of `stream` (Unix only).
#[cfg(unix)]
pub fn peer_uid(stream: &Stream) -> io::Result<u32> {
    use interprocess::local_socket::traits::StreamCommon;
    stream
        .peer_creds()?
        .euid()
        .ok_or_else(|| io::Error::other("the peer's user id is not available"))
}

/// Splits a connected stream into boxed read and write halves.
///
/// On Unix the halves are [`crate::uds`]'s: the read half is registered with the reactor for
/// readability alone and clears readiness after a short read (no `EAGAIN` read per frame); the
/// write half writes directly and waits for write space only when the socket is full. So neither
/// side's event loop wakes when the peer merely consumes what it sent. Dropping the write half
/// shuts the write direction down, so the peer reads end-of-stream. If the hand-over fails (it
/// registers the descriptor with the reactor), both halves fail their first operation with that
/// error.
#[cfg(unix)]
pub fn into_halves(stream: Stream) -> (BoxRead, BoxWrite) {
    let handed_over = std::os::fd::OwnedFd::try_from(match stream {
        Stream::UdSocket(s) => s,
    })
    .and_then(|fd| crate::uds::split(std::os::unix::net::UnixStream::from(fd)));
    match handed_over {
        Ok((read, write)) => (Box::new(read), Box::new(write)),
        Err(e) => {
            let why = format!("cannot register the socket with the runtime: {e}");
            (Box::new(Failed(why.clone())), Box::new(Failed(why)))
        }
    }
}

/// Splits a connected stream into boxed read and write halves that share it.
#[cfg(not(unix))]
pub fn into_halves(stream: Stream) -> (BoxRead, BoxWrite) {
    let shared = Arc::new(stream);
    (
        Box::new(Shared(Arc::clone(&shared))),
        Box::new(Shared(shared)),
    )
}

/// A half whose stream could not be set up: every operation fails with why.
#[cfg(unix)]
struct Failed(String);

#[cfg(unix)]
impl AsyncRead for Failed {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Ready(Err(io::Error::other(self.0.clone())))
    }
}

#[cfg(unix)]
impl AsyncWrite for Failed {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::Error::other(self.0.clone())))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Err(io::Error::other(self.0.clone())))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// One half of a stream shared through `&Stream`, which implements both directions.
#[cfg(not(unix))]
struct Shared(Arc<Stream>);

#[cfg(not(unix))]
impl AsyncRead for Shared {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut &*self.0).poll_read(cx, buf)
    }
}

#[cfg(not(unix))]
impl AsyncWrite for Shared {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut &*self.0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut &*self.0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut &*self.0).poll_shutdown(cx)
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn socket_is_0600_in_a_0700_directory() {
        let dir = PrivateDir::new().unwrap();
        let path = dir.socket_path();
        let _listener = listen(&path).await.unwrap();
        let dir_mode = std::fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777;
        let sock_mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!((dir_mode, sock_mode), (0o700, 0o600));
    }

    #[tokio::test]
    async fn the_path_appears_only_once_it_accepts_and_nothing_is_left_beside_it() {
        let dir = PrivateDir::new().unwrap();
        let path = dir.path().join("p.sock");
        let listener = listen(&path).await.unwrap();
        // The first connect after listen() returns must succeed: no bind-before-listen window.
        let _client = connect(&path).await.unwrap();
        let _server = listener.accept().await.unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from("p.sock")]);
    }

    #[tokio::test]
    async fn a_shared_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = listen(&dir.path().join("s")).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
    }

    #[tokio::test]
    async fn a_live_socket_is_not_stolen() {
        let dir = PrivateDir::new().unwrap();
        let path = dir.socket_path();
        let _first = listen(&path).await.unwrap();
        assert!(listen(&path).await.is_err());
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_but_another_file_is_left_alone() {
        let dir = PrivateDir::new().unwrap();
        let path = dir.socket_path();
        drop(listen(&path).await.unwrap()); // leaves a socket file nobody listens on
        let _again = listen(&path).await.unwrap();
        drop(_again);

        let precious = dir.path().join("notes.txt");
        std::fs::write(&precious, b"keep me").unwrap();
        let err = listen(&precious).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read(&precious).unwrap(), b"keep me");

        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&precious, &link).unwrap();
        let err = listen(&link).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
        assert!(std::fs::symlink_metadata(&link).is_ok(), "the link stays");
        assert_eq!(std::fs::read(&precious).unwrap(), b"keep me");
    }
}
