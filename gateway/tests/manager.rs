//! The provider manager against well-behaved and deliberately broken providers.

#![allow(clippy::unwrap_used)]

mod common;

use std::ffi::OsString;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::workspace_bin;
use keyhole_gateway::manager::{Manager, ManagerError, ProviderSpec};
use keyhole_gateway::redact::Redactor;
use keyhole_protocol::{Op, Outcome, Reply, SecretBytes};

fn memory(name: &str) -> ProviderSpec {
    ProviderSpec::spawn(name, workspace_bin("keyhole-provider-memory"), vec![])
}

fn misbehaving(behaviour: &str) -> ProviderSpec {
    ProviderSpec::spawn(
        behaviour,
        workspace_bin("keyhole-provider-misbehaving"),
        vec![OsString::from("--behaviour"), OsString::from(behaviour)],
    )
}

fn store(name: &str, value: &[u8]) -> Op {
    Op::Store {
        name: name.into(),
        value: SecretBytes::copy_from(value),
        create_only: false,
        labels: Default::default(),
    }
}

const DEADLINE: Duration = Duration::from_secs(3);

/// `answer` is `Unavailable`, and came within `limit` of `asked`.
fn unavailable_within(answer: &Result<Outcome, ManagerError>, asked: Instant, limit: Duration) {
    assert!(
        matches!(answer, Err(ManagerError::Unavailable { .. })),
        "{answer:?}"
    );
    assert!(asked.elapsed() < limit, "waited {:?}", asked.elapsed());
}

#[tokio::test]
async fn a_provider_that_stops_reading_fails_calls_within_their_deadline() {
    let manager = Manager::new(vec![misbehaving("stop-reading")], Redactor::new());
    for (_, started) in manager.start_all().await {
        started.unwrap();
    }
    // Far more than a Unix socket buffers: the write cannot finish while nobody reads.
    let big = vec![b'a'; 900 * 1024];
    let deadline = Duration::from_millis(500);
    let t = Instant::now();
    let stuck = manager
        .call("stop-reading", store("big", &big), deadline)
        .await;
    unavailable_within(&stuck, t, Duration::from_secs(3));
    let message = stuck.unwrap_err().to_string();
    assert!(message.contains("stopped reading"), "{message}");
    // The next call does not queue behind a write that never ends: the provider is restarted
    // (and, wedged again, answers nothing within this call's deadline).
    let t = Instant::now();
    let next = manager.call("stop-reading", Op::Health {}, deadline).await;
    unavailable_within(&next, t, Duration::from_secs(3));
}

#[tokio::test]
async fn a_provider_flooding_events_nobody_asked_for_is_cut_off() {
    // The gateway opens no watch: the first event breaks the protocol, and the connection is
    // closed before the flood can pile up in the gateway's memory.
    let manager = Manager::new(vec![misbehaving("unsolicited-events")], Redactor::new());
    let t = Instant::now();
    let answer = manager
        .call("unsolicited-events", Op::Health {}, DEADLINE)
        .await;
    unavailable_within(&answer, t, DEADLINE + Duration::from_secs(2));
    let message = answer.unwrap_err().to_string();
    assert!(
        message.contains("an event for watch 18446744073709551615, which is not open"),
        "{message}"
    );
}

#[tokio::test]
async fn broken_providers_fail_clearly_and_the_good_one_keeps_serving() {
    let specs = vec![
        memory("good"),
        misbehaving("exit-before-hello"),
        misbehaving("unknown-major"),
        misbehaving("hang"),
        misbehaving("garbage-frame"),
    ];
    let manager = Manager::new(specs, Redactor::new());
    let started: std::collections::BTreeMap<_, _> = manager.start_all().await.into_iter().collect();
    assert!(started["good"].is_ok());
    let exit = started["exit-before-hello"]
        .as_ref()
        .unwrap_err()
        .to_string();
    assert!(
        exit.contains("exited") && exit.contains("before connecting"),
        "{exit}"
    );
    let major = started["unknown-major"].as_ref().unwrap_err().to_string();
    assert!(major.contains("IncompatibleVersion"), "{major}");

    // The hanging provider answers nothing: Unavailable within the caller's deadline.
    let t = Instant::now();
    let hung = manager
        .call("hang", Op::Health {}, Duration::from_millis(300))
        .await;
    unavailable_within(&hung, t, Duration::from_secs(2));

    // The garbage provider breaks the connection: Unavailable, naming the fault.
    let garbage = manager
        .call("garbage-frame", Op::Health {}, DEADLINE)
        .await
        .unwrap_err()
        .to_string();
    assert!(garbage.contains("bad frame"), "{garbage}");

    // Through all of it, the good provider serves.
    let ok = manager
        .call("good", store("a", b"v"), DEADLINE)
        .await
        .unwrap();
    assert!(matches!(ok, Outcome::Ok(Reply::Stored { .. })));

    // A provider that cannot start is refused quickly while its backoff runs.
    let t = Instant::now();
    let again = manager
        .call("exit-before-hello", Op::Health {}, DEADLINE)
        .await;
    assert!(matches!(again, Err(ManagerError::Unavailable { .. })));
    assert!(t.elapsed() < Duration::from_secs(2));

    let unknown = manager.call("nope", Op::Health {}, DEADLINE).await;
    assert_eq!(unknown, Err(ManagerError::UnknownProvider("nope".into())));
    manager.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_provider_that_goes_away_is_restarted() {
    let manager = Manager::new(vec![memory("m")], Redactor::new());
    manager
        .call("m", store("k", b"v1"), DEADLINE)
        .await
        .unwrap();
    // Goodbye makes the provider exit; the manager does not know yet.
    let bye = manager.call("m", Op::Goodbye {}, DEADLINE).await.unwrap();
    assert_eq!(bye, Outcome::Ok(Reply::GoodbyeAck {}));
    // The next call finds the connection closed, restarts the provider, and is answered.
    let t = Instant::now();
    let mut answered = None;
    while t.elapsed() < Duration::from_secs(5) {
        match manager.call("m", Op::Health {}, DEADLINE).await {
            Ok(outcome) => {
                answered = Some(outcome);
                break;
            }
            Err(ManagerError::Unavailable { .. }) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        matches!(answered, Some(Outcome::Ok(Reply::Health(_)))),
        "{answered:?}"
    );
    let status = manager.status().await;
    assert_eq!(status[0].restarts, 1);
    assert!(status[0].ack.is_some());
    manager.shutdown(Duration::from_secs(1)).await;
}

/// A writer the test can read back, for capturing the gateway's log.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn provider_stderr_reaches_the_log_redacted() {
    let log = Captured::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let secret = b"kh-canary-stderr-4f1d9a7c";
    let redactor = Redactor::new();
    assert!(redactor.add(secret));
    // A provider that prints a known secret on stderr before it starts serving.
    let script = format!(
        "echo \"provider says {}\" >&2; exec \"$0\" \"$@\"",
        String::from_utf8_lossy(secret)
    );
    let spec = ProviderSpec::spawn(
        "noisy",
        "sh",
        vec![
            OsString::from("-c"),
            OsString::from(script),
            workspace_bin("keyhole-provider-memory").into(),
        ],
    );
    let manager = Manager::new(vec![spec], redactor);
    manager
        .call("noisy", Op::Health {}, DEADLINE)
        .await
        .unwrap();
    let t = Instant::now();
    let text = loop {
        let text = String::from_utf8_lossy(&log.0.lock().unwrap()).into_owned();
        if text.contains("provider says") || t.elapsed() > Duration::from_secs(3) {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(text.contains("provider says [REDACTED]"), "{text}");
    assert!(
        !text.contains(std::str::from_utf8(secret).unwrap()),
        "{text}"
    );
    manager.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_failed_start_quotes_no_part_of_a_value_its_output_cut_through() {
    // The provider prints a known value and then exactly enough to put a 4 KiB cut of its
    // raw output inside the value: the quoted tail must not begin with the value's remainder.
    let secret = "kh-canary-cut-q9Kx7w";
    let redactor = Redactor::new();
    assert!(redactor.add(secret.as_bytes()));
    let keep = 4096;
    let remainder = &secret[secret.len() - 7..];
    let last_line = "provider gives up\n";
    let filler = keep - remainder.len() - 1 - last_line.len(); // 1: the filler's newline
    let script = format!(
        "printf '%s' '{secret}' >&2; head -c {filler} /dev/zero | tr '\\0' . >&2; echo >&2; \
         printf '{last_line}' >&2; exit 3"
    );
    let spec = ProviderSpec::spawn(
        "cut",
        "sh",
        vec![OsString::from("-c"), OsString::from(script)],
    );
    let manager = Manager::new(vec![spec], redactor);
    let err = manager
        .call("cut", Op::Health {}, DEADLINE)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("provider gives up"), "{err}");
    assert!(err.contains("exited"), "{err}");
    assert!(!err.contains(remainder), "{err}");
    assert!(!err.contains(secret), "{err}");
    manager.shutdown(Duration::from_secs(1)).await;
}
