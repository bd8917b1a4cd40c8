//! The gateway's side of a provider connection: the handshake, then a multiplexer that lets many
//! callers have requests in flight at once and routes each response to its caller.
//!
//! Two kinds of failure stay apart, as in age's plugin API: a call returns
//! `Result<Outcome, CallError>`, where `Outcome::Err` is the provider saying no and `CallError`
//! is the connection failing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyhole_protocol::{
    DEFAULT_MAX_FRAME, DecodeError, EncodeError, Encoding, FrameError, HANDSHAKE_MAJOR,
    HANDSHAKE_MAX_FRAME, Hello, HelloAck, HelloReject, HelloReply, Op, Outcome, ProviderError,
    ProviderMessage, Request, SUPPORTED_MAJORS, Token, WatchEvent, decode, valid_max_frame,
};
use tokio::sync::{mpsc, oneshot};
use zeroize::Zeroizing;

use crate::awake::StayAwake;
use crate::framed::{FrameReader, FrameWriter, ReadError};
use crate::{BoxRead, BoxWrite};

/// What the gateway offers in its Hello.
#[derive(Clone, Debug)]
pub struct HelloOptions {
    /// Majors offered.
    pub majors: Vec<u16>,
    /// Encoding names offered, most preferred first (unknown names are allowed, for tests).
    pub encodings: Vec<String>,
    /// Feature strings.
    pub features: Vec<String>,
    /// The one-time token.
    pub token: Token,
    /// The largest payload accepted from the provider.
    pub max_frame: u32,
}

impl HelloOptions {
    /// This implementation's majors, one encoding, no features, the default frame cap.
    pub fn new(token: Token, encoding: Encoding) -> HelloOptions {
        HelloOptions {
            majors: SUPPORTED_MAJORS.to_vec(),
            encodings: vec![encoding.name().to_string()],
            features: Vec::new(),
            token,
            max_frame: DEFAULT_MAX_FRAME,
        }
    }

    fn hello(&self) -> Hello {
        Hello {
            majors: self.majors.clone(),
            encodings: self.encodings.clone(),
            features: self.features.clone(),
            token: self.token.clone(),
            max_frame: self.max_frame,
        }
    }
}

/// Why the handshake failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The provider refused, saying why.
    #[error("provider refused the handshake: {}: {}", reject_code(.0), .0.message)]
    Rejected(HelloReject),
    /// The provider closed the connection before replying.
    #[error("provider closed the connection before answering Hello")]
    Closed,
    /// No reply before the deadline.
    #[error("provider did not answer Hello within {0:?}")]
    Timeout(Duration),
    /// The connection failed.
    #[error("handshake failed: {0}")]
    Read(#[from] ReadError),
    /// The reply could not be decoded.
    #[error("provider's HelloReply is malformed: {0}")]
    Decode(#[from] DecodeError),
    /// The reply is well-formed but breaks the protocol.
    #[error("provider's HelloReply breaks the protocol: {0}")]
    Invalid(String),
    /// Writing the Hello failed.
    #[error("could not send Hello: {0}")]
    Io(#[from] std::io::Error),
}

fn reject_code(r: &HelloReject) -> String {
    format!("{:?}", r.code)
}

/// Performs the gateway's side of the handshake, with a deadline.
pub async fn handshake(
    read: BoxRead,
    write: BoxWrite,
    options: &HelloOptions,
    deadline: Duration,
) -> Result<(FrameReader<BoxRead>, FrameWriter<BoxWrite>, HelloAck), HandshakeError> {
    let mut reader = FrameReader::new(read, HANDSHAKE_MAX_FRAME);
    let mut writer = FrameWriter::new(write, HANDSHAKE_MAJOR, Encoding::Json, HANDSHAKE_MAX_FRAME);
    let exchange = async {
        writer
            .queue(&options.hello())
            .map_err(|e| HandshakeError::Invalid(e.to_string()))?;
        writer.flush().await?;
        let frame = reader.next().await?.ok_or(HandshakeError::Closed)?;
        if frame.header.major != HANDSHAKE_MAJOR || frame.header.encoding != Encoding::Json {
            return Err(HandshakeError::Invalid(format!(
                "HelloReply must be JSON with major 0, got {} with major {}",
                frame.header.encoding, frame.header.major
            )));
        }
        let reply: HelloReply = decode(Encoding::Json, frame.payload)?;
        Ok(reply)
    };
    let reply = tokio::time::timeout(deadline, exchange)
        .await
        .map_err(|_| HandshakeError::Timeout(deadline))??;
    let ack = match reply {
        HelloReply::Reject(r) => return Err(HandshakeError::Rejected(r)),
        HelloReply::Accept(ack) => ack,
    };
    if !options.majors.contains(&ack.major) {
        return Err(HandshakeError::Invalid(format!(
            "provider chose major {} which the gateway did not offer ({:?})",
            ack.major, options.majors
        )));
    }
    if !options.encodings.iter().any(|e| e == ack.encoding.name()) {
        return Err(HandshakeError::Invalid(format!(
            "provider chose encoding {} which the gateway did not offer",
            ack.encoding
        )));
    }
    if !valid_max_frame(ack.max_frame) {
        return Err(HandshakeError::Invalid(format!(
            "provider's max_frame {} is not a power of two from 1 MiB to 16 MiB",
            ack.max_frame
        )));
    }
    reader.set_cap(options.max_frame);
    writer.set_format(ack.major, ack.encoding, ack.max_frame);
    Ok((reader, writer, ack))
}

/// The connection failed, as distinct from the provider answering with an error.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// The connection is closed; the reason says how it ended.
    #[error("provider connection closed: {0}")]
    Closed(String),
    /// The provider aborted the connection with this error.
    #[error("provider aborted the connection: {0}")]
    Aborted(ProviderError),
    /// No answer arrived within the deadline plus grace.
    #[error("provider did not answer within {0:?}")]
    Timeout(Duration),
    /// The request could not be encoded within the provider's frame cap.
    #[error("request not sent: {0}")]
    Encode(EncodeError),
}

/// An answer, with the raw payload bytes when they were asked for.
#[derive(Debug)]
pub struct Answer {
    /// What the provider said.
    pub outcome: Outcome,
    /// The payload of the response frame, if [`Client::call_raw`] asked for it.
    pub raw: Option<Zeroizing<Vec<u8>>>,
}

struct Pending {
    tx: oneshot::Sender<Answer>,
    want_raw: bool,
}

struct Shared {
    pending: Mutex<HashMap<u64, Pending>>,
    closed: Mutex<Option<CallError>>,
}

impl Shared {
    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn close(&self, why: CallError) {
        let mut closed = self.closed.lock().unwrap_or_else(|p| p.into_inner());
        if closed.is_none() {
            *closed = Some(why);
        }
        // Dropping the senders wakes every waiter, which then reads `closed`.
        self.lock_pending().clear();
    }

    fn closed_reason(&self) -> Option<CallError> {
        self.closed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// A multiplexed connection to one provider.
pub struct Client {
    writer: tokio::sync::Mutex<FrameWriter<BoxWrite>>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    ack: HelloAck,
    grace: Duration,
    reader_task: tokio::task::JoinHandle<()>,
}

impl Client {
    /// Starts the response router over a connection that has completed the handshake. Watch
    /// events go to `events`.
    pub fn start(
        reader: FrameReader<BoxRead>,
        writer: FrameWriter<BoxWrite>,
        ack: HelloAck,
        events: mpsc::UnboundedSender<WatchEvent>,
    ) -> Client {
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            closed: Mutex::new(None),
        });
        let reader_task = tokio::spawn(route(reader, ack.encoding, Arc::clone(&shared), events));
        Client {
            writer: tokio::sync::Mutex::new(writer),
            shared,
            next_id: AtomicU64::new(1),
            ack,
            grace: Duration::from_millis(500),
            reader_task,
        }
    }

    /// How long past a request's deadline the client still waits for its answer.
    pub fn set_grace(&mut self, grace: Duration) {
        self.grace = grace;
    }

    /// The provider's HelloAck.
    pub fn ack(&self) -> &HelloAck {
        &self.ack
    }

    /// Sends `op` with deadline `timeout` and waits for its answer.
    pub async fn call(&self, op: Op, timeout: Duration) -> Result<Outcome, CallError> {
        Ok(self.call_inner(op, timeout, false).await?.outcome)
    }

    /// Like [`Client::call`], and also returns the raw response payload (for checks that a value
    /// does not appear on the wire where it must not).
    pub async fn call_raw(&self, op: Op, timeout: Duration) -> Result<Answer, CallError> {
        self.call_inner(op, timeout, true).await
    }

    /// Sends a request with this exact deadline in milliseconds (0 allowed), waiting up to `wait`.
    pub async fn call_with_timeout_ms(
        &self,
        op: Op,
        timeout_ms: u32,
        wait: Duration,
    ) -> Result<Outcome, CallError> {
        let (id, rx) = self.register(false);
        let left = self.send(Request { id, timeout_ms, op }, id, wait).await?;
        Ok(self.wait(id, rx, left).await?.outcome)
    }

    /// Sends `op` without waiting; the returned handle waits for the answer.
    pub async fn start_call(&self, op: Op, timeout: Duration) -> Result<PendingCall, CallError> {
        let (id, rx) = self.register(false);
        let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        let left = self
            .send(Request { id, timeout_ms, op }, id, timeout + self.grace)
            .await?;
        Ok(PendingCall { id, rx, wait: left })
    }

    /// Waits for a call started with [`Client::start_call`].
    pub async fn finish(&self, call: PendingCall) -> Result<Outcome, CallError> {
        Ok(self.wait(call.id, call.rx, call.wait).await?.outcome)
    }

    /// Writes raw bytes to the connection (for tests of malformed input).
    pub async fn send_raw(&self, bytes: &[u8]) -> Result<(), CallError> {
        let mut w = self.writer.lock().await;
        w.queue_raw(bytes);
        w.flush()
            .await
            .map_err(|e| CallError::Closed(format!("write failed: {e}")))
    }

    /// Waits until the provider closes the connection, for at most `deadline`. Returns the reason
    /// the connection ended, or `None` if it is still open.
    pub async fn wait_closed(&self, deadline: Duration) -> Option<CallError> {
        let stop = tokio::time::Instant::now() + deadline;
        loop {
            if let Some(why) = self.shared.closed_reason() {
                return Some(why);
            }
            if tokio::time::Instant::now() >= stop {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Why the connection is closed, if it is.
    pub fn closed(&self) -> Option<CallError> {
        self.shared.closed_reason()
    }

    fn register(&self, want_raw: bool) -> (u64, oneshot::Receiver<Answer>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.shared
            .lock_pending()
            .insert(id, Pending { tx, want_raw });
        (id, rx)
    }

    async fn call_inner(&self, op: Op, timeout: Duration, raw: bool) -> Result<Answer, CallError> {
        let (id, rx) = self.register(raw);
        let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        let left = self
            .send(Request { id, timeout_ms, op }, id, timeout + self.grace)
            .await?;
        self.wait(id, rx, left).await
    }

    /// Sends `req` within `wait` and returns what is left of it for the answer. A provider that
    /// stops reading fills the socket and would hold the write (and every later call behind the
    /// writer's lock) for ever; past the deadline the connection is closed instead, since a
    /// frame may be half written.
    async fn send(&self, req: Request, id: u64, wait: Duration) -> Result<Duration, CallError> {
        let started = tokio::time::Instant::now();
        match tokio::time::timeout(wait, self.send_now(req, id)).await {
            Ok(sent) => sent.map(|()| wait.saturating_sub(started.elapsed())),
            Err(_) => {
                self.shared.lock_pending().remove(&id);
                let why = CallError::Closed(format!(
                    "the provider stopped reading: a request could not be written within {wait:?}"
                ));
                self.shared.close(why.clone());
                Err(why)
            }
        }
    }

    async fn send_now(&self, req: Request, id: u64) -> Result<(), CallError> {
        if let Some(why) = self.shared.closed_reason() {
            self.shared.lock_pending().remove(&id);
            return Err(why);
        }
        let mut w = self.writer.lock().await;
        if let Err(e) = w.queue(&req) {
            self.shared.lock_pending().remove(&id);
            return Err(CallError::Encode(e));
        }
        if let Err(e) = w.flush().await {
            self.shared.lock_pending().remove(&id);
            let why = CallError::Closed(format!("write failed: {e}"));
            self.shared.close(why.clone());
            return Err(why);
        }
        Ok(())
    }

    async fn wait(
        &self,
        id: u64,
        rx: oneshot::Receiver<Answer>,
        wait: Duration,
    ) -> Result<Answer, CallError> {
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(self
                .shared
                .closed_reason()
                .unwrap_or_else(|| CallError::Closed("connection dropped".into()))),
            Err(_) => {
                self.shared.lock_pending().remove(&id);
                Err(CallError::Timeout(wait))
            }
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader_task.abort();
    }
}

/// A request sent with [`Client::start_call`] and not yet answered.
pub struct PendingCall {
    /// The request id.
    pub id: u64,
    rx: oneshot::Receiver<Answer>,
    wait: Duration,
}

async fn route(
    mut reader: FrameReader<BoxRead>,
    encoding: Encoding,
    shared: Arc<Shared>,
    events: mpsc::UnboundedSender<WatchEvent>,
) {
    let mut awake = StayAwake::default();
    let why = loop {
        // Staying awake pays while at most one call waits: a caller blocked on one answer (the
        // latency-bound case), or none, right after an answer, when a caller making calls one
        // after another is about to send its next (this wait began before that call
        // registered, so it cannot wait for the count to reach one). With more in flight,
        // answers keep arriving anyway. The back-off bounds the cost on an idle connection.
        let lone = shared.lock_pending().len() <= 1;
        let frame = match awake.next(&mut reader, lone).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break CallError::Closed("provider closed the connection".into()),
            Err(ReadError::Frame(e)) => break protocol_fault(&e),
            Err(e) => break CallError::Closed(e.to_string()),
        };
        if frame.header.encoding != encoding {
            break CallError::Closed(format!(
                "provider broke the protocol: frame in {} after negotiating {encoding}",
                frame.header.encoding
            ));
        }
        let msg: ProviderMessage = match decode(encoding, frame.payload) {
            Ok(m) => m,
            Err(e) => {
                break CallError::Closed(format!("provider broke the protocol: {e}"));
            }
        };
        match msg {
            ProviderMessage::Response(resp) => {
                let pending = shared.lock_pending().remove(&resp.id);
                if let Some(p) = pending {
                    let raw = p.want_raw.then(|| Zeroizing::new(frame.payload.to_vec()));
                    let _ = p.tx.send(Answer {
                        outcome: resp.outcome,
                        raw,
                    });
                }
            }
            ProviderMessage::Event(ev) => {
                let _ = events.send(ev);
            }
            ProviderMessage::Abort(err) => break CallError::Aborted(err),
        }
    };
    shared.close(why);
}

fn protocol_fault(e: &FrameError) -> CallError {
    CallError::Closed(format!("provider broke the protocol: {e}"))
}
