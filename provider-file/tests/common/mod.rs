//! Shared test support: stores made through the command line, providers spawned as the gateway
//! spawns them, a few operations, and the encodings a leaked value could take.

#![allow(dead_code)] // each test file uses its own subset

use std::ffi::{OsStr, OsString};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use keyhole_protocol::{Description, Encoding, ErrorCode, Op, Outcome, ProviderError, Reply};
use keyhole_protocol::{SecretBytes, WatchEvent};
use keyhole_transport::client::Client;
use keyhole_transport::spawn::{SpawnError, SpawnOptions, Spawned, spawn};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_keyhole-provider-file");

/// Deadline of one request.
pub const CALL: Duration = Duration::from_secs(10);

/// Deadline of one command-line run (init, rewrap, backup, verify).
pub const CLI: Duration = Duration::from_secs(60);

/// Argon2id parameters at the allowed floor, so passphrase stores are quick in debug builds.
pub const FAST_ARGON2: [&str; 6] = [
    "--argon2-memory-kib",
    "19456",
    "--argon2-iterations",
    "2",
    "--argon2-parallelism",
    "1",
];

/// How a store is unlocked.
#[derive(Clone, Debug)]
pub enum Secret {
    /// `--key-file F`.
    KeyFile(PathBuf),
    /// `--passphrase-file F`.
    Passphrase(PathBuf),
}

impl Secret {
    /// The flag and the file, as command-line arguments.
    pub fn args(&self) -> Vec<OsString> {
        match self {
            Secret::KeyFile(f) => vec!["--key-file".into(), f.into()],
            Secret::Passphrase(f) => vec!["--passphrase-file".into(), f.into()],
        }
    }
}

/// A store in a temporary directory, with what unlocks it.
pub struct TestStore {
    pub tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub secret: Secret,
}

impl TestStore {
    /// A path inside the temporary directory (not inside the store).
    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// The serve-mode arguments: `--store DIR` and the key or passphrase flag.
    pub fn serve_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["--store".into(), self.dir.clone().into()];
        args.extend(self.secret.args());
        args
    }

    /// The store's generation directories (`gen-<G>`).
    pub fn generation_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.is_dir()
                    && p.file_name()
                        .and_then(OsStr::to_str)
                        .is_some_and(|n| n.starts_with("gen-"))
            })
            .collect();
        dirs.sort();
        dirs
    }

    /// Every record file (32 lowercase hex characters) in every generation directory.
    pub fn record_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for dir in self.generation_dirs() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let is_record = path.file_name().and_then(OsStr::to_str).is_some_and(|n| {
                    n.len() == 32
                        && n.bytes()
                            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                });
                if is_record && path.is_file() {
                    files.push(path);
                }
            }
        }
        files.sort();
        files
    }
}

/// The output of one command-line run.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Both streams, for assertion messages.
    pub fn show(&self) -> String {
        format!(
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }

    /// Asserts exit 0.
    pub fn ok(self) -> Run {
        assert_eq!(self.code, Some(0), "{}", self.show());
        self
    }

    /// Asserts exit 1 with a one-line message on stderr starting `error: `.
    pub fn fails(self) -> Run {
        assert_eq!(self.code, Some(1), "{}", self.show());
        let last = self.stderr.trim_end().lines().last().unwrap_or("");
        assert!(last.starts_with("error: "), "{}", self.show());
        self
    }

    /// Asserts exit 1 with an `error: ` message on stderr containing `what` (any case).
    pub fn fails_with(self, what: &str) -> Run {
        let run = self.fails();
        assert!(
            run.stderr.to_lowercase().contains(&what.to_lowercase()),
            "expected {what:?} in stderr\n{}",
            run.show()
        );
        run
    }
}

/// Runs the binary with `args` to completion, within [`CLI`].
pub async fn cli<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let child = tokio::process::Command::new(BIN)
        .args(&args)
        .env_remove(keyhole_protocol::TOKEN_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(CLI, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{BIN} {args:?} did not finish within {CLI:?}"))
        .unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Writes `bytes` to `path` with `mode`.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) {
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The permission bits of `path`.
pub fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// `n` random bytes.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let token = keyhole_transport::generate_token().unwrap();
        out.extend(unhex(token.expose()));
    }
    out.truncate(n);
    out
}

/// A random number below `n` (n > 0).
pub fn random_below(n: u64) -> u64 {
    let b = random_bytes(8);
    u64::from_le_bytes(b.try_into().unwrap()) % n
}

fn unhex(s: &str) -> Vec<u8> {
    s.as_bytes()
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

/// A fresh key-file store: `init --store DIR --key-file F --generate-key`.
pub async fn key_store() -> TestStore {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let key = tmp.path().join("store.key");
    let mut args: Vec<OsString> = vec!["init".into(), "--store".into(), dir.clone().into()];
    args.extend([
        "--key-file".into(),
        key.clone().into(),
        "--generate-key".into(),
    ]);
    cli(&args).await.ok();
    TestStore {
        tmp,
        dir,
        secret: Secret::KeyFile(key),
    }
}

/// A fresh passphrase store with the floor Argon2id parameters.
pub async fn passphrase_store(passphrase: &str) -> TestStore {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let file = tmp.path().join("passphrase");
    write_file(&file, format!("{passphrase}\n").as_bytes(), 0o600);
    let mut args: Vec<OsString> = vec!["init".into(), "--store".into(), dir.clone().into()];
    args.extend(["--passphrase-file".into(), file.clone().into()]);
    args.extend(FAST_ARGON2.iter().map(OsString::from));
    cli(&args).await.ok();
    TestStore {
        tmp,
        dir,
        secret: Secret::Passphrase(file),
    }
}

/// A running provider and a client connected to it.
pub struct Served {
    pub process: Spawned,
    pub client: Client,
    pub events: tokio::sync::mpsc::Receiver<WatchEvent>,
}

impl Served {
    /// Closes the connection and waits for the provider to exit by itself, with status 0.
    pub async fn stop(self) -> Spawned {
        let Served {
            mut process,
            client,
            events,
        } = self;
        drop(client);
        drop(events);
        let status = process
            .wait_exit(Duration::from_secs(10))
            .await
            .expect("the provider did not exit within 10 s of its connection closing");
        assert!(
            status.success(),
            "{status}; stderr:\n{}",
            process.output().tail(4096)
        );
        process
    }
}

/// Spawns `BIN args...` (the SDK appends `--connect`) with extra environment variables.
pub async fn try_serve_with(
    args: Vec<OsString>,
    env: &[(&str, &str)],
    encoding: Encoding,
) -> Result<Served, SpawnError> {
    let mut options = SpawnOptions::new(BIN, args, encoding);
    options.handshake_timeout = Duration::from_secs(30);
    options.env = env
        .iter()
        .map(|(k, v)| (OsString::from(k), OsString::from(v)))
        .collect();
    let (process, conn) = spawn(&options).await?;
    let (tx, rx) = keyhole_transport::client::event_channel();
    let client = Client::start(conn.reader, conn.writer, conn.ack, tx);
    Ok(Served {
        process,
        client,
        events: rx,
    })
}

/// Spawns the provider on `store` with `extra` arguments, or panics with the reason.
pub async fn serve(store: &TestStore, extra: &[&str]) -> Served {
    let mut args = store.serve_args();
    args.extend(extra.iter().map(OsString::from));
    try_serve_with(args, &[], Encoding::Bincode)
        .await
        .unwrap_or_else(|e| panic!("the provider did not start: {e}"))
}

/// Spawns with `args`, expecting start-up to fail with exit 1 and an `error: ` line on stderr;
/// returns the spawn error's text, which includes that stderr.
pub async fn serve_fails(args: Vec<OsString>) -> String {
    let e = match try_serve_with(args, &[], Encoding::Json).await {
        Ok(_) => panic!("the provider started"),
        Err(e) => e,
    };
    let SpawnError::ExitedEarly { status, stderr, .. } = &e else {
        panic!("expected an exit before connecting, got: {e}")
    };
    assert_eq!(status.code(), Some(1), "{e}");
    let last = stderr.trim_end().lines().last().unwrap_or("");
    assert!(last.starts_with("error: "), "{e}");
    e.to_string()
}

pub fn value(bytes: &[u8]) -> SecretBytes {
    SecretBytes::copy_from(bytes)
}

/// Calls `op`; a connection failure panics.
pub async fn call(c: &Client, op: Op) -> Outcome {
    c.call(op, CALL)
        .await
        .unwrap_or_else(|e| panic!("connection failure: {e}"))
}

/// Store (create_only false, no labels); returns the version.
pub async fn store(c: &Client, name: &str, v: &[u8]) -> String {
    match call(c, store_op(name, v)).await {
        Outcome::Ok(Reply::Stored { version }) => version,
        other => panic!("store {name}: {other:?}"),
    }
}

pub fn store_op(name: &str, v: &[u8]) -> Op {
    Op::Store {
        name: name.into(),
        value: value(v),
        create_only: false,
        labels: Default::default(),
    }
}

pub fn rotate_op(name: &str, v: &[u8]) -> Op {
    Op::Rotate {
        name: name.into(),
        value: value(v),
        expected_version: None,
    }
}

/// Rotate without an expected version; returns the version.
pub async fn rotate(c: &Client, name: &str, v: &[u8]) -> String {
    match call(c, rotate_op(name, v)).await {
        Outcome::Ok(Reply::Rotated { version }) => version,
        other => panic!("rotate {name}: {other:?}"),
    }
}

pub async fn revoke(c: &Client, name: &str) {
    match call(c, Op::Revoke { name: name.into() }).await {
        Outcome::Ok(Reply::Revoked {}) => {}
        other => panic!("revoke {name}: {other:?}"),
    }
}

pub async fn resolve(c: &Client, name: &str, version: Option<&str>) -> Outcome {
    call(
        c,
        Op::Resolve {
            name: name.into(),
            version: version.map(str::to_owned),
        },
    )
    .await
}

/// Resolves and asserts the value (and, when pinned, the version).
pub async fn assert_resolves(c: &Client, name: &str, version: Option<&str>, expected: &[u8]) {
    match resolve(c, name, version).await {
        Outcome::Ok(Reply::Resolved { value, version: v }) => {
            assert!(
                value.expose() == expected,
                "{name}@{version:?} resolved to another value (version {v})"
            );
            if let Some(pinned) = version {
                assert_eq!(v, pinned, "{name}: pinned resolve answered another version");
            }
        }
        other => panic!("resolve {name}@{version:?}: {other:?}"),
    }
}

pub async fn describe(c: &Client, name: &str) -> Description {
    match call(c, Op::Describe { name: name.into() }).await {
        Outcome::Ok(Reply::Described(d)) => d,
        other => panic!("describe {name}: {other:?}"),
    }
}

/// Asserts an error answer with `code`; returns it.
pub fn expect_err(outcome: Outcome, code: ErrorCode, what: &str) -> ProviderError {
    match outcome {
        Outcome::Err(e) if e.code == code => e,
        other => panic!("{what}: expected {code:?}, got {other:?}"),
    }
}

/// Every regular file under `dir`, recursively.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let ty = entry.file_type().unwrap();
            if ty.is_dir() {
                stack.push(entry.path());
            } else if ty.is_file() {
                out.push(entry.path());
            }
        }
    }
    out.sort();
    out
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Lowercase hex.
pub fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every form of `value` a leak could take: raw, standard base64 with and without padding (and
/// the part of it that is the same wherever the value sits in a longer base64 text), lowercase
/// and uppercase hex. Each with a label for messages.
pub fn leak_forms(value: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut forms = vec![("raw".to_string(), value.to_vec())];
    let padded = base64(value);
    forms.push(("base64".into(), padded.clone().into_bytes()));
    forms.push((
        "base64 without padding".into(),
        padded.trim_end_matches('=').as_bytes().to_vec(),
    ));
    for shift in 0..3 {
        // The value after `shift` other bytes: keep only characters made of value bits alone.
        let mut framed = vec![0u8; shift];
        framed.extend_from_slice(value);
        framed.extend_from_slice(&[0, 0]);
        let text = base64(&framed);
        let (lo, hi) = (8 * shift, 8 * (shift + value.len()));
        let inner: String = text
            .chars()
            .enumerate()
            .filter(|(i, _)| 6 * i >= lo && 6 * i + 6 <= hi)
            .map(|(_, c)| c)
            .collect();
        forms.push((
            format!("base64 at byte offset {shift} (mod 3)"),
            inner.into_bytes(),
        ));
    }
    let hex = hex_lower(value);
    forms.push(("hex".into(), hex.clone().into_bytes()));
    forms.push(("HEX".into(), hex.to_uppercase().into_bytes()));
    forms
}

/// Polls `check` every 10 ms until it holds, for at most `deadline`.
pub async fn eventually(deadline: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let stop = tokio::time::Instant::now() + deadline;
    while !check() {
        assert!(
            tokio::time::Instant::now() < stop,
            "{what}: not within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The store holds exactly the fixed layout: `header.json`, `lock`, and one `gen-<G>` directory
/// of record files named by 32 lowercase hex characters; no temporary file, no stale generation.
pub fn assert_clean_layout(store: &TestStore) {
    let mut top: Vec<String> = std::fs::read_dir(&store.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    // The write counter appears once any process has opened the store.
    top.retain(|name| name != "counter");
    top.sort();
    let gens = store.generation_dirs();
    assert_eq!(gens.len(), 1, "one generation directory: {top:?}");
    let gen_name = gens[0].file_name().unwrap().to_string_lossy().into_owned();
    let digits = gen_name.strip_prefix("gen-").unwrap();
    assert!(
        !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()),
        "{gen_name}"
    );
    let mut expected = vec![gen_name, "header.json".to_string(), "lock".to_string()];
    expected.sort();
    assert_eq!(top, expected, "top level of {}", store.dir.display());
    let records = store.record_files();
    let all = walk(&gens[0]);
    assert_eq!(all, records, "only record files in {}", gens[0].display());
}
