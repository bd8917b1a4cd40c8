//! The suite judged against providers whose behaviour is known: the reference provider passes,
//! every deliberately broken provider fails, each caught by the case named for its fault.

#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use keyhole_conformance::{Encoding, Options, Report, Status, Target};

/// A binary of another workspace package, built beside this test by `cargo test --workspace`.
fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (cargo build --workspace --bins)",
        path.display()
    );
    path
}

fn spawn_target(bin: &str, args: &[&str]) -> Target {
    Target::Spawn {
        program: workspace_bin(bin).into(),
        args: args.iter().map(OsString::from).collect(),
    }
}

async fn run(target: &Target, encodings: &[Encoding]) -> Report {
    let options = Options {
        encodings: encodings.to_vec(),
        ..Options::default()
    };
    keyhole_conformance::run(target, &options, |_| {}).await
}

fn misbehaving(behaviour: &str) -> Target {
    spawn_target("keyhole-provider-misbehaving", &["--behaviour", behaviour])
}

/// The run failed, and `case` is among the failures, with a reason containing `why`.
fn caught_by(report: &Report, case: &str, why: &str) {
    assert!(report.failed() > 0, "the suite passed a broken provider");
    let hit = report.results.iter().find(|r| r.name == case);
    match hit.map(|r| &r.status) {
        Some(Status::Fail(reason)) => {
            assert!(
                reason.contains(why),
                "{case} failed for another reason: {reason}"
            )
        }
        other => panic!("{case} did not fail: {other:?}\n{}", lines(report)),
    }
}

fn lines(report: &Report) -> String {
    report
        .results
        .iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn the_reference_provider_passes_every_case_in_both_encodings() {
    let report = run(
        &spawn_target("keyhole-provider-memory", &[]),
        &Encoding::ALL,
    )
    .await;
    assert_eq!(report.failed(), 0, "{}", lines(&report));
    assert_eq!(
        report.results.len(),
        2 * keyhole_conformance::case_names().len()
    );
    // The only skip: it declares every optional operation, so nothing is Unsupported.
    let skipped: Vec<_> = report
        .results
        .iter()
        .filter(|r| matches!(r.status, Status::Skip(_)))
        .map(|r| r.name)
        .collect();
    // The only skips: it declares every optional operation, so nothing is Unsupported, and
    // no fixtures were given.
    let fixture_skips = [
        "fixture.resolve",
        "fixture.describe",
        "fixture.list",
        "fixture.read-only",
    ];
    let expected: Vec<&str> = [&["unsupported.declared"][..], &fixture_skips[..]]
        .concat()
        .repeat(2);
    assert_eq!(skipped, expected);
    let junit = report.junit();
    assert!(
        junit.contains("keyhole-conformance.bincode") && junit.contains("keyhole-conformance.json")
    );
}

#[tokio::test]
async fn the_reference_provider_passes_with_history_off_and_a_small_max() {
    let target = spawn_target(
        "keyhole-provider-memory",
        &["--versions-kept", "1", "--max-value-size", "100"],
    );
    let report = run(&target, &[Encoding::Json]).await;
    assert_eq!(report.failed(), 0, "{}", lines(&report));
}

#[tokio::test]
async fn a_running_provider_passes_over_its_socket() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    let token = keyhole_transport_token();
    std::fs::write(&token_file, &token).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let sock = dir.path().join("run").join("p.sock");
    let mut child = tokio::process::Command::new(workspace_bin("keyhole-provider-memory"))
        .arg("--listen")
        .arg(&sock)
        .arg("--token-file")
        .arg(&token_file)
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "the provider never listened");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let target = Target::Socket {
        path: sock,
        token: keyhole_protocol::Token::new(token),
    };
    let report = run(&target, &Encoding::ALL).await;
    assert_eq!(report.failed(), 0, "{}", lines(&report));
    assert!(
        report
            .results
            .iter()
            .any(|r| r.name == "canary.stderr" && matches!(r.status, Status::Skip(_)))
    );
    let _ = child.kill().await;
}

/// A provider listening on a private socket, with the token that opens it.
struct Listening {
    _dir: tempfile::TempDir,
    child: tokio::process::Child,
    sock: PathBuf,
    token: String,
}

async fn listening_memory_provider() -> Listening {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    let token = keyhole_transport_token();
    std::fs::write(&token_file, &token).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let sock = dir.path().join("run").join("p.sock");
    let child = tokio::process::Command::new(workspace_bin("keyhole-provider-memory"))
        .arg("--listen")
        .arg(&sock)
        .arg("--token-file")
        .arg(&token_file)
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "the provider never listened");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Listening {
        _dir: dir,
        child,
        sock,
        token,
    }
}

#[tokio::test]
async fn fixtures_are_checked_and_a_wrong_one_is_caught() {
    use keyhole_protocol::{Op, Outcome, SecretBytes, Token};
    use keyhole_transport::client::{Client, HelloOptions, handshake};
    let mut p = listening_memory_provider().await;
    // Seed the provider the way an operator would before pointing the suite at it.
    let stream = keyhole_transport::socket::connect(&p.sock).await.unwrap();
    let (r, w) = keyhole_transport::socket::into_halves(stream);
    let hello = HelloOptions::new(Token::new(p.token.clone()), Encoding::Json);
    let (reader, writer, ack) = handshake(r, w, &hello, Duration::from_secs(5))
        .await
        .unwrap();
    let (tx, _rx) = keyhole_transport::client::event_channel();
    let client = Client::start(reader, writer, ack, tx);
    let fixtures: Vec<(String, SecretBytes)> = [
        ("fx/db/password", "kh-fixture-0123456789-db"),
        ("fx/api-key", "kh-fixture-0123456789-api"),
        ("top-level", "kh-fixture-0123456789-top"),
    ]
    .iter()
    .map(|(n, v)| (n.to_string(), SecretBytes::copy_from(v.as_bytes())))
    .collect();
    for (name, value) in &fixtures {
        let op = Op::Store {
            name: name.clone(),
            value: value.clone(),
            create_only: true,
            labels: Default::default(),
        };
        let answer = client.call(op, Duration::from_secs(5)).await.unwrap();
        assert!(matches!(answer, Outcome::Ok(_)), "{answer:?}");
    }
    let target = Target::Socket {
        path: p.sock.clone(),
        token: Token::new(p.token.clone()),
    };
    let mut options = Options {
        encodings: Encoding::ALL.to_vec(),
        fixtures: fixtures.clone(),
        ..Options::default()
    };
    let report = keyhole_conformance::run(&target, &options, |_| {}).await;
    assert_eq!(report.failed(), 0, "{}", lines(&report));
    for case in ["fixture.resolve", "fixture.describe", "fixture.list"] {
        let passes = report
            .results
            .iter()
            .filter(|r| r.name == case && r.status == Status::Pass)
            .count();
        assert_eq!(passes, 2, "{case} did not pass in both encodings");
    }

    // A fixture whose value the provider does not hold fails the resolve case.
    options.fixtures[1].1 = SecretBytes::copy_from(b"kh-fixture-not-the-value");
    options.encodings = vec![Encoding::Json];
    let report = keyhole_conformance::run(&target, &options, |_| {}).await;
    caught_by(&report, "fixture.resolve", "fx/api-key");
    let _ = p.child.kill().await;
}

fn keyhole_transport_token() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test]
async fn exit_before_hello_is_caught_by_the_handshake() {
    let report = run(&misbehaving("exit-before-hello"), &[Encoding::Json]).await;
    caught_by(
        &report,
        "handshake.accept",
        "exited (exit status: 3) before connecting",
    );
}

#[tokio::test]
async fn an_unknown_major_is_caught_by_the_handshake() {
    let report = run(&misbehaving("unknown-major"), &[Encoding::Bincode]).await;
    caught_by(&report, "handshake.accept", "IncompatibleVersion");
}

#[tokio::test]
async fn a_provider_that_hangs_fails_the_suite_in_seconds() {
    let started = Instant::now();
    let report = run(&misbehaving("hang"), &Encoding::ALL).await;
    caught_by(&report, "health.reports-status", "stopped answering");
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(20),
        "the suite took {elapsed:?}"
    );
    // Every case after the first timeout fails at once, naming it.
    caught_by(
        &report,
        "revoke.resolve-revoked",
        "not run: the provider stopped answering",
    );
}

#[tokio::test]
async fn a_garbage_frame_is_caught() {
    let report = run(&misbehaving("garbage-frame"), &[Encoding::Json]).await;
    caught_by(&report, "health.reports-status", "bad frame magic");
}

#[tokio::test]
async fn not_found_after_revoke_is_caught() {
    let report = run(&misbehaving("notfound-after-revoke"), &[Encoding::Json]).await;
    caught_by(
        &report,
        "revoke.resolve-revoked",
        "expected Revoked, got NotFound",
    );
}

#[tokio::test]
async fn an_old_version_readable_after_revoke_is_caught() {
    let report = run(
        &misbehaving("old-version-after-revoke"),
        &[Encoding::Bincode],
    )
    .await;
    caught_by(
        &report,
        "revoke.resolve-revoked",
        "expected Revoked, got success",
    );
}

#[tokio::test]
async fn rotate_returning_the_same_version_is_caught() {
    let report = run(&misbehaving("rotate-same-version"), &[Encoding::Json]).await;
    caught_by(
        &report,
        "rotate.new-version",
        "rotate returned the old version",
    );
}

#[tokio::test]
async fn a_value_echoed_in_an_error_is_caught() {
    let report = run(&misbehaving("echo-value"), &[Encoding::Json]).await;
    caught_by(&report, "canary.errors", "contains a secret value");
}

#[tokio::test]
async fn ignored_deadlines_are_caught() {
    let report = run(&misbehaving("ignore-deadlines"), &[Encoding::Bincode]).await;
    caught_by(&report, "deadline.expired", "expected DeadlineExceeded");
    assert_eq!(report.failed(), 1, "{}", lines(&report));
}

#[tokio::test]
async fn the_python_example_provider_passes() {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/python-provider/keyhole_provider.py");
    let target = Target::Spawn {
        program: "python3".into(),
        args: vec![script.into()],
    };
    let report = run(&target, &Encoding::ALL).await;
    assert_eq!(report.failed(), 0, "{}", lines(&report));
    // Every case of the JSON pass but two may pass; the fixture cases skip (no fixtures given).
    let without_fixtures = keyhole_conformance::case_names()
        .iter()
        .filter(|n| !n.starts_with("fixture."))
        .count();
    assert!(report.passed() >= without_fixtures - 2);
}
