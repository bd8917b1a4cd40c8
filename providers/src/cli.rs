//! The command line every provider shares, and the process-level behaviour around the serve loop:
//! spawn mode (`--connect`), connect mode (`--listen`), exit when the gateway goes away.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use keyhole_protocol::{TOKEN_ENV, Token};
use keyhole_transport::socket;

use crate::provider::Provider;
use crate::serve::{ConnectionEnd, ServeOptions, serve_connection};

/// How the provider reaches the gateway. Flatten this into a provider's own clap command.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// Spawn mode: dial the gateway's socket at this path. The token comes from the environment
    /// variable KEYHOLE_PROVIDER_TOKEN.
    #[arg(long, value_name = "SOCKET", conflicts_with_all = ["listen", "token_file"])]
    pub connect: Option<PathBuf>,
    /// Connect mode: listen on a socket at this path (created 0600 in a 0700 directory), for
    /// sidecars and daemons.
    #[arg(long, value_name = "SOCKET", requires = "token_file")]
    pub listen: Option<PathBuf>,
    /// Connect mode: the file holding the token gateways must present. It must not be readable
    /// by group or others.
    #[arg(long, value_name = "FILE", requires = "listen")]
    pub token_file: Option<PathBuf>,
}

/// The resolved serve mode.
#[derive(Clone, Debug)]
pub enum ServeMode {
    /// Dial the gateway once and serve that connection.
    Connect {
        /// The gateway's socket.
        socket: PathBuf,
    },
    /// Listen and serve every connection.
    Listen {
        /// The socket to create.
        socket: PathBuf,
        /// The token file.
        token_file: PathBuf,
    },
}

impl ServeArgs {
    /// The mode these arguments select, or a message saying what is missing.
    pub fn mode(&self) -> Result<ServeMode, String> {
        match (&self.connect, &self.listen, &self.token_file) {
            (Some(socket), None, None) => Ok(ServeMode::Connect {
                socket: socket.clone(),
            }),
            (None, Some(socket), Some(token_file)) => Ok(ServeMode::Listen {
                socket: socket.clone(),
                token_file: token_file.clone(),
            }),
            _ => Err(
                "give either --connect SOCKET (started by the keyhole gateway) \
                      or --listen SOCKET --token-file FILE (a sidecar or daemon)"
                    .into(),
            ),
        }
    }
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
}

/// Logs go to stderr (never stdout), filtered by `KEYHOLE_LOG` (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEYHOLE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

/// A whole provider binary: parses the common command line, sets up logging, serves, and exits
/// with status 0 when the gateway goes away, or 1 with a one-line reason if start-up fails.
pub fn main<P: Provider>(provider: P) -> ! {
    let cli = Cli::parse();
    init_tracing();
    let code = match serve(provider, &cli.serve, ServeOptions::default()) {
        Ok(()) => 0,
        Err(message) => {
            eprintln!("error: {message}");
            1
        }
    };
    std::process::exit(code)
}

/// Runs the provider in the mode `args` selects, on a single-threaded runtime, until the gateway
/// goes away (spawn mode) or a termination signal arrives (connect mode).
pub fn serve<P: Provider>(
    provider: P,
    args: &ServeArgs,
    options: ServeOptions,
) -> Result<(), String> {
    let mode = args.mode()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("could not start the runtime: {e}"))?;
    let provider = Arc::new(provider);
    let result = runtime.block_on(async move {
        match mode {
            ServeMode::Connect { socket } => run_connect(provider, &socket, &options).await,
            ServeMode::Listen { socket, token_file } => {
                run_listen(provider, &socket, &token_file, options).await
            }
        }
    });
    // Dropping a runtime waits for every blocking task, however long: a backend call stuck on
    // a dead daemon or disk would keep the provider alive after its gateway left. Give in-flight
    // work (an unanswered write finishing its atomic rename) a bounded moment, then exit.
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    result
}

/// How long blocking work may run on after the serve loop ends.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

async fn run_connect<P: Provider>(
    provider: Arc<P>,
    socket_path: &Path,
    options: &ServeOptions,
) -> Result<(), String> {
    let token = std::env::var(TOKEN_ENV).map(Token::new).map_err(|_| {
        format!(
            "{TOKEN_ENV} is not set: this provider is started by the keyhole gateway, \
             or run it with --listen SOCKET --token-file FILE"
        )
    })?;
    let stream = socket::connect(socket_path)
        .await
        .map_err(|e| format!("could not connect to {}: {e}", socket_path.display()))?;
    let (read, write) = socket::into_halves(stream);
    tokio::select! {
        end = serve_connection(provider, read, write, &token, options) => {
            match end {
                Ok(end) => tracing::info!("connection ended: {end:?}"),
                Err(e) => tracing::info!("connection ended: {e}"),
            }
        }
        () = parent_gone() => tracing::warn!("the gateway process went away; exiting"),
    }
    Ok(())
}

/// Resolves when this process's parent changes (the gateway died and we were re-parented).
async fn parent_gone() {
    #[cfg(unix)]
    {
        let parent = std::os::unix::process::parent_id();
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if std::os::unix::process::parent_id() != parent {
                return;
            }
        }
    }
    #[cfg(not(unix))]
    std::future::pending::<()>().await
}

async fn run_listen<P: Provider>(
    provider: Arc<P>,
    socket_path: &Path,
    token_file: &Path,
    options: ServeOptions,
) -> Result<(), String> {
    use interprocess_listener::accept;
    let token = keyhole_transport::read_token_file(token_file).map_err(|e| e.to_string())?;
    let listener = socket::listen(socket_path)
        .await
        .map_err(|e| format!("could not listen on {}: {e}", socket_path.display()))?;
    tracing::info!(socket = %socket_path.display(), "listening");
    let options = Arc::new(options);
    let token = Arc::new(token);
    let result = loop {
        tokio::select! {
            accepted = accept(&listener) => match accepted {
                Ok(stream) => {
                    let (provider, options, token) =
                        (Arc::clone(&provider), Arc::clone(&options), Arc::clone(&token));
                    tokio::spawn(async move {
                        let (read, write) = socket::into_halves(stream);
                        match serve_connection(provider, read, write, &token, &options).await {
                            Ok(ConnectionEnd::Goodbye | ConnectionEnd::Closed) => {}
                            Ok(end) => tracing::info!("connection ended: {end:?}"),
                            Err(e) => tracing::info!("connection ended: {e}"),
                        }
                    });
                }
                Err(e) => tracing::warn!("accept failed: {e}"),
            },
            () = termination() => break Ok(()),
        }
    };
    let _ = std::fs::remove_file(socket_path);
    result
}

mod interprocess_listener {
    use interprocess::local_socket::tokio::{Listener, Stream};
    use interprocess::local_socket::traits::tokio::Listener as _;

    pub async fn accept(listener: &Listener) -> std::io::Result<Stream> {
        listener.accept().await
    }
}

async fn termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => std::future::pending::<()>().await,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
