//! The serve loop: one task per connection that reads requests, runs them concurrently, and writes
//! answers in batches.
//!
//! Everything for a connection happens in a single task: requests run as futures polled by that
//! task (no hand-off to other tasks or threads), and answers that become ready together leave in
//! one write. That keeps a request's path to two wake-ups: readable socket in, writable socket out.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{AbortHandle, Abortable};
use futures_util::stream::{FuturesUnordered, SelectAll, StreamExt};
use keyhole_protocol::{
    DEFAULT_LIST_LIMIT, DEFAULT_MAX_FRAME, DecodeError, EncodeError, Encoding, ErrorCode,
    FrameError, HANDSHAKE_MAJOR, HANDSHAKE_MAX_FRAME, Hello, HelloAck, HelloReject, HelloReply,
    MAX_LIST_LIMIT, Offer, Op, OpKind, Outcome, ProviderError, ProviderMessage, RejectCode, Reply,
    Request, Response, SUPPORTED_MAJORS, Token, WatchEvent, decode, negotiate, validate_name,
    validate_prefix,
};
use keyhole_transport::awake::StayAwake;
use keyhole_transport::{BoxRead, BoxWrite, FrameReader, FrameWriter, ReadError};
use tokio::sync::mpsc;

use crate::provider::{Provider, StoreRequest, WatchChange};

/// Limits of the serve loop.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// How long a new connection may take to send Hello.
    pub hello_timeout: Duration,
    /// Largest payload accepted from the gateway (a power of two, 1 MiB to 16 MiB).
    pub max_frame: u32,
    /// Most requests in flight on one connection; further frames wait unread (backpressure).
    pub max_in_flight: usize,
    /// Encodings this provider speaks.
    pub encodings: Vec<Encoding>,
    /// Protocol majors this provider speaks.
    pub majors: Vec<u16>,
    /// How long one batch of answers may take to write. A gateway that has not taken it by
    /// then is wedged: the connection ends (`TimedOut`) rather than hold every request.
    pub write_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> ServeOptions {
        ServeOptions {
            hello_timeout: Duration::from_secs(5),
            max_frame: DEFAULT_MAX_FRAME,
            max_in_flight: 1024,
            encodings: Encoding::ALL.to_vec(),
            majors: SUPPORTED_MAJORS.to_vec(),
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// How a connection ended.
#[derive(Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionEnd {
    /// The gateway said Goodbye and every request was answered.
    Goodbye,
    /// The gateway closed the connection.
    Closed,
    /// The handshake failed; the reason was sent to the gateway.
    Rejected(RejectCode),
    /// The gateway broke the protocol; an `Abort` was sent, best effort.
    Fault(String),
}

/// Serves one connection until it ends. Never panics on anything the peer sends.
pub async fn serve_connection<P: Provider>(
    provider: Arc<P>,
    read: BoxRead,
    write: BoxWrite,
    token: &Token,
    options: &ServeOptions,
) -> std::io::Result<ConnectionEnd> {
    let mut reader = FrameReader::new(read, HANDSHAKE_MAX_FRAME);
    let mut writer = FrameWriter::new(write, HANDSHAKE_MAJOR, Encoding::Json, HANDSHAKE_MAX_FRAME);
    let ack = match handshake(&*provider, &mut reader, &mut writer, token, options).await? {
        Ok(ack) => ack,
        Err(end) => return Ok(end),
    };
    tracing::debug!(major = ack.major, encoding = %ack.encoding, "handshake complete");
    reader.set_cap(options.max_frame);
    Session {
        provider: &*provider,
        capabilities: ack.capabilities.clone(),
        major: ack.major,
        encoding: ack.encoding,
        options,
    }
    .run(reader, writer)
    .await
}

async fn handshake<P: Provider>(
    provider: &P,
    reader: &mut FrameReader<BoxRead>,
    writer: &mut FrameWriter<BoxWrite>,
    token: &Token,
    options: &ServeOptions,
) -> std::io::Result<Result<HelloAck, ConnectionEnd>> {
    let offer = Offer {
        majors: &options.majors,
        encodings: &options.encodings,
    };
    let reject = |code, message: String| HelloReject {
        code,
        message,
        majors: options.majors.clone(),
        encodings: options.encodings.clone(),
    };
    let hello: Result<Hello, HelloReject> =
        match tokio::time::timeout(options.hello_timeout, reader.next()).await {
            Err(_) => {
                tracing::warn!("no Hello within {:?}; closing", options.hello_timeout);
                return Ok(Err(ConnectionEnd::Closed));
            }
            Ok(Ok(None)) => return Ok(Err(ConnectionEnd::Closed)),
            Ok(Err(e)) => {
                tracing::warn!("bad handshake frame: {e}");
                return Ok(Err(ConnectionEnd::Fault(e.to_string())));
            }
            Ok(Ok(Some(frame))) => {
                if frame.header.major != HANDSHAKE_MAJOR || frame.header.encoding != Encoding::Json
                {
                    Err(reject(
                        RejectCode::InvalidHello,
                        "the Hello frame must be JSON with major 0".into(),
                    ))
                } else {
                    decode::<Hello>(Encoding::Json, frame.payload)
                        .map_err(|e| reject(RejectCode::InvalidHello, format!("bad Hello: {e}")))
                }
            }
        };
    let result = hello.and_then(|hello| {
        if !hello.token.ct_eq(token) {
            return Err(reject(
                RejectCode::Unauthenticated,
                "wrong token: the gateway must send the token this provider was given".into(),
            ));
        }
        negotiate(&hello, &offer).map(|chosen| (chosen, hello.max_frame))
    });
    match result {
        Ok(((major, encoding), peer_cap)) => {
            let ack = HelloAck {
                major,
                encoding,
                provider: provider.info(),
                capabilities: provider.capabilities(),
                features: Vec::new(),
                max_frame: options.max_frame,
            };
            queue_or_log(writer, &HelloReply::Accept(ack.clone()));
            writer.flush_within(options.write_timeout).await?;
            writer.set_format(major, encoding, peer_cap);
            Ok(Ok(ack))
        }
        Err(rejection) => {
            tracing::warn!(code = ?rejection.code, "handshake refused: {}", rejection.message);
            let code = rejection.code;
            queue_or_log(writer, &HelloReply::Reject(rejection));
            let _ = writer.shutdown_within(options.write_timeout).await;
            Ok(Err(ConnectionEnd::Rejected(code)))
        }
    }
}

fn queue_or_log(writer: &mut FrameWriter<BoxWrite>, msg: &HelloReply) {
    if let Err(e) = writer.queue(msg) {
        tracing::error!("could not encode a handshake frame: {e}");
    }
}

type OpFuture<'a> = Pin<Box<dyn Future<Output = Done> + Send + 'a>>;

/// What a finished request future produced.
enum Done {
    Answer(u64, Outcome),
    Watch(u64, Result<mpsc::Receiver<WatchChange>, ProviderError>),
}

struct Session<'a, P> {
    provider: &'a P,
    capabilities: keyhole_protocol::Capabilities,
    major: u16,
    encoding: Encoding,
    options: &'a ServeOptions,
}

/// What the read branch of the loop produced.
enum Incoming {
    Request(Request),
    Closed,
    Fault(ProviderError),
}

impl<'a, P: Provider> Session<'a, P> {
    async fn run(
        self,
        mut reader: FrameReader<BoxRead>,
        mut writer: FrameWriter<BoxWrite>,
    ) -> std::io::Result<ConnectionEnd> {
        let mut running: FuturesUnordered<Abortable<OpFuture<'a>>> = FuturesUnordered::new();
        let mut handles: HashMap<u64, AbortHandle> = HashMap::new();
        let mut watches = SelectAll::new();
        let mut watch_handles: HashMap<u64, AbortHandle> = HashMap::new();
        let (major, encoding) = (self.major, self.encoding);
        // After an answer goes out, the gateway's next request often follows within
        // microseconds; staying awake for it saves waking this process from another core.
        let mut awake = StayAwake::default();
        // Whether the last flush carried an answer to an operation (a watch event or a
        // CancelAck says nothing about when the next request comes), and whether one is queued.
        let mut answered = false;
        let mut replied = false;

        let end = loop {
            let can_read = handles.len() < self.options.max_in_flight;
            let due = answered && running.is_empty();
            tokio::select! {
                biased;
                Some(done) = running.next(), if !running.is_empty() => {
                    // An aborted future was already answered `Cancelled` by `Cancel`.
                    let Ok(done) = done else { continue };
                    match done {
                        Done::Answer(id, outcome) => {
                            handles.remove(&id);
                            respond(&mut writer, id, outcome);
                            replied = true;
                        }
                        Done::Watch(id, Ok(rx)) => {
                            handles.remove(&id);
                            let (handle, registration) = AbortHandle::new_pair();
                            let stream = WatchStream { id, rx };
                            watches.push(futures_util::stream::Abortable::new(stream, registration));
                            watch_handles.insert(id, handle);
                            respond(&mut writer, id, Outcome::Ok(Reply::Watching {}));
                            replied = true;
                        }
                        Done::Watch(id, Err(e)) => {
                            handles.remove(&id);
                            respond(&mut writer, id, Outcome::Err(e));
                            replied = true;
                        }
                    }
                }
                Some((watch_id, change)) = watches.next(), if !watches.is_empty() => {
                    let event = ProviderMessage::Event(WatchEvent {
                        watch_id,
                        name: change.name,
                        change: change.change,
                        version: change.version,
                    });
                    if let Err(e) = writer.queue(&event) {
                        tracing::warn!("dropped a watch event that does not fit a frame: {e}");
                    }
                }
                incoming = next_request(&mut reader, &mut awake, due, major, encoding), if can_read => {
                    match incoming {
                        Incoming::Closed => break ConnectionEnd::Closed,
                        Incoming::Fault(err) => {
                            tracing::warn!("protocol fault from the gateway: {}", err.message);
                            break abort(&mut writer, err, self.options.write_timeout).await;
                        }
                        Incoming::Request(req) => {
                            let id = req.id;
                            if handles.contains_key(&id) || watch_handles.contains_key(&id) {
                                let err = ProviderError::new(
                                    ErrorCode::InvalidRequest,
                                    format!("request id {id} is already in flight"),
                                );
                                break abort(&mut writer, err, self.options.write_timeout).await;
                            }
                            match req.op {
                                Op::Cancel { id: target } => {
                                    let found = if let Some(h) = handles.remove(&target) {
                                        h.abort();
                                        respond(&mut writer, target, Outcome::Err(ProviderError::new(
                                            ErrorCode::Cancelled,
                                            "cancelled by the gateway",
                                        )));
                                        true
                                    } else if let Some(h) = watch_handles.remove(&target) {
                                        h.abort();
                                        true
                                    } else {
                                        false
                                    };
                                    respond(&mut writer, id, Outcome::Ok(Reply::CancelAck { found }));
                                }
                                Op::Goodbye {} => {
                                    for (target, h) in handles.drain() {
                                        h.abort();
                                        respond(&mut writer, target, Outcome::Err(ProviderError::new(
                                            ErrorCode::Cancelled,
                                            "cancelled: the gateway said Goodbye",
                                        )));
                                    }
                                    for (_, h) in watch_handles.drain() {
                                        h.abort();
                                    }
                                    respond(&mut writer, id, Outcome::Ok(Reply::GoodbyeAck {}));
                                    writer.shutdown_within(self.options.write_timeout).await?;
                                    break ConnectionEnd::Goodbye;
                                }
                                op => match self.start(id, req.timeout_ms, op) {
                                    Ok(fut) => {
                                        let (handle, registration) = AbortHandle::new_pair();
                                        running.push(Abortable::new(fut, registration));
                                        handles.insert(id, handle);
                                    }
                                    Err(err) => {
                                        respond(&mut writer, id, Outcome::Err(err));
                                        replied = true;
                                    }
                                },
                            }
                        }
                    }
                }
            }
            // Batch: hold answers back only while another frame is buffered and will be read at
            // once; when the in-flight cap stops reading, write now, or answers would wait.
            let more_now =
                handles.len() < self.options.max_in_flight && reader.has_buffered_frame();
            answered = false;
            if writer.has_pending() && !more_now {
                writer.flush_within(self.options.write_timeout).await?;
                answered = std::mem::take(&mut replied);
            }
        };
        Ok(end)
    }

    /// Validates a request and returns the future that performs it, or the immediate refusal.
    fn start(&self, id: u64, timeout_ms: u32, op: Op) -> Result<OpFuture<'a>, ProviderError> {
        if timeout_ms == 0 {
            return Err(deadline_exceeded());
        }
        check_request(&self.capabilities, &op)?;
        let provider = self.provider;
        let deadline = Duration::from_millis(u64::from(timeout_ms));
        tracing::debug!(id, op = %op.kind(), "request");
        if let Op::Watch { prefix } = op {
            return Ok(Box::pin(async move {
                Done::Watch(id, with_deadline(deadline, provider.watch(&prefix)).await)
            }));
        }
        Ok(Box::pin(async move {
            let outcome = with_deadline(deadline, perform(provider, op)).await;
            Done::Answer(id, outcome.into())
        }))
    }
}

/// Runs one operation the way the serve loop does, minus deadlines and concurrency: the
/// capability check (`Unsupported`), name and size checks (`InvalidRequest`, `TooLarge`), then
/// the provider's method. For authors who drive a provider from a loop of their own.
/// `Watch`, `Cancel` and `Goodbye` belong to the loop and answer `InvalidRequest` here.
pub async fn dispatch<P: Provider>(
    provider: &P,
    capabilities: &keyhole_protocol::Capabilities,
    op: Op,
) -> Result<Reply, ProviderError> {
    check_request(capabilities, &op)?;
    match op {
        Op::Watch { .. } | Op::Cancel { .. } | Op::Goodbye {} => Err(ProviderError::new(
            ErrorCode::InvalidRequest,
            "watch, cancel and goodbye are handled by the connection loop",
        )),
        op => perform(provider, op).await,
    }
}

fn check_request(
    capabilities: &keyhole_protocol::Capabilities,
    op: &Op,
) -> Result<(), ProviderError> {
    let kind = op.kind();
    if !declared(capabilities, kind) {
        return Err(ProviderError::unsupported(kind));
    }
    check_op(op, capabilities.max_value_size)
}

fn declared(c: &keyhole_protocol::Capabilities, kind: OpKind) -> bool {
    match kind {
        OpKind::Store => c.store,
        OpKind::Rotate => c.rotate,
        OpKind::Revoke => c.revoke,
        OpKind::List => c.list,
        OpKind::Watch => c.watch,
        OpKind::Resolve | OpKind::Describe | OpKind::Health | OpKind::Cancel | OpKind::Goodbye => {
            true
        }
    }
}

/// A watch's changes, tagged with the watch's request id.
struct WatchStream {
    id: u64,
    rx: mpsc::Receiver<WatchChange>,
}

impl futures_util::Stream for WatchStream {
    type Item = (u64, WatchChange);

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<(u64, WatchChange)>> {
        let id = self.id;
        self.rx.poll_recv(cx).map(|c| c.map(|change| (id, change)))
    }
}

async fn with_deadline<T>(
    deadline: Duration,
    fut: impl Future<Output = Result<T, ProviderError>>,
) -> Result<T, ProviderError> {
    tokio::time::timeout(deadline, fut)
        .await
        .unwrap_or_else(|_| Err(deadline_exceeded()))
}

fn deadline_exceeded() -> ProviderError {
    ProviderError::new(
        ErrorCode::DeadlineExceeded,
        "the request's deadline passed before it completed",
    )
}

/// Name, prefix and size checks shared by every provider.
fn check_op(op: &Op, max_value_size: u32) -> Result<(), ProviderError> {
    let invalid = |what: &str, e: keyhole_protocol::NameError| {
        ProviderError::new(ErrorCode::InvalidRequest, format!("invalid {what}: {e}"))
    };
    match op {
        Op::Resolve { name, .. } | Op::Revoke { name } | Op::Describe { name } => {
            validate_name(name).map_err(|e| invalid("name", e))
        }
        Op::Store { name, value, .. } | Op::Rotate { name, value, .. } => {
            validate_name(name).map_err(|e| invalid("name", e))?;
            if value.len() > max_value_size as usize {
                return Err(ProviderError::new(
                    ErrorCode::TooLarge,
                    format!(
                        "value of {} bytes exceeds this provider's max_value_size of {max_value_size}",
                        value.len()
                    ),
                ));
            }
            Ok(())
        }
        Op::List { prefix, .. } | Op::Watch { prefix } => {
            validate_prefix(prefix).map_err(|e| invalid("prefix", e))
        }
        Op::Health {} | Op::Cancel { .. } | Op::Goodbye {} => Ok(()),
    }
}

async fn perform<P: Provider>(provider: &P, op: Op) -> Result<Reply, ProviderError> {
    match op {
        Op::Resolve { name, version } => {
            provider
                .resolve(&name, version.as_deref())
                .await
                .map(|r| Reply::Resolved {
                    value: r.value,
                    version: r.version,
                })
        }
        Op::Store {
            name,
            value,
            create_only,
            labels,
        } => provider
            .store(StoreRequest {
                name,
                value,
                create_only,
                labels,
            })
            .await
            .map(|version| Reply::Stored { version }),
        Op::Rotate {
            name,
            value,
            expected_version,
        } => provider
            .rotate(&name, value, expected_version.as_deref())
            .await
            .map(|version| Reply::Rotated { version }),
        Op::Revoke { name } => provider.revoke(&name).await.map(|()| Reply::Revoked {}),
        Op::Describe { name } => provider.describe(&name).await.map(Reply::Described),
        Op::List {
            prefix,
            page,
            limit,
        } => {
            let limit = match limit {
                0 => DEFAULT_LIST_LIMIT,
                n => n.min(MAX_LIST_LIMIT),
            };
            provider
                .list(&prefix, page.as_deref(), limit)
                .await
                .map(|p| Reply::Listed {
                    entries: p.entries,
                    next_page: p.next_page,
                })
        }
        Op::Health {} => Ok(Reply::Health(provider.health().await)),
        // Handled by the loop itself; unreachable through `start`.
        Op::Watch { .. } | Op::Cancel { .. } | Op::Goodbye {} => Err(ProviderError::internal(
            "operation routed to the wrong handler",
        )),
    }
}

/// Queues the answer to `id`; an answer too large for the gateway's frame cap becomes `TooLarge`.
/// Ends the connection over a protocol fault: tells the gateway why, then closes.
async fn abort(
    writer: &mut FrameWriter<BoxWrite>,
    err: ProviderError,
    write_timeout: Duration,
) -> ConnectionEnd {
    let message = err.message.clone();
    let _ = writer.queue(&ProviderMessage::Abort(err));
    let _ = writer.shutdown_within(write_timeout).await;
    ConnectionEnd::Fault(message)
}

fn respond(writer: &mut FrameWriter<BoxWrite>, id: u64, outcome: Outcome) {
    let msg = ProviderMessage::Response(Response { id, outcome });
    match writer.queue(&msg) {
        Ok(()) => {}
        Err(EncodeError::TooLarge { len, cap }) => {
            let fallback = ProviderMessage::Response(Response {
                id,
                outcome: Outcome::Err(ProviderError::new(
                    ErrorCode::TooLarge,
                    format!("the answer ({len} bytes) exceeds the gateway's frame cap of {cap}"),
                )),
            });
            if let Err(e) = writer.queue(&fallback) {
                tracing::error!(id, "could not encode an answer: {e}");
            }
        }
        Err(e) => tracing::error!(id, "could not encode an answer: {e}"),
    }
}

async fn next_request(
    reader: &mut FrameReader<BoxRead>,
    awake: &mut StayAwake,
    due: bool,
    major: u16,
    encoding: Encoding,
) -> Incoming {
    let fault = |code, message: String| Incoming::Fault(ProviderError::new(code, message));
    match awake.next(reader, due).await {
        Ok(None) => Incoming::Closed,
        Ok(Some(frame)) => {
            if frame.header.major != major || frame.header.encoding != encoding {
                return fault(
                    ErrorCode::InvalidRequest,
                    format!(
                        "frame is major {} in {}, but the connection negotiated major {major} in {encoding}",
                        frame.header.major, frame.header.encoding
                    ),
                );
            }
            match decode::<Request>(encoding, frame.payload) {
                Ok(req) => Incoming::Request(req),
                Err(e) => fault(ErrorCode::InvalidRequest, undecodable(&e)),
            }
        }
        Err(ReadError::Frame(e @ FrameError::TooLarge { .. })) => {
            fault(ErrorCode::TooLarge, e.to_string())
        }
        Err(ReadError::Frame(e)) => fault(ErrorCode::InvalidRequest, e.to_string()),
        Err(ReadError::Truncated) => Incoming::Closed,
        Err(ReadError::Io(e)) => {
            tracing::debug!("read failed: {e}");
            Incoming::Closed
        }
        Err(e) => fault(ErrorCode::InvalidRequest, e.to_string()),
    }
}

fn undecodable(e: &DecodeError) -> String {
    format!("request could not be decoded: {e}")
}
