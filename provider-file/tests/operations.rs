//! The store's life between processes and its maintenance commands: what persists across
//! restarts, `rewrap` to a new key or a passphrase, `backup`, `verify`, and connect mode.

#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

mod common;

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use keyhole_protocol::{Encoding, ErrorCode, Op, Outcome, Reply, SecretState};
use keyhole_transport::client::{Client, HelloOptions, handshake};
use keyhole_transport::socket::{self, PrivateDir};

use common::{FAST_ARGON2, Secret, TestStore};

const WRONG: &str = "wrong key or passphrase";

fn with_secret(mut args: Vec<OsString>, secret: &Secret) -> Vec<OsString> {
    args.extend(secret.args());
    args
}

fn verify_args(dir: &Path, secret: &Secret) -> Vec<OsString> {
    with_secret(vec!["verify".into(), dir.into()], secret)
}

/// Runs `verify` and returns the number of records it reports, all intact.
async fn verified(dir: &Path, secret: &Secret) -> usize {
    let run = common::cli(verify_args(dir, secret)).await.ok();
    let line = run
        .stdout
        .lines()
        .find(|l| l.starts_with("verified "))
        .unwrap_or_else(|| panic!("no summary line\n{}", run.show()));
    let n = line
        .strip_prefix("verified ")
        .and_then(|r| r.strip_suffix(" records, 0 damaged"))
        .unwrap_or_else(|| panic!("unexpected summary {line:?}"));
    n.parse().unwrap()
}

fn serve_dir_args(dir: &Path, secret: &Secret) -> Vec<OsString> {
    with_secret(vec!["--store".into(), dir.into()], secret)
}

async fn serve_dir(dir: &Path, secret: &Secret) -> common::Served {
    common::try_serve_with(serve_dir_args(dir, secret), &[], Encoding::Json)
        .await
        .unwrap_or_else(|e| panic!("the provider did not start: {e}"))
}

/// `a` at versions 1 and 2, `b` at 1, `gone` revoked.
async fn populate(store: &TestStore) {
    let served = common::serve(store, &[]).await;
    let c = &served.client;
    assert_eq!(common::store(c, "a", b"a-one").await, "1");
    assert_eq!(common::rotate(c, "a", b"a-two").await, "2");
    assert_eq!(common::store(c, "b", &[0, 255, 1, 254]).await, "1");
    common::store(c, "gone", b"gone-one").await;
    common::revoke(c, "gone").await;
    served.stop().await;
}

/// What `populate` wrote is all there.
async fn assert_populated(c: &Client) {
    common::assert_resolves(c, "a", None, b"a-two").await;
    common::assert_resolves(c, "a", Some("2"), b"a-two").await;
    common::assert_resolves(c, "a", Some("1"), b"a-one").await;
    common::assert_resolves(c, "b", Some("1"), &[0, 255, 1, 254]).await;
    common::expect_err(
        common::resolve(c, "gone", None).await,
        ErrorCode::Revoked,
        "revoked name",
    );
}

#[tokio::test]
async fn state_persists_across_restarts() {
    let store = common::key_store().await;
    {
        let served = common::serve(&store, &[]).await;
        let caps = &served.client.ack().capabilities;
        assert!(caps.store && caps.rotate && caps.revoke && caps.list && !caps.watch);
        assert_eq!(caps.versions_kept, 10);
        let c = &served.client;
        let labels = [("team".to_string(), "infra".to_string())].into();
        let op = Op::Store {
            name: "labelled".into(),
            value: common::value(b"x"),
            create_only: true,
            labels,
        };
        assert!(matches!(common::call(c, op).await, Outcome::Ok(_)));
        served.stop().await;
    }
    populate(&store).await;

    let served = common::serve(&store, &["--versions-kept", "3"]).await;
    let c = &served.client;
    assert_eq!(c.ack().capabilities.versions_kept, 3);
    assert_populated(c).await;
    let d = common::describe(c, "labelled").await;
    assert_eq!(d.labels.get("team").map(String::as_str), Some("infra"));
    let d = common::describe(c, "gone").await;
    assert_eq!((d.state, d.current_version), (SecretState::Revoked, None));
    common::expect_err(
        common::resolve(c, "gone", Some("1")).await,
        ErrorCode::Revoked,
        "pinned resolve of a revoked name after a restart",
    );
    let create_only = Op::Store {
        name: "gone".into(),
        value: common::value(b"x"),
        create_only: true,
        labels: Default::default(),
    };
    common::expect_err(
        common::call(c, create_only).await,
        ErrorCode::AlreadyExists,
        "create_only on a revoked name",
    );
    // Counters continue; rotate after revoke restores and never reuses a version.
    assert_eq!(common::rotate(c, "gone", b"gone-two").await, "2");
    common::assert_resolves(c, "gone", None, b"gone-two").await;
    let e = common::resolve(c, "gone", Some("1")).await;
    assert!(
        matches!(&e, Outcome::Err(e) if matches!(e.code, ErrorCode::Revoked | ErrorCode::VersionUnavailable)),
        "a version from before the revoke is readable again: {e:?}"
    );
    for v in 3..=6 {
        assert_eq!(
            common::rotate(c, "a", format!("a-{v}").as_bytes()).await,
            v.to_string()
        );
    }
    served.stop().await;

    // The history limit applies to what was kept on disk.
    let served = common::serve(&store, &["--versions-kept", "3"]).await;
    let c = &served.client;
    for v in 4..=6 {
        common::assert_resolves(c, "a", Some(&v.to_string()), format!("a-{v}").as_bytes()).await;
    }
    for v in 1..=3 {
        common::expect_err(
            common::resolve(c, "a", Some(&v.to_string())).await,
            ErrorCode::VersionUnavailable,
            &format!("a@{v} beyond versions_kept 3"),
        );
    }
    let expected = common::call(
        c,
        Op::Rotate {
            name: "a".into(),
            value: common::value(b"stale"),
            expected_version: Some("5".into()),
        },
    )
    .await;
    common::expect_err(expected, ErrorCode::Conflict, "stale expected_version");
    common::expect_err(
        common::resolve(c, "never", None).await,
        ErrorCode::NotFound,
        "never stored",
    );
}

#[tokio::test]
async fn rewrap_to_a_new_key_file() {
    let store = common::key_store().await;
    populate(&store).await;
    let new_key = store.path("new.key");
    let mut args = vec!["rewrap".into(), "--store".into(), store.dir.clone().into()];
    args = with_secret(args, &store.secret);
    args.extend([
        "--new-key-file".into(),
        new_key.clone().into(),
        "--generate-key".into(),
    ]);
    common::cli(&args).await.ok();
    assert_eq!(std::fs::read(&new_key).unwrap().len(), 32);
    assert_eq!(common::mode_of(&new_key), 0o600);

    let new = Secret::KeyFile(new_key);
    let served = serve_dir(&store.dir, &new).await;
    assert_populated(&served.client).await;
    served.stop().await;
    assert!(verified(&store.dir, &new).await >= 2);

    let message = common::serve_fails(store.serve_args()).await;
    assert!(message.contains(WRONG), "{message}");
    common::cli(verify_args(&store.dir, &store.secret))
        .await
        .fails_with(WRONG);
    // Rewrapping again from the old key fails the same way and changes nothing.
    let again = store.path("third.key");
    let mut args = vec!["rewrap".into(), "--store".into(), store.dir.clone().into()];
    args = with_secret(args, &store.secret);
    args.extend([
        "--new-key-file".into(),
        again.into(),
        "--generate-key".into(),
    ]);
    common::cli(&args).await.fails_with(WRONG);
    let served = serve_dir(&store.dir, &new).await;
    assert_populated(&served.client).await;
}

#[tokio::test]
async fn a_provider_running_through_a_rewrap_answers_list_as_rekeyed() {
    let store = common::key_store().await;
    let served = common::serve(&store, &[]).await;
    common::store(&served.client, "a", b"before rewrap").await;
    let list = || Op::List {
        prefix: String::new(),
        page: None,
        limit: 0,
    };
    assert!(matches!(
        common::call(&served.client, list()).await,
        Outcome::Ok(Reply::Listed { entries, .. }) if entries.len() == 1
    ));
    let mut args = vec!["rewrap".into(), "--store".into(), store.dir.clone().into()];
    args = with_secret(args, &store.secret);
    args.extend([
        "--new-key-file".into(),
        store.path("new.key").into(),
        "--generate-key".into(),
    ]);
    common::cli(&args).await.ok();
    // The generation it listed is gone: it follows the header to the new one, which its key
    // does not open, and says so, as Resolve does.
    let resolve = Op::Resolve {
        name: "a".into(),
        version: None,
    };
    for op in [list(), resolve] {
        let e = common::expect_err(
            common::call(&served.client, op).await,
            ErrorCode::Unauthenticated,
            "after a rewrap by another process",
        );
        assert!(e.message.contains("re-keyed"), "{}", e.message);
    }
    served.stop().await;
}

#[tokio::test]
async fn rewrap_from_a_key_file_to_a_passphrase_and_back() {
    let store = common::key_store().await;
    populate(&store).await;
    let pass = store.path("pass");
    common::write_file(&pass, b"a long passphrase\n", 0o600);
    let mut args = vec!["rewrap".into(), "--store".into(), store.dir.clone().into()];
    args = with_secret(args, &store.secret);
    args.extend(["--new-passphrase-file".into(), pass.clone().into()]);
    args.extend(FAST_ARGON2.iter().map(OsString::from));
    common::cli(&args).await.ok();

    let pass = Secret::Passphrase(pass);
    let served = serve_dir(&store.dir, &pass).await;
    assert_populated(&served.client).await;
    // Writes under the new key survive too.
    common::store(&served.client, "c", b"after rewrap").await;
    served.stop().await;
    // The old key no longer opens it: a key file for a passphrase store is named as the wrong
    // kind of secret.
    common::cli(verify_args(&store.dir, &store.secret))
        .await
        .fails_with("--passphrase-file");
    let message = common::serve_fails(store.serve_args()).await;
    assert!(message.contains("--passphrase-file"), "{message}");

    // And back to a key file.
    let key = store.path("back.key");
    let mut args = vec!["rewrap".into(), "--store".into(), store.dir.clone().into()];
    args = with_secret(args, &pass);
    args.extend([
        "--new-key-file".into(),
        key.clone().into(),
        "--generate-key".into(),
    ]);
    common::cli(&args).await.ok();
    let key = Secret::KeyFile(key);
    let served = serve_dir(&store.dir, &key).await;
    assert_populated(&served.client).await;
    common::assert_resolves(&served.client, "c", None, b"after rewrap").await;
    served.stop().await;
    common::cli(verify_args(&store.dir, &pass))
        .await
        .fails_with("--key-file");
    // The first key is a key file of the right size, and still the wrong key.
    common::cli(verify_args(&store.dir, &store.secret))
        .await
        .fails_with(WRONG);
    let message = common::serve_fails(store.serve_args()).await;
    assert!(message.contains(WRONG), "{message}");
}

#[tokio::test]
async fn rewrap_from_one_passphrase_to_another() {
    let store = common::passphrase_store("the old passphrase").await;
    populate(&store).await;
    let new = store.path("new-pass");
    common::write_file(&new, b"the new passphrase\n", 0o600);
    let mut args = vec!["rewrap".into(), "--store".into(), store.dir.clone().into()];
    args = with_secret(args, &store.secret);
    args.extend(["--new-passphrase-file".into(), new.clone().into()]);
    args.extend(FAST_ARGON2.iter().map(OsString::from));
    common::cli(&args).await.ok();
    let new = Secret::Passphrase(new);
    let served = serve_dir(&store.dir, &new).await;
    assert_populated(&served.client).await;
    served.stop().await;
    let message = common::serve_fails(store.serve_args()).await;
    assert!(message.contains(WRONG), "{message}");
    common::cli(verify_args(&store.dir, &store.secret))
        .await
        .fails_with(WRONG);
}

#[tokio::test]
async fn a_backup_keeps_the_values_it_was_taken_with() {
    let store = common::key_store().await;
    populate(&store).await;
    let backup = store.path("backup");

    // Taken while a provider is connected to the store.
    let running = common::serve(&store, &[]).await;
    let run = common::cli([
        OsString::from("backup"),
        "--store".into(),
        store.dir.clone().into(),
        "--to".into(),
        backup.clone().into(),
    ])
    .await
    .ok();
    assert!(backup.join("header.json").exists(), "{}", run.show());

    // The original moves on.
    let c = &running.client;
    common::rotate(c, "a", b"a-three").await;
    common::revoke(c, "b").await;
    common::store(c, "new", b"only in the original").await;
    running.stop().await;

    let served = serve_dir(&backup, &store.secret).await;
    let c = &served.client;
    assert_populated(c).await;
    common::assert_resolves(c, "b", None, &[0, 255, 1, 254]).await;
    assert_eq!(
        common::describe(c, "a").await.current_version.as_deref(),
        Some("2")
    );
    common::expect_err(
        common::resolve(c, "new", None).await,
        ErrorCode::NotFound,
        "a name stored after the backup",
    );
    served.stop().await;
    assert!(verified(&backup, &store.secret).await >= 2);

    // The original has its own state.
    let served = common::serve(&store, &[]).await;
    common::assert_resolves(&served.client, "a", None, b"a-three").await;
    common::expect_err(
        common::resolve(&served.client, "b", None).await,
        ErrorCode::Revoked,
        "b in the original",
    );
    served.stop().await;

    // The target must not exist.
    common::cli([
        OsString::from("backup"),
        "--store".into(),
        store.dir.clone().into(),
        "--to".into(),
        backup.clone().into(),
    ])
    .await
    .fails();
}

#[tokio::test]
async fn verify_of_an_intact_store_counts_its_records() {
    let store = common::key_store().await;
    let served = common::serve(&store, &[]).await;
    for name in ["one", "two", "three"] {
        common::store(&served.client, name, name.as_bytes()).await;
    }
    common::rotate(&served.client, "two", b"two again").await;
    common::rotate(&served.client, "two", b"two thrice").await;
    served.stop().await;
    assert_eq!(verified(&store.dir, &store.secret).await, 3);

    let store = common::passphrase_store("pp").await;
    assert_eq!(verified(&store.dir, &store.secret).await, 0);
}

#[tokio::test]
async fn connect_mode_serves_several_gateways_on_one_store() {
    let store = common::key_store().await;
    populate(&store).await;
    let token = keyhole_transport::generate_token().unwrap();
    let token_file = store.path("token");
    common::write_file(
        &token_file,
        format!("{}\n", token.expose()).as_bytes(),
        0o600,
    );
    let sock_dir = PrivateDir::new().unwrap();
    let path = sock_dir.path().join("p.sock");
    let mut args = store.serve_args();
    args.extend(["--listen".into(), path.clone().into()]);
    args.extend(["--token-file".into(), token_file.into()]);
    let mut child = tokio::process::Command::new(common::BIN)
        .args(&args)
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    common::eventually(Duration::from_secs(10), "the socket appears", || {
        path.exists()
    })
    .await;

    let mut clients = Vec::new();
    for encoding in Encoding::ALL {
        let stream = socket::connect(&path).await.unwrap();
        let (r, w) = socket::into_halves(stream);
        let (reader, writer, ack) = handshake(
            r,
            w,
            &HelloOptions::new(token.clone(), encoding),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        let (tx, _rx) = keyhole_transport::client::event_channel();
        clients.push(Client::start(reader, writer, ack, tx));
    }
    assert_populated(&clients[0]).await;
    common::store(&clients[0], "via-listen", b"shared").await;
    common::assert_resolves(&clients[1], "via-listen", None, b"shared").await;

    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("no exit within 10 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(!path.exists(), "the socket file was left behind");
}

#[tokio::test]
async fn names_never_become_paths_and_nothing_is_left_behind() {
    let store = common::key_store().await;
    let served = common::serve(&store, &[]).await;
    let names = [
        "../escape",
        "/etc/passwd",
        ".",
        "..",
        "a/b/c",
        "gen-1",
        "header.json",
        "lock",
        "with space",
        "ünïcødé/名前",
        "back\\slash",
    ];
    for (i, name) in names.iter().enumerate() {
        common::store(&served.client, name, format!("value {i}").as_bytes()).await;
    }
    common::rotate(&served.client, "a/b/c", b"again").await;
    common::revoke(&served.client, "lock").await;
    served.stop().await;
    common::assert_clean_layout(&store);
    assert_eq!(store.record_files().len(), names.len());
    assert!(!store.tmp.path().join("escape").exists());

    let served = common::serve(&store, &[]).await;
    for (i, name) in names.iter().enumerate() {
        if *name == "a/b/c" {
            common::assert_resolves(&served.client, name, None, b"again").await;
        } else if *name != "lock" {
            common::assert_resolves(&served.client, name, None, format!("value {i}").as_bytes())
                .await;
        }
    }
}

#[tokio::test]
async fn a_provider_running_during_a_rewrap_refuses_instead_of_mixing_keys() {
    let store = common::key_store().await;
    populate(&store).await;
    let old = common::serve(&store, &[]).await;
    common::assert_resolves(&old.client, "a", None, b"a-two").await;

    let new_key = store.path("new.key");
    let mut args = vec!["rewrap".into(), "--store".into(), store.dir.clone().into()];
    args = with_secret(args, &store.secret);
    args.extend([
        "--new-key-file".into(),
        new_key.clone().into(),
        "--generate-key".into(),
    ]);
    common::cli(&args).await.ok();

    // The running provider holds the old key: it must not read garbage nor write records the
    // new key cannot open.
    for (op, what) in [
        (
            Op::Resolve {
                name: "a".into(),
                version: None,
            },
            "resolve",
        ),
        (common::rotate_op("a", b"a-from-the-old-key"), "rotate"),
        (
            common::store_op("fresh", b"fresh-from-the-old-key"),
            "store",
        ),
    ] {
        match common::call(&old.client, op).await {
            Outcome::Err(e) => assert!(
                matches!(
                    e.code,
                    ErrorCode::Unavailable | ErrorCode::Unauthenticated | ErrorCode::Internal
                ),
                "{what} after the rewrap: {e:?}"
            ),
            Outcome::Ok(reply) => panic!("{what} after the rewrap succeeded: {reply:?}"),
        }
    }
    old.stop().await;

    let new = Secret::KeyFile(new_key);
    assert!(verified(&store.dir, &new).await >= 2);
    let served = serve_dir(&store.dir, &new).await;
    assert_populated(&served.client).await;
    common::expect_err(
        common::resolve(&served.client, "fresh", None).await,
        ErrorCode::NotFound,
        "a store refused after the rewrap",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_acknowledged_around_a_rewrap_or_a_backup_are_kept() {
    let store = common::key_store().await;
    let served = common::serve(&store, &[]).await;
    let client = std::sync::Arc::new(served.client);
    common::store(&client, "busy", b"busy-0").await;

    // A writer rotates until the rewrap makes its key stale.
    let writer = {
        let client = std::sync::Arc::clone(&client);
        tokio::spawn(async move {
            let mut acked: Vec<(String, Vec<u8>)> = vec![("1".into(), b"busy-0".to_vec())];
            for i in 1.. {
                let value = format!("busy-{i}").into_bytes();
                match client
                    .call(common::rotate_op("busy", &value), common::CALL)
                    .await
                {
                    Ok(Outcome::Ok(Reply::Rotated { version })) => acked.push((version, value)),
                    Ok(Outcome::Err(e)) if e.code != ErrorCode::Internal => break,
                    other => panic!("rotate {i}: {other:?}"),
                }
            }
            acked
        })
    };
    // Backups taken meanwhile are consistent.
    for n in 0..3 {
        let backup = store.path(&format!("backup-{n}"));
        common::cli([
            OsString::from("backup"),
            "--store".into(),
            store.dir.clone().into(),
            "--to".into(),
            backup.clone().into(),
        ])
        .await
        .ok();
        assert_eq!(verified(&backup, &store.secret).await, 1);
        let b = serve_dir(&backup, &store.secret).await;
        let d = common::describe(&b.client, "busy").await;
        let current = d.current_version.unwrap();
        match common::resolve(&b.client, "busy", None).await {
            Outcome::Ok(Reply::Resolved { value, version }) => {
                assert_eq!(version, current);
                assert_eq!(
                    value.expose(),
                    format!("busy-{}", version.parse::<u64>().unwrap() - 1).as_bytes()
                );
            }
            other => panic!("backup {n}: {other:?}"),
        }
        b.stop().await;
    }
    let new_key = store.path("new.key");
    let mut args = vec!["rewrap".into(), "--store".into(), store.dir.clone().into()];
    args = with_secret(args, &store.secret);
    args.extend([
        "--new-key-file".into(),
        new_key.clone().into(),
        "--generate-key".into(),
    ]);
    common::cli(&args).await.ok();
    let acked = tokio::time::timeout(Duration::from_secs(30), writer)
        .await
        .expect("the writer did not stop within 30 s of the rewrap")
        .unwrap();
    assert!(acked.len() > 1, "no rotate was acknowledged");

    let new = Secret::KeyFile(new_key);
    let served = serve_dir(&store.dir, &new).await;
    let (last, value) = acked.last().unwrap();
    common::assert_resolves(&served.client, "busy", None, value).await;
    let d = common::describe(&served.client, "busy").await;
    assert_eq!(d.current_version.as_ref(), Some(last));
    for (version, value) in acked.iter().rev().take(10) {
        common::assert_resolves(&served.client, "busy", Some(version), value).await;
    }
}
