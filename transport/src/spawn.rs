//! Starting a provider the way the gateway does: a private listener, the provider started in its
//! own process group with `--connect SOCKET` and the token in `KEYHOLE_PROVIDER_TOKEN`, a
//! handshake deadline, stderr captured, and the whole group killed on every error path.

use std::ffi::OsString;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use interprocess::local_socket::tokio::Stream;
use interprocess::local_socket::traits::tokio::Listener as _;
use keyhole_protocol::{DEFAULT_MAX_FRAME, Encoding, HelloAck, TOKEN_ENV, Token};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

use crate::client::{HandshakeError, HelloOptions, handshake};
use crate::socket::{PrivateDir, into_halves, listen};
use crate::{BoxRead, BoxWrite, FrameReader, FrameWriter, generate_token};

/// Most stderr bytes kept from a provider; older bytes are dropped first.
const STDERR_KEEP: usize = 1 << 20;

/// How to start a provider.
#[derive(Clone, Debug)]
pub struct SpawnOptions {
    /// The program.
    pub program: OsString,
    /// Its arguments; `--connect SOCKET` is appended.
    pub args: Vec<OsString>,
    /// Extra environment variables.
    pub env: Vec<(OsString, OsString)>,
    /// Deadline for the provider to connect and answer Hello.
    pub handshake_timeout: Duration,
    /// Encoding names to offer, most preferred first.
    pub encodings: Vec<String>,
    /// Feature strings to offer.
    pub features: Vec<String>,
    /// Majors to offer (this implementation's by default).
    pub majors: Vec<u16>,
    /// Called with each chunk of the provider's stderr and stdout as it arrives (the gateway
    /// redacts and logs it). Everything is also kept in [`Spawned::output`].
    pub output_sink: Option<OutputSink>,
}

/// A function called with each chunk of a provider's output.
pub type OutputFn = dyn Fn(&[u8]) + Send + Sync;

/// A callback for a provider's output, chunk by chunk.
#[derive(Clone)]
pub struct OutputSink(pub Arc<OutputFn>);

impl std::fmt::Debug for OutputSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OutputSink")
    }
}

impl SpawnOptions {
    /// `program args...` with a 5 s handshake deadline, offering `encoding`.
    pub fn new(
        program: impl Into<OsString>,
        args: impl IntoIterator<Item = impl Into<OsString>>,
        encoding: Encoding,
    ) -> SpawnOptions {
        SpawnOptions {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            handshake_timeout: Duration::from_secs(5),
            encodings: vec![encoding.name().to_string()],
            features: Vec::new(),
            majors: keyhole_protocol::SUPPORTED_MAJORS.to_vec(),
            output_sink: None,
        }
    }
}

/// Why a provider could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpawnError {
    /// The private socket could not be set up.
    #[error("could not create the provider socket: {0}")]
    Socket(std::io::Error),
    /// The program could not be started.
    #[error("could not start {program}: {source}")]
    Exec {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// The provider exited before it connected.
    #[error("{program} exited ({status}) before connecting{}", output_suffix(.stderr))]
    ExitedEarly {
        /// The program.
        program: String,
        /// Its exit status.
        status: ExitStatus,
        /// The tail of its stderr.
        stderr: String,
    },
    /// The provider did not connect in time.
    #[error("{program} did not connect within {timeout:?}{}", output_suffix(.stderr))]
    ConnectTimeout {
        /// The program.
        program: String,
        /// The deadline.
        timeout: Duration,
        /// The tail of its stderr.
        stderr: String,
    },
    /// The handshake failed.
    #[error("{program}: {source}{}", output_suffix(.stderr))]
    Handshake {
        /// The program.
        program: String,
        /// Why.
        source: HandshakeError,
        /// The tail of its stderr.
        stderr: String,
    },
}

impl SpawnError {
    /// The error without the tail of the provider's output. The tail is cut from raw output at
    /// a byte count, so a value the provider printed may straddle the cut, and no redaction of
    /// the cut text can recognise its remainder. A caller that redacts output (the gateway)
    /// drops it and appends its own tail, cut after redacting the whole stream.
    pub fn without_output(mut self) -> SpawnError {
        match &mut self {
            SpawnError::ExitedEarly { stderr, .. }
            | SpawnError::ConnectTimeout { stderr, .. }
            | SpawnError::Handshake { stderr, .. } => stderr.clear(),
            SpawnError::Socket(_) | SpawnError::Exec { .. } => {}
        }
        self
    }
}

/// `; its output ends with:` and `tail`, or nothing if `tail` is blank: how an error quotes a
/// provider's last words.
pub fn output_suffix(tail: &str) -> String {
    if tail.trim().is_empty() {
        String::new()
    } else {
        format!("; its output ends with:\n{}", tail.trim_end())
    }
}

/// A provider's captured stderr (and stdout, which providers must not use): the last bytes of
/// it, at most 1 MiB unless made with [`Captured::keeping`].
#[derive(Clone)]
pub struct Captured {
    buf: Arc<Mutex<Vec<u8>>>,
    keep: usize,
}

impl Default for Captured {
    fn default() -> Captured {
        Captured::keeping(STDERR_KEEP)
    }
}

impl Captured {
    /// A capture that keeps the last `keep` bytes.
    pub fn keeping(keep: usize) -> Captured {
        Captured {
            buf: Arc::default(),
            keep,
        }
    }

    /// Everything captured so far (at most the last `keep` bytes).
    pub fn bytes(&self) -> Vec<u8> {
        self.buf.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The last `n` bytes as lossy UTF-8, for error messages.
    pub fn tail(&self, n: usize) -> String {
        let all = self.bytes();
        let from = all.len().saturating_sub(n);
        String::from_utf8_lossy(&all[from..]).into_owned()
    }

    /// [`output_suffix`] of the last `n` bytes.
    pub fn suffix(&self, n: usize) -> String {
        output_suffix(&self.tail(n))
    }

    /// Adds `chunk`, forgetting what falls out of the last `keep` bytes.
    pub fn push(&self, chunk: &[u8]) {
        let mut buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        buf.extend_from_slice(chunk);
        if buf.len() > self.keep {
            let drop = buf.len() - self.keep;
            buf.drain(..drop);
        }
    }
}

/// A running provider process, in its own process group. Dropping it kills the group.
pub struct Spawned {
    child: Child,
    pgid: Option<Pid>,
    program: String,
    output: Captured,
    _dir: PrivateDir,
}

/// A connection to a spawned provider that has completed the handshake.
pub struct Connection {
    /// The reader, switched to the negotiated cap.
    pub reader: FrameReader<BoxRead>,
    /// The writer, switched to the negotiated format.
    pub writer: FrameWriter<BoxWrite>,
    /// The provider's HelloAck.
    pub ack: HelloAck,
}

/// Starts the provider and completes the handshake.
///
/// On every error path after the process has started, its whole process group is killed and
/// reaped before this returns.
pub async fn spawn(options: &SpawnOptions) -> Result<(Spawned, Connection), SpawnError> {
    let (mut process, stream, token) = spawn_unconnected(options).await?;
    let hello = HelloOptions {
        majors: options.majors.clone(),
        encodings: options.encodings.clone(),
        features: options.features.clone(),
        token,
        max_frame: DEFAULT_MAX_FRAME,
    };
    let (read, write) = into_halves(stream);
    match handshake(read, write, &hello, options.handshake_timeout).await {
        Ok((reader, writer, ack)) => Ok((
            process,
            Connection {
                reader,
                writer,
                ack,
            },
        )),
        Err(source) => {
            process.kill().await;
            Err(SpawnError::Handshake {
                program: process.program.clone(),
                source,
                stderr: process.output.tail(4096),
            })
        }
    }
}

/// Starts the provider and accepts its connection, without the handshake (for tests that speak
/// the handshake themselves). Returns the process, the accepted stream and the token.
pub async fn spawn_unconnected(
    options: &SpawnOptions,
) -> Result<(Spawned, Stream, Token), SpawnError> {
    let program = options.program.to_string_lossy().into_owned();
    let dir = PrivateDir::new().map_err(SpawnError::Socket)?;
    let socket = dir.socket_path();
    let listener = listen(&socket).await.map_err(SpawnError::Socket)?;
    let token = generate_token().map_err(SpawnError::Socket)?;

    let mut cmd = Command::new(&options.program);
    cmd.args(&options.args)
        .arg("--connect")
        .arg(&socket)
        .env(TOKEN_ENV, token.expose())
        .envs(options.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| SpawnError::Exec {
        program: program.clone(),
        source,
    })?;
    let pgid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    let output = Captured::default();
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(capture(stderr, output.clone(), options.output_sink.clone()));
    }
    if let Some(stdout) = child.stdout.take() {
        tokio::spawn(capture(stdout, output.clone(), options.output_sink.clone()));
    }
    let mut process = Spawned {
        child,
        pgid,
        program: program.clone(),
        output,
        _dir: dir,
    };

    let accepted = tokio::select! {
        accepted = listener.accept() => accepted.map_err(SpawnError::Socket),
        status = process.child.wait() => {
            // Give the capture tasks a moment to drain the pipes.
            tokio::time::sleep(Duration::from_millis(50)).await;
            Err(match status {
                Ok(status) => SpawnError::ExitedEarly {
                    program: program.clone(),
                    status,
                    stderr: process.output.tail(4096),
                },
                Err(source) => SpawnError::Exec { program: program.clone(), source },
            })
        }
        _ = tokio::time::sleep(options.handshake_timeout) => Err(SpawnError::ConnectTimeout {
            program: program.clone(),
            timeout: options.handshake_timeout,
            stderr: process.output.tail(4096),
        }),
    };
    match accepted {
        Ok(stream) => Ok((process, stream, token)),
        Err(e) => {
            process.kill().await;
            Err(e)
        }
    }
}

async fn capture(
    mut pipe: impl tokio::io::AsyncRead + Unpin,
    into: Captured,
    sink: Option<OutputSink>,
) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = pipe.read(&mut buf).await {
        if n == 0 {
            break;
        }
        into.push(&buf[..n]);
        if let Some(sink) = &sink {
            (sink.0)(&buf[..n]);
        }
    }
}

impl Spawned {
    /// The program's name as given.
    pub fn program(&self) -> &str {
        &self.program
    }

    /// The provider's captured stderr and stdout.
    pub fn output(&self) -> &Captured {
        &self.output
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits up to `deadline` for the process to exit by itself. Once it has, helpers left in
    /// its group are killed at once: later, the group's number may belong to someone else.
    pub async fn wait_exit(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let status = tokio::time::timeout(deadline, self.child.wait())
            .await
            .ok()
            .and_then(Result::ok);
        if status.is_some() {
            self.kill_group();
            self.pgid = None;
        }
        status
    }

    /// Kills the whole process group with SIGKILL and reaps the child.
    pub async fn kill(&mut self) {
        self.kill_group();
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), self.child.wait()).await {
            // Reaped: the group's number is free for reuse, so it is never signalled again.
            self.pgid = None;
        }
    }

    fn kill_group(&self) {
        if let Some(pgid) = self.pgid {
            // ESRCH (already gone) is fine.
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // Never by bare pid: the group, so helpers the provider started go too, even when the
        // provider itself has already exited.
        self.kill_group();
    }
}
