//! `keyhole-provider-memory`: the reference provider binary.

use clap::Parser;
use keyhole_provider_memory::{MemoryOptions, MemoryProvider};
use keyhole_providers::{ServeArgs, ServeOptions};

/// keyhole's in-memory reference provider. Secrets live only in this process.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
    #[command(flatten)]
    memory: MemoryOptions,
}

fn main() {
    let cli = Cli::parse();
    keyhole_providers::init_tracing();
    let provider = MemoryProvider::new(cli.memory);
    if let Err(message) = keyhole_providers::serve(provider, &cli.serve, ServeOptions::default()) {
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}
