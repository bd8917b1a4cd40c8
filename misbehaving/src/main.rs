//! `keyhole-provider-misbehaving --behaviour B`: a provider that breaks the protocol in one
//! specific way, so tests can check the conformance suite (and later the gateway) catches it.
//!
//! Semantic faults wrap the reference memory provider and run on the SDK; protocol faults need a
//! raw connection loop, which is here, deliberately minimal.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use clap::{Parser, ValueEnum};
use keyhole_protocol::{
    Capabilities, Change, DEFAULT_MAX_FRAME, Description, Encoding, ErrorCode, HANDSHAKE_MAJOR,
    HANDSHAKE_MAX_FRAME, HealthReport, Hello, HelloAck, HelloReject, HelloReply, Offer, Op,
    Outcome, ProviderError, ProviderInfo, ProviderMessage, RejectCode, Reply, Request, Response,
    SUPPORTED_MAJORS, SecretBytes, TOKEN_ENV, Token, WatchEvent, decode, negotiate,
};
use keyhole_provider_memory::{MemoryOptions, MemoryProvider};
use keyhole_providers::{Page, Provider, Resolved, ServeArgs, ServeOptions, StoreRequest};
use keyhole_transport::{BoxRead, BoxWrite, FrameReader, FrameWriter, socket};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Behaviour {
    /// Exits with status 3 before connecting.
    ExitBeforeHello,
    /// Speaks only protocol major 99.
    UnknownMajor,
    /// Accepts the handshake, then never answers.
    Hang,
    /// Accepts the handshake, then answers the first request with garbage bytes.
    GarbageFrame,
    /// Answers NotFound instead of Revoked after a revoke.
    NotfoundAfterRevoke,
    /// Keeps old versions readable after a revoke.
    OldVersionAfterRevoke,
    /// Rotate returns the version it replaced.
    RotateSameVersion,
    /// Echoes the value in Conflict and AlreadyExists messages.
    EchoValue,
    /// Gives the latest value as every version string (Store, Rotate, Resolve, Describe) and as
    /// a label in Describe.
    LeakValue,
    /// Serves requests one at a time and ignores their deadlines.
    IgnoreDeadlines,
    /// Accepts the handshake, then never reads again (a wedged process): a large request fills
    /// the socket and its writer waits.
    StopReading,
    /// Sends a flood of watch events nobody asked for (10,000 per request, for a watch id that
    /// was never a Watch) before each answer.
    UnsolicitedEvents,
}

/// A deliberately broken keyhole provider.
#[derive(Parser)]
struct Cli {
    /// How to misbehave.
    #[arg(long, value_enum)]
    behaviour: Behaviour,
    #[command(flatten)]
    serve: ServeArgs,
}

fn main() {
    let cli = Cli::parse();
    keyhole_providers::init_tracing();
    let memory = MemoryProvider::new(MemoryOptions::default());
    let result = match cli.behaviour {
        Behaviour::ExitBeforeHello => {
            eprintln!("misbehaving: exiting before Hello");
            std::process::exit(3);
        }
        Behaviour::UnknownMajor => keyhole_providers::serve(
            memory,
            &cli.serve,
            ServeOptions {
                majors: vec![99],
                ..ServeOptions::default()
            },
        ),
        Behaviour::Hang
        | Behaviour::GarbageFrame
        | Behaviour::IgnoreDeadlines
        | Behaviour::StopReading
        | Behaviour::UnsolicitedEvents => raw(cli.behaviour, memory, &cli.serve),
        semantic => keyhole_providers::serve(
            Twisted {
                inner: memory,
                behaviour: semantic,
                seen: Mutex::new(HashMap::new()),
                latest: Mutex::new(HashMap::new()),
            },
            &cli.serve,
            ServeOptions::default(),
        ),
    };
    if let Err(message) = result {
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}

/// The memory provider with one semantic rule broken.
struct Twisted {
    inner: MemoryProvider,
    behaviour: Behaviour,
    /// (name, version) → value, for the provider that keeps revoked versions readable.
    seen: Mutex<HashMap<(String, String), SecretBytes>>,
    /// name → latest value, for the provider that leaks it.
    latest: Mutex<HashMap<String, SecretBytes>>,
}

impl Twisted {
    /// The version string to answer with: `version`, or the latest value of `name` when leaking.
    fn version(&self, name: &str, version: String) -> String {
        if self.behaviour != Behaviour::LeakValue {
            return version;
        }
        let latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        match latest.get(name) {
            Some(value) => String::from_utf8_lossy(value.expose()).into_owned(),
            None => version,
        }
    }

    fn remember(&self, name: &str, version: &str, value: &SecretBytes) {
        if self.behaviour == Behaviour::LeakValue {
            self.latest
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.into(), value.clone());
        }
        if self.behaviour == Behaviour::OldVersionAfterRevoke {
            self.seen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((name.into(), version.into()), value.clone());
        }
    }

    fn echo(&self, mut e: ProviderError, value: &SecretBytes) -> ProviderError {
        if self.behaviour == Behaviour::EchoValue
            && matches!(e.code, ErrorCode::Conflict | ErrorCode::AlreadyExists)
        {
            e.message = format!(
                "{} (value was {})",
                e.message,
                String::from_utf8_lossy(value.expose())
            );
        }
        e
    }
}

impl Provider for Twisted {
    fn info(&self) -> ProviderInfo {
        ProviderInfo {
            name: format!("misbehaving-{:?}", self.behaviour),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn resolve(&self, name: &str, version: Option<&str>) -> Result<Resolved, ProviderError> {
        match self.inner.resolve(name, version).await {
            Err(e) if e.code == ErrorCode::Revoked => match self.behaviour {
                Behaviour::NotfoundAfterRevoke => Err(ProviderError::not_found(name)),
                Behaviour::OldVersionAfterRevoke => {
                    let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
                    match version.and_then(|v| seen.get(&(name.into(), v.into()))) {
                        Some(value) => Ok(Resolved {
                            value: value.clone(),
                            version: version.unwrap_or_default().into(),
                        }),
                        None => Err(e),
                    }
                }
                _ => Err(e),
            },
            Ok(r) => Ok(Resolved {
                version: self.version(name, r.version),
                value: r.value,
            }),
            other => other,
        }
    }

    async fn store(&self, request: StoreRequest) -> Result<String, ProviderError> {
        let (name, value) = (request.name.clone(), request.value.clone());
        match self.inner.store(request).await {
            Ok(v) => {
                self.remember(&name, &v, &value);
                Ok(self.version(&name, v))
            }
            Err(e) => Err(self.echo(e, &value)),
        }
    }

    async fn rotate(
        &self,
        name: &str,
        value: SecretBytes,
        expected_version: Option<&str>,
    ) -> Result<String, ProviderError> {
        let before = self
            .inner
            .describe(name)
            .await
            .ok()
            .and_then(|d| d.current_version);
        match self
            .inner
            .rotate(name, value.clone(), expected_version)
            .await
        {
            Ok(v) => {
                self.remember(name, &v, &value);
                match (self.behaviour, before) {
                    (Behaviour::RotateSameVersion, Some(old)) => Ok(old),
                    _ => Ok(self.version(name, v)),
                }
            }
            Err(e) => Err(self.echo(e, &value)),
        }
    }

    async fn revoke(&self, name: &str) -> Result<(), ProviderError> {
        self.inner.revoke(name).await
    }

    async fn describe(&self, name: &str) -> Result<Description, ProviderError> {
        let mut d = self.inner.describe(name).await?;
        if self.behaviour == Behaviour::LeakValue {
            d.current_version = d.current_version.map(|v| self.version(name, v));
            for v in &mut d.versions {
                v.version = self.version(name, std::mem::take(&mut v.version));
            }
            let leaked = self.version(name, String::new());
            d.labels.insert("leaked".into(), leaked.clone());
            d.labels.insert(leaked, "as a key".into());
        }
        Ok(d)
    }

    async fn list(
        &self,
        prefix: &str,
        page: Option<&str>,
        limit: u32,
    ) -> Result<Page, ProviderError> {
        self.inner.list(prefix, page, limit).await
    }

    async fn health(&self) -> HealthReport {
        self.inner.health().await
    }

    async fn watch(
        &self,
        prefix: &str,
    ) -> Result<tokio::sync::mpsc::Receiver<keyhole_providers::WatchChange>, ProviderError> {
        self.inner.watch(prefix).await
    }
}

/// A raw, serial connection loop for the protocol-level faults (spawn mode only).
fn raw(behaviour: Behaviour, provider: MemoryProvider, args: &ServeArgs) -> Result<(), String> {
    let Some(path) = args.connect.clone() else {
        return Err("this behaviour supports only --connect".into());
    };
    let token = std::env::var(TOKEN_ENV)
        .map(Token::new)
        .map_err(|_| format!("{TOKEN_ENV} is not set"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let stream = socket::connect(&path).await.map_err(|e| e.to_string())?;
        let (read, write) = socket::into_halves(stream);
        let _ = serve_raw(behaviour, Arc::new(provider), read, write, &token).await;
        Ok(())
    })
}

async fn serve_raw(
    behaviour: Behaviour,
    provider: Arc<MemoryProvider>,
    read: BoxRead,
    write: BoxWrite,
    token: &Token,
) -> std::io::Result<()> {
    let mut reader = FrameReader::new(read, HANDSHAKE_MAX_FRAME);
    let mut writer = FrameWriter::new(write, HANDSHAKE_MAJOR, Encoding::Json, HANDSHAKE_MAX_FRAME);
    let Some(frame) = reader.next().await.map_err(std::io::Error::other)? else {
        return Ok(());
    };
    let hello: Hello = decode(Encoding::Json, frame.payload).map_err(std::io::Error::other)?;
    let offer = Offer {
        majors: SUPPORTED_MAJORS,
        encodings: &Encoding::ALL,
    };
    let negotiated = if hello.token.ct_eq(token) {
        negotiate(&hello, &offer)
    } else {
        Err(HelloReject {
            code: RejectCode::Unauthenticated,
            message: "wrong token".into(),
            majors: SUPPORTED_MAJORS.to_vec(),
            encodings: Encoding::ALL.to_vec(),
        })
    };
    let (major, encoding) = match negotiated {
        Ok(chosen) => chosen,
        Err(reject) => {
            let _ = writer.queue(&HelloReply::Reject(reject));
            return writer.shutdown().await;
        }
    };
    // This loop has no watch machinery.
    let capabilities = Capabilities {
        watch: false,
        ..provider.capabilities()
    };
    let ack = HelloAck {
        major,
        encoding,
        provider: ProviderInfo {
            name: format!("misbehaving-{behaviour:?}"),
            version: env!("CARGO_PKG_VERSION").into(),
        },
        capabilities: capabilities.clone(),
        features: Vec::new(),
        max_frame: DEFAULT_MAX_FRAME,
    };
    let _ = writer.queue(&HelloReply::Accept(ack));
    writer.flush().await?;
    writer.set_format(major, encoding, hello.max_frame);
    reader.set_cap(DEFAULT_MAX_FRAME);
    if behaviour == Behaviour::StopReading {
        tracing::info!("misbehaving: no longer reading");
        // Until the gateway kills it; an hour bounds a process nobody reaps.
        tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
        return Ok(());
    }

    loop {
        let Some(frame) = reader.next().await.map_err(std::io::Error::other)? else {
            return Ok(());
        };
        let Ok(req) = decode::<Request>(encoding, frame.payload) else {
            return Ok(());
        };
        match behaviour {
            Behaviour::Hang => {
                tracing::info!("misbehaving: ignoring request {}", req.id);
                continue;
            }
            Behaviour::GarbageFrame => {
                writer.queue_raw(b"\x00\x01garbage, not a frame\xff\xfe");
                writer.flush().await?;
                continue;
            }
            Behaviour::UnsolicitedEvents => {
                for _ in 0..10_000 {
                    let _ = writer.queue(&ProviderMessage::Event(WatchEvent {
                        watch_id: u64::MAX,
                        name: "flood".into(),
                        change: Change::Updated,
                        version: Some("1".into()),
                    }));
                }
                // The gateway may close the connection partway through the flood.
                if writer.flush().await.is_err() {
                    return Ok(());
                }
            }
            _ => {}
        }
        // IgnoreDeadlines: every request is performed, whatever its timeout_ms says.
        let outcome = match req.op {
            Op::Goodbye {} => {
                let _ = writer.queue(&answer(req.id, Outcome::Ok(Reply::GoodbyeAck {})));
                writer.shutdown().await?;
                return Ok(());
            }
            Op::Cancel { .. } => Outcome::Ok(Reply::CancelAck { found: false }),
            op => keyhole_providers::dispatch(&*provider, &capabilities, op)
                .await
                .into(),
        };
        let _ = writer.queue(&answer(req.id, outcome));
        writer.flush().await?;
    }
}

fn answer(id: u64, outcome: Outcome) -> ProviderMessage {
    ProviderMessage::Response(Response { id, outcome })
}
