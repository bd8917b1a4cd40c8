//! The provider manager: starts providers (spawn mode) or dials them (connect mode), keeps one
//! multiplexed connection to each, restarts a provider that died with exponential backoff, and
//! answers callers `Unavailable` within their deadline while it is down.
//!
//! Provider output is redacted before it reaches the gateway's log or an error message. Every
//! error path after a spawn kills the provider's whole process group (the transport does it, and
//! dropping a `Spawned` does it again).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyhole_protocol::{Encoding, HelloAck, Op, Outcome};
use keyhole_transport::client::{CallError, Client, HelloOptions, handshake};
use keyhole_transport::socket;
use keyhole_transport::spawn::{Captured, OutputSink, SpawnOptions, Spawned, spawn};

use crate::redact::Redactor;

/// Longest piece of provider output logged as one line.
const MAX_LOG_LINE: usize = 16 * 1024;

/// How to reach one provider.
#[derive(Clone, Debug)]
pub enum Launch {
    /// Start `program args... --connect SOCKET` with the token in its environment.
    Spawn {
        /// The executable.
        program: PathBuf,
        /// Its arguments.
        args: Vec<OsString>,
        /// Extra environment.
        env: Vec<(OsString, OsString)>,
    },
    /// Dial a provider already listening (a sidecar), authenticating with its token file and,
    /// on Unix, checking that the peer runs as `expected_uid`.
    Connect {
        /// The provider's socket.
        socket: PathBuf,
        /// The token file it was started with.
        token_file: PathBuf,
        /// The uid the provider must run as (default: the gateway's own).
        expected_uid: Option<u32>,
    },
}

/// One configured provider.
#[derive(Clone, Debug)]
pub struct ProviderSpec {
    /// The name handles refer to it by.
    pub name: String,
    /// How to reach it.
    pub launch: Launch,
    /// Deadline for start-up plus handshake.
    pub handshake_timeout: Duration,
    /// Encoding to ask for.
    pub encoding: Encoding,
}

impl ProviderSpec {
    /// A spawned provider with the default 5 s handshake deadline, over bincode.
    pub fn spawn(name: &str, program: impl Into<PathBuf>, args: Vec<OsString>) -> ProviderSpec {
        ProviderSpec {
            name: name.into(),
            launch: Launch::Spawn {
                program: program.into(),
                args,
                env: Vec::new(),
            },
            handshake_timeout: Duration::from_secs(5),
            encoding: Encoding::Bincode,
        }
    }
}

/// Why a call could not reach a provider. Every variant is the connection's fault, never the
/// provider's answer; clients see it as `Unavailable`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ManagerError {
    /// No provider has this name.
    #[error("no provider named {0:?} is configured (see `keyhole providers`)")]
    UnknownProvider(String),
    /// The provider is down or did not answer in time.
    #[error("provider {provider:?} is unavailable: {reason}")]
    Unavailable {
        /// The provider.
        provider: String,
        /// Why, redacted.
        reason: String,
    },
}

/// A provider's state, for `keyhole providers`.
#[derive(Clone, Debug)]
pub struct ProviderStatus {
    /// The configured name.
    pub name: String,
    /// The HelloAck of the current connection, if it is up.
    pub ack: Option<HelloAck>,
    /// Why it is down, if it is.
    pub down_reason: Option<String>,
    /// How many times it has been restarted.
    pub restarts: u64,
}

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

struct Running {
    client: Arc<Client>,
    process: Option<Spawned>,
}

enum State {
    Up(Box<Running>),
    Down {
        reason: String,
        retry_at: Instant,
        backoff: Duration,
    },
}

struct Supervised {
    spec: ProviderSpec,
    state: tokio::sync::Mutex<State>,
    restarts: Mutex<u64>,
    redactor: Redactor,
}

/// Every configured provider.
#[derive(Clone)]
pub struct Manager {
    providers: Arc<BTreeMap<String, Arc<Supervised>>>,
}

impl Manager {
    /// A manager for `specs`. Nothing starts until [`Manager::start_all`] or the first call.
    pub fn new(specs: Vec<ProviderSpec>, redactor: Redactor) -> Manager {
        let providers = specs
            .into_iter()
            .map(|spec| {
                let name = spec.name.clone();
                let supervised = Supervised {
                    spec,
                    state: tokio::sync::Mutex::new(State::Down {
                        reason: "not started yet".into(),
                        retry_at: Instant::now(),
                        backoff: BACKOFF_START,
                    }),
                    restarts: Mutex::new(0),
                    redactor: redactor.clone(),
                };
                (name, Arc::new(supervised))
            })
            .collect();
        Manager {
            providers: Arc::new(providers),
        }
    }

    /// Starts every provider; one that fails to start is reported and retried later, and the
    /// others serve regardless.
    pub async fn start_all(&self) -> Vec<(String, Result<(), ManagerError>)> {
        let mut out = Vec::new();
        for (name, p) in self.providers.iter() {
            let mut state = p.state.lock().await;
            let result = p
                .ensure_up(&mut state, p.spec.handshake_timeout)
                .await
                .map(|_| ());
            out.push((name.clone(), result));
        }
        out
    }

    /// The configured provider names.
    pub fn names(&self) -> Vec<String> {
        self.providers.keys().cloned().collect()
    }

    /// Sends `op` to `provider` and waits at most `deadline` in all, restarts included.
    pub async fn call(
        &self,
        provider: &str,
        op: Op,
        deadline: Duration,
    ) -> Result<Outcome, ManagerError> {
        let p = self
            .providers
            .get(provider)
            .ok_or_else(|| ManagerError::UnknownProvider(provider.into()))?;
        let started = Instant::now();
        let client = {
            let mut state = match tokio::time::timeout(deadline, p.state.lock()).await {
                Ok(state) => state,
                Err(_) => return Err(p.unavailable("timed out waiting for the provider to start")),
            };
            let left = deadline.saturating_sub(started.elapsed());
            p.ensure_up(&mut state, left).await?
        };
        let left = deadline.saturating_sub(started.elapsed());
        match client.call(op, left).await {
            Ok(outcome) => Ok(outcome),
            Err(CallError::Timeout(_)) => {
                Err(p.unavailable(&format!("no answer within the {deadline:?} deadline")))
            }
            // The request did not fit a frame: the connection is fine. (`unavailable` redacts.)
            Err(e @ CallError::Encode(_)) => Err(p.unavailable(&e.to_string())),
            Err(e) => {
                // The connection broke: mark the provider down so the next call restarts it.
                let reason = p.redactor.redact_str(&e.to_string()).into_owned();
                p.mark_down(&client, &reason).await;
                Err(p.unavailable(&reason))
            }
        }
    }

    /// The state of every provider.
    pub async fn status(&self) -> Vec<ProviderStatus> {
        let mut out = Vec::new();
        for (name, p) in self.providers.iter() {
            let state = p.state.lock().await;
            let restarts = *p.restarts.lock().unwrap_or_else(|e| e.into_inner());
            out.push(match &*state {
                State::Up(r) if r.client.closed().is_none() => ProviderStatus {
                    name: name.clone(),
                    ack: Some(r.client.ack().clone()),
                    down_reason: None,
                    restarts,
                },
                State::Up(r) => ProviderStatus {
                    name: name.clone(),
                    ack: None,
                    down_reason: r
                        .client
                        .closed()
                        .map(|e| p.redactor.redact_str(&e.to_string()).into_owned()),
                    restarts,
                },
                State::Down { reason, .. } => ProviderStatus {
                    name: name.clone(),
                    ack: None,
                    down_reason: Some(reason.clone()),
                    restarts,
                },
            });
        }
        out
    }

    /// Says Goodbye to every provider, waits up to `grace` for them to exit, then kills what is
    /// left, group by group.
    pub async fn shutdown(&self, grace: Duration) {
        for p in self.providers.values() {
            let mut state = p.state.lock().await;
            if let State::Up(running) = &mut *state {
                let _ = running.client.call(Op::Goodbye {}, grace).await;
                if let Some(process) = running.process.as_mut() {
                    if process.wait_exit(grace).await.is_none() {
                        tracing::warn!(provider = %p.spec.name, "provider did not exit after Goodbye; killing its process group");
                    }
                    process.kill().await;
                }
            }
            *state = State::Down {
                reason: "the gateway shut down".into(),
                retry_at: Instant::now() + BACKOFF_MAX,
                backoff: BACKOFF_MAX,
            };
        }
    }
}

impl Supervised {
    fn unavailable(&self, reason: &str) -> ManagerError {
        ManagerError::Unavailable {
            provider: self.spec.name.clone(),
            reason: self.redactor.redact_str(reason).into_owned(),
        }
    }

    /// Marks the provider down after `failed` broke, unless another call has already restarted
    /// it: then the live connection is not the one that failed, and it is left alone.
    async fn mark_down(&self, failed: &Arc<Client>, reason: &str) {
        let mut state = self.state.lock().await;
        if let State::Up(running) = &mut *state
            && Arc::ptr_eq(&running.client, failed)
        {
            if let Some(process) = running.process.as_mut() {
                process.kill().await;
            }
            tracing::warn!(provider = %self.spec.name, "provider connection lost: {reason}");
            *state = State::Down {
                reason: reason.into(),
                retry_at: Instant::now(),
                backoff: BACKOFF_START,
            };
        }
    }

    /// Returns a live client, (re)starting the provider if it is down and its backoff has passed.
    async fn ensure_up(
        &self,
        state: &mut State,
        budget: Duration,
    ) -> Result<Arc<Client>, ManagerError> {
        if let State::Up(running) = state {
            match running.client.closed() {
                None => return Ok(Arc::clone(&running.client)),
                Some(why) => {
                    let reason = self.redactor.redact_str(&why.to_string()).into_owned();
                    tracing::warn!(provider = %self.spec.name, "provider connection lost: {reason}");
                    if let Some(process) = running.process.as_mut() {
                        process.kill().await;
                    }
                    *state = State::Down {
                        reason,
                        retry_at: Instant::now(),
                        backoff: BACKOFF_START,
                    };
                }
            }
        }
        let State::Down {
            reason,
            retry_at,
            backoff,
        } = state
        else {
            return Err(self.unavailable("unreachable state"));
        };
        if Instant::now() < *retry_at {
            return Err(self.unavailable(&format!(
                "{reason}; next restart in {:?}",
                retry_at.saturating_duration_since(Instant::now())
            )));
        }
        let budget = budget.min(self.spec.handshake_timeout);
        match self.start(budget).await {
            Ok(running) => {
                let client = Arc::clone(&running.client);
                if !matches!(reason.as_str(), "not started yet") {
                    *self.restarts.lock().unwrap_or_else(|e| e.into_inner()) += 1;
                }
                tracing::info!(provider = %self.spec.name, ack = ?client.ack().provider, "provider is up");
                *state = State::Up(Box::new(running));
                Ok(client)
            }
            Err(why) => {
                let why = self.redactor.redact_string(why);
                let next = (*backoff * 2).min(BACKOFF_MAX);
                tracing::warn!(provider = %self.spec.name, "provider failed to start: {why}; retrying in {backoff:?}");
                *state = State::Down {
                    reason: why.clone(),
                    retry_at: Instant::now() + *backoff,
                    backoff: next,
                };
                Err(self.unavailable(&why))
            }
        }
    }

    async fn start(&self, budget: Duration) -> Result<Running, String> {
        // The gateway opens no watch, so an event from a provider breaks the protocol and closes
        // its connection (see `keyhole_transport::client`): none reaches this queue, whose
        // receiver is dropped at once.
        let (tx, _) = keyhole_transport::client::event_channel();
        match &self.spec.launch {
            Launch::Spawn { program, args, env } => {
                let mut options = SpawnOptions::new(program, args.clone(), self.spec.encoding);
                options.env = env.clone();
                options.handshake_timeout = budget;
                let recent = Captured::keeping(RECENT_OUTPUT);
                options.output_sink = Some(self.log_sink(recent.clone()));
                let (process, conn) = spawn(&options).await.map_err(|e| {
                    format!("{}{}", e.without_output(), recent.suffix(RECENT_OUTPUT))
                })?;
                Ok(Running {
                    client: Arc::new(Client::start(conn.reader, conn.writer, conn.ack, tx)),
                    process: Some(process),
                })
            }
            Launch::Connect {
                socket: path,
                token_file,
                expected_uid,
            } => {
                let token =
                    keyhole_transport::read_token_file(token_file).map_err(|e| e.to_string())?;
                let stream = tokio::time::timeout(budget, socket::connect(path))
                    .await
                    .map_err(|_| format!("connecting to {} timed out", path.display()))?
                    .map_err(|e| format!("cannot connect to {}: {e}", path.display()))?;
                #[cfg(unix)]
                {
                    let want = expected_uid.unwrap_or_else(|| nix::unistd::geteuid().as_raw());
                    let got = socket::peer_uid(&stream)
                        .map_err(|e| format!("cannot check the provider's uid: {e}"))?;
                    if got != want {
                        return Err(format!(
                            "the process behind {} runs as uid {got}, not {want}; refusing it",
                            path.display()
                        ));
                    }
                }
                let (read, write) = socket::into_halves(stream);
                let hello = HelloOptions::new(token, self.spec.encoding);
                let (reader, writer, ack) = handshake(read, write, &hello, budget)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(Running {
                    client: Arc::new(Client::start(reader, writer, ack, tx)),
                    process: None,
                })
            }
        }
    }

    /// Provider output goes to the gateway's log, line by line (at most [`MAX_LOG_LINE`] bytes
    /// each), redacted, and its redacted tail to `recent`, for the message if the start fails.
    fn log_sink(&self, recent: Captured) -> OutputSink {
        let name = self.spec.name.clone();
        let stream = Mutex::new(self.redactor.stream());
        let pending = Mutex::new(Vec::<u8>::new());
        OutputSink(Arc::new(move |chunk: &[u8]| {
            let clean = stream.lock().unwrap_or_else(|e| e.into_inner()).push(chunk);
            recent.push(&clean);
            let mut pending = pending.lock().unwrap_or_else(|e| e.into_inner());
            pending.extend_from_slice(&clean);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let text = String::from_utf8_lossy(&line);
                tracing::info!(provider = %name, "{}", text.trim_end());
            }
            // Output that never ends a line is logged in pieces rather than held without limit
            // (it has been redacted already, so cutting it cannot expose a value).
            if pending.len() >= MAX_LOG_LINE {
                let text = String::from_utf8_lossy(&pending);
                tracing::info!(provider = %name, "{text} [line continues]");
                pending.clear();
            }
        }))
    }
}

/// How much of a provider's recent output an error message quotes. It is cut from the redacted
/// stream, which saw the output from its first byte, so the cut can split a `[REDACTED]` marker
/// but never expose part of a value. (The transport's own tail is cut from raw output first,
/// where a value straddling the cut would leave its remainder unrecognised.) Output the redactor
/// still holds back, because it may begin a value, is not in it.
const RECENT_OUTPUT: usize = 4096;
