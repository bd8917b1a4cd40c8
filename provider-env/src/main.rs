//! `keyhole-provider-env`: the read-only sidecar provider binary.

use clap::Parser;
use keyhole_provider_env::{EnvOptions, EnvProvider};
use keyhole_providers::{ServeArgs, ServeOptions};

/// keyhole's read-only provider for the Kubernetes sidecar: secrets from environment variables
/// (read once at start) and from mounted Secret directories (read live).
///
///   keyhole-provider-env --dir /etc/secrets --listen /run/keyhole/env.sock --token-file F
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
    #[command(flatten)]
    env: EnvOptions,
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1)
}

fn main() {
    let cli = Cli::parse();
    keyhole_providers::init_tracing();
    if let Err(message) = cli.serve.mode() {
        fail(&message);
    }
    let provider = EnvProvider::from_process_env(cli.env).unwrap_or_else(|m| fail(&m));
    if let Err(message) = keyhole_providers::serve(provider, &cli.serve, ServeOptions::default()) {
        fail(&message);
    }
}
