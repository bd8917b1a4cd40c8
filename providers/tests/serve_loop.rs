//! The serve loop's own guarantees, through the in-process harness, with a provider whose
//! operations take as long as the test says.

#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use keyhole_protocol::{
    Capabilities, Description, Encoding, ErrorCode, HealthReport, HealthStatus, Op, OpKind,
    Outcome, ProviderError, ProviderInfo, Reply, SecretBytes, SecretState,
};
use keyhole_providers::testing::Harness;
use keyhole_providers::{Provider, Resolved};

/// Resolves `sleep/<ms>` after that many milliseconds; counts operations dropped unfinished.
#[derive(Default)]
struct Slow {
    dropped: Arc<AtomicUsize>,
}

struct DropCounter(Arc<AtomicUsize>, bool);

impl Drop for DropCounter {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Provider for Slow {
    fn info(&self) -> ProviderInfo {
        ProviderInfo {
            name: "slow".into(),
            version: "0".into(),
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            store: false,
            rotate: false,
            revoke: false,
            list: false,
            watch: false,
            versions_kept: 1,
            max_value_size: 1024,
        }
    }

    async fn resolve(&self, name: &str, _: Option<&str>) -> Result<Resolved, ProviderError> {
        let mut guard = DropCounter(Arc::clone(&self.dropped), false);
        let ms: u64 = name
            .strip_prefix("sleep/")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| ProviderError::not_found(name))?;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        guard.1 = true;
        Ok(Resolved {
            value: SecretBytes::copy_from(name.as_bytes()),
            version: "1".into(),
        })
    }

    async fn describe(&self, name: &str) -> Result<Description, ProviderError> {
        Ok(Description {
            name: name.into(),
            state: SecretState::Active,
            current_version: Some("1".into()),
            versions: vec![],
            created_at_ms: 0,
            updated_at_ms: 0,
            labels: Default::default(),
        })
    }

    async fn health(&self) -> HealthReport {
        HealthReport {
            status: HealthStatus::Ok,
            detail: String::new(),
        }
    }
}

fn resolve(ms: u64) -> Op {
    Op::Resolve {
        name: format!("sleep/{ms}"),
        version: None,
    }
}

#[tokio::test]
async fn answers_come_back_out_of_order() {
    let h = Harness::start(Slow::default()).await.unwrap();
    let c = h.client();
    let started = Instant::now();
    let slow = c
        .start_call(resolve(400), Duration::from_secs(5))
        .await
        .unwrap();
    let fast = c
        .start_call(resolve(0), Duration::from_secs(5))
        .await
        .unwrap();
    let fast_answer = c.finish(fast).await.unwrap();
    let fast_at = started.elapsed();
    assert!(matches!(fast_answer, Outcome::Ok(Reply::Resolved { .. })));
    assert!(
        fast_at < Duration::from_millis(300),
        "the fast answer waited {fast_at:?}"
    );
    let slow_answer = c.finish(slow).await.unwrap();
    assert!(
        matches!(slow_answer, Outcome::Ok(Reply::Resolved { ref value, .. }) if value.expose() == b"sleep/400")
    );
}

#[tokio::test]
async fn a_deadline_interrupts_a_running_operation() {
    let provider = Slow::default();
    let dropped = Arc::clone(&provider.dropped);
    let h = Harness::start(provider).await.unwrap();
    let started = Instant::now();
    let outcome = h
        .client()
        .call(resolve(10_000), Duration::from_millis(50))
        .await
        .unwrap();
    let Outcome::Err(e) = outcome else {
        panic!("expected an error")
    };
    assert_eq!(e.code, ErrorCode::DeadlineExceeded);
    assert!(e.retryable);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        dropped.load(Ordering::SeqCst),
        1,
        "the operation was not stopped"
    );
}

#[tokio::test]
async fn cancel_answers_the_target_first_and_stops_it() {
    let provider = Slow::default();
    let dropped = Arc::clone(&provider.dropped);
    let h = Harness::start(provider).await.unwrap();
    let c = h.client();
    let target = c
        .start_call(resolve(10_000), Duration::from_secs(30))
        .await
        .unwrap();
    let id = target.id;
    let ack = c
        .call(Op::Cancel { id }, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(ack, Outcome::Ok(Reply::CancelAck { found: true }));
    // The target's answer was sent before the CancelAck, so it is already here.
    let answer = tokio::time::timeout(Duration::from_millis(100), c.finish(target))
        .await
        .expect("the cancelled request was answered before its CancelAck")
        .unwrap();
    assert!(matches!(answer, Outcome::Err(ref e) if e.code == ErrorCode::Cancelled));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(dropped.load(Ordering::SeqCst), 1);
    let again = c
        .call(Op::Cancel { id }, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(again, Outcome::Ok(Reply::CancelAck { found: false }));
}

#[tokio::test]
async fn goodbye_answers_everything_in_flight() {
    let h = Harness::start(Slow::default()).await.unwrap();
    let c = h.client();
    let pending: Vec<_> = futures_join(c, 5).await;
    let bye = c
        .call(Op::Goodbye {}, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(bye, Outcome::Ok(Reply::GoodbyeAck {}));
    for p in pending {
        let answer = c.finish(p).await.unwrap();
        assert!(matches!(answer, Outcome::Err(ref e) if e.code == ErrorCode::Cancelled));
    }
    assert!(c.wait_closed(Duration::from_secs(2)).await.is_some());
}

async fn futures_join(
    c: &keyhole_transport::client::Client,
    n: usize,
) -> Vec<keyhole_transport::client::PendingCall> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            c.start_call(resolve(10_000), Duration::from_secs(30))
                .await
                .unwrap(),
        );
    }
    out
}

#[tokio::test]
async fn undeclared_operations_are_unsupported_and_never_reach_the_provider() {
    for encoding in Encoding::ALL {
        let h = Harness::start_with(Slow::default(), encoding)
            .await
            .unwrap();
        let err = h.store("x", b"v").await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Unsupported));
        let Err(keyhole_providers::testing::HarnessError::Provider(e)) = h.revoke("x").await else {
            panic!("expected a provider error");
        };
        assert_eq!(e.op, Some(OpKind::Revoke));
    }
}

#[tokio::test]
async fn names_are_validated_before_the_provider_sees_them() {
    let h = Harness::start(Slow::default()).await.unwrap();
    for bad in ["", "a\u{0}b", &"n".repeat(1025)] {
        let err = h.resolve(bad).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::InvalidRequest), "{bad:?}");
    }
}

#[tokio::test]
async fn a_wrong_token_is_refused() {
    use keyhole_transport::client::{HandshakeError, HelloOptions, handshake};
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let (r, w) = tokio::io::split(theirs);
    let right = keyhole_transport::generate_token().unwrap();
    tokio::spawn(async move {
        keyhole_providers::serve_connection(
            Arc::new(Slow::default()),
            Box::new(r),
            Box::new(w),
            &right,
            &Default::default(),
        )
        .await
    });
    let (r, w) = tokio::io::split(ours);
    let wrong = keyhole_transport::generate_token().unwrap();
    let result = handshake(
        Box::new(r),
        Box::new(w),
        &HelloOptions::new(wrong, Encoding::Json),
        Duration::from_secs(5),
    )
    .await;
    match result {
        Err(HandshakeError::Rejected(r)) => {
            assert_eq!(r.code, keyhole_protocol::RejectCode::Unauthenticated)
        }
        Err(e) => panic!("expected a reject, got {e}"),
        Ok(_) => panic!("a wrong token was accepted"),
    }
}

#[tokio::test]
async fn a_gateway_that_stops_reading_ends_the_connection_within_the_write_timeout() {
    use keyhole_protocol::Request;
    use keyhole_providers::{ServeOptions, serve_connection};
    use keyhole_transport::client::{HelloOptions, handshake};

    // A small pipe, a gateway that sends requests and never reads an answer: the answers fill
    // the pipe, and the provider's write waits. It must give up after the write timeout.
    let (ours, theirs) = tokio::io::duplex(4096);
    let token = keyhole_transport::generate_token().unwrap();
    let provider_token = token.clone();
    let (read, write) = tokio::io::split(theirs);
    let options = ServeOptions {
        write_timeout: Duration::from_millis(300),
        ..ServeOptions::default()
    };
    let served = tokio::spawn(async move {
        serve_connection(
            Arc::new(Slow::default()),
            Box::new(read),
            Box::new(write),
            &provider_token,
            &options,
        )
        .await
    });
    let (read, write) = tokio::io::split(ours);
    let (_reader, mut writer, _ack) = handshake(
        Box::new(read),
        Box::new(write),
        &HelloOptions::new(token, Encoding::Bincode),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let started = Instant::now();
    // The gateway's own writes stall too once the provider stops reading: keep them apart.
    let _requests = tokio::spawn(async move {
        for id in 1..=10_000u64 {
            let request = Request {
                id,
                timeout_ms: 5_000,
                op: resolve(0),
            };
            if writer.queue(&request).is_err() || writer.flush().await.is_err() {
                return;
            }
        }
    });
    let ended = tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .expect("the provider gave up on the write")
        .unwrap();
    let err = ended.expect_err("a write that timed out ends the connection with an error");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    assert!(err.to_string().contains("did not take"), "{err}");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
}
