//! The provider process's life cycle: spawn mode, connect mode, and no orphans.

#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keyhole_protocol::{Encoding, Op, Outcome, Reply, TOKEN_ENV};
use keyhole_transport::client::{Client, HelloOptions, handshake};
use keyhole_transport::socket::{self, PrivateDir};
use keyhole_transport::spawn::{SpawnOptions, spawn};

const BIN: &str = env!("CARGO_BIN_EXE_keyhole-provider-memory");

fn client(conn: keyhole_transport::spawn::Connection) -> Client {
    let (tx, _rx) = keyhole_transport::client::event_channel();
    Client::start(conn.reader, conn.writer, conn.ack, tx)
}

#[tokio::test]
async fn exits_cleanly_when_the_connection_closes() {
    let (mut process, conn) = spawn(&SpawnOptions::new(
        BIN,
        Vec::<String>::new(),
        Encoding::Bincode,
    ))
    .await
    .unwrap();
    let c = client(conn);
    assert!(matches!(
        c.call(Op::Health {}, Duration::from_secs(5)).await.unwrap(),
        Outcome::Ok(Reply::Health(_))
    ));
    drop(c);
    let status = process
        .wait_exit(Duration::from_secs(2))
        .await
        .expect("no exit within 2 s");
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn exits_when_its_host_is_killed() {
    // The provider's parent is a shell standing in for the gateway; the test holds the other end
    // of the connection, so only the parent's death can make the provider leave.
    let dir = PrivateDir::new().unwrap();
    let path = dir.socket_path();
    let listener = socket::listen(&path).await.unwrap();
    let token = keyhole_transport::generate_token().unwrap();
    let mut host = Command::new("sh")
        .arg("-c")
        .arg("\"$0\" --connect \"$1\"; sleep 60")
        .arg(BIN)
        .arg(&path)
        .env(TOKEN_ENV, token.expose())
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    use interprocess_accept::accept;
    let stream = tokio::time::timeout(Duration::from_secs(5), accept(&listener))
        .await
        .unwrap()
        .unwrap();
    let (r, w) = socket::into_halves(stream);
    let (reader, writer, ack) = handshake(
        r,
        w,
        &HelloOptions::new(token, Encoding::Json),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let (tx, _rx) = keyhole_transport::client::event_channel();
    let c = Client::start(reader, writer, ack, tx);
    assert!(c.closed().is_none());

    let killed = Instant::now();
    host.kill().unwrap(); // SIGKILL
    let _ = host.wait();
    let closed = c.wait_closed(Duration::from_secs(2)).await;
    assert!(
        closed.is_some(),
        "the provider outlived its host by more than 2 s"
    );
    assert!(killed.elapsed() < Duration::from_secs(2));
}

mod interprocess_accept {
    use interprocess::local_socket::tokio::{Listener, Stream};
    use interprocess::local_socket::traits::tokio::Listener as _;

    pub async fn accept(l: &Listener) -> std::io::Result<Stream> {
        l.accept().await
    }
}

#[test]
fn connect_mode_without_a_token_says_what_to_do() {
    let out = Command::new(BIN)
        .args(["--connect", "/nonexistent/s"])
        .env_remove(TOKEN_ENV)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(TOKEN_ENV), "{stderr}");
}

#[test]
fn listen_mode_refuses_a_token_file_others_can_read() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "secret-token\n").unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let sock_dir = PrivateDir::new().unwrap();
    let out = Command::new(BIN)
        .arg("--listen")
        .arg(sock_dir.socket_path())
        .arg("--token-file")
        .arg(&token_file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("chmod 600"), "{stderr}");
    assert!(!stderr.contains("secret-token"), "{stderr}");
}

#[tokio::test]
async fn listen_mode_serves_many_gateways_and_cleans_up_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    let token = keyhole_transport::generate_token().unwrap();
    std::fs::write(&token_file, format!("{}\n", token.expose())).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let sock_dir = PrivateDir::new().unwrap();
    let path = sock_dir.path().join("sub").join("provider.sock");
    let mut child = tokio::process::Command::new(BIN)
        .arg("--listen")
        .arg(&path)
        .arg("--token-file")
        .arg(&token_file)
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !path.exists() {
        assert!(Instant::now() < deadline, "socket never appeared");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    let dir_mode = std::fs::metadata(path.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!((mode, dir_mode), (0o600, 0o700));

    // Two gateways at once share the provider's state.
    let mut clients = Vec::new();
    for encoding in Encoding::ALL {
        let stream = socket::connect(&path).await.unwrap();
        let (r, w) = socket::into_halves(stream);
        let (reader, writer, ack) = handshake(
            r,
            w,
            &HelloOptions::new(token.clone(), encoding),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        let (tx, _rx) = keyhole_transport::client::event_channel();
        clients.push(Client::start(reader, writer, ack, tx));
    }
    let store = Op::Store {
        name: "shared".into(),
        value: keyhole_protocol::SecretBytes::copy_from(b"v"),
        create_only: false,
        labels: Default::default(),
    };
    assert!(matches!(
        clients[0]
            .call(store, Duration::from_secs(5))
            .await
            .unwrap(),
        Outcome::Ok(_)
    ));
    let got = clients[1]
        .call(
            Op::Resolve {
                name: "shared".into(),
                version: None,
            },
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert!(
        matches!(got, Outcome::Ok(Reply::Resolved { ref value, .. }) if value.expose() == b"v")
    );

    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(!path.exists(), "the socket file was left behind");
}
