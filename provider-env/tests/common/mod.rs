//! Shared test support: the binary, a kubelet-style Secret volume, providers spawned as the
//! gateway spawns them, a few operations, and the forms a leaked value could take.

#![allow(dead_code)] // each test file uses its own subset

use std::ffi::OsString;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use keyhole_protocol::{Description, Encoding, Op, Outcome, ProviderError, Reply, SecretBytes};
use keyhole_protocol::{ErrorCode, WatchEvent};
use keyhole_transport::client::Client;
use keyhole_transport::spawn::{SpawnOptions, Spawned, spawn};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_keyhole-provider-env");

/// Deadline of one request.
pub const CALL: Duration = Duration::from_secs(10);

/// The version the README documents for `value` under `name`, computed independently.
pub fn expected_version(name: &str, value: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(b"keyhole-provider-env v1\0");
    h.update(name.as_bytes());
    h.update([0]);
    h.update(value);
    hex::encode(&h.finalize()[..16])
}

/// A random hex string, for unique prefixes and canaries.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).unwrap();
    hex::encode(buf)
}

/// A variable prefix no other test or CI variable uses.
pub fn unique_prefix() -> String {
    format!("KHT_{}_", random_hex(4).to_uppercase())
}

/// Whether `haystack` holds `value` raw, in base64 (standard or URL-safe, padded or not) or in
/// hex (either case).
pub fn leaks(haystack: &[u8], value: &[u8]) -> bool {
    let mut forms: Vec<Vec<u8>> = vec![
        value.to_vec(),
        hex::encode(value).into_bytes(),
        hex::encode_upper(value).into_bytes(),
    ];
    for engine in [
        &base64::engine::general_purpose::STANDARD,
        &base64::engine::general_purpose::STANDARD_NO_PAD,
        &base64::engine::general_purpose::URL_SAFE,
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ] {
        forms.push(engine.encode(value).into_bytes());
    }
    forms
        .iter()
        .any(|f| !f.is_empty() && haystack.windows(f.len()).any(|w| w == f.as_slice()))
}

/// A Secret volume laid out as the kubelet does, updated as the kubelet updates it.
pub struct Kubelet {
    pub tmp: tempfile::TempDir,
    generation: u64,
    current: Option<String>,
}

impl Kubelet {
    pub fn new() -> Kubelet {
        Kubelet {
            tmp: tempfile::tempdir().unwrap(),
            generation: 0,
            current: None,
        }
    }

    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// The next generation directory's name, timestamped as the kubelet names them.
    fn next_name(&mut self) -> String {
        self.generation += 1;
        format!("..2026_11_22_06_00_00.{:09}", self.generation)
    }

    /// Writes a new generation with `files` and swaps `..data` to it atomically (a symlink at a
    /// temporary name renamed over `..data`), then adds missing `KEY -> ..data/KEY` links and
    /// deletes the previous generation, as the kubelet's atomic writer does.
    pub fn publish(&mut self, files: &[(&str, &[u8])]) -> PathBuf {
        let name = self.next_name();
        let dir = self.path().join(&name);
        std::fs::create_dir(&dir).unwrap();
        for (key, value) in files {
            std::fs::write(dir.join(key), value).unwrap();
        }
        self.swap_to(&name);
        for (key, _) in files {
            let link = self.path().join(key);
            if std::fs::symlink_metadata(&link).is_err() {
                symlink(Path::new("..data").join(key), &link).unwrap();
            }
        }
        if let Some(old) = self.current.replace(name) {
            std::fs::remove_dir_all(self.path().join(old)).unwrap();
        }
        dir
    }

    /// Points `..data` at `target` (relative to the volume) atomically.
    pub fn swap_to(&self, target: &str) {
        let tmp = self.path().join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        symlink(target, &tmp).unwrap();
        std::fs::rename(&tmp, self.path().join("..data")).unwrap();
    }

    /// Claims the next generation's name without creating it (for a `..data` that points at a
    /// directory not written yet).
    pub fn reserve(&mut self) -> String {
        self.next_name()
    }

    /// Sets the directory that `publish` will delete next.
    pub fn set_current(&mut self, name: String) {
        self.current = Some(name);
    }
}

/// A provider started as the gateway starts it, and a client connected to it.
pub struct Running {
    pub process: Spawned,
    pub client: Client,
    pub events: mpsc::Receiver<WatchEvent>,
}

/// Starts `BIN args... --connect S` with `env` added to the environment.
pub async fn start(args: &[OsString], env: &[(OsString, OsString)]) -> Running {
    start_with(args, env, Encoding::Bincode).await
}

pub async fn start_with(
    args: &[OsString],
    env: &[(OsString, OsString)],
    encoding: Encoding,
) -> Running {
    let mut options = SpawnOptions::new(BIN, args.to_vec(), encoding);
    options.env = env.to_vec();
    options.handshake_timeout = Duration::from_secs(10);
    let (process, conn) = spawn(&options).await.unwrap();
    let (tx, events) = keyhole_transport::client::event_channel();
    let client = Client::start(conn.reader, conn.writer, conn.ack, tx);
    Running {
        process,
        client,
        events,
    }
}

/// `["--dir", PATH]`, plus `--no-env`.
pub fn dir_args(path: &Path) -> Vec<OsString> {
    vec!["--no-env".into(), "--dir".into(), path.into()]
}

impl Running {
    pub async fn call(&self, op: Op) -> Outcome {
        self.client.call(op, CALL).await.unwrap()
    }

    /// Resolve, as the value and version, or the provider's error.
    pub async fn resolve(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<(SecretBytes, String), ProviderError> {
        match self
            .call(Op::Resolve {
                name: name.into(),
                version: version.map(Into::into),
            })
            .await
        {
            Outcome::Ok(Reply::Resolved { value, version }) => Ok((value, version)),
            Outcome::Err(e) => Err(e),
            other => panic!("resolve answered {other:?}"),
        }
    }

    pub async fn describe(&self, name: &str) -> Result<Description, ProviderError> {
        match self.call(Op::Describe { name: name.into() }).await {
            Outcome::Ok(Reply::Described(d)) => Ok(d),
            Outcome::Err(e) => Err(e),
            other => panic!("describe answered {other:?}"),
        }
    }

    /// One List answer (up to 1000 names) under `prefix`.
    pub async fn list(&self, prefix: &str) -> Vec<Description> {
        match self
            .call(Op::List {
                prefix: prefix.into(),
                page: None,
                limit: 1000,
            })
            .await
        {
            Outcome::Ok(Reply::Listed { entries, .. }) => entries,
            other => panic!("list answered {other:?}"),
        }
    }

    /// Starts a watch of `prefix`; returns its id.
    pub async fn watch(&self, prefix: &str) -> u64 {
        let pending = self
            .client
            .start_call(
                Op::Watch {
                    prefix: prefix.into(),
                },
                CALL,
            )
            .await
            .unwrap();
        let id = pending.id;
        match self.client.finish(pending).await.unwrap() {
            Outcome::Ok(Reply::Watching {}) => id,
            other => panic!("watch answered {other:?}"),
        }
    }

    /// The next event of watch `id` within `wait`.
    pub async fn next_event(&mut self, id: u64, wait: Duration) -> Option<WatchEvent> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(ev)) if ev.watch_id == id => return Some(ev),
                Ok(Some(_)) => continue,
                _ => return None,
            }
        }
    }

    /// Says Goodbye, waits for a clean exit, and returns everything the provider wrote.
    pub async fn stop(mut self) -> Vec<u8> {
        let _ = self.client.call(Op::Goodbye {}, CALL).await;
        drop(self.client);
        let status = self.process.wait_exit(Duration::from_secs(5)).await;
        assert!(status.is_some_and(|s| s.success()), "{status:?}");
        self.process.output().bytes()
    }
}

/// Asserts `e` has `code` and its message contains every one of `words`.
#[track_caller]
pub fn assert_error(e: &ProviderError, code: ErrorCode, words: &[&str]) {
    assert_eq!(e.code, code, "{e}");
    for w in words {
        assert!(e.message.contains(w), "{w:?} missing from: {e}");
    }
}

/// Waits for a provider started with `--listen socket` and connects to it as a gateway would.
pub async fn connect_listening(
    socket: &Path,
    token: keyhole_protocol::Token,
    encoding: Encoding,
) -> (Client, mpsc::Receiver<WatchEvent>) {
    use keyhole_transport::client::{HelloOptions, handshake};
    use keyhole_transport::socket as ksocket;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let stream = loop {
        match ksocket::connect(socket).await {
            Ok(s) => break s,
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{}: {e}",
                    socket.display()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let (r, w) = ksocket::into_halves(stream);
    let (reader, writer, ack) = handshake(
        r,
        w,
        &HelloOptions::new(token, encoding),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let (tx, rx) = keyhole_transport::client::event_channel();
    (Client::start(reader, writer, ack, tx), rx)
}
