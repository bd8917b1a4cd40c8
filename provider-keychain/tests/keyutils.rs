//! The keychain provider against the kernel's key retention service (keyutils). Each test works
//! under a namespace of its own (`--service kh-test-<random>`) and a private runtime directory,
//! and purges its keys at the end: keys are linked to the user's persistent keyring, which every
//! process of the user shares.

#![cfg(target_os = "linux")] // both backends exist only on Linux
#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

mod common;

use std::ffi::OsString;
use std::process::Command;
use std::time::{Duration, Instant};

use keyhole_conformance::{Options, Target};
use keyhole_protocol::{ErrorCode, HealthStatus, Op, Outcome, Reply};

use common::TestEnv;

/// Purges every key of a namespace when dropped, test failure or not.
struct Purge(String);

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("keyctl")
            .args([
                "session",
                "-",
                "sh",
                "-c",
                "keyctl get_persistent @s >/dev/null && keyctl purge -p user \"$1:\" >/dev/null",
                "sh",
                &self.0,
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// The payload of the key `<service>:<user>`, read with keyctl from a fresh session keyring
/// (through the persistent keyring, as another process of the user would).
fn keyctl_read(service: &str, user: &str) -> Option<Vec<u8>> {
    let mut cmd = Command::new("keyctl");
    cmd.args([
        "session",
        "-",
        "sh",
        "-c",
        "keyctl get_persistent @s >/dev/null && id=$(keyctl search @s user \"$1\") && keyctl pipe \"$id\"",
        "sh",
        &format!("{service}:{user}"),
    ]);
    let (code, out, _) = common::run(cmd, Duration::from_secs(10));
    (code == Some(0)).then_some(out)
}

/// Overwrites the payload of `service`'s entry `user` with `bytes` (a damaged entry).
fn keyctl_damage(service: &str, user: &str, bytes: &str) -> bool {
    let mut cmd = Command::new("keyctl");
    cmd.args([
        "session",
        "-",
        "sh",
        "-c",
        "keyctl get_persistent @s >/dev/null && id=$(keyctl search @s user \"$1\") && keyctl update \"$id\" \"$2\"",
        "sh",
        &format!("{service}:{user}"),
        bytes,
    ]);
    let (code, _, _) = common::run(cmd, Duration::from_secs(10));
    code == Some(0)
}

/// The value cap the provider should declare for this user.
fn expected_cap() -> usize {
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    let file = if root {
        "/proc/sys/kernel/keys/root_maxbytes"
    } else {
        "/proc/sys/kernel/keys/maxbytes"
    };
    let quota: usize = std::fs::read_to_string(file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    32766.min(quota / 2)
}

/// Runs the suite against the provider under `keyctl session -` with `extra` arguments.
async fn suite(extra: &[&str]) -> keyhole_conformance::Report {
    let env = TestEnv::new();
    let service = common::fresh_service();
    let _purge = Purge(service.clone());
    // Each provider process the suite starts gets a session keyring of its own; they share the
    // secrets through the user's persistent keyring.
    let mut args: Vec<OsString> = ["session", "-", common::BIN, "--store", "keyutils"]
        .into_iter()
        .map(OsString::from)
        .collect();
    args.extend(["--service".into(), OsString::from(&service)]);
    args.extend(extra.iter().map(OsString::from));
    let (program, args) = env.wrap("keyctl", &args);
    let target = Target::Spawn { program, args };
    let started = Instant::now();
    let report = keyhole_conformance::run(&target, &Options::default(), |_| {}).await;
    eprintln!(
        "keyutils conformance {extra:?}: {} cases in {:.2} s",
        report.results.len(),
        started.elapsed().as_secs_f64()
    );
    report
}

#[tokio::test]
async fn conformance_passes_against_keyutils_in_both_encodings() {
    if !common::require(&["keyctl"], "the keyutils conformance run") {
        return;
    }
    common::assert_suite_passes(&suite(&[]).await);
}

#[tokio::test]
async fn conformance_passes_keeping_one_version() {
    if !common::require(&["keyctl"], "the keyutils conformance run") {
        return;
    }
    // With --keep 1 every rotate trims the previous version, inline or not.
    common::assert_suite_passes(&suite(&["--keep", "1"]).await);
}

#[tokio::test]
async fn a_pointer_too_large_for_one_key_is_refused_before_anything_is_written() {
    if !common::require(&["keyctl"], "the keyutils pointer-size test") {
        return;
    }
    let env = TestEnv::new();
    let service = common::fresh_service();
    let _purge = Purge(service.clone());
    let served = common::serve(&env, &["--store", "keyutils", "--service", &service]).await;
    let c = &served.client;
    // Labels live in the pointer, and a key holds 32767 bytes.
    let labels = (0..40)
        .map(|i| (format!("label-{i}"), "x".repeat(1000)))
        .collect();
    let op = Op::Store {
        name: "too/many/labels".into(),
        value: keyhole_protocol::SecretBytes::copy_from(b"v"),
        create_only: false,
        labels,
    };
    let (outcome, _) = common::timed(c, op).await;
    let e = common::expect_err(
        outcome,
        ErrorCode::InvalidRequest,
        "a pointer over 32767 bytes",
    );
    assert!(e.message.contains("32767"), "{}", e.message);
    let (outcome, _) = common::timed(c, common::resolve_op("too/many/labels", None)).await;
    common::expect_err(
        outcome,
        ErrorCode::NotFound,
        "resolve after the refused store",
    );
    match common::call(
        c,
        Op::List {
            prefix: String::new(),
            page: None,
            limit: 0,
        },
    )
    .await
    {
        Outcome::Ok(Reply::Listed { entries, .. }) => assert!(entries.is_empty(), "{entries:?}"),
        other => panic!("list: {other:?}"),
    }
    assert!(
        keyctl_read(&service, "index:0").is_none(),
        "the name was indexed"
    );
    served.stop_within(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn values_round_trip_and_keyctl_sees_what_was_written() {
    if !common::require(&["keyctl"], "the keyutils round-trip test") {
        return;
    }
    let env = TestEnv::new();
    let service = common::fresh_service();
    let _purge = Purge(service.clone());
    let served = common::serve(&env, &["--store", "keyutils", "--service", &service]).await;
    let c = &served.client;
    let max = c.ack().capabilities.max_value_size as usize;
    assert_eq!(max, expected_cap(), "the declared cap of keyutils");

    let (report, _) = common::health(c).await;
    assert_eq!(report.status, HealthStatus::Ok, "{report:?}");

    // Non-UTF-8 and empty values (the kernel refuses an empty payload: the format byte makes
    // it storable).
    let name = "svc/token";
    let first = vec![0x00, 0xff, 0xc3, 0x28, 0x80, b'x'];
    let v1 = common::store(c, name, &first).await;
    common::assert_resolves(c, name, None, &first).await;
    let v2 = common::rotate(c, name, b"").await;
    common::assert_resolves(c, name, None, b"").await;
    common::assert_resolves(c, name, Some(&v1), &first).await;

    let pointer = keyctl_read(&service, &common::pointer_user(name)).expect("the pointer key");
    assert_eq!(pointer[0], 0x02);
    assert!(common::contains(&pointer, name.as_bytes()));
    assert!(common::contains(
        &pointer,
        format!("\"current\":{v2}").as_bytes()
    ));
    let old = keyctl_read(&service, &common::version_user(name, &v1)).expect("version 1's key");
    assert_eq!(old, [&[0x01u8][..], &first].concat());

    // The largest value is too big to sit inline in a 32767-byte pointer: it gets a key of its
    // own. One byte more is TooLarge.
    let big: Vec<u8> = (0..max).map(|i| (i % 251) as u8).collect();
    let v = common::store(c, "svc/big", &big).await;
    common::assert_resolves(c, "svc/big", None, &big).await;
    let entry = keyctl_read(&service, &common::version_user("svc/big", &v)).expect("big key");
    assert_eq!(entry.len(), max + 1);
    let (outcome, _) = common::timed(c, common::store_op("svc/big", &vec![1u8; max + 1])).await;
    common::expect_err(outcome, ErrorCode::TooLarge, "a value over the cap");
    common::assert_resolves(c, "svc/big", None, &big).await;

    // Revoke invalidates the version keys.
    match common::call(c, Op::Revoke { name: name.into() }).await {
        Outcome::Ok(Reply::Revoked {}) => {}
        other => panic!("revoke: {other:?}"),
    }
    assert!(keyctl_read(&service, &common::version_user(name, &v1)).is_none());
    let (outcome, _) = common::timed(c, common::resolve_op(name, Some(&v1))).await;
    common::expect_err(outcome, ErrorCode::Revoked, "pinned resolve after revoke");
    served.stop_within(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn processes_without_a_session_keyring_of_their_own_work_and_share_secrets() {
    if !common::require(&["keyctl"], "the keyutils session test") {
        return;
    }
    // Started directly, not under `keyctl session -`: the provider sets up its own session
    // keyring, and two processes still see each other's secrets through the persistent
    // keyring.
    let env = TestEnv::new();
    let service = common::fresh_service();
    let _purge = Purge(service.clone());
    let args = ["--store", "keyutils", "--service", service.as_str()];
    let a = common::serve(&env, &args).await;
    let (report, _) = common::health(&a.client).await;
    assert_eq!(report.status, HealthStatus::Ok, "{report:?}");
    let v = common::store(&a.client, "shared/one", b"written by a").await;
    a.stop_within(Duration::from_secs(5)).await;

    let b = common::serve(&env, &args).await;
    assert_eq!(
        common::assert_resolves(&b.client, "shared/one", None, b"written by a").await,
        v
    );
    b.stop_within(Duration::from_secs(5)).await;

    let (code, out, stderr) = common::run(
        {
            let mut cmd = env.command(common::BIN);
            cmd.args(["probe", "--store", "keyutils", "--service", &service]);
            cmd
        },
        Duration::from_secs(5),
    );
    assert_eq!(code, Some(0), "{}{stderr}", String::from_utf8_lossy(&out));
}

#[tokio::test]
async fn a_damaged_entry_is_left_out_of_list_and_named_by_its_own_errors() {
    if !common::require(&["keyctl"], "the keyutils damaged-entry test") {
        return;
    }
    let env = TestEnv::new();
    let service = common::fresh_service();
    let _purge = Purge(service.clone());
    let served = common::serve(&env, &["--store", "keyutils", "--service", &service]).await;
    let c = &served.client;
    for name in ["app/a", "app/b", "app/c"] {
        common::store(c, name, b"kh-damage-test-value").await;
    }
    assert!(
        keyctl_damage(&service, &common::pointer_user("app/b"), "not a pointer"),
        "keyctl could not overwrite the pointer"
    );
    let listed = match common::call(
        c,
        Op::List {
            prefix: "app/".into(),
            page: None,
            limit: 100,
        },
    )
    .await
    {
        Outcome::Ok(Reply::Listed { entries, .. }) => {
            entries.into_iter().map(|e| e.name).collect::<Vec<_>>()
        }
        other => panic!("list with one damaged entry: {other:?}"),
    };
    assert_eq!(listed, ["app/a", "app/c"]);
    let (outcome, _) = common::timed(c, common::resolve_op("app/b", None)).await;
    common::expect_err(outcome, ErrorCode::Internal, "resolve of the damaged entry");
    served.stop_within(Duration::from_secs(5)).await;
}
