//! `keyhole`: the gateway (`keyhole serve`) and its command-line client.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use keyhole_gateway::api::{ApiOp, ApiReply, HandleView, SOCKET_FILE, TOKEN_FILE};
use keyhole_gateway::audit::AuditLog;
use keyhole_gateway::client::{ClientError, GatewayClient};
use keyhole_gateway::config::{Config, ProviderConfig};
use keyhole_gateway::manager::{Launch, Manager, ProviderSpec};
use keyhole_gateway::redact::Redactor;
use keyhole_gateway::server::{Gateway, serve};
use keyhole_gateway::state::StateStore;
use keyhole_protocol::{Encoding, SecretBytes};

/// keyhole: programs hold handles; values stay in providers.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// The config file (default: $KEYHOLE_CONFIG, then ~/.config/keyhole/keyhole.toml, then
    /// built-in defaults).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve,
    /// Store a secret (value from stdin, or a no-echo prompt) and print its handle.
    Put {
        /// The secret's name in the provider.
        name: String,
        /// The provider (default: the configured default).
        #[arg(long)]
        provider: Option<String>,
        /// The handle's scope.
        #[arg(long)]
        scope: Option<String>,
        /// A label, `key=value`; repeatable.
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
    },
    /// Mint a handle for a secret that already exists in a provider (read-only providers such
    /// as env, or secrets written by other tools) and print it. Nothing is written.
    Link {
        /// The secret's name in the provider.
        name: String,
        /// The provider (default: the configured default).
        #[arg(long)]
        provider: Option<String>,
        /// The handle's scope.
        #[arg(long)]
        scope: Option<String>,
        /// A label, `key=value`; repeatable.
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
    },
    /// Write a new version behind a handle (value from stdin, or a no-echo prompt).
    Rotate {
        /// The handle.
        handle: String,
    },
    /// Revoke the secret behind a handle.
    Revoke {
        /// The handle.
        handle: String,
    },
    /// Show a handle's metadata (never its value).
    Describe {
        /// The handle.
        handle: String,
    },
    /// List your handles.
    List,
    /// Run a command with secrets injected into its environment; its output is redacted.
    Run {
        /// `VAR=HANDLE`: set VAR to the handle's value; repeatable.
        #[arg(long = "env", value_name = "VAR=HANDLE", required = true)]
        env: Vec<String>,
        /// Why the values are needed (recorded in the audit log; default: "keyhole run PROGRAM").
        #[arg(long)]
        purpose: Option<String>,
        /// The command, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
    /// Show each provider's state and health.
    Providers,
    /// Audit log commands.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Print the provider protocol's JSON Schema.
    Schema,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain; exit 1 and name the first broken record if it is not intact.
    Verify,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let redactor = Redactor::new();
    init_tracing(&redactor);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli, redactor)) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
    }
}

/// Logs go to stderr, every line through the redactor: whatever the gateway emits, a value it
/// has seen comes out as `[REDACTED]`.
fn init_tracing(redactor: &Redactor) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEYHOLE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let redactor = redactor.clone();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(move || RedactedLine {
            redactor: redactor.clone(),
            buf: Vec::new(),
        })
        .with_ansi(false)
        .try_init();
}

/// One log event, buffered whole and written redacted when the formatter is done with it.
struct RedactedLine {
    redactor: Redactor,
    buf: Vec<u8>,
}

impl Write for RedactedLine {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for RedactedLine {
    fn drop(&mut self) {
        let clean = self.redactor.redact(&self.buf);
        let _ = std::io::stderr().write_all(&clean);
    }
}

const CALL_DEADLINE: Duration = Duration::from_secs(30);

async fn run(cli: Cli, redactor: Redactor) -> Result<ExitCode, String> {
    let config = Config::load(cli.config.as_deref()).map_err(|e| e.to_string())?;
    match cli.command {
        Command::Serve => serve_gateway(config, redactor).await,
        Command::Schema => {
            print!("{}", keyhole_protocol::schema_string());
            Ok(ExitCode::SUCCESS)
        }
        Command::Put {
            name,
            provider,
            scope,
            labels,
        } => {
            let labels = parse_labels(&labels)?;
            let value = read_value(&format!("value for {name}: "))?;
            let reply = call(
                &config,
                ApiOp::Put {
                    name,
                    provider,
                    scope,
                    labels,
                    value,
                },
            )
            .await?;
            if let ApiReply::Put { handle, .. } = reply {
                println!("{handle}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Link {
            name,
            provider,
            scope,
            labels,
        } => {
            let labels = parse_labels(&labels)?;
            let op = ApiOp::Link {
                name,
                provider,
                scope,
                labels,
            };
            if let ApiReply::Put { handle, .. } = call(&config, op).await? {
                println!("{handle}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Rotate { handle } => {
            let value = read_value(&format!("new value for {handle}: "))?;
            if let ApiReply::Rotated { version } =
                call(&config, ApiOp::Rotate { handle, value }).await?
            {
                println!("rotated to version {version}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Revoke { handle } => {
            call(
                &config,
                ApiOp::Revoke {
                    handle: handle.clone(),
                },
            )
            .await?;
            println!("revoked {handle}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Describe { handle } => {
            if let ApiReply::Described(v) = call(&config, ApiOp::Describe { handle }).await? {
                print_handle(&v);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::List => {
            if let ApiReply::Listed { handles } = call(&config, ApiOp::List {}).await? {
                println!(
                    "{:<30} {:<10} {:<8} {:<10} NAME",
                    "HANDLE", "PROVIDER", "STATE", "SCOPE"
                );
                for h in handles {
                    println!(
                        "{:<30} {:<10} {:<8} {:<10} {}",
                        h.handle, h.provider, h.state, h.scope, h.name
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Providers => {
            if let ApiReply::Providers { providers } = call(&config, ApiOp::Providers {}).await? {
                println!(
                    "{:<12} {:<5} {:<22} {:<12} {:<8} DETAIL",
                    "NAME", "UP", "PROVIDER", "HEALTH", "RESTARTS"
                );
                for p in providers {
                    println!(
                        "{:<12} {:<5} {:<22} {:<12} {:<8} {}",
                        p.name,
                        if p.up { "yes" } else { "no" },
                        p.provider.unwrap_or_else(|| "-".into()),
                        p.health.unwrap_or_else(|| "-".into()),
                        p.restarts,
                        p.detail
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit {
            command: AuditCommand::Verify,
        } => {
            let ApiReply::Audit(a) = call(&config, ApiOp::AuditVerify {}).await? else {
                return Err("the gateway answered with something else".into());
            };
            if a.intact {
                println!("audit chain intact: {} records", a.records);
                Ok(ExitCode::SUCCESS)
            } else {
                println!(
                    "audit chain BROKEN at record {}: {}",
                    a.broken_at.unwrap_or(0),
                    a.reason.unwrap_or_default()
                );
                Ok(ExitCode::from(1))
            }
        }
        Command::Run {
            env,
            purpose,
            command,
        } => run_command(&config, env, purpose, command).await,
    }
}

fn parse_labels(labels: &[String]) -> Result<BTreeMap<String, String>, String> {
    labels
        .iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| format!("label {l:?} is not KEY=VALUE"))
        })
        .collect()
}

/// A value from stdin (one trailing newline removed), or from a no-echo prompt on a terminal.
/// Never from argv.
fn read_value(prompt: &str) -> Result<SecretBytes, String> {
    if std::io::stdin().is_terminal() {
        let typed = zeroize::Zeroizing::new(
            rpassword::prompt_password(prompt)
                .map_err(|e| format!("cannot read the value: {e}"))?,
        );
        return Ok(SecretBytes::copy_from(typed.as_bytes()));
    }
    let mut bytes = Vec::new();
    std::io::stdin()
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read the value from stdin: {e}"))?;
    let mut value = SecretBytes::new(bytes);
    let trimmed = {
        let raw = value.expose();
        let cut = raw
            .strip_suffix(b"\r\n")
            .or_else(|| raw.strip_suffix(b"\n"))
            .map(<[u8]>::len);
        cut.map(|n| SecretBytes::copy_from(&raw[..n]))
    };
    if let Some(t) = trimmed {
        value = t;
    }
    Ok(value)
}

fn paths(config: &Config) -> (PathBuf, PathBuf) {
    (
        config.runtime_dir.join(SOCKET_FILE),
        config.runtime_dir.join(TOKEN_FILE),
    )
}

async fn call(config: &Config, op: ApiOp) -> Result<ApiReply, String> {
    let (socket, token) = paths(config);
    let mut client = GatewayClient::connect(&socket, &token, Duration::from_secs(5))
        .await
        .map_err(|e| e.to_string())?;
    client.call(op, CALL_DEADLINE).await.map_err(|e| match e {
        ClientError::Api(e) => e.to_string(),
        other => other.to_string(),
    })
}

fn print_handle(v: &HandleView) {
    println!("handle:      {}", v.handle);
    println!("provider:    {}", v.provider);
    println!("name:        {}", v.name);
    println!("scope:       {}", v.scope);
    println!("state:       {}", v.state);
    println!(
        "version pin: {}",
        v.version_pin.as_deref().unwrap_or("current")
    );
    for (k, val) in &v.labels {
        println!("label:       {k}={val}");
    }
    if let Some(s) = &v.secret {
        println!(
            "secret:      {:?}, current version {}",
            s.state,
            s.current_version.as_deref().unwrap_or("-")
        );
        println!(
            "versions:    {}",
            s.versions
                .iter()
                .map(|x| x.version.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}

async fn run_command(
    config: &Config,
    env: Vec<String>,
    purpose: Option<String>,
    command: Vec<OsString>,
) -> Result<ExitCode, String> {
    let (program, args) = command.split_first().ok_or("give the command after --")?;
    let mut vars = Vec::new();
    for pair in &env {
        let (var, handle) = pair
            .split_once('=')
            .ok_or_else(|| format!("--env {pair:?} is not VAR=HANDLE"))?;
        vars.push((var.to_string(), handle.to_string()));
    }
    let purpose = purpose.unwrap_or_else(|| format!("keyhole run {}", program.to_string_lossy()));
    let handles = vars.iter().map(|(_, h)| h.clone()).collect();
    let ApiReply::Resolved { values } = call(config, ApiOp::Resolve { handles, purpose }).await?
    else {
        return Err("the gateway answered with something else".into());
    };
    let redactor = Redactor::new();
    let mut child = tokio::process::Command::new(program);
    child.args(args).stdin(std::process::Stdio::inherit());
    child
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for ((var, _), resolved) in vars.iter().zip(&values) {
        if !redactor.add(resolved.value.expose()) {
            tracing::warn!(
                "the value for {var} is shorter than 4 bytes and cannot be redacted from output"
            );
        }
        // The child's environment is the last responsible moment: the value leaves keyhole here.
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStringExt;
            child.env(var, OsString::from_vec(resolved.value.expose().to_vec()));
        }
    }
    let mut child = child
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", program.to_string_lossy()))?;
    let (exited_tx, exited) = tokio::sync::watch::channel(false);
    let out = child.stdout.take().map(|s| {
        tokio::spawn(pump(
            s,
            tokio::io::stdout(),
            redactor.clone(),
            exited.clone(),
        ))
    });
    let err = child.stderr.take().map(|s| {
        tokio::spawn(pump(
            s,
            tokio::io::stderr(),
            redactor.clone(),
            exited.clone(),
        ))
    });
    let status = child
        .wait()
        .await
        .map_err(|e| format!("waiting for the command failed: {e}"))?;
    let _ = exited_tx.send(true);
    let mut abandoned = false;
    for task in [out, err].into_iter().flatten() {
        abandoned |= task.await.unwrap_or(false);
    }
    if abandoned {
        eprintln!(
            "keyhole: {} exited, but a process it started still holds its output open; \
             stopped relaying it when it had been quiet for {OUTPUT_DRAIN:?}",
            program.to_string_lossy()
        );
    }
    if let Some(code) = status.code() {
        return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return Ok(ExitCode::from(u8::try_from(128 + signal).unwrap_or(1)));
        }
    }
    Ok(ExitCode::from(1))
}

/// How long `keyhole run` waits, once its command has exited, for more of its output: a process
/// the command started in the background may hold the pipe open for ever.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

/// Copies a child's output to ours through the redactor, safe across split writes. Once
/// `exited` says the command has exited, a read that brings nothing for [`OUTPUT_DRAIN`] ends the
/// relay: then what the redactor held back (it may be the start of a value) is dropped, not
/// printed, and the result is `true` (abandoned).
async fn pump(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    redactor: Redactor,
    mut exited: tokio::sync::watch::Receiver<bool>,
) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = redactor.stream();
    let mut buf = vec![0u8; 8192];
    loop {
        let read = if *exited.borrow() {
            match tokio::time::timeout(OUTPUT_DRAIN, from.read(&mut buf)).await {
                Ok(read) => read,
                Err(_) => return true,
            }
        } else {
            tokio::select! {
                read = from.read(&mut buf) => read,
                // Reading is cancel-safe: nothing read is lost by going round again.
                _ = exited.changed() => continue,
            }
        };
        match read {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let clean = stream.push(&buf[..n]);
                if to.write_all(&clean).await.is_err() || to.flush().await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.write_all(&stream.finish()).await;
    let _ = to.flush().await;
    false
}

/// `keyhole serve`.
async fn serve_gateway(mut config: Config, redactor: Redactor) -> Result<ExitCode, String> {
    create_private_dir(&config.data_dir)?;
    create_private_dir(&config.runtime_dir)?;
    let (socket, token_path) = paths(&config);
    // A live gateway keeps its socket and token, and this one stops before starting anything.
    // A dead one's token goes now: left until this gateway writes its own, a client could read
    // it in the moment after the new socket appears and fail to authenticate.
    if keyhole_transport::socket::connect(&socket).await.is_ok() {
        return Err(format!(
            "cannot serve on {}: it is already in use by a live gateway",
            socket.display()
        ));
    }
    match std::fs::remove_file(&token_path) {
        Ok(()) => tracing::info!("removed a stopped gateway's token file"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot remove {}: {e}", token_path.display())),
    }
    if let Some(choice) = keyhole_gateway::defaults::choose(&mut config).await {
        tracing::info!(provider = %choice.provider, "{choice}");
        eprintln!("keyhole: {choice}");
    }
    if config.uses_embedded_providers() {
        bootstrap_file_store(&config)?;
    }
    let state = Arc::new(StateStore::open(&config.state_db).map_err(|e| {
        format!(
            "cannot open the state database {}: {e}",
            config.state_db.display()
        )
    })?);
    let audit = Arc::new(AuditLog::open(&config.state_db).map_err(|e| {
        format!(
            "cannot open the audit log in {}: {e}",
            config.state_db.display()
        )
    })?);
    let specs = config
        .providers
        .iter()
        .map(|(name, p)| ProviderSpec {
            name: name.clone(),
            launch: match p {
                ProviderConfig::Spawn { command, args, env } => Launch::Spawn {
                    program: command.clone(),
                    args: args.iter().map(OsString::from).collect(),
                    env: env
                        .iter()
                        .map(|(k, v)| (OsString::from(k), OsString::from(v)))
                        .collect(),
                },
                ProviderConfig::Connect {
                    socket,
                    token_file,
                    uid,
                } => Launch::Connect {
                    socket: socket.clone(),
                    token_file: token_file.clone(),
                    expected_uid: *uid,
                },
            },
            handshake_timeout: config.handshake_timeout,
            encoding: Encoding::Bincode,
        })
        .collect();
    let manager = Manager::new(specs, redactor.clone());
    for (name, result) in manager.start_all().await {
        match result {
            Ok(()) => tracing::info!(provider = %name, "provider started"),
            Err(e) => {
                tracing::error!(provider = %name, "provider failed to start (will retry): {e}")
            }
        }
    }
    let owner_uid = nix::unistd::geteuid().as_raw();
    let gateway = Arc::new(Gateway {
        manager: manager.clone(),
        state,
        journal: keyhole_gateway::journal::Journal::start(Arc::clone(&audit))
            .map_err(|e| format!("cannot start the audit writer: {e}"))?,
        audit,
        policy: config.policy.clone(),
        redactor,
        default_provider: config.default_provider.clone(),
        call_timeout: config.call_timeout,
        client_write_timeout: keyhole_gateway::server::CLIENT_WRITE_TIMEOUT,
        owner_uid,
    });
    let token =
        keyhole_transport::generate_token().map_err(|e| format!("cannot make a token: {e}"))?;
    let token_bytes = zeroize::Zeroizing::new(token.expose().as_bytes().to_vec());
    let listening = std::cell::Cell::new(false);
    let ready = || {
        // Written only once the socket accepts: clients wait for this file.
        write_private(&token_path, &token_bytes).map_err(std::io::Error::other)?;
        listening.set(true);
        tracing::info!(socket = %socket.display(), "keyhole gateway listening; clients read the token from {}", token_path.display());
        Ok(())
    };
    let result = serve(gateway, &socket, token, ready, termination()).await;
    manager.shutdown(Duration::from_secs(2)).await;
    // Only this gateway's own files: when another one is live on the socket, listen() failed
    // and these belong to it.
    if listening.get() {
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(&token_path);
    }
    result.map_err(|e| format!("cannot serve on {}: {e}", socket.display()))?;
    Ok(ExitCode::SUCCESS)
}

/// With no config, the file provider keeps secrets in the data directory under a generated key.
fn bootstrap_file_store(config: &Config) -> Result<(), String> {
    let Some(ProviderConfig::Spawn { command, .. }) = config.providers.get("file") else {
        return Ok(());
    };
    let store = config.data_dir.join("file-store");
    let key = config.data_dir.join("kek");
    if store.join("header.json").exists() {
        return Ok(());
    }
    let out = std::process::Command::new(command)
        .arg("init")
        .arg("--store")
        .arg(&store)
        .arg("--key-file")
        .arg(&key)
        .arg("--generate-key")
        .output()
        .map_err(|e| format!("cannot run {} init: {e}", command.display()))?;
    if !out.status.success() {
        return Err(format!(
            "could not create the default file store: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    eprintln!(
        "\n  WARNING: keyhole created a new store at {}\n  and a new key-encryption key at {}.\n  BACK UP THAT KEY FILE NOW: without it, every secret in the store is lost.\n",
        store.display(),
        key.display()
    );
    Ok(())
}

fn create_private_dir(path: &Path) -> Result<(), String> {
    keyhole_transport::socket::ensure_private_dir(path).map_err(|e| e.to_string())
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

async fn termination() {
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
