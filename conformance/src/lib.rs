//! The keyhole provider conformance suite.
//!
//! An external driver, like BoringSSL's BoGo runner: it speaks only the wire protocol, over the
//! real local socket and the real encoding, so it judges a provider written in any language the
//! same way. It checks every semantic rule of PROTOCOL.md and the protocol itself (handshake,
//! framing, concurrency, deadlines, cancellation, Goodbye, secrecy of values).
//!
//! Every wait has a deadline. A provider that hangs trips a breaker: the remaining cases fail at
//! once with the reason, so a broken provider fails the suite in seconds instead of hanging it.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod cases;
mod ctx;
mod report;
mod target;

use std::time::{Duration, Instant};

pub use keyhole_protocol::Encoding;
pub use report::{CaseResult, Report, Status};
pub use target::Target;

/// How to run the suite.
#[derive(Clone, Debug)]
pub struct Options {
    /// The encodings to test, each in a full pass of its own.
    pub encodings: Vec<Encoding>,
    /// Deadline of each request (the provider is told it; the suite waits 500 ms more).
    pub request_timeout: Duration,
    /// Deadline of each spawn-plus-handshake.
    pub handshake_timeout: Duration,
    /// Secrets that already exist in the provider, with their values. A read-only provider
    /// (one that declares no `store`) can only be checked against data it already has: the
    /// `fixture.*` cases resolve, pin, describe and list these, and are skipped when this is
    /// empty. Their values join the canary checks like the suite's own.
    pub fixtures: Vec<(String, keyhole_protocol::SecretBytes)>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            encodings: Encoding::ALL.to_vec(),
            request_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            fixtures: Vec::new(),
        }
    }
}

/// Names of every case, in the order they run (each runs once per encoding).
pub fn case_names() -> Vec<&'static str> {
    std::iter::once(cases::FIRST)
        .chain(cases::ALL.iter().map(|c| c.name))
        .chain(cases::FINAL.iter().copied())
        .collect()
}

/// Runs the whole suite against `target`, calling `on_case` as each case finishes.
pub async fn run(
    target: &Target,
    options: &Options,
    mut on_case: impl FnMut(&CaseResult),
) -> Report {
    let started = Instant::now();
    let mut results = Vec::new();
    for &encoding in &options.encodings {
        cases::run_encoding(target, options, encoding, &mut |r| {
            on_case(&r);
            results.push(r);
        })
        .await;
    }
    Report {
        results,
        elapsed: started.elapsed(),
    }
}
