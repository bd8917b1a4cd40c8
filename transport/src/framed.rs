//! Framed reading and writing over any byte stream.

use std::time::Duration;

use keyhole_protocol::{
    EncodeError, Encoding, FrameError, FrameHeader, HEADER_LEN, Peek, encode_frame, peek,
};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use zeroize::{Zeroize, Zeroizing};

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The stream failed.
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    /// The peer sent a header that cannot start a frame.
    #[error("bad frame from peer: {0}")]
    Frame(#[from] FrameError),
    /// The stream ended in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
}

/// One frame, borrowed from the reader's buffer until the next read.
#[derive(Debug)]
pub struct RawFrame<'a> {
    /// The header.
    pub header: FrameHeader,
    /// The payload bytes.
    pub payload: &'a [u8],
}

const INITIAL_BUFFER: usize = 16 * 1024;

/// Reads whole frames from a byte stream.
///
/// The buffer is zeroized as each frame is released and when it is dropped or grown, so payloads
/// that carried secrets do not linger. A frame's declared length is checked against the cap before
/// the buffer grows for it.
pub struct FrameReader<R> {
    io: R,
    buf: Zeroizing<Vec<u8>>,
    start: usize,
    end: usize,
    held: usize,
    cap: u32,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader that accepts payloads of at most `cap` bytes.
    pub fn new(io: R, cap: u32) -> FrameReader<R> {
        FrameReader {
            io,
            buf: Zeroizing::new(vec![0u8; INITIAL_BUFFER]),
            start: 0,
            end: 0,
            held: 0,
            cap,
        }
    }

    /// Changes the payload cap, as after the handshake.
    pub fn set_cap(&mut self, cap: u32) {
        self.cap = cap;
    }

    /// The next frame, or `None` when the stream ends cleanly between frames.
    pub async fn next(&mut self) -> Result<Option<RawFrame<'_>>, ReadError> {
        self.release();
        loop {
            match peek(&self.buf[self.start..self.end], self.cap)? {
                Peek::Frame { header, total } => {
                    self.held = total;
                    let payload = &self.buf[self.start + HEADER_LEN..self.start + total];
                    return Ok(Some(RawFrame { header, payload }));
                }
                Peek::NeedMore(n) => {
                    self.make_room(n);
                    let read = self.io.read(&mut self.buf[self.end..]).await?;
                    if read == 0 {
                        return if self.start == self.end {
                            Ok(None)
                        } else {
                            Err(ReadError::Truncated)
                        };
                    }
                    self.end += read;
                }
            }
        }
    }

    /// Whether a whole frame is already buffered, so [`FrameReader::next`] will not wait.
    pub fn has_buffered_frame(&self) -> bool {
        let from = self.start + self.held;
        matches!(
            peek(&self.buf[from..self.end], self.cap),
            Ok(Peek::Frame { .. }) | Err(_)
        )
    }

    /// Zeroizes the frame handed out last and moves past it.
    fn release(&mut self) {
        if self.held > 0 {
            self.buf[self.start..self.start + self.held].zeroize();
            self.start += self.held;
            self.held = 0;
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Ensures at least `more` bytes of free space after `end`.
    fn make_room(&mut self, more: usize) {
        if self.buf.len() - self.end >= more {
            return;
        }
        let live = self.end - self.start;
        if self.start > 0 && self.buf.len() - live >= more {
            self.buf.copy_within(self.start..self.end, 0);
            self.buf[live..self.end].zeroize();
        } else {
            // Grow into a fresh zeroizing buffer; the old one is zeroized when dropped.
            let want = (live + more).max(self.buf.len() * 2);
            let mut grown = Zeroizing::new(vec![0u8; want]);
            grown[..live].copy_from_slice(&self.buf[self.start..self.end]);
            self.buf = grown;
        }
        self.start = 0;
        self.end = live;
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &R {
        &self.io
    }
}

/// Encodes frames into a buffer and writes them out in one go.
pub struct FrameWriter<W> {
    io: W,
    buf: Zeroizing<Vec<u8>>,
    major: u16,
    encoding: Encoding,
    peer_cap: u32,
    /// Set when a write timed out: part of a frame may be on the connection.
    broken: bool,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// A writer whose frames carry `major` and `encoding`, with payloads of at most `peer_cap`.
    pub fn new(io: W, major: u16, encoding: Encoding, peer_cap: u32) -> FrameWriter<W> {
        FrameWriter {
            io,
            buf: Zeroizing::new(Vec::with_capacity(INITIAL_BUFFER)),
            major,
            encoding,
            peer_cap,
            broken: false,
        }
    }

    /// Switches to the negotiated major, encoding and peer cap after the handshake.
    pub fn set_format(&mut self, major: u16, encoding: Encoding, peer_cap: u32) {
        self.major = major;
        self.encoding = encoding;
        self.peer_cap = peer_cap;
    }

    /// The encoding frames are written in.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// Appends a frame carrying `msg` to the outgoing batch.
    pub fn queue<T: Serialize>(&mut self, msg: &T) -> Result<(), EncodeError> {
        encode_frame(self.major, self.encoding, msg, self.peer_cap, &mut self.buf)
    }

    /// Appends raw bytes to the outgoing batch (for tests that send malformed frames).
    pub fn queue_raw(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Whether anything waits to be flushed.
    pub fn has_pending(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Writes the batch out and zeroizes it.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        if self.broken {
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "an earlier write timed out part-way: the connection cannot carry more frames",
            ));
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        let result = self.io.write_all(&self.buf).await;
        // Only the written part: every earlier batch was zeroized the same way, so the spare
        // capacity is already zero (and `Zeroizing` wipes all of it on drop). `Vec::zeroize`
        // would wipe the whole 16 KiB capacity on every flush, which cost several µs a frame.
        self.buf.as_mut_slice().zeroize();
        self.buf.clear();
        result?;
        self.io.flush().await
    }

    /// Flushes, then shuts the write side down.
    pub async fn shutdown(&mut self) -> std::io::Result<()> {
        self.flush().await?;
        self.io.shutdown().await
    }

    /// [`flush`](Self::flush) within `deadline`, for the whole batch: a peer that has not taken
    /// it by then is stuck (or too slow to serve), and waiting on it could hold the writer for
    /// ever. A write that times out may have sent part of a frame, so the writer breaks: its
    /// batch is wiped, and every later write fails. End the connection.
    pub async fn flush_within(&mut self, deadline: Duration) -> std::io::Result<()> {
        match tokio::time::timeout(deadline, self.flush()).await {
            Ok(result) => result,
            Err(_) => Err(self.break_off(deadline)),
        }
    }

    /// [`shutdown`](Self::shutdown) within `deadline`, breaking the writer the same way.
    pub async fn shutdown_within(&mut self, deadline: Duration) -> std::io::Result<()> {
        match tokio::time::timeout(deadline, self.shutdown()).await {
            Ok(result) => result,
            Err(_) => Err(self.break_off(deadline)),
        }
    }

    fn break_off(&mut self, deadline: Duration) -> std::io::Error {
        self.broken = true;
        self.buf.as_mut_slice().zeroize();
        self.buf.clear();
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "the peer did not take what was written within {deadline:?}; the connection is given up"
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyhole_protocol::{DEFAULT_MAX_FRAME, Op, Request, decode};

    #[tokio::test]
    async fn a_write_the_peer_never_reads_times_out_and_breaks_the_writer() {
        let (a, _b) = tokio::io::duplex(64); // `_b` is never read
        let mut w = FrameWriter::new(a, 1, Encoding::Json, DEFAULT_MAX_FRAME);
        w.queue_raw(&[7u8; 4096]);
        let started = std::time::Instant::now();
        let err = w
            .flush_within(Duration::from_millis(100))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
        assert!(started.elapsed() >= Duration::from_millis(100));
        assert!(!w.has_pending(), "the batch is wiped");
        w.queue_raw(b"more");
        let again = w.flush().await.unwrap_err();
        assert_eq!(again.kind(), std::io::ErrorKind::BrokenPipe, "{again}");
        let shut = w.shutdown_within(Duration::from_secs(1)).await.unwrap_err();
        assert_eq!(shut.kind(), std::io::ErrorKind::BrokenPipe, "{shut}");
    }

    #[tokio::test]
    async fn frames_cross_a_pipe_in_pieces() {
        let (a, b) = tokio::io::duplex(7); // tiny pipe: every frame arrives in pieces
        let writer_task = tokio::spawn(async move {
            let mut w = FrameWriter::new(a, 1, Encoding::Json, DEFAULT_MAX_FRAME);
            for id in 0..50u64 {
                w.queue(&Request {
                    id,
                    timeout_ms: 10,
                    op: Op::Health {},
                })
                .unwrap();
            }
            w.shutdown().await.unwrap();
        });
        let mut r = FrameReader::new(b, DEFAULT_MAX_FRAME);
        let mut seen = 0;
        while let Some(frame) = r.next().await.unwrap() {
            let req: Request = decode(frame.header.encoding, frame.payload).unwrap();
            assert_eq!(req.id, seen);
            seen += 1;
        }
        assert_eq!(seen, 50);
        writer_task.await.unwrap();
    }

    #[tokio::test]
    async fn oversized_header_fails_without_waiting_for_the_payload() {
        let (mut a, b) = tokio::io::duplex(64);
        let header = FrameHeader {
            major: 1,
            encoding: Encoding::Json,
            len: u32::MAX,
        };
        a.write_all(&header.to_bytes()).await.unwrap();
        let mut r = FrameReader::new(b, DEFAULT_MAX_FRAME);
        assert!(matches!(
            r.next().await,
            Err(ReadError::Frame(FrameError::TooLarge { .. }))
        ));
    }

    #[tokio::test]
    async fn eof_mid_frame_is_truncation() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b"KHOL\x00\x01\x01\x00\x00\x00\x00\x05ab")
            .await
            .unwrap();
        drop(a);
        let mut r = FrameReader::new(b, DEFAULT_MAX_FRAME);
        assert!(matches!(r.next().await, Err(ReadError::Truncated)));
    }
}
