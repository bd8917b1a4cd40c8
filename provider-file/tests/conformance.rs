//! The conformance suite, run against the file provider exactly as the gateway starts it, in both
//! encodings, on a key-file store and on a passphrase store. The suite starts a fresh process for
//! every connection it needs, so it also checks that the store persists between processes.

#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

mod common;

use std::ffi::OsString;
use std::time::Duration;

use keyhole_conformance::{Options, Report, Status, Target};

use common::TestStore;

fn lines(report: &Report) -> String {
    report
        .results
        .iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

async fn suite(store: &TestStore, extra: &[&str]) -> Report {
    let mut args = store.serve_args();
    args.extend(extra.iter().map(OsString::from));
    let target = Target::Spawn {
        program: common::BIN.into(),
        args,
    };
    let options = Options {
        // Each connection is a fresh process that derives or loads the key first.
        handshake_timeout: Duration::from_secs(30),
        ..Options::default()
    };
    keyhole_conformance::run(&target, &options, |_| {}).await
}

fn assert_passes(report: &Report) {
    assert_eq!(report.failed(), 0, "{}", lines(report));
    assert_eq!(
        report.results.len(),
        2 * keyhole_conformance::case_names().len(),
        "{}",
        lines(report)
    );
    // The operations it declares were judged, not skipped.
    for case in [
        "store.round-trip",
        "rotate.history-limit",
        "revoke.resolve-revoked",
        "revoke.restore-by-rotate",
        "list.prefix-and-pages",
        "canary.stderr",
    ] {
        let passes = report
            .results
            .iter()
            .filter(|r| r.name == case && matches!(r.status, Status::Pass))
            .count();
        assert_eq!(passes, 2, "{case} did not pass in both encodings");
    }
}

#[tokio::test]
async fn a_key_file_store_passes_every_case_in_both_encodings() {
    let store = common::key_store().await;
    let report = suite(&store, &[]).await;
    assert_passes(&report);
    // Watch is not declared: the suite skips its case rather than failing it.
    assert!(
        report
            .results
            .iter()
            .any(|r| r.name == "watch.events" && matches!(r.status, Status::Skip(_)))
    );
}

#[tokio::test]
async fn a_passphrase_store_passes_every_case_in_both_encodings() {
    let store = common::passphrase_store("correct horse battery staple").await;
    let report = suite(&store, &[]).await;
    assert_passes(&report);
}

#[tokio::test]
async fn a_store_keeping_one_version_with_a_small_max_passes() {
    let store = common::key_store().await;
    let report = suite(&store, &["--versions-kept", "1", "--max-value-size", "100"]).await;
    assert_passes(&report);
}
