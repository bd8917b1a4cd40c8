//! The gateway's side of a provider connection: the handshake, then a multiplexer that lets many
//! callers have requests in flight at once and routes each response to its caller.
//!
//! Two kinds of failure stay apart, as in age's plugin API: a call returns
//! `Result<Outcome, CallError>`, where `Outcome::Err` is the provider saying no and `CallError`
//! is the connection failing.
//!
//! Watch events go to a bounded queue ([`event_channel`]). An event for a watch that is not open
//! (no `watching` answer yet, refused, cancelled, or never asked for) breaks the protocol and
//! closes the connection, so a provider cannot fill the gateway's memory with events nobody
//! asked for. When the queue is full the router waits for room, up to [`EVENT_DEADLINE`] for each
//! event, and then closes the connection rather than drop one; meanwhile it reads nothing else
//! from the connection, so the answers behind that event wait too (a consumer must keep taking
//! events while it waits for answers). When the queue's receiver is gone, events are discarded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyhole_protocol::{
    DEFAULT_MAX_FRAME, DecodeError, EncodeError, Encoding, FrameError, HANDSHAKE_MAJOR,
    HANDSHAKE_MAX_FRAME, Hello, HelloAck, HelloReject, HelloReply, Op, Outcome, ProviderError,
    ProviderMessage, Reply, Request, SUPPORTED_MAJORS, Token, WatchEvent, decode, valid_max_frame,
};
use tokio::sync::{mpsc, oneshot};
use zeroize::Zeroizing;

use crate::awake::StayAwake;
use crate::framed::{FrameReader, FrameWriter, ReadError};
use crate::{BoxRead, BoxWrite};

/// How many watch events wait in the queue for their consumer.
pub const EVENT_QUEUE: usize = 256;

/// How long the router waits for room in a full event queue before it closes the connection.
pub const EVENT_DEADLINE: Duration = Duration::from_secs(5);

/// The queue that a [`Client`]'s watch events go to: pass the sender to [`Client::start`].
pub fn event_channel() -> (mpsc::Sender<WatchEvent>, mpsc::Receiver<WatchEvent>) {
    mpsc::channel(EVENT_QUEUE)
}

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

/// The watches of a connection, kept apart from the pending calls so that a watch or a Cancel
/// whose caller stopped waiting still takes effect when its answer comes.
#[derive(Default)]
struct Watches {
    /// Watch requests sent (`false`) and open, answered `watching` (`true`): the ids an event may
    /// carry once open.
    open: HashMap<u64, bool>,
    /// Cancel requests sent, with the watch each ends once its `cancel_ack` comes.
    cancels: HashMap<u64, u64>,
}

struct Shared {
    pending: Mutex<HashMap<u64, Pending>>,
    closed: Mutex<Option<CallError>>,
    watches: Mutex<Watches>,
}

impl Shared {
    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_watches(&self) -> std::sync::MutexGuard<'_, Watches> {
        self.watches.lock().unwrap_or_else(|p| p.into_inner())
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
    /// events go to `events` (see [`event_channel`]; drop its receiver to discard them).
    pub fn start(
        reader: FrameReader<BoxRead>,
        writer: FrameWriter<BoxWrite>,
        ack: HelloAck,
        events: mpsc::Sender<WatchEvent>,
    ) -> Client {
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            closed: Mutex::new(None),
            watches: Mutex::new(Watches::default()),
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
        let (id, rx) = self.register(&op, false);
        let left = self.send(Request { id, timeout_ms, op }, id, wait).await?;
        Ok(self.wait(id, rx, left).await?.outcome)
    }

    /// Sends `op` without waiting; the returned handle waits for the answer.
    pub async fn start_call(&self, op: Op, timeout: Duration) -> Result<PendingCall, CallError> {
        let (id, rx) = self.register(&op, false);
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

    fn register(&self, op: &Op, want_raw: bool) -> (u64, oneshot::Receiver<Answer>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match op {
            Op::Watch { .. } => {
                self.shared.lock_watches().open.insert(id, false);
            }
            Op::Cancel { id: target } => {
                self.shared.lock_watches().cancels.insert(id, *target);
            }
            _ => {}
        }
        self.shared
            .lock_pending()
            .insert(id, Pending { tx, want_raw });
        (id, rx)
    }

    async fn call_inner(&self, op: Op, timeout: Duration, raw: bool) -> Result<Answer, CallError> {
        let (id, rx) = self.register(&op, raw);
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
                self.unsent(id);
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
            self.unsent(id);
            return Err(why);
        }
        let mut w = self.writer.lock().await;
        if let Err(e) = w.queue(&req) {
            self.unsent(id);
            return Err(CallError::Encode(e));
        }
        if let Err(e) = w.flush().await {
            self.unsent(id);
            let why = CallError::Closed(format!("write failed: {e}"));
            self.shared.close(why.clone());
            return Err(why);
        }
        Ok(())
    }

    /// Forgets request `id`, which was not sent.
    fn unsent(&self, id: u64) {
        self.shared.lock_pending().remove(&id);
        let mut watches = self.shared.lock_watches();
        watches.open.remove(&id);
        watches.cancels.remove(&id);
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
    events: mpsc::Sender<WatchEvent>,
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
                {
                    let mut watches = shared.lock_watches();
                    if let Some(open) = watches.open.get_mut(&resp.id) {
                        match &resp.outcome {
                            Outcome::Ok(Reply::Watching {}) => *open = true,
                            _ => {
                                watches.open.remove(&resp.id);
                            }
                        }
                    }
                    if let Some(target) = watches.cancels.remove(&resp.id) {
                        // After the CancelAck no event of that watch may come.
                        watches.open.remove(&target);
                    }
                }
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
                if shared.lock_watches().open.get(&ev.watch_id) != Some(&true) {
                    break CallError::Closed(format!(
                        "provider broke the protocol: an event for watch {}, which is not open",
                        ev.watch_id
                    ));
                }
                match events.send_timeout(ev, EVENT_DEADLINE).await {
                    Ok(()) | Err(mpsc::error::SendTimeoutError::Closed(_)) => {}
                    Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                        break CallError::Closed(format!(
                            "watch events were not consumed: the queue of {EVENT_QUEUE} stayed \
                             full for {EVENT_DEADLINE:?}"
                        ));
                    }
                }
            }
            ProviderMessage::Abort(err) => break CallError::Aborted(err),
        }
    };
    shared.close(why);
}

fn protocol_fault(e: &FrameError) -> CallError {
    CallError::Closed(format!("provider broke the protocol: {e}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

    use super::*;
    use keyhole_protocol::{Capabilities, Change, ProviderInfo, Response};

    /// A client over an in-memory pipe, and the provider's end of it (a reader of requests and a
    /// writer of answers and events), speaking JSON.
    fn pair(
        events: mpsc::Sender<WatchEvent>,
    ) -> (Client, FrameReader<BoxRead>, FrameWriter<BoxWrite>) {
        let (client_end, provider_end) = tokio::io::duplex(1 << 20);
        let (client_read, client_write) = tokio::io::split(client_end);
        let (provider_read, provider_write) = tokio::io::split(provider_end);
        let ack = HelloAck {
            major: 1,
            encoding: Encoding::Json,
            provider: ProviderInfo {
                name: "fake".into(),
                version: "0".into(),
            },
            capabilities: Capabilities {
                store: false,
                rotate: false,
                revoke: false,
                list: false,
                watch: true,
                versions_kept: 1,
                max_value_size: 1024,
            },
            features: Vec::new(),
            max_frame: DEFAULT_MAX_FRAME,
        };
        let client = Client::start(
            FrameReader::new(Box::new(client_read), DEFAULT_MAX_FRAME),
            FrameWriter::new(Box::new(client_write), 1, Encoding::Json, DEFAULT_MAX_FRAME),
            ack,
            events,
        );
        (
            client,
            FrameReader::new(Box::new(provider_read), DEFAULT_MAX_FRAME),
            FrameWriter::new(
                Box::new(provider_write),
                1,
                Encoding::Json,
                DEFAULT_MAX_FRAME,
            ),
        )
    }

    async fn next_request(reader: &mut FrameReader<BoxRead>) -> Request {
        let frame = reader.next().await.unwrap().unwrap();
        decode(Encoding::Json, frame.payload).unwrap()
    }

    async fn send(writer: &mut FrameWriter<BoxWrite>, message: &ProviderMessage) {
        writer.queue(message).unwrap();
        writer.flush().await.unwrap();
    }

    fn event(watch_id: u64) -> ProviderMessage {
        ProviderMessage::Event(WatchEvent {
            watch_id,
            name: "db/password".into(),
            change: Change::Updated,
            version: Some("2".into()),
        })
    }

    fn answer(id: u64, reply: Reply) -> ProviderMessage {
        ProviderMessage::Response(Response {
            id,
            outcome: Outcome::Ok(reply),
        })
    }

    const WAIT: Duration = Duration::from_secs(10);

    /// Sends a Watch of `db/`.
    async fn start_watch(client: &Client) -> PendingCall {
        let op = Op::Watch {
            prefix: "db/".into(),
        };
        client.start_call(op, WAIT).await.unwrap()
    }

    /// Opens a watch through `client`, answered by the provider's end; returns its id.
    async fn open_watch(
        client: &Client,
        requests: &mut FrameReader<BoxRead>,
        answers: &mut FrameWriter<BoxWrite>,
    ) -> u64 {
        let call = start_watch(client).await;
        let watch = next_request(requests).await;
        send(answers, &answer(watch.id, Reply::Watching {})).await;
        assert_eq!(
            client.finish(call).await.unwrap(),
            Outcome::Ok(Reply::Watching {})
        );
        watch.id
    }

    #[tokio::test]
    async fn an_event_for_a_watch_that_is_not_open_closes_the_connection() {
        let (tx, mut rx) = event_channel();
        let (client, mut requests, mut answers) = pair(tx);
        let id = open_watch(&client, &mut requests, &mut answers).await;
        send(&mut answers, &event(id)).await;
        assert_eq!(
            rx.recv().await.unwrap().watch_id,
            id,
            "an open watch's event"
        );

        // Nobody asked for watch 999.
        send(&mut answers, &event(999)).await;
        let why = client.wait_closed(WAIT).await.unwrap();
        assert_eq!(
            why,
            CallError::Closed(
                "provider broke the protocol: an event for watch 999, which is not open".into()
            )
        );
        assert!(rx.recv().await.is_none(), "no event after the fault");
    }

    #[tokio::test]
    async fn no_event_may_come_before_watching_or_after_cancel_ack() {
        // Before the `watching` answer.
        let (tx, _rx) = event_channel();
        let (client, mut requests, mut answers) = pair(tx);
        let _call = start_watch(&client).await;
        let watch = next_request(&mut requests).await;
        send(&mut answers, &event(watch.id)).await;
        assert!(
            matches!(client.wait_closed(WAIT).await, Some(CallError::Closed(m)) if m.contains("not open"))
        );

        // After the CancelAck.
        let (tx, mut rx) = event_channel();
        let (client, mut requests, mut answers) = pair(tx);
        let id = open_watch(&client, &mut requests, &mut answers).await;
        let cancel = client.start_call(Op::Cancel { id }, WAIT).await.unwrap();
        let request = next_request(&mut requests).await;
        send(&mut answers, &event(id)).await; // still open: allowed
        send(
            &mut answers,
            &answer(request.id, Reply::CancelAck { found: true }),
        )
        .await;
        assert_eq!(
            client.finish(cancel).await.unwrap(),
            Outcome::Ok(Reply::CancelAck { found: true })
        );
        assert_eq!(rx.recv().await.unwrap().watch_id, id);
        send(&mut answers, &event(id)).await;
        assert!(
            matches!(client.wait_closed(WAIT).await, Some(CallError::Closed(m)) if m.contains("not open"))
        );
    }

    #[tokio::test]
    async fn a_cancel_whose_caller_stopped_waiting_still_ends_the_watch() {
        let (tx, _rx) = event_channel();
        let (client, mut requests, mut answers) = pair(tx);
        let id = open_watch(&client, &mut requests, &mut answers).await;
        let gave_up = client
            .call_with_timeout_ms(Op::Cancel { id }, 1000, Duration::from_millis(1))
            .await;
        assert!(matches!(gave_up, Err(CallError::Timeout(_))), "{gave_up:?}");
        let request = next_request(&mut requests).await;
        send(
            &mut answers,
            &answer(request.id, Reply::CancelAck { found: true }),
        )
        .await;
        send(&mut answers, &event(id)).await;
        assert!(
            matches!(client.wait_closed(WAIT).await, Some(CallError::Closed(m)) if m.contains("not open"))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_queue_nobody_empties_closes_the_connection_after_the_deadline() {
        let (tx, mut rx) = event_channel();
        let (client, mut requests, mut answers) = pair(tx);
        let id = open_watch(&client, &mut requests, &mut answers).await;
        for _ in 0..EVENT_QUEUE + 1 {
            writer_queue(&mut answers, &event(id));
        }
        answers.flush().await.unwrap();
        let started = tokio::time::Instant::now();
        let why = client.wait_closed(2 * EVENT_DEADLINE).await.unwrap();
        assert!(started.elapsed() >= EVENT_DEADLINE);
        assert!(
            matches!(&why, CallError::Closed(m) if m.contains("were not consumed")),
            "{why}"
        );
        // Nothing was dropped: the queue holds the first EVENT_QUEUE events, in order.
        let mut queued = 0;
        while let Ok(ev) = rx.try_recv() {
            assert_eq!(ev.watch_id, id);
            queued += 1;
        }
        assert_eq!(queued, EVENT_QUEUE);
    }

    #[tokio::test]
    async fn without_a_receiver_events_are_discarded_and_calls_go_on() {
        let (tx, rx) = event_channel();
        drop(rx);
        let (client, mut requests, mut answers) = pair(tx);
        let id = open_watch(&client, &mut requests, &mut answers).await;
        for _ in 0..EVENT_QUEUE * 4 {
            writer_queue(&mut answers, &event(id));
        }
        answers.flush().await.unwrap();
        let call = client.start_call(Op::Health {}, WAIT).await.unwrap();
        let request = next_request(&mut requests).await;
        send(
            &mut answers,
            &ProviderMessage::Response(Response {
                id: request.id,
                outcome: Outcome::Err(ProviderError::new(
                    keyhole_protocol::ErrorCode::Unavailable,
                    "down",
                )),
            }),
        )
        .await;
        assert!(matches!(
            client.finish(call).await.unwrap(),
            Outcome::Err(e) if e.message == "down"
        ));
        assert!(client.closed().is_none());
    }

    fn writer_queue(writer: &mut FrameWriter<BoxWrite>, message: &ProviderMessage) {
        writer.queue(message).unwrap();
    }
}
