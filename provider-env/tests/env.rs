//! Environment variables: the name mapping, what is skipped and how it is reported (by variable,
//! never by value), the default prefix, and the gateway's token.

#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

mod common;

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use keyhole_protocol::{ErrorCode, TOKEN_ENV};

use common::{expected_version, leaks, random_hex, start, unique_prefix};

#[tokio::test]
async fn variables_map_to_names_and_unservable_ones_are_skipped_by_name_only() {
    let p = unique_prefix();
    let canary = |label: &str| format!("kh-env-canary-{}-{label}", random_hex(8));
    let (db, api, empty, control, dup1, dup2) = (
        canary("db"),
        canary("api"),
        canary("empty"),
        canary("control"),
        canary("dup1"),
        canary("dup2"),
    );
    let binary: Vec<u8> = vec![0xff, 0xfe, 0x80, b'k', b'h'];
    let var = |suffix: &str| OsString::from(format!("{p}{suffix}"));
    let env: Vec<(OsString, OsString)> = vec![
        (var("DB_PASSWORD"), db.clone().into()),
        (var("API__KEY"), api.clone().into()),
        (var("TLS_CERT__PEM"), "cert".into()),
        (var("BIN"), OsString::from_vec(binary.clone())),
        (var(""), empty.clone().into()),
        (var("BAD\u{1}NAME"), control.clone().into()),
        (var("DUP"), dup1.clone().into()),
        (var("dup"), dup2.clone().into()),
    ];
    let running = start(&["--env-prefix".into(), p.clone().into()], &env).await;

    let names: Vec<String> = running.list("").await.into_iter().map(|d| d.name).collect();
    assert_eq!(names, ["api_key", "bin", "db/password", "tls/cert_pem"]);
    for (name, value) in [
        ("db/password", db.as_bytes()),
        ("api_key", api.as_bytes()),
        ("tls/cert_pem", b"cert"),
        ("bin", &binary),
    ] {
        let (v, version) = running.resolve(name, None).await.unwrap();
        assert_eq!(v.expose(), value, "{name}");
        assert_eq!(version, expected_version(name, value), "{name}");
        // Pinned to the current version: fine; to anything else: not kept.
        assert_eq!(
            running.resolve(name, Some(&version)).await.unwrap().1,
            version
        );
        let e = running.resolve(name, Some("1")).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::VersionUnavailable, "{e}");
    }
    let d = running.describe("db/password").await.unwrap();
    assert_eq!(d.labels["source"], "env");
    assert_eq!(d.labels["variable"], format!("{p}DB_PASSWORD"));
    for (skipped, code) in [
        ("", ErrorCode::InvalidRequest),
        ("bad\u{1}name", ErrorCode::InvalidRequest),
        ("dup", ErrorCode::NotFound),
        ("bad/name", ErrorCode::NotFound),
    ] {
        let e = running.resolve(skipped, None).await.unwrap_err();
        assert_eq!(e.code, code, "{skipped:?}: {e}");
    }

    let stderr = running.stop().await;
    let text = String::from_utf8_lossy(&stderr);
    // Each skipped variable is named, with the reason.
    for (var, why) in [
        (p.clone(), "invalid secret name (name is empty)"),
        (format!("{p}BAD\u{1}NAME"), "control character"),
        (format!("{p}DUP"), "all map to the secret name \"dup\""),
        (format!("{p}dup"), "all map to the secret name \"dup\""),
    ] {
        let line = text
            .lines()
            .find(|l| l.contains(&format!("{var:?} is not served")))
            .unwrap_or_else(|| panic!("no warning naming {var:?}:\n{text}"));
        assert!(line.contains(why), "{line}");
    }
    // No value, in any form, anywhere in stderr.
    for value in [&db, &api, &empty, &control, &dup1, &dup2] {
        assert!(!leaks(&stderr, value.as_bytes()), "{value} leaked:\n{text}");
    }
    assert!(!leaks(&stderr, &binary));
}

#[tokio::test]
async fn the_default_prefix_is_keyhole_secret() {
    let id = random_hex(4).to_uppercase();
    let value = format!("kh-env-canary-{}", random_hex(8));
    let env = [(
        OsString::from(format!("KEYHOLE_SECRET_T{id}_DB_PASSWORD")),
        OsString::from(&value),
    )];
    let running = start(&[], &env).await;
    let name = format!("t{}/db/password", id.to_lowercase());
    assert_eq!(
        running.resolve(&name, None).await.unwrap().0.expose(),
        value.as_bytes()
    );
    let stderr = running.stop().await;
    assert!(!leaks(&stderr, value.as_bytes()));
}

#[tokio::test]
async fn the_gateway_token_is_never_served_whatever_the_prefix() {
    let running = start(&["--env-prefix".into(), "KEYHOLE_".into()], &[]).await;
    let e = running.resolve("provider/token", None).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound, "{e}");
    assert!(
        running.list("provider").await.is_empty(),
        "the token is listed"
    );
    let stderr = running.stop().await;
    let text = String::from_utf8_lossy(&stderr);
    assert!(
        text.contains(&format!(
            "{TOKEN_ENV:?} is not served: it holds the gateway's one-time token"
        )),
        "{text}"
    );
}

#[tokio::test]
async fn no_env_serves_no_variables() {
    let p = unique_prefix();
    let env = [(OsString::from(format!("{p}X")), OsString::from("v"))];
    let running = start(&["--no-env".into(), "--env-prefix".into(), p.into()], &env).await;
    assert!(running.list("").await.is_empty());
    assert_eq!(
        running.resolve("x", None).await.unwrap_err().code,
        ErrorCode::NotFound
    );
    running.stop().await;
}

#[test]
fn an_empty_prefix_is_refused() {
    let out = std::process::Command::new(common::BIN)
        .args(["--env-prefix", "", "--connect", "/nonexistent/s"])
        .env(TOKEN_ENV, "t")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--env-prefix must not be empty") && stderr.contains("--no-env"),
        "{stderr}"
    );
}
