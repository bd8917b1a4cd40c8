//! The gateway service in-process: policy decides, every operation is audited (denials too),
//! values reach the redactor, and connect mode checks the provider's token and uid.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use common::workspace_bin;
use std::sync::Arc;
use std::time::Duration;

use keyhole_gateway::api::{ApiOp, ApiReply, ResolvedValue};
use keyhole_gateway::audit::{AuditLog, VerifyReport};
use keyhole_gateway::manager::{Launch, Manager, ProviderSpec};
use keyhole_gateway::policy::{Caller, Policy};
use keyhole_gateway::redact::Redactor;
use keyhole_gateway::server::Gateway;
use keyhole_gateway::state::StateStore;
use keyhole_protocol::{Encoding, ErrorCode, Op, Outcome, SecretBytes};

const OWNER: u32 = 1000;

fn gateway() -> Arc<Gateway> {
    gateway_with(Policy::owner_only())
}

fn gateway_with(policy: Policy) -> Arc<Gateway> {
    let spec = ProviderSpec::spawn("memory", workspace_bin("keyhole-provider-memory"), vec![]);
    gateway_over(spec, policy)
}

/// A gateway whose one (and default) provider is `spec`.
fn gateway_over(spec: ProviderSpec, policy: Policy) -> Arc<Gateway> {
    Arc::new(unshared_gateway(spec, policy))
}

fn unshared_gateway(spec: ProviderSpec, policy: Policy) -> Gateway {
    let redactor = Redactor::new();
    let default_provider = spec.name.clone();
    let manager = Manager::new(vec![spec], redactor.clone());
    let audit = Arc::new(AuditLog::open_in_memory().unwrap());
    Gateway {
        manager,
        state: Arc::new(StateStore::open_in_memory().unwrap()),
        journal: keyhole_gateway::journal::Journal::start(Arc::clone(&audit)).unwrap(),
        audit,
        policy,
        redactor,
        default_provider,
        call_timeout: Duration::from_secs(5),
        client_write_timeout: keyhole_gateway::server::CLIENT_WRITE_TIMEOUT,
        owner_uid: OWNER,
    }
}

fn put(name: &str, value: &[u8]) -> ApiOp {
    put_in(name, None, value)
}

/// A put into `scope` (the default scope if `None`).
fn put_in(name: &str, scope: Option<&str>, value: &[u8]) -> ApiOp {
    ApiOp::Put {
        name: name.into(),
        provider: None,
        scope: scope.map(str::to_string),
        labels: BTreeMap::new(),
        value: SecretBytes::copy_from(value),
    }
}

/// A resolve of `handle`, for `purpose`.
fn resolve(handle: &str, purpose: &str) -> ApiOp {
    ApiOp::Resolve {
        handles: vec![handle.to_string()],
        purpose: purpose.into(),
    }
}

/// What the owner resolving `handle` for `purpose` gets.
async fn resolved(gw: &Arc<Gateway>, handle: &str, purpose: &str) -> Vec<ResolvedValue> {
    match gw.handle(&OWNER_CALLER, resolve(handle, purpose)).await {
        Ok(ApiReply::Resolved { values }) => values,
        other => panic!("resolve answered {other:?}"),
    }
}

fn describe(handle: &str) -> ApiOp {
    ApiOp::Describe {
        handle: handle.to_string(),
    }
}

const OWNER_CALLER: Caller = Caller {
    uid: OWNER,
    is_owner: true,
};
const STRANGER: Caller = Caller {
    uid: 4242,
    is_owner: false,
};

#[tokio::test]
async fn the_owner_may_and_a_stranger_may_not_and_both_are_audited() {
    let gw = gateway();
    let value = b"kh-canary-policy-0c9e";
    let ApiReply::Put { handle, .. } = gw
        .handle(&OWNER_CALLER, put("api/key", value))
        .await
        .unwrap()
    else {
        panic!("put answered something else");
    };
    // The value is now known to the redactor.
    assert_eq!(
        gw.redactor.redact_str("x kh-canary-policy-0c9e y"),
        "x [REDACTED] y"
    );

    let denied = gw
        .handle(&STRANGER, resolve(&handle, "curiosity"))
        .await
        .unwrap_err();
    assert_eq!(denied.code, ErrorCode::PermissionDenied);
    assert!(denied.message.contains("4242"), "{}", denied.message);
    let describe = gw.handle(&STRANGER, describe(&handle)).await.unwrap_err();
    assert_eq!(describe.code, ErrorCode::PermissionDenied);

    // Even the owner must say why.
    let no_purpose = gw
        .handle(&OWNER_CALLER, resolve(&handle, "  "))
        .await
        .unwrap_err();
    assert_eq!(no_purpose.code, ErrorCode::PermissionDenied);
    assert!(
        no_purpose.message.contains("purpose"),
        "{}",
        no_purpose.message
    );

    let values = resolved(&gw, &handle, "deploy").await;
    assert_eq!(values[0].value.expose(), value);

    // The stranger's list shows nothing of the owner's.
    let ApiReply::Listed { handles } = gw.handle(&STRANGER, ApiOp::List {}).await.unwrap() else {
        panic!()
    };
    assert!(handles.is_empty());

    // Every request left a record, denials included, and the chain is intact.
    let records = gw.audit.tail(100).unwrap();
    let summary: Vec<(String, String, String)> = records
        .iter()
        .map(|r| {
            (
                r.entry.who.clone(),
                r.entry.operation.clone(),
                r.entry.outcome.clone(),
            )
        })
        .collect();
    let expect = [
        ("uid:1000", "put", "ok"),
        ("uid:4242", "resolve", "denied"),
        ("uid:4242", "describe", "denied"),
        ("uid:1000", "resolve", "denied"),
        ("uid:1000", "resolve", "ok"),
        ("uid:4242", "list", "ok"),
    ];
    let expect: Vec<(String, String, String)> = expect
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect();
    assert_eq!(summary, expect);
    assert_eq!(records[4].entry.purpose.as_deref(), Some("deploy"));
    assert_eq!(records[4].entry.handle.as_deref(), Some(handle.as_str()));
    assert!(matches!(
        gw.audit.verify().unwrap(),
        VerifyReport::Intact { records: 6 }
    ));
}

#[tokio::test]
async fn rotate_and_revoke_go_through_the_provider() {
    let gw = gateway();
    let ApiReply::Put { handle, .. } = gw
        .handle(&OWNER_CALLER, put("db", b"first-value"))
        .await
        .unwrap()
    else {
        panic!()
    };
    let rotated = gw
        .handle(
            &OWNER_CALLER,
            ApiOp::Rotate {
                handle: handle.clone(),
                value: SecretBytes::copy_from(b"second-value"),
            },
        )
        .await
        .unwrap();
    assert!(matches!(rotated, ApiReply::Rotated { ref version } if version == "2"));
    gw.handle(
        &OWNER_CALLER,
        ApiOp::Revoke {
            handle: handle.clone(),
        },
    )
    .await
    .unwrap();
    let err = gw
        .handle(&OWNER_CALLER, resolve(&handle, "p"))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Revoked);
    let ApiReply::Described(v) = gw.handle(&OWNER_CALLER, describe(&handle)).await.unwrap() else {
        panic!()
    };
    assert_eq!(v.state, "revoked");
    // The secret comes back under the same name through a new handle; the revoked one stays
    // revoked until it is itself rotated.
    let ApiReply::Put { handle: again, .. } = gw
        .handle(&OWNER_CALLER, put("db", b"third-value"))
        .await
        .unwrap()
    else {
        panic!()
    };
    gw.handle(&OWNER_CALLER, resolve(&again, "p"))
        .await
        .unwrap();
    let err = gw
        .handle(&OWNER_CALLER, resolve(&handle, "p"))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Revoked, "{}", err.message);
    gw.handle(
        &OWNER_CALLER,
        ApiOp::Rotate {
            handle: handle.clone(),
            value: SecretBytes::copy_from(b"fourth-value"),
        },
    )
    .await
    .unwrap();
    let values = resolved(&gw, &handle, "p").await;
    assert_eq!(values[0].value.expose(), b"fourth-value");
    let junk = gw
        .handle(&OWNER_CALLER, describe("../../etc"))
        .await
        .unwrap_err();
    assert_eq!(junk.code, ErrorCode::InvalidRequest);
}

/// A memory provider in connect mode, with its token file.
async fn sidecar() -> (tempfile::TempDir, PathBuf, PathBuf, tokio::process::Child) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(
        &token_file,
        keyhole_transport::generate_token().unwrap().expose(),
    )
    .unwrap();
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
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !sock.exists() {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (dir, sock, token_file, child)
}

fn connect_spec(sock: PathBuf, token_file: PathBuf, uid: Option<u32>) -> ProviderSpec {
    ProviderSpec {
        name: "sidecar".into(),
        launch: Launch::Connect {
            socket: sock,
            token_file,
            expected_uid: uid,
        },
        handshake_timeout: Duration::from_secs(5),
        encoding: Encoding::Json,
    }
}

#[tokio::test]
async fn connect_mode_dials_a_running_provider() {
    let (_dir, sock, token_file, _child) = sidecar().await;
    let manager = Manager::new(vec![connect_spec(sock, token_file, None)], Redactor::new());
    let outcome = manager
        .call("sidecar", Op::Health {}, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(matches!(outcome, Outcome::Ok(_)));
}

#[tokio::test]
async fn connect_mode_refuses_a_provider_running_as_another_uid() {
    let (_dir, sock, token_file, _child) = sidecar().await;
    let manager = Manager::new(
        vec![connect_spec(sock, token_file, Some(54321))],
        Redactor::new(),
    );
    let err = manager
        .call("sidecar", Op::Health {}, Duration::from_secs(5))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("54321") && err.contains("refusing"), "{err}");
}

#[tokio::test]
async fn connect_mode_with_the_wrong_token_is_refused_clearly() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, sock, _token_file, _child) = sidecar().await;
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "not-the-token").unwrap();
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).unwrap();
    let manager = Manager::new(vec![connect_spec(sock, wrong, None)], Redactor::new());
    let err = manager
        .call("sidecar", Op::Health {}, Duration::from_secs(5))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("Unauthenticated"), "{err}");
}

/// A rule from its parts as a config file would spell them.
fn rule(
    effect: &str,
    callers: &[&str],
    operations: &[&str],
    scopes: &[&str],
) -> keyhole_gateway::policy::Rule {
    use keyhole_gateway::policy::Rule;
    Rule::new(
        effect.parse().unwrap(),
        callers.iter().map(|c| c.parse().unwrap()).collect(),
        operations.iter().map(|o| o.parse().unwrap()).collect(),
        scopes.iter().map(|s| s.parse().unwrap()).collect(),
        BTreeMap::new(),
    )
}

#[tokio::test]
async fn put_cannot_write_over_a_secret_the_caller_could_not_rotate() {
    // uid 4242 may put and resolve in ci/*, and nothing in prod.
    let gw = gateway_with(Policy::new(vec![
        rule("allow", &["owner"], &["*"], &["*"]),
        rule("allow", &["uid:4242"], &["put", "resolve"], &["ci/*"]),
    ]));
    let stored = |scope: &str, value: &[u8]| put_in("prod/db", Some(scope), value);
    let ApiReply::Put { handle: prod, .. } = gw
        .handle(&OWNER_CALLER, stored("prod", b"kh-canary-put-policy-80"))
        .await
        .unwrap()
    else {
        panic!("put answered something else");
    };
    // The same name from its own scope would replace what the prod handle resolves.
    let denied = gw
        .handle(&STRANGER, stored("ci/x", b"kh-canary-put-policy-81"))
        .await
        .unwrap_err();
    assert_eq!(
        denied.code,
        ErrorCode::PermissionDenied,
        "{}",
        denied.message
    );
    let values = resolved(&gw, &prod, "check").await;
    assert_eq!(values[0].value.expose(), b"kh-canary-put-policy-80");
    // A name nobody has a handle to is the caller's to create.
    let fresh = put_in("ci/token", Some("ci/x"), b"kh-canary-put-policy-82");
    gw.handle(&STRANGER, fresh).await.unwrap();
}

#[tokio::test]
async fn link_cannot_open_a_secret_the_caller_could_not_resolve() {
    // uid 4242 may put and resolve in ci/*; linking needs its own operation.
    let gw = gateway_with(Policy::new(vec![
        rule("allow", &["owner"], &["*"], &["*"]),
        rule("allow", &["uid:4242"], &["put", "resolve"], &["ci/*"]),
    ]));
    let stored = put_in("prod/db", Some("prod"), b"kh-canary-link-policy-77");
    gw.handle(&OWNER_CALLER, stored).await.unwrap();
    let link = |name: &str| ApiOp::Link {
        name: name.into(),
        provider: None,
        scope: Some("ci/x".into()),
        labels: BTreeMap::new(),
    };
    let denied = gw.handle(&STRANGER, link("prod/db")).await.unwrap_err();
    assert_eq!(
        denied.code,
        ErrorCode::PermissionDenied,
        "{}",
        denied.message
    );

    // Even with link allowed in its own scope, a secret that already has a handle in a scope
    // it may not resolve stays closed.
    let gw2 = gateway_with(Policy::new(vec![
        rule("allow", &["owner"], &["*"], &["*"]),
        rule(
            "allow",
            &["uid:4242"],
            &["put", "link", "resolve"],
            &["ci/*"],
        ),
    ]));
    let stored = put_in("prod/db", Some("prod"), b"kh-canary-link-policy-78");
    gw2.handle(&OWNER_CALLER, stored).await.unwrap();
    let denied = gw2.handle(&STRANGER, link("prod/db")).await.unwrap_err();
    assert_eq!(
        denied.code,
        ErrorCode::PermissionDenied,
        "{}",
        denied.message
    );
    // The owner may link it (it may resolve everywhere).
    let ApiReply::Put { handle, .. } = gw2.handle(&OWNER_CALLER, link("prod/db")).await.unwrap()
    else {
        panic!("link answered something else");
    };
    assert!(handle.starts_with("kh_"));
}

#[tokio::test]
async fn provider_text_that_carries_a_value_reaches_no_client() {
    // A provider that answers with the value as every version string, and as a label in
    // Describe: the client sees [REDACTED] in its place, in every reply.
    let gw = gateway_over(misbehaving_spec("leak-value"), Policy::owner_only());
    let first = "kh-leak-canary-first-71c2";
    let second = "kh-leak-canary-second-93ab";
    let mut replies = Vec::new();
    let put_reply = gw
        .handle(&OWNER_CALLER, put("db", first.as_bytes()))
        .await
        .unwrap();
    let ApiReply::Put { handle, .. } = &put_reply else {
        panic!("{put_reply:?}")
    };
    let handle = handle.clone();
    replies.push(serde_json::to_string(&put_reply).unwrap());
    let rotated = gw
        .handle(
            &OWNER_CALLER,
            ApiOp::Rotate {
                handle: handle.clone(),
                value: SecretBytes::copy_from(second.as_bytes()),
            },
        )
        .await
        .unwrap();
    replies.push(serde_json::to_string(&rotated).unwrap());
    let described = gw.handle(&OWNER_CALLER, describe(&handle)).await.unwrap();
    let ApiReply::Described(view) = &described else {
        panic!("{described:?}")
    };
    let secret = view.secret.as_ref().expect("the provider's description");
    assert_eq!(
        secret.labels.get("leaked").map(String::as_str),
        Some("[REDACTED]")
    );
    replies.push(serde_json::to_string(&described).unwrap());
    let values = resolved(&gw, &handle, "p").await;
    assert_eq!(values[0].value.expose(), second.as_bytes());
    assert_eq!(values[0].version, "[REDACTED]");
    for reply in &replies {
        assert!(reply.contains("[REDACTED]"), "{reply}");
        for value in [first, second] {
            assert!(!reply.contains(value), "{reply}");
        }
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_after_the_write_timeout() {
    use keyhole_gateway::api::ApiRequest;

    let spec = ProviderSpec::spawn("memory", workspace_bin("keyhole-provider-memory"), vec![]);
    let mut gw = unshared_gateway(spec, Policy::owner_only());
    gw.owner_uid = nix::unistd::geteuid().as_raw();
    gw.client_write_timeout = Duration::from_millis(300);
    let gw = Arc::new(gw);
    let value = vec![b'v'; 32 * 1024];
    let ApiReply::Put { handle, .. } = gw.handle(&OWNER_CALLER, put("big", &value)).await.unwrap()
    else {
        panic!()
    };
    let served = Served::start(Arc::clone(&gw), std::future::pending()).await;
    let (mut reader, mut writer) = served.client().await;
    // 200 answers of 32 KiB each are far more than the socket holds: the gateway's write waits
    // for a reader that only comes back after the write timeout.
    const ASKED: u64 = 200;
    let requests = tokio::spawn(async move {
        for id in 1..=ASKED {
            let op = resolve(&handle, "p");
            writer.queue(&ApiRequest { id, op }).unwrap();
            if writer.flush().await.is_err() {
                return;
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut answers = 0;
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match reader.next().await {
                Ok(Some(_)) => answers += 1,
                other => return other.map(|_| ()),
            }
        }
    })
    .await
    .expect("the gateway ended the connection");
    assert!(
        answers < ASKED,
        "{answers} answers: the gateway waited for the reader"
    );
    drop(end);
    requests.abort();
    served.task.abort();
}

/// The misbehaving provider, as `behaviour` (also its name).
fn misbehaving_spec(behaviour: &str) -> ProviderSpec {
    ProviderSpec::spawn(
        behaviour,
        workspace_bin("keyhole-provider-misbehaving"),
        vec!["--behaviour".into(), behaviour.into()],
    )
}

/// `keyhole_gateway::server::serve` on a socket in a private temporary directory.
struct Served {
    _dir: tempfile::TempDir,
    path: PathBuf,
    token: keyhole_protocol::Token,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Served {
    /// Serves `gw` until `shutdown` resolves; returns once the socket accepts.
    async fn start(
        gw: Arc<Gateway>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Served {
        let dir = tempfile::tempdir().unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        let path = dir.path().join("gw.sock");
        let token = keyhole_transport::generate_token().unwrap();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn({
            let (path, token) = (path.clone(), token.clone());
            async move {
                keyhole_gateway::server::serve(
                    gw,
                    &path,
                    token,
                    move || {
                        let _ = ready_tx.send(());
                        Ok(())
                    },
                    shutdown,
                )
                .await
            }
        });
        if ready_rx.await.is_err() {
            panic!("the gateway did not start: {:?}", task.await);
        }
        Served {
            _dir: dir,
            path,
            token,
            task,
        }
    }

    /// A client connection past the hello, speaking the client API.
    async fn client(
        &self,
    ) -> (
        keyhole_transport::FrameReader<keyhole_transport::BoxRead>,
        keyhole_transport::FrameWriter<keyhole_transport::BoxWrite>,
    ) {
        use keyhole_gateway::api::{API_MAJOR, ClientHello};
        use keyhole_protocol::{DEFAULT_MAX_FRAME, HANDSHAKE_MAJOR, HANDSHAKE_MAX_FRAME};
        use keyhole_transport::{FrameReader, FrameWriter, socket};

        let (read, write) = socket::into_halves(socket::connect(&self.path).await.unwrap());
        let mut reader = FrameReader::new(read, HANDSHAKE_MAX_FRAME);
        let mut writer =
            FrameWriter::new(write, HANDSHAKE_MAJOR, Encoding::Json, HANDSHAKE_MAX_FRAME);
        writer
            .queue(&ClientHello {
                token: self.token.clone(),
                majors: vec![API_MAJOR],
            })
            .unwrap();
        writer.flush().await.unwrap();
        reader.next().await.unwrap().expect("the gateway's hello");
        reader.set_cap(DEFAULT_MAX_FRAME);
        writer.set_format(API_MAJOR, Encoding::Json, DEFAULT_MAX_FRAME);
        (reader, writer)
    }
}

#[tokio::test]
async fn shutdown_answers_the_request_in_flight_and_then_closes_every_connection() {
    use keyhole_gateway::api::{ApiRequest, ApiResponse, ApiResult};

    // A provider that never answers holds a Put for the whole call timeout.
    let mut gw = unshared_gateway(misbehaving_spec("hang"), Policy::owner_only());
    gw.owner_uid = nix::unistd::geteuid().as_raw();
    gw.call_timeout = Duration::from_millis(1500);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = Served::start(Arc::new(gw), async {
        let _ = stopped.await;
    })
    .await;
    let (mut busy_reader, mut busy) = served.client().await;
    let (mut idle_reader, _idle) = served.client().await;
    // Connected, but no hello yet: the gateway would wait 5 s for it.
    let mut silent = tokio::net::UnixStream::connect(&served.path).await.unwrap();
    busy.queue(&ApiRequest {
        id: 7,
        op: put("in/flight", b"a value being stored"),
    })
    .unwrap();
    busy.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send(()).unwrap();

    // The idle connection closes at once; the gateway keeps going for the busy one.
    let idle_end = tokio::time::timeout(Duration::from_millis(500), idle_reader.next())
        .await
        .expect("the idle connection closes promptly");
    assert!(matches!(idle_end, Ok(None)), "{idle_end:?}");
    let mut byte = [0u8; 1];
    let silent_end = tokio::time::timeout(
        Duration::from_millis(500),
        tokio::io::AsyncReadExt::read(&mut silent, &mut byte),
    )
    .await
    .expect("a connection still in its hello closes promptly");
    assert_eq!(silent_end.unwrap(), 0);
    assert!(
        !served.task.is_finished(),
        "serve returned with a request in flight"
    );
    let frame = tokio::time::timeout(Duration::from_secs(5), busy_reader.next())
        .await
        .expect("answered within the drain")
        .unwrap()
        .expect("an answer, not the end of the connection");
    let answer: ApiResponse = keyhole_protocol::decode(Encoding::Json, frame.payload).unwrap();
    assert_eq!(answer.id, 7);
    assert!(
        matches!(&answer.result, ApiResult::Err(e) if e.code == ErrorCode::Unavailable),
        "{:?}",
        answer.result
    );
    let after = tokio::time::timeout(Duration::from_secs(2), busy_reader.next())
        .await
        .expect("then the connection closes");
    assert!(matches!(after, Ok(None)), "{after:?}");
    tokio::time::timeout(Duration::from_secs(2), served.task)
        .await
        .expect("serve returns once every connection ended")
        .unwrap()
        .unwrap();
}
