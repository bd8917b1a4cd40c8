//! The keychain provider against a real Secret Service: a gnome-keyring-daemon on a private
//! D-Bus session per test (`dbus-run-session`), with a temporary HOME, so tests run in parallel
//! and never touch the user's keyring.

#![cfg(target_os = "linux")] // both backends exist only on Linux
#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

mod common;

use std::ffi::OsString;
use std::time::{Duration, Instant};

use keyhole_conformance::{Options, Target};
use keyhole_protocol::{ErrorCode, HealthStatus, Op, Outcome, Reply};
use keyhole_provider_keychain::provider::MAX_RUNNING_CALLS;

use common::{Session, TestEnv};

const TOOLS: &[&str] = &["dbus-run-session", "gnome-keyring-daemon", "secret-tool"];

#[tokio::test]
async fn conformance_passes_against_gnome_keyring_in_both_encodings() {
    if !common::require(TOOLS, "the Secret Service conformance run") {
        return;
    }
    let session = Session::unlocked("conformance-password");
    let args: Vec<OsString> = ["--store", "secret-service", "--service"]
        .into_iter()
        .map(OsString::from)
        .chain([OsString::from(common::fresh_service())])
        .collect();
    let (program, args) = session.env.wrap(common::BIN, &args);
    let target = Target::Spawn { program, args };
    // The suite's own defaults: 5 s per request, both encodings.
    let started = Instant::now();
    let report = keyhole_conformance::run(&target, &Options::default(), |_| {}).await;
    eprintln!(
        "Secret Service conformance: {} cases in {:.2} s",
        report.results.len(),
        started.elapsed().as_secs_f64()
    );
    common::assert_suite_passes(&report);
}

#[tokio::test]
async fn a_locked_collection_answers_locked_promptly_and_never_prompts() {
    if !common::require(TOOLS, "the locked-collection test") {
        return;
    }
    // A login keyring created with one password...
    let session = Session::unlocked("the-right-password");
    let (code, _, stderr) = common::run(
        {
            let mut cmd = session.env.command("sh");
            cmd.args([
                "-c",
                "printf %s something | secret-tool store --label=first service other username u",
            ]);
            cmd
        },
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(0), "secret-tool store: {stderr}");
    let env = session.stop();
    assert!(
        env.path("home/.local/share/keyrings/login.keyring")
            .exists()
    );
    // ... and a daemon started without the password: the collection stays locked (unlocking
    // would need the graphical prompter, which fails without a display).
    let session = Session::start(env, None);
    let prompts = |log: String| log.matches("org.gnome.keyring.SystemPrompter").count();
    let prompts_before = prompts(session.log());
    let service = common::fresh_service();
    let served = common::serve(
        &session.env,
        &["--store", "secret-service", "--service", &service],
    )
    .await;
    let c = &served.client;

    let (report, took) = common::health(c).await;
    assert_eq!(report.status, HealthStatus::Locked, "{report:?}");
    assert!(report.detail.contains("locked"), "{}", report.detail);
    assert!(report.detail.contains("unlock"), "{}", report.detail);
    assert!(took < Duration::from_secs(2), "Health took {took:?}");

    let (outcome, took) = common::timed(c, common::resolve_op("db/password", None)).await;
    let e = common::expect_err(outcome, ErrorCode::Locked, "resolve in a locked collection");
    assert!(e.retryable, "{e:?}");
    assert!(e.message.contains("unlock"), "{}", e.message);
    assert!(took < Duration::from_secs(2), "resolve took {took:?}");

    let (outcome, took) = common::timed(c, common::store_op("db/password", b"v")).await;
    common::expect_err(outcome, ErrorCode::Locked, "store in a locked collection");
    assert!(took < Duration::from_secs(2), "store took {took:?}");

    for op in [
        Op::Describe {
            name: "db/password".into(),
        },
        Op::List {
            prefix: String::new(),
            page: None,
            limit: 0,
        },
        Op::Revoke {
            name: "db/password".into(),
        },
    ] {
        let (outcome, took) = common::timed(c, op.clone()).await;
        common::expect_err(outcome, ErrorCode::Locked, &format!("{op:?}"));
        assert!(took < Duration::from_secs(2), "{op:?} took {took:?}");
    }
    // The provider never asked for an unlock prompt: the bus started no prompter meanwhile.
    assert_eq!(prompts(session.log()), prompts_before, "{}", session.log());

    let (code, out, _) = common::run(
        {
            let mut cmd = session.env.command(common::BIN);
            cmd.args(["probe", "--store", "secret-service"]);
            cmd
        },
        Duration::from_secs(5),
    );
    assert_eq!(code, Some(3), "{}", String::from_utf8_lossy(&out));
    assert!(String::from_utf8_lossy(&out).starts_with("Locked: "));
    served.stop_within(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn without_a_session_bus_health_is_unavailable_and_says_what_to_do() {
    let env = TestEnv::new();
    // DBUS_SESSION_BUS_ADDRESS unset, and no bus socket in XDG_RUNTIME_DIR.
    let served = common::serve(&env, &["--store", "secret-service"]).await;
    let c = &served.client;
    let (report, took) = common::health(c).await;
    assert_eq!(report.status, HealthStatus::Unavailable, "{report:?}");
    for hint in [
        "DBUS_SESSION_BUS_ADDRESS",
        "dbus-run-session",
        "gnome-keyring-daemon",
    ] {
        assert!(report.detail.contains(hint), "{hint}: {}", report.detail);
    }
    assert!(took < Duration::from_secs(1), "Health took {took:?}");
    let (outcome, took) = common::timed(c, common::store_op("a", b"v")).await;
    let e = common::expect_err(outcome, ErrorCode::Unavailable, "store without a bus");
    assert!(e.retryable);
    assert!(took < Duration::from_secs(1), "store took {took:?}");
    let (outcome, _) = common::timed(c, common::resolve_op("a", None)).await;
    common::expect_err(outcome, ErrorCode::Unavailable, "resolve without a bus");
    served.stop_within(Duration::from_secs(5)).await;

    // A bus address whose socket nobody listens on.
    let mut env = TestEnv::new();
    let dead = common::dead_socket(env.dir.path());
    env.bus = Some(format!("unix:path={}", dead.display()));
    let served = common::serve(&env, &["--store", "secret-service"]).await;
    let (report, took) = common::health(&served.client).await;
    assert_eq!(report.status, HealthStatus::Unavailable, "{report:?}");
    assert!(
        report.detail.contains(&dead.display().to_string()),
        "{}",
        report.detail
    );
    assert!(
        report.detail.contains("dbus-run-session"),
        "{}",
        report.detail
    );
    assert!(took < Duration::from_secs(1), "Health took {took:?}");
    served.stop_within(Duration::from_secs(5)).await;

    let (code, out, _) = common::run(
        {
            let mut cmd = env.command(common::BIN);
            cmd.args(["probe", "--store", "secret-service"]);
            cmd
        },
        Duration::from_secs(5),
    );
    assert_eq!(code, Some(5), "{}", String::from_utf8_lossy(&out));
    assert!(String::from_utf8_lossy(&out).starts_with("Unavailable: "));
}

/// The provider on a bus that accepts and never says a word (every D-Bus call would wait
/// forever), with a 400 ms backend deadline; the listener must outlive the test's calls.
async fn on_a_silent_bus() -> (TestEnv, std::os::unix::net::UnixListener, common::Served) {
    let mut env = TestEnv::new();
    let path = env.path("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    env.bus = Some(format!("unix:path={}", path.display()));
    let served = common::serve(
        &env,
        &["--store", "secret-service", "--backend-timeout-ms", "400"],
    )
    .await;
    (env, listener, served)
}

#[tokio::test]
async fn a_bus_that_never_answers_yields_unavailable_at_the_backend_deadline() {
    let (env, listener, served) = on_a_silent_bus().await;
    let c = &served.client;
    let (report, took) = common::health(c).await;
    assert_eq!(report.status, HealthStatus::Unavailable, "{report:?}");
    assert!(report.detail.contains("400 ms"), "{}", report.detail);
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_millis(1500),
        "Health took {took:?}"
    );
    // A read that times out had no effect: Unavailable. A write's thread may still commit, so
    // its effect is undetermined: DeadlineExceeded (PROTOCOL 7.2).
    for (op, code) in [
        (common::resolve_op("a", None), ErrorCode::Unavailable),
        (common::store_op("a", b"v"), ErrorCode::DeadlineExceeded),
    ] {
        let (outcome, took) = common::timed(c, op).await;
        common::expect_err(outcome, code, "a call on a silent bus");
        assert!(took < Duration::from_millis(1500), "took {took:?}");
    }
    // Calls stuck on the silent socket do not keep the provider alive once the gateway leaves.
    served.stop_within(Duration::from_secs(3)).await;
    drop(listener);

    let (code, out, _) = common::run(
        {
            let mut cmd = env.command(common::BIN);
            cmd.args(["probe", "--store", "secret-service"]);
            cmd
        },
        Duration::from_secs(5),
    );
    assert_eq!(code, Some(5), "{}", String::from_utf8_lossy(&out));
}

#[tokio::test]
async fn calls_stuck_on_a_silent_bus_hold_at_most_the_cap_of_threads() {
    // Each call stuck on a bus that never answers keeps its thread for good. Past the cap, calls
    // are refused at once instead of leaving one more thread behind.
    let (_env, _listener, served) = on_a_silent_bus().await;
    let c = &served.client;
    let extra = 8;
    let mut calls = Vec::new();
    for i in 0..MAX_RUNNING_CALLS + extra {
        let op = common::resolve_op(&format!("n{i}"), None);
        calls.push(c.start_call(op, Duration::from_secs(5)).await.unwrap());
    }
    let started = Instant::now();
    let (mut refused, mut timed_out) = (0, 0);
    for call in calls {
        let e = common::expect_err(
            c.finish(call).await.unwrap(),
            ErrorCode::Unavailable,
            "a call on a silent bus",
        );
        if e.message.contains("the most this provider allows") {
            refused += 1;
        } else {
            assert!(e.message.contains("400 ms"), "{}", e.message);
            timed_out += 1;
        }
    }
    assert_eq!((refused, timed_out), (extra, MAX_RUNNING_CALLS));
    assert!(started.elapsed() < Duration::from_secs(3));
    // The stuck threads never end, so the cap holds from now on, and is answered at once.
    let (outcome, took) = common::timed(c, common::resolve_op("later", None)).await;
    let e = common::expect_err(outcome, ErrorCode::Unavailable, "a call past the cap");
    assert!(
        e.message.contains("the most this provider allows"),
        "{}",
        e.message
    );
    assert!(took < Duration::from_millis(300), "took {took:?}");
    served.stop_within(Duration::from_secs(3)).await;
}

#[tokio::test]
async fn values_round_trip_and_secret_tool_sees_what_was_written() {
    if !common::require(TOOLS, "the Secret Service round-trip test") {
        return;
    }
    let session = Session::unlocked("round-trip-password");
    let service = common::fresh_service();
    let served = common::serve(
        &session.env,
        &["--store", "secret-service", "--service", &service],
    )
    .await;
    let c = &served.client;
    let max = c.ack().capabilities.max_value_size as usize;
    assert_eq!(max, 64 * 1024, "the declared cap of the Secret Service");

    let name = "app/binary key";
    let first: Vec<u8> = vec![0xff, 0xfe, 0x00, 0xc3, 0x28, 0x80, b'k', b'h'];
    let v1 = common::store(c, name, &first).await;
    common::assert_resolves(c, name, None, &first).await;
    let second: Vec<u8> = (0..=255u8).rev().collect();
    let v2 = common::rotate(c, name, &second).await;
    common::assert_resolves(c, name, None, &second).await;
    common::assert_resolves(c, name, Some(&v1), &first).await;

    // Exactly the cap round-trips; one byte more is TooLarge and changes nothing.
    let big = vec![0xa5u8; max];
    common::store(c, "app/max", &big).await;
    common::assert_resolves(c, "app/max", None, &big).await;
    let (outcome, _) = common::timed(c, common::store_op(name, &vec![0u8; max + 1])).await;
    let e = common::expect_err(outcome, ErrorCode::TooLarge, "a value over the cap");
    assert!(e.message.contains(&max.to_string()), "{}", e.message);
    common::assert_resolves(c, name, None, &second).await;

    // What secret-tool sees: the pointer holds the metadata and the current value inline, the
    // previous version has an entry of its own, labelled with the name.
    let lookup = |user: String| {
        let mut cmd = session.env.command("secret-tool");
        cmd.args(["lookup", "service", &service, "username", &user]);
        let (code, out, stderr) = common::run(cmd, Duration::from_secs(20));
        assert_eq!(code, Some(0), "secret-tool lookup {user}: {stderr}");
        out
    };
    let pointer = lookup(common::pointer_user(name));
    assert_eq!(pointer[0], 0x02, "pointer format tag");
    assert!(common::contains(&pointer, name.as_bytes()));
    assert!(common::contains(&pointer, b"\"current\":2"));
    assert!(pointer.ends_with(&second), "the current value is inline");
    let old = lookup(common::version_user(name, &v1));
    assert_eq!(old, [&[0x01u8][..], &first].concat(), "version 1's entry");
    assert_eq!(v2, "2");

    let mut cmd = session.env.command("secret-tool");
    cmd.args(["search", "--all", "--unlock", "service", &service]);
    let (code, out, stderr) = common::run(cmd, Duration::from_secs(20));
    let listing = String::from_utf8_lossy(&out).into_owned() + &stderr;
    assert_eq!(code, Some(0), "{listing}");
    for expected in [
        format!("label = keyhole: {name} (pointer)"),
        format!("label = keyhole: {name} (version 1)"),
        format!("attribute.username = {}", common::pointer_user(name)),
        format!("attribute.service = {service}"),
        "label = keyhole: name index, chunk 0".to_string(),
    ] {
        assert!(listing.contains(&expected), "{expected}\n{listing}");
    }

    // Revoke deletes the version entries and leaves a tombstone without the value.
    match common::call(c, Op::Revoke { name: name.into() }).await {
        Outcome::Ok(Reply::Revoked {}) => {}
        other => panic!("revoke: {other:?}"),
    }
    let (outcome, _) = common::timed(c, common::resolve_op(name, None)).await;
    common::expect_err(outcome, ErrorCode::Revoked, "resolve after revoke");
    let tombstone = lookup(common::pointer_user(name));
    assert!(common::contains(&tombstone, b"\"current\":null"));
    assert!(!common::contains(&tombstone, &second));
    let mut cmd = session.env.command("secret-tool");
    cmd.args([
        "lookup",
        "service",
        &service,
        "username",
        &common::version_user(name, &v1),
    ]);
    let (code, out, _) = common::run(cmd, Duration::from_secs(20));
    assert_ne!(code, Some(0), "version 1 survived the revoke: {out:?}");

    // No value in the provider's log.
    let stderr = served.stderr();
    assert!(
        !common::contains(stderr.as_bytes(), &first[..6]),
        "{stderr}"
    );
    served.stop_within(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn two_processes_rotating_one_secret_never_lose_an_update() {
    if !common::require(TOOLS, "the cross-process test") {
        return;
    }
    let session = Session::unlocked("two-processes");
    let service = common::fresh_service();
    let args = ["--store", "secret-service", "--service", service.as_str()];
    let a = common::serve(&session.env, &args).await;
    let b = common::serve(&session.env, &args).await;
    let v1 = common::store(&a.client, "shared", b"start").await;
    // Both rotate from the same expected version at once: the lock file makes the two
    // read-check-writes sequential, so exactly one wins and the other sees Conflict.
    let (ra, rb) = tokio::join!(
        common::call(&a.client, common::rotate_op("shared", b"from-a", Some(&v1))),
        common::call(&b.client, common::rotate_op("shared", b"from-b", Some(&v1))),
    );
    let wins = [&ra, &rb]
        .iter()
        .filter(|o| matches!(o, Outcome::Ok(Reply::Rotated { .. })))
        .count();
    let conflicts = [&ra, &rb]
        .iter()
        .filter(|o| matches!(o, Outcome::Err(e) if e.code == ErrorCode::Conflict))
        .count();
    assert_eq!((wins, conflicts), (1, 1), "{ra:?}\n{rb:?}");
    // Twenty unconditional rotations from each process: every one gets its own version.
    let mut versions = Vec::new();
    for i in 0..20 {
        let (ra, rb) = tokio::join!(
            common::call(
                &a.client,
                common::rotate_op("shared", format!("a{i}").as_bytes(), None)
            ),
            common::call(
                &b.client,
                common::rotate_op("shared", format!("b{i}").as_bytes(), None)
            ),
        );
        for r in [ra, rb] {
            match r {
                Outcome::Ok(Reply::Rotated { version }) => versions.push(version),
                other => panic!("rotate: {other:?}"),
            }
        }
    }
    let mut unique = versions.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), versions.len(), "{versions:?}");
    // Each process sees the other's writes: the list, and the latest version.
    let d = match common::call(
        &b.client,
        Op::Describe {
            name: "shared".into(),
        },
    )
    .await
    {
        Outcome::Ok(Reply::Described(d)) => d,
        other => panic!("describe: {other:?}"),
    };
    assert_eq!(d.current_version.as_deref(), Some("42"), "{d:?}");
    assert_eq!(d.versions.len(), 10, "--keep 10: {d:?}");
    match common::call(
        &a.client,
        Op::List {
            prefix: String::new(),
            page: None,
            limit: 0,
        },
    )
    .await
    {
        Outcome::Ok(Reply::Listed { entries, .. }) => {
            assert_eq!(entries.len(), 1);
            assert_eq!(entries[0].name, "shared");
        }
        other => panic!("list: {other:?}"),
    }
    a.stop_within(Duration::from_secs(5)).await;
    b.stop_within(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_collection_locked_while_serving_answers_locked_then_recovers_after_unlock() {
    let tools = [TOOLS, &["dbus-send"][..]].concat();
    if !common::require(&tools, "the lock-while-serving test") {
        return;
    }
    let session = Session::unlocked("lock-me");
    let service = common::fresh_service();
    let served = common::serve(
        &session.env,
        &["--store", "secret-service", "--service", &service],
    )
    .await;
    let c = &served.client;
    common::store(c, "app/key", b"before the lock").await;

    // The screen locker's way: Lock over D-Bus (no prompt needed to lock).
    let login = "/org/freedesktop/secrets/collection/login";
    let mut cmd = session.env.command("dbus-send");
    cmd.args([
        "--session",
        "--print-reply",
        "--dest=org.freedesktop.secrets",
        "/org/freedesktop/secrets",
        "org.freedesktop.Secret.Service.Lock",
        &format!("array:objpath:{login}"),
    ]);
    let (code, _, stderr) = common::run(cmd, Duration::from_secs(10));
    assert_eq!(code, Some(0), "dbus-send Lock: {stderr}");

    let prompts = |log: String| log.matches("org.gnome.keyring.SystemPrompter").count();
    let prompts_before = prompts(session.log());
    let (report, took) = common::health(c).await;
    assert_eq!(report.status, HealthStatus::Locked, "{report:?}");
    assert!(took < Duration::from_secs(2), "Health took {took:?}");
    let (outcome, took) = common::timed(c, common::resolve_op("app/key", None)).await;
    common::expect_err(
        outcome,
        ErrorCode::Locked,
        "resolve in the locked collection",
    );
    assert!(took < Duration::from_secs(2), "resolve took {took:?}");
    let (outcome, _) = common::timed(c, common::rotate_op("app/key", b"x", None)).await;
    common::expect_err(
        outcome,
        ErrorCode::Locked,
        "rotate in the locked collection",
    );
    assert_eq!(prompts(session.log()), prompts_before, "{}", session.log());

    // Unlock the way a headless session does: a daemon that replaces the running one and gets
    // the password on stdin. The provider follows without a restart.
    let mut cmd = session.env.command("sh");
    cmd.args([
        "-c",
        "printf %s lock-me | gnome-keyring-daemon --components=secrets --replace --daemonize --unlock >/dev/null",
    ]);
    let (code, _, stderr) = common::run(cmd, Duration::from_secs(20));
    assert_eq!(code, Some(0), "unlock: {stderr}");
    let stop = Instant::now() + Duration::from_secs(10);
    loop {
        let (report, _) = common::health(c).await;
        if report.status == HealthStatus::Ok {
            break;
        }
        assert!(Instant::now() < stop, "still {report:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    common::assert_resolves(c, "app/key", None, b"before the lock").await;
    common::rotate(c, "app/key", b"after the unlock").await;
    common::assert_resolves(c, "app/key", None, b"after the unlock").await;
    served.stop_within(Duration::from_secs(5)).await;
}
