//! Two provider processes on one store: writes from both are serialized, none is lost, and each
//! process sees the other's writes at once.

#![allow(clippy::unwrap_used)] // tests may panic on what they did not expect

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use keyhole_protocol::{ErrorCode, Op, Outcome, Reply};
use keyhole_transport::client::Client;
use tokio::task::JoinSet;

const ROTATES_EACH: usize = 100;
/// Generous: 200 writes from two processes contend for one lock, each with its fsyncs.
const SLOW_CALL: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_rotates_from_two_processes_lose_no_update() {
    let store = common::key_store().await;
    let a = common::serve(&store, &[]).await;
    let b = common::serve(&store, &[]).await;
    let name = "shared/db-password";
    assert_eq!(common::store(&a.client, name, b"initial").await, "1");

    let clients = [Arc::new(a.client), Arc::new(b.client)];
    let mut calls = JoinSet::new();
    for (p, client) in clients.iter().enumerate() {
        for i in 0..ROTATES_EACH {
            let client = Arc::clone(client);
            calls.spawn(async move {
                let value = format!("p{p}-rotate-{i}").into_bytes();
                let outcome = client
                    .call(common::rotate_op(name, &value), SLOW_CALL)
                    .await;
                (value, outcome)
            });
        }
    }
    let mut by_version: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    while let Some(joined) = tokio::time::timeout(SLOW_CALL * 2, calls.join_next())
        .await
        .expect("the rotates did not finish in time")
    {
        let (value, outcome) = joined.unwrap();
        let version = match outcome {
            Ok(Outcome::Ok(Reply::Rotated { version })) => version,
            other => panic!("a rotate answered {other:?}"),
        };
        let n: u64 = version.parse().unwrap();
        assert!(
            by_version.insert(n, value).is_none(),
            "version {n} was returned to two rotates: an update was lost"
        );
    }
    let total = 2 * ROTATES_EACH as u64;
    assert_eq!(by_version.len() as u64, total);
    assert_eq!(
        by_version.keys().copied().collect::<Vec<_>>(),
        (2..=total + 1).collect::<Vec<_>>(),
        "versions are a counter"
    );

    for (p, client) in clients.iter().enumerate() {
        let d = common::describe(client, name).await;
        let current = (1 + total).to_string();
        assert_eq!(
            d.current_version.as_deref(),
            Some(current.as_str()),
            "seen by {p}"
        );
        // The last write resolves, from either process, and so does every version still kept.
        common::assert_resolves(client, name, None, &by_version[&(1 + total)]).await;
        assert_eq!(d.versions.len(), 10, "versions_kept defaults to 10");
        for info in &d.versions {
            let n: u64 = info.version.parse().unwrap();
            common::assert_resolves(client, name, Some(&info.version), &by_version[&n]).await;
        }
    }
}

/// Compare-and-swap increments: rotate with `expected_version` = what Describe said, retrying on
/// Conflict. Two processes each complete `n`; no two may succeed from the same version.
async fn cas_loop(
    client: Arc<Client>,
    name: &'static str,
    who: usize,
    n: usize,
) -> Vec<(u64, u64)> {
    let mut done = Vec::new();
    let mut attempts = 0;
    while done.len() < n {
        attempts += 1;
        assert!(attempts < 100 * n, "process {who} kept conflicting");
        let d = common::describe(&client, name).await;
        let expected = d.current_version.unwrap();
        let op = Op::Rotate {
            name: name.into(),
            value: common::value(format!("p{who}-{}", done.len()).as_bytes()),
            expected_version: Some(expected.clone()),
        };
        match common::call(&client, op).await {
            Outcome::Ok(Reply::Rotated { version }) => {
                done.push((expected.parse().unwrap(), version.parse().unwrap()));
            }
            Outcome::Err(e) if e.code == ErrorCode::Conflict => {}
            other => panic!("process {who}: {other:?}"),
        }
    }
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_swap_across_two_processes_is_atomic() {
    let store = common::key_store().await;
    let a = common::serve(&store, &[]).await;
    let b = common::serve(&store, &[]).await;
    let name = "shared/counter";
    common::store(&a.client, name, b"0").await;
    let (ca, cb) = (Arc::new(a.client), Arc::new(b.client));
    let n = 25;
    let ta = tokio::spawn(cas_loop(Arc::clone(&ca), name, 0, n));
    let tb = tokio::spawn(cas_loop(Arc::clone(&cb), name, 1, n));
    let (ra, rb) = tokio::time::timeout(Duration::from_secs(60), async {
        (ta.await.unwrap(), tb.await.unwrap())
    })
    .await
    .expect("the compare-and-swap loops did not finish within 60 s");
    let mut from = HashSet::new();
    for (expected, new) in ra.iter().chain(&rb) {
        assert!(
            from.insert(*expected),
            "two rotates both succeeded expecting version {expected}"
        );
        assert_eq!(*new, expected + 1);
    }
    let d = common::describe(&cb, name).await;
    assert_eq!(d.current_version, Some((1 + 2 * n).to_string()));
}

/// The names on the first page of List from `client`.
async fn listed(client: &Client) -> Vec<String> {
    let op = Op::List {
        prefix: String::new(),
        page: None,
        limit: 0,
    };
    match common::call(client, op).await {
        Outcome::Ok(Reply::Listed { entries, .. }) => entries.into_iter().map(|d| d.name).collect(),
        other => panic!("List answered {other:?}"),
    }
}

#[tokio::test]
async fn list_sees_another_process_write_even_when_the_directory_time_stands_still() {
    // On a file system with coarse timestamps, two writes within one tick leave the directory's
    // mtime where it was; the store's write counter moves with every write.
    let store = common::key_store().await;
    let a = common::serve(&store, &[]).await;
    let b = common::serve(&store, &[]).await;
    common::store(&a.client, "first", b"one").await;
    assert_eq!(listed(&b.client).await, ["first"]);
    let generation = std::fs::read_dir(&store.dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("gen-"))
        .expect("a generation directory");
    let mtime = std::fs::metadata(&generation).unwrap().modified().unwrap();

    common::store(&a.client, "second", b"two").await;
    std::fs::File::open(&generation)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert_eq!(listed(&b.client).await, ["first", "second"]);
    // And this process's own writes keep its index current without a rescan.
    common::store(&b.client, "third", b"three").await;
    assert_eq!(listed(&b.client).await, ["first", "second", "third"]);
    assert_eq!(listed(&a.client).await, ["first", "second", "third"]);
    a.stop().await;
    b.stop().await;
}
