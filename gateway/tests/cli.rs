//! The `keyhole` binary end to end, on its embedded defaults: serve, put, run, describe, list,
//! providers, audit verify; values never on disk or in output; no orphans after kill -9.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;

const KEYHOLE: &str = env!("CARGO_BIN_EXE_keyhole");

/// A gateway running on its defaults in a private home.
struct Gateway {
    home: std::sync::Arc<tempfile::TempDir>,
    child: Child,
}

impl Gateway {
    /// A gateway on its defaults with no D-Bus session bus, so it picks the file provider.
    fn start() -> Gateway {
        Gateway::start_in(std::sync::Arc::new(tempfile::tempdir().unwrap()))
    }

    /// [`Gateway::start`] in a given home, which may already hold a data directory.
    fn start_in(home: std::sync::Arc<tempfile::TempDir>) -> Gateway {
        let mut cmd = Command::new(KEYHOLE);
        cmd.arg("serve").env_remove("DBUS_SESSION_BUS_ADDRESS");
        Gateway::spawn(home, cmd)
    }

    /// A gateway on its defaults inside a private D-Bus session whose gnome-keyring-daemon
    /// serves an unlocked Secret Service, as on a desktop.
    fn start_in_keyring_session(home: std::sync::Arc<tempfile::TempDir>) -> Gateway {
        let mut cmd = Command::new("dbus-run-session");
        cmd.args([
            "--",
            "sh",
            "-c",
            "printf %s kh-test-login | gnome-keyring-daemon --components=secrets --daemonize \
             --unlock >/dev/null 2>&1 || exit 1; exec \"$@\"",
            "sh",
            KEYHOLE,
            "serve",
        ]);
        Gateway::spawn(home, cmd)
    }

    fn spawn(home: std::sync::Arc<tempfile::TempDir>, mut cmd: Command) -> Gateway {
        use std::os::unix::process::CommandExt;
        // A gateway killed earlier in this home may have left its token: readiness is a new one.
        let _ = std::fs::remove_file(home.path().join("run/keyhole/client.token"));
        let mut gw = Gateway {
            child: cmd
                .envs(env(home.path()))
                .process_group(0) // stop() and drop end every process it started
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
            home,
        };
        let token = gw.runtime_dir().join("client.token");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !token.exists() {
            if let Ok(Some(status)) = gw.child.try_wait() {
                let mut err = String::new();
                let _ = std::io::Read::read_to_string(gw.child.stderr.as_mut().unwrap(), &mut err);
                panic!("keyhole serve exited with {status}: {err}");
            }
            assert!(
                Instant::now() < deadline,
                "keyhole serve never became ready"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        gw
    }

    fn runtime_dir(&self) -> PathBuf {
        self.home.path().join("run").join("keyhole")
    }

    fn data_dir(&self) -> PathBuf {
        self.home.path().join("data").join("keyhole")
    }

    fn keyhole(&self, args: &[&str], stdin: &[u8]) -> Output {
        let mut child = Command::new(KEYHOLE)
            .args(args)
            .envs(env(self.home.path()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child.wait_with_output().unwrap()
    }
}

impl Gateway {
    /// Stops the gateway and everything it started (SIGTERM, then SIGKILL after 10 s) and
    /// returns what it wrote to stderr.
    fn stop(mut self) -> String {
        use nix::sys::signal::{Signal, killpg};
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = killpg(group, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = killpg(group, Signal::SIGKILL);
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(self.child.stderr.as_mut().unwrap(), &mut err);
        err
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn env(home: &Path) -> Vec<(String, String)> {
    vec![
        ("HOME".into(), home.display().to_string()),
        (
            "XDG_CONFIG_HOME".into(),
            home.join("config").display().to_string(),
        ),
        (
            "XDG_DATA_HOME".into(),
            home.join("data").display().to_string(),
        ),
        (
            "XDG_RUNTIME_DIR".into(),
            home.join("run").display().to_string(),
        ),
        ("KEYHOLE_LOG".into(), "debug".into()),
    ]
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn forms(value: &[u8]) -> Vec<Vec<u8>> {
    let b64 = base64::engine::general_purpose::STANDARD;
    vec![
        value.to_vec(),
        b64.encode(value).trim_end_matches('=').as_bytes().to_vec(),
        hex::encode(value).into_bytes(),
        hex::encode_upper(value).into_bytes(),
    ]
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn scan_dir(dir: &Path, value: &[u8]) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            scan_dir(&path, value);
        } else if let Ok(bytes) = std::fs::read(&path) {
            for form in forms(value) {
                assert!(
                    !contains(&bytes, &form),
                    "{} holds the value",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn put_then_run_injects_and_redacts() {
    let gw = Gateway::start();
    let value = b"kh-canary-gateway-7d3e2b91aa";
    let put = gw.keyhole(
        &["put", "db/password", "--label", "team=infra"],
        &[value.as_slice(), b"\n"].concat(),
    );
    assert!(put.status.success(), "{}", text(&put));
    let handle = String::from_utf8(put.stdout.clone())
        .unwrap()
        .trim()
        .to_string();
    assert!(handle.starts_with("kh_") && handle.len() >= 29, "{handle}");

    // The child sees the value; the output it prints, in any form, is redacted.
    let script = r#"echo "raw=$DB"; printf %s "$DB" | base64; printf %s "$DB" | od -An -tx1 | tr -d ' \n'; echo; test "$DB" = "kh-canary-gateway-7d3e2b91aa" && echo injected"#;
    let run = gw.keyhole(
        &[
            "run",
            "--env",
            &format!("DB={handle}"),
            "--purpose",
            "test",
            "--",
            "sh",
            "-c",
            script,
        ],
        b"",
    );
    assert!(run.status.success(), "{}", text(&run));
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("raw=[REDACTED]"), "{stdout}");
    assert!(stdout.contains("injected"), "{stdout}");
    for form in forms(value) {
        assert!(
            !contains(&run.stdout, &form),
            "run output leaks a form of the value: {stdout}"
        );
    }

    // The child's exit status is keyhole run's.
    let code = gw.keyhole(
        &[
            "run",
            "--env",
            &format!("X={handle}"),
            "--",
            "sh",
            "-c",
            "exit 7",
        ],
        b"",
    );
    assert_eq!(code.status.code(), Some(7), "{}", text(&code));

    for args in [
        vec!["describe", handle.as_str()],
        vec!["list"],
        vec!["providers"],
    ] {
        let out = gw.keyhole(&args, b"");
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        for form in forms(value) {
            assert!(!contains(&out.stdout, &form));
        }
    }
    let list = gw.keyhole(&["list"], b"");
    assert!(String::from_utf8_lossy(&list.stdout).contains(&handle));

    let audit = gw.keyhole(&["audit", "verify"], b"");
    assert!(audit.status.success(), "{}", text(&audit));
    assert!(String::from_utf8_lossy(&audit.stdout).contains("intact"));

    // Nothing persisted holds the value: the state database, its WAL, the store.
    scan_dir(&gw.data_dir(), value);

    // Nor does anything the gateway logged (at debug level), provider output included.
    let mut gw = gw;
    let _ = gw.child.kill();
    let _ = gw.child.wait();
    let mut log = Vec::new();
    std::io::Read::read_to_end(gw.child.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert!(
        contains(&log, b"provider is up"),
        "{}",
        String::from_utf8_lossy(&log)
    );
    for form in forms(value) {
        assert!(
            !contains(&log, &form),
            "the gateway's log leaks a form of the value"
        );
    }
}

#[test]
fn run_returns_when_its_command_exits_though_a_background_process_keeps_the_output_open() {
    let gw = Gateway::start();
    let put = gw.keyhole(&["put", "bg/token"], b"kh-canary-background-51f0\n");
    assert!(put.status.success(), "{}", text(&put));
    let handle = String::from_utf8(put.stdout.clone())
        .unwrap()
        .trim()
        .to_string();
    let started = Instant::now();
    // The background `sleep` inherits stdout and stderr and outlives the command by far.
    let run = gw.keyhole(
        &[
            "run",
            "--env",
            &format!("T={handle}"),
            "--",
            "sh",
            "-c",
            "sleep 60 & echo \"before $T\"; exit 7",
        ],
        b"",
    );
    let took = started.elapsed();
    assert_eq!(run.status.code(), Some(7), "{}", text(&run));
    assert!(took < Duration::from_secs(30), "keyhole run took {took:?}");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("before [REDACTED]"), "{}", text(&run));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("still holds its output open"),
        "{}",
        text(&run)
    );
    gw.stop();
}

#[test]
fn a_handle_that_does_not_exist_says_so() {
    let gw = Gateway::start();
    let out = gw.keyhole(&["describe", "kh_aaaaaaaaaaaaaaaaaaaaaaaaaa"], b"");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("NotFound") && err.contains("keyhole list"),
        "{err}"
    );
}

#[test]
fn a_second_gateway_in_the_same_home_fails_and_leaves_the_first_reachable() {
    let gw = Gateway::start();
    let second = Command::new(KEYHOLE)
        .arg("serve")
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .envs(env(gw.home.path()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("already in use"), "{err}");
    // Its exit must not take the first gateway's socket or token file with it.
    let runtime = gw.runtime_dir();
    assert!(runtime.join("keyhole.sock").exists(), "socket removed");
    assert!(runtime.join("client.token").exists(), "token file removed");
    let out = gw.keyhole(&["describe", "kh_aaaaaaaaaaaaaaaaaaaaaaaaaa"], b"");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("NotFound"),
        "the first gateway still answers: {err}"
    );
}

#[test]
fn a_stopped_gateways_token_is_gone_before_a_new_gateway_listens() {
    // A stopped gateway's leftovers, and a new gateway whose one provider takes two seconds to
    // fail its handshake, so there is time to look before the new socket appears.
    let home = tempfile::tempdir().unwrap();
    let runtime = home.path().join("run/keyhole");
    std::fs::create_dir_all(&runtime).unwrap();
    std::fs::set_permissions(
        &runtime,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let (socket, token) = (runtime.join("keyhole.sock"), runtime.join("client.token"));
    std::fs::write(&token, "kh-stale-token").unwrap();
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap()); // a socket nobody serves
    let config = home.path().join("keyhole.toml");
    std::fs::write(
        &config,
        "default_provider = \"slow\"\n\
         [providers.slow]\nkind = \"spawn\"\ncommand = \"/bin/sh\"\nargs = [\"-c\", \"sleep 5\"]\n",
    )
    .unwrap();
    let mut gateway = Command::new(KEYHOLE)
        .arg("serve")
        .envs(env(home.path()))
        .env("KEYHOLE_CONFIG", &config)
        .env("KEYHOLE_HANDSHAKE_TIMEOUT_MS", "2000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let gone_early = wait_until(Duration::from_secs(1), || !token.exists());
    let listening = std::os::unix::net::UnixStream::connect(&socket).is_ok();
    // Then the gateway listens (the provider is retried later) and writes a new token.
    wait_until(Duration::from_secs(20), || token.exists());
    let fresh = std::fs::read_to_string(&token).unwrap_or_default();
    let _ = gateway.kill();
    let _ = gateway.wait();
    assert!(gone_early, "the stale token outlived the start");
    assert!(
        !listening,
        "the new socket was up before the provider's handshake ended"
    );
    assert!(
        !fresh.is_empty() && fresh != "kh-stale-token",
        "no fresh token: {fresh:?}"
    );
}

#[test]
fn without_a_gateway_the_cli_says_what_to_do() {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(KEYHOLE)
        .arg("list")
        .envs(env(home.path()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("keyhole serve"), "{err}");
}

/// Polls `done` every 10 ms for up to `within`; whether it came true.
fn wait_until(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Pids of processes whose command line mentions `needle`.
fn pids_mentioning(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat
                .rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
            if !zombie && contains(&cmd, needle.as_bytes()) {
                out.push(pid);
            }
        }
    }
    out
}

#[test]
fn providers_exit_within_two_seconds_of_a_kill_9() {
    let mut gw = Gateway::start();
    let store = gw.data_dir().join("file-store").display().to_string();
    let before = pids_mentioning(&store);
    assert!(!before.is_empty(), "no provider process found for {store}");
    gw.child.kill().unwrap(); // SIGKILL
    let _ = gw.child.wait();
    let killed = Instant::now();
    while !pids_mentioning(&store).is_empty() {
        assert!(
            killed.elapsed() < Duration::from_secs(2),
            "the provider outlived the gateway by 2 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Tampers with the audit table the way an attacker with file access would: around the
/// append-only triggers.
fn tamper(db: &Path, sql: &str) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let triggers: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'audit'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for t in triggers {
        conn.execute_batch(&format!("DROP TRIGGER {t}")).unwrap();
    }
    conn.execute_batch(sql).unwrap();
}

#[test]
fn audit_verify_fails_and_names_the_first_broken_record() {
    let cases = [
        (
            "a changed record",
            "UPDATE audit SET outcome = 'denied', who = 'uid:4242' WHERE seq = 2",
        ),
        ("a deleted record", "DELETE FROM audit WHERE seq = 2"),
        (
            "reordered records",
            "UPDATE audit SET seq = 1000000 WHERE seq = 2; UPDATE audit SET seq = 2 WHERE seq = 3; \
             UPDATE audit SET seq = 3 WHERE seq = 1000000",
        ),
    ];
    for (what, sql) in cases {
        let gw = Gateway::start();
        for _ in 0..4 {
            assert!(gw.keyhole(&["list"], b"").status.success());
        }
        assert!(gw.keyhole(&["audit", "verify"], b"").status.success());
        tamper(&gw.data_dir().join("state.db"), sql);
        let out = gw.keyhole(&["audit", "verify"], b"");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{what}: {}", text(&out));
        // The first damaged record is named: record 2 itself, or (after a deletion) the record
        // that now follows a gap, with the missing one named in the reason.
        assert!(
            stdout.contains("BROKEN at record") && stdout.contains("record 2"),
            "{what}: {stdout}"
        );
    }
}

#[test]
fn without_a_secret_service_the_defaults_pick_the_file_store_and_say_why() {
    let gw = Gateway::start();
    let out = gw.keyhole(&["providers"], b"");
    assert!(out.status.success(), "{}", text(&out));
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(listed.contains("file"), "{listed}");
    assert!(!listed.contains("keychain"), "{listed}");
    let err = gw.stop();
    assert!(
        err.contains("default provider: file, because there is no D-Bus session bus"),
        "{err}"
    );
}

/// Whether the desktop keyring tools are here; on CI they must be (.ci/run installs them).
fn have_keyring_tools() -> bool {
    let have = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let ok = have("dbus-run-session") && have("gnome-keyring-daemon");
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI needs dbus-run-session and gnome-keyring-daemon: apt-get install dbus gnome-keyring"
        );
        eprintln!("SKIPPED: dbus-run-session or gnome-keyring-daemon is not installed");
    }
    ok
}

#[test]
fn with_a_secret_service_the_defaults_pick_the_keychain_and_secrets_go_there() {
    if !have_keyring_tools() {
        return;
    }
    let home = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let gw = Gateway::start_in_keyring_session(home.clone());
    let value = b"kh-keychain-default-canary-5e0c1d";
    let put = gw.keyhole(&["put", "app/token"], value);
    assert!(put.status.success(), "{}", text(&put));
    let handle = String::from_utf8_lossy(&put.stdout).trim().to_owned();
    let out = gw.keyhole(&["providers"], b"");
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(listed.contains("keychain"), "{listed}");
    let run = gw.keyhole(
        &[
            "run",
            "--env",
            &format!("TOKEN={handle}"),
            "--",
            "sh",
            "-c",
            "test \"$TOKEN\" = kh-keychain-default-canary-5e0c1d && echo same",
        ],
        b"",
    );
    assert!(run.status.success(), "{}", text(&run));
    assert!(String::from_utf8_lossy(&run.stdout).contains("same"));
    // The value went to the keyring (its files live under the private HOME), not to a file
    // store: the gateway made none.
    assert!(!gw.data_dir().join("file-store").exists());
    let err = gw.stop();
    assert!(
        err.contains("default provider: keychain, because a Secret Service answered"),
        "{err}"
    );

    // Started again without a session bus (as when the gateway comes up before the desktop
    // session), it keeps the first choice instead of sending new secrets to a file store.
    let again = Gateway::start_in(home);
    let out = again.keyhole(&["providers"], b"");
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(listed.contains("keychain"), "{}", text(&out));
    assert!(!again.data_dir().join("file-store").exists());
    let err = again.stop();
    assert!(
        err.contains("default provider: keychain, because it was chosen when this data directory"),
        "{err}"
    );
}
