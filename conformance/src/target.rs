//! Reaching the provider under test: spawned as the gateway spawns it, or an already running one.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use keyhole_protocol::{Token, WatchEvent};
use keyhole_transport::client::{Client, HandshakeError, HelloOptions, handshake};
use keyhole_transport::socket;
use keyhole_transport::spawn::{SpawnOptions, Spawned, spawn_unconnected};
use keyhole_transport::{BoxRead, BoxWrite, FrameReader, FrameWriter};
use tokio::sync::mpsc;

/// The provider under test.
#[derive(Clone, Debug)]
pub enum Target {
    /// Start `program args... --connect SOCKET` with the token in `KEYHOLE_PROVIDER_TOKEN`, a
    /// fresh process for every connection the suite needs.
    Spawn {
        /// The program.
        program: OsString,
        /// Its arguments.
        args: Vec<OsString>,
    },
    /// Connect to a provider listening at `path` (started with `--listen PATH --token-file F`).
    Socket {
        /// The socket.
        path: PathBuf,
        /// The token from the token file.
        token: Token,
    },
}

impl Target {
    /// Whether the suite starts the provider itself (and so sees its stderr and exit status).
    pub fn spawns(&self) -> bool {
        matches!(self, Target::Spawn { .. })
    }
}

/// A raw, pre-handshake connection, with the process if the suite started it.
pub(crate) struct Raw {
    pub read: BoxRead,
    pub write: BoxWrite,
    pub token: Token,
    pub process: Option<Spawned>,
}

/// An open, handshaken connection.
pub(crate) struct Conn {
    pub client: Client,
    pub events: tokio::sync::Mutex<mpsc::Receiver<WatchEvent>>,
    pub process: tokio::sync::Mutex<Option<Spawned>>,
}

pub(crate) async fn open_raw(target: &Target, deadline: Duration) -> Result<Raw, String> {
    match target {
        Target::Spawn { program, args } => {
            let mut options = SpawnOptions::new(program, args, keyhole_protocol::Encoding::Json);
            options.handshake_timeout = deadline;
            let (process, stream, token) = spawn_unconnected(&options)
                .await
                .map_err(|e| e.to_string())?;
            let (read, write) = socket::into_halves(stream);
            Ok(Raw {
                read,
                write,
                token,
                process: Some(process),
            })
        }
        Target::Socket { path, token } => {
            let stream = tokio::time::timeout(deadline, socket::connect(path))
                .await
                .map_err(|_| format!("connecting to {} timed out", path.display()))?
                .map_err(|e| format!("could not connect to {}: {e}", path.display()))?;
            let (read, write) = socket::into_halves(stream);
            Ok(Raw {
                read,
                write,
                token: token.clone(),
                process: None,
            })
        }
    }
}

/// The outcome of a handshake attempt, keeping the process for exit-status checks.
pub(crate) struct Attempt {
    pub result: Result<
        (
            FrameReader<BoxRead>,
            FrameWriter<BoxWrite>,
            keyhole_protocol::HelloAck,
        ),
        HandshakeError,
    >,
    pub process: Option<Spawned>,
}

/// Opens a connection and sends the Hello `make` builds from the real token.
pub(crate) async fn attempt(
    target: &Target,
    deadline: Duration,
    make: impl FnOnce(Token) -> HelloOptions,
) -> Result<Attempt, String> {
    let raw = open_raw(target, deadline).await?;
    let hello = make(raw.token);
    let result = handshake(raw.read, raw.write, &hello, deadline).await;
    Ok(Attempt {
        result,
        process: raw.process,
    })
}

/// Why the standard handshake failed: the provider's reject code, if it sent one, and the
/// whole story for the report.
pub(crate) struct OpenError {
    pub reject: Option<keyhole_protocol::RejectCode>,
    pub message: String,
}

/// Opens a connection and completes a standard handshake in `encoding`.
pub(crate) async fn open(
    target: &Target,
    deadline: Duration,
    encoding: keyhole_protocol::Encoding,
    grace: Duration,
) -> Result<Conn, OpenError> {
    let attempt = attempt(target, deadline, |token| HelloOptions::new(token, encoding))
        .await
        .map_err(|message| OpenError {
            reject: None,
            message,
        })?;
    match attempt.result {
        Ok((reader, writer, ack)) => {
            let (tx, rx) = keyhole_transport::client::event_channel();
            let mut client = Client::start(reader, writer, ack, tx);
            client.set_grace(grace);
            Ok(Conn {
                client,
                events: tokio::sync::Mutex::new(rx),
                process: tokio::sync::Mutex::new(attempt.process),
            })
        }
        Err(e) => {
            let reject = match &e {
                HandshakeError::Rejected(r) => Some(r.code),
                _ => None,
            };
            let stderr = match attempt.process {
                Some(mut p) => {
                    p.kill().await;
                    p.output().suffix(2048)
                }
                None => String::new(),
            };
            Err(OpenError {
                reject,
                message: format!("{e}{stderr}"),
            })
        }
    }
}
