//! The conformance suite, run against the env provider exactly as the gateway starts it, in both
//! encodings, with fixtures from all three kinds of source: environment variables, a kubelet
//! Secret volume and a directory of plain files. Store, rotate and revoke are skipped by
//! capability; the `fixture.*` cases check resolve, pins, describe and list on the fixtures.

#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

mod common;

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use keyhole_conformance::{Options, Report, Status, Target};
use keyhole_protocol::SecretBytes;

use common::{Kubelet, random_hex, unique_prefix};

fn lines(report: &Report) -> String {
    report
        .results
        .iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

fn canary(label: &str) -> Vec<u8> {
    format!("kh-env-fixture-{}-{label}", random_hex(8)).into_bytes()
}

#[tokio::test]
async fn the_env_provider_passes_every_case_with_fixtures_in_both_encodings() {
    let prefix = unique_prefix();
    let mut fixtures: Vec<(String, Vec<u8>)> = Vec::new();

    // Environment variables. The suite starts the provider itself and offers no way to add
    // variables, so the target is `env VAR=VALUE... keyhole-provider-env ...`, which execs the
    // provider in place (same process, same pid, same stderr).
    let mut args: Vec<OsString> = Vec::new();
    for (suffix, name, value) in [
        ("APP_DB_PASSWORD", "app/db/password", canary("env-db")),
        ("APP_API__KEY", "app/api_key", canary("env-api")),
        ("BINARY", "binary", {
            let mut v = canary("env-bin");
            v.extend([0xff, 0xfe, 0x80]);
            v
        }),
    ] {
        let mut assignment = format!("{prefix}{suffix}=").into_bytes();
        assignment.extend(&value);
        args.push(OsString::from_vec(assignment));
        fixtures.push((name.into(), value));
    }
    args.push(common::BIN.into());
    args.extend(["--env-prefix".into(), prefix.into()]);

    // A kubelet Secret volume, under the name prefix `k8s/`.
    let mut kubelet = Kubelet::new();
    let k8s: Vec<(&str, Vec<u8>)> = vec![
        ("password", canary("k8s-password")),
        (".dockerconfigjson", canary("k8s-docker")),
        ("binary", {
            let mut v = canary("k8s-bin");
            v.extend([0x00, 0xff, 0x01]);
            v
        }),
    ];
    let refs: Vec<(&str, &[u8])> = k8s.iter().map(|(k, v)| (*k, v.as_slice())).collect();
    kubelet.publish(&refs);
    for (key, value) in &k8s {
        fixtures.push((format!("k8s/{key}"), value.clone()));
    }
    args.extend([
        "--dir".into(),
        OsString::from(format!("k8s/={}", kubelet.path().display())),
    ]);

    // Plain files, under `local/`.
    let flat = tempfile::tempdir().unwrap();
    let token = canary("flat-token");
    std::fs::write(flat.path().join("token"), &token).unwrap();
    fixtures.push(("local/token".into(), token));
    args.extend([
        "--dir".into(),
        OsString::from(format!("local/={}", flat.path().display())),
    ]);

    let target = Target::Spawn {
        program: "env".into(),
        args,
    };
    let options = Options {
        fixtures: fixtures
            .into_iter()
            .map(|(n, v)| (n, SecretBytes::new(v)))
            .collect(),
        ..Options::default()
    };
    let report = keyhole_conformance::run(&target, &options, |_| {}).await;
    assert_eq!(report.failed(), 0, "{}", lines(&report));
    assert_eq!(
        report.results.len(),
        2 * keyhole_conformance::case_names().len(),
        "{}",
        lines(&report)
    );
    let status = |case: &str| -> Vec<&Status> {
        report
            .results
            .iter()
            .filter(|r| r.name == case)
            .map(|r| &r.status)
            .collect()
    };
    // What a read-only provider can be judged on was judged, in both encodings.
    for case in [
        "handshake.accept",
        "resolve.never-existed",
        "fixture.resolve",
        "fixture.describe",
        "fixture.list",
        "fixture.read-only",
        "unsupported.declared",
        "concurrency.64-out-of-order",
        "cancel.in-flight",
        "canary.errors",
        "canary.stderr",
        "goodbye.clean-exit",
    ] {
        let got = status(case);
        assert!(
            got.len() == 2 && got.iter().all(|s| **s == Status::Pass),
            "{case}: {got:?}"
        );
    }
    // The write cases are skipped, by capability, not failed.
    for case in [
        "store.round-trip",
        "rotate.new-version",
        "revoke.resolve-revoked",
    ] {
        let got = status(case);
        assert!(
            got.iter().all(|s| matches!(s, Status::Skip(_))),
            "{case}: {got:?}"
        );
    }
}
