//! Shared test support: an isolated environment per test (temporary HOME and XDG directories), a
//! private D-Bus session with its own gnome-keyring-daemon, the provider spawned as the gateway
//! spawns it inside that environment, and a few operations.

#![allow(dead_code)] // each test file uses its own subset

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keyhole_protocol::SecretBytes;
use keyhole_protocol::{Encoding, ErrorCode, HealthReport, Op, Outcome, ProviderError, Reply};
use keyhole_transport::client::Client;
use keyhole_transport::spawn::{SpawnOptions, Spawned, spawn};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_keyhole-provider-keychain");

/// What to install when a tool is missing (Debian 12).
pub const INSTALL: &str =
    "apt-get install -y gnome-keyring dbus dbus-daemon libsecret-tools keyutils";

/// Deadline of one request.
pub const CALL: Duration = Duration::from_secs(10);

/// Whether `tool` is an executable on PATH.
pub fn have(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(tool))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// True if every tool is installed. Otherwise: under CI (the variable `CI` is set) the test
/// fails saying what to install; elsewhere it is skipped, loudly.
pub fn require(tools: &[&str], test: &str) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !have(t)).collect();
    if missing.is_empty() {
        return true;
    }
    let message = format!("{test} needs {} on PATH: {INSTALL}", missing.join(", "));
    if std::env::var_os("CI").is_some() {
        panic!("{message}");
    }
    eprintln!(
        "\n{}\nSKIPPED: {message}\n{}\n",
        "!".repeat(78),
        "!".repeat(78)
    );
    false
}

/// A random lowercase hex string of `n` bytes.
pub fn random_hex(n: usize) -> String {
    let token = keyhole_transport::generate_token().unwrap();
    let mut s = token.expose().to_string();
    while s.len() < 2 * n {
        s.push_str(keyhole_transport::generate_token().unwrap().expose());
    }
    s.truncate(2 * n);
    s
}

/// A fresh namespace, so tests sharing a keyring never see each other's entries.
pub fn fresh_service() -> String {
    format!("kh-test-{}", random_hex(6))
}

/// An isolated environment: a temporary HOME with its own XDG directories and a private 0700
/// runtime directory. Programs run in it through `env`, with `DBUS_SESSION_BUS_ADDRESS` removed
/// unless a bus is given.
pub struct TestEnv {
    pub dir: tempfile::TempDir,
    pub bus: Option<String>,
}

impl TestEnv {
    pub fn new() -> TestEnv {
        let dir = tempfile::tempdir().unwrap();
        for sub in [
            "home",
            "home/.local/share",
            "home/.config",
            "home/.cache",
            "run",
        ] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        std::fs::set_permissions(
            dir.path().join("run"),
            std::fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        TestEnv { dir, bus: None }
    }

    pub fn path(&self, sub: &str) -> PathBuf {
        self.dir.path().join(sub)
    }

    /// The variables every program of the environment gets.
    pub fn vars(&self) -> Vec<(String, PathBuf)> {
        vec![
            ("HOME".into(), self.path("home")),
            ("XDG_DATA_HOME".into(), self.path("home/.local/share")),
            ("XDG_CONFIG_HOME".into(), self.path("home/.config")),
            ("XDG_CACHE_HOME".into(), self.path("home/.cache")),
            ("XDG_RUNTIME_DIR".into(), self.path("run")),
        ]
    }

    /// `env -u DBUS_SESSION_BUS_ADDRESS VAR=... [DBUS_SESSION_BUS_ADDRESS=bus] program args...`,
    /// as a program and its arguments.
    pub fn wrap(&self, program: impl AsRef<OsStr>, args: &[OsString]) -> (OsString, Vec<OsString>) {
        let mut out: Vec<OsString> = vec!["-u".into(), "DBUS_SESSION_BUS_ADDRESS".into()];
        for (k, v) in self.vars() {
            let mut kv = OsString::from(format!("{k}="));
            kv.push(v);
            out.push(kv);
        }
        if let Some(bus) = &self.bus {
            out.push(format!("DBUS_SESSION_BUS_ADDRESS={bus}").into());
        }
        out.push(program.as_ref().to_owned());
        out.extend(args.iter().cloned());
        ("env".into(), out)
    }

    /// A `Command` for `program` in this environment.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env_remove("DBUS_SESSION_BUS_ADDRESS");
        for (k, v) in self.vars() {
            cmd.env(k, v);
        }
        if let Some(bus) = &self.bus {
            cmd.env("DBUS_SESSION_BUS_ADDRESS", bus);
        }
        cmd
    }
}

/// A private D-Bus session bus with a gnome-keyring-daemon serving the Secret Service, started
/// with `dbus-run-session`. Dropping it ends the session: the bus and the daemon exit.
pub struct Session {
    pub env: TestEnv,
    holder: Option<Child>,
}

const HOLDER: &str = r#"
if [ -n "$KH_TEST_UNLOCK" ]; then
    printf %s "$KH_TEST_UNLOCK" | gnome-keyring-daemon --components=secrets --daemonize --unlock >/dev/null || exit 1
else
    gnome-keyring-daemon --components=secrets --daemonize >/dev/null || exit 1
fi
echo "$DBUS_SESSION_BUS_ADDRESS"
exec cat >/dev/null
"#;

impl Session {
    /// A session in a fresh environment whose login keyring is created with, and unlocked by,
    /// `password`.
    pub fn unlocked(password: &str) -> Session {
        Session::start(TestEnv::new(), Some(password))
    }

    /// A session in `env`. With `unlock`, the daemon gets that password on stdin (creating the
    /// login keyring if there is none); without, an existing login keyring stays locked: the
    /// daemon would ask a graphical prompter, which fails without a display.
    pub fn start(mut env: TestEnv, unlock: Option<&str>) -> Session {
        env.bus = None;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(env.path("session.log"))
            .unwrap();
        let mut cmd = env.command("dbus-run-session");
        cmd.args(["--", "sh", "-c", HOLDER])
            .env("KH_TEST_UNLOCK", unlock.unwrap_or(""))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        let mut holder = cmd.spawn().expect("dbus-run-session starts");
        let stdout = holder.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let address = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_default()
            .trim()
            .to_string();
        let mut session = Session {
            env,
            holder: Some(holder),
        };
        assert!(
            address.starts_with("unix:"),
            "the D-Bus session did not start ({address:?}); its log:\n{}",
            session.log()
        );
        session.env.bus = Some(address);
        session
    }

    /// The bus and daemon output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.env.path("session.log")).unwrap_or_default()
    }

    /// Ends the session and hands back the environment (its HOME keeps the keyring files).
    pub fn stop(mut self) -> TestEnv {
        self.end();
        let mut env = std::mem::replace(&mut self.env, TestEnv::new());
        env.bus = None;
        env
    }

    fn end(&mut self) {
        let Some(mut holder) = self.holder.take() else {
            return;
        };
        // EOF on the holder's stdin ends it, and dbus-run-session then ends the bus; the
        // keyring daemon leaves with its bus.
        drop(holder.stdin.take());
        let stop = Instant::now() + Duration::from_secs(10);
        while Instant::now() < stop {
            if let Ok(Some(_)) = holder.try_wait() {
                // Give the daemon a moment to write its files and leave.
                std::thread::sleep(Duration::from_millis(100));
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = holder.kill();
        let _ = holder.wait();
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.end();
    }
}

/// A running provider and a client connected to it.
pub struct Served {
    pub process: Spawned,
    pub client: Client,
}

impl Served {
    /// Closes the connection and checks that the provider exits by itself, with status 0,
    /// within `within`.
    pub async fn stop_within(self, within: Duration) {
        let Served {
            mut process,
            client,
        } = self;
        drop(client);
        let status = process.wait_exit(within).await.unwrap_or_else(|| {
            panic!(
                "the provider did not exit within {within:?} of its connection closing; stderr:\n{}",
                process.output().tail(4096)
            )
        });
        assert!(
            status.success(),
            "{status}; stderr:\n{}",
            process.output().tail(4096)
        );
    }

    pub fn stderr(&self) -> String {
        self.process.output().tail(1 << 20)
    }
}

/// Spawns the provider in `env` with `args` (the SDK appends `--connect`).
pub async fn serve(env: &TestEnv, args: &[&str]) -> Served {
    let args: Vec<OsString> = args.iter().map(OsString::from).collect();
    let (program, args) = env.wrap(BIN, &args);
    let mut options = SpawnOptions::new(program, args, Encoding::Bincode);
    options.handshake_timeout = Duration::from_secs(20);
    let (process, conn) = spawn(&options)
        .await
        .unwrap_or_else(|e| panic!("the provider did not start: {e}"));
    let (tx, _rx) = keyhole_transport::client::event_channel();
    let client = Client::start(conn.reader, conn.writer, conn.ack, tx);
    Served { process, client }
}

/// Calls `op`; a connection failure panics.
pub async fn call(c: &Client, op: Op) -> Outcome {
    c.call(op, CALL)
        .await
        .unwrap_or_else(|e| panic!("connection failure: {e}"))
}

/// Calls `op` and returns its outcome and how long it took.
pub async fn timed(c: &Client, op: Op) -> (Outcome, Duration) {
    let started = Instant::now();
    let outcome = call(c, op).await;
    (outcome, started.elapsed())
}

pub async fn health(c: &Client) -> (HealthReport, Duration) {
    match timed(c, Op::Health {}).await {
        (Outcome::Ok(Reply::Health(h)), took) => (h, took),
        (other, _) => panic!("Health answered {other:?}"),
    }
}

pub fn store_op(name: &str, value: &[u8]) -> Op {
    Op::Store {
        name: name.into(),
        value: SecretBytes::copy_from(value),
        create_only: false,
        labels: Default::default(),
    }
}

pub fn rotate_op(name: &str, value: &[u8], expected: Option<&str>) -> Op {
    Op::Rotate {
        name: name.into(),
        value: SecretBytes::copy_from(value),
        expected_version: expected.map(str::to_owned),
    }
}

pub fn resolve_op(name: &str, version: Option<&str>) -> Op {
    Op::Resolve {
        name: name.into(),
        version: version.map(str::to_owned),
    }
}

/// Store; returns the version.
pub async fn store(c: &Client, name: &str, value: &[u8]) -> String {
    match call(c, store_op(name, value)).await {
        Outcome::Ok(Reply::Stored { version }) => version,
        other => panic!("store {name}: {other:?}"),
    }
}

/// Rotate; returns the version.
pub async fn rotate(c: &Client, name: &str, value: &[u8]) -> String {
    match call(c, rotate_op(name, value, None)).await {
        Outcome::Ok(Reply::Rotated { version }) => version,
        other => panic!("rotate {name}: {other:?}"),
    }
}

/// Resolves and asserts the value; returns the version.
pub async fn assert_resolves(
    c: &Client,
    name: &str,
    version: Option<&str>,
    expected: &[u8],
) -> String {
    match call(c, resolve_op(name, version)).await {
        Outcome::Ok(Reply::Resolved { value, version: v }) => {
            assert!(
                value.expose() == expected,
                "{name}@{version:?} resolved to another value (version {v})"
            );
            v
        }
        other => panic!("resolve {name}@{version:?}: {other:?}"),
    }
}

/// Asserts an error answer with `code`; returns it.
pub fn expect_err(outcome: Outcome, code: ErrorCode, what: &str) -> ProviderError {
    match outcome {
        Outcome::Err(e) if e.code == code => e,
        other => panic!("{what}: expected {code:?}, got {other:?}"),
    }
}

/// The keychain user of a name's pointer (see `layout` in the crate).
pub fn pointer_user(name: &str) -> String {
    format!("ptr:{}", name_hash(name))
}

/// The keychain user of version `v` of a name.
pub fn version_user(name: &str, v: &str) -> String {
    format!("ver:{}:{v}", name_hash(name))
}

fn name_hash(name: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(name.as_bytes())[..16])
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Runs a command to completion within `within`; returns (status code, stdout, stderr).
pub fn run(mut cmd: Command, within: Duration) -> (Option<i32>, Vec<u8>, String) {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let pid = child.id();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(within) {
        Ok(out) => {
            let out = out.unwrap();
            (
                out.status.code(),
                out.stdout,
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("{cmd:?} did not finish within {within:?}");
        }
    }
}

/// Lines of the suite's report, for assertion messages.
pub fn report_lines(report: &keyhole_conformance::Report) -> String {
    report
        .results
        .iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Asserts that the suite passed: no failure, every case run in both encodings, and the cases
/// for the declared operations judged, not skipped.
pub fn assert_suite_passes(report: &keyhole_conformance::Report) {
    use keyhole_conformance::Status;
    assert_eq!(report.failed(), 0, "{}", report_lines(report));
    assert_eq!(
        report.results.len(),
        2 * keyhole_conformance::case_names().len(),
        "{}",
        report_lines(report)
    );
    for case in [
        "health.reports-status",
        "store.round-trip",
        "store.too-large",
        "rotate.history-limit",
        "rotate.conflict",
        "revoke.resolve-revoked",
        "revoke.restore-by-rotate",
        "revoke.restore-by-store",
        "list.prefix-and-pages",
        "concurrency.64-out-of-order",
        "canary.errors",
        "canary.stderr",
    ] {
        let passes = report
            .results
            .iter()
            .filter(|r| r.name == case && matches!(r.status, Status::Pass))
            .count();
        assert_eq!(
            passes,
            2,
            "{case} did not pass in both encodings\n{}",
            report_lines(report)
        );
    }
}

/// The path of a socket file nobody listens on.
pub fn dead_socket(dir: &Path) -> PathBuf {
    let path = dir.join("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    path
}
