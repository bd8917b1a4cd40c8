//! Secrecy at rest and in logs: known random values, stored and rotated and revoked with debug
//! logging on, never appear in any file of the store (nor of a backup), nor in the provider's
//! stderr, raw or as base64 or hex. Neither does the key or the passphrase.

#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

mod common;

use std::ffi::OsString;
use std::path::Path;

use keyhole_protocol::{Encoding, ErrorCode};

use common::{Secret, TestStore, contains, leak_forms};

/// Fails if any form of any value appears in any file under `dir`.
fn assert_no_file_holds(dir: &Path, values: &[(&str, Vec<u8>)], when: &str) {
    let files = common::walk(dir);
    assert!(!files.is_empty(), "{} is empty", dir.display());
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        assert_not_in(&bytes, values, &format!("{} ({when})", file.display()));
    }
}

fn assert_not_in(hay: &[u8], values: &[(&str, Vec<u8>)], place: &str) {
    for (label, value) in values {
        for (form, needle) in leak_forms(value) {
            assert!(
                !contains(hay, &needle),
                "{label} appears in {place}, as {form}"
            );
        }
    }
}

async fn run_canaries(store: &TestStore, unlock: Vec<u8>) {
    let secret_values: Vec<(&str, Vec<u8>)> = vec![
        ("value 1", common::random_bytes(24)),
        ("value 2", common::random_bytes(32)),
        ("value 3", common::random_bytes(17)),
        (
            "text value",
            format!("sk_live_{}", common::hex_lower(&common::random_bytes(16))).into_bytes(),
        ),
    ];
    let mut values = secret_values.clone();
    values.push(("the key or passphrase", unlock));

    let served = common::try_serve_with(
        store.serve_args(),
        &[("KEYHOLE_LOG", "debug")],
        Encoding::Json,
    )
    .await
    .unwrap();
    let c = &served.client;
    let name = "canary/value";
    let (v1, v2, v3, text) = (
        &secret_values[0].1,
        &secret_values[1].1,
        &secret_values[2].1,
        &secret_values[3].1,
    );
    assert_eq!(common::store(c, name, v1).await, "1");
    assert_eq!(common::rotate(c, name, v2).await, "2");
    assert_eq!(common::rotate(c, name, v3).await, "3");
    common::store(c, "canary/text", text).await;
    common::assert_resolves(c, name, Some("1"), v1).await;
    common::assert_resolves(c, name, Some("2"), v2).await;
    common::assert_resolves(c, name, None, v3).await;
    common::assert_resolves(c, "canary/text", None, text).await;
    common::describe(c, name).await;
    assert_no_file_holds(&store.dir, &values, "after store and rotate");

    // A backup is as encrypted as the store.
    let backup = store.path("backup");
    common::cli([
        OsString::from("backup"),
        "--store".into(),
        store.dir.clone().into(),
        "--to".into(),
        backup.clone().into(),
    ])
    .await
    .ok();
    assert_no_file_holds(&backup, &values, "a backup");

    common::revoke(c, name).await;
    common::revoke(c, "canary/text").await;
    common::expect_err(
        common::resolve(c, name, Some("1")).await,
        ErrorCode::Revoked,
        "pinned resolve after revoke",
    );
    let process = served.stop().await;
    assert_no_file_holds(&store.dir, &values, "after revoke");
    let stderr = process.output().bytes();
    assert_not_in(
        &stderr,
        &values,
        "the provider's stderr (KEYHOLE_LOG=debug)",
    );

    let mut args: Vec<OsString> = vec!["verify".into(), backup.clone().into()];
    args.extend(store.secret.args());
    let run = common::cli(&args).await.ok();
    assert_not_in(run.stdout.as_bytes(), &values, "verify's stdout");
    assert_not_in(run.stderr.as_bytes(), &values, "verify's stderr");
}

#[tokio::test]
async fn no_value_or_key_is_stored_or_logged_in_any_form_with_a_key_file() {
    let store = common::key_store().await;
    let Secret::KeyFile(key) = &store.secret else {
        unreachable!()
    };
    let key = std::fs::read(key).unwrap();
    run_canaries(&store, key).await;
}

#[tokio::test]
async fn no_value_or_passphrase_is_stored_or_logged_in_any_form_with_a_passphrase() {
    let passphrase = format!("pp-{}", common::hex_lower(&common::random_bytes(12)));
    let store = common::passphrase_store(&passphrase).await;
    run_canaries(&store, passphrase.into_bytes()).await;
}

#[test]
fn base64_helper_matches_known_vectors() {
    use common::base64;
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foo"), "Zm9v");
    assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    assert_eq!(base64(&[0x00, 0xff, 0x6b, 0x68]), "AP9raA==");
}

#[test]
fn leak_forms_find_a_value_anywhere_inside_longer_base64_or_hex() {
    let v = common::random_bytes(20);
    for prefix in 0..3 {
        let mut longer = common::random_bytes(prefix + 1);
        longer.extend_from_slice(&v);
        longer.extend(common::random_bytes(5));
        let text = common::base64(&longer);
        assert!(
            leak_forms(&v)
                .iter()
                .any(|(_, f)| contains(text.as_bytes(), f)),
            "prefix {prefix}"
        );
        let hex = common::hex_lower(&longer).to_uppercase();
        assert!(
            leak_forms(&v)
                .iter()
                .any(|(_, f)| contains(hex.as_bytes(), f))
        );
    }
}
