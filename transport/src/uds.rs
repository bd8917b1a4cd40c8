//! A Unix stream socket split into halves that each tell the reactor only what they wait for.
//!
//! tokio's `UnixStream` registers every socket for readability *and* writability, edge-triggered.
//! On a Unix stream socket, every time the peer consumes bytes we sent, the kernel signals write
//! space on our socket, so each round trip woke each side's event loop once more, for nothing:
//! no task was waiting to write. Here the read half is registered for readability alone. The
//! write half writes straight to the same non-blocking descriptor, and only when the socket is
//! full does it register a duplicate of the descriptor for writability, until that write is done
//! (the duplicate is then kept, unregistered, for the next time: one `dup` per connection at
//! most).

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// The read half: registered for readability only.
pub(crate) struct ReadHalf(Arc<AsyncFd<UnixStream>>);

/// The write half: writes directly; waits for write space only when the socket is full.
/// Dropping it shuts the write direction down, so the peer reads end-of-stream.
pub(crate) struct WriteHalf {
    io: Arc<AsyncFd<UnixStream>>,
    /// Registered for writability while a write waits for space.
    waiting: Option<AsyncFd<UnixStream>>,
    /// The duplicate descriptor from the last wait, unregistered, for the next one.
    spare: Option<UnixStream>,
}

/// Splits a connected, non-blocking socket. Must run inside a tokio runtime.
pub(crate) fn split(stream: UnixStream) -> io::Result<(ReadHalf, WriteHalf)> {
    stream.set_nonblocking(true)?;
    let io = Arc::new(register(stream, Interest::READABLE)?);
    Ok((
        ReadHalf(Arc::clone(&io)),
        WriteHalf {
            io,
            waiting: None,
            spare: None,
        },
    ))
}

impl WriteHalf {
    fn socket(&self) -> &UnixStream {
        self.io.get_ref()
    }
}

/// Registers `stream` with the current runtime's reactor for `interest` alone.
#[allow(unsafe_code)]
fn register(stream: UnixStream, interest: Interest) -> io::Result<AsyncFd<UnixStream>> {
    // SAFETY: the condition is that the descriptor stays open and means the same socket for the
    // whole life of the `AsyncFd`. The `AsyncFd` owns the `UnixStream`, which closes its
    // descriptor only when dropped, after the deregistration, and nothing here replaces it.
    unsafe { AsyncFd::register_with_interest(stream, interest) }.map_err(io::Error::from)
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let wanted = unfilled.len();
            match guard.try_io(|fd| fd.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    // A short read emptied the socket: the next read waits for the next edge
                    // instead of making a syscall only to hear EAGAIN. (The guard clears only
                    // the readiness it saw, so an edge that came meanwhile is kept.)
                    if n > 0 && n < wanted {
                        guard.clear_ready();
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            if let Some(waiting) = &self.waiting {
                let mut guard = ready!(waiting.poll_write_ready(cx))?;
                match guard.try_io(|fd| fd.get_ref().write(data)) {
                    Ok(result) => {
                        drop(guard);
                        // Space again: stop hearing about it, and keep the duplicate.
                        self.spare = self.waiting.take().map(AsyncFd::into_inner);
                        return Poll::Ready(result);
                    }
                    Err(_would_block) => continue,
                }
            }
            match self.socket().write(data) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Registering reports readiness at once if space freed up meanwhile, so no
                    // wake-up can be missed between the failed write and the registration.
                    let dup = match self.spare.take() {
                        Some(dup) => dup,
                        None => self.socket().try_clone()?,
                    };
                    self.waiting = Some(register(dup, Interest::WRITABLE)?);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                result => return Poll::Ready(result),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(())) // nothing is buffered here
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(match self.socket().shutdown(Shutdown::Write) {
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            other => other,
        })
    }
}

impl Drop for WriteHalf {
    fn drop(&mut self) {
        // Again after an explicit shutdown is harmless: the direction is already shut.
        let _ = self.socket().shutdown(Shutdown::Write);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_write_larger_than_the_socket_buffer_waits_for_space_and_loses_nothing() {
        let (a, b) = UnixStream::pair().expect("pair");
        let (_ar, mut aw) = split(a).expect("split a");
        let (mut br, _bw) = split(b).expect("split b");
        // Several MiB: far more than a socket buffer, so the writer must block and resume.
        let sent: Vec<u8> = (0..8u32 << 20).map(|i| (i * 31 % 251) as u8).collect();
        let expected = sent.clone();
        let writer = tokio::spawn(async move {
            aw.write_all(&sent).await.expect("write");
            aw.shutdown().await.expect("shutdown");
        });
        let mut got = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(20), br.read_to_end(&mut got))
            .await
            .expect("read within the deadline")
            .expect("read");
        writer.await.expect("writer");
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "bytes arrived changed or out of order");
    }

    #[tokio::test]
    async fn dropping_the_write_half_gives_the_peer_end_of_stream() {
        let (a, b) = UnixStream::pair().expect("pair");
        let (_ar, aw) = split(a).expect("split a");
        let (mut br, _bw) = split(b).expect("split b");
        drop(aw);
        let mut got = Vec::new();
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), br.read_to_end(&mut got))
            .await
            .expect("end-of-stream within the deadline")
            .expect("read");
        assert_eq!(n, 0);
    }
}
