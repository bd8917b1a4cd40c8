//! `keyhole-conformance`: run the suite against a provider binary or a running provider.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use keyhole_conformance::{Encoding, Options, Target};
use keyhole_protocol::SecretBytes;

/// Checks that a keyhole secret provider follows the protocol and its shared semantics.
///
/// Spawn mode starts the provider exactly as the gateway does:
///   keyhole-conformance -- PROVIDER_CMD [ARGS...]
/// Connect mode checks a provider already listening:
///   keyhole-conformance --socket PATH --token-file FILE
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    /// Which encodings to test.
    #[arg(long, value_enum, default_value_t = Which::All)]
    encoding: Which,
    /// Write a JUnit XML report to this file.
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
    /// Connect to a provider listening on this socket instead of spawning one.
    #[arg(
        long,
        value_name = "PATH",
        requires = "token_file",
        conflicts_with = "command"
    )]
    socket: Option<PathBuf>,
    /// The token file of the provider given with --socket.
    #[arg(long, value_name = "FILE", requires = "socket")]
    token_file: Option<PathBuf>,
    /// Deadline of each request in milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// Secrets the provider already holds, for a read-only provider: a JSON object mapping
    /// each name to its UTF-8 value. The `fixture.*` cases check them.
    #[arg(long, value_name = "FILE")]
    fixtures: Option<PathBuf>,
    /// List the case names and exit.
    #[arg(long)]
    list: bool,
    /// The provider command and its arguments (after `--`).
    #[arg(last = true, value_name = "PROVIDER_CMD")]
    command: Vec<OsString>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Which {
    Bincode,
    Json,
    All,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.list {
        for name in keyhole_conformance::case_names() {
            println!("{name}");
        }
        return ExitCode::SUCCESS;
    }
    let target = match (&cli.socket, &cli.token_file, cli.command.split_first()) {
        (Some(path), Some(token_file), None) => {
            match keyhole_transport::read_token_file(token_file) {
                Ok(token) => Target::Socket {
                    path: path.clone(),
                    token,
                },
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        (None, None, Some((program, args))) => Target::Spawn {
            program: program.clone(),
            args: args.to_vec(),
        },
        _ => {
            eprintln!(
                "error: give a provider command after `--`, or --socket PATH --token-file FILE\n\
                 example: keyhole-conformance --encoding all -- keyhole-provider-memory"
            );
            return ExitCode::from(2);
        }
    };
    let options = Options {
        encodings: match cli.encoding {
            Which::Bincode => vec![Encoding::Bincode],
            Which::Json => vec![Encoding::Json],
            Which::All => Encoding::ALL.to_vec(),
        },
        request_timeout: Duration::from_millis(cli.timeout_ms),
        fixtures: match cli.fixtures.as_deref().map(read_fixtures).transpose() {
            Ok(fixtures) => fixtures.unwrap_or_default(),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
        ..Options::default()
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: could not start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let report = runtime.block_on(keyhole_conformance::run(&target, &options, |r| {
        println!("{r}")
    }));
    println!(
        "\n{} cases in {:.2} s",
        report.results.len(),
        report.elapsed.as_secs_f64()
    );
    println!("conformance: {}", report.summary());
    if let Some(path) = &cli.junit
        && let Err(e) = std::fs::write(path, report.junit())
    {
        eprintln!("error: could not write {}: {e}", path.display());
        return ExitCode::from(2);
    }
    if report.failed() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Reads `--fixtures`: a JSON object of name → UTF-8 value. Errors name the file, never a value.
fn read_fixtures(path: &std::path::Path) -> Result<Vec<(String, SecretBytes)>, String> {
    let text = std::fs::read(path)
        .map(zeroize::Zeroizing::new)
        .map_err(|e| format!("could not read fixtures {}: {e}", path.display()))?;
    let map: std::collections::BTreeMap<String, String> =
        serde_json::from_slice(&text).map_err(|e| {
            format!(
                "fixtures {} must be a JSON object of name to string value (line {}, column {})",
                path.display(),
                e.line(),
                e.column()
            )
        })?;
    Ok(map
        .into_iter()
        .map(|(name, value)| (name, SecretBytes::new(value.into_bytes())))
        .collect())
}
