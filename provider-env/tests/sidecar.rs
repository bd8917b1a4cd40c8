//! Sidecar mode: `--listen SOCKET --token-file F`, dialled by gateways as `keyhole serve` dials a
//! `kind = "connect"` provider.

#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

mod common;

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::Duration;

use keyhole_protocol::{Change, Encoding, Op, Outcome, Reply};
use keyhole_transport::socket::PrivateDir;
use tokio::io::AsyncReadExt;

use common::{Kubelet, connect_listening, expected_version, leaks, random_hex, unique_prefix};

fn resolve(name: &str) -> Op {
    Op::Resolve {
        name: name.into(),
        version: None,
    }
}

#[tokio::test]
async fn listen_mode_serves_gateways_env_and_dir_secrets_and_watches() {
    let prefix = unique_prefix();
    let env_value = format!("kh-sidecar-canary-{}", random_hex(8));
    let mut kubelet = Kubelet::new();
    kubelet.publish(&[("password", b"dir-value-one")]);

    let tmp = tempfile::tempdir().unwrap();
    let token = keyhole_transport::generate_token().unwrap();
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, format!("{}\n", token.expose())).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let sock_dir = PrivateDir::new().unwrap();
    let socket = sock_dir.path().join("keyhole").join("env.sock");

    let spec = OsString::from(format!("db/={}", kubelet.path().display()));
    let mut child = tokio::process::Command::new(common::BIN)
        .arg("--listen")
        .arg(&socket)
        .arg("--token-file")
        .arg(&token_file)
        .args([OsString::from("--env-prefix"), prefix.clone().into()])
        .args([OsString::from("--dir"), spec])
        .env(format!("{prefix}API_KEY"), &env_value)
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // Two gateways at once, one per encoding.
    let (a, _) = connect_listening(&socket, token.clone(), Encoding::Bincode).await;
    let (b, mut events) = connect_listening(&socket, token.clone(), Encoding::Json).await;
    assert_eq!(a.ack().provider.name, "env");
    let caps = &a.ack().capabilities;
    assert!(!caps.store && !caps.rotate && !caps.revoke && caps.list && caps.watch);
    for client in [&a, &b] {
        match client.call(resolve("api/key"), common::CALL).await.unwrap() {
            Outcome::Ok(Reply::Resolved { value, version }) => {
                assert_eq!(value.expose(), env_value.as_bytes());
                assert_eq!(version, expected_version("api/key", env_value.as_bytes()));
            }
            other => panic!("resolve answered {other:?}"),
        }
        match client
            .call(resolve("db/password"), common::CALL)
            .await
            .unwrap()
        {
            Outcome::Ok(Reply::Resolved { value, .. }) => {
                assert_eq!(value.expose(), b"dir-value-one")
            }
            other => panic!("resolve answered {other:?}"),
        }
    }

    // A watch on one connection sees the kubelet's update.
    let pending = b
        .start_call(
            Op::Watch {
                prefix: "db/".into(),
            },
            common::CALL,
        )
        .await
        .unwrap();
    let id = pending.id;
    assert!(matches!(
        b.finish(pending).await.unwrap(),
        Outcome::Ok(Reply::Watching {})
    ));
    kubelet.publish(&[("password", b"dir-value-two")]);
    let ev = tokio::time::timeout(Duration::from_secs(2), events.recv())
        .await
        .expect("no event within 2 s")
        .unwrap();
    assert_eq!(ev.watch_id, id);
    assert_eq!(
        (ev.name.as_str(), ev.change),
        ("db/password", Change::Updated)
    );
    match a.call(resolve("db/password"), common::CALL).await.unwrap() {
        Outcome::Ok(Reply::Resolved { value, version }) => {
            assert_eq!(value.expose(), b"dir-value-two");
            assert_eq!(ev.version, Some(version));
        }
        other => panic!("resolve answered {other:?}"),
    }
    // A wrong token is turned away.
    let stream = keyhole_transport::socket::connect(&socket).await.unwrap();
    let (r, w) = keyhole_transport::socket::into_halves(stream);
    let wrong = keyhole_protocol::Token::new("not-the-token".into());
    assert!(
        keyhole_transport::client::handshake(
            r,
            w,
            &keyhole_transport::client::HelloOptions::new(wrong, Encoding::Json),
            Duration::from_secs(5),
        )
        .await
        .is_err()
    );

    // SIGTERM: exit 0, the socket removed; nothing secret on stderr.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(!socket.exists(), "the socket file was left behind");
    let mut stderr = Vec::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_end(&mut stderr)
        .await
        .unwrap();
    for value in [env_value.as_bytes(), b"dir-value-one", b"dir-value-two"] {
        assert!(
            !leaks(&stderr, value),
            "{}",
            String::from_utf8_lossy(&stderr)
        );
    }
    assert!(!leaks(&stderr, token.expose().as_bytes()));
}
