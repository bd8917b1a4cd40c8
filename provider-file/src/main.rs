//! `keyhole-provider-file`: serve a file store to the gateway, or manage one.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use keyhole_provider_file::{
    Argon2Params, FileProvider, KekSource, Store, StoreError, StoreOptions, store,
};
use keyhole_providers::{ServeArgs, ServeOptions};

/// keyhole's envelope-encrypted file store.
///
/// Without a subcommand it serves the store as a provider:
///   keyhole-provider-file --store DIR --key-file F --connect SOCKET
#[derive(Parser)]
#[command(version, verbatim_doc_comment, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: Serve,
}

#[derive(Args)]
struct Serve {
    /// The store directory.
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
    #[command(flatten)]
    key: Key,
    /// Versions kept per secret, the current one included (0 = unlimited).
    #[arg(long, default_value_t = 10)]
    versions_kept: u32,
    /// Largest value accepted, in bytes.
    #[arg(long, default_value_t = keyhole_provider_file::provider::DEFAULT_MAX_VALUE_SIZE)]
    max_value_size: u32,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Args, Clone)]
struct Key {
    /// A file of exactly 32 random bytes, mode 0600.
    #[arg(long, value_name = "FILE", conflicts_with = "passphrase_file")]
    key_file: Option<PathBuf>,
    /// A file holding the passphrase (mode 0600); the KEK comes from it through Argon2id.
    #[arg(long, value_name = "FILE")]
    passphrase_file: Option<PathBuf>,
    /// Accept key and passphrase files that group or others can read. Dangerous.
    #[arg(long)]
    danger_allow_insecure_key_file: bool,
}

impl Key {
    fn source(&self) -> Result<KekSource, StoreError> {
        match (&self.key_file, &self.passphrase_file) {
            (Some(k), None) => Ok(KekSource::KeyFile(k.clone())),
            (None, Some(p)) => Ok(KekSource::PassphraseFile(p.clone())),
            _ => Err(StoreError::Usage(
                "give --key-file FILE or --passphrase-file FILE".into(),
            )),
        }
    }
}

#[derive(Args, Clone, Copy)]
struct Argon2Args {
    /// Argon2id memory in KiB (floor 19456).
    #[arg(long, default_value_t = Argon2Params::DEFAULT.memory_kib)]
    argon2_memory_kib: u32,
    /// Argon2id passes (floor 2).
    #[arg(long, default_value_t = Argon2Params::DEFAULT.iterations)]
    argon2_iterations: u32,
    /// Argon2id lanes.
    #[arg(long, default_value_t = Argon2Params::DEFAULT.parallelism)]
    argon2_parallelism: u32,
}

impl Argon2Args {
    fn params(self) -> Argon2Params {
        Argon2Params {
            memory_kib: self.argon2_memory_kib,
            iterations: self.argon2_iterations,
            parallelism: self.argon2_parallelism,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Create a store.
    Init {
        /// The store directory (created 0700 if missing).
        #[arg(long, value_name = "DIR")]
        store: PathBuf,
        #[command(flatten)]
        key: Key,
        /// Write a new random key to --key-file (mode 0600; refuses to overwrite).
        #[arg(long, requires = "key_file")]
        generate_key: bool,
        #[command(flatten)]
        argon2: Argon2Args,
    },
    /// Re-wrap every DEK under a new KEK, atomically (KEK rotation).
    Rewrap {
        /// The store directory.
        #[arg(long, value_name = "DIR")]
        store: PathBuf,
        #[command(flatten)]
        key: Key,
        /// The new key file.
        #[arg(long, value_name = "FILE", conflicts_with = "new_passphrase_file")]
        new_key_file: Option<PathBuf>,
        /// The new passphrase file.
        #[arg(long, value_name = "FILE")]
        new_passphrase_file: Option<PathBuf>,
        /// Write a new random key to --new-key-file first.
        #[arg(long, requires = "new_key_file")]
        generate_key: bool,
        #[command(flatten)]
        argon2: Argon2Args,
    },
    /// Take a consistent, still-encrypted snapshot into a new directory.
    Backup {
        /// The store directory.
        #[arg(long, value_name = "DIR")]
        store: PathBuf,
        /// The new backup directory.
        #[arg(long, value_name = "PATH")]
        to: PathBuf,
    },
    /// Decrypt every record of a store or backup and report what is damaged.
    Verify {
        /// The store or backup directory.
        path: PathBuf,
        #[command(flatten)]
        key: Key,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    keyhole_providers::init_tracing();
    match run(cli) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
    }
}

const BACKUP_WARNING: &str = "WARNING: back up this key file now, next to the store. \
Lose it and every secret in the store is lost; nothing can recover them.";

/// Writes a fresh key to the key file `source` names, and says loudly to back it up.
fn generate_key_file(source: &KekSource) -> Result<(), StoreError> {
    if let KekSource::KeyFile(path) = source {
        keyhole_provider_file::kek::generate_key_file(path)?;
        eprintln!("{BACKUP_WARNING}\nkey file: {}", path.display());
    }
    Ok(())
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    let e = |e: StoreError| e.to_string();
    match cli.command {
        None => {
            let serve = cli.serve;
            let dir = serve
                .store
                .ok_or("give --store DIR (create one with `keyhole-provider-file init`)")?;
            let store = Store::open(
                &dir,
                &serve.key.source().map_err(e)?,
                serve.key.danger_allow_insecure_key_file,
                StoreOptions {
                    versions_kept: serve.versions_kept,
                    ..StoreOptions::default()
                },
            )
            .map_err(e)?;
            tracing::info!(store = %dir.display(), "store unlocked");
            let provider = FileProvider::new(store, serve.versions_kept, serve.max_value_size);
            keyhole_providers::serve(provider, &serve.serve, ServeOptions::default())?;
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Init {
            store: dir,
            key,
            generate_key,
            argon2,
        }) => {
            let source = key.source().map_err(e)?;
            if generate_key {
                generate_key_file(&source).map_err(e)?;
            }
            store::init(
                &dir,
                &source,
                argon2.params(),
                key.danger_allow_insecure_key_file,
            )
            .map_err(e)?;
            println!("created store {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Rewrap {
            store: dir,
            key,
            new_key_file,
            new_passphrase_file,
            generate_key,
            argon2,
        }) => {
            let new = match (new_key_file, new_passphrase_file) {
                (Some(k), None) => KekSource::KeyFile(k),
                (None, Some(p)) => KekSource::PassphraseFile(p),
                _ => return Err("give --new-key-file FILE or --new-passphrase-file FILE".into()),
            };
            if generate_key {
                generate_key_file(&new).map_err(e)?;
            }
            let n = store::rewrap(
                &dir,
                &key.source().map_err(e)?,
                &new,
                argon2.params(),
                key.danger_allow_insecure_key_file,
            )
            .map_err(e)?;
            println!(
                "re-wrapped {n} records; the old key no longer opens {}",
                dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Backup { store: dir, to }) => {
            let n = store::backup(&dir, &to).map_err(e)?;
            println!("backed up {n} records to {}", to.display());
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Verify { path, key }) => {
            let report = store::verify(
                &path,
                &key.source().map_err(e)?,
                key.danger_allow_insecure_key_file,
            )
            .map_err(e)?;
            for (file, why) in &report.damaged {
                println!("damaged: {file}: {why}");
            }
            println!(
                "verified {} records, {} damaged",
                report.intact + report.damaged.len(),
                report.damaged.len()
            );
            Ok(if report.damaged.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}
