//! The Kubernetes sidecar topology of deploy/kubernetes/, run locally with the same commands:
//! `keyhole-provider-env --listen` over a kubelet-style Secret directory, `keyhole serve` dialling
//! it in connect mode, and an "app" that holds only handles and resolves through the gateway's
//! client socket (`keyhole link`, then `keyhole run`).

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const KEYHOLE: &str = env!("CARGO_BIN_EXE_keyhole");

/// Kills a child on drop, so a failed assertion leaves no process behind.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Publishes `files` as the kubelet does: a fresh `..<generation>` directory, then an atomic
/// rename of the `..data` link onto it, with per-key links through `..data`.
fn kubelet_publish(dir: &Path, generation: &str, files: &[(&str, &str)]) {
    let target = format!("..{generation}");
    std::fs::create_dir(dir.join(&target)).unwrap();
    for (key, value) in files {
        std::fs::write(dir.join(&target).join(key), value).unwrap();
        let link = dir.join(key);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(format!("..data/{key}"), &link).unwrap();
        }
    }
    let tmp = dir.join("..data_tmp");
    symlink(&target, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
}

fn wait_for(path: &Path, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited with {status} before it was ready");
        }
        assert!(Instant::now() < deadline, "{what} never became ready");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

struct Pod {
    root: tempfile::TempDir,
    _provider: Running,
    _gateway: Running,
}

impl Pod {
    fn secrets(&self) -> PathBuf {
        self.root.path().join("etc-app-secrets")
    }

    fn config(&self) -> PathBuf {
        self.root.path().join("keyhole.toml")
    }

    /// A `keyhole` command as the app container runs it: it has the config and the client
    /// socket's directory, and nothing else of the sidecar's.
    fn app(&self, args: &[&str]) -> Output {
        Command::new(KEYHOLE)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("KEYHOLE_CONFIG", self.config())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
}

fn start_pod(files: &[(&str, &str)]) -> Pod {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let secrets = r.join("etc-app-secrets");
    std::fs::create_dir(&secrets).unwrap();
    kubelet_publish(&secrets, "2026_11_22_00_00_00.1", files);

    // The init container: a one-time token, 0600 in a 0700 directory.
    let token_dir = r.join("run-keyhole-provider/token");
    std::fs::create_dir_all(&token_dir).unwrap();
    std::fs::set_permissions(&token_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let token_file = token_dir.join("env.token");
    std::fs::write(&token_file, "f00dfeed0123456789abcdef0123456789abcdef").unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let socket = r.join("run-keyhole-provider/sock/env.sock");

    let mut provider = Command::new(common::workspace_bin("keyhole-provider-env"))
        .arg("--no-env")
        .arg("--dir")
        .arg(format!("db/={}", secrets.display()))
        .arg("--listen")
        .arg(&socket)
        .arg("--token-file")
        .arg(&token_file)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&socket, &mut provider, "keyhole-provider-env");
    let provider = Running(provider);

    let client_dir = r.join("run-keyhole-client/gateway");
    let config = r.join("keyhole.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{data}\"\nruntime_dir = \"{client}\"\ndefault_provider = \"env\"\n\n\
             [providers.env]\nkind = \"connect\"\nsocket = \"{socket}\"\ntoken_file = \"{token}\"\n",
            data = r.join("var-lib-keyhole").display(),
            client = client_dir.display(),
            socket = socket.display(),
            token = token_file.display(),
        ),
    )
    .unwrap();
    let mut gateway = Command::new(KEYHOLE)
        .arg("serve")
        .env("KEYHOLE_CONFIG", &config)
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        &client_dir.join("client.token"),
        &mut gateway,
        "keyhole serve",
    );
    Pod {
        root,
        _provider: provider,
        _gateway: Running(gateway),
    }
}

#[test]
fn an_app_resolves_a_mounted_secret_through_the_sidecar_and_sees_each_kubelet_update() {
    let first = "kh-sidecar-canary-first-7f3a9c";
    let pod = start_pod(&[("password", first), ("api-key", "kh-sidecar-api-1")]);

    let providers = pod.app(&["providers"]);
    assert!(providers.status.success(), "{}", text(&providers));
    let listed = String::from_utf8_lossy(&providers.stdout).into_owned();
    assert!(listed.contains("env"), "{listed}");

    // The app links the mounted key to a handle: it never names a file or holds a value.
    let link = pod.app(&["link", "db/password", "--provider", "env"]);
    assert!(link.status.success(), "{}", text(&link));
    let handle = String::from_utf8_lossy(&link.stdout).trim().to_owned();
    assert!(handle.starts_with("kh_"), "{handle}");

    let check = |expected: &str| {
        let script = format!(
            "test \"$DB_PASSWORD\" = '{expected}' && echo matched; echo \"leak: $DB_PASSWORD\""
        );
        let out = pod.app(&[
            "run",
            "--purpose",
            "sidecar test",
            "--env",
            &format!("DB_PASSWORD={handle}"),
            "--",
            "sh",
            "-c",
            &script,
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{}", text(&out));
        assert!(stdout.contains("matched"), "{}", text(&out));
        assert!(
            !stdout.contains(expected),
            "the value reached the app's output"
        );
        assert!(stdout.contains("[REDACTED]"), "{stdout}");
    };
    check(first);

    // The kubelet publishes a new version of the Secret; the same handle resolves it.
    let second = "kh-sidecar-canary-second-81d2e0";
    kubelet_publish(
        &pod.secrets(),
        "2026_11_22_00_05_00.2",
        &[("password", second), ("api-key", "kh-sidecar-api-2")],
    );
    check(second);

    // A key the Secret does not have cannot be linked.
    let missing = pod.app(&["link", "db/nope", "--provider", "env"]);
    assert!(!missing.status.success(), "{}", text(&missing));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("NotFound")
            || String::from_utf8_lossy(&missing.stderr).contains("not found"),
        "{}",
        text(&missing)
    );

    // The env provider is read-only: the gateway passes its refusal through.
    let rotate = Command::new(KEYHOLE)
        .args(["rotate", &handle])
        .env("KEYHOLE_CONFIG", pod.config())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    let mut rotate = rotate;
    rotate
        .stdin
        .take()
        .unwrap()
        .write_all(b"kh-sidecar-other")
        .unwrap();
    let out = rotate.wait_with_output().unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Unsupported")
            || String::from_utf8_lossy(&out.stderr).contains("unsupported"),
        "{}",
        text(&out)
    );

    // Nothing the gateway persisted holds either value.
    for value in [first, second] {
        for entry in walk(&pod.root.path().join("var-lib-keyhole")) {
            let bytes = std::fs::read(&entry).unwrap();
            assert!(
                !bytes.windows(value.len()).any(|w| w == value.as_bytes()),
                "{} holds a value",
                entry.display()
            );
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
