//! `keyhole-provider-keychain`: serve the platform keychain to the gateway, or probe it.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use keyhole_provider_keychain::lock::{self, WriteLock};
use keyhole_provider_keychain::{Keychain, KeychainOptions, KeychainProvider};
use keyhole_providers::protocol::HealthStatus;
use keyhole_providers::{ServeArgs, ServeOptions};

/// keyhole's keychain provider: secrets in the Secret Service, the kernel keyring, the macOS
/// keychain or the Windows Credential Manager.
///
/// Without a subcommand it serves, as the gateway starts it:
///   keyhole-provider-keychain [--store secret-service] --connect SOCKET
#[derive(Parser)]
#[command(version, verbatim_doc_comment, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    keychain: KeychainOptions,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Ask the keychain, once, whether it can be used; print "STATUS: detail" on stdout.
    ///
    /// Exit status: 0 Ok or Degraded, 3 Locked, 4 Unauthorized, 5 Unavailable, 1 on a bad
    /// configuration, 2 on a usage error. Answers within 900 ms (less with a smaller
    /// --backend-timeout-ms), never prompts and writes nothing, except on keyutils, whose probe
    /// adds and deletes one key.
    Probe {
        #[command(flatten)]
        keychain: KeychainOptions,
    },
}

/// The probe's deadline: a quick answer for the gateway, whatever the serve deadline.
const PROBE_DEADLINE: Duration = Duration::from_millis(900);

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let result = match cli.command {
        None => serve(&cli.keychain, &cli.serve).map(|()| ExitCode::SUCCESS),
        Some(Command::Probe { keychain }) => probe(&keychain),
    };
    result.unwrap_or_else(|message| {
        eprintln!("error: {message}");
        ExitCode::from(1)
    })
}

/// The SDK's logging (stderr, `KEYHOLE_LOG`, default `info`), with D-Bus traffic capped at
/// `warn` whatever the filter, so messages carrying secrets are never traced.
fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let mut filter =
        EnvFilter::try_from_env("KEYHOLE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    for directive in ["zbus=warn", "zvariant=warn", "secret_service=warn"] {
        if let Ok(d) = directive.parse() {
            filter = filter.add_directive(d);
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

fn serve(options: &KeychainOptions, serve: &ServeArgs) -> Result<(), String> {
    let kind = options.store_kind()?;
    Keychain::prepare_process(kind);
    // Fail before dialling the gateway if the mode is incomplete.
    serve.mode()?;
    let dir = options.lock_dir.clone().unwrap_or_else(lock::default_dir);
    let write_lock = WriteLock::new(&dir, kind, &options.service).map_err(|e| {
        format!(
            "cannot use the lock directory {}: {e} (choose another with --lock-dir)",
            dir.display()
        )
    })?;
    let keychain = Keychain::new(kind, &options.service, Some(write_lock));
    let provider = KeychainProvider::new(keychain, options.keep, options.backend_timeout());
    tracing::info!(
        store = kind.name(),
        service = %options.service,
        keep = options.keep,
        "serving {}",
        kind.describe()
    );
    keyhole_providers::serve(
        provider,
        serve,
        ServeOptions {
            max_in_flight: MAX_IN_FLIGHT,
            ..ServeOptions::default()
        },
    )
}

/// Requests in flight per connection before further frames wait unread (the SDK's
/// backpressure). Writes run one at a time and each costs at least one keychain write (tens of
/// milliseconds on gnome-keyring, which rewrites its file on every change), so requests queued
/// inside the provider only burn their deadlines, which start when a frame is read. With the cap,
/// a burst of writes is read as it drains, and a Cancel or Goodbye behind it waits for one call
/// to finish, not for the burst.
const MAX_IN_FLIGHT: usize = 16;

fn probe(options: &KeychainOptions) -> Result<ExitCode, String> {
    let kind = options.store_kind()?;
    Keychain::prepare_process(kind);
    let deadline = options.backend_timeout().min(PROBE_DEADLINE);
    let keychain = std::sync::Arc::new(Keychain::new(kind, &options.service, None));
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = std::sync::Arc::clone(&keychain);
    // A thread of its own: a hung keychain call is abandoned, not waited for.
    std::thread::spawn(move || {
        let _ = tx.send(worker.health());
    });
    let report =
        rx.recv_timeout(deadline)
            .unwrap_or_else(|_| keyhole_providers::protocol::HealthReport {
                status: HealthStatus::Unavailable,
                detail: format!(
                    "{} did not answer within {} ms: its daemon may hang or wait on a prompt",
                    kind.describe(),
                    deadline.as_millis()
                ),
            });
    let (code, status) = match report.status {
        HealthStatus::Ok => (0, "Ok"),
        HealthStatus::Degraded => (0, "Degraded"),
        HealthStatus::Locked => (3, "Locked"),
        HealthStatus::Unauthorized => (4, "Unauthorized"),
        HealthStatus::Unavailable => (5, "Unavailable"),
    };
    if report.detail.is_empty() {
        println!("{status}: {} answers", kind.describe());
    } else {
        println!("{status}: {}", report.detail);
    }
    Ok(ExitCode::from(code))
}
