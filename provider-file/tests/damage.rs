//! Damaged files: a damaged record costs only its own secret, answered Internal with a message
//! that names it; a damaged header stops the store from opening, never opening it empty. `verify`
//! finds both.

#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

mod common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use keyhole_protocol::{ErrorCode, Op};
use keyhole_provider_file::record::Record;

use common::TestStore;

/// A store holding `victim` (rotated once) and `bystander`; returns the victim's record file.
async fn store_with_two_secrets() -> (TestStore, PathBuf) {
    let store = common::key_store().await;
    let served = common::serve(&store, &[]).await;
    common::store(&served.client, "bystander", b"still here").await;
    let before = store.record_files();
    assert_eq!(before.len(), 1, "one record file per name: {before:?}");
    common::store(&served.client, "team/victim", b"victim v1").await;
    common::rotate(&served.client, "team/victim", b"victim v2").await;
    served.stop().await;
    let after = store.record_files();
    let new: Vec<PathBuf> = after.into_iter().filter(|f| !before.contains(f)).collect();
    assert_eq!(
        new.len(),
        1,
        "one record file per name, all versions in it: {new:?}"
    );
    for f in store.record_files() {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            bytes.starts_with(b"KHFR"),
            "{} does not start with KHFR",
            f.display()
        );
        assert!(bytes.len() > 4 + 2 + 32, "{} is too short", f.display());
    }
    (store, new.into_iter().next().unwrap())
}

fn file_name(path: &Path) -> String {
    path.file_name().unwrap().to_str().unwrap().to_owned()
}

fn verify_args(store: &TestStore) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["verify".into(), store.dir.clone().into()];
    args.extend(store.secret.args());
    args
}

/// The victim answers Internal naming itself and its record file, pinned or not; the bystander
/// resolves; verify reports exactly the victim's record.
async fn assert_only_the_victim_is_lost(store: &TestStore, record: &Path) {
    let served = common::serve(store, &[]).await;
    let c = &served.client;
    let record_name = file_name(record);
    for version in [None, Some("2"), Some("1")] {
        let e = common::expect_err(
            common::resolve(c, "team/victim", version).await,
            ErrorCode::Internal,
            &format!("resolve of the damaged record, version {version:?}"),
        );
        assert!(
            e.message.contains("team/victim") && e.message.contains(&record_name),
            "the message does not name the secret and its record file {record_name}: {}",
            e.message
        );
        assert!(!e.message.contains("victim v"), "{}", e.message);
    }
    let e = common::expect_err(
        common::call(c, common::rotate_op("team/victim", b"victim v3")).await,
        ErrorCode::Internal,
        "rotate of the damaged record",
    );
    assert!(e.message.contains(&record_name), "{}", e.message);
    for (op, what) in [
        (
            Op::Describe {
                name: "team/victim".into(),
            },
            "describe",
        ),
        (common::store_op("team/victim", b"victim v3"), "store"),
    ] {
        let e = common::expect_err(
            common::call(c, op).await,
            ErrorCode::Internal,
            &format!("{what} of the damaged record"),
        );
        assert!(e.message.contains(&record_name), "{}", e.message);
    }
    common::assert_resolves(c, "bystander", None, b"still here").await;
    // Other names stay writable too.
    common::store(c, "newcomer", b"fresh").await;
    common::assert_resolves(c, "newcomer", None, b"fresh").await;
    let stderr = served.stop().await.output().bytes();
    assert!(!common::contains(&stderr, b"victim v"));

    let run = common::cli(verify_args(store)).await;
    assert_eq!(run.code, Some(1), "{}", run.show());
    let damaged: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("damaged: "))
        .collect();
    assert_eq!(damaged.len(), 1, "{}", run.show());
    assert!(
        damaged[0].contains(&record_name),
        "the line does not name {record_name}: {}",
        run.show()
    );
    assert!(!run.stdout.contains("victim v"), "{}", run.show());
}

#[tokio::test]
async fn one_flipped_bit_costs_only_that_secret() {
    let (store, record) = store_with_two_secrets().await;
    let mut bytes = std::fs::read(&record).unwrap();
    // A bit in the body, past magic, format and checksum.
    let at = 4 + 2 + 32 + (bytes.len() - 38) / 2;
    bytes[at] ^= 0x10;
    std::fs::write(&record, &bytes).unwrap();
    assert_only_the_victim_is_lost(&store, &record).await;
}

#[tokio::test]
async fn a_flipped_bit_in_the_checksum_is_caught_too() {
    let (store, record) = store_with_two_secrets().await;
    let mut bytes = std::fs::read(&record).unwrap();
    bytes[4 + 2 + 5] ^= 0x01;
    std::fs::write(&record, &bytes).unwrap();
    assert_only_the_victim_is_lost(&store, &record).await;
}

#[tokio::test]
async fn a_version_counter_at_its_maximum_refuses_writes_and_never_wraps() {
    // The checksum is not a MAC: whoever can write the directory can set any counter. The next
    // version would wrap to 0 and then reuse numbers, so the write is refused instead.
    let (store, record) = store_with_two_secrets().await;
    let file = file_name(&record);
    let bytes = std::fs::read(&record).unwrap();
    let mut decoded = Record::decode(&bytes, &file, Some("team/victim")).unwrap();
    decoded.counter = u64::MAX;
    std::fs::write(&record, decoded.encode().unwrap()).unwrap();

    let served = common::serve(&store, &[]).await;
    let c = &served.client;
    common::assert_resolves(c, "team/victim", None, b"victim v2").await;
    for (op, what) in [
        (common::rotate_op("team/victim", b"victim v3"), "rotate"),
        (common::store_op("team/victim", b"victim v3"), "store"),
    ] {
        let e = common::expect_err(
            common::call(c, op).await,
            ErrorCode::Internal,
            &format!("{what} past the last version number"),
        );
        assert!(
            e.message.contains("version counter is at its maximum") && e.message.contains(&file),
            "{}",
            e.message
        );
    }
    common::assert_resolves(c, "team/victim", None, b"victim v2").await;
    common::assert_resolves(c, "bystander", None, b"still here").await;
    served.stop().await;
}

#[tokio::test]
async fn a_truncated_record_costs_only_that_secret() {
    let (store, record) = store_with_two_secrets().await;
    let bytes = std::fs::read(&record).unwrap();
    std::fs::write(&record, &bytes[..bytes.len() / 2]).unwrap();
    assert_only_the_victim_is_lost(&store, &record).await;
}

#[tokio::test]
async fn an_empty_record_costs_only_that_secret() {
    let (store, record) = store_with_two_secrets().await;
    std::fs::write(&record, b"").unwrap();
    assert_only_the_victim_is_lost(&store, &record).await;
}

/// After `damage` to header.json, serving and verifying fail with a clear message.
async fn assert_header_damage_is_refused(damage: impl FnOnce(&Path)) {
    let (store, _) = store_with_two_secrets().await;
    damage(&store.dir.join("header.json"));
    let message = common::serve_fails(store.serve_args()).await;
    assert!(
        message.contains("header"),
        "the error does not say the header is damaged: {message}"
    );
    common::cli(verify_args(&store)).await.fails_with("header");
}

#[tokio::test]
async fn a_truncated_header_stops_the_store_from_opening() {
    assert_header_damage_is_refused(|header| {
        let bytes = std::fs::read(header).unwrap();
        std::fs::write(header, &bytes[..bytes.len() / 2]).unwrap();
    })
    .await;
}

#[tokio::test]
async fn an_empty_header_stops_the_store_from_opening() {
    assert_header_damage_is_refused(|header| std::fs::write(header, b"").unwrap()).await;
}

#[tokio::test]
async fn a_foreign_header_stops_the_store_from_opening() {
    assert_header_damage_is_refused(|header| {
        std::fs::write(
            header,
            b"{\"name\": \"some other program\", \"version\": 3}\n",
        )
        .unwrap()
    })
    .await;
}

#[tokio::test]
async fn a_binary_header_stops_the_store_from_opening() {
    assert_header_damage_is_refused(|header| {
        std::fs::write(header, b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR").unwrap()
    })
    .await;
}

#[tokio::test]
async fn a_missing_header_stops_the_store_from_opening() {
    assert_header_damage_is_refused(|header| std::fs::remove_file(header).unwrap()).await;
}

#[tokio::test]
async fn a_directory_that_is_no_store_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("key");
    common::write_file(&key, &[7u8; 32], 0o600);
    let mut args: Vec<OsString> = vec!["--store".into(), tmp.path().join("nowhere").into()];
    args.extend(["--key-file".into(), key.into()]);
    let message = common::serve_fails(args).await;
    assert!(message.contains("error: "), "{message}");
}
