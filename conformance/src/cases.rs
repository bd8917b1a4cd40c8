//! Every case, and the order they run in.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use keyhole_protocol::{
    Change, DEFAULT_MAX_FRAME, Encoding, ErrorCode, FrameHeader, HealthStatus, Op, OpKind, Outcome,
    Reply, SecretBytes, SecretState, Token, encode,
};
use keyhole_transport::client::{CallError, HandshakeError, HelloOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Options;
use crate::ctx::{Ctx, Miss, Verdict, ensure, fail};
use crate::report::{CaseResult, Status};
use crate::target::{self, Target};

type BoxFut<'c> = Pin<Box<dyn Future<Output = Verdict> + 'c>>;

pub(crate) struct Case {
    pub name: &'static str,
    run: for<'c, 'a> fn(&'c Ctx<'a>) -> BoxFut<'c>,
}

macro_rules! cases {
    ($($name:literal => $f:ident),* $(,)?) => {
        pub(crate) const ALL: &[Case] = &[$(Case {
            name: $name,
            run: {
                fn run<'c, 'a>(ctx: &'c Ctx<'a>) -> BoxFut<'c> {
                    Box::pin($f(ctx))
                }
                run
            },
        }),*];
    };
}

/// The first case: the standard handshake, which opens the connection every semantic case uses.
pub(crate) const FIRST: &str = "handshake.accept";

cases! {
    "handshake.grease" => handshake_grease,
    "handshake.no-common-major" => handshake_no_common_major,
    "handshake.bad-token" => handshake_bad_token,
    "health.reports-status" => health_reports_status,
    "resolve.never-existed" => resolve_never_existed,
    "name.invalid" => name_invalid,
    "name.opaque" => name_opaque,
    "store.round-trip" => store_round_trip,
    "store.too-large" => store_too_large,
    "store.create-only" => store_create_only,
    "store.overwrite" => store_overwrite,
    "rotate.new-version" => rotate_new_version,
    "rotate.distinct-versions" => rotate_distinct_versions,
    "rotate.history-limit" => rotate_history_limit,
    "rotate.conflict" => rotate_conflict,
    "rotate.not-found" => rotate_not_found,
    "revoke.resolve-revoked" => revoke_resolve_revoked,
    "revoke.restore-by-rotate" => revoke_restore_by_rotate,
    "revoke.restore-by-store" => revoke_restore_by_store,
    "revoke.not-found" => revoke_not_found,
    "describe.metadata" => describe_metadata,
    "list.prefix-and-pages" => list_prefix_and_pages,
    "unsupported.declared" => unsupported_declared,
    "fixture.resolve" => fixture_resolve,
    "fixture.describe" => fixture_describe,
    "fixture.list" => fixture_list,
    "fixture.read-only" => fixture_read_only,
    "idempotency.repeat" => idempotency_repeat,
    "concurrency.64-out-of-order" => concurrency_64,
    "deadline.expired" => deadline_expired,
    "cancel.unknown-id" => cancel_unknown_id,
    "cancel.in-flight" => cancel_in_flight,
    "watch.events" => watch_events,
    "frame.garbage-before-hello" => frame_garbage_before_hello,
    "frame.oversized" => frame_oversized,
    "frame.bad-magic" => frame_bad_magic,
    "frame.undecodable-payload" => frame_undecodable,
    "frame.wrong-encoding" => frame_wrong_encoding,
}

/// Cases that run after all others, on what the run observed.
pub(crate) const FINAL: &[&str] = &[
    "errors.retryable-class",
    "canary.errors",
    "goodbye.clean-exit",
    "canary.stderr",
];

/// How long a provider has to close a connection or exit after a fault or Goodbye.
const CLOSE_DEADLINE: Duration = Duration::from_secs(2);

/// A case that takes longer than this fails, whatever it waits on.
const CASE_DEADLINE: Duration = Duration::from_secs(60);

fn result(name: &'static str, encoding: Encoding, started: Instant, v: Verdict) -> CaseResult {
    CaseResult {
        name,
        encoding,
        status: match v {
            Ok(()) => Status::Pass,
            Err(Miss::Fail(why)) => Status::Fail(why),
            Err(Miss::Skip(why)) => Status::Skip(why),
        },
        elapsed: started.elapsed(),
    }
}

pub(crate) async fn run_encoding(
    target: &Target,
    options: &Options,
    encoding: Encoding,
    emit: &mut dyn FnMut(CaseResult),
) {
    let started = Instant::now();
    let grace = Duration::from_millis(500);
    let conn = match target::open(target, options.handshake_timeout, encoding, grace).await {
        Ok(conn) => conn,
        Err(e) => {
            // bincode is optional for providers: when the run covers several encodings, a
            // provider that declines it is skipped for that pass, not failed.
            let optional = encoding != Encoding::Json && options.encodings.len() > 1;
            let (first, rest) =
                if optional && e.reject == Some(keyhole_protocol::RejectCode::NoCommonEncoding) {
                    let why = format!("the provider does not speak {encoding} (optional)");
                    (Err(Miss::Skip(why.clone())), Miss::Skip(why))
                } else {
                    (
                        fail(e.message),
                        Miss::Fail("not run: the handshake failed".into()),
                    )
                };
            emit(result(FIRST, encoding, started, first));
            for name in ALL.iter().map(|c| c.name).chain(FINAL.iter().copied()) {
                let rest = match &rest {
                    Miss::Fail(s) => Miss::Fail(s.clone()),
                    Miss::Skip(s) => Miss::Skip(s.clone()),
                };
                emit(result(name, encoding, Instant::now(), Err(rest)));
            }
            return;
        }
    };
    let ctx = Ctx::new(target, options, encoding, conn);
    emit(result(FIRST, encoding, started, check_ack(&ctx)));

    for case in ALL {
        let started = Instant::now();
        let verdict = match ctx.broken() {
            Some(why) => fail(format!("not run: {why}")),
            None => {
                ctx.set_case(case.name);
                tokio::time::timeout(CASE_DEADLINE, (case.run)(&ctx))
                    .await
                    .unwrap_or_else(|_| {
                        fail(format!("the case took longer than {CASE_DEADLINE:?}"))
                    })
            }
        };
        emit(result(case.name, encoding, started, verdict));
    }
    run_final(&ctx, emit).await;
}

fn check_ack(ctx: &Ctx<'_>) -> Verdict {
    let ack = ctx.conn.client.ack();
    ensure!(
        ack.encoding == ctx.encoding,
        "provider chose {} instead of {}",
        ack.encoding,
        ctx.encoding
    );
    ensure!(!ack.provider.name.is_empty(), "HelloAck names no provider");
    let caps = &ack.capabilities;
    ensure!(caps.max_value_size > 0, "max_value_size is 0");
    // A value of max_value_size must travel as JSON (base64, 4/3) in a frame the gateway accepts.
    let needed = u64::from(caps.max_value_size) * 4 / 3 + 64 * 1024;
    let cap = u64::from(ack.max_frame.min(DEFAULT_MAX_FRAME));
    ensure!(
        needed <= cap,
        "max_value_size {} cannot travel in a {cap}-byte frame as JSON; declare at most {}",
        caps.max_value_size,
        (cap - 64 * 1024) * 3 / 4
    );
    Ok(())
}

async fn run_final(ctx: &Ctx<'_>, emit: &mut dyn FnMut(CaseResult)) {
    // Clean up what this run created.
    if ctx.caps.revoke && ctx.broken().is_none() {
        let names: Vec<String> = ctx
            .created
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        ctx.set_case("clean-up");
        for name in names {
            let _ = ctx.call(Op::Revoke { name }).await;
        }
    }

    let started = Instant::now();
    let errors = ctx.errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let verdict = (|| {
        for (case, e) in &errors {
            ensure!(
                e.retryable == e.code.is_retryable(),
                "in {case}: {} came with retryable={}, but its class is retryable={}",
                e.code,
                e.retryable,
                e.code.is_retryable()
            );
            ensure!(
                (e.code == ErrorCode::Unsupported) == e.op.is_some(),
                "in {case}: {} came with op={:?}; op is set exactly for Unsupported",
                e.code,
                e.op
            );
        }
        Ok(())
    })();
    emit(result(FINAL[0], ctx.encoding, started, verdict));

    let started = Instant::now();
    let matcher = ctx.leak_matcher();
    let verdict = (|| {
        for (case, e) in &errors {
            ensure!(
                !matcher
                    .as_ref()
                    .is_some_and(|m| m.is_match(e.message.as_bytes())),
                "in {case}: a {} error message contains a secret value sent by the suite",
                e.code
            );
        }
        Ok(())
    })();
    emit(result(FINAL[1], ctx.encoding, started, verdict));

    let started = Instant::now();
    let verdict = match ctx.broken() {
        Some(why) => fail(format!("not run: {why}")),
        None => goodbye(ctx).await,
    };
    emit(result(FINAL[2], ctx.encoding, started, verdict));

    let started = Instant::now();
    let verdict = match &*ctx.conn.process.lock().await {
        None => Err(Miss::Skip(
            "stderr is not visible when the suite connects to a running provider".into(),
        )),
        Some(p) => {
            let stderr = p.output().bytes();
            if ctx.leaks(&stderr) {
                fail("the provider's stderr contains a secret value sent by the suite")
            } else {
                Ok(())
            }
        }
    };
    emit(result(FINAL[3], ctx.encoding, started, verdict));
}

async fn goodbye(ctx: &Ctx<'_>) -> Verdict {
    let reply = ctx.ok(Op::Goodbye {}, "Goodbye").await?;
    ensure!(
        matches!(reply, Reply::GoodbyeAck {}),
        "Goodbye answered with {reply:?}"
    );
    ensure!(
        ctx.conn.client.wait_closed(CLOSE_DEADLINE).await.is_some(),
        "the provider did not close the connection within {CLOSE_DEADLINE:?} of GoodbyeAck"
    );
    match ctx.conn.process.lock().await.as_mut() {
        Some(p) => exited_cleanly(p, "after Goodbye").await,
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Handshake

async fn handshake_grease(ctx: &Ctx<'_>) -> Verdict {
    let encoding = ctx.encoding;
    let grease = format!("grease.{}", ctx.name("g").len());
    let attempt = target::attempt(ctx.target, ctx.options.handshake_timeout, |token| {
        let mut hello = HelloOptions::new(token, encoding);
        hello.features = vec![grease.clone(), "x-keyhole-future/feature=1".into()];
        hello.encodings.insert(0, "grease-encoding".into());
        hello
    })
    .await
    .map_err(Miss::Fail)?;
    let mut process = attempt.process;
    let verdict = match attempt.result {
        Ok((_, _, ack)) => {
            ensure!(
                ack.encoding == encoding,
                "grease Hello: provider chose {}",
                ack.encoding
            );
            Ok(())
        }
        Err(e) => fail(format!(
            "a Hello with unknown features and an unknown encoding name was refused: {e}"
        )),
    };
    if let Some(p) = process.as_mut() {
        p.kill().await;
    }
    verdict
}

async fn handshake_no_common_major(ctx: &Ctx<'_>) -> Verdict {
    let encoding = ctx.encoding;
    let attempt = target::attempt(ctx.target, ctx.options.handshake_timeout, |token| {
        let mut hello = HelloOptions::new(token, encoding);
        hello.majors = vec![900, 901];
        hello
    })
    .await
    .map_err(Miss::Fail)?;
    let verdict = match attempt.result {
        Err(HandshakeError::Rejected(r)) => {
            ensure!(
                r.code == keyhole_protocol::RejectCode::IncompatibleVersion,
                "expected IncompatibleVersion, got {:?}: {}",
                r.code,
                r.message
            );
            ensure!(
                !r.majors.is_empty(),
                "the rejection lists no provider majors"
            );
            ensure!(
                r.message.contains("900"),
                "the rejection message does not name the gateway's majors: {}",
                r.message
            );
            Ok(())
        }
        Ok(_) => fail("expected IncompatibleVersion for majors [900, 901], got an accept"),
        Err(e) => fail(format!("expected an IncompatibleVersion reject, got: {e}")),
    };
    verdict?;
    expect_exit(attempt.process, "after rejecting the Hello").await
}

async fn handshake_bad_token(ctx: &Ctx<'_>) -> Verdict {
    let encoding = ctx.encoding;
    let attempt = target::attempt(ctx.target, ctx.options.handshake_timeout, |_| {
        HelloOptions::new(Token::new("not-the-token".into()), encoding)
    })
    .await
    .map_err(Miss::Fail)?;
    match attempt.result {
        Err(HandshakeError::Rejected(r)) => ensure!(
            r.code == keyhole_protocol::RejectCode::Unauthenticated,
            "expected Unauthenticated, got {:?}",
            r.code
        ),
        Ok(_) => return fail("a Hello with the wrong token was accepted"),
        Err(e) => return fail(format!("expected an Unauthenticated reject, got: {e}")),
    }
    expect_exit(attempt.process, "after rejecting a wrong token").await
}

/// In spawn mode, the process must exit with status 0 within the close deadline.
async fn expect_exit(process: Option<keyhole_transport::spawn::Spawned>, when: &str) -> Verdict {
    match process {
        Some(mut p) => exited_cleanly(&mut p, when).await,
        None => Ok(()),
    }
}

async fn exited_cleanly(p: &mut keyhole_transport::spawn::Spawned, when: &str) -> Verdict {
    let status = p.wait_exit(CLOSE_DEADLINE).await;
    p.kill().await;
    match status {
        Some(s) if s.success() => Ok(()),
        Some(s) => fail(format!(
            "the provider exited with {s} {when}; expected status 0"
        )),
        None => fail(format!(
            "the provider did not exit within {CLOSE_DEADLINE:?} {when}"
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Semantics

async fn health_reports_status(ctx: &Ctx<'_>) -> Verdict {
    match ctx.ok(Op::Health {}, "Health").await? {
        Reply::Health(h) => match h.status {
            HealthStatus::Ok | HealthStatus::Degraded => Ok(()),
            other => fail(format!(
                "the provider reports {other:?} ({}); the suite needs a usable backend",
                h.detail
            )),
        },
        other => fail(format!("Health answered with {other:?}")),
    }
}

async fn resolve_never_existed(ctx: &Ctx<'_>) -> Verdict {
    let name = ctx.name("never");
    for attempt in 1..=2 {
        ctx.err(
            ctx.resolve_op(&name, None),
            ErrorCode::NotFound,
            &format!("resolve #{attempt}"),
        )
        .await?;
    }
    ctx.err(
        ctx.resolve_op(&name, Some("1")),
        ErrorCode::NotFound,
        "pinned resolve",
    )
    .await?;
    ctx.err(Op::Describe { name }, ErrorCode::NotFound, "describe")
        .await?;
    Ok(())
}

async fn name_invalid(ctx: &Ctx<'_>) -> Verdict {
    for (what, name) in [
        ("an empty name", String::new()),
        ("a name with NUL", format!("{}a\0b", ctx.prefix)),
        ("a name with a newline", format!("{}a\nb", ctx.prefix)),
        ("a 1025-byte name", "n".repeat(1025)),
    ] {
        ctx.err(
            ctx.resolve_op(&name, None),
            ErrorCode::InvalidRequest,
            &format!("resolve of {what}"),
        )
        .await?;
    }
    Ok(())
}

async fn name_opaque(ctx: &Ctx<'_>) -> Verdict {
    ctx.need(ctx.caps.store, "store")?;
    for label in [
        "../../../../etc/passwd",
        "a/./b/../c",
        ".",
        "ünïcødé name",
        "trailing/",
    ] {
        let name = format!("{}{label}", ctx.name("opaque"));
        let value = ctx.secret("opaque");
        let version = ctx.store(&name, &value).await?;
        let got = ctx.resolve_is(&name, None, &value).await?;
        ensure!(
            got == version,
            "resolve of {name:?} returned version {got:?}, stored {version:?}"
        );
    }
    Ok(())
}

async fn store_round_trip(ctx: &Ctx<'_>) -> Verdict {
    ctx.need(ctx.caps.store, "store")?;
    let max = ctx.caps.max_value_size as usize;
    let mut max_value = ctx.secret("max").expose().to_vec();
    max_value.resize(max, 0xA5);
    let mut all_bytes: Vec<u8> = (0..=255u8).collect();
    all_bytes.truncate(max);
    let values = [
        ("an empty value", SecretBytes::new(Vec::new())),
        ("one byte", SecretBytes::new(vec![0])),
        ("every byte value (not UTF-8)", SecretBytes::new(all_bytes)),
        (
            "invalid UTF-8",
            SecretBytes::new(vec![0xff, 0xfe, 0xc3, 0x28, 0x00, 0x80]),
        ),
        (
            "a value of exactly max_value_size",
            SecretBytes::new(max_value),
        ),
    ];
    for (what, value) in values {
        ctx.remember(&value);
        let name = ctx.name("roundtrip");
        let version = ctx
            .store(&name, &value)
            .await
            .map_err(|m| annotate(m, what))?;
        let got = ctx
            .resolve_is(&name, None, &value)
            .await
            .map_err(|m| annotate(m, what))?;
        ensure!(
            got == version,
            "{what}: resolve returned version {got:?}, store returned {version:?}"
        );
    }
    Ok(())
}

fn annotate(m: Miss, what: &str) -> Miss {
    match m {
        Miss::Fail(s) => Miss::Fail(format!("{what}: {s}")),
        other => other,
    }
}

async fn store_too_large(ctx: &Ctx<'_>) -> Verdict {
    ctx.need(ctx.caps.store, "store")?;
    let name = ctx.name("toolarge");
    let mut big = ctx.secret("toolarge").expose().to_vec();
    big.resize(ctx.caps.max_value_size as usize + 1, b'x');
    let big = SecretBytes::new(big);
    ctx.remember(&big);
    let op = Op::Store {
        name: name.clone(),
        value: big,
        create_only: false,
        labels: BTreeMap::new(),
    };
    ctx.err(op, ErrorCode::TooLarge, "store of max_value_size + 1 bytes")
        .await?;
    ctx.err(
        ctx.resolve_op(&name, None),
        ErrorCode::NotFound,
        "resolve after a refused store",
    )
    .await?;
    Ok(())
}

async fn store_create_only(ctx: &Ctx<'_>) -> Verdict {
    ctx.need(ctx.caps.store, "store")?;
    let name = ctx.name("createonly");
    let first = ctx.secret("first");
    let version = ctx.store_with(&name, &first, true, BTreeMap::new()).await?;
    let second = ctx.secret("second");
    let op = Op::Store {
        name: name.clone(),
        value: second,
        create_only: true,
        labels: BTreeMap::new(),
    };
    ctx.err(
        op,
        ErrorCode::AlreadyExists,
        "create-only store of an existing name",
    )
    .await?;
    let got = ctx.resolve_is(&name, None, &first).await?;
    ensure!(
        got == version,
        "the refused store changed the version from {version:?} to {got:?}"
    );
    Ok(())
}

async fn store_overwrite(ctx: &Ctx<'_>) -> Verdict {
    ctx.need(ctx.caps.store, "store")?;
    let name = ctx.name("overwrite");
    let v1 = ctx.store(&name, &ctx.secret("a")).await?;
    let value = ctx.secret("b");
    let v2 = ctx.store(&name, &value).await?;
    ensure!(v1 != v2, "a second store returned the same version {v1:?}");
    let got = ctx.resolve_is(&name, None, &value).await?;
    ensure!(
        got == v2,
        "resolve returned version {got:?}, expected {v2:?}"
    );
    Ok(())
}

async fn rotate_new_version(ctx: &Ctx<'_>) -> Verdict {
    ctx.need(ctx.caps.rotate, "rotate")?;
    ctx.need(ctx.caps.store, "store (to create the secret to rotate)")?;
    let name = ctx.name("rotate");
    let old = ctx.secret("old");
    let v1 = ctx.store(&name, &old).await?;
    let new = ctx.secret("new");
    let v2 = ctx.rotate(&name, &new, None).await?;
    ensure!(v1 != v2, "rotate returned the old version {v1:?}");
    let current = ctx.resolve_is(&name, None, &new).await?;
    ensure!(
        current == v2,
        "resolve after rotate returned version {current:?}, expected {v2:?}"
    );
    ctx.resolve_is(&name, Some(&v2), &new).await?;
    if ctx.caps.versions_kept == 1 {
        ctx.err(
            ctx.resolve_op(&name, Some(&v1)),
            ErrorCode::VersionUnavailable,
            "pinned resolve of the old version (versions_kept = 1)",
        )
        .await?;
    } else {
        ctx.resolve_is(&name, Some(&v1), &old).await?;
    }
    ctx.err(
        ctx.resolve_op(&name, Some("no-such-version")),
        ErrorCode::VersionUnavailable,
        "pinned resolve of a version never issued",
    )
    .await?;
    Ok(())
}

async fn rotate_distinct_versions(ctx: &Ctx<'_>) -> Verdict {
    ctx.need(ctx.caps.rotate, "rotate")?;
    ctx.need(ctx.caps.store, "store (to create the secret to rotate)")?;
    let name = ctx.name("distinct");
    let mut seen = vec![ctx.store(&name, &ctx.secret("v")).await?];
    for _ in 0..5 {
        let v = ctx.rotate(&name, &ctx.secret("v"), None).await?;
        ensure!(
            !seen.contains(&v),
            "rotate returned version {v:?} again (seen {seen:?})"
        );
        seen.push(v);
    }
    Ok(())
}

async fn rotate_history_limit(ctx: &Ctx<'_>) -> Verdict {
    ctx.need(ctx.caps.rotate, "rotate")?;
    ctx.need(ctx.caps.store, "store (to create the secret to rotate)")?;
    let kept = ctx.caps.versions_kept;
    if kept == 0 || kept > 32 {
        return Err(Miss::Skip(format!(
            "versions_kept is {kept}; the history limit is checked for 1..=32"
        )));
    }
    let name = ctx.name("history");
    let mut versions = Vec::new();
    for i in 0..=kept {
        let value = ctx.secret("h");
        let v = if i == 0 {
            ctx.store(&name, &value).await?
        } else {
            ctx.rotate(&name, &value, None).await?
        };
        versions.push((v, value));
    }
    let (oldest, _) = &versions[0];
    ctx.err(
        ctx.resolve_op(&name, Some(oldest)),
        ErrorCode::VersionUnavailable,
        &format!("pinned resolve of the version beyond versions_kept = {kept}"),
    )
    .await?;
    for (v, value) in &versions[1..] {
        ctx.resolve_is(&name, Some(v), value).await?;
    }
    Ok(())
}

async fn rotate_conflict(ctx: &Ctx<'_>) -> Verdict {
    ctx.need(ctx.caps.rotate, "rotate")?;
    ctx.need(ctx.caps.store, "store (to create the secret to rotate)")?;
    let name = ctx.name("conflict");
    let v1 = ctx.store(&name, &ctx.secret("v1")).await?;
    let current = ctx.secret("v2");
    let v2 = ctx.rotate(&name, &current, Some(&v1)).await?;
    let op = Op::Rotate {
        name: name.clone(),
        value: ctx.secret("stale"),
        expected_version: Some(v1.clone()),
    };
    ctx.err(
        op,
        ErrorCode::Conflict,
        "rotate with a stale expected_version",
    )
    .await?;
    let got = ctx.resolve_is(&name, None, &current).await?;
    ensure!(
        got == v2,
        "the refused rotate changed the version to {got:?}"
    );
    Ok(())
}

async fn rotate_not_found(ctx: &Ctx<'_>) -> Verdict {
    ctx.need(ctx.caps.rotate, "rotate")?;
    let op = Op::Rotate {
        name: ctx.name("rotate-missing"),
        value: ctx.secret("x"),
        expected_version: None,
    };
    ctx.err(
        op,
        ErrorCode::NotFound,
        "rotate of a name that never existed",
    )
    .await?;
    Ok(())
}

/// Stores a secret and rotates it once when possible; returns the versions and values.
async fn with_history(ctx: &Ctx<'_>, name: &str) -> Result<Vec<(String, SecretBytes)>, Miss> {
    let first = ctx.secret("r1");
    let mut out = vec![(ctx.store(name, &first).await?, first)];
    if ctx.caps.rotate {
        let second = ctx.secret("r2");
        out.push((ctx.rotate(name, &second, None).await?, second));
    }
    Ok(out)
}

async fn revoke_resolve_revoked(ctx: &Ctx<'_>) -> Verdict {
    ctx.need(ctx.caps.revoke, "revoke")?;
    ctx.need(ctx.caps.store, "store (to create the secret to revoke)")?;
    let name = ctx.name("revoke");
    let history = with_history(ctx, &name).await?;
    ctx.revoke(&name).await?;
    ctx.err(
        ctx.resolve_op(&name, None),
        ErrorCode::Revoked,
        "resolve after revoke",
    )
    .await?;
    for (v, _) in &history {
        ctx.err(
            ctx.resolve_op(&name, Some(v)),
            ErrorCode::Revoked,
            &format!("pinned resolve of version {v:?} after revoke"),
        )
        .await?;
    }
    ctx.revoke(&name)
        .await
        .map_err(|m| annotate(m, "second revoke (must be idempotent)"))?;
    ctx.err(
        ctx.resolve_op(&name, None),
        ErrorCode::Revoked,
        "resolve after a second revoke",
    )
    .await?;
    match ctx
        .ok(Op::Describe { name: name.clone() }, "describe after revoke")
        .await?
    {
        Reply::Described(d) => {
            ensure!(
                d.state == SecretState::Revoked,
                "describe after revoke says state {:?}",
                d.state
            );
        }
        other => return fail(format!("describe answered with {other:?}")),
    }
    Ok(())
}

async fn revoke_restore_by_rotate(ctx: &Ctx<'_>) -> Verdict {
    ctx.need(ctx.caps.revoke, "revoke")?;
    ctx.need(ctx.caps.rotate, "rotate")?;
    ctx.need(ctx.caps.store, "store (to create the secret to revoke)")?;
    let name = ctx.name("restore-rotate");
    let history = with_history(ctx, &name).await?;
    ctx.revoke(&name).await?;
    let value = ctx.secret("restored");
    let v = ctx.rotate(&name, &value, None).await?;
    ensure!(
        history.iter().all(|(old, _)| *old != v),
        "rotate after revoke reused version {v:?}"
    );
    let got = ctx.resolve_is(&name, None, &value).await?;
    ensure!(
        got == v,
        "resolve after restore returned version {got:?}, expected {v:?}"
    );
    for (old, _) in &history {
        ctx.err_any(
            ctx.resolve_op(&name, Some(old)),
            &[ErrorCode::Revoked, ErrorCode::VersionUnavailable],
            &format!("pinned resolve of pre-revoke version {old:?} after restore"),
        )
        .await?;
    }
    Ok(())
}

async fn revoke_restore_by_store(ctx: &Ctx<'_>) -> Verdict {
    ctx.need(ctx.caps.revoke, "revoke")?;
    ctx.need(ctx.caps.store, "store")?;
    let name = ctx.name("restore-store");
    ctx.store(&name, &ctx.secret("before")).await?;
    ctx.revoke(&name).await?;
    let op = Op::Store {
        name: name.clone(),
        value: ctx.secret("create-only"),
        create_only: true,
        labels: BTreeMap::new(),
    };
    ctx.err(
        op,
        ErrorCode::AlreadyExists,
        "create-only store of a revoked name",
    )
    .await?;
    let value = ctx.secret("after");
    let v = ctx.store(&name, &value).await?;
    let got = ctx.resolve_is(&name, None, &value).await?;
    ensure!(
        got == v,
        "resolve after restore returned version {got:?}, expected {v:?}"
    );
    Ok(())
}

async fn revoke_not_found(ctx: &Ctx<'_>) -> Verdict {
    ctx.need(ctx.caps.revoke, "revoke")?;
    ctx.err(
        Op::Revoke {
            name: ctx.name("revoke-missing"),
        },
        ErrorCode::NotFound,
        "revoke of a name that never existed",
    )
    .await?;
    Ok(())
}

async fn describe_metadata(ctx: &Ctx<'_>) -> Verdict {
    ctx.need(ctx.caps.store, "store")?;
    let name = ctx.name("describe");
    let labels = BTreeMap::from([
        ("team".to_string(), "platform".to_string()),
        ("env".to_string(), "test".to_string()),
    ]);
    let value = ctx.secret("described");
    let version = ctx.store_with(&name, &value, false, labels.clone()).await?;
    let answer = ctx
        .conn
        .client
        .call_raw(Op::Describe { name: name.clone() }, ctx.timeout())
        .await;
    let raw = match &answer {
        Ok(a) => a.raw.clone(),
        Err(_) => None,
    };
    let outcome = ctx.record(answer.map(|a| a.outcome))?;
    let d = match outcome {
        Outcome::Ok(Reply::Described(d)) => d,
        other => return fail(format!("describe answered with {other:?}")),
    };
    ensure!(
        d.name == name,
        "describe names {:?}, expected {name:?}",
        d.name
    );
    ensure!(
        d.state == SecretState::Active,
        "state is {:?}, expected active",
        d.state
    );
    ensure!(
        d.current_version.as_deref() == Some(version.as_str()),
        "current_version is {:?}, expected {version:?}",
        d.current_version
    );
    ensure!(
        d.versions.iter().any(|v| v.version == version),
        "versions {:?} lack the current one",
        d.versions
    );
    ensure!(
        d.labels == labels,
        "labels are {:?}, expected {labels:?}",
        d.labels
    );
    if let Some(raw) = raw {
        ensure!(
            !ctx.leaks(&raw),
            "the Describe answer contains the secret value on the wire"
        );
    }
    Ok(())
}

async fn list_prefix_and_pages(ctx: &Ctx<'_>) -> Verdict {
    ctx.need(ctx.caps.list, "list")?;
    ctx.need(ctx.caps.store, "store (to create names to list)")?;
    let sub = ctx.name("list");
    let sub = format!("{sub}/");
    let mut expected: Vec<String> = ["b", "a", "d/x", "c", "e"]
        .iter()
        .map(|s| format!("{sub}{s}"))
        .collect();
    for name in &expected {
        ctx.store(name, &ctx.secret("listed")).await?;
    }
    let revoked = expected[0].clone();
    if ctx.caps.revoke {
        ctx.revoke(&revoked).await?;
    }
    // A sibling that shares the textual prefix minus the slash must not appear.
    ctx.store(
        &sub[..sub.len() - 1].to_string().replace("/", "_"),
        &ctx.secret("x"),
    )
    .await
    .ok();
    expected.sort();
    let mut got = Vec::new();
    let mut page: Option<String> = None;
    for _ in 0..10 {
        let answer = ctx
            .conn
            .client
            .call_raw(
                Op::List {
                    prefix: sub.clone(),
                    page: page.clone(),
                    limit: 2,
                },
                ctx.timeout(),
            )
            .await;
        let raw = match &answer {
            Ok(a) => a.raw.clone(),
            Err(_) => None,
        };
        let (entries, next) = match ctx.record(answer.map(|a| a.outcome))? {
            Outcome::Ok(Reply::Listed { entries, next_page }) => (entries, next_page),
            other => return fail(format!("list answered with {other:?}")),
        };
        if let Some(raw) = raw {
            ensure!(
                !ctx.leaks(&raw),
                "a List answer contains a secret value on the wire"
            );
        }
        ensure!(
            entries.len() <= 2,
            "a page of limit 2 held {} entries",
            entries.len()
        );
        for e in entries {
            if e.name == revoked && ctx.caps.revoke {
                ensure!(
                    e.state == SecretState::Revoked,
                    "revoked {:?} is listed as {:?}",
                    e.name,
                    e.state
                );
            }
            got.push(e.name);
        }
        match next {
            Some(token) => page = Some(token),
            None => break,
        }
    }
    ensure!(
        got == expected,
        "paged List of {sub:?} returned {got:?}, expected {expected:?} (sorted, each once, revoked included)"
    );
    match ctx
        .ok(
            Op::List {
                prefix: format!("{sub}zzz-nothing"),
                page: None,
                limit: 0,
            },
            "list of an empty prefix",
        )
        .await?
    {
        Reply::Listed { entries, next_page } => ensure!(
            entries.is_empty() && next_page.is_none(),
            "List of a prefix with no names returned {} entries",
            entries.len()
        ),
        other => return fail(format!("list answered with {other:?}")),
    }
    Ok(())
}

/// The fixtures of this run; skips the case when none were given.
fn fixtures<'c>(ctx: &'c Ctx<'_>) -> Result<&'c [(String, SecretBytes)], Miss> {
    if ctx.options.fixtures.is_empty() {
        return Err(Miss::Skip(
            "no fixtures given (--fixtures names secrets the provider already holds)".into(),
        ));
    }
    Ok(&ctx.options.fixtures)
}

async fn fixture_resolve(ctx: &Ctx<'_>) -> Verdict {
    for (name, value) in fixtures(ctx)? {
        let version = ctx.resolve_is(name, None, value).await?;
        ensure!(
            !version.is_empty(),
            "resolve of {name:?} returned an empty version"
        );
        let pinned = ctx.resolve_is(name, Some(&version), value).await?;
        ensure!(
            pinned == version,
            "resolve of {name:?} pinned to {version:?} answered version {pinned:?}"
        );
        ctx.err(
            ctx.resolve_op(name, Some("kh-conformance-no-such-version")),
            ErrorCode::VersionUnavailable,
            &format!("resolve of {name:?} pinned to a version it never had"),
        )
        .await?;
        let missing = format!("{name}-kh-conformance-missing");
        ctx.err(
            ctx.resolve_op(&missing, None),
            ErrorCode::NotFound,
            &format!("resolve of {missing:?}"),
        )
        .await?;
    }
    Ok(())
}

async fn fixture_describe(ctx: &Ctx<'_>) -> Verdict {
    for (name, _) in fixtures(ctx)? {
        let (_, version) = ctx.resolve(name, None).await?;
        let answer = ctx
            .conn
            .client
            .call_raw(Op::Describe { name: name.clone() }, ctx.timeout())
            .await;
        let raw = answer.as_ref().ok().and_then(|a| a.raw.clone());
        let d = match ctx.record(answer.map(|a| a.outcome))? {
            Outcome::Ok(Reply::Described(d)) => d,
            other => return fail(format!("describe of {name:?} answered with {other:?}")),
        };
        ensure!(
            d.name == *name,
            "describe names {:?}, expected {name:?}",
            d.name
        );
        ensure!(
            d.state == SecretState::Active,
            "{name:?} is {:?}, expected active",
            d.state
        );
        ensure!(
            d.current_version.as_deref() == Some(version.as_str()),
            "describe of {name:?}: current_version {:?}, resolve said {version:?}",
            d.current_version
        );
        ensure!(
            d.versions.iter().any(|v| v.version == version),
            "describe of {name:?}: versions {:?} lack the current one",
            d.versions
        );
        if let Some(raw) = raw {
            ensure!(
                !ctx.leaks(&raw),
                "the Describe answer for {name:?} contains the value on the wire"
            );
        }
    }
    Ok(())
}

async fn fixture_list(ctx: &Ctx<'_>) -> Verdict {
    let fixtures = fixtures(ctx)?;
    ctx.need(ctx.caps.list, "list")?;
    let mut got: Vec<String> = Vec::new();
    let mut page: Option<String> = None;
    for _ in 0..10_000 {
        let op = Op::List {
            prefix: String::new(),
            page: page.clone(),
            limit: 2,
        };
        match ctx.ok(op, "list of every name").await? {
            Reply::Listed { entries, next_page } => {
                ensure!(
                    entries.len() <= 2,
                    "a page of limit 2 held {}",
                    entries.len()
                );
                got.extend(entries.into_iter().map(|e| e.name));
                match next_page {
                    Some(token) => page = Some(token),
                    None => break,
                }
            }
            other => return fail(format!("list answered with {other:?}")),
        }
    }
    ensure!(
        got.windows(2).all(|w| w[0] < w[1]),
        "paged List is not in ascending byte order, each name once: {got:?}"
    );
    for (name, _) in fixtures {
        ensure!(
            got.contains(name),
            "paged List lacks fixture {name:?}: {got:?}"
        );
        if let Some((first, _)) = name.split_once('/') {
            let prefix = format!("{first}/");
            match ctx
                .ok(
                    Op::List {
                        prefix: prefix.clone(),
                        page: None,
                        limit: 1000,
                    },
                    &format!("list of {prefix:?}"),
                )
                .await?
            {
                Reply::Listed { entries, .. } => {
                    ensure!(
                        entries.iter().any(|e| e.name == *name),
                        "List of {prefix:?} lacks {name:?}"
                    );
                    ensure!(
                        entries.iter().all(|e| e.name.starts_with(&prefix)),
                        "List of {prefix:?} returned names outside it"
                    );
                }
                other => return fail(format!("list answered with {other:?}")),
            }
        }
    }
    Ok(())
}

/// A provider that declares no write operation must refuse each with `Unsupported` and keep
/// its data as it was.
async fn fixture_read_only(ctx: &Ctx<'_>) -> Verdict {
    let fixtures = fixtures(ctx)?;
    let caps = &ctx.caps;
    if caps.store || caps.rotate || caps.revoke {
        return Err(Miss::Skip("the provider declares a write operation".into()));
    }
    for (name, value) in fixtures {
        let other = ctx.secret("read-only");
        let writes = [
            Op::Store {
                name: name.clone(),
                value: other.clone(),
                create_only: false,
                labels: BTreeMap::new(),
            },
            Op::Rotate {
                name: name.clone(),
                value: other.clone(),
                expected_version: None,
            },
            Op::Revoke { name: name.clone() },
        ];
        for op in writes {
            ctx.err(op, ErrorCode::Unsupported, &format!("a write to {name:?}"))
                .await?;
        }
        ctx.resolve_is(name, None, value).await?;
    }
    Ok(())
}

async fn unsupported_declared(ctx: &Ctx<'_>) -> Verdict {
    let name = ctx.name("unsupported");
    let caps = &ctx.caps;
    let checks = [
        (
            caps.store,
            OpKind::Store,
            Op::Store {
                name: name.clone(),
                value: ctx.secret("u"),
                create_only: false,
                labels: BTreeMap::new(),
            },
        ),
        (
            caps.rotate,
            OpKind::Rotate,
            Op::Rotate {
                name: name.clone(),
                value: ctx.secret("u"),
                expected_version: None,
            },
        ),
        (
            caps.revoke,
            OpKind::Revoke,
            Op::Revoke { name: name.clone() },
        ),
        (
            caps.list,
            OpKind::List,
            Op::List {
                prefix: ctx.prefix.clone(),
                page: None,
                limit: 0,
            },
        ),
        (
            caps.watch,
            OpKind::Watch,
            Op::Watch {
                prefix: ctx.prefix.clone(),
            },
        ),
    ];
    let mut checked = 0;
    for (declared, kind, op) in checks {
        if declared {
            continue;
        }
        checked += 1;
        let e = ctx
            .err(op, ErrorCode::Unsupported, &format!("undeclared {kind}"))
            .await?;
        ensure!(
            e.op == Some(kind),
            "Unsupported for {kind} names op {:?}",
            e.op
        );
    }
    if !caps.store {
        ctx.err(
            ctx.resolve_op(&name, None),
            ErrorCode::NotFound,
            "resolve after an unsupported store",
        )
        .await?;
    }
    if checked == 0 {
        return Err(Miss::Skip(
            "the provider declares every optional operation".into(),
        ));
    }
    Ok(())
}

async fn idempotency_repeat(ctx: &Ctx<'_>) -> Verdict {
    if !ctx.caps.store {
        let name = ctx.name("idem");
        for _ in 0..3 {
            ctx.err(
                Op::Describe { name: name.clone() },
                ErrorCode::NotFound,
                "repeated describe",
            )
            .await?;
        }
        return Ok(());
    }
    let name = ctx.name("idem");
    let value = ctx.secret("idem");
    ctx.store(&name, &value).await?;
    let describe = || ctx.ok(Op::Describe { name: name.clone() }, "describe");
    let first = describe().await?;
    for _ in 0..2 {
        ensure!(
            describe().await? == first,
            "repeated Describe answers differ"
        );
        ctx.resolve_is(&name, None, &value).await?;
    }
    if ctx.caps.list {
        let list = || {
            ctx.ok(
                Op::List {
                    prefix: name.clone(),
                    page: None,
                    limit: 10,
                },
                "list",
            )
        };
        let first = list().await?;
        ensure!(list().await? == first, "repeated List answers differ");
    }
    if ctx.caps.revoke {
        for i in 1..=3 {
            ctx.revoke(&name)
                .await
                .map_err(|m| annotate(m, &format!("revoke #{i}")))?;
        }
    }
    Ok(())
}

async fn concurrency_64(ctx: &Ctx<'_>) -> Verdict {
    const N: usize = 64;
    if ctx.caps.store {
        let names: Vec<String> = (0..N).map(|i| ctx.name(&format!("c{i}"))).collect();
        let values: Vec<SecretBytes> = (0..N).map(|_| ctx.secret("c")).collect();
        // 64 stores in flight at once, then 64 resolves in flight at once.
        let mut pending = Vec::new();
        for (name, value) in names.iter().zip(&values) {
            let op = Op::Store {
                name: name.clone(),
                value: value.clone(),
                create_only: false,
                labels: BTreeMap::new(),
            };
            pending.push(ctx.start(op).await?);
        }
        for p in pending {
            match ctx.finish(p).await? {
                Outcome::Ok(Reply::Stored { .. }) => {}
                other => return fail(format!("a concurrent store answered {other:?}")),
            }
        }
        let mut pending = Vec::new();
        for name in names.iter().rev() {
            pending.push(ctx.start(ctx.resolve_op(name, None)).await?);
        }
        for (p, (name, value)) in pending.into_iter().zip(names.iter().zip(&values).rev()) {
            match ctx.finish(p).await? {
                Outcome::Ok(Reply::Resolved { value: got, .. }) => {
                    ensure!(
                        got == *value,
                        "a concurrent resolve of {name:?} got another request's value"
                    );
                }
                other => {
                    return fail(format!(
                        "a concurrent resolve of {name:?} answered {other:?}"
                    ));
                }
            }
        }
        return Ok(());
    }
    // Read-only providers: a mix of kinds whose answers must each match their request.
    let mut pending = Vec::new();
    for i in 0..N {
        let op = match i % 3 {
            0 => Op::Health {},
            1 => ctx.resolve_op(&ctx.name("c"), None),
            _ => Op::Describe {
                name: ctx.name("c"),
            },
        };
        pending.push((i % 3, ctx.start(op).await?));
    }
    for (kind, p) in pending {
        let outcome = ctx.finish(p).await?;
        let right = match (kind, &outcome) {
            (0, Outcome::Ok(Reply::Health(_))) => true,
            (_, Outcome::Err(e)) if kind != 0 => e.code == ErrorCode::NotFound,
            _ => false,
        };
        ensure!(
            right,
            "a concurrent request got an answer of the wrong kind: {outcome:?}"
        );
    }
    Ok(())
}

async fn deadline_expired(ctx: &Ctx<'_>) -> Verdict {
    let client = &ctx.conn.client;
    let wait = ctx.timeout();
    let expect_deadline = |outcome: Outcome, what: &str| -> Verdict {
        match outcome {
            Outcome::Err(e) if e.code == ErrorCode::DeadlineExceeded => Ok(()),
            other => fail(format!(
                "{what} with timeout_ms 0: expected DeadlineExceeded, got {other:?}"
            )),
        }
    };
    let outcome = ctx.record(client.call_with_timeout_ms(Op::Health {}, 0, wait).await)?;
    expect_deadline(outcome, "Health")?;
    let name = ctx.name("deadline");
    if ctx.caps.store {
        let op = Op::Store {
            name: name.clone(),
            value: ctx.secret("late"),
            create_only: false,
            labels: BTreeMap::new(),
        };
        let outcome = ctx.record(client.call_with_timeout_ms(op, 0, wait).await)?;
        expect_deadline(outcome, "Store")?;
        ctx.err(
            ctx.resolve_op(&name, None),
            ErrorCode::NotFound,
            "resolve after a store whose deadline had passed (it must not take effect)",
        )
        .await?;
    } else {
        let outcome = ctx.record(
            client
                .call_with_timeout_ms(ctx.resolve_op(&name, None), 0, wait)
                .await,
        )?;
        expect_deadline(outcome, "Resolve")?;
    }
    Ok(())
}

async fn cancel_unknown_id(ctx: &Ctx<'_>) -> Verdict {
    match ctx
        .ok(Op::Cancel { id: u64::MAX - 7 }, "cancel of an unknown id")
        .await?
    {
        Reply::CancelAck { found: false } => {}
        other => {
            return fail(format!(
                "cancel of an unknown id answered {other:?}, expected CancelAck {{ found: false }}"
            ));
        }
    }
    // The connection still works.
    ctx.ok(Op::Health {}, "Health after a cancel").await?;
    Ok(())
}

async fn cancel_in_flight(ctx: &Ctx<'_>) -> Verdict {
    let target = ctx.start(Op::Health {}).await?;
    let cancel = ctx
        .ok(
            Op::Cancel { id: target.id },
            "cancel of an in-flight request",
        )
        .await?;
    ensure!(
        matches!(cancel, Reply::CancelAck { .. }),
        "Cancel answered {cancel:?}"
    );
    match ctx.finish(target).await? {
        Outcome::Ok(Reply::Health(_)) => {}
        Outcome::Err(e) if e.code == ErrorCode::Cancelled => {}
        other => {
            return fail(format!(
                "the cancelled request answered {other:?}; expected its result or Cancelled"
            ));
        }
    }
    if ctx.caps.watch {
        let watch = ctx
            .start(Op::Watch {
                prefix: ctx.name("cancel-watch"),
            })
            .await?;
        let id = watch.id;
        match ctx.finish(watch).await? {
            Outcome::Ok(Reply::Watching {}) => {}
            other => return fail(format!("Watch answered {other:?}")),
        }
        match ctx
            .ok(Op::Cancel { id }, "cancel of a running watch")
            .await?
        {
            Reply::CancelAck { found: true } => {}
            other => {
                return fail(format!(
                    "cancel of a running watch answered {other:?}, expected found: true"
                ));
            }
        }
    }
    Ok(())
}

async fn watch_events(ctx: &Ctx<'_>) -> Verdict {
    ctx.need(ctx.caps.watch, "watch")?;
    ctx.need(ctx.caps.store, "store (to cause a change)")?;
    let prefix = format!("{}/", ctx.name("watched"));
    let watch = ctx
        .start(Op::Watch {
            prefix: prefix.clone(),
        })
        .await?;
    let id = watch.id;
    match ctx.finish(watch).await? {
        Outcome::Ok(Reply::Watching {}) => {}
        other => return fail(format!("Watch answered {other:?}")),
    }
    let name = format!("{prefix}item");
    ctx.created
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(name.clone());
    let version = ctx.store(&name, &ctx.secret("w")).await?;
    let Some(ev) = next_event(ctx, id, Duration::from_secs(2)).await else {
        return fail("no watch event within 2 s of a store under the watched prefix");
    };
    ensure!(
        ev.name == name
            && ev.change == Change::Updated
            && ev.version.as_deref() == Some(version.as_str()),
        "watch event {ev:?} does not describe the store of {name:?} at version {version:?}"
    );
    if ctx.caps.revoke {
        ctx.revoke(&name).await?;
        match next_event(ctx, id, Duration::from_secs(2)).await {
            Some(ev) => ensure!(
                ev.change == Change::Revoked && ev.name == name,
                "after revoke, the watch reported {ev:?}"
            ),
            None => return fail("no watch event within 2 s of a revoke"),
        }
    }
    match ctx.ok(Op::Cancel { id }, "cancel of the watch").await? {
        Reply::CancelAck { found: true } => Ok(()),
        other => fail(format!("cancel of a running watch answered {other:?}")),
    }
}

/// The next event of watch `id`, skipping other watches' events, waiting at most `wait`.
async fn next_event(
    ctx: &Ctx<'_>,
    id: u64,
    wait: Duration,
) -> Option<keyhole_protocol::WatchEvent> {
    let mut events = ctx.conn.events.lock().await;
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Some(ev)) if ev.watch_id == id => return Some(ev),
            Ok(Some(_)) => continue,
            _ => return None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Framing faults: each on a fresh connection (a fresh process in spawn mode).

async fn frame_garbage_before_hello(ctx: &Ctx<'_>) -> Verdict {
    let mut raw = target::open_raw(ctx.target, ctx.options.handshake_timeout)
        .await
        .map_err(Miss::Fail)?;
    let _ = raw
        .write
        .write_all(b"GET / HTTP/1.1\r\nHost: keyhole\r\n\r\n")
        .await;
    let _ = raw.write.flush().await;
    let mut sink = vec![0u8; 4096];
    let closed = tokio::time::timeout(CLOSE_DEADLINE, async {
        loop {
            match raw.read.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await
    .is_ok();
    ensure!(
        closed,
        "the provider kept the connection open {CLOSE_DEADLINE:?} after garbage instead of a Hello"
    );
    expect_exit(raw.process, "after garbage instead of a Hello").await
}

/// Sends `bytes` after a good handshake and expects an optional `Abort` with `code`, then the
/// connection closed, and (spawn mode) a clean exit.
async fn fault(
    ctx: &Ctx<'_>,
    what: &str,
    code: ErrorCode,
    make: impl FnOnce(u32, u16) -> Vec<u8>,
) -> Verdict {
    let encoding = ctx.encoding;
    let attempt = target::attempt(ctx.target, ctx.options.handshake_timeout, |token| {
        HelloOptions::new(token, encoding)
    })
    .await
    .map_err(Miss::Fail)?;
    let (reader, writer, ack) = match attempt.result {
        Ok(parts) => parts,
        Err(e) => return fail(format!("the handshake for this case failed: {e}")),
    };
    let (tx, _rx) = keyhole_transport::client::event_channel();
    let client = keyhole_transport::client::Client::start(reader, writer, ack.clone(), tx);
    let bytes = make(ack.max_frame, ack.major);
    let _ = client.send_raw(&bytes).await;
    match client.wait_closed(CLOSE_DEADLINE).await {
        None => {
            return fail(format!(
                "the provider kept the connection open {CLOSE_DEADLINE:?} after {what}"
            ));
        }
        Some(CallError::Aborted(e)) => ensure!(
            e.code == code,
            "after {what}, the provider aborted with {}, expected {code}",
            e.code
        ),
        Some(_) => {}
    }
    expect_exit(attempt.process, &format!("after {what}")).await
}

async fn frame_oversized(ctx: &Ctx<'_>) -> Verdict {
    let encoding = ctx.encoding;
    fault(
        ctx,
        "a frame header declaring more than max_frame",
        ErrorCode::TooLarge,
        |cap, major| {
            FrameHeader {
                major,
                encoding,
                len: cap.saturating_add(1),
            }
            .to_bytes()
            .to_vec()
        },
    )
    .await
}

async fn frame_bad_magic(ctx: &Ctx<'_>) -> Verdict {
    fault(
        ctx,
        "bytes with a bad magic",
        ErrorCode::InvalidRequest,
        |_, _| b"GET / HTTP/1.1\r\nHost: keyhole\r\n\r\n".to_vec(),
    )
    .await
}

async fn frame_undecodable(ctx: &Ctx<'_>) -> Verdict {
    let encoding = ctx.encoding;
    fault(
        ctx,
        "a frame whose payload is not a Request",
        ErrorCode::InvalidRequest,
        |_, major| {
            let payload = b"\xff\xfe\xfd this is not a request {]";
            let mut bytes = FrameHeader {
                major,
                encoding,
                len: payload.len() as u32,
            }
            .to_bytes()
            .to_vec();
            bytes.extend_from_slice(payload);
            bytes
        },
    )
    .await
}

async fn frame_wrong_encoding(ctx: &Ctx<'_>) -> Verdict {
    let other = match ctx.encoding {
        Encoding::Json => Encoding::Bincode,
        Encoding::Bincode => Encoding::Json,
    };
    fault(
        ctx,
        &format!("a frame in {other} after negotiating {}", ctx.encoding),
        ErrorCode::InvalidRequest,
        |_, major| {
            let req = keyhole_protocol::Request {
                id: 1,
                timeout_ms: 1000,
                op: Op::Health {},
            };
            let mut payload = Vec::new();
            let _ = encode(other, &req, &mut payload);
            let mut bytes = FrameHeader {
                major,
                encoding: other,
                len: payload.len() as u32,
            }
            .to_bytes()
            .to_vec();
            bytes.extend_from_slice(&payload);
            bytes
        },
    )
    .await
}
