//! Keys and passphrases: a wrong one is named as such and never yields garbage; key and
//! passphrase files others can read are refused unless the danger flag says otherwise; weak Argon2
//! parameters are refused at init; `--generate-key` makes a private 32-byte key.

#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

mod common;

use std::ffi::OsString;
use std::path::Path;

use common::{Secret, TestStore};

const WRONG: &str = "wrong key or passphrase";

fn os(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    args.iter().map(|a| a.as_ref().to_owned()).collect()
}

fn verify_args(store: &TestStore, secret: &Secret) -> Vec<OsString> {
    let mut args = os(&[&"verify", &store.dir]);
    args.extend(secret.args());
    args
}

fn serve_args(store: &TestStore, secret: &Secret) -> Vec<OsString> {
    let mut args = os(&[&"--store", &store.dir]);
    args.extend(secret.args());
    args
}

/// Stores one secret so a wrong key has something it could misread.
async fn with_a_secret(store: &TestStore) {
    let served = common::serve(store, &[]).await;
    common::store(&served.client, "db/password", b"the real value").await;
    served.stop().await;
}

#[tokio::test]
async fn a_wrong_key_file_is_named_as_such() {
    let store = common::key_store().await;
    with_a_secret(&store).await;
    let wrong = store.path("wrong.key");
    common::write_file(&wrong, &common::random_bytes(32), 0o600);
    let wrong = Secret::KeyFile(wrong);

    let message = common::serve_fails(serve_args(&store, &wrong)).await;
    assert!(message.contains(WRONG), "{message}");
    common::cli(verify_args(&store, &wrong))
        .await
        .fails_with(WRONG);
    // The right key still opens it.
    let served = common::serve(&store, &[]).await;
    common::assert_resolves(&served.client, "db/password", None, b"the real value").await;
}

#[tokio::test]
async fn a_wrong_passphrase_is_named_as_such() {
    let store = common::passphrase_store("the right passphrase").await;
    with_a_secret(&store).await;
    for (file, content) in [
        ("wrong", "the wrong passphrase\n"),
        ("prefix", "the right passphrase and more\n"),
        ("case", "The right passphrase\n"),
    ] {
        let path = store.path(file);
        common::write_file(&path, content.as_bytes(), 0o600);
        let wrong = Secret::Passphrase(path);
        let message = common::serve_fails(serve_args(&store, &wrong)).await;
        assert!(message.contains(WRONG), "{file}: {message}");
        common::cli(verify_args(&store, &wrong))
            .await
            .fails_with(WRONG);
    }
}

#[tokio::test]
async fn the_trailing_newline_of_a_passphrase_file_is_not_part_of_it() {
    // The store was made from "phrase\n"; "phrase" without a newline opens it.
    let store = common::passphrase_store("phrase").await;
    with_a_secret(&store).await;
    let bare = store.path("bare");
    common::write_file(&bare, b"phrase", 0o600);
    let served = common::try_serve_with(
        serve_args(&store, &Secret::Passphrase(bare)),
        &[],
        keyhole_protocol::Encoding::Json,
    )
    .await
    .unwrap();
    common::assert_resolves(&served.client, "db/password", None, b"the real value").await;
}

#[tokio::test]
async fn a_key_file_others_can_read_is_refused_unless_in_danger_mode() {
    let store = common::key_store().await;
    with_a_secret(&store).await;
    let Secret::KeyFile(key) = &store.secret else {
        unreachable!()
    };
    for mode in [0o644, 0o640, 0o604, 0o660] {
        common::write_file(key, &std::fs::read(key).unwrap(), mode);
        let message = common::serve_fails(store.serve_args()).await;
        assert!(
            message.contains(&key.display().to_string()) && message.contains("chmod 600"),
            "mode {mode:o}: the error does not name the file and the fix: {message}"
        );
        common::cli(verify_args(&store, &store.secret))
            .await
            .fails();
    }
    // The danger flag allows it.
    let served = common::serve(&store, &["--danger-allow-insecure-key-file"]).await;
    common::assert_resolves(&served.client, "db/password", None, b"the real value").await;
    served.stop().await;
    // Stricter than 0600 is fine.
    common::write_file(key, &std::fs::read(key).unwrap(), 0o400);
    let served = common::serve(&store, &[]).await;
    common::assert_resolves(&served.client, "db/password", None, b"the real value").await;
}

#[tokio::test]
async fn a_passphrase_file_others_can_read_is_refused() {
    let store = common::passphrase_store("pass phrase").await;
    let Secret::Passphrase(file) = &store.secret else {
        unreachable!()
    };
    common::write_file(file, b"pass phrase\n", 0o644);
    let message = common::serve_fails(store.serve_args()).await;
    assert!(message.contains("chmod 600"), "{message}");
    common::serve(&store, &["--danger-allow-insecure-key-file"])
        .await
        .stop()
        .await;
}

#[tokio::test]
async fn init_refuses_an_insecure_or_malformed_key_file() {
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("k");
    let dir = tmp.path().join("store");
    let init = |extra: &[&str]| {
        let mut args = os(&[&"init", &"--store", &dir, &"--key-file", &key]);
        args.extend(extra.iter().map(OsString::from));
        args
    };
    common::write_file(&key, &[1u8; 32], 0o644);
    common::cli(init(&[])).await.fails();
    assert!(!dir.join("header.json").exists());
    for len in [0, 31, 33, 64] {
        common::write_file(&key, &vec![1u8; len], 0o600);
        common::cli(init(&[])).await.fails_with("32");
        assert!(!dir.join("header.json").exists(), "{len}-byte key");
    }
    // A 32-byte key readable by others is accepted in danger mode.
    common::write_file(&key, &[1u8; 32], 0o644);
    common::cli(init(&["--danger-allow-insecure-key-file"]))
        .await
        .ok();
    assert!(dir.join("header.json").exists());
}

/// A directory with a passphrase file, and where a store would go.
fn passphrase_dir() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let pass = tmp.path().join("pass");
    common::write_file(&pass, b"pass phrase\n", 0o600);
    let dir = tmp.path().join("store");
    (tmp, pass, dir)
}

/// `init` of a passphrase store with these Argon2id parameters (one lane).
fn init_argon2(dir: &Path, pass: &Path, memory: &str, iterations: &str) -> Vec<OsString> {
    os(&[
        &"init",
        &"--store",
        &dir,
        &"--passphrase-file",
        &pass,
        &"--argon2-memory-kib",
        &memory,
        &"--argon2-iterations",
        &iterations,
        &"--argon2-parallelism",
        &"1",
    ])
}

#[tokio::test]
async fn init_refuses_argon2_below_the_floor_naming_it() {
    let (_tmp, pass, dir) = passphrase_dir();
    let init = |memory: &str, iterations: &str| init_argon2(&dir, &pass, memory, iterations);
    common::cli(init("8192", "2")).await.fails_with("19456");
    common::cli(init("19455", "3")).await.fails_with("19456");
    let run = common::cli(init("19456", "1"))
        .await
        .fails_with("iterations");
    assert!(run.stderr.contains('2'), "{}", run.show());
    assert!(!dir.join("header.json").exists());
    // At the floor it works.
    common::cli(init("19456", "2")).await.ok();
    assert!(dir.join("header.json").exists());
}

#[tokio::test]
async fn a_header_asking_for_argon2_above_the_ceiling_is_refused_before_deriving() {
    let (_tmp, pass, dir) = passphrase_dir();
    common::cli(init_argon2(&dir, &pass, "19456", "2"))
        .await
        .ok();
    let header = dir.join("header.json");
    let text = std::fs::read_to_string(&header).unwrap();
    assert!(text.contains("\"memory_kib\": 19456"), "{text}");
    // Sixteen TiB of memory: a damaged header must fail at once, not take the machine down.
    std::fs::write(
        &header,
        text.replace("\"memory_kib\": 19456", "\"memory_kib\": 4294967295"),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let run = common::cli(os(&[&"verify", &dir, &"--passphrase-file", &pass]))
        .await
        .fails_with("ceiling");
    assert!(run.stderr.contains("4294967295"), "{}", run.show());
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

#[tokio::test]
async fn generate_key_writes_a_private_32_byte_key_and_never_overwrites() {
    let store = common::key_store().await;
    let Secret::KeyFile(key) = &store.secret else {
        unreachable!()
    };
    let bytes = std::fs::read(key).unwrap();
    assert_eq!(bytes.len(), 32);
    assert_eq!(common::mode_of(key), 0o600);
    assert_ne!(bytes, [0u8; 32]);

    // Another store, another key.
    let other = common::key_store().await;
    let Secret::KeyFile(other_key) = &other.secret else {
        unreachable!()
    };
    assert_ne!(std::fs::read(other_key).unwrap(), bytes);

    // An existing file is never overwritten.
    let dir = store.path("second");
    let run = common::cli(os(&[
        &"init",
        &"--store",
        &dir,
        &"--key-file",
        key,
        &"--generate-key",
    ]))
    .await;
    run.fails();
    assert_eq!(std::fs::read(key).unwrap(), bytes);
    assert!(!dir.join("header.json").exists());
}

#[tokio::test]
async fn init_refuses_an_existing_store() {
    let store = common::key_store().await;
    with_a_secret(&store).await;
    let Secret::KeyFile(key) = &store.secret else {
        unreachable!()
    };
    let run = common::cli(os(&[&"init", &"--store", &store.dir, &"--key-file", key])).await;
    run.fails();
    let served = common::serve(&store, &[]).await;
    common::assert_resolves(&served.client, "db/password", None, b"the real value").await;
}

#[tokio::test]
async fn the_argon2_parameters_given_at_init_are_recorded_in_the_header() {
    let store = common::passphrase_store("pp").await;
    let header = std::fs::read_to_string(store.dir.join("header.json")).unwrap();
    assert!(header.contains("19456"), "{header}");
    with_a_secret(&store).await;
}

#[tokio::test]
async fn serving_with_a_key_file_of_the_wrong_length_is_refused() {
    let store = common::key_store().await;
    with_a_secret(&store).await;
    let Secret::KeyFile(key) = &store.secret else {
        unreachable!()
    };
    let good = std::fs::read(key).unwrap();
    for bad in [&good[..31], &[good.as_slice(), b"\n"].concat()[..], &[][..]] {
        let path = store.path("bad.key");
        common::write_file(&path, bad, 0o600);
        let secret = Secret::KeyFile(path);
        let message = common::serve_fails(serve_args(&store, &secret)).await;
        assert!(message.contains("32"), "{} bytes: {message}", bad.len());
        common::cli(verify_args(&store, &secret))
            .await
            .fails_with("32");
    }
}
